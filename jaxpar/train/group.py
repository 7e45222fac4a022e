"""Decide once, act everywhere: the host-side agreements of a process group.

A fault decision (which checkpoint to restore, whether one is corrupt, whether to retry)
is three lines: each process proposes what it sees, the group reduces it, everyone acts
on the result. With one process every function here is the identity. Decisions the
compiled step can make (stop on a signal, skip a non-finite step) are folded into the
step's own collectives instead (`jaxpar.train.faults`), at no extra round trip.
"""
from __future__ import annotations

import jax
import numpy as np


def gather(value) -> np.ndarray:
    """Every process's `value` (a number or a small array), indexed by process."""
    value = np.asarray(value)
    if jax.process_count() == 1:
        return value[None]
    from jax.experimental import multihost_utils
    out = np.asarray(multihost_utils.process_allgather(value))
    return out.reshape(jax.process_count(), *value.shape)


def agree_min(value: int) -> int:
    return int(gather(np.int64(value)).min())


def agree_max(value: int) -> int:
    return int(gather(np.int64(value)).max())


def barrier(name: str) -> None:
    """Every process reaches this point before any goes on (no-op with one process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(name)
