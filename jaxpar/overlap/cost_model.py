"""Alpha-beta cost model: plain collective + matmul vs the decomposed collective matmul.

Times are for one device of a P-way tensor-parallel group, bf16 by default.

  transfer of b bytes over one link direction:   alpha + b / link_bandwidth
  matmul [m, k] @ [k, n], unsplit:               max(F / throughput(F), launch + bytes / hbm)
  the same matmul as c sequential row chunks:    (its unsplit time) / efficiency(F, c)
with F = 2mkn. On the GPU presets, throughput(F) and efficiency(F, c) come from a MEASURED
table (`H200_BF16_MATMULS`, below): a bf16 matmul timed whole and split into c = 2, 4, 8,
16 row chunks on one H200. Chunking costs something because a chunk re-reads the whole
[k, n] weight and pays a kernel launch; the table measures that cost instead of assuming it.
Without a table (`matmuls=()`) the model falls back to a roofline,
launch + max(F / (peak · eff), bytes / hbm) per kernel.

Plain (ring collectives over both link directions, as NCCL builds rings both ways; no overlap):
  all-gather / reduce-scatter of S bytes:  (P−1)·(alpha + S/P / (2·bw))
  all-reduce:                              2·(P−1)·(alpha + S/P / (2·bw))
so a `uni` decomposition, which uses one direction, starts at a 2× bandwidth handicap.
  time = matmul(whole) + collective
Decomposed, P steps (uni: whole blocks one way; bidi: half blocks both ways at once):
  time = t_c + (P−1)·max(t_c·(1+slowdown), t_x)      [+ the adds of reduce-scatter]
with t_c the step's matmul(s) and t_x the step's hop; `overlap_slowdown` is the compute
slowdown while a transfer shares the memory system (T3 reports this contention).
A backend that cannot overlap (CPU: synchronous collective-permute) pays t_c + t_x.

What is measured and what is not: the matmul numbers of the GPU presets are measured (one
H200). The link bandwidths and latencies, HBM bandwidth, launch overhead and overlap
slowdown are still ASSUMED (no multi-GPU machine was available); the docs label every table
computed from them.
"""
from __future__ import annotations

import dataclasses
import math

OPS = ("all_gather_matmul", "matmul_reduce_scatter", "matmul_all_reduce")


@dataclasses.dataclass(frozen=True)
class MatmulMeasurement:
    """One measured bf16 matmul [m, k] @ [k, n]: whole, and split into row chunks."""
    m: int
    k: int
    n: int
    tflops: float                                     # the unsplit matmul, TFLOP/s
    chunk_efficiency: tuple[tuple[int, float], ...]   # (c, time(whole) / time(c chunks))

    @property
    def flops(self) -> float:
        return 2.0 * self.m * self.k * self.n


# MEASURED on one NVIDIA H200, bf16, jax 0.11.2, 2026-11-26 (shared/measurements/README.md,
# "Matmul split into n sequential row chunks"; raw data in
# shared/measurements/h200-attention-and-chunking.json, key "chunking"). Copied here because
# the package cannot read ../shared at run time. Efficiency = time(whole) / time(the same
# matmul run as c sequential [m/c, k] @ [k, n] chunks); > 1 means the chunks were faster.
H200_BF16_MATMULS = (
    MatmulMeasurement(16384, 8192, 4096, 540.8, ((2, 0.872), (4, 0.866), (8, 1.016), (16, 0.932))),
    MatmulMeasurement(8192, 4096, 2048, 266.6, ((2, 1.310), (4, 0.971), (8, 0.717), (16, 0.916))),
    MatmulMeasurement(4096, 4096, 1024, 247.8, ((2, 0.665), (4, 0.611), (8, 0.545), (16, 0.243))),
)


@dataclasses.dataclass(frozen=True)
class Hardware:
    name: str
    link_bandwidth: float        # bytes/s, one direction of one ring link
    link_latency: float          # s per hop (alpha)
    peak_flops: float            # matmul FLOP/s at the model's dtype (roofline fallback)
    matmul_efficiency: float     # fraction of peak a large matmul reaches (roofline fallback)
    hbm_bandwidth: float         # bytes/s
    launch_overhead: float       # s per kernel
    overlap_slowdown: float = 0.0  # compute slowdown while overlapped with a transfer
    can_overlap: bool = True
    # Measured matmuls (whole and chunked); when given they replace peak · efficiency and
    # the roofline's chunking loss. Empty: roofline only.
    matmuls: tuple[MatmulMeasurement, ...] = ()
    assumed: bool = True         # True when any number above is not measured

    def replace(self, **kw) -> "Hardware":
        """A copy with fields changed. Setting `peak_flops` or `matmul_efficiency` describes
        other compute than the measured card's, so it drops the measured `matmuls` table
        (unless `matmuls=` is passed too)."""
        if ("peak_flops" in kw or "matmul_efficiency" in kw) and "matmuls" not in kw:
            kw["matmuls"] = ()
        return dataclasses.replace(self, **kw)


# Compute: the H200 measurements above (989 TFLOP/s dense bf16 datasheet peak; the largest
# measured matmul reaches 541, i.e. 0.547 of it). ASSUMED: HBM 4.8 TB/s (datasheet), 4 µs
# per launch, 5 % compute slowdown under overlap, and the links: an NVLink-class link
# (300 GB/s per direction, 5 µs) or a PCIe-class link (32 GB/s per direction, 10 µs).
GPU_NVLINK = Hardware("H200 matmuls (measured), NVLink-class 300 GB/s link (assumed)", 300e9,
                      5e-6, 989e12, 0.547, 4.8e12, 4e-6, overlap_slowdown=0.05,
                      matmuls=H200_BF16_MATMULS)
GPU_PCIE = GPU_NVLINK.replace(name="H200 matmuls (measured), PCIe-class 32 GB/s link (assumed)",
                              link_bandwidth=32e9, link_latency=10e-6)
# The simulated host devices: collectives are synchronous, nothing overlaps.
CPU_HOST = Hardware("CPU host devices (synchronous collectives)", 10e9, 20e-6, 50e9, 0.5,
                    20e9, 2e-6, can_overlap=False)


def default_hardware(backend: str | None = None) -> Hardware:
    """The preset `overlap='auto'` uses for a backend ('cpu', 'gpu', 'tpu'; None: jax's)."""
    if backend is None:
        import jax
        backend = jax.default_backend()
    return CPU_HOST if backend == "cpu" else GPU_NVLINK


# ------------------------------------------------------------------------------ pieces
#
# Interpolating the measured table. Across shapes: by FLOPs of the unsplit matmul, linear
# in log(FLOPs) between the measured shapes, clamped (nearest) outside them. FLOPs because
# the three shapes shrink M, K and N together (so no single dimension separates them) and
# because total work is what decides whether a kernel, and each of its chunks, fills the
# GPU; log because the shapes are 4–8× apart and throughput grows with size, not linearly.
# Across chunk counts: linear in log(c) between the measured c (c = 1 is 1.0 by definition);
# beyond the largest measured c, each chunk is charged the same fixed overhead as at that c
# (time(c) = whole + c · overhead), so the loss grows with the number of chunks instead of
# freezing. Measured efficiencies above 1 (1.31 at 8192×4096×2048 split in 2, 1.02 at
# 16384×8192×4096 split in 8) are capped at 1: they say the unsplit kernel was a poor pick
# at that shape, which the plain path could equally avoid, not that splitting creates
# compute, so decomposition gets no credit for them.


def _log_interp(x: float, pts: list[tuple[float, float]]) -> float:
    """y at x, linear in log(x) between sorted points (x > 0), clamped outside them."""
    if x <= pts[0][0]:
        return pts[0][1]
    for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
        if x <= x1:
            return y0 + (y1 - y0) * (math.log(x) - math.log(x0)) / (math.log(x1) - math.log(x0))
    return pts[-1][1]


def _shape_efficiency(meas: MatmulMeasurement, chunks: int) -> float:
    pts = [(1.0, 1.0)] + [(float(c), min(e, 1.0)) for c, e in sorted(meas.chunk_efficiency)]
    c_max, e_max = pts[-1]
    if chunks <= c_max:
        return _log_interp(chunks, pts)
    overhead = 1.0 / e_max - 1.0  # extra time of c_max chunks / time(whole); / c_max per chunk
    return 1.0 / (1.0 + overhead * chunks / c_max)


def matmul_throughput(flops: float, hw: Hardware) -> float:
    """FLOP/s of one unsplit matmul of `flops`: measured table, else peak · efficiency."""
    if not hw.matmuls:
        return hw.peak_flops * hw.matmul_efficiency
    pts = sorted((m.flops, m.tflops * 1e12) for m in hw.matmuls)
    return _log_interp(flops, pts)


def chunk_efficiency(flops: float, chunks: int, hw: Hardware) -> float:
    """time(whole) / time(c sequential row chunks) for a matmul of `flops` (1.0 if unmeasured)."""
    if not hw.matmuls or chunks <= 1:
        return 1.0
    pts = sorted((m.flops, _shape_efficiency(m, chunks)) for m in hw.matmuls)
    return _log_interp(flops, pts)


def transfer_time(nbytes: float, hw: Hardware) -> float:
    return hw.link_latency + nbytes / hw.link_bandwidth


def matmul_time(m: float, k: float, n: float, hw: Hardware, dtype_bytes: int = 2,
                chunks: int = 1) -> float:
    """Time of ONE kernel [m, k] @ [k, n] that is one of `chunks` equal pieces of a matmul
    `chunks` times larger (chunks=1: an unsplit matmul)."""
    flops = 2.0 * m * k * n
    memory = (m * k + k * n + m * n) * dtype_bytes / hw.hbm_bandwidth
    if not hw.matmuls:
        return hw.launch_overhead + max(flops / matmul_throughput(flops, hw), memory)
    whole = flops * chunks
    compute = whole / matmul_throughput(whole, hw) / (chunks * chunk_efficiency(whole, chunks,
                                                                                  hw))
    # The measurements include launches; the roofline floor matters only below the table.
    return max(compute, hw.launch_overhead + memory)


def collective_time(nbytes_per_block: float, p: int, hw: Hardware) -> float:
    """A plain ring all-gather or reduce-scatter of P blocks, both directions in use."""
    return (p - 1) * transfer_time(nbytes_per_block / 2, hw)


def _add_time(nbytes: float, hw: Hardware) -> float:
    return hw.launch_overhead + 3 * nbytes / hw.hbm_bandwidth  # read two, write one


def _pipeline(t_c: float, t_x: float, steps: int, hw: Hardware) -> float:
    """First compute alone, then `steps` hops each beside one compute."""
    if not hw.can_overlap:
        return t_c + steps * (t_c + t_x)
    return t_c + steps * max(t_c * (1 + hw.overlap_slowdown), t_x)


# ---------------------------------------------------------------------------- the model

@dataclasses.dataclass(frozen=True)
class Prediction:
    op: str
    plain_s: float
    decomposed_s: float
    compute_s: float       # the unsplit matmul alone
    comm_s: float          # the plain collective alone

    @property
    def speedup(self) -> float:
        return self.plain_s / self.decomposed_s


def predict(op: str, m: int, k: int, n: int, p: int, hw: Hardware, *,
            direction: str = "bidi", dtype_bytes: int = 2) -> Prediction:
    """Per-device times for the op on P devices.

    m, k, n are the per-device matmul sizes: all_gather_matmul multiplies the gathered
    [m, k] by a [k, n] shard (m = all tokens); the reduce ops multiply [m, k] (k a shard of
    the contraction) by [k, n] and reduce the [m, n] result.
    """
    if op not in OPS:
        raise ValueError(f"op={op!r}; valid choices are {OPS}")
    if direction not in ("uni", "bidi"):
        raise ValueError(f"direction={direction!r}; valid choices are ('uni', 'bidi')")
    whole = matmul_time(m, k, n, hw, dtype_bytes)
    ways = 2 if direction == "bidi" else 1
    block_rows = m / p

    def piece(rows, cols):
        # One kernel of the decomposition, as a 1/c piece of the unsplit [m, k] @ [k, n]
        # (the all-reduce's column halves are counted like row chunks: c = 2·P·ways).
        return matmul_time(rows, k, cols, hw, dtype_bytes, chunks=round(m * n / (rows * cols)))

    if op == "all_gather_matmul":
        block_bytes = block_rows * k * dtype_bytes
        comm = collective_time(block_bytes, p, hw)
        t_c = ways * piece(block_rows / ways, n)
        t_x = transfer_time(block_bytes / ways, hw)
        return Prediction(op, whole + comm, _pipeline(t_c, t_x, p - 1, hw), whole, comm)
    block_bytes = block_rows * n * dtype_bytes
    t_add = ways * _add_time(block_bytes / ways, hw)
    if op == "matmul_reduce_scatter":
        comm = collective_time(block_bytes, p, hw)
        t_c = ways * piece(block_rows / ways, n)
        t_x = transfer_time(block_bytes / ways, hw)
        dec = _pipeline(t_c, t_x, p - 1, hw) + (p - 1) * t_add
        return Prediction(op, whole + comm, dec, whole, comm)
    # matmul_all_reduce: column halves A, B; RS(A); RS(B) beside AG(A) hops; AG(B) exposed.
    comm = 2 * collective_time(block_bytes, p, hw)
    t_add_half = ways * _add_time(block_bytes / 2 / ways, hw)
    t_c = ways * piece(block_rows / ways, n / 2)
    t_x = transfer_time(block_bytes / 2 / ways, hw)
    rs_a = _pipeline(t_c, t_x, p - 1, hw)
    # Phase 2: each step sends an RS(B) hop and an AG(A) hop down the same link direction.
    rs_b_ag_a = _pipeline(t_c, 2 * t_x, p - 1, hw)
    ag_b = (p - 1) * t_x
    dec = rs_a + rs_b_ag_a + ag_b + 2 * (p - 1) * t_add_half
    return Prediction(op, whole + comm, dec, whole, comm)


def choose(op: str, m: int, k: int, n: int, p: int, hw: Hardware | None = None, *,
           dtype_bytes: int = 2, min_speedup: float = 1.05) -> tuple[str, str]:
    """('none' | 'collective_matmul', direction) as `overlap='auto'` decides it.

    Decomposition is chosen only when the model predicts at least `min_speedup`: the plain
    path is the safe default for small matmuls, few devices, or a backend that cannot
    overlap.
    """
    hw = hw or default_hardware()
    if p <= 1:
        return "none", "uni"
    best, pr = predict_best(op, m, k, n, p, hw, dtype_bytes=dtype_bytes)
    return ("collective_matmul", best) if pr.speedup >= min_speedup else ("none", "uni")


def predict_best(op: str, m: int, k: int, n: int, p: int, hw: Hardware, *,
                 direction: str = "best", dtype_bytes: int = 2) -> tuple[str, Prediction]:
    """(direction, prediction) for one direction, or for the faster of the two ('best')."""
    dirs = ("uni", "bidi") if direction == "best" else (direction,)
    preds = [(d, predict(op, m, k, n, p, hw, direction=d, dtype_bytes=dtype_bytes))
             for d in dirs]
    return max(preds, key=lambda dp: dp[1].speedup)


# --------------------------------------------------------------------- transformer tables

@dataclasses.dataclass(frozen=True)
class ModelShape:
    name: str
    embed: int
    mlp: int
    tokens: int  # tokens per step on one tensor-parallel group (batch × sequence)


# T3's evaluation models, by shape: T-NLG (17B: d=4256) and PaLM (540B: d=18432, d_ff=4d).
TNLG = ModelShape("T-NLG-like (E=4256, F=17024)", 4256, 4 * 4256, 8192)
PALM = ModelShape("PaLM-like (E=18432, F=73728)", 18432, 4 * 18432, 8192)


def sublayers(shape: ModelShape, p: int) -> list[tuple[str, str, int, int, int]]:
    """(sublayer, op, m, k, n) per device for a Megatron tensor-parallel layer."""
    e, f, t = shape.embed, shape.mlp, shape.tokens
    return [
        ("QKV proj (SP all-gather)", "all_gather_matmul", t, e, 3 * e // p),
        ("attn out (SP reduce-scatter)", "matmul_reduce_scatter", t, e // p, e),
        ("FC-1 (SP all-gather)", "all_gather_matmul", t, e, f // p),
        ("FC-2 (SP reduce-scatter)", "matmul_reduce_scatter", t, f // p, e),
        ("FC-2 (all-reduce)", "matmul_all_reduce", t, f // p, e),
    ]


def sublayer_table(shapes=(TNLG, PALM), tps=(4, 8, 16), hws=(GPU_NVLINK, GPU_PCIE),
                   direction: str = "best") -> list[dict]:
    """Predicted times per sublayer; direction 'uni', 'bidi' or 'best' (the faster one)."""
    rows = []
    for hw in hws:
        for shape in shapes:
            for p in tps:
                for name, op, m, k, n in sublayers(shape, p):
                    d, pr = predict_best(op, m, k, n, p, hw, direction=direction)
                    rows.append(dict(hardware=hw.name, model=shape.name, tp=p, sublayer=name,
                                     direction=d, auto=choose(op, m, k, n, p, hw)[0],
                                     chunks=_chunks(op, p, d),
                                     chunk_efficiency=chunk_efficiency(
                                         2.0 * m * k * n, _chunks(op, p, d), hw),
                                     compute_us=pr.compute_s * 1e6, comm_us=pr.comm_s * 1e6,
                                     plain_us=pr.plain_s * 1e6,
                                     decomposed_us=pr.decomposed_s * 1e6,
                                     speedup=pr.speedup))
    return rows


def _chunks(op: str, p: int, direction: str) -> int:
    """How many kernels the decomposition cuts the matmul into."""
    return p * (2 if direction == "bidi" else 1) * (2 if op == "matmul_all_reduce" else 1)


def break_even_tokens(op: str, k_of_p, n_of_p, p: int, hw: Hardware, *,
                      direction: str = "best", candidates=None) -> int | None:
    """Smallest candidate token count (powers of two, 16 to 2^20) from which on decomposition
    predicts a speedup > 1 at every larger candidate too ('best': in the faster direction);
    None if it does not pay at the largest. The measured table makes speedup non-monotone
    in the token count, so an isolated small count that pays is not a break-even point."""
    found = None
    for t in sorted(candidates or [2 ** i for i in range(4, 21)], reverse=True):
        if t % p:
            continue
        if predict_best(op, t, k_of_p(p), n_of_p(p), p, hw, direction=direction)[1].speedup <= 1:
            break
        found = t
    return found
