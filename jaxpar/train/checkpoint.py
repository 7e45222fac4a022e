"""Checkpoints with orbax: save every k steps, keep the last n, resume from the newest good one.

The whole train state is one orbax PyTree (params, optimizer state, and with DiLoCo the
global params, outer momentum, pending fragment and step); beside it a small JSON record
(`meta`) with the data position (batches are a pure function of the data step) and the
config the segment ran with. Restoring uses the live state's shardings as the target, so
arrays come back already sharded — on the mesh of *this* run, which may differ from the mesh
that saved them (orbax reads each device's slice of the stored global arrays).

A checkpoint is trusted only once it restores: orbax commits atomically (a step folder
appears only when complete), but a file can still be cut short or deleted later (a full
disk, a copy gone wrong). `restore_newest` tries the newest first; one that fails is named
in one line, moved to `corrupt_checkpoints/<step>` (kept for a person to look at, and out of
the way of the step's next save), and the one before it is tried.
"""
from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any, Callable

import jax
import orbax.checkpoint as ocp

from jaxpar.train.config import Config, ConfigError


class CheckpointError(ConfigError):
    """No checkpoint in the folder restores (`python -m jaxpar.train` exits with 2)."""


def layout_meta(cfg: Config) -> dict:
    """Config keys that change the saved tree's structure; a resume must keep them."""
    return {"model.scan_layers": cfg.model.scan_layers}


def check_layout(path, step: int, saved: dict, expect: dict | None) -> None:
    """`expect`: layout keys (`layout_meta`) the checkpoint must have been saved with (absent
    = their defaults: checkpoints from before the key existed)."""
    for key, want in (expect or {}).items():
        got = saved.get(key, False)
        if got != want:
            raise ConfigError(
                f"{key}={want} but the checkpoint {path}/{step} was saved with "
                f"{key}={got} (a different param layout); resume with {key}={got}, or "
                f"start a new train.run_dir")


class Checkpointer:
    def __init__(self, run_dir: str | Path, keep: int):
        self.run_dir = Path(run_dir).resolve()
        self.path = self.run_dir / "checkpoints"
        self.manager = ocp.CheckpointManager(
            self.path, options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True),
            item_names=("state", "meta"))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def steps(self) -> list[int]:
        """Committed steps, newest first."""
        return sorted(self.manager.all_steps(), reverse=True)

    def save(self, step: int, state, meta: dict) -> None:
        if step in self.manager.all_steps():  # e.g. a stop right after a periodic save
            return
        self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                        meta=ocp.args.JsonSave(meta)))

    def read_meta(self, step: int) -> dict:
        return self.manager.restore(step, args=ocp.args.Composite(
            meta=ocp.args.JsonRestore())).meta

    def restore(self, step: int, like_state, expect: dict | None = None) -> tuple[Any, dict]:
        """(state, meta) of checkpoint `step`, placed like `like_state`; `expect`: see
        `check_layout`."""
        if expect:
            check_layout(self.path, step, self.read_meta(step), expect)
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like_state)
        out = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
        jax.block_until_ready(out.state)  # a truncated file fails here, not in step 1
        return out.state, out.meta

    def restore_newest(self, like_state, say: Callable[[str], None],
                       check: Callable[[int, dict], None] = lambda step, meta: None,
                       expect: dict | None = None) -> tuple[int, Any, dict | None]:
        """(step, state, meta) of the newest checkpoint that restores (step 0 may be one
        `jaxpar-convert from-hf` wrote); (0, like_state, None) when there is none.
        `check(step, meta)` and the layout (`expect`) may refuse the resume (their error
        propagates). Raises CheckpointError, moving nothing, when there are checkpoints and
        none restores."""
        failed = []
        for step in self.steps():
            try:
                meta = self.read_meta(step)
            except Exception as e:  # noqa: BLE001 - orbax raises many types for a broken file
                failed.append((step, e))
                continue
            check(step, meta)
            check_layout(self.path, step, meta, expect)
            try:
                state, meta = self.restore(step, like_state)
            except Exception as e:  # noqa: BLE001
                failed.append((step, e))
                continue
            for bad, e in failed:
                say(f"checkpoint {self.path / str(bad)} does not restore ({type(e).__name__}: "
                    f"{' '.join(str(e).split())[:160]}); moved to corrupt_checkpoints/, "
                    f"resuming from step {step}")
                self._move_aside(bad)
            return step, state, meta
        if failed:
            raise CheckpointError(
                f"no checkpoint in {self.path} restores (steps "
                f"{', '.join(f'{s}: {type(e).__name__}' for s, e in failed)}); not starting "
                f"over them from step 0: restore a good copy or choose a new train.run_dir")
        return 0, like_state, None

    def _move_aside(self, step: int) -> None:
        if jax.process_index() == 0:
            dest = self.run_dir / "corrupt_checkpoints" / f"{step}-{int(time.time())}"
            dest.parent.mkdir(exist_ok=True)
            shutil.move(str(self.path / str(step)), dest)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils
            multihost_utils.sync_global_devices(f"jaxpar_corrupt_{step}")
        self.manager.reload()

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()
