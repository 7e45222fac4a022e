"""Faults the loop handles itself: preemption signals and non-finite steps. Every decision
here is the group's by construction: it is read from the compiled step's own collectives,
so every process sees the same value at the same step.

**Preemption.** SIGTERM (what schedulers send before killing) and SIGINT (Ctrl-C) set a
flag; the next step is dispatched with it (`stop`, one int per device, each process filling
its own), and the step reduces the flags over every device (`guard`: a max, beside the
step's other collectives). So a signal to any one process stops the whole group after the
same step — the first one dispatched after the signal, at most one step later — and every
process saves that step together, waits for the commit and returns: exit code 0, and the
same command resumes exactly. A second SIGINT raises KeyboardInterrupt at once.

**Non-finite steps** (`train.nonfinite`). Every compiled step is wrapped by `guard`: when the
loss or the gradient norm is not finite (both are already reduced over the whole mesh), the
new state is dropped inside the step (`jnp.where`, no host round trip) — params, optimizer
moments, Adam's count and the step counter stay as they were (with DiLoCo the whole DiLoCo
state, so its sync schedule shifts by the skipped step) — and the step reports
`nonfinite=1`. The loop then applies the policy:

- `rollback` (the default): PaLM's remedy for loss spikes — restore the newest checkpoint
  (agreed by the group) and skip the batches from it through the bad one (the data position
  moves on; the checkpoint meta records it as `data_step`). After `MAX_ROLLBACKS` in one
  start it acts as `stop`. The default because an unattended run must get past one bad
  batch (a `stop` default ended it, and `launch.py` does not restart exit 3), while a run
  that truly diverges still stops: skipping alone would keep the state that produced the
  spike, and a state that is already broken would skip forever.
- `skip`: go on with the next batch; the count is `nonfinite` in metrics.jsonl and
  `nonfinite_steps` in summary.json, and each log window with one says so in a line.
- `stop`: save the state as it was before the bad step (a checkpoint at the step before it),
  say which step and why in one line, exit 3 (`STOP_EXIT_CODE`; 4 is the hang watchdog's:
  `launch.py --restarts` restarts 4, not 3, which would only stop again). Nothing is lost:
  the same command with another policy (a change a resume allows) goes on.
"""
from __future__ import annotations

import signal
import time

import jax
import jax.numpy as jnp

POLICIES = ("rollback", "skip", "stop")
MAX_ROLLBACKS = 3
STOP_EXIT_CODE = 3


class Stopped(RuntimeError):
    """The run stopped on a non-finite step (`python -m jaxpar.train` exits with 3)."""


def guard(step_fn):
    """`step_fn(state, b) -> (state, metrics)` as `(state, b, stop_D) -> (state, metrics)`
    that keeps the old state when the new loss or gradient norm is not finite, and adds
    `nonfinite` (0 or 1) and `stop` (the max of the per-device flags `stop_D`) to the
    metrics."""
    def guarded(state, b, stop_D):
        new, m = step_fn(state, b)
        ok = jnp.isfinite(m["loss"]) & jnp.isfinite(m["grad_norm"])
        kept = jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, state)
        return kept, {**m, "nonfinite": 1 - ok.astype(jnp.int32), "stop": jnp.max(stop_D)}
    return guarded


class NonFinite:
    """The loop's side of `train.nonfinite`: counts, and for stop / rollback acts."""

    def __init__(self, policy: str):
        self.policy, self.count, self.rollbacks = policy, 0, 0

    def handle(self, step, m, state, offset, *, run, ckpt, writer, meta_of, say):
        """None: go on (skip). (step, state, offset) to go on from after a rollback.
        Raises Stopped (after saving the state before the bad step) for stop."""
        self.count += 1
        if self.policy == "skip":
            return None
        if self.policy == "stop" or self.rollbacks == MAX_ROLLBACKS:
            writer.write({"step": step, **{k: float(v) if k != "nonfinite" else int(v)
                                           for k, v in jax.device_get(m).items()}})
            ckpt.save(step - 1, state, meta_of(step - 1, offset))  # the bad update was dropped
            ckpt.wait(), ckpt.close(), writer.close()
            raise Stopped(f"step {step}: loss {float(m['loss'])}, grad norm "
                          f"{float(m['grad_norm'])} (train.nonfinite={self.policy}, "
                          f"{self.rollbacks} rollbacks); checkpoint {step - 1} holds the state "
                          f"before it; rerun with train.nonfinite=skip or rollback to go on")
        self.rollbacks += 1
        ckpt.wait()
        c, state, _ = ckpt.restore_newest(state, say)
        state = state if c else run.init_state()
        skipped = [c + 1 + offset, step + offset]  # data steps
        say(f"step {step}: non-finite loss; rolled back to step {c}, skipping data steps "
            f"{skipped[0]}..{skipped[1]} (rollback {self.rollbacks} of at most {MAX_ROLLBACKS})")
        writer.restart_at(c)
        writer.write({"step": c, "rollback_from": step, "data_skipped": skipped})
        return c, state, step + offset - c


class Preemption:
    """`with Preemption() as p: ... run.train_step(state, b, stop=p.signal is not None)` —
    SIGTERM/SIGINT set `signal` (handlers are installed only in the main thread, and
    restored on exit); the step's `stop` metric is the group's decision."""

    def __init__(self):
        self.signal: str | None = None
        self.at = 0.0
        self._old = {}

    def _handle(self, signum, frame):
        if self.signal == "SIGINT" and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now
        self.signal, self.at = signal.Signals(signum).name, time.monotonic()

    def __enter__(self):
        import threading
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGTERM, signal.SIGINT):
                self._old[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc):
        for s, h in self._old.items():
            signal.signal(s, h)

    def agreed(self) -> None:
        """The step said stop: a peer's signal when this process had none."""
        if self.signal is None:
            self.signal, self.at = "a peer's signal", time.monotonic()
