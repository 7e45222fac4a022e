"""SPMD helpers shared by attention, overlap and DiLoCo: ring shifts, varying casts, divisors.

The collective helpers are per-device code: call them inside `shard_map`.
"""
from __future__ import annotations

import jax
import numpy as np
from jax import lax
from jax.sharding import NamedSharding


def axis_size(axis_name) -> int:
    """Number of devices along `axis_name` (a mesh axis or a tuple of them)."""
    return lax.axis_size(axis_name)


def ring_perm(p: int, offset: int) -> list[tuple[int, int]]:
    """The (source, target) pairs of a ring shift: device i sends to (i + offset) mod p."""
    return [(i, (i + offset) % p) for i in range(p)]


def shift(tree, axis_name, offset: int):
    """Send every leaf from device r to device (r + offset) mod P along `axis_name`."""
    perm = ring_perm(axis_size(axis_name), offset)
    return jax.tree.map(lambda x: lax.ppermute(x, axis_name, perm), tree)


def varying_axes(x) -> frozenset:
    """The manual mesh axes x is typed device-varying over (empty outside shard_map)."""
    mat = getattr(jax.typeof(x), "manual_axis_type", None)
    return mat.varying if mat is not None else frozenset()


def vary_over(x, axes):
    """pcast x to device-varying over `axes` where it is not already."""
    missing = frozenset(axes) - varying_axes(x)
    return lax.pcast(x, tuple(sorted(missing)), to="varying") if missing else x


def varying_like(x, *refs):
    """x made device-varying over every axis any of `refs` varies over (loop carries and
    cond branches inside shard_map must agree on this)."""
    return vary_over(x, frozenset().union(*(varying_axes(r) for r in refs)))


def divisors(n: int, at_most: int | None = None) -> list[int]:
    """The d in 1..at_most (default n) that divide n, ascending (valid sizes for messages)."""
    return [d for d in range(1, (n if at_most is None else at_most) + 1) if n % d == 0]


def batch_axes(x, mesh, seq_axes, batch: int):
    """Mesh axes the batch dim of x is sharded over, when known (Explicit axes, or a concrete
    array on this mesh) and usable (not a sequence axis, divides B); else None (replicated)."""
    entry = None
    sharding = getattr(jax.typeof(x), "sharding", None)
    if sharding is not None and getattr(sharding, "spec", None) and sharding.spec[0]:
        entry = sharding.spec[0]
    elif isinstance(x, jax.Array) and not isinstance(x, jax.core.Tracer):
        s = getattr(x, "sharding", None)
        if (isinstance(s, NamedSharding) and s.spec and s.spec[0] is not None
                and s.mesh.shape_tuple == mesh.shape_tuple
                and np.array_equal(s.mesh.device_ids, mesh.device_ids)):
            entry = s.spec[0]
    if entry is None:
        return None
    names = entry if isinstance(entry, tuple) else (entry,)
    size = 1
    for a in names:
        if a not in mesh.shape or a in seq_axes:
            return None
        size *= mesh.shape[a]
    if batch % size:
        return None
    return entry
