"""The run folder across restarts: which config changes a resume accepts, the config each
segment ran with, and never overwriting an earlier run's files.

A *segment* is one start of `python -m jaxpar.train` in a run folder. Each appends one line
to `config_history.jsonl` (segment, start step, time, the changed keys, the whole config);
every checkpoint's meta holds the config too. A resume compares its config with the one in
the checkpoint it restores, key by key — a mapping such as `model.rope_scaling` or
`sharding.rules` is one key, compared whole — and every key is classified in
`jaxpar.train.config` (`resume_class`):

- **safe** (written to the history and printed): the mesh axes, the attention / overlap
  implementation, `sharding.rules`, `model.remat`, `train.microbatches`, cadence and
  reporting. They change where and how the same math runs, not the math: the state is
  restored resharded onto the new mesh, and losses continue within fp32 reassociation error.
  (`mesh.replica` is the number of replicas with DiLoCo, so there it is not allowed; a
  `mesh.tensor` that changes the padded vocab of the built-in decoder is named and refused.)
- **math** / **layout** (one line naming the keys, exit 2): everything else — seed, batch
  size, seq_len, the optimizer and its schedule, the model, `diloco.*`, `data.*`, and
  `train.steps`: the lr schedule (warmup and cosine decay) is a function of `train.steps`,
  so changing it changes the lr of steps already taken and to come. Keys that later versions
  add are refused unless classified safe: unknown means it may change the math.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from jaxpar.train.config import Config, ConfigError, dump, resume_class
HISTORY = "config_history.jsonl"
# files a fresh start would overwrite
RUN_FILES = ("metrics.jsonl", "summary.json")


def flat(tree: dict) -> dict[str, Any]:
    """{"section.key": value} of a config dict; mapping values stay whole."""
    return {f"{s}.{k}": v for s, keys in tree.items() for k, v in keys.items()}


def changes(old: dict, cfg: Config) -> dict[str, list]:
    """{key: [old, new]} of the keys whose values differ; keys the old config lacks (it was
    written before they existed) are not compared."""
    before, now = flat(old), flat(cfg.to_dict())
    return {k: [before[k], v] for k, v in now.items() if k in before and before[k] != v}


def unsafe(diff: dict[str, list], old: dict, cfg: Config) -> list[str]:
    diloco = cfg.diloco.enabled or bool(flat(old).get("diloco.enabled"))
    return [k for k in diff
            if resume_class(k) != "safe" or (k == "mesh.replica" and diloco)]


def _padded_vocab(vocab: int, tensor: int) -> int:
    return -(-vocab // tensor) * tensor  # as jaxpar.train.model pads it


def check_padded_vocab(diff: dict[str, list], old: dict, cfg: Config) -> None:
    """The built-in decoder pads its vocab to a multiple of mesh.tensor; a resume whose
    tensor axis pads it differently cannot restore the embedding: say so, and which fit."""
    if "mesh.tensor" not in diff or cfg.model.module or not cfg.model.vocab:
        return
    v, (t_old, t_new) = cfg.model.vocab, diff["mesh.tensor"]
    want = _padded_vocab(v, t_old)
    if _padded_vocab(v, t_new) != want:
        fit = [t for t in range(1, want + 1) if _padded_vocab(v, t) == want][:8]
        raise ConfigError(
            f"mesh.tensor {t_old} -> {t_new} pads the vocab ({v}) to {_padded_vocab(v, t_new)} "
            f"rows instead of the checkpoint's {want}: its embedding cannot be restored; "
            f"resume with mesh.tensor in {fit}")


def check_resume(run_dir: Path, step: int, meta: dict, cfg: Config) -> dict[str, list]:
    """The allowed changes from the checkpoint's config to `cfg`; ConfigError (one line,
    naming the keys) when a change would not continue the same run."""
    old = meta.get("config") or {"train": {"seed": meta.get("seed", cfg.train.seed)}}
    diff = changes(old, cfg)
    bad = unsafe(diff, old, cfg)
    if not bad:
        check_padded_vocab(diff, old, cfg)
    if bad:
        listed = ", ".join(f"{k} ({diff[k][0]!r} -> {diff[k][1]!r})" for k in bad)
        why = (" (train.steps sets the length of the lr schedule)"
               if "train.steps" in bad else "")
        raise ConfigError(
            f"cannot resume {run_dir} from step {step} with a changed {listed}{why}: the "
            f"steps already taken used the old value; set it back, or choose a new "
            f"train.run_dir (a resume may change only what jaxpar.train.config lists in "
            f"RESUME_SAFE: mesh, impls, sharding rules, remat, microbatches, cadence)")
    return diff


def last_config(run_dir: Path) -> dict | None:
    path = run_dir / HISTORY
    if not path.exists():
        return None
    lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
    for ln in reversed(lines):
        try:
            return json.loads(ln)["config"]
        except (json.JSONDecodeError, KeyError):
            continue  # a line cut short by a kill
    return None


def check_fresh(run_dir: Path, cfg: Config) -> None:
    """A start from step 0 in a folder that holds another run's metrics or summary is
    refused: that run's record would be overwritten. The same run started again before its
    first checkpoint (the history's last config has no unsafe change) just starts over."""
    found = [f for f in RUN_FILES if (run_dir / f).exists() and (run_dir / f).stat().st_size]
    if not found:
        return
    old = last_config(run_dir)
    if old is not None and not unsafe(changes(old, cfg), old, cfg):
        return
    what = ("a run with a different config" if old is not None
            else "a run without a config history")
    raise ConfigError(f"train.run_dir={str(run_dir)!r} holds {', '.join(found)} of {what} and "
                      f"no checkpoint to resume from; choose a new train.run_dir, or move "
                      f"those files away to start over here")


def record(run_dir: Path, cfg: Config, start: int, diff: dict[str, list]) -> None:
    """Append this segment to the history and write config.yaml (the current config)."""
    path = run_dir / HISTORY
    n = 0
    if path.exists():
        n = sum(1 for ln in path.read_text().splitlines() if ln.strip())
    line = {"segment": n, "start_step": start, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "changes": diff, "config": cfg.to_dict()}
    with path.open("a") as fh:
        fh.write(json.dumps(line) + "\n")
    (run_dir / "config.yaml").write_text(dump(cfg))


def describe(diff: dict[str, list]) -> str:
    return ", ".join(f"{k} {a} -> {b}" for k, (a, b) in diff.items())
