"""Bad input: one line naming the key, exit 2, nothing compiled (issue 12, part A).

A table of configs that parse and fit the mesh but used to train garbage or fail after
compiling (tiny corpus, tiny eval split, vocab < 256, clip <= 0, b2, outer optimizer, empty
prompt, ...), property tests of the override parser and of `validate` (hypothesis), and the
library's argument checks (`sequence_parallel_attention`, `streaming_diloco`)."""
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import optax
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from jaxpar import make_mesh, sequence_parallel_attention, streaming_diloco
from jaxpar.train.checks import validate
from jaxpar.train.config import ConfigError, all_keys, from_dict, load_config, parse_override
from jaxpar.train.loop import Run

ROOT = Path(__file__).resolve().parent.parent
DILOCO = ["mesh.data=4", "mesh.replica=2", "diloco.enabled=true"]


@pytest.fixture(scope="module")
def corpora(tmp_path_factory):
    d = tmp_path_factory.mktemp("corpora")
    (d / "tiny.txt").write_bytes(b"x" * 100)
    (d / "empty").mkdir()
    (d / "small").mkdir()
    (d / "small" / "a.txt").write_bytes(b"y" * 1000)
    (d / "small" / "b.txt").write_bytes(b"z" * 1000)
    return d


BAD = [  # (overrides, words the one-line message must contain); {c} = the corpora folder
    (["model.init_from=1"], ["model.init_from", "1"]),  # a number read as a path (hypothesis)
    (["train.clip=0"], ["train.clip=0.0", "> 0"]),
    (["train.clip=-1"], ["train.clip=-1.0", "reverses"]),
    (["train.b2=1"], ["train.b2=1.0", "[0, 1)"]),
    (["train.b2=-0.1"], ["train.b2=-0.1", "[0, 1)"]),
    (["train.b2=.nan"], ["train.b2=nan", "finite"]),
    (["train.min_lr_ratio=1.5"], ["train.min_lr_ratio=1.5", "[0, 1]"]),
    (["train.min_lr_ratio=-0.1"], ["train.min_lr_ratio=-0.1", "[0, 1]"]),
    (["train.weight_decay=-0.1"], ["train.weight_decay=-0.1", ">= 0"]),
    (["train.weight_decay=1000"], ["train.lr·weight_decay=3", "< 1"]),
    (["train.lr=.inf"], ["train.lr=inf", "finite"]),
    (["train.lr=1e400"], ["train.lr=inf", "finite"]),
    (["train.lr=.nan"], ["train.lr=nan", "> 0"]),
    (["model.rope_base=.inf"], ["model.rope_base=inf", "finite"]),
    (["train.seed=9223372036854775808"], ["train.seed=9223372036854775808", "2**63"]),
    (["train.seed=-1"], ["train.seed=-1", ">= 0"]),
    (["train.peak_tflops=-1"], ["train.peak_tflops=-1.0", ">= 0"]),
    (["train.steps=0"], ["train.steps=0", "positive"]),
    (["train.log_every=0"], ["train.log_every=0", "positive"]),
    (["train.warmup=-1"], ["train.warmup=-1", ">= 0"]),
    (["train.run_dir=[1, 2]"], ["train.run_dir=[1, 2]", "must be str"]),
    (["diloco.outer_lr=0"], ["diloco.outer_lr=0.0", "> 0"]),
    (["diloco.outer_lr=-0.7"], ["diloco.outer_lr=-0.7", "> 0"]),
    (["diloco.outer_momentum=1"], ["diloco.outer_momentum=1.0", "[0, 1)"]),
    (["diloco.outer_momentum=-0.5"], ["diloco.outer_momentum=-0.5", "[0, 1)"]),
    (DILOCO + ["diloco.alpha=-0.1"], ["diloco.alpha=-0.1", "[0, 1]"]),
    (DILOCO + ["diloco.sync_every=0"], ["diloco.sync_every=0", "positive"]),
    (DILOCO + ["diloco.num_fragments=0"], ["diloco.num_fragments=0", "positive"]),
    (DILOCO + ["model.layers=2", "diloco.sync_every=8", "diloco.num_fragments=4"],
     ["diloco.num_fragments=4", "model.layers=2"]),
    (DILOCO + ["diloco.overlap_steps=-1"], ["diloco.overlap_steps=-1", ">= 0"]),
    (["attention.ring_impl=tokenring"], ["attention.ring_impl='tokenring'", "impl=hybrid"]),
    (["attention.ring_impl=flat"], ["attention.ring_impl='flat'", "tokenring"]),
    (["overlap.direction=bidi"], ["overlap.direction='bidi'", "overlap.mode"]),
    (["overlap.direction=both"], ["overlap.direction='both'", "bidi"]),
    (["eval.prompt="], ["eval.prompt=''", "eval.sample_bytes=0"]),
    (["eval.prompt=null"], ["eval.prompt=None", "must be str"]),
    (["eval.sample_bytes=-1"], ["eval.sample_bytes=-1", ">= 0"]),
    (["eval.batches=0"], ["eval.batches=0", "positive"]),
    (["eval.every=-5"], ["eval.every=-5", ">= 0"]),
    (["model.vocab=128"], ["model.vocab=128", ">= 256", "byte"]),
    (["model.vocab=255"], ["model.vocab=255", ">= 256"]),
    (["model.head_dim=3"], ["model.head_dim=3", "even"]),
    (["model.kv_heads=0"], ["model.kv_heads=0", "positive"]),
    (["model.mlp=-1"], ["model.mlp=-1", "positive"]),
    (["checkpoint.keep=0"], ["checkpoint.keep=0", "positive"]),
    (["mesh.data=2.5"], ["mesh.data=2.5", "must be int"]),
    (["data.path={c}/tiny.txt"], ["tiny.txt", "holds 100 bytes", "20·(seq_len+1)=2580"]),
    (["data.path={c}/empty"], ["empty", "empty folder"]),
    (["data.path={c}/small"], ["small", "holds 2002 bytes", "train.seq_len=128"]),
    (["data.path={c}/small", "train.seq_len=64", "data.eval_fraction=0.02"],
     ["data.eval_fraction=0.02", "leaves 41 eval", "at least 66",
      "e.g. data.eval_fraction=0.0659"]),
    (["data.eval_fraction=1e-6"], ["data.eval_fraction=1e-06", "eval bytes", "at least 130"]),
    (["data.eval_fraction=0.99999"], ["data.eval_fraction=0.99999", "train bytes"]),
    (["data.eval_fraction=0"], ["data.eval_fraction=0.0", "(0, 1)"]),
    (["data.eval_fraction=1"], ["data.eval_fraction=1.0", "(0, 1)"]),
]


def _cfg(tmp_path, overrides, corpora_dir="."):
    return load_config(ROOT / "configs" / "base.yaml",
                       [f"train.run_dir={tmp_path / 'run'}", "mesh.data=8"]
                       + [o.replace("{c}", str(corpora_dir)) for o in overrides])


@pytest.mark.parametrize("overrides,words", BAD, ids=[" ".join(o) for o, _ in BAD])
def test_bad_config_is_one_clear_line(overrides, words, tmp_path, corpora):
    with pytest.raises(ConfigError) as e:
        validate(_cfg(tmp_path, overrides, corpora), 8)
    msg = str(e.value)
    assert "\n" not in msg
    for w in words:
        assert w in msg, (w, msg)


def test_table_is_big_enough():
    assert len(BAD) >= 40


def test_fixed_configs_validate(tmp_path, corpora):
    """The nearest good values pass, so the table tests the bounds, not a blanket refusal."""
    for good in (["train.clip=1e-3", "train.b2=0", "train.min_lr_ratio=1", "train.weight_decay=0",
                  "diloco.outer_momentum=0", "model.vocab=256"],
                 ["attention.impl=hybrid", "mesh.data=2", "mesh.seq=2", "mesh.seq_inner=2",
                  "attention.ring_impl=tokenring"],
                 ["overlap.mode=collective_matmul", "overlap.direction=bidi"],
                 ["eval.prompt=", "eval.sample_bytes=0"],
                 ["data.path={c}/small", "train.seq_len=32"]):
        validate(_cfg(tmp_path, good, corpora), 8)


def test_cli_tiny_corpus_exits_2_before_compiling(tmp_path, corpora):
    r = subprocess.run([sys.executable, "-m", "jaxpar.train", str(ROOT / "configs/base.yaml"),
                        f"train.run_dir={tmp_path}", "mesh.data=8",
                        f"data.path={corpora}/tiny.txt"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    assert r.stderr.count("\n") == 1 and "holds 100 bytes" in r.stderr, r.stderr
    assert not (tmp_path / "metrics.jsonl").exists()  # nothing started


# ------------------------------------------------------------------ property tests

KEYS = all_keys()
VALUES = st.one_of(st.integers(-3, 300), st.floats(allow_nan=True, allow_infinity=True),
                   st.booleans(), st.none(), st.sampled_from(["", "ring", "x", "1e-3"]),
                   st.lists(st.integers(0, 3), max_size=2))


@settings(max_examples=60, deadline=None)
@given(st.one_of(st.text(max_size=30),
                 st.builds(lambda k, v: f"{k}={v}",
                           st.sampled_from(KEYS + ["a.b.c", "x", "sharding.rules.mlp"]),
                           st.text(max_size=12))))
def test_parse_override_never_crashes(item):
    try:
        section, name, _ = parse_override(item)
    except ConfigError as e:
        assert "\n" not in str(e)
        return
    key = item.split("=", 1)[0]
    assert key == f"{section}.{name}" or key.startswith(f"{section}.{name}.")  # mapping keys


# values near each key's bounds, so generated configs often validate
NEAR = {
    "model.layers": [1, 2], "model.embed": [16, 32, 30], "model.heads": [2, 4, 3],
    "model.kv_heads": [1, 2], "model.head_dim": [0, 8, 3], "model.mlp": [32, 64],
    "model.vocab": [256, 128, 512],
    "attention.impl": ["dense", "ring", "ulysses", "hybrid", "tokenring"],
    "attention.ring_impl": ["ring", "tokenring"], "overlap.mode": ["none", "collective_matmul"],
    "overlap.direction": ["uni", "bidi"], "diloco.enabled": [True, False],
    "diloco.sync_every": [2, 4, 3], "diloco.num_fragments": [1, 2],
    "diloco.overlap_steps": [0, 1], "diloco.alpha": [0.0, 0.5, 2.0],
    "diloco.outer_lr": [0.7, 0.0], "diloco.outer_momentum": [0.9, 1.0],
    "train.batch_size": [8, 4, 2], "train.seq_len": [32, 64, 48], "train.clip": [1.0, 0.0],
    "train.b2": [0.95, 1.0], "train.min_lr_ratio": [0.1, 2.0], "train.lr": [1e-3, 10.0],
    "train.weight_decay": [0.1, 500.0], "data.eval_fraction": [0.05, 1e-7],
    "eval.prompt": ["Hi", ""], "eval.sample_bytes": [0, 4],
}
# (mesh, attention.impl) pairs that fit 8 devices and a small model
MESHES = [((1, 8, 1, 1, 1), "dense"), ((2, 4, 1, 1, 1), "dense"), ((1, 4, 2, 1, 1), "ring"),
          ((1, 2, 2, 2, 1), "hybrid"), ((1, 4, 1, 1, 2), "dense"), ((2, 1, 2, 1, 2), "tokenring"),
          ((1, 1, 4, 1, 2), "ulysses"), ((1, 1, 2, 2, 2), "hybrid")]
SMALL = {"model": {"layers": 2, "embed": 32, "heads": 4, "kv_heads": 2, "mlp": 64},
         "train": {"seq_len": 64, "batch_size": 8, "run_dir": "runs/hypothesis-unused"}}


def _raw(mesh_impl, near, junk) -> dict:
    """A small valid config, then a few keys changed (near their bounds, or anything)."""
    (shape, impl) = mesh_impl
    raw = {"mesh": dict(zip(("replica", "data", "seq", "seq_inner", "tensor"), shape)),
           "attention": {"impl": impl}, **{k: dict(v) for k, v in SMALL.items()}}
    for key, value in {**near, **junk}.items():
        section, name = key.split(".")
        raw.setdefault(section, {})[name] = value
    return raw


NEAR_PAIRS = st.sampled_from(sorted(NEAR)).flatmap(
    lambda k: st.tuples(st.just(k), st.sampled_from(NEAR[k])))
CONFIGS = st.builds(
    _raw, st.sampled_from(MESHES),
    st.lists(NEAR_PAIRS, max_size=3).map(dict),
    st.dictionaries(st.sampled_from(KEYS), VALUES, max_size=1) | st.just({}))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(CONFIGS)
def test_validate_passes_and_builds_or_raises_config_error(raw):
    try:
        cfg = from_dict(raw)
        validate(cfg, 8)
        Run.create(cfg)  # builds mesh, rules, model functions and data; compiles nothing
    except ConfigError as e:
        assert "\n" not in str(e), str(e)


# ------------------------------------------------------------------ library arguments


def test_attention_mesh_none_is_a_type_error():
    q = jnp.ones((1, 16, 2, 8))
    with pytest.raises(TypeError, match=r"mesh must be a jax.sharding.Mesh.*got NoneType"):
        sequence_parallel_attention(q, q, q, mesh=None, impl="ring")


def test_attention_argument_types():
    q = jnp.ones((1, 16, 2, 8))
    mesh = make_mesh(seq=4, devices=jax.devices()[:4])
    with pytest.raises(TypeError, match=r"causal must be True or False, got 'yes'"):
        sequence_parallel_attention(q, q, q, mesh=mesh, impl="ring", causal="yes")
    with pytest.raises(TypeError, match=r"q must be an array \(jax or numpy\), got list"):
        sequence_parallel_attention(q.tolist(), q, q, mesh=mesh, impl="ring")
    with pytest.raises(TypeError, match=r"segment_ids must be an array.*got list"):
        sequence_parallel_attention(q, q, q, mesh=mesh, impl="ring", segment_ids=[[0] * 16])


def test_attention_unused_ring_impl_is_a_value_error():
    q = jnp.ones((1, 16, 2, 8))
    mesh = make_mesh(seq=4, devices=jax.devices()[:4])
    with pytest.raises(ValueError, match=r"ring_impl='tokenring' is only used by impl='hybrid'"):
        sequence_parallel_attention(q, q, q, mesh=mesh, impl="ring", ring_impl="tokenring")
    with pytest.raises(ValueError, match=r"ring_impl='ring' is only used by impl='hybrid'"):
        sequence_parallel_attention(q, q, q, mesh=mesh, impl="dense", ring_impl="ring")


@pytest.mark.parametrize("kw,err,words", [
    ({"num_replicas": 2.5}, TypeError, "num_replicas=2.5 must be an int"),
    ({"num_replicas": True}, TypeError, "num_replicas=True must be an int"),
    ({"sync_every": "4"}, TypeError, "sync_every='4' must be an int"),
    ({"overlap_steps": 1.0}, TypeError, "overlap_steps=1.0 must be an int"),
    ({"alpha": "0.5"}, TypeError, "alpha='0.5' must be a float"),
    ({"outer_optimizer": 0.7}, TypeError, "outer_optimizer must be an optax"),
    ({"mesh": "replica"}, TypeError, "mesh must be a jax.sharding.Mesh"),
    ({"num_replicas": 0}, ValueError, "num_replicas=0"),
    ({"alpha": 1.5}, ValueError, "alpha=1.5 must be in [0, 1]"),
])
def test_streaming_diloco_argument_checks(kw, err, words):
    args = dict(num_replicas=2, sync_every=4) | kw
    with pytest.raises(err) as e:
        streaming_diloco(optax.sgd(0.1), **args)
    assert words in str(e.value), str(e.value)


def test_streaming_diloco_inner_must_be_an_optimizer():
    with pytest.raises(TypeError, match="inner must be an optax.GradientTransformation"):
        streaming_diloco(1e-3, num_replicas=2, sync_every=4)
