"""Preemption as a group: the figures of docs/reliability.md's "many processes" section.

    python scripts/preempt_drill.py --out docs/reliability_group.json

1. `grace`: the demo config (configs/demo.yaml) as 2 processes × 4 CPU devices
   (`scripts/launch.py -n 2`); process 1 gets SIGTERM once step `--at` has finished, before
   any checkpoint was saved. Measured: seconds from the signal to the committed checkpoint
   (the run's first save) and to the whole group's exit 0, the step each process stopped
   after, and the steps between the signal and the stop.
2. `stop_flag`: what the agreement costs per step — the demo's compiled train step with the
   stop flags reduced inside it against the same step with the reduction dead (removed by
   XLA), in one process, alternated, min of `--repeats`; and the bytes of the extra
   all-reduce counted from the HLO.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def steps_done(run_dir: Path, i: int) -> list[int]:
    p = run_dir / "steps" / f"process_{i}.jsonl"
    out = []
    for ln in (p.read_text().splitlines() if p.exists() else []):
        try:
            out.append(json.loads(ln)["step"])
        except ValueError:
            pass
    return out


def grace(tmp: Path, config: str, at: int, overrides: list[str]) -> dict:
    d = tmp / "grace"
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["JAX_PLATFORMS"] = "cpu"
    cmd = [sys.executable, str(ROOT / "scripts/launch.py"), "-n", "2", "--log-dir",
           str(tmp / "logs"), "--", sys.executable, "-m", "jaxpar.train", config,
           f"train.run_dir={d}", "train.log_every=1", "eval.sample_bytes=0", *overrides]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        while max(steps_done(d, 1), default=0) < at:
            if proc.poll() is not None:
                raise SystemExit(f"the group ended first: {proc.stderr.read()[-2000:]}")
            time.sleep(0.01)
        seen = max(steps_done(d, 1))
        pid = json.loads((d / "heartbeats" / "process_1.json").read_text())["pid"]
        os.kill(pid, signal.SIGTERM)
        t0 = time.monotonic()
        _, err = proc.communicate(timeout=600)
        exit_s = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            proc.kill()
    rec = json.loads((d / "preemption.json").read_text())
    stopped = [max(steps_done(d, i)) for i in (0, 1)]
    log0 = (tmp / "logs" / "process_0.log").read_text()
    return {"config": config, "overrides": overrides, "processes": 2, "exit_code": proc.returncode,
            "signal_after_step": seen, "stopped_after_step": stopped,
            "steps_after_signal": stopped[1] - seen,
            "signal_to_commit_s": round(rec["signal_to_commit_s"], 2),
            "signal_to_group_exit_s": round(exit_s, 2),
            "checkpoints": sorted(p.name for p in (d / "checkpoints").iterdir()
                                  if p.name.isdigit()),
            "line": [ln for ln in log0.splitlines() if "stopped after step" in ln],
            "launcher_stderr_tail": err.strip().splitlines()[-2:]}


def stop_flag_cost(config: str, overrides: list[str], repeats: int) -> dict:
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + " --xla_force_host_platform_device_count=8")
    import jax

    from jaxpar import comm
    from jaxpar.train import faults
    from jaxpar.train.config import load_config
    from jaxpar.train.loop import Run

    run = Run.create(load_config(config, overrides))
    state = run.init_state()
    b, flags = run.batch(1), run.stop_flags(False)
    guarded = faults.guard(run._step_fn())
    with_flag = jax.jit(guarded)
    without = jax.jit(lambda s, b, f: (lambda o: (o[0], {k: v for k, v in o[1].items()
                                                        if k != "stop"}))(guarded(s, b, f)))
    with run.scope():
        fns = {"with": with_flag.lower(state, b, flags).compile(),
               "without": without.lower(state, b, flags).compile()}
    times = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            jax.block_until_ready(fn(state, b, flags))
            times[k].append(time.perf_counter() - t0)
    count = {k: comm.bytes_by_kind(fn.as_text()) for k, fn in fns.items()}
    best = {k: min(v) for k, v in times.items()}
    return {"config": config, "overrides": overrides, "repeats": repeats,
            "step_s_min": best, "ratio_with_over_without": best["with"] / best["without"],
            "comm_bytes_per_device": count,
            "extra_all_reduce_bytes": count["with"].get("all-reduce", 0)
            - count["without"].get("all-reduce", 0)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(ROOT / "configs/demo.yaml"))
    ap.add_argument("--at", type=int, default=5, help="SIGTERM once this step has finished")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--out", default=None, help="write the JSON here")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    import platform
    out = {"machine": f"{platform.machine()}, {os.cpu_count()} cores, CPU devices",
           "note": "2-core CPU shared with other jobs while measured: contended timings"}
    with tempfile.TemporaryDirectory() as tmp:
        out["grace"] = grace(Path(tmp), args.config, args.at, args.overrides)
        print(json.dumps(out["grace"], indent=1), flush=True)
    out["stop_flag"] = stop_flag_cost(args.config, args.overrides, args.repeats)
    print(json.dumps(out["stop_flag"], indent=1))
    import jax
    out["jax"] = jax.__version__
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
