"""One fresh process of the host-mesh abort proof (tests/test_attention_abort.py).

Runs fwd+bwd of a real loss (`value_and_grad` of a sum: its all-reduce sits beside the
backward's permutes) for causal ring, TokenRing, Ulysses and the 2 × 4 hybrid at each N given,
on 8 host devices, and prints one JSON line per case: the loss and the gradients' sums of
squares, which the test compares across schedules (and with dense at the smallest N).
Each case runs CALLS times (the abort was intermittent).
usage: attention_abort_worker.py N [N ...]
"""
import json
import os
import sys

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jaxpar  # noqa: E402  (sets XLA:CPU's DFS-scheduler flag before jax starts)
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

from jaxpar.attention import attention, dense_attention, layout  # noqa: E402

B, H, D = 1, 16, 64  # H=16: the second-switch abort needs larger buffers than H=8 (H=8 passed)
CALLS = 5  # per case and process
CASES = {  # impl -> (mesh sizes, axis, zigzag over)
    "tokenring": ({"seq": 8}, "seq", 8),
    "ring": ({"seq": 8}, "seq", 8),
    "ulysses": ({"seq": 8}, "seq", 8),
    "hybrid": ({"seq": 2, "seq_inner": 4}, ("seq", "seq_inner"), 2),
}


def report(name, n, loss, grads):
    print(json.dumps({"impl": name, "n": n, "loss": float(loss),
                      "grad_sq": [float(jnp.sum(g.astype(jnp.float32) ** 2)) for g in grads]}),
          flush=True)


def main(ns):
    for n in ns:
        keys = jax.random.split(jax.random.key(n), 3)
        qkv = [jax.random.normal(kk, (B, n, H, D), jnp.float32) for kk in keys]
        for impl, (sizes, axis, zig) in CASES.items():
            # The per-device functions inside the caller's shard_map, on inputs the data path
            # laid out in zigzag order (the form that aborted; the global entry point adds its
            # own reorders to the program). A sum and the sum of squared gradients do not
            # depend on the token order, so every row is comparable with dense.
            mesh = jaxpar.make_mesh(**sizes)
            spec = P(None, axis)
            args = [jax.device_put(layout.to_zigzag(x, zig), NamedSharding(mesh, spec))
                    for x in qkv]
            attn = jax.shard_map(
                lambda q, k, v, impl=impl, axis=axis: attention(q, k, v, impl=impl, axis=axis,
                                                                causal=True),
                mesh=mesh, in_specs=(spec,) * 3, out_specs=spec)

            def loss(q, k, v, attn=attn):
                # the sum, as the benchmarks: its cotangent does not wait for the forward, so
                # the backward's permutes can run beside the forward's (docs/architecture.md)
                return jnp.sum(attn(q, k, v))

            step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))
            for _ in range(CALLS - 1):  # the abort was intermittent: a few calls per process
                jax.block_until_ready(step(*args))
            report(impl, n, *step(*args))
        if n == min(ns):
            def dense_loss(q, k, v):
                return jnp.sum(dense_attention(q, k, v, causal=True))

            report("dense", n, *jax.jit(jax.value_and_grad(dense_loss, argnums=(0, 1, 2)))(
                *qkv))


if __name__ == "__main__":
    main([int(a) for a in sys.argv[1:]])
