"""Low-bit wire formats for DiLoCo outer gradients: bf16, int8, fp4 (E2M1 and E3M0).

Every format works on blocks: `x_NB` is fp32 [num_blocks, BLOCK]. int8 and both fp4 formats
carry one fp32 absmax scale per block (so one outlier only coarsens its own block); bf16 is a
plain cast. fp4 codes are packed two per byte, so the array that crosses the wire really is
4 bits per value (plus 32/BLOCK bits of scale).

  fp4_e2m1  OCP/MX FP4 via ml_dtypes `float4_e2m1fn`: values ±{0, .5, 1, 1.5, 2, 3, 4, 6}·scale
            with scale = absmax/6; round to nearest even (the ml_dtypes cast).
  fp4_e3m0  sign + 3-bit exponent, no mantissa (no ml_dtypes type exists, so it is ours):
            field 0 is zero, field k in 1..7 is 2^(k-7)·scale with scale = absmax; rounding
            to the nearest value in linear space. Relative error ≤ 1/3 inside [2^-7, 1]·scale.
  int8      symmetric, scale = absmax/127, round to nearest.

Error bounds (checked by tests), per element, `a` = block absmax:
  bf16  |e| ≤ 2^-8·|x|        int8  |e| ≤ a/254
  e2m1  |e| ≤ max(a/24, |x|/4) e3m0 |e| ≤ max(a/128, |x|/3)
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import ml_dtypes
from jax import lax

FORMATS = ("none", "bf16", "int8", "fp4_e3m0", "fp4_e2m1")
BLOCK = 256  # values per scale; 32/256 = 0.125 extra bits per value for the scales

# bits per value on the wire, without the per-block scale
VALUE_BITS = {"none": 32, "bf16": 16, "int8": 8, "fp4_e3m0": 4, "fp4_e2m1": 4}
HAS_SCALE = {"none": False, "bf16": False, "int8": True, "fp4_e3m0": True, "fp4_e2m1": True}

_E2M1_MAX = float(ml_dtypes.finfo(ml_dtypes.float4_e2m1fn).max)  # 6.0
_E3M0_MIN_EXP = -6  # field 1 is 2^-6, field 7 is 2^0


class Wire(NamedTuple):
    """What one replica sends: `payload` [num_blocks, ...] and an fp32 scale per block."""
    payload: jax.Array
    scale_N: jax.Array | None


def check_format(fmt: str) -> None:
    if fmt not in FORMATS:
        raise ValueError(f"quantize={fmt!r} is not a wire format; use one of {FORMATS}")


def wire_bytes(num_values: int, fmt: str) -> int:
    """Bytes one replica's payload occupies for `num_values` values (padded to whole blocks)."""
    check_format(fmt)
    nblocks = -(-num_values // BLOCK)
    n = nblocks * BLOCK
    scale = 4 * nblocks if HAS_SCALE[fmt] else 0
    return n * VALUE_BITS[fmt] // 8 + scale


def _absmax_scale(x_NB, top: float):
    amax_N = jnp.max(jnp.abs(x_NB), axis=-1)
    # an all-zero block gets scale 1 so nothing divides by zero; its codes are all zero anyway
    return jnp.where(amax_N > 0, amax_N / top, 1.0).astype(jnp.float32)


def _pack4(code_NB):
    """uint8 codes in [0, 16) -> two per byte."""
    return (code_NB[:, 0::2] | (code_NB[:, 1::2] << 4)).astype(jnp.uint8)


def _unpack4(packed_NW):
    lo, hi = packed_NW & 0xF, packed_NW >> 4
    return jnp.stack([lo, hi], axis=-1).reshape(packed_NW.shape[0], -1)


def _e3m0_encode(y_NB):
    """y in [-1, 1] -> 4-bit codes: bit 3 sign, bits 0..2 exponent field (0 = zero)."""
    r = jnp.abs(y_NB)
    e = jnp.floor(jnp.log2(jnp.maximum(r, 2.0**-30)))
    # nearest in linear space: between 2^e and 2^(e+1) the midpoint is 1.5·2^e
    e = e + (r >= 1.5 * jnp.exp2(e)).astype(e.dtype)
    field = jnp.clip(e - _E3M0_MIN_EXP + 1, 1, 7)
    # below 2^-7 (half of the smallest non-zero 2^-6) the nearest value is zero
    field = jnp.where(r < 2.0 ** (_E3M0_MIN_EXP - 1), 0, field).astype(jnp.uint8)
    return field | (jnp.signbit(y_NB).astype(jnp.uint8) << 3)


def _e3m0_decode(code_NB):
    field = (code_NB & 0x7).astype(jnp.float32)
    mag = jnp.where(field == 0, 0.0, jnp.exp2(field + (_E3M0_MIN_EXP - 1)))
    return jnp.where((code_NB >> 3) == 1, -mag, mag)


def quantize(x_NB: jax.Array, fmt: str) -> Wire:
    """fp32 [num_blocks, BLOCK] -> the wire representation of `fmt`."""
    check_format(fmt)
    x_NB = x_NB.astype(jnp.float32)
    if fmt == "none":
        return Wire(x_NB, None)
    if fmt == "bf16":
        # sent as raw uint16 bits: otherwise XLA hoists the bf16→fp32 convert of the receiver
        # above the all-gather and moves fp32 over the wire
        return Wire(lax.bitcast_convert_type(x_NB.astype(jnp.bfloat16), jnp.uint16), None)
    if fmt == "int8":
        s_N = _absmax_scale(x_NB, 127.0)
        q = jnp.clip(jnp.round(x_NB / s_N[:, None]), -127, 127).astype(jnp.int8)
        return Wire(q, s_N)
    if fmt == "fp4_e2m1":
        s_N = _absmax_scale(x_NB, _E2M1_MAX)
        f4 = (x_NB / s_N[:, None]).astype(jnp.float4_e2m1fn)
        code = lax.bitcast_convert_type(f4, jnp.uint4).astype(jnp.uint8)
        return Wire(_pack4(code), s_N)
    # fp4_e3m0
    s_N = _absmax_scale(x_NB, 1.0)
    return Wire(_pack4(_e3m0_encode(x_NB / s_N[:, None])), s_N)


def dequantize(wire: Wire, fmt: str) -> jax.Array:
    """The wire representation -> fp32 [num_blocks, BLOCK]."""
    check_format(fmt)
    if fmt == "none":
        return wire.payload
    if fmt == "bf16":
        # bf16 bits are the top half of the fp32 bits: exact, and no bf16 value exists that
        # XLA:CPU could fuse into a bf16-accumulating reduction of the mean
        return lax.bitcast_convert_type(wire.payload.astype(jnp.uint32) << 16, jnp.float32)
    if fmt == "int8":
        return wire.payload.astype(jnp.float32) * wire.scale_N[:, None]
    code = _unpack4(wire.payload)
    if fmt == "fp4_e2m1":
        y = lax.bitcast_convert_type(code.astype(jnp.uint4), jnp.float4_e2m1fn).astype(jnp.float32)
    else:
        y = _e3m0_decode(code)
    return y * wire.scale_N[:, None]


def roundtrip(x: jax.Array, fmt: str) -> jax.Array:
    """Quantize and dequantize an array of any shape (padding to whole blocks internally)."""
    flat = x.reshape(-1).astype(jnp.float32)
    n = flat.shape[0]
    nb = -(-n // BLOCK)
    x_NB = jnp.pad(flat, (0, nb * BLOCK - n)).reshape(nb, BLOCK)
    return dequantize(quantize(x_NB, fmt), fmt).reshape(-1)[:n].reshape(x.shape)


# ---------------------------------------------------------------------------------------
# The mean over replicas of low-bit values: two collectives built from the formats above.

def dequantized_mean(wire_M: Wire, fmt: str) -> jax.Array:
    """fp32 mean over the leading (sender) axis of M wires: dequantize, accumulate in fp32."""
    return jnp.mean(jax.vmap(lambda w: dequantize(w, fmt))(wire_M), axis=0)


def reduce_scatter_all_gather_mean(x_KB: jax.Array, fmt: str, axis_name: str,
                                   num_replicas: int) -> jax.Array:
    """Per-device body (inside `shard_map` over `axis_name`) of the bandwidth-optimal low-bit
    mean: fp32 x [K, BLOCK] (this replica's values, K divisible by M) -> fp32 mean [K, BLOCK].

    1. reduce-scatter: quantize, split the codes into M chunks of K/M blocks, and `all_to_all`
       them, so replica r receives every replica's codes of chunk r; dequantize and
       accumulate their mean in fp32.
    2. all-gather: re-quantize the reduced chunk and all-gather its codes; every replica
       (the chunk's owner too) dequantizes the same codes, so the result is identical
       everywhere.
    Each phase sends (M−1)/M of one payload: 2(M−1)/M · wire_bytes in all.
    """
    M = num_replicas
    K = x_KB.shape[0]
    if K % M:
        raise ValueError(f"{K} blocks cannot be cut into {M} equal chunks")
    wire = quantize(x_KB, fmt)
    wire = jax.tree.map(lambda a: a.reshape((M, K // M) + a.shape[1:]), wire)
    # [sender, K/M, ..]
    wire = jax.tree.map(lambda a: lax.all_to_all(a, axis_name, 0, 0, tiled=False), wire)
    chunk = quantize(dequantized_mean(wire, fmt), fmt)
    chunk = jax.tree.map(lambda a: lax.all_gather(a, axis_name, axis=0, tiled=True), chunk)
    return dequantize(chunk, fmt)


def reduce_scatter_all_gather_mean_dense(x_MKB: jax.Array, fmt: str) -> jax.Array:
    """The same numbers as `reduce_scatter_all_gather_mean` for [M, K, BLOCK] held in one
    place (no mesh): blocks are quantized independently, so chunking changes nothing."""
    mean = dequantized_mean(jax.vmap(lambda b: quantize(b, fmt))(x_MKB), fmt)
    return dequantize(quantize(mean, fmt), fmt)
