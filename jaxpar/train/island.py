"""The trainer's side of a Streaming DiLoCo island (`diloco.islands`): this run is one island.

    isl = island.for_run(run)                  # after run.init_state(); a no-op without islands
    state, start = isl.join(state, start, meta, writer)   # after the checkpoint restore
    state = isl.after_step(state, step)        # each step: the island's sync / merge
    isl.close()                                # at the end and on the preemption stop path

The compiled step of an island is the inner update only (`Run._step_fn`); the outer rounds
are `jaxpar.diloco.islands.Island`'s, on the host. `join` adopts the store's newest global
state when rounds have closed (a restarted island rejoins at the next round), so the step
may move: the loop goes on from the step it returns, and the data step follows it (the rows
of the steps jumped over are skipped). `after_step` writes one metrics.jsonl record per merged
round, `{"step", "round", "fragment", "members", "wait_s", "bytes"}`, and at the last step
merges the round still in flight (`Island.finish`) so the final checkpoint and eval hold it,
as `StreamingDiLoCo.finalize` does in the single program.

The island's checkpoint is the run's own (`DiLoCoState`: replica params, inner state,
θ_global, outer state, step) with the island id in its meta: a run folder belongs to one id.
"""
from __future__ import annotations

from jaxpar.diloco.islands import Island, IslandError
from jaxpar.train.config import RESUME_MATH, ConfigError

# keys of RESUME_MATH that may differ between islands: the islands section itself (id, store
# path) and the data path (each site reads its own copy of the same data)
PER_ISLAND = ("diloco.islands", "data.path")


class NoIsland:
    """The hooks of a run that is not an island: each does nothing."""

    def join(self, state, start, meta, writer):
        return state, start

    def after_step(self, state, step):
        return state

    def meta(self) -> dict:
        return {}

    def summary(self) -> dict:
        return {}

    def close(self) -> None:
        pass


def for_run(run) -> NoIsland | TrainIsland:
    """The island hooks of `run` (after `run.init_state()`, which builds `run.diloco`)."""
    return TrainIsland(run) if run.islands is not None else NoIsland()


def settings(cfg) -> dict:
    """The config keys every island must share (they change the math): refused at join,
    named, when two islands differ. The replicas per island are among them, as global
    replica m = island id × replicas per island + local replica fixes the data rows."""
    flat = {f"{s}.{k}": v for s, sec in cfg.to_dict().items() for k, v in sec.items()}
    keys = [k for k in RESUME_MATH if k not in PER_ISLAND] + ["mesh.replica"]
    return {k: flat[k] for k in keys}


class TrainIsland:
    def __init__(self, run):
        conf = run.islands
        self.id, self.steps = conf.id, run.cfg.train.steps
        self.island = Island(run.diloco, conf.store, count=conf.count, island_id=conf.id,
                             wait_s=conf.wait_s, settings=settings(run.cfg))
        self._written = 0

    def join(self, state, start: int, meta: dict | None, writer):
        """(state, step) to train from: the restored `state` on a fresh store, else the store's
        newest global state and the step after the last closed merge."""
        if meta and meta.get("island", self.id) != self.id:
            raise ConfigError(f"train.run_dir holds the checkpoints of island {meta['island']}, "
                              f"not of diloco.islands.id={self.id}: give each island its own "
                              f"run_dir")
        self._writer = writer
        if start >= self.steps:  # a finished run started again: nothing left to sync
            return state, start
        try:
            state = self.island.join(state)
        except IslandError as e:  # settings, duplicate id, missing store: a restart won't help
            raise ConfigError(str(e)) from None
        joined = self.island.step
        if joined < start:  # adopted an older state than its own checkpoint: drop what's newer
            writer.restart_at(joined)
        self._written = len(self.island.rounds)
        return state, joined

    def after_step(self, state, step: int):
        state = self.island.after_step(state)
        if step == self.steps:
            state = self.island.finish(state)
        for rec in self.island.rounds[self._written:]:
            self._writer.write(rec)
        self._written = len(self.island.rounds)
        return state

    def meta(self) -> dict:
        return {"island": self.id}

    def summary(self) -> dict:
        rounds = self.island.rounds
        return {"island": {"id": self.id, "rounds": len(rounds),
                           "bytes": sum(r["bytes"] for r in rounds),
                           "max_wait_s": max((r["wait_s"] for r in rounds), default=0.0)}}

    def close(self) -> None:
        self.island.close()
