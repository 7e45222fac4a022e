"""A small Llama-style decoder (Flax Linen): RMSNorm, RoPE, grouped-query attention, SwiGLU.

The attention itself is a plain function argument, `attention_fn(q_BNHD, k_BNKD, v_BNKD) ->
out_BNHD`, so a sequence-parallel implementation can be dropped in; the default is causal
softmax attention in fp32. Layers are named `layers_0 ... layers_{L-1}`, which is how
Streaming DiLoCo finds its fragments.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
    vocab: int = 256
    layers: int = 4
    embed: int = 128
    heads: int = 4
    kv_heads: int = 2
    head_dim: int = 32
    mlp: int = 384
    rope_base: float = 10_000.0
    norm_eps: float = 1e-6
    dtype: str = "float32"  # compute dtype; params stay fp32

    def __post_init__(self):
        if self.heads % self.kv_heads:
            raise ValueError(f"heads={self.heads} must be a multiple of kv_heads={self.kv_heads}")


def causal_attention(q_BNHD, k_BNKD, v_BNKD):
    """Reference causal softmax attention with GQA (each K/V head serves H/K query heads)."""
    B, N, H, D = q_BNHD.shape
    K = k_BNKD.shape[2]
    q_BNKGD = q_BNHD.reshape(B, N, K, H // K, D).astype(jnp.float32)
    s_BKGNM = jnp.einsum("bnkgd,bmkd->bkgnm", q_BNKGD, k_BNKD.astype(jnp.float32)) / jnp.sqrt(D)
    mask_NM = jnp.tril(jnp.ones((N, N), bool))
    s_BKGNM = jnp.where(mask_NM, s_BKGNM, -jnp.inf)
    p_BKGNM = jax.nn.softmax(s_BKGNM, axis=-1)
    out_BNKGD = jnp.einsum("bkgnm,bmkd->bnkgd", p_BKGNM, v_BNKD.astype(jnp.float32))
    return out_BNKGD.reshape(B, N, H, D).astype(q_BNHD.dtype)


def rope(x_BNHD, positions_BN, base):
    """Rotary position embedding on the last axis (pairs are the two halves)."""
    D = x_BNHD.shape[-1]
    freq_F = base ** (-jnp.arange(0, D, 2, dtype=jnp.float32) / D)
    angle_BNF = positions_BN[..., None].astype(jnp.float32) * freq_F
    cos, sin = jnp.cos(angle_BNF)[:, :, None, :], jnp.sin(angle_BNF)[:, :, None, :]
    x1, x2 = jnp.split(x_BNHD.astype(jnp.float32), 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x1 * sin + x2 * cos], axis=-1).astype(x_BNHD.dtype)


class RMSNorm(nn.Module):
    eps: float = 1e-6

    @nn.compact
    def __call__(self, x_BNE):
        scale_E = self.param("scale", nn.initializers.ones, (x_BNE.shape[-1],))
        x = x_BNE.astype(jnp.float32)
        x = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + self.eps)
        return (x * scale_E).astype(x_BNE.dtype)


class Block(nn.Module):
    cfg: TransformerConfig
    attention_fn: Callable

    @nn.compact
    def __call__(self, x_BNE, positions_BN):
        c = self.cfg
        dense = lambda f, name: nn.DenseGeneral(f, use_bias=False, dtype=c.dtype, name=name,
                                               kernel_init=nn.initializers.normal(c.embed ** -0.5))
        h = RMSNorm(c.norm_eps, name="attn_norm")(x_BNE)
        q_BNHD = dense((c.heads, c.head_dim), "q")(h)
        k_BNKD = dense((c.kv_heads, c.head_dim), "k")(h)
        v_BNKD = dense((c.kv_heads, c.head_dim), "v")(h)
        q_BNHD, k_BNKD = rope(q_BNHD, positions_BN, c.rope_base), rope(k_BNKD, positions_BN, c.rope_base)
        o_BNHD = self.attention_fn(q_BNHD, k_BNKD, v_BNKD)
        x_BNE = x_BNE + nn.DenseGeneral(c.embed, axis=(-2, -1), use_bias=False, dtype=c.dtype, name="o",
                                        kernel_init=nn.initializers.normal((c.heads * c.head_dim) ** -0.5))(o_BNHD)
        h = RMSNorm(c.norm_eps, name="mlp_norm")(x_BNE)
        gate_BNF, up_BNF = dense(c.mlp, "gate")(h), dense(c.mlp, "up")(h)
        down = nn.Dense(c.embed, use_bias=False, dtype=c.dtype, name="down",
                        kernel_init=nn.initializers.normal(c.mlp ** -0.5))
        return x_BNE + down(nn.silu(gate_BNF) * up_BNF)


class Transformer(nn.Module):
    cfg: TransformerConfig
    attention_fn: Callable = causal_attention

    @nn.compact
    def __call__(self, tokens_BN, positions_BN=None):
        c = self.cfg
        if positions_BN is None:
            positions_BN = jnp.broadcast_to(jnp.arange(tokens_BN.shape[1]), tokens_BN.shape)
        x_BNE = nn.Embed(c.vocab, c.embed, name="embed",
                         embedding_init=nn.initializers.normal(1.0))(tokens_BN).astype(c.dtype)
        for i in range(c.layers):
            x_BNE = Block(c, self.attention_fn, name=f"layers_{i}")(x_BNE, positions_BN)
        x_BNE = RMSNorm(c.norm_eps, name="final_norm")(x_BNE)
        logits_BNV = nn.Dense(c.vocab, use_bias=False, dtype=c.dtype, name="lm_head",
                              kernel_init=nn.initializers.normal(c.embed ** -0.5))(x_BNE)
        return logits_BNV.astype(jnp.float32)


def lm_loss(model: Transformer, params, tokens_BN1):
    """Mean next-byte cross-entropy (nats) of windows tokens[B, N+1]."""
    logits_BNV = model.apply({"params": params}, tokens_BN1[:, :-1])
    import optax  # local: the model itself does not need optax

    return optax.softmax_cross_entropy_with_integer_labels(logits_BNV, tokens_BN1[:, 1:]).mean()
