"""Streaming DiLoCo experiment: data parallel vs DiLoCo vs Streaming DiLoCo (+τ=1, +FP4).

A byte-level Llama-style LM on the bundled stdlib-docstring corpus, M replicas simulated as
XLA host devices. Every method sees the same tokens: replica m at step t gets
ByteData.batch(t, B, m); data parallel averages the M gradients every step.

Prints (1) final eval loss, total bytes one replica sends, peak bytes of one sync; and (2) a
simulated compute utilization vs bandwidth table from the measured step time: a blocking
transfer of b bytes at bandwidth W costs b/W of idle compute; with overlap τ a fragment's
transfer hides behind τ inner steps, so it costs max(0, b_p/W − τ·t_step).

    python scripts/bench_diloco.py --quick --json out.json --plot docs/diloco_loss.png
    python scripts/bench_diloco.py --steps 1024 --methods dp fp4 --json long.json   # the long run
    python scripts/bench_diloco.py --quick --methods fp4 --H 32 --reuse-dp out.json  # a variant
    python scripts/bench_diloco.py --render out.json long.json --plot loss.png      # tables only

Bytes: data parallel all-reduces 4-byte gradients every step (2(M−1)/M·4 bytes per value per
step); FP4 sends 4.125 bits per value once per H steps through a reduce-scatter + all-gather
(2(M−1)/M payloads; at M=2 one all-gather, the same bytes), so the ratio is ≈ 7.76·H for
every M.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

T0 = time.perf_counter()
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from jaxpar.diloco import data_parallel_bytes, replica_grads, streaming_diloco  # noqa: E402
from jaxpar.mesh import make_mesh  # noqa: E402
from jaxpar.models.transformer import Transformer, TransformerConfig, lm_loss  # noqa: E402
from jaxpar.data import ByteData  # noqa: E402

METHODS = {  # name: streaming_diloco kwargs (None = data parallel); "P"/"alpha" come from settings
    "data parallel": None,
    "DiLoCo": dict(num_fragments=1, overlap_steps=0, alpha=0.0, quantize="none"),
    "Streaming DiLoCo": dict(num_fragments="P", overlap_steps=0, alpha=0.0, quantize="none"),
    "+ overlap τ=1": dict(num_fragments="P", overlap_steps=1, alpha="alpha", quantize="none"),
    "+ FP4 (E3M0)": dict(num_fragments="P", overlap_steps=1, alpha="alpha", quantize="fp4_e3m0"),
}
SHORT = {"dp": "data parallel", "diloco": "DiLoCo", "streaming": "Streaming DiLoCo",
         "overlap": "+ overlap τ=1", "fp4": "+ FP4 (E3M0)"}


def settings(quick: bool) -> dict:
    """One model and per-step batch for both modes; --quick only runs fewer steps."""
    s = dict(layers=4, embed=128, heads=4, kv_heads=2, head_dim=32, mlp=384, seq=64, batch=8,
             steps=1024, H=16, P=4, eval_batches=8, lr=3e-3, outer_lr=0.7, outer_momentum=0.9, alpha=0.5)
    if quick:
        s["steps"] = 256
    return s


def inner_optimizer(s):
    sched = optax.warmup_cosine_decay_schedule(0.0, s["lr"], s["steps"] // 16, s["steps"], s["lr"] / 10)
    return optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(sched, b2=0.95, weight_decay=0.1))


def build(s):
    cfg = TransformerConfig(layers=s["layers"], embed=s["embed"], heads=s["heads"], kv_heads=s["kv_heads"],
                            head_dim=s["head_dim"], mlp=s["mlp"])
    model = Transformer(cfg)
    data = ByteData.load(seq_len=s["seq"], seed=s.get("seed", 0))
    params = model.init(jax.random.key(s.get("seed", 0)), jnp.zeros((1, s["seq"]), jnp.int32))["params"]
    return model, data, params


_EVAL = {}


def _eval_fn(model, data, s):
    """Mean loss over the fixed eval batches; one compiled function shared by every run."""
    key = (id(model), id(data), s["batch"], s["eval_batches"])
    if key not in _EVAL:
        evals = jnp.asarray(data.eval_batches(s["batch"], s["eval_batches"]))
        _EVAL[key] = jax.jit(lambda p: jnp.mean(jax.lax.map(lambda b: lm_loss(model, p, b), evals)))
    return _EVAL[key]


def run_method(name, kw, M, s, model, data, params, eval_every):
    mesh = make_mesh(replica=M, devices=jax.devices()[:M])
    loss = lambda p, b: lm_loss(model, p, b)
    batch_sharding = NamedSharding(mesh, P("replica"))
    eval_fn = _eval_fn(model, data, s)
    n_params = sum(x.size for x in jax.tree.leaves(params))
    curve = []

    if kw is None:  # data parallel: one optimizer, the gradient averaged over replicas every step
        opt = inner_optimizer(s)
        rep = NamedSharding(mesh, P())
        state = jax.device_put((params, opt.init(params)), rep)

        @jax.jit
        def step(st, b_M):
            p, o = st
            g = jax.grad(lambda p: jnp.mean(jax.vmap(lambda b: loss(p, b))(b_M)))(p)
            u, o = opt.update(g, o, p)
            return optax.apply_updates(p, u), o

        glob = lambda st: st[0]
        bytes_info = {"total": data_parallel_bytes(n_params, M) * s["steps"],
                      "peak_per_sync": data_parallel_bytes(n_params, M), "per_sync": None, "overlap": 0,
                      "syncs_per_H": s["H"]}
    else:
        kw = dict(kw, num_fragments=s["P"] if kw["num_fragments"] == "P" else kw["num_fragments"],
                  alpha=s["alpha"] if kw["alpha"] == "alpha" else kw["alpha"])
        outer = optax.sgd(s["outer_lr"], momentum=s["outer_momentum"] or None, nesterov=s["outer_momentum"] > 0)
        sd = streaming_diloco(inner_optimizer(s), num_replicas=M, sync_every=s["H"], mesh=mesh,
                              outer_optimizer=outer, **kw)
        grad = replica_grads(loss, mesh=mesh)
        state = sd.init(params)
        step = jax.jit(lambda st, b_M: sd.update(grad(st.params, b_M)[1], st))
        finalize = jax.jit(sd.finalize)
        glob = lambda st: finalize(st).global_params
        rep = sd.bytes_report(params, s["steps"])
        bytes_info = {"total": rep["total"], "peak_per_sync": rep["peak_per_sync"], "per_sync": rep["per_sync"],
                      "overlap": kw["overlap_steps"], "syncs_per_H": kw["num_fragments"]}

    t0 = time.perf_counter()
    for t in range(1, s["steps"] + 1):
        state = step(state, jax.device_put(data.replica_batches(t, s["batch"], M), batch_sharding))
        if t % eval_every == 0 or t == s["steps"]:
            curve.append((t, float(eval_fn(glob(state)))))
    wall = time.perf_counter() - t0
    print(f"  M={M} {name:18s} eval {curve[-1][1]:.4f}  ({wall:.0f}s)", flush=True)
    return {"method": name, "M": M, "final_eval_loss": curve[-1][1], "curve": curve, "wall_s": wall,
            "H": s["H"], "steps": s["steps"], **bytes_info}


def replica_step_time(s, model, data, params, reps=10):
    """Wall time of one replica's inner step (forward, backward, AdamW) on one host device."""
    opt = inner_optimizer(s)
    st = (params, opt.init(params))

    @jax.jit
    def step(st, b):
        p, o = st
        g = jax.grad(lambda p: lm_loss(model, p, b))(p)
        u, o = opt.update(g, o, p)
        return optax.apply_updates(p, u), o

    b = jnp.asarray(data.batch(0, s["batch"]))
    st = jax.block_until_ready(step(st, b))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        st = jax.block_until_ready(step(st, b))
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def utilization(r, t_step, H, gbit):
    """Fraction of time computing at `gbit` Gbit/s between replicas (see module doc)."""
    W = gbit * 1e9 / 8  # bytes/s
    if r["per_sync"] is None:  # data parallel: a blocking all-reduce every step
        return t_step / (t_step + r["peak_per_sync"] / W)
    idle = sum(max(0.0, b / W - r["overlap"] * t_step) for b in r["per_sync"])
    return H * t_step / (H * t_step + idle)


def gbit_for(r, t_step, H, target=0.95):
    lo, hi = 1e-9, 1e9
    for _ in range(200):  # bisection in log space; utilization grows with bandwidth
        mid = (lo * hi) ** 0.5
        lo, hi = (mid, hi) if utilization(r, t_step, H, mid) < target else (lo, mid)
    return hi


def fmt_bytes(b):
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if b < 1000:
            return f"{b:.1f} {unit}"
        b /= 1000
    return f"{b:.1f} PB"


def print_tables(results, t_step):
    Ms = sorted({r["M"] for r in results})
    print("\n| M | method | final eval loss | vs DP | total bytes / replica | vs DP | peak bytes / sync | wall |")
    print("|---|---|---|---|---|---|---|---|")
    for M in Ms:
        for r in (r for r in results if r["M"] == M):
            dp = next((d for d in results if d["M"] == M and d["per_sync"] is None
                       and d.get("steps") == r.get("steps")), None)
            rel = f"{100 * (r['final_eval_loss'] / dp['final_eval_loss'] - 1):+.2f}%" if dp else "n/a"
            ratio = ("1×" if r is dp else f"{dp['total'] / r['total']:.0f}× fewer") if dp else "n/a"
            print(f"| {M} | {r.get('label', r['method'])} | {r['final_eval_loss']:.4f} | {rel} | {fmt_bytes(r['total'])} | "
                  f"{ratio} | {fmt_bytes(r['peak_per_sync'])} | {r['wall_s']:.0f} s |")

    gbits = [0.001, 0.01, 0.1, 1.0]
    print(f"\nSimulated compute utilization (t_step = {t_step * 1e3:.1f} ms measured on this CPU); "
          f"Gbit/s needed for 95%:")
    print("| M | method | " + " | ".join(f"util @ {g} Gbit/s" for g in gbits) + " | Gbit/s for 95% |")
    print("|---|---|" + "---|" * (len(gbits) + 1))
    for r in results:
        r["gbit_for_95"] = gbit_for(r, t_step, r["H"])
        r["utilization"] = {g: utilization(r, t_step, r["H"], g) for g in gbits}
        print(f"| {r['M']} | {r.get('label', r['method'])} | " + " | ".join(f"{100 * r['utilization'][g]:.1f}%" for g in gbits)
              + f" | {r['gbit_for_95']:.4g} |")


def plot(results, path, title=""):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    Ms = sorted({r["M"] for r in results})
    fig, axes = plt.subplots(1, len(Ms), figsize=(6 * len(Ms), 4), squeeze=False)
    for ax, M in zip(axes[0], Ms):
        for r in (r for r in results if r["M"] == M):
            t, l = zip(*r["curve"])
            ax.plot(t, l, label=r.get("label", r["method"]), marker="." if r["per_sync"] is None else None)
        ax.set(title=f"M={M} replicas {title}", xlabel="inner step", ylabel="eval loss (nats/byte)")
        ax.set_ylim(top=min(ax.get_ylim()[1], 3.5))
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


def _same_dp_setup(a, b):
    keys = ("layers", "embed", "heads", "kv_heads", "head_dim", "mlp", "seq", "batch", "steps", "lr", "eval_batches")
    return all(a.get(k) == b.get(k) for k in keys) and a.get("seed", 0) == b.get("seed", 0)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer steps (< 10 min on 2 cores)")
    ap.add_argument("--replicas", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--steps", type=int, help="override the number of inner steps")
    ap.add_argument("--H", type=int, help="override sync_every")
    ap.add_argument("--P", type=int, help="override num_fragments of the streaming methods")
    ap.add_argument("--outer-lr", type=float)
    ap.add_argument("--outer-momentum", type=float)
    ap.add_argument("--alpha", type=float, help="mixing of the τ=1 methods")
    ap.add_argument("--methods", nargs="+", choices=list(SHORT), help="subset to run (default: all)")
    ap.add_argument("--reuse-dp", help="take the data-parallel rows from this JSON (same model, data, "
                                       "steps and lr; DP does not depend on H, P or the outer optimizer)")
    ap.add_argument("--render", nargs="+", help="only print tables / plot from these JSON files")
    ap.add_argument("--seed", type=int, default=0, help="model init and data order (default 0)")
    ap.add_argument("--label", help="suffix for the method names of this run's rows, e.g. 'H=32'")
    ap.add_argument("--json", help="write all results here")
    ap.add_argument("--plot", help="write the eval-loss curves (PNG) here")
    args = ap.parse_args(argv)
    if args.render:
        runs = [json.load(open(f)) for f in args.render]
        results = [r for d in runs for r in d["results"]]
        print_tables(results, runs[0]["t_step_s"])
        if args.plot:
            plot(results, args.plot)
        return
    s = settings(args.quick)
    s["seed"] = args.seed
    for key, val in (("steps", args.steps), ("H", args.H), ("P", args.P), ("outer_lr", args.outer_lr),
                     ("outer_momentum", args.outer_momentum), ("alpha", args.alpha)):
        if val is not None:
            s[key] = val
    methods = {SHORT[k]: METHODS[SHORT[k]] for k in (args.methods or SHORT)}
    if jax.device_count() < max(args.replicas):
        sys.exit(f"need {max(args.replicas)} devices, have {jax.device_count()}; set XLA_FLAGS")
    reused = []
    if args.reuse_dp:
        old = json.load(open(args.reuse_dp))
        if not _same_dp_setup(old["settings"], s):
            sys.exit(f"--reuse-dp {args.reuse_dp}: its settings {old['settings']} differ from {s}")
        reused = [dict(r, reused_from=args.reuse_dp) for r in old["results"]
                  if r["per_sync"] is None and r["M"] in args.replicas]
        methods.pop("data parallel", None)
    model, data, params = build(s)
    n_params = sum(x.size for x in jax.tree.leaves(params))
    print(f"model {n_params / 1e6:.2f}M params, {s['layers']} layers; batch {s['batch']}×{s['seq']} bytes per replica; "
          f"{s['steps']} steps; H={s['H']} P={s['P']} outer lr {s['outer_lr']} μ {s['outer_momentum']} "
          f"α {s['alpha']}; {jax.device_count()} {jax.devices()[0].platform} devices, "
          f"{os.cpu_count()} cores", flush=True)
    t_step = replica_step_time(s, model, data, params)
    print(f"one replica inner step: {t_step * 1e3:.1f} ms", flush=True)

    t_start = time.perf_counter()
    results = []
    for M in args.replicas:
        results += [r for r in reused if r["M"] == M]
        for name, kw in methods.items():
            r = run_method(name, kw, M, s, model, data, params, eval_every=max(16, s["steps"] // 32))
            r["label"] = f"{name} ({args.label})" if args.label else name
            results.append(r)
    total_wall = time.perf_counter() - t_start
    print_tables(results, t_step)
    print(f"\ntotal experiment wall time: {total_wall:.0f} s (without the reused data-parallel rows); "
          f"whole script so far {time.perf_counter() - T0:.0f} s", flush=True)

    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"settings": s, "n_params": n_params, "t_step_s": t_step, "wall_s": total_wall,
                       "devices": f"{jax.device_count()} {jax.devices()[0].platform}", "cores": os.cpu_count(),
                       "argv": sys.argv[1:], "results": results}, fh, indent=1)
    if args.plot:
        plot(results, args.plot)


if __name__ == "__main__":
    main()
