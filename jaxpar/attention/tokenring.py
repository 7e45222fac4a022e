"""TokenRing: queries travel, partial outputs come straight back — both link directions busy.

At step s device r holds the query shard of device o = (r + s) mod P (each step q moves
r → r − 1), computes the partial (out, lse) of those queries against its *own* K/V, and
sends the partial directly to the owner o (a shift by +s) while it computes the next step;
the owner merges all P partials. Queries use one link direction, partials the other.

Bytes per device: q (P−1)·B·L·H·D, partials (P−1)·B·L·H·(D+1) in fp32. Against ring's
(P−1)·2·B·L·K·D this pays off when K ≈ H (MHA); with GQA (K ≪ H) ring moves less.
Causal (zigzag): a query block's first half (chunk o of owner o) sees the keys of devices
r < o only. Its partials travel home only from those devices (a `ppermute` over those
pairs), and the first-half query rows travel only to them: in the forward they are dropped
when the block wraps past device 0; in the backward, where the block meets devices after
its owner first, the owner sends them straight to device 0 at the wrap. Both are 3/4 of the
non-causal rows, for queries and partials alike (dQ, dout, lse and delta likewise).

Backward (custom_vjp) is the mirror image: (q, dout, lse, delta) travel r → r + 1; every
device accumulates dK/dV for its own K/V in place (they never move) and sends each partial
dQ straight back to the query's owner.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxpar.attention import blockwise, kernels
from jaxpar._spmd import axis_size, shift
from jaxpar.attention.common import check_local_shapes, ring_custom_vjp


def tokenring_attention(q_BLHD, k_BLKD, v_BLKD, *, axis_name, causal: bool = False,
                        segment_ids_BL=None, kernel="auto"):
    """Per-device TokenRing attention; call inside `shard_map` with the sequence on
    `axis_name` (zigzag layout when causal). Returns out[B,L,H,D]. `kernel`: the block-pair
    kernel (`kernels.KERNEL_NAMES` or a `kernels.BlockKernel`)."""
    check_local_shapes(q_BLHD, k_BLKD, v_BLKD, segment_ids_BL, axis_name, causal)
    return _tokenring(q_BLHD, k_BLKD, v_BLKD, segment_ids_BL, axis_name, causal,
                      kernels.resolve(kernel))


def send_home(part, s, axis_name, direction=+1, *, causal=False, fill=None):
    """Send a partial computed at step s (a static int) to its owner, s devices away in
    `direction`. Inside the step loop, where s is traced, `exchange` does it.

    causal (zigzag): the second-half rows travel from every device, the first-half rows only
    from the devices whose pair holds them (`_first_half_senders`); where none arrives the
    receiver gets `fill` (a tree like `part` of scalars; None: zeros)."""
    if not causal:
        return shift(part, axis_name, direction * s)
    return join_rows(_home_halves(split_rows(part, True), s, axis_name, direction, fill), True)


def move_queries(visiting, s, axis_name, direction, *, causal, own=None):
    """Move the visiting query blocks one device in `direction`, into step s (a static int;
    inside the step loop `exchange` does it). At step s device r holds the block of owner
    r − s·direction.

    causal: `visiting` is (first-half rows, second-half rows), trees alike. Second halves
    travel the whole ring; a first half travels only while it is live at the receiver (see
    the module docstring) — forward (−1): senders 1 .. P−s, until the wrap past device 0;
    backward (+1): senders 0 .. s−2, and device 0 receives its first half straight from the
    owner P − s (`own`: that device's own first-half rows). Where no first half arrives the
    rows hold zeros or stale rows: the kernels never read them (`kernels.pair_fwd`'s
    second-half branch)."""
    if not causal:
        return shift(visiting, axis_name, direction)
    first, second = visiting
    return (_pick_first(_first_halves((first, own), s, axis_name, direction), axis_name),
            shift(second, axis_name, direction))


def exchange(part, visiting, s, axis_name, direction, *, causal, fill=None, own=None):
    """One pipelined step's transfers, s traced (2 ≤ s ≤ P−1): the partial computed at step
    s − 1 goes home (`send_home`, s − 1 devices against `direction`) while the visiting
    queries move one device in `direction` into step s (`move_queries`). Returns (the
    partial arrived home, the queries of step s).

    What a step sends depends on s, so inside the loop it is a `lax.switch` over the static
    steps the loop visits, 2 .. P−1, each once (collective bytes then count exactly,
    `jaxpar.comm`); every device takes the same branch, so the collectives stay matched.
    Every permute whose pairs depend on s is in that one switch, with whole operands: the
    halves are cut before it and joined after."""
    p = axis_size(axis_name)

    def at_step(send, x):  # send(x, j) for the loop's static step j = s
        return jax.lax.switch(s - 2, [lambda y, j=j: send(y, j) for j in range(2, p)], x)

    if not causal:  # the queries' shift is the same every step: outside the switch
        home = at_step(lambda y, j: shift(y, axis_name, -direction * (j - 1)), part)
        return home, shift(visiting, axis_name, direction)
    first, second = visiting

    def branch(x, j):
        halves, first_own = x
        return (_home_halves(halves, j - 1, axis_name, -direction, fill),
                _first_halves(first_own, j, axis_name, direction))

    home, firsts = at_step(branch, (split_rows(part, True), (first, own)))
    return (join_rows(home, True),
            (_pick_first(firsts, axis_name), shift(second, axis_name, direction)))


def _home_halves(halves, j, axis_name, direction, fill):
    """send_home's permutes of a causal partial cut in halves, for a static shift j."""
    p = axis_size(axis_name)
    first, second = halves
    pairs = [(r, (r + direction * j) % p) for r in _first_half_senders(p, j, direction)]
    got = np.isin(np.arange(p), [t for _, t in pairs])
    received = jnp.asarray(got)[jax.lax.axis_index(axis_name)]
    fills = jax.tree.map(lambda _: 0.0, first) if fill is None else fill

    def first_half(y, value):
        y = jax.lax.ppermute(y, axis_name, pairs)
        return y if got.all() else jnp.where(received, y, jnp.asarray(value, y.dtype))

    return jax.tree.map(first_half, first, fills), shift(second, axis_name, direction * j)


def _first_halves(first_own, j, axis_name, direction):
    """move_queries' permutes of the live first halves into step j (static): (from the
    neighbour, from the owner — backward only, else None)."""
    p = axis_size(axis_name)
    first, own = first_own

    def permute(x, pairs):
        return jax.tree.map(lambda y: jax.lax.ppermute(y, axis_name, pairs), x) if pairs else x

    if direction < 0:
        return permute(first, [(r, r - 1) for r in range(1, p - j + 1)]), None
    return permute(first, [(r, r + 1) for r in range(j - 1)]), permute(own, [(p - j, 0)])


def _pick_first(firsts, axis_name):
    """The first halves a device holds after `_first_halves`: device 0 takes the owner's."""
    chain, direct = firsts
    if direct is None:
        return chain
    at_zero = jax.lax.axis_index(axis_name) == 0
    return jax.tree.map(lambda a, b: jnp.where(at_zero, a, b), direct, chain)


def split_rows(tree, halves):
    """A query block or partial as it travels: (first-half rows, second-half rows) if
    `halves`, else the tree itself."""
    if not halves:
        return tree
    return tuple(jax.tree.map(lambda y, w=w: _half(y, w), tree) for w in (0, 1))


def join_rows(travelling, halves):
    if not halves:
        return travelling
    return jax.tree.map(lambda a, b: jnp.concatenate([a, b], axis=1), *travelling)


def _first_half_senders(p, j, direction):
    """Devices whose partial for the owner j steps away holds first-half (first query chunk)
    rows: the forward (+1) pair of device r and owner r + j holds them when K/V r comes
    before the owner (r + j < P, no wrap); the backward (−1) pair of owner r − j when it
    wraps (r < j)."""
    return range(p - j) if direction > 0 else range(j)


def _half(x, which):
    h = x.shape[1] // 2
    return jax.lax.slice_in_dim(x, which * h, (which + 1) * h, axis=1)


def _tokenring_forward(q, k, v, seg, axis_name, causal, kernel):
    p = axis_size(axis_name)
    r = jax.lax.axis_index(axis_name)

    def partial_for(visiting, s):  # queries of owner (r + s) mod P against the local K/V
        vq, vseg = join_rows(visiting, causal)
        return kernels.pair_fwd(kernel, vq, k, v, vseg, seg, (r + s) % p, r,
                                causal=causal, diagonal=False)

    empty = (0.0, -jnp.inf)  # the merge identity, for rows no partial arrives for
    out, lse = kernels.pair_fwd(kernel, q, k, v, seg, seg, r, r, causal=causal, diagonal=True)
    if p == 1:
        return out, lse
    visiting = move_queries(split_rows((q, seg), causal), 1, axis_name, -1, causal=causal)
    part = partial_for(visiting, 1)

    # Software-pipelined: step s sends step s−1's partial home while it receives the next
    # queries and computes its own partial — three independent things at once.
    def step(carry, s):
        out, lse, visiting, part = carry
        home, visiting = exchange(part, visiting, s, axis_name, -1, causal=causal, fill=empty)
        part_next = partial_for(visiting, s)
        out, lse = blockwise.merge(out, lse, *home)
        return out, lse, visiting, part_next

    if p > 2:
        carry = (out, lse, visiting, part)
        out, lse, visiting, part = jax.lax.scan(lambda c, s: (step(c, s), None), carry,
                                                jnp.arange(2, p))[0]
    # flush the last
    return blockwise.merge(out, lse, *send_home(part, p - 1, axis_name, causal=causal,
                                                fill=empty))


def _tokenring_bwd(axis_name, causal, kernel, res, dout):
    q, k, v, seg, out, lse = res
    p = axis_size(axis_name)
    r = jax.lax.axis_index(axis_name)
    dlt = blockwise.delta(out, dout)

    # Mirror image of the forward (queries go to r + 1, dQ comes back by −s): the other link
    # directions, and transfers XLA cannot CSE with the forward's identical query hops
    # (which would keep every visiting query block alive until the backward).
    def grads_for(visiting, s):  # queries of owner (r − s) mod P against the local K/V
        vq, vseg, vlse, vdout, vdlt = join_rows(visiting, causal)
        return kernels.pair_bwd(kernel, vq, k, v, vseg, seg, (r - s) % p, r, vlse, vdout, vdlt,
                                causal=causal, diagonal=False)

    own = split_rows((q, seg, lse, dout, dlt), causal)
    own_first = own[0] if causal else None

    dq, dk, dv = kernels.pair_bwd(kernel, q, k, v, seg, seg, r, r, lse, dout, dlt,
                                  causal=causal, diagonal=True)
    if p > 1:
        visiting = move_queries(own, 1, axis_name, +1, causal=causal, own=own_first)
        dq_s, dk_s, dv_s = grads_for(visiting, 1)
        dk, dv = dk + dk_s, dv + dv_s

        def step(carry, s):
            dq, dk, dv, visiting, dq_prev = carry
            home, visiting = exchange(dq_prev, visiting, s, axis_name, +1, causal=causal,
                                      own=own_first)
            dq_s, dk_s, dv_s = grads_for(visiting, s)
            return dq + home, dk + dk_s, dv + dv_s, visiting, dq_s

        if p > 2:
            carry = (dq, dk, dv, visiting, dq_s)
            dq, dk, dv, visiting, dq_s = jax.lax.scan(lambda c, s: (step(c, s), None), carry,
                                                      jnp.arange(2, p))[0]
        dq = dq + send_home(dq_s, p - 1, axis_name, direction=-1, causal=causal)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None


_tokenring = ring_custom_vjp(_tokenring_forward, _tokenring_bwd)
