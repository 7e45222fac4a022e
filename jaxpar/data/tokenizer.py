"""Tokenizers a dataset is prepared with: raw bytes, a Hugging Face `tokenizer.json` (the
`tokenizers` package) or a SentencePiece `.model`; and a byte-level BPE trained on the inputs.

    tok = load_tokenizer("bytes" | "path/tokenizer.json" | "path/sp.model")
    ids = tok.encode("text"); text = tok.decode(ids); tok.vocab_size

All three decode any id sequence to a str (undecodable bytes become U+FFFD), so a sample of
the model reads as text whatever the tokenizer.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable

import numpy as np

BYTES = "bytes"
KINDS = ("bytes", "hf", "sentencepiece")


class ByteTokenizer:
    kind, vocab_size, file = "bytes", 256, None

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        return [np.frombuffer(t.encode("utf-8"), np.uint8) for t in texts]

    def decode(self, ids) -> str:
        return np.asarray(ids, np.uint8).tobytes().decode("utf-8", "replace")


class HFTokenizer:
    kind = "hf"

    def __init__(self, path: Path):
        import tokenizers

        self.file = Path(path)
        try:
            self._tok = tokenizers.Tokenizer.from_file(str(path))
        except Exception as e:  # the package raises a bare Exception on bad JSON
            raise ValueError(f"tokenizer {path} is not a valid Hugging Face tokenizer.json "
                             f"({str(e).splitlines()[0][:120]})") from None
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)


class SentencePieceTokenizer:
    kind = "sentencepiece"

    def __init__(self, path: Path):
        import sentencepiece as spm

        self.file = Path(path)
        try:
            self._sp = spm.SentencePieceProcessor(model_file=str(path))
        except (OSError, RuntimeError) as e:
            raise ValueError(f"tokenizer {path} is not a valid SentencePiece model "
                             f"({str(e).splitlines()[0][:120]})") from None
        self.vocab_size = self._sp.get_piece_size()

    def encode(self, text: str) -> list[int]:
        return self._sp.encode(text)

    def decode(self, ids) -> str:
        return self._sp.decode([int(i) for i in ids])


def load_tokenizer(spec: str | os.PathLike):
    """'bytes', a `tokenizer.json` (Hugging Face `tokenizers`), a SentencePiece `.model`, or
    a folder holding one of them (a Hugging Face model folder)."""
    if str(spec) == BYTES:
        return ByteTokenizer()
    path = Path(spec)
    if path.is_dir():  # a Hugging Face model folder (as model.init_from takes)
        found = [path / n for n in ("tokenizer.json", "tokenizer.model") if (path / n).is_file()]
        if not found:
            raise ValueError(f"tokenizer folder {str(spec)!r} has no tokenizer.json or "
                             f"tokenizer.model")
        path = found[0]
    if not path.is_file():
        raise ValueError(f"tokenizer {str(spec)!r} does not exist; give 'bytes', a Hugging Face "
                         f"tokenizer.json, or a SentencePiece .model file")
    if path.suffix == ".json":
        return HFTokenizer(path)
    if path.suffix == ".model":
        return SentencePieceTokenizer(path)
    raise ValueError(f"tokenizer {str(spec)!r}: unknown kind (suffix {path.suffix!r}); give "
                     f"'bytes', a Hugging Face tokenizer.json, or a SentencePiece .model file")


def train_bpe(texts: Iterable[str], vocab_size: int, out: Path) -> Path:
    """Train a byte-level BPE (GPT-2 style pre-tokenization, no special tokens) on `texts`
    and write it to `out` (a tokenizer.json). Needs no network."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if vocab_size < 257:
        raise ValueError(f"--train-tokenizer {vocab_size}: a byte-level BPE needs a vocabulary "
                         f"of at least 257 (256 bytes + merges)")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    tok.save(str(out))
    return out
