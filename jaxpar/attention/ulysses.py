"""DeepSpeed-Ulysses: all-to-all from sequence shards to head shards and back.

  q[B, L, H, D] --all-to-all--> q[B, N, H/P, D]   (every token, H/P heads)
  full attention on H/P heads: one call of the block kernel (`kernels`) over the whole
  sequence, in natural order (causal: the gathered zigzag order is undone, and redone on
  the output, by a static chunk permutation)
  out[B, N, H/P, D] --all-to-all--> out[B, L, H, D]

Bytes per device ≈ (P−1)/P · B·L·D·(2H + 2K)·bytes: constant when N and P grow together.
GQA: when K is not a multiple of P, each K/V head is replicated P/K times before the
all-to-all so every device gets the K/V head its query heads use (needs P % K == 0).
Autodiff gives the backward around the kernel's own: the transpose of an all-to-all is an
all-to-all.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxpar.attention import kernels
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


def zigzag_to_natural(x_BN, p):
    """Gathered shards in zigzag order (chunks 0, 2P−1, 1, 2P−2, …) -> natural order."""
    b, n = x_BN.shape[:2]
    x = x_BN.reshape(b, p, 2, n // (2 * p), *x_BN.shape[2:])
    first, second = x[:, :, 0], jnp.flip(x[:, :, 1], axis=1)
    return jnp.concatenate([first, second], axis=1).reshape(x_BN.shape)


def natural_to_zigzag(x_BN, p):
    """Inverse of `zigzag_to_natural`."""
    b, n = x_BN.shape[:2]
    x = x_BN.reshape(b, 2 * p, n // (2 * p), *x_BN.shape[2:])
    first, second = x[:, :p], jnp.flip(x[:, p:], axis=1)
    return jnp.stack([first, second], axis=2).reshape(x_BN.shape)


def seq_to_heads(x_BLHD, axis_name):
    return jax.lax.all_to_all(x_BLHD, axis_name, split_axis=2, concat_axis=1, tiled=True)


def heads_to_seq(x_BNhD, axis_name):
    return jax.lax.all_to_all(x_BNhD, axis_name, split_axis=1, concat_axis=2, tiled=True)


def ulysses_attention(q_BLHD, k_BLKD, v_BLKD, *, axis_name, causal: bool = False,
                      segment_ids_BL=None, kernel="auto"):
    """Per-device Ulysses attention; call inside `shard_map` with the sequence on
    `axis_name` (zigzag layout when causal, like the ring impls). Returns out[B,L,H,D].
    `kernel`: the block kernel (`kernels.KERNEL_NAMES` or a `kernels.BlockKernel`)."""
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
    seg_BN = None
    if segment_ids_BL is not None:
        seg_BN = jax.lax.all_gather(segment_ids_BL, axis_name, axis=1, tiled=True)
    # Gathered token order = shard order: zigzag when causal. The kernel's causal mask is
    # index-based, so attend in natural order and put the output back.
    order = (lambda x: zigzag_to_natural(x, p)) if causal else (lambda x: x)  # noqa: E731
    out_BNhD, _ = kernels.local_attention(
        order(q_BNhD), order(k_BNkD), order(v_BNkD),
        segment_ids=None if seg_BN is None else order(seg_BN), causal=causal, kernel=kernel)
    if causal:
        out_BNhD = natural_to_zigzag(out_BNhD, p)
    return heads_to_seq(out_BNhD.astype(q_BLHD.dtype), axis_name)
