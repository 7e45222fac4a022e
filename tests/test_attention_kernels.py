"""The block-pair kernels (jaxpar.attention.kernels) against the fp32 dense reference.

The Pallas GPU kernel runs here in Pallas interpret mode (CPU): the same kernel code and
BlockSpecs as on a GPU, at toy sizes (B=1, 64 tokens per shard, H=4, K=2, D=16, blocks of
16/32 so every loop runs several iterations). Interpret mode cannot run under a shard_map
that checks varying axes (jax 0.10), so `sequence_parallel_attention` turns check_vma off
for it (`kernel.check_vma`). Interpret mode is slow: the default run covers causal GQA
with segments for ring, TokenRing and Ulysses; the rest is @pytest.mark.slow.
"""
import importlib.util
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxpar import make_mesh
from jaxpar._spmd import varying_axes
from jaxpar.attention import (attention, blockwise, dense_attention, kernels,
                              sequence_parallel_attention)

B, H, D = 1, 4, 16
PALLAS = kernels.PallasGpuKernel(interpret=True, block_q=32, block_k=16, block_q_bwd=16,
                                 block_k_bwd=32)
XLA_SMALL = kernels.XlaKernel(tile=4, halving=True)  # tiles of 4: every loop runs
XLA_SKIP = kernels.XlaKernel(tile=4, halving=False)  # causal by skipping tiles (CPU default)


def inputs(n, kv_heads, with_segments, seed=0, dtype=jnp.float32):
    kq, kk, kv, ks, kw = jax.random.split(jax.random.key(seed), 5)
    q = jax.random.normal(kq, (B, n, H, D), dtype)
    k = jax.random.normal(kk, (B, n, kv_heads, D), dtype)
    v = jax.random.normal(kv, (B, n, kv_heads, D), dtype)
    seg = jnp.sort(jax.random.randint(ks, (B, n), 0, 4), axis=1) if with_segments else None
    w = jax.random.normal(kw, (B, n, H, D), jnp.float32)
    return q, k, v, seg, w


def value_and_grads(attn, q, k, v, w):
    def loss(q, k, v):
        return jnp.sum(attn(q, k, v).astype(jnp.float32) * w)

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))(q, k, v)


def assert_matches_dense(attn, n, causal, kv_heads, with_segments, atol=2e-5):
    q, k, v, seg, w = inputs(n, kv_heads, with_segments)
    val, grads = value_and_grads(attn(seg), q, k, v, w)
    ref_val, ref_grads = value_and_grads(
        lambda q, k, v: dense_attention(q, k, v, causal=causal, segment_ids_BN=seg), q, k, v, w)
    np.testing.assert_allclose(val, ref_val, rtol=1e-5, atol=atol * n)
    for name, g, r in zip("qkv", grads, ref_grads):
        scale = max(1.0, float(jnp.max(jnp.abs(r))))
        np.testing.assert_allclose(g, r, atol=atol * scale, rtol=0, err_msg=f"d{name}")


def local(kernel, causal):
    return lambda seg: lambda q, k, v: kernels.local_attention(
        q, k, v, segment_ids=seg, causal=causal, kernel=kernel)[0]


def sharded(impl, p, kernel, causal):
    mesh = make_mesh(seq=p, devices=jax.devices()[:p])
    return lambda seg: lambda q, k, v: sequence_parallel_attention(
        q, k, v, mesh=mesh, impl=impl, causal=causal, segment_ids=seg, kernel=kernel)


# --- one kernel call over a whole sequence --------------------------------------------


def test_pallas_local():
    # (causal GQA with segments through local_attention: test_pallas_schedules...[ulysses])
    assert_matches_dense(local(PALLAS, False), 64, False, 4, False)


@pytest.mark.slow
def test_pallas_local_causal():
    assert_matches_dense(local(PALLAS, True), 64, True, 2, True)


def test_xla_local_small_tiles():
    # N=64, tiles of 4: the causal halving recursion down to one tile, and under it full
    # calls that scan query tiles and key tiles.
    assert_matches_dense(local(XLA_SMALL, True), 64, True, 2, True)


def test_xla_local_small_tiles_skipping():
    assert_matches_dense(local(XLA_SKIP, True), 64, True, 2, True)


@pytest.mark.slow
def test_xla_local_small_tiles_non_causal():
    assert_matches_dense(local(XLA_SMALL, False), 32, False, 2, True)


def test_lse_is_differentiable():
    # local_attention's lse output has a correct gradient (delta absorbs its cotangent),
    # unlike cuDNN's (see docs/kernels.md); checked against autodiff of the dense formula.
    q, k, v, seg, w = inputs(32, 2, True)
    u = jax.random.normal(jax.random.key(7), (B, 32, H))

    def loss(kernel):
        def f(q, k, v):
            out, lse = kernels.local_attention(q, k, v, segment_ids=seg, causal=True,
                                               kernel=kernel)
            return jnp.sum(out * w) + jnp.sum(lse * u)
        return f

    def ref(q, k, v):
        kk = jnp.repeat(k, H // k.shape[2], axis=2)
        vv = jnp.repeat(v, H // k.shape[2], axis=2)
        s = jnp.einsum("bqhd,bkhd->bhqk", q, kk) / np.sqrt(D)
        ok = jnp.tril(jnp.ones((32, 32), bool)) & (seg[:, None, :, None] == seg[:, None, None, :])
        s = jnp.where(ok, s, -jnp.inf)
        out = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(s, -1), vv)
        lse = jnp.moveaxis(jax.nn.logsumexp(s, -1), 1, 2)
        return jnp.sum(out * w) + jnp.sum(lse * u)

    want = jax.jit(jax.grad(ref, argnums=(0, 1, 2)))(q, k, v)
    # the cotangent is folded into delta outside the kernel: one kernel checks the plumbing
    got = jax.jit(jax.grad(loss(kernels.XlaKernel()), argnums=(0, 1, 2)))(q, k, v)
    for g, r in zip(got, want):
        np.testing.assert_allclose(g, r, atol=5e-5, rtol=0)


# --- the schedules with the Pallas kernel (interpret mode), P=2 --------------------------


@pytest.mark.parametrize("impl", ["ring", "tokenring", "ulysses"])
def test_pallas_schedules_causal_gqa_segments(impl):
    assert_matches_dense(sharded(impl, 2, PALLAS, True), 128, True, 2, True)


@pytest.mark.slow
@pytest.mark.parametrize("impl", ["ring", "tokenring", "ulysses"])
@pytest.mark.parametrize("causal,kv_heads,with_segments", [
    (False, 2, True), (False, 4, False), (True, 4, False)])
def test_pallas_schedules_more(impl, causal, kv_heads, with_segments):
    assert_matches_dense(sharded(impl, 2, PALLAS, causal), 128, causal, kv_heads,
                         with_segments)


@pytest.mark.slow
@pytest.mark.parametrize("impl", ["ring", "tokenring"])
def test_pallas_schedules_p4(impl):
    assert_matches_dense(sharded(impl, 4, PALLAS, True), 256, True, 2, True)


@pytest.mark.slow
def test_pallas_hybrid():
    mesh = make_mesh(seq=2, seq_inner=2, devices=jax.devices()[:4])
    attn = lambda seg: lambda q, k, v: sequence_parallel_attention(  # noqa: E731
        q, k, v, mesh=mesh, impl="hybrid", axis=("seq", "seq_inner"), causal=True,
        segment_ids=seg, kernel=PALLAS)
    assert_matches_dense(attn, 128, True, 2, True)


@pytest.mark.slow
@pytest.mark.parametrize("impl", ["ring", "tokenring", "ulysses"])
def test_xla_small_tiles_in_schedules(impl):
    # the kernel instance is part of the compile cache key, so these tiles really run
    assert_matches_dense(sharded(impl, 2, XLA_SMALL, True), 64, True, 2, True)


@pytest.mark.slow
def test_pallas_bf16():
    q, k, v, seg, w = inputs(128, 2, True, dtype=jnp.bfloat16)
    mesh = make_mesh(seq=2, devices=jax.devices()[:2])
    got = sequence_parallel_attention(q, k, v, mesh=mesh, impl="ring", causal=True,
                                      segment_ids=seg, kernel=PALLAS)
    want = dense_attention(*(x.astype(jnp.float32) for x in (q, k, v)), causal=True,
                           segment_ids_BN=seg)
    assert got.dtype == jnp.bfloat16
    np.testing.assert_allclose(got.astype(jnp.float32), want, atol=4e-2, rtol=0)


# --- kernel selection and shape rules -------------------------------------------------


def test_resolve():
    assert kernels.resolve("auto") == kernels.XlaKernel()  # CPU
    assert kernels.resolve("xla") == kernels.XlaKernel()
    assert kernels.resolve("pallas_gpu") == kernels.PallasGpuKernel()
    assert kernels.resolve(PALLAS) is PALLAS
    with pytest.raises(ValueError, match="valid choices"):
        kernels.resolve("cudnn")
    mesh = make_mesh(seq=2, devices=jax.devices()[:2])
    q = jnp.zeros((1, 64, 4, 16))
    with pytest.raises(ValueError, match="valid choices"):
        sequence_parallel_attention(q, q, q, mesh=mesh, impl="ring", kernel="flash")


def test_pallas_without_gpu_says_how():
    q = jnp.zeros((1, 64, 4, 16))
    with pytest.raises(ValueError, match="interpret=True"):
        kernels.PallasGpuKernel().fwd(q, q, q, None, None, causal=False)


def test_pallas_unsupported_shapes_fall_back_or_raise():
    k = kernels.PallasGpuKernel(interpret=True)
    assert k.unsupported(jnp.zeros((1, 64, 4, 16)), jnp.zeros((1, 32, 2, 16))) is None
    assert "head dim" in k.unsupported(jnp.zeros((1, 64, 4, 24)), jnp.zeros((1, 64, 4, 24)))
    assert "multiple of 16" in k.unsupported(jnp.zeros((1, 40, 4, 16)),
                                             jnp.zeros((1, 40, 4, 16)))
    q, kk, v, seg, w = inputs(40, 2, True)  # 40 tokens: no block of 16 divides it
    with pytest.raises(ValueError, match="cannot take"):
        k.fwd(q, kk, v, seg, seg, causal=True)
    fb = kernels.PallasGpuKernel(interpret=True, fallback=True)
    both = jax.jit(lambda *a: (fb.fwd(*a, causal=True), kernels.XlaKernel().fwd(*a, causal=True)))
    for got, want in zip(*both(q, kk, v, seg, seg)):
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("impl", ["ring", "ulysses"])
def test_compiled_pallas_traces_under_checked_shard_map(impl, monkeypatch):
    # The compiled (non-interpret) kernel types its outputs' varying axes, so it traces
    # inside a shard_map with check_vma=True, and lowers for CUDA (Triton's lowering runs
    # in Python; only compiling needs a GPU).
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    kernel = kernels.resolve("auto")
    assert kernel == kernels.PallasGpuKernel(fallback=True) and kernel.check_vma
    mesh = make_mesh(seq=2, devices=jax.devices()[:2])
    spec = jax.sharding.PartitionSpec(None, "seq")
    put = lambda x: jax.device_put(x, jax.sharding.NamedSharding(mesh, spec))  # noqa: E731
    q, k, v, seg, _ = inputs(128, 2, True)
    attn = jax.shard_map(
        lambda q, k, v, s: attention(q, k, v, impl=impl, axis="seq", causal=True,
                                     segment_ids=s, kernel=kernel),
        mesh=mesh, in_specs=(spec,) * 4, out_specs=spec)
    grad = jax.jit(jax.grad(lambda *a: attn(*a).sum(), argnums=(0, 1, 2)))
    traced = grad.trace(put(q), put(k), put(v), put(seg))
    assert str(traced.jaxpr).count("pallas_call") >= 3  # forward, dK/dV and dQ kernels
    assert traced.lower(lowering_platforms=("cuda",)).as_text().count("@__gpu$xla.gpu.triton") >= 3


def test_compiled_pallas_aligns_varying_axes(monkeypatch):
    # Queries invariant over 'seq', K/V varying (e.g. replicated queries against sharded
    # keys): the compiled forward and backward must type their outputs varying over 'seq'
    # (they depend on K/V), and the whole thing must lower for CUDA (Triton lowering runs
    # in Python, no GPU needed) under a shard_map with check_vma=True.
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    kern = kernels.PallasGpuKernel()
    mesh = jax.make_mesh((2,), ("seq",), devices=jax.devices()[:2])
    rep, shd = jax.sharding.PartitionSpec(), jax.sharding.PartitionSpec(None, "seq")
    q, k, v, _, _ = inputs(64, 2, False)
    k, v = (jax.device_put(jnp.concatenate([x, x], 1), jax.sharding.NamedSharding(mesh, shd))
            for x in (k, v))
    q = jax.device_put(q, jax.sharding.NamedSharding(mesh, rep))
    seen = {}

    def f(q, k, v):
        out, lse = kern.fwd(q, k, v, None, None, causal=False)
        dlt = blockwise.delta(out, out)
        grads = kern.bwd(q, k, v, None, None, lse, out, dlt, causal=False)
        for name, x in zip(("out", "lse", "dq", "dk", "dv"), (out, lse, *grads)):
            seen[name] = varying_axes(x)
        return out, *grads

    sm = jax.shard_map(f, mesh=mesh, in_specs=(rep, shd, shd), out_specs=(shd,) * 4,
                       check_vma=True)
    text = jax.jit(sm).trace(q, k, v).lower(lowering_platforms=("cuda",)).as_text()
    assert seen == dict.fromkeys(("out", "lse", "dq", "dk", "dv"), frozenset({"seq"}))
    assert text.count("@__gpu$xla.gpu.triton") == 3  # forward, dK/dV and dQ kernels


def test_fit():
    assert kernels._fit(128, 384) == 128
    assert kernels._fit(128, 96) == 32
    assert kernels._fit(64, 48) == 16
    assert kernels._fit(100, 64) == 64


def test_causal_pair_needs_equal_lengths():
    q = jnp.zeros((1, 64, 4, 16))
    with pytest.raises(ValueError, match="Lq == Lk"):
        kernels.XlaKernel().fwd(q, q[:, :32], q[:, :32], None, None, causal=True)


def test_default_tiles(monkeypatch):
    # GPUs want big tiles (measured 1.8-2.6× on an H200), CPUs cache-sized ones
    assert blockwise.tile_sizes() == (256, 256)  # CPU
    assert blockwise.tile_sizes(16) == (16, 16)
    # a CPU call over few heads (B·H ≤ 2) takes larger tiles; the kernel reads B·H
    assert blockwise.tile_sizes(heads=2) == (512, 512)
    assert blockwise.tile_sizes(heads=3) == (256, 256)
    assert blockwise.tile_sizes(32, heads=1) == (32, 32)
    one_head, two_by_four = jnp.zeros((1, 2048, 1, 8)), jnp.zeros((2, 2048, 4, 8))
    assert blockwise._tile_lens(one_head, one_head, None) == (512, 512)
    assert blockwise._tile_lens(two_by_four, two_by_four, None) == (256, 256)
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert blockwise.tile_sizes() == (4096, 1024)
    monkeypatch.setattr(blockwise, "DEFAULT_TILE", 64)
    assert blockwise.tile_sizes() == (256, 64)


# --- the prepared GPU script runs on CPU (interpret mode, tiny sizes) ------------------


@pytest.mark.slow
def test_gpu_check_smoke(tmp_path):
    path = pathlib.Path(__file__).parents[1] / "scripts" / "gpu_check.py"
    spec = importlib.util.spec_from_file_location("gpu_check", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = tmp_path / "kernels_check.md"
    ok = mod.main(["--interpret", "--tiny", "--out", str(out)])
    text = out.read_text()
    assert ok, text
    assert "| N |" in text and "cuDNN" in text and "**NO**" not in text
