"""Fault decisions made by the whole process group: real `python -m jaxpar.train` runs as 2
processes × 4 CPU devices through `scripts/launch.py`.

- SIGTERM to one process stops both after the same step, at most one step after the
  signal, exit 0 well inside a 30 s grace period, with no checkpoint saved before;
  the same command then resumes to the losses of a run never stopped (<= 1e-6).
- A corrupt newest checkpoint — a data file only process 1 wrote, or the metadata both
  read — is found by both processes, and both resume from the same earlier step.
- SIGSTOP of one process during start-up (before its first step) ends the group within
  `train.startup_timeout_s`; with `--restarts 1` the run then completes.
- SIGKILL of one process or of the whole group at seeded moments, with and without
  Streaming DiLoCo: the same command resumes to the uninterrupted losses (<= 1e-6), and
  goodput.json accounts for the wall time of all attempts within 5%.
"""
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TINY = ["model.layers=1", "model.embed=32", "model.heads=4", "model.kv_heads=2",
        "model.mlp=64", "train.seq_len=32", "train.batch_size=8", "eval.sample_bytes=0",
        "eval.batches=2"]
PLAIN = ["mesh.data=8"]
DILOCO = ["model.layers=2", "mesh.replica=2", "mesh.data=4", "diloco.enabled=true",
          "diloco.sync_every=4", "diloco.num_fragments=2", "diloco.overlap_steps=1"]


def train_cmd(run_dir, *extra):
    return [sys.executable, "-m", "jaxpar.train", str(ROOT / "configs" / "base.yaml"),
            f"train.run_dir={run_dir}", *TINY, *extra]


def env():
    e = dict(os.environ, JAX_PLATFORMS="cpu")
    e.pop("XLA_FLAGS", None)  # launch.py gives each process its 4 devices
    return e


class Group:
    """`scripts/launch.py -n 2 [--restarts k] -- CMD` in the background; the whole process
    tree is killed on exit, whatever happened."""

    def __init__(self, cmd, logs, restarts=0):
        self.logs = Path(logs)
        self.proc = subprocess.Popen(
            [sys.executable, str(ROOT / "scripts/launch.py"), "-n", "2", "--log-dir",
             str(logs), "--restarts", str(restarts), "--", *cmd],
            env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            start_new_session=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        kill_tree(self.proc.pid)  # launch.py starts each process in a session of its own
        self.proc.wait()

    def wait(self, timeout=900):
        out, err = self.proc.communicate(timeout=timeout)
        return self.proc.returncode, out, err

    def log(self, i):
        p = self.logs / f"process_{i}.log"
        return p.read_text() if p.exists() else ""


def children_of(pid) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    return [int(x) for x in out.split()]


def kill_tree(pid):
    for c in children_of(pid):
        kill_tree(c)
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def heartbeat(run_dir, i) -> dict | None:
    try:
        return json.loads((Path(run_dir) / "heartbeats" / f"process_{i}.json").read_text())
    except (OSError, ValueError):
        return None


def steps_done(run_dir, i) -> list[int]:
    p = Path(run_dir) / "steps" / f"process_{i}.jsonl"
    if not p.exists():
        return []
    out = []
    for ln in p.read_text().splitlines():
        try:
            out.append(json.loads(ln)["step"])
        except ValueError:
            pass  # a line being written
    return out


def wait_until(group, cond, what, timeout=600):
    t0 = time.monotonic()
    while not cond():
        if group.proc.poll() is not None:
            raise AssertionError(f"the group ended before {what}: {group.proc.returncode}\n"
                                 f"{group.log(0)[-2000:]}\n{group.log(1)[-2000:]}")
        assert time.monotonic() - t0 < timeout, f"timed out waiting for {what}"
        time.sleep(0.02)


def metrics(run_dir):
    p = Path(run_dir) / "metrics.jsonl"
    recs = [json.loads(x) for x in p.read_text().splitlines()] if p.exists() else []
    return ({r["step"]: r["loss"] for r in recs if "loss" in r},
            {r["step"]: r["eval_loss"] for r in recs if "eval_loss" in r})


def assert_same_run(ref_dir, run_dir, steps, tol=1e-6):
    """Every step the reference logged (all `steps` of them with log_every=1) and every eval
    has the same loss in `run_dir` (which may log more: a segment logs its first step)."""
    (ref, ref_ev), (got, got_ev) = metrics(ref_dir), metrics(run_dir)
    assert max(ref) == steps and set(ref) <= set(got), (sorted(ref), sorted(got))
    assert sorted(got_ev) == sorted(ref_ev), (sorted(got_ev), sorted(ref_ev))
    for s in ref:
        assert abs(ref[s] - got[s]) <= tol, (s, ref[s], got[s])
    for s in ref_ev:
        assert abs(ref_ev[s] - got_ev[s]) <= tol, (s, ref_ev[s], got_ev[s])


def run_group(cmd, logs, timeout=900):
    with Group(cmd, logs) as g:
        code, out, err = g.wait(timeout)
        assert code == 0, err[-2000:] + g.log(0)[-3000:] + g.log(1)[-3000:]
        return out


def sigterm_one(run_dir, logs, cmd, after_step):
    """SIGTERM process 1 once it has finished `after_step`; returns (signal-to-exit seconds,
    process 1's last finished step at the signal, the group's stop step)."""
    with Group(cmd, logs) as g:
        wait_until(g, lambda: max(steps_done(run_dir, 1), default=0) >= after_step,
                   f"step {after_step}")
        seen = max(steps_done(run_dir, 1))
        os.kill(heartbeat(run_dir, 1)["pid"], signal.SIGTERM)
        t0 = time.monotonic()
        code, out, err = g.wait(120)
        seconds = time.monotonic() - t0
        assert code == 0, err[-2000:] + g.log(0)[-3000:] + g.log(1)[-3000:]
        stopped = [max(steps_done(run_dir, i)) for i in (0, 1)]
        assert stopped[0] == stopped[1], stopped  # the same step on both
        assert f"a peer's signal: stopped after step {stopped[0]} with a checkpoint" in g.log(0)
        return seconds, seen, stopped[0]


def test_sigterm_to_one_process_stops_both_at_the_same_step(tmp_path):
    """The default run's 2-process test: no checkpoint before the signal, a stop step that is
    not a log step, exit 0 inside the grace period."""
    d = tmp_path / "run"
    cmd = train_cmd(d, *PLAIN, "train.steps=400", "train.log_every=50", "checkpoint.every=0",
                    "eval.every=0")
    seconds, seen, stopped = sigterm_one(d, tmp_path / "logs", cmd, after_step=3)
    assert seen < stopped <= seen + 2  # the step in flight, then at most one more
    ckpts = [p.name for p in (d / "checkpoints").iterdir() if p.name.isdigit()]
    assert ckpts == [str(stopped)]
    assert (d / "checkpoints" / str(stopped) / "sums.json").exists()
    assert seconds < 30, seconds
    rec = json.loads((d / "preemption.json").read_text())
    assert rec["step"] == stopped and rec["signal_to_commit_s"] < 30
    print(f"SIGTERM to process 1 after step {seen}: both stopped after step {stopped}, group "
          f"exit 0 {seconds:.1f} s after the signal (signal to commit "
          f"{rec['signal_to_commit_s']:.1f} s)")


@pytest.mark.slow
def test_sigterm_then_resume_equals_a_run_never_stopped(tmp_path):
    ref, d = tmp_path / "ref", tmp_path / "run"
    extra = [*PLAIN, "train.steps=12", "train.log_every=5", "checkpoint.every=4",
             "eval.every=3"]
    run_group(train_cmd(ref, *extra), tmp_path / "ref_logs")
    seconds, seen, stopped = sigterm_one(d, tmp_path / "logs", train_cmd(d, *extra), 5)
    assert stopped % 5 and seen < stopped <= seen + 2 and seconds < 30
    out = run_group(train_cmd(d, *extra), tmp_path / "logs2")
    assert f"resumed from {d}/checkpoints step {stopped}" in out
    assert_same_run(ref, d, 12)


def ocdbt_files(step_dir, process):
    return sorted(p for p in step_dir.glob(f"state/ocdbt.process_{process}/d/*") if p.is_file())


@pytest.mark.slow
def test_a_corrupt_checkpoint_is_the_groups_verdict_and_both_resume_from_the_same_step(
        tmp_path):
    """Checkpoint 8 loses half of a data file that only process 1 wrote (and reads), then
    checkpoint 6 loses its metadata, which both read: both processes resume from 4, one line
    names each, and the run ends with the losses of a run never damaged."""
    ref, d = tmp_path / "ref", tmp_path / "run"
    # FSDP: each process writes (and reads back) its own shards of the params
    extra = ["mesh.fsdp=8", "train.steps=8", "train.log_every=1", "checkpoint.every=2",
             "checkpoint.keep=4", "eval.every=4"]
    run_group(train_cmd(ref, *extra), tmp_path / "ref_logs")
    run_group(train_cmd(d, *extra), tmp_path / "logs0")
    ck = d / "checkpoints"
    victim = ocdbt_files(ck / "8", 1)[0]
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    (ck / "6" / "state" / "_METADATA").unlink()
    (d / "summary.json").unlink()
    with Group(train_cmd(d, *extra), tmp_path / "logs1") as g:
        code, out, err = g.wait()
        assert code == 0, err[-2000:] + g.log(1)[-3000:]
        log0 = g.log(0)
    said = [ln for ln in log0.splitlines() if "is corrupt" in ln]
    assert len(said) == 2, log0[-3000:]
    assert "checkpoints/8 is corrupt (state/ocdbt.process_1/d/" in said[0]
    assert "checkpoints/6 is corrupt (state/_METADATA is missing)" in said[1]
    assert all("resuming from step 4" in s for s in said)
    assert "resumed from" in log0 and "checkpoints step 4" in log0
    for i in (0, 1):  # both processes took steps 5..8 again after the resume
        assert steps_done(d, i)[-4:] == [5, 6, 7, 8], steps_done(d, i)
    moved = sorted(p.name.split("-")[0] for p in (d / "corrupt_checkpoints").iterdir())
    assert moved == ["6", "8"]
    assert_same_run(ref, d, 8)


@pytest.mark.slow
def test_a_peer_stopped_during_startup_ends_the_group_and_a_restart_completes(tmp_path):
    d = tmp_path / "run"
    # 3x this loaded machine's start-up of the tiny model (about 20 s), below the 100 s after
    # which JAX's coordination service would abort the survivors itself
    startup = 60
    cmd = train_cmd(d, *PLAIN, "train.steps=4", "train.log_every=1", "eval.every=0",
                    f"train.startup_timeout_s={startup}", "train.hang_timeout_s=60")
    with Group(cmd, tmp_path / "logs", restarts=1) as g:
        # both watchdogs are running (each counts its start-up from its own start)
        wait_until(g, lambda: heartbeat(d, 0) is not None and heartbeat(d, 1) is not None,
                   "both processes' first heartbeat")
        assert not steps_done(d, 1)  # before its first step
        os.kill(heartbeat(d, 1)["pid"], signal.SIGSTOP)
        t0 = time.time()
        code, out, err = g.wait(timeout=900)
    assert code == 0, err[-3000:]
    first = tmp_path / "logs" / "attempt_0" / "process_0.log"
    ended_s = first.stat().st_mtime - t0  # process 0's last line: its end
    ended = [ln for ln in err.splitlines() if "exited with" in ln][0]
    assert "restart 1" in err, err
    # Whichever bound comes first ends process 0, all within the start-up bound: its
    # watchdog (a wait inside a collective: "hang: ... stopped or dead"), or gloo's 30 s
    # deadline for a peer that never joined the first collective (an error, exit 1)
    text = first.read_text()
    how = [w for w in (f"hang: process 0: nothing finished in {startup} s (start-up",
                       "Gloo context initialization failed") if w in text]
    assert how, text[-3000:]
    assert ended_s <= startup + 5, ended_s
    assert max(metrics(d)[0]) == 4
    print(f"SIGSTOP of process 1 during start-up: {ended.split(';')[0].strip()} {ended_s:.0f} s "
          f"after the stop ({how[0]}; bound {startup} s); restarted, the run completed")


def kill_moments(run_dir, steps):
    """Seeded moments in a run: mid-step, mid-save, right after a metrics line, mid-eval."""
    ck = Path(run_dir) / "checkpoints"
    in_save = lambda: ck.exists() and any("tmp" in p.name for p in ck.iterdir())
    n_lines = lambda: len(metrics(run_dir)[0]) + len(metrics(run_dir)[1])
    return [("mid-step", lambda: max(steps_done(run_dir, 0), default=0) >= 2),
            ("mid-save", in_save),
            ("mid-metrics-write", lambda: n_lines() >= 5),
            ("mid-eval", lambda: len(metrics(run_dir)[1]) >= 1)]


@pytest.mark.slow
@pytest.mark.parametrize("name,extra", [("plain", PLAIN), ("diloco", DILOCO)])
def test_sigkill_at_seeded_moments_then_the_same_command_loses_nothing(tmp_path, name, extra):
    """Each attempt is SIGKILLed (one process, or the whole group, seeded) at one of four
    moments; then the same command runs to the end. Losses equal the uninterrupted 2-process
    run; goodput.json accounts for every attempt's wall time within 5%."""
    rng = random.Random(20 + len(name))
    ref, d = tmp_path / "ref", tmp_path / "run"
    steps = 12
    args = [*extra, f"train.steps={steps}", "train.log_every=1", "checkpoint.every=2",
            "eval.every=3"]
    run_group(train_cmd(ref, *args), tmp_path / "ref_logs")
    t_first = time.time()
    for k, (what, cond) in enumerate(rng.sample(kill_moments(d, steps), 2)):
        before = max(metrics(d)[0], default=0)
        with Group(train_cmd(d, *args), tmp_path / f"logs{k}") as g:
            wait_until(g, lambda: max(steps_done(d, 0), default=0) > before and cond(), what)
            time.sleep(rng.uniform(0.0, 0.3))
            whom = rng.choice(["process 1", "both"])
            if whom == "both":
                kill_tree(g.proc.pid)  # the launcher and every process: a lost machine
            else:
                os.kill(heartbeat(d, 1)["pid"], signal.SIGKILL)
            g.proc.wait(timeout=60)
        print(f"{name}: killed {whom} {what} (after step {max(metrics(d)[0], default=0)})")
    run_group(train_cmd(d, *args), tmp_path / "logs_end")
    wall = time.time() - t_first
    assert_same_run(ref, d, steps)
    g = json.loads((d / "goodput.json").read_text())
    assert g["segments"] == 3 and abs(g["wall_s"] - wall) <= 0.05 * wall, (g["wall_s"], wall)
    assert abs(sum(g["seconds"].values()) - g["wall_s"]) <= 0.01 * wall
    assert g["seconds"]["restart_wait"] >= 0 and g["seconds"]["redone"] >= 0
    print(f"{name}: goodput {g['goodput']:.3f}, wall {g['wall_s']:.1f} s (test clock "
          f"{wall:.1f} s), {json.dumps({k: round(v, 1) for k, v in g['seconds'].items()})}")


@pytest.mark.slow
def test_a_nan_rolls_back_every_process_to_the_same_checkpoint(tmp_path, monkeypatch):
    """NaN in the batch of step 3 (train.nonfinite's default, rollback): both processes see
    it in the step's own reduction, restore the same checkpoint and skip the same batch —
    their step sequences are identical."""
    from jaxpar.train.config import load_config
    from jaxpar.train.loop import Run

    d = tmp_path / "run"
    extra = [*PLAIN, "model.module=user_models:nan_factory", "train.steps=6",
             "train.log_every=1", "checkpoint.every=2", "checkpoint.keep=3", "eval.every=0"]
    cmd = train_cmd(d, *extra)
    run = Run.create(load_config(cmd[3], cmd[4:]))
    row0 = tuple(int(x) for x in
                 __import__("numpy").asarray(run.batch(3)["tokens"]).reshape(8, -1)[0][:6])
    monkeypatch.setenv("JAXPAR_TEST_NAN_TRIGGER", ",".join(map(str, row0)))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(
        [str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")]))
    out = run_group(cmd, tmp_path / "logs")
    seq = [steps_done(d, i) for i in (0, 1)]
    assert seq[0] == seq[1] == [1, 2, 3, 3, 4, 5, 6], seq  # step 3 taken again after rollback
    recs = [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()]
    assert {"step": 2, "rollback_from": 3, "data_skipped": [3, 3]} in recs
    assert json.loads((d / "summary.json").read_text())["rollbacks"] == 1, out
