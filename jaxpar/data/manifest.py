"""The manifest of a prepared dataset folder, and what a data path is.

A data path is a prepared dataset (a folder with `manifest.json`), a raw text file or a
folder of raw text files (read as bytes, the demo), or None (the bundled corpus, bytes).
No jax here: the config checks call it before anything is built.
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
    return man


def data_vocab(path) -> int:
    """Vocabulary size of the data at `path` (bytes: 256)."""
    if path is None:
        return BYTE_VOCAB
    p = Path(path)
    return read_manifest(p)["vocab_size"] if looks_prepared(p) else BYTE_VOCAB
