"""transformers as the judge (optional extra `hf-judge`: torch CPU + transformers; skipped
without them): a jaxpar decoder exported with `jaxpar.hf.save` (what `jaxpar-convert to-hf`
writes) and loaded by `LlamaForCausalLM` gives jaxpar's logits, and a model saved by
transformers imports (`jaxpar.hf.load`) to transformers' logits, fp32, for Llama-2 (MHA),
Llama-3 with llama3 scaling, yarn, linear, dynamic NTK (past max_position_embeddings),
tied embeddings and GQA. Writes the table to docs/hf_judge.json (cited by docs/hf.md)."""
from __future__ import annotations

import copy
import json
import platform
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import hf_reference as R
from jaxpar import hf
from jaxpar.models.transformer import Transformer

TOL = 1e-4
N = 32  # beyond max_position_embeddings=16: dynamic NTK grows its base
CASES = {
    "llama2_mha": R.LLAMA2,
    "llama3_gqa_llama3_rope": dict(R.LLAMA3, rope_scaling=R.SCALINGS["llama3"]),
    "yarn": dict(R.LLAMA3, rope_scaling=R.SCALINGS["yarn"]),
    "linear": dict(R.LLAMA3, rope_scaling=R.SCALINGS["linear"]),
    "dynamic": dict(R.LLAMA3, rope_scaling=R.SCALINGS["dynamic"]),
    "tied": dict(R.LLAMA2, tie_word_embeddings=True),
    "gqa": R.LLAMA3,
}
OUT = Path(__file__).resolve().parent.parent / "docs" / "hf_judge.json"


def _random(params, seed=0):
    """Weights that make logits O(1) (an init's tiny logits would hide a wrong mapping)."""
    leaves, tree = jax.tree.flatten(params)
    rng = np.random.default_rng(seed)
    out = [1 + 0.1 * rng.standard_normal(x.shape) if x.ndim == 1
           else rng.standard_normal(x.shape) * x.shape[0] ** -0.5 for x in leaves]
    return jax.tree.unflatten(tree, [jnp.asarray(x, jnp.float32) for x in out])


def _export(tmp_path, cfg, torch, LlamaForCausalLM):
    """jaxpar params -> hf.save -> LlamaForCausalLM: max |logit difference|."""
    c = hf.transformer_config(hf.model_keys(cfg))
    module = Transformer(c)
    toks = np.random.default_rng(1).integers(0, cfg["vocab_size"], (2, N))
    pos = np.broadcast_to(np.arange(N), toks.shape)
    params = _random(nn.unbox(module.init(jax.random.key(0), toks, pos,
                                          np.zeros_like(toks))["params"]))
    ours = np.asarray(module.apply({"params": params}, toks, pos, np.zeros_like(toks)))
    hf.save(params, c, tmp_path / "export", base_config=cfg)
    model = LlamaForCausalLM.from_pretrained(tmp_path / "export", dtype=torch.float32,
                                             use_kernels=False).eval()
    with torch.no_grad():
        theirs = model(torch.as_tensor(toks)).logits.numpy()
    assert np.std(theirs) > 0.3  # logits that can disagree
    return float(np.abs(ours[..., :cfg["vocab_size"]] - theirs).max())


def _import(tmp_path, cfg, torch, LlamaConfig, LlamaForCausalLM):
    """a transformers-saved model -> hf.load: max |logit difference|."""
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**copy.deepcopy(cfg))).eval()  # it edits dicts
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.copy_(1 + 0.1 * torch.randn_like(p))
            else:
                p.copy_(torch.randn_like(p) * p.shape[1] ** -0.5)
    model.save_pretrained(tmp_path / "saved")
    toks = np.random.default_rng(2).integers(0, cfg["vocab_size"], (2, N))
    with torch.no_grad():
        theirs = model(torch.as_tensor(toks)).logits.numpy()
    apply, params = hf.load(tmp_path / "saved")
    ours = np.asarray(apply(params, toks))
    assert np.std(theirs) > 0.3
    return float(np.abs(ours - theirs).max())


@pytest.mark.slow
def test_transformers_loads_the_export_and_saves_what_we_import(tmp_path):
    torch = pytest.importorskip("torch", reason="the optional judge: pip install torch "
                                "transformers (CPU torch: docs/hf.md)")
    transformers = pytest.importorskip("transformers")
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.set_num_threads(1)
    rows = []
    for name, cfg in CASES.items():
        rows.append({"case": name, "rope_scaling": cfg.get("rope_scaling"),
                     "kv_heads": cfg["num_key_value_heads"], "heads": cfg["num_attention_heads"],
                     "tied": bool(cfg.get("tie_word_embeddings")),
                     "export_max_abs_err": _export(tmp_path / name, cfg, torch, LlamaForCausalLM),
                     "import_max_abs_err": _import(tmp_path / name, cfg, torch, LlamaConfig,
                                                   LlamaForCausalLM)})
    OUT.write_text(json.dumps({
        "test": "tests/test_hf_transformers.py", "tolerance": TOL, "dtype": "float32",
        "tokens": [2, N], "max_position_embeddings": 16,
        "machine": f"{platform.machine()} CPU, jax {jax.__version__} on {jax.default_backend()}",
        "torch": torch.__version__, "transformers": transformers.__version__,
        "rows": rows}, indent=1) + "\n")
    for r in rows:
        assert r["export_max_abs_err"] <= TOL and r["import_max_abs_err"] <= TOL, r
