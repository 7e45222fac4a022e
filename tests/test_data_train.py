"""Prepared datasets in runs: prepare -> train -> resume with bytes, a BPE (`tokenizers`) and
SentencePiece; batches a pure function of (seed, step); bits per byte from the decoded eval
text; a killed prepare; 2 processes each reading half of every batch."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from jaxpar.data import DEFAULT_CORPUS
from jaxpar.data import prepare as prep
from jaxpar.data.tokens import TokenDataset
from jaxpar.train.config import load_config
from jaxpar.train.loop import Run
from jaxpar.train.run import train

ROOT = Path(__file__).resolve().parent.parent
TINY = ["train.batch_size=4", "train.seq_len=32", "model.layers=1", "model.embed=32",
        "model.heads=4", "model.kv_heads=2", "model.mlp=64", "train.log_every=1",
        "eval.batches=2", "eval.sample_bytes=12"]
SP_MESH = ["mesh.data=2", "mesh.seq=2", "mesh.tensor=2", "attention.impl=ring"]


def small_corpus(tmp_path) -> Path:
    text = DEFAULT_CORPUS.read_text()[:60_000]
    path = tmp_path / "small.txt"
    path.write_text(text[:text.rindex("\n\n")])
    return path


def dataset(tmp_path, kind: str) -> Path:
    corpus, out = small_corpus(tmp_path), tmp_path / kind
    if kind == "bytes":
        prep.prepare([corpus], out, tokenizer="bytes", progress=False)
    elif kind == "bpe":
        prep.prepare([corpus], out, train_tokenizer=512, progress=False)
    else:
        import sentencepiece as spm

        spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(tmp_path / "sp"),
                                       vocab_size=512, byte_fallback=True, minloglevel=2,
                                       character_coverage=0.98)
        prep.prepare([corpus], out, tokenizer=str(tmp_path / "sp.model"), progress=False)
    return out


def cfg_for(data, run_dir, extra=(), mesh=SP_MESH):
    return load_config(ROOT / "configs/base.yaml", TINY + mesh + [f"data.path={data}",
                                                           f"train.run_dir={run_dir}", *extra])


def test_batches_are_a_function_of_seed_and_step(tmp_path):
    """Two Runs over the same prepared data give the same batch for the same step (what a
    resumed run relies on), another seed gives another one; model.vocab comes from the
    manifest."""
    data = dataset(tmp_path, "bpe")
    a = Run.create(cfg_for(data, tmp_path / "a"))
    b = Run.create(cfg_for(data, tmp_path / "b"))
    c = Run.create(cfg_for(data, tmp_path / "c", ["train.seed=1"]))
    assert a.cfg.model.vocab == 512
    for step in (1, 5):
        ba, bb, bc = (np.asarray(r.batch(step)["tokens"]) for r in (a, b, c))
        np.testing.assert_array_equal(ba, bb)
        assert not np.array_equal(ba, bc)
    assert not np.array_equal(np.asarray(a.batch(1)["tokens"]), np.asarray(a.batch(2)["tokens"]))


def losses(run_dir) -> dict:
    out = {}
    for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        for k in ("loss", "eval_loss", "eval_bpb"):
            if k in rec:
                out[(rec["step"], k)] = rec[k]
    return out


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["bytes", "sentencepiece"])
def test_prepare_train_resume(tmp_path, kind):
    """A finished 4-step run loses its last checkpoint; the same config resumes from step 2
    and recomputes steps 3-4 exactly. eval_bpb = eval nats/ln2 over the targets' bytes;
    the sample decodes to text. (BPE: the SIGKILL test below.)"""
    data = dataset(tmp_path, kind)
    cfg = cfg_for(data, tmp_path / "run", ["train.steps=4", "checkpoint.every=2",
                                           "checkpoint.keep=3", "eval.every=2"],
                  mesh=["mesh.data=8", "train.batch_size=8"])
    first = train(cfg)
    before = losses(tmp_path / "run")
    shutil.rmtree(tmp_path / "run/checkpoints/4")
    second = train(cfg)
    after = losses(tmp_path / "run")
    for step in (3, 4):
        assert abs(before[(step, "loss")] - after[(step, "loss")]) <= 1e-6
    assert abs(first["final_eval_loss"] - second["final_eval_loss"]) <= 1e-6
    # bits per byte: the eval's nats over the bytes of exactly its targets (test_data_bpb.py)
    nbytes = TokenDataset(data, seq_len=32).eval_target_bytes(8, 2)
    want = first["final_eval_loss"] * 8 * 2 * 32 / np.log(2) / nbytes
    assert abs(first["final_eval_bpb"] - want) < 1e-6
    assert first["config"]["model"]["vocab"] == (256 if kind == "bytes" else 512)
    assert first["sample"].startswith("Return the") and len(first["sample"].encode()) > 12


@pytest.mark.slow
def test_killed_prepare_leaves_no_dataset(tmp_path):
    """SIGKILL while tokenizing: DIR never appears; the DIR.tmp-* left behind has no manifest
    and a run refuses it in one line."""
    big = tmp_path / "big.txt"
    big.write_text(DEFAULT_CORPUS.read_text() * 4)
    prep.prepare([small_corpus(tmp_path)], tmp_path / "tok", train_tokenizer=2048,
                 progress=False)
    out = tmp_path / "ds"
    proc = subprocess.Popen([sys.executable, "-m", "jaxpar.data.prepare", str(big), "--quiet",
                             "--tokenizer", str(tmp_path / "tok/tokenizer.json"), "--out",
                             str(out), "--workers", "1"], env=dict(os.environ, JAX_PLATFORMS="cpu"))
    t0 = time.monotonic()
    while not any(p.stat().st_size for p in tmp_path.glob("ds.tmp-*/train.bin")):
        assert proc.poll() is None and time.monotonic() - t0 < 120
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    assert not out.exists()
    (tmp,) = tmp_path.glob("ds.tmp-*")
    assert not (tmp / "manifest.json").exists()
    r = subprocess.run([sys.executable, "-m", "jaxpar.train", str(ROOT / "configs/base.yaml"),
                        f"data.path={tmp}", f"train.run_dir={tmp_path / 'run'}"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1
    assert "manifest.json" in r.stderr


def worker_cmd(data, out):
    return [sys.executable, str(ROOT / "tests/data_multiprocess_worker.py"), str(data), str(out)]


@pytest.mark.slow
def test_two_processes_each_read_half(tmp_path):
    """2 processes × 4 devices, batch split over mesh.data=2 across the processes: each reads
    B/2 windows per batch, and the assembled global batches equal 1 process × 8 devices'."""
    data = dataset(tmp_path, "bpe")
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS="--xla_force_host_platform_device_count=8")
    subprocess.run(worker_cmd(data, tmp_path / "one"), env=env, check=True, timeout=600)
    r = subprocess.run([sys.executable, str(ROOT / "scripts/launch.py"), "-n", "2",
                        "--log-dir", str(tmp_path / "logs"), "--timeout", "600", "--"]
                       + worker_cmd(data, tmp_path / "two"), env=env, capture_output=True,
                       text=True, timeout=700)
    assert r.returncode == 0, (tmp_path / "logs/process_1.log").read_text()[-3000:]
    one = json.loads((tmp_path / "one_0.json").read_text())
    assert one["reads_per_batch"] == 8  # batch_size
    for p in (0, 1):
        two = json.loads((tmp_path / f"two_{p}.json").read_text())
        assert two["reads_per_batch"] == 4, two
        assert two["batches"] == one["batches"]
        assert two["eval_reads"] == one["eval_reads"] // 2


@pytest.mark.slow
def test_bpe_prepare_train_sigkill_resume_is_identical(tmp_path):
    """jaxpar-prepare (a trained BPE) -> `python -m jaxpar.train` on data 2 x seq 2 x tensor 2
    with ring attention, SIGKILLed at a seeded moment (after a seeded step); the same command
    then runs to the end: every step's loss and every eval equal a run never killed (1e-6)."""
    import random

    from test_train_kill import env, losses, run_to_end, wait_for

    data = dataset(tmp_path, "bpe")
    steps, rng = 24, random.Random(23)

    def cmd(run_dir):
        return [sys.executable, "-m", "jaxpar.train", str(ROOT / "configs" / "base.yaml"),
                *TINY, *SP_MESH, f"data.path={data}", f"train.run_dir={run_dir}",
                "eval.sample_bytes=0", f"train.steps={steps}", "checkpoint.every=2",
                "checkpoint.keep=2", "eval.every=8"]
    ref = tmp_path / "ref"
    run_to_end(cmd(ref))
    d = tmp_path / "run"
    proc = subprocess.Popen(cmd(d), env=env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, start_new_session=True)
    try:
        at = rng.randint(3, 15)
        wait_for(proc, lambda: max(losses(d)[0], default=0) >= at)
        time.sleep(rng.uniform(0.0, 0.2))
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert max(losses(d)[0], default=0) < steps, "finished before the kill"
    run_to_end(cmd(d))
    (want, want_ev), (got, got_ev) = losses(ref), losses(d)
    assert sorted(got) == list(range(1, steps + 1)) and sorted(got_ev) == sorted(want_ev)
    for s in want:
        assert abs(want[s] - got[s]) <= 1e-6, (s, want[s], got[s])
    for s in want_ev:
        assert abs(want_ev[s] - got_ev[s]) <= 1e-6, (s, want_ev[s], got_ev[s])
