"""Zigzag layout: load-balanced causal sequence parallelism.

Split N tokens into 2P chunks of size c = N/(2P); device r holds chunks r and 2P−1−r.
Under a causal mask every device then has the same amount of unmasked work at every ring
step. The reorder is a permutation of the token axis, applied once by the data path to
token ids / positions / segment ids (not per layer); `from_zigzag` undoes it.
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np


def check_zigzag(n: int, p: int) -> None:
    if n % (2 * p):
        ok = 2 * p
        raise ValueError(
            f"causal sequence parallelism uses the zigzag layout, which needs sequence length "
            f"N={n} divisible by 2·P={2 * p}; use N a multiple of {ok} (e.g. {ok * max(1, n // ok)} "
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
