"""Putting a batch on the devices, each process reading only its own rows.

`place(read, shape, sharding)` builds the global arrays tokens / targets / positions /
segment_ids of `shape` = (*lead, B, N) with `jax.make_array_from_callback`, which asks only
for the shards of this process's devices. The rows those shards cover are read once per
distinct row block (`read(lead, rows)` -> windows [len(rows), N+1] and document ids or None),
packed (segment ids, positions, the zigzag layout) once, and sliced per device. On 2 hosts
that split the batch in halves, each host reads half the windows; the assembled global
batch is the same as one host's.
"""
from __future__ import annotations

import itertools

import jax
import numpy as np

from jaxpar.data import pack

KEYS = ("tokens", "targets", "positions", "segment_ids")


def _span(s: slice, dim: int) -> tuple[int, int]:
    start, stop, _ = s.indices(dim)
    return start, stop


def place(read, shape: tuple, sharding, *, zigzag: int = 1, separator: bytes = b"\n\n",
          keys=KEYS) -> dict:
    """Global batch arrays [*lead, B, N] under `sharding`, reading only addressable rows."""
    *lead_shape, _, _ = shape
    blocks: dict = {}

    def block_key(index) -> tuple:
        return tuple(_span(s, d) for s, d in zip(index[:-1], shape[:-1]))

    for index in sharding.addressable_devices_indices_map(shape).values():
        key = block_key(index)
        if key in blocks:
            continue
        *lead, (r0, r1) = key
        parts = [read(ix, range(r0, r1)) for ix in itertools.product(*(range(*x) for x in lead))]
        windows = np.stack([w for w, _ in parts])
        docs = None if parts[0][1] is None else np.stack([d for _, d in parts])
        packed = pack(windows, separator=separator, zigzag=zigzag, doc_ids_BN1=docs)
        sizes = [b - a for a, b in lead]
        blocks[key] = {k: v.reshape(*sizes, r1 - r0, -1) for k, v in packed.items()}
    return {k: jax.make_array_from_callback(
        shape, sharding, lambda i, k=k: blocks[block_key(i)][k][..., i[-1]]) for k in keys}
