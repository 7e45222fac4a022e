"""Structural proof of overlap (hlo_report) and "no hidden extra traffic" (jaxpar.comm).

CPU collective-permute is synchronous, so overlap cannot show in wall time here; what can be
checked is that every decomposed transfer has a matmul it does not depend on (and that
does not depend on it), that the plain path has none, that the bytes are the same, and how
many FLOPs sit beside each transfer (so how much of it they can hide at a given link and
matmul rate).
"""
import jax
import jax.numpy as jnp
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxpar import comm
from jaxpar.mesh import make_mesh
from jaxpar.overlap import collective_matmul as cm
from jaxpar.overlap import cost_model
from jaxpar.overlap.hlo_report import hlo_report

T = "tensor"
FUNCS = ("all_gather_matmul", "matmul_reduce_scatter", "matmul_all_reduce")
# (x global shape, x spec, w global shape, w spec, y spec)
LAYOUT = {
    "all_gather_matmul": ((2, 32, 16), P(None, T, None), (16, 64), P(None, T), P(None, None, T)),
    "matmul_reduce_scatter": ((2, 32, 64), P(None, None, T), (64, 16), P(T, None),
                              P(None, T, None)),
    "matmul_all_reduce": ((2, 32, 64), P(None, None, T), (64, 16), P(T, None), P(T)),
}
# Each op's per-device matmul is [64, 16] @ [16, 16] (all_gather_matmul: the gathered 2×32
# rows times a 16-column shard; the reduce ops: 64 rows, a 16-wide contraction shard):
MATMUL_FLOPS = 2 * 64 * 16 * 16
# Round numbers, no latency: 1 GB/s links with 1 TFLOP/s matmuls (compute far shorter than
# a hop at these sizes), or with 1 MFLOP/s matmuls (any block outlasts any hop).
FAST_MM = cost_model.Hardware("toy: 1 GB/s, 1 TFLOP/s", 1e9, 0.0, 1e12, 1.0, 1e18, 0.0)
SLOW_MM = FAST_MM.replace(name="toy: 1 GB/s, 1 MFLOP/s", peak_flops=1e6)


def _program(name, impl, p, direction, *, grad):
    """Compiled HLO of impl (forward, or forward + vjp with a per-device cotangent)."""
    mesh = make_mesh(tensor=p, devices=jax.devices()[:p])
    x_shape, x_spec, w_shape, w_spec, y_spec = LAYOUT[name]
    x = jax.device_put(jnp.ones(x_shape), NamedSharding(mesh, x_spec))
    w = jax.device_put(jnp.ones(w_shape), NamedSharding(mesh, w_spec))

    def body(x, w):
        fn = lambda x, w: impl(x, w, axis_name=T, direction=direction)  # noqa: E731
        if not grad:
            return fn(x, w)
        y, vjp = jax.vjp(fn, x, w)
        return vjp(jnp.sin(y))  # a device-varying cotangent

    out_spec = (x_spec, w_spec) if grad else y_spec
    f = jax.shard_map(body, mesh=mesh, in_specs=(x_spec, w_spec), out_specs=out_spec)
    return comm.compiled_hlo(f, x, w)


@pytest.mark.parametrize("name", FUNCS)
def test_plain_has_no_overlap_decomposed_has_full_overlap(name):
    p = 4
    plain = hlo_report(_program(name, getattr(cm, "plain_" + name), p, "uni", grad=False))
    assert plain.collectives and plain.matmuls >= 1
    assert not any(c.overlappable for c in plain.collectives), plain.table()
    assert plain.overlap_fraction == 0.0
    for direction in ("uni", "bidi"):
        rep = hlo_report(_program(name, getattr(cm, name), p, direction, grad=False))
        kinds = {c.kind for c in rep.collectives}
        assert kinds == {"collective-permute"}, kinds
        hops = (p - 1) * (2 if direction == "bidi" else 1) * (4 if name == "matmul_all_reduce"
                                                              else 1)
        assert len(rep.collectives) == hops, rep.table()
        assert all(c.overlappable for c in rep.collectives), rep.table()
        assert rep.overlap_fraction == 1.0
        # No hidden extra traffic: the same bytes as the one plain collective.
        assert rep.total_bytes == pytest.approx(plain.total_bytes), (rep.table(), plain.table())


@pytest.mark.parametrize("name", FUNCS)
def test_forward_and_backward_bytes_equal_plain(name):
    p = 4
    plain = comm.total_bytes(_program(name, getattr(cm, "plain_" + name), p, "uni", grad=True))
    ours = comm.bytes_by_kind(_program(name, getattr(cm, name), p, "uni", grad=True))
    assert set(ours) == {"collective-permute"}
    assert ours["collective-permute"] == pytest.approx(plain)


@pytest.mark.slow
@pytest.mark.parametrize("p", [2, 8])
@pytest.mark.parametrize("direction", ["uni", "bidi"])
@pytest.mark.parametrize("name", FUNCS)
def test_bytes_and_overlap_matrix(name, direction, p):
    for grad in (False, True):
        plain = hlo_report(_program(name, getattr(cm, "plain_" + name), p, direction, grad=grad))
        rep = hlo_report(_program(name, getattr(cm, name), p, direction, grad=grad))
        assert rep.total_bytes == pytest.approx(plain.total_bytes)
        if not grad:
            assert rep.overlap_fraction == 1.0 and plain.overlap_fraction == 0.0


@pytest.mark.parametrize("direction", ["uni", "bidi"])
@pytest.mark.parametrize("name", FUNCS)
def test_flops_beside_each_hop_are_one_block(name, direction):
    """Each hop is paired with one matmul of the ring: a [rows/P, k] @ [k, n] block (half
    the rows for bidi, half the columns too for all-reduce), 2·m·k·n FLOPs of that block."""
    p, ways = 4, (2 if direction == "bidi" else 1)
    pieces = p * ways * (2 if name == "matmul_all_reduce" else 1)
    piece_flops = MATMUL_FLOPS / pieces
    hlo = _program(name, getattr(cm, name), p, direction, grad=False)
    rep = hlo_report(hlo, SLOW_MM)
    paired = [c for c in rep.collectives if c.beside]
    for c in paired:
        assert len(c.beside) == 1 and c.beside_flops == piece_flops, rep.table()
        assert c.compute_s == pytest.approx(piece_flops / 1e6)
        assert c.transfer_s == pytest.approx(c.bytes_per_device / 1e9)
        assert c.hidden_fraction == 1.0
    # The ring's first block feeds (all-gather: depends on) every hop; every other block
    # finds a hop. All-reduce: 2P·ways pieces for 4(P-1)·ways hops; its last quarter of
    # hops (the final all-gather) has nothing left beside it.
    hops = len(rep.collectives)
    expected = hops if name != "matmul_all_reduce" else pieces
    assert len(paired) == expected, rep.table()
    assert sum(c.beside_flops for c in rep.collectives) == expected * piece_flops
    assert rep.hidden_fraction == pytest.approx(expected / hops)


@pytest.mark.parametrize("name", ["all_gather_matmul", "matmul_reduce_scatter"])
def test_independent_flops_grow_along_the_ring_and_hidden_time_is_compute_over_transfer(name):
    p, block = 4, MATMUL_FLOPS / 4
    hlo = _program(name, getattr(cm, name), p, "uni", grad=False)
    rep = hlo_report(hlo, FAST_MM)
    # All-gather: hop s has the s blocks already here beside it; reduce-scatter: hop s has
    # the P-s blocks not yet added.
    assert sorted(c.independent_flops for c in rep.collectives) == [block, 2 * block,
                                                                    3 * block]
    hop_bytes = 2 * 8 * 16 * 4  # one block of x (all-gather) or of the fp32 result
    for c in rep.collectives:
        assert c.bytes_per_device == hop_bytes and c.transfer_s == pytest.approx(hop_bytes / 1e9)
    compute = sum(c.compute_s for c in rep.collectives)
    assert compute == pytest.approx(3 * block / 1e12)
    assert rep.transfer_s == pytest.approx(3 * hop_bytes / 1e9)
    assert rep.hidden_fraction == pytest.approx(compute / rep.transfer_s)
    if name == "all_gather_matmul":  # one candidate per hop: exactly one block each
        assert all(c.beside_flops == block for c in rep.collectives), rep.table()
        assert all(c.hidden_fraction == pytest.approx(block / 1e12 / (hop_bytes / 1e9))
                   for c in rep.collectives)
    # A twice faster link halves every transfer and doubles the hidden share.
    fast = hlo_report(hlo, FAST_MM, link_bandwidth=2e9)
    assert fast.transfer_s == pytest.approx(rep.transfer_s / 2)
    assert fast.hidden_fraction == pytest.approx(2 * rep.hidden_fraction)


@pytest.mark.parametrize("name", FUNCS)
def test_plain_collective_has_nothing_beside_it(name):
    rep = hlo_report(_program(name, getattr(cm, "plain_" + name), 4, "uni", grad=False),
                     SLOW_MM)
    for c in rep.collectives:
        assert c.beside == () and c.beside_flops == 0 and c.independent_flops == 0
        assert c.hidden_fraction == 0.0
    assert rep.hidden_fraction == 0.0 and rep.transfer_s > 0


_WHILE_HLO = """HloModule m, num_partitions=2

%dot_fusion (p0: f32[4,8], p1: f32[8,8]) -> f32[4,8] {
  %p0 = f32[4,8]{1,0} parameter(0)
  %p1 = f32[8,8]{1,0} parameter(1)
  ROOT %d = f32[4,8]{1,0} dot(%p0, %p1), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}

%cond (cp: (s32[], f32[4,8], f32[8,8])) -> pred[] {
  %cp = STATE parameter(0)
  %ci = s32[] get-tuple-element(%cp), index=0
  %three = s32[] constant(3)
  ROOT %lt = pred[] compare(%ci, %three), direction=LT
}

%body (bp: (s32[], f32[4,8], f32[8,8])) -> (s32[], f32[4,8], f32[8,8]) {
  %bp = STATE parameter(0)
  %i = s32[] get-tuple-element(%bp), index=0
  %x = f32[4,8]{1,0} get-tuple-element(%bp), index=1
  %w = f32[8,8]{1,0} get-tuple-element(%bp), index=2
  %one = s32[] constant(1)
  %i1 = s32[] add(%i, %one)
  %y = f32[4,8]{1,0} fusion(%x, %w), kind=kOutput, calls=%dot_fusion
  ROOT %out = STATE tuple(%i1, %y, %w)
}

ENTRY %main (a: f32[4,8], w: f32[8,8]) -> (f32[4,8], f32[4,8]) {
  %a = f32[4,8]{1,0} parameter(0)
  %w0 = f32[8,8]{1,0} parameter(1)
  %zero = s32[] constant(0)
  %cperm = f32[4,8]{1,0} collective-permute(%a), channel_id=1, source_target_pairs={{0,1},{1,0}}
  %init = STATE tuple(%zero, %a, %w0)
  %loop = STATE while(%init), condition=%cond, body=%body, backend_config=TRIPS
  %res = f32[4,8]{1,0} get-tuple-element(%loop), index=1
  ROOT %t = (f32[4,8]{1,0}, f32[4,8]{1,0}) tuple(%cperm, %res)
}
""".replace("TRIPS", '{"known_trip_count":{"n":"3"}}').replace(
    "STATE", "(s32[], f32[4,8]{1,0}, f32[8,8]{1,0})")


def test_report_sees_matmuls_inside_while_loop_bodies():
    """A while loop (condition= before body=, the attribute order a regex once missed) whose
    body runs a dot in a fusion: the loop counts as a matmul, with trip count × its FLOPs."""
    rep = hlo_report(_WHILE_HLO, FAST_MM)
    (c,) = rep.collectives
    assert c.name == "cperm" and c.bytes_per_device == 4 * 8 * 4
    assert c.independent_matmuls == ("loop",) and c.beside == ("loop",)
    assert c.independent_flops == c.beside_flops == 3 * 2 * 4 * 8 * 8
    assert c.hidden_fraction == pytest.approx((3 * 2 * 4 * 8 * 8 / 1e12) / (128 / 1e9))
    dependent = hlo_report(_WHILE_HLO.replace("tuple(%zero, %a, %w0)",
                                              "tuple(%zero, %cperm, %w0)"), FAST_MM)
    assert not dependent.collectives[0].overlappable
    assert dependent.hidden_fraction == 0.0


def test_report_sees_a_compiled_fori_loop_beside_a_ppermute():
    p, steps = 4, 5
    mesh = make_mesh(tensor=p, devices=jax.devices()[:p])

    def body(x, w):
        y = jax.lax.ppermute(x, T, [(i, (i + 1) % p) for i in range(p)])
        z = jax.lax.fori_loop(0, steps, lambda i, acc: jnp.tanh(acc @ w), x)
        return y + z

    x = jax.device_put(jnp.ones((4 * 8, 16)), NamedSharding(mesh, P(T, None)))
    w = jax.device_put(jnp.ones((16, 16)), NamedSharding(mesh, P()))
    f = jax.shard_map(body, mesh=mesh, in_specs=(P(T, None), P()), out_specs=P(T, None))
    hlo = comm.compiled_hlo(f, x, w)
    assert " while(" in hlo  # the loop survived compilation (else this test tests nothing)
    (c,) = hlo_report(hlo, FAST_MM).collectives
    assert c.overlappable and c.beside_flops == steps * 2 * 8 * 16 * 16


def test_report_finds_matmul_inside_fusion_and_dependence():
    """A hand-written HLO: the permute feeding a dot is dependent, a second dot is free."""
    hlo = """HloModule m, num_partitions=2

%fused (p0: f32[4,4], p1: f32[4,4]) -> f32[4,4] {
  %p0 = f32[4,4]{1,0} parameter(0)
  %p1 = f32[4,4]{1,0} parameter(1)
  ROOT %d = f32[4,4]{1,0} dot(%p0, %p1), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}

ENTRY %main (a: f32[4,4], b: f32[4,4]) -> (f32[4,4], f32[4,4]) {
  %a = f32[4,4]{1,0} parameter(0)
  %b = f32[4,4]{1,0} parameter(1)
  %cp = f32[4,4]{1,0} collective-permute(%a), channel_id=1, source_target_pairs={{0,1},{1,0}}
  %f1 = f32[4,4]{1,0} fusion(%cp, %b), kind=kOutput, calls=%fused
  %f2 = f32[4,4]{1,0} fusion(%a, %b), kind=kOutput, calls=%fused
  ROOT %t = (f32[4,4]{1,0}, f32[4,4]{1,0}) tuple(%f1, %f2)
}
"""
    rep = hlo_report(hlo)
    (c,) = rep.collectives
    assert c.name == "cp" and c.bytes_per_device == 64
    assert c.independent_matmuls == ("f2",) and c.beside == ("f2",)
    assert c.independent_flops == c.beside_flops == 2 * 4 * 4 * 4
    dependent_only = hlo.replace("fusion(%a, %b)", "fusion(%f1, %b)")
    assert not hlo_report(dependent_only).collectives[0].overlappable


# ----------------------------------------------------------------------------- errors

def _trace(fn, x_shape, w_shape, p=4, x_spec=P(None, None, T), w_spec=P(T, None), **kw):
    mesh = make_mesh(tensor=p, devices=jax.devices()[:p])
    f = jax.shard_map(lambda x, w: fn(x, w, axis_name=T, **kw), mesh=mesh,
                      in_specs=(x_spec, w_spec), out_specs=P(T))
    jax.eval_shape(f, jax.ShapeDtypeStruct(x_shape, jnp.float32),
                   jax.ShapeDtypeStruct(w_shape, jnp.float32))


def test_rows_not_divisible_names_shape_axis_and_choices():
    with pytest.raises(ValueError, match=r"rows=10 .*x\[2, 10, 4\].*size 4 of axis 'tensor'"
                                         r".*multiples of 4.*\[1, 2, 5, 10\]"):
        _trace(cm.matmul_reduce_scatter, (2, 10, 16), (16, 8))
    with pytest.raises(ValueError, match="rows=6"):
        _trace(cm.matmul_all_reduce, (6, 16), (16, 8), x_spec=P(None, T))


def test_bad_direction_lists_choices():
    with pytest.raises(ValueError, match=r"direction='both'.*\('uni', 'bidi'\)"):
        _trace(cm.matmul_reduce_scatter, (2, 8, 16), (16, 8), direction="both")


def test_bidi_needs_two_rows_per_block():
    with pytest.raises(ValueError, match="bidi.*1 row"):
        _trace(cm.all_gather_matmul, (2, 4, 16), (16, 8), x_spec=P(None, T, None),
               w_spec=P(None, T), direction="bidi")
    with pytest.raises(ValueError, match="bidi.*1 row"):
        _trace(cm.matmul_reduce_scatter, (2, 4, 16), (16, 8), direction="bidi")


def test_contraction_mismatch_and_all_reduce_columns():
    with pytest.raises(ValueError, match=r"contraction mismatch.*x\[2, 8, 4\].*w\[3, 8\]"):
        _trace(cm.matmul_reduce_scatter, (2, 8, 16), (12, 8))
    with pytest.raises(ValueError, match="at least 2 output columns"):
        _trace(cm.matmul_all_reduce, (2, 8, 16), (16, 1))
