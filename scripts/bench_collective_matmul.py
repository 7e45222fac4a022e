"""Benchmark collective matmuls vs the plain collective + matmul, and print the cost model.

Part 1 (measured, on this host's devices; default 8 simulated CPU devices): for each op
and P, forward and forward+backward wall time (median of --repeats after a compile/warm-up
call), bytes sent per device (from compiled HLO), and the HLO overlap fraction (share of
bytes whose transfer has an independent matmul). On CPU, collective-permute is synchronous:
the wall times show only what decomposition COSTS, never what overlap saves.

Part 2 (model): predicted sublayer speedups for T-NLG-like and PaLM-like shapes at TP
4/8/16 on two link bandwidths, and the token counts below which overlap stops paying. The
model's matmul times are measured on one H200 (whole and chunked); its links and contention
are assumed (jaxpar/overlap/cost_model.py says which is which).

    python scripts/bench_collective_matmul.py --quick
    python scripts/bench_collective_matmul.py --json out.json
    python scripts/bench_collective_matmul.py --model-only --json docs/overlap_bench.json
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os

if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + " --xla_force_host_platform_device_count=8").strip()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from jaxpar import bench, comm  # noqa: E402
from jaxpar.bench import timed  # noqa: E402
from jaxpar.mesh import make_mesh  # noqa: E402
from jaxpar.overlap import collective_matmul as cm  # noqa: E402
from jaxpar.overlap import cost_model  # noqa: E402
from jaxpar.overlap.hlo_report import hlo_report  # noqa: E402

T = "tensor"
OPS = cost_model.OPS
VARIANTS = (("plain", "uni"), ("decomposed", "uni"), ("decomposed", "bidi"))



def build(op, variant, direction, p, tokens, embed, mlp, dtype, abstract=False):
    """(fwd, fwd+bwd, args): the op as it sits in a Megatron-SP MLP on a P-way tensor mesh
    (abstract: args are ShapeDtypeStructs, for compiling without allocating)."""
    mesh = make_mesh(tensor=p, devices=jax.devices()[:p])
    if op == "all_gather_matmul":  # FC-1: x[tokens, E] seq-sharded, w[E, F] column-sharded
        shapes, specs, out_spec = ((tokens, embed), (embed, mlp)), (P(T, None), P(None, T)), \
            P(None, T)
    else:  # FC-2: h[tokens, F] F-sharded, w[F, E] row-sharded
        shapes, specs = ((tokens, mlp), (mlp, embed)), (P(None, T), P(T, None))
        out_spec = P(T, None) if op == "matmul_reduce_scatter" else P(T)
    keys = jax.random.split(jax.random.key(0), 2)
    if abstract:
        args = [jax.ShapeDtypeStruct(s, dtype, sharding=NamedSharding(mesh, sp))
                for s, sp in zip(shapes, specs)]
    else:
        args = [jax.device_put(jax.random.normal(k, s, dtype), NamedSharding(mesh, sp))
                for k, s, sp in zip(keys, shapes, specs)]
    impl = getattr(cm, op if variant == "decomposed" else "plain_" + op)
    local = lambda x, w: impl(x, w, axis_name=T, direction=direction)  # noqa: E731

    def local_grad(x, w):
        y, vjp = jax.vjp(local, x, w)
        # A cotangent computed from y: a constant one would let XLA fold the plain backward
        # collective away (an all-gather of ones) and drop the unused forward.
        return vjp(y)

    fwd = jax.jit(jax.shard_map(local, mesh=mesh, in_specs=specs, out_specs=out_spec))
    bwd = jax.jit(jax.shard_map(local_grad, mesh=mesh, in_specs=specs, out_specs=specs))
    return fwd, bwd, args


def measure(ps, tokens, embed, mlp, dtype, repeats):
    rows = []
    for op in OPS:
        for p in ps:
            for variant, direction in VARIANTS:
                fwd, bwd, args = build(op, variant, direction, p, tokens, embed, mlp, dtype)
                hlo = fwd.lower(*args).compile().as_text()
                rep = hlo_report(hlo)
                rows.append(dict(
                    op=op, p=p, variant=variant, direction=direction if variant != "plain"
                    else "-", tokens=tokens, embed=embed, mlp=mlp, dtype=jnp.dtype(dtype).name,
                    fwd_ms=timed(fwd, args, repeats) * 1e3,
                    fwd_bwd_ms=timed(bwd, args, repeats) * 1e3,
                    fwd_bytes=rep.total_bytes,
                    fwd_bwd_bytes=comm.total_bytes(bwd.lower(*args).compile().as_text()),
                    collectives=len(rep.collectives), overlap_fraction=rep.overlap_fraction))
                r = rows[-1]
                print(f"| {op} | {p} | {r['variant']} | {r['direction']} | {r['fwd_ms']:.2f} | "
                      f"{r['fwd_bwd_ms']:.2f} | {r['fwd_bytes'] / 2**20:.2f} | "
                      f"{r['fwd_bwd_bytes'] / 2**20:.2f} | {r['collectives']} | "
                      f"{r['overlap_fraction']:.0%} |", flush=True)
    return rows


def hidden_table(ps, tokens, embed, mlp, dtype):
    """hlo_report of the compiled forward at these shapes (compiled, not run): per hop, the
    FLOPs beside it and how much of it they hide on each GPU preset."""
    hws = (cost_model.GPU_NVLINK, cost_model.GPU_PCIE)
    print("| op | P | variant | direction | transfers | KiB per transfer (max) | beside MFLOP "
          "per transfer (mean) | " + " | ".join(f"hidden, {LINKS[hw.name]}" for hw in hws)
          + " |")
    print("|---|---|---|---|---|---|---|" + "---|" * len(hws))
    rows = []
    for op in OPS:
        for p in ps:
            for variant, direction in VARIANTS:
                fwd, _, args = build(op, variant, direction, p, tokens, embed, mlp, dtype,
                                     abstract=True)
                hlo = fwd.lower(*args).compile().as_text()
                reps = [hlo_report(hlo, hw) for hw in hws]
                cs = reps[0].collectives
                per_hop = max(c.bytes_per_device for c in cs) / 2**10
                flops = sum(c.beside_flops for c in cs) / len(cs) / 1e6
                rows.append(dict(op=op, p=p, variant=variant, direction=direction,
                                 transfers=len(cs), kib_per_transfer=per_hop,
                                 beside_mflop=flops,
                                 **{f"hidden_{LINKS[hw.name]}": r.hidden_fraction
                                    for hw, r in zip(hws, reps)}))
                print(f"| {op} | {p} | {variant} | "
                      f"{direction if variant != 'plain' else '-'} | {len(cs)} | "
                      f"{per_hop:.0f} | {flops:.0f} | "
                      + " | ".join(f"{r.hidden_fraction:.0%}" for r in reps) + " |",
                      flush=True)
    return rows


LINKS = {cost_model.GPU_NVLINK.name: "NVLink", cost_model.GPU_PCIE.name: "PCIe"}
TPS = (4, 8, 16)


def model_tables():
    """Print the cost-model tables of docs/overlap.md; return (sublayer rows, break-even rows)."""
    hws = (cost_model.GPU_NVLINK, cost_model.GPU_PCIE)
    print("Cost model: H200 matmuls MEASURED (whole and chunked, bf16), links and contention "
          "ASSUMED. Presets:")
    for hw in hws:
        print(f"  {hw.name}: link {hw.link_bandwidth / 1e9:g} GB/s/direction, alpha "
              f"{hw.link_latency * 1e6:g} µs, HBM {hw.hbm_bandwidth / 1e12:g} TB/s, launch "
              f"{hw.launch_overhead * 1e6:g} µs, overlap slowdown {hw.overlap_slowdown:.0%}")
    print("\nMeasured matmuls (H200, bf16): M × K × N | TFLOP/s whole | efficiency at c chunks")
    for m in cost_model.GPU_NVLINK.matmuls:
        print(f"  {m.m} × {m.k} × {m.n} | {m.tflops:.0f} | "
              + ", ".join(f"c={c}: {e:.3f}" for c, e in m.chunk_efficiency))
    rows = cost_model.sublayer_table(hws=hws, tps=TPS, direction="best")
    by = {(r["hardware"], r["model"], r["tp"], r["sublayer"]): r for r in rows}
    models = list(dict.fromkeys(r["model"] for r in rows))
    subs = list(dict.fromkeys(r["sublayer"] for r in rows))
    print("\nPredicted speedup, faster direction (u: uni, b: bidi); ✗: `auto` keeps `none` "
          "(speedup < 1.05):")
    print("| model | sublayer | " + " | ".join(f"{LINKS[hw.name]} TP{p}" for hw in hws
                                            for p in TPS) + " |")
    print("|---|---|" + "---|" * (len(hws) * len(TPS)))
    for model in models:
        for sub in subs:
            cells = []
            for hw in hws:
                for p in TPS:
                    r = by[(hw.name, model, p, sub)]
                    cells.append(f"{r['speedup']:.2f} {r['direction'][0]}"
                                 + (" ✗" if r["auto"] == "none" else ""))
            print(f"| {model.split(' (')[0]} | {sub} | " + " | ".join(cells) + " |")
    print("\nDetail at TP 8 (µs per device; chunks: kernels the matmul is cut into, eff.: "
          "their measured efficiency):")
    print("| link | model | sublayer | dir | matmul | plain collective | plain | chunks | eff. "
          "| decomposed | speedup |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        if r["tp"] != 8:
            continue
        print(f"| {LINKS[r['hardware']]} | {r['model'].split(' (')[0]} | {r['sublayer']} | "
              f"{r['direction']} | {r['compute_us']:.0f} | {r['comm_us']:.0f} | "
              f"{r['plain_us']:.0f} | {r['chunks']} | {r['chunk_efficiency']:.2f} | "
              f"{r['decomposed_us']:.0f} | {r['speedup']:.2f} |")
    breaks = []
    print("\nBreak-even tokens per TP group (smallest power of two with predicted speedup > 1, "
          "faster direction; never: not up to 2^20):")
    print("| link | model | sublayer | TP 4 | TP 8 | TP 16 |")
    print("|---|---|---|---|---|---|")
    for hw in hws:
        for shape in (cost_model.TNLG, cost_model.PALM):
            e, f = shape.embed, shape.mlp
            for name, op, k_of_p, n_of_p in [
                    ("FC-1 (all-gather)", "all_gather_matmul", lambda p: e, lambda p: f // p),
                    ("FC-2 (reduce-scatter)", "matmul_reduce_scatter", lambda p: f // p,
                     lambda p: e),
                    ("FC-2 (all-reduce)", "matmul_all_reduce", lambda p: f // p, lambda p: e)]:
                ts = {p: cost_model.break_even_tokens(op, k_of_p, n_of_p, p, hw) for p in TPS}
                breaks.append(dict(hardware=hw.name, model=shape.name, sublayer=name,
                                   **{f"tp{p}": t for p, t in ts.items()}))
                print(f"| {LINKS[hw.name]} | {shape.name.split(' (')[0]} | {name} | "
                      + " | ".join(str(ts[p]) if ts[p] else "never" for p in TPS) + " |")
    return rows, breaks


def model_json(rows, breaks) -> dict:
    hws = (cost_model.GPU_NVLINK, cost_model.GPU_PCIE)
    return dict(model=rows, break_even=breaks,
                hardware={hw.name: dataclasses.asdict(hw) for hw in hws})


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ps", type=int, nargs="+", default=[4, 8])
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--embed", type=int, default=512)
    ap.add_argument("--mlp", type=int, default=2048)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--quick", action="store_true", help="small shapes, P=8 only, 3 repeats")
    ap.add_argument("--json", help="write all rows to this path")
    ap.add_argument("--model-only", action="store_true",
                    help="print only the cost-model tables (no jax devices, seconds); with "
                         "--json, replace the model keys of that file and keep its "
                         "measured rows")
    ap.add_argument("--hidden-only", action="store_true",
                    help="compile (not run) the forward at --ps/--tokens/--embed/--mlp/"
                         "--dtype and print hlo_report's FLOPs beside each hop and the "
                         "hidden fraction on the GPU presets")
    args = ap.parse_args()
    if args.hidden_only:
        hidden_table(args.ps, args.tokens, args.embed, args.mlp, jnp.dtype(args.dtype))
        return
    if args.model_only:
        rows, breaks = model_tables()
        if args.json:
            data = {}
            if os.path.exists(args.json):
                with open(args.json) as f:
                    data = json.load(f)
            data.update(model_json(rows, breaks))
            with open(args.json, "w") as f:
                json.dump(data, f, indent=1, default=str)
            print(f"\nupdated the model keys of {args.json}")
        return
    if args.quick:
        args.ps, args.tokens, args.embed, args.mlp, args.repeats = [8], 512, 128, 512, 3
    devices = jax.devices()
    machine = bench.machine()
    print(f"Measured on {machine}.")
    if devices[0].platform == "cpu":
        print("CPU collective-permute is synchronous: wall time shows decomposition overhead "
              "only, never overlap.")
    print(f"Shapes: tokens={args.tokens} E={args.embed} F={args.mlp} {args.dtype}; FC-1 is "
          "all_gather_matmul, FC-2 the reduce ops. Bytes: MiB sent per device.\n")
    print("| op | P | variant | direction | fwd ms | fwd+bwd ms | fwd MiB | fwd+bwd MiB | "
          "collectives (fwd) | overlappable bytes (fwd) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    measured = measure(args.ps, args.tokens, args.embed, args.mlp, jnp.dtype(args.dtype),
                       args.repeats)
    print()
    model_rows, breaks = model_tables()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(machine=machine, jax=jax.__version__, measured=measured,
                           **model_json(model_rows, breaks)), f, indent=1, default=str)
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
