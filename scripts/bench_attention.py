"""Benchmark sequence-parallel attention on the host's devices (default: 8 simulated CPU).

For each N, impl and masking: forward and forward+backward time (minimum over --repeats
after a compile/warm-up call, of wall time and of the process's CPU time), per-device memory of forward+backward from
`compiled.memory_analysis()`, and bytes sent per device counted from the compiled HLO.
Baseline in the same process: the single-device blockwise (flash) kernel doing the same
total work. Prints a markdown table; `--json PATH` writes the rows.

    python scripts/bench_attention.py --quick
    python scripts/bench_attention.py --causal-tokenring   # smoke: its rows run, no timing
    python scripts/bench_attention.py --seq-lens 2048 4096 8192 16384 --json out.json
    python scripts/bench_attention.py --calibrate --json jaxpar/attention/profile_cpu.json
    python scripts/bench_attention.py --grid --json docs/attention_auto_grid.json
    python scripts/bench_attention.py --heldout --json docs/attention_auto_heldout.json
    python scripts/bench_attention.py --heldout --rescore --json docs/attention_auto_heldout.json \
        --profile docs/attention_profile_cpu_repeat.json --out docs/attention_auto_heldout_repeat.json
    python scripts/bench_attention.py --heldout --ablation --json docs/attention_auto_heldout.json \
        --out docs/attention_auto_ablation.json
    python scripts/bench_attention.py --peer --json docs/attention_peer.json
    python scripts/bench_attention.py --tiles --json docs/kernels_cpu_tiles.json

--calibrate measures the CPU cost profile of `impl="auto"` (the kernel's tile model fitted
to calls of several shapes, copy bandwidth and latency, elementwise bandwidth, and what
TokenRing costs beyond its bytes, from ring and TokenRing timed side by side); --grid
times every schedule on a grid of meshes and shapes and compares auto's pick with the
fastest; --heldout does that on a grid that shares no kernel call shape with the calibration,
and scores auto against the fixed rule and always-ring (--rescore: again from the JSON, no
timing, after a change of the model); --peer compares ring, TokenRing and Ulysses with the `ringattention` package
(optional, benchmark only); --tiles sweeps the CPU kernel's tile sizes on the --peer configuration.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + " --xla_force_host_platform_device_count=8").strip()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402
from tqdm import tqdm  # noqa: E402

from jaxpar import bench, comm, make_mesh  # noqa: E402
from jaxpar.attention import attention, dense_attention, flash_attention  # noqa: E402

IMPLS = ("dense", "ulysses", "ring", "tokenring", "hybrid")



def per_device_mib(compiled):
    m = compiled.memory_analysis()
    return (m.temp_size_in_bytes + m.argument_size_in_bytes + m.output_size_in_bytes) / 2**20


def build(impl, n_dev, causal, b, n, h, kh, d, dtype):
    """(fwd, fwd+bwd, args) for one impl; inputs already laid out and sharded."""
    key = jax.random.key(0)
    kq, kk, kv = jax.random.split(key, 3)
    q = jax.random.normal(kq, (b, n, h, d), dtype)
    k = jax.random.normal(kk, (b, n, kh, d), dtype)
    v = jax.random.normal(kv, (b, n, kh, d), dtype)
    if impl in ("dense", "flash (1 device)"):
        dev = jax.devices()[0]
        args = [jax.device_put(x, dev) for x in (q, k, v)]
        if impl == "dense":
            attn = lambda q, k, v: dense_attention(q, k, v, causal=causal)  # noqa: E731
        else:
            attn = lambda q, k, v: flash_attention(q, k, v, causal=causal)[0]  # noqa: E731
    else:
        devices = jax.devices()[:n_dev]
        if impl == "hybrid":
            mesh = make_mesh(seq=n_dev // 2, seq_inner=2, devices=devices)
            axis = ("seq", "seq_inner")
        else:
            mesh = make_mesh(seq=n_dev, devices=devices)
            axis = "seq"
        spec = P(None, axis)
        # Random inputs are taken to be in zigzag order already (the layout is the data
        # path's job, done once); correctness of the layout is what the tests check.
        args = [jax.device_put(x, NamedSharding(mesh, spec)) for x in (q, k, v)]
        attn = jax.shard_map(
            lambda q, k, v: attention(q, k, v, impl=impl, axis=axis, causal=causal),
            mesh=mesh, in_specs=(spec,) * 3, out_specs=spec)
    fwd = jax.jit(attn)
    from bench_attention_auto import fwd_bwd

    return fwd, fwd_bwd(attn), args


def bench_one(impl, n_dev, causal, cfg, repeats):
    b, n, h, kh, d, dtype = cfg
    fwd, fwd_bwd, args = build(impl, n_dev, causal, b, n, h, kh, d, dtype)
    compiled = fwd_bwd.lower(*args).compile()
    from bench_attention_auto import timed_min

    fwd_wall, fwd_cpu = timed_min(fwd, args, repeats)
    fb_wall, fb_cpu = timed_min(fwd_bwd, args, repeats)
    row = {
        "impl": impl, "N": n, "causal": causal,
        "devices": 1 if impl in ("dense", "flash (1 device)") else n_dev,
        "fwd_ms": 1e3 * fwd_wall, "fwd_bwd_ms": 1e3 * fb_wall,  # min wall over repeats
        "fwd_cpu_ms": 1e3 * fwd_cpu, "fwd_bwd_cpu_ms": 1e3 * fb_cpu,  # min process CPU time
        "mem_mib_per_device": per_device_mib(compiled),
        "sent_mib_per_device": comm.total_bytes(compiled.as_text()) / 2**20,
    }
    return row


def dense_fits(n, h, limit_gib):
    return 4 * n * n * h * 4 / 2**30 <= limit_gib  # ~4 live N×N×H fp32 buffers


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="N ∈ {1024, 2048}, one repeat")
    ap.add_argument("--causal-tokenring", action="store_true",
                    help="smoke check, not timing: ring and TokenRing rows at N=2048, one "
                         "repeat (causal TokenRing used to abort XLA:CPU here)")
    ap.add_argument("--seq-lens", type=int, nargs="+", default=[2048, 4096, 8192, 16384])
    ap.add_argument("--impls", nargs="+", default=list(IMPLS), choices=IMPLS)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--devices", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--dense-limit-gib", type=float, default=4.0,
                    help="skip the dense reference when its N×N scores would exceed this")
    ap.add_argument("--json", help="write the rows (and the machine) to this file")
    ap.add_argument("--plot", help="write a PNG of fwd+bwd time and bytes vs N")
    ap.add_argument("--from-json", help="skip measuring: print/plot the rows of this file")
    ap.add_argument("--calibrate", action="store_true", help="measure the CPU auto profile")
    ap.add_argument("--grid", action="store_true", help="auto's pick vs every impl, a grid")
    ap.add_argument("--heldout", action="store_true",
                    help="auto vs the fixed rule vs always-ring on the held-out grid "
                         "(resumes from --json)")
    ap.add_argument("--rescore", action="store_true",
                    help="--heldout: no timing, re-score --json's rows with today's model")
    ap.add_argument("--profile", help="--rescore: score with this CPU profile JSON instead "
                                      "of jaxpar/attention/profile_cpu.json")
    ap.add_argument("--out", help="--rescore: write here instead of over --json")
    ap.add_argument("--ablation", action="store_true",
                    help="--heldout: no timing, score the CPU model with and without each of "
                         "its later terms (--out: the JSON)")
    ap.add_argument("--peer", action="store_true", help="vs the ringattention package")
    ap.add_argument("--tiles", action="store_true", help="CPU kernel tile sweep (peer config)")
    ap.add_argument("--tile-sizes", type=int, nargs="+", default=[256, 512, 1024],
                    help="--tiles: key-tile lengths to try (query tile = 1x and 4x)")
    ap.add_argument("--tile-impls", nargs="+", default=["ring", "ulysses"],
                    choices=["ring", "tokenring", "ulysses"], help="--tiles: schedules")
    ap.add_argument("--grid-only", type=int, nargs="+",
                    help="--grid: only these configurations (1-based, in GRID order)")
    ap.add_argument("--peer-chunks", type=int, nargs="+", default=[512, 1024],
                    help="--peer: the peer's query/key chunk sizes to try (its best counts)")
    args = ap.parse_args(argv)
    if args.calibrate or args.grid or args.heldout or args.peer or args.tiles:
        from bench_attention_auto import calibrate, grid, heldout, peer, tiles

        run = (calibrate if args.calibrate else grid if args.grid else
               heldout if args.heldout else peer if args.peer else tiles)
        return run(args)
    if args.quick:
        args.seq_lens, args.repeats = [1024, 2048], 1
    if args.causal_tokenring:
        args.seq_lens, args.impls, args.repeats = [2048], ["ring", "tokenring"], 1
    if jax.device_count() < args.devices:
        sys.exit(f"--devices={args.devices} but only {jax.device_count()} devices; set "
                 f"XLA_FLAGS=--xla_force_host_platform_device_count={args.devices}")
    if args.from_json:
        with open(args.from_json) as f:
            saved = json.load(f)
        report(saved["rows"], saved["machine"], saved["args"], args.plot)
        return
    dtype = jnp.dtype(args.dtype)
    jobs = []
    for n in args.seq_lens:
        for causal in (False, True):
            jobs.append(("flash (1 device)", n, causal))
            for impl in args.impls:
                if impl == "dense" and not dense_fits(n, args.heads, args.dense_limit_gib):
                    continue
                jobs.append((impl, n, causal))
    rows = []
    for impl, n, causal in tqdm(jobs, desc="attention bench", disable=not sys.stderr.isatty()):
        cfg = (args.batch, n, args.heads, args.kv_heads, args.head_dim, dtype)
        rows.append(bench_one(impl, args.devices, causal, cfg, args.repeats))
    # Ratios against baselines measured in this same process.
    base = {(r["N"], r["causal"]): r for r in rows if r["impl"] == "flash (1 device)"}
    nc = {(r["impl"], r["N"]): r for r in rows if not r["causal"]}
    for r in rows:
        # ratios of CPU time: what other jobs on a shared machine disturb least
        r["vs_single_device"] = (r["fwd_bwd_cpu_ms"]
                                 / base[(r["N"], r["causal"])]["fwd_bwd_cpu_ms"])
        if r["causal"]:
            r["causal_vs_full"] = (r["fwd_bwd_cpu_ms"]
                                   / nc[(r["impl"], r["N"])]["fwd_bwd_cpu_ms"])
    machine = bench.machine()
    settings = vars(args) | {"dtype": args.dtype}
    report(rows, machine, settings, args.plot)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": machine, "args": settings, "rows": rows}, f, indent=1)


def report(rows, machine, a, plot_path=None):
    print(f"\nmachine: {machine}; B={a['batch']} H={a['heads']} K={a['kv_heads']} "
          f"D={a['head_dim']} {a['dtype']}\n")
    print("| N | causal | impl | devices | fwd ms (CPU) | fwd+bwd ms (CPU) | fwd+bwd ms (wall) "
          "| ×single-device | causal/full | MiB/device | MiB sent/device |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        cf = f"{r['causal_vs_full']:.2f}" if "causal_vs_full" in r else ""
        print(f"| {r['N']} | {r['causal']} | {r['impl']} | {r['devices']} | "
              f"{r['fwd_cpu_ms']:.0f} | {r['fwd_bwd_cpu_ms']:.0f} | {r['fwd_bwd_ms']:.0f} | "
              f"{r['vs_single_device']:.2f} | {cf} | "
              f"{r['mem_mib_per_device']:.0f} | {r['sent_mib_per_device']:.1f} |")
    if plot_path:
        plot(rows, machine, plot_path)


def plot(rows, machine, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    impls = list(dict.fromkeys(r["impl"] for r in rows))
    for i, impl in enumerate(impls):
        color = f"C{i}"  # one color per impl; dashed = causal
        for causal, style in ((False, "-"), (True, "--")):
            pts = [r for r in rows if r["impl"] == impl and r["causal"] == causal]
            if not pts:
                continue
            label = f"{impl}{' causal' if causal else ''}"
            n = [r["N"] for r in pts]
            axes[0].plot(n, [r["fwd_bwd_cpu_ms"] / 1e3 for r in pts], style, color=color, marker="o",
                         label=label)
            if not causal:
                axes[1].plot(n, [r["mem_mib_per_device"] for r in pts], color=color, marker="o",
                             label=impl)
                axes[2].plot(n, [r["sent_mib_per_device"] for r in pts], color=color,
                             marker="o", label=impl)
    for ax, title in zip(axes, ("forward+backward CPU time (s)", "memory per device (MiB)",
                                "bytes sent per device, fwd+bwd (MiB)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length N")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7, ncol=2)
    axes[1].legend(fontsize=7)
    fig.suptitle(machine, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
