"""The first checkpoint save of a run, with orbax's replica-parallel writes on and off.

    python scripts/first_save.py --out docs/reliability_first_save.json

Each variant runs in a fresh process (orbax and XLA start cold, as in a real run): the demo
config's state (configs/demo.yaml, 8 CPU devices) is saved three times through
`jaxpar.train.checkpoint.Checkpointer`, each save waited for; `replica_parallel=on` swaps in
orbax's default array handler. Reported: seconds per save (call to commit) and the number
of XLA compilations during the first save.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def one(replica_parallel: bool) -> dict:
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    import jax
    import orbax.checkpoint as ocp

    from jaxpar.train import checkpoint
    from jaxpar.train.config import load_config
    from jaxpar.train.loop import Run

    if replica_parallel:  # orbax's own default handler for jax arrays
        checkpoint._handler = lambda: ocp.PyTreeCheckpointHandler()
    compiles = []
    jax.monitoring.register_event_duration_secs_listener(
        lambda name, secs, **kw: compiles.append(secs)
        if name == "/jax/core/compile/backend_compile_duration" else None)
    with tempfile.TemporaryDirectory() as d:
        run = Run.create(load_config(str(ROOT / "configs/demo.yaml"), [f"train.run_dir={d}"]))
        state = run.init_state()
        jax.block_until_ready(state)
        ck = checkpoint.Checkpointer(d, 3)
        seconds, first_compiles = [], None
        for step in (1, 2, 3):
            before = len(compiles)
            t0 = time.perf_counter()
            ck.save(step, state, {"step": step})
            ck.wait()
            seconds.append(round(time.perf_counter() - t0, 3))
            if first_compiles is None:
                first_compiles = len(compiles) - before
        ck.close()
    return {"replica_parallel": replica_parallel, "save_s": seconds,
            "compilations_in_first_save": first_compiles}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None)
    ap.add_argument("--one", choices=["on", "off"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(one(args.one == "on")))
        return 0
    import platform
    out = {"machine": f"{platform.machine()}, {os.cpu_count()} cores, 8 CPU devices",
           "config": "configs/demo.yaml", "runs": []}
    for mode in ("on", "off"):
        r = subprocess.run([sys.executable, __file__, "--one", mode], capture_output=True,
                           text=True, check=True)
        out["runs"].append(json.loads(r.stdout.strip().splitlines()[-1]))
        print(out["runs"][-1], flush=True)
    import jax
    out["jax"] = jax.__version__
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
