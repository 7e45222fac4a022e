"""sequence_parallel_attention on any mesh: Explicit or Auto axes, inputs sharded or not.

The causal zigzag reorder runs sharded (collective permutes inside the shard_map), so it
needs no gather of the sequence and type-checks on Explicit meshes.
"""
import contextlib
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from jaxpar import comm, make_mesh
from jaxpar.attention import dense_attention, layout, sequence_parallel_attention

B, N, H, D = 2, 32, 4, 8
IMPLS = ["ring", "tokenring", "ulysses", "hybrid"]
MESHES = ["explicit", "auto", "jaxpar"]


def mesh_for(kind, impl, p=4, data=1):
    """Mesh with `data` × p devices; hybrid splits p into ring `seq` × Ulysses `seq_inner`."""
    devices = jax.devices()[:data * p]
    sizes = {"seq": p // 2, "seq_inner": 2} if impl == "hybrid" else {"seq": p}
    axis = ("seq", "seq_inner") if impl == "hybrid" else "seq"
    if kind == "jaxpar":
        return make_mesh(data=data, **sizes, devices=devices), axis
    shape, names = (data, *sizes.values()), ("data", *sizes)
    types = {"explicit": AxisType.Explicit, "auto": AxisType.Auto}[kind]
    return jax.make_mesh(shape, names, axis_types=(types,) * len(names), devices=devices), axis


def inputs(kv_heads=2, seed=0):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((B, N, H, D), np.float32)
    k = rng.standard_normal((B, N, kv_heads, D), np.float32)
    v = rng.standard_normal((B, N, kv_heads, D), np.float32)
    w = rng.standard_normal((B, N, H, D), np.float32)  # cotangent direction
    return q, k, v, w


@functools.lru_cache(maxsize=None)
def reference(causal):
    """Dense attention and its gradients on unsharded numpy copies of `inputs()`."""
    q, k, v, w = inputs()

    def loss(q, k, v):
        out = dense_attention(q, k, v, causal=causal)
        return jnp.sum(out * w), out

    (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(
        q, k, v)
    return np.asarray(out), [np.asarray(g) for g in grads]


def place(xs, mesh, spec):
    return [x if spec is None else jax.device_put(x, NamedSharding(mesh, spec)) for x in xs]


def mesh_context(mesh):
    # Eager jax.grad of a reduction of an Explicit-sharded array needs the mesh context (a
    # JAX rule for any explicitly sharded value, not specific to attention); jit does not.
    explicit = AxisType.Explicit in tuple(mesh.axis_types)
    return jax.set_mesh(mesh) if explicit else contextlib.nullcontext()


def check(impl, kind, causal, spec_of, *, data=1, eager=False, atol=1e-5):
    mesh, axis = mesh_for(kind, impl, data=data)
    q, k, v, w = inputs()
    ref_out, ref_grads = reference(causal)

    def attn(q, k, v):
        return sequence_parallel_attention(q, k, v, mesh=mesh, impl=impl, axis=axis,
                                           causal=causal)

    def loss(q, k, v):
        out = attn(q, k, v)
        return jnp.sum(out * w), out

    args = place((q, k, v), mesh, spec_of(axis))
    grad_fn = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)
    if eager:
        with mesh_context(mesh):
            out = attn(*args)
            (_, out_g), grads = grad_fn(*args)
        np.testing.assert_allclose(np.asarray(out_g), ref_out, atol=atol, rtol=0)
    else:
        (_, out), grads = jax.jit(grad_fn)(*args)
    # batch sharding is known to the wrapper for concrete arrays and Explicit axes
    keeps_batch = eager or kind == "explicit"
    assert_seq_sharded(out, mesh, spec_of(axis) if keeps_batch else None, axis)
    np.testing.assert_allclose(np.asarray(out), ref_out, atol=atol, rtol=0)
    for name, g, r in zip("qkv", grads, ref_grads):
        np.testing.assert_allclose(np.asarray(g), r, atol=atol * max(1.0, np.abs(r).max()),
                                   rtol=0, err_msg=f"d{name}")
    return out


def assert_seq_sharded(out, mesh, in_spec, axis):
    """The output is sharded over the sequence axes, batch kept where the input's was."""
    batch = in_spec[0] if in_spec is not None and len(in_spec) and in_spec[0] else None
    batch = batch if batch != "seq" else None  # (never the batch over a sequence axis)
    want = NamedSharding(mesh, P(batch, axis))
    assert out.sharding.is_equivalent_to(want, out.ndim), (out.sharding, want)


def seq_sharded(axis):
    return P(None, axis)


def unsharded(axis):
    return None


SPECS = {"none": unsharded, "seq": seq_sharded}

# Default run (kept short): each impl on one mesh kind, causal, under jit or eagerly, inputs
# sharded on the sequence or not at all. The slow set runs the whole product.
DEFAULT = [("ring", "explicit", "seq", False), ("tokenring", "auto", "seq", False),
           ("ulysses", "jaxpar", "seq", False), ("hybrid", "explicit", "seq", False),
           ("ring", "explicit", "none", True)]


@pytest.mark.parametrize("impl,kind,sharded,eager", DEFAULT)
def test_causal_on_any_mesh(impl, kind, sharded, eager):
    check(impl, kind, True, SPECS[sharded], eager=eager)


@pytest.mark.slow
def test_non_causal_explicit():
    check("tokenring", "explicit", False, seq_sharded)


def test_batch_sharded_inputs_keep_their_batch_sharding():
    # data × seq mesh, inputs sharded on both: the batch stays on `data`, no gather over it
    out = check("ring", "explicit", True, lambda axis: P("data", axis), data=2)
    assert out.sharding.spec[0] == "data"


@pytest.mark.slow
@pytest.mark.parametrize("sharded", ["none", "seq"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("kind", MESHES)
def test_full_matrix(kind, impl, causal, sharded):
    check(impl, kind, causal, SPECS[sharded])


@pytest.mark.slow
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("kind", MESHES)
def test_eager_matrix(kind, impl):
    check(impl, kind, True, seq_sharded, eager=True)


@pytest.mark.slow
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("kind", MESHES)
def test_heads_sharded_inputs(kind, impl):
    # heads on a non-sequence axis (as tensor parallelism would leave them): gathered over
    # `data`, resharded onto the sequence
    check(impl, kind, True, lambda axis: P(None, None, "data"), data=2)


@pytest.mark.slow
@pytest.mark.parametrize("batch_only", [False, True])
@pytest.mark.parametrize("impl,eager", [(i, False) for i in IMPLS] + [("ring", True)])
@pytest.mark.parametrize("kind", MESHES)
def test_batch_sharded_full(kind, impl, eager, batch_only):
    spec = (lambda axis: P("data")) if batch_only else (lambda axis: P("data", axis))
    check(impl, kind, True, spec, data=2, eager=eager)


# ---------------------------------------------------------------------------------------
# The sharded zigzag permutation itself.


def apply_plan(x, n, p, devices, inverse=False):
    """Simulate zigzag_plan on a [N] numpy array split into `devices` shards."""
    s, m, moves = layout.zigzag_plan(n, p, devices, inverse=inverse)
    shards = x.reshape(devices, m, s)
    out = np.full_like(shards, -1)
    for (src_slot, dst_slot), pairs in moves.items():
        for src, dst in pairs:
            assert (out[dst, dst_slot] == -1).all(), "slot written twice"
            out[dst, dst_slot] = shards[src, src_slot]
    return out.reshape(-1)


@pytest.mark.parametrize("n,p,devices", [(16, 1, 1), (16, 2, 2), (32, 4, 4), (48, 8, 8),
                                         (32, 2, 4), (64, 4, 8), (32, 2, 8), (96, 3, 6)])
def test_plan_matches_zigzag_indices(n, p, devices):
    idx = layout.zigzag_indices(n, p)
    tokens = np.arange(n)
    np.testing.assert_array_equal(apply_plan(tokens, n, p, devices), idx)
    np.testing.assert_array_equal(apply_plan(idx, n, p, devices, inverse=True), tokens)
    s, m, moves = layout.zigzag_plan(n, p, devices)
    assert s * m * devices == n
    for pairs in moves.values():  # each (src_slot, dst_slot) exchange is a partial permutation
        assert len({a for a, _ in pairs}) == len(pairs) == len({b for _, b in pairs})


@pytest.mark.parametrize("kind", ["explicit", "auto"])
@pytest.mark.parametrize("shape,names", [((4,), ("seq",)), ((2, 2), ("seq", "seq_inner"))])
def test_zigzag_sharded_equals_take(kind, shape, names):
    types = {"explicit": AxisType.Explicit, "auto": AxisType.Auto}[kind]
    mesh = jax.make_mesh(shape, names, axis_types=(types,) * len(names),
                         devices=jax.devices()[:4])
    p = shape[0]  # hybrid: zigzag over the ring axis, each ring shard split over seq_inner
    x = np.arange(2 * N * 3, dtype=np.float32).reshape(2, N, 3)
    axes = names if len(names) > 1 else names[0]
    xs = jax.device_put(x, NamedSharding(mesh, P(None, axes)))
    z = jax.jit(lambda x: layout.to_zigzag_sharded(x, mesh, names, p))(xs)
    np.testing.assert_array_equal(np.asarray(z), np.asarray(layout.to_zigzag(x, p)))
    assert z.sharding.is_equivalent_to(NamedSharding(mesh, P(None, axes)), 3)
    back = layout.from_zigzag_sharded(z, mesh, names, p)
    np.testing.assert_array_equal(np.asarray(back), x)
    # unsharded input, default p = product of the axis sizes
    z = layout.to_zigzag_sharded(x, mesh, names)
    np.testing.assert_array_equal(np.asarray(z), np.asarray(layout.to_zigzag(x, 4)))


@pytest.mark.parametrize("impl", [
    "ring", pytest.param("hybrid", marks=pytest.mark.slow),
    pytest.param("tokenring", marks=pytest.mark.slow),
    pytest.param("ulysses", marks=pytest.mark.slow)])
def test_causal_wrapper_gathers_nothing(impl):
    # Compiled forward + backward on sequence-sharded inputs: no all-gather at all, and the
    # only extra traffic over the non-causal call is the reorder, each element sent at most
    # once per array (q, k, v and out forward; dout, dq, dk, dv backward).
    mesh, axis = mesh_for("explicit", impl)
    q, k, v = place(inputs(kv_heads=4)[:3], mesh, P(None, axis))

    def counted(causal):
        def f(q, k, v):
            return sequence_parallel_attention(q, k, v, mesh=mesh, impl=impl, axis=axis,
                                               causal=causal).sum()

        fn = jax.value_and_grad(f, argnums=(0, 1, 2))
        hlo = comm.compiled_hlo(fn, q, k, v)
        assert "all-gather" not in hlo, f"causal={causal}"
        return comm.bytes_by_kind(hlo)

    causal, plain = counted(True), counted(False)
    local_bytes = q.size // 4 * 4
    extra = causal.pop("collective-permute") - plain.pop("collective-permute", 0.0)
    assert 0 < extra <= 8 * local_bytes
    assert causal == plain
