"""`train.profile` writes a jax.profiler trace of exactly the configured steps;
`metrics.wandb` logs metrics.jsonl's records to Weights & Biases (offline here) into one run
id across restarts; a missing wandb package is said once."""
import json
import sys

import pytest

from jaxpar.train.config import Config, ConfigError
from jaxpar.train.checks import validate


def tiny(run_dir, **sections) -> Config:
    base = Config().replace(
        model=dict(layers=1, embed=32, heads=4, kv_heads=2, mlp=64),
        train=dict(steps=4, batch_size=8, seq_len=32, run_dir=str(run_dir), log_every=1),
        mesh=dict(data=8), eval=dict(every=0, batches=1, sample_bytes=0),
        checkpoint=dict(every=2, keep=2))
    return base.replace(**sections)


@pytest.mark.parametrize("section,raw,words", [
    ("train", {"profile": {"steps": 2}}, "train.profile.start is required"),
    ("train", {"profile": {"start": 0}}, "train.profile.start=0 must be an int >= 1"),
    ("train", {"profile": {"start": 2, "every": 3}}, "unknown key train.profile.every"),
    ("train", {"profile": {"start": 2, "process": "one"}}, "train.profile.process='one'"),
    ("metrics", {"wandb": {"mode": "offline"}}, "metrics.wandb.project is required"),
    ("metrics", {"wandb": {"project": "p", "mode": "cloud"}}, "metrics.wandb.mode='cloud'"),
])
def test_bad_profile_and_wandb_keys_are_one_line(tmp_path, section, raw, words):
    with pytest.raises(ConfigError) as e:
        validate(tiny(tmp_path).replace(**{section: raw}), 8)
    assert words in str(e.value) and "\n" not in str(e.value)


def test_profile_traces_the_steps_and_wandb_logs_the_records(tmp_path):
    pytest.importorskip("wandb")
    from jaxpar.train.run import train

    cfg = tiny(tmp_path, train=dict(profile={"start": 2, "steps": 2}),
               metrics=dict(wandb={"project": "jaxpar-tests", "mode": "offline"}))
    train(cfg)
    traces = list((tmp_path / "profile" / "process_0").rglob("*.xplane.pb"))
    assert traces and all(t.stat().st_size > 0 for t in traces)
    run_id = (tmp_path / "wandb_id.txt").read_text().strip()
    runs = list((tmp_path / "wandb").glob(f"offline-run-*-{run_id}"))
    assert len(runs) == 1 and list(runs[0].glob(f"run-{run_id}.wandb"))
    recs = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs if "loss" in r] == [1, 2, 3, 4]
    data = next(runs[0].glob(f"run-{run_id}.wandb")).read_bytes()
    assert b"grad_norm" in data and b"jaxpar-tests" in data  # the records and the project
    # a resume (here: the finished run started again) logs into the same run id
    train(cfg)
    assert (tmp_path / "wandb_id.txt").read_text().strip() == run_id
    assert all(p.name.endswith(run_id) for p in (tmp_path / "wandb").glob("offline-run-*"))


def test_a_missing_wandb_is_said_once(tmp_path, monkeypatch, capsys):
    from jaxpar.train.metrics import MetricsWriter
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb -> ImportError
    w = MetricsWriter(tmp_path, total_steps=3, start_step=0,
                      wandb={"project": "p", "mode": "offline"})
    w.write({"step": 1, "loss": 1.0})
    w.close()
    out = capsys.readouterr().out
    assert out.count("wandb is not installed") == 1
    assert json.loads((tmp_path / "metrics.jsonl").read_text())["loss"] == 1.0
