"""`check_layouts`: a user's model trained on several mesh layouts by the trainer's own
compiled step, each compared step by step with a 1-device run of the same model, data and
seed; and `assert_steps_close`, the one comparison of a sharded run with a reference that
jaxpar's own tests use too.

    report = check_layouts(factory, layouts=[{"data": 8}, {"fsdp": 4, "tensor": 2}],
                           overrides=["model.embed=64"], steps=2)
    print(report)

The reference and every layout start from the same params (the 1-device run's, placed with
each layout's shardings), so only the step is compared. With the small config below the lr is
0 at step 1 (warmup from 0): steps 1 and 2 see the same params, and step 3 is the first after
an update. Adam is blind to a gradient's scale, so a doubled gradient leaves the next losses
almost unchanged: the gradients are compared leaf by leaf, every step, for that reason.
"""
from __future__ import annotations

import itertools
import math
import shutil
import sys
import tempfile
from typing import Callable

import jax
import numpy as np
from jax.sharding import Mesh

from jaxpar.mesh import AXES
from jaxpar.sharding import _path
from jaxpar.testing.gathers import find_full_gathers
from jaxpar.train.config import Config, load_config
from jaxpar.train.model import import_factory

# the small default config the overrides apply to (train.steps is the `steps` argument)
SMALL = ("model.layers=2", "model.embed=32", "model.heads=4", "model.kv_heads=4",
         "model.mlp=64", "train.batch_size=8", "train.seq_len=32", "train.lr=1e-2",
         "train.warmup=1", "eval.every=0", "eval.batches=1", "eval.sample_bytes=0",
         "checkpoint.every=0")

DOUBTFUL_REDUCTION = ("loss matches but gradients differ: the signature of a missing or "
                      "doubled reduction in a backward (a psum too few or too many in a "
                      "custom_vjp or shard_map)")


def _host(tree):
    return jax.tree.map(lambda x: np.asarray(jax.device_get(x)), tree)


def _multiple(got: np.ndarray, want: np.ndarray) -> float | None:
    """k when got = k·want to within 1% of got's largest entry (a doubled reduction: 2),
    else None."""
    ww = float(np.vdot(want, want))
    k = float(np.vdot(got, want)) / ww if ww else 0.0
    ok = ww and float(np.abs(got - k * want).max()) <= 0.01 * float(np.abs(got).max())
    return k if ok else None


def grad_diffs(got, want) -> list[tuple[str, float, float, np.ndarray, np.ndarray]]:
    """(path, max |got − want|, largest |want| entry, got, want) per leaf, in tree order."""
    g = jax.tree_util.tree_flatten_with_path(_host(got))[0]
    w = jax.tree.leaves(_host(want))
    if len(g) != len(w):
        raise AssertionError(f"gradient trees differ: {len(g)} leaves vs {len(w)}")
    return [(_path(p), float(np.abs(a - b).max(initial=0.0)),
             float(np.abs(b).max(initial=0.0)), a, b) for (p, a), b in zip(g, w)]


def assert_steps_close(got: list[dict], want: list[dict], *, where: str,
                       reference: str = "the reference", rtol: float = 1e-4,
                       atol: float = 1e-7, loss_rtol: float = 1e-5,
                       loss_atol: float = 1e-5) -> list[dict]:
    """Compare a run with a reference step by step: `got[i]`/`want[i]` hold step i+1's
    `loss` and, optionally, `grads` (trees; compared where both have them). A loss passes
    within loss_atol + loss_rtol·|ref|; a gradient leaf within atol + rtol·(its largest
    reference entry). Raises AssertionError naming `where`, the step, the first differing
    leaf and whether the loss matched; returns per step `loss_diff` and `grad_diff` (the
    largest leaf difference relative to that leaf's scale)."""
    if len(got) != len(want):
        raise AssertionError(f"{where}: {len(got)} steps vs {len(want)} in {reference}")
    out = []
    for step, (g, w) in enumerate(zip(got, want), start=1):
        loss_diff = abs(float(g["loss"]) - float(w["loss"]))
        loss_ok = loss_diff <= loss_atol + loss_rtol * abs(float(w["loss"]))
        bad, grad_diff, multiple = None, 0.0, None
        if g.get("grads") is not None and w.get("grads") is not None:
            for path, d, scale, a, b in grad_diffs(g["grads"], w["grads"]):
                grad_diff = max(grad_diff, d / scale if scale else d)
                if d > atol + rtol * scale:
                    bad = bad or (f"{path} (max |Δ| {d:.3g}, "
                                  f"{d / scale if scale else math.inf:.3g} of its largest "
                                  f"entry {scale:.3g})")
                    k = _multiple(a, b)
                    multiple = multiple or (f"{path} is {k:.3g}× {reference}'s"
                                            if k is not None else None)
        also = f"; {multiple}" if multiple else ""
        if not loss_ok:
            msg = (f"{where}, step {step}: loss {float(g['loss']):.7g} vs "
                   f"{float(w['loss']):.7g} in {reference} (|Δ| {loss_diff:.3g})")
            raise AssertionError(msg + (f"; first differing gradient: {bad}{also}" if bad else
                                        "; the gradients match"))
        if bad:
            raise AssertionError(f"{where}, step {step}: gradient {bad} differs from "
                                 f"{reference}{also}; the loss matches ({float(g['loss']):.7g}): "
                                 f"{DOUBTFUL_REDUCTION}")
        out.append({"loss_diff": loss_diff, "grad_diff": grad_diff})
    return out


# ------------------------------------------------------------------ the trainer's runs

_registered = itertools.count()


def factory_spec(factory: Callable | str) -> str:
    """The `model.module` string of a factory: 'pkg.mod:name' when importable as such,
    else registered here (a local function or a lambda in a test)."""
    if isinstance(factory, str):
        return factory
    spec = f"{factory.__module__}:{factory.__qualname__}"
    try:
        if import_factory(spec) is factory:
            return spec
    except Exception:  # not importable under that name: register it below
        pass
    name = f"_factory_{next(_registered)}"
    setattr(sys.modules[__name__], name, factory)
    return f"{__name__}:{name}"


def _layout(layout) -> tuple[dict, list]:
    """({mesh axis: size}, devices) of a layout: a dict of jaxpar mesh axes, or a
    jax.sharding.Mesh (e.g. `jax.make_mesh`, any axis types) whose axes are jaxpar's."""
    if isinstance(layout, Mesh):
        sizes, devices = dict(layout.shape), list(layout.devices.flat)
    elif isinstance(layout, dict):
        sizes = dict(layout)
        devices = jax.devices()[:math.prod(sizes.values())]
    else:
        raise TypeError(f"layouts: {layout!r} must be a dict of mesh axis sizes, e.g. "
                        f"{{'fsdp': 4, 'tensor': 2}}, or a jax.sharding.Mesh")
    bad = [a for a in sizes if a not in AXES]
    if bad:
        raise ValueError(f"layouts: {layout!r} names mesh axes {bad}; valid: {list(AXES)}")
    if len(devices) < math.prod(sizes.values()):
        raise ValueError(f"layouts: {sizes} needs {math.prod(sizes.values())} devices; jax "
                         f"has {jax.device_count()} (pytest -p jaxpar.testing --host-devices N)")
    return {a: n for a, n in sizes.items() if n > 1}, devices


def describe(sizes: dict) -> str:
    return " × ".join(f"{a} {n}" for a, n in sizes.items()) or "1 device"


def _nbytes(leaves) -> tuple[int, int]:
    """(bytes on the fullest device, bytes of the whole arrays) of a list of jax arrays."""
    per_device: dict = {}
    for x in leaves:
        for s in x.addressable_shards:
            per_device[s.device] = per_device.get(s.device, 0) + s.data.nbytes
    return max(per_device.values(), default=0), sum(x.nbytes for x in leaves)


def _train(cfg: Config, sizes: dict, devices, steps: int, params0=None) -> tuple[dict, list]:
    """(stats, per-step {loss, grads}) of the trainer's compiled step on one layout."""
    from jaxpar.train.loop import Run

    run = Run.create(cfg.replace(mesh=sizes), devices)
    run.report_grads = True
    state = run.init_state()
    if params0 is not None:
        state = state._replace(params=jax.tree.map(
            lambda x, s: jax.device_put(x, s), params0,
            jax.tree.map(lambda x: x.sharding, state.params)))
    first = run.batch(1)
    compiled = run.compile_step(state, first)
    hlo = compiled.as_text()
    held, whole = _nbytes(jax.tree.leaves((state.params, state.opt_state)))
    mem = compiled.memory_analysis()
    stats = {
        "layout": describe(sizes), "devices": len(devices),
        "state_bytes": held, "state_ideal": whole // len(devices),
        "comm_bytes": run.comm_bytes(state, first),
        "temp_bytes": int(getattr(mem, "temp_size_in_bytes", 0)) if mem else None,
        "full_gathers": [dict(g, param=g["param"].removeprefix("0/params/"))
                         for g in find_full_gathers(hlo, (state, first))
                         if g["param"].startswith("0/params/")],  # not the batch
        "params0": _host(state.params) if params0 is None else None,
    }
    out = []
    for step in range(1, steps + 1):
        state, m = run.train_step(state, first if step == 1 else run.batch(step))
        out.append({"loss": float(m["loss"]), "grads": _host(m["grads"])})
    return stats, out


class Report(list):
    """One dict per run (the 1-device reference first): `layout`, `devices`, `loss_diff`,
    `grad_diff` (largest over steps; gradients relative to each leaf's scale),
    `state_bytes` (params + optimizer state on the fullest device) and `state_ideal` (the
    whole state / devices), `comm_bytes` ({collective kind: bytes one device sends per
    step}, from the compiled HLO), `temp_bytes` (XLA's temp buffers per device) and
    `full_gathers` (jaxpar.testing.gathers). `print(report)` gives a table."""

    def __str__(self) -> str:
        kib = lambda b: "-" if b is None else f"{b / 1024:,.1f}"
        head = ("layout", "loss Δ", "grad Δ", "state KiB/dev", "ideal", "temp KiB",
                "collective KiB/step", "full gathers")
        rows = [(r["layout"], f"{r['loss_diff']:.1e}", f"{r['grad_diff']:.1e}",
                 kib(r["state_bytes"]), kib(r["state_ideal"]), kib(r["temp_bytes"]),
                 " ".join(f"{k}:{kib(v)}" for k, v in sorted(r["comm_bytes"].items())
                          if v) or "-", str(len(r["full_gathers"]))) for r in self]
        widths = [max(len(c) for c in col) for col in zip(head, *rows)]
        line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()
        lines = [line(head), line(["-" * w for w in widths])] + [line(r) for r in rows]
        for r in self:
            for g in r["full_gathers"]:
                lines.append(f"full gather, {r['layout']}: {g['param']} "
                             f"{'×'.join(map(str, g['shape']))} whole on {'·'.join(g['axes'])}"
                             f" ({g['bytes']:,} bytes per device, {g['op']})")
        return "\n".join(lines)


def check_layouts(factory: Callable | str, layouts, overrides=(), steps: int = 2, *,
                  rtol: float = 1e-4, atol: float = 1e-7, loss_rtol: float = 1e-5,
                  loss_atol: float = 1e-5, config: str | None = None) -> Report:
    """Train `factory`'s model (the trainer's `model.module` protocol: Linen or NNX,
    `factory.rules` honoured) for `steps` steps on each layout with the trainer's compiled
    step, and compare every step's loss and gradients with a 1-device run of the same model,
    data and params (`assert_steps_close`: an AssertionError names the layout, the step and
    the first differing leaf). `layouts`: dicts of jaxpar mesh axis sizes
    ({"fsdp": 4, "tensor": 2}; unnamed axes are 1) or jax Meshes with jaxpar axis names (the
    trainer builds its own mesh on their devices). `overrides`: the trainer's
    'section.key=value' strings over a small config (SMALL; `config`, a YAML file, instead
    of the defaults). Returns a Report."""
    run_dir = tempfile.mkdtemp(prefix="jaxpar-check-layouts-")
    try:
        base = [] if config else list(SMALL)
        cfg = load_config(config, base + [f"model.module={factory_spec(factory)}",
                                          f"train.steps={steps}", f"train.run_dir={run_dir}",
                                          *overrides])
        if cfg.diloco.enabled:
            raise ValueError("check_layouts: diloco.enabled=true is not supported (it compares "
                             "TrainState steps); tests/test_train_equivalence.py compares "
                             "DiLoCo runs with jaxpar.diloco on one device")
        stats, want = _train(cfg, {}, jax.devices()[:1], steps)
        params0 = stats.pop("params0")
        report = Report([dict(stats, loss_diff=0.0, grad_diff=0.0)])
        for layout in layouts:
            sizes, devices = _layout(layout)
            stats, got = _train(cfg, sizes, devices, steps, params0)
            stats.pop("params0")
            diffs = assert_steps_close(got, want, where=f"layout {describe(sizes)}",
                                       reference="the 1-device run", rtol=rtol, atol=atol,
                                       loss_rtol=loss_rtol, loss_atol=loss_atol)
            report.append(dict(stats, loss_diff=max(d["loss_diff"] for d in diffs),
                               grad_diff=max(d["grad_diff"] for d in diffs)))
        return report
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)


__all__ = ["check_layouts", "assert_steps_close", "Report", "SMALL", "factory_spec"]
