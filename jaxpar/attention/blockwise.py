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
    kv head i // (H/K)). Per-head tiles ran faster on XLA:CPU than the grouped [B, K, G, L, M]
    layout the kernel once had (the calibration's GQA term fell from 7 to 0.5 ns a score,
    docs/attention.md), and the copy is the size of q, once per call."""
    kv_heads = x_BMKD.shape[2]
    if heads % kv_heads:
        raise ValueError(f"query heads={heads} must be a multiple of kv heads={kv_heads}")
    return x_BMKD if kv_heads == heads else jnp.repeat(x_BMKD, heads // kv_heads, axis=2)


def _sum_groups(x_BHMD, kv_heads):
    """The adjoint of `_per_query_head` (head-major): a kv head's gradient sums over its
    query heads."""
    b, h, m, d = x_BHMD.shape
    return x_BHMD if h == kv_heads else x_BHMD.reshape(b, kv_heads, h // kv_heads, m, d).sum(2)


def _heads_first(x_BLHD):
    return jnp.swapaxes(x_BLHD, 1, 2)


_heads_last = _heads_first  # [B, H, L, ...] <-> [B, L, H, ...]


# Every tile below computes in the head-major layout [B, H, L, D]: the score tile of each
# head is then one contiguous [L, M] matrix, so the dots read and write their operands in
# place. In the token-major layout of the interface, XLA:CPU transposed every score tile
# (and every K/V tile) once more per step. Inputs are transposed once per call.


def _tile_scores(q_BHLD, k_BHMD, mask_BLM):
    """q·kᵀ in fp32 (unscaled), masked to −inf where mask is False (None: nothing masked).
    The caller scales inside the exp's fusion: as a separate op, the scale was one more
    pass over the score tile."""
    s_BHLM = jnp.einsum("bhld,bhmd->bhlm", q_BHLD, k_BHMD, preferred_element_type=jnp.float32)
    return s_BHLM if mask_BLM is None else jnp.where(mask_BLM[:, None], s_BHLM, NEG_INF)


def _running_start(q_BHLD, *refs):
    """Online softmax before any key: (Σ p·v = 0, running max = −inf, Σ p = 0)."""
    b, h, l, d = q_BHLD.shape
    acc = varying_like(jnp.zeros((b, h, l, d), jnp.float32), q_BHLD, *refs)
    m = varying_like(jnp.full((b, h, l), NEG_INF, jnp.float32), q_BHLD, *refs)
    return acc, m, jnp.zeros_like(m)


def _running_add(running, q_BHLD, k_BHMD, v_BHMD, mask_BLM, scale):
    """One key tile into the running (Σ p·v, max, Σ p) of online softmax: the earlier tiles'
    sums are rescaled by e^{max_old − max_new}; no per-tile (out, lse) partials to merge."""
    acc_BHLD, m_BHL, l_BHL = running
    s_BHLM = _tile_scores(q_BHLD, k_BHMD, mask_BLM)
    m_new = jnp.maximum(m_BHL, scale * jnp.max(s_BHLM, axis=-1))  # scale > 0 commutes
    m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)  # rows with no visible key yet
    p_BHLM = jnp.exp(s_BHLM * scale - m_safe[..., None])
    alpha_BHL = jnp.exp(m_BHL - m_safe)
    pv_BHLD = jnp.einsum("bhlm,bhmd->bhld", p_BHLM.astype(v_BHMD.dtype), v_BHMD,
                         preferred_element_type=jnp.float32)
    return (alpha_BHL[..., None] * acc_BHLD + pv_BHLD, m_new,
            alpha_BHL * l_BHL + jnp.sum(p_BHLM, axis=-1))


def _running_finish(running):
    """(out, lse) from the running sums; a row that saw no key: out 0, lse −inf."""
    acc_BHLD, m_BHL, l_BHL = running
    seen = l_BHL > 0
    out_BHLD = acc_BHLD / jnp.where(seen, l_BHL, 1.0)[..., None]
    return out_BHLD, jnp.where(seen, m_BHL + jnp.log(jnp.where(seen, l_BHL, 1.0)), NEG_INF)


def _tile_grads(q_BHLD, k_BHMD, kT_BHDM, v_BHMD, mask_BLM, lse_BHL, do_BHLD, dlt_BHL, scale):
    """(dqᵀ, dk, dv) of one tile pair, dq and dk *without* the factor `scale` (applied once
    per call). Every product is in the row-major form [A, C]·[C, B] or [A, C]·[B, C]
    (XLA:CPU ran a dot whose lhs contracts its rows ~1.7× slower): the tile is computed
    transposed, sᵀ[M, L], so dv = pᵀ·dout and dk = dsᵀ·q are plain, and dq is produced
    transposed, dqᵀ = kᵀ·dsᵀ, from kᵀ[D, M] transposed once per call."""
    sT_BHML = jnp.einsum("bhmd,bhld->bhml", k_BHMD, q_BHLD,
                         preferred_element_type=jnp.float32) * scale
    if mask_BLM is not None:
        sT_BHML = jnp.where(jnp.swapaxes(mask_BLM, 1, 2)[:, None], sT_BHML, NEG_INF)
    pT_BHML = jnp.exp(sT_BHML - lse_BHL[:, :, None])  # masked entries: exp(−inf) = 0
    dv_BHMD = jnp.einsum("bhml,bhld->bhmd", pT_BHML, do_BHLD)
    dpT_BHML = jnp.einsum("bhmd,bhld->bhml", v_BHMD, do_BHLD)
    dsT_BHML = pT_BHML * (dpT_BHML - dlt_BHL[:, :, None])
    dk_BHMD = jnp.einsum("bhml,bhld->bhmd", dsT_BHML, q_BHLD.astype(jnp.float32))
    dqT_BHDL = jnp.einsum("bhdm,bhml->bhdl", kT_BHDM, dsT_BHML)
    return dqT_BHDL, dk_BHMD, dv_BHMD


def attend(q_BLHD, k_BMKD, v_BMKD, mask_BLM):
    """Partial attention of a query block over one key block: (out fp32, lse fp32)."""
    h, d = q_BLHD.shape[2:]
    q_BHLD = _heads_first(q_BLHD)
    k_BHMD, v_BHMD = (_heads_first(_per_query_head(x, h)) for x in (k_BMKD, v_BMKD))
    running = _running_add(_running_start(q_BHLD, k_BHMD, v_BHMD), q_BHLD, k_BHMD, v_BHMD,
                           mask_BLM, d ** -0.5)
    out_BHLD, lse_BHL = _running_finish(running)
    return _heads_last(out_BHLD), _heads_last(lse_BHL)


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


def _grad_operands(k_BMKD, v_BMKD, lse_BLH, dout_BLHD, delta_BLH, heads):
    """Head-major backward operands: per-query-head K (its dtype) and V, dout in fp32, and
    lse with −inf (rows that saw no key) made finite (their p is 0 either way)."""
    k_BHMD = _heads_first(_per_query_head(k_BMKD, heads))
    v_BHMD = _heads_first(_per_query_head(v_BMKD, heads)).astype(jnp.float32)
    lse_BHL = _heads_first(lse_BLH)
    lse_BHL = jnp.where(jnp.isfinite(lse_BHL), lse_BHL, 0.0)
    return (k_BHMD, v_BHMD, lse_BHL, _heads_first(dout_BLHD).astype(jnp.float32),
            _heads_first(delta_BLH))


def _kT(k_BHMD):
    return jnp.swapaxes(k_BHMD, 2, 3).astype(jnp.float32)


def _grads_out(dqT_BHDL, dk_BHMD, dv_BHMD, kv_heads, scale):
    """Back to the interface: token-major, dq and dk scaled, dk/dv summed over GQA groups."""
    return (jnp.moveaxis(dqT_BHDL * scale, 3, 1),  # [B, H, D, L] -> [B, L, H, D]
            _heads_last(_sum_groups(dk_BHMD * scale, kv_heads)),
            _heads_last(_sum_groups(dv_BHMD, kv_heads)))


def attend_bwd(q_BLHD, k_BMKD, v_BMKD, mask_BLM, lse_BLH, dout_BLHD, delta_BLH):
    """Gradients of one block pair given the final lse and delta = Σ_d dout·out (fp32).

    p = exp(s − lse) is the block's slice of the *global* softmax, so per-block gradients
    simply add up over blocks:  dv = pᵀ dout,  ds = p ⊙ (dout vᵀ − delta),
    dq = scale · ds k,  dk = scale · dsᵀ q  (GQA: dk, dv summed over each kv head's group).
    """
    h, d = q_BLHD.shape[2:]
    k_BHMD, v_BHMD, lse_BHL, do_BHLD, dlt_BHL = _grad_operands(k_BMKD, v_BMKD, lse_BLH,
                                                               dout_BLHD, delta_BLH, h)
    grads = _tile_grads(_heads_first(q_BLHD), k_BHMD, _kT(k_BHMD), v_BHMD, mask_BLM, lse_BHL,
                        do_BHLD, dlt_BHL, d ** -0.5)
    return _grads_out(*grads, k_BMKD.shape[2], d ** -0.5)


def delta(out_BLHD, dout_BLHD):
    return jnp.sum(out_BLHD.astype(jnp.float32) * dout_BLHD.astype(jnp.float32), axis=-1)


# ---------------------------------------------------------------------------------------
# Tiled attention: the tile primitives above looped over [query tile × key tile] pairs so
# that no more than one score tile per head is live. Within a query tile every query is
# processed at once (one einsum), the key tiles are a `lax.scan`; query tiles (when there
# are several) run one after the other, also a `lax.scan`. Tile sizes are per backend:
# GPUs want big tiles (an H200 ran 1.77-2.62× faster with 2048 than with 512 tiles), a CPU
# wants cache-sized ones (256² picked from a sweep of 128..1024 here, docs/kernels.md).
# Under causal masking a tile is one of three kinds, by its positions: no query sees a key
# (skipped), every query sees every key (no mask built or applied), or mixed (masked).


DEFAULT_TILE: int | None = None  # key-tile length (None: per backend); read at trace time
Q_TILE_FACTOR: int | None = None  # query tile = factor × key tile (None: per backend)
BACKEND_TILES = {"cpu": (256, 1)}  # backend -> (key tile, query-tile factor)
OTHER_TILES = (1024, 4)  # GPU, TPU: 4096 × 1024 score tiles per head and step
# A call with few score rows per position (B·H ≤ 2, e.g. Ulysses' one head per device)
# keeps a larger tile in a core's cache: 512² ran Ulysses 11% faster than 256² at the
# peer configuration, ring (8 heads a call) 20% slower (docs/kernels_cpu_tiles.json).
FEW_HEADS_TILES = {"cpu": (2, 512)}  # backend -> (B·H at most, key tile)
# Causal blocks by halving (below) or by skipping invisible tiles (a branch per tile): on
# CPU skipping ran faster (docs/kernels_cpu_tiles.json) and compiles faster; elsewhere
# halving avoids a branch per tile.
CAUSAL_HALVING = {"cpu": False}  # backend -> bool (default True)


def tile_sizes(block=None, heads=None):
    """(query tile, key tile) upper bounds: `block` or DEFAULT_TILE or the backend's, for a
    call of `heads` = B·H score rows per position where given."""
    backend = jax.default_backend()
    key_tile, factor = BACKEND_TILES.get(backend, OTHER_TILES)
    few_heads = FEW_HEADS_TILES.get(backend)
    if few_heads and heads is not None and heads <= few_heads[0]:
        key_tile = few_heads[1]
    key_tile = block or DEFAULT_TILE or key_tile
    return (Q_TILE_FACTOR or factor) * key_tile, key_tile


def _tile_lens(q, k, block):
    q_tile, k_tile = tile_sizes(block, heads=q.shape[0] * q.shape[2])
    return math.gcd(q.shape[1], q_tile), math.gcd(k.shape[1], k_tile)


def _tiles(x, n, axis=1):
    """Cut `axis` into n tiles, stacked in front: [B, N, ...] -> [n, B, N/n, ...] for axis 1
    (None stays None)."""
    if x is None:
        return None
    shape = x.shape
    x = x.reshape(*shape[:axis], n, shape[axis] // n, *shape[axis + 1:])
    return jnp.moveaxis(x, axis, 0)


def _pos_tiles(pos, n):
    return None if pos is None else pos.reshape(n, -1)


def _untiles(x, axis=1):
    """The inverse of `_tiles(., n, axis)`."""
    x = jnp.moveaxis(x, 0, axis)
    return x.reshape(*x.shape[:axis], x.shape[axis] * x.shape[axis + 1], *x.shape[axis + 2:])


def _first(tiles):
    """The only tile of each stacked operand (a loop of one step, unrolled)."""
    return jax.tree.map(lambda x: x[0], tiles)


def _tile_has_work(q_pos_L, k_pos_M):
    # Only causality can empty a whole tile for sure; segments are data, never skipped.
    return jnp.max(q_pos_L) >= jnp.min(k_pos_M)


def _by_visibility(causal, q_pos, k_pos, q_seg, k_seg, work, skip):
    """work(mask) for the tile pair, mask None where nothing is masked, or skip() when
    causality hides every key from every query of the tile."""
    masked = lambda: work(make_mask(q_pos, k_pos, q_seg, k_seg, causal=causal))  # noqa: E731
    if not causal:
        return work(None) if q_seg is None else masked()
    has_work = _tile_has_work(q_pos, k_pos)
    if q_seg is not None:
        return jax.lax.cond(has_work, masked, skip)
    all_visible = jnp.min(q_pos) >= jnp.max(k_pos)  # implies has_work
    kind = has_work.astype(jnp.int32) + all_visible.astype(jnp.int32)
    return jax.lax.switch(kind, (skip, masked, lambda: work(None)))


def tiled_fwd(q, k, v, q_pos, k_pos, q_seg, k_seg, *, causal, block=None):
    """(out, lse) of queries q[B,Lq,H,D] at positions q_pos over keys k, v[B,Lk,K,D] at k_pos
    (positions are read only when causal; key tiles no query of a tile sees are skipped)."""
    h, d = q.shape[2:]
    tq, tk = _tile_lens(q, k, block)
    nq, nk = q.shape[1] // tq, k.shape[1] // tk
    q_BHLD = _heads_first(q)
    k_BHMD, v_BHMD = (_heads_first(_per_query_head(x, h)) for x in (k, v))
    kv_tiles = (_tiles(k_BHMD, nk, 2), _tiles(v_BHMD, nk, 2), _pos_tiles(k_pos, nk),
                _tiles(k_seg, nk))

    def one_query_tile(q_t, qpos_t, qseg_t):
        def step(running, kv):
            k_t, v_t, kpos_t, kseg_t = kv
            add = lambda mask: _running_add(running, q_t, k_t, v_t, mask, d ** -0.5)  # noqa: E731
            return _by_visibility(causal, qpos_t, kpos_t, qseg_t, kseg_t, add,
                                  lambda: running), None

        start = _running_start(q_t, k_BHMD, v_BHMD)
        if nk == 1:
            return _running_finish(step(start, _first(kv_tiles))[0])
        return _running_finish(jax.lax.scan(step, start, kv_tiles)[0])

    if nq == 1:
        out_BHLD, lse_BHL = one_query_tile(q_BHLD, q_pos, q_seg)
    else:
        out, lse = jax.lax.map(lambda a: one_query_tile(*a),
                               (_tiles(q_BHLD, nq, 2), _pos_tiles(q_pos, nq), _tiles(q_seg, nq)))
        out_BHLD, lse_BHL = _untiles(out, 2), _untiles(lse, 2)
    return _heads_last(out_BHLD), _heads_last(lse_BHL)


def tiled_bwd(q, k, v, q_pos, k_pos, q_seg, k_seg, lse, dout, dlt, *, causal, block=None):
    """(dq, dk, dv) in fp32 given the final lse and delta = Σ dout·out of these queries."""
    h, d = q.shape[2:]
    tq, tk = _tile_lens(q, k, block)
    nq, nk = q.shape[1] // tq, k.shape[1] // tk
    q_BHLD = _heads_first(q)
    k_BHMD, v_BHMD, lse_BHL, do_BHLD, dlt_BHL = _grad_operands(k, v, lse, dout, dlt, h)
    refs = (q, k, v, lse, dout, dlt)
    q_tiles = (jnp.arange(nq), _tiles(q_BHLD, nq, 2), _pos_tiles(q_pos, nq), _tiles(q_seg, nq),
               _tiles(lse_BHL, nq, 2), _tiles(do_BHLD, nq, 2), _tiles(dlt_BHL, nq, 2))

    def one_key_tile(dq, ka):
        # dK/dV of this key tile accumulate over query tiles; dQ accumulates in place in the
        # carried full-size buffer (FlashAttention-2 order), so no per-tile dQ copies live.
        # The branches return tile-sized gradients and the update happens outside them:
        # a dQ buffer passed through a conditional was copied whole at every step.
        k_t, kT_t, v_t, kpos_t, kseg_t = ka
        zeros_k = zeros_like_f32(k_t, *refs)

        def step(carry, qa):
            dq, dk_acc, dv_acc = carry
            i, q_t, qpos_t, qseg_t, lse_t, do_t, dl_t = qa
            zeros_q = zeros_like_f32(jnp.swapaxes(q_t, 2, 3), *refs)
            dq_t, dk_t, dv_t = _by_visibility(
                causal, qpos_t, kpos_t, qseg_t, kseg_t,
                lambda mask: _tile_grads(q_t, k_t, kT_t, v_t, mask, lse_t, do_t, dl_t, d ** -0.5),
                lambda: (zeros_q, zeros_k, zeros_k))
            if nq > 1:
                dq_t = jax.lax.dynamic_slice_in_dim(dq, i * tq, tq, axis=3) + dq_t
                dq = jax.lax.dynamic_update_slice_in_dim(dq, dq_t, i * tq, axis=3)
            else:
                dq = dq + dq_t
            return (dq, dk_acc + dk_t, dv_acc + dv_t), None

        if nq == 1:
            carry = step((dq, zeros_k, zeros_k), _first(q_tiles))[0]
        else:
            carry = jax.lax.scan(step, (dq, zeros_k, zeros_k), q_tiles)[0]
        return carry[0], carry[1:]

    k_tiles = (_tiles(k_BHMD, nk, 2), _tiles(_kT(k_BHMD), nk, 3), _tiles(v_BHMD, nk, 2),
               _pos_tiles(k_pos, nk), _tiles(k_seg, nk))
    dq0 = zeros_like_f32(jnp.swapaxes(q_BHLD, 2, 3), *refs)
    if nk == 1:
        dq, (dk, dv) = one_key_tile(dq0, _first(k_tiles))
    else:
        dq, (dk, dv) = jax.lax.scan(one_key_tile, dq0, k_tiles)
        dk, dv = _untiles(dk, 2), _untiles(dv, 2)
    return _grads_out(dq, dk, dv, k.shape[2], d ** -0.5)


# ---------------------------------------------------------------------------------------
# The block-pair interface of `kernels` ("xla"): non-causal = every key, causal = query i
# sees key j ≤ i of an equally long block. Causal by halving: the two diagonal halves are
# one causal call on a batch twice as large ([B, 2h] -> [2B, h] is a free reshape), the
# lower-left quarter one full call; recursing down to one tile computes only the lower
# triangle (plus half of the diagonal tiles), every call vectorized, no per-tile branch.
# Or (CPU default) one tiled call that skips the invisible tiles (`_by_visibility`).


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
