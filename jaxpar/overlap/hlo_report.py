"""Which transfer can run beside which matmul, read from compiled HLO.

On CPU, collective-permute is synchronous, so no wall-clock measurement can show overlap.
The structural proof is the dependence graph: a collective C can overlap a matmul M only if
neither depends on the other (M is not an ancestor of C, nor a descendant). This module
reads the compiled HLO through `jaxpar.comm.parse_hlo`, builds each computation's
data-dependence graph (operands and control-predecessors), marks matmuls (dot /
convolution, also inside fusions, loops and other called computations, and matmul
custom-calls), and lists, per collective, its bytes (from `jaxpar.comm`) and the matmuls
independent of it.

A plain all_gather → dot has no such matmul; a collective matmul has one for every hop.
This says overlap is *possible*; whether a backend's scheduler realizes it is a runtime
question (measured on an accelerator, not here).
"""
from __future__ import annotations

import dataclasses
import re
from typing import Callable

from jaxpar import comm

_MATMUL_OPCODES = {"dot", "convolution"}
_MATMUL_CUSTOM_CALL = re.compile(r'custom_call_target="[^"]*(matmul|gemm|conv|dot)', re.I)
_CALL_ATTRS = ("calls", "to_apply", "body", "condition", "branch_computations",
               "called_computations")


@dataclasses.dataclass(frozen=True)
class CollectiveInfo:
    name: str
    kind: str
    computation: str
    bytes_per_device: float
    independent_matmuls: tuple[str, ...]

    @property
    def overlappable(self) -> bool:
        return bool(self.independent_matmuls)


@dataclasses.dataclass(frozen=True)
class HloReport:
    collectives: tuple[CollectiveInfo, ...]
    matmuls: int

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

    def table(self) -> str:
        rows = [f"{'collective':<32} {'kind':<20} {'bytes/dev':>10}  independent matmuls"]
        for c in self.collectives:
            mm = ", ".join(c.independent_matmuls[:3]) + (" …" if len(c.independent_matmuls) > 3
                                                        else "")
            rows.append(f"{c.name:<32} {c.kind:<20} {c.bytes_per_device:>10.0f}  {mm or '-'}")
        rows.append(f"{len(self.collectives)} collectives, {self.matmuls} matmuls, "
                    f"{self.overlap_fraction:.0%} of bytes overlappable")
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


def hlo_report(hlo_text: str) -> HloReport:
    """Every collective in the module, its bytes per device and its independent matmuls."""
    module = comm.parse_hlo(hlo_text)
    comps = module.computations
    with_matmul = _matmul_computations(comps)
    bytes_by_name = {op.name: op.bytes_per_device for op in comm.collectives_from_hlo(module)}
    infos, n_matmuls = [], 0
    for comp_name, body in comps.items():
        matmuls = [i.name for i in body.values()
                   if _is_direct_matmul(i) or any(c in with_matmul for c in i.called(*_CALL_ATTRS))]
        n_matmuls += sum(1 for i in body.values() if _is_direct_matmul(i))
        collectives = [i for i in body.values() if i.collective_kind is not None]
        if not collectives:
            continue
        preds = {i.name: [o for o in i.operands if o in body] for i in body.values()}
        succs: dict[str, list[str]] = {}
        for name, ps in preds.items():
            for p in ps:
                succs.setdefault(p, []).append(name)
        for c in collectives:
            dependent = _closure(c.name, preds) | _closure(c.name, succs)
            free = tuple(m for m in matmuls if m not in dependent and m != c.name)
            infos.append(CollectiveInfo(c.name, c.collective_kind, comp_name,
                                        bytes_by_name.get(c.name, 0.0), free))
    return HloReport(tuple(infos), n_matmuls)


def report(fn: Callable, *args, **kwargs) -> HloReport:
    """hlo_report of `jax.jit(fn)` compiled for these arguments."""
    return hlo_report(comm.compiled_hlo(fn, *args, **kwargs))
