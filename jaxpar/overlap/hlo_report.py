"""Which transfer can run beside which matmul, and how much of it that compute can hide,
read from compiled HLO.

On CPU, collective-permute is synchronous, so no wall-clock measurement can show overlap.
The structural proof is the dependence graph: a collective C can overlap a matmul M only if
neither depends on the other (M is not an ancestor of C, nor a descendant). This module
reads the compiled HLO through `jaxpar.comm.parse_hlo`, builds each computation's
data-dependence graph (operands and control-predecessors), marks matmuls (dot /
convolution, also inside fusions, while loops and other called computations, and matmul
custom-calls), and lists, per collective, its bytes (from `jaxpar.comm`) and the matmuls
independent of it.

How much each transfer can be hidden, at a link bandwidth and a matmul throughput (a
`cost_model.Hardware`; default `GPU_NVLINK`: 300 GB/s per direction, the H200 matmul table):

  transfer_s   link_latency + bytes / link_bandwidth, for one execution of the collective
               (a ring collective's several hops and two directions are not modelled; the
               plain collectives have nothing beside them anyway).
  flops        of a matmul instruction: 2·(result elements)·(contracted size) for a dot or
               a matmul custom-call, summed through fusions and calls, × the trip count of a
               while loop, averaged over a conditional's branches.
  beside       the independent matmuls paired with this transfer. Each matmul's compute can
               hide only one transfer, so matmuls are handed out: collectives in program
               order, each takes unclaimed independent matmuls, most urgent first (the one a
               later collective needs soonest), until their time covers its transfer.
  compute_s    the beside matmuls' time, each at `cost_model.matmul_throughput(flops)`.
  hidden_fraction  min(1, compute_s / transfer_s).

A plain all_gather → dot has no independent matmul; a collective matmul has one block
beside every hop (a half block for `bidi`, whose hop carries half the bytes).
`independent_flops` is the looser bound: every independent matmul, shared or not.
Transfers in flight at the same time could share the same compute: on different links
(the two directions of a `bidi` step), or one after the other beside one long kernel (a
ring attention step's K hop and V hop beside its block computation, where the second finds
the step's kernel taken). The pairing hands out whole kernels and credits neither, so it
is conservative there. All of this says overlap is *possible*; whether a backend's scheduler
realizes it is a runtime question (measured on an accelerator, not here).
"""
from __future__ import annotations

import dataclasses
import functools
import math
import re
from typing import Callable

from jaxpar import comm
from jaxpar.overlap import cost_model

_MATMUL_OPCODES = {"dot", "convolution"}
_MATMUL_CUSTOM_CALL = re.compile(r'custom_call_target="[^"]*(matmul|gemm|conv|dot)', re.I)
_CALL_ATTRS = ("calls", "to_apply", "body", "condition", "branch_computations",
               "called_computations", "true_computation", "false_computation")
_BRANCH_ATTRS = ("branch_computations", "true_computation", "false_computation")
_LHS_CONTRACTING = re.compile(r"lhs_contracting_dims=\{([0-9,]*)\}")
_GEMM_CONTRACTING = re.compile(r'"lhs_contracting_dimensions":\[([^\]]*)\]')
_DIM_LABELS = re.compile(r"dim_labels=\w+_(\w+)->")


@dataclasses.dataclass(frozen=True)
class CollectiveInfo:
    name: str
    kind: str
    computation: str
    bytes_per_device: float          # per run of the module (× trip counts of enclosing loops)
    independent_matmuls: tuple[str, ...]
    independent_flops: float = 0.0   # FLOPs of all of them (an upper bound on what can hide it)
    beside: tuple[str, ...] = ()     # the matmuls paired with this transfer
    beside_flops: float = 0.0
    transfer_s: float = 0.0          # one execution at the report's link bandwidth
    compute_s: float = 0.0           # the beside matmuls at the report's matmul throughput
    executions: float = 1.0          # per run of the module (loop trip counts)

    @property
    def overlappable(self) -> bool:
        return bool(self.independent_matmuls)

    @property
    def hidden_fraction(self) -> float:
        """Share of this transfer's time the matmuls beside it can cover (0..1)."""
        if self.transfer_s <= 0:
            return 1.0
        return min(1.0, self.compute_s / self.transfer_s)


@dataclasses.dataclass(frozen=True)
class HloReport:
    collectives: tuple[CollectiveInfo, ...]
    matmuls: int
    hardware: cost_model.Hardware | None = None

    @property
    def total_bytes(self) -> float:
        return sum(c.bytes_per_device for c in self.collectives)

    @property
    def overlappable_bytes(self) -> float:
        return sum(c.bytes_per_device for c in self.collectives if c.overlappable)

    @property
    def overlap_fraction(self) -> float:
        """Share of bytes sent by collectives that have an independent matmul (0 if none sent)."""
        total = self.total_bytes
        return self.overlappable_bytes / total if total else 0.0

    @property
    def transfer_s(self) -> float:
        """All transfers' time per run of the module, back to back."""
        return sum(c.transfer_s * c.executions for c in self.collectives)

    @property
    def hidden_s(self) -> float:
        """The part of `transfer_s` the paired matmuls can cover."""
        return sum(min(c.compute_s, c.transfer_s) * c.executions for c in self.collectives)

    @property
    def hidden_fraction(self) -> float:
        """hidden_s / transfer_s (0 if nothing is sent)."""
        total = self.transfer_s
        return self.hidden_s / total if total else 0.0

    def table(self) -> str:
        rows = [f"{'collective':<28} {'kind':<19} {'bytes/dev':>10} {'xfer µs':>9} "
                f"{'beside FLOP':>11} {'comp µs':>9} {'hidden':>6}  beside"]
        for c in self.collectives:
            mm = ", ".join(c.beside[:3]) + (" …" if len(c.beside) > 3 else "")
            rows.append(f"{c.name:<28} {c.kind:<19} {c.bytes_per_device:>10.0f} "
                        f"{c.transfer_s * 1e6:>9.3g} {c.beside_flops:>11.3g} "
                        f"{c.compute_s * 1e6:>9.3g} {c.hidden_fraction:>6.0%}  {mm or '-'}")
        hw = f" at {self.hardware.link_bandwidth / 1e9:g} GB/s" if self.hardware else ""
        rows.append(f"{len(self.collectives)} collectives, {self.matmuls} matmuls, "
                    f"{self.overlap_fraction:.0%} of bytes overlappable, "
                    f"{self.hidden_fraction:.0%} of transfer time hidden{hw}")
        return "\n".join(rows)


def _matmul_computations(comps) -> set[str]:
    """Computations that contain a matmul, directly or through the computations they call."""
    direct = {name for name, body in comps.items()
              if any(_is_direct_matmul(i) for i in body.values())}
    result, changed = set(direct), True
    while changed:
        changed = False
        for name, body in comps.items():
            if name not in result and any(c in result for i in body.values()
                                          for c in i.called(*_CALL_ATTRS)):
                result.add(name)
                changed = True
    return result


def _is_direct_matmul(ins: comm.HloInstruction) -> bool:
    return ins.opcode in _MATMUL_OPCODES or (
        ins.opcode == "custom-call" and bool(_MATMUL_CUSTOM_CALL.search(ins.line)))


def _closure(start: str, edges: dict[str, list[str]]) -> set[str]:
    seen, stack = set(), [start]
    while stack:
        for nxt in edges.get(stack.pop(), ()):
            if nxt not in seen:
                seen.add(nxt)
                stack.append(nxt)
    return seen


# ----------------------------------------------------------------------------- FLOPs

def _dims(body: dict[str, comm.HloInstruction], name: str) -> tuple[int, ...] | None:
    ins = body.get(name)
    arrays = comm.shape_dims(ins.shape) if ins else []
    return arrays[0][1] if arrays else None


def _direct_flops(ins: comm.HloInstruction, body: dict[str, comm.HloInstruction]) -> float:
    """FLOPs of one dot / convolution / matmul custom-call (0 if its shapes are unknown)."""
    out = comm.shape_dims(ins.shape)
    lhs = _dims(body, ins.operands[0]) if ins.operands else None
    if not out or lhs is None:
        return 0.0
    out_elems = math.prod(out[0][1])
    if ins.opcode == "convolution":
        kernel = _dims(body, ins.operands[1]) if len(ins.operands) > 1 else None
        labels = _DIM_LABELS.search(ins.attrs)
        if kernel is None or labels is None or "o" not in labels.group(1):
            return 0.0
        return 2.0 * out_elems * math.prod(kernel) / kernel[labels.group(1).index("o")]
    m = _LHS_CONTRACTING.search(ins.attrs) or _GEMM_CONTRACTING.search(ins.attrs)
    if m is None:
        return 0.0
    contracted = [int(d.strip(' "')) for d in m.group(1).split(",") if d.strip(' "')]
    return 2.0 * out_elems * math.prod(lhs[d] for d in contracted)


def _cost_fn(comps, hw: cost_model.Hardware):
    """cost(instruction, its computation's body) -> (FLOPs, seconds): every dot inside at
    `cost_model.matmul_throughput` of its own FLOPs, loops × trip count, branches averaged."""

    def add(a, b, scale=1.0):
        return a[0] + scale * b[0], a[1] + scale * b[1]

    @functools.lru_cache(maxsize=None)
    def comp_cost(name: str) -> tuple[float, float]:
        body = comps.get(name, {})
        total = (0.0, 0.0)
        for i in body.values():
            total = add(total, ins_cost(i, body))
        return total

    def calls_cost(names, scale=1.0):
        total = (0.0, 0.0)
        for c in names:
            total = add(total, comp_cost(c), scale)
        return total

    def ins_cost(ins: comm.HloInstruction, body) -> tuple[float, float]:
        if _is_direct_matmul(ins):
            f = _direct_flops(ins, body)
            return f, (f / cost_model.matmul_throughput(f, hw) if f else 0.0)
        if ins.opcode == "while":
            return calls_cost(ins.called("body"), float(comm.trip_count(ins) or 1))
        branches = ins.called(*_BRANCH_ATTRS)
        if branches:
            return calls_cost(branches, 1.0 / len(branches))
        return calls_cost(ins.called("calls", "to_apply", "called_computations"))

    return ins_cost


# ---------------------------------------------------------------------------- report

def hlo_report(hlo_text: str, hardware: cost_model.Hardware | None = None, *,
               link_bandwidth: float | None = None) -> HloReport:
    """Every collective in the module: its bytes per device, its independent matmuls, and how
    much of its transfer the matmuls paired with it can hide (see the module docstring).

    `hardware` gives the link (bandwidth, latency) and the matmul throughput; default
    `cost_model.GPU_NVLINK`. `link_bandwidth` (bytes/s, one direction) overrides its link.
    """
    hw = hardware or cost_model.GPU_NVLINK
    if link_bandwidth is not None:
        hw = hw.replace(link_bandwidth=link_bandwidth)
    module = comm.parse_hlo(hlo_text)
    comps = module.computations
    with_matmul = _matmul_computations(comps)
    ops = {op.name: op for op in comm.collectives_from_hlo(module)}
    weights = comm.computation_weights(module) if ops else {}
    ins_cost = _cost_fn(comps, hw)
    infos, n_matmuls = [], 0
    for comp_name, body in comps.items():
        matmuls = [i.name for i in body.values()
                   if _is_direct_matmul(i) or any(c in with_matmul for c in i.called(*_CALL_ATTRS))]
        n_matmuls += sum(1 for i in body.values() if _is_direct_matmul(i))
        collectives = [i for i in body.values() if i.collective_kind is not None]
        if not collectives:
            continue
        pos = {name: n for n, name in enumerate(body)}
        cost = {m: ins_cost(body[m], body) for m in matmuls}
        flops = {m: f for m, (f, _) in cost.items()}
        mm_s = {m: t for m, (_, t) in cost.items()}
        preds = {i.name: [o for o in i.operands if o in body] for i in body.values()}
        succs: dict[str, list[str]] = {}
        for name, ps in preds.items():
            for p in ps:
                succs.setdefault(p, []).append(name)
        ancestors = {c.name: _closure(c.name, preds) for c in collectives}
        dependent = {c.name: ancestors[c.name] | _closure(c.name, succs) for c in collectives}
        # A matmul's urgency: the program position of the first collective that needs it.
        deadline = {m: min((pos[c.name] for c in collectives if m in ancestors[c.name]),
                           default=len(pos)) for m in matmuls}
        claimed: set[str] = set()
        executions = weights.get(comp_name, 1.0)
        for c in collectives:
            free = tuple(m for m in matmuls if m not in dependent[c.name] and m != c.name)
            op = ops.get(c.name)
            sent = op.bytes_per_device if op else 0.0
            transfer = hw.link_latency + sent / max(executions, 1e-30) / hw.link_bandwidth
            beside, covered = [], 0.0
            for m in sorted((m for m in free if m not in claimed),
                            key=lambda m: (deadline[m], pos[m])):
                if covered >= transfer:
                    break
                beside.append(m)
                claimed.add(m)
                covered += mm_s[m]
            infos.append(CollectiveInfo(
                c.name, c.collective_kind, comp_name, sent, free,
                independent_flops=sum(flops[m] for m in free), beside=tuple(beside),
                beside_flops=sum(flops[m] for m in beside), transfer_s=transfer,
                compute_s=covered, executions=executions))
    return HloReport(tuple(infos), n_matmuls, hw)


def report(fn: Callable, *args, hardware: cost_model.Hardware | None = None,
           **kwargs) -> HloReport:
    """hlo_report of `jax.jit(fn)` compiled for these arguments."""
    return hlo_report(comm.compiled_hlo(fn, *args, **kwargs), hardware)
