"""Alpha-beta cost model: plain collective + matmul vs the decomposed collective matmul.

Times are for one device of a P-way tensor-parallel group, bf16 by default.

  transfer of b bytes over one link direction:   alpha + b / link_bandwidth
  matmul [m, k] @ [k, n] (one kernel):            launch + max(2mkn / (peak · eff),
                                                               (mk + kn + mn) · bytes / hbm)
The roofline term is what makes chunking cost something: a chunk of m/P rows re-reads the
whole [k, n] weight, so small chunks turn memory-bound; every chunk also pays a launch.
Measured per-chunk efficiencies (from a GPU benchmark) can replace it: `chunk_efficiency`.

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

The hardware numbers below are ASSUMED datasheet-style values, not measurements (no GPU was
available when this was written); the docs label every table computed from them.
"""
from __future__ import annotations

import dataclasses
import math

OPS = ("all_gather_matmul", "matmul_reduce_scatter", "matmul_all_reduce")


@dataclasses.dataclass(frozen=True)
class Hardware:
    name: str
    link_bandwidth: float        # bytes/s, one direction of one ring link
    link_latency: float          # s per hop (alpha)
    peak_flops: float            # matmul FLOP/s at the model's dtype
    matmul_efficiency: float     # fraction of peak a large matmul reaches
    hbm_bandwidth: float         # bytes/s
    launch_overhead: float       # s per kernel
    overlap_slowdown: float = 0.0  # compute slowdown while overlapped with a transfer
    can_overlap: bool = True
    # Measured {chunks n: efficiency relative to the unsplit matmul}; overrides the roofline.
    chunk_efficiency: tuple[tuple[int, float], ...] = ()
    assumed: bool = True

    def replace(self, **kw) -> "Hardware":
        return dataclasses.replace(self, **kw)


# ASSUMED: H100-SXM-like compute (989 TFLOP/s dense bf16 at 70 %, 3.35 TB/s HBM) with an
# NVLink-class link (300 GB/s per direction) or a PCIe-class link (32 GB/s per direction).
GPU_NVLINK = Hardware("H100-like, NVLink-class 300 GB/s (assumed)", 300e9, 5e-6, 989e12, 0.7,
                      3.35e12, 4e-6, overlap_slowdown=0.05)
GPU_PCIE = GPU_NVLINK.replace(name="H100-like, PCIe-class 32 GB/s (assumed)",
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

def transfer_time(nbytes: float, hw: Hardware) -> float:
    return hw.link_latency + nbytes / hw.link_bandwidth


def matmul_time(m: float, k: float, n: float, hw: Hardware, dtype_bytes: int = 2,
                chunks: int = 1) -> float:
    """Time of ONE kernel [m, k] @ [k, n], m being a 1/chunks slice of a larger matmul."""
    flops = 2.0 * m * k * n
    compute = flops / (hw.peak_flops * hw.matmul_efficiency)
    if hw.chunk_efficiency and chunks > 1:
        return hw.launch_overhead + compute / _interp_efficiency(hw.chunk_efficiency, chunks)
    memory = (m * k + k * n + m * n) * dtype_bytes / hw.hbm_bandwidth
    return hw.launch_overhead + max(compute, memory)


def _interp_efficiency(table, n: int) -> float:
    pts = sorted(table)
    if n <= pts[0][0]:
        return pts[0][1]
    for (n0, e0), (n1, e1) in zip(pts, pts[1:]):
        if n <= n1:
            return e0 + (e1 - e0) * (math.log(n) - math.log(n0)) / (math.log(n1) - math.log(n0))
    return pts[-1][1]


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
    piece = lambda rows, cols: matmul_time(rows, k, cols, hw, dtype_bytes, chunks=p * ways)  # noqa: E731
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
    best = max(("uni", "bidi"),
               key=lambda d: predict(op, m, k, n, p, hw, direction=d,
                                     dtype_bytes=dtype_bytes).speedup)
    speedup = predict(op, m, k, n, p, hw, direction=best, dtype_bytes=dtype_bytes).speedup
    return ("collective_matmul", best) if speedup >= min_speedup else ("none", "uni")


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
                   direction: str = "bidi") -> list[dict]:
    rows = []
    for hw in hws:
        for shape in shapes:
            for p in tps:
                for name, op, m, k, n in sublayers(shape, p):
                    pr = predict(op, m, k, n, p, hw, direction=direction)
                    rows.append(dict(hardware=hw.name, model=shape.name, tp=p, sublayer=name,
                                     compute_us=pr.compute_s * 1e6, comm_us=pr.comm_s * 1e6,
                                     plain_us=pr.plain_s * 1e6,
                                     decomposed_us=pr.decomposed_s * 1e6,
                                     speedup=pr.speedup))
    return rows


def break_even_tokens(op: str, k_of_p, n_of_p, p: int, hw: Hardware, *,
                      direction: str = "bidi", candidates=None) -> int | None:
    """Smallest token count (power of two) at which decomposition predicts a speedup > 1."""
    for t in candidates or [2 ** i for i in range(4, 21)]:
        if t % p:
            continue
        if predict(op, t, k_of_p(p), n_of_p(p), p, hw, direction=direction).speedup > 1.0:
            return t
    return None
