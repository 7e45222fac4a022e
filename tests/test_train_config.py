"""Run configs: `base:` inheritance, overrides, and one-line errors for bad input."""
import subprocess
import sys
from pathlib import Path

import pytest

from jaxpar.train.config import ConfigError, load_config
from jaxpar.train.checks import validate

ROOT = Path(__file__).resolve().parent.parent


def write(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(text)
    return p


def test_inheritance_and_overrides(tmp_path):
    write(tmp_path, "a.yaml", "model: {layers: 6, embed: 64}\ntrain: {lr: 1.0e-3, steps: 10}\n")
    write(tmp_path, "b.yaml", "base: a.yaml\nmodel: {layers: 2}\nmesh: {data: 8}\n")
    cfg = load_config(tmp_path / "b.yaml", ["train.steps=5", "attention.impl=ring",
                                            "train.lr=2e-3", "data.path=null"])
    assert cfg.model.layers == 2 and cfg.model.embed == 64   # child over base, base kept
    assert cfg.train.lr == 2e-3 and cfg.train.steps == 5      # "2e-3" read as a float
    assert cfg.attention.impl == "ring" and cfg.mesh.data == 8 and cfg.data.path is None
    assert cfg.model.heads == 4                                # dataclass default


def test_shipped_configs_are_valid():
    for path in sorted((ROOT / "configs").glob("*.yaml")):
        cfg = load_config(path)
        if cfg.mesh.replica * cfg.mesh.data * cfg.mesh.fsdp * cfg.mesh.seq \
                * cfg.mesh.seq_inner * cfg.mesh.tensor == 8:
            validate(cfg, 8)


BAD = [  # (overrides, words the one-line message must contain)
    (["model.layerz=4"], ["model.layerz", "did you mean 'model.layers'"]),
    (["modle.layers=4"], ["unknown section 'modle'", "did you mean 'model'"]),
    (["model.layers=four"], ["model.layers='four'", "must be int"]),
    (["model.layers=2.5"], ["model.layers=2.5", "must be int"]),
    (["diloco.enabled=3"], ["diloco.enabled=3", "must be bool"]),
    (["train.lr=fast"], ["train.lr='fast'", "must be float"]),
    (["model.layers=0"], ["model.layers=0", "positive"]),
    (["train.batch_size=-2"], ["train.batch_size=-2", "positive"]),
    (["mesh.tensor=0"], ["mesh.tensor=0", "positive"]),
    (["train.lr=-1"], ["train.lr=-1", ">= 0"]),
    (["checkpoint.every=-1"], ["checkpoint.every=-1", ">= 0"]),
    (["mesh.data=3"], ["needs 3 devices", "8 are available", "data=8"]),
    (["mesh.data=4", "mesh.tensor=4"], ["needs 16 devices"]),
    (["attention.impl=rign"], ["attention.impl='rign'", "did you mean 'ring'", "tokenring"]),
    (["overlap.mode=fast"], ["overlap.mode='fast'", "collective_matmul"]),
    (["mesh.data=1", "mesh.seq=8", "attention.impl=ulysses"],
     ["attention.impl=ulysses", "mesh.seq=8", "would fit"]),
    (["mesh.data=1", "mesh.seq_inner=8", "attention.impl=hybrid"],
     ["mesh.seq_inner=8", "would fit"]),
    (["mesh.data=4", "mesh.seq=2", "attention.impl=ring", "train.seq_len=99"],
     ["train.seq_len=99", "divisible"]),
    (["mesh.data=2", "mesh.seq=4", "attention.impl=ring", "train.seq_len=36"],
     ["train.seq_len=36", "zigzag"]),
    (["mesh.data=4", "mesh.seq=2", "attention.impl=dense"], ["attention.impl=dense", "mesh.seq=1"]),
    (["mesh.data=4", "mesh.seq_inner=2", "attention.impl=ring"],
     ["mesh.seq_inner=2", "hybrid"]),
    (["mesh.data=2", "mesh.tensor=4", "model.heads=12", "model.kv_heads=6", "model.head_dim=8"],
     ["model.kv_heads=6", "mesh.tensor=4"]),  # kv_heads=2 fits now: replicated (kv_replication)
    (["model.heads=6", "model.kv_heads=4"], ["model.heads=6", "kv_heads"]),
    (["mesh.data=8", "train.batch_size=4"], ["train.batch_size=4", "mesh.replica·data·fsdp=8"]),
    (["mesh.data=1", "mesh.fsdp=8", "train.batch_size=8", "train.microbatches=2"],
     ["train.batch_size=8", "train.microbatches=2", "mesh.replica·data·fsdp=8", "in [1]"]),
    (["train.microbatches=0"], ["train.microbatches=0", "positive"]),
    (["mesh.data=1", "mesh.fsdp=8", "model.embed=36", "model.heads=2", "model.kv_heads=2",
      "train.batch_size=8"], ["model.embed=36", "mesh.fsdp=8", "embed -> fsdp"]),
    (["sharding.rules=5"], ["sharding.rules=5", "must be dict"]),
    (["sharding.rules.mlp=mesh"], ["sharding.rules['mlp']='mesh'", "fsdp", "tensor"]),
    (["sharding.rules.hidden=tensor"], ["sharding.rules.hidden", "no logical axis 'hidden'"]),
    (["mesh.data=4", "mesh.tensor=2", "sharding.rules.heads=null"],
     ["sharding.rules.heads=None", "collective matmuls", "heads: 'tensor'"]),
    (["mesh.data=4", "mesh.seq=2", "attention.impl=ring", "sharding.rules.length=seq_inner"],
     ["sharding.rules.length='seq_inner'", "seq·seq_inner"]),
    (["sharding.rules.batch.x=data"], ["sharding.rules.batch.x", "section.key"]),
    (["mesh.data=4", "mesh.replica=2", "diloco.enabled=true", "diloco.sync_every=10",
      "diloco.num_fragments=4"], ["diloco.sync_every=10", "num_fragments=4", "valid"]),
    (["mesh.data=4", "mesh.replica=2", "diloco.enabled=true", "diloco.sync_every=8",
      "diloco.num_fragments=2", "diloco.overlap_steps=4"], ["diloco.overlap_steps=4", "< "]),
    (["diloco.quantize=fp3"], ["diloco.quantize='fp3'", "fp4_e3m0"]),
    (["diloco.enabled=true", "mesh.data=4", "mesh.replica=2", "diloco.alpha=1.5"],
     ["diloco.alpha=1.5", "[0, 1]"]),
    (["data.path=/no/such/corpus.txt"], ["data.path='/no/such/corpus.txt'", "does not exist"]),
    (["train.run_dir=/etc/hostname/run"], ["train.run_dir", "is a file"]),
    (["model.dtype=float16"], ["model.dtype='float16'", "bfloat16"]),
    (["model.embed=100", "model.heads=3", "model.kv_heads=1"], ["model.embed=100", "heads=3"]),
    (["layers=4"], ["section.key"]),
    (["model.layers"], ["section.key=value"]),
]


@pytest.mark.parametrize("overrides,words", BAD, ids=[" ".join(o) for o, _ in BAD])
def test_bad_config_is_one_clear_line(overrides, words, tmp_path):
    with pytest.raises(ConfigError) as e:
        cfg = load_config(ROOT / "configs" / "base.yaml",
                          [f"train.run_dir={tmp_path / 'run'}", "mesh.data=8"] + overrides)
        validate(cfg, 8)
    msg = str(e.value)
    assert "\n" not in msg
    for w in words:
        assert w in msg, (w, msg)


def test_rules_from_yaml_and_command_line(tmp_path):
    """`sharding.rules` from YAML (merged over `base:`) and `sharding.rules.NAME=...` on the
    command line reach the run's table; the built-in decoder takes what it can."""
    from jaxpar.train.model import run_rules

    write(tmp_path, "a.yaml", "sharding: {rules: {embed: null, vocab: [tensor]}}\n")
    write(tmp_path, "b.yaml", "base: a.yaml\nsharding:\n  rules: {heads: null}\n")
    cfg = load_config(tmp_path / "b.yaml", ["sharding.rules.mlp=null",
                                            "sharding.rules.embed=[data, fsdp]"])
    assert cfg.sharding.rules == {"embed": ["data", "fsdp"], "vocab": ["tensor"],
                                  "heads": None, "mlp": None}
    table = dict(run_rules(cfg))  # mesh.tensor=1: heads/mlp off `tensor` change nothing
    assert table["embed"] == ("data", "fsdp") and table["mlp"] is None
    assert table["vocab"] == ("tensor",) and table["batch"] == ("replica", "data", "fsdp")
    # on a tensor-parallel mesh the same override is refused in one line
    with pytest.raises(ConfigError, match="sharding.rules.heads=None.*collective matmuls"):
        validate(cfg.replace(mesh={"data": 4, "tensor": 2}, train={"run_dir": str(tmp_path)}), 8)


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, "bad.yaml", "model: {layers: [\n"))
    with pytest.raises(ConfigError, match="inherits from itself"):
        load_config(write(tmp_path, "loop.yaml", "base: loop.yaml\n"))


def test_cli_bad_config_exits_2_without_traceback(tmp_path):
    """The command line: one line on stderr, exit code 2, nothing compiled."""
    for extra in (["model.layerz=4"], ["mesh.data=3"]):
        r = subprocess.run([sys.executable, "-m", "jaxpar.train", str(ROOT / "configs/base.yaml"),
                            f"train.run_dir={tmp_path}"] + extra,
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 2, r.stderr
        assert r.stderr.count("\n") == 1 and r.stderr.startswith("error: "), r.stderr
        assert "Traceback" not in r.stderr


def test_every_config_key_is_classified_for_resume():
    """A new key must say whether a resume may change it (jaxpar.train.config)."""
    from jaxpar.train.config import RESUME_LAYOUT, RESUME_MATH, RESUME_SAFE, all_keys

    listed = [*RESUME_SAFE, *RESUME_MATH, *RESUME_LAYOUT]
    assert len(listed) == len(set(listed)), "a key classified twice"
    assert sorted(listed) == sorted(all_keys()), (
        f"unclassified: {sorted(set(all_keys()) - set(listed))}; "
        f"stale: {sorted(set(listed) - set(all_keys()))}")
