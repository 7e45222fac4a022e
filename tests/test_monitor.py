"""jaxpar.monitor: the outlier detector, the straggler check, the hang watchdog (in-process,
small T, a thread that stalls), and `launch.py --restarts` with a real process that hangs."""
import json
import re
import subprocess
import sys
import threading
import time
import types
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxpar.monitor import (HANG_EXIT_CODE, OutlierDetector, PeerTracker, Watchdog, behind,
                            read_heartbeats, robust_z, slow_peers)
from jaxpar.monitor.steps import StepMonitor, mesh_coordinates

ROOT = Path(__file__).resolve().parent.parent


def test_robust_z_against_numpy():
    h = np.random.default_rng(0).normal(0.1, 0.002, 40)
    med = np.median(h)
    mad = np.median(np.abs(h - med))
    assert robust_z(0.13, h) == pytest.approx((0.13 - med) / (1.4826 * mad), rel=1e-12)
    # a perfectly regular history: measured against 1% of its median
    assert robust_z(0.2, [0.1] * 10) == pytest.approx(100.0)
    assert robust_z(1.0, []) == 0.0


def test_outlier_detector_flags_only_a_slow_step():
    rng = np.random.default_rng(1)
    d = OutlierDetector(window=30, threshold=6.0, min_history=10)
    times = rng.normal(0.1, 0.002, 40)
    assert [d.observe(s, t) for s, t in enumerate(times)] == [None] * 40
    assert d.observe(40, 0.2, judge=False) is None and len(d.history) == 30
    assert d.observe(41, 0.15) is None  # z ~ 25 but only 1.5x the median
    msg = d.observe(42, 0.25)
    assert msg.startswith("step 42 took 0.250 s, 2.5x the median") and "robust z" in msg
    assert max(d.history) < 0.2  # the outlier is not kept
    assert d.observe(43, 0.101) is None and d.observe(44, 0.05) is None  # fast: fine
    fresh = OutlierDetector(min_history=10)
    assert all(fresh.observe(s, 10.0 * s) is None for s in range(1, 11))  # too little history


def test_slow_peers_and_patience():
    assert slow_peers([0.010, 0.011, 0.050, 0.010]) == [2]
    assert slow_peers([0.010, 0.011, 0.013, 0.010]) == []          # within 1.5x
    assert slow_peers([1e-5, 1e-5, 4e-5]) == []                    # under min_gap_s
    assert slow_peers([0.02, 0.09]) == [1]                         # two processes
    tr = PeerTracker(3, patience=3)
    seen = [tr.update([0.01, 0.05, 0.01]) for _ in range(5)]
    assert seen == [[], [], [1], [], []]                           # once per streak
    assert tr.update([0.01, 0.01, 0.01]) == [] and tr.streak == [0, 0, 0]


def test_mesh_coordinates_names_the_process_slice():
    dev = lambda p: types.SimpleNamespace(process_index=p)
    devices = np.array([[dev(0)] * 4, [dev(1)] * 4], dtype=object)     # replica x data
    mesh = types.SimpleNamespace(devices=devices, axis_names=("replica", "data"))
    assert mesh_coordinates(mesh, 1) == "replica=1 of 2"
    devices = np.array([[dev(0), dev(0), dev(1), dev(1)]] * 2, dtype=object)
    mesh = types.SimpleNamespace(devices=devices, axis_names=("replica", "data"))
    assert mesh_coordinates(mesh, 0) == "data=0..1 of 4"


def _stall(event):
    event.wait()  # the frame the traceback must show


def test_watchdog_fires_with_stacks_and_names_the_stopped_process(tmp_path):
    (tmp_path / "heartbeats").mkdir()
    stale = {"process": 1, "pid": 4242, "host": "h1", "step": 6, "step_time": time.time() - 9,
             "alive": time.time() - 8}
    (tmp_path / "heartbeats/process_1.json").write_text(json.dumps(stale))
    fired, out = [], (tmp_path / "log.txt").open("w+")
    stop = threading.Event()
    staller = threading.Thread(target=_stall, args=(stop,), name="stalled-loop")
    staller.start()
    wd = Watchdog(tmp_path, 0, timeout_s=0.5, interval=0.05,
                  on_hang=lambda code: fired.append((code, time.time())), stream=out)
    try:
        time.sleep(0.7)
        assert not fired  # startup_s=0: not armed before the first finished step
        for s in range(1, 8):
            wd.beat(s)
            time.sleep(0.02)
        t_last = wd.step_time  # the last beat
        deadline = t_last + 5
        while not fired and time.time() < deadline:
            time.sleep(0.01)
    finally:
        stop.set()
        staller.join()
        wd.stop()
    assert fired and fired[0][0] == HANG_EXIT_CODE == 4
    latency = fired[0][1] - t_last
    assert 0.5 <= latency < 0.5 + 0.5, latency  # T plus at most a few check intervals
    out.seek(0)
    log = out.read()
    assert "in _stall" in log  # the stalled thread, not only the watchdog
    assert "Thread 0x" in log
    hang = [ln for ln in log.splitlines() if ln.startswith("hang:")]
    assert len(hang) == 1, log
    assert "process 0: nothing finished in 0.5 s (steps; last finished step 7" in hang[0]
    assert re.search(r"behind: process 1 \(pid 4242 on h1\) sent no heartbeat for (9|10) s, "
                     r"last step 6: stopped or dead;", hang[0]), hang[0]
    assert "exiting with code 4" in hang[0]
    beats = read_heartbeats(tmp_path)
    assert beats[0]["step"] == 7 and beats[1]["step"] == 6


def test_watchdog_is_armed_from_start_up_then_by_phase(tmp_path):
    """Restore, compile and the first step share the start-up allowance; what follows the
    last step gets its own bound."""
    fired, out = [], (tmp_path / "log.txt").open("w+")  # faulthandler needs a real file
    wd = Watchdog(tmp_path, 0, timeout_s=0.3, startup_s=0.6, interval=0.02,
                  on_hang=lambda code: fired.append(time.time()), stream=out)
    t0 = time.time()
    try:
        while not fired and time.time() < t0 + 5:
            time.sleep(0.01)
    finally:
        wd.stop()
    assert fired and 0.6 <= fired[0] - t0 < 3.0, fired  # (slack for a loaded machine)
    out.seek(0)
    assert "nothing finished in 0.6 s (start-up: restore, compile and the first step; last " \
           "finished step 0" in out.read()
    fired.clear()
    wd = Watchdog(tmp_path, 0, timeout_s=0.3, startup_s=60, interval=0.02,
                  on_hang=lambda code: fired.append(time.time()), stream=out)
    try:
        wd.beat(1)
        time.sleep(0.1)
        wd.phase("after the last step")
        t1 = time.time()
        while not fired and time.time() < t1 + 5:
            time.sleep(0.01)
    finally:
        wd.stop()
    assert fired and 0.3 <= fired[0] - t1 < 3.0
    out.seek(0)
    assert "(after the last step; last finished step 1" in out.read()


def test_behind_lines():
    now = 100.0
    alive = lambda p, s: {"process": p, "pid": p, "host": "h", "step": s, "alive": now - 0.1}
    assert behind({0: alive(0, 5), 1: alive(1, 4)}, now, 2.0) == \
        "behind: process 1 is alive at step 4 (others at 5)"
    assert behind({0: alive(0, 5), 1: alive(1, 5)}, now, 2.0).startswith(
        "every process is alive at step 5")
    assert behind({}, now, 2.0) == "no heartbeats found"


def test_step_monitor_times_steps_and_warns(tmp_path, capsys, monkeypatch):
    """A fake clock: every step takes 10 ms of host time and 20 ms of waiting, except steps
    11 (after a "checkpoint" at 10: not judged) and 25, which take 0.5 s more."""
    clock = [1000.0]
    monkeypatch.setattr("jaxpar.monitor.steps.time.perf_counter", lambda: clock[0])
    mon = StepMonitor(tmp_path, start_step=0, total_steps=30, log_every=5,
                      quiet_steps=lambda s: s == 10, process=0, num_processes=1)
    real = jax.block_until_ready

    def wait(x):  # the device runs for 20 ms
        clock[0] += 0.02
        return real(x)

    monkeypatch.setattr("jaxpar.monitor.steps.jax.block_until_ready", wait)
    with mon:
        for step in range(1, 31):
            clock[0] += 0.01 + (0.5 if step in (11, 25) else 0.0)   # host work
            m = mon.step(step, {"loss": jnp.float32(step)})
            assert set(m) == {"loss", "step_s"}
    recs = [json.loads(ln) for ln in (tmp_path / "steps/process_0.jsonl").read_text().split("\n")
            if ln]
    assert [r["step"] for r in recs] == list(range(1, 31))
    assert [r["step_s"] for r in recs if r["step"] not in (11, 25)] == [0.03] * 28
    assert recs[24]["host_s"] == 0.51 and recs[24]["wait_s"] == 0.02
    # compilation; after a log step (every 5, and the first); after a "checkpoint" at 10
    assert [r["step"] for r in recs if not r["judged"]] == [1, 2, 6, 11, 16, 21, 26]
    err = capsys.readouterr().err
    warnings = [ln for ln in err.splitlines() if ln.startswith("warning:")]
    assert warnings == ["warning: process 0: step 25 took 0.530 s, 17.7x the median 0.030 s of "
                        "the last 18 steps (robust z 1667)"], err


def test_launch_restarts_a_group_whose_process_hung(tmp_path):
    """A real process hangs after its first step: its watchdog ends it with exit 4, the
    launcher stops the group and starts it again; the second attempt finishes."""
    code = (
        "import os, sys, time\n"
        "from pathlib import Path\n"
        "marker = Path(sys.argv[1]) / ('ran_' + os.environ['JAXPAR_PROCESS_ID'])\n"
        "if os.environ['JAXPAR_PROCESS_ID'] == '1' and not marker.exists():\n"
        "    marker.touch()\n"
        "    import importlib.util as u  # the watchdog module alone: no jax to import\n"
        "    spec = u.spec_from_file_location('watchdog', sys.argv[2])\n"
        "    w = u.module_from_spec(spec); spec.loader.exec_module(w)\n"
        "    wd = w.Watchdog(sys.argv[1], 1, timeout_s=1.0, interval=0.1)\n"
        "    wd.beat(1)\n"
        "    time.sleep(60)  # the hang\n"
        "print('finished', os.environ['JAXPAR_PROCESS_ID'])\n")
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, str(ROOT / "scripts/launch.py"), "-n", "2", "--restarts",
                        "1", "--log-dir", str(tmp_path / "logs"), "--timeout", "60", "--",
                        sys.executable, "-c", code, str(tmp_path),
                        str(ROOT / "jaxpar/monitor/watchdog.py")],
                       capture_output=True, text=True, timeout=90)
    assert r.returncode == 0, r.stderr
    assert "process 1 exited with 4" in r.stderr
    assert "restart 1 (1 of 1 in the last 3600 s)" in r.stderr
    hung = (tmp_path / "logs/attempt_0/process_1.log").read_text()
    assert "hang: process 1: nothing finished in 1 s (steps; last finished step 1" in hung
    assert "time.sleep(60)" not in hung and 'File "<string>"' in hung  # the main thread's stack
    assert "finished 1" in (tmp_path / "logs/process_1.log").read_text()
    assert time.monotonic() - t0 < 60


def test_launch_gives_up_after_k_restarts(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "scripts/launch.py"), "-n", "2", "--restarts",
                        "2", "--log-dir", str(tmp_path), "--", sys.executable, "-c",
                        "import sys; sys.exit(5)"], capture_output=True, text=True, timeout=30)
    assert r.returncode == 5
    assert r.stderr.count("exited with 5") == 3
    assert "restart 2 (2 of 2 in the last 3600 s)" in r.stderr and "giving up" in r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "attempt_0", "attempt_1", "process_0.log", "process_1.log"]


def test_restart_budget_is_per_window_and_resets_after_progress():
    import importlib.util
    spec = importlib.util.spec_from_file_location("launch", ROOT / "scripts/launch.py")
    launch = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(launch)
    now = [0.0]
    b = launch.RestartBudget(2, 3600, clock=lambda: now[0])
    assert b.allow(10) and b.allow(10) and not b.allow(10)  # a burst: 2 per hour
    now[0] = 3700  # an hour later the first two have expired
    assert b.allow(10) and b.allow(10) and not b.allow(10)
    now[0] = 3800
    assert b.allow(4000)  # an attempt that ran longer than the window made progress
    assert b.allow(10) and not b.allow(10)
    assert not launch.RestartBudget(0, 3600).allow(10)


def test_launch_does_not_restart_a_bad_config(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "scripts/launch.py"), "-n", "2", "--restarts",
                        "3", "--log-dir", str(tmp_path), "--", sys.executable, "-c",
                        "import sys; sys.exit(2)"], capture_output=True, text=True, timeout=30)
    assert r.returncode == 2 and "restart 1 (" not in r.stderr and r.stderr.count("exited") == 1
    assert "exit code 2 (bad config or refused resume): not restarting" in r.stderr


def test_launch_blames_the_killed_process_not_the_peer_that_aborted_after_it(tmp_path):
    """Process 1 is SIGKILLed; process 0 aborts a moment later, as a survivor does in a broken
    collective. Both are usually found dead in the same poll: the launcher must name the
    SIGKILL as the failure (what the fault drill and a restart policy read), not the abort."""
    code = (
        "import os, signal, sys, time\n"
        "from pathlib import Path\n"
        "marker = Path(sys.argv[1]) / 'killed'\n"
        "if os.environ['JAXPAR_PROCESS_ID'] == '1':\n"
        "    marker.touch(); os.kill(os.getpid(), signal.SIGKILL)\n"
        "while not marker.exists(): time.sleep(0.001)\n"
        "os.abort()\n")
    r = subprocess.run([sys.executable, str(ROOT / "scripts/launch.py"), "-n", "2", "--log-dir",
                        str(tmp_path / "logs"), "--", sys.executable, "-c", code, str(tmp_path)],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == -9 % 256, r.stderr  # sys.exit(-9) as an exit status
    assert r.stderr.startswith("process 1 exited with -9; stopping the group"), r.stderr
