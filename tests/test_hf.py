"""Hugging Face Llama import/export: logits of the imported decoder against a float64 numpy
Llama (tests/hf_reference.py) for each RoPE scaling type, tied and untied, GQA and MHA, with
and without a mesh (data x tensor, ring/TokenRing with zigzag positions); refusals; the
bit-exact round trip; the padded vocab's loss."""
from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from jax.sharding import AxisType

import hf_reference as R
from jaxpar import hf, make_mesh
from jaxpar.attention.layout import zigzag_indices
from jaxpar.models import rope as rope_lib
from jaxpar.models.transformer import PAD_LOGIT, Transformer, TransformerConfig
from jaxpar.train.loop import cross_entropy

TOL = 1e-4


def _tokens(cfg, B=4, N=32, seed=1):
    return np.random.default_rng(seed).integers(0, cfg["vocab_size"], (B, N))


def _check(tmp_path, cfg, mesh=None, attention=None, *, dtype=np.float32, shards=1, N=32):
    w = R.write_checkpoint(tmp_path, cfg, dtype=dtype, shards=shards)
    toks = _tokens(cfg, N=N)
    ref = R.forward(w, cfg, toks)
    apply, params = hf.load(tmp_path, mesh, attention=attention)
    p = mesh.shape["seq"] if mesh is not None and "seq" in mesh.shape else 1
    perm = zigzag_indices(N, p) if p > 1 else np.arange(N)
    pos = np.broadcast_to(np.arange(N), toks.shape)[:, perm]
    out = np.asarray(apply(params, toks[:, perm], pos, np.zeros_like(pos)))[:, np.argsort(perm)]
    assert out.shape == ref.shape
    err = np.abs(out - ref).max()
    assert err <= TOL, err
    return ref, params


@pytest.mark.parametrize("name", list(R.SCALINGS))
def test_rope_types_match_hf_frequencies(name):
    cfg = dict(R.LLAMA3, rope_scaling=R.SCALINGS[name])
    D, N = 8, 40   # beyond max_position_embeddings=16: dynamic NTK grows its base
    x = np.random.default_rng(0).standard_normal((1, N, 2, D))
    pos = np.arange(N)[None]
    inv_F, att = R.inv_freq(cfg, N)
    want = R.apply_rope(x, pos, inv_F, att)
    got = rope_lib.rope(jnp.asarray(x, jnp.float32), jnp.asarray(pos), cfg["rope_theta"],
                        tuple(sorted((cfg["rope_scaling"] or {}).items())),
                        cfg["max_position_embeddings"])
    assert np.abs(np.asarray(got) - want).max() < 1e-4
    if name != "none":  # the scaling changes the rotation (the check above can fail)
        plain = R.apply_rope(x, pos, *R.inv_freq(R.LLAMA3, N))
        assert np.abs(plain - want).max() > 1e-2


def test_import_llama3_gqa_llama3_rope_no_mesh(tmp_path):
    _check(tmp_path, dict(R.LLAMA3, rope_scaling=R.SCALINGS["llama3"]))


@pytest.mark.slow
def test_import_llama2_tied_bf16_sharded_files_no_mesh(tmp_path):
    _check(tmp_path, dict(R.LLAMA2, tie_word_embeddings=True,
                          rope_scaling=R.SCALINGS["linear"]), dtype=ml_dtypes.bfloat16, shards=3)


def test_import_tokenring_zigzag_reads_only_slices(tmp_path, monkeypatch):
    """TokenRing over seq=2 with zigzag positions, data=2, tensor=2 (vocab 61 padded to 62),
    on a plain jax.make_mesh with Explicit axes; dynamic NTK RoPE, 2 safetensors files:
    logits match, and every device reads only its half of a tensor-sharded weight."""
    reads = []
    orig = hf._Reader.read

    def read(self, name, idx):
        out = orig(self, name, idx)
        reads.append((name, out.shape))
        return out
    monkeypatch.setattr(hf._Reader, "read", read)
    mesh = jax.make_mesh((2, 2, 2), ("data", "seq", "tensor"), axis_types=(AxisType.Explicit,) * 3)
    cfg = dict(R.LLAMA2, rope_scaling=R.SCALINGS["dynamic"])
    _, params = _check(tmp_path, cfg, mesh, "tokenring", shards=2)
    assert params["embed"]["embedding"].shape == (62, 32)
    assert str(params["layers_0"]["q"]["kernel"].sharding.spec) == "P(None, 'tensor')"
    q = [shape for name, shape in reads if name == "model.layers.0.self_attn.q_proj.weight"]
    assert q and all(s == (16, 32) for s in q)  # half the rows of [32, 32] per read


@pytest.mark.parametrize("key,value", [
    ("attention_bias", True), ("mlp_bias", True), ("sliding_window", 4096),
    ("hidden_act", "gelu"), ("num_local_experts", 8), ("head_dim", 16),
    ("rope_scaling", {"rope_type": "longrope", "factor": 2.0}),
    ("rope_scaling", {"rope_type": "linear", "factor": 2.0, "beta_fast": 3}),
    ("model_type", "qwen2"),
])
def test_refuses_what_it_cannot_honour(tmp_path, key, value):
    R.write_checkpoint(tmp_path, dict(R.LLAMA2, **{key: value}))
    with pytest.raises(ValueError) as e:
        hf.load(tmp_path)
    msg = str(e.value)
    assert "\n" not in msg and (key in msg or (key == "rope_scaling" and "rope" in msg)), msg


@pytest.mark.parametrize("dtype,scan", [(np.float32, False), (ml_dtypes.bfloat16, True)])
def test_round_trip_bit_exact(tmp_path, dtype, scan):
    """HF -> params -> HF, bit for bit; with scan_layers the params are the stacked layout."""
    cfg = dict(R.LLAMA3, rope_scaling=R.SCALINGS["llama3"])
    R.write_checkpoint(tmp_path / "in", cfg, dtype=dtype, shards=2)
    keys = hf.model_keys(hf.read_config(tmp_path / "in"))
    c = hf.transformer_config(keys, padded_vocab=70)  # as on a tensor axis of 7 or 10
    c = dataclasses.replace(c, scan_layers=scan)
    module = Transformer(c)
    dummy = jnp.zeros((1, 8), jnp.int32)
    abstract = hf._shapes(jax.eval_shape(module.init, jax.random.key(0), dummy)["params"])
    params = hf.read_params(tmp_path / "in", abstract)
    assert ("layers" in params) == scan and params["embed"]["embedding"].shape == (70, 32)
    name = "bfloat16" if dtype == ml_dtypes.bfloat16 else "float32"
    base = json.loads((tmp_path / "in" / "config.json").read_text())
    hf.save(params, c, tmp_path / "out", base_config=base, dtype=name, max_shard_bytes=20_000)
    assert (tmp_path / "out" / "model.safetensors.index.json").is_file()
    a, b = R.read_tensors(tmp_path / "in"), R.read_tensors(tmp_path / "out")
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].tobytes() == b[k].tobytes(), k
    back = json.loads((tmp_path / "out" / "config.json").read_text())
    assert {k: back[k] for k in base} == base


def test_padded_vocab_rows_are_masked_out_of_the_loss():
    """A vocab of 61 padded to 64 rows: the padding logits are PAD_LOGIT, the real ones and
    the loss equal the unpadded model's with the same real rows."""
    c = TransformerConfig(vocab=61, layers=1, embed=16, heads=2, kv_heads=1, head_dim=8, mlp=32)
    padded = TransformerConfig(**{**c.__dict__, "padded_vocab": 64})
    rng = np.random.default_rng(0)
    toks = jnp.asarray(rng.integers(0, 61, (2, 9)))
    shapes = hf._shapes(jax.eval_shape(Transformer(padded).init, jax.random.key(0), toks))
    params = jax.tree.map(lambda x: rng.standard_normal(x.shape).astype(np.float32) * 0.3,
                          shapes["params"])

    @jax.jit
    def both(params, t):
        small = dict(params, embed={"embedding": params["embed"]["embedding"][:61]},
                     lm_head={"kernel": params["lm_head"]["kernel"][:, :61]})
        lp = Transformer(padded).apply({"params": params}, t[:, :-1])
        ls = Transformer(c).apply({"params": small}, t[:, :-1])
        return lp, ls, cross_entropy(lp, t[:, 1:]), cross_entropy(ls, t[:, 1:])
    lp, ls, loss_p, loss_s = jax.device_get(both(params, toks))
    assert lp.shape[-1] == 64 and np.all(lp[..., 61:] == PAD_LOGIT)
    np.testing.assert_allclose(lp[..., :61], ls, rtol=0, atol=1e-6)
    assert abs(loss_p - loss_s) < 1e-6 and loss_s > 1.0


# ------------------------------------------------------------------------------- slow

@pytest.mark.slow
@pytest.mark.parametrize("scaling", list(R.SCALINGS))
@pytest.mark.parametrize("base,tied", [("llama2", True), ("llama3", False)])
def test_import_matrix_no_mesh(tmp_path, base, scaling, tied):
    cfg = dict(R.LLAMA2 if base == "llama2" else R.LLAMA3, tie_word_embeddings=tied,
               rope_scaling=R.SCALINGS[scaling])
    _check(tmp_path, cfg)


@pytest.mark.slow
@pytest.mark.parametrize("scaling,layout,tied", [
    ("none", "data_tensor", False), ("linear", "ring", True), ("yarn", "tokenring", False),
    ("llama3", "data_tensor", True), ("dynamic", "ring", False)])
def test_import_matrix_on_mesh(tmp_path, scaling, layout, tied):
    mesh, att = {"data_tensor": (make_mesh(data=4, tensor=2), None),
                 "ring": (make_mesh(seq=4, tensor=2), "ring"),
                 "tokenring": (make_mesh(data=2, seq=2, tensor=2), "tokenring")}[layout]
    cfg = dict(R.LLAMA3, tie_word_embeddings=tied, rope_scaling=R.SCALINGS[scaling])
    _check(tmp_path, cfg, mesh, att)


@pytest.mark.slow
def test_logits_match_transformers_flax_llama(tmp_path):
    """Where transformers (with its Flax Llama, e.g. 4.46.x) is installed: its logits on the
    same checkpoint (plain RoPE; its Flax port has no rope_scaling)."""
    try:
        from transformers import FlaxLlamaForCausalLM
    except ImportError as e:
        pytest.skip(f"transformers' FlaxLlamaForCausalLM is not installed ({e}); this optional "
                    f"check compares against it when present")
    cfg = dict(R.LLAMA3)
    R.write_checkpoint(tmp_path, cfg)
    model = FlaxLlamaForCausalLM.from_pretrained(tmp_path, dtype=jnp.float32)
    toks = _tokens(cfg)
    theirs = np.asarray(model(toks).logits)
    apply, params = hf.load(tmp_path)
    np.testing.assert_allclose(np.asarray(apply(params, toks)), theirs, atol=TOL, rtol=0)
