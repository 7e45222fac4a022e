"""Reference attention on global arrays in natural token order (tests compare against it).

Deliberately the textbook formula — softmax(q·kᵀ/√D + mask)·v in fp32 — sharing no code
with the blockwise kernels it checks.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def dense_attention(q_BNHD, k_BNKD, v_BNKD, *, causal: bool = False, segment_ids_BN=None):
    b, n, h, d = q_BNHD.shape
    g = h // k_BNKD.shape[2]
    k_BNHD = jnp.repeat(k_BNKD.astype(jnp.float32), g, axis=2)
    v_BNHD = jnp.repeat(v_BNKD.astype(jnp.float32), g, axis=2)
    s_BHNN = jnp.einsum("bqhd,bkhd->bhqk", q_BNHD.astype(jnp.float32), k_BNHD) / jnp.sqrt(d)
    allowed = jnp.ones((1, 1, n, n), bool)
    if causal:
        allowed = allowed & jnp.tril(jnp.ones((n, n), bool))[None, None]
    if segment_ids_BN is not None:
        allowed = allowed & (segment_ids_BN[:, None, :, None] == segment_ids_BN[:, None, None, :])
    s_BHNN = jnp.where(allowed, s_BHNN, -1e30)
    p_BHNN = jax.nn.softmax(s_BHNN, axis=-1)
    p_BHNN = jnp.where(allowed, p_BHNN, 0.0)  # rows with no allowed key give 0, like the kernels
    return jnp.einsum("bhqk,bkhd->bqhd", p_BHNN, v_BNHD)
