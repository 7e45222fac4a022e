"""Hugging Face Llama-family checkpoints <-> the built-in decoder (no torch).

    apply_fn, params = jaxpar.hf.load("path/to/hf_folder", mesh)   # mesh optional
    logits_BNV = apply_fn(params, tokens_BN, positions_BN, segment_ids_BN)
    jaxpar.hf.save(params, tcfg, "out_folder", base_config=hf_config)

An HF folder is `config.json` plus `model.safetensors` or shards listed in
`model.safetensors.index.json`. The mapping (HF `[out, in]` weights are our `[in, out]`
kernels, transposed; RoPE is rotate-half on both sides, so q/k need no permutation):

    model.embed_tokens.weight [V, E]                  embed/embedding [V', E]
    model.layers.{i}.input_layernorm.weight           layers_{i}/attn_norm/scale
    model.layers.{i}.self_attn.{q,k,v,o}_proj.weight  layers_{i}/{q,k,v,o}/kernel (T)
    model.layers.{i}.post_attention_layernorm.weight  layers_{i}/mlp_norm/scale
    model.layers.{i}.mlp.{gate,up,down}_proj.weight   layers_{i}/{gate,up,down}/kernel (T)
    model.norm.weight                                 final_norm/scale
    lm_head.weight [V, E] (absent when tied)          lm_head/kernel [E, V'] (T)

V' >= V is the vocab padded to a multiple of the tensor axis (zero rows, masked logits,
dropped on export). On a mesh every device reads only its own slice of each tensor
(`safe_open(...).get_slice` inside `jax.make_array_from_callback`): no full copy of a
sharded param is ever built on one device or host buffer. Weights may be bf16 or fp32;
params are fp32. Anything in config.json the decoder cannot reproduce is a ValueError
naming the key.
"""
from __future__ import annotations

import contextlib
import json
import math
import re
from pathlib import Path
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from jax.sharding import AxisType, Mesh

from jaxpar import sharding
from jaxpar.models import rope as rope_lib
from jaxpar.models.blocks import SCAN_NAME as SCAN
from jaxpar.models.transformer import Parallel, Transformer, TransformerConfig

ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM")
DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16}
# keys whose only value we can honour (HF's default); anything else is refused by name
_MUST_BE = {"attention_bias": False, "mlp_bias": False, "hidden_act": "silu",
            "sliding_window": None, "partial_rotary_factor": 1.0, "pretraining_tp": 1,
            "use_sliding_window": False, "attention_dropout": 0.0}
_MOE_KEYS = ("num_local_experts", "num_experts", "num_experts_per_tok", "n_routed_experts",
             "moe_intermediate_size", "router_aux_loss_coef")
_LAYER = {"input_layernorm": ("attn_norm", "scale"),
          "post_attention_layernorm": ("mlp_norm", "scale"),
          **{f"self_attn.{p}_proj": (p, "kernel") for p in "qkvo"},
          **{f"mlp.{p}_proj": (p, "kernel") for p in ("gate", "up", "down")}}


# ------------------------------------------------------------------------- config.json


def read_config(path) -> dict:
    f = Path(path) / "config.json"
    if not f.is_file():
        raise ValueError(f"{path}: no config.json (an HF model folder has config.json and "
                         f"*.safetensors)")
    try:
        return json.loads(f.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{f} is not valid JSON ({e}); download or copy it again") from None


def rope_of(hf: dict) -> tuple[dict | None, float]:
    """(rope_scaling or None, rope_theta) of a config.json: transformers < 5 writes
    `rope_theta` + `rope_scaling`; transformers 5 writes one `rope_parameters` dict holding
    rope_theta and rope_type ("default" = no scaling)."""
    if isinstance(hf.get("rope_parameters"), dict):
        params = dict(hf["rope_parameters"])
        theta = float(params.pop("rope_theta", hf.get("rope_theta", 10_000.0)))
        if params.get("partial_rotary_factor", 1.0) != 1.0:
            raise ValueError(f"config.json: rope_parameters.partial_rotary_factor="
                             f"{params['partial_rotary_factor']!r} is not supported (only 1.0)")
        params.pop("partial_rotary_factor", None)
        if params.get("rope_type", params.get("type", "default")) == "default":
            return None, theta
        return {k: v for k, v in params.items() if v is not None}, theta
    return hf.get("rope_scaling") or None, float(hf.get("rope_theta", 10_000.0))


def model_keys(hf: dict) -> dict:
    """The jaxpar `model.*` keys of an HF Llama config; ValueError naming the first key the
    built-in decoder cannot honour."""
    arch = hf.get("architectures") or ["LlamaForCausalLM"]
    if hf.get("model_type", "llama") not in ("llama", "mistral") or arch[0] not in ARCHITECTURES:
        raise ValueError(f"config.json: model_type={hf.get('model_type')!r} architectures="
                         f"{arch} is not supported; supported: {list(ARCHITECTURES)}")
    for key, ok in _MUST_BE.items():
        if key in hf and hf[key] != ok and not (key == "pretraining_tp" and hf[key] is None):
            raise ValueError(f"config.json: {key}={hf[key]!r} is not supported (only {ok!r})")
    for key in _MOE_KEYS:
        if hf.get(key):
            raise ValueError(f"config.json: {key}={hf[key]!r}: mixture-of-experts models are "
                             f"not supported")
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                "vocab_size"):
        if not isinstance(hf.get(key), int):
            raise ValueError(f"config.json: {key} must be an integer, got {hf.get(key)!r}")
    heads, embed = hf["num_attention_heads"], hf["hidden_size"]
    head_dim = embed // heads
    if embed % heads or hf.get("head_dim", head_dim) not in (head_dim, None):
        raise ValueError(f"config.json: head_dim={hf.get('head_dim')!r} must equal hidden_size/"
                         f"num_attention_heads={embed}/{heads}")
    max_positions = hf.get("max_position_embeddings", 2048)
    scaling, theta = rope_of(hf)
    rope_lib.check(scaling, max_positions, "config.json: rope_scaling")
    return {"layers": hf["num_hidden_layers"], "embed": embed, "heads": heads,
            "kv_heads": hf.get("num_key_value_heads") or heads, "head_dim": head_dim,
            "mlp": hf["intermediate_size"], "vocab": hf["vocab_size"],
            "rope_base": theta, "rope_scaling": scaling,
            "max_positions": max_positions, "rms_norm_eps": float(hf.get("rms_norm_eps", 1e-6)),
            "tie_embeddings": bool(hf.get("tie_word_embeddings", False))}


def transformer_config(keys: dict, *, dtype: str = "float32",
                       padded_vocab: int = 0) -> TransformerConfig:
    """The decoder config of `model_keys(...)`."""
    return TransformerConfig(
        vocab=keys["vocab"], layers=keys["layers"], embed=keys["embed"], heads=keys["heads"],
        kv_heads=keys["kv_heads"], head_dim=keys["head_dim"], mlp=keys["mlp"],
        rope_base=keys["rope_base"], norm_eps=keys["rms_norm_eps"], dtype=dtype,
        rope_scaling=tuple(sorted((keys["rope_scaling"] or {}).items())),
        max_positions=keys["max_positions"], tie_embeddings=keys["tie_embeddings"],
        padded_vocab=padded_vocab)


def hf_config(c: TransformerConfig, base: dict | None = None, dtype: str = "float32") -> dict:
    """config.json for the decoder `c`: `base` (the imported model's config) with the
    architecture keys replaced, so token ids and other keys survive a round trip."""
    out = dict(base or {"architectures": ["LlamaForCausalLM"], "model_type": "llama"})
    out.update({
        "hidden_size": c.embed, "intermediate_size": c.mlp, "num_hidden_layers": c.layers,
        "num_attention_heads": c.heads, "num_key_value_heads": c.kv_heads,
        "head_dim": c.head_dim, "vocab_size": c.vocab, "rms_norm_eps": c.norm_eps,
        "rope_theta": c.rope_base, "rope_scaling": dict(c.rope_scaling) or None,
        "max_position_embeddings": c.max_positions, "tie_word_embeddings": c.tie_embeddings,
        "hidden_act": "silu", "attention_bias": False, "mlp_bias": False,
        "torch_dtype": dtype})
    return out


# ------------------------------------------------------------------------- names


def _path(path) -> tuple[str, ...]:
    return tuple(sharding._path(path).split("/"))


def hf_name(path: tuple[str, ...]) -> str:
    """The HF tensor name of one of our params (path as strings)."""
    top = {("embed", "embedding"): "model.embed_tokens.weight",
           ("final_norm", "scale"): "model.norm.weight",
           ("lm_head", "kernel"): "lm_head.weight"}
    if path in top:
        return top[path]
    m = re.fullmatch(r"layers_(\d+)", path[0])
    inverse = {v: k for k, v in _LAYER.items()}
    if m and tuple(path[1:]) in inverse:
        return f"model.layers.{m.group(1)}.{inverse[tuple(path[1:])]}.weight"
    raise ValueError(f"param {'/'.join(path)} has no Hugging Face name")


# ------------------------------------------------------------------------- reading


def _open(path: Path):
    """safe_open, with a damaged or missing file as one ValueError naming it (safetensors
    reads the header and checks the file covers it: a truncated download fails here)."""
    from safetensors import SafetensorError, safe_open

    try:
        return safe_open(path, framework="numpy")
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{path}: not a readable safetensors file ({str(e).splitlines()[0]}); "
                         f"download or copy it again") from None


class _Reader:
    """Open safetensors files of an HF folder: tensor name -> slices, read lazily."""

    def __init__(self, folder: Path, stack: contextlib.ExitStack):
        index = folder / "model.safetensors.index.json"
        if index.is_file():
            try:
                files = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise ValueError(f"{index}: not valid JSON with a 'weight_map'") from None
        else:
            single = sorted(folder.glob("*.safetensors"))
            if not single:
                raise ValueError(f"{folder}: no *.safetensors files (and no "
                                 f"model.safetensors.index.json)")
            files = {}
            for f in single:
                with _open(f) as h:
                    files.update({k: f.name for k in h.keys()})
        self.handles = {name: stack.enter_context(_open(folder / name))
                        for name in sorted(set(files.values()))}
        self.where, self.folder = files, folder

    def has(self, name: str) -> bool:
        return name in self.where

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._slice(name).get_shape())

    def _slice(self, name: str):
        if name not in self.where:
            raise ValueError(f"{self.folder}: tensor {name!r} is missing from the safetensors "
                             f"files (config.json implies it)")
        return self.handles[self.where[name]].get_slice(name)

    def read(self, name: str, index: tuple[slice, ...]) -> np.ndarray:
        return self._slice(name)[index]


def expected_shapes(keys: dict) -> dict[str, tuple[int, ...]]:
    """{HF tensor name: HF shape} that `model_keys(...)` implies."""
    E, F, V, D = keys["embed"], keys["mlp"], keys["vocab"], keys["head_dim"]
    H, K = keys["heads"], keys["kv_heads"]
    out = {"model.embed_tokens.weight": (V, E), "model.norm.weight": (E,)}
    if not keys["tie_embeddings"]:
        out["lm_head.weight"] = (V, E)
    per_layer = {"input_layernorm": (E,), "post_attention_layernorm": (E,),
                 "self_attn.q_proj": (H * D, E), "self_attn.k_proj": (K * D, E),
                 "self_attn.v_proj": (K * D, E), "self_attn.o_proj": (E, H * D),
                 "mlp.gate_proj": (F, E), "mlp.up_proj": (F, E), "mlp.down_proj": (E, F)}
    for i in range(keys["layers"]):
        out.update({f"model.layers.{i}.{k}.weight": v for k, v in per_layer.items()})
    return out


def check_weights(folder) -> None:
    """Every tensor config.json implies is in the folder's safetensors files with its shape;
    ValueError (one line) naming the file or tensor. Reads headers only."""
    folder = Path(folder)
    keys = model_keys(read_config(folder))
    with contextlib.ExitStack() as stack:
        reader = _Reader(folder, stack)
        for name, shape in expected_shapes(keys).items():
            if not reader.has(name):
                raise ValueError(f"{folder}: tensor {name!r} is missing from the safetensors "
                                 f"files (config.json implies it)")
            got = reader.shape(name)
            if got != shape:
                raise ValueError(f"{folder / reader.where[name]}: tensor {name!r} has shape "
                                 f"{list(got)}, config.json implies {list(shape)}")


def _clip(s: slice, n: int) -> tuple[int, int]:
    start, stop, _ = s.indices(n)
    return start, stop


def _reader_fn(reader: _Reader, name: str, shape: tuple[int, ...], transposed: bool):
    """index (slices of our param) -> that block, read from HF tensor `name`; rows/cols past
    the HF vocab (padding) are zeros."""
    hf_shape = reader.shape(name)
    ours = hf_shape[::-1] if transposed else hf_shape
    for d, (a, b) in enumerate(zip(ours, shape)):
        if a != b and not (a < b and "vocab" in _vocab_dims(name, transposed, d)):
            raise ValueError(f"tensor {name!r} has shape {hf_shape}, expected "
                             f"{shape[::-1] if transposed else shape} from config.json")

    def read(index):
        index = tuple(index) + (slice(None),) * (len(shape) - len(index))
        bounds = [_clip(s, n) for s, n in zip(index, shape)]
        inside = tuple(slice(a, min(b, h)) for (a, b), h in zip(bounds, ours))
        src = tuple(reversed(inside)) if transposed else inside
        block = np.asarray(reader.read(name, src))
        block = block.T if transposed else block
        want = tuple(b - a for a, b in bounds)
        if block.shape != want:  # padding rows/cols of the vocab
            block = np.pad(block, [(0, w - g) for w, g in zip(want, block.shape)])
        return block.astype(np.float32)
    return read


def _vocab_dims(name: str, transposed: bool, d: int) -> str:
    if name == "model.embed_tokens.weight" and d == 0:
        return "vocab"
    if name == "lm_head.weight" and transposed and d == 1:
        return "vocab"
    return ""


def _param_reader(reader: _Reader, p: tuple[str, ...], shape: tuple[int, ...]):
    """index -> block of our param `p`; a scanned decoder's stacked `layers/block/...` param
    (leading layer axis) reads each layer's tensor."""
    transposed = p[-1] == "kernel"
    if p[:2] != (SCAN, "block"):
        return _reader_fn(reader, hf_name(p), shape, transposed)
    per_layer = [_reader_fn(reader, hf_name((f"layers_{i}",) + p[2:]), shape[1:], transposed)
                 for i in range(shape[0])]

    def read(index):
        first, rest = index[0], tuple(index[1:])
        return np.stack([per_layer[i](rest) for i in range(*first.indices(shape[0]))])
    return read


def read_params(folder, abstract, shardings=None):
    """Params shaped like `abstract` (a tree of ShapeDtypeStructs of the decoder's params)
    read from the HF folder; placed by `shardings` (each device reads its slices) or, without
    shardings, as host-read arrays on the default device."""
    folder = Path(folder)
    flat, treedef = jax.tree_util.tree_flatten_with_path(abstract)
    shard_leaves = (jax.tree.leaves(shardings, is_leaf=lambda x: isinstance(x, jax.sharding
                                                                              .Sharding))
                    if shardings is not None else [None] * len(flat))
    out = []
    with contextlib.ExitStack() as stack:
        reader = _Reader(folder, stack)
        for (path, leaf), sh in zip(flat, shard_leaves, strict=True):
            p = _path(path)
            fn = _param_reader(reader, p, tuple(leaf.shape))
            if sh is None:
                out.append(jnp.asarray(fn(tuple(slice(None) for _ in leaf.shape))))
            else:
                out.append(jax.make_array_from_callback(tuple(leaf.shape), sh, fn))
    return jax.tree_util.tree_unflatten(treedef, out)


def _shapes(boxed):
    """The ShapeDtypeStructs inside boxed (logically partitioned) abstract params."""
    part = lambda x: isinstance(x, nn.Partitioned)
    return jax.tree.map(lambda x: x.value if part(x) else x, boxed, is_leaf=part)


def loader(folder) -> Callable:
    """A drop-in for `jaxpar.sharding.init_sharded` that reads the params from an HF folder
    instead of initializing them: (params, mesh specs, logical specs)."""
    def init(init_fn, mesh: Mesh, table: sharding.Rules, *args):
        abstract = jax.eval_shape(init_fn, *args)
        logical = sharding.logical_axes(abstract)
        specs = sharding.mesh_specs(logical, table)
        params = read_params(folder, _shapes(abstract), sharding.named(specs, mesh))
        return params, specs, logical
    return init


# ------------------------------------------------------------------------- load


def _auto_mesh(mesh: Mesh) -> Mesh:
    """The same devices and axis names with Auto axes (the decoder's logical constraints
    and shard_map run under Auto; works for Explicit meshes from jax.make_mesh too)."""
    return Mesh(mesh.devices, mesh.axis_names, axis_types=(AxisType.Auto,) * mesh.devices.ndim)


def _mesh_rules(mesh: Mesh, rules: sharding.Rules) -> sharding.Rules:
    """The rules restricted to axes the mesh has (a plain jax.make_mesh((2, 4), ('data',
    'tensor')) has no replica/seq axes: those names are then replicated)."""
    out = []
    for k, v in rules:
        axes = tuple(a for a in sharding.mesh_axes(k, rules) if a in mesh.axis_names)
        out.append((k, axes[0] if len(axes) == 1 else (axes or None)))
    return tuple(out)


def load(path, mesh: Mesh | None = None, *, attention: str | None = None,
         ring_impl: str = "ring", rules: sharding.Rules | None = None,
         dtype: str = "float32") -> tuple[Callable, Any]:
    """(apply_fn, params) of the HF model in folder `path`.

    `apply_fn(params, tokens_BN, positions_BN, segment_ids_BN) -> logits_BNV` (fp32, the
    model's own vocab V). On `mesh`, params are placed by `rules` (default
    `jaxpar.sharding.DEFAULT_RULES`: heads/mlp/vocab on `tensor`, batch on `data`, tokens on
    `seq`); `attention` picks the impl (`dense` without sequence sharding, else default
    `ring`: then tokens, positions and segment ids come in the zigzag order, see
    `jaxpar.data.pack`). `dtype` is the compute dtype; params are fp32.
    """
    keys = model_keys(read_config(path))
    if mesh is None:
        c = transformer_config(keys, dtype=dtype)
        module = Transformer(c)
        dummy = jnp.zeros((1, 8), jnp.int32)
        abstract = jax.eval_shape(module.init, jax.random.key(0), dummy, dummy, dummy)
        params = read_params(path, _shapes(abstract)["params"])

        def apply(params, tokens_BN, positions_BN=None, segment_ids_BN=None):
            return _apply(module, params, tokens_BN, positions_BN, segment_ids_BN)
        return jax.jit(apply), params

    mesh = _auto_mesh(mesh)
    rules = _mesh_rules(mesh, rules or sharding.DEFAULT_RULES)
    seq = math.prod(mesh.shape[a] for a in sharding.mesh_axes("length", rules))
    attention = attention or ("dense" if seq == 1 else "ring")
    tensor = math.prod(mesh.shape[a] for a in sharding.mesh_axes("vocab", rules))
    for key in ("heads", "kv_heads", "mlp"):
        if keys[key] % tensor and not (key == "kv_heads" and tensor % keys[key] == 0):
            raise ValueError(f"{path}: {key}={keys[key]} is not divisible by the mesh's tensor "
                             f"axes (size {tensor}); use a mesh whose tensor size divides it"
                             + (" (or a multiple of it: kv heads are then replicated)"
                                if key == "kv_heads" else ""))
    c = transformer_config(keys, dtype=dtype, padded_vocab=-(-keys["vocab"] // tensor) * tensor)
    par = Parallel(mesh=mesh, rules=rules, attention=attention, ring_impl=ring_impl)
    module = Transformer(c, parallel=par)
    batch = math.prod(mesh.shape[a] for a in sharding.mesh_axes("batch", rules))
    dummy = jnp.zeros((batch, 2 * seq * tensor), jnp.int32)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        init = lambda *a: module.init(*a)["params"]
        params, _, _ = loader(path)(init, mesh, rules, jax.random.key(0), dummy, dummy, dummy)

    @jax.jit
    def apply_jit(params, tokens_BN, positions_BN, segment_ids_BN):
        return _apply(module, params, tokens_BN, positions_BN, segment_ids_BN)

    def apply(params, tokens_BN, positions_BN=None, segment_ids_BN=None):
        if positions_BN is None:
            positions_BN = jnp.broadcast_to(jnp.arange(tokens_BN.shape[1]), tokens_BN.shape)
        if segment_ids_BN is None:
            segment_ids_BN = jnp.zeros(tokens_BN.shape, jnp.int32)
        B, N = tokens_BN.shape
        unit = (2 * seq if attention != "dense" else seq) * tensor  # zigzag: 2 chunks each
        if B % batch or N % unit:
            raise ValueError(f"tokens_BN {tokens_BN.shape}: the batch must be divisible by the "
                             f"mesh's batch axes ({batch}) and the length by {unit} (sequence "
                             f"and tensor axes)")
        with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
            return apply_jit(params, tokens_BN, positions_BN, segment_ids_BN)
    return apply, params


def _apply(module: Transformer, params, tokens_BN, positions_BN, segment_ids_BN):
    logits_BNV = module.apply({"params": params}, tokens_BN, positions_BN, segment_ids_BN)
    return logits_BNV[..., :module.cfg.vocab]


# ------------------------------------------------------------------------- writing


def hf_tensors(params, c: TransformerConfig, dtype: str = "float32") -> dict[str, np.ndarray]:
    """{HF name: numpy array} of the decoder's params (gathered to the host; vocab padding
    dropped; kernels transposed back to [out, in])."""
    out = {}
    for path, x in jax.tree_util.tree_flatten_with_path(params)[0]:
        p, a = _path(path), np.asarray(jax.device_get(x))
        if p[:2] == (SCAN, "block"):  # a scanned decoder: one tensor per layer
            out.update(_hf_tensor((f"layers_{i}",) + p[2:], a[i], c, dtype)
                       for i in range(a.shape[0]))
        else:
            out.update([_hf_tensor(p, a, c, dtype)])
    return out


def _hf_tensor(p: tuple[str, ...], a: np.ndarray, c: TransformerConfig, dtype: str):
    """(HF name, array) of one unstacked param: [in, out] kernels transposed back to
    [out, in], vocab padding rows dropped."""
    name = hf_name(p)
    a = a.T if p[-1] == "kernel" else a
    if name in ("model.embed_tokens.weight", "lm_head.weight"):
        a = a[:c.vocab]
    return name, np.ascontiguousarray(a.astype(DTYPES[dtype]))


def save(params, c: TransformerConfig, out, *, base_config: dict | None = None,
         dtype: str = "float32", max_shard_bytes: int = 5 * 2 ** 30) -> Path:
    """Write config.json and model.safetensors (or shards + model.safetensors.index.json
    beyond `max_shard_bytes`) that transformers loads as LlamaForCausalLM."""
    from safetensors.numpy import save_file

    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r} is not supported; choose one of {list(DTYPES)}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tensors = hf_tensors(params, c, dtype)
    shards: list[dict] = [{}]
    size = 0
    for name, a in tensors.items():
        if shards[-1] and size + a.nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = a
        size += a.nbytes
    meta = {"format": "pt"}  # transformers' loader expects this metadata
    if len(shards) == 1:
        save_file(shards[0], out / "model.safetensors", metadata=meta)
    else:
        weight_map = {}
        for i, shard in enumerate(shards):
            fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, out / fname, metadata=meta)
            weight_map.update({k: fname for k in shard})
        index = {"metadata": {"total_size": sum(a.nbytes for a in tensors.values())},
                 "weight_map": weight_map}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    (out / "config.json").write_text(json.dumps(hf_config(c, base_config, dtype), indent=2)
                                     + "\n")
    return out
