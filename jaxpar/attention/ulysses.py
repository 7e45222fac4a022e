"""DeepSpeed-Ulysses: all-to-all from sequence shards to head shards and back.

  q[B, L, H, D] --all-to-all--> q[B, N, H/P, D]   (every token, H/P heads)
  full attention on H/P heads (memory-bounded flash kernel, causally empty tiles skipped)
  out[B, N, H/P, D] --all-to-all--> out[B, L, H, D]

Bytes per device ≈ (P−1)/P · B·L·D·(2H + 2K)·bytes: constant when N and P grow together.
GQA: when K is not a multiple of P, each K/V head is replicated P/K times before the
all-to-all so every device gets the K/V head its query heads use (needs P % K == 0).
Autodiff gives the backward: the transpose of an all-to-all is an all-to-all.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from jaxpar.attention import blockwise, layout
from jaxpar._spmd import axis_size, divisors
from jaxpar.attention.common import check_local_shapes


def check_ulysses_heads(num_heads, num_kv_heads, p, axis_name):
    if num_heads % p:
        raise ValueError(
            f"heads={num_heads} not divisible by {axis_name!r} axis size {p}; use impl='ring' "
            f"or 'tokenring', or a {axis_name!r} axis of size in {divisors(num_heads)}")
    if num_kv_heads % p and p % num_kv_heads:
        raise ValueError(
            f"kv heads={num_kv_heads} and {axis_name!r} axis size {p}: one must divide the "
            f"other for Ulysses; use impl='ring', or an axis size in "
            f"{[d for d in divisors(num_heads) if d % num_kv_heads == 0 or num_kv_heads % d == 0]}")


def _flash_block(n, p, causal):
    # Tiles must not straddle zigzag chunks (size N/2P) or causal skipping finds nothing.
    unit = n // (2 * p) if causal else n
    return math.gcd(unit, blockwise.DEFAULT_TILE)


def seq_to_heads(x_BLHD, axis_name):
    return jax.lax.all_to_all(x_BLHD, axis_name, split_axis=2, concat_axis=1, tiled=True)


def heads_to_seq(x_BNhD, axis_name):
    return jax.lax.all_to_all(x_BNhD, axis_name, split_axis=1, concat_axis=2, tiled=True)


def ulysses_attention(q_BLHD, k_BLKD, v_BLKD, *, axis_name, causal: bool = False,
                      segment_ids_BL=None):
    """Per-device Ulysses attention; call inside `shard_map` with the sequence on
    `axis_name` (zigzag layout when causal, like the ring impls). Returns out[B,L,H,D]."""
    check_local_shapes(q_BLHD, k_BLKD, v_BLKD, segment_ids_BL, axis_name, causal)
    p = axis_size(axis_name)
    h, kh = q_BLHD.shape[2], k_BLKD.shape[2]
    check_ulysses_heads(h, kh, p, axis_name)
    if kh % p:  # replicate K/V heads so each device receives the one its queries use
        k_BLKD = jnp.repeat(k_BLKD, p // kh, axis=2)
        v_BLKD = jnp.repeat(v_BLKD, p // kh, axis=2)
    q_BNhD = seq_to_heads(q_BLHD, axis_name)
    k_BNkD = seq_to_heads(k_BLKD, axis_name)
    v_BNkD = seq_to_heads(v_BLKD, axis_name)
    n = q_BNhD.shape[1]
    # Gathered token order = shard order, so positions are the (static) layout permutation.
    positions_N = jnp.asarray(layout.zigzag_indices(n, p) if causal else range(n), jnp.int32)
    seg_BN = None
    if segment_ids_BL is not None:
        seg_BN = jax.lax.all_gather(segment_ids_BL, axis_name, axis=1, tiled=True)
    out_BNhD, _ = blockwise.flash_attention(q_BNhD, k_BNkD, v_BNkD, positions_N=positions_N,
                                            segment_ids_BN=seg_BN, causal=causal,
                                            block=_flash_block(n, p, causal))
    return heads_to_seq(out_BNhD.astype(q_BLHD.dtype), axis_name)
