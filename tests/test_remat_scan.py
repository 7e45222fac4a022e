"""Rematerialization and scan over layers: the same values and gradients as the plain
decoder (the unsharded reference), less activation memory, clear errors."""
import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxpar.models import blocks
from jaxpar.models.transformer import Transformer, TransformerConfig
from jaxpar.train.config import Config, ConfigError
from jaxpar.train.checks import validate
from jaxpar.train.loop import Run

CFG = TransformerConfig(vocab=64, layers=2, embed=32, heads=4, kv_heads=2, head_dim=8, mlp=64)


def _value_and_grad(cfg, params, tokens_BN):
    model = Transformer(cfg)

    def loss(p):
        return jnp.mean(jnp.sin(model.apply({"params": p}, tokens_BN)))
    return jax.jit(jax.value_and_grad(loss))(params)


def _check(remat, scan):
    tokens_BN = jax.random.randint(jax.random.key(0), (2, 32), 0, CFG.vocab)
    params = nn.unbox(Transformer(CFG).init(jax.random.key(1), tokens_BN))["params"]
    ref_val, ref_grads = _value_and_grad(CFG, params, tokens_BN)
    cfg = dataclasses.replace(CFG, remat=remat, scan_layers=scan)
    if scan:  # the scanned init is the same params, stacked
        scanned = nn.unbox(Transformer(cfg).init(jax.random.key(1), tokens_BN))["params"]
        assert jax.tree.structure(scanned) == jax.tree.structure(blocks.stack_layers(params))
        assert scanned["layers"]["block"]["q"]["kernel"].shape == (2, 32, 32)
    val, grads = _value_and_grad(cfg, blocks.stack_layers(params) if scan else params,
                                 tokens_BN)
    if scan:
        grads = blocks.unstack_layers(grads)
    np.testing.assert_allclose(float(val), float(ref_val), rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
                 grads, ref_grads)


def test_remat_and_scan_equal_the_plain_decoder():
    _check("attn_out", True)


@pytest.mark.slow
@pytest.mark.parametrize("remat", blocks.REMAT_POLICIES)
@pytest.mark.parametrize("scan", [False, True])
def test_every_policy_equals_the_plain_decoder(remat, scan):
    _check(remat, scan)


def test_stack_and_unstack_are_inverse_on_optimizer_trees():
    leaf = {"kernel": jnp.ones((3, 4))}
    tree = ({"embed": jnp.zeros(2), "layers_0": leaf, "layers_1": leaf}, [{"layers_0": leaf}])
    stacked = blocks.stack_layers(tree)
    assert stacked[0]["layers"]["block"]["kernel"].shape == (2, 3, 4)
    assert stacked[1][0]["layers"]["block"]["kernel"].shape == (1, 3, 4)
    assert jax.tree.structure(blocks.unstack_layers(stacked)) == jax.tree.structure(tree)


def _temp_bytes(remat, scan):
    cfg = dataclasses.replace(CFG, layers=4, embed=64, head_dim=16, mlp=128, remat=remat,
                              scan_layers=scan)
    model, tokens_BN = Transformer(cfg), jnp.zeros((2, 256), jnp.int32)
    params = jax.eval_shape(lambda: nn.unbox(model.init(jax.random.key(0), tokens_BN)))
    grad = jax.jit(jax.grad(lambda p: model.apply(p, tokens_BN).mean()))
    return grad.lower(params).compile().memory_analysis().temp_size_in_bytes


@pytest.mark.slow
def test_full_remat_lowers_activation_memory():
    # scanned: the loop orders each block's recompute into the backward. (Unscanned, the
    # CPU backend's scheduler hoists the recompute into the forward and the saving is lost;
    # docs/memory.md shows both.)
    none, full = _temp_bytes("none", True), _temp_bytes("full", True)
    assert full < 0.75 * none, (full, none)


def _cfg(**model):
    return Config().replace(model=dict(layers=2, embed=32, heads=4, kv_heads=2, mlp=64,
                                       **model))


def test_config_errors_name_the_key():
    with pytest.raises(ConfigError, match=r"model.remat='dot' is not valid.*'dots'"):
        validate(_cfg(remat="dot"), 8)
    with pytest.raises(ConfigError, match=r"model.scan_layers applies to the built-in "):
        validate(_cfg(scan_layers=True, module="x:y"), 8)
    bad = _cfg(scan_layers=True).replace(diloco=dict(enabled=True, num_fragments=2),
                                         mesh=dict(replica=2, data=4))
    with pytest.raises(ConfigError, match=r"Streaming DiLoCo cannot split.*num_fragments=1"):
        validate(bad, 8)


@pytest.mark.slow
def test_trainer_scan_and_remat_equal_plain_on_a_sharded_mesh(tmp_path):
    """Through the trainer on data × seq (ring) × tensor with collective matmuls: the
    scanned, rematerialized run's initial params, losses and first grads equal the plain
    run's (params converted)."""
    def run(**model):
        cfg = Config().replace(
            model=dict(layers=2, embed=32, heads=4, kv_heads=2, head_dim=8, mlp=64, **model),
            train=dict(steps=2, batch_size=4, seq_len=32, lr=1e-2, warmup=0,
                       run_dir=str(tmp_path)),
            attention=dict(impl="ring"), overlap=dict(mode="collective_matmul"),
            mesh=dict(data=2, seq=2, tensor=2), eval=dict(every=0, sample_bytes=0))
        r = Run.create(cfg)
        state = r.init_state()
        b = r.batch(1)
        g = jax.jit(jax.grad(r.loss))(state.params, b)
        losses = []
        for step in (1, 2):
            state, m = r.train_step(state, r.batch(step))
            losses.append(float(m["loss"]))
        return r, g, losses

    plain_run, g_plain, l_plain = run()
    scan_run, g_scan, l_scan = run(scan_layers=True, remat="attn_out")
    # the stacked layer axis is unsharded; the rest is the plain run's spec for that kernel
    assert scan_run.param_specs["layers"]["block"]["q"]["kernel"] == jax.sharding.PartitionSpec(
        None, *plain_run.param_specs["layers_0"]["q"]["kernel"])
    np.testing.assert_allclose(l_scan, l_plain, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
                 jax.device_get(blocks.unstack_layers(g_scan)), jax.device_get(g_plain))


def test_a_scanned_stack_is_one_diloco_fragment():
    from jaxpar.diloco import split_fragments

    stacked = blocks.stack_layers({"embed": jnp.zeros(4), "layers_0": {"w": jnp.ones(3)},
                                   "layers_1": {"w": jnp.ones(3)}})
    assert split_fragments(stacked, 1, 4).leaves(0) == (0, 1)
    with pytest.raises(ValueError, match="found no layers"):
        split_fragments(stacked, 2, 4)


@pytest.mark.slow
def test_resume_that_flips_scan_layers_names_the_key(tmp_path):
    from jaxpar.train.run import train

    def cfg(scan, steps):
        return _cfg(scan_layers=scan).replace(
            train=dict(steps=steps, batch_size=8, seq_len=32, run_dir=str(tmp_path)),
            checkpoint=dict(every=2), eval=dict(every=0, sample_bytes=0), mesh=dict(data=8))
    train(cfg(False, 2), quiet=True)
    # the run folder's config check names the key first (checkpoint.check_layout would too)
    with pytest.raises(ConfigError, match=r"changed model.scan_layers \(False -> True\)"):
        train(cfg(True, 2), quiet=True)
    assert train(cfg(False, 2), quiet=True)["steps"] == 2  # the same layout resumes


@pytest.mark.slow
def test_abstract_state_matches_init_state(tmp_path):
    """What scripts/bench_memory.py compiles against: init_state's shapes, dtypes and
    shardings, without creating the arrays (FSDP x tensor, scanned)."""
    cfg = _cfg(scan_layers=True).replace(mesh=dict(fsdp=4, tensor=2),
                                         train=dict(run_dir=str(tmp_path), seq_len=32))
    run = Run.create(cfg)
    abstract, real = run.abstract_state(), run.init_state()
    assert jax.tree.structure(abstract) == jax.tree.structure(real)
    for a, r in zip(jax.tree.leaves(abstract), jax.tree.leaves(real)):
        assert (a.shape, a.dtype) == (r.shape, r.dtype)
        assert a.sharding.is_equivalent_to(r.sharding, len(a.shape)), (a.sharding, r.sharding)
