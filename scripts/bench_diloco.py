"""Streaming DiLoCo experiment through the trainer: data parallel vs DiLoCo vs Streaming DiLoCo.

Every run is one `jaxpar.train.run.train(cfg)` call on a `Config` (the trainer's model, packed
byte data, AdamW warmup-cosine inner optimizer, eval); this script only builds the configs,
times the runs and prints the tables. M replicas are simulated as XLA host devices
(devices[:M]); DiLoCo replicas sit on the `replica` mesh axis; data parallel is the trainer
without DiLoCo on the same mesh (global batch B·M, sharded over replica).

Prints (1) final eval loss, the mean of the last 4 evals (what the 2% target is judged on),
total bytes one replica sends, peak bytes of one sync, wall; (2) the 2% target per seed; and
(3) a simulated compute utilization vs bandwidth table from a measured step time t_step (a
trainer run of one replica, batch B, on one host device). Exposed communication per step:

* data parallel: its gradient all-reduce runs beside the backward pass (bucketed), as in
  practice, so it is modelled as exposed max(0, b/W − f·t_step) with f = 2/3 (the backward
  pass is ≈ 2/3 of a step's FLOPs) — an ASSUMPTION of ideal bucketing, not a measurement;
* DiLoCo with overlap τ: a fragment's transfer hides behind τ inner steps, so it costs
  max(0, b_p/W − τ·t_step) (τ = 0: fully exposed), summed over the fragments of H steps.

Bytes: data parallel all-reduces fp32 gradients every step, 2(M−1)/M·4 bytes per param
(`jaxpar.diloco.data_parallel_bytes`); DiLoCo's are the trainer's `diloco_bytes` report.

    python scripts/bench_diloco.py --quick --replicas 2 --json /tmp/q.json
    python scripts/bench_diloco.py --replicas 2 --seeds 0 --json trainer_M2_seed0.json
    python scripts/bench_diloco.py --replicas 2 --seeds 1 --methods dp fp4 --json s1.json
    python scripts/bench_diloco.py --render a.json b.json --plot docs/diloco_trainer_loss.png
    python scripts/bench_diloco.py --islands --json docs/diloco_islands_trainer.json \\
        --plot docs/diloco_islands_trainer.png

`--render` merges JSON files: a variant run (e.g. `--methods fp4 --H 32 --label H=32`) is
compared with the data-parallel rows of another file with the same M, seed and steps; the
utilization table uses the smallest t_step of the files (other jobs only inflate it).
Data parallel evaluates on the same eval windows as DiLoCo (eval.batches = 8/M batches of
B·M windows = 8 batches of B), so M must divide the eval batch count.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import numpy as np  # noqa: E402

from jaxpar.diloco import data_parallel_bytes  # noqa: E402
from jaxpar.train.config import Config, parse_override  # noqa: E402
from jaxpar.train.run import train  # noqa: E402

DP_OVERLAP = 2 / 3  # f: share of a data-parallel step its all-reduce can hide behind (backward)
LAST = 4            # the target is judged on the mean of the last LAST evals

METHODS = {  # name: diloco section (None = data parallel); "P" / "alpha" come from settings
    "data parallel": None,
    "DiLoCo": dict(num_fragments=1, overlap_steps=0, alpha=0.0, quantize="none"),
    "Streaming DiLoCo": dict(num_fragments="P", overlap_steps=0, alpha=0.0, quantize="none"),
    "+ overlap τ=1": dict(num_fragments="P", overlap_steps=1, alpha="alpha", quantize="none"),
    "+ FP4 (E3M0)": dict(num_fragments="P", overlap_steps=1, alpha="alpha",
                         quantize="fp4_e3m0"),
}
SHORT = {"dp": "data parallel", "diloco": "DiLoCo", "streaming": "Streaming DiLoCo",
         "overlap": "+ overlap τ=1", "fp4": "+ FP4 (E3M0)"}


def settings(quick: bool) -> dict:
    """One model and per-replica batch for every method; --quick only runs fewer steps."""
    s = dict(layers=4, embed=128, heads=4, kv_heads=2, head_dim=32, mlp=384, seq=64, batch=8,
             steps=1024, H=16, P=4, eval_every=64, eval_batches=8, lr=3e-3, outer_lr=0.7,
             outer_momentum=0.9, alpha=0.5)
    if quick:
        s["steps"] = 256
    return s


def make_config(s: dict, method: str | None, M: int, seed: int, run_dir: str,
                overrides=()) -> Config:
    """The trainer config of one run; method None = data parallel."""
    kw = METHODS[method] if method else None
    if kw is None:  # same tokens per step (B·M) and the same eval windows (8·B) as DiLoCo
        if s["eval_batches"] % M:
            sys.exit(f"eval batches {s['eval_batches']} must be divisible by M={M} so data "
                     f"parallel evaluates the same windows")
        batch, eval_batches, diloco = s["batch"] * M, s["eval_batches"] // M, {"enabled": False}
    else:
        batch, eval_batches = s["batch"], s["eval_batches"]
        diloco = dict(enabled=True, sync_every=s["H"], outer_lr=s["outer_lr"],
                      outer_momentum=s["outer_momentum"], quantize=kw["quantize"],
                      num_fragments=s["P"] if kw["num_fragments"] == "P" else kw["num_fragments"],
                      overlap_steps=kw["overlap_steps"],
                      alpha=s["alpha"] if kw["alpha"] == "alpha" else kw["alpha"])
    cfg = Config().replace(
        mesh=dict(replica=M),
        model=dict(layers=s["layers"], embed=s["embed"], heads=s["heads"],
                   kv_heads=s["kv_heads"], head_dim=s["head_dim"], mlp=s["mlp"]),
        diloco=diloco,
        train=dict(steps=s["steps"], batch_size=batch, seq_len=s["seq"], lr=s["lr"], warmup=0,
                   min_lr_ratio=0.1, weight_decay=0.1, b2=0.95, clip=1.0, seed=seed,
                   run_dir=run_dir, log_every=s["eval_every"]),
        eval=dict(every=s["eval_every"], batches=eval_batches, sample_bytes=0),
        checkpoint=dict(every=0, keep=1))
    extra: dict = {}
    for item in overrides:
        section, key, value = parse_override(item)
        extra.setdefault(section, {})[key] = value
    return cfg.replace(**extra) if extra else cfg


def trainer_run(cfg: Config, devices) -> tuple[dict, float]:
    """One trainer run in a fresh folder (a folder with checkpoints would resume)."""
    run_dir = tempfile.mkdtemp(prefix="bench_diloco_")
    cfg = cfg.replace(train={"run_dir": run_dir})
    t0 = time.perf_counter()
    try:
        summary = train(cfg, devices=devices, quiet=True)
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)
    return summary, time.perf_counter() - t0


def replica_step_time(s: dict, overrides=(), steps: int = 96) -> float:
    """Median step time of one replica (batch B, one host device), measured by the trainer."""
    t = dict(s, steps=steps, eval_every=16)
    cfg = make_config(t, None, 1, 0, "", overrides).replace(
        eval={"every": 0, "batches": 1}, train={"log_every": 8})
    summary, _ = trainer_run(cfg, jax.devices()[:1])
    return summary["step_time_s"]


def run_method(name: str, M: int, seed: int, s: dict, overrides=()) -> dict:
    cfg = make_config(s, name, M, seed, "", overrides)
    summary, wall = trainer_run(cfg, jax.devices()[:M])
    n = summary["params"]
    if METHODS[name] is None:
        per_step = data_parallel_bytes(n, M)
        b = {"total": per_step * s["steps"], "peak_per_sync": per_step, "per_sync": None,
             "overlap": 0}
    else:
        rep = summary["diloco_bytes"]
        b = {"total": rep["total"], "peak_per_sync": rep["peak_per_sync"],
             "per_sync": rep["per_sync"], "syncs": rep["syncs"],
             "overlap": cfg.diloco.overlap_steps}
    evals = summary["evals"]
    r = {"method": name, "M": M, "seed": seed, "steps": s["steps"], "H": s["H"],
         "final_eval_loss": summary["final_eval_loss"], "curve": evals,
         "last_mean": float(np.mean([loss for _, loss in evals[-LAST:]])),
         "last_steps": [st for st, _ in evals[-LAST:]], "wall_s": wall,
         "run_step_time_s": summary["step_time_s"], "tokens_per_s": summary["tokens_per_s"],
         "hlo_comm_bytes_per_step": summary["comm_bytes_per_step"], "params": n,
         "machine": summary["machine"], "config": summary["config"], **b}
    print(f"  M={M} seed {seed} {name:18s} eval {r['final_eval_loss']:.4f}  "
          f"last-{LAST} mean {r['last_mean']:.4f}  ({wall:.0f} s)", flush=True)
    return r


# ----------------------------------------------------------------------------- tables


def utilization(r: dict, t_step: float, gbit: float) -> float:
    """Fraction of time computing at `gbit` Gbit/s between replicas (see module doc)."""
    W = gbit * 1e9 / 8  # bytes/s
    if r["per_sync"] is None:  # data parallel: all-reduce beside the backward pass
        return t_step / (t_step + max(0.0, r["peak_per_sync"] / W - DP_OVERLAP * t_step))
    idle = sum(max(0.0, b / W - r["overlap"] * t_step) for b in r["per_sync"])
    return r["H"] * t_step / (r["H"] * t_step + idle)


def gbit_for(r: dict, t_step: float, target: float = 0.95) -> float:
    lo, hi = 1e-9, 1e9
    for _ in range(200):  # bisection in log space; utilization grows with bandwidth
        mid = (lo * hi) ** 0.5
        lo, hi = (mid, hi) if utilization(r, t_step, mid) < target else (lo, mid)
    return hi


def fmt_bytes(b: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if b < 1000:
            return f"{b:.1f} {unit}"
        b /= 1000
    return f"{b:.1f} PB"


def _dp_of(r: dict, results: list) -> dict | None:
    return next((d for d in results if d["per_sync"] is None and d["M"] == r["M"]
                 and d["seed"] == r["seed"] and d["steps"] == r["steps"]), None)


def _rel(a: float, b: float) -> str:
    return f"{100 * (a / b - 1):+.2f}%"


def _order(r: dict) -> tuple:
    return (r["M"], r["seed"], r["steps"], list(METHODS).index(r["method"]), r.get("label", ""))


def print_tables(results: list, t_step: float) -> None:
    label = lambda r: r.get("label") or r["method"]
    results = sorted(results, key=_order)
    print(f"\n| M | seed | method | final eval loss | mean last {LAST} evals | vs DP "
          f"| total bytes / replica | vs DP | peak bytes / sync | wall |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        dp = _dp_of(r, results)
        rel = _rel(r["last_mean"], dp["last_mean"]) if dp else "n/a"
        ratio = ("1×" if r is dp else f"{dp['total'] / r['total']:.0f}× fewer") if dp else "n/a"
        print(f"| {r['M']} | {r['seed']} | {label(r)} | {r['final_eval_loss']:.4f} | "
              f"{r['last_mean']:.4f} | {rel} | {fmt_bytes(r['total'])} | {ratio} | "
              f"{fmt_bytes(r['peak_per_sync'])} | {r['wall_s']:.0f} s |")

    print(f"\nTarget: within 2% of data parallel on the mean of the last {LAST} evals")
    print("| M | steps | method | seed | method loss | DP loss | vs DP | within 2% |")
    print("|---|---|---|---|---|---|---|---|")
    keys = list(dict.fromkeys((r["M"], r["steps"], label(r))
                              for r in sorted(results, key=lambda r: (r["M"], r["steps"]))
                              if r["per_sync"]))
    for M, steps, lab in keys:
        pairs = [(r, _dp_of(r, results)) for r in results
                 if (r["M"], r["steps"], label(r)) == (M, steps, lab)]
        pairs = sorted([(r, d) for r, d in pairs if d], key=lambda p: p[0]["seed"])
        for r, d in pairs:
            gap = r["last_mean"] / d["last_mean"] - 1
            print(f"| {M} | {steps} | {lab} | {r['seed']} | {r['last_mean']:.4f} | "
                  f"{d['last_mean']:.4f} | {100 * gap:+.2f}% | {'yes' if gap <= 0.02 else 'no'} |")
        if len(pairs) > 1:
            a = float(np.mean([r["last_mean"] for r, _ in pairs]))
            b = float(np.mean([d["last_mean"] for _, d in pairs]))
            seeds = ",".join(str(r["seed"]) for r, _ in pairs)
            print(f"| {M} | {steps} | {lab} | mean ({seeds}) | {a:.4f} | {b:.4f} | "
                  f"{100 * (a / b - 1):+.2f}% | {'yes' if a / b - 1 <= 0.02 else 'no'} |")

    gbits = [0.001, 0.01, 0.1, 1.0]
    print(f"\nSimulated compute utilization (t_step = {t_step * 1e3:.1f} ms, one replica's "
          f"trainer step on one host device); data parallel's all-reduce overlaps "
          f"{DP_OVERLAP:.2f} of a step (assumed), DiLoCo's τ steps:")
    print("| M | method | " + " | ".join(f"util @ {g} Gbit/s" for g in gbits)
          + " | Gbit/s for 95% |")
    print("|---|---|" + "---|" * (len(gbits) + 1))
    seen = set()
    for r in results:
        key = (r["M"], label(r), r["H"])
        if key in seen:  # bytes do not depend on the seed
            continue
        seen.add(key)
        r["gbit_for_95"] = gbit_for(r, t_step)
        r["utilization"] = {g: utilization(r, t_step, g) for g in gbits}
        print(f"| {r['M']} | {label(r)} | "
              + " | ".join(f"{100 * r['utilization'][g]:.1f}%" for g in gbits)
              + f" | {r['gbit_for_95']:.4g} |")


def plot(results: list, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    Ms = sorted({r["M"] for r in results})
    fig, axes = plt.subplots(1, len(Ms), figsize=(6.5 * len(Ms), 4.5), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    results = sorted(results, key=_order)
    labels = list(dict.fromkeys(r.get("label") or r["method"] for r in results))
    styles = ["-", "--", ":", "-."]
    for ax, M in zip(axes[0], Ms):
        for r in (r for r in results if r["M"] == M):
            lab = r.get("label") or r["method"]
            t, loss = zip(*r["curve"])
            ax.plot(t, loss, color=colors[labels.index(lab) % len(colors)],
                    linestyle=styles[r["seed"] % len(styles)], label=f"{lab}, seed {r['seed']}",
                    marker="." if r["per_sync"] is None else None)
        ax.set(title=f"M={M} replicas (trainer)", xlabel="inner step",
               ylabel="eval loss (nats/byte)")
        ax.set_ylim(top=min(ax.get_ylim()[1], 3.0))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="256 steps instead of 1024")
    ap.add_argument("--replicas", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--steps", type=int, help="override the number of inner steps")
    ap.add_argument("--H", type=int, help="override sync_every")
    ap.add_argument("--P", type=int, help="override num_fragments of the streaming methods")
    ap.add_argument("--outer-lr", type=float)
    ap.add_argument("--outer-momentum", type=float)
    ap.add_argument("--alpha", type=float, help="mixing of the τ=1 methods")
    ap.add_argument("--methods", nargs="+", choices=list(SHORT), help="subset (default: all)")
    ap.add_argument("--seeds", "--seed", type=int, nargs="+", default=[0],
                    help="train.seed: model init and data order (default 0)")
    ap.add_argument("--set", nargs="+", default=[], metavar="SECTION.KEY=VALUE",
                    help="extra trainer overrides for every run, e.g. train.lr=1e-3")
    ap.add_argument("--label", help="suffix for this run's method names, e.g. 'H=32'")
    ap.add_argument("--render", nargs="+", help="only print tables / plot from these JSONs")
    ap.add_argument("--json", help="write all results here (rewritten after every run)")
    ap.add_argument("--plot", help="write the eval-loss curves (PNG) here")
    ap.add_argument("--islands", action="store_true",
                    help="3 islands (launch.py --islands) with a killed and rejoined island, "
                         "without the fault, and data parallel")
    args = ap.parse_args(argv)
    if args.islands:
        return islands_main(args)
    if args.render:
        runs = [json.load(open(f)) for f in args.render]
        results = [r for d in runs for r in d["results"]]
        t_steps = [d["t_step_s"] for d in runs]
        # other jobs on the machine only inflate a step time: take the smallest measurement
        print(f"t_step measured per file: {', '.join(f'{t * 1e3:.1f}' for t in t_steps)} ms; "
              f"using the smallest")
        print_tables(results, min(t_steps))
        if args.plot:
            plot(results, args.plot)
        return
    s = settings(args.quick)
    for key, val in (("steps", args.steps), ("H", args.H), ("P", args.P),
                     ("outer_lr", args.outer_lr), ("outer_momentum", args.outer_momentum),
                     ("alpha", args.alpha)):
        if val is not None:
            s[key] = val
    methods = [SHORT[k] for k in (args.methods or SHORT)]
    if jax.device_count() < max(args.replicas):
        sys.exit(f"need {max(args.replicas)} devices, have {jax.device_count()}; set XLA_FLAGS")
    print(f"{s['layers']} layers, d={s['embed']}; batch {s['batch']}×{s['seq']} bytes per "
          f"replica; {s['steps']} steps; H={s['H']} P={s['P']} outer lr {s['outer_lr']} "
          f"μ {s['outer_momentum']} α {s['alpha']}; {jax.device_count()} "
          f"{jax.devices()[0].platform} devices, {os.cpu_count()} cores", flush=True)
    t0 = time.perf_counter()
    t_step = replica_step_time(s, args.set)
    print(f"one replica's trainer step: {t_step * 1e3:.1f} ms "
          f"(measured in {time.perf_counter() - t0:.0f} s)", flush=True)

    results, t_start = [], time.perf_counter()
    for M in args.replicas:
        for seed in args.seeds:
            for name in methods:
                r = run_method(name, M, seed, s, args.set)
                if args.label:
                    r["label"] = f"{name} ({args.label})"
                results.append(r)
                if args.json:
                    with open(args.json, "w") as fh:
                        json.dump({"settings": s, "t_step_s": t_step, "overrides": args.set,
                                   "argv": sys.argv[1:], "machine": r["machine"],
                                   "wall_s": time.perf_counter() - t_start,
                                   "results": results}, fh, indent=1)
    print_tables(results, t_step)
    print(f"\ntotal experiment wall time: {time.perf_counter() - t_start:.0f} s", flush=True)
    if args.plot:
        plot(results, args.plot)


# ------------------------------------------------------------------ --islands
ISLANDS = dict(islands=3, layers=2, embed=64, heads=4, kv_heads=2, mlp=192, seq=64, batch=8,
               steps=60, H=6, P=2, tau=1, alpha=0.5, quantize="fp4_e3m0", eval_every=6,
               eval_batches=6, wait_s=20, kill_seed=21)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def island_overrides(s: dict, run_dir: str, islands: str | None) -> list[str]:
    """`python -m jaxpar.train configs/base.yaml` overrides of one island (islands=store) or,
    islands=None, of data parallel with the same tokens per step and eval windows."""
    k = s["islands"]
    common = [f"model.layers={s['layers']}", f"model.embed={s['embed']}",
              f"model.heads={s['heads']}", f"model.kv_heads={s['kv_heads']}",
              f"model.mlp={s['mlp']}", f"train.seq_len={s['seq']}", f"train.steps={s['steps']}",
              "train.lr=1e-2", "train.warmup=2", "train.log_every=1", "train.nonfinite=skip",
              f"eval.every={s['eval_every']}", "eval.sample_bytes=0",
              f"checkpoint.every={s['eval_every']}", f"train.run_dir={run_dir}"]
    if islands is None:
        return common + [f"mesh.data={2 * k}", f"train.batch_size={s['batch'] * k}",
                         f"eval.batches={s['eval_batches'] // k}"]
    return common + [
        "mesh.replica=1", "mesh.data=2", f"train.batch_size={s['batch']}",
        f"eval.batches={s['eval_batches']}", "diloco.enabled=true",
        f"diloco.sync_every={s['H']}", f"diloco.num_fragments={s['P']}",
        f"diloco.overlap_steps={s['tau']}", f"diloco.alpha={s['alpha']}",
        f"diloco.quantize={s['quantize']}",
        f"diloco.islands={{store: {islands}, count: {k}, wait_s: {s['wait_s']}}}"]


def _records(run_dir: str) -> list[dict]:
    try:
        with open(os.path.join(run_dir, "metrics.jsonl")) as fh:
            return [json.loads(x) for x in fh]
    except (OSError, ValueError):
        return []


def _children(pid: int, k: int) -> int | None:
    """launch.py's trainer process of island k (by its $JAXPAR_ISLAND_ID)."""
    import subprocess

    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    for child in map(int, out.split()):
        try:
            with open(f"/proc/{child}/environ", "rb") as fh:
                if f"JAXPAR_ISLAND_ID={k}".encode() in fh.read().split(b"\0"):
                    return child
        except OSError:
            pass
    return None


def _until(cond, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            sys.exit("timed out (see the logs)")
        time.sleep(0.1)


def run_islands(s: dict, work: str, kill_at: int | None) -> dict:
    """3 islands through launch.py --islands; with kill_at, island 2 is SIGKILLed after that
    step and restarted by launch.py (--restarts 1); the survivors are held (SIGSTOP) from their
    first round without it until it has rejoined, so that this short run sees the rejoin."""
    import signal
    import subprocess

    k = s["islands"]
    cmd = [sys.executable, os.path.join(ROOT, "scripts", "launch.py"), "--islands", str(k),
           "-n", "1", "--devices", str(2 * k), "--restarts", "1", "--log-dir",
           f"{work}/logs", "--", sys.executable, "-m", "jaxpar.train",
           os.path.join(ROOT, "configs", "base.yaml"),
           *island_overrides(s, f"{work}/island_{{island}}", f"{work}/store")]
    env = {key: v for key, v in os.environ.items() if key != "XLA_FLAGS"}
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, env=env, start_new_session=True)
    out: dict = {}
    held: list[int] = []
    try:
        if kill_at is not None:
            _until(lambda: any(r.get("step", 0) >= kill_at and "loss" in r
                               for r in _records(f"{work}/island_2")))
            os.kill(_children(proc.pid, 2), signal.SIGKILL)
            t_kill = time.monotonic()
            _until(lambda: any(r.get("members") == [0, 1] for r in _records(f"{work}/island_0")))
            t_hold = time.monotonic()
            held = [_children(proc.pid, j) for j in (0, 1)]
            for pid in held:
                os.killpg(pid, signal.SIGSTOP)
            log = f"{work}/logs/island_2/process_0.log"
            _until(lambda: os.path.exists(log) and "rejoins at round" in open(log).read())
            out.update(downtime_s=time.monotonic() - t_kill, hold_s=time.monotonic() - t_hold)
            for pid in held:
                os.killpg(pid, signal.SIGCONT)
            held = []
        if proc.wait(timeout=900):
            sys.exit(f"launch.py failed (logs in {work}/logs)")
    finally:
        for pid in held:
            os.killpg(pid, signal.SIGCONT)
        if proc.poll() is None:
            for j in range(k):
                child = _children(proc.pid, j)
                if child:
                    os.killpg(child, signal.SIGKILL)
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    out["wall_s"] = time.monotonic() - t0
    recs = [_records(f"{work}/island_{j}") for j in range(k)]
    out["curve"] = [[r["step"], r["eval_loss"]] for r in recs[0] if "eval_loss" in r]
    out["final_eval_loss"] = [[r["eval_loss"] for r in g if "eval_loss" in r][-1] for g in recs]
    rounds = [r for r in recs[0] if "round" in r]
    out["rounds"] = len(rounds)
    out["rounds_without_island_2"] = [r["round"] for r in rounds if 2 not in r["members"]]
    out["max_wait_s"] = max(r["wait_s"] for g in recs[:2] for r in g if "round" in r)
    out["bytes_per_round_island_0"] = int(np.median([r["bytes"] for r in rounds]))
    if kill_at is not None:
        import re

        text = open(f"{work}/logs/island_2/process_0.log").read()
        killed = open(f"{work}/logs/island_2/attempt_0/process_0.log").read()
        m = re.search(r"rejoins at round (\d+), training from step (\d+).*steps (\d+)\.\.(\d+) "
                      r"are skipped", text)
        restored = re.search(r"checkpoints step (\d+)", text)
        last = max(int(x) for x in re.findall(r"^step (\d+): loss", killed, re.M))
        a, b = int(m.group(3)), int(m.group(4))
        out["failure"] = {
            "killed_after_step": last, "restored_checkpoint_step": int(restored.group(1))
            if restored else 0, "rejoined_at_round": int(m.group(1)),
            "rejoined_at_step": int(m.group(2)), "data_steps_skipped": [a, b],
            "rows_skipped": (b - a + 1) * s["batch"],
            "rounds_missed": out["rounds_without_island_2"]}
    return out


def run_data_parallel(s: dict, work: str) -> dict:
    import subprocess

    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={2 * s['islands']}")
    t0 = time.monotonic()
    subprocess.run([sys.executable, "-m", "jaxpar.train", os.path.join(ROOT, "configs",
                                                                        "base.yaml"),
                    *island_overrides(s, f"{work}/dp", None)], env=env, check=True,
                   stdout=subprocess.DEVNULL)
    recs = _records(f"{work}/dp")
    return {"wall_s": time.monotonic() - t0,
            "curve": [[r["step"], r["eval_loss"]] for r in recs if "eval_loss" in r],
            "final_eval_loss": [[r["eval_loss"] for r in recs if "eval_loss" in r][-1]]}


def islands_main(args) -> None:
    """--islands: 3 islands with island 2 killed and rejoined, the same without the fault, and
    data parallel with the same tokens per step; a JSON and a plot of eval loss vs step."""
    import random

    from jaxpar.bench import machine

    s = dict(ISLANDS)
    kill_at = random.Random(s["kill_seed"]).randint(s["steps"] // 6, s["steps"] // 3)
    work = tempfile.mkdtemp(prefix="bench_islands_")
    runs = {}
    try:
        for name, fn in (("3 islands, island 2 killed and rejoined",
                          lambda: run_islands(s, f"{work}/fault", kill_at)),
                         ("3 islands, no fault", lambda: run_islands(s, f"{work}/clean", None)),
                         ("data parallel", lambda: run_data_parallel(s, work))):
            print(f"{name} ...", flush=True)
            runs[name] = fn()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    fault, clean = runs["3 islands, island 2 killed and rejoined"], runs["3 islands, no fault"]
    out = {"settings": s, "kill_at_step": kill_at, "machine": machine(),
           "note": "shared CPU host (other jobs running): wall times are inflated",
           "argv": sys.argv[1:], "runs": runs,
           "final_eval_loss_ratio_fault_vs_no_fault":
               fault["final_eval_loss"][0] / clean["final_eval_loss"][0]}
    for name, r in runs.items():
        print(f"{name}: final eval loss {r['final_eval_loss'][0]:.4f}, wall {r['wall_s']:.0f} s")
    print(json.dumps(fault.get("failure"), indent=1))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(out, fh, indent=1)
        print(f"wrote {args.json}")
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6.5, 4.2))
        for name, r in runs.items():
            t, loss = zip(*r["curve"])
            ax.plot(t, loss, marker=".", label=name)
        ax.axvline(kill_at, color="gray", linestyle=":", label=f"island 2 killed (step {kill_at})")
        ax.set(title="3 Streaming DiLoCo islands through the trainer", xlabel="inner step",
               ylabel="eval loss (nats/byte)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(args.plot, dpi=110)
        print(f"wrote {args.plot}")


if __name__ == "__main__":
    main()
