"""Logical axis rules: one table from a model's logical axis names to mesh axes.

Models name the axes of their params and activations (`batch`, `length`, `embed`, `heads`,
...) with Flax's own logical partitioning (Linen `nn.with_logical_partitioning` /
`nn.with_logical_constraint`, NNX `nnx.with_partitioning` / `out_sharding` metadata, which
`jaxpar.train.model` turns into the same boxed tree as Linen's); this table says where each
name lives on the mesh. Changing how a model is sharded is editing data, not code:

    rules = sharding.rules(diloco=False, overrides={"mlp": None})  # replicate the MLP

A rule maps to one mesh axis, a tuple of axes (sharded over their product), or None
(replicated). Flax applies rules in order and never uses one mesh axis twice in an array.

FSDP is one rule: `embed -> fsdp` shards every weight (and, through the optimizer's
shardings, its Adam moments) on its embed dimension. Activations name `embed` too, but
`batch` comes first and already holds `fsdp`, so activations stay unsharded on embed.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxpar.mesh import DATA, FSDP, REPLICA, SEQ, SEQ_INNER, TENSOR

Rules = tuple[tuple[str, Any], ...]

DEFAULT_RULES: Rules = (
    ("replica", REPLICA),                          # DiLoCo: the leading replica axis
    ("batch", (REPLICA, DATA, FSDP)),              # without DiLoCo replicas are more data
    ("length", (SEQ, SEQ_INNER)),                  # attention's token axis
    ("act_length", (SEQ, SEQ_INNER, TENSOR)),      # between blocks: Megatron sequence parallel
    ("heads", TENSOR),
    ("kv_heads", TENSOR),
    ("mlp", TENSOR),
    ("vocab", TENSOR),
    ("embed", FSDP),                               # ZeRO-3: params (not activations) on fsdp
    ("head_dim", None),
    ("layers", None),                              # nn.scan's stacked-layers axis
)


def rules(*, diloco: bool = False, overrides: dict | None = None,
          base: Rules = DEFAULT_RULES) -> Rules:
    """The rules table for a run. With DiLoCo the `replica` axis holds the replicas (a
    leading axis of params and batch, vmapped), so `batch` is sharded on `data`·`fsdp` only."""
    table = dict(base)
    if diloco:
        table["batch"] = (DATA, FSDP)
    for k, v in (overrides or {}).items():
        table[k] = tuple(v) if isinstance(v, list) else v
    return tuple(table.items())


def mesh_axes(logical: str, table: Rules) -> tuple[str, ...]:
    """Mesh axes a logical name is sharded on, e.g. mesh_axes('heads') == ('tensor',)."""
    v = dict(table).get(logical)
    if v is None:
        return ()
    return (v,) if isinstance(v, str) else tuple(v)


def spec(names: Sequence[str | None], table: Rules) -> P:
    """PartitionSpec of an array whose dims have these logical names."""
    return nn.logical_to_mesh_axes(tuple(names), table)


def shard_count(spec_: P, mesh: Mesh) -> int:
    """How many pieces an array with this spec is cut into (devices holding distinct data)."""
    n = 1
    for entry in spec_:
        for a in (entry,) if isinstance(entry, str) else (entry or ()):
            n *= mesh.shape[a]
    return n


# ---------------------------------------------------------------- params: specs and init


def logical_axes(boxed_tree) -> Any:
    """Tree of logical-name PartitionSpecs (P() where a param has no annotation) of boxed
    (`LogicallyPartitioned`) params."""
    return nn.get_partition_spec(boxed_tree)


def mesh_specs(logical_tree, table: Rules) -> Any:
    return nn.logical_to_mesh(logical_tree, table)


def named(specs_tree, mesh: Mesh) -> Any:
    return jax.tree.map(lambda s: NamedSharding(mesh, s), specs_tree,
                        is_leaf=lambda x: isinstance(x, P))


def init_sharded(init_fn, mesh: Mesh, table: Rules, *args):
    """(params, mesh specs, logical specs): `init_fn(*args)` (returning boxed Linen variables
    or an NNX state) run under jit with every param created in place on its devices — no
    full copy on one device first."""
    abstract = jax.eval_shape(init_fn, *args)
    logical = logical_axes(abstract)
    specs = mesh_specs(logical, table)
    out = jax.jit(lambda *a: nn.unbox(init_fn(*a)), out_shardings=named(specs, mesh))(*args)
    return out, specs, logical


# ---------------------------------------------------------------- the param table


def _path(path) -> str:
    parts = []
    for k in path:
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                parts.append(str(getattr(k, attr)))
                break
    return "/".join(parts)


def param_table(params, specs, logical, mesh: Mesh) -> list[dict]:
    """One row per param: path, shape, logical axes, PartitionSpec, bytes per device."""
    flat, _ = jax.tree_util.tree_flatten_with_path(params)
    spec_leaves = jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, P))
    logical_leaves = jax.tree.leaves(logical, is_leaf=lambda x: isinstance(x, P))
    rows = []
    for (path, x), s, lg in zip(flat, spec_leaves, logical_leaves):
        nbytes = math.prod(x.shape) * np.dtype(x.dtype).itemsize
        rows.append({
            "path": _path(path), "shape": list(x.shape),
            "logical": [n if isinstance(n, str) or n is None else list(n) for n in lg],
            "spec": str(s), "bytes_per_device": nbytes // shard_count(s, mesh)})
    return rows


def format_table(rows: list[dict]) -> str:
    head = ("param", "shape", "logical axes", "PartitionSpec", "bytes/device")
    body = [(r["path"], "×".join(map(str, r["shape"])),
             ", ".join(str(n) for n in r["logical"]) or "-", r["spec"],
             f"{r['bytes_per_device']:,}") for r in rows]
    total = sum(r["bytes_per_device"] for r in rows)
    body.append(("total", "", "", "", f"{total:,}"))
    widths = [max(len(str(c)) for c in col) for col in zip(head, *body)]
    line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip()
    return "\n".join([line(head), line(["-" * w for w in widths])] + [line(b) for b in body])
