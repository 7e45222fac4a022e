"""One fresh process of the host-mesh abort proof (tests/test_attention_abort.py).

Runs fwd+bwd of a real loss (`value_and_grad` of a mean: its all-reduce sits beside the
backward's permutes) for causal ring, TokenRing, Ulysses and the 2 × 4 hybrid at each N given,
on 8 host devices, and prints one JSON line per case: the loss and the gradients' sums of
squares, which the test compares across schedules (and with dense at the smallest N).
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

from jaxpar.attention import dense_attention, sequence_parallel_attention  # noqa: E402

B, H, D = 1, 8, 64
CASES = {  # impl -> (mesh sizes, axis)
    "tokenring": ({"seq": 8}, "seq"),
    "ring": ({"seq": 8}, "seq"),
    "ulysses": ({"seq": 8}, "seq"),
    "hybrid": ({"seq": 2, "seq_inner": 4}, ("seq", "seq_inner")),
}


def report(name, n, loss, grads):
    print(json.dumps({"impl": name, "n": n, "loss": float(loss),
                      "grad_sq": [float(jnp.sum(g.astype(jnp.float32) ** 2)) for g in grads]}),
          flush=True)


def main(ns):
    for n in ns:
        keys = jax.random.split(jax.random.key(n), 3)
        q, k, v = (jax.random.normal(kk, (B, n, H, D), jnp.float32) for kk in keys)
        for impl, (sizes, axis) in CASES.items():
            mesh = jaxpar.make_mesh(**sizes)

            def loss(q, k, v, impl=impl, mesh=mesh, axis=axis):
                out = sequence_parallel_attention(q, k, v, mesh=mesh, impl=impl, axis=axis,
                                                  causal=True)
                return jnp.mean(out ** 2)

            value, grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))(q, k, v)
            report(impl, n, value, grads)
        if n == min(ns):
            def dense_loss(q, k, v):
                return jnp.mean(dense_attention(q, k, v, causal=True) ** 2)

            report("dense", n, *jax.jit(jax.value_and_grad(dense_loss, argnums=(0, 1, 2)))(
                q, k, v))


if __name__ == "__main__":
    main([int(a) for a in sys.argv[1:]])
