"""The sharded trainer equals the same model run unsharded on one device.

The reference is independent of every parallel part: the decoder without a mesh (plain
Dense layers, dense softmax attention masked by positions and segments), natural token
order (no zigzag), a plain optax loop — or the library's Streaming DiLoCo without a mesh.
Both sides start from the same initial params, which must themselves equal an unsharded
init, and see the same packed batches.
"""
import jax
import numpy as np
import optax
import pytest

from jaxpar.data import pack
from jaxpar.models.transformer import Transformer
from jaxpar.train.config import Config
from jaxpar.train.loop import Run, cross_entropy, inner_optimizer
from jaxpar.train.model import transformer_config
from train_helpers import reference_diloco, run_steps

STEPS = 3
MESHES = {  # impl -> mesh (8 devices)
    "dense": dict(replica=2, data=2, tensor=2),
    "ulysses": dict(data=2, seq=2, tensor=2),
    "ring": dict(data=2, seq=2, tensor=2),
    "tokenring": dict(data=2, seq=2, tensor=2),
    "hybrid": dict(seq=2, seq_inner=2, tensor=2),
}
# the default run: each overlap mode once, and the schedules through TokenRing, Ulysses
# and the hybrid (whose outer axis is a ring); the other 12 cases are slow
FAST = {("ulysses", "auto"), ("tokenring", "collective_matmul"), ("hybrid", "none")}


def small_config(tmp_path, impl, overlap, mesh, **sections) -> Config:
    base = Config().replace(
        model=dict(layers=2, embed=32, heads=4, kv_heads=2, head_dim=8, mlp=64),
        train=dict(steps=STEPS, batch_size=4, seq_len=32, lr=1e-2, warmup=1,
                   run_dir=str(tmp_path)),
        attention=dict(impl=impl), overlap=dict(mode=overlap), mesh=mesh,
        eval=dict(every=0, sample_bytes=0))
    return base.replace(**sections) if sections else base


def reference_loss(cfg):
    model = Transformer(transformer_config(cfg))

    def loss(params, b):
        logits = model.apply({"params": params}, b["tokens"], b["positions"], b["segment_ids"])
        return cross_entropy(logits, b["targets"])
    return model, loss


def host(tree):
    return jax.tree.map(lambda x: np.asarray(jax.device_get(x)), tree)


def check_init_matches_unsharded(run, cfg, params):
    model, _ = reference_loss(cfg)
    dummy = np.zeros((1, cfg.train.seq_len), np.int32)
    plain = jax.tree.map(lambda b: b.unbox() if hasattr(b, "unbox") else b,
                         model.init(jax.random.key(cfg.train.seed), dummy)["params"],
                         is_leaf=lambda b: hasattr(b, "unbox"))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
                 host(params), host(plain))


@pytest.mark.parametrize("impl,overlap", [
    pytest.param(i, o, marks=() if (i, o) in FAST else pytest.mark.slow)
    for i in MESHES for o in ("none", "collective_matmul", "auto")])
def test_sharded_run_equals_unsharded(impl, overlap, tmp_path):
    cfg = small_config(tmp_path, impl, overlap, MESHES[impl])
    run = Run.create(cfg)
    state = run.init_state()
    p0 = host(state.params)
    check_init_matches_unsharded(run, cfg, state.params)
    q_spec = run.param_specs["layers_0"]["q"]["kernel"]
    assert tuple(q_spec) == (None, "tensor")       # the run really is tensor-sharded
    assert state.params["layers_0"]["q"]["kernel"].sharding.spec == q_spec

    state, losses = run_steps(run, state, STEPS)

    _, loss_fn = reference_loss(cfg)
    tx, _ = inner_optimizer(cfg)
    params, opt = p0, tx.init(p0)
    step_fn = jax.jit(jax.value_and_grad(loss_fn))
    ref = []
    for step in range(1, STEPS + 1):
        b = pack(run.data.batch(step, cfg.train.batch_size), zigzag=1)
        loss, g = step_fn(params, b)
        u, opt = tx.update(g, opt, params)
        params = optax.apply_updates(params, u)
        ref.append(float(loss))
    np.testing.assert_allclose(losses, ref, rtol=1e-5, atol=1e-5)
    assert losses[-1] < losses[0]
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5),
                 host(state.params), host(params))


def test_diloco_run_equals_library_diloco_on_one_device(tmp_path):
    """replica 2 × seq 2 × tensor 2, TokenRing + collective matmuls, streaming DiLoCo with
    2 fragments, τ=1, α=0.5 — against `streaming_diloco` without a mesh on the plain model."""
    steps = 6
    cfg = small_config(tmp_path, "tokenring", "collective_matmul",
                       dict(replica=2, seq=2, tensor=2),
                       diloco=dict(enabled=True, sync_every=4, num_fragments=2,
                                   overlap_steps=1, alpha=0.5),
                       train=dict(steps=steps))
    run = Run.create(cfg)
    state = run.init_state()
    g0 = host(state.global_params)
    state, losses = run_steps(run, state, steps)

    _, loss_fn = reference_loss(cfg)
    ref, ref_state = reference_diloco(cfg, run, loss_fn, g0, steps)
    np.testing.assert_allclose(losses, ref, rtol=1e-5, atol=1e-5)
    assert int(state.step) == steps and int(state.pending_fragment) == 0  # fragment 0 synced at t=6
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5),
                 host(state.global_params), host(ref_state.global_params))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5),
                 host(state.params), host(ref_state.params))
