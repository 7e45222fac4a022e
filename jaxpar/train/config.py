"""Run configuration: typed, frozen dataclasses read from YAML with `base:` inheritance.

    cfg = load_config("configs/demo.yaml", ["model.layers=2", "attention.impl=ring"])
    validate(cfg, jax.device_count())   # the semantic checks; nothing is compiled before this

A YAML file may name `base: other.yaml` (relative to itself); its keys are merged over the
base's, section by section. Overrides are dotted `section.key=value`, with the value read as
YAML (`true`, `3`, `1e-3`, `null`, `[a, b]`). Every mistake is a `ConfigError`: one line that
names the key and what would be valid; `python -m jaxpar.train` prints it and exits with 2.
"""
from __future__ import annotations

import dataclasses
import difflib
import os
import types
import typing
from pathlib import Path
from typing import Any

import yaml



class ConfigError(ValueError):
    """A bad configuration: the message names the key and the valid choices."""


@dataclasses.dataclass(frozen=True)
class MeshSection:
    replica: int = 1    # Streaming DiLoCo replicas (or more data parallelism without DiLoCo)
    data: int = 1
    fsdp: int = 1       # ZeRO-3: batch split like data, params + optimizer state split too
    seq: int = 1        # sequence parallelism (the ring axis of the hybrid)
    seq_inner: int = 1  # Ulysses part of attention.impl=hybrid
    tensor: int = 1     # tensor parallelism (Megatron-SP layout)


@dataclasses.dataclass(frozen=True)
class ModelSection:
    module: str = ""    # "" = the built-in decoder; else "package.module:factory"
    layers: int = 4
    embed: int = 128
    heads: int = 4
    kv_heads: int = 2
    head_dim: int = 0   # 0 = embed // heads
    mlp: int = 384
    vocab: int = 0      # 0 = the data's (bytes: 256; a prepared dataset: its manifest)
    rope_base: float = 10_000.0       # HF rope_theta
    # HF rope_scaling, e.g. {rope_type: linear, factor: 4.0} (types: docs/hf.md); null = none
    rope_scaling: dict | None = None
    max_positions: int = 0            # HF max_position_embeddings (0 = train.seq_len)
    rms_norm_eps: float = 1e-6
    tie_embeddings: bool = False      # logits from the embedding table (no lm_head)
    dtype: str = "float32"  # compute dtype; params stay fp32
    init_from: str = ""     # an HF folder: sets the model keys above and starts from its weights
    remat: str = "none"     # none | full | dots | dots_no_batch | attn_out | qkv_attn_out
    scan_layers: bool = False  # nn.scan over the blocks: one compiled block at any depth


@dataclasses.dataclass(frozen=True)
class AttentionSection:
    impl: str = "dense"     # dense | ulysses | ring | tokenring | hybrid | auto
    ring_impl: str = "ring"  # hybrid's outer (seq) axis: ring | tokenring


@dataclasses.dataclass(frozen=True)
class OverlapSection:
    mode: str = "none"       # none | collective_matmul | auto
    direction: str = "uni"   # uni | bidi


@dataclasses.dataclass(frozen=True)
class DiLoCoSection:
    enabled: bool = False
    sync_every: int = 16      # H
    num_fragments: int = 1    # P
    overlap_steps: int = 0    # τ
    alpha: float = 0.0
    quantize: str = "none"
    outer_lr: float = 0.7
    outer_momentum: float = 0.9
    # {store, count, id, wait_s}: this run is one island of several (jaxpar/diloco/islands.py)
    islands: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class TrainSection:
    steps: int = 100
    batch_size: int = 8       # sequences per step (per replica with DiLoCo)
    seq_len: int = 128
    lr: float = 3e-3
    warmup: int = 0           # 0 = steps // 16
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    b2: float = 0.95
    clip: float = 1.0
    seed: int = 0
    microbatches: int = 1     # gradient accumulation: one optimizer step over k microbatches
    run_dir: str = "runs/default"
    log_every: int = 10
    nonfinite: str = "rollback"  # non-finite loss/grad: rollback, skip or stop (faults.py)
    peak_tflops: float = 0.0  # per device, for MFU; 0 = look up the device kind
    hang_timeout_s: float = 600.0  # no step finished in this long: stacks, exit 4; 0 = off
    startup_timeout_s: float = 1800.0  # the same for restore + compile + the first step
    preempt_grace_s: float = 30.0  # the scheduler's SIGTERM-to-SIGKILL time (warns if short)
    # a jax.profiler trace of some steps: {start: k, steps: n, process: all | i} (profile.py)
    profile: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class ShardingSection:
    # overrides of jaxpar.sharding.DEFAULT_RULES: {logical name: mesh axis | [axes] | null},
    # e.g. {mlp: null, embed: fsdp}; on the command line sharding.rules.mlp=null
    rules: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class DataSection:
    path: str | None = None   # null = the bundled corpus; a text file or folder (bytes), or
    #                           a dataset folder from `python -m jaxpar.data.prepare`
    doc_separator: str = "\n\n"  # documents inside one file (a folder: one per file)
    eval_fraction: float = 0.05
    # why the data's tokens may differ from the model's (a vocabulary extension, a larger
    # model.vocab); "" = such a run is refused (jaxpar.data.manifest.check_tokens)
    tokenizer_mismatch: str = ""


@dataclasses.dataclass(frozen=True)
class CheckpointSection:
    every: int = 0            # 0 = only at the end
    keep: int = 2


@dataclasses.dataclass(frozen=True)
class EvalSection:
    every: int = 50           # 0 = only at the end
    batches: int = 4
    sample_bytes: int = 64    # bytes of text sampled at the end (0 = none)
    prompt: str = "Return the "


@dataclasses.dataclass(frozen=True)
class MetricsSection:
    # Weights & Biases: {project, name, mode: online | offline | disabled, entity, tags}
    wandb: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class Config:
    mesh: MeshSection = MeshSection()
    model: ModelSection = ModelSection()
    attention: AttentionSection = AttentionSection()
    overlap: OverlapSection = OverlapSection()
    diloco: DiLoCoSection = DiLoCoSection()
    sharding: ShardingSection = ShardingSection()
    train: TrainSection = TrainSection()
    data: DataSection = DataSection()
    checkpoint: CheckpointSection = CheckpointSection()
    eval: EvalSection = EvalSection()
    metrics: MetricsSection = MetricsSection()

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def replace(self, **sections) -> "Config":
        """`cfg.replace(train={"steps": 3})`: a copy with some keys of some sections changed."""
        return from_dict(_merge(self.to_dict(), sections))


_SECTION_TYPES = {f.name: f.default.__class__ for f in dataclasses.fields(Config)}


def all_keys() -> list[str]:
    return [f"{s}.{f.name}" for s, t in _SECTION_TYPES.items() for f in dataclasses.fields(t)]


# What a resume may change, for every key (tests/test_train_config.py walks all_keys(): a
# new key must be classified here). jaxpar/train/runfolder.py enforces it.
#   safe: where or how the same math runs (mesh, impls, layouts, gradient accumulation,
#         remat), or reporting and cadence: allowed, printed and recorded in the history;
#         losses continue within fp32 reassociation error
#   math: the steps already taken, or those to come, would differ: refused, naming the key
#   layout: the saved tree's structure differs (checkpoint.check_layout): refused
RESUME_SAFE = (
    "mesh.replica", "mesh.data", "mesh.fsdp", "mesh.seq", "mesh.seq_inner", "mesh.tensor",
    "attention.impl", "attention.ring_impl", "overlap.mode", "overlap.direction",
    "sharding.rules", "model.remat", "train.microbatches", "train.run_dir", "train.log_every",
    "train.nonfinite", "train.peak_tflops", "train.hang_timeout_s", "train.startup_timeout_s",
    "train.preempt_grace_s", "train.profile", "metrics.wandb", "checkpoint.every",
    "checkpoint.keep", "eval.every",
    "eval.batches", "eval.sample_bytes", "eval.prompt", "data.tokenizer_mismatch")
RESUME_LAYOUT = ("model.scan_layers",)
RESUME_MATH = (
    "model.module", "model.layers", "model.embed", "model.heads", "model.kv_heads",
    "model.head_dim", "model.mlp", "model.vocab", "model.rope_base", "model.rope_scaling",
    "model.max_positions", "model.rms_norm_eps", "model.tie_embeddings", "model.dtype",
    "model.init_from", "diloco.enabled", "diloco.sync_every", "diloco.num_fragments",
    "diloco.overlap_steps", "diloco.alpha", "diloco.quantize", "diloco.outer_lr",
    "diloco.outer_momentum", "train.steps", "train.batch_size", "train.seq_len", "train.lr",
    "train.warmup", "train.min_lr_ratio", "train.weight_decay", "train.b2", "train.clip",
    "train.seed", "data.path", "data.doc_separator", "data.eval_fraction", "diloco.islands")


def resume_class(key: str) -> str:
    """'safe', 'layout' or 'math' (a key not listed: 'math', it may change the math)."""
    return ("safe" if key in RESUME_SAFE else "layout" if key in RESUME_LAYOUT else "math")


def _closest(word: str, choices) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.5)
    return f"; did you mean {close[0]!r}?" if close else ""


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


# ------------------------------------------------------------------------- reading


def _read_yaml(path: Path, seen: tuple = ()) -> dict:
    if path.resolve() in seen:
        raise ConfigError(f"base: {path} inherits from itself ({' -> '.join(map(str, seen))})")
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {str(path)!r} is not valid YAML: {str(e).splitlines()[0]}")
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {str(path)!r} must be a mapping of sections")
    base = raw.pop("base", None)
    if base is None:
        return raw
    if not isinstance(base, str):
        raise ConfigError(f"base: in {path} must be a file name, got {base!r}")
    return _merge(_read_yaml(path.parent / base, seen + (path.resolve(),)), raw)


def _dict_keys() -> list[str]:
    """The keys whose value is a mapping (`sharding.rules`): they take `key.sub=value`."""
    return [f"{s}.{f.name}" for s, t in _SECTION_TYPES.items() for f in dataclasses.fields(t)
            if typing.get_type_hints(t)[f.name] is dict]


def parse_override(item: str) -> tuple[str, str, Any]:
    """'model.layers=4' -> ('model', 'layers', 4); the value is read as YAML. A mapping key
    takes one entry: 'sharding.rules.mlp=null' -> ('sharding', 'rules', {'mlp': None})."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like section.key=value, e.g. "
                          f"model.layers=4")
    key, value = item.split("=", 1)
    try:
        parsed = yaml.safe_load(value) if value != "" else ""
    except yaml.YAMLError:
        parsed = value
    parts = key.split(".")
    if len(parts) == 3 and ".".join(parts[:2]) in _dict_keys() and parts[2]:
        return parts[0], parts[1], {parts[2]: parsed}
    if len(parts) != 2:
        raise ConfigError(f"override key {key!r} must be section.key{_closest(key, all_keys())}"
                          f" (keys: {', '.join(all_keys()[:6])}, ...; mappings take "
                          f"section.key.name: {', '.join(_dict_keys())})")
    return parts[0], parts[1], parsed


def _coerce(key: str, value, typ):
    """Check `value` against the dataclass field type; ints are fine for floats."""
    origin = typing.get_origin(typ)
    if origin in (typing.Union, types.UnionType):
        opts = typing.get_args(typ)
        if value is None and type(None) in opts:
            return None
        typ = next(t for t in opts if t is not type(None))
    if typ is bool:
        if isinstance(value, bool):
            return value
    elif typ is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif typ is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-3" as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif typ is dict:
        if isinstance(value, dict):
            return dict(value)
    elif typ is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
    raise ConfigError(f"{key}={value!r} must be {typ.__name__}, got {type(value).__name__}")


def from_dict(raw: dict) -> Config:
    sections = {}
    for name, body in raw.items():
        if name not in _SECTION_TYPES:
            raise ConfigError(f"unknown section {name!r}{_closest(name, _SECTION_TYPES)} "
                              f"(sections: {', '.join(_SECTION_TYPES)})")
        if body is None:
            body = {}
        if not isinstance(body, dict):
            raise ConfigError(f"section {name!r} must be a mapping of keys, got {body!r}")
        if name == "model" and body.get("init_from"):
            body = _init_from({**body, "init_from": _coerce(  # a path before it is opened
                "model.init_from", body["init_from"], str)})
        cls = _SECTION_TYPES[name]
        fields = {f.name: f for f in dataclasses.fields(cls)}
        hints = typing.get_type_hints(cls)
        kw = {}
        for key, value in body.items():
            if key not in fields:
                full = [f"{name}.{k}" for k in fields]
                raise ConfigError(f"unknown key {name}.{key}{_closest(f'{name}.{key}', full)} "
                                  f"(valid keys of {name}: {', '.join(fields)})")
            kw[key] = _coerce(f"{name}.{key}", value, hints[key])
        sections[name] = cls(**kw)
    return Config(**sections)


_HF_NAMES = {"layers": "num_hidden_layers", "embed": "hidden_size",
             "heads": "num_attention_heads", "kv_heads": "num_key_value_heads",
             "head_dim": "hidden_size/num_attention_heads", "mlp": "intermediate_size",
             "vocab": "vocab_size", "rope_base": "rope_theta", "rope_scaling": "rope_scaling",
             "max_positions": "max_position_embeddings", "rms_norm_eps": "rms_norm_eps",
             "tie_embeddings": "tie_word_embeddings"}


# context extension: how positions are encoded may change from the checkpoint's (the weights
# stay valid); every other model key must match it
EXTENSION_KEYS = ("rope_scaling", "rope_base")


def _init_from(body: dict) -> dict:
    """The model section with the keys of `model.init_from`'s config.json filled in; a key
    given explicitly that disagrees with the checkpoint is a ConfigError, except the context
    extension keys (EXTENSION_KEYS), which override it."""
    from jaxpar import hf

    path = body["init_from"]
    try:
        keys = hf.model_keys(hf.read_config(path))
    except (ValueError, OSError) as e:
        raise ConfigError(f"model.init_from={path!r}: {e}") from None
    if body.get("module"):
        raise ConfigError(f"model.init_from={path!r} loads the built-in decoder; it cannot be "
                          f"combined with model.module={body['module']!r}")
    for k, v in keys.items():
        if k in body and body[k] != v and k not in EXTENSION_KEYS:
            raise ConfigError(f"model.{k}={body[k]!r} conflicts with model.init_from={path!r} "
                              f"({_HF_NAMES[k]}={v!r}); drop model.{k} or set it to {v!r}")
    return {**keys, **body}


def load_config(path: str | os.PathLike | None = None, overrides=()) -> Config:
    """Read a YAML config (with `base:`), apply `section.key=value` overrides, check types."""
    raw = _read_yaml(Path(path)) if path is not None else {}
    own = _own_model_keys(Path(path)) if path is not None else set()
    for item in overrides:
        section, name, value = parse_override(item)
        own |= {name} if section == "model" else set()
        raw.setdefault(section, {})
        if not isinstance(raw[section], dict):
            raise ConfigError(f"section {section!r} must be a mapping of keys")
        if isinstance(value, dict) and isinstance(raw[section].get(name), dict):
            value = {**raw[section][name], **value}  # sharding.rules.mlp=null adds one entry
        raw[section] = dict(raw[section], **{name: value})
    if isinstance(raw.get("model"), dict) and raw["model"].get("init_from"):
        # a base file's model keys yield to the checkpoint; the user's own must agree with it
        raw["model"] = {k: v for k, v in raw["model"].items() if k in own or k not in _HF_NAMES}
    return from_dict(raw)


def _own_model_keys(path: Path) -> set[str]:
    """The model keys the file itself sets (not its `base:`)."""
    raw = yaml.safe_load(path.read_text()) or {}  # readable: _read_yaml read it
    return set(raw.get("model") or {}) if isinstance(raw.get("model") or {}, dict) else set()


def dump(cfg: Config) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)


# ------------------------------------------------------------------------- semantics


def head_dim(cfg: Config) -> int:
    return cfg.model.head_dim or cfg.model.embed // cfg.model.heads
