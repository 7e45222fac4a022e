"""Which transfer can run beside which matmul, read from compiled HLO.

On CPU, collective-permute is synchronous, so no wall-clock measurement can show overlap.
The structural proof is the dependence graph: a collective C can overlap a matmul M only if
neither depends on the other (M is not an ancestor of C, nor a descendant). This module
parses the compiled HLO text, builds each computation's data-dependence graph (operands and
control-predecessors), marks matmuls (dot / convolution, also inside fusions and called
computations, and matmul custom-calls), and lists, per collective, its bytes (from
`jaxpar.comm`) and the matmuls independent of it.

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
_COLLECTIVE_OPCODES = {k for k in comm.KINDS} | {k + "-start" for k in comm.KINDS}
_HEADER = re.compile(r"^(ENTRY\s+)?%?(?P<name>[\w.\-]+)\s.*\{\s*$")
_LHS = re.compile(r"^\s*(ROOT\s+)?%?(?P<name>[\w.\-]+)\s*=\s*")
_CALLED = re.compile(r"\b(?:calls|to_apply|body|condition|branch_computations|"
                     r"called_computations)=\{?([%\w.\-,\s]+)\}?")
_CONTROL = re.compile(r"control-predecessors=\{([%\w.\-,\s]*)\}")
_IDENT = re.compile(r"%?([\w.\-]+)")


@dataclasses.dataclass
class _Instr:
    name: str
    opcode: str
    operands: list[str]
    called: list[str]
    line: str


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


def _split_parens(text: str, start: int) -> int:
    """Index just past the parenthesis group opening at text[start]."""
    depth = 0
    for i in range(start, len(text)):
        if text[i] == "(":
            depth += 1
        elif text[i] == ")":
            depth -= 1
            if depth == 0:
                return i + 1
    return len(text)


def _parse_instr(line: str) -> _Instr | None:
    m = _LHS.match(line)
    if not m:
        return None
    rest = line[m.end():]
    if rest.startswith("("):  # tuple shape
        rest = rest[_split_parens(rest, 0):]
    else:
        rest = rest.split(None, 1)[1] if " " in rest else ""
    rest = rest.lstrip()
    op = re.match(r"([\w\-]+)\(", rest)
    if not op:
        return None
    end = _split_parens(rest, len(op.group(1)))
    operand_text, attrs = rest[len(op.group(1)) + 1:end - 1], rest[end:]
    called = []
    for group in _CALLED.findall(attrs):
        called += _IDENT.findall(group)
    operands = _IDENT.findall(operand_text)
    for group in _CONTROL.findall(attrs):
        operands += _IDENT.findall(group)
    return _Instr(m.group("name"), op.group(1), operands, called, line)


def _parse(hlo_text: str) -> dict[str, dict[str, _Instr]]:
    comps: dict[str, dict[str, _Instr]] = {}
    current = None
    for line in hlo_text.splitlines():
        if current is None:
            m = _HEADER.match(line)
            if m and "=" not in line.split("(")[0]:
                current = comps.setdefault(m.group("name"), {})
            continue
        if line.strip() == "}":
            current = None
            continue
        ins = _parse_instr(line)
        if ins:
            current[ins.name] = ins
    return comps


def _matmul_computations(comps) -> set[str]:
    """Computations that contain a matmul, directly or through the computations they call."""
    direct = {name for name, body in comps.items()
              if any(_is_direct_matmul(i) for i in body.values())}
    result, changed = set(direct), True
    while changed:
        changed = False
        for name, body in comps.items():
            if name not in result and any(c in result for i in body.values() for c in i.called):
                result.add(name)
                changed = True
    return result


def _is_direct_matmul(ins: _Instr) -> bool:
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
    comps = _parse(hlo_text)
    with_matmul = _matmul_computations(comps)
    bytes_by_name = {op.name: op.bytes_per_device for op in comm.collectives_from_hlo(hlo_text)}
    infos, n_matmuls = [], 0
    for comp_name, body in comps.items():
        matmuls = [i.name for i in body.values()
                   if _is_direct_matmul(i) or any(c in with_matmul for c in i.called)]
        n_matmuls += sum(1 for i in body.values() if _is_direct_matmul(i))
        collectives = [i for i in body.values() if i.opcode in _COLLECTIVE_OPCODES]
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
            infos.append(CollectiveInfo(c.name, c.opcode.removesuffix("-start"), comp_name,
                                        bytes_by_name.get(c.name, 0.0), free))
    return HloReport(tuple(infos), n_matmuls)


def report(fn: Callable, *args, **kwargs) -> HloReport:
    """hlo_report of `jax.jit(fn)` compiled for these arguments."""
    return hlo_report(comm.compiled_hlo(fn, *args, **kwargs))
