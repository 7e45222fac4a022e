"""Which model a run trains: the built-in decoder, or a user's Flax module (Linen or NNX).

The factory protocol (`model.module=package.module:factory`):

    def factory(cfg: jaxpar.train.Config, mesh: jax.sharding.Mesh):
        return MyLinenModule(...)          # a flax.linen.Module, params not yet created
        # or
        return MyNnxModule(..., rngs=nnx.Rngs(cfg.train.seed))   # a flax.nnx.Module

and the module is called as `module(tokens_BN, positions_BN, segment_ids_BN) -> logits_BNV`.
Params carry logical axis names (Linen `nn.with_logical_partitioning`, NNX `sharding=`);
the run's rules (`jaxpar.sharding`) place them. An NNX factory is called under `jit`, so its
params are created already sharded. Tokens arrive in the zigzag order when
`attention.impl` is a sequence-parallel impl: build causal masks and RoPE from
`positions_BN` (the model may use `jaxpar.models.transformer.parallel_attention`), never from
the index.
"""
from __future__ import annotations

import dataclasses
import importlib
from typing import Any, Callable

import flax.linen as nn
import jax
from flax import nnx
from jax.sharding import Mesh

from jaxpar import sharding
from jaxpar.models.transformer import Parallel, Transformer, TransformerConfig
from jaxpar.train.config import Config, ConfigError, head_dim


@dataclasses.dataclass(frozen=True)
class ModelFns:
    """init(rng, tokens, positions, seg) -> boxed params; apply(params, tokens, positions,
    seg) -> logits. `kind` is 'builtin', 'linen' or 'nnx'."""
    init: Callable
    apply: Callable
    kind: str
    name: str


def parallel(cfg: Config, mesh: Mesh, rules: sharding.Rules) -> Parallel:
    return Parallel(mesh=mesh, rules=rules, attention=cfg.attention.impl,
                    ring_impl=cfg.attention.ring_impl, overlap=cfg.overlap.mode,
                    direction=cfg.overlap.direction)


def transformer_config(cfg: Config) -> TransformerConfig:
    m = cfg.model
    return TransformerConfig(vocab=m.vocab, layers=m.layers, embed=m.embed, heads=m.heads,
                             kv_heads=m.kv_heads, head_dim=head_dim(cfg), mlp=m.mlp,
                             rope_base=m.rope_base, dtype=m.dtype)


def import_factory(spec: str) -> Callable:
    if ":" not in spec:
        raise ConfigError(f"model.module={spec!r} must look like package.module:factory")
    mod_name, attr = spec.split(":", 1)
    try:
        mod = importlib.import_module(mod_name)
    except ImportError as e:
        raise ConfigError(f"model.module={spec!r}: cannot import {mod_name!r} ({e})") from None
    fn = getattr(mod, attr, None)
    if not callable(fn):
        names = [n for n in dir(mod) if not n.startswith("_") and callable(getattr(mod, n))]
        raise ConfigError(f"model.module={spec!r}: {mod_name} has no callable {attr!r}; "
                          f"callables there: {names[:8]}")
    return fn


def _linen(module: nn.Module, kind: str, name: str) -> ModelFns:
    def init(rng, *inputs):
        return module.init(rng, *inputs)["params"]

    def apply(params, *inputs):
        return module.apply({"params": params}, *inputs)

    return ModelFns(init, apply, kind, name)


def build(cfg: Config, mesh: Mesh, rules: sharding.Rules) -> ModelFns:
    """The run's model. Call under `jax.set_mesh(mesh)` and `nn.logical_axis_rules(rules)`."""
    if not cfg.model.module:
        module = Transformer(transformer_config(cfg), parallel=parallel(cfg, mesh, rules))
        return _linen(module, "builtin", "jaxpar.models.transformer:Transformer")
    factory = import_factory(cfg.model.module)
    holder: dict[str, Any] = {}

    def probe():
        obj = factory(cfg, mesh)
        holder["obj"] = obj if isinstance(obj, nn.Module) else None
        if isinstance(obj, nnx.Module):
            graphdef, params, rest = nnx.split(obj, nnx.Param, ...)
            holder["graphdef"] = graphdef
            return params, rest
        return None

    jax.eval_shape(probe)
    if holder["obj"] is not None:
        return _linen(holder["obj"], "linen", cfg.model.module)
    if "graphdef" not in holder:
        raise ConfigError(f"model.module={cfg.model.module!r} returned neither a flax.linen."
                          f"Module nor a flax.nnx.Module")
    graphdef = holder["graphdef"]

    def split():
        _, params, rest = nnx.split(factory(cfg, mesh), nnx.Param, ...)
        return params, rest

    # non-Param state (e.g. RNG counters) is created once, replicated, and kept constant
    rest = jax.jit(lambda: split()[1])()

    def init(rng, *inputs):
        del rng, inputs  # the factory seeds its own nnx.Rngs (from cfg.train.seed)
        return split()[0]

    def apply(params, *inputs):
        return nnx.merge(graphdef, params, rest)(*inputs)

    return ModelFns(init, apply, "nnx", cfg.model.module)
