"""The xla block kernel against an earlier version of itself, one device, same process.

    python scripts/bench_kernel.py --baseline a9d87e0 --json docs/kernels_cpu_calls.json

Loads `jaxpar/attention/blockwise.py` as it was at the `--baseline` commit (git show) next
to the current one and times `block_fwd` and `block_bwd` of both on the shapes the
schedules call at the peer configuration (N=8192, H=8, D=64, 8 devices: ring pairs of
512-token chunks, Ulysses' one 8192-token head), plus GQA. The process is pinned to one
core (8 host devices share 2 cores in the schedules' runs; one device's kernel runs on
one). Process CPU time, min over repeats after a warm-up; fp32; outputs of both versions
are compared.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import pathlib
import subprocess
import sys
import tempfile

os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})

import jax  # noqa: E402
import numpy as np  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from bench_attention_auto import timed_min  # noqa: E402
from jaxpar import bench  # noqa: E402
from jaxpar.attention import blockwise  # noqa: E402

# name, L, H, K, D, causal
CASES = [("ring step, 512 × 512 chunks", 512, 8, 8, 64, False),
         ("ring diagonal, 512 causal", 512, 8, 8, 64, True),
         ("Ulysses head, 8192 causal", 8192, 1, 1, 64, True),
         ("GQA K=2", 1024, 8, 2, 64, False),
         ("MHA", 1024, 8, 8, 64, False)]


def load_at(commit: str):
    """blockwise.py as of `commit`, imported as a separate module."""
    src = subprocess.run(["git", "show", f"{commit}:jaxpar/attention/blockwise.py"], cwd=ROOT,
                         check=True, capture_output=True, text=True).stdout
    path = pathlib.Path(tempfile.mkdtemp()) / f"blockwise_{commit}.py"
    path.write_text(src)
    spec = importlib.util.spec_from_file_location(f"blockwise_{commit}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def cpu_ms(fn, args, repeats):
    return 1e3 * timed_min(fn, args, repeats)[1]


def measure(mod, case, repeats):
    _, length, h, kh, d, causal = case
    keys = jax.random.split(jax.random.key(0), 4)
    q, dout = (jax.random.normal(keys[i], (1, length, h, d)) for i in (0, 3))
    k, v = (jax.random.normal(keys[i], (1, length, kh, d)) for i in (1, 2))
    fwd = jax.jit(lambda q, k, v: mod.block_fwd(q, k, v, None, None, causal=causal))
    out, lse = fwd(q, k, v)
    dlt = mod.delta(out, dout)
    bwd = jax.jit(lambda *a: mod.block_bwd(*a[:3], None, None, *a[3:], causal=causal))
    args = (q, k, v, lse, dout, dlt)
    return ({"fwd_ms": cpu_ms(fwd, (q, k, v), repeats), "bwd_ms": cpu_ms(bwd, args, repeats)},
            [np.asarray(x) for x in (out, lse, *bwd(*args))])


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--baseline", required=True, help="git commit of the baseline kernel")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json", help="write the rows (and the machine) here")
    args = ap.parse_args()
    base = load_at(args.baseline)
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, check=True,
                          capture_output=True, text=True).stdout.strip()
    rows = []
    print("| case | L | H | K | causal | baseline fwd+bwd ms | now fwd+bwd ms | now/baseline |")
    print("|---|---|---|---|---|---|---|---|")
    for case in CASES:
        t_base, ref = measure(base, case, args.repeats)
        t_now, got = measure(blockwise, case, args.repeats)
        err = max(float(np.max(np.abs(a - b))) for a, b in zip(ref[:1] + ref[2:],
                                                                 got[:1] + got[2:]))
        name, length, h, kh, d, causal = case
        row = dict(case=name, L=length, H=h, K=kh, D=d, causal=causal, baseline=t_base,
                   now=t_now, max_abs_diff=err,
                   ratio=(t_now["fwd_ms"] + t_now["bwd_ms"]) /
                         (t_base["fwd_ms"] + t_base["bwd_ms"]))
        rows.append(row)
        print(f"| {name} | {length} | {h} | {kh} | {causal} | "
              f"{t_base['fwd_ms'] + t_base['bwd_ms']:.1f} | "
              f"{t_now['fwd_ms'] + t_now['bwd_ms']:.1f} | {row['ratio']:.2f} |", flush=True)
        assert err < 1e-3, f"{name}: the two kernels differ by {err}"
    payload = {"machine": bench.machine(), "pinned": "one core (sched_setaffinity)",
               "baseline": args.baseline, "now": head, "dtype": "float32", "B": 1,
               "timing": f"process CPU time, min of {args.repeats} after a warm-up",
               "rows": rows}
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(payload, indent=1) + "\n")
        print("wrote", args.json)


if __name__ == "__main__":
    main()
