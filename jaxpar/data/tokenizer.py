"""Tokenizers a dataset is prepared with: raw bytes, a Hugging Face `tokenizer.json` (the
`tokenizers` package) or a SentencePiece `.model`; and a byte-level BPE trained on the inputs.

    tok = load_tokenizer("bytes" | "path/tokenizer.json" | "path/sp.model")
    ids = tok.encode("text"); text = tok.decode(ids); tok.vocab_size

All three decode any id sequence to a str (undecodable bytes become U+FFFD), so a sample of
the model reads as text whatever the tokenizer.

Special tokens: `encode` never adds any; `tok.bos_id` / `tok.eos_id` are the tokenizer's
own (None where it has none) and `tok.adds` the pair ("bos"/"eos") its own post-processing
adds: the tokenizer.json post-processor (Llama-3: <|begin_of_text|>), or for a SentencePiece
model the `add_bos_token`/`add_eos_token` of a tokenizer_config.json beside it (HF's
LlamaTokenizer; without that file: none). `prepare` adds them per document from that default.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Iterable

import numpy as np

BYTES = "bytes"
KINDS = ("bytes", "hf", "sentencepiece")


def content_sha256(path: Path) -> str:
    """Hash of what a tokenizer file says, not how it is formatted: a tokenizer.json is
    hashed as canonical JSON (keys sorted), a SentencePiece model as its bytes."""
    raw = Path(path).read_bytes()
    if Path(path).suffix == ".json":
        try:
            raw = json.dumps(json.loads(raw), sort_keys=True, separators=(",", ":")).encode()
        except (json.JSONDecodeError, UnicodeDecodeError):
            pass  # the loader reports it
    return hashlib.sha256(raw).hexdigest()


def _sibling_config(path: Path) -> dict:
    """tokenizer_config.json beside a tokenizer file (an HF model folder), or {}."""
    f = Path(path).parent / "tokenizer_config.json"
    try:
        return json.loads(f.read_text()) if f.is_file() else {}
    except (json.JSONDecodeError, UnicodeDecodeError):
        return {}


class ByteTokenizer:
    kind, vocab_size, file = "bytes", 256, None
    bos_id = eos_id = None
    adds: tuple[bool, bool] = (False, False)

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
        self.bos_id, self.eos_id = self._post_processor_ids()
        self.adds = (self.bos_id is not None, self.eos_id is not None)
        cfg = _sibling_config(self.file)  # tokens the post-processor does not add
        for end, key in (("bos", "bos_token"), ("eos", "eos_token")):
            tok = cfg.get(key)
            tok = tok.get("content") if isinstance(tok, dict) else tok
            if getattr(self, f"{end}_id") is None and isinstance(tok, str):
                setattr(self, f"{end}_id", self._tok.token_to_id(tok))

    def _post_processor_ids(self) -> tuple[int | None, int | None]:
        """(BOS, EOS) the post-processor puts around a text (Llama-3: <|begin_of_text|>,
        none), found by encoding a probe with and without special tokens."""
        plain = self._tok.encode("a b", add_special_tokens=False).ids
        full = self._tok.encode("a b", add_special_tokens=True).ids
        for k in range(len(full) - len(plain) + 1):
            if full[k:k + len(plain)] == plain:
                head, tail = full[:k], full[k + len(plain):]
                return (head[-1] if head else None), (tail[0] if tail else None)
        return None, None

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
        self.bos_id = self._sp.bos_id() if self._sp.bos_id() >= 0 else None
        self.eos_id = self._sp.eos_id() if self._sp.eos_id() >= 0 else None
        cfg = _sibling_config(self.file)
        self.adds = (bool(cfg.get("add_bos_token")) and self.bos_id is not None,
                     bool(cfg.get("add_eos_token")) and self.eos_id is not None)

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


def identity(tok) -> dict:
    """What a dataset records of its tokenizer, and what `model.init_from` is checked
    against: kind, vocabulary size, content hash, the special-token ids."""
    return {"kind": tok.kind, "vocab_size": tok.vocab_size,
            "content_sha256": content_sha256(tok.file) if tok.file is not None else None,
            "bos_id": tok.bos_id, "eos_id": tok.eos_id}


def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2's byte-level alphabet: printable char -> the byte it stands for."""
    keep = [*range(33, 127), *range(161, 173), *range(174, 256)]
    extra = [b for b in range(256) if b not in keep]
    return {**{chr(b): b for b in keep}, **{chr(256 + i): b for i, b in enumerate(extra)}}


def token_bytes(tok) -> np.ndarray:
    """[vocab] int32: how many UTF-8 bytes of text each token stands for (bytes: 1 each), to
    count the bytes of exactly the tokens a model scores. Special tokens (BOS, EOS) are 0:
    they are not text. Byte-level BPE tokens count their bytes exactly (a token may hold
    part of a character); SentencePiece byte pieces count 1, other pieces their text with
    U+2581 as one space."""
    out = np.zeros(tok.vocab_size, np.int32)
    if tok.kind == "bytes":
        return out + 1
    if tok.kind == "sentencepiece":
        sp = tok._sp
        for i in range(tok.vocab_size):
            if sp.is_byte(i):
                out[i] = 1
            elif not (sp.is_control(i) or sp.is_unknown(i)):
                out[i] = len(sp.id_to_piece(i).replace("\u2581", " ").encode("utf-8"))
        return out
    t = tok._tok
    special = {i for i, a in t.get_added_tokens_decoder().items() if a.special}
    alphabet = _byte_level_alphabet()
    byte_level = type(t.decoder).__name__ == "ByteLevel"
    # other decoders (Llama-2's Metaspace / byte-fallback tokenizer.json) strip the space of
    # a text's first "▁word": decode each token after an anchor token and subtract it
    anchor = next((t.token_to_id(c) for c in ("a", "\u2581a", "A") if t.token_to_id(c)
                   is not None), None)
    ids = [i for i in range(tok.vocab_size) if i not in special]
    if anchor is None:
        texts = t.decode_batch([[i] for i in ids], skip_special_tokens=True)
        base = 0
    else:
        texts = t.decode_batch([[anchor, i] for i in ids], skip_special_tokens=True)
        base = len(t.decode([anchor]).encode("utf-8"))
    for i, text in zip(ids, texts):
        piece = t.id_to_token(i) or ""
        if byte_level and all(c in alphabet for c in piece):
            out[i] = len(piece)  # one alphabet char per byte
        elif re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", piece):
            out[i] = 1  # a byte-fallback piece
        else:
            out[i] = len(text.encode("utf-8")) - base
    return out
