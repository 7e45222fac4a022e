"""How the decoder stacks its blocks: rematerialization, a Python loop or `nn.scan`, and
the param layouts of the two.

Rematerialization (`remat`) trades backward-pass compute for activation memory: the block
runs under `jax.checkpoint` (`nn.remat`) with one of these policies (what the backward may
keep from the forward; everything else is recomputed):

  none            no checkpointing: every intermediate the backward needs is kept.
  full            keep nothing but the block's input: the whole block runs twice. Least
                  memory (one [B, N, E] per layer), ~1/3 more compute.
  dots            keep every matmul output (`checkpoint_dots`), recompute the cheap
                  elementwise work (norms, RoPE, SiLU, softmax). Close to `none` in memory
                  when the matmuls dominate; listed as the upper bound of the named ones.
  dots_no_batch   keep the projections (dots without batch dimensions:
                  `dots_with_no_batch_dims_saveable`) but not attention's batched
                  score/value einsums, which are recomputed; the usual middle ground.
  attn_out        keep only the attention output (`checkpoint_name` 'attn_out'): the
                  backward re-runs the projections and the MLP but never the attention
                  itself, i.e. never the ring / Ulysses communication of a
                  sequence-parallel schedule. Memory near `full` + one [B, N, H·D] per layer.
  qkv_attn_out    keep q, k, v (after RoPE) and the attention output: recompute only the
                  MLP, the norms and the output projection.

(MaxText's `remat_policy` offers the same family under other names: `full`, `minimal`
~ dots_no_batch, `save_qkv_proj`, `save_out_proj`, ...)

`scan_layers=True` runs the blocks under `nn.scan`: the block is traced and compiled once,
whatever the depth, and its params are stacked under one `layers` subtree with a leading
axis of logical name `layers` (replicated by the rules). `stack_layers` / `unstack_layers`
convert a param tree (or any tree holding such subtrees: optimizer moments) between
`layers_0 ... layers_{L-1}` and the stacked layout. The trainer initializes a scanned
decoder by stacking the unscanned init, so both layouts start from the same values.
"""
from __future__ import annotations

import re
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

SCAN_NAME = "layers"  # the stacked subtree and the logical name of its leading axis

_SAVE_NAMED = {"attn_out": ("attn_out",), "qkv_attn_out": ("q", "k", "v", "attn_out")}
REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch", *_SAVE_NAMED)


def remat_policy(name: str) -> Callable | None:
    """The `jax.checkpoint` policy of a `remat` name (None for `full`: save nothing)."""
    if name not in REMAT_POLICIES or name == "none":
        raise ValueError(f"remat={name!r}; valid checkpoint policies are "
                         f"{list(REMAT_POLICIES[1:])} (or 'none' for no rematerialization)")
    cp = jax.checkpoint_policies
    if name in _SAVE_NAMED:
        return cp.save_only_these_names(*_SAVE_NAMED[name])
    return {"full": None, "dots": cp.checkpoint_dots,
            "dots_no_batch": cp.dots_with_no_batch_dims_saveable}[name]


def tag(x, name: str):
    """Name an intermediate for the `save_only_these_names` policies."""
    return checkpoint_name(x, name)


class _ScanBody(nn.Module):
    """Adapts a block `(x, *broadcast) -> x` to scan's `(carry, *broadcast) -> (carry, None)`."""
    block: Callable[[], nn.Module]

    @nn.compact
    def __call__(self, x, *args):
        return self.block()(x, *args), None


def apply_blocks(block_cls: type[nn.Module], layers: int, remat: str, scan: bool,
                 x, *args, **block_kw):
    """Run `layers` blocks `block_cls(**block_kw)(x, *args) -> x` in the calling module's
    scope: named layers_0 ... (loop) or one stacked `layers` (scan), under `remat`."""
    cls = block_cls
    if remat != "none":
        # prevent_cse=False under scan: the loop already keeps XLA from merging the recompute
        cls = nn.remat(block_cls, policy=remat_policy(remat), prevent_cse=not scan)
    if not scan:
        for i in range(layers):
            x = cls(**block_kw, name=f"layers_{i}")(x, *args)
        return x
    body = nn.scan(_ScanBody, variable_axes={"params": 0}, split_rngs={"params": True},
                   in_axes=(nn.broadcast,) * len(args), length=layers,
                   metadata_params={nn.PARTITION_NAME: SCAN_NAME})
    x, _ = body(lambda: cls(**block_kw, name="block"), name=SCAN_NAME)(x, *args)
    return x


_LAYER = re.compile(r"^layers_(\d+)$")


def stack_layers(tree):
    """Every dict holding `layers_0 ... layers_{L-1}` gets them as one `layers` subtree with
    the leaves stacked on a new axis 0 (the scan layout; the block is named `block`)."""
    if not isinstance(tree, dict):
        return _map_children(tree, stack_layers)
    idx = sorted(int(m.group(1)) for k in tree if (m := _LAYER.match(str(k))))
    out = {k: stack_layers(v) for k, v in tree.items() if not _LAYER.match(str(k))}
    if idx:
        if idx != list(range(len(idx))):
            raise ValueError(f"layers {idx} are not numbered 0..{len(idx) - 1}")
        parts = [tree[f"layers_{i}"] for i in idx]
        out[SCAN_NAME] = {"block": jax.tree.map(_stack, *parts, is_leaf=_boxed)}
    return out


def _boxed(x) -> bool:
    return isinstance(x, nn.Partitioned)


def _stack(*xs):
    """Stack leaves on a new axis 0; boxed (Partitioned) leaves get the `layers` name too."""
    if not _boxed(xs[0]):
        return jnp.stack(xs)
    return xs[0].replace(value=jnp.stack([x.value for x in xs]),
                         names=(SCAN_NAME, *xs[0].names))


def unstack_layers(tree):
    """Inverse of `stack_layers`: a `layers` subtree back to `layers_0 ... layers_{L-1}`."""
    if not isinstance(tree, dict):
        return _map_children(tree, unstack_layers)
    out = {k: unstack_layers(v) for k, v in tree.items() if k != SCAN_NAME}
    if SCAN_NAME in tree:
        stacked = tree[SCAN_NAME]["block"]
        n = jax.tree.leaves(stacked)[0].shape[0]
        for i in range(n):
            out[f"layers_{i}"] = jax.tree.map(lambda x, i=i: x[i], stacked)
    return out


def _map_children(node, fn):
    """Apply fn to the children of a tuple / namedtuple / list (optimizer states)."""
    if isinstance(node, tuple) and hasattr(node, "_fields"):
        return type(node)(*(fn(c) for c in node))
    if isinstance(node, (tuple, list)):
        return type(node)(fn(c) for c in node)
    return node
