"""Zigzag layout: load-balanced causal sequence parallelism.

Split N tokens into 2P chunks of size c = N/(2P); device r holds chunks r and 2P−1−r.
Under a causal mask every device then has the same amount of unmasked work at every ring
step. The reorder is a permutation of the token axis, applied once by the data path to
token ids / positions / segment ids (not per layer); `from_zigzag` undoes it.

`to_zigzag_local` / `from_zigzag_local` (inside a shard_map) and `to_zigzag_sharded` /
`from_zigzag_sharded` (global arrays) do the same reorder on sequence-sharded data by
collective permutes, each device sending whole pieces of its shard, nothing gathered.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from jaxpar.mesh import SEQ
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P


def check_zigzag(n: int, p: int) -> None:
    if n % (2 * p):
        ok = 2 * p
        raise ValueError(
            f"causal sequence parallelism uses the zigzag layout, which needs sequence length "
            f"N={n} divisible by 2·P={2 * p}; use N a multiple of {ok} "
            f"(e.g. {ok * max(1, n // ok)} "
            f"or {ok * (n // ok + 1)}), or causal=False"
        )


def zigzag_indices(n: int, p: int) -> np.ndarray:
    """perm such that x_zigzag = x[:, perm]: device r's shard is chunks (r, 2P−1−r)."""
    check_zigzag(n, p)
    c = n // (2 * p)
    chunks = np.arange(n).reshape(2 * p, c)
    return np.concatenate([np.concatenate([chunks[r], chunks[2 * p - 1 - r]]) for r in range(p)])


def to_zigzag(x, p: int, axis: int = 1):
    return jnp.take(x, zigzag_indices(x.shape[axis], p), axis=axis)


def from_zigzag(x, p: int, axis: int = 1):
    return jnp.take(x, np.argsort(zigzag_indices(x.shape[axis], p)), axis=axis)


def shard_positions(shard_index, local_len: int, p: int, *, zigzag: bool):
    """Global token positions [local_len] of shard `shard_index` (may be traced)."""
    if not zigzag:
        return shard_index * local_len + jnp.arange(local_len, dtype=jnp.int32)
    c = local_len // 2
    first = shard_index * c + jnp.arange(c, dtype=jnp.int32)
    second = (2 * p - 1 - shard_index) * c + jnp.arange(c, dtype=jnp.int32)
    return jnp.concatenate([first, second])


# ---------------------------------------------------------------------------------------
# The same reorder on data already sharded over the sequence axes: shards move between
# devices with collective permutes inside a shard_map, nothing is gathered.


def _axis_tuple(axes) -> tuple:
    return tuple(axes) if isinstance(axes, (tuple, list)) else (axes,)


def zigzag_plan(n: int, p: int, devices: int, *, inverse: bool = False):
    """Static plan for the zigzag reorder of N tokens over `p` (2p chunks), sequence sharded
    contiguously over `devices` shards (any count dividing N; hybrid: ring × Ulysses).

    Each shard of L = N/devices tokens is cut into m pieces of s = gcd(N/2p, L) tokens, so
    every piece moves whole. Returns (s, m, moves): `moves` maps (src_slot, dst_slot) to the
    (src_device, dst_device) pairs that send local piece src_slot into local piece dst_slot;
    device order is the shard order (first mesh axis major). `inverse` plans `from_zigzag`.
    """
    check_zigzag(n, p)
    if n % devices:
        raise ValueError(f"sequence length N={n} not divisible by {devices} shards")
    local = n // devices
    s = math.gcd(n // (2 * p), local)
    m = local // s
    perm = zigzag_indices(n, p)[::s] // s  # zigzag piece j holds natural piece perm[j]
    if inverse:
        perm = np.argsort(perm)
    moves: dict[tuple[int, int], list[tuple[int, int]]] = {}
    for dst_piece, src_piece in enumerate(perm.tolist()):
        src_dev, src_slot = divmod(src_piece, m)
        dst_dev, dst_slot = divmod(dst_piece, m)
        moves.setdefault((src_slot, dst_slot), []).append((src_dev, dst_dev))
    return s, m, moves


def _reorder_local(x, axes, p: int, axis: int, inverse: bool):
    axes = _axis_tuple(axes)
    devices = 1
    for a in axes:
        devices *= jax.lax.axis_size(a)
    local = x.shape[axis]
    s, m, moves = zigzag_plan(local * devices, p, devices, inverse=inverse)
    name = axes if len(axes) > 1 else axes[0]
    pieces = jnp.split(x, m, axis=axis)
    out = [None] * m
    for (src_slot, dst_slot), pairs in sorted(moves.items()):
        if all(a == b for a, b in pairs) and len(pairs) == devices:
            got = pieces[src_slot]  # stays on every device
        else:  # devices not in `pairs` receive zeros, so the contributions add up exactly
            got = jax.lax.ppermute(pieces[src_slot], name, pairs)
        out[dst_slot] = got if out[dst_slot] is None else out[dst_slot] + got
    return jnp.concatenate(out, axis=axis) if m > 1 else out[0]


def to_zigzag_local(x, axes, p: int, axis: int = 1):
    """Per-device (inside `shard_map`, sequence sharded over `axes`, first axis major): this
    device's natural-order shard in, its shard of `to_zigzag(x_global, p)` out."""
    return _reorder_local(x, axes, p, axis, inverse=False)


def from_zigzag_local(x, axes, p: int, axis: int = 1):
    """Per-device inverse of `to_zigzag_local`."""
    return _reorder_local(x, axes, p, axis, inverse=True)


def _sharded(inverse, x, mesh, axes, p, axis):
    axes = _axis_tuple(axes)
    if p is None:
        p = math.prod(mesh.shape[a] for a in axes)
    return _sharded_fn(mesh, axes, p, axis, inverse)(x)


@functools.lru_cache(maxsize=64)
def _sharded_fn(mesh, axes, p, axis, inverse):
    spec = P(*([None] * axis), axes if len(axes) > 1 else axes[0])
    local_fn = from_zigzag_local if inverse else to_zigzag_local

    def run(x):
        x = put(x, NamedSharding(mesh, spec))
        return jax.shard_map(lambda y: local_fn(y, axes, p, axis), mesh=mesh, in_specs=spec,
                             out_specs=spec)(x)

    return jax.jit(run)


def to_zigzag_sharded(x, mesh, axes=SEQ, p: int | None = None, axis: int = 1):
    """`to_zigzag(x, p)` for a global array, computed sharded over the mesh `axes` (shards
    exchanged by collective permutes, no gather); p defaults to the product of the axis sizes.
    The result is sharded over `axes` on `axis`."""
    return _sharded(False, x, mesh, axes, p, axis)


def from_zigzag_sharded(x, mesh, axes=SEQ, p: int | None = None, axis: int = 1):
    """Inverse of `to_zigzag_sharded`: natural token order, sharded over `axes`."""
    return _sharded(True, x, mesh, axes, p, axis)


def put(x, sharding: NamedSharding):
    """Bring x (array or tracer) to `sharding`: `jax.reshard` when the sharding names only
    Explicit mesh axes (the typed-sharding path), `jax.device_put` otherwise (Auto axes)."""
    mesh = sharding.mesh
    named = [a for entry in sharding.spec if entry is not None
             for a in (entry if isinstance(entry, tuple) else (entry,))]
    types = dict(zip(mesh.axis_names, mesh.axis_types))
    if named and all(types[a] == AxisType.Explicit for a in named):
        return jax.reshard(x, sharding)
    return jax.device_put(x, sharding)
