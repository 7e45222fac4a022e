"""Measure the figures of docs/reliability.md and write them to docs/reliability.json.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python scripts/fault_figures.py

1. SIGTERM: seconds from the signal to exit 0 (a real `python -m jaxpar.train`), the step it
   stopped at and the checkpoint it left.
2. Checkpoint lag: seconds from a step's metrics line to its checkpoint's commit (the step
   folder appears), for the first checkpoint and the later ones.
3. Honest rates: in one run (log every 10 steps, eval every 15), the median tokens/s of the
   log windows with an eval inside over those without.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TINY = ["train.batch_size=8", "train.seq_len=64", "model.layers=2", "model.embed=64",
        "model.heads=4", "model.kv_heads=2", "model.mlp=128", "eval.sample_bytes=0",
        "eval.batches=2", "train.log_every=1", "mesh.data=8"]


def env():
    e = dict(os.environ, JAX_PLATFORMS="cpu")
    e["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    return e


def metrics(run_dir: Path) -> list[dict]:
    p = run_dir / "metrics.jsonl"
    out = []
    for ln in (p.read_text().splitlines() if p.exists() else []):
        try:
            out.append(json.loads(ln))
        except json.JSONDecodeError:
            pass
    return out


def sigterm(tmp: Path) -> dict:
    d = tmp / "sigterm"
    cmd = [sys.executable, "-m", "jaxpar.train", str(ROOT / "configs/base.yaml"),
           f"train.run_dir={d}", "train.steps=200", "checkpoint.every=50", "eval.every=50"] + TINY
    proc = subprocess.Popen(cmd, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    while not any(r.get("step", 0) >= 5 for r in metrics(d)):
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        time.sleep(0.01)
    t0 = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=600)
    seconds = time.monotonic() - t0
    stopped = max(r["step"] for r in metrics(d) if "loss" in r)
    ckpts = sorted(int(p.name) for p in (d / "checkpoints").iterdir() if p.name.isdigit())
    step_s = [1 / r["tokens_per_s"] * 8 * 64 for r in metrics(d) if "tokens_per_s" in r]
    return {"exit_code": proc.returncode, "seconds_to_exit": round(seconds, 2),
            "stopped_at_step": stopped, "newest_checkpoint": ckpts[-1],
            "median_step_s": round(sorted(step_s)[len(step_s) // 2], 4),
            "line": [ln for ln in out.decode().splitlines() if "SIGTERM" in ln]}


def checkpoint_lag(tmp: Path) -> dict:
    from jaxpar.train.config import load_config
    from jaxpar.train.run import train

    d = tmp / "lag"
    cfg = load_config(ROOT / "configs/base.yaml", [f"train.run_dir={d}", "train.steps=24",
                                                   "checkpoint.every=6", "checkpoint.keep=8",
                                                   "eval.every=6"] + TINY)
    seen, done = {}, threading.Event()

    def poll():
        while not done.is_set():
            now = time.monotonic()
            for r in metrics(d):
                if "loss" in r:
                    seen.setdefault(("step", r["step"]), now)
            ck = d / "checkpoints"
            for p in (ck.iterdir() if ck.exists() else []):
                if p.name.isdigit():
                    seen.setdefault(("ckpt", int(p.name)), now)
            time.sleep(0.005)
    t = threading.Thread(target=poll)
    t.start()
    train(cfg)
    done.set()
    t.join()
    lags = {s: round(seen[("ckpt", s)] - seen[("step", s)], 2) for s in (6, 12, 18, 24)}
    return {"config": "checkpoint.every=6, eval.every=6 (save before eval)",
            "seconds_step_line_to_commit": lags}


def rates(tmp: Path) -> dict:
    """One run, log every 10 steps, eval every 15: windows with an eval inside vs without."""
    from jaxpar.train.config import load_config
    from jaxpar.train.run import train

    d = tmp / "rates"
    cfg = load_config(ROOT / "configs/base.yaml", [
        f"train.run_dir={d}", "train.steps=150", "checkpoint.every=0", "eval.every=15"]
        + TINY + ["train.log_every=10"])
    train(cfg)
    rates = {r["step"]: r["tokens_per_s"] for r in metrics(d) if "tokens_per_s" in r}
    inside = lambda s: any((s - 10) < e < s for e in range(15, s, 15))
    a = sorted(v for s, v in rates.items() if inside(s))
    b = sorted(v for s, v in rates.items() if not inside(s))
    med = lambda x: x[len(x) // 2]
    return {"windows_with_eval_tokens_per_s": round(med(a)),
            "windows_without_tokens_per_s": round(med(b)), "ratio": round(med(a) / med(b), 3),
            "windows": {"with": len(a), "without": len(b)}}


def main():
    import jax

    from jaxpar.bench import machine
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        res = {"machine": machine(), "jax": jax.__version__,
               "note": "2-core x86_64 CPU, 8 host devices, shared with other jobs (contended)",
               "sigterm": sigterm(tmp), "checkpoint_lag": checkpoint_lag(tmp),
               "rates": rates(tmp)}
    path = ROOT / "docs" / "reliability.json"
    path.write_text(json.dumps(res, indent=1) + "\n")
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
