"""Hugging Face checkpoints in runs: `model.init_from` (config keys, conflicts, weights), the
`jaxpar-convert` CLI both ways, and continued pretraining from an imported checkpoint."""
from __future__ import annotations

import json

import ml_dtypes
import numpy as np
import pytest

import hf_reference as R
from jaxpar import convert
from jaxpar.train import load_config, train
from jaxpar.train.__main__ import main as train_main

# byte-level data: token ids 0..255, so the checkpoint's vocab must cover them; 259 is not
# divisible by a tensor axis of 2 (padded to 260)
HF = dict(R.LLAMA3, vocab_size=259, max_position_embeddings=16)
RUN = ["train.batch_size=4", "train.log_every=1", "eval.sample_bytes=0", "eval.batches=1",
       "checkpoint.keep=1"]


def _same_bytes(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].tobytes() == b[k].tobytes(), k


def test_init_from_sets_the_model_section(tmp_path):
    R.write_checkpoint(tmp_path, dict(HF, tie_word_embeddings=True,
                                      rope_scaling=R.SCALINGS["yarn"]))
    cfg = load_config(None, [f"model.init_from={tmp_path}", "model.layers=2"])
    m = cfg.model
    assert (m.layers, m.embed, m.heads, m.kv_heads, m.head_dim, m.mlp, m.vocab) == (
        2, 32, 4, 2, 8, 48, 259)
    assert m.rope_base == 500000.0 and m.rms_norm_eps == 1e-6 and m.tie_embeddings
    assert m.rope_scaling == R.SCALINGS["yarn"] and m.max_positions == 16
    assert cfg.replace(train={"steps": 3}).model == m  # resolved keys are consistent
    # context extension: rope_scaling / rope_base override the checkpoint's
    ext = load_config(None, [f"model.init_from={tmp_path}", "model.rope_base=1e6",
                             "model.rope_scaling={rope_type: linear, factor: 8.0}"])
    assert ext.model.rope_scaling == {"rope_type": "linear", "factor": 8.0}
    assert ext.model.rope_base == 1e6 and ext.model.layers == 2


def test_init_from_conflicting_key_is_one_line_exit_2(tmp_path, capsys):
    R.write_checkpoint(tmp_path / "hf", HF)
    (tmp_path / "c.yaml").write_text("model:\n  layers: 3\n")
    assert train_main([str(tmp_path / "c.yaml"), f"model.init_from={tmp_path / 'hf'}"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "model.layers=3" in err and "num_hidden_layers=2" in err, err


@pytest.mark.slow
def test_convert_round_trip_and_init_from_lr0_export_equal_input(tmp_path):
    """from-hf -> to-hf is bit-exact (bf16, 2 safetensors files); a TokenRing run (scanned
    layers) with model.init_from and train.lr=0 exports weights equal to the input."""
    src = tmp_path / "hf"
    R.write_checkpoint(src, HF, dtype=ml_dtypes.bfloat16, shards=2)
    (src / "tokenizer.json").write_text("{}")
    mesh = ["mesh.data=2", "mesh.seq=2", "mesh.tensor=2", "attention.impl=tokenring",
            "train.seq_len=32",  # byte data with a (placeholder) tokenizer.json: say why
            "data.tokenizer_mismatch=a test checkpoint trained on bytes"]
    assert convert.main(["from-hf", str(src), str(tmp_path / "run0"), *mesh, *RUN]) == 0
    assert convert.main(["to-hf", str(tmp_path / "run0"), str(tmp_path / "back0")]) == 0
    _same_bytes(R.read_tensors(src), R.read_tensors(tmp_path / "back0"))
    assert (tmp_path / "back0" / "tokenizer.json").is_file()
    back = json.loads((tmp_path / "back0" / "config.json").read_text())
    assert back["torch_dtype"] == "bfloat16" and back["bos_token_id"] == 1

    cfg = load_config(None, [f"model.init_from={src}", f"train.run_dir={tmp_path / 'run'}",
                             "train.steps=2", "train.lr=0", "model.scan_layers=true", *mesh,
                             *RUN])  # scanned: params stacked on read, unstacked on export
    train(cfg)  # (not quiet: the run folder gets its config.yaml)
    assert convert.main(["to-hf", str(tmp_path / "run" / "checkpoints" / "2"),
                         str(tmp_path / "back")]) == 0
    _same_bytes(R.read_tensors(src), R.read_tensors(tmp_path / "back"))


@pytest.mark.slow
def test_continued_pretraining_at_4x_context_lowers_the_loss(tmp_path):
    """An imported checkpoint (max_position_embeddings=16) trained at 64 tokens (4x) with
    linear RoPE scaling and TokenRing: the loss falls well below the imported model's."""
    src = tmp_path / "hf"
    R.write_checkpoint(src, dict(HF, rope_scaling={"rope_type": "linear", "factor": 4.0}))
    cfg = load_config(None, [f"model.init_from={src}", f"train.run_dir={tmp_path / 'run'}",
                             "mesh.data=2", "mesh.seq=2", "mesh.tensor=2",
                             "attention.impl=tokenring", "train.seq_len=64", "train.steps=30",
                             "train.lr=3e-3", "eval.every=0", *RUN])
    summary = train(cfg)
    first = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    assert first["step"] == 1
    assert summary["final_eval_loss"] < first["loss"] - 1.0, (first, summary["final_eval_loss"])
    assert np.isfinite(summary["final_eval_loss"])
