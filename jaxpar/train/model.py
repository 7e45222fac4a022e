"""Which model a run trains: the built-in decoder, or a user's Flax module (Linen or NNX).

The factory protocol (`model.module=package.module:factory`; docs/sharding.md in full):

    def factory(cfg: jaxpar.train.Config, mesh: jax.sharding.Mesh):
        return MyLinenModule(...)          # a flax.linen.Module, params not yet created
        # or
        return MyNnxModule(..., rngs=nnx.Rngs(cfg.train.seed))   # a flax.nnx.Module
    factory.rules = {"mlp": None}          # optional: overrides of the rules table

and the module is called as `module(tokens_BN, positions_BN, segment_ids_BN) -> logits_BNV`.
Params carry logical axis names (Linen `nn.with_logical_partitioning`, NNX
`nnx.with_partitioning` / `out_sharding=` metadata); the run's rules (`run_rules`) place
them, and init runs under `jit` with those out shardings, so params are created already
sharded. Linen: only the `params` collection. NNX: the factory is called (traced) under the
mesh and the rules; its `nnx.Param`s become a plain nested dict (list items as int keys),
everything else is created once and kept constant. Tokens arrive in the zigzag order when
`attention.impl` is a sequence-parallel impl: build causal masks and RoPE from
`positions_BN` (the model may use `jaxpar.models.transformer.parallel_attention`), never from
the index.
"""
from __future__ import annotations

import dataclasses
import importlib
import math
import warnings
from typing import Any, Callable

import flax.linen as nn
import jax
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxpar import sharding
from jaxpar.models import blocks
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
    # vocab 0 (not resolved from the data: a model built without Run.create) = bytes
    vocab = m.vocab or 256
    tensor = cfg.mesh.tensor  # a vocab the tensor axis does not divide is padded (and masked)
    return TransformerConfig(vocab=vocab, layers=m.layers, embed=m.embed, heads=m.heads,
                             kv_heads=m.kv_heads, head_dim=head_dim(cfg), mlp=m.mlp,
                             rope_base=m.rope_base, dtype=m.dtype,
                             rope_scaling=tuple(sorted((m.rope_scaling or {}).items())),
                             max_positions=m.max_positions or cfg.train.seq_len,
                             norm_eps=m.rms_norm_eps, tie_embeddings=m.tie_embeddings,
                             padded_vocab=-(-vocab // tensor) * tensor, remat=m.remat,
                             scan_layers=m.scan_layers)


def _close(word: str, names) -> str:
    import difflib

    close = difflib.get_close_matches(word, names, n=1, cutoff=0.5)
    return f" (did you mean {close[0]!r}?)" if close else ""


def import_factory(spec: str) -> Callable:
    """The `factory` of `model.module=package.module:factory` (ConfigError if it is not
    there)."""
    if ":" not in spec:
        raise ConfigError(f"model.module={spec!r} must look like package.module:factory")
    mod_name, attr = spec.split(":", 1)
    try:
        mod = importlib.import_module(mod_name)
    except ImportError as e:
        raise ConfigError(f"model.module={spec!r}: cannot import {mod_name!r} ({e}); is its "
                          f"folder on PYTHONPATH?") from None
    fn = getattr(mod, attr, None)
    if not callable(fn):
        names = [n for n, v in vars(mod).items() if not n.startswith("_") and callable(v)
                 and getattr(v, "__module__", None) == mod.__name__]
        raise ConfigError(f"model.module={spec!r}: {mod_name} has no callable {attr!r}"
                          f"{_close(attr, names)}; functions and classes defined there: "
                          f"{names[:8]}")
    return fn


def _check_rules(over, where: str) -> dict:
    from jaxpar.mesh import AXES

    if not isinstance(over, dict):
        raise ConfigError(f"{where} must be a dict {{logical name: mesh axis | [mesh axes] | "
                          f"None}}, got {over!r}")
    for k, v in over.items():
        axes = (v,) if isinstance(v, str) else v if isinstance(v, (list, tuple)) else ()
        bad = [a for a in axes if a not in AXES] or ([v] if not isinstance(
            v, (str, list, tuple, type(None))) else [])
        if not isinstance(k, str) or bad:
            raise ConfigError(f"{where}[{k!r}]={v!r} must name mesh axes among {list(AXES)} "
                              f"(or None)")
    return over


def rule_overrides(cfg: Config) -> dict:
    """The overrides of `jaxpar.sharding.DEFAULT_RULES` a run applies: the user factory's
    own (`factory.rules = {"mlp": None, "my_axis": "tensor"}`), then the config's
    `sharding.rules` (YAML or `sharding.rules.mlp=null`), which win."""
    over = {}
    if cfg.model.module:
        factory_rules = getattr(import_factory(cfg.model.module), "rules", None) or {}
        over.update(_check_rules(factory_rules, f"model.module={cfg.model.module!r}: "
                                                f"factory.rules"))
    over.update(_check_rules(cfg.sharding.rules, "sharding.rules"))
    return over


# The logical names whose mesh axes the built-in decoder's shard_map layers fix, and why.
_BUILTIN_FIXED = {
    "replica": "Streaming DiLoCo keeps its replicas on the replica axis",
    "batch": "the data pipeline and attention's shard_map split the batch over "
             "replica·data·fsdp",
    "length": "attention's shard_map splits the tokens over seq·seq_inner",
    "act_length": "the collective-matmul layers split the tokens between blocks over "
                  "seq·seq_inner·tensor",
    "heads": "q/k/v/o are tensor-parallel collective matmuls (jaxpar.overlap) that split "
             "heads over tensor",
    "kv_heads": "k/v are tensor-parallel collective matmuls that split kv_heads over tensor",
    "mlp": "gate/up/down are tensor-parallel collective matmuls that split mlp over tensor",
    "head_dim": "attention's shard_map keeps head_dim whole on each device",
}


def _check_builtin_rules(cfg: Config, table: sharding.Rules) -> None:
    """The built-in decoder honours any rule for `embed` and `vocab` (plain XLA-sharded
    params) and, for the names its shard_map layers fix, any rule that puts them on the
    same mesh axes of size > 1; anything else is a one-line ConfigError saying why."""
    sizes = dataclasses.asdict(cfg.mesh)
    default = dict(sharding.rules(diloco=cfg.diloco.enabled))
    table = dict(table)
    real = lambda name, t: tuple(a for a in sharding.mesh_axes(name, tuple(t.items()))
                                 if sizes[a] > 1)
    for name, value in cfg.sharding.rules.items():
        if name not in default:
            raise ConfigError(f"sharding.rules.{name}: the built-in decoder has no logical axis "
                              f"{name!r}{_close(name, list(default))}; its names are "
                              f"{list(default)}")
        if name in _BUILTIN_FIXED and real(name, table) != real(name, default):
            raise ConfigError(f"sharding.rules.{name}={value!r} cannot apply to the built-in "
                              f"decoder on mesh {sizes}: {_BUILTIN_FIXED[name]}, so it needs "
                              f"{name}: {default[name]!r} (axes of size 1 may be dropped)")


def check_config_rules(cfg: Config) -> None:
    """The checks of `sharding.rules` that need no import of a user module (config.validate
    calls this): mesh axis names, and for the built-in decoder what it can honour."""
    _check_rules(cfg.sharding.rules, "sharding.rules")
    if not cfg.model.module:
        _check_builtin_rules(cfg, sharding.rules(diloco=cfg.diloco.enabled,
                                                 overrides=cfg.sharding.rules))


def run_rules(cfg: Config) -> sharding.Rules:
    """The run's rules table: DEFAULT_RULES, `batch` on `data`·`fsdp` only with DiLoCo,
    then `rule_overrides`. A factory that builds shard_map layers can call this too."""
    table = sharding.rules(diloco=cfg.diloco.enabled, overrides=rule_overrides(cfg))
    if not cfg.model.module:
        _check_builtin_rules(cfg, table)
    return table


def _key(k) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


def check_params(boxed, rules: sharding.Rules, mesh: Mesh, name: str,
                 cfg: Config | None = None) -> None:
    """A user model's boxed params against the rules: a sharded dimension that its mesh
    axes do not divide is a ConfigError naming the param, and so are DiLoCo fragments the
    layers cannot fill; logical names that no rule mentions are replicated, with a
    warning."""
    known = {k for k, _ in rules}
    unknown = set()
    logical = sharding.logical_axes(boxed)
    flat = jax.tree_util.tree_flatten_with_path(
        boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))[0]
    specs = jax.tree.leaves(logical, is_leaf=lambda x: isinstance(x, P))
    for (path, leaf), names in zip(flat, specs, strict=True):
        unknown |= {n for n in names if isinstance(n, str) and n not in known}
        shape = getattr(leaf, "value", leaf).shape
        for dim, (n, entry) in enumerate(zip(shape, sharding.spec(names, rules))):
            axes = (entry,) if isinstance(entry, str) else tuple(entry or ())
            size = math.prod(mesh.shape[a] for a in axes)
            if n % size:
                where = "/".join(_key(k) for k in path)
                raise ConfigError(
                    f"model.module={name!r}: param {where} {tuple(shape)} has dimension {dim} "
                    f"({names[dim]!r}) of size {n}, which its mesh axes {axes} (size {size}) "
                    f"do not divide; change the model size or the rules (sharding.rules)")
    if cfg is not None and cfg.diloco.enabled and cfg.diloco.num_fragments > 1:
        from jaxpar.diloco import split_fragments

        plain = jax.tree.map(lambda b: getattr(b, "value", b), boxed,
                             is_leaf=lambda x: isinstance(x, nn.Partitioned))
        try:
            split_fragments(plain, cfg.diloco.num_fragments, cfg.diloco.sync_every)
        except ValueError as e:
            raise ConfigError(f"diloco.num_fragments={cfg.diloco.num_fragments} with "
                              f"model.module={name!r}: {e}") from None
    if unknown:
        warnings.warn(f"{name}: logical axis names {sorted(unknown)} are not in the rules "
                      f"{sorted(known)}; those dimensions are replicated", stacklevel=2)


def _linen(module: nn.Module, kind: str, name: str, mesh: Mesh, rules: sharding.Rules,
           cfg: Config) -> ModelFns:
    def init(rng, *inputs):
        params = module.init(rng, *inputs)["params"]
        check_params(params, rules, mesh, name, cfg)
        return params

    def apply(params, *inputs):
        return module.apply({"params": params}, *inputs)

    return ModelFns(init, apply, kind, name)


def _nnx_names(var) -> tuple | None:
    """The logical names of an NNX variable (`out_sharding`; older Flax: `sharding_names`,
    `sharding`), or None when it has none."""
    meta = var.get_metadata()
    for key in ("out_sharding", "sharding_names", "sharding"):
        names = meta.get(key)
        if names is not None:
            if isinstance(names, jax.sharding.Sharding):
                names = names.spec
            return tuple(names)
    return None


def _nested(flat) -> dict:
    """{path tuple: leaf} -> nested dicts (NNX list indices stay int keys)."""
    out: dict = {}
    for path, leaf in flat:
        d = out
        for k in path[:-1]:
            d = d.setdefault(k, {})
        d[path[-1]] = leaf
    return out


def _nnx(factory: Callable, cfg: Config, mesh: Mesh, graphdef, rules: sharding.Rules
         ) -> ModelFns:
    """An NNX model as plain functions of a plain nested dict of arrays (the `nnx.Param`s,
    keyed by attribute name / list index), so the optimizer, DiLoCo, checkpoints and the
    param table see the same kind of tree as with Linen. Non-Param state (RNG streams,
    batch statistics, ...) is created once and stays constant."""
    def split():
        _, params, rest = nnx.split(factory(cfg, mesh), nnx.Param, ...)
        return params, rest

    rest = jax.jit(lambda: split()[1], out_shardings=NamedSharding(mesh, P()))()

    def init(rng, *inputs):
        del rng, inputs  # the factory seeds its own nnx.Rngs (from cfg.train.seed)
        params, _ = split()
        boxed = _nested(
            (path, var.get_value() if (names := _nnx_names(var)) is None
             else nn.LogicallyPartitioned(var.get_value(), names))
            for path, var in nnx.to_flat_state(params))
        check_params(boxed, rules, mesh, cfg.model.module, cfg)
        return boxed

    def apply(params, *inputs):
        return nnx.merge(graphdef, params, rest)(*inputs)

    return ModelFns(init, apply, "nnx", cfg.model.module)


def build(cfg: Config, mesh: Mesh, rules: sharding.Rules) -> ModelFns:
    """The run's model. Call under `jax.set_mesh(mesh)` and `nn.logical_axis_rules(rules)`
    (NNX variables with logical names are sharded as they are created, which needs both)."""
    if not cfg.model.module:
        tcfg, par = transformer_config(cfg), parallel(cfg, mesh, rules)
        fns = _linen(Transformer(tcfg, parallel=par), "builtin",
                     "jaxpar.models.transformer:Transformer", mesh, rules, cfg)
        if tcfg.scan_layers:  # the unscanned init, stacked: the same values either way
            plain = Transformer(dataclasses.replace(tcfg, scan_layers=False), parallel=par)
            fns = dataclasses.replace(fns, init=lambda rng, *inputs: blocks.stack_layers(
                plain.init(rng, *inputs)["params"]))
        return fns
    spec = cfg.model.module
    factory = import_factory(spec)
    holder: dict[str, Any] = {}

    def probe():  # traced only: creates no arrays
        obj = factory(cfg, mesh)
        holder["obj"] = obj
        if isinstance(obj, nnx.Module):
            holder["graphdef"], params, _ = nnx.split(obj, nnx.Param, ...)
            return params
        return None

    jax.eval_shape(probe)  # a bug in the user's model raises here, with its traceback
    obj = holder["obj"]
    if isinstance(obj, nn.Module):  # built again outside the trace: no leaked tracers
        return _linen(factory(cfg, mesh), "linen", spec, mesh, rules, cfg)
    if isinstance(obj, nnx.Module):
        return _nnx(factory, cfg, mesh, holder["graphdef"], rules)
    raise ConfigError(f"model.module={spec!r} returned {type(obj).__name__}, neither a "
                      f"flax.linen.Module nor a flax.nnx.Module")
