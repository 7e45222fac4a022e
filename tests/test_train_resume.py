"""A run killed with SIGKILL after a checkpoint, started again with the same command, gives
the same per-step losses as a run never killed (fp32, <= 1e-6) — DiLoCo included: outer
state, the pending fragment and the data position all come back from the checkpoint."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from jaxpar.train.config import load_config
from jaxpar.train.run import train

ROOT = Path(__file__).resolve().parent.parent
STEPS = 24


def command(run_dir, extra):
    return [sys.executable, "-m", "jaxpar.train", str(ROOT / "configs" / "base.yaml"),
            f"train.run_dir={run_dir}", f"train.steps={STEPS}", "train.log_every=1",
            "train.batch_size=4", "train.seq_len=32", "model.layers=2", "model.embed=32",
            "model.heads=4", "model.kv_heads=2", "model.mlp=64", "checkpoint.every=4",
            "checkpoint.keep=2", "eval.every=8", "eval.sample_bytes=0"] + extra


def env():
    e = dict(os.environ, JAX_PLATFORMS="cpu")
    e["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    return e


def train_losses(run_dir) -> dict[int, float]:
    out = {}
    for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if "loss" in rec:
            out[rec["step"]] = rec["loss"]
    return out


def finished_checkpoints(run_dir) -> list[int]:
    ck = Path(run_dir) / "checkpoints"
    return sorted(int(p.name) for p in ck.iterdir() if p.name.isdigit()) if ck.exists() else []


def kill_after_checkpoint(cmd, run_dir, timeout=300):
    proc = subprocess.Popen(cmd, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    t0 = time.monotonic()
    while not finished_checkpoints(run_dir):
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        assert time.monotonic() - t0 < timeout
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL


def check_resume(tmp_path, extra):
    ref_dir, dir_ = tmp_path / "never_killed", tmp_path / "killed"
    subprocess.run(command(ref_dir, extra), env=env(), check=True, capture_output=True,
                   timeout=600)
    kill_after_checkpoint(command(dir_, extra), dir_)
    killed_at = max(train_losses(dir_))
    assert killed_at < STEPS, "the run finished before it could be killed"
    r = subprocess.run(command(dir_, extra), env=env(), capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "resumed from" in r.stdout
    ref, got = train_losses(ref_dir), train_losses(dir_)
    assert sorted(got) == list(range(1, STEPS + 1))
    for step in ref:
        assert abs(ref[step] - got[step]) <= 1e-6, (step, ref[step], got[step])
    evals = lambda d: [json.loads(ln) for ln in (Path(d) / "metrics.jsonl").read_text()
                       .splitlines() if "eval_loss" in ln]
    assert [e["step"] for e in evals(dir_)] == [8, 16, 24]
    for a, b in zip(evals(ref_dir), evals(dir_)):
        assert abs(a["eval_loss"] - b["eval_loss"]) <= 1e-6


@pytest.mark.slow
def test_resume_after_sigkill_with_diloco(tmp_path):
    # τ=1: a checkpoint at step 4 (fragment 1 synced at t=4) holds a pending merge
    check_resume(tmp_path, ["mesh.replica=2", "mesh.seq=2", "mesh.tensor=2",
                            "attention.impl=ring", "diloco.enabled=true",
                            "diloco.sync_every=4", "diloco.num_fragments=2",
                            "diloco.overlap_steps=1", "diloco.alpha=0.5",
                            "diloco.quantize=fp4_e3m0"])


@pytest.mark.slow
def test_resume_after_sigkill(tmp_path):
    check_resume(tmp_path, ["mesh.data=2", "mesh.seq=2", "mesh.tensor=2",
                            "attention.impl=tokenring", "overlap.mode=collective_matmul"])


@pytest.mark.slow
def test_resume_in_process_from_a_pending_diloco_merge(tmp_path):
    """In process (no SIGKILL): a finished run loses its last checkpoint, and the same
    config resumes from step 4 — where a DiLoCo merge is pending (τ=1) — and recomputes
    steps 5 and 6 exactly."""
    args = [a for a in command(tmp_path, [])[4:] if not a.startswith("train.steps")]
    args += ["train.steps=6", "checkpoint.every=2", "checkpoint.keep=3", "eval.every=0",
             "mesh.replica=2", "mesh.data=4", "attention.impl=dense",
             "diloco.enabled=true", "diloco.sync_every=4", "diloco.num_fragments=2",
             "diloco.overlap_steps=1", "diloco.alpha=0.5", "diloco.quantize=fp4_e3m0"]
    cfg = load_config(ROOT / "configs" / "base.yaml", args)
    first = train(cfg, quiet=False)
    before = train_losses(tmp_path)
    assert sorted(before) == list(range(1, 7))
    assert finished_checkpoints(tmp_path) == [2, 4, 6]
    import shutil
    shutil.rmtree(tmp_path / "checkpoints" / "6")
    second = train(cfg)
    after = train_losses(tmp_path)
    assert sorted(after) == list(range(1, 7))
    for step in (5, 6):
        assert abs(before[step] - after[step]) <= 1e-6, (step, before[step], after[step])
    assert abs(first["final_eval_loss"] - second["final_eval_loss"]) <= 1e-6
