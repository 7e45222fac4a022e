"""Collective bytes: counted from compiled HLO, and the closed-form theory.

Counting convention (bytes *sent by one device*, bandwidth-optimal ring algorithms):
  collective-permute  operand bytes × (pairs / devices)   -- a full shift: operand bytes
  all-to-all          operand bytes × (P−1)/P              -- keeps its own 1/P slice
  all-gather          result bytes × (P−1)/P
  reduce-scatter      operand bytes × (P−1)/P
  all-reduce          2 × operand bytes × (P−1)/P          -- reduce-scatter + all-gather
P is the replica-group size of that op. An op inside a while loop counts once per trip
(XLA's `known_trip_count`; a loop without one raises), an op inside a conditional counts
1/branches (exact when, as in our schedules, every branch sends the same bytes).
"""
from __future__ import annotations

import collections
import dataclasses
import math
import re
from typing import Callable

import jax
import numpy as np

KINDS = ("collective-permute", "all-to-all", "all-gather", "reduce-scatter", "all-reduce")

_DTYPE_BITS = {
    "pred": 8, "s4": 4, "u4": 4, "s8": 8, "u8": 8, "s16": 16, "u16": 16, "s32": 32, "u32": 32,
    "s64": 64, "u64": 64, "f16": 16, "bf16": 16, "f32": 32, "f64": 64, "c64": 64, "c128": 128,
    "f4e2m1fn": 4, "f8e3m4": 8, "f8e4m3": 8, "f8e4m3fn": 8, "f8e4m3fnuz": 8, "f8e5m2": 8,
    "f8e5m2fnuz": 8, "f8e4m3b11fnuz": 8, "f8e8m0fnu": 8,
}
_ARRAY = re.compile(r"\b([a-z][a-z0-9]*)\[([0-9,]*)\]")


# ---------------------------------------------------------------------------------------
# HLO text: the one parser (jaxpar.overlap.hlo_report reads HLO through it too).

_HEADER = re.compile(r"^(?P<entry>ENTRY\s+)?%?(?P<name>[\w.\-]+)\s*\(.*\{\s*$")
_LHS = re.compile(r"^\s*(ROOT\s+)?%?(?P<name>[\w.\-]+)\s*=\s*")
_OPCODE = re.compile(r"([\w\-]+)\(")
_IDENT = re.compile(r"%?([\w.\-]+)")
_CONTROL = re.compile(r"control-predecessors=\{([%\w.\-,\s]*)\}")
_CALLEE = re.compile(r"\b(calls|to_apply|body|condition|branch_computations|called_computations|"
                     r"true_computation|false_computation)=(\{[^}]*\}|%?[\w.\-]+)")


@dataclasses.dataclass(frozen=True)
class HloInstruction:
    name: str
    shape: str                  # result shape text: 'f32[4,8]{1,0}' or a tuple '(…)'
    opcode: str
    operands: tuple[str, ...]   # operand names, then control predecessors
    attrs: str                  # the text after the operand list
    line: str
    callees: tuple[tuple[str, str], ...] = ()  # (attribute, computation), e.g. ('body', 'b')

    @property
    def collective_kind(self) -> str | None:
        """One of KINDS for a collective or its async -start op, else None."""
        kind = self.opcode.removesuffix("-start")
        return kind if kind in KINDS else None

    def called(self, *keys: str) -> tuple[str, ...]:
        """Computations named by these attributes, e.g. called('calls', 'body')."""
        return tuple(name for key, name in self.callees if key in keys)


@dataclasses.dataclass(frozen=True)
class HloModule:
    computations: dict[str, dict[str, HloInstruction]]  # in text order; "" holds stray lines
    entry: str | None
    num_partitions: int


def _paren_end(text: str, start: int) -> int:
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


def parse_instruction(line: str) -> HloInstruction | None:
    """One HLO instruction line (`%name = shape opcode(operands), attrs`), else None."""
    m = _LHS.match(line)
    if not m:
        return None
    rest = line[m.end():]
    if rest.startswith("("):  # tuple shape
        cut = _paren_end(rest, 0)
        shape, rest = rest[:cut], rest[cut:].lstrip()
    else:
        shape, _, rest = rest.partition(" ")
        rest = rest.lstrip()
    op = _OPCODE.match(rest)
    if not op:
        return None
    end = _paren_end(rest, len(op.group(1)))
    operand_text, attrs = rest[len(op.group(1)) + 1:end - 1], rest[end:]
    operands = _IDENT.findall(operand_text)
    for group in _CONTROL.findall(attrs):
        operands += _IDENT.findall(group)
    callees = tuple((key, name) for key, value in _CALLEE.findall(attrs)
                    for name in _IDENT.findall(value))
    return HloInstruction(m.group("name"), shape, op.group(1), tuple(operands), attrs, line,
                          callees)


def parse_hlo(hlo_text: str) -> HloModule:
    """Computations (name -> instructions by name), the entry and num_partitions of a module."""
    parts = re.search(r"num_partitions=(\d+)", hlo_text)
    comps: dict[str, dict[str, HloInstruction]] = {}
    entry, current = None, None
    for line in hlo_text.splitlines():
        if current is None:
            m = _HEADER.match(line)
            if m:
                current = comps.setdefault(m.group("name"), {})
                entry = m.group("name") if m.group("entry") else entry
                continue
        elif line.strip() == "}":
            current = None
            continue
        ins = parse_instruction(line)
        if ins:
            (comps.setdefault("", {}) if current is None else current)[ins.name] = ins
    return HloModule(comps, entry, int(parts.group(1)) if parts else 1)


def trip_count(ins: HloInstruction) -> int | None:
    """XLA's `known_trip_count` of a while instruction, None if it has none."""
    m = re.search(r'"known_trip_count":\{"n":"(\d+)"', ins.line)
    return int(m.group(1)) if m else None


def shape_dims(shape: str) -> list[tuple[str, tuple[int, ...]]]:
    """(dtype, dims) of each array in an HLO shape string, e.g. 'f32[2,16]{1,0}' ->
    [('f32', (2, 16))]; a tuple gives one entry per element."""
    return [(dtype, tuple(int(d) for d in filter(None, dims.split(","))))
            for dtype, dims in _ARRAY.findall(shape)]


# Ops whose result is their (first) operand's values rearranged, converted or gathered: what
# `source_parameter` looks through. A fusion counts when it has a single operand.
_PASS_THROUGH = ("copy", "bitcast", "transpose", "reshape", "convert", "copy-start",
                 "copy-done", "all-gather", "all-gather-start", "all-gather-done", "fusion")


def parameter_number(ins: HloInstruction) -> int | None:
    """k of a `parameter(k)` instruction, else None."""
    if ins.opcode != "parameter":
        return None
    return int(ins.line.split("parameter(", 1)[1].split(")", 1)[0])


def source_parameter(module: HloModule, name: str) -> int | None:
    """The entry parameter number that the entry instruction `name` is a copy, bitcast,
    transpose, reshape, convert, single-operand fusion or all-gather of (followed back
    through any chain of them), else None (it is computed from more than one value)."""
    body = module.computations.get(module.entry or "", {})
    seen = set()
    while name in body and name not in seen:
        seen.add(name)
        ins = body[name]
        if ins.opcode == "parameter":
            return parameter_number(ins)
        if ins.opcode not in _PASS_THROUGH or not ins.operands or (
                ins.opcode == "fusion" and len(ins.operands) != 1):
            return None
        name = ins.operands[0]
    return None


def computation_weights(module: HloModule) -> dict[str, float]:
    """Executions of each computation reachable from the entry per run of the module: a while
    body runs `known_trip_count` times, each of P conditional branches 1/P."""
    edges: dict[str, list[tuple[str, float]]] = collections.defaultdict(list)
    for comp, body in module.computations.items():
        for ins in body.values():
            if ins.opcode == "while":
                loop = ins.called("body")[0]
                trips = trip_count(ins)
                if trips is None:
                    raise ValueError(f"while loop {loop} has no known trip count; its "
                                     f"collectives cannot be counted")
                edges[comp].append((loop, float(trips)))
            edges[comp] += [(c, 1.0) for c in ins.called("calls", "to_apply", "true_computation",
                                                          "false_computation")]
            branches = ins.called("branch_computations")
            edges[comp] += [(b, 1.0 / len(branches)) for b in branches]
    weights: dict[str, float] = collections.defaultdict(float)

    def visit(comp, w):
        weights[comp] += w
        for callee, f in edges.get(comp, ()):
            visit(callee, w * f)

    if module.entry is not None:
        visit(module.entry, 1.0)
    return dict(weights)


def _iota(text: str) -> np.ndarray:
    """The device ids of an iota list, e.g. '[4,2]T(1,0)' -> [0, 2, 4, 6, 1, 3, 5, 7]."""
    m = re.fullmatch(r"\[([0-9,]+)\](?:T\(([0-9,]+)\))?", text.strip())
    ids = np.arange(math.prod(int(d) for d in m.group(1).split(",")))
    ids = ids.reshape([int(d) for d in m.group(1).split(",")])
    if m.group(2):
        ids = ids.transpose([int(d) for d in m.group(2).split(",")])
    return ids.reshape(-1)


def replica_groups(line: str, num_partitions: int) -> list[tuple[int, ...]]:
    """The device groups of a collective's `replica_groups` (explicit `{{0,1},{2,3}}`, iota
    `[2,4]<=[4,2]T(1,0)` or mesh `mesh['axis_0'=4,'axis_1'=2], device_ids=(...) {'axis_0'}`
    form); one group of every device when it names none."""
    m = re.search(r"replica_groups=\{((?:\{[0-9,]*\},?)+)\}", line)
    if m:
        return [tuple(int(x) for x in g.split(",") if x)
                for g in re.findall(r"\{([0-9,]*)\}", m.group(1))]
    m = re.search(r"replica_groups=\[([0-9]+),([0-9]+)\]<=(\[[0-9,]+\](?:T\([0-9,]+\))?)",
                  line)
    if m:
        return [tuple(int(x) for x in row)
                for row in _iota(m.group(3)).reshape(int(m.group(1)), int(m.group(2)))]
    m = re.search(r"replica_groups=mesh\[([^\]]*)\](?:,\s*device_ids=\((\[[0-9,]+\]"
                  r"(?:T\([0-9,]+\))?)\))?\s*\{([^}]*)\}", line)
    if m:  # device_ids (default: in order) laid out row-major over the named sizes
        sizes = [(a, int(n)) for a, n in re.findall(r"'([^']+)'=(\d+)", m.group(1))]
        ids = _iota(m.group(2)) if m.group(2) else np.arange(math.prod(n for _, n in sizes))
        names = [a for a, _ in sizes]
        grouped = [names.index(a) for a in re.findall(r"'([^']+)'", m.group(3))]
        rest = [i for i in range(len(names)) if i not in grouped]
        size = math.prod(sizes[i][1] for i in grouped)
        ids = ids.reshape([n for _, n in sizes]).transpose(rest + grouped).reshape(-1, size)
        return [tuple(int(x) for x in row) for row in ids]
    return [tuple(range(num_partitions))]


def _group_size(line: str, num_partitions: int) -> int:
    return max(1, len(replica_groups(line, num_partitions)[0]))


def shape_bytes(shape: str) -> int:
    """Bytes of an HLO shape string, e.g. 'f32[2,16]{1,0}' or a tuple of them."""
    total_bits = 0
    for dtype, dims in _ARRAY.findall(shape):
        if dtype not in _DTYPE_BITS:
            continue  # token[] and friends
        n = 1
        for d in filter(None, dims.split(",")):
            n *= int(d)
        total_bits += n * _DTYPE_BITS[dtype]
    return total_bits // 8


# ---------------------------------------------------------------------------------------
# Collective bytes from HLO.


@dataclasses.dataclass(frozen=True)
class CollectiveOp:
    name: str
    kind: str
    result_bytes: int
    group_size: int
    bytes_per_device: float


def collectives_from_hlo(hlo: str | HloModule) -> list[CollectiveOp]:
    """Every collective in a compiled HLO module (text or `parse_hlo` result), with the bytes
    one device sends per run of the module (ops in loops weighted by their trip count)."""
    module = parse_hlo(hlo) if isinstance(hlo, str) else hlo
    num_partitions = module.num_partitions
    weights = computation_weights(module)
    ops = []
    for comp, body in module.computations.items():
        w = weights.get(comp, 1.0)
        for ins in body.values():
            kind = ins.collective_kind
            if kind is None:
                continue
            if ins.opcode.endswith("-start"):  # async start: (operands..., results..., ctx)
                result = shape_bytes(ins.shape) // 2
            else:
                result = shape_bytes(ins.shape)
            if kind == "collective-permute":
                pairs = re.search(r"source_target_pairs=\{(.*?)\}\}", ins.line)
                n_pairs = pairs.group(1).count("{") if pairs else num_partitions
                ops.append(CollectiveOp(ins.name, kind, result, 2,
                                        result * n_pairs / max(num_partitions, 1) * w))
                continue
            p = _group_size(ins.line, num_partitions)
            frac = (p - 1) / p
            if kind == "all-gather":
                sent = result * frac
            elif kind == "reduce-scatter":
                sent = result * p * frac  # operand is P× the result
            elif kind == "all-reduce":
                sent = 2 * result * frac
            else:  # all-to-all
                sent = result * frac
            ops.append(CollectiveOp(ins.name, kind, result, p, sent * w))
    return ops


def compiled_hlo(fn: Callable, *args, **kwargs) -> str:
    return jax.jit(fn).lower(*args, **kwargs).compile().as_text()


def bytes_by_kind(fn_or_hlo, *args, **kwargs) -> dict[str, float]:
    """{collective kind: bytes sent per device} for a function (compiled with args) or HLO text."""
    hlo = fn_or_hlo if isinstance(fn_or_hlo, str) else compiled_hlo(fn_or_hlo, *args, **kwargs)
    out: dict[str, float] = collections.defaultdict(float)
    for op in collectives_from_hlo(hlo):
        out[op.kind] += op.bytes_per_device
    return dict(out)


def total_bytes(fn_or_hlo, *args, **kwargs) -> float:
    return sum(bytes_by_kind(fn_or_hlo, *args, **kwargs).values())


# ---------------------------------------------------------------------------------------
# Closed-form bytes sent per device by the sequence-parallel attention schedules.


def attention_bytes(impl: str, *, batch: int, seq_len: int, heads: int, kv_heads: int,
                    head_dim: int, shards, itemsize: int = 4, backward: bool = False,
                    segment_ids: bool = False, causal: bool = False) -> dict[str, float]:
    """{collective kind: bytes one device sends} for a forward (+ backward) pass.

    `shards` is P, or (ring, ulysses) sizes for impl="hybrid". The backward ring turns the
    other way; for a ring of 2 both ways are one permutation and XLA reuses the forward's
    K/V transfer, so measured backward bytes are lower there than this formula. Partials,
    lse, delta and gradient accumulators of the ring schedules are fp32 (4 bytes);
    q/k/v/out/dout use `itemsize`; segment ids are int32. `causal` (zigzag) changes only
    TokenRing: its query blocks and partials (and dQ) travel without their dead first-half
    rows, 3/4 of the rows on average.
    """
    b, n, h, kh, d = batch, seq_len, heads, kv_heads, head_dim
    out: dict[str, float] = collections.defaultdict(float)
    if impl == "hybrid":
        pr, pu = shards
        kv_u = kh if kh % pu == 0 else pu
        for kind, v in attention_bytes("ulysses", batch=b, seq_len=n // pr, heads=h,
                                       kv_heads=kh, head_dim=d, shards=pu, itemsize=itemsize,
                                       backward=backward, segment_ids=segment_ids,
                                       causal=causal).items():
            if kind == "all-to-all":  # the ring runs where Ulysses ran its local attention
                out[kind] += v
        if segment_ids:  # gathered once over the Ulysses axis, forward only
            out["all-gather"] += (pu - 1) / pu * b * (n // pr) * 4
        for kind, v in attention_bytes("ring", batch=b, seq_len=n, heads=h // pu,
                                       kv_heads=kv_u // pu, head_dim=d, shards=pr,
                                       itemsize=itemsize, backward=backward,
                                       segment_ids=segment_ids, causal=causal).items():
            out[kind] += v
        return dict(out)
    p = shards
    tok = b * (n // p)  # tokens per device
    if impl == "ulysses":
        kv_u = kh if kh % p == 0 else p  # replicated K/V heads when K < P
        per_pass = (p - 1) / p * tok * d * (2 * h + 2 * kv_u) * itemsize
        out["all-to-all"] += per_pass * (2 if backward else 1)
        if segment_ids:
            out["all-gather"] += (p - 1) / p * b * n * 4
    elif impl == "ring":
        kv = (p - 1) * 2 * tok * kh * d * itemsize
        seg = (p - 1) * tok * 4 if segment_ids else 0
        out["collective-permute"] += kv + seg
        if backward:  # K/V (+ids) again, and dK/dV in fp32 for P hops
            out["collective-permute"] += kv + seg + p * 2 * tok * kh * d * 4
    elif impl == "tokenring":
        # causal: every hop of a query block or a partial carries its second half-rows; the
        # first half-rows make (P−1)/2 hops on average, the ones where they are live
        rows = (p - 1) * tok * (0.75 if causal else 1.0)
        qbytes = rows * h * d * itemsize
        seg = rows * 4 if segment_ids else 0
        partials = rows * h * (d + 1) * 4
        out["collective-permute"] += qbytes + seg + partials
        if backward:  # q, dout, lse, delta (+ids) forward; dQ partials (fp32) back
            out["collective-permute"] += 2 * qbytes + seg + rows * h * 8 + rows * h * d * 4
    else:
        raise ValueError(f"no closed form for impl={impl!r}; valid: ulysses, ring, tokenring, "
                         f"hybrid")
    return dict(out)
