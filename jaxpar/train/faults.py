"""Faults the loop handles itself: preemption signals and non-finite steps.

**Preemption.** SIGTERM (what schedulers send before killing) and SIGINT (Ctrl-C) set a flag;
the loop finishes the step it is in, saves a checkpoint of it, waits for the save to
commit, and returns — exit code 0 — so the same command resumes exactly. A second SIGINT
raises KeyboardInterrupt at once. With several processes the flag is agreed on at log
steps (a host all-gather), so every process stops at the same step and saves together.

**Non-finite steps** (`train.nonfinite`). Every compiled step is wrapped by `guard`: when the
loss or the gradient norm is not finite, the new state is dropped inside the step
(`jnp.where`, no host round trip) — params, optimizer moments, Adam's count and the step
counter stay as they were (with DiLoCo the whole DiLoCo state, so its sync schedule shifts
by the skipped step) — and the step reports `nonfinite=1`. The loop then applies the policy:

- `stop` (the default): save the state as it was before the bad step (a checkpoint at the
  step before it), say which step and why in one line, exit 3 (`STOP_EXIT_CODE`; 4 is the
  hang watchdog's: `launch.py --restarts` restarts 4, not 3, which would only stop again).
  A run that diverges stops instead of spending days on NaN, and nothing is lost: the same
  command with `train.nonfinite=skip` or `rollback` (changes a resume allows) goes on.
- `skip`: go on with the next batch; the count is `nonfinite` in metrics.jsonl and
  `nonfinite_steps` in summary.json, and each log window with one says so in a line.
- `rollback`: PaLM's remedy for loss spikes — restore the newest checkpoint and skip the
  batches from it through the bad one (the data position moves on; the checkpoint meta
  records it as `data_step`). At most `MAX_ROLLBACKS` per start, then as `stop`.
"""
from __future__ import annotations

import signal
import time

import jax
import jax.numpy as jnp
import numpy as np

POLICIES = ("stop", "skip", "rollback")
MAX_ROLLBACKS = 3
STOP_EXIT_CODE = 3


class Stopped(RuntimeError):
    """The run stopped on a non-finite step (`python -m jaxpar.train` exits with 3)."""


def guard(step_fn):
    """`step_fn(state, b) -> (state, metrics)` that keeps the old state when the new loss or
    gradient norm is not finite, and adds `nonfinite` (0 or 1) to the metrics."""
    def guarded(state, b):
        new, m = step_fn(state, b)
        ok = jnp.isfinite(m["loss"]) & jnp.isfinite(m["grad_norm"])
        kept = jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, state)
        return kept, {**m, "nonfinite": 1 - ok.astype(jnp.int32)}
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
    """`with Preemption(every) as p: ... if p.stop(step): ...` — SIGTERM/SIGINT set a flag
    (handlers are installed only in the main thread, and restored on exit)."""

    def __init__(self, agree_every: int = 1):
        self.signal: str | None = None
        self.at = 0.0
        self.agree_every = max(1, agree_every)
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

    def stop(self, step: int) -> bool:
        if jax.process_count() == 1:
            return self.signal is not None
        if step % self.agree_every:
            return False
        from jax.experimental import multihost_utils
        flags = multihost_utils.process_allgather(np.int32(self.signal is not None))
        if flags.any() and self.signal is None:
            self.signal, self.at = "a peer's signal", time.monotonic()
        return bool(flags.any())
