"""Where a run's numbers go: metrics.jsonl (one JSON object per line), TensorBoard events
when tensorboardX is installed, and a tqdm progress bar on a terminal (plain lines when
stdout is not a TTY, e.g. under CI or `scripts/launch.py`)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

from tqdm import tqdm


class MetricsWriter:
    def __init__(self, run_dir: Path, *, total_steps: int, start_step: int, enabled: bool = True):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.enabled = enabled
        if enabled and start_step > 0 and self.path.exists():
            # resuming: drop lines written after the checkpoint we restart from
            kept = [ln for ln in self.path.read_text().splitlines()
                    if ln and json.loads(ln).get("step", 0) <= start_step]
            self.path.write_text("".join(k + "\n" for k in kept))
        elif enabled:
            self.path.write_text("")
        self.tb = None
        if enabled:
            try:
                from tensorboardX import SummaryWriter
                self.tb = SummaryWriter(str(Path(run_dir) / "tb"))
            except ImportError:
                pass
        self.tty = enabled and sys.stdout.isatty()
        self.bar = (tqdm(total=total_steps, initial=start_step, dynamic_ncols=True)
                    if self.tty else None)

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as fh:
            fh.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)):
                    self.tb.add_scalar(k, v, record["step"])
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
