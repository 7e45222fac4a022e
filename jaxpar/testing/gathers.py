"""Full gathers: all-gathers in a compiled program that rebuild a parameter whole along a mesh
axis that was meant to keep it split while it is used.

The criterion. ZeRO-3 (the `fsdp` axis, and any data-parallel axis: replica, data) keeps
params split only while they rest and all-gathers each one right before the layer that uses
it: those gathers are by design and are not reported. A model-parallel axis (tensor, seq,
seq_inner) is meant to keep a param split *while it is used*: a column- or row-parallel
layer computes on its own slice. So an all-gather is reported when

  1. its operand is one of the program's inputs, followed back through copies, bitcasts,
     transposes, reshapes, converts, single-operand fusions and other all-gathers
     (`jaxpar.comm.source_parameter`); and
  2. its device groups (`jaxpar.comm.replica_groups`, mapped to mesh coordinates) span a
     model-parallel mesh axis that the input's sharding splits it on: after it, every
     device holds that input whole along that axis.

What it cannot see: a gather of a value computed from a param and something else (e.g. a
weight gathered after a multiply inside one fusion), gathers inside a loop body (params of
`nn.scan`-ned layers arrive as loop state), and a ZeRO-3 gather hoisted far from its layer
(it is still one gather per step; only the peak memory shows it).
"""
from __future__ import annotations

import math

import jax
import numpy as np
from jax.sharding import NamedSharding

from jaxpar import comm
from jaxpar.mesh import DATA, FSDP, REPLICA
from jaxpar.sharding import _path

DATA_PARALLEL = (REPLICA, DATA, FSDP)


def _axes(entry) -> tuple[str, ...]:
    return (entry,) if isinstance(entry, str) else tuple(entry or ())


def _group_axes(line: str, mesh, num_partitions: int) -> set[str]:
    """Mesh axes along which the devices of one of the op's groups differ (partition k is
    the k-th device of `mesh.devices`, the order jit assigns them in)."""
    group = comm.replica_groups(line, num_partitions)[0]
    coords = np.array([np.unravel_index(k, mesh.devices.shape) for k in group])
    return {a for i, a in enumerate(mesh.axis_names) if len(set(coords[:, i])) > 1}


def find_full_gathers(hlo: str, args, *, data_parallel=DATA_PARALLEL) -> list[dict]:
    """The full gathers (criterion above) of a compiled program: `hlo` is its text
    (`compiled.as_text()`), `args` the pytree of arrays it was compiled for (their
    NamedShardings say how each input is split). One dict per gather: `param` (the input's
    tree path, '/'-joined), `shape` (the input's global shape), `axes` (the model-parallel
    mesh axes it is gathered whole along), `bytes` (the gather's result, per device), `op`
    (the HLO op's name)."""
    module = comm.parse_hlo(hlo)
    entry = module.computations.get(module.entry or "", {})
    params = {comm.parameter_number(ins): ins for ins in entry.values()
              if ins.opcode == "parameter"}
    leaves = jax.tree_util.tree_flatten_with_path(args)[0]
    out = []
    for ins in entry.values():
        if ins.collective_kind != "all-gather" or not ins.operands:
            continue
        k = comm.source_parameter(module, ins.operands[0])
        if k is None or k >= len(leaves):
            continue
        path, x = leaves[k]
        sh = getattr(x, "sharding", None)
        if not isinstance(sh, NamedSharding) or sh.mesh.size != module.num_partitions:
            continue
        if [d for _, d in comm.shape_dims(params[k].shape)] != [sh.shard_shape(x.shape)]:
            continue  # numbering differs from the args (an unused input was dropped)
        split = {a for e in sh.spec for a in _axes(e) if sh.mesh.shape[a] > 1}
        whole = sorted((split - set(data_parallel)) & _group_axes(ins.line, sh.mesh,
                                                                  module.num_partitions))
        if whole:
            elems = sum(math.prod(d) for _, d in comm.shape_dims(ins.shape))
            if ins.opcode.endswith("-start"):
                elems //= 2  # (operand, result) tuple
            out.append({"param": _path(path), "shape": tuple(x.shape), "axes": tuple(whole),
                        "bytes": elems * np.dtype(x.dtype).itemsize, "op": ins.name})
    return out
