"""Checkpoints with orbax: save every k steps, keep the last n, resume from the newest.

The whole train state is one orbax PyTree (params, optimizer state, and with DiLoCo the
global params, outer momentum, pending fragment and step); beside it a small JSON record
with the data position (batches are a pure function of the step) and the config. Restoring
uses the live state's shardings as the target, so arrays come back already sharded.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

from jaxpar.train.config import Config, ConfigError


def layout_meta(cfg: Config) -> dict:
    """Config keys that change the saved tree's structure; a resume must keep them."""
    return {"model.scan_layers": cfg.model.scan_layers}


class Checkpointer:
    def __init__(self, run_dir: str | Path, keep: int):
        self.path = Path(run_dir).resolve() / "checkpoints"
        self.manager = ocp.CheckpointManager(
            self.path, options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True),
            item_names=("state", "meta"))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state, meta: dict) -> None:
        self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                        meta=ocp.args.JsonSave(meta)))

    def restore(self, step: int, like_state, expect: dict | None = None) -> tuple[Any, dict]:
        """(state, meta) of checkpoint `step`, placed like `like_state`. `expect`: layout keys
        (`layout_meta`) the checkpoint must have been saved with (absent = their defaults:
        checkpoints from before the key existed)."""
        if expect:
            saved = self.manager.restore(step, args=ocp.args.Composite(
                meta=ocp.args.JsonRestore())).meta
            for key, want in expect.items():
                got = saved.get(key, False)
                if got != want:
                    raise ConfigError(
                        f"{key}={want} but the checkpoint {self.path}/{step} was saved with "
                        f"{key}={got} (a different param layout); resume with {key}={got}, or "
                        f"start a new train.run_dir")
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like_state)
        out = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
        return out.state, out.meta

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()
