"""Checkpoints with orbax: save every k steps, keep the last n, resume from the newest good one.

The whole train state is one orbax PyTree (params, optimizer state, and with DiLoCo the
global params, outer momentum, pending fragment and step); beside it a small JSON record
(`meta`) with the data position (batches are a pure function of the data step), whether
the step's eval was due, and the config the segment ran with. Restoring uses the live
state's shardings as the target, so arrays come back already sharded — on the mesh of
*this* run, which may differ from the mesh that saved them.

**Trust, decided by the group.** orbax commits a step folder atomically; once it has,
process 0 writes `sums.json` into it: the size and CRC-32 of every file. A restore
classifies before it trusts, and every process acts on the same verdict:

1. the candidate is the newest step that *every* process sees (`group.agree_min`);
2. each process checks the sums (file reads only, no collectives); a checkpoint that any
   process finds short, missing a file or with a wrong CRC is **corrupt** for all;
3. otherwise each process restores it; if all succeed, that is the step. If one fails and
   the sums still match, the failure is **transient** (an I/O error, a network file system
   hiccup): all retry after 1, 2, 4, 8 s, then stop with one line (exit 2), moving nothing.
   A checkpoint without sums (killed between commit and sums, or written before sums
   existed) that fails to restore counts as corrupt.
4. corrupt checkpoints are named in one line and moved to `corrupt_checkpoints/` once, by
   process 0, after the decision; then the one before is tried. None restoring is one line,
   exit 2, nothing moved.

Replicated arrays are written whole by their first replica (orbax's `use_replica_parallel`
off): replica-parallel writes slice each replicated array per writer, which compiled one
XLA program per distinct slice on the first save (the demo state: 160 compilations, 6.3 s
against 0.55 s without; docs/reliability_first_save.json), and that first save is what a
SIGTERM grace period must fit (docs/reliability.md).
"""
from __future__ import annotations

import json
import os
import shutil
import time
import zlib
from pathlib import Path
from typing import Any, Callable

import jax
import numpy as np
import orbax.checkpoint as ocp

from jaxpar.train import group
from jaxpar.train.config import Config, ConfigError

SUMS = "sums.json"
RETRY_S = (1.0, 2.0, 4.0, 8.0)  # backoff of a transient read error, then stop
OK, UNVERIFIED, CORRUPT = 0, 1, 2


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


def _file_sums(step_dir: Path) -> dict[str, list[int]]:
    out = {}
    for f in sorted(step_dir.rglob("*")):
        if f.is_file() and f.name != SUMS:
            crc = 0
            with f.open("rb") as fh:
                while chunk := fh.read(1 << 22):
                    crc = zlib.crc32(chunk, crc)
            out[str(f.relative_to(step_dir))] = [f.stat().st_size, crc]
    return out


def verify(step_dir: Path) -> tuple[int, str]:
    """(OK | UNVERIFIED | CORRUPT, why) of a committed step folder against its sums."""
    try:
        want = json.loads((step_dir / SUMS).read_text())
    except FileNotFoundError:
        return UNVERIFIED, "no sums.json"
    except (OSError, ValueError) as e:
        return CORRUPT, f"sums.json unreadable ({type(e).__name__})"
    for rel, (size, crc) in want.items():
        f = step_dir / rel
        if not f.is_file():
            return CORRUPT, f"{rel} is missing"
        if f.stat().st_size != size:
            return CORRUPT, f"{rel} has {f.stat().st_size} bytes, {size} when saved"
    got = _file_sums(step_dir)
    for rel, (size, crc) in want.items():
        if got[rel][1] != crc:
            return CORRUPT, f"{rel} has CRC-32 {got[rel][1]:08x}, {crc:08x} when saved"
    return OK, ""


def _handler():
    """orbax's PyTree handler with replicated arrays written whole (module docstring)."""
    th = ocp.type_handlers
    registry = th.create_type_handler_registry(
        (jax.Array, th.ArrayHandler(use_replica_parallel=False)), (np.ndarray, th.NumpyHandler()),
        (int, th.ScalarHandler()), (float, th.ScalarHandler()), (np.number, th.ScalarHandler()),
        (str, th.StringHandler()))
    return ocp.PyTreeCheckpointHandler(type_handler_registry=registry)


class Checkpointer:
    def __init__(self, run_dir: str | Path, keep: int):
        self.run_dir = Path(run_dir).resolve()
        self.path = self.run_dir / "checkpoints"
        self.manager = ocp.CheckpointManager(
            self.path, options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True),
            item_handlers={"state": _handler(), "meta": ocp.JsonCheckpointHandler()})
        self._unsealed: int | None = None  # saved, sums not yet written

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def steps(self) -> list[int]:
        """Committed steps, newest first."""
        return sorted(self.manager.all_steps(), reverse=True)

    def save(self, step: int, state, meta: dict) -> None:
        if step in self.manager.all_steps():  # e.g. a stop right after a periodic save
            return
        self._seal()  # orbax waits for the previous save here anyway
        self.manager.save(step, args=ocp.args.Composite(state=ocp.args.PyTreeSave(state),
                                                        meta=ocp.args.JsonSave(meta)))
        self._unsealed = step

    def _seal(self) -> None:
        """Wait for the pending save to commit, then write its sums (process 0)."""
        self.manager.wait_until_finished()
        step, self._unsealed = self._unsealed, None
        if step is None or jax.process_index() != 0:
            return
        step_dir = self.path / str(step)
        if step_dir.is_dir():  # (max_to_keep may already have deleted it)
            tmp = step_dir / (SUMS + ".tmp")
            tmp.write_text(json.dumps(_file_sums(step_dir)))
            os.replace(tmp, step_dir / SUMS)

    def read_meta(self, step: int) -> dict:
        return self.manager.restore(step, args=ocp.args.Composite(
            meta=ocp.args.JsonRestore())).meta

    def restore(self, step: int, like_state, expect: dict | None = None) -> tuple[Any, dict]:
        """(state, meta) of checkpoint `step`, placed like `like_state`; `expect`: see
        `check_layout`. This process alone: no verification, no agreement."""
        if expect:
            check_layout(self.path, step, self.read_meta(step), expect)
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like_state)
        restore_args = ocp.checkpoint_utils.construct_restore_args(abstract)
        out = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.PyTreeRestore(abstract, restore_args=restore_args),
            meta=ocp.args.JsonRestore()))
        jax.block_until_ready(out.state)  # a truncated file fails here, not in step 1
        return out.state, out.meta

    def _try(self, fn) -> tuple[Any, BaseException | None]:
        try:
            return fn(), None
        except Exception as e:  # noqa: BLE001 - orbax raises many types; classified below
            return None, e

    def restore_newest(self, like_state, say: Callable[[str], None],
                       check: Callable[[int, dict], None] = lambda step, meta: None,
                       expect: dict | None = None) -> tuple[int, Any, dict | None]:
        """(step, state, meta) of the newest checkpoint that restores, agreed by every
        process (module docstring); (0, like_state, None) when there is none. `check(step,
        meta)` and the layout (`expect`) may refuse the resume (their error propagates).
        Raises CheckpointError, moving nothing, when none restores or reads keep failing."""
        corrupt: list[tuple[int, str]] = []
        below = None
        while True:
            mine = [s for s in self.steps() if below is None or s < below]
            step = group.agree_min(mine[0] if mine else -1)  # the newest all of us see
            if step < 0:
                break
            status, why = verify(self.path / str(step))
            codes = group.gather(np.int32(status))
            if codes.max() == CORRUPT:
                corrupt.append((step, why or f"process {int(codes.argmax())} found it corrupt"))
                below = step
                continue
            got = self._restore_agreed(step, like_state, check, expect, bool(codes.max()), say)
            if got is None:
                corrupt.append((step, "does not restore"))
                below = step
                continue
            self._move_aside(corrupt, step, say)
            return step, *got
        if corrupt:
            raise CheckpointError(
                f"no checkpoint in {self.path} restores (steps "
                f"{', '.join(f'{s}: {w}' for s, w in corrupt)}); not starting over them "
                f"from step 0: restore a good copy or choose a new train.run_dir")
        return 0, like_state, None

    def _restore_agreed(self, step, like_state, check, expect, unverified: bool, say):
        """(state, meta) once every process has restored `step`; None when it is corrupt
        (it failed, and either has no sums or now fails them). Transient failures retry."""
        for attempt, wait_s in enumerate((*RETRY_S, None)):
            meta, err = self._try(lambda: self.read_meta(step))
            if err is None:  # the config checks raise the same error on every process
                check(step, meta)
                check_layout(self.path, step, meta, expect)
                got, err = self._try(lambda: self.restore(step, like_state))
            failed = group.gather(np.int32(err is not None))
            if not failed.any():
                return got
            status = verify(self.path / str(step))[0] if err is not None else OK
            if unverified or group.gather(np.int32(status)).max() == CORRUPT:
                return None
            if wait_s is None:
                raise CheckpointError(
                    f"checkpoint {self.path / str(step)} matches its sums but reading it "
                    f"failed {attempt + 1} times (process {int(failed.argmax())}: "
                    f"{type(err).__name__ if err else 'see its log'}: "
                    f"{' '.join(str(err).split())[:160] if err else ''}); a transient "
                    f"storage error: nothing moved, run the same command again")
            say(f"checkpoint {step}: read failed on process {int(failed.argmax())} "
                f"({type(err).__name__ if err else 'a peer'}), sums match: retrying in "
                f"{wait_s:g} s")
            time.sleep(wait_s)

    def _move_aside(self, corrupt: list[tuple[int, str]], good: int, say) -> None:
        for bad, why in corrupt:
            say(f"checkpoint {self.path / str(bad)} is corrupt ({why}); moved to "
                f"corrupt_checkpoints/, resuming from step {good}")
            if jax.process_index() == 0:
                dest = self.run_dir / "corrupt_checkpoints" / f"{bad}-{int(time.time())}"
                dest.parent.mkdir(exist_ok=True)
                shutil.move(str(self.path / str(bad)), dest)
        if corrupt:
            group.barrier("jaxpar_corrupt_moved")
            self.manager.reload()

    def wait(self) -> None:
        self._seal()

    def close(self) -> None:
        self._seal()
        self.manager.close()
