"""Tour: causal GQA attention on 8 simulated devices, three impls, checked against dense."""
import json
import os
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
import jax, jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P
import jaxpar
import jaxpar.bench
from jaxpar import comm
from jaxpar.attention import attention, dense_attention, layout

mesh = jaxpar.make_mesh(seq=8)
kq, kk, kv = jax.random.split(jax.random.key(0), 3)
q = jax.random.normal(kq, (1, 4096, 8, 64))       # q[B, N, H, D]
k = jax.random.normal(kk, (1, 4096, 2, 64))       # k, v[B, N, K, D]: GQA with K=2
v = jax.random.normal(kv, (1, 4096, 2, 64))
ref = dense_attention(q, k, v, causal=True)

# Causal: the data path puts tokens in zigzag order once; then shard the sequence on "seq".
spec = P(None, "seq")
q_z, k_z, v_z = (jax.device_put(layout.to_zigzag(x, 8), NamedSharding(mesh, spec)) for x in (q, k, v))
rows = {}
for impl in ["ulysses", "ring", "tokenring"]:
    f = jax.jit(jax.shard_map(lambda q, k, v: attention(q, k, v, impl=impl, axis="seq", causal=True),
                              mesh=mesh, in_specs=(spec,) * 3, out_specs=spec))
    err = jnp.abs(layout.from_zigzag(f(q_z, k_z, v_z), 8) - ref).max()
    sent = comm.total_bytes(f, q_z, k_z, v_z)
    print(f"{impl:9s} max|out - dense| = {err:.1e}   forward bytes sent per device = {sent / 2**20:.2f} MiB")
    rows[impl] = {"max_abs_err": float(err), "forward_mib_sent_per_device": sent / 2**20}
with open(os.path.join(os.path.dirname(__file__), "..", "docs", "attention_tour.json"), "w") as f:
    json.dump({"machine": jaxpar.bench.machine(), "rows": rows}, f, indent=1)
