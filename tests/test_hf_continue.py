"""Continued pretraining really continues: a run trains, exports to Hugging Face (`to-hf`),
and a second run with `model.init_from` starts from the exported weights: its first train
loss equals the exporting run's final params' loss on that same batch (computed from the
exporter's orbax checkpoint, not through HF), far below a fresh init's; the `from-hf`
step-0 checkpoint resumed by the trainer gives the same first loss.

Why not "B's first loss == A's last logged loss": A's step-k loss is taken before update k
(params θ_{k-1}, batch k), B's step 1 is θ_final on batch 1. The same (params, batch) pair
is what must give the same number: train-mode loss (no dropout here) of θ_final on batch 1.
"""
from __future__ import annotations

import json

import jax
import numpy as np
import pytest

from jaxpar import convert, sharding
from jaxpar.train import load_config, train
from jaxpar.train.loop import Run

TINY = ["model.layers=2", "model.embed=32", "model.heads=4", "model.kv_heads=2",
        "model.mlp=64", "mesh.data=4", "mesh.tensor=2", "train.seq_len=32",
        "train.batch_size=8", "train.lr=3e-3", "train.log_every=1", "eval.every=0",
        "eval.batches=1", "eval.sample_bytes=0", "checkpoint.keep=1"]
MODEL_KEYS = [k for k in TINY if k.startswith("model.")]


def _first_loss(run_dir) -> float:
    rec = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[0])
    assert rec["step"] == 1
    return rec["loss"]


def _loss_on_batch_1(cfg, params_host) -> float:
    """Train-mode loss of host params on batch 1 of `cfg`'s run, placed by its rules."""
    run = Run.create(cfg)
    run.init_params()  # the param specs
    params = jax.device_put(params_host, sharding.named(run.param_specs, run.mesh))
    with run.scope():
        return float(jax.jit(run.loss)(params, run.batch(1)))


def _transformers_agrees(folder):
    """Where torch + transformers are installed (the hf-judge extra): the `to-hf` output of
    a trained run loads in LlamaForCausalLM with jaxpar's logits (fp32, 1e-4)."""
    try:
        import torch
        from transformers import LlamaForCausalLM
    except ImportError:
        return
    from jaxpar import hf

    toks = np.random.default_rng(0).integers(0, 256, (2, 32))
    model = LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32,
                                             use_kernels=False).eval()
    with torch.no_grad():
        theirs = model(torch.as_tensor(toks)).logits.numpy()
    apply, params = hf.load(folder)
    assert np.abs(np.asarray(apply(params, toks)) - theirs).max() < 1e-4


@pytest.mark.slow
def test_init_from_an_export_continues_where_the_run_stopped(tmp_path):
    a = load_config(None, TINY + [f"train.run_dir={tmp_path / 'a'}", "train.steps=8"])
    train(a)
    assert convert.main(["to-hf", str(tmp_path / "a"), str(tmp_path / "hf")]) == 0
    _transformers_agrees(tmp_path / "hf")
    final = convert.read_params((tmp_path / "a" / "checkpoints" / "8").resolve())
    want = _loss_on_batch_1(a, final)

    mesh = [k for k in TINY if not k.startswith("model.")]
    b = load_config(None, mesh + [f"model.init_from={tmp_path / 'hf'}",
                                  f"train.run_dir={tmp_path / 'b'}", "train.steps=2"])
    assert b.model.layers == 2 and b.model.vocab == 256  # from the export's config.json
    train(b)
    got = _first_loss(tmp_path / "b")
    assert abs(got - want) < 1e-5, (got, want)
    fresh = Run.create(a)
    with fresh.scope():
        fresh_loss = float(jax.jit(fresh.loss)(fresh.init_params(), fresh.batch(1)))
    assert fresh_loss > want + 0.5, (fresh_loss, want)  # the import is not ignored

    # from-hf writes a run folder whose step-0 checkpoint the trainer resumes
    assert convert.main(["from-hf", str(tmp_path / "hf"), str(tmp_path / "c"), *mesh,
                         "train.steps=2"]) == 0
    c = load_config(tmp_path / "c" / "config.yaml")
    assert c.model.init_from == ""  # the weights come from checkpoints/0, nothing else
    summary = train(c)
    assert abs(_first_loss(tmp_path / "c") - want) < 1e-5
    assert json.loads((tmp_path / "c" / "metrics.jsonl").read_text().splitlines()[-1])[
        "step"] == 2 and summary["final_eval_loss"] < fresh_loss
