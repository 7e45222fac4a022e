"""`StepMonitor`: what the training loop calls once per step.

    with StepMonitor.for_run(run, run_dir, start_step) as monitor:
        for step in ...:
            state, m = run.train_step(state, b)
            b = run.batch(step + 1)
            m = monitor.step(step, m)   # blocks on this step; times it; heartbeat; warnings

Per step and process it records `step_s` (finished-to-finished wall time), `host_s` (the
part spent outside waiting on the device) and `wait_s` to `RUN_DIR/steps/process_{i}.jsonl`,
and adds `step_s` to the step's metrics (so the logged records in `metrics.jsonl` carry it).
A slow step (robust z-score over the process's own last 50 steps) is a warning line from
that process. The first step (compilation) and steps whose window held an eval, a
checkpoint save or (with `log_every` > 1) the logging are recorded but not judged.

Every `train.log_every` steps, with more than one process, the processes exchange their
median host time per step (`process_allgather`); one slower than its peers for 3 intervals
in a row is a warning line from process 0 naming it and the mesh coordinates its devices
hold. Steps whose window held the logging (which only process 0 does) are left out of that
comparison, so with `log_every=1` there is none. The hang watchdog, when given, is told of
every finished step (the trainer creates it at start-up: `jaxpar.monitor.watchdog`).

Blocking on each step keeps one step in flight: the next batch is built on the host while
the device runs this step (the loop builds it before calling `step`), then the host waits.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import jax
import numpy as np

from jaxpar.monitor.outliers import OutlierDetector, PeerTracker
from jaxpar.monitor.watchdog import Watchdog


def mesh_coordinates(mesh, process: int) -> str:
    """The mesh coordinates a process's devices hold, on the axes where it holds a strict
    part (e.g. 'replica=1'); '' when it holds every coordinate of every axis."""
    procs = np.vectorize(lambda d: d.process_index)(mesh.devices)
    mine = np.argwhere(procs == process)
    parts = []
    for i, name in enumerate(mesh.axis_names):
        held = sorted(set(mine[:, i].tolist()))
        if 0 < len(held) < mesh.devices.shape[i]:
            span = str(held[0]) if len(held) == 1 else f"{held[0]}..{held[-1]}"
            parts.append(f"{name}={span} of {mesh.devices.shape[i]}")
    return ", ".join(parts)


def warn(msg: str) -> None:
    print(f"warning: {msg}", file=sys.stderr, flush=True)


class StepMonitor:
    def __init__(self, run_dir, *, start_step: int, total_steps: int, log_every: int,
                 watchdog: Watchdog | None = None, quiet_steps=lambda step: False, mesh=None,
                 process: int | None = None, num_processes: int | None = None):
        self.process = jax.process_index() if process is None else process
        self.num_processes = jax.process_count() if num_processes is None else num_processes
        self.total, self.log_every, self.mesh = total_steps, log_every, mesh
        self.quiet_steps = quiet_steps  # steps after which the loop evaluated or saved
        self.outliers = OutlierDetector()
        self.peers = PeerTracker(self.num_processes)
        self.watchdog = watchdog
        steps_dir = Path(run_dir) / "steps"
        steps_dir.mkdir(parents=True, exist_ok=True)
        self.log = (steps_dir / f"process_{self.process}.jsonl").open("a")
        self.start = start_step
        self.last_done = time.perf_counter()
        self.interval_host = []

    @classmethod
    def for_run(cls, run, run_dir, start_step: int, watchdog=None) -> "StepMonitor":
        c = run.cfg
        ev, ck = c.eval.every, c.checkpoint.every
        return cls(run_dir, start_step=start_step, total_steps=c.train.steps,
                   log_every=c.train.log_every, watchdog=watchdog,
                   quiet_steps=lambda s: bool((ev and s % ev == 0) or (ck and s % ck == 0)),
                   mesh=run.mesh)

    def step(self, step: int, metrics: dict) -> dict:
        """Wait for `step`, record its time; returns `metrics` with `step_s` added."""
        called = time.perf_counter()
        jax.block_until_ready(metrics)
        done = time.perf_counter()
        step_s, wait_s = done - self.last_done, done - called
        host_s = step_s - wait_s
        self.last_done = done
        if self.watchdog is not None:
            self.watchdog.beat(step)
            if step == self.total:
                self.watchdog.phase("after the last step: eval, sample, final commit")
        first = step == self.start + 1  # compiles
        # the loop logs after this call, so step s's logging falls in step s+1's window
        after_log = (step - 1) % self.log_every == 0 or step - 1 == self.start + 1
        judge = (not first and not self.quiet_steps(step - 1)
                 and not (after_log and self.log_every > 1))
        self.log.write(f'{{"step": {step}, "step_s": {step_s:.6f}, "host_s": {host_s:.6f}, '
                       f'"wait_s": {wait_s:.6f}, "judged": {str(judge).lower()}}}\n')
        msg = self.outliers.observe(step, step_s, judge=judge)
        if msg:
            warn(f"process {self.process}: {msg}")
        if judge and not after_log:  # process 0 alone logs: never compare that time
            self.interval_host.append(host_s)
        if step % self.log_every == 0:
            self.log.flush()
            if self.num_processes > 1:
                self._compare_peers(step)
        return {**metrics, "step_s": step_s}

    def _compare_peers(self, step: int) -> None:
        from jax.experimental import multihost_utils

        mine = float(np.median(self.interval_host)) if self.interval_host else 0.0
        self.interval_host = []
        host_P = np.asarray(multihost_utils.process_allgather(np.float32(mine))).reshape(-1)
        for p in self.peers.update(host_P):
            if self.process != 0:
                continue
            where = mesh_coordinates(self.mesh, p) if self.mesh is not None else ""
            others = float(np.median(np.delete(host_P, p)))
            warn(f"process {p}{f' (mesh {where})' if where else ''} is slower than its peers "
                 f"for {self.peers.patience} log intervals up to step {step}: "
                 f"{host_P[p] * 1e3:.1f} ms of host time per step vs {others * 1e3:.1f} ms "
                 f"(median of the others); the others wait for it in every collective")

    def __enter__(self) -> "StepMonitor":
        return self

    def __exit__(self, *exc) -> None:
        self.close()  # also on an exception: a watchdog must not outlive its loop

    def close(self) -> None:
        self.log.close()  # the watchdog belongs to the trainer, which stops it
