"""Shared references for the trainer tests: the library's own Streaming DiLoCo without a
mesh, on an unsharded loss, fed the same packed batches as the sharded run."""
import jax
import optax

from jaxpar.data import pack
from jaxpar.diloco import replica_grads, streaming_diloco
from jaxpar.train.loop import inner_optimizer


def reference_diloco(cfg, run, loss_fn, params0, steps):
    """(per-step mean losses, final DiLoCoState) of `streaming_diloco` without a mesh."""
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
        return sd.update(g_M, s), loss_M.mean()

    state, losses = sd.init(params0), []
    for t in range(1, steps + 1):
        b = pack(run.data.replica_batches(t, cfg.train.batch_size, cfg.mesh.replica), zigzag=1)
        state, loss = step(state, b)
        losses.append(float(loss))
    return losses, state


def run_steps(run, state, steps):
    """(state, per-step losses) of the trainer's compiled step over steps 1..steps."""
    losses = []
    for step in range(1, steps + 1):
        state, m = run.train_step(state, run.batch(step))
        losses.append(float(m["loss"]))
    return state, losses
