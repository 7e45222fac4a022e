"""Byte-level language-model data: the bundled default corpus, or a user's file or folder.

Tokens are raw bytes (vocab 256). The corpus is split once into train (first 95%) and eval
(last 5%) bytes. Batches are a pure function of (seed, step, replica): the same step always
gives the same windows, so a resumed or re-run job sees the same data, and DiLoCo replicas
and data-parallel shards can be handed identical streams.
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import numpy as np

VOCAB = 256
DEFAULT_CORPUS = Path(__file__).resolve().parent.parent / "data" / "stdlib_docstrings.txt"


def load_bytes(path: str | os.PathLike | None = None) -> np.ndarray:
    """uint8 bytes of a text file, or of every file under a folder (sorted), or the default."""
    path = Path(path) if path is not None else DEFAULT_CORPUS
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file())
        if not files:
            raise ValueError(f"data path {path} is an empty folder")
        raw = b"\n".join(p.read_bytes() for p in files)
    elif path.is_file():
        raw = path.read_bytes()
    else:
        raise ValueError(f"data path {path} does not exist")
    return np.frombuffer(raw, dtype=np.uint8)


@dataclasses.dataclass(frozen=True)
class ByteData:
    """Deterministic batches of byte windows: tokens[B, N+1] (inputs are [:, :-1], targets [:, 1:])."""
    train: np.ndarray
    eval: np.ndarray
    seq_len: int
    seed: int = 0

    @classmethod
    def load(cls, path=None, *, seq_len: int = 128, eval_fraction: float = 0.05, seed: int = 0) -> "ByteData":
        data = load_bytes(path)
        if len(data) < 20 * (seq_len + 1):
            raise ValueError(f"corpus has {len(data)} bytes; need at least {20 * (seq_len + 1)} for seq_len={seq_len}")
        cut = int(len(data) * (1 - eval_fraction))
        return cls(data[:cut], data[cut:], seq_len, seed)

    def _windows(self, data: np.ndarray, starts: np.ndarray) -> np.ndarray:
        idx = starts[:, None] + np.arange(self.seq_len + 1)[None, :]
        return data[idx].astype(np.int32)

    def batch(self, step: int, batch_size: int, replica: int = 0) -> np.ndarray:
        """Training windows for (step, replica): random offsets from a generator seeded by both."""
        rng = np.random.default_rng([self.seed, step, replica])
        starts = rng.integers(0, len(self.train) - self.seq_len - 1, size=batch_size)
        return self._windows(self.train, starts)

    def replica_batches(self, step: int, batch_size: int, num_replicas: int) -> np.ndarray:
        """[M, B, N+1]: replica m gets batch(step, batch_size, m)."""
        return np.stack([self.batch(step, batch_size, m) for m in range(num_replicas)])

    def eval_batches(self, batch_size: int, num_batches: int) -> np.ndarray:
        """[num_batches, B, N+1] fixed, evenly spaced windows of the eval split."""
        n = batch_size * num_batches
        starts = np.linspace(0, len(self.eval) - self.seq_len - 2, n).astype(np.int64)
        return self._windows(self.eval, starts).reshape(num_batches, batch_size, self.seq_len + 1)
