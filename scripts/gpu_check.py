"""Check and time the block-pair attention kernels on one GPU (under 5 minutes).

    python scripts/gpu_check.py                    # on a GPU: writes docs/kernel_check_<card>.md
    python scripts/gpu_check.py --interpret --tiny # CPU smoke test (Pallas interpret mode)

1. Correctness against an fp32 dense reference (bf16 inputs; relative L2 error of out, dq,
   dk, dv; limit 2e-2): kernel="auto" over a whole sequence (causal GQA with segment ids,
   and non-causal MHA), and a ring of 2 zigzag shards emulated on the one device through
   `kernels.pair_fwd/pair_bwd` (every shard pair, partials merged, each pair's backward
   from the global out/lse) — the same kernel calls the ring schedule makes.
2. Throughput at P=1 (B=1, H=16, D=128, bf16, N = 8K, 16K, 32K, causal and not):
   kernel="auto" vs cuDNN (`jax.nn.dot_product_attention(implementation="cudnn")`), and the
   pure-JAX kernel="xla" at 8K. TFLOP/s with FLOPs = 4·N²·H·D (half when causal), fwd+bwd
   = 3.5× fwd, median of timed repeats after a warm-up.

Exit status 0 when every correctness check passes.
"""
from __future__ import annotations

import argparse
import datetime
import json
import pathlib
import re
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxpar.attention import blockwise, dense_attention, kernels, layout

ROOT = pathlib.Path(__file__).resolve().parents[1]
TOLERANCE = 2e-2  # bf16 inputs; the measured Pallas ring-of-2 error was 0.2-0.3%


def rel(a, b):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def make(n, h, kv, d, dtype, segments, seed=0):
    ks = jax.random.split(jax.random.key(seed), 5)
    q = jax.random.normal(ks[0], (1, n, h, d), dtype)
    k = jax.random.normal(ks[1], (1, n, kv, d), dtype)
    v = jax.random.normal(ks[2], (1, n, kv, d), dtype)
    seg = jnp.sort(jax.random.randint(ks[3], (1, n), 0, 4), axis=1) if segments else None
    w = jax.random.normal(ks[4], (1, n, h, d), jnp.float32)
    return q, k, v, seg, w


def reference(q, k, v, seg, w, causal):
    """fp32 dense out and gradients of sum(out · w)."""
    f32 = [x.astype(jnp.float32) for x in (q, k, v)]

    def loss(q, k, v):
        out = dense_attention(q, k, v, causal=causal, segment_ids_BN=seg)
        return jnp.sum(out * w), out

    (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(*f32)
    return (out, *grads)


def local_run(kernel, q, k, v, seg, w, causal):
    def loss(q, k, v):
        out, _ = kernels.local_attention(q, k, v, segment_ids=seg, causal=causal,
                                         kernel=kernel)
        return jnp.sum(out * w), out

    (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(
        q, k, v)
    return (out, *grads)


def ring_emulated(kernel, q, k, v, seg, w, causal, p=2):
    """A ring of p zigzag shards on one device: out and the gradients of sum(out · w)."""
    kern = kernels.resolve(kernel)

    def run(q, k, v, seg, w):
        zz = (lambda x: layout.to_zigzag(x, p)) if causal else (lambda x: x)  # noqa: E731
        split = lambda x: None if x is None else jnp.split(zz(x), p, axis=1)  # noqa: E731
        qs, ks, vs, segs, ws = split(q), split(k), split(v), split(seg), split(w)
        sg = (lambda i: None) if seg is None else (lambda i: segs[i])  # noqa: E731
        outs, lses = [], []
        for i in range(p):
            out, lse = None, None
            for j in range(p):
                o, l = kernels.pair_fwd(kern, qs[i], ks[j], vs[j], sg(i), sg(j), i, j,
                                        causal=causal, diagonal=i == j)
                out, lse = (o, l) if out is None else blockwise.merge(out, lse, o, l)
            outs.append(out.astype(q.dtype))
            lses.append(lse)
        dq = [jnp.zeros(x.shape, jnp.float32) for x in qs]
        dk = [jnp.zeros(x.shape, jnp.float32) for x in ks]
        dv = [jnp.zeros(x.shape, jnp.float32) for x in vs]
        for i in range(p):
            dout = ws[i].astype(q.dtype)
            dlt = blockwise.delta(outs[i], dout)
            for j in range(p):
                gq, gk, gv = kernels.pair_bwd(kern, qs[i], ks[j], vs[j], sg(i), sg(j), i, j,
                                              lses[i], dout, dlt, causal=causal,
                                              diagonal=i == j)
                dq[i], dk[j], dv[j] = dq[i] + gq, dk[j] + gk, dv[j] + gv
        back = (lambda x: layout.from_zigzag(x, p)) if causal else (lambda x: x)  # noqa: E731
        cat = lambda xs: back(jnp.concatenate(xs, axis=1))  # noqa: E731
        return cat(outs), cat(dq), cat(dk), cat(dv)

    return jax.jit(run)(q, k, v, seg, w)


def timed(fn, args, repeats):
    jax.block_until_ready(fn(*args))  # compile + warm-up
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def throughput(impl, n, h, d, causal, dtype, repeats):
    """(fwd TFLOP/s, fwd+bwd TFLOP/s) of one implementation at P=1, or None if it fails."""
    q, k, v, _, w = make(n, h, h, d, dtype, False, seed=1)
    if impl == "cudnn":
        def attn(q, k, v):
            return jax.nn.dot_product_attention(q, k, v, is_causal=causal,
                                                implementation="cudnn")
    else:
        def attn(q, k, v):
            return kernels.local_attention(q, k, v, causal=causal, kernel=impl)[0].astype(
                q.dtype)

    fwd = jax.jit(attn)
    fwd_bwd = jax.jit(jax.grad(lambda q, k, v: jnp.sum(attn(q, k, v).astype(jnp.float32) * w),
                               argnums=(0, 1, 2)))
    flops = 4 * n * n * h * d * (0.5 if causal else 1.0)
    try:
        t_f = timed(fwd, (q, k, v), repeats)
        t_fb = timed(fwd_bwd, (q, k, v), repeats)
    except Exception as e:  # noqa: BLE001 (report, keep going)
        return None, f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
    return (flops / t_f / 1e12, 3.5 * flops / t_fb / 1e12), None


def main(argv=None) -> bool:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--interpret", action="store_true",
                    help="Pallas interpret mode (CPU): correctness only, slowly")
    ap.add_argument("--tiny", action="store_true", help="toy sizes (smoke test)")
    ap.add_argument("--out", help="markdown file (default docs/kernel_check_<card>.md)")
    ap.add_argument("--budget", type=float, default=270.0,
                    help="seconds; throughput rows past it are skipped")
    args = ap.parse_args(argv)
    start = time.perf_counter()
    card = jax.devices()[0].device_kind
    if args.interpret:
        pallas = kernels.PallasGpuKernel(interpret=True, block_q=32, block_k=16,
                                         block_q_bwd=16, block_k_bwd=32)
        auto = pallas
    else:
        pallas = kernels.PallasGpuKernel()
        auto = kernels.resolve("auto")
    if args.tiny:
        n_chk, h, kv, d, dtype, sizes, repeats = 128, 4, 2, 16, jnp.float32, [128], 1
    else:
        n_chk, h, kv, d, dtype, sizes, repeats = 4096, 16, 4, 128, jnp.bfloat16, \
            [8192, 16384, 32768], 5

    lines = [f"# Attention kernel check: {card}", "",
             f"`scripts/gpu_check.py{' --interpret' if args.interpret else ''}"
             f"{' --tiny' if args.tiny else ''}`, jax {jax.__version__}, "
             f"{datetime.date.today().isoformat()}. kernel=\"auto\" resolved to "
             f"`{type(auto).__name__}`.", "",
             f"## Correctness (B=1, N={n_chk}, H={h}, {jnp.dtype(dtype).name}; relative L2 "
             f"error against an fp32 dense reference; limit {TOLERANCE})", "",
             "| case | out | dq | dk | dv | ok |", "|---|---|---|---|---|---|"]
    ok_all = True
    record = {"card": card, "jax": jax.__version__, "correctness": [], "throughput": []}
    cases = [
        ("local, causal, GQA, segments", "local", True, kv, True),
        ("local, non-causal, MHA", "local", False, h, False),
        ("ring of 2 (emulated), causal, GQA, segments", "ring", True, kv, True),
        ("ring of 2 (emulated), non-causal, GQA", "ring", False, kv, False),
    ]
    for name, how, causal, kvh, segs in cases:
        q, k, v, seg, w = make(n_chk, h, kvh, d, dtype, segs)
        want = reference(q, k, v, seg, w, causal)
        try:
            run = local_run if how == "local" else ring_emulated
            got = run(auto, q, k, v, seg, w, causal)
            errs = [rel(a, b) for a, b in zip(got, want)]
            ok = all(e < TOLERANCE for e in errs)
            row = " | ".join(f"{e:.2e}" for e in errs)
        except Exception as e:  # noqa: BLE001
            ok, row = False, f"{type(e).__name__}: {str(e).splitlines()[0][:120]} | | |"
        ok_all &= ok
        record["correctness"].append({"case": name, "ok": ok, "rel_errors": row})
        lines.append(f"| {name} | {row} | {'yes' if ok else '**NO**'} |")
        print(lines[-1], flush=True)

    th, td = (2, 16) if args.tiny else (16, 128)
    lines += ["", f"## Throughput, P=1 (B=1, H={th}, D={td}, {jnp.dtype(dtype).name}; "
              f"TFLOP/s fwd / fwd+bwd; FLOPs = 4·N²·H·D, half when causal, fwd+bwd = 3.5× fwd)",
              "", f"| N | causal | auto ({type(auto).__name__}) | xla | cuDNN "
              f"| auto / cuDNN, fwd+bwd (target ≥ 70%) |", "|---|---|---|---|---|---|"]
    notes = []
    for n in sizes:
        for causal in (False, True):
            if time.perf_counter() - start > args.budget:
                notes.append(f"N={n} causal={causal}: skipped (time budget)")
                continue
            cells, got = [], {}
            for impl in (auto, "xla", "cudnn"):
                name = impl if isinstance(impl, str) else "auto"
                if impl == "xla" and n > sizes[0]:
                    cells.append("–")
                    continue
                if impl == "cudnn" and args.interpret:
                    cells.append("– (no GPU)")
                    continue
                res, err = throughput(impl, n, th, td, causal, dtype, repeats)
                if err:
                    notes.append(f"N={n} causal={causal} {impl}: {err}")
                got[name] = None if res is None else {"fwd_tflops": res[0],
                                                      "fwd_bwd_tflops": res[1]}
                cells.append("failed" if res is None else f"{res[0]:.3g} / {res[1]:.3g}")
            share = None
            if got.get("auto") and got.get("cudnn"):
                share = got["auto"]["fwd_bwd_tflops"] / got["cudnn"]["fwd_bwd_tflops"]
            missed = "" if share is None or share >= 0.7 else " (missed)"
            cells.append("–" if share is None else f"{share:.0%}{missed}")
            record["throughput"].append({"N": n, "causal": causal, **got,
                                         "auto_over_cudnn": share})
            lines.append(f"| {n} | {'yes' if causal else 'no'} | " + " | ".join(cells) + " |")
            print(lines[-1], flush=True)
    if notes:
        lines += ["", "Notes:", ""] + [f"- {x}" for x in notes]
    lines += ["", f"All correctness checks passed: {'yes' if ok_all else 'NO'}. "
              f"Wall time {time.perf_counter() - start:.0f} s.", ""]
    slug = re.sub(r"[^a-z0-9]+", "_", card.lower()).strip("_")
    out = pathlib.Path(args.out) if args.out else ROOT / "docs" / f"kernel_check_{slug}.md"
    out.write_text("\n".join(lines))
    record["all_correct"] = ok_all
    out.with_suffix(".json").write_text(json.dumps(record, indent=1) + "\n")  # the numbers
    print(f"wrote {out} and {out.with_suffix('.json')}", flush=True)
    return ok_all


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
