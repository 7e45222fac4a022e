"""Reading a prepared dataset (`jaxpar.data.prepare`) in a run: a grain pipeline over
memory-mapped token files.

    source  TokenWindows: window k = tokens[k·N : k·N + N+1] of the training documents laid
            back to back, with each token's document index (from the offsets file)
    shuffle grain's index shuffle, seeded by train.seed, a new permutation each epoch
    pack    (jaxpar.data.pack, in feed.place) segment ids and positions restarting at each
            document start, then the zigzag layout for sequence-parallel attention

Row r of the batch of step s (replica m; DiLoCo) is element ((s-1)·M + m)·B + r of the
shuffled dataset: a pure function of (seed, step), so the data position of a checkpoint is
its step and a resumed run reads the same rows. Nothing is read up front: a process reads
(pread) only the windows of its own rows (`feed.place`), so resident memory stays flat in
the dataset's size.
"""
from __future__ import annotations

import functools
import math
import os
from pathlib import Path

import grain
import numpy as np

from jaxpar.data.manifest import read_manifest
from jaxpar.data.tokenizer import BYTES, load_tokenizer, token_bytes


class TokenWindows:
    """grain random-access source: fixed windows of seq_len+1 tokens over a token file.

    Windows are read with `os.pread`, not a memory map: a mapped file's pages (and the
    kernel's readahead around each touched page) count in the process's RSS and pile up
    over a run; pread leaves them in the page cache only. The document offsets (8 bytes a
    document) are memory-mapped and binary-searched."""

    def __init__(self, path: Path, dtype, offsets: np.ndarray, seq_len: int):
        self.dtype, self.offsets, self.seq_len = np.dtype(dtype), offsets, seq_len
        self.fd = os.open(path, os.O_RDONLY)
        self.num_tokens = os.fstat(self.fd).st_size // self.dtype.itemsize
        self.reads = 0  # windows read by this process (the per-process reading test)

    def __len__(self) -> int:
        return (self.num_tokens - 1) // self.seq_len

    def window(self, start: int) -> np.ndarray:
        """[2, N+1]: tokens and their document indices, from token `start`."""
        self.reads += 1
        n, size = self.seq_len + 1, self.dtype.itemsize
        tokens = np.frombuffer(os.pread(self.fd, n * size, start * size), self.dtype)
        doc = np.searchsorted(self.offsets, np.arange(start, start + n), side="right") - 1
        return np.stack([tokens.astype(np.int32), doc.astype(np.int32)])

    def __getitem__(self, k: int) -> np.ndarray:
        return self.window(int(k) * self.seq_len)


class TokenDataset:
    """A prepared dataset folder, read lazily; the row interface of `jaxpar.data.feed`."""

    def __init__(self, path, *, seq_len: int, seed: int = 0):
        self.path = Path(path)
        self.manifest = m = read_manifest(self.path)
        self.vocab, self.seq_len, self.seed = m["vocab_size"], seq_len, seed
        tok = m["tokenizer"]
        self.tokenizer = load_tokenizer(BYTES if tok["file"] is None else self.path / tok["file"])
        split = {}
        for name in ("train", "eval"):
            offsets = np.load(self.path / f"{name}_docs.npy", mmap_mode="r")
            split[name] = w = TokenWindows(self.path / f"{name}.bin", m["dtype"], offsets,
                                           seq_len)
            if w.num_tokens < seq_len + 1:
                raise ValueError(f"dataset {self.path}: the {name} split has {w.num_tokens} "
                                 f"tokens; train.seq_len={seq_len} needs at least {seq_len + 1}")
        self.train, self.eval = split["train"], split["eval"]
        self.dataset = grain.MapDataset.source(self.train).shuffle(seed=seed % 2 ** 32)
        self._eval_shape: tuple[int, int] | None = None  # (batch_size, batches) of the eval
        self._eval_bytes: dict[tuple[int, int], int] = {}

    @property
    def reads(self) -> int:
        return self.train.reads + self.eval.reads

    def train_rows(self, step: int, replica: int, rows: range, batch_size: int,
                   num_replicas: int = 1):
        first = ((step - 1) * num_replicas + replica) * batch_size
        w = np.stack([self.dataset[first + r] for r in rows])
        return w[:, 0], w[:, 1]

    def _eval_starts(self, batch_size: int, num_batches: int) -> np.ndarray:
        n = batch_size * num_batches
        return np.linspace(0, self.eval.num_tokens - self.seq_len - 1, n).astype(np.int64)

    def eval_rows(self, j: int, rows: range, batch_size: int, num_batches: int):
        """Fixed windows spread evenly over the eval split (as ByteData's)."""
        self._eval_shape = (batch_size, num_batches)
        starts = self._eval_starts(batch_size, num_batches)
        w = np.stack([self.eval.window(int(starts[j * batch_size + r])) for r in rows])
        return w[:, 0], w[:, 1]

    def eval_target_bytes(self, batch_size: int, num_batches: int) -> int:
        """UTF-8 bytes of exactly the tokens the eval scores (tokens 1..N of every eval
        window, all rows of all processes), from the tokenizer's per-token byte lengths."""
        key = (batch_size, num_batches)
        if key not in self._eval_bytes:
            table = self.token_bytes
            self._eval_bytes[key] = int(sum(
                table[self.eval.window(int(s))[0, 1:]].sum()
                for s in self._eval_starts(batch_size, num_batches)))
        return self._eval_bytes[key]

    @functools.cached_property
    def token_bytes(self) -> np.ndarray:
        return token_bytes(self.tokenizer)

    def bits_per_byte(self, loss_nats: float) -> float:
        """Mean eval loss per token in nats -> bits per UTF-8 byte of the scored tokens: the
        eval windows are fixed, so their nats (loss × targets) over their bytes is exact
        (comparable across tokenizers; BOS/EOS targets carry nats and no bytes)."""
        if self._eval_shape is None:
            raise ValueError("bits_per_byte needs the eval windows: call eval_rows first")
        B, nb = self._eval_shape
        nbytes = max(1, self.eval_target_bytes(B, nb))
        return loss_nats * B * nb * self.seq_len / (math.log(2) * nbytes)
