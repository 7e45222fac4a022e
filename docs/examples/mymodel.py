"""mymodel.py: a small decoder for `python -m jaxpar.train ... model.module=mymodel:linen_factory`
(or `mymodel:nnx_factory`, the same model in Flax NNX). See docs/sharding.md."""
import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx


def causal_mask(positions_BN, segment_ids_BN):
    """[B, N, M]: from positions and documents, never from the index (tokens may be zigzag)."""
    earlier = positions_BN[:, None, :] <= positions_BN[:, :, None]
    return earlier & (segment_ids_BN[:, None, :] == segment_ids_BN[:, :, None])


def attention(q_BNHD, k_BNHD, v_BNHD, mask_BNM):
    s_BHNM = jnp.einsum("bnhd,bmhd->bhnm", q_BNHD, k_BNHD) * q_BNHD.shape[-1] ** -0.5
    s_BHNM = jnp.where(mask_BNM[:, None], s_BHNM, -1e30)
    return jnp.einsum("bhnm,bmhd->bnhd", jax.nn.softmax(s_BHNM, axis=-1), v_BNHD)


# ------------------------------------------------------------------------------ Linen

def named(init, *names):  # a Linen initializer whose param carries logical axis names
    return nn.with_logical_partitioning(init, names)


class Block(nn.Module):
    heads: int
    mlp: int

    @nn.compact
    def __call__(self, x_BNE, mask_BNM):
        E, H = x_BNE.shape[-1], self.heads
        w = nn.initializers.normal(E ** -0.5)
        ones = named(nn.initializers.ones, "embed")
        h_BNE = nn.RMSNorm(scale_init=ones, name="norm1")(x_BNE)
        qkv = self.param("qkv", named(w, "embed", None, "heads", "head_dim"), (E, 3, H, E // H))
        q, k, v = jnp.unstack(jnp.einsum("bne,ethd->tbnhd", h_BNE, qkv))
        o = self.param("o", named(w, "heads", "head_dim", "embed"), (H, E // H, E))
        x_BNE = x_BNE + jnp.einsum("bnhd,hde->bne", attention(q, k, v, mask_BNM), o)
        h_BNE = nn.RMSNorm(scale_init=ones, name="norm2")(x_BNE)
        up = nn.Dense(self.mlp, use_bias=False, kernel_init=named(w, "embed", "mlp"), name="up")
        down = nn.Dense(E, use_bias=False, name="down", kernel_init=named(
            nn.initializers.normal(self.mlp ** -0.5), "mlp", "embed"))
        return x_BNE + down(nn.gelu(up(h_BNE)))


class TinyLM(nn.Module):
    vocab: int
    embed: int
    layers: int
    heads: int
    mlp: int

    @nn.compact
    def __call__(self, tokens_BN, positions_BN, segment_ids_BN):
        mask_BNM = causal_mask(positions_BN, segment_ids_BN)
        x_BNE = nn.Embed(self.vocab, self.embed, name="embed", embedding_init=named(
            nn.initializers.normal(1.0), "vocab", "embed"))(tokens_BN)
        for i in range(self.layers):  # layers_0, layers_1, ...: DiLoCo's fragments
            x_BNE = Block(self.heads, self.mlp, name=f"layers_{i}")(x_BNE, mask_BNM)
        x_BNE = nn.RMSNorm(scale_init=named(nn.initializers.ones, "embed"), name="norm")(x_BNE)
        return nn.Dense(self.vocab, use_bias=False, name="head", kernel_init=named(
            nn.initializers.normal(self.embed ** -0.5), "embed", "vocab"))(x_BNE)


def linen_factory(cfg, mesh):
    m = cfg.model
    return TinyLM(m.vocab, m.embed, m.layers, m.heads, m.mlp)


def fsdp_factory(cfg, mesh):
    return linen_factory(cfg, mesh)


fsdp_factory.rules = {"embed": "data"}  # over DEFAULT_RULES: also cut every 'embed' dim


# ------------------------------------------------------------------------------ NNX

def nnx_named(init, *names):  # an NNX initializer whose Param carries logical axis names
    return nnx.with_partitioning(init, names)


class NnxBlock(nnx.Module):
    def __init__(self, embed, heads, mlp, rngs):
        E, H, w = embed, heads, nnx.initializers.normal(embed ** -0.5)
        ones = nnx_named(nnx.initializers.ones, "embed")
        self.norm1 = nnx.RMSNorm(E, scale_init=ones, rngs=rngs)
        self.norm2 = nnx.RMSNorm(E, scale_init=ones, rngs=rngs)
        self.qkv = nnx.Param(nnx_named(w, "embed", None, "heads", "head_dim")(
            rngs.params(), (E, 3, H, E // H)))
        self.o = nnx.Param(nnx_named(w, "heads", "head_dim", "embed")(
            rngs.params(), (H, E // H, E)))
        self.up = nnx.Linear(E, mlp, use_bias=False, kernel_init=nnx_named(w, "embed", "mlp"),
                             rngs=rngs)
        self.down = nnx.Linear(mlp, E, use_bias=False, rngs=rngs, kernel_init=nnx_named(
            nnx.initializers.normal(mlp ** -0.5), "mlp", "embed"))

    def __call__(self, x_BNE, mask_BNM):
        q, k, v = jnp.unstack(jnp.einsum("bne,ethd->tbnhd", self.norm1(x_BNE), self.qkv[...]))
        x_BNE = x_BNE + jnp.einsum("bnhd,hde->bne", attention(q, k, v, mask_BNM), self.o[...])
        return x_BNE + self.down(nnx.gelu(self.up(self.norm2(x_BNE))))


class NnxTinyLM(nnx.Module):
    def __init__(self, vocab, embed, layers, heads, mlp, rngs):
        self.embed = nnx.Embed(vocab, embed, rngs=rngs, embedding_init=nnx_named(
            nnx.initializers.normal(1.0), "vocab", "embed"))
        self.layers = nnx.List([NnxBlock(embed, heads, mlp, rngs) for _ in range(layers)])
        self.norm = nnx.RMSNorm(embed, rngs=rngs, scale_init=nnx_named(
            nnx.initializers.ones, "embed"))
        self.head = nnx.Linear(embed, vocab, use_bias=False, rngs=rngs, kernel_init=nnx_named(
            nnx.initializers.normal(embed ** -0.5), "embed", "vocab"))

    def __call__(self, tokens_BN, positions_BN, segment_ids_BN):
        mask_BNM = causal_mask(positions_BN, segment_ids_BN)
        x_BNE = self.embed(tokens_BN)
        for block in self.layers:  # layers/0, layers/1, ...: DiLoCo's fragments
            x_BNE = block(x_BNE, mask_BNM)
        return self.head(self.norm(x_BNE))


def nnx_factory(cfg, mesh):
    m = cfg.model
    return NnxTinyLM(m.vocab, m.embed, m.layers, m.heads, m.mlp, nnx.Rngs(cfg.train.seed))
