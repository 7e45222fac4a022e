"""`train.profile`: a `jax.profiler` trace of steps k..k+n-1, written to the run folder.

    train: {profile: {start: 10, steps: 3}}         # every process
    train: {profile: {start: 10, steps: 3, process: 0}}

The trace of process i goes to `RUN_DIR/profile/process_{i}/` (TensorBoard's profile plugin
and xprof read it: `tensorboard --logdir RUN_DIR/profile`). Tracing starts right before step
`start` is dispatched and stops once step `start + steps - 1` has finished (the loop waits
for every step), so the trace holds exactly those steps' host and device work. A step
`start` at or before the step a run resumes from is never reached again: no trace, and one
line says so.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import jax


@dataclasses.dataclass(frozen=True)
class ProfileConfig:
    start: int
    steps: int = 1
    process: int | None = None  # None: every process


def profile_config(raw: dict) -> ProfileConfig | None:
    """The checked `train.profile` mapping (None when empty); ValueError naming the key."""
    if not raw:
        return None
    fields = [f.name for f in dataclasses.fields(ProfileConfig)]
    for key in raw:
        if key not in fields:
            raise ValueError(f"unknown key train.profile.{key} (valid keys: {', '.join(fields)})")
    if "start" not in raw:
        raise ValueError("train.profile.start is required (the first step to trace, >= 1)")
    for key, low in (("start", 1), ("steps", 1)):
        v = raw.get(key, low)
        if not isinstance(v, int) or isinstance(v, bool) or v < low:
            raise ValueError(f"train.profile.{key}={v!r} must be an int >= {low}")
    proc = raw.get("process", "all")
    if proc != "all" and (not isinstance(proc, int) or isinstance(proc, bool) or proc < 0):
        raise ValueError(f"train.profile.process={proc!r} must be 'all' or a process index")
    return ProfileConfig(raw["start"], raw.get("steps", 1), None if proc == "all" else proc)


class Profiler:
    """`with Profiler(cfg.train.profile, run_dir, say) as prof: ... prof.before(step) ...
    prof.after(step)` — no-ops unless this process traces."""

    def __init__(self, raw: dict, run_dir, say=lambda msg: None, *, start_step: int = 0):
        self.cfg = profile_config(raw)
        me = jax.process_index()
        self.on = self.cfg is not None and self.cfg.process in (None, me)
        self.dir = Path(run_dir) / "profile" / f"process_{me}"
        self.running = False
        if self.on and self.cfg.start <= start_step:
            say(f"train.profile.start={self.cfg.start} is at or before the step this run "
                f"resumes from ({start_step}): no trace")
            self.on = False

    def before(self, step: int) -> None:
        if self.on and step == self.cfg.start:
            self.dir.mkdir(parents=True, exist_ok=True)
            jax.profiler.start_trace(str(self.dir))
            self.running = True

    def after(self, step: int) -> None:
        if self.running and step >= self.cfg.start + self.cfg.steps - 1:
            self.stop()

    def stop(self) -> None:
        if self.running:
            jax.profiler.stop_trace()
            self.running = False

    def __enter__(self) -> "Profiler":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()  # a run that ends or stops inside the window still writes its trace
