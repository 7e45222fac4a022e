"""Sequence-parallel attention.

Per-device functions (call inside your own `shard_map`, sequence sharded on `axis`):
    attention(q, k, v, *, impl, axis, causal=False, segment_ids=None, kernel="auto")
    ulysses_attention / ring_attention / tokenring_attention / hybrid_attention

Global-array entry point (builds the shard_map, zigzag reorder and its inverse for you):
    sequence_parallel_attention(q, k, v, *, mesh, impl, axis="seq", causal=False,
                                segment_ids=None, kernel="auto")

impl="auto" picks the schedule from a cost model (`auto`; `choose_impl` says what it picks
and the predicted times): one axis -> ulysses, ring or tokenring; two axes -> the hybrid,
its ring on either axis (the global entry point; per device the caller's layout fixes the
ring on the first axis), ring or TokenRing outside.

`kernel` picks the block-pair kernel every schedule computes with (`kernels`): "auto"
(Pallas flash kernel on a CUDA GPU, pure JAX elsewhere), "xla", "pallas_gpu", or a
`kernels.BlockKernel` instance.

Shapes: q[B,N,H,D], k,v[B,N,K,D] (K divides H: GQA/MQA), segment_ids[B,N] int (packed
documents: tokens attend only within their segment). Causal inputs to the per-device
functions must be in the zigzag layout (`layout.to_zigzag`), which the data path applies
once to token ids/positions/segment ids. `sequence_parallel_attention` takes any mesh with
the named axes (Explicit or Auto axis types), inputs sharded or not, and reorders sharded
data by collective permutes (`layout.to_zigzag_local`), never gathering the sequence.
"""
from __future__ import annotations

import functools
import math

import jax
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxpar import _spmd
from jaxpar.mesh import SEQ
from jaxpar.attention import auto, kernels, layout
from jaxpar.attention.blockwise import attend, flash_attention, merge
from jaxpar.attention.dense import dense_attention
from jaxpar.attention.hybrid import hybrid_attention
from jaxpar.attention.ring import ring_attention
from jaxpar.attention.tokenring import tokenring_attention
from jaxpar.attention.ulysses import check_ulysses_heads, ulysses_attention

PER_DEVICE = {
    "ulysses": ulysses_attention,
    "ring": ring_attention,
    "tokenring": tokenring_attention,
    "hybrid": hybrid_attention,
}
IMPLS = ("dense", *PER_DEVICE, "auto")

__all__ = [
    "IMPLS", "attention", "sequence_parallel_attention", "ulysses_attention", "ring_attention",
    "tokenring_attention", "hybrid_attention", "dense_attention", "flash_attention", "attend",
    "merge", "layout", "kernels", "auto", "choose_impl",
]


def _check_impl(impl):
    if impl not in IMPLS:
        raise ValueError(f"unknown attention impl={impl!r}; valid choices are {list(IMPLS)}")


def attention(q_BLHD, k_BLKD, v_BLKD, *, impl: str, axis=SEQ, causal: bool = False,
              segment_ids=None, kernel="auto", **kwargs):
    """Per-device dispatch: `impl` in ulysses, ring, tokenring, hybrid (axis=(ring, ulysses));
    `kernel` the block kernel (see `kernels`)."""
    _check_impl(impl)
    if impl == "dense":
        raise ValueError("impl='dense' is the global-array reference, not a per-device "
                         "function; use sequence_parallel_attention or dense_attention")
    if impl == "auto":  # the local layout fixes the axes: one axis, or hybrid (ring, ulysses)
        axes = tuple(axis) if isinstance(axis, (tuple, list)) else (axis,)
        sizes = tuple(jax.lax.axis_size(a) for a in axes)
        if len(axes) == 1:
            cands = auto.candidates(sizes[0])
        else:
            cands = [c for c in auto.candidates(sizes, axes) if c.axes == axes]
        b, l, h, _ = q_BLHD.shape
        pick = auto.choose(cands, batch=b, seq_len=l * math.prod(sizes), heads=h,
                           kv_heads=k_BLKD.shape[2], head_dim=q_BLHD.shape[3],
                           dtype=q_BLHD.dtype, causal=causal).pick
        impl = pick.impl
        if pick.ring_impl:
            kwargs = {**kwargs, "ring_impl": pick.ring_impl}
    return PER_DEVICE[impl](q_BLHD, k_BLKD, v_BLKD, axis_name=axis, causal=causal,
                            segment_ids_BL=segment_ids, kernel=kernel, **kwargs)


def _axes(impl, axis, mesh):
    axes = tuple(axis) if isinstance(axis, (tuple, list)) else (axis,)
    if impl == "hybrid" and len(axes) != 2:
        raise ValueError(f"impl='hybrid' needs axis=(ring_axis, ulysses_axis), e.g. "
                         f"('seq', 'seq_inner'); got axis={axis!r}")
    if impl != "hybrid" and len(axes) != 1:
        raise ValueError(f"impl={impl!r} takes one mesh axis name; got axis={axis!r} "
                         f"(two axes are for impl='hybrid')")
    for a in axes:
        if a not in mesh.shape:
            raise ValueError(f"axis {a!r} is not in the mesh; mesh axes are {list(mesh.shape)}")
    return axes


def _check_global(q, k, v, segment_ids, causal):
    for name, x in (("q", q), ("k", k), ("v", v), ("segment_ids", segment_ids)):
        if x is not None and not (hasattr(x, "shape") and hasattr(x, "ndim")):
            raise TypeError(f"{name} must be an array (jax or numpy), got {type(x).__name__}")
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be True or False, got {causal!r}")
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(f"q, k, v must be rank 4 [B, N, heads, D]; got ranks "
                         f"{q.ndim}, {k.ndim}, {v.ndim}")
    if k.shape != v.shape or (k.shape[0], k.shape[1], k.shape[3]) != (q.shape[0], q.shape[1],
                                                                       q.shape[3]):
        raise ValueError(f"shapes q{tuple(q.shape)} k{tuple(k.shape)} v{tuple(v.shape)} must "
                         f"be q[B,N,H,D] and k, v[B,N,K,D]")
    if q.shape[2] % k.shape[2]:
        raise ValueError(f"query heads={q.shape[2]} must be a multiple of kv heads="
                         f"{k.shape[2]} (GQA)")
    if segment_ids is not None and tuple(segment_ids.shape) != tuple(q.shape[:2]):
        raise ValueError(f"segment_ids shape {tuple(segment_ids.shape)} must be [B, N] = "
                         f"{tuple(q.shape[:2])}")


def sequence_parallel_attention(q_BNHD, k_BNKD, v_BNKD, *, mesh, impl: str, axis=SEQ,
                                causal: bool = False, segment_ids=None, ring_impl=None,
                                kernel="auto"):
    """Attention on global arrays in natural token order; returns out[B,N,H,D] likewise.

    impl: "dense" (single-device reference), "ulysses", "ring", "tokenring", or "hybrid"
    with axis=(ring_axis, ulysses_axis), e.g. ("seq", "seq_inner"), and ring_impl "ring"
    (the default) or "tokenring" for the outer axis (a ValueError with any other impl, which
    would ignore it); or "auto" (`choose_impl`: one axis -> ulysses, ring or tokenring; two
    -> the hybrid, its ring on either axis, ring or TokenRing). mesh: a
    `jax.sharding.Mesh` (unused by "dense"). kernel: the block kernel ("auto", "xla",
    "pallas_gpu" or a `kernels.BlockKernel`; ignored by "dense").
    """
    _check_impl(impl)
    _check_global(q_BNHD, k_BNKD, v_BNKD, segment_ids, causal)
    if ring_impl is not None and impl != "hybrid":
        raise ValueError(f"ring_impl={ring_impl!r} is only used by impl='hybrid' (got "
                         f"impl={impl!r}); drop ring_impl or use impl='hybrid'")
    if impl == "auto":
        if not isinstance(mesh, jax.sharding.Mesh):
            raise TypeError(f"mesh must be a jax.sharding.Mesh for impl='auto'; got "
                            f"{type(mesh).__name__}")
        pick = choose_impl(q_BNHD, k_BNKD, mesh=mesh, axis=axis, causal=causal).pick
        impl, ring_impl, axis = pick.impl, pick.ring_impl, pick.axes or axis
    if impl == "dense":
        return dense_attention(q_BNHD, k_BNKD, v_BNKD, causal=causal, segment_ids_BN=segment_ids)
    if not isinstance(mesh, jax.sharding.Mesh):
        raise TypeError(f"mesh must be a jax.sharding.Mesh (e.g. jax.make_mesh((4,), ('seq',)) "
                        f"or jaxpar.make_mesh(seq=4)) for impl={impl!r}; got "
                        f"{type(mesh).__name__}")
    axes = _axes(impl, axis, mesh)
    sizes = [mesh.shape[a] for a in axes]
    total, ring_size = sizes[0] * (sizes[1] if len(sizes) > 1 else 1), sizes[0]
    b, n, h, _ = q_BNHD.shape
    kh = k_BNKD.shape[2]
    if n % total:
        raise ValueError(f"sequence length N={n} not divisible by the {axes} axis size {total}")
    if impl == "ulysses":
        check_ulysses_heads(h, kh, total, axes[0])
    if impl == "hybrid":
        check_ulysses_heads(h, kh, sizes[1], axes[1])
    zig = ring_size if impl == "hybrid" else total
    if causal:
        layout.check_zigzag(n, zig)
    spec = P(_spmd.batch_axes(q_BNHD, mesh, axes, b), axes if len(axes) > 1 else axes[0])
    args = [q_BNHD, k_BNKD, v_BNKD] + ([segment_ids] if segment_ids is not None else [])
    run = _compiled(mesh, spec, impl, axes, causal, zig,
                    (ring_impl or "ring") if impl == "hybrid" else None, kernels.resolve(kernel))
    return run(*args)


def choose_impl(q_BNHD, k_BNKD, *, mesh, axis=SEQ, causal: bool = False, profile=None):
    """What impl="auto" runs for these global shapes on `mesh`: an `auto.Choice` (the pick,
    predicted seconds of every runnable schedule, and why the others cannot run)."""
    axes = tuple(axis) if isinstance(axis, (tuple, list)) else (axis,)
    if len(axes) not in (1, 2):
        raise ValueError(f"impl='auto' takes one mesh axis or two (hybrid); got axis={axis!r}")
    for a in axes:
        if a not in mesh.shape:
            raise ValueError(f"axis {a!r} is not in the mesh; mesh axes are {list(mesh.shape)}")
    sizes = tuple(mesh.shape[a] for a in axes)
    cands = auto.candidates(sizes[0]) if len(axes) == 1 else auto.candidates(sizes, axes)
    b, n, h, d = q_BNHD.shape
    return auto.choose(cands, batch=b, seq_len=n, heads=h, kv_heads=k_BNKD.shape[2],
                       head_dim=d, dtype=q_BNHD.dtype, causal=causal, profile=profile)


@functools.lru_cache(maxsize=64)
def _compiled(mesh, spec, impl, axes, causal, zig, ring_impl, kernel):
    """jit(reshard to `spec` -> shard_map(zigzag in, attention, zigzag out)), built once per
    configuration: one compiled program when called eagerly, inlined under an outer jit."""
    kwargs = {"ring_impl": ring_impl} if impl == "hybrid" else {}
    fn = functools.partial(attention, impl=impl, axis=axes if impl == "hybrid" else axes[0],
                           causal=causal, kernel=kernel, **kwargs)
    sharding = NamedSharding(mesh, spec)

    def local(*xs):
        # causal: natural-order shards -> zigzag shards by collective permutes, and back
        if causal:
            xs = [layout.to_zigzag_local(x, axes, zig) for x in xs]
        q, k, v, *seg = xs
        out = fn(q, k, v, segment_ids=seg[0] if seg else None)
        return layout.from_zigzag_local(out, axes, zig) if causal else out

    def run(*args):
        args = [layout.put(x, sharding) for x in args]
        # check_vma is off only for kernels that cannot run under it (Pallas interpret mode)
        return jax.shard_map(local, mesh=mesh, in_specs=(spec,) * len(args),
                             out_specs=spec, check_vma=kernel.check_vma)(*args)

    return jax.jit(run)
