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

    def restore(self, step: int, like_state) -> tuple[Any, dict]:
        """(state, meta) of checkpoint `step`, placed like `like_state`."""
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like_state)
        out = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
        return out.state, out.meta

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()
