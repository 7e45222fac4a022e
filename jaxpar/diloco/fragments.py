"""Split a parameter tree into P fragments strided over layers, and the sync schedule.

A "layer" is a numbered subtree that has numbered siblings: `layers_0, layers_1, ...` (Flax
Linen names), or integer keys / list indices (Flax NNX lists, plain Python lists). A single
`Dense_0` with no `Dense_1` beside it is not a stack of layers, so it is not one. Layers are
ordered by (first appearance of their stack, index) and fragment p holds layers p, p+P, ...
Leaves outside every layer (embeddings, final norm, head) go, in flatten order, to whichever
fragment is smallest so far, which keeps the fragments' byte sizes (and so the peak bytes
of one sync) close to 1/P of the whole.

Schedule: fragment p syncs at the inner steps t with t mod H == (p+1)·H/P mod H, so the
syncs of the P fragments are spread evenly over every H steps and the last fragment syncs
at t = H, 2H, ... like plain DiLoCo.
"""
from __future__ import annotations

import dataclasses
import re
from collections import defaultdict

import jax
import numpy as np

from jaxpar._spmd import divisors

_NUMBERED = re.compile(r"^(.*?)_?(\d+)$")


@dataclasses.dataclass(frozen=True)
class Fragments:
    num_fragments: int
    leaf_fragment: tuple[int, ...]      # fragment of each leaf, in tree_flatten order
    leaf_sizes: tuple[int, ...]         # number of values of each leaf
    layer_names: tuple[str, ...]        # the detected layers, in fragment-striding order

    def leaves(self, p: int) -> tuple[int, ...]:
        """Indices (into the flattened tree) of fragment p's leaves."""
        return tuple(i for i, f in enumerate(self.leaf_fragment) if f == p)

    def size(self, p: int) -> int:
        return sum(self.leaf_sizes[i] for i in self.leaves(p))

    def layers(self, p: int) -> tuple[str, ...]:
        return self.layer_names[p :: self.num_fragments]


def sync_phase(p: int, num_fragments: int, sync_every: int) -> int:
    """Fragment p syncs at the steps t with t % sync_every == sync_phase(p, ...)."""
    return ((p + 1) * sync_every // num_fragments) % sync_every


def _key_name(k):
    if isinstance(k, jax.tree_util.SequenceKey):
        return k.idx
    if isinstance(k, jax.tree_util.DictKey):
        return k.key
    if isinstance(k, jax.tree_util.GetAttrKey):
        return k.name
    if isinstance(k, jax.tree_util.FlattenedIndexKey):
        return k.key
    return str(k)


def _numbered(name):
    """(stem, index) if a path component is numbered, else None."""
    if isinstance(name, (int, np.integer)):
        return ("", int(name))
    m = _NUMBERED.match(str(name))
    return (m.group(1), int(m.group(2))) if m else None


def find_layers(tree) -> tuple[list[str], list[int | None]]:
    """(layer names in order, layer number of each leaf or None)."""
    paths = [tuple(_key_name(k) for k in path)
             for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]
    # a numbered component is a layer only if its stack (same prefix, same stem) has ≥ 2 members
    members = defaultdict(set)
    for path in paths:
        for d, name in enumerate(path):
            if (num := _numbered(name)) is not None:
                members[(path[:d], num[0])].add(num[1])
    stack_order: dict = {}
    leaf_layer_key = []
    for path in paths:
        key = None
        for d, name in enumerate(path):
            num = _numbered(name)
            if num is not None and len(members[(path[:d], num[0])]) >= 2:
                stack = (path[:d], num[0])
                stack_order.setdefault(stack, len(stack_order))
                key = (stack_order[stack], num[1], "/".join(map(str, path[: d + 1])))
                break
        leaf_layer_key.append(key)
    ordered = sorted({k for k in leaf_layer_key if k is not None})
    number = {k: i for i, k in enumerate(ordered)}
    return [k[2] for k in ordered], [None if k is None else number[k] for k in leaf_layer_key]


def valid_num_fragments(num_layers: int, sync_every: int | None) -> list[int]:
    """Fragment counts with at least one layer each that divide sync_every (if given)."""
    most = max(num_layers, 1)
    return list(range(1, most + 1)) if sync_every is None else divisors(sync_every, at_most=most)


def split_fragments(tree, num_fragments: int, sync_every: int | None = None) -> Fragments:
    """Assign every leaf of `tree` to one of `num_fragments` fragments (see module doc)."""
    layer_names, leaf_layer = find_layers(tree)
    leaves = jax.tree_util.tree_leaves(tree)
    sizes = tuple(int(np.prod(np.shape(x))) for x in leaves)
    valid = valid_num_fragments(len(layer_names), sync_every)
    if num_fragments not in valid:
        if not layer_names:
            found = ("found no layers (numbered subtrees such as layers_0, layers_1, ... or "
                     "list items)")
        else:
            found = f"found {len(layer_names)} layers ({layer_names[0]} ... {layer_names[-1]})"
        why = f" and sync_every={sync_every} must be divisible by it" if sync_every else ""
        raise ValueError(
            f"cannot split the parameter tree into num_fragments={num_fragments}: {found}; "
            f"each fragment needs at least one layer{why}. Valid num_fragments: {valid}"
        )
    frag = [None if l is None else l % num_fragments for l in leaf_layer]
    load = [0] * num_fragments
    for i, f in enumerate(frag):
        if f is not None:
            load[f] += sizes[i]
    for i, f in enumerate(frag):
        if f is None:  # a leaf outside every layer joins the currently smallest fragment
            f = int(np.argmin(load))
            frag[i] = f
            load[f] += sizes[i]
    return Fragments(num_fragments, tuple(frag), sizes, tuple(layer_names))
