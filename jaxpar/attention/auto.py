"""`impl="auto"`: pick the sequence-parallel schedule from a cost model.

For one attention call (forward + backward) on a mesh of sequence shards, the model predicts
each runnable schedule's time from

* the closed-form bytes per device (`jaxpar.comm.attention_bytes`, the same numbers the
  compiled HLO sends) over the link bandwidth, plus a latency per collective step;
* the attention FLOPs per device (4·B·N²·H·D, half when causal, fwd+bwd = 3.5× fwd) over the
  local kernel's measured throughput, plus a fixed cost per kernel call (ring and TokenRing
  make one call per step, Ulysses one in all) and the memory traffic of merging partials;
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
class Profile:
    """What the cost model knows about a backend (per device unless `shared_cores`).

    kernel_flops: local kernel fwd+bwd throughput, FLOP/s (shared_cores: of the whole
      machine with every device busy); kernel_by_len: the same measured per call length
      {"causal"/"full": {L: FLOP/s}} where it depends on the length (CPU: short calls are
      less efficient), interpolated in log L; call_s: fixed cost of one kernel call (fwd+bwd
      pair calls of a ring step, or Ulysses' single call); link_bw: bytes/s one device sends in
      one direction; latency_s: per collective step; mem_bw: bytes/s of elementwise work
      (merges); overlap: ring transfers hide behind compute; bidirectional: both link
      directions at full rate at once; shared_cores: all devices share one machine's cores
      (host devices), so their work adds up.
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
    scale: float = 1.0  # kernel throughput share of one device (shared cores: 1/P)

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

    @classmethod
    def from_json(cls, path) -> Profile:
        raw = json.loads(pathlib.Path(path).read_text())
        fields = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in raw["profile"].items() if k in fields})


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


def _ring_part(impl, pr, s: Shape, heads, kv_heads, seq_len, prof: Profile, flops_dev):
    """(compute s, comm s) of a ring/TokenRing pass of pr steps, fwd+bwd."""
    b, d = s.batch, s.head_dim
    tok = b * seq_len // pr  # tokens per ring shard
    calls = 2 * pr  # one pair call per step, forward and backward
    merge_bytes = pr * tok * heads * (d + 1) * 4 * 3  # read two partials, write one (fwd)
    merge_bytes += pr * tok * kv_heads * d * 4 * 2 * 2  # dK/dV (or dQ) accumulation (bwd)
    # pair calls: L × L, or causal L × L/2 halves (one causal L × L on the diagonal)
    rate = prof.flops_at(tok // b // (2 if s.causal else 1), False) * prof.scale
    compute = flops_dev / rate + calls * prof.call_s + merge_bytes / prof.mem_bw
    sent = comm.attention_bytes(impl, batch=b, seq_len=seq_len, heads=heads,
                                kv_heads=kv_heads, head_dim=d, shards=pr,
                                itemsize=s.itemsize, backward=True, causal=s.causal)
    total = sum(sent.values())
    if impl == "tokenring" and prof.bidirectional:
        # queries one way, partials (and dQ) the other: the busier direction sets the time
        q_way = (pr - 1) * tok * heads * d * s.itemsize * 3 + (pr - 1) * tok * heads * 8
        total = max(q_way, total - q_way)
    steps = 2 * (pr - 1) + 1 if pr > 1 else 0  # forward P−1 hops, backward P
    link = total / prof.link_bw + steps * prof.latency_s
    return compute, link


def predict(c: Candidate, s: Shape, prof: Profile) -> float:
    """Predicted seconds of one fwd+bwd attention call (all layers' calls scale alike)."""
    total = math.prod(c.shards)
    flops = 4 * s.batch * s.seq_len ** 2 * s.heads * s.head_dim * (0.5 if s.causal else 1)
    flops_dev = 3.5 * flops / total
    if prof.shared_cores:  # host devices: every device's work runs on the same cores
        prof = dataclasses.replace(prof, mem_bw=prof.mem_bw / total,
                                   link_bw=prof.link_bw / total, call_s=prof.call_s * total,
                                   scale=1 / total)
    if c.impl == "ulysses":
        sent = comm.attention_bytes("ulysses", batch=s.batch, seq_len=s.seq_len,
                                    heads=s.heads, kv_heads=s.kv_heads, head_dim=s.head_dim,
                                    shards=total, itemsize=s.itemsize, backward=True)
        rate = prof.flops_at(s.seq_len, s.causal) * prof.scale  # one call, whole sequence
        compute = flops_dev / rate + 2 * prof.call_s
        return compute + sum(sent.values()) / prof.link_bw + 4 * prof.latency_s
    if c.impl in ("ring", "tokenring"):
        compute, link = _ring_part(c.impl, total, s, s.heads, s.kv_heads, s.seq_len, prof,
                                   flops_dev)
    else:  # hybrid: Ulysses all-to-alls over pu, then the ring over pr on H/pu heads
        pr, pu = c.shards
        kv_u = s.kv_heads if s.kv_heads % pu == 0 else pu
        a2a = comm.attention_bytes("ulysses", batch=s.batch, seq_len=s.seq_len // pr,
                                   heads=s.heads, kv_heads=s.kv_heads, head_dim=s.head_dim,
                                   shards=pu, itemsize=s.itemsize, backward=True)
        compute, link = _ring_part(c.ring_impl, pr, s, s.heads // pu, kv_u // pu, s.seq_len,
                                   prof, flops_dev)
        link_u = sum(a2a.values()) / prof.link_bw + 4 * prof.latency_s
        return (max(compute, link) if prof.overlap else compute + link) + link_u
    return max(compute, link) if prof.overlap else compute + link


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
