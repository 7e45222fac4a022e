"""What a dead island costs: 3 Streaming DiLoCo islands (one process each, 4 CPU devices) on
the tests' tiny MLP (`tests/diloco_helpers.py`), with and without SIGKILL of island 2 at a
step, restarted (same command) once the others have closed `--restart-after` rounds without
it. Writes the final eval loss of θ_global (8 held-out batches) of both runs, the survivors'
round waits, the steps and data rows the killed island lost, and its restart wall time.

    python scripts/bench_islands_fault.py --json docs/diloco_islands_fault.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTS = os.path.join(ROOT, "tests")
WORKER = os.path.join(TESTS, "diloco_islands_worker.py")


def run(folder, steps, wait_s, kill_at=None, restart_after=6):
    """One 3-island run; returns per-island results and the kill / restart times."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["PYTHONPATH"] = os.pathsep.join([TESTS, ROOT, env.get("PYTHONPATH", "")])
    common = ["--store", os.path.join(folder, "store"), "--count", "3", "--steps", str(steps),
              "--step-sleep", "0.25", "--wait-s", str(wait_s)]
    procs, times = [], {}

    def start(k, *extra, tag=""):
        log = open(os.path.join(folder, f"{k}{tag}.log"), "w")
        p = subprocess.Popen([sys.executable, WORKER, *common, "--id", str(k), "--out",
                              os.path.join(folder, f"{k}.npz"), *extra], env=env, stdout=log,
                             stderr=subprocess.STDOUT, start_new_session=True)
        procs.append(p)
        return p

    t0 = time.time()
    try:
        live = [start(k) for k in range(2)]
        if kill_at is None:
            live.append(start(2))
        else:
            victim = start(2, "--die-at", str(kill_at), tag="-killed")
            victim.wait(timeout=600)
            times["killed"] = time.time()
            later = os.path.join(folder, "store", "rounds",
                                 f"{kill_at // 2 + restart_after:08d}", "record.json")
            while not os.path.exists(later) and time.time() - t0 < 600:
                time.sleep(0.1)
            times["restarted"] = time.time()
            live.append(start(2))
        for p in live:
            if p.wait(timeout=600) != 0:
                raise SystemExit(f"island process failed: see the logs in {folder}")
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
    times["wall_s"] = time.time() - t0
    out = []
    for k in range(3):
        z = np.load(os.path.join(folder, f"{k}.npz"))
        out.append({f: z[f] for f in z.files} | {"rounds": json.loads(str(z["rounds"]))})
    return out, times


def eval_loss(res):
    sys.path.insert(0, TESTS)
    import jax

    from diloco_helpers import batch_for, loss_fn, tiny_params

    tree = tiny_params(7)
    leaves, treedef = jax.tree.flatten(tree)
    params = jax.tree.unflatten(treedef, [res[f"g{i}"] for i in range(len(leaves))])
    return float(np.mean([loss_fn(params, batch_for(10**6 + i, 99)) for i in range(8)]))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=121)
    ap.add_argument("--kill-at", type=int, default=11)
    ap.add_argument("--wait-s", type=float, default=3.0)
    ap.add_argument("--machine", default="shared 2-core CPU (other jobs running)")
    ap.add_argument("--json")
    a = ap.parse_args()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    with tempfile.TemporaryDirectory() as d0, tempfile.TemporaryDirectory() as d1:
        clean, t_clean = run(d0, a.steps, a.wait_s)
        fault, t_fault = run(d1, a.steps, a.wait_s, kill_at=a.kill_at)
    bitwise = all(np.array_equal(fault[0][f], fault[k][f]) for k in (1, 2)
                  for f in fault[0] if f[:1] in "go" and f[1:].isdigit())
    surv = fault[0]["rounds"]
    missed = [r for r in surv if 2 not in r["members"]]
    # the last delta of island 2 that a round used (synced τ=1 step before its merge): its
    # inner steps after that sync are lost; it died before running step kill_at
    last_sync = max((r["step"] - 1 for r in surv
                     if 2 in r["members"] and r["step"] - 1 <= a.kill_at - 1), default=0)
    rejoin_step = int(fault[2]["first"])
    back = min(r["step"] for r in surv if 2 in r["members"] and r["step"] > a.kill_at)
    e_clean, e_fault = eval_loss(clean[0]), eval_loss(fault[0])
    out = {
        "what": "3 islands, tiny MLP (tests/diloco_helpers.py), H=4 P=2 tau=1 alpha=0.5, adam "
                "inner, fp32 wire; island 2 SIGKILLed and restarted "
                "(scripts/bench_islands_fault.py)",
        "machine": f"{a.machine}; {platform.machine()}, {os.cpu_count()} CPUs visible, load "
                   f"average {os.getloadavg()[0]:.1f}",
        "steps": a.steps, "kill_at_step": a.kill_at, "wait_s": a.wait_s,
        "eval_loss_no_fault": e_clean, "eval_loss_fault": e_fault,
        "eval_loss_ratio": e_fault / e_clean,
        "theta_global_bitwise_equal_on_3_islands": bitwise,
        "survivor_rounds": len(surv), "rounds_without_island_2": len(missed),
        "survivor_waits_over_half_wait_s": [r["wait_s"] for r in surv
                                            if r["wait_s"] > a.wait_s / 2],
        "island_2_last_used_sync_step": last_sync,
        "island_2_lost_inner_steps": a.kill_at - 1 - last_sync,
        "island_2_restarted_at_step": rejoin_step,
        "island_2_member_again_from_merge_step": back,
        "island_2_skipped_data_steps": rejoin_step - (a.kill_at - 1),
        "rows_per_step": 16,
        "restart_to_join_s": float(fault[2]["joined_at"]) - t_fault["restarted"],
        "wall_s_no_fault": t_clean["wall_s"], "wall_s_fault": t_fault["wall_s"],
    }
    print(json.dumps(out, indent=1))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
