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
import statistics
import sys
import time

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxpar import bench
from jaxpar.attention import attention, auto, dense_attention, kernels

KEY = jax.random.key(0)


def timed_all(fn, args, repeats):
    """Every repeat's (wall s, process-CPU s) after one warm-up run."""
    jax.block_until_ready(fn(*args))
    out = []
    for _ in range(repeats):
        w, c = time.perf_counter(), time.process_time()
        jax.block_until_ready(fn(*args))
        out.append((time.perf_counter() - w, time.process_time() - c))
    return out


def timed_min(fn, args, repeats):
    """(min wall s, min process-CPU s) over `repeats` runs after one warm-up run."""
    walls, cpus = zip(*timed_all(fn, args, repeats))
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
# Ulysses' whole-sequence calls take, short and long, D 16-64 ...
FIRST_CALLS = [
    (128, 128, 8, 8, 32, False), (256, 256, 1, 1, 32, False), (256, 256, 8, 8, 32, False),
    (256, 128, 8, 2, 16, False), (512, 512, 4, 4, 64, False), (1024, 1024, 1, 1, 32, False),
    (1024, 1024, 8, 8, 32, False), (1024, 1024, 8, 8, 16, False), (1024, 512, 2, 2, 64, False),
    (1024, 1024, 4, 4, 16, False), (1024, 1024, 8, 2, 32, False), (2048, 1024, 4, 1, 16, False),
    (2048, 2048, 1, 1, 16, False), (2048, 2048, 2, 2, 32, False), (4096, 4096, 1, 1, 32, False),
    (1024, 1024, 8, 8, 32, True), (2048, 2048, 1, 1, 16, True), (4096, 4096, 1, 1, 32, True),
    (8192, 8192, 2, 1, 16, True)]
# ... and head dims 64 and 128, as real models have them, at lengths the held-out grid never
# uses (768-12288, not powers of two): few-head calls (512² tiles) and many-head ones
REAL_D_CALLS = [
    (3072, 3072, 1, 1, 64, False), (6144, 6144, 1, 1, 64, True), (3072, 3072, 2, 1, 64, True),
    (3072, 1536, 2, 2, 128, False), (6144, 6144, 2, 2, 128, True),
    (12288, 12288, 1, 1, 64, True), (1536, 1536, 1, 1, 128, False),
    (768, 768, 8, 8, 64, False), (1536, 768, 8, 2, 64, False), (1536, 1536, 4, 4, 128, True),
    (768, 384, 16, 2, 128, False), (3072, 3072, 4, 1, 64, True), (1536, 768, 12, 12, 64, False),
    (768, 768, 6, 6, 64, True), (3072, 1536, 3, 3, 64, False)]
CALIBRATION_CALLS = FIRST_CALLS + REAL_D_CALLS
TILE_COST_TERMS = ("call_s", "tile_s", "score_s", "score_d_s", "gqa_s", "spill_s", "io_s",
                   "operand_s")


def fit_tile_cost(calls, per_call_s, tile, few_heads=None, terms=TILE_COST_TERMS):
    """Least squares in relative error, non-negative: the TileCost whose seconds match the
    measured ones (each term of the model is linear in one coefficient; `terms` left out
    stay 0). `tile`, `few_heads`: the kernel's tiles (`blockwise.tile_sizes`,
    `FEW_HEADS_TILES`)."""
    import numpy as np
    from scipy.optimize import nnls

    zero = dict.fromkeys(TILE_COST_TERMS, 0.0)

    def features(lq, lk, h, kh, d, causal):
        return [auto.TileCost(tile, **zero | {t: 1.0}, few_heads=few_heads).seconds(
            lq, lk, h, d, causal, kh) for t in terms]

    a = np.array([features(*c) for c in calls]) / np.array(per_call_s)[:, None]
    x, _ = nnls(a, np.ones(len(calls)))
    return auto.TileCost(tile, **zero | dict(zip(terms, map(float, x))), few_heads=few_heads)


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
    shift_s = link[1024][1] / 8  # CPU seconds of one small shift, all devices together
    latency = shift_s / n_dev  # per device and step: on shared cores `auto._on` adds them up
    link_bw = n_dev * (8 << 20) / max(link[8 << 20][1] / 8 - shift_s, 1e-9)
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
    extra, meas["schedules"] = fit_tokenring_extra(prof, max(reps, 5))
    prof = dataclasses.replace(prof, tokenring_extra=extra)
    print(f"TokenRing's bytes cost {1 + extra:.2f}x their link time", flush=True)
    # the FLOP-rate fields are what tile_cost replaces (Profile.from_json fills them back)
    raw = {k: v for k, v in dataclasses.asdict(prof).items()
           if k not in ("kernel_flops", "call_s", "kernel_by_len")}
    payload = {"machine": bench.machine(), "timing": "min over repeats of process CPU time",
               "profile": raw, "measurements": meas}
    print(json.dumps(raw, indent=1))
    write(args.json, payload)


# (P, N, H, K, D, causal) where ring and TokenRing (flat, and outside a Ulysses of 2) are
# timed side by side: the part of TokenRing's time its bytes do not explain
# (`Profile.tokenring_extra`). No kernel call of these is a HELDOUT one (`assert_heldout_unseen`).
SCHEDULE_CALIBRATION = [(8, 3072, 8, 8, 64, True), (8, 6144, 8, 8, 64, True),
                        (8, 6144, 4, 4, 128, False), (4, 6144, 8, 2, 64, True)]


def ring_pairs(p):
    """(ring, TokenRing) candidates alike but for the ring impl: flat, and the hybrid with
    the ring over P/2 outside a Ulysses of 2."""
    pairs = [(auto.Candidate("ring", (p,)), auto.Candidate("tokenring", (p,)))]
    if p > 2:
        pairs.append(tuple(auto.Candidate("hybrid", (p // 2, 2), ri)
                           for ri in ("ring", "tokenring")))
    return pairs


def timed_side_by_side(built, args, reps):
    """Min process-CPU seconds of each `schedule_fn` result, their repeats interleaved
    (a, b, a, b, ...) after a warm-up of each, so that a slow spell of the machine falls on
    both alike."""
    runs = []
    for f, mesh, spec in built:
        placed = put(mesh, spec, *args)
        jax.block_until_ready(f(*placed))
        runs.append((f, placed))
    best = [float("inf")] * len(runs)
    for _ in range(reps):
        for i, (f, placed) in enumerate(runs):
            c = time.process_time()
            jax.block_until_ready(f(*placed))
            best[i] = min(best[i], time.process_time() - c)
    return best


def fit_tokenring_extra(prof, reps):
    """Least squares over SCHEDULE_CALIBRATION: TokenRing's time minus ring's, less what the
    model (tokenring_extra = 0) predicts for that difference, against TokenRing's link time.
    Returns (the factor, at least 0; the timings)."""
    one = dataclasses.replace(prof, tokenring_extra=1.0)
    xs, ys, rows = [], [], []
    for p, n, h, kh, d, causal in SCHEDULE_CALIBRATION:
        s = auto.Shape(1, n, h, kh, d, 4, causal)
        q, k, v = (randn((1, n, x, d), j) for j, x in enumerate((h, kh, kh)))
        for pair in ring_pairs(p):
            cpu = timed_side_by_side([schedule_fn(c, causal, jax.devices()[:p])
                                      for c in pair], (q, k, v), reps)
            ring_c, token_c = pair
            gap = cpu[1] - cpu[0] - (auto.predict(token_c, s, prof) - auto.predict(ring_c, s, prof))
            xs.append(auto.predict(token_c, s, one) - auto.predict(token_c, s, prof))
            ys.append(gap)
            rows.append({"P": p, "N": n, "H": h, "K": kh, "D": d, "causal": causal,
                         "ring": ring_c.label, "ring_cpu_s": cpu[0], "tokenring": token_c.label,
                         "tokenring_cpu_s": cpu[1], "unexplained_s": gap,
                         "tokenring_link_s": xs[-1]})
            print(f"{token_c.label} vs {ring_c.label} at {(p, n, h, kh, d, causal)}: "
                  f"{cpu[1] * 1e3:.0f} vs {cpu[0] * 1e3:.0f} ms CPU, {gap * 1e3:.0f} ms "
                  f"unexplained", flush=True)
    extra = sum(x * y for x, y in zip(xs, ys)) / sum(x * x for x in xs)
    return max(extra, 0.0), rows


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


# --------------------------------------------------------------------------- held out

# (P, N, H, K, D, causal): the validation grid. It shares no kernel call shape with
# CALIBRATION_CALLS (`heldout` checks), covers P 2/4/8, MHA and GQA (K = 1, 2, H), H 4-16
# (6 and 12 too, where Ulysses or a hybrid split cannot run), D 64 and 128, causal and not,
# and N 2K-32K with 9 of the 24 at N >= 8K. Sizes are kept to what 2 cores time in ~45 min.
HELDOUT = [
    (2, 2048, 4, 1, 64, True), (2, 2048, 8, 8, 128, False), (4, 2048, 16, 2, 64, True),
    (4, 2048, 6, 6, 64, False), (8, 2048, 12, 12, 64, True), (8, 2048, 16, 1, 128, True),
    (8, 2048, 8, 2, 64, False), (2, 4096, 8, 2, 64, True), (4, 4096, 4, 4, 128, False),
    (4, 4096, 8, 1, 64, True), (8, 4096, 16, 16, 64, True), (8, 4096, 4, 2, 128, False),
    (8, 4096, 6, 2, 64, True), (2, 4096, 12, 4, 64, False), (4, 4096, 12, 12, 64, True),
    (2, 8192, 4, 4, 64, True), (4, 8192, 4, 1, 64, False), (8, 8192, 8, 8, 64, True),
    (8, 8192, 4, 4, 128, True), (4, 8192, 8, 2, 64, True), (8, 8192, 12, 4, 64, True),
    (8, 16384, 4, 1, 64, True), (2, 16384, 4, 2, 64, True), (2, 32768, 4, 1, 64, True)]


def call_shapes(c: auto.Candidate, n, h, kh, d, causal):
    """The kernel calls (Lq, Lk, heads, kv heads, D, causal) one fwd+bwd of `c` makes (B=1):
    what the tile model is evaluated on, as `auto.predict` cuts them."""
    if c.impl == "ulysses":
        p = c.shards[0]
        return {(n, n, h // p, max(kh // p, 1), d, causal)}
    pr, pu = c.shards if c.impl == "hybrid" else (c.shards[0], 1)
    kv = (kh if kh % pu == 0 else pu) // pu
    tok = n // pr
    if causal:
        return {(tok, tok, h // pu, kv, d, True), (tok, tok // 2, h // pu, kv, d, False)}
    return {(tok, tok, h // pu, kv, d, False)}


def assert_heldout_unseen():
    """No kernel call of a HELDOUT schedule is a calibration call or a call of a
    SCHEDULE_CALIBRATION schedule."""
    seen = set(CALIBRATION_CALLS)
    for p, n, h, kh, d, causal in SCHEDULE_CALIBRATION:
        for pair in ring_pairs(p):
            for c in pair:
                seen |= call_shapes(c, n, h, kh, d, causal)
    for p, n, h, kh, d, causal in HELDOUT:
        for c in auto.flexible(p):
            shared = call_shapes(c, n, h, kh, d, causal) & seen
            assert not shared, f"held-out {c.label} at {(p, n, h, kh, d, causal)}: {shared}"


def fixed_rule(p, h, kh) -> str:
    """The baseline rule: Ulysses if the heads divide, else the hybrid ring 2 × Ulysses P/2
    (ring outside), else ring."""
    if auto.ulysses_fits(h, kh, p):
        return auto.Candidate("ulysses", (p,)).label
    if p > 2 and auto.ulysses_fits(h, kh, p // 2):
        return auto.Candidate("hybrid", (2, p // 2), "ring").label
    return auto.Candidate("ring", (p,)).label


def heldout(args):
    """Time every schedule on HELDOUT; score auto, the fixed rule and always-ring. Resumes:
    configurations already in --json are kept (written after each one)."""
    assert_heldout_unseen()
    path = pathlib.Path(args.json) if args.json else None
    saved = json.loads(path.read_text()) if path and path.exists() else {}
    rows = [{k: r[k] for k in ("P", "N", "H", "K", "D", "causal", "measured")}
            for r in saved.get("rows", [])]
    if (args.rescore or args.ablation) and not rows:
        sys.exit(f"--rescore and --ablation need --json naming a held-out JSON with measured "
                 f"rows; {args.json!r} has none")
    if args.rescore:  # the model changed: score the measured rows again, no timing
        payload = heldout_payload(rows, saved["repeats"], args.profile)
        print(heldout_table(payload))
        return write(args.out or args.json, payload)
    if args.ablation:
        return ablation(rows, args.out)
    have = {(r["P"], r["N"], r["H"], r["K"], r["D"], r["causal"]) for r in rows}
    for i, (p, n, h, kh, d, causal) in enumerate(HELDOUT):
        if (p, n, h, kh, d, causal) in have:
            continue
        s = auto.Shape(1, n, h, kh, d, 4, causal)
        q, k, v = (randn((1, n, x, d), j) for j, x in enumerate((h, kh, kh)))
        measured = {}
        for c in auto.flexible(p):
            if auto.why_not(c, s):
                continue
            f, mesh, spec = schedule_fn(c, causal, jax.devices()[:p])
            reps = timed_all(f, put(mesh, spec, q, k, v), args.repeats)
            cpu = [c_ for _, c_ in reps]
            measured[c.label] = {"cpu_ms": 1e3 * min(cpu),
                                 "wall_ms": 1e3 * min(w for w, _ in reps),
                                 "cpu_ms_repeats": [1e3 * x for x in cpu],
                                 "spread": (max(cpu) - min(cpu)) / min(cpu)}
        rows.append({"P": p, "N": n, "H": h, "K": kh, "D": d, "causal": causal,
                     "measured": measured})
        print(f"[{i + 1}/{len(HELDOUT)}] P={p} N={n} H={h} K={kh} D={d} causal={causal}: "
              + ", ".join(f"{lab} {m['cpu_ms']:.0f}" for lab, m in measured.items()), flush=True)
        write(args.json, heldout_payload(rows, args.repeats))
    payload = heldout_payload(rows, args.repeats)
    print(heldout_table(payload))
    write(args.json, payload)


def ablation(rows, out):
    """What each change to the CPU model buys on the held-out rows, no timing: the tile model
    refitted to the committed profile's measured calls (the first 19, or all), without or
    with the operand term, and TokenRing's extra at 0 or as fitted."""
    raw = json.loads(auto.CPU_PROFILE.read_text())
    prof = auto.profile_for("cpu")
    n_dev = raw["measurements"]["devices"]
    recs = raw["measurements"]["kernel_calls"]
    calls = [(r["Lq"], r["Lk"], r["H"], r["K"], r["D"], r["causal"]) for r in recs]
    assert calls == CALIBRATION_CALLS, "profile_cpu.json predates CALIBRATION_CALLS: --calibrate"
    per_call = [r["cpu_s"] / n_dev for r in recs]
    without = tuple(t for t in TILE_COST_TERMS if t != "operand_s")
    variants = []
    for n_calls, what in ((len(FIRST_CALLS), f"the {len(FIRST_CALLS)} calls of D 16-64"),
                          (len(calls), f"all {len(calls)} calls")):
        for terms, name in ((without, "no operand term"), (TILE_COST_TERMS, "operand term")):
            cost = fit_tile_cost(calls[:n_calls], per_call[:n_calls], prof.tile_cost.tile,
                                 prof.tile_cost.few_heads, terms)
            fits = [cost.seconds(lq, lk, h, d, c, kh) / t
                    for (lq, lk, h, kh, d, c), t in zip(calls, per_call)]
            few = prof.tile_cost.few_heads[0]
            # the two kinds of call the schedules choose between, at real head dims
            kinds = {kind: statistics.median(f for f, (_, _, h, _, d, _) in zip(fits, calls)
                                             if d >= 64 and (h <= few) == (kind == "few"))
                     for kind in ("few", "many")}
            for extra in sorted({0.0, prof.tokenring_extra}):
                summary = score([dict(r) for r in rows], dataclasses.replace(
                    prof, tile_cost=cost, tokenring_extra=extra))
                variants.append({"calls": what, "tile model": name, "tokenring_extra": extra,
                                 "fit_over_measured_all_calls": [min(fits), max(fits)],
                                 "median_fit_d64_few_heads": kinds["few"],
                                 "median_fit_d64_many_heads": kinds["many"],
                                 "auto": summary["auto"]})
    fixed = score([dict(r) for r in rows], prof)["fixed rule"]
    lines = ["| calls fitted | tile model | TokenRing extra | fit / measured, all calls | "
             "D ≥ 64, ≤ 2 heads | D ≥ 64, more heads | auto within 10% | mean slowdown | "
             "worst |", "|---|---|---|---|---|---|---|---|---|"]
    for v in variants:
        a, (lo, hi) = v["auto"], v["fit_over_measured_all_calls"]
        lines.append(f"| {v['calls']} | {v['tile model']} | {v['tokenring_extra']:.2f} | "
                     f"{lo:.2f}-{hi:.2f} | {v['median_fit_d64_few_heads']:.2f} | "
                     f"{v['median_fit_d64_many_heads']:.2f} | {a['within_10pct']} of "
                     f"{a['configs']} | {100 * a['mean_slowdown']:.1f}% | {a['worst']:.2f}× |")
    lines.append(f"| (fixed rule) | | | | | | {fixed['within_10pct']} of {fixed['configs']} | "
                 f"{100 * fixed['mean_slowdown']:.1f}% | {fixed['worst']:.2f}× |")
    print("\n".join(lines))
    write(out, {"machine": bench.machine(), "profile": str(auto.CPU_PROFILE.name),
                "what": ablation.__doc__.split("\n\n")[0].replace("\n    ", " "),
                "fixed rule": fixed, "variants": variants})


def score(rows, prof):
    """Each policy's pick per row, its time over the fastest's, and the summary."""
    policies = {"auto": lambda r: auto.choose(
                    auto.flexible(r["P"]), batch=1, seq_len=r["N"], heads=r["H"],
                    kv_heads=r["K"], head_dim=r["D"], causal=r["causal"],
                    profile=prof).pick.label,
                "fixed rule": lambda r: fixed_rule(r["P"], r["H"], r["K"]),
                "always ring": lambda r: auto.Candidate("ring", (r["P"],)).label}
    summary = {}
    for r in rows:
        ms = {lab: m["cpu_ms"] for lab, m in r["measured"].items()}
        r["fastest"] = min(ms, key=ms.get)
        r["picks"] = {name: pick(r) for name, pick in policies.items()}
        r["over_fastest"] = {name: ms[lab] / ms[r["fastest"]] for name, lab in r["picks"].items()}
        # the margin the fastest wins by, against its runner-up: noise below it could flip it
        second = sorted(ms.values())[1] if len(ms) > 1 else ms[r["fastest"]]
        r["fastest_margin"] = second / ms[r["fastest"]] - 1
    for name in policies:
        ratios = [r["over_fastest"][name] for r in rows]
        summary[name] = {"within_10pct": sum(x <= 1.10 for x in ratios), "configs": len(rows),
                         "mean_slowdown": sum(ratios) / len(ratios) - 1 if ratios else 0.0,
                         "worst": max(ratios, default=1.0)}
    return summary


def heldout_payload(rows, repeats, profile_path=None):
    prof = auto.Profile.from_json(profile_path) if profile_path else auto.profile_for("cpu")
    summary = score(rows, prof)
    spreads = sorted(m["spread"] for r in rows for m in r["measured"].values())
    return {"machine": bench.machine(), "repeats": repeats,
            "timing": f"fwd+bwd of a loss (value_and_grad), B=1, fp32; {repeats} repeats after "
                      f"a warm-up, every repeat's process CPU time kept; a schedule's time is "
                      f"the minimum, its spread (max - min) / min",
            "profile": f"{profile_path or 'jaxpar/attention/profile_cpu.json'} (fitted to "
                       f"CALIBRATION_CALLS and SCHEDULE_CALIBRATION; no held-out call shape "
                       f"is among their calls)",
            "spread": {"median": spreads[len(spreads) // 2] if spreads else None,
                       "max": spreads[-1] if spreads else None},
            "summary": summary, "rows": rows}


def heldout_table(payload):
    lines = ["| policy | within 10% of the fastest | mean slowdown | worst |",
             "|---|---|---|---|"]
    for name, s in payload["summary"].items():
        lines.append(f"| {name} | {s['within_10pct']} of {s['configs']} | "
                     f"{100 * s['mean_slowdown']:.1f}% | {s['worst']:.2f}× |")
    lines += ["", "| P | N | H | K | D | causal | fastest (CPU ms) | auto | fixed rule | "
              "always ring | largest spread |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in payload["rows"]:
        fast = r["fastest"]
        cells = [f"{r['picks'][n]} {r['over_fastest'][n]:.2f}×"
                 for n in ("auto", "fixed rule", "always ring")]
        spread = max(m["spread"] for m in r["measured"].values())
        lines.append(f"| {r['P']} | {r['N']} | {r['H']} | {r['K']} | {r['D']} | "
                     f"{r['causal']} | {fast} {r['measured'][fast]['cpu_ms']:.0f} | "
                     + " | ".join(cells) + f" | {100 * spread:.1f}% |")
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


__all__ = ["calibrate", "grid", "heldout", "peer", "tiles"]
