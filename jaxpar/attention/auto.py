"""`impl="auto"`: pick the sequence-parallel schedule from a cost model.

For one attention call (forward + backward) on a mesh of sequence shards, the model predicts
each runnable schedule's time from

* the closed-form bytes per device (`jaxpar.comm.attention_bytes`, the same numbers the
  compiled HLO sends) over the link bandwidth, plus a latency per collective step;
* the local kernel's cost per call, summed over the calls each schedule makes (ring and
  TokenRing one pair call per step, Ulysses one over the whole sequence): on CPU a tile
  model of the tiled XLA kernel (`TileCost`: a cost per call, per tile, and per score
  element growing with the head dim, fitted to measured calls of several shapes), on GPU
  the FLOPs (4·B·Lq·Lk·H·D, half when causal, fwd+bwd = 3.5× fwd) over the measured kernel
  throughput; plus the memory traffic of merging partials;
* how the backend runs them: a GPU overlaps a ring step's transfer with its compute and
  drives both link directions at once; host devices share the CPU's cores, so every
  device's work and copies add up (`Profile.shared_cores`).

It returns the schedule with the lowest predicted time among those that can run (Ulysses
and the hybrid's Ulysses part need the heads to split over their axis; causal needs the
zigzag divisibility). Profiles: "cpu" (measured on this project's CPU machine by
`scripts/bench_attention.py --calibrate`, jaxpar/attention/profile_cpu.json) and "h200"
(kernel throughput measured on an H200, docs/measurements/; link figures nominal). See
docs/attention.md, "How auto decides".
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import pathlib

import jax
import jax.numpy as jnp

from jaxpar import comm
from jaxpar._spmd import divisors

CPU_PROFILE = pathlib.Path(__file__).with_name("profile_cpu.json")  # --calibrate writes it


@dataclasses.dataclass(frozen=True)
class TileCost:
    """CPU seconds of one fwd+bwd call of the tiled XLA kernel (`blockwise.tiled_fwd/bwd`):

        call_s + io_s · (Lq + Lk) · heads · D + Σ over tiles with work of
                 (tile_s + S · (score_s + score_d_s · D + gqa_s · [K < H]) + spill_s · S⁺
                  + operand_s · heads · (tq + tk) · D)

    with S = heads · tq · tk the tile's score elements and S⁺ = max(0, S − 2¹⁸) those beyond
    1 MiB of fp32 scores (the tile no longer stays in a core's cache). tq × tk tiles as the
    kernel cuts them (gcd of the length and `tile`, or of `few_heads`' tile for calls of at
    most that many heads: `blockwise.FEW_HEADS_TILES`); causal calls skip the tiles above
    the diagonal. Per call: a fixed cost, and the per-element work on its operands (the
    kernel's head-major transposes, casts, the dQ buffer). Per score: the elementwise
    softmax work (exp, max, rescale; independent of D), the matmuls (∝ D), and GQA. Per
    tile, its operands: the q, k, v slices it reads and the dq, dk, dv slices it adds to
    grow with the tile's sides, not its area, so a 512² tile does half of a 256² tile's
    operand work per score; at D = 64-128 that is what makes Ulysses' long few-head calls
    cheaper per score than ring pair calls over many heads (docs/attention.md, "What the
    model was missing"). A FLOP rate alone misses these, and that short calls pay the fixed
    costs more often. Fitted to measured calls of several shapes and head dims by
    `scripts/bench_attention.py --calibrate`."""

    tile: int
    call_s: float
    tile_s: float
    score_s: float
    score_d_s: float
    gqa_s: float = 0.0
    spill_s: float = 0.0
    io_s: float = 0.0
    operand_s: float = 0.0
    few_heads: tuple[int, int] | None = None  # (heads at most, tile)

    CACHE_SCORES = 1 << 18

    def tile_for(self, heads: int) -> int:
        few = self.few_heads
        return few[1] if few and heads <= few[0] else self.tile

    def seconds(self, lq: int, lk: int, heads: int, d: int, causal: bool,
                kv_heads: int | None = None) -> float:
        tile = self.tile_for(heads)
        tq, tk = math.gcd(lq, tile), math.gcd(lk, tile)
        nq, nk = lq // tq, lk // tk
        # tile (i, j) has work unless every key in it is after every query in it
        tiles = (sum(min(nk, ((i + 1) * tq - 1) // tk + 1) for i in range(nq)) if causal
                 else nq * nk)
        scores = heads * tq * tk
        grouped = kv_heads is not None and kv_heads < heads
        per_score = self.score_s + self.score_d_s * d + (self.gqa_s if grouped else 0.0)
        spill = max(0, scores - self.CACHE_SCORES) * self.spill_s
        operands = self.operand_s * heads * (tq + tk) * d
        return (self.call_s + self.io_s * (lq + lk) * heads * d
                + tiles * (self.tile_s + scores * per_score + spill + operands))


@dataclasses.dataclass(frozen=True)
class Profile:
    """What the cost model knows about a backend (per device unless `shared_cores`).

    kernel_flops: local kernel fwd+bwd throughput, FLOP/s; kernel_by_len: the same measured
      per call length {"causal"/"full": {L: FLOP/s}}, interpolated in log L; call_s: fixed
      cost of one kernel call (fwd+bwd); tile_cost: a `TileCost` (dict in JSON) that replaces
      those three where set (CPU); link_bw: bytes/s one device sends in one direction;
      latency_s: per collective step and device; mem_bw: bytes/s of elementwise work (merges);
      overlap: ring transfers hide behind compute; bidirectional: both link directions at
      full rate at once; shared_cores: all devices share one machine's cores (host
      devices), so their work adds up: kernel, link and memory figures are then the whole
      machine's, measured with every device busy; tokenring_extra: what a byte TokenRing
      sends costs beyond its link time, as a multiple of it (on CPU its halves are cut,
      joined and selected, and each step's switch passes whole operands: copies a ring's
      K/V do not make), fitted to ring and TokenRing schedules timed side by side.
    """

    name: str
    kernel_flops: float
    call_s: float
    link_bw: float
    latency_s: float
    mem_bw: float
    overlap: bool
    bidirectional: bool
    shared_cores: bool
    source: str = ""
    kernel_by_len: dict | None = None
    tile_cost: TileCost | None = None
    tokenring_extra: float = 0.0

    def flops_at(self, length: int, causal: bool) -> float:
        """Kernel throughput for calls over `length` tokens (queries × keys of that order)."""
        table = (self.kernel_by_len or {}).get("causal" if causal else "full")
        if not table:
            return self.kernel_flops
        pts = sorted((int(k), v) for k, v in table.items())
        x = math.log(max(min(length, pts[-1][0]), pts[0][0]))
        for (l0, f0), (l1, f1) in zip(pts, pts[1:]):
            if x <= math.log(l1):
                t = (x - math.log(l0)) / (math.log(l1) - math.log(l0))
                return f0 + t * (f1 - f0)
        return pts[-1][1]

    def kernel_s(self, lq: int, lk: int, heads: int, d: int, causal: bool,
                 kv_heads: int | None = None) -> float:
        """Seconds of one fwd+bwd kernel call: queries [lq, heads, d] over lk keys of
        kv_heads heads (`heads`: batch × heads; causal: equal lengths, the lower triangle)."""
        if self.tile_cost is not None:
            return self.tile_cost.seconds(lq, lk, heads, d, causal, kv_heads)
        flops = 3.5 * 4 * lq * lk * heads * d * (0.5 if causal else 1)
        return self.call_s + flops / self.flops_at(max(lq, lk), causal)

    @classmethod
    def from_json(cls, path) -> Profile:
        raw = json.loads(pathlib.Path(path).read_text())
        fields = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in raw["profile"].items() if k in fields}
        if kw.get("tile_cost"):
            tc = dict(kw["tile_cost"])
            tc["few_heads"] = tuple(tc["few_heads"]) if tc.get("few_heads") else None
            kw["tile_cost"] = TileCost(**tc)
            # the tile model replaces the FLOP-rate fields, so a calibrated file leaves them out
            kw = {"kernel_flops": 0.0, "call_s": kw["tile_cost"].call_s} | kw
        return cls(**kw)


# H200: kernel throughput measured (docs/measurements/h200-pallas-ring-block-kernel.json:
# the Pallas flash kernel as a ring-of-2 block kernel, bf16, N=8192, H=16, D=128: 317
# TFLOP/s fwd+bwd non-causal, 248 causal; one length, so flat in L). NVLink figures are
# the vendor's nominal 450 GB/s per direction and an assumed 10 µs per collective step:
# not measured here.
H200 = Profile(name="h200", kernel_flops=248e12, call_s=20e-6, link_bw=450e9,
               latency_s=10e-6, mem_bw=4.0e12, overlap=True, bidirectional=True,
               shared_cores=False,
               kernel_by_len={"full": {"4096": 317e12}, "causal": {"4096": 248e12}},
               source="kernel: docs/measurements/h200-pallas-ring-block-kernel.json; "
                      "link: nominal NVLink 4 (not measured)")


def profile_for(backend: str | None = None) -> Profile:
    """The profile of a backend ("cpu", "gpu"; default: jax's)."""
    return _profile(backend or jax.default_backend())


@functools.lru_cache(maxsize=8)
def _profile(backend: str) -> Profile:
    if backend == "cpu":
        return Profile.from_json(CPU_PROFILE)
    if backend == "gpu":
        return H200
    raise ValueError(f"impl='auto' has no cost profile for backend {backend!r}; valid "
                     f"backends are ['cpu', 'gpu'], or pass impl= explicitly")


@dataclasses.dataclass(frozen=True)
class Candidate:
    """One runnable schedule: impl, and for the hybrid the (ring, ulysses) axis sizes (and
    names when the axes are named) and the outer ring_impl."""

    impl: str
    shards: tuple[int, ...]          # (P,) or (ring size, ulysses size)
    ring_impl: str | None = None
    axes: tuple[str, ...] = ()

    @property
    def label(self) -> str:
        if self.impl != "hybrid":
            return f"{self.impl}(P={self.shards[0]})"
        names = "" if not self.axes else f", ring={self.axes[0]}, ulysses={self.axes[1]}"
        return f"hybrid[{self.ring_impl}](ring {self.shards[0]} × ulysses {self.shards[1]}" \
               f"{names})"


@dataclasses.dataclass(frozen=True)
class Shape:
    batch: int
    seq_len: int
    heads: int
    kv_heads: int
    head_dim: int
    itemsize: int
    causal: bool


def ulysses_fits(heads: int, kv_heads: int, p: int) -> bool:
    return heads % p == 0 and (kv_heads % p == 0 or p % kv_heads == 0)


def why_not(c: Candidate, s: Shape) -> str | None:
    """Why this candidate cannot run this shape (None: it can)."""
    total = math.prod(c.shards)
    if s.seq_len % total:
        return f"N={s.seq_len} not divisible by {total} shards"
    zig = total if c.impl != "hybrid" else c.shards[0]  # the zigzag is over the ring axis
    if s.causal and s.seq_len % (2 * zig):
        return f"causal zigzag needs N divisible by {2 * zig}"
    if c.impl == "ulysses" and not ulysses_fits(s.heads, s.kv_heads, total):
        return f"heads={s.heads}, kv heads={s.kv_heads} do not split over {total}"
    if c.impl == "hybrid" and not ulysses_fits(s.heads, s.kv_heads, c.shards[1]):
        return f"heads={s.heads}, kv heads={s.kv_heads} do not split over {c.shards[1]}"
    return None


def candidates(shards, axes=()) -> list[Candidate]:
    """Every schedule for these mesh sizes. shards: P (one axis: ulysses, ring, tokenring)
    or (a, b) with names `axes` (two named axes: the hybrid both ways round, ring or
    TokenRing outside). `flexible(P)` gives the trainer's wider set."""
    if isinstance(shards, int):
        return [Candidate(i, (shards,)) for i in ("ulysses", "ring", "tokenring")]
    a, b = shards
    names = tuple(axes) or ("", "")
    out = []
    for (pr, pu), ax in (((a, b), names), ((b, a), names[::-1])):
        for ri in ("ring", "tokenring"):
            out.append(Candidate("hybrid", (pr, pu), ri, tuple(ax) if axes else ()))
    return out


def flexible(p: int) -> list[Candidate]:
    """P sequence shards to arrange freely (the trainer): ulysses, ring, tokenring over all
    P, and the hybrid for every split P = ring × ulysses with both parts > 1."""
    out = candidates(p)
    for pu in divisors(p)[1:-1]:
        out += [Candidate("hybrid", (p // pu, pu), ri) for ri in ("ring", "tokenring")]
    return out


def _ring_part(impl, pr, s: Shape, heads, kv_heads, prof: Profile, devices: int):
    """(compute s, comm s) of a ring/TokenRing pass of pr steps, fwd+bwd, on one device (on
    shared cores: on all `devices` together)."""
    b, d = s.batch, s.head_dim
    tok = s.seq_len // pr  # tokens per ring shard
    bh, bk = b * heads, b * kv_heads
    if s.causal:  # zigzag: the causal diagonal pair, then L × L/2 halves (kernels.pair_fwd)
        compute = (prof.kernel_s(tok, tok, bh, d, True, bk)
                   + (pr - 1) * prof.kernel_s(tok, tok // 2, bh, d, False, bk))
    else:
        compute = pr * prof.kernel_s(tok, tok, bh, d, False, bk)
    merge_bytes = pr * b * tok * heads * (d + 1) * 4 * 3  # read two partials, write one (fwd)
    merge_bytes += pr * b * tok * kv_heads * d * 4 * 2 * 2  # dK/dV (or dQ) accumulation (bwd)
    compute += merge_bytes / prof.mem_bw
    sent = comm.attention_bytes(impl, batch=b, seq_len=s.seq_len, heads=heads,
                                kv_heads=kv_heads, head_dim=d, shards=pr,
                                itemsize=s.itemsize, backward=True, causal=s.causal)
    total = sum(sent.values())
    if impl == "tokenring":
        if prof.bidirectional:
            # queries one way, partials (and dQ) the other: the busier direction sets the time
            rows = (pr - 1) * b * tok * (0.75 if s.causal else 1.0)  # causal: the query drop
            q_way = rows * heads * (d * s.itemsize * 3 + 8)
            total = max(q_way, total - q_way)
        total *= 1 + prof.tokenring_extra  # its copies on CPU (Profile.tokenring_extra)
    steps = 2 * (pr - 1) + 1 if pr > 1 else 0  # forward P−1 hops, backward P
    link = total / prof.link_bw + steps * prof.latency_s
    return _on(compute, devices, prof), _on(link, devices, prof)


def _on(seconds: float, devices: int, prof: Profile) -> float:
    """One device's seconds as the time they take: on shared cores every device's adds up."""
    return seconds * devices if prof.shared_cores else seconds


def predict(c: Candidate, s: Shape, prof: Profile) -> float:
    """Predicted seconds of one fwd+bwd attention call (all layers' calls scale alike)."""
    total = math.prod(c.shards)
    if c.impl == "ulysses":
        sent = comm.attention_bytes("ulysses", batch=s.batch, seq_len=s.seq_len,
                                    heads=s.heads, kv_heads=s.kv_heads, head_dim=s.head_dim,
                                    shards=total, itemsize=s.itemsize, backward=True)
        # one call over the whole sequence with H/P heads (K/P kv heads, at least one)
        compute = prof.kernel_s(s.seq_len, s.seq_len, s.batch * s.heads // total,
                                s.head_dim, s.causal, s.batch * max(s.kv_heads // total, 1))
        link = sum(sent.values()) / prof.link_bw + 4 * prof.latency_s
        return _on(compute + link, total, prof)
    if c.impl in ("ring", "tokenring"):
        compute, link = _ring_part(c.impl, total, s, s.heads, s.kv_heads, prof, total)
        return max(compute, link) if prof.overlap else compute + link
    # hybrid: Ulysses all-to-alls over pu, then the ring over pr on H/pu heads
    pr, pu = c.shards
    kv_u = s.kv_heads if s.kv_heads % pu == 0 else pu
    a2a = comm.attention_bytes("ulysses", batch=s.batch, seq_len=s.seq_len // pr,
                               heads=s.heads, kv_heads=s.kv_heads, head_dim=s.head_dim,
                               shards=pu, itemsize=s.itemsize, backward=True)
    compute, link = _ring_part(c.ring_impl, pr, s, s.heads // pu, kv_u // pu, prof, total)
    link_u = _on(sum(a2a.values()) / prof.link_bw + 4 * prof.latency_s, total, prof)
    return (max(compute, link) if prof.overlap else compute + link) + link_u


@dataclasses.dataclass(frozen=True)
class Choice:
    pick: Candidate
    predicted_s: dict        # label -> seconds, every runnable candidate
    skipped: dict            # label -> why it cannot run
    profile: str

    def to_json(self) -> dict:
        return {"impl": self.pick.impl, "ring_impl": self.pick.ring_impl,
                "shards": list(self.pick.shards), "axes": list(self.pick.axes),
                "label": self.pick.label, "profile": self.profile,
                "predicted_ms": {k: round(v * 1e3, 4) for k, v in self.predicted_s.items()},
                "cannot_run": self.skipped}

    def summary(self) -> str:
        times = ", ".join(f"{k} {v * 1e3:.3g} ms" for k, v in
                          sorted(self.predicted_s.items(), key=lambda kv: kv[1]))
        return f"attention impl=auto picked {self.pick.label} ({self.profile} profile; " \
               f"predicted fwd+bwd per call: {times})"


def choose(cands, *, batch, seq_len, heads, kv_heads, head_dim, dtype=jnp.float32,
           causal=False, profile: Profile | str | None = None) -> Choice:
    """The candidate with the lowest predicted time among those that can run."""
    prof = profile if isinstance(profile, Profile) else profile_for(profile)
    s = Shape(batch, seq_len, heads, kv_heads, head_dim, jnp.dtype(dtype).itemsize, causal)
    times, skipped = {}, {}
    for c in cands:
        why = why_not(c, s)
        if why:
            skipped[c.label] = why
        else:
            times[c] = predict(c, s, prof)
    if not times:
        raise ValueError(f"impl='auto': no schedule can run N={seq_len}, heads={heads}, "
                         f"kv heads={kv_heads} on these shards: {skipped}")
    pick = min(times, key=times.get)
    return Choice(pick, {c.label: t for c, t in times.items()}, skipped, prof.name)
