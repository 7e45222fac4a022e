"""Hang watchdog and heartbeats (no jax: usable from any process, testable in-process).

Every process runs a daemon thread that, every `interval` seconds, writes
`RUN_DIR/heartbeats/process_{i}.json` = {process, pid, host, step, step_time, alive}:
`step` / `step_time` the last finished step and when, `alive` the wall time of the write.
A process stuck in a collective keeps `alive` fresh while `step` stops; a stopped (SIGSTOP)
or dead process stops both. When no step has finished for `timeout_s`, the watchdog:

1. writes the stack of every thread to stderr (`faulthandler.dump_traceback`),
2. prints one line naming the processes that are behind, read from the heartbeats,
3. ends the process with `HANG_EXIT_CODE` (4) via `os._exit` (a thread blocked inside a
   collective cannot be interrupted; `scripts/launch.py --restarts k` then restarts the group).

It is armed from the moment it is created, which the trainer does first thing: restore,
compile and the first step share one allowance (`startup_s`, `train.startup_timeout_s`: a
first compile can take minutes), every later phase gets `timeout_s`
(`train.hang_timeout_s`) from its start — each step from the end of the one before, and
`phase(name)` restarts the clock for what follows the last step (final eval, sample,
commit). So a peer stopped during restore or compilation ends the group too: the others
wait for it in the first step's collectives until the start-up allowance runs out.
`stop()` disarms it.
"""
from __future__ import annotations

import faulthandler
import json
import os
import socket
import sys
import threading
import time
from pathlib import Path

HANG_EXIT_CODE = 4  # distinct from 1 (exception), 2 (bad config), 3 (non-finite stop)


def heartbeat_dir(run_dir) -> Path:
    return Path(run_dir) / "heartbeats"


def read_heartbeats(run_dir) -> dict[int, dict]:
    out = {}
    for f in sorted(heartbeat_dir(run_dir).glob("process_*.json")):
        try:
            rec = json.loads(f.read_text())
        except (OSError, ValueError):  # being replaced right now: skip this one
            continue
        out[int(rec["process"])] = rec
    return out


def behind(beats: dict[int, dict], now: float, stale_s: float) -> str:
    """One line: which processes are behind, and how (stopped/dead vs. waiting)."""
    if not beats:
        return "no heartbeats found"
    top = max(b["step"] for b in beats.values())
    parts = []
    for p, b in sorted(beats.items()):
        age = now - b["alive"]
        if age > stale_s:
            parts.append(f"process {p} (pid {b['pid']} on {b['host']}) sent no heartbeat for "
                         f"{age:.0f} s, last step {b['step']}: stopped or dead")
        elif b["step"] < top:
            parts.append(f"process {p} is alive at step {b['step']} (others at {top})")
    if not parts:
        return (f"every process is alive at step {top}: they wait in a collective, the "
                f"device or the file system")
    return "behind: " + "; ".join(parts)


class Watchdog:
    def __init__(self, run_dir, process: int, timeout_s: float, *, startup_s: float = 0.0,
                 interval: float | None = None, on_hang=None, stream=None):
        self.dir = heartbeat_dir(run_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.path = self.dir / f"process_{process}.json"
        self.process, self.timeout_s = process, timeout_s
        self.interval = interval or min(1.0, max(timeout_s, 0.1) / 10)
        self.on_hang = on_hang or (lambda code: os._exit(code))
        self.stream = stream or sys.stderr
        self.step, self.step_time = 0, time.time()
        # startup_s = 0: armed by the first finished step (library use without a start-up bound)
        self.armed, self.allowance = startup_s > 0, startup_s
        self.phase_name = "start-up: restore, compile and the first step"
        self._stop = threading.Event()
        self.fired = False
        self._write()
        self._thread = threading.Thread(target=self._run, name="jaxpar-watchdog", daemon=True)
        self._thread.start()

    def beat(self, step: int) -> None:
        """A step finished: restart the clock with `timeout_s` for the next one."""
        self.step, self.step_time, self.armed = step, time.time(), self.timeout_s > 0
        self.allowance, self.phase_name = self.timeout_s, "steps"

    def phase(self, name: str) -> None:
        """A phase that is not a step begins (e.g. what follows the last step): `timeout_s`
        from now."""
        self.step_time, self.armed = time.time(), self.timeout_s > 0
        self.allowance, self.phase_name = self.timeout_s, name

    def __enter__(self) -> "Watchdog":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._write()

    def _write(self):
        rec = {"process": self.process, "pid": os.getpid(), "host": socket.gethostname(),
               "step": self.step, "step_time": self.step_time, "alive": time.time()}
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(rec))
        os.replace(tmp, self.path)  # readers never see half a file

    def _run(self):
        while not self._stop.wait(self.interval):
            try:
                self._write()
            except OSError:
                pass  # a full or vanished disk must not kill the run; the clock still runs
            if self.armed and time.time() - self.step_time > self.allowance:
                self._fire()
                return

    def _fire(self):
        self.fired = True
        now = time.time()
        faulthandler.dump_traceback(file=self.stream, all_threads=True)
        who = behind(read_heartbeats(self.dir.parent), now, stale_s=max(3 * self.interval, 2.0))
        print(f"hang: process {self.process}: nothing finished in {self.allowance:g} s "
              f"({self.phase_name}; last finished step {self.step}, "
              f"{now - self.step_time:.1f} s ago); {who}; exiting with code {HANG_EXIT_CODE}",
              file=self.stream, flush=True)
        self.on_hang(HANG_EXIT_CODE)
