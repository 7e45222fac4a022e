"""The XLA:CPU collective abort of causal TokenRing on 8 host devices, before and after the fix.

Each variant runs in --runs fresh processes; each process computes fwd+bwd of a loss (the
mean of the squared output) of causal TokenRing at N=2048 (B=1, D=64, --heads H) --calls
times. Variants (only the step loop's `tokenring.exchange` differs, docs/architecture.md):
  in_branch:    the partial's halves are cut, permuted and joined *inside* the branch of the
                step loop's lax.switch (the form of the first abort)
  two_switches: the halves are whole operands, but the queries' first halves move in a
                second lax.switch beside the one that sends the partial home (the form of
                the second abort, the first version of the causal query drop)
  fixed:        one switch per step, whole operands (jaxpar today)
Records every process's exit code (negative: killed by that signal) and writes --json.

    python scripts/cpu_abort_repro.py --runs 6 --heads 16 --json docs/cpu_tokenring_abort.json
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys

N, B, D = 2048, 1, 64


def in_branch_exchange(part, visiting, s, axis_name, direction, *, causal, fill=None,
                       own=None):
    """`exchange` with the partial cut, permuted and joined inside each branch."""
    import jax

    from jaxpar._spmd import axis_size, shift
    from jaxpar.attention import tokenring as t
    p = axis_size(axis_name)
    first, second = visiting

    def branch(x, j):
        part, first_own = x
        halves = t._home_halves(t.split_rows(part, True), j - 1, axis_name, -direction, fill)
        return t.join_rows(halves, True), t._first_halves(first_own, j, axis_name, direction)

    home, firsts = jax.lax.switch(s - 2, [lambda y, j=j: branch(y, j) for j in range(2, p)],
                                  (part, (first, own)))
    return home, (t._pick_first(firsts, axis_name), shift(second, axis_name, direction))


def two_switches_exchange(part, visiting, s, axis_name, direction, *, causal, fill=None,
                          own=None):
    """`exchange` with the partial home in one switch, the queries' first halves in another."""
    import jax

    from jaxpar._spmd import axis_size, shift
    from jaxpar.attention import tokenring as t
    p = axis_size(axis_name)
    first, second = visiting
    home = jax.lax.switch(s - 2, [lambda y, j=j: t._home_halves(y, j - 1, axis_name,
                                                               -direction, fill)
                                  for j in range(2, p)], t.split_rows(part, True))
    firsts = jax.lax.switch(s - 2, [lambda y, j=j: t._first_halves(y, j, axis_name, direction)
                                    for j in range(2, p)], (first, own))
    return (t.join_rows(home, True),
            (t._pick_first(firsts, axis_name), shift(second, axis_name, direction)))


VARIANTS = {"in_branch": in_branch_exchange, "two_switches": two_switches_exchange,
            "fixed": None}


def worker(variant, calls, heads):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + " --xla_force_host_platform_device_count=8").strip()
    import jaxpar  # noqa: F401  (the DFS-scheduler flag, before jax starts)
    import jax
    import jax.numpy as jnp
    from jaxpar import bench
    from jax.sharding import NamedSharding, PartitionSpec as P
    from jaxpar.attention import attention, tokenring

    if VARIANTS[variant] is not None:
        tokenring.exchange = VARIANTS[variant]
    mesh = jax.make_mesh((8,), ("seq",))
    spec = P(None, "seq")  # inputs taken to be in zigzag order already, as the benchmark does
    q, k, v = (jax.device_put(jax.random.normal(kk, (B, N, heads, D)),
                              NamedSharding(mesh, spec))
               for kk in jax.random.split(jax.random.key(0), 3))
    attn = jax.shard_map(lambda q, k, v: attention(q, k, v, impl="tokenring", axis="seq",
                                                   causal=True),
                         mesh=mesh, in_specs=(spec,) * 3, out_specs=spec)

    def loss(q, k, v):
        return jnp.mean(attn(q, k, v) ** 2)

    step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))
    for _ in range(calls):
        jax.block_until_ready(step(q, k, v))
    print(json.dumps({"machine": bench.machine(), "jaxlib": jax.lib.__version__}))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=10, help="fresh processes per variant")
    ap.add_argument("--calls", type=int, default=5, help="fwd+bwd calls per process")
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--timeout", type=int, default=300, help="seconds per process")
    ap.add_argument("--json")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args.worker, args.calls, args.heads)
    result = {"config": dict(N=N, B=B, H=args.heads, D=D, causal=True, impl="tokenring",
                             devices=8,
                             calls_per_process=args.calls), "variants": {}}
    for variant in args.variants:
        codes = []
        for _ in range(args.runs):
            proc = subprocess.Popen([sys.executable, __file__, "--worker", variant,
                                     "--calls", str(args.calls), "--heads", str(args.heads)],
                                    stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True, start_new_session=True)
            try:
                out, err = proc.communicate(timeout=args.timeout)
                codes.append(proc.returncode)
            except subprocess.TimeoutExpired:
                codes.append("timeout")
            finally:
                if proc.poll() is None:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
            if proc.returncode == 0 and "machine" not in result:
                result.update(json.loads(out.strip().splitlines()[-1]))
        ok = sum(c == 0 for c in codes)
        result["variants"][variant] = {"exit_codes": codes, "passed": ok, "runs": len(codes)}
        print(f"{variant}: {ok} of {len(codes)} processes passed; exit codes {codes}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
            f.write("\n")


if __name__ == "__main__":
    main()
