"""Small users' decoders (not the built-in one) for `model.module=user_models:...`.

Both are pre-norm decoders: token embedding, `cfg.model.layers` blocks of causal multi-head
attention + GELU MLP, a final norm and an LM head. The attention mask comes from
`positions_BN` and `segment_ids_BN` (never from the token index: the sequence-parallel impls
hand tokens over in the zigzag order). Params carry the logical names 'vocab', 'embed',
'heads' and 'mlp'; the trainer's rules place them on the mesh.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx

from jaxpar.models.transformer import Parallel, parallel_attention
from jaxpar.train import model as train_model


def causal_mask(positions_BN, segment_ids_BN):
    """[B, 1, N, N]: query n sees key m iff m is not later and in the same document."""
    mask_BNM = positions_BN[:, None, :] <= positions_BN[:, :, None]
    return (mask_BNM & (segment_ids_BN[:, None, :] == segment_ids_BN[:, :, None]))[:, None]


def attend(q_BNHD, k_BNHD, v_BNHD, mask_B1NM):
    s_BHNM = jnp.einsum("bnhd,bmhd->bhnm", q_BNHD, k_BNHD) / jnp.sqrt(q_BNHD.shape[-1])
    p_BHNM = jax.nn.softmax(jnp.where(mask_B1NM, s_BHNM, -1e30), axis=-1)
    return jnp.einsum("bhnm,bmhd->bnhd", p_BHNM, v_BNHD)


# ------------------------------------------------------------------ Linen


def _init(fan_in, names):
    return nn.with_logical_partitioning(nn.initializers.normal(fan_in ** -0.5), names)


class LinenBlock(nn.Module):
    heads: int
    mlp: int
    parallel: Parallel | None = None  # set: attention is jaxpar's, sequence-parallel

    @nn.compact
    def __call__(self, x_BNE, mask_B1NM, segment_ids_BN):
        B, N, E = x_BNE.shape
        H, D = self.heads, E // self.heads
        scale = nn.with_logical_partitioning(nn.initializers.ones, ("embed",))
        h = nn.LayerNorm(use_bias=False, scale_init=scale, name="ln1")(x_BNE)
        w_E3HD = self.param("qkv", _init(E, ("embed", None, "heads", None)), (E, 3, H, D))
        q, k, v = jnp.unstack(jnp.einsum("bne,ethd->tbnhd", h, w_E3HD))
        w_HDE = self.param("out", _init(E, ("heads", None, "embed")), (H, D, E))
        o_BNHD = (attend(q, k, v, mask_B1NM) if self.parallel is None
                  else parallel_attention(self.parallel, q, k, v, segment_ids_BN))
        x_BNE = x_BNE + jnp.einsum("bnhd,hde->bne", o_BNHD, w_HDE)
        h = nn.LayerNorm(use_bias=False, scale_init=scale, name="ln2")(x_BNE)
        h = nn.gelu(nn.Dense(self.mlp, use_bias=False, name="up",
                             kernel_init=_init(E, ("embed", "mlp")))(h))
        return x_BNE + nn.Dense(E, use_bias=False, name="down",
                                kernel_init=_init(self.mlp, ("mlp", "embed")))(h)


class LinenDecoder(nn.Module):
    vocab: int
    embed: int
    layers: int
    heads: int
    mlp: int
    parallel: Parallel | None = None

    @nn.compact
    def __call__(self, tokens_BN, positions_BN, segment_ids_BN):
        mask = causal_mask(positions_BN, segment_ids_BN)
        x_BNE = nn.Embed(self.vocab, self.embed, name="embed", embedding_init=_init(
            1, ("vocab", "embed")))(tokens_BN)
        for i in range(self.layers):
            x_BNE = LinenBlock(self.heads, self.mlp, self.parallel, name=f"layers_{i}")(
                x_BNE, mask, segment_ids_BN)
        x_BNE = nn.LayerNorm(use_bias=False, name="ln_f", scale_init=nn.with_logical_partitioning(
            nn.initializers.ones, ("embed",)))(x_BNE)
        return nn.Dense(self.vocab, use_bias=False, name="head",
                        kernel_init=_init(self.embed, ("embed", "vocab")))(x_BNE)


def linen_factory(cfg, mesh):
    m = cfg.model
    return LinenDecoder(m.vocab, m.embed, m.layers, m.heads, m.mlp)


def linen_sp_factory(cfg, mesh):
    """The same params, attention through `jaxpar.models.transformer.parallel_attention`
    (the configured attention.impl in one shard_map; zigzag-aware)."""
    m = cfg.model
    par = train_model.parallel(cfg, mesh, train_model.run_rules(cfg))
    return LinenDecoder(m.vocab, m.embed, m.layers, m.heads, m.mlp, par)


# ------------------------------------------------------------------ NNX


def _nnx_init(fan_in, names):
    return nnx.with_partitioning(nnx.initializers.normal(fan_in ** -0.5), names)


class NnxBlock(nnx.Module):
    def __init__(self, embed: int, heads: int, mlp: int, *, rngs: nnx.Rngs):
        E, H = embed, heads
        self.heads = H
        norm = dict(use_bias=False, scale_init=nnx.with_partitioning(nnx.initializers.ones,
                                                                      ("embed",)), rngs=rngs)
        self.ln1, self.ln2 = nnx.LayerNorm(E, **norm), nnx.LayerNorm(E, **norm)
        self.q, self.k, self.v = (nnx.Linear(E, E, use_bias=False, rngs=rngs,
                                             kernel_init=_nnx_init(E, ("embed", "heads")))
                                  for _ in range(3))
        self.out = nnx.Linear(E, E, use_bias=False, rngs=rngs,
                              kernel_init=_nnx_init(E, ("heads", "embed")))
        self.up = nnx.Linear(E, mlp, use_bias=False, rngs=rngs,
                             kernel_init=_nnx_init(E, ("embed", "mlp")))
        self.down = nnx.Linear(mlp, E, use_bias=False, rngs=rngs,
                               kernel_init=_nnx_init(mlp, ("mlp", "embed")))

    def __call__(self, x_BNE, mask_B1NM):
        B, N, E = x_BNE.shape
        h_BNE = self.ln1(x_BNE)
        q, k, v = (f(h_BNE).reshape(B, N, self.heads, -1) for f in (self.q, self.k, self.v))
        o_BNHD = attend(q, k, v, mask_B1NM)
        x_BNE = x_BNE + self.out(o_BNHD.reshape(B, N, E))
        return x_BNE + self.down(nnx.gelu(self.up(self.ln2(x_BNE))))


class NnxDecoder(nnx.Module):
    def __init__(self, vocab, embed, layers, heads, mlp, *, rngs: nnx.Rngs):
        self.embed = nnx.Embed(vocab, embed, rngs=rngs, embedding_init=nnx.with_partitioning(
            nnx.initializers.normal(1.0), ("vocab", "embed")))
        self.layers = nnx.List([NnxBlock(embed, heads, mlp, rngs=rngs) for _ in range(layers)])
        self.ln_f = nnx.LayerNorm(embed, use_bias=False, rngs=rngs,
                                  scale_init=nnx.with_partitioning(nnx.initializers.ones,
                                                                   ("embed",)))
        self.head = nnx.Linear(embed, vocab, use_bias=False, rngs=rngs,
                               kernel_init=_nnx_init(embed, ("embed", "vocab")))

    def __call__(self, tokens_BN, positions_BN, segment_ids_BN):
        mask = causal_mask(positions_BN, segment_ids_BN)
        x_BNE = self.embed(tokens_BN)
        for block in self.layers:
            x_BNE = block(x_BNE, mask)
        return self.head(self.ln_f(x_BNE))


def nnx_factory(cfg, mesh):
    m = cfg.model
    return NnxDecoder(m.vocab, m.embed, m.layers, m.heads, m.mlp,
                      rngs=nnx.Rngs(cfg.train.seed))


def not_a_module(cfg, mesh):
    return "no module here"


# ------------------------------------------------------------------ fault injection


class NanOnTrigger(nn.Module):
    """The Linen decoder, whose logits turn NaN in any batch whose first row starts with
    `trigger` (bytes): a non-finite step at a chosen data step, found by the test."""
    decoder: LinenDecoder
    trigger: tuple[int, ...]

    def __call__(self, tokens_BN, positions_BN, segment_ids_BN):
        logits_BNV = self.decoder(tokens_BN, positions_BN, segment_ids_BN)
        hit = jnp.all(tokens_BN[0, :len(self.trigger)] == jnp.asarray(self.trigger))
        return jnp.where(hit, jnp.nan, logits_BNV)


def nan_factory(cfg, mesh):
    """`linen_factory`'s model, NaN where the batch's first row starts with the bytes in
    $JAXPAR_TEST_NAN_TRIGGER (comma-separated; empty = never)."""
    import os
    raw = os.environ.get("JAXPAR_TEST_NAN_TRIGGER", "")
    trigger = tuple(int(x) for x in raw.split(",") if x) or (-1,)
    return NanOnTrigger(linen_factory(cfg, mesh), trigger)
