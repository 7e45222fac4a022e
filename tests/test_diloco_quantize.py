"""Wire formats: round-trip error bounds, bytes on the wire (formula vs compiled HLO), and
low-bit outer gradients still train."""
import re

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxpar import comm
from jaxpar.diloco import quantize as qz
from jaxpar.diloco import streaming_diloco
from jaxpar.mesh import make_mesh
from diloco_helpers import batches_M, loss_fn, run_streaming, tiny_params


def sample(n=4096, seed=0):
    rng = np.random.default_rng(seed)
    # heavy-tailed with exact zeros and one outlier block, like real outer gradients
    x = rng.standard_t(3, size=n).astype(np.float32) * 1e-3
    x[:17] = 0.0
    x[300:310] *= 50
    return jnp.asarray(x)


def block_absmax(x):
    n = x.shape[0]
    a = np.abs(np.asarray(x)).reshape(-1, qz.BLOCK).max(1)
    return np.repeat(a, qz.BLOCK)[:n]


@pytest.mark.parametrize("fmt, bound", [
    ("bf16", lambda x, a: 2.0**-8 * np.abs(x)),
    ("int8", lambda x, a: a / 254),
    ("fp4_e2m1", lambda x, a: np.maximum(a / 24, np.abs(x) / 4)),
    ("fp4_e3m0", lambda x, a: np.maximum(a / 128, np.abs(x) / 3)),
])
def test_roundtrip_error_bounds(fmt, bound):
    x = sample()
    y = np.asarray(qz.roundtrip(x, fmt))
    err = np.abs(y - np.asarray(x))
    limit = bound(np.asarray(x), block_absmax(x)) * (1 + 1e-6) + 1e-12
    assert np.all(err <= limit), (fmt, float((err - limit).max()))
    assert np.all(y[:17] == 0.0)  # zeros stay zeros
    assert np.all(np.sign(y) * np.sign(x) >= 0)  # no sign flips
    # and the format is not a no-op: low-bit formats lose information
    if fmt != "bf16":
        assert err.max() > 0


def test_e3m0_values_are_signed_powers_of_two():
    x = jnp.asarray(np.linspace(-1, 1, 512, dtype=np.float32))
    y = np.asarray(qz.roundtrip(x, "fp4_e3m0"))  # scale = 1 in both blocks
    vals = np.unique(np.abs(y))
    np.testing.assert_array_equal(vals, [0.0] + [2.0**-k for k in range(6, -1, -1)])
    assert len(np.unique(y)) <= 15  # 4 bits: ±7 magnitudes and zero


def test_e2m1_uses_ml_dtypes_grid():
    x = jnp.asarray(np.array([6.0, 5.1, 4.9, 2.4, 0.26, -0.24, -1.25] + [0.0] * 249, np.float32))
    y = np.asarray(qz.roundtrip(x, "fp4_e2m1"))[:7]
    np.testing.assert_array_equal(y, [6.0, 6.0, 4.0, 2.0, 0.5, -0.0, -1.0])


def _groups(line, num_devices):
    """Device groups of a collective line (mesh form: the axes named; explicit {{..},{..}})."""
    m = re.search(r"replica_groups=mesh\[([^\]]*)\]\s*\{([^}]*)\}", line)
    if m:
        sizes = [int(v) for v in re.findall(r"'[^']+'=(\d+)", m.group(1))]
        names = re.findall(r"'([^']+)'=", m.group(1))
        ids = np.arange(num_devices).reshape(sizes)
        axes = [names.index(a) for a in re.findall(r"'([^']+)'", m.group(2))]
        rest = [d for d in range(len(sizes)) if d not in axes]
        return ids.transpose(rest + axes).reshape(-1, int(np.prod([sizes[a] for a in axes]))).tolist()
    m = re.search(r"replica_groups=\{((?:\{[\d,]*\},?)+)\}", line)
    if m:
        return [[int(v) for v in g.split(",")] for g in re.findall(r"\{([\d,]*)\}", m.group(1))]
    m = re.search(r"source_target_pairs=\{((?:\{[\d,]*\},?)+)\}", line)
    if m:
        return [[int(v) for v in g.split(",")] for g in re.findall(r"\{([\d,]*)\}", m.group(1))]
    raise AssertionError(f"no groups in {line[:200]}")


def _cross_replica(hlo, num_replicas, num_devices):
    """[(op, payload dtype)] of the collectives whose groups join devices of different replicas
    (the replica axis is the mesh's first: device i is in replica i // (devices / M)); they
    must not also mix devices inside a replica."""
    per = num_devices // num_replicas
    ops = {op.name: op for op in comm.collectives_from_hlo(hlo)}
    out = []
    for line in hlo.splitlines():
        m = re.match(r"\s*(?:ROOT\s+)?%?([\w.\-]+) = \(?(\w+)\[", line)
        if not (m and m.group(1) in ops):
            continue
        reps = [{i // per for i in g} for g in _groups(line, num_devices)]
        inner = [{i % per for i in g} for g in _groups(line, num_devices)]
        if any(len(r) > 1 for r in reps):
            assert all(len(r) == len(g) and len(i) == 1 for r, i, g in
                       zip(reps, inner, _groups(line, num_devices))), line[:200]
            out.append((ops[m.group(1)], m.group(2)))
    return out


@pytest.mark.parametrize("fmt, M, how", [
    ("none", 2, "auto"), ("bf16", 2, "auto"), ("int8", 2, "auto"), ("fp4_e2m1", 2, "auto"),
    ("fp4_e3m0", 2, "auto"), ("fp4_e3m0", 2, "reduce_scatter"), ("int8", 4, "auto"),
    ("bf16", 4, "auto"), ("fp4_e3m0", 4, "auto"), ("fp4_e2m1", 4, "all_gather"), ("fp4_e3m0", 8, "auto"),
])
def test_wire_bytes_match_compiled_hlo(fmt, M, how):
    mesh = make_mesh(replica=M, data=8 // M)
    sd = streaming_diloco(optax.sgd(1.0), num_replicas=M, sync_every=4, quantize=fmt, mesh=mesh,
                          low_bit_collective=how)
    n = 5000
    x = jax.device_put(jnp.ones((M, n)), NamedSharding(mesh, P("replica")))
    hlo = comm.compiled_hlo(sd.replica_mean, x)
    ops = _cross_replica(hlo, M, 8)
    got = sum(op.bytes_per_device for op, _ in ops) * (8 // M)  # summed over the replica's devices
    npad = sd._padded(n)
    wire = 4 * npad if fmt == "none" else qz.wire_bytes(npad, fmt)
    # closed form, independent of sd.sync_bytes: ring all-reduce / reduce-scatter + all-gather
    # both 2(M−1)/M payloads; the plain all-gather (M−1) payloads
    want = wire * ((M - 1) if sd.collective() == "all_gather" else 2 * (M - 1) / M)
    assert got == pytest.approx(want), (fmt, M, got, want)
    assert sd.sync_bytes({"layers_0": jnp.zeros(n), "layers_1": jnp.zeros(0)}) == [pytest.approx(want)]
    expect_kinds = {"all_reduce": {"all-reduce"}, "all_gather": {"all-gather"},
                    "reduce_scatter": {"all-to-all", "all-gather"}}[sd.collective()]
    assert {op.kind for op, _ in ops} == expect_kinds, [op.kind for op, _ in ops]
    # the payload crosses in its low-bit type, never as fp32; only the per-block scales are fp32
    dtype = {"none": "f32", "bf16": "u16", "int8": "s8", "fp4_e2m1": "u8", "fp4_e3m0": "u8"}[fmt]
    payload = sum(op.bytes_per_device for op, d in ops if d == dtype) * (8 // M)
    scales = sum(op.bytes_per_device for op, d in ops if d == "f32" and dtype != "f32") * (8 // M)
    assert payload == pytest.approx(want * (npad * qz.VALUE_BITS[fmt] // 8) / wire)
    assert payload + scales == pytest.approx(want)


def test_sync_bytes_per_fragment_and_peak():
    params = tiny_params(width=32, layers=4)
    base = dict(num_replicas=2, sync_every=8)
    dil = streaming_diloco(optax.sgd(0.1), **base)
    stream = streaming_diloco(optax.sgd(0.1), num_fragments=4, **base)
    fp4 = streaming_diloco(optax.sgd(0.1), num_fragments=4, quantize="fp4_e3m0", **base)
    r_d, r_s, r_q = (s.bytes_report(params, 80) for s in (dil, stream, fp4))
    assert r_d["syncs"] == [10] and r_s["syncs"] == [10] * 4
    assert r_s["peak_per_sync"] <= 0.3 * r_d["peak_per_sync"]  # ≈ 1/P (+ block padding)
    assert r_q["total"] < r_s["total"] / 7  # 4.125 bits vs 32


@pytest.mark.parametrize("fmt, how", [("int8", "auto"), ("fp4_e2m1", "auto"), ("fp4_e3m0", "auto"),
                                      ("fp4_e3m0", "reduce_scatter")])
def test_low_bit_outer_gradients_still_train(fmt, how):
    params = tiny_params(3)
    steps = 40
    kw = dict(num_replicas=2, sync_every=4, num_fragments=2, overlap_steps=1, alpha=0.0)
    ref = run_streaming(streaming_diloco(optax.adam(3e-3), **kw), params, steps)
    low = run_streaming(streaming_diloco(optax.adam(3e-3), quantize=fmt, low_bit_collective=how, **kw),
                        params, steps)

    def eval_loss(p):
        return float(np.mean([loss_fn(p, (b[0][r], b[1][r])) for r in range(2) for b in [batches_M(10_000)]]))

    l0, lref, llow = eval_loss(params), eval_loss(ref.global_params), eval_loss(low.global_params)
    assert llow < 0.7 * l0, (fmt, l0, llow)
    assert llow < lref * 1.1 + 1e-3, (fmt, lref, llow)
    # the quantized run really took a different path
    assert not np.allclose(low.global_params["head"], ref.global_params["head"])


# ---------------------------------------------------------------------------------------
# the low-bit mean over replicas against numpy: quantize -> fp32 mean -> (re-quantize)

_GRID = {  # (magnitudes on a unit scale, absmax maps to `top`)
    "int8": (np.arange(128, dtype=np.float64), 127.0),
    "fp4_e2m1": (np.array([0, .5, 1, 1.5, 2, 3, 4, 6]), 6.0),
    "fp4_e3m0": (np.array([0] + [2.0**-k for k in range(6, -1, -1)]), 1.0),
}


def np_roundtrip(x_KB, fmt):
    """Blockwise absmax quantization to the nearest grid value, written from the format
    definitions (no jaxpar code)."""
    x = np.asarray(x_KB, np.float64)
    if fmt == "bf16":
        return np.asarray(x, np.float32).astype(ml_dtypes.bfloat16).astype(np.float64)
    grid, top = _GRID[fmt]
    a = np.abs(x).max(axis=1, keepdims=True)
    s = np.where(a > 0, a / top, 1.0)
    r = np.abs(x) / s
    q = grid[np.argmin(np.abs(r[..., None] - grid), axis=-1)]
    return np.sign(x) * q * s


@pytest.mark.parametrize("fmt, M, how", [
    ("fp4_e3m0", 4, "auto"), ("fp4_e2m1", 4, "auto"), ("int8", 4, "auto"), ("bf16", 4, "auto"),
    ("fp4_e3m0", 2, "reduce_scatter"), ("fp4_e3m0", 2, "auto"), ("fp4_e2m1", 4, "all_gather"),
])
@pytest.mark.parametrize("with_mesh", [True, False])
def test_low_bit_mean_equals_numpy(fmt, M, how, with_mesh):
    rng = np.random.default_rng(M)
    n = 3000
    x_MN = (rng.standard_t(3, size=(M, n)) * 1e-3).astype(np.float32)
    x_MN[:, 500:700] = 0.0  # a whole zero block stays exactly zero
    mesh = make_mesh(replica=M, data=8 // M) if with_mesh else None
    sd = streaming_diloco(optax.sgd(1.0), num_replicas=M, sync_every=4, quantize=fmt, mesh=mesh,
                          low_bit_collective=how)
    x = jnp.asarray(x_MN)
    if mesh is not None:
        x = jax.device_put(x, NamedSharding(mesh, P("replica")))
    got = np.asarray(jax.jit(sd.replica_mean)(x), np.float64)

    npad = sd._padded(n)
    blocks = np.pad(x_MN, ((0, 0), (0, npad - n))).reshape(M, -1, qz.BLOCK)
    mean = np.mean([np_roundtrip(b, fmt) for b in blocks], axis=0)  # fp32 accumulation of codes
    if sd.collective() == "reduce_scatter":
        want = np_roundtrip(mean, fmt).reshape(-1)[:n]  # the reduced chunk re-quantized
        # rounding ties after a different summation order may differ by one grid step: rare
        close = np.isclose(got, want, rtol=1e-5, atol=1e-12)
        assert close.mean() > 0.999, close.mean()
        a = np.repeat(np.abs(mean).max(axis=1), qz.BLOCK)[:n]
        step = {"int8": a / 127, "fp4_e2m1": a / 6 * 2, "fp4_e3m0": np.maximum(a / 64, np.abs(want) / 2),
                "bf16": np.abs(want) * 2.0**-7}[fmt]
        assert np.all(np.abs(got - want) <= step * (1 + 1e-6) + 1e-12)
    else:
        want = mean.reshape(-1)[:n]
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-12)
    assert np.all(got[500:700] == 0.0)
    # and it is a mean of the inputs up to the format's error
    assert np.abs(got - x_MN.mean(0)).max() <= 0.5 * np.abs(x_MN).max()


def test_reduce_scatter_training_on_mesh_equals_no_mesh():
    """M=4 replicas, each sharded over 2 devices: the shard_map all_to_all/all-gather sync
    gives the same training run as the dense formula without a mesh."""
    params = tiny_params(5)
    kw = dict(num_replicas=4, sync_every=4, num_fragments=2, overlap_steps=1, alpha=0.5, quantize="fp4_e3m0")
    mesh = make_mesh(replica=4, data=2)
    on = streaming_diloco(optax.adam(3e-3), mesh=mesh, **kw)
    assert on.collective() == "reduce_scatter"
    a = run_streaming(on, params, 12, mesh, m=4)
    b = run_streaming(streaming_diloco(optax.adam(3e-3), **kw), params, 12, m=4)
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6), a.global_params, b.global_params)
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6), a.params, b.params)
    assert not np.allclose(a.global_params["head"], params["head"])
