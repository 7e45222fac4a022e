"""Per-device memory of the trainer's compiled train step, by layout and memory mode.

    python scripts/bench_memory.py [--quick] [--json docs/memory_bench.json] [--doc docs/memory.md]

Everything comes from `jaxpar.train` (`Run.create`, `Run.init_state`, `Run.compile_step`):
the state is only traced (`jax.eval_shape`, shardings kept), the step is lowered and
compiled, nothing runs, so a model far larger than the host fits. From the compiled step's
`memory_analysis()`: arguments (params + optimizer state + batch, per device), temp
(activations and other scratch: what remat and microbatches change), output, alias (the
donated state). "Peak" below is arguments + temp + output - alias. Four tables:

  1. params + optimizer state per device by layout, against the ideal total / devices;
  2. temp bytes by `model.remat` policy, loop vs `model.scan_layers`, and microbatches;
  3. the largest decoder (layers x width) whose step fits a per-device budget, by layout;
  4. measured step time of each mode vs data parallel on a small model (steps run).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

from jaxpar.bench import machine  # noqa: E402
from jaxpar.models.blocks import REMAT_POLICIES  # noqa: E402
from jaxpar.train.config import Config, all_keys  # noqa: E402
from jaxpar.train.loop import Run  # noqa: E402

GiB = 2 ** 30
HAS_FSDP = "mesh.fsdp" in all_keys()
HAS_MICRO = "train.microbatches" in all_keys()

LAYOUTS = {  # name: (mesh, attention impl)
    "DP 8": (dict(data=8), "dense"),
    "FSDP 8": (dict(fsdp=8), "dense"),
    "FSDP 4 x tensor 2": (dict(fsdp=4, tensor=2), "dense"),
    "FSDP 2 x tensor 4": (dict(fsdp=2, tensor=4), "dense"),
    "FSDP 4 x seq 2 (ring)": (dict(fsdp=4, seq=2), "ring"),
    "data 4 x tensor 2": (dict(data=4, tensor=2), "dense"),
}

FIT_LAYOUTS = ("DP 8", "FSDP 8", "FSDP 4 x tensor 2", "FSDP 4 x seq 2 (ring)")


def model_keys(layers: int, width: int, vocab: int) -> dict:
    """A Llama-shaped decoder: head_dim 64 (MHA), SwiGLU mlp = 8/3 width rounded to 256."""
    return dict(layers=layers, embed=width, heads=width // 64, kv_heads=width // 64,
                head_dim=64, mlp=-(-(8 * width // 3) // 256) * 256, vocab=vocab,
                dtype="bfloat16")


def config(layout: str, model: dict, seq_len: int, batch: int, **extra) -> Config:
    mesh, impl = LAYOUTS[layout]
    sections = {"model": model, "mesh": mesh, "attention": {"impl": impl},
                "train": {"seq_len": seq_len, "batch_size": batch,
                          "run_dir": "/tmp/jaxpar_bench_memory"},
                "eval": {"every": 0, "sample_bytes": 0}}
    for key, value in extra.items():
        section, name = key.split("__")
        sections.setdefault(section, {})[name] = value
    return Config().replace(**sections)


def measure(cfg: Config) -> dict:
    """Compile the train step of `cfg` (state traced, not created) and read its memory."""
    t0 = time.perf_counter()
    run = Run.create(cfg)
    state = run.abstract_state()  # ShapeDtypeStructs with their shardings: nothing created
    b = run.batch(1)
    m = run.compile_step(state, b).memory_analysis()
    n_dev = len(run.mesh.devices.flat)
    total = sum(math.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(state))
    per_dev = sum(math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize
                  for x in jax.tree.leaves(state))
    n_params = sum(math.prod(x.shape) for x in jax.tree.leaves(state.params))
    out = {"params": n_params, "state_bytes_total": total, "state_bytes_per_device": per_dev,
           "ideal_per_device": total / n_dev, "argument_bytes": m.argument_size_in_bytes,
           "temp_bytes": m.temp_size_in_bytes, "output_bytes": m.output_size_in_bytes,
           "alias_bytes": m.alias_size_in_bytes, "compile_s": time.perf_counter() - t0}
    out["peak_bytes"] = (out["argument_bytes"] + out["temp_bytes"] + out["output_bytes"]
                         - out["alias_bytes"])
    return out


def layouts_available() -> list[str]:
    return [k for k, (mesh, _) in LAYOUTS.items() if HAS_FSDP or "fsdp" not in mesh]


def state_table(model: dict, seq_len: int, batch: int, layouts) -> list[dict]:
    rows = []
    for layout in [k for k in layouts if k in layouts_available()]:
        r = measure(config(layout, model, seq_len, batch, model__scan_layers=True))
        rows.append({"layout": layout, **r,
                     "vs_ideal": r["state_bytes_per_device"] / r["ideal_per_device"]})
        print(f"  state  {layout:24s} {r['state_bytes_per_device'] / GiB:7.3f} GiB "
              f"({rows[-1]['vs_ideal']:.2f}x ideal)  compile {r['compile_s']:.0f}s", flush=True)
    return rows


def remat_table(model: dict, seq_len: int, batch: int, layout: str,
                parts=("policies", "loop", "micro")) -> list[dict]:
    rows = []
    # every policy scanned; the loop only for none / full (the CPU scheduler hoists a
    # loop's recompute into the forward, so the other policies save nothing there either)
    # microbatches: a 4x batch in one step, and in 4 microbatches of the usual batch
    cases = {"policies": [(p, True, 1, batch) for p in REMAT_POLICIES],
             "loop": [(p, False, 1, batch) for p in ("none", "full")],
             "micro": [("none", True, 1, 4 * batch), ("none", True, 4, 4 * batch),
                       ("full", True, 4, 4 * batch)] if HAS_MICRO else []}
    cases = [c for part in parts for c in cases[part]]
    for policy, scan, micro, rows_ in cases:
        extra = {"model__remat": policy, "model__scan_layers": scan}
        if micro > 1:
            extra["train__microbatches"] = micro
        r = measure(config(layout, model, seq_len, rows_, **extra))
        rows.append({"remat": policy, "scan_layers": scan, "microbatches": micro,
                     "batch": rows_, **r})
        print(f"  remat  {policy:14s} scan={scan!s:5s} micro={micro} batch={rows_} temp "
              f"{r['temp_bytes'] / GiB:7.3f} GiB  compile {r['compile_s']:.0f}s", flush=True)
    return rows


def largest_table(widths, budget: int, seq_len: int, batch: int, vocab: int,
                  verify: bool, layouts=FIT_LAYOUTS) -> list[dict]:
    """Per layout and width, the most layers whose step's peak fits `budget`: peak is affine
    in depth (per-layer state and saved activations; scanned, so compile work does not grow
    with depth), so two compiles (L=2, 4) give the slope; with `verify` a third at the
    predicted depth checks it (and steps down until it fits)."""
    rows = []
    for layout in [k for k in layouts if k in layouts_available()]:
        for width in widths:
            def peak(layers):
                cfg = config(layout, model_keys(layers, width, vocab), seq_len, batch,
                             model__scan_layers=True, model__remat="full")
                return measure(cfg)
            a, b = peak(2), peak(4)
            slope = (b["peak_bytes"] - a["peak_bytes"]) / 2
            guess = int(2 + (budget - a["peak_bytes"]) // slope) if slope > 0 else 0
            per_layer_params = (b["params"] - a["params"]) / 2
            best, fit, verified = guess if guess >= 1 else None, None, False
            while verify and guess >= 1:
                fit = peak(guess)
                if fit["peak_bytes"] <= budget:
                    best, verified = guess, True
                    break
                guess -= max(1, guess // 10)
            rows.append({"layout": layout, "width": width, "layers": best,
                         "verified": verified,
                         "params": None if best is None else (
                             fit["params"] if verified else
                             a["params"] + (best - 2) * per_layer_params),
                         "peak_bytes": None if best is None else (
                             fit["peak_bytes"] if verified else
                             a["peak_bytes"] + (best - 2) * slope),
                         "bytes_per_layer": slope})
            print(f"  fit    {layout:24s} width {width}: {best} layers "
                  f"({(rows[-1]['params'] or 0) / 1e9:.2f} B params)", flush=True)
    return rows


def step_times(steps: int) -> list[dict]:
    """Median step time of each mode on one small model, in this process, vs DP."""
    model = model_keys(2, 128, 256) | {"dtype": "float32"}
    modes = {"DP 8": ("DP 8", {}),
             "DP 8, remat full": ("DP 8", {"model__remat": "full"}),
             "DP 8, remat attn_out": ("DP 8", {"model__remat": "attn_out"}),
             "DP 8, scan_layers": ("DP 8", {"model__scan_layers": True}),
             "data 4 x tensor 2": ("data 4 x tensor 2", {})}
    if HAS_MICRO:
        modes["DP 8, microbatches 4"] = ("DP 8", {"train__microbatches": 4})
    if HAS_FSDP:
        modes["FSDP 8"] = ("FSDP 8", {})
        modes["FSDP 4 x tensor 2"] = ("FSDP 4 x tensor 2", {})
    rows = []
    for name, (layout, extra) in modes.items():
        run = Run.create(config(layout, model, 128, 16, **extra))
        state = run.init_state()
        batches = [run.batch(s) for s in range(1, 5)]
        state, m = run.train_step(state, batches[0])  # compile + warm-up
        jax.block_until_ready(m)
        times = []
        for i in range(steps):
            t0 = time.perf_counter()
            state, m = run.train_step(state, batches[1 + i % 3])
            jax.block_until_ready(m)
            times.append(time.perf_counter() - t0)
        rows.append({"mode": name, "step_s": statistics.median(times)})
        print(f"  time   {name:24s} {rows[-1]['step_s'] * 1e3:8.1f} ms", flush=True)
    base = rows[0]["step_s"]
    for r in rows:
        r["vs_dp"] = r["step_s"] / base
    return rows


def gib(x) -> str:
    return "—" if x is None else f"{x / GiB:.2f}"


# runs recorded before the scheduler was recorded (and before jaxpar turned BFS off)
OLD_SCHEDULER = ("BFS (concurrency-optimized), the default before jaxpar turned it off; "
                 "see docs/architecture.md")


def markdown(res: dict) -> str:
    s = res["setup"]
    lines = [f"Measured by `scripts/bench_memory.py` on {res['machine']} "
             f"({res['date']}); numbers from `docs/memory_bench.json`. "
             f"Compile-only (tables 1-3): per-device bytes of the compiled step's "
             f"`memory_analysis()` on 8 host CPU devices, XLA:CPU scheduler "
             f"{res.get('xla_cpu_scheduler', OLD_SCHEDULER)}.", ""]
    m = s["model"]
    lines += [f"### 1. Params + optimizer state per device "
              f"({m['layers']} layers x {m['embed']} wide, vocab {m['vocab']}, "
              f"{res['state'][0]['params'] / 1e6:.0f} M params, fp32 params + AdamW)", "",
              "| layout | state GiB / device | ideal (total/8) | vs ideal | temp GiB | "
              "peak GiB |", "|---|---|---|---|---|---|"]
    for r in res["state"]:
        lines.append(f"| {r['layout']} | {gib(r['state_bytes_per_device'])} | "
                     f"{gib(r['ideal_per_device'])} | {r['vs_ideal']:.2f}x | "
                     f"{gib(r['temp_bytes'])} | {gib(r['peak_bytes'])} |")
    lines += ["", f"### 2. Activation (temp) memory by remat policy "
              f"({res['remat_layout']}, seq {s['seq_len']}, global batch {s['batch']})", "",
              "| remat | scan_layers | global batch | microbatches | temp GiB / device | "
              "peak GiB |", "|---|---|---|---|---|---|"]
    for r in res["remat"]:
        lines.append(f"| {r['remat']} | {r['scan_layers']} | {r.get('batch', s['batch'])} | "
                     f"{r['microbatches']} | "
                     f"{gib(r['temp_bytes'])} | {gib(r['peak_bytes'])} |")
    lines += ["", f"### 3. Largest decoder whose step fits {s['budget_gib']} GiB per device "
              f"(seq {s['fit_seq_len']}, global batch {s['batch']}, remat full, "
              f"scan_layers)", "",
              "| layout | width | layers | params (B) | peak GiB | GiB per layer | "
              "compiled at that depth |", "|---|---|---|---|---|---|---|"]
    for r in res["largest"]:
        p = "—" if r["params"] is None else f"{r['params'] / 1e9:.2f}"
        lines.append(f"| {r['layout']} | {r['width']} | {r['layers']} | {p} | "
                     f"{gib(r['peak_bytes'])} | {r['bytes_per_layer'] / GiB:.3f} | "
                     f"{'yes' if r.get('verified') else 'no: affine fit of L=2, 4'} |")
    lines += ["", "### 4. Step time vs DP (small model, steps run, same process)", "",
              "| mode | step ms | vs DP 8 |", "|---|---|---|"]
    for r in res["times"]:
        lines.append(f"| {r['mode']} | {r['step_s'] * 1e3:.1f} | {r['vs_dp']:.2f}x |")
    if not res["times"]:
        lines.append("| not measured in this run | | |")
    if not any(r["microbatches"] > 1 for r in res["remat"]):
        lines += ["", "Microbatch rows (table 2): not measured in this run."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--width", type=int, default=1024)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--budget-gib", type=float, default=16.0)
    ap.add_argument("--widths", default="1024,2048,4096")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--skip", default="", help="comma list of tables to skip: "
                                               "state,remat,largest,times")
    ap.add_argument("--layouts", default=",".join(FIT_LAYOUTS),
                    help=f"layouts of the state and largest tables, among {list(LAYOUTS)}")
    ap.add_argument("--remat-parts", default="policies,loop,micro",
                    help="remat table rows: policies (scanned), loop (none/full), micro")
    ap.add_argument("--verify", action="store_true",
                    help="largest: compile at the predicted depth too (and step down)")
    ap.add_argument("--merge", nargs="*", default=[],
                    help="JSONs of partial runs (split to use more cores): concatenate "
                         "their tables into --json / --doc, compile nothing")
    ap.add_argument("--json", default="docs/memory_bench.json")
    ap.add_argument("--doc", default="docs/memory.md")
    a = ap.parse_args(argv)
    skip = set(filter(None, a.skip.split(",")))
    model = model_keys(a.layers, a.width, a.vocab)
    remat_layout = "FSDP 8" if HAS_FSDP else "DP 8"
    res = {"machine": machine(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
           "xla_cpu_scheduler": "DFS" if "concurrency_optimized_scheduler=false"
           in os.environ.get("XLA_FLAGS", "") else "BFS (concurrency-optimized)",
           "setup": {"model": model, "seq_len": a.seq_len, "batch": a.batch,
                     "budget_gib": a.budget_gib, "fit_seq_len": a.seq_len,
                     "fsdp": HAS_FSDP, "microbatches": HAS_MICRO},
           "remat_layout": remat_layout, "state": [], "remat": [], "largest": [], "times": []}
    if "state" not in skip:
        res["state"] = state_table(model, a.seq_len, a.batch, a.layouts.split(","))
    if a.merge:
        return merge(a.merge, a.json, a.doc)
    if "remat" not in skip:
        res["remat"] = remat_table(model, a.seq_len, a.batch, remat_layout,
                                   a.remat_parts.split(","))
    if "largest" not in skip:
        res["largest"] = largest_table([int(w) for w in a.widths.split(",")],
                                       int(a.budget_gib * GiB), a.seq_len, a.batch, a.vocab,
                                       a.verify, a.layouts.split(","))
    if "times" not in skip:
        res["times"] = step_times(a.steps)
    write(res, a.json, a.doc)
    return 0


def write(res: dict, json_path: str, doc_path: str) -> None:
    with open(json_path, "w") as f:
        json.dump(res, f, indent=1)
    md = markdown(res)
    with open(doc_path, "w") as f:
        f.write("# Memory: layouts, rematerialization, scan\n\n" + md)
    print(md)


def merge(paths, json_path: str, doc_path: str) -> int:
    """One result from the JSONs of runs that each measured some tables (same setup)."""
    parts = []
    for p in paths:
        with open(p) as f:
            parts.append(json.load(f))
    res = dict(parts[0])
    res["parts"] = {}
    for table in ("state", "remat", "largest", "times"):
        res[table] = [r for part in parts for r in part[table]]
        res["parts"][table] = sorted({part["date"] for part in parts if part[table]})
    res["date"] = " / ".join(sorted({part["date"] for part in parts}))
    write(res, json_path, doc_path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
