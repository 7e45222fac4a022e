"""The XLA:CPU collective aborts of causal TokenRing on host devices, form by form.

Each variant runs in --runs fresh processes; each process computes fwd+bwd of a loss (the
mean of the squared output) of causal TokenRing (B=1, D=64; --devices P, --seq-len N,
--heads H) --calls times. Variants (only the step loop's `tokenring.exchange` and the query
drop differ, docs/architecture.md):
  in_branch:    the partial's halves are cut, permuted and joined *inside* the branch of
                the step loop's lax.switch; queries travel whole (the first abort)
  two_switches: query drop on; the queries' first halves move in a second lax.switch beside
                the one that sends the partial home (the query drop's first version)
  one_switch:   query drop on, every step-dependent permute in one switch (its second
                version, the form jaxpar keeps for GPU/TPU)
  fixed:        jaxpar today on CPU: one switch, whole operands, queries travel whole
Records every process's exit code (negative: killed by that signal) and writes --json.

    python scripts/cpu_abort_repro.py --runs 6 --json docs/cpu_tokenring_abort.json
    python scripts/cpu_abort_repro.py --runs 6 --devices 4 --seq-len 4096 --heads 12 \
        --variants one_switch fixed --json docs/cpu_tokenring_abort_p4.json
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys

B, D = 1, 64


def in_branch_exchange(part, visiting, s, axis_name, direction, *, causal, drop, fill=None,
                       own=None):
    """`exchange` with the partial cut, permuted and joined inside each branch; the queries'
    shift whole, outside the switch."""
    import jax

    from jaxpar._spmd import axis_size, shift
    from jaxpar.attention import tokenring as t
    p = axis_size(axis_name)

    def branch(part, j):
        halves = t._home_halves(t.split_rows(part, True), j - 1, axis_name, -direction, fill)
        return t.join_rows(halves, True)

    home = jax.lax.switch(s - 2, [lambda y, j=j: branch(y, j) for j in range(2, p)], part)
    return home, shift(visiting, axis_name, direction)


def two_switches_exchange(part, visiting, s, axis_name, direction, *, causal, drop,
                          fill=None, own=None):
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


# variant -> (exchange replacement or None, query drop)
VARIANTS = {"in_branch": (in_branch_exchange, False),
            "two_switches": (two_switches_exchange, True),
            "one_switch": (None, True), "fixed": (None, False)}


def worker(variant, calls, devices, n, heads):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + " --xla_force_host_platform_device_count=8").strip()
    import jaxpar  # noqa: F401  (the DFS-scheduler flag, before jax starts)
    import jax
    import jax.numpy as jnp
    from jaxpar import bench
    from jax.sharding import NamedSharding, PartitionSpec as P
    from jaxpar.attention import attention, tokenring

    exchange, drop = VARIANTS[variant]
    if exchange is not None:
        tokenring.exchange = exchange
    tokenring.QUERY_DROP["cpu"] = drop
    mesh = jax.make_mesh((devices,), ("seq",), devices=jax.devices()[:devices])
    spec = P(None, "seq")  # inputs taken to be in zigzag order already, as the benchmark does
    q, k, v = (jax.device_put(jax.random.normal(kk, (B, n, heads, D)),
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
    ap.add_argument("--devices", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--timeout", type=int, default=300, help="seconds per process")
    ap.add_argument("--json")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args.worker, args.calls, args.devices, args.seq_len, args.heads)
    result = {"config": dict(N=args.seq_len, B=B, H=args.heads, D=D, causal=True,
                             impl="tokenring", devices=args.devices,
                             calls_per_process=args.calls), "variants": {}}
    for variant in args.variants:
        codes = []
        for _ in range(args.runs):
            proc = subprocess.Popen([sys.executable, __file__, "--worker", variant,
                                     "--calls", str(args.calls), "--heads", str(args.heads),
                                     "--devices", str(args.devices),
                                     "--seq-len", str(args.seq_len)],
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
