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

`--islands K`: Streaming DiLoCo islands (the command's config sets `diloco.islands`, without
`id`). Each island is its own group of -n processes with its own coordinator port and
--devices/K/n CPU devices per process, and gets JAXPAR_ISLAND_ID=k; `{island}` in the command
is replaced by k (each island needs its own run folder: `train.run_dir=runs/x/island_{island}`);
its logs go to LOGDIR/island_{k}/process_{i}.log. Islands share nothing but the sync store:
a failed island is stopped alone (the others go on) and, with --restarts, started again alone
(its own budget), so it rejoins at the next round. The exit code is the first island's failure that
was not restarted (0 if every island finished).

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
           restart_window: float = 3600.0, islands: int = 0) -> int:
    if restarts < 0:
        raise SystemExit(f"--restarts={restarts} must be >= 0")
    if islands:
        return launch_islands(cmd, islands, n, devices=devices, log_dir=log_dir,
                              timeout=timeout, echo=echo, restarts=restarts,
                              restart_window=restart_window)
    if devices % n:
        raise SystemExit(f"--devices={devices} must be divisible by -n={n}")
    logs = Path(log_dir)
    logs.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + timeout if timeout else float("inf")
    budget = RestartBudget(restarts, restart_window)
    attempt = 0
    while True:
        if attempt:
            keep = _keep_logs(logs, n, attempt)
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


def _keep_logs(logs: Path, n: int, attempt: int) -> Path:
    """Move the last attempt's process logs into attempt_{attempt-1}/."""
    keep = logs / f"attempt_{attempt - 1}"
    keep.mkdir(exist_ok=True)
    for i in range(n):
        if (logs / f"process_{i}.log").exists():
            os.replace(logs / f"process_{i}.log", keep / f"process_{i}.log")
    return keep


def _consequence_rank(failure: tuple[int, int]) -> int:
    """Which of several processes found failed in one poll is the cause: when one process
    is killed from outside, its peers abort (SIGABRT) moments later in a broken collective,
    often before the next poll; naming the abort would blame the wrong process."""
    code = failure[1]
    return 1 if code == -signal.SIGABRT else 0


class Group:
    """n processes of one job (jax.distributed among them), each in a session of its own."""

    def __init__(self, cmd, n, devices, logs: Path, env_extra: dict | None = None):
        self.n, self.logs = n, logs
        self.port = free_port()
        self.procs, self.files = [], []
        try:
            for i in range(n):
                env = dict(os.environ, JAXPAR_COORDINATOR=f"127.0.0.1:{self.port}",
                           JAXPAR_NUM_PROCESSES=str(n), JAXPAR_PROCESS_ID=str(i),
                           **(env_extra or {}))
                env.setdefault("JAX_PLATFORMS", "cpu")
                if env["JAX_PLATFORMS"] == "cpu":
                    flags = [f for f in env.get("XLA_FLAGS", "").split()
                             if not f.startswith("--xla_force_host_platform_device_count")]
                    env["XLA_FLAGS"] = " ".join(flags + [
                        f"--xla_force_host_platform_device_count={devices // n}"])
                fh = open(logs / f"process_{i}.log", "w")
                self.files.append(fh)
                # own process group, so a stop reaches the job's children too
                self.procs.append(subprocess.Popen(cmd, env=env, stdout=fh,
                                                   stderr=subprocess.STDOUT,
                                                   start_new_session=True))
        except BaseException:
            self.stop()
            raise

    def poll(self, name: str = "the group") -> int | None:
        """None while running; 0 when every process succeeded; else the failure's exit code
        (said in one line)."""
        states = [p.poll() for p in self.procs]
        failed = [(i, c) for i, c in enumerate(states) if c not in (None, 0)]
        if failed:
            i, code = min(failed, key=_consequence_rank)
            also = "".join(f"; process {j} also ended ({c})" for j, c in failed if j != i)
            print(f"process {i} exited with {code}; stopping {name} "
                  f"(see {self.logs}/process_{i}.log){also}", file=sys.stderr, flush=True)
            return code
        return 0 if all(c == 0 for c in states) else None

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)  # also ends a stopped (SIGSTOP) process
        for p in self.procs:
            p.wait()
        for fh in self.files:
            fh.close()


def _run_group(cmd, n, devices, logs: Path, deadline: float, timeout: float,
               echo: bool) -> int:
    group = Group(cmd, n, devices, logs)
    if echo:
        print(f"launched {n} processes (coordinator 127.0.0.1:{group.port}); logs in {logs}/",
              flush=True)
    try:
        while (code := group.poll()) is None:
            if time.monotonic() > deadline:
                print(f"timeout after {timeout:.0f} s; stopping the group", file=sys.stderr)
                return 124
            time.sleep(0.05)
        return code
    finally:
        group.stop()


def check_islands_cmd(cmd: list[str], islands: int) -> None:
    """A `python -m jaxpar.train CONFIG ...` command must configure `diloco.islands` for
    `islands` islands and leave the id to JAXPAR_ISLAND_ID; one line (SystemExit) if not."""
    if "jaxpar.train" not in cmd or cmd.index("jaxpar.train") + 1 >= len(cmd):
        return  # another program: its own business
    from jaxpar.train.config import ConfigError, load_config

    at = cmd.index("jaxpar.train") + 1
    args = [a for a in cmd[at:] if not a.startswith("--")]
    try:
        cfg = [load_config(args[0], [a.replace("{island}", str(k)) for a in args[1:]])
               for k in (0, 1)]
    except ConfigError as e:
        raise SystemExit(f"error: {e}") from None
    raw = cfg[0].diloco.islands
    if not raw:
        raise SystemExit(f"--islands {islands}: the config sets no diloco.islands; add "
                         f"diloco.islands={{store: PATH, count: {islands}}} (and "
                         f"diloco.enabled=true)")
    if raw.get("count") != islands:
        raise SystemExit(f"--islands {islands} but diloco.islands.count={raw.get('count')}: "
                         f"give both the same number")
    if "id" in raw:
        raise SystemExit(f"--islands {islands}: leave diloco.islands.id out of the config "
                         f"(id={raw['id']}); launch.py sets $JAXPAR_ISLAND_ID per island")
    if cfg[0].train.run_dir == cfg[1].train.run_dir:
        raise SystemExit(f"--islands {islands}: every island needs its own run folder; put "
                         f"{{island}} in it, e.g. train.run_dir={cfg[0].train.run_dir}/"
                         f"island_{{island}}")


def launch_islands(cmd, islands: int, n: int, *, devices: int, log_dir: str,
                   timeout: float | None, echo: bool, restarts: int,
                   restart_window: float) -> int:
    """Each island its own group (module doc); a failed island is restarted alone."""
    if islands < 1 or devices % (islands * n):
        raise SystemExit(f"--devices={devices} must be divisible by --islands={islands} × "
                         f"-n={n}")
    check_islands_cmd(cmd, islands)
    per_island = devices // islands
    deadline = time.monotonic() + timeout if timeout else float("inf")
    logs = {k: Path(log_dir) / f"island_{k}" for k in range(islands)}
    budgets = {k: RestartBudget(restarts, restart_window) for k in range(islands)}
    attempts, groups, began, codes = dict.fromkeys(range(islands), 0), {}, {}, {}

    def start(k):
        logs[k].mkdir(parents=True, exist_ok=True)
        if attempts[k]:
            keep = _keep_logs(logs[k], n, attempts[k])
            print(f"island {k}: restart {attempts[k]} ({len(budgets[k].times)} of {restarts} "
                  f"in the last {restart_window:g} s), alone (earlier logs in {keep}/)",
                  file=sys.stderr, flush=True)
        groups[k] = Group([a.replace("{island}", str(k)) for a in cmd], n, per_island, logs[k],
                          {"JAXPAR_ISLAND_ID": str(k)})
        began[k] = time.monotonic()

    try:
        for k in range(islands):
            start(k)
        if echo:
            print(f"launched {islands} islands of {n} processes ({per_island // n} devices "
                  f"each); logs in {log_dir}/island_{{k}}/", flush=True)
        while groups:
            if time.monotonic() > deadline:
                print(f"timeout after {timeout:.0f} s; stopping every island", file=sys.stderr)
                return 124
            for k in list(groups):
                code = groups[k].poll(f"island {k}")
                if code is None:
                    continue
                groups.pop(k).stop()
                if code in FINAL and restarts:
                    print(f"island {k}: exit code {code} ({FINAL[code]}): not restarting",
                          file=sys.stderr, flush=True)
                if code and code not in FINAL and budgets[k].allow(time.monotonic() - began[k]):
                    attempts[k] += 1
                    start(k)
                    continue
                codes[k] = code
                if echo:
                    print(f"island {k}: exit code {code}", flush=True)
            time.sleep(0.05)
    finally:
        for g in groups.values():
            g.stop()
    return next((c for c in codes.values() if c), 0)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-n", type=int, default=None,
                    help="processes (per island with --islands; default 2, with --islands 1)")
    ap.add_argument("--devices", type=int, default=8, help="CPU devices in all")
    ap.add_argument("--log-dir", default="launch_logs")
    ap.add_argument("--timeout", type=float, default=None,
                    help="seconds for the whole group, all attempts (default: no limit)")
    ap.add_argument("--restarts", type=int, default=0,
                    help="start a failed group again, at most this many times per "
                         "--restart-window (resumes)")
    ap.add_argument("--restart-window", type=float, default=3600.0,
                    help="seconds over which --restarts is counted (default 3600)")
    ap.add_argument("--islands", type=int, default=0,
                    help="Streaming DiLoCo islands: each its own group of -n processes")
    ap.add_argument("cmd", nargs=argparse.REMAINDER, help="-- command to run in each process")
    args = ap.parse_args()
    cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    if not cmd:
        ap.error("give the command after --, e.g. -- python -m jaxpar.train configs/demo.yaml")
    n = args.n or (1 if args.islands else 2)
    return launch(cmd, n, devices=args.devices, log_dir=args.log_dir, timeout=args.timeout,
                  restarts=args.restarts, restart_window=args.restart_window,
                  islands=args.islands)


if __name__ == "__main__":
    sys.exit(main())
