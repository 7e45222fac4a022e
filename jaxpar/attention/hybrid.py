"""2-D (hybrid) sequence parallelism: Ulysses inside one mesh axis, a ring across another.

The sequence is sharded over (ring_axis, ulysses_axis), ulysses minor. An all-to-all over
the Ulysses axis turns each group's Pu shards into one shard of Pu·L tokens with H/Pu
heads; a ring (or TokenRing) over the ring axis then runs on those longer shards; an
all-to-all returns to sequence shards. Heads need only divide Pu, not Pu·Pr, and the ring
has Pr − 1 hops instead of P − 1.

Causal layout: zigzag over the Pr ring shards (2·Pr chunks), each ring shard then split
contiguously across the Ulysses axis — `layout.to_zigzag(x, Pr)` then plain sharding.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxpar._spmd import axis_size
from jaxpar.attention.common import check_local_shapes
from jaxpar.attention.ring import ring_attention
from jaxpar.attention.tokenring import tokenring_attention
from jaxpar.attention.ulysses import check_ulysses_heads, heads_to_seq, seq_to_heads

RING_IMPLS = {"ring": ring_attention, "tokenring": tokenring_attention}


def hybrid_attention(q_BLHD, k_BLKD, v_BLKD, *, axis_name, causal: bool = False,
                     segment_ids_BL=None, ring_impl: str = "ring", kernel="auto"):
    """Per-device 2-D attention; `axis_name=(ring_axis, ulysses_axis)`. `kernel`: the
    ring's block-pair kernel (`kernels.KERNEL_NAMES` or a `kernels.BlockKernel`)."""
    if not (isinstance(axis_name, (tuple, list)) and len(axis_name) == 2):
        raise ValueError(f"hybrid attention needs axis_name=(ring_axis, ulysses_axis); "
                         f"got {axis_name!r}")
    if ring_impl not in RING_IMPLS:
        raise ValueError(f"ring_impl={ring_impl!r}; valid choices are {sorted(RING_IMPLS)}")
    ring_axis, ulysses_axis = axis_name
    check_local_shapes(q_BLHD, k_BLKD, v_BLKD, segment_ids_BL, axis_name, False)
    pu = axis_size(ulysses_axis)
    h, kh = q_BLHD.shape[2], k_BLKD.shape[2]
    check_ulysses_heads(h, kh, pu, ulysses_axis)
    if kh % pu:
        k_BLKD = jnp.repeat(k_BLKD, pu // kh, axis=2)
        v_BLKD = jnp.repeat(v_BLKD, pu // kh, axis=2)
    seg = segment_ids_BL
    if seg is not None:
        seg = jax.lax.all_gather(seg, ulysses_axis, axis=1, tiled=True)
    out = RING_IMPLS[ring_impl](
        seq_to_heads(q_BLHD, ulysses_axis), seq_to_heads(k_BLKD, ulysses_axis),
        seq_to_heads(v_BLKD, ulysses_axis), axis_name=ring_axis, causal=causal,
        segment_ids_BL=seg, kernel=kernel)
    return heads_to_seq(out, ulysses_axis)
