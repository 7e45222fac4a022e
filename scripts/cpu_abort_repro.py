"""The XLA:CPU collective abort of causal TokenRing on host devices, with and without the fix.

Each variant runs in --runs fresh processes; each process computes fwd+bwd of a loss (the
sum of the output, as the benchmarks) of causal TokenRing (B=1, D=64; --devices P,
--seq-len N, --heads H, --kv-heads K) --calls times. Variants (docs/architecture.md):
  jax_channels:    JAX's own ppermute lowering: every permute carries channel id 1, so on
                   XLA:CPU every permute shares one rendezvous key
  unique_channels: jaxpar's CPU lowering (jaxpar/_xla_cpu.py): a channel id per permute
Records every process's exit code (negative: killed by that signal) and writes --json.

    python scripts/cpu_abort_repro.py --runs 5 --devices 4 --seq-len 4096 --heads 12 \\
        --json docs/cpu_tokenring_abort_p4.json
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys

B, D = 1, 64
VARIANTS = {"jax_channels": False, "unique_channels": True}


def worker(variant, calls, devices, n, heads, kv_heads):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + " --xla_force_host_platform_device_count=8").strip()
    import jaxpar
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec as P

    from jaxpar import bench
    from jaxpar.attention import attention

    jaxpar._xla_cpu.unique_permute_channels(VARIANTS[variant])
    mesh = jax.make_mesh((devices,), ("seq",), devices=jax.devices()[:devices])
    spec = P(None, "seq")  # inputs taken to be in zigzag order already, as the benchmark does
    keys = jax.random.split(jax.random.key(0), 3)
    q, k, v = (jax.device_put(jax.random.normal(kk, (B, n, h, D)), NamedSharding(mesh, spec))
               for kk, h in zip(keys, (heads, kv_heads, kv_heads)))
    attn = jax.shard_map(lambda q, k, v: attention(q, k, v, impl="tokenring", axis="seq",
                                                   causal=True),
                         mesh=mesh, in_specs=(spec,) * 3, out_specs=spec)

    def loss(q, k, v):  # as the benchmarks: the backward's cotangent does not wait for it
        return jnp.sum(attn(q, k, v))

    step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))
    for _ in range(calls):
        jax.block_until_ready(step(q, k, v))
    print(json.dumps({"machine": bench.machine(), "jaxlib": jax.lib.__version__}))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5, help="fresh processes per variant")
    ap.add_argument("--calls", type=int, default=5, help="fwd+bwd calls per process")
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--devices", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--kv-heads", type=int)
    ap.add_argument("--timeout", type=int, default=300, help="seconds per process")
    ap.add_argument("--json")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    kv_heads = args.kv_heads or args.heads
    shape = [str(args.calls), str(args.devices), str(args.seq_len), str(args.heads),
             str(kv_heads)]
    if args.worker:
        return worker(args.worker, *map(int, shape))
    result = {"config": dict(N=args.seq_len, B=B, H=args.heads, K=kv_heads, D=D, causal=True,
                             impl="tokenring", devices=args.devices,
                             calls_per_process=args.calls), "variants": {}}
    for variant in args.variants:
        codes = []
        for _ in range(args.runs):
            proc = subprocess.Popen([sys.executable, __file__, "--worker", variant,
                                     "--calls", shape[0], "--devices", shape[1],
                                     "--seq-len", shape[2], "--heads", shape[3],
                                     "--kv-heads", shape[4]],
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                    start_new_session=True)
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
