"""Real `python -m jaxpar.train` processes: SIGTERM stops after a checkpoint of the
current step (exit 0) and SIGKILL at seeded random moments — between steps, while a
checkpoint is being written, around an eval — and after each the same command goes on:
per-step and eval losses equal a run never interrupted (fp32, <= 1e-6); a DiLoCo run as 2
processes equals the 1-process run and resumes in 1 process (<= 1e-5)."""
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

PLAIN = ["mesh.data=4", "mesh.tensor=2"]
DILOCO = ["mesh.replica=2", "mesh.data=2", "mesh.tensor=2", "diloco.enabled=true",
          "diloco.sync_every=4", "diloco.num_fragments=2", "diloco.overlap_steps=1"]
STEPS = 12


def cmd(run_dir, extra):
    """The training command of every run here: a tiny decoder, 12 steps, a checkpoint every
    2 steps (the newest 2 kept), an eval every 3; `extra` picks the mesh and DiLoCo."""
    return [sys.executable, "-m", "jaxpar.train", str(ROOT / "configs" / "base.yaml"),
            f"train.run_dir={run_dir}", "train.log_every=1", "train.batch_size=4",
            "train.seq_len=32", "model.layers=2", "model.embed=32", "model.heads=4",
            "model.kv_heads=2", "model.mlp=64", "eval.sample_bytes=0", *extra,
            f"train.steps={STEPS}", "checkpoint.every=2", "checkpoint.keep=2", "eval.every=3"]


def env():
    return dict(os.environ, JAX_PLATFORMS="cpu",
                XLA_FLAGS="--xla_force_host_platform_device_count=8")


def lines(run_dir) -> list[dict]:
    p = Path(run_dir) / "metrics.jsonl"
    return [json.loads(x) for x in p.read_text().splitlines()] if p.exists() else []


def losses(run_dir):
    return ({r["step"]: r["loss"] for r in lines(run_dir) if "loss" in r},
            {r["step"]: r["eval_loss"] for r in lines(run_dir) if "eval_loss" in r})


def same_as(ref_dir, run_dir):
    (ref, ref_ev), (got, got_ev) = losses(ref_dir), losses(run_dir)
    assert sorted(got) == list(range(1, STEPS + 1)) and sorted(got_ev) == sorted(ref_ev)
    for s in ref:
        assert abs(ref[s] - got[s]) <= 1e-6, (s, ref[s], got[s])
    for s in ref_ev:
        assert abs(ref_ev[s] - got_ev[s]) <= 1e-6, (s, ref_ev[s], got_ev[s])


def run_to_end(c):
    r = subprocess.run(c, env=env(), capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    made = {}

    def get(name, extra):
        if name not in made:
            d = tmp_path_factory.mktemp(f"ref_{name}")
            run_to_end(cmd(d, extra))
            made[name] = d
        return made[name]
    return get


def wait_for(proc, cond, timeout=600):
    t0 = time.monotonic()
    while not cond():
        assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
        assert time.monotonic() - t0 < timeout
        time.sleep(0.01)


@pytest.mark.slow
def test_sigterm_stops_after_a_checkpoint_of_the_current_step(tmp_path, reference):
    # SIGINT takes the same handler:
    # test_train_faults.py::test_preemption_flags_both_signals_and_a_second_ctrl_c_stops_now
    sig = signal.SIGTERM
    d = tmp_path / "run"
    proc = subprocess.Popen(cmd(d, PLAIN), env=env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    wait_for(proc, lambda: max(losses(d)[0], default=0) >= 3)
    t0 = time.monotonic()
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=300)
    seconds = time.monotonic() - t0
    assert proc.returncode == 0, err.decode()[-3000:]
    stopped = max(losses(d)[0])
    assert stopped < STEPS
    assert f"stopped after step {stopped} with a checkpoint" in out.decode()
    ckpts = sorted(int(p.name) for p in (d / "checkpoints").iterdir() if p.name.isdigit())
    assert ckpts[-1] == stopped
    print(f"{sig.name}: exit 0 {seconds:.2f} s after the signal, stopped at step {stopped}")
    r = run_to_end(cmd(d, PLAIN))
    assert f"resumed from {d}/checkpoints step {stopped}" in r.stdout
    same_as(reference("plain", PLAIN), d)


def checkpoint_in_progress(run_dir):
    ck = Path(run_dir) / "checkpoints"
    return ck.exists() and any("tmp" in p.name for p in ck.iterdir())


@pytest.mark.slow
@pytest.mark.parametrize("name,extra", [("plain", PLAIN), ("diloco", DILOCO)])
def test_sigkill_anywhere_then_the_same_command_loses_nothing(tmp_path, reference, name,
                                                              extra):
    """Three kills in one run folder: while a checkpoint is being written, right after an
    eval line, and at a seeded random moment after the first step; then the same command
    runs to the end."""
    rng = random.Random(12)
    d = tmp_path / "run"
    evals = lambda: sum("eval_loss" in r for r in lines(d))
    moments = [("during a checkpoint save", lambda: checkpoint_in_progress(d)),
               ("after an eval", lambda: evals() > seen),
               ("random", None)]
    for what, cond in moments:
        seen, written = evals(), len(lines(d))
        proc = subprocess.Popen(cmd(d, extra), env=env(), stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE)
        if cond is None:  # a seeded step of this segment's own (not an earlier one's line),
            wait_for(proc, lambda: len(lines(d)) > written)  # then a little into the next
            first = max(losses(d)[0])
            k = rng.randint(first, max(first, STEPS - 2))
            wait_for(proc, lambda: max(losses(d)[0], default=0) >= k)
            time.sleep(rng.uniform(0.0, 0.1))
        else:
            wait_for(proc, cond)
        proc.send_signal(signal.SIGKILL)
        assert proc.wait() == -signal.SIGKILL, what
        assert max(losses(d)[0], default=0) < STEPS, f"finished before the kill {what}"
    run_to_end(cmd(d, extra))
    same_as(reference(name, extra), d)



@pytest.mark.slow
def test_two_processes_equal_one_and_resume_in_one(tmp_path, reference):
    """Streaming DiLoCo as 2 processes x 4 devices (scripts/launch.py; the replicas on
    different processes) gives the 1-process run's losses; its last checkpoint removed, it
    resumes in 1 process x 8 devices (orbax stores global arrays, so the state comes back on
    the new process layout). Every step and eval equals the 1-process run within 1e-5
    (measured differences are fp32 reassociation across process layouts)."""
    d = tmp_path / "run"
    c = cmd(d, DILOCO) + ["checkpoint.keep=10"]
    r = subprocess.run([sys.executable, str(ROOT / "scripts/launch.py"), "-n", "2",
                        "--log-dir", str(tmp_path / "logs"), "--timeout", "900", "--"] + c,
                       env=env(), capture_output=True, text=True, timeout=1000)
    log1 = tmp_path / "logs/process_1.log"
    assert r.returncode == 0, r.stderr[-3000:] + log1.read_text()[-3000:]
    two = losses(d)
    shutil.rmtree(d / "checkpoints" / "12")
    r = run_to_end(c)
    assert f"resumed from {d}/checkpoints step 10" in r.stdout
    (ref, ref_ev), (got, got_ev) = losses(reference("diloco", DILOCO)), losses(d)
    assert sorted(two[0]) == sorted(got) == list(range(1, STEPS + 1))
    assert sorted(two[1]) == sorted(got_ev) == sorted(ref_ev)
    for s in ref:
        assert abs(ref[s] - two[0][s]) <= 1e-5 and abs(ref[s] - got[s]) <= 1e-5, (
            s, ref[s], two[0][s], got[s])
    for s in ref_ev:
        assert abs(ref_ev[s] - two[1][s]) <= 1e-5 and abs(ref_ev[s] - got_ev[s]) <= 1e-5
