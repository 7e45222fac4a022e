"""The XLA:CPU collective abort of causal TokenRing on 8 host devices, before and after the fix.

Each variant runs in --runs fresh processes; each process computes fwd+bwd of a loss (the
mean of the squared output) of causal TokenRing at N=2048 (B=1, H=8, D=64) --calls times.
Variants (only `send_home`'s causal path differs, docs/architecture.md):
  in_branch: the halves of a partial are sliced, permuted and concatenated inside each branch
             of the step loop's lax.switch (the code before the fix)
  fixed:     the halves are cut before the switch and joined after it (jaxpar today)
Records every process's exit code (negative: killed by that signal) and writes --json.

    python scripts/cpu_abort_repro.py --runs 10 --json docs/cpu_tokenring_abort.json
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys

N, B, H, D = 2048, 1, 8, 64


def in_branch_send_home(part, s, axis_name, direction=+1, *, causal=False, fill=None):
    """send_home as it was before the fix: slice, permute, concatenate inside each branch."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from jaxpar._spmd import axis_size, shift
    from jaxpar.attention import tokenring
    p = axis_size(axis_name)

    def send(x, j):
        if not causal:
            return shift(x, axis_name, direction * j)
        second = shift(jax.tree.map(lambda y: tokenring._half(y, 1), x), axis_name, direction * j)
        senders = tokenring._first_half_senders(p, j, direction)
        pairs = [(r, (r + direction * j) % p) for r in senders]
        got = np.isin(np.arange(p), [t for _, t in pairs])
        received = jnp.asarray(got)[jax.lax.axis_index(axis_name)]
        fills = jax.tree.map(lambda _: 0.0, x) if fill is None else fill

        def first_half(y, value):
            y = jax.lax.ppermute(tokenring._half(y, 0), axis_name, pairs)
            return y if got.all() else jnp.where(received, y, jnp.asarray(value, y.dtype))

        first = jax.tree.map(first_half, x, fills)
        return jax.tree.map(lambda a, b: jnp.concatenate([a, b], axis=1), first, second)

    if isinstance(s, int):
        return send(part, s)
    return jax.lax.switch(s - 1, [lambda x, j=j: send(x, j) for j in range(1, p - 1)], part)


def worker(variant, calls):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + " --xla_force_host_platform_device_count=8").strip()
    import jaxpar  # noqa: F401  (the DFS-scheduler flag, before jax starts)
    import jax
    import jax.numpy as jnp
    from jaxpar import bench
    from jax.sharding import NamedSharding, PartitionSpec as P
    from jaxpar.attention import attention, tokenring

    if variant == "in_branch":
        tokenring.send_home = in_branch_send_home
    mesh = jax.make_mesh((8,), ("seq",))
    spec = P(None, "seq")  # inputs taken to be in zigzag order already, as the benchmark does
    q, k, v = (jax.device_put(jax.random.normal(kk, (B, N, H, D)), NamedSharding(mesh, spec))
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
    ap.add_argument("--variants", nargs="+", default=["in_branch", "fixed"])
    ap.add_argument("--timeout", type=int, default=300, help="seconds per process")
    ap.add_argument("--json")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args.worker, args.calls)
    result = {"config": dict(N=N, B=B, H=H, D=D, causal=True, impl="tokenring", devices=8,
                             calls_per_process=args.calls), "variants": {}}
    for variant in args.variants:
        codes = []
        for _ in range(args.runs):
            proc = subprocess.Popen([sys.executable, __file__, "--worker", variant,
                                     "--calls", str(args.calls)], stdout=subprocess.PIPE,
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
