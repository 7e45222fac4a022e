"""Streaming DiLoCo islands: an inner step with an exchange in flight against one without,
in the same process (a ratio), and how many inner steps one exchange spans.

One island (count=1, a folder store), a 4-layer MLP, H=32, P=1, τ=31: the delta is written at
step 32k in the background and merged at step 32k+31. Each inner step is timed to completion
(block_until_ready) and labelled by `Island.in_flight` at its start: with the write in flight,
or not. The ratio of the median step times is the price the overlap pays for running the
transfer beside compute on the same host (device→host copy, checksum, file write); a blocking
exchange would instead add its whole wall time to one step.

    python scripts/bench_islands_overlap.py --json docs/diloco_islands_overlap.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from jaxpar.diloco import replica_grads, streaming_diloco  # noqa: E402
from jaxpar.diloco.islands import Island  # noqa: E402


def mlp_params(width, layers, key=0):
    ks = jax.random.split(jax.random.key(key), layers)
    return {f"layers_{i}": {"w": jax.random.normal(ks[i], (width, width)) / np.sqrt(width)}
            for i in range(layers)}


def loss_fn(params, batch):
    h = batch
    for i in range(len(params)):
        h = jnp.tanh(h @ params[f"layers_{i}"]["w"])
    return jnp.mean(h ** 2)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--width", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--quantize", default="none")
    ap.add_argument("--machine", default="shared 2-core CPU (other jobs running)")
    ap.add_argument("--json")
    a = ap.parse_args()

    H, tau = 32, 31
    sd = streaming_diloco(optax.adam(1e-3), num_replicas=1, sync_every=H, overlap_steps=tau,
                          quantize=a.quantize)
    grad = replica_grads(loss_fn)
    step = jax.jit(lambda s, b: sd.inner_update(grad(s.params, b)[1], s))
    batch = jax.random.normal(jax.random.key(1), (1, a.batch, a.width))
    with tempfile.TemporaryDirectory() as store:
        island = Island(sd, store, count=1, island_id=0, wait_s=30)
        state = island.join(sd.init(mlp_params(a.width, a.layers)))
        times = {True: [], False: []}
        spans, exchanges = [], []
        state = island.after_step(step(state, batch))  # compile
        t_sync = None
        while island.step < a.rounds * H + tau:
            busy = island.in_flight
            t0 = time.perf_counter()
            state = jax.block_until_ready(step(state, batch))
            dt = time.perf_counter() - t0
            if island.step > H:  # the first round compiles the sync and merge functions
                times[busy].append(dt)
            before = island.in_flight
            state = island.after_step(state)
            if not before and island.in_flight:
                t_sync, n_busy = time.perf_counter(), 0
            elif busy and t_sync is not None:
                n_busy += 1
                if not island.in_flight:
                    exchanges.append(time.perf_counter() - t_sync)
                    spans.append(n_busy)
                    t_sync = None
        island.finish(state)
        island.close()
        payload = sum(r["bytes"] for r in island.rounds) / max(1, len(island.rounds))
    busy, idle = np.median(times[True]), np.median(times[False])
    out = {
        "what": "median inner-step time with an islands exchange in flight / without, same "
                "process (scripts/bench_islands_overlap.py)",
        "machine": f"{a.machine}; {platform.processor() or platform.machine()}, "
                   f"{os.cpu_count()} CPUs visible, load average {os.getloadavg()[0]:.1f}",
        "jax": jax.__version__, "backend": jax.default_backend(),
        "model": {"width": a.width, "layers": a.layers, "batch": a.batch,
                  "params": a.width * a.width * a.layers},
        "quantize": a.quantize, "delta_file_bytes": int(payload),
        "step_s_in_flight_median": float(busy), "step_s_idle_median": float(idle),
        "steps_in_flight": len(times[True]), "steps_idle": len(times[False]),
        "ratio_in_flight_over_idle": float(busy / idle),
        "exchange_wall_s_median": float(np.median(exchanges)) if exchanges else None,
        "steps_spanned_by_one_exchange_median": float(np.median(spans)) if spans else None,
    }
    print(json.dumps(out, indent=1))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
