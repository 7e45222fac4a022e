"""Structural proof of overlap (hlo_report) and "no hidden extra traffic" (jaxpar.comm).

CPU collective-permute is synchronous, so overlap cannot show in wall time here; what can be
checked is that every decomposed transfer has a matmul it does not depend on (and that
does not depend on it), that the plain path has none, and that the bytes are the same.
"""
import jax
import jax.numpy as jnp
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxpar import comm
from jaxpar.mesh import make_mesh
from jaxpar.overlap import collective_matmul as cm
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
    assert c.independent_matmuls == ("f2",)
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
