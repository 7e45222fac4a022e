"""Shape checks and the ring custom_vjp shared by the sequence-parallel schedules.

Ring shifts, `axis_size` and varying casts live in `jaxpar._spmd`.
"""
from __future__ import annotations

import functools

import jax


def check_local_shapes(q, k, v, seg, axis_name, causal):
    """Shape checks for per-device shards; raise ValueError with what to change."""
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(f"q, k, v must be rank 4 [B, L, heads, D]; got ranks "
                         f"{q.ndim}, {k.ndim}, {v.ndim}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape; got {k.shape} and {v.shape}")
    b, l, h, d = q.shape
    if (k.shape[0], k.shape[1], k.shape[3]) != (b, l, d):
        raise ValueError(f"k/v shape {k.shape} does not match q shape {q.shape} in batch, "
                         f"length or head dim")
    if h % k.shape[2]:
        raise ValueError(f"query heads={h} must be a multiple of kv heads={k.shape[2]} (GQA)")
    if seg is not None and seg.shape != (b, l):
        raise ValueError(f"segment_ids shape {seg.shape} must be [B, L] = {(b, l)}")
    if causal and l % 2:
        raise ValueError(f"causal (zigzag) shards need an even local length; got L={l} on "
                         f"axis {axis_name!r}")


def ring_custom_vjp(forward, backward):
    """The custom_vjp shared by ring and TokenRing: f(q, k, v, seg, axis_name, causal, kernel).

    `forward(q, k, v, seg, axis_name, causal, kernel) -> (out fp32, lse)`; the residuals are
    only the local q, k, v, seg, out and lse, and `backward(axis_name, causal, kernel,
    residuals, dout)` is the schedule's own second ring pass, whose block backward uses the
    global (out, lse). `kernel` is a resolved `kernels.BlockKernel` (hashable, static).
    """

    @functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
    def fn(q, k, v, seg, axis_name, causal, kernel):
        return forward(q, k, v, seg, axis_name, causal, kernel)[0].astype(q.dtype)

    def fn_fwd(q, k, v, seg, axis_name, causal, kernel):
        out, lse = forward(q, k, v, seg, axis_name, causal, kernel)
        return out.astype(q.dtype), (q, k, v, seg, out, lse)

    fn.defvjp(fn_fwd, backward)
    return fn
