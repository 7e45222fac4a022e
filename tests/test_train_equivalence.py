"""The sharded trainer equals the same model run unsharded on one device.

The reference is independent of every parallel part: the decoder without a mesh (plain
Dense layers, dense softmax attention masked by positions and segments), natural token
order (no zigzag), a plain optax loop — or the library's Streaming DiLoCo without a mesh.
Both sides start from the same initial params, which must themselves equal an unsharded
init, and see the same packed batches. Compared: the first step's gradients (every leaf),
every step's loss and grad norm, the final params — a gradient off by a constant factor
(a sum for a mean) fails the first two even where clipping and Adam would absorb it.
"""
import re

import jax
import numpy as np
import pytest

from jaxpar.data import ByteData, pack
from jaxpar.models.transformer import Transformer
from jaxpar.train import microbatch
from jaxpar.train.config import Config
from jaxpar.train.loop import Run, cross_entropy
from jaxpar.train.model import transformer_config
from train_helpers import (assert_same_steps, host, reference_diloco,
                           reference_steps)

STEPS = 3
MESHES = {  # impl -> mesh (8 devices); the ring schedules run inside FSDP
    "dense": dict(replica=2, data=2, tensor=2),
    "ulysses": dict(data=2, seq=2, tensor=2),
    "ring": dict(fsdp=2, seq=2, tensor=2),
    "tokenring": dict(fsdp=2, seq=2, tensor=2),
    "hybrid": dict(seq=2, seq_inner=2, tensor=2),
}
FAST = {("tokenring", "collective_matmul")}  # the demo's pair; the rest run with -m slow


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


def check_init_matches_unsharded(run, cfg, params):
    model, _ = reference_loss(cfg)
    dummy = np.zeros((1, cfg.train.seq_len), np.int32)
    plain = jax.tree.map(lambda b: b.unbox() if hasattr(b, "unbox") else b,
                         model.init(jax.random.key(cfg.train.seed), dummy)["params"],
                         is_leaf=lambda b: hasattr(b, "unbox"))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
                 host(params), host(plain))


def check_equivalent(cfg, steps=STEPS):
    """The trainer on cfg's mesh against the plain loop; returns the run and final state."""
    run = Run.create(cfg)
    state = run.init_state()
    p0 = host(state.params)
    check_init_matches_unsharded(run, cfg, state.params)
    ref = reference_steps(cfg, run, reference_loss(cfg)[1], p0, steps)
    state = assert_same_steps(run, state, steps, ref)
    assert ref["loss"][-1] < ref["loss"][0]
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5),
                 host(state.params), ref["params"])
    return run, state


# Every schedule with collective matmuls (the layers whose layout each schedule changes), and
# the plain and XLA-auto tensor paths each with two schedules: 9 of the 15 pairs.
PAIRS = [(i, "collective_matmul") for i in MESHES] + [
    ("dense", "none"), ("ring", "none"), ("ulysses", "auto"), ("hybrid", "auto")]


@pytest.mark.parametrize("impl,overlap", [
    pytest.param(i, o, marks=() if (i, o) in FAST else pytest.mark.slow) for i, o in PAIRS])
def test_sharded_run_equals_unsharded(impl, overlap, tmp_path):
    cfg = small_config(tmp_path, impl, overlap, MESHES[impl])
    run, state = check_equivalent(cfg)
    q_spec = run.param_specs["layers_0"]["q"]["kernel"]
    assert tuple(q_spec) == ("fsdp", "tensor")      # embed on fsdp, heads on tensor
    assert state.params["layers_0"]["q"]["kernel"].sharding.spec == q_spec


def test_fsdp_run_equals_unsharded(tmp_path):
    """FSDP alone (data 2 × fsdp 4): every weight and Adam moment is cut over fsdp, and the
    run still equals the unsharded one."""
    cfg = small_config(tmp_path, "dense", "none", dict(data=2, fsdp=4),
                       train=dict(batch_size=8))  # ZeRO-3 on 4 devices, 2 such groups
    run, state = check_equivalent(cfg)
    q = state.params["layers_0"]["q"]["kernel"]              # 32 × 32, embed on fsdp
    assert {s.data.shape for s in q.addressable_shards} == {(8, 32)}
    mu = state.opt_state[1][0].mu["layers_0"]["q"]["kernel"]  # AdamW's first moment
    assert mu.sharding.spec == q.sharding.spec
    table = {r["path"]: r for r in run.param_table(state.params)}
    assert table["layers_0/q/kernel"]["bytes_per_device"] == 32 * 32 * 4 // 4
    # the compiled step (already compiled above): each kernel of a tensor-parallel layer is
    # all-gathered whole in the forward, and its gradient reduce-scattered to its fsdp shard
    hlo = run.compile_step(state, run.batch(1)).as_text()
    ops = re.findall(r"= f32\[([\d,]*)\]\S* (all-gather|reduce-scatter)(?:-start)?\(.*?"
                     r"op_name=\"([^\"]*)\"", hlo)
    for name in ("q", "k", "v", "o", "gate", "up", "down"):
        kernel = state.params["layers_0"][name]["kernel"]
        whole = ",".join(map(str, kernel.shape))
        shard = ",".join(map(str, kernel.addressable_shards[0].data.shape))
        where = f"layers_0/{name}/shard_map"
        assert any(k == "all-gather" and s == whole and where in n and "transpose" not in n
                   for s, k, n in ops), name
        assert any(k == "reduce-scatter" and s == shard and where in n and "transpose" in n
                   for s, k, n in ops), name


def test_microbatch_grads_equal_one_batch():
    """jaxpar.train.microbatch on the plain decoder: 4 microbatches give the one large
    batch's loss and gradients to 1e-6 relative (fp32)."""
    cfg = small_config("/tmp", "dense", "none", {})
    model, loss_fn = reference_loss(cfg)
    b = pack(ByteData.load(None, seq_len=32, seed=0).batch(1, 16), zigzag=1)
    params = model.init(jax.random.key(0), b["tokens"])["params"]
    params = jax.tree.map(lambda x: getattr(x, "value", x), params,
                          is_leaf=lambda x: hasattr(x, "value"))
    loss1, g1 = jax.jit(jax.value_and_grad(loss_fn))(params, b)
    loss4, g4 = jax.jit(microbatch.value_and_grad(loss_fn, 4))(params, b)
    assert abs(float(loss4) - float(loss1)) <= 1e-6 * abs(float(loss1))
    flat = lambda g: np.concatenate([np.ravel(x) for x in jax.tree.leaves(host(g))]).astype(
        np.float64)
    rel = np.linalg.norm(flat(g4) - flat(g1)) / np.linalg.norm(flat(g1))
    assert rel <= 1e-6, rel
    assert not np.allclose(flat(g1), 2 * flat(g4))  # (the check can fail)


@pytest.mark.slow
def test_microbatches_equal_one_batch(tmp_path):
    """train.microbatches=4 in the trainer on fsdp 2 × seq 2 × tensor 2 (ring, collective
    matmuls): the same loss and gradients as the one large batch on the same mesh (fp32,
    <= 1e-6 relative), less temp memory (activations) in the compiled step, and the same
    run as the unsharded reference."""
    cfg = small_config(tmp_path, "ring", "collective_matmul", dict(fsdp=2, seq=2, tensor=2),
                       train=dict(batch_size=16))
    cfg4 = cfg.replace(train=dict(microbatches=4))
    runs = {1: Run.create(cfg), 4: Run.create(cfg4)}
    params = runs[1].init_params()
    runs[4].init_params()
    b = runs[1].batch(1)
    out, temp = {}, {}
    for k, run in runs.items():
        with run.scope():
            c = jax.jit(run.value_and_grad()).lower(params, b).compile()
        temp[k] = c.memory_analysis().temp_size_in_bytes
        out[k] = c(params, b)
    (loss1, g1), (loss4, g4) = out[1], out[4]
    assert abs(float(loss4) - float(loss1)) <= 1e-6 * abs(float(loss1))
    flat = lambda g: np.concatenate([np.ravel(x) for x in jax.tree.leaves(host(g))]).astype(
        np.float64)
    assert np.linalg.norm(flat(g4) - flat(g1)) <= 1e-6 * np.linalg.norm(flat(g1))
    assert temp[4] < temp[1], temp
    check_equivalent(cfg4)


@pytest.mark.parametrize("mesh,microbatches", [
    (dict(replica=2, seq=2, tensor=2), 1),
    pytest.param(dict(replica=2, fsdp=2, seq=2), 2, marks=pytest.mark.slow)],
    ids=["seq-tensor", "fsdp-seq-microbatches"])
def test_diloco_run_equals_library_diloco_on_one_device(mesh, microbatches, tmp_path):
    """Streaming DiLoCo with 2 fragments, τ=1, α=0.5, TokenRing + collective matmuls, each
    replica sharded over seq × tensor, or FSDP × seq with 2 microbatches — against
    `streaming_diloco` without a mesh on the plain model."""
    steps = 6
    cfg = small_config(tmp_path, "tokenring", "collective_matmul", mesh,
                       diloco=dict(enabled=True, sync_every=4, num_fragments=2,
                                   overlap_steps=1, alpha=0.5),
                       train=dict(steps=steps, batch_size=4, microbatches=microbatches))
    run = Run.create(cfg)
    state = run.init_state()
    g0 = host(state.global_params)
    if mesh.get("fsdp", 1) > 1:  # each replica's copy (and its Adam moments) cut over fsdp
        spec = state.params["layers_0"]["q"]["kernel"].sharding.spec
        assert tuple(spec)[:2] == ("replica", "fsdp")

    _, loss_fn = reference_loss(cfg)
    record = {}
    ref, ref_state = reference_diloco(cfg, run, loss_fn, g0, steps, record)
    state = assert_same_steps(run, state, steps, {"loss": ref, **record})
    assert int(state.step) == steps and int(state.pending_fragment) == 0  # fragment 0 synced at t=6
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5),
                 host(state.global_params), host(ref_state.global_params))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5),
                 host(state.params), host(ref_state.params))
