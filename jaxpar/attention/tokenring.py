"""TokenRing: queries travel, partial outputs come straight back — both link directions busy.

At step s device r holds the query shard of device o = (r + s) mod P (each step q moves
r → r − 1), computes the partial (out, lse) of those queries against its *own* K/V, and
sends the partial directly to the owner o (a shift by +s) while it computes the next step;
the owner merges all P partials. Queries use one link direction, partials the other.

Bytes per device: q (P−1)·B·L·H·D, partials (P−1)·B·L·H·(D+1) in fp32. Against ring's
(P−1)·2·B·L·K·D this pays off when K ≈ H (MHA); with GQA (K ≪ H) ring moves less.

Backward (custom_vjp) is the mirror image: (q, dout, lse, delta) travel r → r + 1; every
device accumulates dK/dV for its own K/V in place (they never move) and sends each partial
dQ straight back to the query's owner.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jaxpar.attention import blockwise
from jaxpar.attention.common import axis_size, check_local_shapes, shift


def tokenring_attention(q_BLHD, k_BLKD, v_BLKD, *, axis_name, causal: bool = False,
                        segment_ids_BL=None):
    """Per-device TokenRing attention; call inside `shard_map` with the sequence on
    `axis_name` (zigzag layout when causal). Returns out[B,L,H,D]."""
    check_local_shapes(q_BLHD, k_BLKD, v_BLKD, segment_ids_BL, axis_name, causal)
    return _tokenring(q_BLHD, k_BLKD, v_BLKD, segment_ids_BL, axis_name, causal)


def _tokenring_forward(q, k, v, seg, axis_name, causal):
    p = axis_size(axis_name)
    r = jax.lax.axis_index(axis_name)
    out, lse = blockwise.pair_fwd(q, k, v, seg, seg, r, r, num_shards=p, causal=causal,
                                  diagonal=True)
    visiting = (q, seg)
    for s in range(1, p):
        visiting = shift(visiting, axis_name, -1)  # now the queries of owner (r + s) mod P
        part = blockwise.pair_fwd(visiting[0], k, v, visiting[1], seg, (r + s) % p, r,
                                  num_shards=p, causal=causal, diagonal=False)
        # Straight home; the owner merges while the next step computes.
        out, lse = blockwise.merge(out, lse, *shift(part, axis_name, +s))
    return out, lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _tokenring(q, k, v, seg, axis_name, causal):
    return _tokenring_forward(q, k, v, seg, axis_name, causal)[0].astype(q.dtype)


def _tokenring_fwd(q, k, v, seg, axis_name, causal):
    out, lse = _tokenring_forward(q, k, v, seg, axis_name, causal)
    return out.astype(q.dtype), (q, k, v, seg, out, lse)


def _tokenring_bwd(axis_name, causal, res, dout):
    q, k, v, seg, out, lse = res
    p = axis_size(axis_name)
    r = jax.lax.axis_index(axis_name)
    dlt = blockwise.delta(out, dout)
    dq, dk, dv = blockwise.pair_bwd(q, k, v, seg, seg, r, r, lse, dout, dlt, num_shards=p,
                                    causal=causal, diagonal=True)
    # Mirror image of the forward (queries go to r + 1, dQ comes back by −s): the other link
    # directions, and transfers XLA cannot CSE with the forward's identical query hops
    # (which would keep every visiting query block alive until the backward).
    visiting = (q, seg, lse, dout, dlt)
    for s in range(1, p):
        visiting = shift(visiting, axis_name, +1)  # the queries of owner (r − s) mod P
        vq, vseg, vlse, vdout, vdlt = visiting
        dq_s, dk_s, dv_s = blockwise.pair_bwd(vq, k, v, vseg, seg, (r - s) % p, r, vlse, vdout,
                                              vdlt, num_shards=p, causal=causal, diagonal=False)
        dk, dv = dk + dk_s, dv + dv_s
        dq = dq + shift(dq_s, axis_name, -s)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None


_tokenring.defvjp(_tokenring_fwd, _tokenring_bwd)
