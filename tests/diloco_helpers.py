"""Shared by the DiLoCo tests: a tiny 4-layer tanh MLP, deterministic data, a run loop."""
import jax
import jax.numpy as jnp
import numpy as np

from jaxpar.diloco import replica_grads

M = 2


def tiny_params(key=0, width=8, layers=4):
    ks = jax.random.split(jax.random.key(key), layers + 1)
    p = {f"layers_{i}": {"w": jax.random.normal(ks[i], (width, width)) / np.sqrt(width),
                         "b": jnp.zeros((width,))} for i in range(layers)}
    p["head"] = jax.random.normal(ks[-1], (width, 1)) / np.sqrt(width)
    return p


def loss_fn(params, batch):
    x, y = batch
    h = x
    for i in range(4):
        h = jnp.tanh(h @ params[f"layers_{i}"]["w"] + params[f"layers_{i}"]["b"])
    return jnp.mean((h @ params["head"] - y) ** 2)


def batch_for(step, replica, n=16, width=8):
    """Deterministic by (step, replica); the target is a fixed nonlinear function of x."""
    rng = np.random.default_rng(1000 * step + replica)
    x = rng.normal(size=(n, width)).astype(np.float32)
    y = np.sin(x[:, :1] * 2.0) + 0.5 * x[:, 1:2]
    return x, y.astype(np.float32)


def batches_M(step, m=M):
    xs, ys = zip(*(batch_for(step, r) for r in range(m)))
    return jnp.stack(xs), jnp.stack(ys)


def run_streaming(sd, params, steps, mesh=None, m=M):
    grad = replica_grads(loss_fn, mesh=mesh)

    @jax.jit
    def step(state, batch):
        _, g = grad(state.params, batch)
        return sd.update(g, state)

    state = sd.init(params)
    for t in range(1, steps + 1):
        state = step(state, batches_M(t, m))
    return state
