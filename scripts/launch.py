"""Run one job as N processes on this host (jax.distributed + gloo on CPU).

    python scripts/launch.py -n 2 -- python -m jaxpar.train configs/demo.yaml

Each process gets JAXPAR_COORDINATOR / JAXPAR_NUM_PROCESSES / JAXPAR_PROCESS_ID (read by
`python -m jaxpar.train`) and, on CPU, 8/N simulated devices. Logs go to
LOGDIR/process_{i}.log (default: the current folder's `launch_logs/`). If one process fails
the others are stopped; so is the whole group after --timeout seconds, when given. The exit
code is the first failure's (0 if all succeed).

`--restarts k`: a group whose process failed (died, or hung and was ended by the trainer's
hang watchdog with exit 4) is stopped and started again with the same command, so
`python -m jaxpar.train` resumes from the run folder's last checkpoint. k is a budget per
`--restart-window` seconds (default an hour), not per run: a run of weeks meets many
faults, and what must end it is a burst of them (a fault the restart does not cure). An
attempt that ran longer than the window made progress and starts the count afresh. Exit
codes that the same command would only repeat are not restarted: 2 (a bad config or a
refused resume) and 3 (stopped on a non-finite step). Each attempt's logs are kept
(`process_{i}.log` is the last, `attempt_{j}/` the earlier ones). There is no time limit
unless `--timeout` sets one (for all attempts together: exit 124); hangs are the trainer's
watchdog's to find.

On a cluster, skip this script: start one process per host with `--distributed` and
`jax.distributed.initialize()` reads the cluster environment (the cluster's scheduler then
owns restarts).
"""
from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path


# exit codes of `python -m jaxpar.train` that a restart would only repeat
FINAL = {2: "bad config or refused resume", 3: "stopped on a non-finite step"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RestartBudget:
    """At most `k` restarts in any `window_s` seconds; an attempt that ran longer than the
    window (progress) forgets the earlier ones."""

    def __init__(self, k: int, window_s: float, clock=time.monotonic):
        self.k, self.window_s, self.clock = k, window_s, clock
        self.times: list[float] = []

    def allow(self, attempt_s: float) -> bool:
        now = self.clock()
        if attempt_s > self.window_s:
            self.times.clear()
        self.times = [t for t in self.times if now - t < self.window_s]
        if len(self.times) >= self.k:
            return False
        self.times.append(now)
        return True


def launch(cmd: list[str], n: int, *, devices: int = 8, log_dir: str = "launch_logs",
           timeout: float | None = None, echo: bool = True, restarts: int = 0,
           restart_window: float = 3600.0) -> int:
    if devices % n:
        raise SystemExit(f"--devices={devices} must be divisible by -n={n}")
    if restarts < 0:
        raise SystemExit(f"--restarts={restarts} must be >= 0")
    logs = Path(log_dir)
    logs.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + timeout if timeout else float("inf")
    budget = RestartBudget(restarts, restart_window)
    attempt = 0
    while True:
        if attempt:
            keep = logs / f"attempt_{attempt - 1}"
            keep.mkdir(exist_ok=True)
            for i in range(n):
                if (logs / f"process_{i}.log").exists():
                    os.replace(logs / f"process_{i}.log", keep / f"process_{i}.log")
            print(f"restart {attempt} ({len(budget.times)} of {restarts} in the last "
                  f"{restart_window:g} s): starting the group again (earlier logs in {keep}/)",
                  file=sys.stderr, flush=True)
        began = time.monotonic()
        code = _run_group(cmd, n, devices, logs, deadline, timeout, echo and attempt == 0)
        if code in FINAL and restarts:
            print(f"exit code {code} ({FINAL[code]}): not restarting, the same command would "
                  f"end the same way", file=sys.stderr, flush=True)
        if code in (0, 124) or code in FINAL:  # done, out of time, or would fail again
            break
        if not budget.allow(time.monotonic() - began):
            if restarts:
                print(f"{restarts} restarts within {restart_window:g} s: giving up",
                      file=sys.stderr, flush=True)
            break
        attempt += 1
    if echo and code == 0:
        sys.stdout.write((logs / "process_0.log").read_text())
    return code


def _consequence_rank(failure: tuple[int, int]) -> int:
    """Which of several processes found failed in one poll is the cause: when one process
    is killed from outside, its peers abort (SIGABRT) moments later in a broken collective,
    often before the next poll; naming the abort would blame the wrong process."""
    code = failure[1]
    return 1 if code == -signal.SIGABRT else 0


def _run_group(cmd, n, devices, logs: Path, deadline: float, timeout: float,
               echo: bool) -> int:
    port = free_port()
    procs, files = [], []
    for i in range(n):
        env = dict(os.environ, JAXPAR_COORDINATOR=f"127.0.0.1:{port}",
                   JAXPAR_NUM_PROCESSES=str(n), JAXPAR_PROCESS_ID=str(i))
        env.setdefault("JAX_PLATFORMS", "cpu")
        if env["JAX_PLATFORMS"] == "cpu":
            flags = [f for f in env.get("XLA_FLAGS", "").split()
                     if not f.startswith("--xla_force_host_platform_device_count")]
            env["XLA_FLAGS"] = " ".join(flags + [
                f"--xla_force_host_platform_device_count={devices // n}"])
        fh = open(logs / f"process_{i}.log", "w")
        files.append(fh)
        # own process group, so a stop reaches the job's children too
        procs.append(subprocess.Popen(cmd, env=env, stdout=fh, stderr=subprocess.STDOUT,
                                      start_new_session=True))
    if echo:
        print(f"launched {n} processes (coordinator 127.0.0.1:{port}); logs in {logs}/",
              flush=True)
    code = 0
    try:
        while True:
            states = [p.poll() for p in procs]
            failed = [(i, c) for i, c in enumerate(states) if c not in (None, 0)]
            if failed:
                i, code = min(failed, key=_consequence_rank)
                also = "".join(f"; process {j} also ended ({c})" for j, c in failed if j != i)
                print(f"process {i} exited with {code}; stopping the group "
                      f"(see {logs}/process_{i}.log){also}", file=sys.stderr, flush=True)
                break
            if all(c == 0 for c in states):
                break
            if time.monotonic() > deadline:
                print(f"timeout after {timeout:.0f} s; stopping the group", file=sys.stderr)
                code = 124
                break
            time.sleep(0.05)
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)  # also ends a stopped (SIGSTOP) process
        for p in procs:
            p.wait()
        for fh in files:
            fh.close()
    return code


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-n", type=int, default=2, help="processes")
    ap.add_argument("--devices", type=int, default=8, help="CPU devices in all")
    ap.add_argument("--log-dir", default="launch_logs")
    ap.add_argument("--timeout", type=float, default=None,
                    help="seconds for the whole group, all attempts (default: no limit)")
    ap.add_argument("--restarts", type=int, default=0,
                    help="start a failed group again, at most this many times per "
                         "--restart-window (resumes)")
    ap.add_argument("--restart-window", type=float, default=3600.0,
                    help="seconds over which --restarts is counted (default 3600)")
    ap.add_argument("cmd", nargs=argparse.REMAINDER, help="-- command to run in each process")
    args = ap.parse_args()
    cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    if not cmd:
        ap.error("give the command after --, e.g. -- python -m jaxpar.train configs/demo.yaml")
    return launch(cmd, args.n, devices=args.devices, log_dir=args.log_dir, timeout=args.timeout,
                  restarts=args.restarts, restart_window=args.restart_window)


if __name__ == "__main__":
    sys.exit(main())
