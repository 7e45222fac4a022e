"""`scripts/launch.py -n 2`: the same run as 2 processes × 4 CPU devices (jax.distributed +
gloo) gives the same losses as 1 process × 8 devices; a failing process stops the group."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
ARGS = ["train.steps=4", "train.log_every=1", "train.batch_size=4", "train.seq_len=32",
        "model.layers=2", "model.embed=32", "model.heads=4", "model.kv_heads=2",
        "model.mlp=64", "checkpoint.every=2", "eval.every=2", "eval.sample_bytes=4",
        "mesh.replica=2", "mesh.seq=2", "mesh.tensor=2", "attention.impl=tokenring",
        "overlap.mode=collective_matmul", "diloco.enabled=true", "diloco.sync_every=2",
        "diloco.num_fragments=2", "diloco.quantize=fp4_e3m0"]


def losses(run_dir):
    out = {}
    for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        out[(rec["step"], "loss" if "loss" in rec else "eval_loss")] = rec.get(
            "loss", rec.get("eval_loss"))
    return out


def env(devices):
    return dict(os.environ, JAX_PLATFORMS="cpu",
                XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")


def train_cmd(run_dir):
    return [sys.executable, "-m", "jaxpar.train", str(ROOT / "configs/base.yaml"),
            f"train.run_dir={run_dir}"] + ARGS


@pytest.mark.slow
def test_two_processes_equal_one(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    subprocess.run(train_cmd(one), env=env(8), check=True, capture_output=True, timeout=600)
    r = subprocess.run([sys.executable, str(ROOT / "scripts/launch.py"), "-n", "2",
                        "--log-dir", str(tmp_path / "logs"), "--timeout", "900", "--"]
                       + train_cmd(two), env=env(8), capture_output=True, text=True,
                       timeout=1000)
    assert r.returncode == 0, r.stderr + (tmp_path / "logs/process_1.log").read_text()[-3000:]
    assert (tmp_path / "logs/process_0.log").exists() and (tmp_path / "logs/process_1.log").exists()
    a, b = losses(one), losses(two)
    assert a.keys() == b.keys() and len(a) == 6
    for k in a:
        assert abs(a[k] - b[k]) <= 1e-5, (k, a[k], b[k])


def test_launch_stops_the_group_when_one_process_fails(tmp_path):
    # process 1 fails at once; process 0 would sleep for a minute: the group is stopped
    code = ("import os, sys, time\n"
            "if os.environ['JAXPAR_PROCESS_ID'] == '1': sys.exit(3)\n"
            "time.sleep(60)\n")
    r = subprocess.run([sys.executable, str(ROOT / "scripts/launch.py"), "-n", "2",
                        "--log-dir", str(tmp_path), "--", sys.executable, "-c", code],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 3
    assert "process 1 exited with 3" in r.stderr


def test_launch_timeout(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "scripts/launch.py"), "-n", "2",
                        "--log-dir", str(tmp_path), "--timeout", "1", "--", sys.executable,
                        "-c", "import time; time.sleep(60)"],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 124 and "timeout" in r.stderr
