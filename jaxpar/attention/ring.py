"""Ring attention: K/V travel around the ring, queries stay home.

Device r of P holds shard r of q, k, v (zigzag order when causal). At step s it attends
its queries to the K/V shard of device (r − s) mod P while passing that shard on to r + 1,
merging partials online. P − 1 transfers of 2·B·L·K·D (GQA: K heads, not H).

Backward is a second ring pass (custom_vjp), turning the other way: K/V travel again, now
with their gradient accumulators dK/dV, which arrive home after the P-th hop. Saved
residuals are only the local q, k, v, out, lse — never gathered K/V, never an N×N score
matrix.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxpar.attention import blockwise, kernels
from jaxpar._spmd import axis_size, shift
from jaxpar.attention.common import check_local_shapes, ring_custom_vjp


def ring_attention(q_BLHD, k_BLKD, v_BLKD, *, axis_name, causal: bool = False,
                   segment_ids_BL=None, kernel="auto"):
    """Per-device ring attention; call inside `shard_map` with the sequence on `axis_name`.

    Inputs are this device's shard (zigzag layout when causal). Returns out[B,L,H,D].
    `kernel`: the block-pair kernel (`kernels.KERNEL_NAMES` or a `kernels.BlockKernel`).
    """
    check_local_shapes(q_BLHD, k_BLKD, v_BLKD, segment_ids_BL, axis_name, causal)
    return _ring(q_BLHD, k_BLKD, v_BLKD, segment_ids_BL, axis_name, causal,
                 kernels.resolve(kernel))


def _middle_steps(body, carry, p):
    """Run body(carry, s) for s = 1 .. P−2 as a `lax.scan`: buffers of one step are reused
    by the next, so only the current and the incoming block are ever live."""
    if p <= 2:
        return carry
    return jax.lax.scan(lambda c, s: (body(c, s), None), carry, jnp.arange(1, p - 1))[0]


def _ring_forward(q, k, v, seg, axis_name, causal, kernel):
    p = axis_size(axis_name)
    r = jax.lax.axis_index(axis_name)

    def attend_block(kv, s, diagonal=False):
        return kernels.pair_fwd(kernel, q, kv[0], kv[1], seg, kv[2], r, (r - s) % p,
                                causal=causal, diagonal=diagonal)

    # Step 0 (own block) and every middle step send the block on *before* attending to it:
    # the transfer and the compute have no data dependence, so they can overlap.
    kv = (k, v, seg)
    out, lse = attend_block(kv, 0, diagonal=True)
    if p == 1:
        return out, lse
    kv = shift(kv, axis_name, +1)

    def step(carry, s):
        out, lse, kv = carry
        kv_next = shift(kv, axis_name, +1)
        out, lse = blockwise.merge(out, lse, *attend_block(kv, s))
        return out, lse, kv_next

    out, lse, kv = _middle_steps(step, (out, lse, kv), p)
    return blockwise.merge(out, lse, *attend_block(kv, p - 1))  # last block: nothing to send


def _ring_bwd(axis_name, causal, kernel, res, dout):
    q, k, v, seg, out, lse = res
    p = axis_size(axis_name)
    r = jax.lax.axis_index(axis_name)
    dlt = blockwise.delta(out, dout)

    # The backward ring turns the other way (K/V go to r − 1, so step s holds block r + s).
    # Besides using the other link direction, this keeps XLA from CSE-ing these transfers
    # with the forward's identical ones, which would keep every received K/V block alive
    # until the backward (= gathered K/V); an optimization_barrier does not survive
    # XLA:CPU's pipeline, a distinct permutation does. dK/dV ride with their block and are
    # home after the P-th hop.
    def grads_of_block(kv, s, diagonal=False):
        return kernels.pair_bwd(kernel, q, kv[0], kv[1], seg, kv[2], r, (r + s) % p, lse, dout,
                                dlt, causal=causal, diagonal=diagonal)

    def accumulate(dq, dkv, grads):
        dq_s, dk_s, dv_s = grads
        return dq + dq_s, shift((dkv[0] + dk_s, dkv[1] + dv_s), axis_name, -1)

    kv = (k, v, seg)
    dq, dk, dv = grads_of_block(kv, 0, diagonal=True)
    if p > 1:
        dkv = shift((dk, dv), axis_name, -1)
        kv = shift(kv, axis_name, -1)

        def step(carry, s):
            dq, kv, dkv = carry
            kv_next = shift(kv, axis_name, -1)
            dq, dkv = accumulate(dq, dkv, grads_of_block(kv, s))
            return dq, kv_next, dkv

        dq, kv, dkv = _middle_steps(step, (dq, kv, dkv), p)
        dq, (dk, dv) = accumulate(dq, dkv, grads_of_block(kv, p - 1))
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None


_ring = ring_custom_vjp(_ring_forward, _ring_bwd)
