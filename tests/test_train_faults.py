"""Runs that survive faults: resume checks the config (and reshards onto a new mesh), a
corrupt newest checkpoint falls back to the one before, the run folder's files survive
kills and restarts, and non-finite steps follow `train.nonfinite`. The real-process tests
(SIGTERM, SIGKILL anywhere, honest rates) are in test_train_kill.py."""
import json
import shutil
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxpar.train import faults, runfolder
from jaxpar.train.checkpoint import CheckpointError, Checkpointer
from jaxpar.train.config import Config, ConfigError
from jaxpar.train.loop import TrainState
from jaxpar.train.metrics import MetricsWriter


def strict_json(line: str):
    """json.loads that refuses the bare NaN/Infinity Python's json would accept."""
    def no_constant(name):
        raise ValueError(f"bare {name} in {line!r}")
    return json.loads(line, parse_constant=no_constant)


# ------------------------------------------------------------------ resume checks the config


def test_resume_refuses_changes_that_change_the_math_and_allows_the_rest(tmp_path):
    old = Config().replace(train=dict(run_dir=str(tmp_path)))
    meta = {"data_step": 4, "seed": 0, "config": old.to_dict()}
    for changes, keys in [(dict(train=dict(seed=1)), ["train.seed"]),
                          (dict(train=dict(batch_size=16, steps=200)),
                           ["train.batch_size", "train.steps"]),
                          (dict(train=dict(lr=1e-3, warmup=5)), ["train.lr", "train.warmup"]),
                          (dict(model=dict(layers=2)), ["model.layers"]),
                          (dict(model=dict(rope_scaling={"rope_type": "linear", "factor": 2.0})),
                           ["model.rope_scaling"]),  # a mapping: compared whole
                          (dict(data=dict(eval_fraction=0.1)), ["data.eval_fraction"])]:
        with pytest.raises(ConfigError) as e:
            runfolder.check_resume(tmp_path, 4, meta, old.replace(**changes))
        msg = str(e.value)
        assert "\n" not in msg and "step 4" in msg
        for k in keys:
            assert k in msg, (k, msg)
    assert "lr schedule" in str(pytest.raises(ConfigError, runfolder.check_resume, tmp_path, 4,
                                              meta, old.replace(train=dict(steps=50))).value)
    new = old.replace(mesh=dict(data=4, tensor=2), train=dict(log_every=1, nonfinite="skip",
                                                              microbatches=2),
                      eval=dict(every=7), checkpoint=dict(every=3), attention=dict(impl="dense"),
                      model=dict(remat="full"), sharding=dict(rules={"mlp": None}))
    diff = runfolder.check_resume(tmp_path, 4, meta, new)
    assert diff == {"mesh.data": [1, 4], "mesh.tensor": [1, 2], "train.log_every": [10, 1],
                    "train.nonfinite": ["rollback", "skip"], "checkpoint.every": [0, 3],
                    "eval.every": [50, 7], "train.microbatches": [1, 2],
                    "model.remat": ["none", "full"], "sharding.rules": [{}, {"mlp": None}]}
    # the built-in decoder pads its vocab to a multiple of mesh.tensor: 258 rows on tensor 2
    v258 = old.replace(model=dict(vocab=257), mesh=dict(tensor=2))
    m258 = {"config": v258.to_dict()}
    with pytest.raises(ConfigError, match=r"mesh.tensor 2 -> 4 pads the vocab \(257\) to 260 "
                                          r"rows instead of the checkpoint.s 258.*\[2, 3, 6, 43"):
        runfolder.check_resume(tmp_path, 4, m258, v258.replace(mesh=dict(tensor=4)))
    with pytest.raises(ConfigError, match="model.vocab"):
        runfolder.check_resume(tmp_path, 4, m258, v258.replace(model=dict(vocab=258)))
    # with DiLoCo, mesh.replica is the number of replicas: refused; without, it is batch
    dl = old.replace(diloco=dict(enabled=True), mesh=dict(replica=2))
    with pytest.raises(ConfigError, match="mesh.replica"):
        runfolder.check_resume(tmp_path, 4, {"config": dl.to_dict()},
                               dl.replace(mesh=dict(replica=1)))
    assert runfolder.check_resume(tmp_path, 4, meta, old.replace(mesh=dict(replica=2))) == {
        "mesh.replica": [1, 2]}
    # a checkpoint from before the config was kept: the seed is still compared
    with pytest.raises(ConfigError, match="train.seed"):
        runfolder.check_resume(tmp_path, 4, {"data_step": 4, "seed": 3}, old)


def test_fresh_start_never_overwrites_another_runs_files(tmp_path):
    cfg = Config().replace(train=dict(run_dir=str(tmp_path)))
    runfolder.check_fresh(tmp_path, cfg)  # an empty folder
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 5.0}\n')
    with pytest.raises(ConfigError, match="without a config history"):
        runfolder.check_fresh(tmp_path, cfg)
    runfolder.record(tmp_path, cfg, 0, {})
    runfolder.check_fresh(tmp_path, cfg)  # the same run, killed before its first checkpoint
    runfolder.check_fresh(tmp_path, cfg.replace(eval=dict(every=5)))  # cadence only
    with pytest.raises(ConfigError) as e:
        runfolder.check_fresh(tmp_path, cfg.replace(train=dict(seed=2)))
    assert "metrics.jsonl" in str(e.value) and "different config" in str(e.value)
    assert (tmp_path / "metrics.jsonl").read_text() == '{"step": 1, "loss": 5.0}\n'
    # history lines: segment numbers, start steps, changes; a torn last line is skipped
    runfolder.record(tmp_path, cfg, 4, {"eval.every": [50, 5]})
    with (tmp_path / runfolder.HISTORY).open("a") as fh:
        fh.write('{"segment": 2, "config": {"tr')
    lines = (tmp_path / runfolder.HISTORY).read_text().splitlines()
    assert [json.loads(x)["start_step"] for x in lines[:2]] == [0, 4]
    assert runfolder.last_config(tmp_path) == cfg.to_dict()


# ------------------------------------------------------------------ the metrics file


def test_metrics_file_survives_a_torn_line_keeps_json_and_resumes_atomically(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 5.0}\n{"step": 2, "loss": 4.0}\n'
                    '{"step": 2, "eval_loss": 4.5}\n{"step": 3, "loss": 3.0}\n{"step": 4, "lo')
    w = MetricsWriter(tmp_path, total_steps=8, start_step=2)
    assert [strict_json(x) for x in path.read_text().splitlines()] == [
        {"step": 1, "loss": 5.0}, {"step": 2, "loss": 4.0}, {"step": 2, "eval_loss": 4.5}]
    w.write({"step": 3, "loss": float("nan"), "grad_norm": float("inf"), "nonfinite": 1})
    w.close()
    last = strict_json(path.read_text().splitlines()[-1])
    assert last == {"step": 3, "loss": "nan", "grad_norm": "inf", "nonfinite": 1}
    assert np.isnan(float(last["loss"]))
    assert not list(tmp_path.glob("*.tmp"))


def tensorboard_view(tb_dir) -> list[tuple[int, float]]:
    """The 'loss' scalars TensorBoard shows: event files in order, and a SessionLog START at
    step s (tensorboardX's purge_step) hides the earlier events at steps >= s."""
    import struct

    from tensorboardX.proto.event_pb2 import Event, SessionLog

    shown = []
    for f in sorted(tb_dir.glob("events.*")):
        raw, i = f.read_bytes(), 0
        while i < len(raw):
            (n,) = struct.unpack("<Q", raw[i:i + 8])
            ev = Event.FromString(raw[i + 12:i + 12 + n])
            i += 12 + n + 4
            if ev.HasField("session_log") and ev.session_log.status == SessionLog.START:
                shown = [(s, v) for s, v in shown if s < ev.step]
            for v in ev.summary.value:
                if v.tag == "loss":
                    shown.append((ev.step, v.simple_value))
    return shown


def test_tensorboard_events_hold_no_step_twice_after_a_resume(tmp_path):
    pytest.importorskip("tensorboardX")
    w = MetricsWriter(tmp_path, total_steps=8, start_step=0)
    for s in range(1, 7):
        w.write({"step": s, "loss": float(s)})
    w.close()
    w = MetricsWriter(tmp_path, total_steps=8, start_step=4)  # resumed from step 4
    for s in range(5, 9):
        w.write({"step": s, "loss": 10.0 + s})
    w.close()
    assert tensorboard_view(tmp_path / "tb") == (
        [(s, float(s)) for s in range(1, 5)] + [(s, 10.0 + s) for s in range(5, 9)])


def test_a_missing_tensorboardx_is_said_once(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "tensorboardX", None)  # import fails
    w = MetricsWriter(tmp_path, total_steps=4, start_step=0)
    w.restart_at(0)
    w.close()
    out = capsys.readouterr().out
    assert out.count("tensorboardX is not installed") == 1


# ------------------------------------------------------------------ checkpoints


def cut_data_files(step_dir):
    """Truncate every data file of the state to half its size."""
    for f in step_dir.glob("state/**/d/*"):
        f.write_bytes(f.read_bytes()[:f.stat().st_size // 2])


def test_a_corrupt_newest_checkpoint_falls_back_to_the_previous_good_one(tmp_path):
    def state(step):  # the trainer's state type (orbax's _METADATA holds its structure)
        return TrainState(jnp.int32(step), {"w": jnp.full((16, 8), step)},
                          {"b": jnp.arange(8.0) * step})
    like = state(0)
    ckpt = Checkpointer(tmp_path, keep=4)
    for step in range(1, 5):
        ckpt.save(step, state(step), {"data_step": step})
    ckpt.wait()
    ck = tmp_path / "checkpoints"
    cut_data_files(ck / "4")                 # a data file cut short
    (ck / "3" / "state" / "_METADATA").unlink()
    shutil.rmtree(ck / "2" / "state")
    said = []
    step, restored, meta = ckpt.restore_newest(like, said.append)
    assert step == 1 and meta == {"data_step": 1}
    np.testing.assert_array_equal(restored.opt_state["b"], np.arange(8.0))
    assert len(said) == 3 and all("\n" not in s for s in said)
    assert [s.split("checkpoints/")[1].split()[0] for s in said] == ["4", "3", "2"]
    assert sorted(p.name.split("-")[0] for p in (tmp_path / "corrupt_checkpoints").iterdir()) \
        == ["2", "3", "4"]
    assert ckpt.steps() == [1]
    ckpt.save(2, state(2), {"data_step": 2})  # step 2's name is free again
    ckpt.wait()
    cut_data_files(ck / "1")
    cut_data_files(ck / "2")
    with pytest.raises(CheckpointError) as e:
        ckpt.restore_newest(like, said.append)
    assert "\n" not in str(e.value) and "2: " in str(e.value) and "1: " in str(e.value)
    assert ckpt.steps() == [2, 1]  # nothing moved: a person decides
    ckpt.close()


def test_a_transient_read_error_is_retried_and_never_moves_a_good_checkpoint(tmp_path,
                                                                             monkeypatch):
    from jaxpar.train import checkpoint

    state = lambda s: TrainState(jnp.int32(s), {"w": jnp.full((4, 4), float(s))}, {})
    ckpt = Checkpointer(tmp_path, keep=3)
    for s in (1, 2):
        ckpt.save(s, state(s), {"data_step": s})
    ckpt.wait()
    real, calls, slept = Checkpointer.restore, [], []
    monkeypatch.setattr(checkpoint.time, "sleep", slept.append)

    def flaky(self, step, like, expect=None):  # the storage fails twice, then reads fine
        calls.append(step)
        if len(calls) <= 2:
            raise OSError(5, "Input/output error")
        return real(self, step, like, expect)
    monkeypatch.setattr(Checkpointer, "restore", flaky)
    said = []
    step, got, _ = ckpt.restore_newest(state(0), said.append)
    assert step == 2 and calls == [2, 2, 2] and slept == [1.0, 2.0]
    np.testing.assert_array_equal(got.params["w"], np.full((4, 4), 2.0))
    assert len(said) == 2 and all("retrying" in s for s in said)
    assert not (tmp_path / "corrupt_checkpoints").exists()

    def broken(self, step, like, expect=None):
        raise OSError(5, "Input/output error")
    monkeypatch.setattr(Checkpointer, "restore", broken)
    with pytest.raises(CheckpointError) as e:
        ckpt.restore_newest(state(0), said.append)
    assert "transient" in str(e.value) and "nothing moved" in str(e.value)
    assert "\n" not in str(e.value) and ckpt.steps() == [2, 1]

    # a flipped bit, same size: the CRC finds it, and the step before is used
    monkeypatch.setattr(Checkpointer, "restore", real)
    data = sorted((tmp_path / "checkpoints" / "2").glob("state/**/d/*"))[0]
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0x10
    data.write_bytes(bytes(raw))
    said.clear()
    step, got, _ = ckpt.restore_newest(state(0), said.append)
    assert step == 1 and len(said) == 1 and "CRC-32" in said[0]
    ckpt.close()


# ------------------------------------------------------------------ non-finite steps


def test_guard_drops_a_non_finite_update_inside_the_step():
    def step(state, x):
        new = {"w": state["w"] - x, "count": state["count"] + 1}
        loss = jnp.sum(new["w"])
        return new, {"loss": loss, "grad_norm": jnp.abs(x).sum()}

    guarded = jax.jit(faults.guard(step))
    no_stop, one_stops = jnp.zeros(8, jnp.int32), jnp.zeros(8, jnp.int32).at[5].set(1)
    fn = lambda state, x: guarded(state, x, no_stop)
    state = {"w": jnp.ones(3), "count": jnp.zeros((), jnp.int32)}
    state, m = fn(state, jnp.full(3, 0.5))
    assert int(m["nonfinite"]) == 0 and int(state["count"]) == 1 and int(m["stop"]) == 0
    kept, m = fn(state, jnp.array([0.5, jnp.nan, 0.0]))
    assert int(m["nonfinite"]) == 1
    np.testing.assert_array_equal(kept["w"], state["w"])
    assert int(kept["count"]) == 1
    _, m = fn(state, jnp.array([jnp.inf, 0.0, 0.0]))
    assert int(m["nonfinite"]) == 1
    # one device's flag (one process's signal) is every process's stop
    assert int(guarded(state, jnp.full(3, 0.5), one_stops)[1]["stop"]) == 1


# ------------------------------------------------------------------ through the trainer


def tiny(run_dir, **sections) -> Config:
    base = Config().replace(
        model=dict(layers=1, embed=32, heads=4, kv_heads=2, mlp=64),
        train=dict(steps=6, batch_size=8, seq_len=32, lr=1e-2, warmup=1, run_dir=str(run_dir),
                   log_every=1),
        mesh=dict(data=8), eval=dict(every=3, batches=2, sample_bytes=0),
        checkpoint=dict(every=2, keep=3))
    return base.replace(**sections) if sections else base


def records(run_dir) -> list[dict]:
    return [strict_json(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def losses(run_dir) -> dict[int, float]:
    return {r["step"]: float(r["loss"]) for r in records(run_dir) if "loss" in r}


def nan_at(monkeypatch, cfg, data_step):
    """Make the test model's loss NaN in the batch of `data_step` (and no other step <= 12)."""
    from jaxpar.train.loop import Run
    run = Run.create(cfg)
    row0 = lambda s: np.asarray(run.batch(s)["tokens"]).reshape(-1, cfg.train.seq_len)[0]
    first = {s: tuple(int(x) for x in row0(s)[:6]) for s in range(1, 13)}
    assert list(first.values()).count(first[data_step]) == 1
    monkeypatch.setenv("JAXPAR_TEST_NAN_TRIGGER", ",".join(map(str, first[data_step])))


@pytest.mark.slow
def test_nonfinite_skip_stop_and_rollback(tmp_path, monkeypatch):
    """A NaN in the batch of step 3. skip: the update is dropped, counted, training goes on.
    stop: exit with a checkpoint at step 2 (the state before the bad step); the same command
    with train.nonfinite=skip then gives the skip run's losses. rollback: back to checkpoint
    2, data step 3 skipped — so its step k is the skip run's step k+1 (same state, same
    batch, and in both Adam's count did not advance on the bad step)."""
    from jaxpar.train.run import train
    user = dict(module="user_models:nan_factory", layers=1, embed=32, heads=4, mlp=64)
    cfg = lambda d, policy: tiny(tmp_path / d, model=user, train=dict(nonfinite=policy))
    nan_at(monkeypatch, cfg("skip", "skip"), 3)

    skip = train(cfg("skip", "skip"))
    got = losses(tmp_path / "skip")
    assert skip["nonfinite_steps"] == 1 and np.isnan(got[3])
    assert all(np.isfinite(got[s]) for s in (1, 2, 4, 5, 6)) and np.isfinite(
        skip["final_eval_loss"])
    assert [r["nonfinite"] for r in records(tmp_path / "skip") if "loss" in r] == [
        0, 0, 1, 0, 0, 0]

    with pytest.raises(faults.Stopped, match="step 3: loss nan.*checkpoint 2"):
        train(cfg("stop", "stop"))
    assert Checkpointer(tmp_path / "stop", 3).steps() == [2]
    train(cfg("stop", "skip"))  # the same run folder, a change a resume allows
    resumed = losses(tmp_path / "stop")
    assert sorted(resumed) == list(range(1, 7)) and np.isnan(resumed[3])
    for s in (4, 5, 6):
        assert abs(resumed[s] - got[s]) <= 1e-6, (s, resumed[s], got[s])

    back = train(cfg("rollback", "rollback"))
    rolled = losses(tmp_path / "rollback")
    assert back["rollbacks"] == 1 and sorted(rolled) == list(range(1, 7))
    for s in (3, 4, 5):
        assert abs(rolled[s] - got[s + 1]) <= 1e-6, (s, rolled[s], got[s + 1])
    line = next(r for r in records(tmp_path / "rollback") if "rollback_from" in r)
    assert line == {"step": 2, "rollback_from": 3, "data_skipped": [3, 3]}
    assert Checkpointer(tmp_path / "rollback", 3).read_meta(6)["data_step"] == 7


@pytest.mark.slow
def test_nonfinite_with_diloco_skip_and_stop(tmp_path, monkeypatch):
    """DiLoCo: a NaN in one replica's batch skips the whole step (counted), the eval stays
    finite; the same NaN under train.nonfinite=stop stops at step 3 with step 2's
    checkpoint, instead of reporting a finite eval loss from the untouched global params."""
    from jaxpar.train.run import train
    dl = dict(enabled=True, sync_every=2, num_fragments=1)
    user = dict(module="user_models:nan_factory", layers=1, embed=32, heads=4, mlp=64)
    cfg = tiny(tmp_path / "skip", model=user, mesh=dict(replica=2, data=4), diloco=dl,
               train=dict(nonfinite="skip", batch_size=4))
    nan_at(monkeypatch, cfg, 3)  # replica 0's batch of step 3 is data.batch(3)
    out = train(cfg)
    got = losses(tmp_path / "skip")
    assert out["nonfinite_steps"] == 1 and np.isnan(got[3]) and np.isfinite(got[6])
    assert np.isfinite(out["final_eval_loss"])
    with pytest.raises(faults.Stopped, match="train.nonfinite=stop"):
        train(tiny(tmp_path / "stop", model=user, mesh=dict(replica=2, data=4), diloco=dl,
                   train=dict(batch_size=4, nonfinite="stop")))
    assert Checkpointer(tmp_path / "stop", 3).steps()[-1] == 2
    for r in records(tmp_path / "stop"):  # valid JSON throughout
        assert all(v == v for v in r.values() if isinstance(v, float))


@pytest.mark.slow
@pytest.mark.parametrize("diloco", [False, True], ids=["plain", "diloco"])
def test_resume_on_a_new_mesh_continues_the_same_losses(tmp_path, diloco):
    """A run on data 8 (DiLoCo: replica 2 x data 4) resumed from step 2 on data 4 x tensor 2
    (replica 2 x data 2 x tensor 2): the state is resharded as it is restored, and steps 3..6
    and the evals equal the run that never moved, within fp32 reassociation error (2e-5;
    the measured differences are printed). A change that would alter the math is refused
    and leaves the folder as it was."""
    from jaxpar.train.run import train
    if diloco:
        sec = dict(diloco=dict(enabled=True, sync_every=2, num_fragments=1),
                   train=dict(batch_size=4))
        before, after = dict(replica=2, data=4), dict(replica=2, data=2, tensor=2)
    else:
        sec, before, after = {}, dict(data=8), dict(data=4, tensor=2)
    ref = train(tiny(tmp_path / "ref", mesh=before, **sec))
    moved = tmp_path / "moved"
    shutil.copytree(tmp_path / "ref", moved)
    for s in ("4", "6"):
        shutil.rmtree(moved / "checkpoints" / s)
    if not diloco:
        with pytest.raises(ConfigError, match=r"train.seed \(0 -> 1\)"):
            train(tiny(moved, mesh=after, train=dict(seed=1)))
        assert Checkpointer(moved, 3).steps() == [2]
    out = train(tiny(moved, mesh=after, **sec))
    a, b = losses(tmp_path / "ref"), losses(moved)
    assert sorted(b) == list(range(1, 7))
    loss_diff = max(abs(a[s] - b[s]) for s in range(3, 7))
    eval_diff = max(abs(x[1] - y[1]) for x, y in zip(ref["evals"], out["evals"]))
    print(f"new mesh: max |loss diff| {loss_diff:.2e}, max |eval diff| {eval_diff:.2e}")
    assert [e[0] for e in out["evals"]] == [3, 6] and loss_diff <= 2e-5 and eval_diff <= 2e-5
    last = json.loads((moved / runfolder.HISTORY).read_text().splitlines()[-1])
    assert last["start_step"] == 2 and set(last["changes"]) == {"train.run_dir"} | {
        f"mesh.{k}" for k in after if after[k] != before.get(k, 1)}


def window_rates(run_dir, log_every, eval_every):
    """Median tokens/s of the log windows with an eval inside them and of those without
    (interleaved in one run, so a shared machine's load affects both alike)."""
    rates = {r["step"]: r["tokens_per_s"] for r in records(run_dir) if "tokens_per_s" in r}
    inside = lambda s: any((s - log_every) < e < s for e in range(eval_every, s, eval_every))
    return (float(np.median([v for s, v in rates.items() if inside(s)])),
            float(np.median([v for s, v in rates.items() if not inside(s)])))


@pytest.mark.slow
def test_tokens_per_s_count_only_the_training_steps(tmp_path):
    """Log windows with an eval in them report the tokens/s of windows without one (median
    ratio within [0.7, 1.4]; printed). Before, the time an eval spent waiting for the queued
    steps was subtracted as if it were eval time, overstating those windows."""
    from jaxpar.train.run import train
    train(tiny(tmp_path, train=dict(steps=90, log_every=10), eval=dict(every=15, batches=2),
               checkpoint=dict(every=0)))
    with_eval, without = window_rates(tmp_path, 10, 15)
    print(f"tokens/s, windows with an eval / without: {with_eval / without:.3f} "
          f"({with_eval:.0f} / {without:.0f})")
    assert 0.7 <= with_eval / without <= 1.4


@pytest.mark.slow
def test_sigterm_in_process_checkpoints_the_step_and_the_resume_runs_its_eval(tmp_path):
    """SIGTERM (sent by a thread once step 3 is logged) stops the run after the step it is
    in, with a checkpoint of it and no eval yet; the same config resumes, runs the eval that
    was due, and every loss equals a run never stopped (<= 1e-6)."""
    import os
    import signal
    import threading
    import time

    from jaxpar.train.run import train
    ref = train(tiny(tmp_path / "ref", train=dict(steps=8), eval=dict(every=4)))
    d = tmp_path / "stopped"
    cfg = tiny(d, train=dict(steps=8), eval=dict(every=4), checkpoint=dict(every=0))

    def send():
        while not any(r.get("step", 0) >= 3 for r in (records(d) if (d / "metrics.jsonl")
                                                        .exists() else [])):
            time.sleep(0.005)
        os.kill(os.getpid(), signal.SIGTERM)
    t = threading.Thread(target=send)
    t.start()
    out = train(cfg)
    t.join()
    stopped = out["preempted_at"]
    assert out["signal"] == "SIGTERM" and 3 <= stopped < 8
    assert Checkpointer(d, 3).steps() == [stopped]
    again = train(cfg)
    assert [e[0] for e in again["evals"]] == [s for s in (4, 8) if s >= stopped]
    a, b = losses(tmp_path / "ref"), losses(d)
    assert sorted(b) == list(range(1, 9))
    for s in a:
        assert abs(a[s] - b[s]) <= 1e-6, (s, a[s], b[s])
    assert abs(ref["final_eval_loss"] - again["final_eval_loss"]) <= 1e-6
    evals = [(r["step"], r["eval_loss"]) for r in records(d) if "eval_loss" in r]
    assert [s for s, _ in evals] == [4, 8]


def test_cli_exit_codes_for_a_refused_resume_and_a_non_finite_stop(tmp_path, monkeypatch, capsys):
    """A refused resume / unrestorable folder is exit 2, a non-finite stop exit 3 (not the
    hang watchdog's 4, which launch.py restarts), each one line on stderr."""
    import jaxpar.train.run as run_mod
    from jaxpar.train.__main__ import main

    args = ["configs/base.yaml", f"train.run_dir={tmp_path}", "train.steps=2", "mesh.data=8"]
    for exc, code in [(faults.Stopped("step 3: loss nan"), 3),
                      (CheckpointError("no checkpoint in x restores"), 2)]:
        def boom(cfg, exc=exc, **kw):
            raise exc
        monkeypatch.setattr(run_mod, "train", boom)
        assert main(args) == code
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and str(exc) in err


def test_preemption_flags_both_signals_and_a_second_ctrl_c_stops_now():
    """SIGTERM and SIGINT set the flag (the step in flight finishes and is checkpointed); a
    second SIGINT raises KeyboardInterrupt; the old handlers come back on exit."""
    import os
    import signal
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    for sig in (signal.SIGTERM, signal.SIGINT):
        with faults.Preemption() as p:
            assert p.signal is None
            os.kill(os.getpid(), sig)
            assert p.signal == sig.name
            p.agreed()  # the step's agreed stop does not overwrite this process's own signal
            assert p.signal == sig.name
    with faults.Preemption() as p:
        p.agreed()  # a stop agreed by the group without a signal here: a peer's
        assert p.signal == "a peer's signal"
    with faults.Preemption() as p:
        os.kill(os.getpid(), signal.SIGINT)
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    assert {s: signal.getsignal(s) for s in before} == before


# ------------------------------------------------------------------ grace period, goodput


def test_a_stop_slower_than_the_grace_period_is_warned_about_at_the_next_start(tmp_path):
    from jaxpar.train.run import PREEMPT_FILE, warn_grace
    cfg = Config().replace(train=dict(preempt_grace_s=30.0))
    said = []
    warn_grace(tmp_path, cfg, said.append)  # no stop yet: nothing to say
    (tmp_path / PREEMPT_FILE).write_text(json.dumps(
        {"step": 6, "signal": "SIGTERM", "signal_to_commit_s": 12.5}))
    warn_grace(tmp_path, cfg, said.append)
    assert said == []
    (tmp_path / PREEMPT_FILE).write_text(json.dumps(
        {"step": 6, "signal": "SIGTERM", "signal_to_commit_s": 46.7}))
    warn_grace(tmp_path, cfg, said.append)
    assert len(said) == 1 and "46.7 s" in said[0] and "train.preempt_grace_s=30" in said[0]


def test_goodput_sums_segments_and_the_gaps_between_them(tmp_path, capsys, monkeypatch):
    from jaxpar.train import goodput
    clock = [1000.0]
    monkeypatch.setattr(goodput.time, "time", lambda: clock[0])
    # two starts: the first killed after reaching step 6, the second redoes 5..6
    first = goodput.Goodput(tmp_path, started=1000.0)
    clock[0] += 10.0
    first.add("startup", 10.0)
    for s in range(1, 7):
        clock[0] += 1.0
        first.step(s, 1.0)
    clock[0] += 0.5  # logging
    first.write()  # its last record at 1016.5; then the kill
    second = goodput.Goodput(tmp_path, started=1020.0)
    assert second.index == 1 and second.reached == 6
    clock[0] = 1020.0
    with second.timed("restore"):
        clock[0] += 2.0
    for s in range(5, 11):
        clock[0] += 1.0
        second.step(s, 1.0)
    second.write()
    g = goodput.summarize(tmp_path)
    segs = [json.loads((tmp_path / "goodput" / f"segment_{i}.json").read_text()) for i in (0, 1)]
    assert g["segments"] == 2 and g["steps"] == 10
    assert g["seconds"]["productive"] == 10.0 and g["seconds"]["redone"] == 2.0
    assert g["seconds"]["restart_wait"] == 3.5 and g["seconds"]["restore"] == 2.0
    assert g["wall_s"] == 28.0 and segs[0]["seconds"]["other"] == 0.5
    assert abs(sum(g["seconds"].values()) - g["wall_s"]) < 1e-6  # every second accounted
    assert json.loads((tmp_path / "goodput.json").read_text())["segments"] == 2
    assert goodput.main([str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("goodput ") and "redone" in out and "restart_wait" in out
    assert goodput.main([str(tmp_path / "nothing")]) == 2
