"""What a continued-pretraining run checks before it builds anything: a broken HF folder
(truncated safetensors, a missing tensor) is one line and exit 2; the dataset's tokenizer is
the model's (content hash), byte data with a tokenized model and a too-large model.vocab are
refused unless data.tokenizer_mismatch says why; prepare's BOS/EOS per document; from-hf on
any device count."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml
from tokenizers import Tokenizer, models, pre_tokenizers, processors

import hf_reference as R
from jaxpar import convert
from jaxpar.data import DEFAULT_CORPUS
from jaxpar.data import prepare as prep
from jaxpar.data.tokenizer import load_tokenizer
from jaxpar.train.__main__ import main as train_main

HF = dict(R.LLAMA3, vocab_size=259, max_position_embeddings=16)
RUN = ["mesh.data=8", "train.batch_size=8", "train.seq_len=16", "train.steps=1",
       "eval.sample_bytes=0"]


def one_line(capsys, fn, argv, *words):
    assert fn(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    for w in words:
        assert w in err, err
    return err


def word_tokenizer(path, words, bos: str | None = "<s>"):
    """A WordLevel tokenizer.json whose post-processor puts `bos` before every text."""
    vocab = {w: i for i, w in enumerate(["<s>", "</s>", "[UNK]", *words])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    if bos:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", special_tokens=[(bos, vocab[bos])])
    tok.save(str(path))
    return path


@pytest.fixture()
def hf_dir(tmp_path):
    R.write_checkpoint(tmp_path / "hf", HF)
    return tmp_path / "hf"


def test_truncated_safetensors_and_missing_tensor_are_one_line(tmp_path, hf_dir, capsys):
    st = hf_dir / "model.safetensors"
    good = st.read_bytes()
    st.write_bytes(good[:len(good) // 2])
    cfg = [f"model.init_from={hf_dir}", f"train.run_dir={tmp_path / 'run'}", *RUN]
    one_line(capsys, train_main, [str(tmp_path / "none.yaml"), *cfg], "none.yaml")  # no file
    (tmp_path / "c.yaml").write_text("{}\n")
    one_line(capsys, train_main, [str(tmp_path / "c.yaml"), *cfg], str(st), "safetensors")
    one_line(capsys, convert.main, ["from-hf", str(hf_dir), str(tmp_path / "out")], str(st))

    from safetensors.numpy import load_file, save_file

    st.write_bytes(good)
    tensors = load_file(st)
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, st)
    one_line(capsys, train_main, [str(tmp_path / "c.yaml"), *cfg],
             "model.layers.1.mlp.up_proj.weight", "missing")
    tensors["model.layers.1.mlp.up_proj.weight"] = np.zeros((47, 32), np.float32)
    save_file(tensors, st)
    one_line(capsys, train_main, [str(tmp_path / "c.yaml"), *cfg],
             "model.layers.1.mlp.up_proj.weight", "[47, 32]", "[48, 32]")


def test_from_hf_without_a_mesh_uses_every_device(tmp_path, hf_dir):
    """8 host devices (conftest) and no mesh.* key: the run folder is written, with all
    devices on the data axis and a batch it divides."""
    assert convert.main(["from-hf", str(hf_dir), str(tmp_path / "run")]) == 0
    cfg = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert cfg["mesh"]["data"] == 8 and cfg["mesh"]["tensor"] == 1
    assert cfg["train"]["batch_size"] == 8 and cfg["model"]["vocab"] == 259
    assert (tmp_path / "run" / "checkpoints" / "0").is_dir()
    assert convert._default_mesh([], 3) == ["mesh.data=3", "train.batch_size=6"]
    assert convert._default_mesh(["mesh.tensor=2"], 8) == []


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "small.txt"
    text = DEFAULT_CORPUS.read_text()[:20_000]
    path.write_text(text[:text.rindex("\n\n")])
    return path


def test_dataset_tokenizer_must_be_the_models(tmp_path, corpus, capsys):
    words = sorted(set(corpus.read_text().split()))[:300]
    mine = word_tokenizer(tmp_path / "mine.json", words)
    ds = tmp_path / "ds"
    prep.prepare([corpus], ds, tokenizer=str(mine), progress=False)
    V = load_tokenizer(mine).vocab_size
    model = tmp_path / "model"
    R.write_checkpoint(model, dict(HF, vocab_size=V + 5))  # a padded release vocab
    base = [str(tmp_path / "c.yaml"), f"model.init_from={model}", f"data.path={ds}",
            f"train.run_dir={tmp_path / 'run'}", *RUN]
    (tmp_path / "c.yaml").write_text("{}\n")

    # the same tokenizer, reformatted (content hash, not bytes): accepted
    (model / "tokenizer.json").write_text(json.dumps(json.loads(mine.read_text()), indent=4))
    from jaxpar.train.config import load_config
    from jaxpar.train.checks import validate

    validate(load_config(None, base[1:]), 8)
    # another tokenizer (one word different): both named, exit 2
    word_tokenizer(model / "tokenizer.json", words[:-1] + ["zzz"])
    err = one_line(capsys, train_main, base, "ds/tokenizer.json", "model/tokenizer.json",
                   "data.tokenizer_mismatch")
    assert err.count("sha256") == 2
    validate(load_config(None, base[1:] + ["data.tokenizer_mismatch=added domain words"]), 8)
    # byte data with a model that has a tokenizer
    one_line(capsys, train_main, [b for b in base if not b.startswith("data.path")],
             "read as bytes", "tokenizer.json")
    # a prepared dataset that lost its tokenizer
    (ds / "tokenizer.json").unlink()
    one_line(capsys, train_main, base, "lacks its tokenizer tokenizer.json")


def test_model_vocab_larger_than_the_data_needs_a_reason(tmp_path, capsys):
    argv = [str(tmp_path / "c.yaml"), "model.vocab=512", "mesh.data=8",
            f"train.run_dir={tmp_path / 'r'}"]
    (tmp_path / "c.yaml").write_text("{}\n")
    one_line(capsys, train_main, argv, "model.vocab=512", "256", "data.tokenizer_mismatch")
    from jaxpar.train.config import load_config
    from jaxpar.train.checks import validate

    validate(load_config(None, argv[1:] + ["data.tokenizer_mismatch=reserved ids"]), 8)


def test_prepare_bos_eos_per_document(tmp_path, corpus, capsys):
    words = sorted(set(corpus.read_text().split()))
    tok_file = word_tokenizer(tmp_path / "t.json", words)
    assert load_tokenizer(tok_file).eos_id is None  # the post-processor adds no EOS
    (tmp_path / "tokenizer_config.json").write_text('{"eos_token": {"content": "</s>"}}')
    tok = load_tokenizer(tok_file)  # an HF folder's config names it
    assert (tok.bos_id, tok.eos_id, tok.adds) == (0, 1, (True, False))
    docs = [d for d in corpus.read_text().split("\n\n") if d]
    split = [prep.is_eval(0, i, 0.05) for i in range(len(docs))]

    def check(out, bos, eos):
        m = json.loads((out / "manifest.json").read_text())
        assert (m["tokenizer"]["add_bos"], m["tokenizer"]["add_eos"]) == (bos, eos)
        assert m["tokenizer"]["bos_id"] == 0
        toks = np.fromfile(out / "train.bin", m["dtype"])
        offsets = np.load(out / "train_docs.npy")
        train_docs = [d for d, e in zip(docs, split) if not e]
        for i, d in enumerate(train_docs):
            want = [0] * bos + tok.encode(d) + [1] * eos
            assert toks[offsets[i]:offsets[i + 1]].tolist() == want
        return m

    # default: what the post-processor adds (BOS, no EOS)
    prep.prepare([corpus], tmp_path / "a", tokenizer=str(tok_file), progress=False)
    m = check(tmp_path / "a", True, False)
    assert m["tokenizer"]["vocab_size"] == tok.vocab_size and m["tokenizer"]["content_sha256"]
    ev = m["splits"]["eval"]  # decoded bytes count text only, not the BOS's "<s>"
    eval_docs = [d for d, e in zip(docs, split) if e]
    assert ev["decoded_bytes"] == sum(len(tok.decode(tok.encode(d)).encode()) for d in eval_docs)
    assert prep.main([str(corpus), "--tokenizer", str(tok_file), "--out", str(tmp_path / "b"),
                      "--no-bos", "--eos", "--quiet", "--workers", "1"]) == 0
    check(tmp_path / "b", False, True)
    one_line(capsys, prep.main, [str(corpus), "--tokenizer", "bytes", "--bos", "--out",
                                 str(tmp_path / "c"), "--quiet"], "--bos", "no BOS")
    assert not (tmp_path / "c").exists()
    shutil.rmtree(tmp_path / "a")


def test_base_config_keys_yield_to_init_from(tmp_path, hf_dir, capsys):
    """configs/base.yaml sets model.layers=4 (the checkpoint has 2): inherited keys give way,
    the user's own file and command line must agree."""
    from jaxpar.train.config import ConfigError, load_config

    base = Path(__file__).resolve().parent.parent / "configs" / "base.yaml"
    (tmp_path / "b.yaml").write_text("model: {layers: 4, embed: 128, dtype: bfloat16}\n")
    (tmp_path / "c.yaml").write_text(f"base: {base}\nmodel: {{init_from: {hf_dir}}}\n")
    m = load_config(tmp_path / "c.yaml").model
    assert (m.layers, m.embed, m.heads, m.kv_heads, m.vocab) == (2, 32, 4, 2, 259)
    (tmp_path / "d.yaml").write_text(f"base: b.yaml\nmodel: {{init_from: {hf_dir}}}\n")
    m = load_config(tmp_path / "d.yaml").model
    assert m.layers == 2 and m.embed == 32 and m.dtype == "bfloat16"  # dtype is the run's
    with pytest.raises(ConfigError, match="model.layers=4 conflicts"):
        load_config(tmp_path / "d.yaml", ["model.layers=4"])
    (tmp_path / "e.yaml").write_text(f"base: b.yaml\nmodel: {{init_from: {hf_dir}, "
                                     f"embed: 128}}\n")
    with pytest.raises(ConfigError, match="model.embed=128 conflicts"):
        load_config(tmp_path / "e.yaml")


def test_transformers_5_rope_parameters_are_read():
    """transformers 5 saves one rope_parameters dict (with rope_theta) instead of rope_theta +
    rope_scaling; "default" is no scaling (tests/test_hf_transformers.py imports such files)."""
    from jaxpar import hf

    v5 = {k: v for k, v in HF.items() if k != "rope_theta"}
    keys = hf.model_keys(dict(v5, rope_parameters={"rope_theta": 5e5, "rope_type": "default"}))
    assert keys["rope_base"] == 5e5 and keys["rope_scaling"] is None
    yarn = {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4,
            "original_max_position_embeddings": 16, "beta_fast": None}
    keys = hf.model_keys(dict(v5, rope_parameters=yarn))
    assert keys["rope_base"] == 1e4
    assert keys["rope_scaling"] == {"rope_type": "yarn", "factor": 4.0,
                                    "original_max_position_embeddings": 16}
    with pytest.raises(ValueError, match="partial_rotary_factor"):
        hf.model_keys(dict(v5, rope_parameters={"rope_type": "default", "rope_theta": 1e4,
                                                "partial_rotary_factor": 0.5}))
