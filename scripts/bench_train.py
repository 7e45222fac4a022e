"""Training throughput of the demo model under each mesh layout, against a plain
single-device jit of the same model (no mesh, no shard_map), in the same process.

    python scripts/bench_train.py [--steps 20] [--json docs/train_bench.json] [--doc docs/train.md]

Every layout runs the trainer's own compiled step (`jaxpar.train.loop.Run`) on the same
model size and global batch; the baseline is `jax.jit(value_and_grad + adamw)` of the
decoder without a mesh on one device. Reports median step time over --steps steps after
one warm-up step, tokens/s, and bytes each device sends per step (counted from the
compiled HLO). On a CPU the 8 "devices" share the host's cores: the table shows the cost
of the decomposition, not a speedup.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import optax  # noqa: E402

from jaxpar.bench import machine  # noqa: E402
from jaxpar.data import pack  # noqa: E402
from jaxpar.models.transformer import Transformer  # noqa: E402
from jaxpar.train.config import load_config  # noqa: E402
from jaxpar.train.loop import Run, cross_entropy, inner_optimizer  # noqa: E402
from jaxpar.train.model import transformer_config  # noqa: E402

LAYOUTS = {  # name: overrides on configs/demo.yaml (DiLoCo off unless named)
    "data 8 (dense attention)": ["mesh.replica=1", "mesh.seq=1", "mesh.tensor=1",
                                 "mesh.data=8", "attention.impl=dense"],
    "data 2 × seq 4, ring": ["mesh.replica=1", "mesh.data=2", "mesh.seq=4", "mesh.tensor=1",
                             "attention.impl=ring"],
    "data 2 × seq 4, tokenring": ["mesh.replica=1", "mesh.data=2", "mesh.seq=4",
                                  "mesh.tensor=1", "attention.impl=tokenring"],
    "data 2 × seq 4, ulysses": ["mesh.replica=1", "mesh.data=2", "mesh.seq=4",
                                "mesh.tensor=1", "attention.impl=ulysses"],
    "data 2 × seq 2 × seq_inner 2, hybrid": ["mesh.replica=1", "mesh.data=2", "mesh.seq=2",
                                             "mesh.seq_inner=2", "mesh.tensor=1",
                                             "attention.impl=hybrid"],
    "data 2 × tensor 4, plain TP": ["mesh.replica=1", "mesh.data=2", "mesh.seq=1",
                                    "mesh.tensor=4", "attention.impl=dense",
                                    "overlap.mode=none", "model.heads=8", "model.kv_heads=4"],
    "data 2 × tensor 4, collective matmul": ["mesh.replica=1", "mesh.data=2", "mesh.seq=1",
                                             "mesh.tensor=4", "attention.impl=dense",
                                             "overlap.mode=collective_matmul",
                                             "model.heads=8", "model.kv_heads=4"],
    "demo: replica 2 × seq 2 × tensor 2, DiLoCo + tokenring + CM": [],
}


def time_steps(step, state, batches, steps):
    state, m = step(state, batches[0])  # warm-up (compiled already)
    jax.block_until_ready(m)
    times = []
    for i in range(steps):
        t0 = time.perf_counter()
        state, m = step(state, batches[1 + i % (len(batches) - 1)])
        jax.block_until_ready(m)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench_layout(name, overrides, steps):
    demo = load_config("configs/demo.yaml")
    cfg = load_config("configs/demo.yaml", overrides + ["train.run_dir=/tmp/jaxpar_bench"])
    if overrides:  # data parallel in place of the demo's 2 DiLoCo replicas: same tokens/step
        cfg = cfg.replace(diloco={"enabled": False},
                          train={"batch_size": demo.train.batch_size * demo.mesh.replica})
    run = Run.create(cfg)
    state = run.init_state()
    batches = [run.batch(s) for s in range(1, 5)]
    comm = run.comm_bytes(state, batches[0])
    t = time_steps(run.train_step, state, batches, steps)
    return cfg, {"layout": name, "step_s": t, "tokens_per_s": run.tokens_per_step() / t,
                 "comm_bytes_per_step": sum(comm.values()), "comm_by_kind": comm}


def bench_baseline(cfg, steps, batch_size):
    model = Transformer(transformer_config(cfg))
    tx, _ = inner_optimizer(cfg)
    dummy = jax.numpy.zeros((1, cfg.train.seq_len), jax.numpy.int32)
    params = jax.tree.map(lambda b: b.unbox() if hasattr(b, "unbox") else b,
                          model.init(jax.random.key(0), dummy)["params"],
                          is_leaf=lambda b: hasattr(b, "unbox"))
    state = (params, tx.init(params))

    @jax.jit
    def step(state, b):
        p, o = state
        loss, g = jax.value_and_grad(lambda p: cross_entropy(
            model.apply({"params": p}, b["tokens"], b["positions"], b["segment_ids"]),
            b["targets"]))(p)
        u, o = tx.update(g, o, p)
        return (optax.apply_updates(p, u), o), loss

    from jaxpar.data import ByteData
    data = ByteData.load(seq_len=cfg.train.seq_len)
    batches = [pack(data.batch(s, batch_size)) for s in range(1, 5)]
    t = time_steps(step, state, batches, steps)
    return {"layout": "baseline: 1 device, plain jit", "step_s": t,
            "tokens_per_s": batch_size * cfg.train.seq_len / t, "comm_bytes_per_step": 0}


def render(rows, info) -> str:
    base = next(r for r in rows if r["layout"].startswith("baseline"))
    out = [f"Measured on {info['machine']}; demo model ({info['params']:,} params), "
           f"global batch {info['batch']} × {info['seq_len']} tokens, median of "
           f"{info['steps']} steps after a warm-up.", "",
           "| layout | step (ms) | tokens/s | vs baseline | bytes sent / device / step |",
           "|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['layout']} | {r['step_s'] * 1e3:.1f} | {r['tokens_per_s']:,.0f} | "
                   f"{r['tokens_per_s'] / base['tokens_per_s']:.2f}× | "
                   f"{r['comm_bytes_per_step'] / 2**20:.2f} MiB |")
    return "\n".join(out)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--json", default="docs/train_bench.json")
    ap.add_argument("--only", nargs="*", help="substrings of layout names to run")
    args = ap.parse_args()
    rows, cfg = [], None
    for name, overrides in LAYOUTS.items():
        if args.only and not any(s in name for s in args.only):
            continue
        cfg, row = bench_layout(name, overrides, args.steps)
        print(f"{name:60s} {row['step_s'] * 1e3:8.1f} ms  {row['tokens_per_s']:9,.0f} tok/s",
              flush=True)
        rows.append(row)
    cfg = load_config("configs/demo.yaml")
    batch = cfg.train.batch_size * cfg.mesh.replica
    base = bench_baseline(cfg, args.steps, batch)
    print(f"{base['layout']:60s} {base['step_s'] * 1e3:8.1f} ms  {base['tokens_per_s']:9,.0f} "
          f"tok/s", flush=True)
    rows.insert(0, base)
    model = Transformer(transformer_config(cfg))
    n_params = sum(x.size for x in jax.tree.leaves(jax.eval_shape(
        model.init, jax.random.key(0), jax.numpy.zeros((1, 8), jax.numpy.int32))))
    info = {"machine": machine(), "params": int(n_params), "batch": batch,
            "seq_len": cfg.train.seq_len, "steps": args.steps}
    print(render(rows, info))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"info": info, "rows": rows}, fh, indent=1)


if __name__ == "__main__":
    sys.exit(main())
