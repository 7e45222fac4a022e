"""Gradient accumulation: one optimizer step's loss and gradients over k microbatches.

    loss, grads = microbatch.value_and_grad(loss_fn, k)(params, batch)

equals `jax.value_and_grad(loss_fn)(params, batch)` for a loss that is a mean over equal
rows (the trainer's cross-entropy): a `lax.scan` over the k slices sums fp32 losses and
gradients and divides by k, so only one microbatch's activations are alive at a time.
Microbatch j holds rows j, j+k, j+2k, ... of the batch: with the batch split over its mesh
axes in contiguous blocks (and B divisible by k·shards), every device keeps its own rows
and every microbatch is still split over all of them — slicing moves no data.
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax import lax


def split(batch, k: int):
    """[B, ...] leaves -> [k, B/k, ...]; microbatch j = rows j, j+k, ... (see module doc)."""
    def one(x):
        if x.shape[0] % k:
            raise ValueError(f"batch of {x.shape[0]} rows does not split into microbatches={k}")
        return jnp.swapaxes(x.reshape(x.shape[0] // k, k, *x.shape[1:]), 0, 1)
    return jax.tree.map(one, batch)


def value_and_grad(loss_fn: Callable, k: int, *, constrain_batch: Callable | None = None,
                   constrain_grads: Callable | None = None) -> Callable:
    """(params, batch) -> (mean loss, mean grads) over k microbatches (k=1: no scan).

    `constrain_batch` (a microbatch tree -> same, e.g. a with_sharding_constraint to the
    batch layout) and `constrain_grads` (the fp32 accumulator -> same, e.g. to the params'
    layout, so FSDP grads are accumulated sharded) keep XLA's layouts where they belong.
    """
    vg = jax.value_and_grad(loss_fn)
    if k == 1:
        return vg
    keep_b = constrain_batch or (lambda t: t)
    keep_g = constrain_grads or (lambda t: t)

    def fn(params, batch) -> tuple[jax.Array, Any]:
        def body(carry, mb):
            loss_sum, g_sum = carry
            loss, g = vg(params, keep_b(mb))
            g_sum = jax.tree.map(lambda a, x: a + x.astype(jnp.float32), g_sum, g)
            return (loss_sum + loss.astype(jnp.float32), keep_g(g_sum)), None

        zeros = keep_g(jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params))
        (loss, g), _ = lax.scan(body, (jnp.zeros((), jnp.float32), zeros), split(batch, k))
        return loss / k, jax.tree.map(lambda a, p: (a / k).astype(p.dtype), g, params)
    return fn
