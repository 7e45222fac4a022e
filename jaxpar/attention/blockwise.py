"""Local block attention with fp32 partials (out, lse), their merge, and the block backward.

Every sequence-parallel schedule is built from three pieces:
  attend(q, k, v, mask)        -> (out, lse)   one (query block, key block) pair
  merge((o1, l1), (o2, l2))    -> (o, l)       combine partials over disjoint key sets
  attend_bwd(..., lse, dout)   -> dq, dk, dv   flash-attention backward for one pair,
                                               given the *final* lse and delta = Σ dout·out

With s = scale·q·kᵀ, the partial over key set S is out_S = Σ_j softmax_S(s)_j v_j and
lse_S = log Σ_{j∈S} exp(s_j). Two partials merge exactly:
  lse = logaddexp(lse_1, lse_2),   out = e^{lse_1−lse} out_1 + e^{lse_2−lse} out_2.
Rows whose keys are all masked have lse = −inf and out = 0, and merge as the identity.

Shapes: q[B,Lq,H,D], k,v[B,Lk,K,D] with H = K·G (GQA), mask[B,Lq,Lk] (True = attend;
None = nothing masked), out[B,Lq,H,D] fp32, lse[B,Lq,H] fp32.

Below them, the pure-JAX tiled kernel ("xla" in `kernels`): `tiled_fwd`/`tiled_bwd` (any
token positions) and `block_fwd`/`block_bwd` (the block-pair interface of `kernels`:
causal = query i sees key j ≤ i of an equally long block).
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from jaxpar._spmd import varying_like

NEG_INF = -jnp.inf


def make_mask(q_pos_L, k_pos_M, q_seg_BL=None, k_seg_BM=None, *, causal: bool):
    """bool[B or 1, L, M]: query i may attend key j (same segment; j ≤ i when causal), or
    None when nothing is masked (positions are only read when causal)."""
    mask = None
    if causal:
        mask = q_pos_L[..., :, None] >= k_pos_M[..., None, :]
        mask = mask[None] if mask.ndim == 2 else mask
    if q_seg_BL is not None:
        same = q_seg_BL[:, :, None] == k_seg_BM[:, None, :]
        mask = same if mask is None else mask & same
    return mask


def _per_query_head(x_BMKD, heads):
    """GQA: each kv head repeated for the H/K query heads that share it (query head i reads
    kv head i // (H/K)). The per-head layout is faster than a grouped [B, K, G, L, M] one —
    XLA:CPU, one 1024-token fwd+bwd call at H = 8, K = 2: 152 ms against 266 ms, and MHA
    gains too (D = 64: 274 against 377 ms) — and the copy is one K/V tile, small beside the
    tile's scores."""
    kv_heads = x_BMKD.shape[2]
    if heads % kv_heads:
        raise ValueError(f"query heads={heads} must be a multiple of kv heads={kv_heads}")
    return x_BMKD if kv_heads == heads else jnp.repeat(x_BMKD, heads // kv_heads, axis=2)


def _sum_groups(x_BMHD, kv_heads):
    """The adjoint of `_per_query_head`: a kv head's gradient sums over its query heads."""
    b, m, h, d = x_BMHD.shape
    return x_BMHD if h == kv_heads else x_BMHD.reshape(b, m, kv_heads, h // kv_heads, d).sum(3)


def _scores(q_BLHD, k_BMHD, mask_BLM):
    """scale·q·kᵀ in fp32, masked to −inf: [B, H, L, M]."""
    scale = q_BLHD.shape[-1] ** -0.5
    s_BHLM = jnp.einsum("blhd,bmhd->bhlm", q_BLHD, k_BMHD,
                        preferred_element_type=jnp.float32) * scale
    if mask_BLM is None:
        return s_BHLM
    return jnp.where(mask_BLM[:, None], s_BHLM, NEG_INF)


def attend(q_BLHD, k_BMKD, v_BMKD, mask_BLM):
    """Partial attention of a query block over one key block: (out fp32, lse fp32)."""
    h = q_BLHD.shape[2]
    k_BMHD, v_BMHD = _per_query_head(k_BMKD, h), _per_query_head(v_BMKD, h)
    s_BHLM = _scores(q_BLHD, k_BMHD, mask_BLM)
    m_BHL = jnp.max(s_BHLM, axis=-1)
    m_BHL = jnp.where(jnp.isfinite(m_BHL), m_BHL, 0.0)  # fully-masked rows
    p_BHLM = jnp.exp(s_BHLM - m_BHL[..., None])
    denom_BHL = jnp.sum(p_BHLM, axis=-1)
    o_BLHD = jnp.einsum("bhlm,bmhd->blhd", p_BHLM.astype(v_BMHD.dtype), v_BMHD,
                        preferred_element_type=jnp.float32)
    safe_BHL = jnp.where(denom_BHL > 0, denom_BHL, 1.0)
    o_BLHD = o_BLHD / jnp.moveaxis(safe_BHL, -1, 1)[..., None]
    lse_BHL = jnp.where(denom_BHL > 0, m_BHL + jnp.log(safe_BHL), NEG_INF)
    return o_BLHD, jnp.moveaxis(lse_BHL, -1, 1)


def merge(out1_BLHD, lse1_BLH, out2_BLHD, lse2_BLH):
    """Exact merge of two partials over disjoint key sets (fp32)."""
    lse_BLH = jnp.logaddexp(lse1_BLH, lse2_BLH)
    safe_BLH = jnp.where(jnp.isfinite(lse_BLH), lse_BLH, 0.0)
    w1 = jnp.exp(lse1_BLH - safe_BLH)[..., None]
    w2 = jnp.exp(lse2_BLH - safe_BLH)[..., None]
    return w1 * out1_BLHD + w2 * out2_BLHD, lse_BLH


def empty_partial(q_BLHD, *more_refs):
    """The merge identity for a query block: out 0, lse −inf."""
    b, l, h, d = q_BLHD.shape
    out = jnp.zeros((b, l, h, d), jnp.float32)
    lse = jnp.full((b, l, h), NEG_INF, jnp.float32)
    return varying_like(out, q_BLHD, *more_refs), varying_like(lse, q_BLHD, *more_refs)


def zeros_like_f32(x, *refs):
    return varying_like(jnp.zeros(x.shape, jnp.float32), x, *refs)


def attend_bwd(q_BLHD, k_BMKD, v_BMKD, mask_BLM, lse_BLH, dout_BLHD, delta_BLH):
    """Gradients of one block pair given the final lse and delta = Σ_d dout·out (fp32).

    p = exp(s − lse) is the block's slice of the *global* softmax, so per-block gradients
    simply add up over blocks:  dv = pᵀ dout,  ds = p ⊙ (dout vᵀ − delta),
    dq = scale · ds k,  dk = scale · dsᵀ q  (GQA: dk, dv summed over each kv head's group).
    """
    h, d = q_BLHD.shape[2:]
    kv_heads = k_BMKD.shape[2]
    scale = d ** -0.5
    k_BMHD, v_BMHD = _per_query_head(k_BMKD, h), _per_query_head(v_BMKD, h)
    s_BHLM = _scores(q_BLHD, k_BMHD, mask_BLM)
    lse_BHL = jnp.moveaxis(lse_BLH, 1, -1)
    lse_BHL = jnp.where(jnp.isfinite(lse_BHL), lse_BHL, 0.0)
    p_BHLM = jnp.exp(s_BHLM - lse_BHL[..., None])  # masked entries: exp(−inf) = 0
    do_BLHD = dout_BLHD.astype(jnp.float32)
    dv_BMHD = jnp.einsum("bhlm,blhd->bmhd", p_BHLM, do_BLHD)
    dp_BHLM = jnp.einsum("blhd,bmhd->bhlm", do_BLHD, v_BMHD.astype(jnp.float32))
    ds_BHLM = p_BHLM * (dp_BHLM - jnp.moveaxis(delta_BLH, 1, -1)[..., None]) * scale
    dq_BLHD = jnp.einsum("bhlm,bmhd->blhd", ds_BHLM, k_BMHD.astype(jnp.float32))
    dk_BMHD = jnp.einsum("bhlm,blhd->bmhd", ds_BHLM, q_BLHD.astype(jnp.float32))
    return dq_BLHD, _sum_groups(dk_BMHD, kv_heads), _sum_groups(dv_BMHD, kv_heads)


def delta(out_BLHD, dout_BLHD):
    return jnp.sum(out_BLHD.astype(jnp.float32) * dout_BLHD.astype(jnp.float32), axis=-1)


# ---------------------------------------------------------------------------------------
# Tiled attention: the tile primitives above looped over [query tile × key tile] pairs so
# that no more than one score tile per head is live. Within a query tile every query is
# processed at once (one einsum), the key tiles are a `lax.scan`; query tiles (when there
# are several) run one after the other, also a `lax.scan`. Tile sizes are per backend:
# GPUs want big tiles (an H200 ran 1.77-2.62× faster with 2048 than with 512 tiles), a CPU
# wants cache-sized ones (256² picked from a sweep of 128..1024 here, docs/kernels.md).


DEFAULT_TILE: int | None = None  # key-tile length (None: per backend); read at trace time
Q_TILE_FACTOR: int | None = None  # query tile = factor × key tile (None: per backend)
BACKEND_TILES = {"cpu": (256, 1)}  # backend -> (key tile, query-tile factor)
OTHER_TILES = (1024, 4)  # GPU, TPU: 4096 × 1024 score tiles per head and step
# Causal blocks by halving (below) or by skipping invisible tiles with `lax.cond`: the same
# work on CPU, where halving compiles 3× slower; elsewhere halving avoids a cond per tile.
CAUSAL_HALVING = {"cpu": False}  # backend -> bool (default True)


def tile_sizes(block=None):
    """(query tile, key tile) upper bounds: `block` or DEFAULT_TILE or the backend's."""
    key_tile, factor = BACKEND_TILES.get(jax.default_backend(), OTHER_TILES)
    key_tile = block or DEFAULT_TILE or key_tile
    return (Q_TILE_FACTOR or factor) * key_tile, key_tile


def _tile_lens(lq, lk, block):
    q_tile, k_tile = tile_sizes(block)
    return math.gcd(lq, q_tile), math.gcd(lk, k_tile)


def _tiles(x, n):
    """[B, N, ...] -> [n, B, N/n, ...] (None stays None)."""
    if x is None:
        return None
    b, length = x.shape[:2]
    return jnp.moveaxis(x.reshape(b, n, length // n, *x.shape[2:]), 1, 0)


def _pos_tiles(pos, n):
    return None if pos is None else pos.reshape(n, -1)


def _untiles(x):
    n, b, l = x.shape[:3]
    return jnp.moveaxis(x, 0, 1).reshape(b, n * l, *x.shape[3:])


def _tile_has_work(q_pos_L, k_pos_M):
    # Only causality can empty a whole tile for sure; segments are data, never skipped.
    return jnp.max(q_pos_L) >= jnp.min(k_pos_M)


def _maybe_skip(causal, q_pos, k_pos, work, skip, operand):
    if not causal:
        return work(operand)
    return jax.lax.cond(_tile_has_work(q_pos, k_pos), work, skip, operand)


def tiled_fwd(q, k, v, q_pos, k_pos, q_seg, k_seg, *, causal, block=None):
    """(out, lse) of queries q[B,Lq,H,D] at positions q_pos over keys k, v[B,Lk,K,D] at k_pos
    (positions are read only when causal; key tiles no query of a tile sees are skipped)."""
    tq, tk = _tile_lens(q.shape[1], k.shape[1], block)
    nq, nk = q.shape[1] // tq, k.shape[1] // tk
    kv_tiles = (_tiles(k, nk), _tiles(v, nk), _pos_tiles(k_pos, nk), _tiles(k_seg, nk))

    def one_query_tile(q_t, qpos_t, qseg_t):
        if nk == 1:
            return attend(q_t, k, v, make_mask(qpos_t, k_pos, qseg_t, k_seg, causal=causal))

        def step(carry, kv):
            k_t, v_t, kpos_t, kseg_t = kv
            mask = make_mask(qpos_t, kpos_t, qseg_t, kseg_t, causal=causal)
            work = lambda c: merge(*c, *attend(q_t, k_t, v_t, mask))  # noqa: E731
            return _maybe_skip(causal, qpos_t, kpos_t, work, lambda c: c, carry), None

        return jax.lax.scan(step, empty_partial(q_t, k, v), kv_tiles)[0]

    if nq == 1:
        return one_query_tile(q, q_pos, q_seg)
    out, lse = jax.lax.map(lambda a: one_query_tile(*a),
                           (_tiles(q, nq), _pos_tiles(q_pos, nq), _tiles(q_seg, nq)))
    return _untiles(out), _untiles(lse)


def tiled_bwd(q, k, v, q_pos, k_pos, q_seg, k_seg, lse, dout, dlt, *, causal, block=None):
    """(dq, dk, dv) in fp32 given the final lse and delta = Σ dout·out of these queries."""
    tq, tk = _tile_lens(q.shape[1], k.shape[1], block)
    nq, nk = q.shape[1] // tq, k.shape[1] // tk
    if nq == nk == 1:
        mask = make_mask(q_pos, k_pos, q_seg, k_seg, causal=causal)
        return attend_bwd(q, k, v, mask, lse, dout, dlt)
    refs = (q, k, v, lse, dout, dlt)
    q_tiles = (jnp.arange(nq), _tiles(q, nq), _pos_tiles(q_pos, nq), _tiles(q_seg, nq),
               _tiles(lse, nq), _tiles(dout, nq), _tiles(dlt, nq))

    def one_key_tile(dq, ka):
        # dK/dV of this key tile accumulate over query tiles; dQ accumulates in place in the
        # carried full-size buffer (FlashAttention-2 order), so no per-tile dQ copies live.
        k_t, v_t, kpos_t, kseg_t = ka
        zeros = zeros_like_f32(k_t, *refs)
        if nq == 1:  # every query at once against this key tile
            mask = make_mask(q_pos, kpos_t, q_seg, kseg_t, causal=causal)

            def work(dq):
                dq_s, dk_t, dv_t = attend_bwd(q, k_t, v_t, mask, lse, dout, dlt)
                return dq + dq_s, (dk_t, dv_t)

            return _maybe_skip(causal, q_pos, kpos_t, work, lambda dq: (dq, (zeros, zeros)),
                               dq)

        def step(carry, qa):
            i, q_t, qpos_t, qseg_t, lse_t, do_t, dl_t = qa
            mask = make_mask(qpos_t, kpos_t, qseg_t, kseg_t, causal=causal)

            def work(c):
                dq, dk_acc, dv_acc = c
                dq_t, dk_t, dv_t = attend_bwd(q_t, k_t, v_t, mask, lse_t, do_t, dl_t)
                dq = jax.lax.dynamic_update_slice_in_dim(
                    dq, jax.lax.dynamic_slice_in_dim(dq, i * tq, tq, axis=1) + dq_t, i * tq,
                    axis=1)
                return dq, dk_acc + dk_t, dv_acc + dv_t

            return _maybe_skip(causal, qpos_t, kpos_t, work, lambda c: c, carry), None

        (dq, dk_t, dv_t), _ = jax.lax.scan(step, (dq, zeros, zeros), q_tiles)
        return dq, (dk_t, dv_t)

    dq, (dk, dv) = jax.lax.scan(one_key_tile, zeros_like_f32(q, *refs),
                                (_tiles(k, nk), _tiles(v, nk), _pos_tiles(k_pos, nk),
                                 _tiles(k_seg, nk)))
    return dq, _untiles(dk), _untiles(dv)


# ---------------------------------------------------------------------------------------
# The block-pair interface of `kernels` ("xla"): non-causal = every key, causal = query i
# sees key j ≤ i of an equally long block. Causal by halving: the two diagonal halves are
# one causal call on a batch twice as large ([B, 2h] -> [2B, h] is a free reshape), the
# lower-left quarter one full call; recursing down to one tile computes only the lower
# triangle (plus half of the diagonal tiles), every call vectorized, no per-tile branch.
# Or (CPU default) one tiled call that skips the invisible tiles with `lax.cond`.


def _fold(x):
    return None if x is None else x.reshape(2 * x.shape[0], x.shape[1] // 2, *x.shape[2:])


def _unfold(x):
    return x.reshape(x.shape[0] // 2, 2 * x.shape[1], *x.shape[2:])


def _half(x, which):
    if x is None:
        return None
    h = x.shape[1] // 2
    return jax.lax.slice_in_dim(x, which * h, (which + 1) * h, axis=1)


def _diagonal_only(n, block, halving):
    if halving is None:
        halving = CAUSAL_HALVING.get(jax.default_backend(), True)
    return not halving or n <= tile_sizes(block)[1] or n % 2


def block_fwd(q, k, v, q_seg, k_seg, *, causal, block=None, halving=None):
    """(out fp32, lse fp32) of one block pair (see `kernels.BlockKernel.fwd`). `halving`:
    causal by halving (True) or by tile skipping (False); None: per backend."""
    if not causal:
        return tiled_fwd(q, k, v, None, None, q_seg, k_seg, causal=False, block=block)
    n = q.shape[1]
    if k.shape[1] != n:
        raise ValueError(f"a causal block pair needs equal lengths; got {n} and {k.shape[1]}")
    if _diagonal_only(n, block, halving):
        pos = jnp.arange(n, dtype=jnp.int32)
        return tiled_fwd(q, k, v, pos, pos, q_seg, k_seg, causal=True, block=block)
    out, lse = block_fwd(_fold(q), _fold(k), _fold(v), _fold(q_seg), _fold(k_seg), causal=True,
                         block=block, halving=halving)
    out, lse = _unfold(out), _unfold(lse)
    o_x, l_x = tiled_fwd(_half(q, 1), _half(k, 0), _half(v, 0), None, None, _half(q_seg, 1),
                         _half(k_seg, 0), causal=False, block=block)
    o1, l1 = merge(_half(out, 1), _half(lse, 1), o_x, l_x)
    return (jnp.concatenate([_half(out, 0), o1], axis=1),
            jnp.concatenate([_half(lse, 0), l1], axis=1))


def block_bwd(q, k, v, q_seg, k_seg, lse, dout, dlt, *, causal, block=None, halving=None):
    """(dq, dk, dv) fp32 of one block pair from the global lse and delta."""
    if not causal:
        return tiled_bwd(q, k, v, None, None, q_seg, k_seg, lse, dout, dlt, causal=False,
                         block=block)
    n = q.shape[1]
    if _diagonal_only(n, block, halving):
        pos = jnp.arange(n, dtype=jnp.int32)
        return tiled_bwd(q, k, v, pos, pos, q_seg, k_seg, lse, dout, dlt, causal=True,
                         block=block)
    dq, dk, dv = (_unfold(g) for g in block_bwd(
        _fold(q), _fold(k), _fold(v), _fold(q_seg), _fold(k_seg), _fold(lse), _fold(dout),
        _fold(dlt), causal=True, block=block, halving=halving))
    dq_x, dk_x, dv_x = tiled_bwd(
        _half(q, 1), _half(k, 0), _half(v, 0), None, None, _half(q_seg, 1), _half(k_seg, 0),
        _half(lse, 1), _half(dout, 1), _half(dlt, 1), causal=False, block=block)
    cat = functools.partial(jnp.concatenate, axis=1)
    return (cat([_half(dq, 0), _half(dq, 1) + dq_x]), cat([_half(dk, 0) + dk_x, _half(dk, 1)]),
            cat([_half(dv, 0) + dv_x, _half(dv, 1)]))


# ---------------------------------------------------------------------------------------
# Single-device flash attention with its own backward (the one-device baseline; the
# schedules use `kernels`, which wraps the same block functions as kernel="xla").


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _flash(q, k, v, pos_N, seg_BN, causal, block):
    if pos_N is None:
        return block_fwd(q, k, v, seg_BN, seg_BN, causal=causal, block=block)
    return tiled_fwd(q, k, v, pos_N, pos_N, seg_BN, seg_BN, causal=causal, block=block)


def _flash_fwd(q, k, v, pos_N, seg_BN, causal, block):
    out, lse = _flash(q, k, v, pos_N, seg_BN, causal, block)
    return (out, lse), (q, k, v, pos_N, seg_BN, out, lse)


def _flash_bwd(causal, block, res, cts):
    q, k, v, pos_N, seg_BN, out, lse = res
    dout, dlse = cts
    # d lse / d s = p, so an lse cotangent enters exactly like delta: ds = p ⊙ (dp − δ + dlse)
    dlt = delta(out, dout) - dlse
    if pos_N is None:
        dq, dk, dv = block_bwd(q, k, v, seg_BN, seg_BN, lse, dout, dlt, causal=causal,
                               block=block)
    else:
        dq, dk, dv = tiled_bwd(q, k, v, pos_N, pos_N, seg_BN, seg_BN, lse, dout, dlt,
                               causal=causal, block=block)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None, None


_flash.defvjp(_flash_fwd, _flash_bwd)


def flash_attention(q_BNHD, k_BNKD, v_BNKD, *, positions_N=None, segment_ids_BN=None,
                    causal: bool = False, block: int | None = None):
    """Memory-bounded attention on one device, with its own flash backward (pure JAX).
    Key tiles are gcd(N, block) long, query tiles gcd(N, factor·block) (`tile_sizes`). Natural
    token order by default; `positions_N` gives each token's position, so any order works
    (causal tiles are then masked, and skipped only where a whole tile is invisible).
    Returns (out fp32, lse fp32); both are differentiable.
    """
    return _flash(q_BNHD, k_BNKD, v_BNKD, positions_N, segment_ids_BN, causal, block)
