"""Ring attention: K/V travel around the ring, queries stay home.

Device r of P holds shard r of q, k, v (zigzag order when causal). At step s it attends
its queries to the K/V shard of device (r − s) mod P while passing that shard on to r + 1,
merging partials online. P − 1 transfers of 2·B·L·K·D (GQA: K heads, not H).

Backward is a second ring pass (custom_vjp), turning the other way: K/V travel again, now
with their gradient accumulators dK/dV, which arrive home after the P-th hop. Saved residuals are only the
local q, k, v, out, lse — never gathered K/V, never an N×N score matrix.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jaxpar.attention import blockwise
from jaxpar.attention.common import axis_size, check_local_shapes, shift


def ring_attention(q_BLHD, k_BLKD, v_BLKD, *, axis_name, causal: bool = False,
                   segment_ids_BL=None):
    """Per-device ring attention; call inside `shard_map` with the sequence on `axis_name`.

    Inputs are this device's shard (zigzag layout when causal). Returns out[B,L,H,D].
    """
    check_local_shapes(q_BLHD, k_BLKD, v_BLKD, segment_ids_BL, axis_name, causal)
    return _ring(q_BLHD, k_BLKD, v_BLKD, segment_ids_BL, axis_name, causal)


def _ring_forward(q, k, v, seg, axis_name, causal):
    p = axis_size(axis_name)
    r = jax.lax.axis_index(axis_name)
    out, lse = blockwise.empty_partial(q)
    kv = (k, v, seg)
    for s in range(p):
        # Launch the next hop before computing on this block: no data dependence between them.
        nxt = shift(kv, axis_name, +1) if s < p - 1 else None
        part = blockwise.pair_fwd(q, kv[0], kv[1], seg, kv[2], r, (r - s) % p,
                                  num_shards=p, causal=causal, diagonal=(s == 0))
        out, lse = blockwise.merge(out, lse, *part)
        kv = nxt
    return out, lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _ring(q, k, v, seg, axis_name, causal):
    return _ring_forward(q, k, v, seg, axis_name, causal)[0].astype(q.dtype)


def _ring_fwd(q, k, v, seg, axis_name, causal):
    out, lse = _ring_forward(q, k, v, seg, axis_name, causal)
    return out.astype(q.dtype), (q, k, v, seg, out, lse)


def _ring_bwd(axis_name, causal, res, dout):
    q, k, v, seg, out, lse = res
    p = axis_size(axis_name)
    r = jax.lax.axis_index(axis_name)
    dlt = blockwise.delta(out, dout)
    dq = jnp.zeros(q.shape, jnp.float32)
    kv = (k, v, seg)
    dkv = (jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32))
    # The backward ring turns the other way (K/V go to r − 1). Besides using the other link
    # direction, this keeps XLA from CSE-ing these transfers with the forward's identical
    # ones, which would keep every received K/V block alive until the backward (= gathered
    # K/V); an optimization_barrier does not survive XLA:CPU's pipeline, a distinct
    # permutation does.
    for s in range(p):
        nxt = shift(kv, axis_name, -1) if s < p - 1 else None
        dq_s, dk_s, dv_s = blockwise.pair_bwd(q, kv[0], kv[1], seg, kv[2], r, (r + s) % p, lse,
                                              dout, dlt, num_shards=p, causal=causal,
                                              diagonal=(s == 0))
        dq = dq + dq_s
        # dK/dV ride with their K/V block; after P hops they are back at the block's owner.
        dkv = shift((dkv[0] + dk_s, dkv[1] + dv_s), axis_name, -1)
        kv = nxt
    return dq.astype(q.dtype), dkv[0].astype(k.dtype), dkv[1].astype(v.dtype), None


_ring.defvjp(_ring_fwd, _ring_bwd)
