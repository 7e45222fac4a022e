"""`python -m jaxpar.convert to-hf|from-hf ...` (also `jaxpar-convert`): checkpoints between
jaxpar runs and Hugging Face folders.

    jaxpar-convert to-hf RUN_DIR_OR_CHECKPOINT OUT [--dtype bfloat16]
    jaxpar-convert from-hf HF_DIR OUT [section.key=value ...]

`to-hf` reads the newest checkpoint of a run folder (or the given `RUN/checkpoints/STEP`),
on the host and on any number of devices, and writes config.json + safetensors that
transformers loads as LlamaForCausalLM (DiLoCo runs: the global params). Keys of the
imported model's config.json (token ids, ...) and its tokenizer files are carried over.
`from-hf` writes OUT as a run folder: config.yaml (model keys from config.json, plus the
overrides: give the mesh the run will use, since the vocab is padded for its tensor axis;
without mesh.* keys the mesh is all devices on the data axis) and an orbax checkpoint at
step 0 that `python -m jaxpar.train OUT/config.yaml` resumes.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model",
                   "special_tokens_map.json", "generation_config.json")


def _checkpoint(path: Path) -> tuple[Path, Path]:
    """(run folder, checkpoint step folder) of a run folder or one of its checkpoints."""
    if (path / "config.yaml").is_file():
        steps = sorted((int(p.name) for p in (path / "checkpoints").glob("*")
                        if p.name.isdigit()), reverse=True)
        if not steps:
            raise ValueError(f"{path}: no checkpoints under {path / 'checkpoints'}")
        return path, path / "checkpoints" / str(steps[0])
    if path.parent.name == "checkpoints" and (path.parent.parent / "config.yaml").is_file():
        return path.parent.parent, path
    raise ValueError(f"{path} is neither a run folder (with config.yaml) nor a "
                     f"RUN/checkpoints/STEP folder")


def read_params(step_dir: Path):
    """The model params of a checkpoint as host numpy arrays (any device count)."""
    import jax
    import numpy as np
    import orbax.checkpoint as ocp

    ckptr = ocp.PyTreeCheckpointer()
    tree = ckptr.metadata(step_dir / "state").item_metadata.tree
    key = "global_params" if "global_params" in tree else "params"  # DiLoCo: θ_global
    item = {key: tree[key]}
    args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), item)
    out = ckptr.restore(step_dir / "state", args=ocp.args.PyTreeRestore(
        item=item, restore_args=args, partial_restore=True))
    return out[key]


def to_hf(src, out, dtype: str | None = None) -> Path:
    from jaxpar import hf
    from jaxpar.train.config import load_config
    from jaxpar.train.model import transformer_config

    run_dir, step_dir = _checkpoint(Path(src).resolve())  # orbax wants absolute paths
    cfg = load_config(run_dir / "config.yaml")
    if cfg.model.module:
        raise ValueError(f"{run_dir}: model.module={cfg.model.module!r} is a user model; only "
                         f"the built-in decoder converts to Hugging Face")
    base, source = None, None
    if (run_dir / "hf_config.json").is_file():
        base, source = json.loads((run_dir / "hf_config.json").read_text()), run_dir
    elif cfg.model.init_from and (Path(cfg.model.init_from) / "config.json").is_file():
        source = Path(cfg.model.init_from)
        base = hf.read_config(source)
    if dtype is None:
        dtype = (base or {}).get("torch_dtype", "float32")
        dtype = dtype if dtype in hf.DTYPES else "float32"
    params = read_params(step_dir)
    out = hf.save(params, transformer_config(cfg), out, base_config=base, dtype=dtype)
    for name in TOKENIZER_FILES if source is not None else ():
        if (source / name).is_file():
            shutil.copy2(source / name, out / name)
    return out


def from_hf(src, out, overrides=()) -> Path:
    import jax

    from jaxpar import hf
    from jaxpar.train.checkpoint import Checkpointer
    from jaxpar.train.config import dump, load_config
    from jaxpar.train.loop import Run

    from jaxpar.train.checks import validate

    src, out = Path(src), Path(out)
    overrides = [*_default_mesh(overrides, jax.device_count()), *overrides]
    cfg = load_config(None, [f"model.init_from={src}", f"train.run_dir={out}", *overrides])
    validate(cfg, jax.device_count())
    run = Run.create(cfg)
    state = run.init_state()
    out.mkdir(parents=True, exist_ok=True)
    # the folder stands alone: model keys explicit, the HF config kept for the way back
    standalone = cfg.replace(model={"init_from": ""})
    (out / "config.yaml").write_text(dump(standalone))
    (out / "hf_config.json").write_text(json.dumps(hf.read_config(src), indent=2) + "\n")
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, out / name)
    ckpt = Checkpointer(out, cfg.checkpoint.keep)
    ckpt.save(0, state, {"data_step": 0, "seed": cfg.train.seed, "from_hf": str(src)})
    ckpt.wait()
    ckpt.close()
    jax.effects_barrier()
    return out


def _default_mesh(overrides, devices: int) -> list[str]:
    """No mesh.* key given: every device on the data axis (the vocab needs no padding at
    tensor=1), with a batch that axis divides, so the first command works on any machine."""
    if any(o.startswith("mesh.") for o in overrides):
        return []
    out = [f"mesh.data={devices}"]
    if not any(o.startswith("train.batch_size=") for o in overrides):
        out.append(f"train.batch_size={devices * max(1, 8 // devices)}")
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="jaxpar-convert", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("to-hf", help="run folder or checkpoint -> Hugging Face folder")
    a.add_argument("src")
    a.add_argument("out")
    a.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                   help="weight dtype (default: the imported model's torch_dtype, else float32)")
    b = sub.add_parser("from-hf", help="Hugging Face folder -> run folder with a checkpoint")
    b.add_argument("src")
    b.add_argument("out")
    b.add_argument("overrides", nargs="*", help="section.key=value for the run, e.g. mesh.tensor=2")
    args = ap.parse_args(argv)

    from jaxpar.train.config import ConfigError

    try:
        if args.cmd == "to-hf":
            path = to_hf(args.src, args.out, args.dtype)
        else:
            path = from_hf(args.src, args.out, args.overrides)
    except (ConfigError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
