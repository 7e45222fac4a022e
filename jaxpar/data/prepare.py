"""Pre-tokenize text into a dataset folder a run reads with `data.path=DIR`.

    python -m jaxpar.data.prepare INPUT... --tokenizer TOKENIZER --out DIR   (or jaxpar-prepare)
    python -m jaxpar.data.prepare jaxpar/data/stdlib_docstrings.txt --train-tokenizer 4096 \\
        --out data/stdlib_bpe4k

INPUT: text files, folders (every file below, sorted) or JSONL files (`*.jsonl`; one document
per line, the text in `--field`, default `text`). A text file is split into documents at
`--doc-separator` (default a blank line; '' = one document per file). TOKENIZER: `bytes`, a
Hugging Face `tokenizer.json`, a SentencePiece `.model`, or a folder holding one (a Hugging
Face model folder, as `model.init_from` takes); `--train-tokenizer VOCAB` trains
a byte-level BPE on the training documents first (no network).

`--bos/--no-bos`, `--eos/--no-eos`: put the tokenizer's BOS before / EOS after every
document (default: what the tokenizer's own post-processing adds, e.g. Llama-3's
<|begin_of_text|> before each document; bytes and a trained BPE: none). The manifest records
the choice and the tokenizer's identity (`jaxpar.data.tokenizer.identity`).

DIR gets (format in docs/data.md): `train.bin` / `eval.bin` (the documents' tokens back to
back, uint16 when the vocabulary fits, else uint32), `train_docs.npy` / `eval_docs.npy`
(int64 document start offsets, one more than documents), the tokenizer file, and
`manifest.json`, written last. Everything is written into `DIR.tmp-XXXXXXXX` and renamed to
DIR at the end, so a killed prepare leaves only that temporary folder (no manifest; a run
refuses it) and never a half dataset named DIR.

Document i goes to eval when blake2b(seed, i) < --eval-fraction: a fixed split by documents
that needs no second pass and does not depend on --workers.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing
import os
import shutil
import sys
import time
import uuid
from pathlib import Path
from typing import Iterator

import numpy as np

from jaxpar.data.manifest import FORMAT, MANIFEST, read_manifest
from jaxpar.data.tokenizer import BYTES, identity, load_tokenizer, train_bpe

CHUNK_BYTES = 1 << 19  # documents handed to a worker at a time (~512 KiB of text)


# ----------------------------------------------------------------------------- inputs


def input_files(inputs) -> list[Path]:
    files = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file()
                           and not any(part.startswith(".") for part in f.relative_to(p).parts))
            if not found:
                raise ValueError(f"input {item}: empty folder")
            files += found
        elif p.is_file():
            files.append(p)
        else:
            raise ValueError(f"input {item} does not exist")
    if not files:
        raise ValueError("no inputs: give text files, folders or .jsonl files")
    return files


BLOCK_BYTES = 1 << 26  # files are read in 64 MiB blocks: memory stays flat in file size


def _pieces(f, sep: bytes, sha, progress) -> Iterator[tuple[int, bytes]]:
    """(byte offset, piece) of a binary file split at `sep` (b'' = the whole file), read in
    blocks. Splitting UTF-8 at the separator's own bytes never cuts a character."""
    rest, at = b"", 0
    while block := f.read(BLOCK_BYTES):
        sha.update(block)
        if progress is not None:
            progress.update(len(block))
        parts = (rest + block).split(sep) if sep else [rest + block]
        rest = parts.pop()
        for part in parts:
            yield at, part
            at += len(part) + len(sep)
    yield at, rest


class Reader:
    """Documents of the inputs in order, and each file's size and sha256."""

    def __init__(self, files: list[Path], field: str, separator: str):
        self.files, self.field, self.separator = files, field, separator
        self.hashes: list[dict] = []

    def _jsonl(self, path: Path, lines) -> Iterator[str]:
        for no, (_, line) in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{no}: not valid JSON ({e.msg})") from None
            if not isinstance(rec, dict) or self.field not in rec:
                keys = list(rec)[:8] if isinstance(rec, dict) else type(rec).__name__
                raise ValueError(f"{path}:{no}: no field {self.field!r} (has {keys}); "
                                 f"choose the text field with --field")
            if not isinstance(rec[self.field], str):
                raise ValueError(f"{path}:{no}: field {self.field!r} is "
                                 f"{type(rec[self.field]).__name__}, not a string")
            yield rec[self.field]

    def _text(self, path: Path, pieces) -> Iterator[str]:
        for at, raw in pieces:
            try:
                yield raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(f"{path}: not UTF-8 text (byte {at + e.start}: {e.reason}); "
                                 f"convert it to UTF-8 or leave it out") from None

    def documents(self, progress=None) -> Iterator[str]:
        self.hashes = []
        for path in self.files:
            sha = hashlib.sha256()
            with open(path, "rb") as f:
                if path.suffix == ".jsonl":
                    texts = self._jsonl(path, _pieces(f, b"\n", sha, progress))
                else:
                    texts = self._text(path, _pieces(f, self.separator.encode(), sha, progress))
                yield from (t for t in texts if t)
            self.hashes.append({"path": str(path), "bytes": path.stat().st_size,
                                "sha256": sha.hexdigest()})


def is_eval(seed: int, index: int, fraction: float) -> bool:
    h = hashlib.blake2b(f"{seed}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") < fraction * 2.0 ** 64


# ----------------------------------------------------------------------------- workers

_TOK = None
_ENDS: tuple[list[int], list[int]] = ([], [])  # ids put before / after every document


def _init_worker(spec: str, ends=([], []), pooled: bool = False) -> None:
    global _TOK, _ENDS
    if pooled:  # one core per worker: no rayon threads inside the tokenizers package
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _TOK, _ENDS = load_tokenizer(spec), ends


def _encode(chunk: list[tuple[bool, str]]) -> list[tuple[bool, np.ndarray, int, int]]:
    """(eval?, token ids with BOS/EOS, UTF-8 bytes of the text, UTF-8 bytes of the decoded
    text tokens (no BOS/EOS); the last only for eval documents, else -1)."""
    texts = [t for _, t in chunk]
    ids = _TOK.encode_batch(texts) if hasattr(_TOK, "encode_batch") else map(_TOK.encode, texts)
    out = []
    for (ev, text), row in zip(chunk, ids):
        dec = len(_TOK.decode(row).encode("utf-8")) if ev else -1
        row = [*_ENDS[0], *row, *_ENDS[1]]
        out.append((ev, np.asarray(row, np.uint32), len(text.encode("utf-8")), dec))
    return out


def _pool_context():
    """fork (workers start at once) unless this process already started a jax backend, whose
    threads a fork would copy mid-flight (a test or notebook): then spawn, which re-imports
    jaxpar in each worker (seconds)."""
    xla_bridge = sys.modules.get("jax._src.xla_bridge")
    started = bool(getattr(xla_bridge, "_backends", None))
    return multiprocessing.get_context("spawn" if started else "fork")


def _chunks(docs: Iterator[str], seed: int, fraction: float):
    chunk, size = [], 0
    for i, text in enumerate(docs):
        chunk.append((is_eval(seed, i, fraction), text))
        size += len(text)
        if size >= CHUNK_BYTES:
            yield chunk
            chunk, size = [], 0
    if chunk:
        yield chunk


class _SplitWriter:
    def __init__(self, folder: Path, name: str, dtype):
        self.folder, self.name, self.dtype = folder, name, dtype
        self.f = open(folder / f"{name}.bin", "wb")
        self.offsets, self.bytes, self.decoded_bytes = [0], 0, 0

    def add(self, ids: np.ndarray, nbytes: int, decoded: int) -> None:
        self.f.write(ids.astype(self.dtype).tobytes())
        self.offsets.append(self.offsets[-1] + len(ids))
        self.bytes += nbytes
        self.decoded_bytes += max(decoded, 0)

    def close(self) -> dict:
        self.f.close()
        np.save(self.folder / f"{self.name}_docs.npy", np.asarray(self.offsets, np.int64))
        info = {"tokens": self.offsets[-1], "documents": len(self.offsets) - 1,
                "text_bytes": self.bytes}
        if self.name == "eval":
            info["decoded_bytes"] = self.decoded_bytes
        return info


# ----------------------------------------------------------------------------- prepare


def prepare(inputs, out, *, tokenizer: str | None = None, train_tokenizer: int = 0,
            field: str = "text", doc_separator: str = "\n\n", eval_fraction: float = 0.05,
            seed: int = 0, workers: int = 1, overwrite: bool = False,
            progress: bool = True, bos: bool | None = None, eos: bool | None = None) -> dict:
    """Tokenize `inputs` into the dataset folder `out`; returns the manifest."""
    if (tokenizer is None) == (not train_tokenizer):
        raise ValueError("give exactly one of --tokenizer (bytes, a tokenizer.json or a "
                         "SentencePiece .model) and --train-tokenizer VOCAB")
    if not 0.0 < eval_fraction < 1.0:
        raise ValueError(f"--eval-fraction={eval_fraction} must be in (0, 1)")
    if workers < 1:
        raise ValueError(f"--workers={workers} must be >= 1")
    out = Path(out)
    if out.exists() and not overwrite:
        raise ValueError(f"--out {out} already exists; pass --overwrite or choose another folder")
    files = input_files(inputs)
    reader = Reader(files, field, doc_separator)
    tok = load_tokenizer(tokenizer) if tokenizer is not None else None
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f"{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        manifest = _prepare_into(tmp, reader, tok, train_tokenizer, eval_fraction, seed,
                                 workers, progress, (bos, eos))
        manifest.update(field=field, doc_separator=doc_separator)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")  # last: marks done
        if out.exists():
            old = out.parent / f"{out.name}.old-{uuid.uuid4().hex[:8]}"
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return read_manifest(out)


def _prepare_into(tmp: Path, reader: Reader, tok, train_vocab: int, eval_fraction: float,
                  seed: int, workers: int, progress: bool, ends=(None, None)) -> dict:
    from tqdm import tqdm

    t0 = time.perf_counter()
    if tok is None:  # --train-tokenizer: a first pass over the training documents
        texts = (t for i, t in enumerate(reader.documents())
                 if not is_eval(seed, i, eval_fraction))
        tok = load_tokenizer(train_bpe(texts, train_vocab, tmp / "tokenizer.json"))
    elif tok.file is not None:  # the dataset carries its own copy (and the special tokens'
        side = tok.file.parent / "tokenizer_config.json"  # names an HF folder keeps beside it)
        if side.is_file():
            shutil.copy(side, tmp / side.name)
        tok = load_tokenizer(shutil.copy(tok.file, tmp / ("tokenizer" + tok.file.suffix)))
    spec = BYTES if tok.file is None else str(tok.file)
    add = special_tokens(tok, *ends)
    ids = ([tok.bos_id] if add[0] else [], [tok.eos_id] if add[1] else [])
    dtype = np.uint16 if tok.vocab_size <= 1 << 16 else np.uint32
    splits = {name: _SplitWriter(tmp, name, dtype) for name in ("train", "eval")}

    total = sum(p.stat().st_size for p in reader.files)
    # on a terminal only (None), and cleared at the end, so an error stays one line
    bar = tqdm(total=total, unit="B", unit_scale=True, desc="prepare", file=sys.stderr,
               disable=None if progress else True, leave=False)
    chunks = _chunks(reader.documents(bar), seed, eval_fraction)
    if workers == 1:
        _init_worker(spec, ids)
        results = map(_encode, chunks)
        pool = None
    else:
        pool = _pool_context().Pool(workers, _init_worker, (spec, ids, True))
        results = pool.imap(_encode, chunks)
    try:
        for encoded in results:
            for ev, ids, nbytes, dec in encoded:
                splits["eval" if ev else "train"].add(ids, nbytes, dec)
    finally:
        if pool is not None:
            pool.terminate()
        bar.close()
    info = {name: w.close() for name, w in splits.items()}
    for name, split in info.items():
        if split["tokens"] == 0:
            raise ValueError(
                "inputs hold no text" if info["train"]["tokens"] + info["eval"]["tokens"] == 0
                else f"the {name} split is empty ({info['train']['documents']} train, "
                     f"{info['eval']['documents']} eval documents); give more documents or "
                     f"change --eval-fraction")
    inputs_hash = hashlib.sha256(json.dumps(reader.hashes).encode()).hexdigest()
    tok_file = tok.file.name if tok.file is not None else None
    tok_hash = (hashlib.sha256((tmp / tok_file).read_bytes()).hexdigest() if tok_file
                else None)
    return {
        "format": FORMAT, "vocab_size": tok.vocab_size, "dtype": np.dtype(dtype).name,
        "tokenizer": {**identity(tok), "file": tok_file, "sha256": tok_hash,
                      "trained_bpe_vocab": train_vocab or None,
                      "add_bos": add[0], "add_eos": add[1]},
        "tokens": info["train"]["tokens"] + info["eval"]["tokens"],
        "documents": info["train"]["documents"] + info["eval"]["documents"],
        "splits": info,
        "split_rule": {"by": "document", "eval_fraction": eval_fraction, "seed": seed,
                       "rule": "document i is eval when blake2b(f'{seed}:{i}') < eval_fraction"},
        "inputs": reader.hashes, "inputs_sha256": inputs_hash,
        "prepare_seconds": round(time.perf_counter() - t0, 3), "workers": workers,
    }


def special_tokens(tok, bos: bool | None, eos: bool | None) -> tuple[bool, bool]:
    """(add BOS, add EOS) per document: the flags, or (None) the tokenizer's own default;
    ValueError when asked for a token the tokenizer does not have."""
    out = []
    for flag, default, have, name in ((bos, tok.adds[0], tok.bos_id, "bos"),
                                      (eos, tok.adds[1], tok.eos_id, "eos")):
        if flag and have is None:
            raise ValueError(f"--{name}: tokenizer {tok.file or 'bytes'} has no {name.upper()} "
                             f"token; use --no-{name}")
        out.append(default if flag is None else flag)
    return out[0], out[1]


def _ends(tok: dict) -> str:
    added = [e.upper() for e in ("bos", "eos") if tok.get(f"add_{e}")]
    return f"; {' and '.join(added)} per document" if added else ""


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="jaxpar-prepare", description=__doc__.splitlines()[0])
    ap.add_argument("inputs", nargs="+", help="text files, folders, or .jsonl files")
    ap.add_argument("--tokenizer", help="bytes | path/tokenizer.json | path/sentencepiece.model")
    ap.add_argument("--train-tokenizer", type=int, default=0, metavar="VOCAB",
                    help="train a byte-level BPE of this vocabulary size on the inputs first")
    ap.add_argument("--out", required=True, help="the dataset folder to create")
    ap.add_argument("--field", default="text", help="JSONL: the key holding the text")
    ap.add_argument("--doc-separator", default="\n\n",
                    help="text files: split into documents here ('' = one per file)")
    ap.add_argument("--eval-fraction", type=float, default=0.05)
    ap.add_argument("--seed", type=int, default=0, help="seed of the train/eval split")
    ap.add_argument("--workers", type=int, default=max(1, min(8, os.cpu_count() or 1)))
    ap.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    for end, where in (("bos", "before"), ("eos", "after")):
        ap.add_argument(f"--{end}", action=argparse.BooleanOptionalAction, default=None,
                        help=f"put the tokenizer's {end.upper()} {where} every document "
                             f"(default: what the tokenizer itself adds)")
    args = ap.parse_args(argv)
    try:
        m = prepare(args.inputs, args.out, tokenizer=args.tokenizer,
                    train_tokenizer=args.train_tokenizer, field=args.field,
                    doc_separator=args.doc_separator, eval_fraction=args.eval_fraction,
                    seed=args.seed, workers=args.workers, overwrite=args.overwrite,
                    progress=not args.quiet, bos=args.bos, eos=args.eos)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    s = m["splits"]
    print(f"{args.out}: {m['tokens']} tokens in {m['documents']} documents "
          f"(train {s['train']['tokens']}, eval {s['eval']['tokens']}), vocab {m['vocab_size']} "
          f"({m['tokenizer']['kind']}{_ends(m['tokenizer'])}), {m['prepare_seconds']:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
