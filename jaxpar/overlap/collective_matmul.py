"""Collective matmuls: a tensor-parallel collective split into ring steps (T3-style overlap).

A collective next to a matmul leaves the device idle while the bytes travel. Split the
collective into P−1 `ppermute` hops and the matmul into P row blocks, and each hop can run
beside the matmul of a block it does not feed: the transfer hides behind compute.

Call these inside `shard_map` over `axis_name` (P devices, device r):

  all_gather_matmul(x[..., L, E], w[E, F])     = all_gather(x, rows) @ w    -> [..., P·L, F]
  matmul_reduce_scatter(x[..., N, E], w[E, F]) = psum_scatter(x @ w, rows)  -> [..., N/P, F]
  matmul_all_reduce(x[..., N, E], w[E, F])     = psum(x @ w)                -> [..., N, F]

"rows" is axis −2 of x (the token axis in Megatron sequence parallelism). `direction="uni"`
sends whole blocks r→r+1; `"bidi"` sends the top half of each block r→r+1 and the bottom
half r→r−1, so both directions of every link carry half the bytes. Bytes sent per device
equal the plain collective's exactly (checked from HLO in the tests).

The loops are unrolled in Python: the permutation is the same every step, but unrolled
code keeps every hop visible in HLO (byte counting, hlo_report) and lets XLA's scheduler
pair each hop with its matmul.

Each function is a `jax.custom_vjp` whose residuals are only the local inputs (never a
gathered array) and whose backward is again a collective matmul:
  all_gather_matmul:     dx = matmul_reduce_scatter(dy, wᵀ); dw = Σ_j x_jᵀ dy_j with x
                         re-gathered hop by hop (the price of not saving all_gather(x)).
  matmul_reduce_scatter: dy is gathered hop by hop; each arriving block gives its rows of
                         dx = dy wᵀ and its term of dw = xᵀ dy.
  matmul_all_reduce:     the output is typed device-varying (ppermute results are), so it
                         is exactly `pcast(psum(x @ w), to='varying')`; its backward
                         all-reduces dy (reduce-scatter ring, then a gather ring that feeds
                         the dx, dw matmuls).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from jaxpar._spmd import axis_size, divisors, shift, vary_over, varying_axes, varying_like

DIRECTIONS = ("uni", "bidi")


# ----------------------------------------------------------------------------- helpers
# Inside shard_map a value's type says which axes it differs across. An invariant input
# (e.g. a replicated w) is made varying (`vary_over`) *outside* the custom_vjp, so that
# autodiff of the pcast adds the psum its gradient needs; buffers filled from ppermute
# results must be varying from the start (`_zeros`).

def _rows(x, start, size: int):
    return lax.dynamic_slice_in_dim(x, start, size, axis=x.ndim - 2)


def _put_rows(buf, piece, start):
    return lax.dynamic_update_slice_in_dim(buf, piece.astype(buf.dtype), start, axis=buf.ndim - 2)


def _contract_rows(a, b):
    """aᵀ b over every axis but the last: [..., n, E] × [..., n, F] -> [E, F] in fp32."""
    axes = tuple(range(a.ndim - 1))
    return lax.dot_general(a, b, ((axes, axes), ((), ())), preferred_element_type=jnp.float32)


def _streams(rows: int, direction: str):
    """(hop direction, first row, rows) of the pieces a block is cut into for the ring."""
    if direction == "uni":
        return [(+1, 0, rows)]
    half = rows // 2
    return [(+1, 0, half), (-1, half, rows - half)]


# ------------------------------------------------------------------------- ring kernels

def _gather_ring(x, axis_name, direction, consume):
    """Pass this device's row block of x around the ring.

    consume(piece, row0) is called for every device's block (own first), row0 being the
    piece's first row in the gathered array. The hop that forwards a piece is issued
    before the piece is consumed: the two do not depend on each other, so they can overlap.
    """
    p, r = axis_size(axis_name), lax.axis_index(axis_name)
    block = x.shape[-2]
    pieces = [(by, off, x[..., off:off + n, :]) for by, off, n in _streams(block, direction)]
    for s in range(p):
        nxt = [(by, off, shift(piece, axis_name, by)) for by, off, piece in pieces] \
            if s < p - 1 else []
        for by, off, piece in pieces:
            src = (r - by * s) % p  # after s hops of `by`, we hold device (r − by·s)'s piece
            consume(piece, src * block + off)
        pieces = nxt


def _scatter_ring(contribution, n_rows: int, axis_name, direction):
    """Reduce-scatter over rows: device r ends with Σ_devices contribution(rows of block r).

    contribution(row0, n) is this device's partial for rows [row0, row0+n), e.g. x[rows] @ w.
    The accumulator for block j starts on device j+by (by = the hop direction), and at every
    hop picks up the partial of the device it lands on; after P−1 hops it is home. Each hop
    runs beside the matmul of the partial added at the next step, which does not need it.
    """
    p, r = axis_size(axis_name), lax.axis_index(axis_name)
    block = n_rows // p
    accs = [None] * len(_streams(block, direction))
    for s in range(p):
        for i, (by, off, n) in enumerate(_streams(block, direction)):
            j = (r - by * (s + 1)) % p  # the block this device's accumulator is for at step s
            part = contribution(j * block + off, n)
            accs[i] = part if accs[i] is None else shift(accs[i], axis_name, by) + part
    return accs[0] if len(accs) == 1 else jnp.concatenate(accs, axis=-2)


def _zeros(shape, dtype, *refs):
    return varying_like(jnp.zeros(shape, dtype), *refs)


# ---------------------------------------------------------------------------- checking

def _check(fn: str, x, w, axis_name, direction, *, row_blocks: bool, min_cols: int = 1):
    if direction not in DIRECTIONS:
        raise ValueError(f"{fn}: direction={direction!r}; valid choices are {DIRECTIONS}")
    if x.ndim < 2 or w.ndim != 2:
        raise ValueError(f"{fn}: need x[..., rows, in] and w[in, out]; got x{list(x.shape)} "
                         f"and w{list(w.shape)}")
    if x.shape[-1] != w.shape[0]:
        raise ValueError(f"{fn}: contraction mismatch, x{list(x.shape)} last axis "
                         f"{x.shape[-1]} != w{list(w.shape)} first axis {w.shape[0]}")
    p = axis_size(axis_name)
    rows = x.shape[-2]
    if row_blocks and rows % p:
        raise ValueError(
            f"{fn}: x rows={rows} (axis -2 of x{list(x.shape)}) not divisible by the size {p} "
            f"of axis {axis_name!r}; use rows in multiples of {p}, or an axis size in "
            f"{divisors(rows)}")
    block = rows // p if row_blocks else rows
    if direction == "bidi" and block < 2:
        raise ValueError(f"{fn}: direction='bidi' cuts each block of {block} row(s) in two "
                         f"halves and needs at least 2 rows per block; use direction='uni' "
                         f"or more rows")
    if w.shape[1] < min_cols:
        raise ValueError(f"{fn}: w{list(w.shape)} needs at least {min_cols} output columns "
                         f"(they are cut into {min_cols} chunks to pipeline the all-gather)")


# --------------------------------------------------------------------- all_gather_matmul

def all_gather_matmul(x, w, *, axis_name, direction: str = "uni"):
    """all_gather(x, rows) @ w, the gather split into ring hops beside row-block matmuls.

    x[..., L, E] is this device's row block, w[E, F] (typically a column shard of a
    weight). Returns [..., P·L, F]. Call inside shard_map over `axis_name`.
    """
    _check("all_gather_matmul", x, w, axis_name, direction, row_blocks=False)
    x, w = _vary_together(x, w, axis_name)
    return _agmm(x, w, axis_name, direction)


def _vary_together(x, w, axis_name):
    """x and w varying over `axis_name` and over every axis either already varies over
    (e.g. w replicated over data/seq axes that shard x's batch and tokens): done outside
    the custom_vjp, so autodiff of these pcasts adds the psums that w's gradient needs."""
    axes = {axis_name} | varying_axes(x) | varying_axes(w)
    return vary_over(x, axes), vary_over(w, axes)


def _local_shard_vjp(forward, backward):
    """f(x, w, axis_name, direction) as a custom_vjp whose residuals are only the local
    shards (x, w); `backward(axis_name, direction, (x, w), dy)` is itself a collective matmul."""

    @functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
    def fn(x, w, axis_name, direction):
        return forward(x, w, axis_name, direction)

    fn.defvjp(lambda x, w, axis_name, direction: (forward(x, w, axis_name, direction), (x, w)),
              backward)
    return fn


def _agmm_forward(x, w, axis_name, direction):
    p = axis_size(axis_name)
    out_dtype = jnp.result_type(x.dtype, w.dtype)
    out = _zeros((*x.shape[:-2], p * x.shape[-2], w.shape[1]), out_dtype, x, w)

    def consume(piece, row0):
        nonlocal out
        out = _put_rows(out, piece @ w, row0)

    _gather_ring(x, axis_name, direction, consume)
    return out


def _agmm_bwd(axis_name, direction, res, dy):
    x, w = res
    # dx: the transpose of all_gather is reduce-scatter, fused with its matmul dy @ wᵀ.
    dx = _scatter_ring(lambda row0, n: _rows(dy, row0, n) @ w.T, dy.shape[-2],
                       axis_name, direction)
    # dw = gathered(x)ᵀ dy, with x re-gathered hop by hop beside the per-block matmuls.
    dw = None

    def consume(piece, row0):
        nonlocal dw
        term = _contract_rows(piece, _rows(dy, row0, piece.shape[-2]))
        dw = term if dw is None else dw + term

    _gather_ring(x, axis_name, direction, consume)
    return dx.astype(x.dtype), dw.astype(w.dtype)


_agmm = _local_shard_vjp(_agmm_forward, _agmm_bwd)


# ----------------------------------------------------------------- matmul_reduce_scatter

def matmul_reduce_scatter(x, w, *, axis_name, direction: str = "uni"):
    """psum_scatter(x @ w, rows): each device's partial row blocks are summed hop by hop.

    x[..., N, E] holds all rows and this device's slice of the contraction (E is a shard),
    w[E, F] the matching row shard of a weight. Returns the summed block [..., N/P, F] of
    rows r·N/P .. (r+1)·N/P. Call inside shard_map over `axis_name`.
    """
    _check("matmul_reduce_scatter", x, w, axis_name, direction, row_blocks=True)
    x, w = _vary_together(x, w, axis_name)
    return _mmrs(x, w, axis_name, direction)


def _mmrs_forward(x, w, axis_name, direction):
    return _scatter_ring(lambda row0, n: _rows(x, row0, n) @ w, x.shape[-2], axis_name,
                         direction)


def _mmrs_bwd(axis_name, direction, res, dy):
    x, w = res
    # The transpose of reduce-scatter is all-gather: gather dy once, hop by hop, and let each
    # arriving block produce its rows of dx and its term of dw (same bytes as the plain path).
    dx = _zeros(x.shape, jnp.result_type(dy.dtype, w.dtype), x, dy)
    dw = None

    def consume(piece, row0):
        nonlocal dx, dw
        dx = _put_rows(dx, piece @ w.T, row0)
        term = _contract_rows(_rows(x, row0, piece.shape[-2]), piece)
        dw = term if dw is None else dw + term

    _gather_ring(dy, axis_name, direction, consume)
    return dx.astype(x.dtype), dw.astype(w.dtype)


_mmrs = _local_shard_vjp(_mmrs_forward, _mmrs_bwd)


# --------------------------------------------------------------------- matmul_all_reduce

def matmul_all_reduce(x, w, *, axis_name, direction: str = "uni"):
    """psum(x @ w) as a reduce-scatter ring then an all-gather ring.

    The output columns are cut in two halves that are pipelined: the all-gather hops of one
    half have the other half's matmuls to run beside (a plain all-gather after the last
    matmul would have none). Same bytes as psum. The result holds the same value on every
    device but is typed device-varying: it equals `pcast(psum(x @ w), to='varying')`,
    value and gradient (the backward all-reduces dy, as that pcast's transpose does).
    For Megatron-style layers prefer reduce-scatter + all-gather around the next block.
    """
    _check("matmul_all_reduce", x, w, axis_name, direction, row_blocks=True, min_cols=2)
    x, w = _vary_together(x, w, axis_name)
    return _mmar(x, w, axis_name, direction)


def _column_halves(f: int):
    return [(0, f // 2), (f // 2, f - f // 2)]


def _ring_all_gather(y, axis_name, direction):
    p = axis_size(axis_name)
    out = _zeros((*y.shape[:-2], p * y.shape[-2], y.shape[-1]), y.dtype, y)

    def consume(piece, row0):
        nonlocal out
        out = _put_rows(out, piece, row0)

    _gather_ring(y, axis_name, direction, consume)
    return out


def _mmar_forward(x, w, axis_name, direction):
    outs = []
    for c0, nc in _column_halves(w.shape[1]):
        w_c = w[:, c0:c0 + nc]
        y_c = _scatter_ring(lambda row0, n: _rows(x, row0, n) @ w_c, x.shape[-2], axis_name,
                            direction)
        outs.append(_ring_all_gather(y_c, axis_name, direction))
    return jnp.concatenate(outs, axis=-1)


def _mmar_bwd(axis_name, direction, res, dy):
    x, w = res
    dx, dws = None, []
    for c0, nc in _column_halves(w.shape[1]):
        dy_c = dy[..., c0:c0 + nc]
        w_c = w[:, c0:c0 + nc]
        # dz_c = psum(dy_c): reduce-scatter ring (adds only), then a gather ring whose
        # arriving blocks feed the dx and dw matmuls; the other half's matmuls can run
        # beside this half's reduce-scatter hops.
        red_c = _scatter_ring(lambda row0, n: _rows(dy_c, row0, n), dy.shape[-2], axis_name,
                              direction)
        dx_c = _zeros(x.shape, jnp.result_type(dy.dtype, w.dtype), x, dy)
        dw_c = None

        def consume(piece, row0):
            nonlocal dx_c, dw_c
            dx_c = _put_rows(dx_c, piece @ w_c.T, row0)
            term = _contract_rows(_rows(x, row0, piece.shape[-2]), piece)
            dw_c = term if dw_c is None else dw_c + term

        _gather_ring(red_c, axis_name, direction, consume)
        dx = dx_c if dx is None else dx + dx_c
        dws.append(dw_c)
    return dx.astype(x.dtype), jnp.concatenate(dws, axis=-1).astype(w.dtype)


_mmar = _local_shard_vjp(_mmar_forward, _mmar_bwd)


# --------------------------------------------------------------------- plain references

def plain_all_gather_matmul(x, w, *, axis_name, direction: str = "uni"):
    """all_gather + matmul, one collective then one matmul (no overlap possible)."""
    del direction
    return lax.all_gather(x, axis_name, axis=x.ndim - 2, tiled=True) @ w


def plain_matmul_reduce_scatter(x, w, *, axis_name, direction: str = "uni"):
    del direction
    return lax.psum_scatter(x @ w, axis_name, scatter_dimension=x.ndim - 2, tiled=True)


def plain_matmul_all_reduce(x, w, *, axis_name, direction: str = "uni"):
    """The exact reference of matmul_all_reduce, type included (see its docstring)."""
    del direction
    return lax.pcast(lax.psum(x @ w, axis_name), (axis_name,), to="varying")
