"""`scripts/bench_attention.py --calibrate / --grid / --peer / --tiles` (see its docstring).

Timings on a shared machine: each measurement is the *minimum* over repeats after a
compile/warm-up call, of both wall time and the process's CPU time (`time.process_time`,
all threads): CPU time is what other jobs on the machine disturb least, and it is the
figure the CPU profile is calibrated in and auto is judged on.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import pathlib
import sys
import time

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxpar import bench
from jaxpar.attention import attention, auto, dense_attention, kernels

KEY = jax.random.key(0)


def timed_min(fn, args, repeats):
    """(min wall s, min process-CPU s) over `repeats` runs after one warm-up run."""
    jax.block_until_ready(fn(*args))
    walls, cpus = [], []
    for _ in range(repeats):
        w, c = time.perf_counter(), time.process_time()
        jax.block_until_ready(fn(*args))
        walls.append(time.perf_counter() - w)
        cpus.append(time.process_time() - c)
    return min(walls), min(cpus)


def randn(shape, seed, dtype=jnp.float32):
    return jax.random.normal(jax.random.fold_in(KEY, seed), shape, dtype)


def put(mesh, spec, *xs):
    return [jax.device_put(x, NamedSharding(mesh, spec)) for x in xs]


def fwd_bwd(attn):
    """jit of attn's forward and backward as a training step has them: the value and the
    gradient w.r.t. q, k, v of a loss (the sum of the output), whose all-reduce runs beside
    the backward's collective-permutes. (The benchmarks timed a vjp of a ones cotangent
    while XLA:CPU aborted causal TokenRing's step loop, docs/architecture.md.)"""
    def loss(q, k, v):
        return jnp.sum(attn(q, k, v).astype(jnp.float32))

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))


def write(path, payload):
    if path:
        pathlib.Path(path).write_text(json.dumps(payload, indent=1) + "\n")
        print(f"wrote {path}")


# --------------------------------------------------------------------------- calibrate


# (Lq, Lk, heads, kv heads, D, causal) of the calls the tile model is fitted to: the lengths,
# heads per call (MHA and GQA) and head dims that ring pair calls (L × L, L × L/2) and
# Ulysses' whole-sequence calls take in the grid, short and long, D 16-64.
CALIBRATION_CALLS = [
    (128, 128, 8, 8, 32, False), (256, 256, 1, 1, 32, False), (256, 256, 8, 8, 32, False),
    (256, 128, 8, 2, 16, False), (512, 512, 4, 4, 64, False), (1024, 1024, 1, 1, 32, False),
    (1024, 1024, 8, 8, 32, False), (1024, 1024, 8, 8, 16, False), (1024, 512, 2, 2, 64, False),
    (1024, 1024, 4, 4, 16, False), (1024, 1024, 8, 2, 32, False), (2048, 1024, 4, 1, 16, False),
    (2048, 2048, 1, 1, 16, False), (2048, 2048, 2, 2, 32, False), (4096, 4096, 1, 1, 32, False),
    (1024, 1024, 8, 8, 32, True), (2048, 2048, 1, 1, 16, True), (4096, 4096, 1, 1, 32, True),
    (8192, 8192, 2, 1, 16, True)]
TILE_COST_TERMS = ("call_s", "tile_s", "score_s", "score_d_s", "gqa_s", "spill_s", "io_s")


def fit_tile_cost(calls, per_call_s, tile, few_heads=None):
    """Least squares in relative error, non-negative: the TileCost whose seconds match the
    measured ones (each term of the model is linear in one coefficient). `tile`,
    `few_heads`: the kernel's tiles (`blockwise.tile_sizes`, `FEW_HEADS_TILES`)."""
    import numpy as np
    from scipy.optimize import nnls

    def features(lq, lk, h, kh, d, causal):
        zero = dict.fromkeys(TILE_COST_TERMS, 0.0)
        return [auto.TileCost(tile, **zero | {t: 1.0}, few_heads=few_heads).seconds(
            lq, lk, h, d, causal, kh) for t in TILE_COST_TERMS]

    a = np.array([features(*c) for c in calls]) / np.array(per_call_s)[:, None]
    x, _ = nnls(a, np.ones(len(calls)))
    return auto.TileCost(tile, **dict(zip(TILE_COST_TERMS, map(float, x))), few_heads=few_heads)


def calibrate(args):
    """The CPU profile: every device busy at once, as in a sequence-parallel run."""
    from jaxpar.attention import blockwise
    n_dev, reps = args.devices, max(args.repeats, 3)
    mesh = jax.make_mesh((n_dev,), ("d",), devices=jax.devices()[:n_dev])
    spec = P("d")
    meas = {"devices": n_dev, "kernel_calls": []}

    # the kernel: each device one local fwd+bwd call of the shape (B = devices, sharded)
    per_call = []
    for lq, lk, h, kh, d, causal in CALIBRATION_CALLS:
        def local(q, k, v, causal=causal):
            return kernels.local_attention(q, k, v, causal=causal, kernel="xla")[0]

        f = fwd_bwd(jax.shard_map(local, mesh=mesh, in_specs=(spec,) * 3, out_specs=spec))
        q, k, v = put(mesh, spec, randn((n_dev, lq, h, d), 0), randn((n_dev, lk, kh, d), 1),
                      randn((n_dev, lk, kh, d), 2))
        wall, cpu = timed_min(f, (q, k, v), reps)
        per_call.append(cpu / n_dev)
        meas["kernel_calls"].append({"Lq": lq, "Lk": lk, "H": h, "K": kh, "D": d,
                                     "causal": causal, "wall_s": wall, "cpu_s": cpu})
        print(f"call Lq={lq} Lk={lk} H={h} K={kh} D={d} causal={causal}: "
              f"{cpu / n_dev * 1e3:.2f} ms CPU per call", flush=True)
    tile_cost = fit_tile_cost(CALIBRATION_CALLS, per_call, blockwise.tile_sizes()[1],
                              blockwise.FEW_HEADS_TILES.get(jax.default_backend()))
    for rec, c in zip(meas["kernel_calls"], CALIBRATION_CALLS):
        lq, lk, h, kh, d, causal = c
        rec["fit_over_measured"] = (tile_cost.seconds(lq, lk, h, d, causal, kh)
                                    / (rec["cpu_s"] / n_dev))
    print("tile model / measured per call:",
          " ".join(f"{r['fit_over_measured']:.2f}" for r in meas["kernel_calls"]), flush=True)

    # copies: a ring shift of `size` bytes per device, 8 in a row inside one program
    def shifts(x):
        def body(c, _):
            return jax.lax.ppermute(c, "d", [(i, (i + 1) % n_dev) for i in range(n_dev)]), None
        return jax.lax.scan(body, x, None, length=8)[0]

    sm = jax.jit(jax.shard_map(shifts, mesh=mesh, in_specs=spec, out_specs=spec))
    link = {}
    for size in (1024, 8 << 20):
        x = put(mesh, spec, jnp.ones((n_dev, size // 4), jnp.float32))[0]
        link[size] = timed_min(sm, (x,), reps)
    latency = link[1024][1] / 8
    link_bw = n_dev * (8 << 20) / max(link[8 << 20][1] / 8 - latency, 1e-9)
    meas["shift"] = {str(k): {"wall_s": w, "cpu_s": c} for k, (w, c) in link.items()}

    # elementwise bandwidth (merges): a·b + c over 8 MiB arrays per device, 8 times
    def ew(a, b, c):
        return jax.lax.scan(lambda x, _: (x * b + c, None), a, None, length=8)[0]

    arrs = put(mesh, spec, *(randn((n_dev, 2 << 20), 10 + i) for i in range(3)))
    wall, cpu = timed_min(jax.jit(jax.shard_map(ew, mesh=mesh, in_specs=(spec,) * 3,
                                                out_specs=spec)), arrs, reps)
    mem_bw = 8 * n_dev * 4 * (8 << 20) / cpu  # read 3, write 1 array per step
    meas["elementwise"] = {"wall_s": wall, "cpu_s": cpu}

    # the machine's figures, every device busy: CPU seconds add up over devices
    prof = auto.Profile("cpu", kernel_flops=0.0, call_s=tile_cost.call_s, link_bw=link_bw,
                        latency_s=latency, mem_bw=mem_bw, overlap=False, bidirectional=False,
                        shared_cores=True, tile_cost=tile_cost,
                        source="scripts/bench_attention.py --calibrate (this file)")
    # the FLOP-rate fields are what tile_cost replaces (Profile.from_json fills them back)
    raw = {k: v for k, v in dataclasses.asdict(prof).items()
           if k not in ("kernel_flops", "call_s", "kernel_by_len")}
    payload = {"machine": bench.machine(), "timing": "min over repeats of process CPU time",
               "profile": raw, "measurements": meas}
    print(json.dumps(raw, indent=1))
    write(args.json, payload)


# --------------------------------------------------------------------------- grid

# (P, N, H, K, D, causal): P 2/4/8, MHA and GQA, N 2K-16K, causal and not; H=4 at P=8 is
# where Ulysses cannot run.
GRID = ([(p, 2048, 8, kh, 32, c) for p in (2, 4, 8) for kh in (8, 2) for c in (False, True)]
        + [(8, 4096, 4, 4, 32, False), (8, 4096, 4, 4, 32, True),
           (4, 8192, 8, 2, 16, True), (8, 16384, 4, 1, 16, True)])


def schedule_fn(c: auto.Candidate, causal, devices):
    if c.impl == "hybrid":
        mesh = jax.make_mesh(c.shards, ("seq", "seq_inner"), devices=devices)
        axis, kw = ("seq", "seq_inner"), {"ring_impl": c.ring_impl}
    else:
        mesh = jax.make_mesh(c.shards, ("seq",), devices=devices)
        axis, kw = "seq", {}
    spec = P(None, axis)
    # random inputs taken as already in zigzag order (the data path's job)
    attn = jax.shard_map(lambda q, k, v: attention(q, k, v, impl=c.impl, axis=axis,
                                                   causal=causal, **kw),
                         mesh=mesh, in_specs=(spec,) * 3, out_specs=spec)
    return fwd_bwd(attn), mesh, spec


def grid(args):
    prof = auto.profile_for("cpu")
    rows = []
    for i, (p, n, h, kh, d, causal) in enumerate(GRID):
        if args.grid_only and i + 1 not in args.grid_only:
            continue
        cands = auto.flexible(p)
        choice = auto.choose(cands, batch=1, seq_len=n, heads=h, kv_heads=kh, head_dim=d,
                             causal=causal, profile=prof)
        q, k, v = (randn((1, n, x, d), j) for j, x in enumerate((h, kh, kh)))
        measured = {}
        for c in cands:
            if c.label not in choice.predicted_s:
                continue
            f, mesh, spec = schedule_fn(c, causal, jax.devices()[:p])
            wall, cpu = timed_min(f, put(mesh, spec, q, k, v), args.repeats)
            measured[c.label] = {"wall_ms": 1e3 * wall, "cpu_ms": 1e3 * cpu}
        best = min(measured, key=lambda lab: measured[lab]["cpu_ms"])
        pick = choice.pick.label
        ratio = measured[pick]["cpu_ms"] / measured[best]["cpu_ms"]
        best_w = min(measured, key=lambda lab: measured[lab]["wall_ms"])
        row = {"P": p, "N": n, "H": h, "K": kh, "D": d, "causal": causal, "pick": pick,
               "fastest": best, "pick_over_fastest": ratio,
               "fastest_wall": best_w,
               "pick_over_fastest_wall": measured[pick]["wall_ms"] / measured[best_w]["wall_ms"],
               "measured": measured,
               "predicted_ms": {k2: 1e3 * t for k2, t in choice.predicted_s.items()},
               "cannot_run": choice.skipped}
        rows.append(row)
        print(f"[{i + 1}/{len(GRID)}] P={p} N={n} H={h} K={kh} D={d} causal={causal}: "
              f"pick {pick}, fastest {best}, pick/fastest {ratio:.2f}", flush=True)
        write(args.json, grid_payload(rows, prof))
    payload = grid_payload(rows, prof)
    print(grid_table(payload))
    write(args.json, payload)


def grid_payload(rows, prof):
    ok = sum(r["pick_over_fastest"] <= 1.10 for r in rows)
    ok_w = sum(r["pick_over_fastest_wall"] <= 1.10 for r in rows)
    return {"machine": bench.machine(), "profile": dataclasses.asdict(prof),
            "timing": "fwd+bwd of one attention call; min over repeats of process CPU time "
                      "(and of wall time) after a warm-up call, B=1, fp32",
            "within_10pct": ok, "within_10pct_wall": ok_w, "configs": len(rows),
            "rows": rows}


def grid_table(payload):
    lines = [f"auto's pick within 10% of the fastest (CPU time): {payload['within_10pct']} of "
             f"{payload['configs']}; by wall time: {payload['within_10pct_wall']}", "",
             "| P | N | H | K | D | causal | auto's pick | fastest (CPU time) | pick / fastest "
             "| every impl, CPU ms |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in payload["rows"]:
        times = "; ".join(f"{k} {v['cpu_ms']:.0f}" for k, v in
                          sorted(r["measured"].items(), key=lambda kv: kv[1]["cpu_ms"]))
        lines.append(f"| {r['P']} | {r['N']} | {r['H']} | {r['K']} | {r['D']} | "
                     f"{r['causal']} | {r['pick']} | {r['fastest']} | "
                     f"{r['pick_over_fastest']:.2f} | {times} |")
    return "\n".join(lines)


# --------------------------------------------------------------------------- peer


def load_peer():
    """The `ringattention` package's pure-JAX ring, loaded without its __init__ (which calls
    jax.lib.xla_bridge, gone from current jax). Optional: a benchmark dependency only."""
    spec = importlib.util.find_spec("ringattention")
    if spec is None:
        sys.exit("--peer needs the ringattention package: pip install ringattention einops")
    path = pathlib.Path(list(spec.submodule_search_locations)[0]) / "ringattention_jax.py"
    mod_spec = importlib.util.spec_from_file_location("ringattention_jax_peer", path)
    mod = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(mod)
    return mod.ring_attention


def peer_fn(ring_attention, mesh, chunk, causal=True):
    kwargs = dict(causal_block_size=1 if causal else None, query_chunk_size=chunk,
                  key_chunk_size=chunk, deterministic=True, dropout_rng=None, attn_pdrop=0.0,
                  dtype=jnp.float32, policy=jax.checkpoint_policies.nothing_saveable,
                  precision=None, prevent_cse=True)
    spec = P(None, "seq")
    # the peer's code predates varying-axes checks: check_vma=False for it
    return jax.shard_map(lambda q, k, v: ring_attention(q, k, v, None, None, None, "seq",
                                                        True, kwargs),
                         mesh=mesh, in_specs=(spec,) * 3, out_specs=spec, check_vma=False)


def peer(args):
    ring_attention = load_peer()
    n_dev, n, h, d = args.devices, 8192, 8, 64
    mesh = jax.make_mesh((n_dev,), ("seq",), devices=jax.devices()[:n_dev])
    spec = P(None, "seq")
    # the peer computes causal attention correctly (natural order, contiguous shards)
    small = [randn((1, 64 * n_dev, h, d), 30 + i) for i in range(3)]
    got = jax.jit(peer_fn(ring_attention, mesh, 32))(*put(mesh, spec, *small))
    err = float(jnp.max(jnp.abs(got - dense_attention(*small, causal=True))))
    assert err < 1e-4, f"peer output differs from the dense reference by {err}"
    q, k, v = put(mesh, spec, *(randn((1, n, h, d), i) for i in range(3)))
    rows = {}
    for chunk in args.peer_chunks:
        wall, cpu = timed_min(fwd_bwd(peer_fn(ring_attention, mesh, chunk)), (q, k, v),
                              args.repeats)
        rows[f"ringattention (chunk {chunk})"] = {"wall_ms": 1e3 * wall, "cpu_ms": 1e3 * cpu}
        print(rows, flush=True)
    for impl in ("ring", "tokenring", "ulysses"):
        attn = jax.shard_map(lambda q, k, v, impl=impl: attention(q, k, v, impl=impl,
                                                                  axis="seq", causal=True),
                             mesh=mesh, in_specs=(spec,) * 3, out_specs=spec)
        wall, cpu = timed_min(fwd_bwd(attn), (q, k, v), args.repeats)
        rows[impl] = {"wall_ms": 1e3 * wall, "cpu_ms": 1e3 * cpu}
        print(impl, rows[impl], flush=True)
    peers = [r for r in rows if r.startswith("ringattention")]
    ref = {m: min(rows[r][m] for r in peers) for m in ("wall_ms", "cpu_ms")}
    for r in rows.values():
        r["vs_peer_wall"] = r["wall_ms"] / ref["wall_ms"]
        r["vs_peer_cpu"] = r["cpu_ms"] / ref["cpu_ms"]
    payload = {"machine": bench.machine(), "config": dict(N=n, H=h, K=h, D=d, dtype="float32",
                                                          causal=True, devices=n_dev,
                                                          mesh="jax.make_mesh"),
               "timing": f"fwd+bwd, min of {args.repeats} after a warm-up; the peer's best "
                         f"chunk size is the reference", "peer_max_abs_err_small": err,
               "rows": rows}
    for name, r in rows.items():
        print(f"| {name} | {r['cpu_ms']:.0f} | {r['vs_peer_cpu']:.2f} | {r['wall_ms']:.0f} | "
              f"{r['vs_peer_wall']:.2f} |")
    write(args.json, payload)


# --------------------------------------------------------------------------- tiles


def tiles(args):
    """The CPU kernel's tile sizes on the peer's configuration (causal fwd+bwd, N=8192, H=8,
    D=64, fp32, 8 devices): key tile × query-tile factor with invisible tiles skipped, then
    the best of those with causal halving instead. One process, CPU time, min of repeats."""
    from jaxpar.attention import blockwise
    n_dev, n, h, d = args.devices, 8192, 8, 64
    mesh = jax.make_mesh((n_dev,), ("seq",), devices=jax.devices()[:n_dev])
    spec = P(None, "seq")
    q, k, v = put(mesh, spec, *(randn((1, n, h, d), i) for i in range(3)))
    saved = blockwise.DEFAULT_TILE, blockwise.Q_TILE_FACTOR, dict(blockwise.CAUSAL_HALVING)
    rows = []

    def measure(impl, tile, factor, halving):
        blockwise.DEFAULT_TILE, blockwise.Q_TILE_FACTOR = tile, factor
        blockwise.CAUSAL_HALVING["cpu"] = halving
        attn = jax.shard_map(lambda q, k, v: attention(q, k, v, impl=impl, axis="seq",
                                                       causal=True),
                             mesh=mesh, in_specs=(spec,) * 3, out_specs=spec)
        wall, cpu = timed_min(fwd_bwd(attn), (q, k, v), args.repeats)
        row = {"impl": impl, "key_tile": tile, "q_tile": tile * factor, "halving": halving,
               "cpu_ms": 1e3 * cpu, "wall_ms": 1e3 * wall}
        rows.append(row)
        print(row, flush=True)
        return row

    try:
        for impl in args.tile_impls:
            first = [measure(impl, t, f, False) for t in args.tile_sizes for f in (1, 4)]
            best = min(first, key=lambda r: r["cpu_ms"])
            measure(impl, best["key_tile"], best["q_tile"] // best["key_tile"], True)
    finally:
        blockwise.DEFAULT_TILE, blockwise.Q_TILE_FACTOR = saved[:2]
        blockwise.CAUSAL_HALVING.clear()
        blockwise.CAUSAL_HALVING.update(saved[2])
    payload = {"machine": bench.machine(),
               "config": dict(N=n, H=h, K=h, D=d, dtype="float32", causal=True,
                              devices=n_dev, kernel="xla"),
               "timing": f"fwd+bwd, min of {args.repeats} after a warm-up, process CPU time "
                         f"(all threads) and wall time", "rows": rows}
    print("| impl | key tile | query tile | causal | CPU ms | wall ms |\n|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['impl']} | {r['key_tile']} | {r['q_tile']} | "
              f"{'halving' if r['halving'] else 'skip tiles'} | {r['cpu_ms']:.0f} | "
              f"{r['wall_ms']:.0f} |")
    write(args.json, payload)


__all__ = ["calibrate", "grid", "peer", "tiles"]
