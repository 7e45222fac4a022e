"""Shared references for the trainer tests: a plain optax loop and the library's own
Streaming DiLoCo, both without a mesh, on an unsharded loss, fed the same packed batches as
the sharded run; and the checks that compare a sharded run with them (losses, every step's
grad norm, the first step's gradients, the final params)."""
import jax
import numpy as np
import optax

from jaxpar.data import pack
from jaxpar.diloco import replica_grads, streaming_diloco
from jaxpar.testing import assert_steps_close
from jaxpar.train.loop import inner_optimizer


def host(tree):
    return jax.tree.map(lambda x: np.asarray(jax.device_get(x)), tree)


def reference_steps(cfg, run, loss_fn, params0, steps) -> dict:
    """The plain optax loop on one device: per-step `loss` and `grad_norm` lists, the first
    step's `grads` and the final `params`."""
    tx, _ = inner_optimizer(cfg)

    @jax.jit
    def step(params, opt, b):
        loss, g = jax.value_and_grad(loss_fn)(params, b)
        u, opt = tx.update(g, opt, params)
        return optax.apply_updates(params, u), opt, loss, g

    params, opt = params0, jax.jit(tx.init)(params0)
    out = {"loss": [], "grad_norm": []}
    for t in range(1, steps + 1):
        b = pack(run.data.batch(t, cfg.train.batch_size), zigzag=1)
        params, opt, loss, g = step(params, opt, b)
        out["loss"].append(float(loss))
        out["grad_norm"].append(float(optax.tree.norm(g)))
        out.setdefault("grads", host(g))
    out["params"] = host(params)
    return out


def reference_diloco(cfg, run, loss_fn, params0, steps, record: dict | None = None):
    """(per-step mean losses, final DiLoCoState) of `streaming_diloco` without a mesh;
    `record` gets the per-step mean over replicas of the grad norm (`grad_norm`) and the
    first step's per-replica `grads`, as the trainer reports them."""
    d = cfg.diloco
    tx, _ = inner_optimizer(cfg)
    sd = streaming_diloco(tx, num_replicas=cfg.mesh.replica, sync_every=d.sync_every,
                          num_fragments=d.num_fragments, overlap_steps=d.overlap_steps,
                          alpha=d.alpha, outer_optimizer=optax.sgd(
                              d.outer_lr, momentum=d.outer_momentum, nesterov=True))
    grad = replica_grads(loss_fn)

    @jax.jit
    def step(s, b):
        loss_M, g_M = grad(s.params, b)
        return sd.update(g_M, s), loss_M.mean(), g_M, jax.vmap(optax.tree.norm)(g_M).mean()

    state, losses = sd.init(params0), []
    record = {} if record is None else record
    for t in range(1, steps + 1):
        b = pack(run.data.replica_batches(t, cfg.train.batch_size, cfg.mesh.replica), zigzag=1)
        state, loss, g_M, norm = step(state, b)
        losses.append(float(loss))
        record.setdefault("grad_norm", []).append(float(norm))
        record.setdefault("grads", host(g_M))
    return losses, state


def run_steps(run, state, steps, metrics: list | None = None):
    """(state, per-step losses) of the trainer's compiled step over steps 1..steps;
    `metrics` (a list) also gets each step's metrics (numbers as floats, `grads` on host
    when the run reports them)."""
    losses = []
    for step in range(1, steps + 1):
        state, m = run.train_step(state, run.batch(step))
        losses.append(float(m["loss"]))
        if metrics is not None:
            metrics.append({k: host(v) if k == "grads" else float(v) for k, v in m.items()})
    return state, losses


def assert_losses_close(losses, ref, where: str = "sharded run"):
    """Per-step losses against a reference's, through jaxpar.testing (1e-5 + 1e-5·|ref|)."""
    assert_steps_close([{"loss": x} for x in losses], [{"loss": x} for x in ref], where=where)


def assert_same_steps(run, state, steps, ref: dict):
    """Run the sharded trainer from `state` and compare it with a reference: the first
    step's gradients (as the compiled step computed them), every step's loss and grad
    norm. The lr is 0
    at step 1 (warmup from 0), so the first step's gradients and every step's grad norm
    are what tie the update to the reference; steps 2.. update with lr > 0. Returns the
    final state."""
    run.report_grads = True  # the compiled train step itself returns its gradients
    metrics = []
    state, losses = run_steps(run, state, steps, metrics)
    # jaxpar.testing's comparison: each loss to 1e-5, each gradient leaf to 1e-4 of its
    # largest entry (summation order differs between the sharded and the plain run)
    assert_steps_close(
        [{"loss": x, "grads": m["grads"] if t == 0 else None}
         for t, (x, m) in enumerate(zip(losses, metrics))],
        [{"loss": x, "grads": ref["grads"] if t == 0 else None}
         for t, x in enumerate(ref["loss"])],
        where="sharded run", reference="the reference", rtol=1e-4, atol=0.0)
    np.testing.assert_allclose([m["grad_norm"] for m in metrics], ref["grad_norm"], rtol=1e-5)
    assert all(m["lr"] > 0 for m in metrics[1:])  # every step after the first updates
    return state
