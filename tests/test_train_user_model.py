"""Users' own models (`model.module=package.module:factory`), Linen and NNX, through the
trainer: sharded init, train steps equal to the same module run unsharded on one device,
eval, checkpoint/restore, the param table, DiLoCo, the CLI and its bad-spec messages."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import flax.linen as nn
import jax
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

import user_models
from train_helpers import (assert_losses_close, assert_same_steps, reference_diloco,
                           reference_steps, run_steps)
from jaxpar import sharding
from jaxpar.data import pack
from jaxpar.train.__main__ import main
from jaxpar.train.checkpoint import Checkpointer
from jaxpar.train.config import Config, load_config
from jaxpar.train.loop import Run, cross_entropy, inner_optimizer

ROOT = Path(__file__).resolve().parent.parent
STEPS = 3


def small_config(tmp_path, kind, mesh, impl="dense", **sections) -> Config:
    base = Config().replace(
        model=dict(module=f"user_models:{kind}_factory", layers=2, embed=32, heads=4, mlp=64,
                   vocab=256),  # explicit: reference() calls the factory without Run.create
        train=dict(steps=STEPS, batch_size=4, seq_len=32, lr=1e-2, warmup=1,
                   run_dir=str(tmp_path)),
        attention=dict(impl=impl), mesh=mesh, eval=dict(every=0, batches=2, sample_bytes=0))
    return base.replace(**sections) if sections else base


def host(tree):
    return jax.tree.map(lambda x: np.asarray(jax.device_get(x)), tree)


def close(a, b, rtol=1e-5, atol=1e-6):
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=rtol, atol=atol),
                 host(a), host(b))


def reference(cfg, kind, start=None):
    """(params, apply) of the same module on one device: no mesh, no rules, no sharding.
    The params are created there too unless `start` (host arrays) is given."""
    dummy = np.zeros((1, cfg.train.seq_len), np.int32)
    if kind == "linen":
        module = user_models.linen_factory(cfg, None)
        params = start if start is not None else jax.jit(
            lambda key: nn.unbox(module.init(key, dummy, dummy, dummy))["params"])(
                jax.random.key(cfg.train.seed))
        return params, lambda p, *x: module.apply({"params": p}, *x)
    made = {}

    def make():
        with nnx.use_eager_sharding(False):  # logical names need a mesh to shard eagerly
            made["graphdef"], params, rest = nnx.split(user_models.nnx_factory(cfg, None),
                                                       nnx.Param, ...)
        return nnx.to_pure_dict(params), rest

    params, rest = jax.jit(make)()
    params = start if start is not None else params
    return params, lambda p, *x: nnx.merge(made["graphdef"], p, rest)(*x)


def reference_loss(apply):
    def loss(params, b):
        return cross_entropy(apply(params, b["tokens"], b["positions"], b["segment_ids"]),
                             b["targets"])
    return loss


def plain_losses(cfg, run, kind, steps=STEPS, start=None):
    params, apply = reference(cfg, kind, start)
    tx, _ = inner_optimizer(cfg)

    @jax.jit
    def step_fn(params, opt, b):
        loss, g = jax.value_and_grad(reference_loss(apply))(params, b)
        u, opt = tx.update(g, opt, params)
        return optax.apply_updates(params, u), opt, loss

    opt, out = jax.jit(tx.init)(params), []
    for step in range(1, steps + 1):
        b = pack(run.data.batch(step, cfg.train.batch_size), zigzag=1)
        params, opt, loss = step_fn(params, opt, b)
        out.append(float(loss))
    return out, params


def mlp_kernel(params, kind):
    return params["layers_0"]["up"]["kernel"] if kind == "linen" else (
        params["layers"][0]["up"]["kernel"])


@pytest.mark.parametrize("kind", ["linen", pytest.param("nnx", marks=pytest.mark.slow)])
def test_user_model_sharded_run_equals_unsharded(kind, tmp_path):
    cfg = small_config(tmp_path, kind, dict(data=4, tensor=2))
    run = Run.create(cfg)
    assert run.model.kind == kind
    state = run.init_state()
    p0 = host(state.params)
    if kind == "nnx":  # the same values as the module created on one device (for Linen:
        close(p0, reference(cfg, kind)[0], rtol=1e-6, atol=1e-7)  # test_train_equivalence)

    # the MLP kernel is really split over `tensor`: each device holds half of its columns
    w = mlp_kernel(state.params, kind)
    assert w.sharding.spec == P("fsdp", "tensor")  # embed -> fsdp (size 1 here)
    assert {s.data.shape for s in w.addressable_shards} == {(32, 32)}
    rows = {r["path"]: r for r in run.param_table(state.params)}
    up = rows["layers_0/up/kernel" if kind == "linen" else "layers/0/up/kernel"]
    assert up["logical"] == ["embed", "mlp"] and up["spec"] == "P('fsdp', 'tensor')"
    assert up["bytes_per_device"] == 32 * 64 * 4 // 2
    emb = rows["embed/embedding"]
    assert emb["logical"] == ["vocab", "embed"] and emb["bytes_per_device"] == 256 * 32 * 4 // 2
    # 6·(non-embedding params), the attention term is the built-in model's only
    n = sum(x.size for x in jax.tree.leaves(state.params)) - 256 * 32
    assert run.flops_per_token(state.params) == 6 * n

    ckpt = Checkpointer(tmp_path, keep=2)
    losses = []
    for step in range(1, STEPS + 1):
        state, m = run.train_step(state, run.batch(step))
        losses.append(float(m["loss"]))
        if step == STEPS - 1 and kind == "nnx":
            ckpt.save(step, state, {"data_step": step})
            ckpt.wait()
    ref, ref_params = plain_losses(cfg, run, kind, start=p0)
    assert_losses_close(losses, ref)
    assert losses[-1] < losses[0]
    close(state.params, ref_params, rtol=1e-4, atol=1e-5)
    if kind == "linen":  # eval and resume of Linen dicts: test_cli_user_model, test_train_kill
        return

    ev = float(run.eval_loss(run.eval_params(state), run.eval_batches()))
    assert np.isfinite(ev) and ev < losses[0]

    # restore the step-2 checkpoint into a fresh state: step 3 gives the same loss and params
    restored, meta = ckpt.restore(STEPS - 1, state)  # `state` gives shapes and shardings
    ckpt.close()
    assert meta["data_step"] == STEPS - 1
    assert mlp_kernel(restored.params, kind).sharding.spec == P("fsdp", "tensor")
    again, m = run.train_step(restored, run.batch(STEPS))
    np.testing.assert_allclose(float(m["loss"]), losses[-1], rtol=1e-6)
    close(again.params, state.params, rtol=1e-6, atol=1e-7)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["linen", "nnx"])
def test_user_model_zigzag_ring_equals_unsharded(kind, tmp_path):
    """attention.impl=ring hands tokens over in the zigzag order (and sharded over seq); a
    model whose mask comes from positions and segment ids gives the same losses."""
    cfg = small_config(tmp_path, kind, dict(data=2, seq=2, tensor=2), impl="ring")
    run = Run.create(cfg)
    assert run.zigzag == 2
    state = run.init_state()
    state, losses = run_steps(run, state, STEPS)
    ref, _ = plain_losses(cfg, run, kind)
    assert_losses_close(losses, ref)


@pytest.mark.slow
def test_user_model_with_jaxpar_parallel_attention(tmp_path):
    """A Linen model whose attention is `parallel_attention` (TokenRing here, inside one
    shard_map) trains like the same params with plain masked attention on one device."""
    cfg = small_config(tmp_path, "linen", dict(data=2, seq=2, tensor=2), impl="tokenring",
                       model=dict(module="user_models:linen_sp_factory"))
    run = Run.create(cfg)
    state = run.init_state()
    p0 = host(state.params)
    state, losses = run_steps(run, state, STEPS)
    ref, _ = plain_losses(cfg, run, "linen", start=p0)
    assert_losses_close(losses, ref)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["linen", "nnx"])
def test_user_model_diloco_equals_library_diloco(kind, tmp_path):
    """replica 2 × data 2 × tensor 2, Streaming DiLoCo with 2 fragments (the user model's
    two layers) against `streaming_diloco` without a mesh on the unsharded module."""
    steps = 4
    cfg = small_config(tmp_path, kind, dict(replica=2, data=2, tensor=2),
                       diloco=dict(enabled=True, sync_every=2, num_fragments=2, alpha=0.5),
                       train=dict(steps=steps))
    run = Run.create(cfg)
    state = run.init_state()
    frags = run.diloco.fragments(state.global_params)
    assert len(frags.layer_names) == 2, frags.layer_names
    w = mlp_kernel(state.params, kind)  # fsdp has size 1 here: jit may drop it from the spec
    assert w.sharding.is_equivalent_to(
        NamedSharding(run.mesh, P("replica", "fsdp", "tensor")), w.ndim), w.sharding.spec
    state, losses = run_steps(run, state, steps)

    g0, apply = reference(cfg, kind)
    ref, ref_state = reference_diloco(cfg, run, reference_loss(apply), g0, steps)
    assert_losses_close(losses, ref)
    close(state.global_params, ref_state.global_params, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["linen", "nnx"])
def test_user_model_fsdp_rules_from_yaml_equals_unsharded(kind, tmp_path):
    """`embed -> fsdp` (and the MLP replicated) from a YAML file's `sharding.rules`, on
    data 2 × fsdp 2 × tensor 2: the same first-step gradients, grad norms, losses and
    params as the module on one device."""
    (tmp_path / "rules.yaml").write_text("sharding:\n  rules: {embed: fsdp, mlp: null}\n")
    rules = load_config(tmp_path / "rules.yaml").sharding.rules
    cfg = small_config(tmp_path, kind, dict(data=2, fsdp=2, tensor=2),
                       sharding=dict(rules=rules))
    run = Run.create(cfg)
    state = run.init_state()
    w = mlp_kernel(state.params, kind)                     # (embed, mlp): embed on fsdp
    assert w.sharding.spec == P("fsdp", None)
    assert {s.data.shape for s in w.addressable_shards} == {(16, 64)}
    p0 = host(state.params)
    _, apply = reference(cfg, kind, start=p0)
    ref = reference_steps(cfg, run, reference_loss(apply), p0, STEPS)
    state = assert_same_steps(run, state, STEPS, ref)
    close(state.params, ref["params"], rtol=1e-4, atol=1e-5)


def run_cli(tmp_path, *overrides, timeout=300):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(ROOT / "tests"), str(ROOT), os.environ.get("PYTHONPATH", "")]))
    return subprocess.run(
        [sys.executable, "-m", "jaxpar.train", str(ROOT / "configs/base.yaml"),
         "mesh.data=4", "mesh.tensor=2", "model.layers=2", "model.embed=32", "model.heads=4",
         "model.mlp=64", "train.batch_size=4", "train.seq_len=32", "train.log_every=1",
         "eval.every=0", "eval.batches=1", "eval.sample_bytes=0", "checkpoint.every=0",
         f"train.run_dir={tmp_path}", *overrides],
        capture_output=True, text=True, env=env, timeout=timeout, cwd=tmp_path)


@pytest.mark.parametrize("kind", ["linen", pytest.param("nnx", marks=pytest.mark.slow)])
def test_cli_user_model(kind, tmp_path):
    """The command line, with data 2 × fsdp 2 × tensor 2 and a rule from the command line
    (`vocab` replicated): the params table and mesh.json show the resolved rules."""
    args = (f"model.module=user_models:{kind}_factory", "train.steps=2", "mesh.data=2",
            "mesh.fsdp=2", "sharding.rules.vocab=null", "checkpoint.every=1")
    r = run_cli(tmp_path, *args)
    assert r.returncode == 0, r.stderr[-3000:]
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train = [x for x in lines if "loss" in x]
    assert [x["step"] for x in train] == [1, 2]
    assert all(np.isfinite(x["loss"]) for x in train)
    assert any("eval_loss" in x for x in lines)
    table = (tmp_path / "params.txt").read_text()
    up = "layers_0/up/kernel" if kind == "linen" else "layers/0/up/kernel"
    row = next(x for x in table.splitlines() if x.startswith(up + " "))
    assert "embed, mlp" in row and "P('fsdp', 'tensor')" in row, table
    emb = next(x for x in table.splitlines() if x.startswith("embed/embedding "))
    assert "vocab, embed" in emb and "P(None, 'fsdp')" in emb, table
    rules = dict(json.loads((tmp_path / "mesh.json").read_text())["rules"])
    assert rules["vocab"] is None and rules["embed"] == "fsdp"
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["config"]["model"]["module"] == f"user_models:{kind}_factory"
    if kind == "nnx":  # resume: step 2's checkpoint lost, the same command redoes step 2
        first = {x["step"]: x["loss"] for x in train}
        shutil.rmtree(tmp_path / "checkpoints" / "2")
        r = run_cli(tmp_path, *args)
        assert r.returncode == 0, r.stderr[-3000:]
        assert "resumed from" in r.stdout + r.stderr
        lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
        again = {x["step"]: x["loss"] for x in lines if "loss" in x}
        assert list(again) == [1, 2]
        np.testing.assert_allclose(again[2], first[2], rtol=1e-6)


@pytest.mark.parametrize("spec,words", [
    ("user_models", "must look like package.module:factory"),
    ("no_such_module_xyz:factory", "cannot import 'no_such_module_xyz'"),
    ("user_models:linen_factroy", "has no callable 'linen_factroy' (did you mean "
                                  "'linen_factory'?)"),
    ("user_models:not_a_module", "returned str, neither a flax.linen.Module nor a flax.nnx"),
])
def test_bad_model_module_is_exit_2_and_one_line(spec, words, tmp_path, capsys):
    code = main([str(ROOT / "configs/base.yaml"), f"model.module={spec}", "mesh.data=8",
                 f"train.run_dir={tmp_path}"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("error: ") and err.count("\n") == 1 and words in err, err


def test_indivisible_param_is_exit_2_and_one_line(tmp_path, capsys):
    code = main([str(ROOT / "configs/base.yaml"), "model.module=user_models:nnx_factory",
                 "mesh.data=4", "mesh.tensor=2", "model.mlp=255", "model.layers=1",
                 f"train.run_dir={tmp_path}"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1, err
    assert ("param layers/0/down/kernel (255, 128) has dimension 0 ('mlp') of size 255, which "
            "its mesh axes ('tensor',) (size 2) do not divide") in err, err


def test_diloco_more_fragments_than_layers_is_exit_2_and_one_line(tmp_path, capsys):
    code = main([str(ROOT / "configs/base.yaml"), "model.module=user_models:linen_factory",
                 "model.layers=2", "mesh.replica=2", "mesh.data=4", "diloco.enabled=true",
                 "diloco.num_fragments=3", "diloco.sync_every=6", f"train.run_dir={tmp_path}"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1, err
    assert "diloco.num_fragments=3 with model.module='user_models:linen_factory'" in err
    assert "found 2 layers (layers_0 ... layers_1)" in err, err
    assert "Valid num_fragments: [1, 2]" in err, err


def test_bad_model_module_cli_subprocess(tmp_path):
    r = run_cli(tmp_path, "model.module=user_models:nope", timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.count("\n") == 1 and "has no callable 'nope'" in r.stderr, r.stderr


def test_factory_rules_override(tmp_path, monkeypatch):
    """`factory.rules` changes where names go: the MLP replicated, 'embed' over tensor."""
    monkeypatch.setattr(user_models.linen_factory, "rules", {"mlp": None, "embed": "tensor"},
                        raising=False)
    cfg = small_config(tmp_path, "linen", dict(data=4, tensor=2))
    run = Run.create(cfg)
    assert dict(run.rules)["mlp"] is None
    dummy = np.zeros((4, 32), np.int32)
    with run.scope():
        abstract = jax.eval_shape(run.model.init, jax.random.key(0), dummy, dummy, dummy)
    specs = sharding.mesh_specs(sharding.logical_axes(abstract), run.rules)
    assert mlp_kernel(specs, "linen") == P("tensor", None)  # (embed, mlp)
    monkeypatch.setattr(user_models.linen_factory, "rules", {"mlp": "gpu"})
    with pytest.raises(Exception, match="must name mesh axes"):
        Run.create(cfg)


# ------------------------------------------------------------------ docs/sharding.md

DOC = ROOT / "docs" / "sharding.md"


def doc_block(marker: str) -> str:
    """The fenced block right after `<!-- marker -->` in docs/sharding.md."""
    text = DOC.read_text()
    at = text.index(f"<!-- {marker} -->")
    start = text.index("\n", text.index("```", at)) + 1
    return text[start:text.index("```", start)]


def doc_command(marker: str) -> tuple[dict, list[str]]:
    """(environment, argv after `python -m jaxpar.train`) of a command block of the doc."""
    words = doc_block(marker).replace("\\\n", " ").split()
    i = words.index("python")
    env = dict(w.split("=", 1) for w in words[:i])
    assert words[i + 1: i + 3] == ["-m", "jaxpar.train"], words
    return env, words[i + 3:]


def table_lines(text: str) -> list[str]:
    lines = text.splitlines()
    first = next(k for k, x in enumerate(lines) if x.startswith("param "))
    last = next(k for k, x in enumerate(lines) if x.startswith("total"))
    return [x for x in lines[first:last + 1] if x != "..."]


def assert_in_order(doc_lines, real_lines):
    rest = iter(real_lines)
    for line in doc_lines:
        assert any(line == r for r in rest), (
            f"docs/sharding.md has {line!r}, which the code does not give (in this order):\n"
            + "\n".join(real_lines))


def abstract_table(cfg) -> str:
    """The param table of a run, from abstract shapes (nothing compiled, no arrays)."""
    run = Run.create(cfg)
    dummy = np.zeros((run.batch_rows(), cfg.train.seq_len), np.int32)
    with run.scope():
        boxed = jax.eval_shape(run.model.init, jax.random.key(0), dummy, dummy, dummy)
        params = jax.eval_shape(nn.unbox, boxed)
    logical = sharding.logical_axes(boxed)
    specs = sharding.mesh_specs(logical, run.rules)
    return sharding.format_table(sharding.param_table(params, specs, logical, run.mesh))


def test_sharding_doc_is_current(tmp_path, monkeypatch):
    """The doc's mymodel.py is docs/examples/mymodel.py, its rules block is the source's,
    and its param tables are what the code gives for its command now."""
    assert doc_block("file: docs/examples/mymodel.py") == (
        ROOT / "docs/examples/mymodel.py").read_text()
    assert doc_block("rules: jaxpar/sharding.py") in (ROOT / "jaxpar/sharding.py").read_text()
    monkeypatch.syspath_prepend(str(ROOT / "docs/examples"))
    env, argv = doc_command("command: linen_factory")
    assert env["PYTHONPATH"] == "docs/examples" and argv[0] == "configs/base.yaml"
    tables = {}
    for factory in ("linen_factory", "fsdp_factory", "nnx_factory"):
        cfg = load_config(ROOT / argv[0], argv[1:] + [f"model.module=mymodel:{factory}",
                                                      f"train.run_dir={tmp_path}"])
        tables[factory] = abstract_table(cfg)
    for factory in ("linen_factory", "fsdp_factory"):
        assert_in_order(table_lines(doc_block(f"table: {factory}")),
                        tables[factory].splitlines())
    # "the same table with NNX paths"
    assert tables["nnx_factory"] == tables["linen_factory"].replace("layers_", "layers/")


@pytest.mark.slow
def test_sharding_doc_command_runs(tmp_path):
    """The doc's command (2 steps) trains and writes the doc's param table."""
    env, argv = doc_command("command: linen_factory")
    env = dict(os.environ, **env)
    r = subprocess.run([sys.executable, "-m", "jaxpar.train", *argv, "train.steps=2",
                        "eval.sample_bytes=0", f"train.run_dir={tmp_path}"],
                       capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert_in_order(table_lines(doc_block("table: linen_factory")),
                    (tmp_path / "params.txt").read_text().splitlines())
    assert table_lines(doc_block("table: linen_factory")) == table_lines(r.stdout)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["linen", "nnx"])
def test_init_creates_only_each_devices_shards(kind, tmp_path, monkeypatch):
    """The compiled init of a 52 MB model cut 8 ways (`embed` over data too) needs about
    2 × its 1/8 share of device memory, not the whole model on any device."""
    factory = getattr(user_models, f"{kind}_factory")
    monkeypatch.setattr(factory, "rules", {"embed": "data"}, raising=False)
    cfg = small_config(tmp_path, kind, dict(data=4, tensor=2),
                       model=dict(layers=1, embed=1024, mlp=4096))
    run = Run.create(cfg)
    dummy = np.zeros((run.batch_rows(), cfg.train.seq_len), np.int32)
    with run.scope():
        boxed = jax.eval_shape(run.model.init, jax.random.key(0), dummy, dummy, dummy)
        specs = sharding.mesh_specs(sharding.logical_axes(boxed), run.rules)
        init = jax.jit(lambda *a: nn.unbox(run.model.init(*a)),
                       out_shardings=sharding.named(specs, run.mesh))
        mem = init.lower(jax.random.key(0), dummy, dummy, dummy).compile().memory_analysis()
    full = sum(x.size * 4 for x in jax.tree.leaves(jax.eval_shape(nn.unbox, boxed)))
    assert full > 50e6
    assert mem.output_size_in_bytes < full / 7
    assert mem.temp_size_in_bytes < full / 3, (mem.temp_size_in_bytes, full)
