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

Shapes: q[B,Lq,H,D], k,v[B,Lk,K,D] with H = K·G (GQA), mask[B,Lq,Lk] (True = attend),
out[B,Lq,H,D] fp32, lse[B,Lq,H] fp32.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from jaxpar._spmd import varying_like
from jaxpar.attention.layout import shard_positions

NEG_INF = -jnp.inf


def make_mask(q_pos_L, k_pos_M, q_seg_BL=None, k_seg_BM=None, *, causal: bool):
    """bool[B or 1, L, M]: query i may attend key j (same segment; j ≤ i when causal)."""
    mask = jnp.ones((1, q_pos_L.shape[-1], k_pos_M.shape[-1]), bool)
    if causal:
        mask = mask & (q_pos_L[..., :, None] >= k_pos_M[..., None, :])
    if q_seg_BL is not None:
        mask = mask & (q_seg_BL[:, :, None] == k_seg_BM[:, None, :])
    return mask


def _grouped(q_BLHD, num_kv_heads):
    b, l, h, d = q_BLHD.shape
    if h % num_kv_heads:
        raise ValueError(f"query heads={h} must be a multiple of kv heads={num_kv_heads}")
    return q_BLHD.reshape(b, l, num_kv_heads, h // num_kv_heads, d)


def _scores(q_BLHD, k_BMKD, mask_BLM):
    """scale·q·kᵀ in fp32, masked to −inf: [B, K, G, L, M]."""
    q_BLKGD = _grouped(q_BLHD, k_BMKD.shape[2])
    scale = q_BLHD.shape[-1] ** -0.5
    s_BKGLM = jnp.einsum("blkgd,bmkd->bkglm", q_BLKGD, k_BMKD,
                         preferred_element_type=jnp.float32) * scale
    return jnp.where(mask_BLM[:, None, None], s_BKGLM, NEG_INF)


def attend(q_BLHD, k_BMKD, v_BMKD, mask_BLM):
    """Partial attention of a query block over one key block: (out fp32, lse fp32)."""
    b, l, h, d = q_BLHD.shape
    s_BKGLM = _scores(q_BLHD, k_BMKD, mask_BLM)
    m_BKGL = jnp.max(s_BKGLM, axis=-1)
    m_BKGL = jnp.where(jnp.isfinite(m_BKGL), m_BKGL, 0.0)  # fully-masked rows
    p_BKGLM = jnp.exp(s_BKGLM - m_BKGL[..., None])
    denom_BKGL = jnp.sum(p_BKGLM, axis=-1)
    o_BLKGD = jnp.einsum("bkglm,bmkd->blkgd", p_BKGLM.astype(v_BMKD.dtype), v_BMKD,
                         preferred_element_type=jnp.float32)
    safe_BKGL = jnp.where(denom_BKGL > 0, denom_BKGL, 1.0)
    o_BLKGD = o_BLKGD / jnp.moveaxis(safe_BKGL, -1, 1)[..., None]
    lse_BKGL = jnp.where(denom_BKGL > 0, m_BKGL + jnp.log(safe_BKGL), NEG_INF)
    lse_BLH = jnp.moveaxis(lse_BKGL, -1, 1).reshape(b, l, h)
    return o_BLKGD.reshape(b, l, h, d), lse_BLH


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
    dq = scale · ds k,  dk = scale · dsᵀ q.
    """
    b, l, h, d = q_BLHD.shape
    kh = k_BMKD.shape[2]
    g = h // kh
    scale = d ** -0.5
    s_BKGLM = _scores(q_BLHD, k_BMKD, mask_BLM)
    lse_BKGL = jnp.moveaxis(lse_BLH.reshape(b, l, kh, g), 1, -1)
    lse_BKGL = jnp.where(jnp.isfinite(lse_BKGL), lse_BKGL, 0.0)
    p_BKGLM = jnp.exp(s_BKGLM - lse_BKGL[..., None])  # masked entries: exp(−inf) = 0
    do_BLKGD = dout_BLHD.astype(jnp.float32).reshape(b, l, kh, g, d)
    dv_BMKD = jnp.einsum("bkglm,blkgd->bmkd", p_BKGLM, do_BLKGD)
    dp_BKGLM = jnp.einsum("blkgd,bmkd->bkglm", do_BLKGD, v_BMKD.astype(jnp.float32))
    delta_BKGL = jnp.moveaxis(delta_BLH.reshape(b, l, kh, g), 1, -1)
    ds_BKGLM = p_BKGLM * (dp_BKGLM - delta_BKGL[..., None]) * scale
    dq_BLKGD = jnp.einsum("bkglm,bmkd->blkgd", ds_BKGLM, k_BMKD.astype(jnp.float32))
    dk_BMKD = jnp.einsum("bkglm,blkgd->bmkd", ds_BKGLM,
                         _grouped(q_BLHD, kh).astype(jnp.float32))
    return dq_BLKGD.reshape(b, l, h, d), dk_BMKD, dv_BMKD


def delta(out_BLHD, dout_BLHD):
    return jnp.sum(out_BLHD.astype(jnp.float32) * dout_BLHD.astype(jnp.float32), axis=-1)


# ---------------------------------------------------------------------------------------
# Tiled attention: the same tile primitives looped over [block × block] tiles, so no more
# than one score tile per head is live, and causally empty tiles are skipped with
# `lax.cond`. The ring schedules run it on each shard pair; Ulysses and the single-device
# baseline (`flash_attention`) run it on the whole sequence.


DEFAULT_TILE = 512  # tile length of the tiled kernels; read at trace time


def _tile_counts(lq, lk, block):
    block = block or DEFAULT_TILE
    return lq // math.gcd(lq, block), lk // math.gcd(lk, block)


def _tiles(x, n):
    """[B, N, ...] -> [n, B, N/n, ...] (None stays None)."""
    if x is None:
        return None
    b, length = x.shape[:2]
    return jnp.moveaxis(x.reshape(b, n, length // n, *x.shape[2:]), 1, 0)


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
    """(out, lse) of queries q[B,Lq,H,D] at positions q_pos over keys k, v[B,Lk,K,D]."""
    nq, nk = _tile_counts(q.shape[1], k.shape[1], block)
    if nq == nk == 1:
        return attend(q, k, v, make_mask(q_pos, k_pos, q_seg, k_seg, causal=causal))
    kv_tiles = (_tiles(k, nk), _tiles(v, nk), k_pos.reshape(nk, -1), _tiles(k_seg, nk))

    def one_query_tile(qa):
        q_t, qpos_t, qseg_t = qa

        def step(carry, kv):
            k_t, v_t, kpos_t, kseg_t = kv
            mask = make_mask(qpos_t, kpos_t, qseg_t, kseg_t, causal=causal)
            work = lambda c: merge(*c, *attend(q_t, k_t, v_t, mask))  # noqa: E731
            return _maybe_skip(causal, qpos_t, kpos_t, work, lambda c: c, carry), None

        partial, _ = jax.lax.scan(step, empty_partial(q_t, k, v), kv_tiles)
        return partial

    out, lse = jax.lax.map(one_query_tile,
                           (_tiles(q, nq), q_pos.reshape(nq, -1), _tiles(q_seg, nq)))
    return _untiles(out), _untiles(lse)


def tiled_bwd(q, k, v, q_pos, k_pos, q_seg, k_seg, lse, dout, dlt, *, causal, block=None):
    """(dq, dk, dv) in fp32 given the final lse and delta = Σ dout·out of these queries."""
    nq, nk = _tile_counts(q.shape[1], k.shape[1], block)
    if nq == nk == 1:
        mask = make_mask(q_pos, k_pos, q_seg, k_seg, causal=causal)
        return attend_bwd(q, k, v, mask, lse, dout, dlt)
    bq = q.shape[1] // nq
    q_tiles = (jnp.arange(nq), _tiles(q, nq), q_pos.reshape(nq, -1), _tiles(q_seg, nq),
               _tiles(lse, nq), _tiles(dout, nq), _tiles(dlt, nq))

    def one_key_tile(dq, ka):
        # dK/dV of this key tile accumulate over query tiles; dQ accumulates in place in the
        # carried full-size buffer (FlashAttention-2 order), so no per-tile dQ copies live.
        k_t, v_t, kpos_t, kseg_t = ka

        def step(carry, qa):
            i, q_t, qpos_t, qseg_t, lse_t, do_t, dl_t = qa
            mask = make_mask(qpos_t, kpos_t, qseg_t, kseg_t, causal=causal)

            def work(c):
                dq, dk_acc, dv_acc = c
                dq_t, dk_t, dv_t = attend_bwd(q_t, k_t, v_t, mask, lse_t, do_t, dl_t)
                dq = jax.lax.dynamic_update_slice_in_dim(
                    dq, jax.lax.dynamic_slice_in_dim(dq, i * bq, bq, axis=1) + dq_t, i * bq, axis=1)
                return dq, dk_acc + dk_t, dv_acc + dv_t

            return _maybe_skip(causal, qpos_t, kpos_t, work, lambda c: c, carry), None

        zeros = zeros_like_f32(k_t, q, dout)
        (dq, dk_t, dv_t), _ = jax.lax.scan(step, (dq, zeros, zeros), q_tiles)
        return dq, (dk_t, dv_t)

    dq, (dk, dv) = jax.lax.scan(
        one_key_tile, zeros_like_f32(q, k, v, dout),
        (_tiles(k, nk), _tiles(v, nk), k_pos.reshape(nk, -1), _tiles(k_seg, nk)))
    return dq, _untiles(dk), _untiles(dv)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _flash(q, k, v, pos_N, seg_BN, causal, block):
    return tiled_fwd(q, k, v, pos_N, pos_N, seg_BN, seg_BN, causal=causal, block=block)


def _flash_fwd(q, k, v, pos_N, seg_BN, causal, block):
    out, lse = _flash(q, k, v, pos_N, seg_BN, causal, block)
    return (out, lse), (q, k, v, pos_N, seg_BN, out, lse)


def _flash_bwd(causal, block, res, cts):
    q, k, v, pos_N, seg_BN, out, lse = res
    dout, _ = cts  # the lse output is a by-product; callers only differentiate `out`
    dq, dk, dv = tiled_bwd(q, k, v, pos_N, pos_N, seg_BN, seg_BN, lse, dout, delta(out, dout),
                           causal=causal, block=block)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None, None


_flash.defvjp(_flash_fwd, _flash_bwd)


def flash_attention(q_BNHD, k_BNKD, v_BNKD, *, positions_N=None, segment_ids_BN=None,
                    causal: bool = False, block: int | None = None):
    """Memory-bounded attention on one device, with its own flash backward. Tiles are
    gcd(N, block) long; `positions_N` (default arange) gives each token's position, so any
    token order works (Ulysses passes the zigzag order). Returns (out fp32, lse fp32).
    """
    n = q_BNHD.shape[1]
    if positions_N is None:
        positions_N = jnp.arange(n, dtype=jnp.int32)
    return _flash(q_BNHD, k_BNKD, v_BNKD, positions_N, segment_ids_BN, causal, block)


# ---------------------------------------------------------------------------------------
# Shard pairs: the unit of work of ring and TokenRing — the query shard of device q_idx
# against the key/value shard of device kv_idx. Non-causal: one full tile. Causal (zigzag
# layout, shard = [chunk i ; chunk 2P−1−i]): for kv_idx < q_idx only the first kv chunk is
# visible, to all queries; for kv_idx > q_idx only the second query chunk sees anything,
# and it sees all keys. Either way half the tile — the masked half is never computed.
# The diagonal pair (same shard) is a full tile under the causal mask.


def _pair_inputs(q_idx, kv_idx, local_len, num_shards, causal):
    q_pos = shard_positions(q_idx, local_len, num_shards, zigzag=causal)
    k_pos = shard_positions(kv_idx, local_len, num_shards, zigzag=causal)
    return q_pos, k_pos


def _halves(x, axis=1):
    h = x.shape[axis] // 2
    return jax.lax.slice_in_dim(x, 0, h, axis=axis), jax.lax.slice_in_dim(x, h, 2 * h, axis=axis)


def _seg_half(seg, which):
    return None if seg is None else _halves(seg)[which]


def pair_fwd(q, k, v, q_seg, k_seg, q_idx, kv_idx, *, num_shards, causal, diagonal):
    """Partial (out, lse) of query shard q_idx over key shard kv_idx. `diagonal` is static."""
    q_pos, k_pos = _pair_inputs(q_idx, kv_idx, q.shape[1], num_shards, causal)
    if not causal or diagonal:
        return tiled_fwd(q, k, v, q_pos, k_pos, q_seg, k_seg, causal=causal)

    def kv_first_half(_):  # kv_idx < q_idx: all queries × first kv chunk, nothing masked
        k0, v0, kp0 = _halves(k)[0], _halves(v)[0], _halves(k_pos, 0)[0]
        return tiled_fwd(q, k0, v0, q_pos, kp0, q_seg, _seg_half(k_seg, 0), causal=False)

    def q_second_half(_):  # kv_idx > q_idx: second query chunk × all keys
        q1, qp1 = _halves(q)[1], _halves(q_pos, 0)[1]
        o1, l1 = tiled_fwd(q1, k, v, qp1, k_pos, _seg_half(q_seg, 1), k_seg, causal=False)
        o0, l0 = empty_partial(_halves(q)[0], o1)
        return jnp.concatenate([o0, o1], 1), jnp.concatenate([l0, l1], 1)

    return jax.lax.cond(kv_idx < q_idx, kv_first_half, q_second_half, None)


def pair_bwd(q, k, v, q_seg, k_seg, q_idx, kv_idx, lse, dout, dlt, *, num_shards, causal,
             diagonal):
    """(dq, dk, dv) in fp32 of one shard pair — the same halves as `pair_fwd`."""
    q_pos, k_pos = _pair_inputs(q_idx, kv_idx, q.shape[1], num_shards, causal)
    if not causal or diagonal:
        return tiled_bwd(q, k, v, q_pos, k_pos, q_seg, k_seg, lse, dout, dlt, causal=causal)

    def kv_first_half(_):
        k0, v0 = _halves(k)[0], _halves(v)[0]
        dq, dk0, dv0 = tiled_bwd(q, k0, v0, q_pos, _halves(k_pos, 0)[0], q_seg,
                                 _seg_half(k_seg, 0), lse, dout, dlt, causal=False)
        zeros = zeros_like_f32(dk0)
        return dq, jnp.concatenate([dk0, zeros], 1), jnp.concatenate([dv0, zeros], 1)

    def q_second_half(_):
        q1, lse1, do1, dl1 = (_halves(x)[1] for x in (q, lse, dout, dlt))
        dq1, dk, dv = tiled_bwd(q1, k, v, _halves(q_pos, 0)[1], k_pos, _seg_half(q_seg, 1),
                                k_seg, lse1, do1, dl1, causal=False)
        return jnp.concatenate([zeros_like_f32(dq1), dq1], 1), dk, dv

    return jax.lax.cond(kv_idx < q_idx, kv_first_half, q_second_half, None)
