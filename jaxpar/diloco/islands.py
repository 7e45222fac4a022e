"""Streaming DiLoCo islands: separate JAX programs that train alone and agree through a store.

An island is one ordinary run with its own mesh (its `replica` axis may hold several DiLoCo
replicas) and one or several processes (`jax.distributed` inside the island: process 0 talks
to the store for the island and broadcasts its decisions; every process computes the same
update from the same bytes). Islands share only a sync store (`jaxpar.diloco.store`, which
holds the layout and the wire format). The outer math is `jaxpar.diloco.outer`'s, one copy;
only the replica mean is taken through the store instead of a collective:

    sd = streaming_diloco(inner, num_replicas=replicas_per_island, ...)
    island = Island(sd, "/shared/run7/sync", count=3, island_id=k, wait_s=120)
    state = island.join(sd.init(params))      # fresh, or rejoin: adopt the store's state
    while int(state.step) < steps:            # the data row of step t is island.step + 1
        state = jit(inner_step)(state, batch(island.step + 1))   # sd.inner_update only
        state = island.after_step(state)      # the sync / merge that fall on this step
    state = island.finish(state); island.close()

Rounds. Round r is fragment p = r mod P, synced at step (r+1)·H/P and merged τ steps later.
  * sync: a jitted function quantizes this island's outer gradients Δ_m = θ_global[p] − θ_m[p]
    (every local replica, each in whole quantization blocks: the all-gather semantics of the
    single program, no re-quantization), and a background thread writes them to the store
    while the next τ inner steps run.
  * merge: the island waits until every expected island's delta is in the store, or wait_s
    has passed, then tries to create the round's record with the members it saw (the deltas
    that pass their checksum). Create-if-absent makes exactly one record win; every island
    uses it. Expected = the members of round r−1 (and islands whose delta of r−1 was corrupt)
    plus islands that announced a rejoin at r: an island whose delta was missing at the
    deadline is not waited for again until it announces itself.
  * every island then reads the members' deltas in island-id order, takes the fp32 mean over
    all their replicas (so islands with more replicas weigh more: token-weighted when every
    replica reads the same batch size) and runs `outer_apply` on the host CPU backend. Equal
    bytes in, one program, one backend: θ_global and the outer state come out bit-identical
    on every island, whatever its mesh. Each delta carries the digest of its writer's
    θ_global[p] and outer state before the round; a mismatch stops the run (islands diverged).
  * once every H steps (after the round of the last fragment) the round's closer publishes
    the state (`global/{r+1}`) and deletes rounds older than keep_rounds.

Rejoin. `join` on a store that already has rounds adopts the newest published state, replays
the closed rounds after it from their records and deltas (the same code as a merge), announces
itself in its heartbeat for the round two past the newest closed one (`_announce_after`) and
starts at the step after the last closed merge. The inner
steps it did since the last round it was in, and the data rows of the steps it jumps over, are
skipped (as in torchft).
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
import socket
import sys
import threading
import time
import uuid

import jax
import jax.numpy as jnp
import numpy as np

from jaxpar.diloco import quantize as qz
from jaxpar.diloco import store as st
from jaxpar.diloco.outer import (DiLoCoState, StreamingDiLoCo, fragment_delta_MN, outer_apply,
                                 split_flat)
from jaxpar.diloco.store import CorruptBlob, IslandError, SyncStore

__all__ = ["ID_ENV", "Island", "IslandError", "IslandsConfig", "CorruptBlob", "islands_config",
           "math_settings"]

ID_ENV = "JAXPAR_ISLAND_ID"  # the island id when `diloco.islands.id` is not given


@dataclasses.dataclass(frozen=True)
class IslandsConfig:
    """`diloco.islands` of a run config: {store, count, id, wait_s}."""
    store: str
    count: int
    id: int
    wait_s: float = 120.0


def islands_config(raw: dict | None, env=os.environ) -> IslandsConfig | None:
    """The checked `diloco.islands` mapping (None if empty); `id` falls back to
    $JAXPAR_ISLAND_ID."""
    if not raw:
        return None
    fields = [f.name for f in dataclasses.fields(IslandsConfig)]
    for key in raw:
        if key not in fields:
            raise IslandError(f"unknown key diloco.islands.{key} (valid keys: {', '.join(fields)})")
    raw = dict(raw)
    if "id" not in raw and env.get(ID_ENV) is not None:
        try:
            raw["id"] = int(env[ID_ENV])
        except ValueError:
            raise IslandError(f"${ID_ENV}={env[ID_ENV]!r} must be an int") from None
    for key in ("store", "count", "id"):
        if key not in raw:
            how = f" (or set ${ID_ENV})" if key == "id" else ""
            raise IslandError(f"diloco.islands.{key} is required{how}")
    if not isinstance(raw["store"], str) or not raw["store"]:
        raise IslandError(f"diloco.islands.store={raw['store']!r} must be a path or URL "
                          f"(a folder, file://, gs://, s3://)")
    for key in ("count", "id"):
        if not isinstance(raw[key], int) or isinstance(raw[key], bool):
            raise IslandError(f"diloco.islands.{key}={raw[key]!r} must be an int")
    if raw["count"] < 1:
        raise IslandError(f"diloco.islands.count={raw['count']} must be ≥ 1")
    if not 0 <= raw["id"] < raw["count"]:
        raise IslandError(f"diloco.islands.id={raw['id']} must be in 0..{raw['count'] - 1} "
                          f"(diloco.islands.count={raw['count']})")
    wait = raw.get("wait_s", 120.0)
    if not isinstance(wait, (int, float)) or isinstance(wait, bool) or not wait > 0:
        raise IslandError(f"diloco.islands.wait_s={wait!r} must be a number > 0")
    return IslandsConfig(raw["store"], raw["count"], raw["id"], float(wait))


def math_settings(sd: StreamingDiLoCo, count: int, params) -> dict:
    """The settings every island must share (they change the outer math or the round schedule).
    The caller adds its own (model, outer optimizer, seed) to `Island(settings=...)`."""
    sig = [[jax.tree_util.keystr(p), list(np.shape(x)), str(np.asarray(x).dtype)]
           for p, x in jax.tree_util.tree_flatten_with_path(params)[0]]
    return {"count": count, "sync_every": sd.sync_every, "num_fragments": sd.num_fragments,
            "overlap_steps": sd.overlap_steps, "alpha": float(sd.alpha), "quantize": sd.quantize,
            "param_shapes": st.digest([np.frombuffer(json.dumps(sig).encode(), np.uint8)])}


def _to_host(tree):
    """numpy copies of (possibly multi-process, sharded) arrays: the whole value everywhere."""
    if jax.process_count() == 1:
        return jax.device_get(tree)
    from jax.experimental import multihost_utils

    return multihost_utils.process_allgather(tree, tiled=True)


def _broadcast_bytes(data: bytes | None) -> bytes:
    """Process 0's bytes on every process of the island (the others pass None)."""
    if jax.process_count() == 1:
        return data
    from jax.experimental import multihost_utils

    n = int(multihost_utils.broadcast_one_to_all(np.int32(len(data) if data else 0)))
    buf = np.frombuffer(data, np.uint8) if data else np.zeros(n, np.uint8)
    return np.asarray(multihost_utils.broadcast_one_to_all(buf)).tobytes()


def _broadcast_text(text: str) -> str:
    return _broadcast_bytes(text.encode() if jax.process_index() == 0 else None).decode()


def _group_decision(fn) -> tuple:
    """Process 0 runs `fn` (the others pass None); every process returns its result or raises
    its IslandError. A decision of the island, never of one process from what only it saw."""
    data = None
    if fn is not None:
        try:
            out = {"ok": list(fn())}
        except IslandError as e:
            out = {"error": str(e), "corrupt": isinstance(e, CorruptBlob)}
        data = json.dumps(out).encode()
    out = json.loads(_broadcast_bytes(data))
    if "error" in out:
        raise (CorruptBlob if out["corrupt"] else IslandError)(out["error"])
    return tuple(out["ok"])


def _log_stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


class Island:
    def __init__(self, sd: StreamingDiLoCo, store: str, *, count: int, island_id: int,
                 wait_s: float = 120.0, settings: dict | None = None, heartbeat_s: float = 2.0,
                 poll_s: float = 0.05, keep_rounds: int | None = None, log=_log_stderr):
        for name, v in (("count", count), ("id", island_id)):
            if not isinstance(v, (int, np.integer)) or isinstance(v, bool):
                raise IslandError(f"diloco.islands.{name}={v!r} must be an int")
        if count < 1:
            raise IslandError(f"diloco.islands.count={count} must be ≥ 1")
        if not 0 <= island_id < count:
            raise IslandError(f"diloco.islands.id={island_id} must be in 0..{count - 1} "
                              f"(diloco.islands.count={count})")
        if not wait_s > 0:
            raise IslandError(f"diloco.islands.wait_s={wait_s} must be > 0")
        self.sd, self.count, self.id, self.wait_s = sd, int(count), int(island_id), float(wait_s)
        self.extra_settings = dict(settings or {})
        self.heartbeat_s, self.poll_s = float(heartbeat_s), float(poll_s)
        self.keep_rounds = max(keep_rounds or 0, 3 * sd.num_fragments + 2)
        self.log = log
        self.store = SyncStore(store)
        self.session = uuid.uuid4().hex[:12]
        self.period = sd.sync_every // sd.num_fragments
        self.step = 0                 # inner steps done (host copy of state.step)
        self.rounds: list[dict] = []  # one metrics record per merged round
        self._alive = list(range(self.count))  # islands expected in the next round
        self._pending = None          # (round, writer thread, box with the written blob)
        self._joins_round = None
        self._stop = threading.Event()
        self._beat_thread = None
        self._beat = 0
        self._beat_lock = threading.Lock()
        self._stolen = None
        self._publisher = None
        self._cpu = jax.local_devices(backend="cpu")[0]
        # an island of several processes (jax.distributed): process 0 talks to the store for
        # the island (writes, heartbeat, closing rounds); every process reads the same agreed
        # records and deltas and computes the same update
        self._lead = jax.process_index() == 0

    # ------------------------------------------------------------------ schedule
    def round_of_sync(self, t: int) -> int | None:
        return t // self.period - 1 if t > 0 and t % self.period == 0 else None

    def sync_step(self, r: int) -> int:
        return (r + 1) * self.period

    def merge_step(self, r: int) -> int:
        return self.sync_step(r) + self.sd.overlap_steps

    # ------------------------------------------------------------------ join
    def join(self, state: DiLoCoState) -> DiLoCoState:
        """Check the store and the settings, claim this island's id, and return the state to
        train from: `state` itself on a fresh store, else the store's newest global state."""
        lead = jax.tree.leaves(state.params)[0].shape[0]
        if lead != self.sd.num_replicas:
            raise IslandError("Island.join expects the state of sd.init(params)")
        self._frags = self.sd.fragments(state.global_params)
        self._treedef = jax.tree.structure(state.global_params)
        self._outer_defs = [jax.tree.structure(o) for o in state.outer_state]
        self.session = _broadcast_text(self.session)  # the lead's: one session per island
        self._glob = [np.asarray(x) for x in _to_host(jax.tree.leaves(state.global_params))]
        self._outer = [[np.asarray(x) for x in _to_host(jax.tree.leaves(o))]
                       for o in state.outer_state]
        self.step = int(_to_host(state.step))
        self._compile(state)
        # the lead checks the store and decides; every process acts on its decision
        plan = _group_decision(self._lead_join if self._lead else None)
        if plan[0] == "fresh":
            return state
        try:
            return self._adopt(state, *plan[1:])
        except BaseException:
            self.close()
            raise

    def _lead_join(self) -> tuple:
        """Process 0: probe, settings, id, and fresh start or the rounds to adopt."""
        self.store.probe(self.session)
        self._check_settings(self._tree(self._glob))
        self._claim_id()
        self._start_heartbeat()
        try:
            if not self.store.rounds_with_record():
                self._start_fresh()
                return ("fresh",)
            return ("adopt",) + self._plan_rejoin()
        except BaseException:
            self.close()  # a failed join leaves no live-looking heartbeat behind
            raise

    def _check_settings(self, params) -> None:
        mine = dict(math_settings(self.sd, self.count, params), **self.extra_settings)
        blob = json.dumps(mine, sort_keys=True).encode()
        if self.store.create(st.SETTINGS, blob):
            return
        theirs, _ = self.store.get_json(st.SETTINGS)
        diff = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
        if diff:
            shown = ", ".join(f"{k}={mine.get(k)!r} (store: {theirs.get(k)!r})" for k in diff)
            raise IslandError(f"island {self.id} differs from the islands already in "
                              f"{self.store.url}/{st.SETTINGS}: {shown}; every island needs "
                              f"the same")

    def _claim_id(self) -> None:
        beat, _ = self.store.get_json(st.heartbeat_key(self.id))
        if beat is not None and not beat.get("closed") and beat.get("session") != self.session:
            # a process that left without closing: dead (a restart) or alive (a duplicate id)
            time.sleep(2.5 * float(beat.get("every", self.heartbeat_s)))
            again, _ = self.store.get_json(st.heartbeat_key(self.id))
            if again is not None and again.get("beat") != beat.get("beat"):
                raise self._duplicate(self.store.get_json(st.registry_key(self.id))[0] or {})
        reg, gen = self.store.get(st.registry_key(self.id))
        mine = json.dumps({"session": self.session, "host": socket.gethostname(),
                           "pid": os.getpid(), "time": time.time()}).encode()
        if not self.store.put_if(st.registry_key(self.id), mine, gen):
            theirs, _ = self.store.get_json(st.registry_key(self.id))
            raise self._duplicate(theirs or {})

    def _duplicate(self, other: dict) -> IslandError:
        return IslandError(f"diloco.islands.id={self.id} is already taken by a live island "
                           f"(host {other.get('host', '?')}, pid {other.get('pid', '?')}); give "
                           f"each island its own id in 0..{self.count - 1}")

    def _start_fresh(self):
        # a resume before the first round closed is fine (global/0 is there); without global/0
        # the store this island synced through is gone
        if self.step > 0 and not self.store.global_indices():
            raise IslandError(f"sync store {self.store.url} holds no rounds, but island {self.id} "
                              f"resumes at step {self.step}: the store was deleted or belongs to "
                              f"another run; point diloco.islands.store at this run's store")
        init = self._global_blob(0, 0)
        if not self.store.create(st.global_key(0), init):
            header, _ = self._read_global(0)
            mine = st.digest(self._glob + [x for o in self._outer for x in o])
            if header["state_sha"] != mine:
                raise IslandError(f"island {self.id}'s initial params differ from "
                                  f"{self.store.url}/{st.global_key(0)}: every island needs the "
                                  f"same init (seed, model)")

    def _plan_rejoin(self) -> tuple[int, int, int]:
        """Process 0 of a rejoining island: (newest global state n, newest closed round, the
        round it announced itself for, which had not closed)."""
        n_best = max(self.store.global_indices(), default=None)
        if n_best is None:
            raise IslandError(f"sync store {self.store.url} has rounds but no global state "
                              f"(global/ was deleted?): island {self.id} cannot rejoin")
        while True:
            newest = max(self.store.rounds_with_record())
            self._announce_after(newest)
            if self._record(self._joins_round) is None:
                # announced in time: the others will wait for us there
                return n_best, newest, self._joins_round

    def _adopt(self, state, n_best: int, newest: int, joins: int):
        """Every process: the store's state after round `newest` (global/{n_best} + replay)."""
        start_step = self.step
        header, arrays = self._read_global(n_best)
        self._load_global(header, arrays)
        for r in range(n_best, newest + 1):
            rec = self._record(r)
            if rec is None:
                raise IslandError(f"sync store {self.store.url} lacks the record of round {r} "
                                  f"(deleted?): island {self.id} cannot replay it to rejoin")
            self._apply_round(r, rec, cached={})
        last = self._record(newest)
        self._alive = last["members"] + last["corrupt"]
        self.step = self.merge_step(newest)
        state = self._adopt_fn(state, self._tree(self._glob), self._outer_trees(),
                               jnp.asarray(self.step, jnp.int32))
        self.log(f"islands: island {self.id} rejoins at round {joins}, training from step "
                 f"{self.step}: adopted {st.global_key(n_best)} and replayed "
                 f"{newest + 1 - n_best} rounds; the data rows of steps "
                 f"{start_step + 1}..{self.step} are skipped")
        return state

    # ------------------------------------------------------------------ jitted pieces
    def _compile(self, state):
        sd, frags, fmt = self.sd, self._frags, self.sd.quantize
        shardings = jax.tree.map(lambda x: x.sharding, state)

        def wire(s, p):
            x_MN = fragment_delta_MN(s, frags, p)
            M, n = x_MN.shape
            k = -(-n // qz.BLOCK)
            x_MKB = jnp.pad(x_MN, ((0, 0), (0, k * qz.BLOCK - n))).reshape(M, k, qz.BLOCK)
            return jax.vmap(lambda b: qz.quantize(b, fmt))(x_MKB)

        # replicated output: process 0's local copy is the whole delta, even when the island's
        # replicas span several processes (the gather runs on the devices, asynchronously)
        rep = None if sd.mesh is None else jax.sharding.NamedSharding(sd.mesh,
                                                                     jax.sharding.PartitionSpec())
        self._wire_fn = jax.jit(wire, static_argnums=1, out_shardings=rep)

        def install(s, p, glob, outer_p):
            return sd.install_fragment(s, frags, p, glob, outer_p)

        self._install_fn = jax.jit(install, static_argnums=1, donate_argnums=0,
                                   out_shardings=shardings)

        def adopt(s, glob_tree, outer, step):
            params_M = jax.tree.map(lambda x, r: jnp.broadcast_to(x.astype(r.dtype), r.shape),
                                    glob_tree, s.params)
            return s._replace(step=step, params=sd._constrain_replicas(params_M),
                              global_params=glob_tree, outer_state=outer,
                              pending_fragment=jnp.asarray(-1, jnp.int32))

        self._adopt_fn = jax.jit(adopt, donate_argnums=0, out_shardings=shardings)
        # the outer update and the mean run on the host CPU backend on every island: equal
        # inputs give equal bits whatever mesh or accelerator the island trains on
        self._outer_cpu = jax.jit(functools.partial(outer_apply, sd.outer_optimizer))
        self._mean_cpu = jax.jit(lambda w: qz.dequantized_mean(w, fmt))

    def _on_cpu(self, fn, *args):
        with jax.default_device(self._cpu):
            args = jax.device_put(args, self._cpu)
            return jax.tree.map(np.asarray, fn(*args))

    @property
    def in_flight(self) -> bool:
        """True while this island's delta of the pending round is still being written."""
        return self._pending is not None and self._pending[1].is_alive()

    # ------------------------------------------------------------------ the step hook
    def after_step(self, state: DiLoCoState) -> DiLoCoState:
        """Call once after every inner step (`sd.inner_update`): starts the sync and does the
        merge that fall on this step."""
        if self._stolen:
            raise self._duplicate(self._stolen)
        self.step += 1
        r = self.round_of_sync(self.step)
        if r is not None:
            self._start_sync(state, r)
        if self._pending is not None and self.step == self.merge_step(self._pending[0]):
            state = self._merge(state)
        return state

    def finish(self, state: DiLoCoState) -> DiLoCoState:
        """Merge a round still in flight (as `StreamingDiLoCo.finalize`), then wait for the
        publication of the last state."""
        if self._pending is not None:
            state = self._merge(state)
        if self._publisher is not None:
            self._publisher.join()
        return state

    def close(self) -> None:
        """Stop the heartbeat and mark this island as closed (not a duplicate-id suspect)."""
        if self._publisher is not None:
            self._publisher.join()
        self._stop.set()
        if self._beat_thread is not None:
            self._beat_thread.join()
            self._write_heartbeat(closed=True)

    # ------------------------------------------------------------------ sync
    def _start_sync(self, state, r):
        p = r % self.sd.num_fragments
        wire = self._wire_fn(state, p)  # dispatched now, before the next step donates `state`
        before = self._fragment_digest(p)
        box: dict = {}

        def write():
            try:
                local = lambda x: np.asarray(x.addressable_data(0))
                arrays = {"payload": local(wire.payload)}
                if wire.scale_N is not None:
                    arrays["scale"] = local(wire.scale_N)
                header = {"kind": "delta", "round": r, "fragment": p, "step": self.sync_step(r),
                          "island": self.id, "session": self.session,
                          "replicas": self.sd.num_replicas, "quantize": self.sd.quantize,
                          "values": self._frags.size(p), "global_sha": before}
                blob = st.pack(header, arrays)
                self.store.put(st.delta_key(r, self.id, self.session), blob)
                box["blob"] = blob
            except BaseException as e:  # handed to the merge, which raises it in one line
                box["error"] = e

        th = threading.Thread(target=write, name=f"island-{self.id}-delta-{r}", daemon=True)
        if self._lead:
            th.start()
        else:  # only process 0 writes the island's delta
            box["blob"] = b""
        self._pending = (r, th, box)

    def _fragment_digest(self, p: int) -> str:
        idx = self._frags.leaves(p)
        return st.digest([self._glob[i] for i in idx] + self._outer[p])

    # ------------------------------------------------------------------ merge
    def _merge(self, state):
        r, th, box = self._pending
        self._pending = None
        t0 = time.monotonic()
        if th.is_alive() or self._lead:
            th.join()
        if "error" in box:
            e = box["error"]
            raise e if isinstance(e, IslandError) else IslandError(
                f"island {self.id}: writing its delta of round {r} failed: {e}")
        own_key = st.delta_key(r, self.id, self.session)
        rec, cached = self._agree(r, t0) if self._lead else (self._await_record(r, t0), {})
        if box["blob"]:
            cached.setdefault(own_key, box["blob"])
        waited = time.monotonic() - t0
        p = r % self.sd.num_fragments
        nbytes = self._apply_round(r, rec, cached)
        state = self._install_fn(state, p, [self._glob[i] for i in self._frags.leaves(p)],
                                 self._outer_tree(p))
        self._alive = rec["members"] + rec["corrupt"]
        if self._lead and self.id not in rec["members"] and r >= (self._joins_round or 0):
            self._announce_after(r)
            self.log(f"islands: island {self.id} missed round {r} (members {rec['members']}); "
                     f"it applies the round and announces itself for round {self._joins_round}")
        last_of_h = (r + 1) % self.sd.num_fragments == 0  # every fragment merged once more
        closer = rec.get("closer") == self.id and rec.get("closer_session") == self.session
        if last_of_h and closer and self._lead:
            self._publish(r)
        self.rounds.append({"step": self.step, "round": r, "fragment": p,
                            "members": rec["members"], "wait_s": round(waited, 4),
                            "bytes": nbytes + len(box["blob"])})
        return state

    def _announce_after(self, r: int) -> None:
        """Announce this island (in its heartbeat) for a round no island can have started to
        close: two past the newest closed one. One past could race a closer that read the
        heartbeats just before the announcement; and a late island that announced only r+1
        would stay late for ever, as the others would have closed r+1 before it got there."""
        newest = max(self.store.rounds_with_record(), default=r)
        self._joins_round = max(r, newest) + 2
        self._write_heartbeat()

    def _expected(self, r: int, beats: dict) -> set[int]:
        announced = {k for k, b in beats.items() if b.get("joins_round") == r}
        return set(self._alive) | announced | {self.id}

    def _beats(self) -> dict:
        out = {}
        for k in range(self.count):
            try:
                b, _ = self.store.get_json(st.heartbeat_key(k))
            except CorruptBlob:
                b = None
            if b is not None:
                out[k] = b
        return out

    def _agree(self, r: int, t0: float) -> tuple[dict, dict]:
        """The record of round r: the one in the store, or the one this island creates."""
        while True:
            rec = self._record(r)
            if rec is not None:
                return rec, {}
            beats = self._beats()
            present = self.store.deltas(r)
            if self._expected(r, beats) <= set(present) or time.monotonic() - t0 >= self.wait_s:
                if any(x > r for x in self.store.rounds_with_record()):
                    # a later round closed, so round r's record existed and was deleted: this
                    # island fell more than keep_rounds behind and must not re-close round r
                    raise IslandError(f"island {self.id} fell behind: round {r} was closed and "
                                      f"deleted (keep_rounds={self.keep_rounds}); restart it "
                                      f"to rejoin")
                rec, cached = self._propose(r, present, beats)
                if self.store.create(st.record_key(r), json.dumps(rec).encode()):
                    return rec, cached
                continue  # another island's record won: use it
            time.sleep(self.poll_s)

    def _await_record(self, r: int, t0: float) -> dict:
        """Processes other than 0 of an island: the record process 0 (or another island)
        creates; process 0 gives up after wait_s plus the reads, so this is bounded."""
        while (rec := self._record(r)) is None:
            if time.monotonic() - t0 > self.wait_s + 300:
                raise IslandError(f"island {self.id} process {jax.process_index()}: no record of "
                                  f"round {r} after {self.wait_s + 300:.0f} s (process 0 gone?)")
            time.sleep(self.poll_s)
        return rec

    def _propose(self, r, present, beats):
        members, corrupt, keys, digests, replicas, cached = [], [], {}, {}, {}, {}
        for k in sorted(present):
            cands = present[k]
            live = beats.get(k, {}).get("session")
            key = next((c for c in cands if self.store.session_of(c) == live), cands[-1])
            try:
                blob, _ = self.store.get(key)
                if blob is None:
                    raise CorruptBlob(f"{key} vanished")
                header, _ = st.unpack(blob, f"{self.store.url}/{key}")
                if header["round"] != r or header["island"] != k:
                    raise CorruptBlob(f"{key} holds round {header['round']} of island "
                                      f"{header['island']}")
            except CorruptBlob as e:
                self.log(f"islands: round {r}: {e}; excluded from the round")
                corrupt.append(k)  # alive (it wrote): still expected in the next round
                continue
            members.append(k)
            keys[str(k)] = key
            digests[str(k)] = header["sha256"]
            replicas[str(k)] = header["replicas"]
            cached[key] = blob
        rec = {"round": r, "fragment": r % self.sd.num_fragments, "step": self.merge_step(r),
               "members": members, "corrupt": corrupt, "keys": keys, "digests": digests,
               "replicas": replicas,
               "closer": self.id, "closer_session": self.session, "time": time.time()}
        return rec, cached

    def _record(self, r: int):
        rec, _ = self.store.get_json(st.record_key(r))
        return rec

    def _apply_round(self, r: int, rec: dict, cached: dict) -> int:
        """Apply round r's agreed mean to the host θ_global and outer state; returns the bytes
        of the other members' deltas (what this island reads for the round)."""
        p = r % self.sd.num_fragments
        idx = self._frags.leaves(p)
        before = self._fragment_digest(p)
        payloads, scales, nbytes = [], [], 0
        for k in rec["members"]:
            key = rec["keys"][str(k)]
            blob = cached.get(key)
            if blob is None:
                blob, _ = self.store.get(key)
                if blob is None:
                    raise IslandError(f"sync store {self.store.url}: {key}, a member of round {r}, "
                                      f"is missing (deleted before island {self.id} read it)")
            header, arrays = st.unpack(blob, f"{self.store.url}/{key}")
            if header["sha256"] != rec["digests"][str(k)]:
                raise IslandError(f"sync store {self.store.url}: {key} changed after round {r} "
                                  f"was agreed (sha256 differs from its record)")
            if header["global_sha"] != before:
                raise IslandError(f"islands diverged: island {k}'s θ_global/outer state of "
                                  f"fragment {p} before round {r} differs from island "
                                  f"{self.id}'s (same init, jax version and store on every "
                                  f"island?)")
            if k != self.id:
                nbytes += len(blob)
            payloads.append(arrays["payload"])
            if "scale" in arrays:
                scales.append(arrays["scale"])
        if not rec["members"]:  # nobody's delta arrived: the round changes nothing
            return nbytes
        wire = qz.Wire(np.concatenate(payloads), np.concatenate(scales) if scales else None)
        mean_KB = self._on_cpu(self._mean_cpu, wire)
        n = self._frags.size(p)
        mean = split_flat(mean_KB.reshape(-1)[:n], [self._glob[i].shape for i in idx])
        glob, outer_p = self._on_cpu(self._outer_cpu, [m.astype(np.float32) for m in mean],
                                     self._outer_tree(p), [self._glob[i] for i in idx])
        for j, i in enumerate(idx):
            self._glob[i] = np.asarray(glob[j], self._glob[i].dtype)
        self._outer[p] = [np.asarray(x) for x in jax.tree.leaves(outer_p)]
        return nbytes

    # ------------------------------------------------------------------ global state
    def _tree(self, leaves):
        return jax.tree.unflatten(self._treedef, leaves)

    def _outer_tree(self, p):
        return jax.tree.unflatten(self._outer_defs[p], self._outer[p])

    def _outer_trees(self):
        return tuple(self._outer_tree(p) for p in range(self.sd.num_fragments))

    def _global_blob(self, n: int, step: int) -> bytes:
        arrays = {f"g{i}": x for i, x in enumerate(self._glob)}
        arrays |= {f"o{p}_{j}": x for p, o in enumerate(self._outer) for j, x in enumerate(o)}
        sha = st.digest(self._glob + [x for o in self._outer for x in o])
        return st.pack({"kind": "global", "rounds": n, "step": step, "state_sha": sha}, arrays)

    def _read_global(self, n: int):
        key = st.global_key(n)
        blob, _ = self.store.get(key)
        if blob is None:
            raise IslandError(f"sync store {self.store.url}: {key} is missing (deleted?)")
        try:
            return st.unpack(blob, f"{self.store.url}/{key}")
        except CorruptBlob as e:
            raise CorruptBlob(f"island {self.id} cannot rejoin: {e}") from None

    def _load_global(self, header, arrays):
        glob = [arrays.get(f"g{i}") for i in range(len(self._glob))]
        outer = [[arrays.get(f"o{p}_{j}") for j in range(len(o))]
                 for p, o in enumerate(self._outer)]
        flat = lambda g, o: g + [y for leaves in o for y in leaves]
        want = [(x.shape, x.dtype) for x in flat(self._glob, self._outer)]
        got = [None if x is None else (x.shape, x.dtype) for x in flat(glob, outer)]
        if want != got or len(arrays) != len(want):
            raise IslandError(f"sync store {self.store.url}: {st.global_key(header['rounds'])} "
                              f"does not hold this model's θ_global and outer state")
        self._glob = [np.array(x) for x in glob]
        self._outer = [[np.array(x) for x in o] for o in outer]

    def _publish(self, r: int) -> None:
        """Closer of round r: publish the state after it, then apply the retention."""
        blob = self._global_blob(r + 1, self.merge_step(r))
        prev = self._publisher

        def work():
            try:
                if prev is not None:
                    prev.join()
                self.store.put(st.global_key(r + 1), blob)
                for n in self.store.global_indices()[:-2]:  # keep the newest two
                    self.store.delete_prefix(st.global_key(n))
                for old in self.store.all_rounds():
                    if old <= r - self.keep_rounds:
                        self.store.delete_prefix(st.round_prefix(old))
            except IslandError as e:  # a later rejoin reads an older state; say so, go on
                self.log(f"islands: publishing the state after round {r} failed: {e}")

        self._publisher = threading.Thread(target=work, name=f"island-{self.id}-publish-{r}",
                                           daemon=True)
        self._publisher.start()

    # ------------------------------------------------------------------ heartbeat
    def _write_heartbeat(self, closed: bool = False) -> None:
        with self._beat_lock:  # the heartbeat thread and the main thread both write
            self._beat += 1
            n = self._beat
        beat = {"session": self.session, "beat": n, "time": time.time(), "step": self.step,
                "joins_round": self._joins_round, "every": self.heartbeat_s, "closed": closed}
        self.store.put(st.heartbeat_key(self.id), json.dumps(beat).encode())

    def _start_heartbeat(self) -> None:
        self._write_heartbeat()

        def run():
            while not self._stop.wait(self.heartbeat_s):
                try:
                    self._write_heartbeat()
                    reg, _ = self.store.get_json(st.registry_key(self.id))
                    if reg is not None and reg.get("session") != self.session:
                        self._stolen = reg
                except IslandError as e:
                    self.log(f"islands: heartbeat of island {self.id} failed: {e}")

        self._beat_thread = threading.Thread(target=run, name=f"island-{self.id}-heartbeat",
                                             daemon=True)
        self._beat_thread.start()
