"""A Llama-style decoder (Flax Linen): RMSNorm, RoPE, grouped-query attention, SwiGLU.

Every param and activation carries logical axis names (`jaxpar.sharding` maps them to the
mesh). Given a `Parallel` (a mesh, the rules, the attention impl and the overlap mode):

  * q, k, v, gate, up are `ColumnParallelDense` and o, down `RowParallelDense` from
    `jaxpar.overlap` (Megatron-SP: between blocks tokens are sharded over seq·tensor, the
    tensor part gathered/scattered by the — optionally decomposed — collective matmuls);
  * attention is `jaxpar.attention` inside one `shard_map`: batch on `batch`, tokens on the
    sequence axes, heads on `tensor`. Causal, with segment ids (packed documents). The
    sequence-parallel impls expect the zigzag token order, which the data path applies once
    to tokens, positions (RoPE) and segment ids.

Without a mesh the same params (same names and shapes) run as plain Dense layers and
`attention_fn(q_BNHD, k_BNKD, v_BNKD, segment_ids_BN, positions_BN)` (default: causal
softmax on positions): the unsharded reference. Layers are named `layers_0 ...
layers_{L-1}`, which is how Streaming DiLoCo finds its fragments; with `scan_layers` they
are one stacked `layers` subtree instead, and `remat` picks a rematerialization policy
(`jaxpar.models.blocks`).
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from jaxpar import sharding
from jaxpar.attention import attention as sp_attention
from jaxpar.attention.blockwise import flash_attention
from jaxpar.mesh import TENSOR
from jaxpar.models import blocks
from jaxpar.models import rope as rope_lib
from jaxpar.overlap import ColumnParallelDense, RowParallelDense


PAD_LOGIT = -1e30  # logit of a padding vocab row: exp underflows to exactly 0, no inf arithmetic


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
    remat: str = "none"      # jaxpar.models.blocks.REMAT_POLICIES
    scan_layers: bool = False  # nn.scan over the blocks (params stacked under `layers`)
    # HF `rope_scaling` as sorted (key, value) pairs (hashable); () = plain RoPE
    rope_scaling: tuple = ()
    max_positions: int = 0          # HF max_position_embeddings (dynamic/yarn scaling use it)
    tie_embeddings: bool = False    # logits from the embedding table (no lm_head)
    padded_vocab: int = 0           # 0 = vocab; larger: rows a tensor axis can split, masked

    def __post_init__(self):
        if self.heads % self.kv_heads:
            raise ValueError(f"heads={self.heads} must be a multiple of kv_heads={self.kv_heads}")
        if self.padded_vocab and self.padded_vocab < self.vocab:
            raise ValueError(f"padded_vocab={self.padded_vocab} must be >= vocab={self.vocab}")
        if isinstance(self.rope_scaling, dict):
            object.__setattr__(self, "rope_scaling", tuple(sorted(self.rope_scaling.items())))
        rope_lib.check(self.rope_scaling, self.max_positions)

    @property
    def vocab_rows(self) -> int:
        """Rows of the embedding table (and columns of the head): the padded vocab."""
        return self.padded_vocab or self.vocab


@dataclasses.dataclass(frozen=True)
class Parallel:
    """How the decoder runs on a mesh; axis names come from `rules`."""
    mesh: Mesh
    rules: sharding.Rules = sharding.DEFAULT_RULES
    attention: str = "dense"    # dense (no sequence sharding) | ulysses | ring | tokenring | hybrid
    ring_impl: str = "ring"     # hybrid's outer axis
    overlap: str = "none"       # none | collective_matmul | auto
    direction: str = "uni"

    def axes(self, logical: str) -> tuple[str, ...]:
        return sharding.mesh_axes(logical, self.rules)

    @property
    def tensor_axis(self) -> str:
        axes = self.axes("heads")  # () when a rule drops `heads` on a mesh with tensor=1
        return axes[0] if axes else TENSOR

    @property
    def seq_axes(self) -> tuple[str, ...]:
        return self.axes("length")

    @property
    def tensor_size(self) -> int:
        return math.prod(self.mesh.shape[a] for a in self.axes("heads"))

    def kv_replicas(self, kv_heads: int) -> int:
        """How many tensor shards share each kv head: 1 when the tensor axis splits the kv
        heads, T/K when it has more shards than kv heads (MQA; GQA 8 on tensor 16)."""
        T = self.tensor_size
        return 1 if kv_heads % T == 0 else T // kv_heads


def _entry(axes: tuple[str, ...]):
    return axes[0] if len(axes) == 1 else (axes or None)


def causal_attention(q_BNHD, k_BNKD, v_BNKD, segment_ids_BN=None, positions_BN=None):
    """Reference causal softmax attention with GQA in fp32. The mask comes from positions
    (any token order works) and, for packed documents, equal segment ids."""
    B, N, H, D = q_BNHD.shape
    K = k_BNKD.shape[2]
    if positions_BN is None:
        positions_BN = jnp.broadcast_to(jnp.arange(N), (B, N))
    q_BNKGD = q_BNHD.reshape(B, N, K, H // K, D).astype(jnp.float32)
    s_BKGNM = jnp.einsum("bnkgd,bmkd->bkgnm", q_BNKGD, k_BNKD.astype(jnp.float32)) / jnp.sqrt(D)
    mask_BNM = positions_BN[:, None, :] <= positions_BN[:, :, None]
    if segment_ids_BN is not None:
        mask_BNM &= segment_ids_BN[:, None, :] == segment_ids_BN[:, :, None]
    s_BKGNM = jnp.where(mask_BNM[:, None, None], s_BKGNM, -jnp.inf)
    p_BKGNM = jax.nn.softmax(s_BKGNM, axis=-1)
    out_BNKGD = jnp.einsum("bkgnm,bmkd->bnkgd", p_BKGNM, v_BNKD.astype(jnp.float32))
    return out_BNKGD.reshape(B, N, H, D).astype(q_BNHD.dtype)


def parallel_attention(par: Parallel, q_BNHD, k_BNKD, v_BNKD, segment_ids_BN):
    """Causal attention on global arrays: one shard_map, tokens on the sequence axes (in
    zigzag order for the sequence-parallel impls), heads on the tensor axis."""
    batch, seq, tensor = _entry(par.axes("batch")), _entry(par.seq_axes), par.tensor_axis
    qkv_spec, seg_spec = P(batch, seq, tensor, None), P(batch, seq)
    r = par.kv_replicas(k_BNKD.shape[2])
    if r > 1:  # kv heads replicated (fewer than tensor shards): shard t gets head t // r,
        # the one its query heads [t·H/T, (t+1)·H/T) use; a local slice of replicated k/v
        k_BNKD, v_BNKD = (jnp.repeat(x, r, axis=2) for x in (k_BNKD, v_BNKD))
    if par.attention == "dense":
        def local(q, k, v, seg):
            return flash_attention(q, k, v, segment_ids_BN=seg, causal=True)[0].astype(q.dtype)
    else:
        axis = par.seq_axes if par.attention == "hybrid" else par.seq_axes[0]
        kw = {"ring_impl": par.ring_impl} if par.attention == "hybrid" else {}
        local = functools.partial(_per_device, impl=par.attention, axis=axis, kw=kw)
    # Under DiLoCo's vmap(spmd_axis_name='replica') every input is also varying over
    # `replica` while the schedules' shard indices are not, which the vma type check rejects;
    # every input and output here is fully sharded, so the check guards nothing we need.
    return jax.shard_map(local, mesh=par.mesh, in_specs=(qkv_spec,) * 3 + (seg_spec,),
                         out_specs=qkv_spec, check_vma=False)(q_BNHD, k_BNKD, v_BNKD,
                                                              segment_ids_BN)


def _per_device(q, k, v, seg, *, impl, axis, kw):
    return sp_attention(q, k, v, impl=impl, axis=axis, causal=True, segment_ids=seg, **kw)


rope = rope_lib.rope  # rotate-half RoPE with HF's rope_scaling types (jaxpar.models.rope)


class RMSNorm(nn.Module):
    eps: float = 1e-6

    @nn.compact
    def __call__(self, x_BNE):
        init = nn.with_logical_partitioning(nn.initializers.ones, ("embed",))
        scale_E = self.param("scale", init, (x_BNE.shape[-1],))
        x = x_BNE.astype(jnp.float32)
        x = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + self.eps)
        return (x * scale_E).astype(x_BNE.dtype)


class Block(nn.Module):
    cfg: TransformerConfig
    attention_fn: Callable
    parallel: Parallel | None = None

    def _dense(self, features, name, fan_in, axes, row: bool = False):
        init = nn.initializers.normal(fan_in ** -0.5)
        par, dtype = self.parallel, self.cfg.dtype
        if par is not None and axes[-1] == "kv_heads" and par.kv_replicas(self.cfg.kv_heads) > 1:
            # fewer kv heads than tensor shards: k/v weights replicated over the tensor axis
            # (K·D columns, small) and computed whole on every device; attention keeps the
            # head each shard's query heads use (Megatron's and vLLM's KV replication)
            dense = nn.Dense(features, use_bias=False, dtype=dtype, name=name,
                             kernel_init=nn.with_logical_partitioning(init, ("embed", None)))
            return lambda h: nn.with_logical_constraint(dense(h), ("batch", "length", None))
        if par is None:
            return nn.Dense(features, use_bias=False, dtype=dtype, name=name,
                            kernel_init=nn.with_logical_partitioning(init, axes))
        cls = RowParallelDense if row else ColumnParallelDense
        return cls(features, mesh=par.mesh, axis=par.tensor_axis, overlap=par.overlap,
                   direction=par.direction, dtype=dtype, kernel_init=init, name=name,
                   batch_axes=_entry(par.axes("batch")), seq_axes=par.seq_axes,
                   kernel_axes=axes)

    @nn.compact
    def __call__(self, x_BNE, positions_BN, segment_ids_BN):
        c = self.cfg
        B, N, _ = x_BNE.shape
        H, K, D = c.heads, c.kv_heads, c.head_dim
        h_BNE = RMSNorm(c.norm_eps, name="attn_norm")(x_BNE)
        q_BNHD = self._dense(H * D, "q", c.embed, ("embed", "heads"))(h_BNE).reshape(B, N, H, D)
        k_BNKD = self._dense(K * D, "k", c.embed, ("embed", "kv_heads"))(h_BNE).reshape(B, N, K, D)
        v_BNKD = self._dense(K * D, "v", c.embed, ("embed", "kv_heads"))(h_BNE).reshape(B, N, K, D)
        q_BNHD = blocks.tag(rope(q_BNHD, positions_BN, c.rope_base, c.rope_scaling,
                                 c.max_positions), "q")
        k_BNKD = blocks.tag(rope(k_BNKD, positions_BN, c.rope_base, c.rope_scaling,
                                 c.max_positions), "k")
        v_BNKD = blocks.tag(v_BNKD, "v")
        if self.parallel is None:
            o_BNHD = self.attention_fn(q_BNHD, k_BNKD, v_BNKD, segment_ids_BN, positions_BN)
        else:
            o_BNHD = parallel_attention(self.parallel, q_BNHD, k_BNKD, v_BNKD, segment_ids_BN)
        o_BNHD = blocks.tag(o_BNHD, "attn_out")
        o = self._dense(c.embed, "o", H * D, ("heads", "embed"), row=True)
        x_BNE = x_BNE + o(o_BNHD.reshape(B, N, H * D))
        h_BNE = RMSNorm(c.norm_eps, name="mlp_norm")(x_BNE)
        gate_BNF = self._dense(c.mlp, "gate", c.embed, ("embed", "mlp"))(h_BNE)
        up_BNF = self._dense(c.mlp, "up", c.embed, ("embed", "mlp"))(h_BNE)
        down = self._dense(c.embed, "down", c.mlp, ("mlp", "embed"), row=True)
        x_BNE = x_BNE + down(nn.silu(gate_BNF) * up_BNF)
        return nn.with_logical_constraint(x_BNE, ("batch", "act_length", "embed"))


class Transformer(nn.Module):
    """tokens[B, N] (+ positions[B, N], segment_ids[B, N]) -> logits[B, N, V] in fp32."""
    cfg: TransformerConfig
    attention_fn: Callable = causal_attention
    parallel: Parallel | None = None

    @nn.compact
    def __call__(self, tokens_BN, positions_BN=None, segment_ids_BN=None):
        c = self.cfg
        if positions_BN is None:
            positions_BN = jnp.broadcast_to(jnp.arange(tokens_BN.shape[1]), tokens_BN.shape)
        if segment_ids_BN is None:
            segment_ids_BN = jnp.zeros(tokens_BN.shape, jnp.int32)
        # attention and RoPE see tokens sharded like q/k/v (on `length`, heads on tensor):
        # one small int gather here instead of one float gather per RoPE in every layer
        positions_BN = nn.with_logical_constraint(positions_BN, ("batch", "length"))
        segment_ids_BN = nn.with_logical_constraint(segment_ids_BN, ("batch", "length"))
        embed = nn.Embed(c.vocab_rows, c.embed, name="embed",
                         embedding_init=nn.with_logical_partitioning(
                             nn.initializers.normal(1.0), ("vocab", "embed")))
        x_BNE = embed(tokens_BN).astype(c.dtype)
        x_BNE = nn.with_logical_constraint(x_BNE, ("batch", "act_length", "embed"))
        x_BNE = blocks.apply_blocks(Block, c.layers, c.remat, c.scan_layers, x_BNE,
                                    positions_BN, segment_ids_BN, cfg=c,
                                    attention_fn=self.attention_fn, parallel=self.parallel)
        x_BNE = RMSNorm(c.norm_eps, name="final_norm")(x_BNE)
        if c.tie_embeddings:
            table_VE = embed.embedding.astype(c.dtype)
            logits_BNV = jnp.einsum("bne,ve->bnv", x_BNE, table_VE).astype(jnp.float32)
        else:
            head = nn.Dense(c.vocab_rows, use_bias=False, dtype=c.dtype, name="lm_head",
                            kernel_init=nn.with_logical_partitioning(
                                nn.initializers.normal(c.embed ** -0.5), ("embed", "vocab")))
            logits_BNV = head(x_BNE).astype(jnp.float32)
        if c.vocab_rows > c.vocab:  # padding rows: probability exactly 0 after the softmax
            real_V = jnp.arange(c.vocab_rows) < c.vocab
            logits_BNV = jnp.where(real_V, logits_BNV, PAD_LOGIT)
        return nn.with_logical_constraint(logits_BNV, ("batch", "length", "vocab"))
