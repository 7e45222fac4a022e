"""Language-model data. Two kinds, one interface (`open_data`, and `feed.place` puts a
process's rows of a batch on its devices):

- prepared datasets (`python -m jaxpar.data.prepare`, read by `tokens.TokenDataset`
  through a grain pipeline: memory-mapped token files, any tokenizer);
- raw text, read here as bytes (`ByteData`): the bundled corpus (stdlib docstrings), or a
  user's file or folder of text files — the demo's path, kept as it was.

Raw text: tokens are raw bytes (vocab 256). The corpus is split once into train (first 95%) and eval
(last 5%) bytes. Batches are a pure function of (seed, step, replica): the same step always
gives the same windows, so a resumed or re-run job sees the same data (the data position of
a checkpoint is just its step), and DiLoCo replicas and data-parallel shards can be handed
identical streams.

`pack` turns windows into model inputs: documents (separated by `doc_separator`; in a
folder, one per file) get their own segment id and positions that restart at 0, and for
causal sequence parallelism the token axis is put in the zigzag layout once, here, for
tokens, targets, positions and segment ids alike.
"""
from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path
from typing import ClassVar

import numpy as np

from jaxpar.attention.layout import zigzag_indices
from jaxpar.data.tokenizer import ByteTokenizer

VOCAB = 256
DEFAULT_CORPUS = Path(__file__).resolve().parent.parent / "data" / "stdlib_docstrings.txt"


def load_bytes(path: str | os.PathLike | None = None, separator: bytes = b"\n\n") -> np.ndarray:
    """uint8 bytes of a text file, of every file under a folder (sorted, joined by
    `separator` so each file is a document), or of the bundled corpus."""
    path = Path(path) if path is not None else DEFAULT_CORPUS
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file())
        if not files:
            raise ValueError(f"data path {path} is an empty folder")
        raw = separator.join(p.read_bytes() for p in files)
    elif path.is_file():
        raw = path.read_bytes()
    else:
        raise ValueError(f"data path {path} does not exist")
    return np.frombuffer(raw, dtype=np.uint8)


@dataclasses.dataclass(frozen=True)
class ByteData:
    """Deterministic batches of byte windows: tokens[B, N+1] (inputs [:, :-1], targets
    [:, 1:])."""
    train: np.ndarray
    eval: np.ndarray
    seq_len: int
    seed: int = 0
    separator: bytes = b"\n\n"
    vocab: ClassVar[int] = VOCAB
    tokenizer: ClassVar[ByteTokenizer] = ByteTokenizer()

    @classmethod
    def load(cls, path=None, *, seq_len: int = 128, eval_fraction: float = 0.05, seed: int = 0,
             separator: bytes = b"\n\n") -> "ByteData":
        data = load_bytes(path, separator)
        if len(data) < 20 * (seq_len + 1):
            raise ValueError(f"corpus has {len(data)} bytes; need at least "
                             f"{20 * (seq_len + 1)} for seq_len={seq_len}")
        cut = int(len(data) * (1 - eval_fraction))
        return cls(data[:cut], data[cut:], seq_len, seed, separator)

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

    # the row interface of jaxpar.data.feed (shared with TokenDataset): (windows, doc ids)
    def train_rows(self, step: int, replica: int, rows: range, batch_size: int,
                   num_replicas: int = 1):
        return self.batch(step, batch_size, replica)[rows.start:rows.stop], None

    def eval_rows(self, j: int, rows: range, batch_size: int, num_batches: int):
        return self.eval_batches(batch_size, num_batches)[j, rows.start:rows.stop], None

    def bits_per_byte(self, loss_nats: float) -> float:
        return loss_nats / math.log(2)  # one token is one byte


def _from_starts(start_BN: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(segment_ids, positions) from a mask of document starts: positions restart at 0."""
    seg = np.cumsum(start_BN, axis=-1).astype(np.int32)
    idx = np.broadcast_to(np.arange(start_BN.shape[-1]), start_BN.shape)
    first = np.maximum.accumulate(np.where(start_BN, idx, 0), axis=-1)
    return seg, (idx - first).astype(np.int32)


def segments(tokens_BN: np.ndarray, separator: bytes) -> tuple[np.ndarray, np.ndarray]:
    """(segment_ids, positions) [..., N]: a document starts after each `separator` (at a
    byte that does not continue the separator); positions restart at 0 in each document."""
    sep = np.frombuffer(separator, np.uint8)
    n = tokens_BN.shape[-1]
    start = np.zeros(tokens_BN.shape, bool)
    if len(sep) and n > len(sep):
        match = np.ones(tokens_BN[..., len(sep):].shape, bool)
        for j, byte in enumerate(sep):
            match &= tokens_BN[..., j:n - len(sep) + j] == byte
        start[..., len(sep):] = match & (tokens_BN[..., len(sep):] != sep[-1])
    return _from_starts(start)


def doc_segments(doc_ids_BN: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(segment_ids, positions) [..., N] from each token's document index (prepared data
    knows its document boundaries; no separator search)."""
    start = np.zeros(doc_ids_BN.shape, bool)
    start[..., 1:] = doc_ids_BN[..., 1:] != doc_ids_BN[..., :-1]
    return _from_starts(start)


def pack(windows_BN1: np.ndarray, *, separator: bytes = b"\n\n", zigzag: int = 1,
         doc_ids_BN1: np.ndarray | None = None) -> dict:
    """Model inputs from windows [..., N+1]: tokens, targets, positions, segment_ids, each
    [..., N]; with zigzag=P > 1 the token axis is in the zigzag layout for P shards.
    Documents come from `doc_ids_BN1` (each token's document, prepared data) when given,
    else from `separator` (raw bytes)."""
    tokens, targets = windows_BN1[..., :-1], windows_BN1[..., 1:]
    if doc_ids_BN1 is not None:
        seg, pos = doc_segments(doc_ids_BN1[..., :-1])
    else:
        seg, pos = segments(tokens, separator)
    out = {"tokens": tokens, "targets": targets, "positions": pos, "segment_ids": seg}
    if zigzag > 1:
        perm = zigzag_indices(tokens.shape[-1], zigzag)
        out = {k: v[..., perm] for k, v in out.items()}
    return {k: np.ascontiguousarray(v, dtype=np.int32) for k, v in out.items()}


def open_data(path, *, seq_len: int, seed: int = 0, eval_fraction: float = 0.05,
              separator: bytes = b"\n\n"):
    """A prepared dataset folder (TokenDataset), else raw text read as bytes (ByteData)."""
    from jaxpar.data.manifest import looks_prepared

    if path is not None and looks_prepared(Path(path)):
        from jaxpar.data.tokens import TokenDataset

        return TokenDataset(path, seq_len=seq_len, seed=seed)
    return ByteData.load(path, seq_len=seq_len, seed=seed, eval_fraction=eval_fraction,
                         separator=separator)
