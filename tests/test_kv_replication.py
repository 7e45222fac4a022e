"""Fewer kv heads than tensor shards (MQA; GQA 8 on tensor 16): k/v weights replicated over
the tensor axis, each shard attending with the kv head its query heads use. Logits of an
imported MQA/GQA checkpoint on a tensor-4 mesh (dense, and ring with zigzag tokens) against
the float64 numpy Llama; the trainer's loss and every gradient against the unsharded model
with the same params; the param table's bytes per device."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import hf_reference as R
from jaxpar import hf, make_mesh
from jaxpar.attention.layout import zigzag_indices
from jaxpar.models.transformer import Transformer
from jaxpar.train.config import load_config
from jaxpar.train.checks import validate
from jaxpar.train.loop import Run, cross_entropy
from jaxpar.train.model import transformer_config

TOL = 1e-4


@pytest.mark.parametrize("kv,shape,attention", [(1, (2, 1, 4), "dense"),
                                                (2, (2, 1, 4), "dense"),
                                                (1, (1, 2, 4), "ring")])
def test_import_with_kv_heads_below_the_tensor_axis(tmp_path, kv, shape, attention):
    cfg = dict(R.LLAMA3, num_key_value_heads=kv)
    w = R.write_checkpoint(tmp_path, cfg)
    mesh = make_mesh(**dict(zip(("data", "seq", "tensor"), shape)))
    N = 32
    toks = np.random.default_rng(1).integers(0, cfg["vocab_size"], (2, N))
    ref = R.forward(w, cfg, toks)
    apply, params = hf.load(tmp_path, mesh, attention=attention)
    perm = zigzag_indices(N, shape[1]) if attention == "ring" else np.arange(N)
    pos = np.broadcast_to(np.arange(N), toks.shape)[:, perm]
    out = np.asarray(apply(params, toks[:, perm], pos, np.zeros_like(pos)))[:, np.argsort(perm)]
    assert np.abs(out - ref).max() <= TOL
    k = params["layers_0"]["k"]["kernel"]
    assert k.sharding.shard_shape(k.shape) == k.shape  # whole on every device


@pytest.mark.slow  # ~25 s on the shared 2-core box (two compiled value_and_grads)
def test_trainer_loss_and_grads_match_the_unsharded_model(tmp_path):
    """MQA (4 query heads, 1 kv head) on data 2 x tensor 4: the sharded step's loss and
    grads equal those of the same params without a mesh; k/v bytes are replicated in the
    param table, q's split four ways."""
    cfg = load_config(None, ["mesh.data=2", "mesh.tensor=4", "model.layers=2", "model.embed=32",
                             "model.heads=4", "model.kv_heads=1", "model.mlp=64",
                             "train.seq_len=32", "train.batch_size=4",
                             f"train.run_dir={tmp_path}"])
    validate(cfg, 8)
    run = Run.create(cfg)
    params = run.init_params()
    b = run.batch(1)
    with run.scope():
        loss, grads = jax.jit(jax.value_and_grad(run.loss))(params, b)
    plain = Transformer(transformer_config(run.cfg))
    host = jax.device_get(params)
    hb = {k: np.asarray(v) for k, v in jax.device_get(b).items()}

    def ref_loss(p):
        logits = plain.apply({"params": p}, hb["tokens"], hb["positions"], hb["segment_ids"])
        return cross_entropy(logits[..., :run.cfg.model.vocab], hb["targets"])
    want, want_g = jax.jit(jax.value_and_grad(ref_loss))(jax.tree.map(jnp.asarray, host))
    assert abs(float(loss) - float(want)) < 1e-5
    diffs = jax.tree.map(lambda a, b: float(np.abs(np.asarray(a) - np.asarray(b)).max()),
                         jax.device_get(grads), jax.device_get(want_g))
    assert max(jax.tree.leaves(diffs)) < 1e-5, diffs
    k_g = np.asarray(jax.device_get(grads)["layers_0"]["k"]["kernel"])
    assert np.abs(k_g).max() > 1e-4  # the replicated kv weights do learn
    rows = {r["path"]: r for r in run.param_table(params)}
    E, D = 32, 8
    assert rows["layers_0/k/kernel"]["bytes_per_device"] == E * 1 * D * 4
    assert rows["layers_0/q/kernel"]["bytes_per_device"] == E * 4 * D * 4 // 4


def test_kv_heads_that_neither_divide_nor_multiply_the_tensor_axis_are_refused(tmp_path):
    from jaxpar.train.config import ConfigError

    cfg = load_config(None, ["mesh.data=2", "mesh.tensor=4", "model.heads=12",
                             "model.kv_heads=6", "model.head_dim=8", f"train.run_dir={tmp_path}"])
    with pytest.raises(ConfigError, match="model.kv_heads=6 must divide or be a multiple"):
        validate(cfg, 8)
