"""jaxpar.testing: check_layouts on correct user models (Linen, NNX, a hand-written
tensor-parallel one) and on each seeded bug of docs/testing.md, the full-gather finder, the
replica-group decoding it rests on, and the pytest plugin in a fresh process."""
import os
import re
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import numpy as np
import pytest

import user_models
from jaxpar import comm
from jaxpar.testing import assert_steps_close, check_layouts
from jaxpar.testing.plugin import xla_flags

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "docs" / "examples"))
import tpmodel  # noqa: E402  (docs/examples/tpmodel.py)
LAYOUTS = [{"data": 8}, {"fsdp": 8}, {"data": 4, "tensor": 2}, {"fsdp": 4, "tensor": 2}]


def row(report, layout):
    return next(r for r in report if r["layout"] == layout)


def test_tensor_parallel_model_passes_and_report_adds_up():
    """The hand-written column/row-parallel model equals its 1-device run on fsdp 4 ×
    tensor 2; the report's numbers are the compiled step's: no full gather, the state
    per device is the params + Adam's two moments cut as the rules say."""
    report = check_layouts(tpmodel.tp_factory, [{"fsdp": 4, "tensor": 2}])
    ref, r = report
    assert ref["layout"] == "1 device" and r["layout"] == "fsdp 4 × tensor 2"
    assert r["loss_diff"] < 1e-5 and r["grad_diff"] < 1e-4
    assert r["full_gathers"] == []
    # params: embed 256×32 (vocab whole, embed/4), head 32×256 (embed/4), up/down 32×64
    # (÷4÷2, two layers), three norms 32 (÷4); ×3 with Adam's mu and nu; + the int32 step
    # counts of Adam and of the lr schedule
    per_device = 4 * (256 * 32 // 4 + 32 * 256 // 4 + 2 * 2 * 32 * 64 // 8 + 3 * 32 // 4)
    assert r["state_bytes"] == 3 * per_device + 8
    whole = 4 * (2 * 256 * 32 + 4 * 32 * 64 + 3 * 32)
    assert ref["state_bytes"] == 3 * whole + 8 and r["state_ideal"] == (3 * whole + 8) // 8
    assert sum(ref["comm_bytes"].values()) == 0 and r["comm_bytes"]["all-reduce"] > 0
    assert r["temp_bytes"] > 0
    text = str(report)
    assert text.splitlines()[0].split()[:3] == ["layout", "loss", "Δ"]
    assert "fsdp 4 × tensor 2" in text and f"{r['state_bytes'] / 1024:,.1f}" in text


def test_psum_of_dx_in_custom_vjp_is_caught_with_loss_matching():
    """Seeded bug (a): the textbook psum of dx in a custom_vjp inside shard_map with
    check_vma=False doubles dx on tensor 2: the loss is exact, the gradients are not."""
    with pytest.raises(AssertionError) as e:
        check_layouts(tpmodel.psum_dx_factory, [{"data": 4, "tensor": 2}], steps=1)
    msg = str(e.value)
    assert msg.startswith("layout data 4 × tensor 2, step 1: gradient down_0/kernel"), msg
    assert "the loss matches" in msg and "missing or doubled reduction" in msg
    assert re.search(r"norm_1/scale is 2× the 1-device run's", msg), msg
    assert "\n" not in msg


@pytest.mark.slow
def test_forgotten_row_psum_is_caught_with_loss_wrong():
    """Seeded bug (b): a row-parallel layer without its psum: the loss itself is wrong."""
    with pytest.raises(AssertionError) as e:
        check_layouts(tpmodel.no_psum_factory, [{"fsdp": 4, "tensor": 2}], steps=1)
    msg = str(e.value)
    assert msg.startswith("layout fsdp 4 × tensor 2, step 1: loss "), msg
    assert "in the 1-device run" in msg and "first differing gradient: down_0/kernel" in msg
    got, want = map(float, re.findall(r"loss ([\d.]+) vs ([\d.]+)", msg)[0])
    assert abs(got - want) > 1e-2


@pytest.mark.slow
def test_rule_sharding_the_embeddings_lookup_dimension_lists_full_gathers():
    """Seeded bug (c): `vocab -> tensor` cuts the embedding table along the dimension its
    lookup reads whole: numerics are right, and the report lists the table (and the head
    kernel, which XLA then gathers too) gathered whole on tensor every step."""
    report = check_layouts(tpmodel.vocab_rule_factory,
                           [{"data": 4, "tensor": 2}, {"fsdp": 4, "tensor": 2}], steps=1)
    dt, ft = report[1], report[2]
    assert {g["param"]: g["bytes"] for g in dt["full_gathers"]} == {
        "embed/embedding": 256 * 32 * 4, "head/kernel": 32 * 256 * 4}
    assert [g["axes"] for g in dt["full_gathers"]] == [("tensor",), ("tensor",)]
    # under fsdp 4 the vocab dimension is gathered, embed stays cut 4 ways (ZeRO-3)
    assert {g["param"]: g["bytes"] for g in ft["full_gathers"]}["embed/embedding"] == (
        256 * 8 * 4)
    assert "full gather, data 4 × tensor 2: embed/embedding 256×32 whole on tensor" in str(
        report)


@pytest.mark.slow
@pytest.mark.parametrize("factory", [user_models.linen_factory, user_models.nnx_factory])
def test_user_models_pass_on_four_layouts(factory):
    """The Linen and the NNX decoder of tests/user_models.py equal their 1-device run on
    every layout, 3 steps (step 3 follows a real update)."""
    report = check_layouts(factory, LAYOUTS, steps=3)
    assert [r["layout"] for r in report] == ["1 device", "data 8", "fsdp 8",
                                             "data 4 × tensor 2", "fsdp 4 × tensor 2"]
    assert max(r["grad_diff"] for r in report) < 1e-4
    # ZeRO-3 over 8: the state is cut 8 ways (norm scales of 32 divide by 8 too), all but
    # the two int32 step counts
    fsdp = row(report, "fsdp 8")
    assert fsdp["state_ideal"] <= fsdp["state_bytes"] <= fsdp["state_ideal"] + 8
    assert row(report, "data 8")["full_gathers"] == []  # nothing is cut


@pytest.mark.slow
def test_check_layouts_takes_a_jax_make_mesh_and_local_factory():
    """A plain `jax.make_mesh` (Explicit axes) with jaxpar axis names is a layout, and a
    factory defined in a function (not importable by name) works; a bad axis is one line."""
    def factory(cfg, mesh):
        return tpmodel.tp_factory(cfg, mesh)
    factory.rules = tpmodel.tp_factory.rules
    mesh = jax.make_mesh((2, 2), ("data", "tensor"), devices=jax.devices()[:4],
                         axis_types=(jax.sharding.AxisType.Explicit,) * 2)
    report = check_layouts(factory, [mesh], steps=1, overrides=["model.layers=1"])
    assert report[1]["layout"] == "data 2 × tensor 2" and report[1]["devices"] == 4
    assert report[1]["grad_diff"] < 1e-4
    with pytest.raises(ValueError, match=r"names mesh axes \['model'\]; valid: \['replica'"):
        check_layouts(factory, [{"model": 2}])


def test_assert_steps_close_messages():
    """The comparison itself, on numbers: a doubled leaf with equal losses, a wrong loss."""
    want = [{"loss": 2.0, "grads": {"a": np.ones(3), "b": np.arange(3.0)}}]
    doubled = [{"loss": 2.0, "grads": {"a": np.ones(3), "b": 2 * np.arange(3.0)}}]
    with pytest.raises(AssertionError, match=r"^L, step 1: gradient b \(max \|Δ\| 2, 1 of its "
                       r"largest entry 2\) differs from R; b is 2× R's; the loss matches"):
        assert_steps_close(doubled, want, where="L", reference="R")
    with pytest.raises(AssertionError, match=r"^L, step 1: loss 2\.1 vs 2 in R .*; the "
                       r"gradients match$"):
        assert_steps_close([{"loss": 2.1, "grads": want[0]["grads"]}], want, where="L",
                           reference="R")
    close = [{"loss": 2.0 + 1e-6, "grads": {"a": np.ones(3) * (1 + 1e-5), "b": np.arange(3.)}}]
    d, = assert_steps_close(close, want, where="L")
    assert d["loss_diff"] == pytest.approx(1e-6) and d["grad_diff"] == pytest.approx(1e-5)


@pytest.mark.parametrize("line,groups", [
    ("replica_groups={{0,1},{2,3}}", [(0, 1), (2, 3)]),
    ("replica_groups=[2,4]<=[4,2]T(1,0)", [(0, 2, 4, 6), (1, 3, 5, 7)]),
    ("replica_groups=[4,2]<=[8]", [(0, 1), (2, 3), (4, 5), (6, 7)]),
    ("replica_groups=mesh['axis_0'=4,'axis_1'=2] {'axis_0'}", [(0, 2, 4, 6), (1, 3, 5, 7)]),
    ("replica_groups=mesh['axis_0'=2,'axis_1'=1,'axis_2'=4], device_ids=([4,2]T(1,0)) "
     "{'axis_0'}", [(0, 1), (2, 3), (4, 5), (6, 7)]),
    ("replica_groups={}", [tuple(range(8))]),
])
def test_replica_groups(line, groups):
    assert comm.replica_groups(f"%x = f32[8] all-gather(%y), {line}, dimensions={{0}}", 8) == (
        groups)


def test_find_full_gathers_on_a_plain_jit():
    """Outside the trainer, on a plain jax mesh: a weight cut over fsdp × tensor, gathered
    over tensor (reported: 4 × 16 floats per device), and over fsdp only (ZeRO-3: not)."""
    from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

    from jaxpar.testing import find_full_gathers

    mesh = jax.make_mesh((2, 4), ("fsdp", "tensor"), axis_types=(AxisType.Auto,) * 2)
    w = jax.device_put(np.ones((8, 16), np.float32), NamedSharding(mesh, P("fsdp", "tensor")))

    def gathered(spec):
        f = jax.jit(lambda w: jax.lax.with_sharding_constraint(2 * w, NamedSharding(mesh, spec)))
        return find_full_gathers(f.lower(w).compile().as_text(), (w,))
    found = gathered(P("fsdp", None))
    assert [(g["param"], g["shape"], g["axes"], g["bytes"]) for g in found] == [
        ("0", (8, 16), ("tensor",), 4 * 16 * 4)]
    assert gathered(P(None, "tensor")) == []


def test_xla_flags():
    assert xla_flags(8, "--xla_force_host_platform_device_count=2 --foo") == (
        "--foo --xla_cpu_collective_call_terminate_timeout_seconds=600 "
        "--xla_force_host_platform_device_count=8")


def run_pytest(tmp_path, args, env_extra=None, prelude=""):
    """`python -c prelude; pytest.main(args)` in tmp_path with no XLA_FLAGS; the process
    group is killed on every path."""
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    env["PYTHONPATH"] = str(ROOT)
    env.update(env_extra or {})
    code = f"{prelude}\nimport pytest, sys\nsys.exit(pytest.main({args!r}))"
    p = subprocess.Popen([sys.executable, "-c", code], cwd=tmp_path, env=env, text=True,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         start_new_session=True)
    try:
        out, _ = p.communicate(timeout=300)
        return p.returncode, out
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()


USER_TEST = textwrap.dedent('''
    import jax

    def test_sees_devices(host_devices, host_mesh):
        assert jax.device_count() == host_devices == 8
        mesh = host_mesh(data=2, tensor=2)
        assert dict(mesh.shape)["tensor"] == 2 and mesh.devices.size == 4
        print("DEVICES", jax.device_count(), flush=True)
''')


def test_plugin_in_a_fresh_process(tmp_path):
    """No XLA_FLAGS: `-p jaxpar.testing --host-devices 8` gives the tests 8 devices (and a
    conftest that imports jax at the top does not spoil it)."""
    (tmp_path / "test_user.py").write_text(USER_TEST)
    (tmp_path / "conftest.py").write_text("import jax  # imported early, started late\n")
    rc, out = run_pytest(tmp_path, ["-p", "jaxpar.testing", "--host-devices", "8", "-q",
                                    "-s", "-p", "no:cacheprovider", "test_user.py"])
    assert rc == 0 and "DEVICES 8" in out, out[-3000:]


@pytest.mark.slow
def test_plugin_from_addopts_and_jax_started_too_early(tmp_path):
    """The same from `addopts` in pyproject.toml; jax started beforehand with 1 device is a
    one-line usage error."""
    (tmp_path / "test_user.py").write_text(USER_TEST)
    (tmp_path / "pyproject.toml").write_text(
        '[tool.pytest.ini_options]\naddopts = "-p jaxpar.testing --host-devices 8"\n')
    rc, out = run_pytest(tmp_path, ["-q", "-s", "-p", "no:cacheprovider", "test_user.py"])
    assert rc == 0 and "DEVICES 8" in out, out[-3000:]
    rc, out = run_pytest(tmp_path, ["-q", "-p", "no:cacheprovider", "test_user.py"],
                         prelude="import jax; jax.devices()")
    assert rc != 0
    err = [x for x in out.splitlines() if "--host-devices 8" in x]
    assert err == ["ERROR: --host-devices 8: jax already started with 1 devices before "
                   "jaxpar.testing could set XLA_FLAGS; load the plugin first (-p "
                   "jaxpar.testing on the command line or in addopts) and use no jax before "
                   "it"], out[-3000:]


# ------------------------------------------------------------------ docs/testing.md

DOC = ROOT / "docs" / "testing.md"
EXAMPLE = ROOT / "docs" / "examples" / "test_tpmodel.py"


def doc_blocks(kind: str) -> dict[str, str]:
    """{name: body} of the fenced blocks right after `<!-- kind: name -->` in the doc."""
    text, out = DOC.read_text(), {}
    for m in re.finditer(rf"<!-- {kind}: (\S+) -->", text):
        start = text.index("\n", text.index("```", m.end())) + 1
        out[m.group(1)] = text[start:text.index("```", start)]
    return out


def plain(text: str) -> list[str]:
    """Non-empty lines with the table's loss/grad differences (float noise) blanked."""
    return [re.sub(r"\d\.\de[-+]\d\d", "~", x) for x in text.splitlines()
            if x.strip() and x.strip() != "."]


def assert_in_order(doc_lines, real_lines):
    rest = iter(real_lines)
    for line in doc_lines:
        assert any(line == r for r in rest), (
            f"docs/testing.md has {line!r}, which the run does not print (in this order):\n"
            + "\n".join(real_lines))


def tpmodel_tests():
    import importlib.util

    spec = importlib.util.spec_from_file_location("doc_test_tpmodel", EXAMPLE)
    mod = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(EXAMPLE.parent))
    spec.loader.exec_module(mod)
    return mod


def test_testing_doc_shows_the_example_file_and_its_log():
    assert doc_blocks("file")["docs/examples/test_tpmodel.py"] == EXAMPLE.read_text()
    outputs = doc_blocks("output")
    assert list(outputs) == [f.__name__ for f in vars(tpmodel_tests()).values()
                             if callable(f) and f.__name__.startswith("test_")]
    log = plain((ROOT / "docs" / "testing_example.log").read_text())
    assert_in_order([x for body in outputs.values() for x in plain(body)], log)


@pytest.mark.slow
def test_testing_doc_output_is_current(tmp_path):
    """The doc's command, run now in a fresh process without XLA_FLAGS, prints the doc's
    outputs (the table's float-noise columns aside)."""
    args = ["-p", "jaxpar.testing", "--host-devices", "8", "-s", "-q", "-p",
            "no:cacheprovider", "--rootdir", str(tmp_path), str(EXAMPLE)]
    rc, out = run_pytest(tmp_path, args, {"PYTHONPATH": f"{EXAMPLE.parent}{os.pathsep}{ROOT}"})
    assert rc == 0, out[-3000:]
    assert_in_order([x for body in doc_blocks("output").values() for x in plain(body)],
                    plain(out))
