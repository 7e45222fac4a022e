"""Tiny random Hugging Face Llama checkpoints and a numpy float64 Llama forward written from
the HF model's documented semantics (LlamaForCausalLM + modeling_rope_utils): the
independent reference the imported model is checked against."""
from __future__ import annotations

import json
import math
from pathlib import Path

import ml_dtypes
import numpy as np

LLAMA2 = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 32,
          "intermediate_size": 48, "num_hidden_layers": 2, "num_attention_heads": 4,
          "num_key_value_heads": 4, "vocab_size": 61, "max_position_embeddings": 16,
          "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "hidden_act": "silu",
          "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2,
          "torch_dtype": "float32"}
LLAMA3 = dict(LLAMA2, num_key_value_heads=2, rope_theta=500000.0, vocab_size=67,
              rms_norm_eps=1e-6, attention_bias=False, mlp_bias=False, head_dim=8)
SCALINGS = {
    "none": None,
    "linear": {"rope_type": "linear", "factor": 4.0},
    "dynamic": {"type": "dynamic", "factor": 2.0},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "beta_fast": 8.0, "beta_slow": 1.0},
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 8},
}


def shapes(cfg: dict) -> dict[str, tuple[int, ...]]:
    E, F, V = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    H, K = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    D = E // H
    out = {"model.embed_tokens.weight": (V, E), "model.norm.weight": (E,)}
    if not cfg.get("tie_word_embeddings"):
        out["lm_head.weight"] = (V, E)
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        out.update({p + "input_layernorm.weight": (E,), p + "post_attention_layernorm.weight": (E,),
                    p + "self_attn.q_proj.weight": (H * D, E),
                    p + "self_attn.k_proj.weight": (K * D, E),
                    p + "self_attn.v_proj.weight": (K * D, E),
                    p + "self_attn.o_proj.weight": (E, H * D),
                    p + "mlp.gate_proj.weight": (F, E), p + "mlp.up_proj.weight": (F, E),
                    p + "mlp.down_proj.weight": (E, F)})
    return out


def write_checkpoint(folder, cfg: dict, *, seed: int = 0, dtype=np.float32,
                     shards: int = 1) -> dict[str, np.ndarray]:
    """Random weights (norm scales near 1) saved as safetensors (+ index when shards > 1)
    with config.json; returns the weights as float64."""
    from safetensors.numpy import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    weights = {}
    for name, shape in shapes(cfg).items():
        if name.endswith("norm.weight"):
            w = 1.0 + 0.1 * rng.standard_normal(shape)
        else:
            w = rng.standard_normal(shape) * (0.5 if "embed" in name else shape[-1] ** -0.5)
        weights[name] = w.astype(dtype)
    names = list(weights)
    groups = [names[i::shards] for i in range(shards)]
    if shards == 1:
        save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    else:
        weight_map = {}
        for i, group in enumerate(groups):
            fname = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
            save_file({k: weights[k] for k in group}, folder / fname, metadata={"format": "pt"})
            weight_map.update({k: fname for k in group})
        (folder / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {}, "weight_map": weight_map}))
    cfg = dict(cfg, torch_dtype="bfloat16" if dtype == ml_dtypes.bfloat16 else "float32")
    (folder / "config.json").write_text(json.dumps(cfg, indent=1))
    return {k: v.astype(np.float64) for k, v in weights.items()}


def read_tensors(folder) -> dict[str, np.ndarray]:
    """Every tensor of an HF folder's safetensors files, as stored (dtype kept)."""
    from safetensors import safe_open

    out = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(f, framework="numpy") as h:
            out.update({k: h.get_tensor(k) for k in h.keys()})
    return out


# --------------------------------------------------------------------------- RoPE (HF)


def inv_freq(cfg: dict, seq_len: int) -> tuple[np.ndarray, float]:
    """(inverse frequencies [D/2], attention scaling) as transformers computes them for a
    forward over positions up to seq_len - 1."""
    D = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    base = cfg.get("rope_theta", 10000.0)
    s = cfg.get("rope_scaling") or {}
    kind = s.get("rope_type", s.get("type", "default"))
    max_pos = cfg["max_position_embeddings"]
    plain = [1.0 / base ** (2 * i / D) for i in range(D // 2)]
    if kind == "default":
        return np.array(plain), 1.0
    if kind == "linear":
        return np.array(plain) / s["factor"], 1.0
    if kind == "dynamic":
        n = max(seq_len, max_pos)
        grown = base * ((s["factor"] * n / max_pos) - (s["factor"] - 1)) ** (D / (D - 2))
        return np.array([1.0 / grown ** (2 * i / D) for i in range(D // 2)]), 1.0
    if kind == "yarn":
        factor = s["factor"]

        def get_mscale(scale, m=1.0):  # transformers' yarn_get_mscale
            return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0
        att = s.get("attention_factor")
        if att is None:
            m, m_all = s.get("mscale"), s.get("mscale_all_dim")
            att = get_mscale(factor, m) / get_mscale(factor, m_all) if m and m_all \
                else get_mscale(factor)
        orig = s.get("original_max_position_embeddings", max_pos)

        def corr(rot):
            return D * math.log(orig / (rot * 2 * math.pi)) / (2 * math.log(base))
        low, high = corr(s.get("beta_fast") or 32), corr(s.get("beta_slow") or 1)
        if s.get("truncate", True):
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, D - 1)
        if low == high:
            high += 0.001
        out = []
        for i, f in enumerate(plain):
            ramp = min(max((i - low) / (high - low), 0.0), 1.0)
            extrapolation = 1.0 - ramp   # high frequencies keep their value
            out.append(f / factor * (1 - extrapolation) + f * extrapolation)
        return np.array(out), att
    if kind == "llama3":
        factor, lo, hi = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
        old = s["original_max_position_embeddings"]
        out = []
        for f in plain:
            wavelen = 2 * math.pi / f
            if wavelen < old / hi:
                out.append(f)
            elif wavelen > old / lo:
                out.append(f / factor)
            else:
                smooth = (old / wavelen - lo) / (hi - lo)
                out.append((1 - smooth) * f / factor + smooth * f)
        return np.array(out), 1.0
    raise ValueError(kind)


def rotate_half(x):
    x1, x2 = np.split(x, 2, axis=-1)
    return np.concatenate([-x2, x1], axis=-1)


def apply_rope(x_BNHD, positions_BN, inv_F, att):
    freqs_BNF = positions_BN[..., None].astype(np.float64) * inv_F
    emb = np.concatenate([freqs_BNF, freqs_BNF], axis=-1)[:, :, None, :]
    cos, sin = np.cos(emb) * att, np.sin(emb) * att
    return x_BNHD * cos + rotate_half(x_BNHD) * sin


# --------------------------------------------------------------------------- forward


def rms_norm(x, w, eps):
    return w * (x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps))


def forward(w: dict, cfg: dict, tokens_BN: np.ndarray) -> np.ndarray:
    """logits [B, N, V] of LlamaForCausalLM in float64 (positions 0..N-1, causal)."""
    E, H = cfg["hidden_size"], cfg["num_attention_heads"]
    K, D = cfg.get("num_key_value_heads", H), E // H
    eps = cfg.get("rms_norm_eps", 1e-6)
    B, N = tokens_BN.shape
    pos_BN = np.broadcast_to(np.arange(N), (B, N))
    inv_F, att = inv_freq(cfg, N)
    x = w["model.embed_tokens.weight"][tokens_BN]
    causal = np.tril(np.ones((N, N), bool))
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        h = rms_norm(x, w[p + "input_layernorm.weight"], eps)
        q = (h @ w[p + "self_attn.q_proj.weight"].T).reshape(B, N, H, D)
        k = (h @ w[p + "self_attn.k_proj.weight"].T).reshape(B, N, K, D)
        v = (h @ w[p + "self_attn.v_proj.weight"].T).reshape(B, N, K, D)
        q, k = apply_rope(q, pos_BN, inv_F, att), apply_rope(k, pos_BN, inv_F, att)
        k, v = np.repeat(k, H // K, axis=2), np.repeat(v, H // K, axis=2)  # HF repeat_kv
        s = np.einsum("bnhd,bmhd->bhnm", q, k) / math.sqrt(D)
        s = np.where(causal, s, -np.inf)
        p_ = np.exp(s - s.max(-1, keepdims=True))
        p_ /= p_.sum(-1, keepdims=True)
        o = np.einsum("bhnm,bmhd->bnhd", p_, v).reshape(B, N, H * D)
        x = x + o @ w[p + "self_attn.o_proj.weight"].T
        h = rms_norm(x, w[p + "post_attention_layernorm.weight"], eps)
        g = h @ w[p + "mlp.gate_proj.weight"].T
        u = h @ w[p + "mlp.up_proj.weight"].T
        x = x + (g / (1 + np.exp(-g)) * u) @ w[p + "mlp.down_proj.weight"].T
    x = rms_norm(x, w["model.norm.weight"], eps)
    head = w["model.embed_tokens.weight"] if cfg.get("tie_word_embeddings") else w["lm_head.weight"]
    return x @ head.T
