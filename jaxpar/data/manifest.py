"""The manifest of a prepared dataset folder, and what a data path is.

A data path is a prepared dataset (a folder with `manifest.json`), a raw text file or a
folder of raw text files (read as bytes, the demo), or None (the bundled corpus, bytes).
No jax here: the config checks call it before anything is built.

`check_tokens` is the guard that a run trains on the tokens its model means: the rules
(and the one override, `data.tokenizer_mismatch`) are in docs/data.md.
"""
from __future__ import annotations

import json
from pathlib import Path

FORMAT = "jaxpar-tokens-v1"
MANIFEST = "manifest.json"
DATA_FILES = ("train.bin", "eval.bin", "train_docs.npy", "eval_docs.npy")
BYTE_VOCAB = 256


def looks_prepared(path: Path) -> bool:
    """A folder that holds (part of) a prepared dataset, finished or not."""
    return path.is_dir() and (any((path / f).exists() for f in DATA_FILES + (MANIFEST,))
                              or ".tmp-" in path.name)


def read_manifest(path) -> dict:
    """The manifest of the dataset folder `path`; ValueError (one line) if it is not one."""
    path = Path(path)
    m = path / MANIFEST
    if not m.is_file():
        raise ValueError(f"{path} has no {MANIFEST}: not a finished prepared dataset "
                         f"(an interrupted `python -m jaxpar.data.prepare`?); prepare it again")
    try:
        man = json.loads(m.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{m} is not valid JSON ({e.msg}); prepare the dataset again") from None
    if man.get("format") != FORMAT:
        raise ValueError(f"{m}: format {man.get('format')!r} is not {FORMAT!r}; prepare the "
                         f"dataset again with this version")
    missing = [f for f in DATA_FILES if not (path / f).is_file()]
    if missing:
        raise ValueError(f"dataset {path} lacks {', '.join(missing)}; prepare it again")
    tok = (man.get("tokenizer") or {}).get("file")
    if tok and not (path / tok).is_file():
        raise ValueError(f"dataset {path} lacks its tokenizer {tok} (the manifest names it); "
                         f"copy it back or prepare the dataset again")
    return man


def data_vocab(path) -> int:
    """Vocabulary size of the data at `path` (bytes: 256)."""
    if path is None:
        return BYTE_VOCAB
    p = Path(path)
    return read_manifest(p)["vocab_size"] if looks_prepared(p) else BYTE_VOCAB


HF_TOKENIZER_FILES = {"hf": "tokenizer.json", "sentencepiece": "tokenizer.model"}
_WHY = "or set data.tokenizer_mismatch='<why>' if this is deliberate (docs/data.md)"


def _describe(file: Path) -> str:
    from jaxpar.data.tokenizer import content_sha256

    return f"{file} (sha256 {content_sha256(file)[:12]})"


def check_tokens(path, *, model_vocab: int, init_from: str = "", reason: str = "") -> None:
    """The data at `path` holds the token ids the model means; ValueError (one line) naming
    both sides unless `reason` (data.tokenizer_mismatch) says why they may differ.

    With `init_from` (an HF folder that has tokenizer.json / tokenizer.model) the dataset
    must be prepared with that tokenizer (same content hash), and byte data is refused; an
    HF folder without tokenizer files has nothing to compare (a model exported from a bytes
    run). Without it, a `model_vocab` larger than the data's needs a reason (ids past the
    data's are never trained: usually a typo)."""
    if reason:
        return
    prepared = path is not None and looks_prepared(Path(path))
    man = read_manifest(path) if prepared else {"vocab_size": BYTE_VOCAB,
                                                "tokenizer": {"kind": "bytes", "file": None}}
    tok = man["tokenizer"]
    if init_from:
        folder = Path(init_from)
        theirs = [folder / f for f in HF_TOKENIZER_FILES.values() if (folder / f).is_file()]
        if not theirs:
            return
        if tok["file"] is None:
            raise ValueError(f"data.path={path!r} is read as bytes (ids 0..255) but model."
                             f"init_from={init_from!r} has its own tokenizer {theirs[0].name}; "
                             f"prepare the data with it (jaxpar-prepare INPUT --tokenizer "
                             f"{init_from} --out DIR) {_WHY}")
        ours = Path(path) / tok["file"]
        same_kind = folder / HF_TOKENIZER_FILES[tok["kind"]]
        from jaxpar.data.tokenizer import content_sha256

        if not same_kind.is_file() or content_sha256(same_kind) != content_sha256(ours):
            other = same_kind if same_kind.is_file() else theirs[0]
            raise ValueError(f"data.path={path!r} was prepared with tokenizer {_describe(ours)}"
                             f" but model.init_from has {_describe(other)}: not the same "
                             f"tokenizer; prepare the data again with --tokenizer {init_from} "
                             f"{_WHY}")
        return
    if model_vocab > man["vocab_size"]:
        raise ValueError(f"model.vocab={model_vocab} is larger than the data's vocabulary "
                         f"{man['vocab_size']} ({tok['kind']}; data.path={path!r}): ids past it "
                         f"are never seen; leave model.vocab unset (0) {_WHY}")
