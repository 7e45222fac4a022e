"""Where a run's numbers go: metrics.jsonl (one JSON object per line), TensorBoard events
when tensorboardX is installed, Weights & Biases with `metrics.wandb` (the same records, the
resolved config, one run id across restarts), and a tqdm progress bar on a terminal (plain
lines when stdout is not a TTY, e.g. under CI or `scripts/launch.py`).

Across restarts: a resume (or a rollback) keeps the lines up to the step it restarts from,
written to a temporary file and moved over metrics.jsonl (`os.replace`, atomic), and drops a
last line cut short by a kill; TensorBoard gets `purge_step`, so its events hold no step
twice. Non-finite numbers are written as the strings "nan", "inf", "-inf" (bare NaN is not
JSON; `float(x)` reads both forms back).
"""
from __future__ import annotations

import json
import math
import os
import secrets
import sys
import time
from pathlib import Path

from tqdm import tqdm


class MetricsWriter:
    def __init__(self, run_dir: Path, *, total_steps: int, start_step: int, enabled: bool = True,
                 redo_eval: bool = False, wandb: dict | None = None, config: dict | None = None):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.enabled = enabled
        self.tb = None
        self.tty = enabled and sys.stdout.isatty()
        self.bar = (tqdm(total=total_steps, initial=start_step, dynamic_ncols=True)
                    if self.tty else None)
        self.wandb = WandbSink(wandb, run_dir, config, self.print) if wandb and enabled else None
        self.restart_at(start_step, redo_eval=redo_eval)

    def restart_at(self, step: int, *, redo_eval: bool = False) -> None:
        """Keep the records of steps <= `step` (all of them go at step 0), atomically; with
        `redo_eval`, not the eval record of `step` itself (the resume evaluates it again)."""
        if not self.enabled:
            return
        keep = lambda r: r.get("step", 0) < step or (r.get("step", 0) == step and not (
            redo_eval and "eval_loss" in r))
        kept = [ln for ln in read_lines(self.path) if keep(json.loads(ln))]
        tmp = self.path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(k + "\n" for k in kept))
        os.replace(tmp, self.path)
        if self.tb is not None:
            self.tb.close()
        try:
            from tensorboardX import SummaryWriter
        except ImportError:
            if not getattr(self, "_said_tb", False):
                self.print("tensorboardX is not installed: no TensorBoard events (metrics.jsonl "
                           "has every number; pip install tensorboardX)")
                self._said_tb = True
            return
        # a unique file per writer (a rollback may reopen within the same second)
        self.tb = SummaryWriter(str(self.path.parent / "tb"), purge_step=step + 1,
                                filename_suffix=f".{time.time_ns()}")

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        line = json.dumps({k: finite_or_str(v) for k, v in record.items()}, allow_nan=False)
        with self.path.open("a") as fh:
            fh.write(line + "\n")
        if self.tb is not None:
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)):
                    self.tb.add_scalar(k, v, record["step"])
        if self.wandb is not None:
            self.wandb.log(record)
        if "eval_loss" in record:
            self.print(f"step {record['step']}: eval loss {record['eval_loss']:.4f}, "
                       f"{record['eval_bpb']:.3f} bits/byte")

    def progress(self, step: int, record: dict) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.n = step
            self.bar.set_postfix(loss=f"{record['loss']:.3f}",
                                 tok_s=f"{record.get('tokens_per_s', 0):.0f}")
            self.bar.refresh()
        else:
            extra = f", {record['tokens_per_s']:.0f} tok/s" if "tokens_per_s" in record else ""
            print(f"step {step}: loss {record['loss']:.4f}{extra}", flush=True)

    def print(self, msg: str) -> None:
        if not self.enabled:
            return
        (self.bar.write if self.bar is not None else print)(msg)
        sys.stdout.flush()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.close()


WANDB_MODES = ("online", "offline", "disabled")
WANDB_ID_FILE = "wandb_id.txt"


def wandb_config(raw: dict) -> dict:
    """The checked `metrics.wandb` mapping: {project, name, mode, entity, tags}."""
    keys = ("project", "name", "mode", "entity", "tags")
    for k in raw:
        if k not in keys:
            raise ValueError(f"unknown key metrics.wandb.{k} (valid keys: {', '.join(keys)})")
    if raw and not raw.get("project"):
        raise ValueError("metrics.wandb.project is required (the W&B project to log to)")
    if raw.get("mode", "online") not in WANDB_MODES:
        raise ValueError(f"metrics.wandb.mode={raw['mode']!r} must be one of {list(WANDB_MODES)}")
    return raw


class WandbSink:
    """Weights & Biases (optional dependency: `pip install wandb`). The run id is kept in
    RUN_DIR/wandb_id.txt, so every restart logs into the same W&B run (`resume="allow"`);
    W&B keeps the first value of a step, so steps redone after a resume or a rollback are
    not logged twice there (metrics.jsonl has the redone values). A missing package is said
    once, and the run goes on."""

    def __init__(self, raw: dict, run_dir, config: dict | None, say):
        try:
            import wandb
        except ImportError:
            say("metrics.wandb is set but wandb is not installed: no W&B logging "
                "(metrics.jsonl has every number; pip install wandb)")
            self.run = None
            return
        id_file = Path(run_dir) / WANDB_ID_FILE
        run_id = id_file.read_text().strip() if id_file.exists() else secrets.token_hex(4)
        id_file.write_text(run_id + "\n")
        self.run = wandb.init(project=raw["project"], name=raw.get("name"),
                              entity=raw.get("entity"), tags=raw.get("tags"),
                              mode=raw.get("mode", "online"), id=run_id, resume="allow",
                              dir=str(run_dir), config=config)

    def log(self, record: dict) -> None:
        if self.run is None:
            return
        numbers = {k: v for k, v in record.items()
                   if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}
        if numbers:
            self.run.log(numbers, step=int(record["step"]))

    def close(self) -> None:
        if self.run is not None:
            self.run.finish()
            self.run = None


def finite_or_str(v):
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)  # "nan", "inf", "-inf"
    return v


def read_lines(path: Path) -> list[str]:
    """The JSON lines of a metrics file; a line a kill cut short (only ever the last) is
    dropped."""
    if not path.exists():
        return []
    out = []
    for ln in path.read_text().splitlines():
        try:
            json.loads(ln)
        except json.JSONDecodeError:
            continue
        out.append(ln)
    return out


class StepRate:
    """Tokens per second over the training steps alone: each step's own time (the loop
    waits for it before eval, checkpoint or logging), summed since the last `take`."""

    def __init__(self):
        self.seconds, self.steps = 0.0, 0

    def add(self, seconds: float, *, timed: bool = True) -> None:
        if timed:
            self.seconds += seconds
            self.steps += 1

    def take(self, tokens_per_step: int) -> float | None:
        rate = tokens_per_step * self.steps / self.seconds if self.steps else None
        self.seconds, self.steps = 0.0, 0
        return rate
