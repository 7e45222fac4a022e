"""One block-pair attention kernel under every schedule.

Every schedule computes attention as block pairs — a block of queries against a block of
keys/values — whose partials it merges, and whose backward it runs from the *global*
(out, lse) of the queries. This module is that block-pair interface and its kernels:

    kernel.fwd(q, k, v, q_seg, k_seg, *, causal)                   -> (out, lse)
    kernel.bwd(q, k, v, q_seg, k_seg, lse, dout, delta, *, causal) -> (dq, dk, dv)

q[B,Lq,H,D], k,v[B,Lk,K,D] (GQA: K divides H), q_seg[B,Lq] / k_seg[B,Lk] int segment ids
(both or neither; a query sees only keys of its own segment). `causal` is index-based:
Lq == Lk and query i sees key j ≤ i — the blocks cover the same positions in the same
order (a ring's diagonal step: a zigzag shard's two chunks keep position order). out fp32
[B,Lq,H,D] and lse fp32 [B,Lq,H] (natural log) are the partial over this key block; a
query that sees none of these keys gets out 0, lse −inf (the merge identity).
`bwd` takes the *final* lse of these queries (over all key blocks) and delta = Σ_d
dout·out of the final out, and returns this pair's share of dq [B,Lq,H,D], dk, dv
[B,Lk,K,D], all fp32: p = exp(s − lse) is the pair's slice of the global softmax, so the
shares add up over pairs. Never differentiate through a merge of kernel partials instead
(an lse cotangent is easy to drop — cuDNN's VJP does, see docs/kernels.md).

Kernels (pass `kernel=` a name or an instance to `attention`, `sequence_parallel_attention`
and the per-device schedules):
    "xla"         `XlaKernel`: the pure-JAX tiled kernel of `blockwise` (runs anywhere).
    "pallas_gpu"  `PallasGpuKernel`: a Pallas (Triton) flash kernel for NVIDIA GPUs; with
                  interpret=True it runs on CPU (slowly: tests).
    "auto"        pallas_gpu on a CUDA GPU (falling back to xla for shapes it does not
                  take), xla elsewhere. TPU: xla — the TPU Pallas flash kernel
                  (jax.experimental.pallas.ops.tpu.flash_attention) is not wired in yet.

`pair_fwd` / `pair_bwd` cut a zigzag shard pair of ring/TokenRing into kernel calls;
`local_attention` is one kernel call over a whole local sequence with the kernel's
backward (Ulysses).
"""
from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl

from jaxpar._spmd import vary_over, varying_axes
from jaxpar.attention import blockwise
from jaxpar.attention.blockwise import delta, empty_partial, merge, zeros_like_f32

KERNEL_NAMES = ("auto", "xla", "pallas_gpu")


class BlockKernel:
    """Base of the block-pair kernels (frozen dataclasses: hashable, usable as static
    arguments and cache keys). See the module docstring for the contract."""

    name = "base"

    def fwd(self, q, k, v, q_seg, k_seg, *, causal):
        raise NotImplementedError

    def bwd(self, q, k, v, q_seg, k_seg, lse, dout, dlt, *, causal):
        raise NotImplementedError

    @property
    def check_vma(self) -> bool:
        """Whether this kernel runs inside a `shard_map` that checks varying manual axes."""
        return True


def _check_pair(q, k, v, q_seg, k_seg, causal):
    if k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
        raise ValueError(f"block shapes q{q.shape} k{k.shape} v{v.shape} must be "
                         f"q[B,Lq,H,D] and k, v[B,Lk,K,D]")
    if q.shape[2] % k.shape[2]:
        raise ValueError(f"query heads={q.shape[2]} must be a multiple of kv heads="
                         f"{k.shape[2]} (GQA)")
    if (q_seg is None) != (k_seg is None):
        raise ValueError("pass both q_seg and k_seg, or neither")
    if causal and q.shape[1] != k.shape[1]:
        raise ValueError(f"a causal (index-based) block pair needs Lq == Lk; got "
                         f"{q.shape[1]} and {k.shape[1]}")


@dataclasses.dataclass(frozen=True)
class XlaKernel(BlockKernel):
    """The pure-JAX tiled kernel (`blockwise.block_fwd/block_bwd`). `tile`: key-tile length
    (default per backend, `blockwise.tile_sizes`, read at trace time); each query tile is
    processed at once. `halving`: causal blocks by halving recursion (True) or by skipping
    invisible tiles (False); default per backend (`blockwise.CAUSAL_HALVING`)."""

    tile: int | None = None
    halving: bool | None = None
    name = "xla"

    def fwd(self, q, k, v, q_seg, k_seg, *, causal):
        _check_pair(q, k, v, q_seg, k_seg, causal)
        return blockwise.block_fwd(q, k, v, q_seg, k_seg, causal=causal, block=self.tile,
                                   halving=self.halving)

    def bwd(self, q, k, v, q_seg, k_seg, lse, dout, dlt, *, causal):
        return blockwise.block_bwd(q, k, v, q_seg, k_seg, lse, dout, dlt, causal=causal,
                                   block=self.tile, halving=self.halving)


# ---------------------------------------------------------------------------------------
# Pallas GPU (Triton) flash kernel. Adapted from jax.experimental.pallas.ops.gpu.attention
# (Apache 2.0, The JAX Authors), whose `mha` cannot serve as a block-pair kernel as is:
# it takes one segment-id array for queries and keys (a ring pair has two), needs as many
# kv heads as query heads, writes out in the input dtype, and its fused backward needs Lq
# and Lk cut into the same number of blocks. Here: separate query/key segment ids, GQA by
# the kv-head index map (h // G), fp32 out, lse returned in base 2 and converted here, and
# the backward split into a dK/dV kernel and a dQ kernel that read the global lse and
# delta (computed outside, from the global out). Causal masking is index-based, with the
# loops cut at the diagonal so blocks above it are never loaded. Head dim must be a power
# of two (no padding masks), lengths multiples of the (power-of-two) blocks.

_LOG2E = math.log2(math.e)
_MASK = -0.7 * float(np.finfo(np.float32).max)  # finite: exp2(mask − m) = 0, no NaN


def _dot(a, b):
    return jax.lax.dot_general(a, b, (((1,), (0,)), ((), ())),
                               preferred_element_type=jnp.float32)


def _block_mask(qseg, kseg, causal, q0, k0, bq, bk):
    mask = None
    if qseg is not None:
        mask = qseg[:, None] == kseg[None, :]
    if causal:
        vis = (q0 + jnp.arange(bq))[:, None] >= (k0 + jnp.arange(bk))[None, :]
        mask = vis if mask is None else mask & vis
    return mask


def _fwd_kernel(q_ref, k_ref, v_ref, qseg_ref, kseg_ref, o_ref, lse_ref, *, scale, causal,
                bq, bk):
    i = pl.program_id(0)
    q = q_ref[...]
    qseg = None if qseg_ref is None else qseg_ref[...]
    d = q.shape[-1]

    def body(j, carry):
        o, m, l = carry
        ks = pl.ds(j * bk, bk)
        k = k_ref[ks, :]
        s = _dot(q, k.T) * (scale * _LOG2E)  # base-2 logits
        mask = _block_mask(qseg, None if kseg_ref is None else kseg_ref[ks], causal, i * bq,
                           j * bk, bq, bk)
        if mask is not None:
            s = jnp.where(mask, s, _MASK)
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        corr = jnp.exp2(m - m_new)
        p = jnp.exp2(s - m_new[:, None])
        l = corr * l + jnp.sum(p, axis=1)
        v = v_ref[ks, :]
        o = corr[:, None] * o + _dot(p.astype(v.dtype), v)
        return o, m_new, l

    n_k = k_ref.shape[0] // bk
    hi = jax.lax.div((i + 1) * bq + bk - 1, bk) if causal else n_k
    init = (jnp.zeros((bq, d), jnp.float32), jnp.full((bq,), -jnp.inf, jnp.float32),
            jnp.zeros((bq,), jnp.float32))
    o, m, l = jax.lax.fori_loop(0, hi, body, init)
    o_ref[...] = o / l[:, None]
    lse_ref[...] = m + jnp.log2(l)


def _dkv_kernel(q_ref, k_ref, v_ref, qseg_ref, kseg_ref, do_ref, lse_ref, dlt_ref, dk_ref,
                dv_ref, *, scale, causal, bq, bk):
    j = pl.program_id(0)
    k = k_ref[...]
    v = v_ref[...]
    kseg = None if kseg_ref is None else kseg_ref[...]
    d = k.shape[-1]

    def body(i, carry):
        dk, dv = carry
        qs = pl.ds(i * bq, bq)
        q = q_ref[qs, :]
        s = _dot(q, k.T) * (scale * _LOG2E)
        mask = _block_mask(None if qseg_ref is None else qseg_ref[qs], kseg, causal, i * bq,
                           j * bk, bq, bk)
        if mask is not None:
            s = jnp.where(mask, s, _MASK)
        p = jnp.exp2(s - lse_ref[qs][:, None])  # slice of the global softmax
        do = do_ref[qs, :]
        dv = dv + _dot(p.astype(do.dtype).T, do)
        ds = p * (_dot(do, v.T) - dlt_ref[qs][:, None]) * scale
        dk = dk + _dot(ds.astype(q.dtype).T, q)
        return dk, dv

    lo = jax.lax.div(j * bk, bq) if causal else 0
    zeros = jnp.zeros((bk, d), jnp.float32)
    dk, dv = jax.lax.fori_loop(lo, q_ref.shape[0] // bq, body, (zeros, zeros))
    dk_ref[...] = dk
    dv_ref[...] = dv


def _dq_kernel(q_ref, k_ref, v_ref, qseg_ref, kseg_ref, do_ref, lse_ref, dlt_ref, dq_ref, *,
               scale, causal, bq, bk):
    i = pl.program_id(0)
    q = q_ref[...]
    do = do_ref[...]
    lse = lse_ref[...]
    dl = dlt_ref[...]
    qseg = None if qseg_ref is None else qseg_ref[...]

    def body(j, dq):
        ks = pl.ds(j * bk, bk)
        k = k_ref[ks, :]
        v = v_ref[ks, :]
        s = _dot(q, k.T) * (scale * _LOG2E)
        mask = _block_mask(qseg, None if kseg_ref is None else kseg_ref[ks], causal, i * bq,
                           j * bk, bq, bk)
        if mask is not None:
            s = jnp.where(mask, s, _MASK)
        p = jnp.exp2(s - lse[:, None])
        ds = p * (_dot(do, v.T) - dl[:, None]) * scale
        return dq + _dot(ds.astype(k.dtype), k)

    n_k = k_ref.shape[0] // bk
    hi = jax.lax.div((i + 1) * bq + bk - 1, bk) if causal else n_k
    dq_ref[...] = jax.lax.fori_loop(0, hi, body, jnp.zeros(q.shape, jnp.float32))


def _fit(block, length):
    """The largest power of two ≤ block that divides length."""
    b = 1 << (max(block, 1).bit_length() - 1)
    while length % b:
        b //= 2
    return b


def _struct(shape, dtype, like):
    """Output type for pallas_call, device-varying like `like` inside a checked shard_map."""
    aval = jax.typeof(like)
    mat = getattr(aval, "manual_axis_type", None)
    if mat is not None:
        return jax.ShapeDtypeStruct(shape, dtype, manual_axis_type=mat)
    vma = getattr(aval, "vma", None)  # older spelling of the same
    if vma is not None:
        return jax.ShapeDtypeStruct(shape, dtype, vma=vma)
    return jax.ShapeDtypeStruct(shape, dtype)


def _same_vma(*xs):
    axes = frozenset().union(*(varying_axes(x) for x in xs if x is not None))
    return [None if x is None else vary_over(x, axes) for x in xs]


@dataclasses.dataclass(frozen=True)
class PallasGpuKernel(BlockKernel):
    """Pallas/Triton flash attention as the block-pair kernel.

    block_q/block_k: forward tiles; block_q_bwd/block_k_bwd: backward tiles (64 measured
    ~2× faster than 32 on an H200). Each is cut to the largest power of two dividing the
    length; below `min_block` the shape is unsupported. `fallback`: run unsupported shapes
    on the xla kernel instead of raising. `interpret`: Pallas interpret mode (CPU, tests;
    a `shard_map` around it must pass check_vma=False — `check_vma` says so).
    """

    block_q: int = 128
    block_k: int = 128
    block_q_bwd: int = 64
    block_k_bwd: int = 64
    num_warps: int | None = None
    num_stages: int = 2
    min_block: int = 16
    interpret: bool = False
    fallback: bool = False
    name = "pallas_gpu"

    @property
    def check_vma(self) -> bool:
        # Pallas interpret mode evaluates the kernel inside the shard_map's types and trips
        # over its varying-axes checks (jax 0.10); compiled Triton kernels do not.
        return not self.interpret

    def unsupported(self, q, k) -> str | None:
        """Why this kernel cannot take blocks of these shapes (None if it can)."""
        d = q.shape[-1]
        if d & (d - 1) or not 16 <= d <= 256:
            return f"head dim {d} is not a power of two in [16, 256]"
        if jnp.dtype(q.dtype) not in (jnp.float32, jnp.bfloat16, jnp.float16):
            return f"dtype {q.dtype} is not float32/bfloat16/float16"
        for length, blocks in ((q.shape[1], (self.block_q, self.block_q_bwd)),
                               (k.shape[1], (self.block_k, self.block_k_bwd))):
            if any(_fit(b, length) < self.min_block for b in blocks):
                return f"length {length} is not a multiple of {self.min_block}"
        if not self.interpret and jax.default_backend() != "gpu":
            return (f"no GPU (backend {jax.default_backend()!r}); PallasGpuKernel("
                    f"interpret=True) runs it on CPU, slowly")
        return None

    def _xla_or_raise(self, q, k):
        why = self.unsupported(q, k)
        if why is None:
            return None
        if self.fallback:
            return XlaKernel()
        raise ValueError(f"kernel='pallas_gpu' cannot take q{q.shape} k{k.shape}: {why}; "
                         f"use kernel='xla' or 'auto'")

    def _params(self, d, bq, bk):
        from jax.experimental.pallas import triton as plgpu  # GPU-only: import when used

        warps = self.num_warps or (4 if d <= 64 or bq * bk < 128 * 128 else 8)
        return dict(compiler_params=plgpu.CompilerParams(num_warps=warps,
                                                         num_stages=self.num_stages),
                    interpret=self.interpret)

    def fwd(self, q, k, v, q_seg, k_seg, *, causal):
        _check_pair(q, k, v, q_seg, k_seg, causal)
        other = self._xla_or_raise(q, k)
        if other is not None:
            return other.fwd(q, k, v, q_seg, k_seg, causal=causal)
        # inputs and outputs typed varying over the union of the inputs' axes: the output
        # types are taken from q, which may vary over fewer axes than k/v (check_vma)
        q, k, v, q_seg, k_seg = _same_vma(q, k, v, q_seg, k_seg)
        b, lq, h, d = q.shape
        lk, g = k.shape[1], h // k.shape[2]
        bq, bk = _fit(self.block_q, lq), _fit(self.block_k, lk)
        kvh = (lambda hh: jax.lax.div(hh, g)) if g > 1 else (lambda hh: hh)
        kernel = functools.partial(_fwd_kernel, scale=d ** -0.5, causal=causal, bq=bq, bk=bk)
        out, lse2 = pl.pallas_call(
            kernel, grid=(lq // bq, b, h),
            in_specs=[
                pl.BlockSpec((None, bq, None, d), lambda i, bb, hh: (bb, i, hh, 0)),
                pl.BlockSpec((None, lk, None, d), lambda i, bb, hh: (bb, 0, kvh(hh), 0)),
                pl.BlockSpec((None, lk, None, d), lambda i, bb, hh: (bb, 0, kvh(hh), 0)),
                None if q_seg is None else pl.BlockSpec((None, bq), lambda i, bb, hh: (bb, i)),
                None if k_seg is None else pl.BlockSpec((None, lk), lambda i, bb, hh: (bb, 0)),
            ],
            out_specs=[pl.BlockSpec((None, bq, None, d), lambda i, bb, hh: (bb, i, hh, 0)),
                       pl.BlockSpec((None, None, bq), lambda i, bb, hh: (bb, hh, i))],
            out_shape=[_struct((b, lq, h, d), jnp.float32, q),
                       _struct((b, h, lq), jnp.float32, q)],
            name="jaxpar_attention_fwd", **self._params(d, bq, bk),
        )(q, k, v, q_seg, k_seg)
        empty = lse2 < 0.5 * _MASK  # no visible key in this block: the merge identity
        lse = jnp.where(empty, -jnp.inf, lse2 * math.log(2.0))
        lse = jnp.swapaxes(lse, 1, 2)
        return jnp.where(jnp.swapaxes(empty, 1, 2)[..., None], 0.0, out), lse

    def bwd(self, q, k, v, q_seg, k_seg, lse, dout, dlt, *, causal):
        other = self._xla_or_raise(q, k)
        if other is not None:
            return other.bwd(q, k, v, q_seg, k_seg, lse, dout, dlt, causal=causal)
        b, lq, h, d = q.shape
        lk, kh = k.shape[1], k.shape[2]
        g = h // kh
        # base-2 global lse, [B, H, L]; a query that sees no key at all gets p = 0
        lse2 = jnp.swapaxes(jnp.where(jnp.isfinite(lse), lse * _LOG2E, jnp.inf), 1, 2)
        dlt = jnp.swapaxes(dlt.astype(jnp.float32), 1, 2)
        q, k, v, q_seg, k_seg, dout, lse2, dlt = _same_vma(
            q, k, v, q_seg, k_seg, dout.astype(q.dtype), lse2, dlt)
        bq, bk = _fit(self.block_q_bwd, lq), _fit(self.block_k_bwd, lk)
        kvh = (lambda hh: jax.lax.div(hh, g)) if g > 1 else (lambda hh: hh)
        common = dict(scale=d ** -0.5, causal=causal, bq=bq, bk=bk)
        full_q = pl.BlockSpec((None, lq, None, d), lambda j, bb, hh: (bb, 0, hh, 0))
        full_row = pl.BlockSpec((None, None, lq), lambda j, bb, hh: (bb, hh, 0))
        dk_h, dv_h = pl.pallas_call(
            functools.partial(_dkv_kernel, **common), grid=(lk // bk, b, h),
            in_specs=[
                full_q,
                pl.BlockSpec((None, bk, None, d), lambda j, bb, hh: (bb, j, kvh(hh), 0)),
                pl.BlockSpec((None, bk, None, d), lambda j, bb, hh: (bb, j, kvh(hh), 0)),
                None if q_seg is None else pl.BlockSpec((None, lq), lambda j, bb, hh: (bb, 0)),
                None if k_seg is None else pl.BlockSpec((None, bk), lambda j, bb, hh: (bb, j)),
                full_q, full_row, full_row,
            ],
            out_specs=[pl.BlockSpec((None, bk, None, d), lambda j, bb, hh: (bb, j, hh, 0))] * 2,
            out_shape=[_struct((b, lk, h, d), jnp.float32, q)] * 2,
            name="jaxpar_attention_dkv", **self._params(d, bq, bk),
        )(q, k, v, q_seg, k_seg, dout, lse2, dlt)
        q_blk = pl.BlockSpec((None, bq, None, d), lambda i, bb, hh: (bb, i, hh, 0))
        row_blk = pl.BlockSpec((None, None, bq), lambda i, bb, hh: (bb, hh, i))
        full_kv = pl.BlockSpec((None, lk, None, d), lambda i, bb, hh: (bb, 0, kvh(hh), 0))
        dq = pl.pallas_call(
            functools.partial(_dq_kernel, **common), grid=(lq // bq, b, h),
            in_specs=[
                q_blk, full_kv, full_kv,
                None if q_seg is None else pl.BlockSpec((None, bq), lambda i, bb, hh: (bb, i)),
                None if k_seg is None else pl.BlockSpec((None, lk), lambda i, bb, hh: (bb, 0)),
                q_blk, row_blk, row_blk,
            ],
            out_specs=q_blk,
            out_shape=_struct((b, lq, h, d), jnp.float32, q),
            name="jaxpar_attention_dq", **self._params(d, bq, bk),
        )(q, k, v, q_seg, k_seg, dout, lse2, dlt)
        if g > 1:  # per-query-head shares of dK/dV, summed over each kv head's group
            dk_h = dk_h.reshape(b, lk, kh, g, d).sum(3)
            dv_h = dv_h.reshape(b, lk, kh, g, d).sum(3)
        return dq, dk_h, dv_h


def _cuda_gpu() -> bool:
    if jax.default_backend() != "gpu":
        return False
    version = getattr(jax.devices()[0].client, "platform_version", "") or ""
    return "rocm" not in version.lower()


def resolve(kernel="auto") -> BlockKernel:
    """A `BlockKernel` from a name in KERNEL_NAMES or an instance (returned as is)."""
    if isinstance(kernel, BlockKernel):
        return kernel
    if kernel == "auto":
        if _cuda_gpu():
            return PallasGpuKernel(fallback=True)
        # TPU: jax.experimental.pallas.ops.tpu.flash_attention is not wired in yet; the
        # pure-JAX kernel runs there (and on CPU).
        return XlaKernel()
    if kernel == "xla":
        return XlaKernel()
    if kernel == "pallas_gpu":
        return PallasGpuKernel()
    raise ValueError(f"unknown attention kernel={kernel!r}; valid choices are "
                     f"{list(KERNEL_NAMES)} or a kernels.BlockKernel instance")


# ---------------------------------------------------------------------------------------
# Zigzag shard pairs (ring, TokenRing): the query shard of device q_idx against the K/V
# shard of device kv_idx. Non-causal: one full call. Causal (zigzag, shard = [chunk i ;
# chunk 2P−1−i], positions increasing along each shard): the diagonal pair is one
# index-causal call; for kv_idx < q_idx every query sees exactly the first kv chunk (one
# full call, Lk = L/2); for kv_idx > q_idx only the second query chunk sees anything, and
# it sees every key (one full call, Lq = L/2). Invisible halves are never computed.


def _half(x, which):
    if x is None:
        return None
    h = x.shape[1] // 2
    return jax.lax.slice_in_dim(x, which * h, (which + 1) * h, axis=1)


def pair_fwd(kernel, q, k, v, q_seg, k_seg, q_idx, kv_idx, *, causal, diagonal):
    """Partial (out, lse) of query shard q_idx over K/V shard kv_idx (`diagonal` static:
    q_idx == kv_idx)."""
    if not causal or diagonal:
        return kernel.fwd(q, k, v, q_seg, k_seg, causal=causal)

    def kv_first_half(_):
        return kernel.fwd(q, _half(k, 0), _half(v, 0), q_seg, _half(k_seg, 0), causal=False)

    def q_second_half(_):
        o1, l1 = kernel.fwd(_half(q, 1), k, v, _half(q_seg, 1), k_seg, causal=False)
        o0, l0 = empty_partial(_half(q, 0), o1, k, v)
        return jnp.concatenate([o0, o1], 1), jnp.concatenate([l0, l1], 1)

    return jax.lax.cond(kv_idx < q_idx, kv_first_half, q_second_half, None)


def pair_bwd(kernel, q, k, v, q_seg, k_seg, q_idx, kv_idx, lse, dout, dlt, *, causal,
             diagonal):
    """(dq, dk, dv) fp32 of one shard pair — the same cut as `pair_fwd`."""
    if not causal or diagonal:
        return kernel.bwd(q, k, v, q_seg, k_seg, lse, dout, dlt, causal=causal)

    def kv_first_half(_):
        dq, dk0, dv0 = kernel.bwd(q, _half(k, 0), _half(v, 0), q_seg, _half(k_seg, 0), lse,
                                  dout, dlt, causal=False)
        zeros = zeros_like_f32(dk0, dq, dv0)
        return dq, jnp.concatenate([dk0, zeros], 1), jnp.concatenate([dv0, zeros], 1)

    def q_second_half(_):
        dq1, dk, dv = kernel.bwd(_half(q, 1), k, v, _half(q_seg, 1), k_seg, _half(lse, 1),
                                 _half(dout, 1), _half(dlt, 1), causal=False)
        return jnp.concatenate([zeros_like_f32(dq1, dk, dv), dq1], 1), dk, dv

    return jax.lax.cond(kv_idx < q_idx, kv_first_half, q_second_half, None)


# ---------------------------------------------------------------------------------------
# A whole local sequence (natural order) as one kernel call, with the kernel's backward.


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _local(q, k, v, seg, causal, kernel):
    return kernel.fwd(q, k, v, seg, seg, causal=causal)


def _local_fwd(q, k, v, seg, causal, kernel):
    out, lse = _local(q, k, v, seg, causal, kernel)
    return (out, lse), (q, k, v, seg, out, lse)


def _local_bwd(causal, kernel, res, cts):
    q, k, v, seg, out, lse = res
    dout, dlse = cts
    # d lse / d s = p: an lse cotangent enters like delta, ds = p ⊙ (dp − (δ − dlse))
    dlt = delta(out, dout) - dlse
    dq, dk, dv = kernel.bwd(q, k, v, seg, seg, lse, dout, dlt, causal=causal)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None


_local.defvjp(_local_fwd, _local_bwd)


def local_attention(q_BNHD, k_BNKD, v_BNKD, *, segment_ids=None, causal: bool = False,
                    kernel="auto"):
    """Attention of a whole sequence held on this device (natural token order), one kernel
    call forward and one backward. Returns (out fp32, lse fp32), both differentiable."""
    kern = resolve(kernel)
    _check_pair(q_BNHD, k_BNKD, v_BNKD, segment_ids, segment_ids, causal)
    return _local(q_BNHD, k_BNKD, v_BNKD, segment_ids, causal, kern)


__all__ = ["KERNEL_NAMES", "BlockKernel", "XlaKernel", "PallasGpuKernel", "resolve",
           "pair_fwd", "pair_bwd", "local_attention", "merge"]
