"""XLA:CPU host meshes: one rendezvous key per collective-permute.

JAX lowers every `ppermute` inside `shard_map` with the same channel id (1), and XLA:CPU's
in-process collectives key each rendezvous by that id. XLA:CPU's runtime only orders a
device's collectives by when they *start*, so two independent permutes can be in flight on
one device at once; with one shared key their participants then join each other's
rendezvous: "Check failed: id < num_threads (8 vs. 8)", a termination timeout, a segfault
or, where sizes happen to match, wrong data. Causal TokenRing hit it in most fresh processes
at P=8, N=2048, H=16 (docs/architecture.md). Giving each permute its own channel id gives
each its own key. CPU only: GPU/TPU keep JAX's lowering.
"""
from __future__ import annotations

import warnings

def unique_permute_channels(enable: bool = True) -> bool:
    """Lower `ppermute` on CPU with a fresh channel id per op (enable=False: JAX's own
    lowering again). Returns whether jaxpar's lowering is now in place."""
    try:
        from jax._src.interpreters import mlir
        from jax._src.lax import parallel
        from jax._src.lib.mlir.dialects import hlo
        common = parallel._pcollectives_lowering_common
        default = parallel._ppermute_lowering
    except (ImportError, AttributeError) as e:  # a jax whose internals moved
        warnings.warn(f"jaxpar: cannot give XLA:CPU permutes their own channel ids ({e}); "
                      f"host-mesh ring schedules may abort", stacklevel=2)
        return False

    def lowering(ctx, x, *, axis_name, perm):
        try:
            full_perm, other = common(ctx, axis_name=axis_name, perm=perm, op_name="ppermute")
        except TypeError:  # the helper's signature changed: JAX's own lowering, unchanged
            return default(ctx, x, axis_name=axis_name, perm=perm)
        if "channel_handle" in other:
            other["channel_handle"] = hlo.ChannelHandle.get(ctx.module_context.new_channel(),
                                                            mlir.DEVICE_TO_DEVICE_TYPE)
        return hlo.CollectivePermuteOp(x, mlir.dense_int_elements(full_perm), **other).results

    mlir.register_lowering(parallel.ppermute_p, lowering if enable else default,
                           platform="cpu")
    return enable
