"""tpmodel.py: a small tensor-parallel MLP language model with hand-written `shard_map` layers
(a `model.module` factory), correct and with each seeded bug of docs/testing.md.

    tokens -> embed -> 2 × [x + row(gelu(column(norm(x))))] -> norm -> head -> logits

`column` is a column-parallel matmul (its kernel's `mlp` columns split over `tensor`) and
`row` a row-parallel one (its `mlp` rows split over `tensor`, the partial products
`psum`med), both inside `shard_map(..., check_vma=False)`, the batch split over
replica·data·fsdp. `bug` seeds one mistake:

    "psum_dx"   column's backward is a hand-written custom_vjp that psums dx over tensor,
                the textbook Megatron `f`; shard_map (check_vma=False) already sums the
                cotangent of its tensor-replicated input, so dx arrives 2× on tensor 2
    "no_psum"   row forgets its psum: each device keeps its partial product
"""
from __future__ import annotations

import flax.linen as nn
import jax
from jax import lax
from jax.sharding import PartitionSpec as P

BATCH = ("replica", "data", "fsdp")


def named(init, *names):
    return nn.with_logical_partitioning(init, names)


@jax.custom_vjp
def copy_to_tensor(x_BNE):
    """Identity forward; the textbook backward all-reduces dx over tensor (the bug)."""
    return x_BNE


copy_to_tensor.defvjp(lambda x: (x, None), lambda _, g: (lax.psum(g, "tensor"),))


class Column(nn.Module):
    features: int
    mesh: jax.sharding.Mesh
    bug: str = ""

    @nn.compact
    def __call__(self, x_BNE):
        w_EF = self.param("kernel", named(nn.initializers.normal(x_BNE.shape[-1] ** -0.5),
                                          "embed", "mlp"), (x_BNE.shape[-1], self.features))

        def local(x_BNE, w_EF):  # w_EF: this device's columns
            if self.bug == "psum_dx":
                x_BNE = copy_to_tensor(x_BNE)
            return x_BNE @ w_EF
        return jax.shard_map(local, mesh=self.mesh, in_specs=(P(BATCH), P(None, "tensor")),
                             out_specs=P(BATCH, None, "tensor"), check_vma=False)(x_BNE, w_EF)


class Row(nn.Module):
    features: int
    mesh: jax.sharding.Mesh
    bug: str = ""

    @nn.compact
    def __call__(self, h_BNF):
        w_FE = self.param("kernel", named(nn.initializers.normal(h_BNF.shape[-1] ** -0.5),
                                          "mlp", "embed"), (h_BNF.shape[-1], self.features))

        def local(h_BNF, w_FE):  # this device's mlp slice of h and of the kernel's rows
            y_BNE = h_BNF @ w_FE
            return y_BNE if self.bug == "no_psum" else lax.psum(y_BNE, "tensor")
        return jax.shard_map(local, mesh=self.mesh, in_specs=(P(BATCH, None, "tensor"),
                                                              P("tensor", None)),
                             out_specs=P(BATCH), check_vma=False)(h_BNF, w_FE)


class TensorParallelLM(nn.Module):
    vocab: int
    embed: int
    layers: int
    mlp: int
    mesh: jax.sharding.Mesh
    bug: str = ""

    @nn.compact
    def __call__(self, tokens_BN, positions_BN, segment_ids_BN):
        ones = named(nn.initializers.ones, "embed")
        x_BNE = nn.Embed(self.vocab, self.embed, name="embed", embedding_init=named(
            nn.initializers.normal(1.0), "vocab", "embed"))(tokens_BN)
        for i in range(self.layers):
            h_BNE = nn.RMSNorm(scale_init=ones, name=f"norm_{i}")(x_BNE)
            h_BNF = nn.gelu(Column(self.mlp, self.mesh, self.bug, name=f"up_{i}")(h_BNE))
            x_BNE = x_BNE + Row(self.embed, self.mesh, self.bug, name=f"down_{i}")(h_BNF)
        x_BNE = nn.RMSNorm(scale_init=ones, name="norm")(x_BNE)
        return nn.Dense(self.vocab, use_bias=False, name="head", kernel_init=named(
            nn.initializers.normal(self.embed ** -0.5), "embed", "vocab"))(x_BNE)


def _model(cfg, mesh, bug=""):
    m = cfg.model
    return TensorParallelLM(m.vocab, m.embed, m.layers, m.mlp, mesh, bug)


def tp_factory(cfg, mesh):
    return _model(cfg, mesh)


# the lookup reads whole rows of the table: keep its vocab dimension whole on tensor
tp_factory.rules = {"vocab": None}


def psum_dx_factory(cfg, mesh):
    return _model(cfg, mesh, "psum_dx")


psum_dx_factory.rules = {"vocab": None}


def no_psum_factory(cfg, mesh):
    return _model(cfg, mesh, "no_psum")


no_psum_factory.rules = {"vocab": None}


def vocab_rule_factory(cfg, mesh):
    """The correct model under jaxpar's default `vocab -> tensor`: the embedding table is
    cut along the dimension its lookup reduces over."""
    return _model(cfg, mesh)


vocab_rule_factory.rules = {"vocab": "tensor"}
