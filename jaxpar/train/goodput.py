"""Goodput: where the wall time of a run went, over every restart, with no cloud service.

    python -m jaxpar.train.goodput RUN_DIR      # also while the run is in progress

A *segment* is one start of the trainer in a run folder. Process 0 keeps the segment's
account in `goodput/segment_{n}.json`, rewritten atomically at every log step and at the
end (a kill loses the detail of at most one log interval, never the total): when the
process started, when the account was last written, and seconds per category:

- `startup`: process start to the loop — imports, JAX start-up, building the model and
  data, less `restore` (reading the checkpoint, agreed by the group);
- `compile`: compiling the train step (before the first step);
- `productive`: steps taken for the first time;
- `redone`: steps an earlier segment (or this one, before a rollback) had already reached —
  work lost to a fault;
- `eval`, `checkpoint`: the loop's time in evals and in saving / waiting for commits;
- `island_sync`: with `diloco.islands`, the host-side rounds (writing this island's delta,
  waiting for the others', the outer update);
- `other`: the rest of the segment (logging, the final sample and summary).

`goodput.json` (written with each account) sums the segments, and adds `restart_wait`: the
time between one segment's last write and the next one's process start (a killed process,
the launcher's restart, the scheduler's queue). The categories add up to `wall_s`, the time
from the first start to the last write.
"""
from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from pathlib import Path

CATEGORIES = ("startup", "restore", "compile", "productive", "redone", "eval", "checkpoint",
              "island_sync", "other")


def process_start() -> float:
    """Wall time at which this process started (Linux: its start in clock ticks since boot,
    against the boot-time clock; elsewhere now)."""
    try:
        ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        age = time.clock_gettime(time.CLOCK_BOOTTIME) - ticks / os.sysconf("SC_CLK_TCK")
        return time.time() - age
    except (OSError, ValueError, IndexError, AttributeError):
        return time.time()


def _segments(run_dir: Path) -> list[dict]:
    out = []
    for f in sorted((run_dir / "goodput").glob("segment_*.json"),
                    key=lambda p: int(p.stem.split("_")[1])):
        try:
            out.append(json.loads(f.read_text()))
        except (OSError, ValueError):
            continue  # cut short by a kill before os.replace: cannot happen, but never fatal
    return out


def summarize(run_dir) -> dict:
    """The whole run's account from its segments' files."""
    segs = _segments(Path(run_dir))
    if not segs:
        return {}
    total = {c: 0.0 for c in CATEGORIES}
    total["restart_wait"] = 0.0
    for i, s in enumerate(segs):
        for c in CATEGORIES:
            total[c] += s["seconds"].get(c, 0.0)
        if i:
            total["restart_wait"] += max(0.0, s["start"] - segs[i - 1]["last"])
    wall = segs[-1]["last"] - segs[0]["start"]
    return {"wall_s": wall, "segments": len(segs),
            "goodput": total["productive"] / wall if wall > 0 else 0.0,
            "steps": segs[-1].get("reached", 0), "seconds": total}


def format_line(g: dict) -> str:
    s = g["seconds"]
    rest = ", ".join(f"{c} {s[c]:.1f}" for c in (*CATEGORIES[:3], *CATEGORIES[4:],
                                                  "restart_wait") if s[c] >= 0.05)
    return (f"goodput {100 * g['goodput']:.1f}%: {s['productive']:.1f} s of "
            f"{g['wall_s']:.1f} s in productive steps over {g['segments']} start(s) ({rest})")


class Goodput:
    """One segment's account; `enabled` only on process 0."""

    def __init__(self, run_dir, *, started: float, enabled: bool = True):
        self.dir = Path(run_dir) / "goodput"
        self.enabled = enabled
        self.seconds = {c: 0.0 for c in CATEGORIES}
        self.start = started
        earlier = _segments(Path(run_dir)) if enabled else []
        self.index = len(earlier)
        self.reached = max((s.get("reached", 0) for s in earlier), default=0)

    def add(self, category: str, seconds: float) -> None:
        self.seconds[category] += seconds

    @contextlib.contextmanager
    def timed(self, category: str):
        t0 = time.time()
        try:
            yield
        finally:
            self.seconds[category] += time.time() - t0

    def step(self, step: int, seconds: float) -> None:
        self.seconds["redone" if step <= self.reached else "productive"] += seconds
        self.reached = max(self.reached, step)

    def write(self) -> None:
        if not self.enabled:
            return
        now = time.time()
        seconds = dict(self.seconds)
        seconds["other"] = max(0.0, (now - self.start) - sum(v for k, v in seconds.items()
                                                              if k != "other"))
        rec = {"segment": self.index, "start": self.start, "last": now,
               "reached": self.reached, "seconds": seconds}
        self.dir.mkdir(parents=True, exist_ok=True)
        path = self.dir / f"segment_{self.index}.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(rec))
        os.replace(tmp, path)
        whole = self.dir.parent / "goodput.json"
        tmp = whole.with_suffix(".tmp")
        tmp.write_text(json.dumps(summarize(self.dir.parent), indent=1) + "\n")
        os.replace(tmp, whole)


def main(argv=None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m jaxpar.train.goodput RUN_DIR", file=sys.stderr)
        return 2
    g = summarize(args[0])
    if not g:
        print(f"error: {args[0]}/goodput/ holds no segment accounts (not a run folder, or "
              f"the run has not reached its first step)", file=sys.stderr)
        return 2
    print(format_line(g))
    for c, v in g["seconds"].items():
        print(f"  {c:<13}{v:10.1f} s  {100 * v / g['wall_s'] if g['wall_s'] else 0:5.1f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
