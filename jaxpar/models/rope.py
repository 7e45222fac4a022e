"""Rotary position embedding with Hugging Face's `rope_scaling` types, for context extension.

The rotation is rotate-half (pairs are dims i and i + D/2), the layout of HF Llama
checkpoints, so their q/k weights load unpermuted. `scaling` is HF's `rope_scaling` dict
(`rope_type`, or the older `type`, plus that type's keys); the inverse frequencies follow
`transformers`' `modeling_rope_utils.ROPE_INIT_FUNCTIONS`:

  linear   position interpolation: inv_freq / factor
  dynamic  NTK-aware: base · (factor·n/max_positions − (factor−1))^(D/(D−2)) once the
           sequence n = max(position)+1 outgrows max_positions (per call, from the positions)
  yarn     NTK-by-parts: interpolated below a ramp between the beta_fast/beta_slow
           rotation counts, extrapolated above; cos/sin scaled by the attention factor
           (0.1·mscale·ln(factor)+1 unless given)
  llama3   Llama-3.1: wavelengths above original/low_freq_factor divided by factor, below
           original/high_freq_factor kept, smooth in between

Frequencies of the static types are computed once in float64 (numpy) and used in fp32.
"""
from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

# type -> (required keys, optional keys), besides rope_type/type
KEYS = {
    "default": ((), ()),
    "linear": (("factor",), ()),
    "dynamic": (("factor",), ()),
    "yarn": (("factor",), ("attention_factor", "beta_fast", "beta_slow", "mscale",
                           "mscale_all_dim", "original_max_position_embeddings", "truncate")),
    "llama3": (("factor", "low_freq_factor", "high_freq_factor",
                "original_max_position_embeddings"), ()),
}
TYPES = tuple(KEYS)


def kind(scaling) -> str:
    s = dict(scaling or {})
    return s.get("rope_type", s.get("type", "default"))


def check(scaling, max_positions: int, where: str = "rope_scaling") -> None:
    """ValueError naming the key when `scaling` is not a type/key set we implement."""
    s = dict(scaling or {})
    if not s:
        return
    t = kind(s)
    if t not in KEYS:
        raise ValueError(f"{where}.rope_type={t!r} is not supported; choose one of {list(TYPES)}")
    required, optional = KEYS[t]
    for k in required:
        if s.get(k) is None:
            raise ValueError(f"{where}.{k} is required for rope_type={t!r}")
    extra = set(s) - {"rope_type", "type"} - set(required) - set(optional)
    if extra:
        raise ValueError(f"{where}.{sorted(extra)[0]} is not a key of rope_type={t!r}; its keys: "
                         f"{list(required + optional)}")
    if "factor" in s and not s["factor"] >= 1:
        raise ValueError(f"{where}.factor={s['factor']} must be >= 1")
    needs_max = t == "dynamic" or (t == "yarn" and "original_max_position_embeddings" not in s)
    if needs_max and max_positions < 1:
        raise ValueError(f"{where}: rope_type={t!r} needs max_position_embeddings (the "
                         f"pretrained context length)")
    if (t == "yarn" and "original_max_position_embeddings" in s
            and s["original_max_position_embeddings"] != max_positions):
        # transformers versions differ on which wins when these disagree; refuse the ambiguity
        # (equal to max_positions is what transformers 5 fills in itself: factor as given)
        ratio = max_positions / s["original_max_position_embeddings"] if max_positions else None
        if ratio is None or not math.isclose(ratio, s["factor"]):
            raise ValueError(f"{where}.factor={s['factor']} must equal max_position_embeddings/"
                             f"original_max_position_embeddings={max_positions}/"
                             f"{s['original_max_position_embeddings']} for rope_type='yarn'")
    if t == "llama3" and not s["high_freq_factor"] > s["low_freq_factor"]:
        raise ValueError(f"{where}.high_freq_factor={s['high_freq_factor']} must be > "
                         f"low_freq_factor={s['low_freq_factor']}")


def _default(D: int, base: float) -> np.ndarray:
    return 1.0 / base ** (np.arange(0, D, 2, dtype=np.float64) / D)


def _yarn(D: int, base: float, s: dict, max_positions: int) -> tuple[np.ndarray, float]:
    factor = s["factor"]
    original = s.get("original_max_position_embeddings") or max_positions

    def mscale(scale, m=1.0):
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    att = s.get("attention_factor")
    if att is None:
        m, m_all = s.get("mscale"), s.get("mscale_all_dim")
        att = mscale(factor, m) / mscale(factor, m_all) if m and m_all else mscale(factor)

    def dim_of(rotations):  # the dim whose wavelength fits `rotations` times in `original`
        return D * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = dim_of(s.get("beta_fast") or 32), dim_of(s.get("beta_slow") or 1)
    if s.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, D - 1)
    if low == high:
        high += 0.001
    ramp_F = np.clip((np.arange(D // 2, dtype=np.float64) - low) / (high - low), 0, 1)
    inv_F = _default(D, base)
    extrapolate_F = 1 - ramp_F
    return inv_F / factor * ramp_F + inv_F * extrapolate_F, float(att)


def _llama3(D: int, base: float, s: dict) -> np.ndarray:
    inv_F = _default(D, base)
    factor, lo, hi = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
    original = s["original_max_position_embeddings"]
    wavelen_F = 2 * math.pi / inv_F
    out_F = np.where(wavelen_F > original / lo, inv_F / factor, inv_F)
    smooth_F = (original / wavelen_F - lo) / (hi - lo)
    smoothed_F = (1 - smooth_F) * out_F / factor + smooth_F * out_F
    medium_F = (wavelen_F >= original / hi) & (wavelen_F <= original / lo)
    return np.where(medium_F, smoothed_F, out_F)


def frequencies(D: int, base: float, scaling, max_positions: int = 0):
    """(inverse frequencies [D/2] float64, cos/sin scale) of a static rope type."""
    s = dict(scaling or {})
    t = kind(s)
    if t == "default":
        return _default(D, base), 1.0
    if t == "linear":
        return _default(D, base) / s["factor"], 1.0
    if t == "yarn":
        return _yarn(D, base, s, max_positions)
    if t == "llama3":
        return _llama3(D, base, s), 1.0
    raise ValueError(f"rope_type={t!r} has no static frequencies")


def rope(x_BNHD, positions_BN, base, scaling=(), max_positions: int = 0):
    """Rotary position embedding on the last axis (pairs are the two halves)."""
    D = x_BNHD.shape[-1]
    t = kind(scaling)
    scale = 1.0
    if t == "default":  # the original fp32 formula: unscaled runs keep their exact numbers
        freq_F = base ** (-jnp.arange(0, D, 2, dtype=jnp.float32) / D)
    elif t == "dynamic":
        s = dict(scaling)
        n = (jnp.max(positions_BN) + 1).astype(jnp.float32)
        n = jnp.maximum(n, max_positions)
        grown = base * ((s["factor"] * n / max_positions) - (s["factor"] - 1)) ** (D / (D - 2))
        freq_F = grown ** (-jnp.arange(0, D, 2, dtype=jnp.float32) / D)
    else:
        inv_F, scale = frequencies(D, base, scaling, max_positions)
        freq_F = jnp.asarray(inv_F, jnp.float32)
    angle_BNF = positions_BN[..., None].astype(jnp.float32) * freq_F
    cos, sin = jnp.cos(angle_BNF)[:, :, None, :], jnp.sin(angle_BNF)[:, :, None, :]
    if scale != 1.0:
        cos, sin = cos * scale, sin * scale
    x1, x2 = jnp.split(x_BNHD.astype(jnp.float32), 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x1 * sin + x2 * cos], axis=-1).astype(x_BNHD.dtype)
