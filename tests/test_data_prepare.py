"""Preparing datasets (bytes, a trained BPE, SentencePiece, JSONL) and reading them back:
tokens against numpy/tokenizer references, the split rule, atomic output, one-line errors,
and the sharded batch of `Run.batch` against a batch assembled by hand from the files."""
import json
from pathlib import Path

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxpar.attention.layout import zigzag_indices
from jaxpar.data import DEFAULT_CORPUS, feed
from jaxpar.data import prepare as prep
from jaxpar.data.tokenizer import load_tokenizer
from jaxpar.data.tokens import TokenDataset
from jaxpar.train.__main__ import main as train_main

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """The first ~60 KB of the bundled corpus (about 500 documents)."""
    path = tmp_path_factory.mktemp("corpus") / "small.txt"
    text = DEFAULT_CORPUS.read_text()[:60_000]
    path.write_text(text[:text.rindex("\n\n")])
    return path


def docs_of(path: Path) -> list[str]:
    return [d for d in path.read_text().split("\n\n") if d]


def expected_split(n_docs, fraction=0.05, seed=0):
    return [prep.is_eval(seed, i, fraction) for i in range(n_docs)]


def check_dataset(out: Path, docs: list[str], tok) -> dict:
    """Every document's tokens are the tokenizer's encoding, in input order, in its split."""
    m = json.loads((out / "manifest.json").read_text())
    ev = expected_split(len(docs))
    for name, want in (("train", False), ("eval", True)):
        tokens = np.fromfile(out / f"{name}.bin", dtype=m["dtype"])
        offsets = np.load(out / f"{name}_docs.npy")
        ref = [tok.encode(d) for d, e in zip(docs, ev) if e == want]
        assert len(offsets) == len(ref) + 1 and offsets[-1] == len(tokens)
        for i, r in enumerate(ref):
            assert tokens[offsets[i]:offsets[i + 1]].tolist() == r
        assert m["splits"][name]["documents"] == len(ref)
        assert m["splits"][name]["tokens"] == len(tokens)
    assert m["documents"] == len(docs) and 0 < m["splits"]["eval"]["documents"] < len(docs)
    return m


def test_prepare_bytes_matches_the_utf8_bytes(corpus, tmp_path, monkeypatch):
    m = prep.prepare([corpus], tmp_path / "ds", tokenizer="bytes", progress=False)
    # files are read in blocks: 5-byte blocks (cutting separators and characters) give the
    # same dataset
    monkeypatch.setattr(prep, "BLOCK_BYTES", 5)
    m5 = prep.prepare([corpus], tmp_path / "ds5", tokenizer="bytes", progress=False)
    for f in ("train.bin", "eval.bin", "train_docs.npy", "eval_docs.npy"):
        assert (tmp_path / "ds" / f).read_bytes() == (tmp_path / "ds5" / f).read_bytes()
    assert m5["inputs"] == m["inputs"]
    docs = docs_of(corpus)
    check_dataset(tmp_path / "ds", docs, load_tokenizer("bytes"))
    assert m["vocab_size"] == 256 and m["dtype"] == "uint16" and m["tokenizer"]["file"] is None
    assert m["splits"]["eval"]["decoded_bytes"] == m["splits"]["eval"]["tokens"]
    assert m["inputs"][0]["sha256"] == __import__("hashlib").sha256(corpus.read_bytes()).hexdigest()
    assert not list(tmp_path.glob("ds.tmp-*"))


def test_train_tokenizer_bpe(corpus, tmp_path):
    m = prep.prepare([corpus], tmp_path / "bpe", train_tokenizer=400, progress=False)
    tok = load_tokenizer(tmp_path / "bpe" / "tokenizer.json")
    assert m["vocab_size"] == tok.vocab_size == 400 and m["tokenizer"]["kind"] == "hf"
    docs = docs_of(corpus)
    check_dataset(tmp_path / "bpe", docs, tok)
    assert tok.decode(tok.encode(docs[3])) == docs[3]  # byte-level BPE round-trips
    assert load_tokenizer(tmp_path / "bpe").encode(docs[3]) == tok.encode(docs[3])  # a folder
    # BPE compresses: fewer tokens than bytes; the eval bytes come from decoding
    assert m["tokens"] < 0.7 * sum(len(d.encode()) for d in docs)
    assert m["splits"]["eval"]["decoded_bytes"] == m["splits"]["eval"]["text_bytes"]


@pytest.mark.slow
def test_two_workers_give_the_same_dataset(corpus, tmp_path):
    """A worker pool (spawned here: this process runs jax) writes the 1-worker dataset."""
    prep.prepare([corpus], tmp_path / "one", train_tokenizer=400, progress=False)
    prep.prepare([corpus], tmp_path / "two", tokenizer=str(tmp_path / "one/tokenizer.json"),
                 workers=2, progress=False)
    for f in ("train.bin", "eval.bin", "train_docs.npy", "eval_docs.npy", "tokenizer.json"):
        assert (tmp_path / "one" / f).read_bytes() == (tmp_path / "two" / f).read_bytes()


def test_sentencepiece_and_jsonl_field(corpus, tmp_path, monkeypatch):
    import sentencepiece as spm

    monkeypatch.setattr(prep, "BLOCK_BYTES", 7)  # JSON lines cut across read blocks
    spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(tmp_path / "sp"),
                                   vocab_size=600, byte_fallback=True, minloglevel=2,
                                   character_coverage=0.98)
    docs = docs_of(corpus)
    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text("".join(json.dumps({"id": i, "body": d}) + "\n" for i, d in enumerate(docs)))
    m = prep.prepare([jsonl], tmp_path / "sp_ds", tokenizer=str(tmp_path / "sp.model"),
                     field="body", progress=False)
    assert m["vocab_size"] == 600 and m["tokenizer"]["file"] == "tokenizer.model"
    check_dataset(tmp_path / "sp_ds", docs, load_tokenizer(tmp_path / "sp.model"))


def test_folder_input_one_document_per_file(tmp_path):
    (tmp_path / "in").mkdir()
    for i in range(40):
        (tmp_path / "in" / f"{i:02d}.txt").write_text(f"file {i}\n\nstill file {i}")
    m = prep.prepare([tmp_path / "in"], tmp_path / "ds", tokenizer="bytes", doc_separator="",
                     progress=False)
    assert m["documents"] == 40 and len(m["inputs"]) == 40


def test_a_failed_prepare_leaves_nothing_that_looks_whole(corpus, tmp_path, monkeypatch):
    calls = []

    def encode_then_fail(chunk):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("killed")
        return real(chunk)
    real = prep._encode
    monkeypatch.setattr(prep, "CHUNK_BYTES", 4096)
    monkeypatch.setattr(prep, "_encode", encode_then_fail)
    with pytest.raises(RuntimeError, match="killed"):
        prep.prepare([corpus], tmp_path / "ds", tokenizer="bytes", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == []
    # an existing dataset stays untouched by a failed --overwrite
    monkeypatch.setattr(prep, "_encode", real)
    prep.prepare([corpus], tmp_path / "ds", tokenizer="bytes", progress=False)
    before = (tmp_path / "ds/train.bin").read_bytes()
    calls.clear()
    monkeypatch.setattr(prep, "_encode", encode_then_fail)
    with pytest.raises(RuntimeError):
        prep.prepare([corpus], tmp_path / "ds", tokenizer="bytes", overwrite=True,
                     progress=False)
    assert (tmp_path / "ds/train.bin").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds"]


def one_line_error(capsys, fn, argv, *words):
    if fn is prep.main:
        argv = argv + ["--workers", "1", "--quiet"]
    assert fn(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    for w in words:
        assert w in err, err


def test_bad_prepare_inputs_are_one_line_exit_2(corpus, tmp_path, capsys):
    out = str(tmp_path / "out")
    one_line_error(capsys, prep.main, [str(corpus), "--tokenizer", str(tmp_path / "no.json"),
                                       "--out", out], "tokenizer", "does not exist")
    (tmp_path / "empty.txt").write_text("")
    one_line_error(capsys, prep.main, [str(tmp_path / "empty.txt"), "--tokenizer", "bytes",
                                       "--out", out], "no text")
    (tmp_path / "bad.jsonl").write_text('{"text": "a"}\n{"body": "b"}\n')
    one_line_error(capsys, prep.main, [str(tmp_path / "bad.jsonl"), "--tokenizer", "bytes",
                                       "--out", out], "bad.jsonl:2", "'text'", "--field")
    (tmp_path / "latin1.txt").write_bytes("ok\n\ncaf\xe9 ol\xe9\n".encode("latin-1"))
    one_line_error(capsys, prep.main, [str(tmp_path / "latin1.txt"), "--tokenizer", "bytes",
                                       "--out", out], "latin1.txt", "not UTF-8", "byte 7")
    one_line_error(capsys, prep.main, [str(corpus), "--out", out], "--tokenizer",
                   "--train-tokenizer")
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob("out.tmp-*"))


def test_bad_dataset_in_a_run_is_one_line_exit_2(corpus, tmp_path, capsys):
    prep.prepare([corpus], tmp_path / "bpe", train_tokenizer=300, progress=False)
    base = [str(ROOT / "configs/base.yaml"), f"train.run_dir={tmp_path / 'run'}"]
    one_line_error(capsys, train_main, base + [f"data.path={tmp_path / 'bpe'}", "model.vocab=256"],
                   "model.vocab=256", ">= 300", "manifest")
    (tmp_path / "half").mkdir()  # what a killed prepare leaves (renamed by hand)
    (tmp_path / "half/train.bin").write_bytes(b"\0" * 64)
    one_line_error(capsys, train_main, base + [f"data.path={tmp_path / 'half'}"],
                   "data.path", "manifest.json")


def test_sharded_batch_reads_only_its_rows_and_matches_the_files(corpus, tmp_path):
    """TokenDataset through feed.place on a (data 2, seq 2, tensor 2) mesh, zigzag 2: the
    global batch equals windows cut by hand from train.bin with segment ids and positions
    from the document offsets; each step reads exactly B windows; one epoch of the grain
    shuffle is a permutation of the windows."""
    prep.prepare([corpus], tmp_path / "ds", tokenizer="bytes", progress=False)
    N, B = 32, 4
    ds = TokenDataset(tmp_path / "ds", seq_len=N, seed=3)
    tokens = np.fromfile(tmp_path / "ds/train.bin", np.uint16).astype(np.int64)
    offsets = np.load(tmp_path / "ds/train_docs.npy")
    mesh = jax.make_mesh((2, 2, 2), ("data", "seq", "tensor"))
    sh = NamedSharding(mesh, P("data", ("seq", "tensor")))
    for step in (1, 2, 7):
        before = ds.reads
        read = lambda ix, rows: ds.train_rows(step, 0, rows, B)
        got = {k: np.asarray(v) for k, v in feed.place(read, (B, N), sh, zigzag=2).items()}
        assert ds.reads - before == B
        starts = [ds.dataset._shuffled_index((step - 1) * B + r) * N for r in range(B)]
        win = np.stack([tokens[s:s + N + 1] for s in starts])
        doc = np.stack([np.searchsorted(offsets, np.arange(s, s + N), side="right")
                        for s in starts])
        seg = doc - doc[:, :1]
        pos = np.stack([[i - max(j for j in range(i + 1) if j == 0 or d[j] != d[j - 1])
                         for i in range(N)] for d in doc])
        z = zigzag_indices(N, 2)
        np.testing.assert_array_equal(got["tokens"], win[:, :-1][:, z])
        np.testing.assert_array_equal(got["targets"], win[:, 1:][:, z])
        np.testing.assert_array_equal(got["segment_ids"], seg[:, z])
        np.testing.assert_array_equal(got["positions"], pos[:, z])
    n = len(ds.train)
    assert sorted(ds.dataset._shuffled_index(k) for k in range(n)) == list(range(n))
    assert [ds.dataset._shuffled_index(k) % n for k in range(n, 2 * n)] != \
        [ds.dataset._shuffled_index(k) for k in range(n)]  # a new order each epoch
