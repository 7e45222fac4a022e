"""Streaming DiLoCo as an outer loop around any optax inner optimizer.

    sd = streaming_diloco(optax.adamw(1e-3), num_replicas=4, sync_every=100, num_fragments=4,
                          overlap_steps=1, alpha=0.5, quantize="fp4_e3m0", mesh=mesh)
    state = sd.init(params)
    for t, batch_M in enumerate(batches):          # batch_M: one batch per replica
        loss_M, grads_M = replica_grads(loss_fn)(state.params, batch_M)
        state = jax.jit(sd.update)(grads_M, state)

One `update` = one inner step on every replica (vmapped, no cross-replica traffic), then the
outer events that fall on this step t (counted from 1):
  * sync of fragment p when t mod H == (p+1)·H/P mod H: each replica sends its outer gradient
    Δ_m = θ_global[p] − θ_m[p] in the wire format; the mean over replicas is accumulated in
    fp32 and kept as the *pending* delta. This is the only cross-replica collective.
  * merge of the pending fragment τ steps after its sync: the outer optimizer updates fragment
    p's global params and momentum with the mean Δ, and every replica mixes back
    θ_m[p] ← α·θ_m[p] + (1−α)·θ_global[p].
Delaying the merge by τ steps is what lets a real system run the transfer beside τ inner
steps: nothing between the sync and the merge reads its result. Inside one XLA program the
collective itself still finishes in the step that issues it; the numerics are the paper's.
τ < H/P keeps at most one fragment in flight, so one pending slot suffices.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxpar.diloco import quantize as qz
from jaxpar._spmd import divisors
from jaxpar.mesh import REPLICA
from jaxpar.diloco.fragments import Fragments, split_fragments, sync_phase

# how a low-bit mean crosses the replicas (see `replica_mean`)
LOW_BIT_COLLECTIVES = ("auto", "all_gather", "reduce_scatter")


class DiLoCoState(NamedTuple):
    step: jax.Array              # int32 scalar: inner steps done so far
    params: Any                  # replica params, leading axis M (sharded on `replica`)
    inner_state: Any             # inner optimizer state, leading axis M
    global_params: Any           # θ_global, identical on every replica
    outer_state: tuple           # one outer optimizer state per fragment (its leaves only)
    pending_delta: tuple         # per fragment: list of fp32 mean outer-gradient leaves
    pending_fragment: jax.Array  # int32: fragment whose merge is still due, −1 if none


def default_outer_optimizer() -> optax.GradientTransformation:
    return optax.sgd(0.7, momentum=0.9, nesterov=True)


@dataclasses.dataclass(frozen=True)
class StreamingDiLoCo:
    inner: optax.GradientTransformation
    num_replicas: int
    sync_every: int
    num_fragments: int = 1
    overlap_steps: int = 0
    alpha: float = 0.0
    outer_optimizer: optax.GradientTransformation = dataclasses.field(default_factory=default_outer_optimizer)
    quantize: str = "none"
    mesh: Mesh | None = None
    low_bit_collective: str = "auto"
    # PartitionSpecs of one replica's params (e.g. tensor-parallel dims); replica copies are
    # P(replica, *spec). None = replicated inside a replica.
    param_specs: Any = None

    def __post_init__(self):
        self._check_types()
        qz.check_format(self.quantize)
        if self.low_bit_collective not in LOW_BIT_COLLECTIVES:
            raise ValueError(f"low_bit_collective={self.low_bit_collective!r}; use one of {LOW_BIT_COLLECTIVES}")
        M, H, Pf, tau = self.num_replicas, self.sync_every, self.num_fragments, self.overlap_steps
        if M < 1 or H < 1 or Pf < 1:
            raise ValueError(f"num_replicas={M}, sync_every={H}, num_fragments={Pf} must all be ≥ 1")
        if H % Pf:
            divs = divisors(H)
            raise ValueError(f"sync_every={H} must be divisible by num_fragments={Pf}; valid num_fragments: {divs}")
        if not 0 <= tau < H // Pf:
            raise ValueError(
                f"overlap_steps={tau} must be in [0, sync_every/num_fragments={H // Pf}) so that one "
                f"fragment's merge lands before the next fragment syncs")
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"alpha={self.alpha} must be in [0, 1]")
        if self.mesh is not None:
            r = self.mesh.shape.get(REPLICA, 1)
            if M != r:
                raise ValueError(f"num_replicas={M} must equal the mesh's replica axis size {r}")

    def _check_types(self):
        for name in ("num_replicas", "sync_every", "num_fragments", "overlap_steps"):
            v = getattr(self, name)
            if not isinstance(v, (int, np.integer)) or isinstance(v, bool):
                raise TypeError(f"{name}={v!r} must be an int, got {type(v).__name__}")
        if not isinstance(self.alpha, (int, float, np.floating)) or isinstance(self.alpha, bool):
            raise TypeError(f"alpha={self.alpha!r} must be a float, got "
                            f"{type(self.alpha).__name__}")
        for name in ("inner", "outer_optimizer"):
            v = getattr(self, name)
            if not (callable(getattr(v, "init", None)) and callable(getattr(v, "update", None))):
                raise TypeError(f"{name} must be an optax.GradientTransformation (e.g. "
                                f"optax.adamw(1e-3)), got {type(v).__name__}")
        if self.mesh is not None and not isinstance(self.mesh, (Mesh, jax.sharding.AbstractMesh)):
            raise TypeError(f"mesh must be a jax.sharding.Mesh or None, got "
                            f"{type(self.mesh).__name__}")

    # ------------------------------------------------------------------ layout helpers
    def fragments(self, params) -> Fragments:
        """Fragments of a per-replica (or global) param tree; raises ValueError if impossible."""
        return split_fragments(params, self.num_fragments, self.sync_every)

    def _inner_axes(self) -> tuple[str, ...]:
        if self.mesh is None:
            return ()
        return tuple(a for a in self.mesh.axis_names if a != REPLICA and self.mesh.shape[a] > 1)

    def _inner_devices(self) -> int:
        return math.prod(self.mesh.shape[a] for a in self._inner_axes()) if self.mesh else 1

    def _constrain(self, x, *spec):
        if self.mesh is None:
            return x
        return lax.with_sharding_constraint(x, NamedSharding(self.mesh, P(*spec)))

    def _leaf_specs(self, tree) -> list[tuple]:
        """Per-leaf spec entries of one replica's params (empty tuples when unknown)."""
        if self.param_specs is None:
            return [()] * len(jax.tree.leaves(tree))
        return [tuple(s) for s in jax.tree.leaves(self.param_specs, is_leaf=lambda x: isinstance(x, P))]

    def _constrain_replicas(self, tree_M):
        leaves, treedef = jax.tree.flatten(tree_M)
        specs = self._leaf_specs(tree_M)
        return jax.tree.unflatten(treedef, [self._constrain(x, REPLICA, *s) for x, s in zip(leaves, specs)])

    def collective(self) -> str:
        """The cross-replica collective of one sync: 'all_reduce' (fp32), or for a low-bit
        format 'reduce_scatter' (all_to_all of codes + all-gather of re-quantized codes,
        2(M−1)/M payloads) or 'all_gather' (of every replica's codes, (M−1) payloads).
        'auto' picks the all-gather for M ≤ 2, where both send one payload and the all-gather
        is one phase and rounds once (no re-quantization); the reduce-scatter for M > 2."""
        if self.quantize == "none":
            return "all_reduce"
        if self.low_bit_collective == "auto":
            return "all_gather" if self.num_replicas <= 2 else "reduce_scatter"
        return self.low_bit_collective

    def _padded(self, n: int) -> int:
        # whole quantization blocks, an equal share of blocks for each device of a replica,
        # and (reduce-scatter) an equal number of blocks in each of the M chunks of a device
        unit = qz.BLOCK * self._inner_devices()
        if self.collective() == "reduce_scatter":
            unit *= self.num_replicas
        return -(-n // unit) * unit

    # ------------------------------------------------------------------ init
    def init(self, params) -> DiLoCoState:
        frags = self.fragments(params)  # validate before tracing
        fn = lambda x: self._init(x, frags)
        return jax.jit(fn)(params) if self.mesh is not None else fn(params)

    def _init(self, params, frags: Fragments) -> DiLoCoState:
        M = self.num_replicas
        params_M = jax.tree.map(lambda x: jnp.broadcast_to(x, (M,) + x.shape), params)
        params_M = self._constrain_replicas(params_M)
        inner_M = jax.vmap(self.inner.init)(params_M)
        if self.param_specs is not None:  # moments mirror their params' layout
            specs = optax.tree_map_params(self.inner, lambda _, s: P(REPLICA, *s), inner_M,
                                          self.param_specs, transform_non_params=lambda _: P(REPLICA),
                                          is_leaf=lambda x: isinstance(x, P))
            inner_M = jax.tree.map(lambda x, s: self._constrain(x, *s), inner_M, specs,
                                   is_leaf=lambda x: isinstance(x, P))
        else:
            inner_M = jax.tree.map(lambda x: self._constrain(x, REPLICA), inner_M)
        leaves = jax.tree.leaves(params)
        outer, pending = [], []
        for p in range(self.num_fragments):
            frag_leaves = [leaves[i] for i in frags.leaves(p)]
            outer.append(self.outer_optimizer.init(frag_leaves))
            pending.append([jnp.zeros(x.shape, jnp.float32) for x in frag_leaves])
        return DiLoCoState(jnp.zeros((), jnp.int32), params_M, inner_M, params, tuple(outer),
                           tuple(pending), jnp.full((), -1, jnp.int32))

    # ------------------------------------------------------------------ steps
    def inner_update(self, grads_M, state: DiLoCoState) -> DiLoCoState:
        """One inner step on every replica; no communication across replicas."""
        def one(g, s, p):
            u, s = self.inner.update(g, s, p)
            return optax.apply_updates(p, u), s

        spmd = REPLICA if self.mesh is not None else None
        params_M, inner_M = jax.vmap(one, spmd_axis_name=spmd)(grads_M, state.inner_state, state.params)
        return state._replace(step=state.step + 1, params=params_M, inner_state=inner_M)

    def outer_update(self, state: DiLoCoState) -> DiLoCoState:
        """The sync and/or merge that fall on step `state.step` (see module doc)."""
        frags = self.fragments(state.global_params)
        H, Pf, tau = self.sync_every, self.num_fragments, self.overlap_steps
        sync_table, merge_table = np.full(H, Pf, np.int32), np.full(H, Pf, np.int32)
        for p in range(Pf):
            sync_table[sync_phase(p, Pf, H)] = p
            merge_table[(sync_phase(p, Pf, H) + tau) % H] = p
        phase = state.step % H

        sync_p = jnp.asarray(sync_table)[phase]
        state = lax.switch(sync_p, [lambda s, p=p: self._sync(s, frags, p) for p in range(Pf)] + [lambda s: s],
                           state)
        merge_p = jnp.asarray(merge_table)[phase]
        merge_p = jnp.where(state.pending_fragment == merge_p, merge_p, Pf)
        return lax.switch(merge_p, [lambda s, p=p: self._merge(s, frags, p) for p in range(Pf)] + [lambda s: s],
                          state)

    def update(self, grads_M, state: DiLoCoState) -> DiLoCoState:
        return self.outer_update(self.inner_update(grads_M, state))

    def finalize(self, state: DiLoCoState) -> DiLoCoState:
        """Apply a merge still pending (its transfer already happened) without another inner
        step: what to evaluate or export at the end of training when τ > 0."""
        frags = self.fragments(state.global_params)
        Pf = self.num_fragments
        idx = jnp.where(state.pending_fragment >= 0, state.pending_fragment, Pf)
        return lax.switch(idx, [lambda s, p=p: self._merge(s, frags, p) for p in range(Pf)] + [lambda s: s], state)

    def _sync(self, state: DiLoCoState, frags: Fragments, p: int) -> DiLoCoState:
        glob = jax.tree.leaves(state.global_params)
        mean_N = self.replica_mean(fragment_delta_MN(state, frags, p))
        out = split_flat(mean_N, [glob[i].shape for i in frags.leaves(p)])
        pending = state.pending_delta[:p] + (out,) + state.pending_delta[p + 1:]
        return state._replace(pending_delta=pending, pending_fragment=jnp.asarray(p, jnp.int32))

    def replica_mean(self, x_MN: jax.Array) -> jax.Array:
        """fp32 mean over replicas of [M, N] values sent in the wire format: the one collective."""
        M, n = x_MN.shape
        npad = self._padded(n)
        inner = self._inner_axes() or None
        x_MKB = jnp.pad(x_MN, ((0, 0), (0, npad - n))).reshape(M, npad // qz.BLOCK, qz.BLOCK)
        # each device of a replica owns an equal share of the blocks, so the cross-replica
        # transfer is spread over all of them instead of repeated on each
        x_MKB = self._constrain(x_MKB, REPLICA, inner)
        fmt, how = self.quantize, self.collective()
        if how == "all_reduce":
            mean_KB = jnp.mean(x_MKB, axis=0)  # an fp32 all-reduce over `replica`
        elif how == "all_gather":
            wire = jax.vmap(lambda b: qz.quantize(b, fmt))(x_MKB)
            wire = jax.tree.map(lambda w: self._constrain(w, REPLICA, inner), wire)
            # the all-gather of the low-bit payload: every replica receives every replica's codes
            wire = jax.tree.map(lambda w: self._constrain(w, None, inner), wire)
            # and accumulates their dequantized values in fp32 locally
            mean_KB = qz.dequantized_mean(wire, fmt)
        elif self.mesh is None:
            mean_KB = qz.reduce_scatter_all_gather_mean_dense(x_MKB, fmt)
        else:  # reduce-scatter of codes (all_to_all), fp32 accumulation, all-gather of new codes
            body = lambda x_1KB: qz.reduce_scatter_all_gather_mean(x_1KB[0], fmt, REPLICA, M)
            # the result is the same on every replica (all dequantize the same all-gathered
            # codes), which vma typing cannot see through lax.all_gather: hence check_vma=False
            mean_KB = jax.shard_map(body, mesh=self.mesh, in_specs=P(REPLICA, inner), out_specs=P(inner),
                                    check_vma=False)(x_MKB)
        mean_KB = self._constrain(mean_KB, inner)
        return mean_KB.reshape(-1)[:n]

    def _merge(self, state: DiLoCoState, frags: Fragments, p: int) -> DiLoCoState:
        glob_leaves = jax.tree.leaves(state.global_params)
        glob, outer_p = outer_apply(self.outer_optimizer, state.pending_delta[p],
                                    state.outer_state[p], [glob_leaves[i] for i in frags.leaves(p)])
        return self.install_fragment(state, frags, p, glob, outer_p)

    def install_fragment(self, state: DiLoCoState, frags: Fragments, p: int, glob: list,
                         outer_p) -> DiLoCoState:
        """Set fragment p's global params and outer state to the result of `outer_apply`, and
        mix every replica back: θ_m[p] ← α·θ_m[p] + (1−α)·θ_global[p]."""
        idx = frags.leaves(p)
        glob_leaves, treedef = jax.tree.flatten(state.global_params)
        rep_leaves, rep_def = jax.tree.flatten(state.params)
        a = self.alpha
        specs = self._leaf_specs(state.global_params)
        for j, i in enumerate(idx):
            glob_leaves[i] = glob[j]
            mixed = a * rep_leaves[i].astype(jnp.float32) + (1.0 - a) * glob[j].astype(jnp.float32)[None]
            rep_leaves[i] = self._constrain(mixed.astype(rep_leaves[i].dtype), REPLICA, *specs[i])
        outer = state.outer_state[:p] + (outer_p,) + state.outer_state[p + 1:]
        return state._replace(
            params=jax.tree.unflatten(rep_def, rep_leaves),
            global_params=jax.tree.unflatten(treedef, glob_leaves),
            outer_state=outer,
            pending_fragment=jnp.asarray(-1, jnp.int32),
        )

    # ------------------------------------------------------------------ bytes on the wire
    def sync_bytes(self, params) -> list[int]:
        """Bytes one replica sends to the others when fragment p syncs, for each p.

        fp32 ('none') goes through a ring all-reduce: 2(M−1)/M · 4 bytes per value. A
        low-bit payload (codes + scales) goes through a reduce-scatter of codes and an
        all-gather of the re-quantized reduced chunk, 2(M−1)/M · payload bytes, or (M ≤ 2 by
        default, see `collective`) an all-gather of every replica's codes, (M−1) · payload.
        """
        frags = self.fragments(params)
        M = self.num_replicas
        out = []
        for p in range(self.num_fragments):
            npad = self._padded(frags.size(p))
            how = self.collective()
            if how == "all_reduce":
                out.append(int(round(2 * (M - 1) / M * 4 * npad)))
            elif how == "all_gather":
                out.append((M - 1) * qz.wire_bytes(npad, self.quantize))
            else:  # npad/BLOCK is a multiple of M, so this is exact
                out.append(2 * (M - 1) * qz.wire_bytes(npad, self.quantize) // M)
        return out

    def bytes_report(self, params, num_steps: int) -> dict:
        """Per-sync, peak-per-sync and total bytes one replica sends over `num_steps` steps."""
        per = self.sync_bytes(params)
        H, Pf = self.sync_every, self.num_fragments
        counts = [sum(1 for t in range(1, num_steps + 1) if t % H == sync_phase(p, Pf, H)) for p in range(Pf)]
        return {"per_sync": per, "peak_per_sync": max(per), "syncs": counts,
                "total": sum(c * b for c, b in zip(counts, per))}


def streaming_diloco(inner: optax.GradientTransformation, *, num_replicas: int, sync_every: int,
                     num_fragments: int = 1, overlap_steps: int = 0, alpha: float = 0.0,
                     outer_optimizer: optax.GradientTransformation | None = None,
                     quantize: str = "none", mesh: Mesh | None = None,
                     low_bit_collective: str = "auto", param_specs=None) -> StreamingDiLoCo:
    """Streaming DiLoCo around `inner` (see module doc). Defaults give plain DiLoCo."""
    return StreamingDiLoCo(inner, num_replicas, sync_every, num_fragments, overlap_steps, alpha,
                           outer_optimizer or default_outer_optimizer(), quantize, mesh, low_bit_collective,
                           param_specs)


def replica_grads(loss_fn: Callable, *, mesh: Mesh | None = None, has_aux: bool = False):
    """vmap of `jax.value_and_grad(loss_fn)` over the leading replica axis of params and batch."""
    spmd = REPLICA if mesh is not None else None
    return jax.vmap(jax.value_and_grad(loss_fn, has_aux=has_aux), spmd_axis_name=spmd)


def data_parallel_bytes(num_params: int, num_replicas: int, bytes_per_value: int = 4) -> int:
    """Bytes one replica sends per data-parallel step: a ring all-reduce of the gradients."""
    M = num_replicas
    return int(round(2 * (M - 1) / M * bytes_per_value * num_params))


# ---------------------------------------------------------------------------------------
# The outer math, one copy: the single-program path above and the islands path
# (`jaxpar.diloco.islands`) both call these.

def fragment_delta_MN(state: DiLoCoState, frags: Fragments, p: int) -> jax.Array:
    """fp32 [M, N] outer gradients of fragment p, Δ_m = θ_global[p] − θ_m[p], its leaves
    flattened and concatenated in tree order (the outer gradient points from the replica
    back to the global params, like a gradient)."""
    rep = jax.tree.leaves(state.params)
    glob = jax.tree.leaves(state.global_params)
    M = rep[0].shape[0]
    return jnp.concatenate(
        [(glob[i].astype(jnp.float32)[None] - rep[i].astype(jnp.float32)).reshape(M, -1)
         for i in frags.leaves(p)], axis=1)


def split_flat(x_N: jax.Array, shapes) -> list:
    """The inverse of the concatenation in `fragment_delta_MN`: one array per leaf shape."""
    out, off = [], 0
    for shape in shapes:
        n = math.prod(shape)
        out.append(x_N[off:off + n].reshape(shape))
        off += n
    return out


def outer_apply(outer_optimizer: optax.GradientTransformation, mean_delta: list, outer_state_p,
                glob: list) -> tuple[list, Any]:
    """One outer optimizer step on fragment p: (new θ_global[p] leaves, new outer state)."""
    upd, outer_p = outer_optimizer.update(mean_delta, outer_state_p, glob)
    return optax.apply_updates(glob, upd), outer_p
