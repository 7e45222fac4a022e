"""Collective matmuls equal the plain collective + matmul: values, gradients, bytes, errors.

Compile time dominates on CPU, so every (function, direction) pair for one axis size and
dtype is checked inside ONE jitted shard_map that returns relative errors.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxpar.mesh import make_mesh
from jaxpar.overlap import collective_matmul as cm

T = "tensor"
FUNCS = ("all_gather_matmul", "matmul_reduce_scatter", "matmul_all_reduce")
DIRS = ("uni", "bidi")
B, N, E, F = 2, 16, 8, 24  # global shapes; N/P >= 2 rows per block for P = 2, 4, 8

# (in_specs of x, w, dy) per function, over global arrays:
#   all_gather_matmul:     x[B,N,E] rows sharded, w[E,F] columns, y/dy[B,N,F] columns
#   matmul_reduce_scatter: x[B,N,E] contraction sharded, w[E,F] rows, y/dy[B,N,F] rows
#   matmul_all_reduce:     as above; y is per-device (typed varying), dy[P*B,N,F] per device
SPECS = {
    "all_gather_matmul": (P(None, T, None), P(None, T), P(None, None, T)),
    "matmul_reduce_scatter": (P(None, None, T), P(T, None), P(None, T, None)),
    "matmul_all_reduce": (P(None, None, T), P(T, None), P(T, None, None)),
}


def _mesh(p):
    return make_mesh(tensor=p, devices=jax.devices()[:p])


def _inputs(p, seed=0):
    ks = jax.random.split(jax.random.key(seed), 3 * len(FUNCS))
    out = []
    for i, name in enumerate(FUNCS):
        dy_shape = (p * B, N, F) if name == "matmul_all_reduce" else (B, N, F)
        out += [jax.random.normal(ks[3 * i], (B, N, E)),
                jax.random.normal(ks[3 * i + 1], (E, F)) / np.sqrt(E),
                jax.random.normal(ks[3 * i + 2], dy_shape)]
    return out


def _rel_err(a, b):
    a, b = a.astype(jnp.float32), b.astype(jnp.float32)
    return jnp.max(jnp.abs(a - b)) / jnp.maximum(jnp.max(jnp.abs(b)), 1e-30)


def _value_and_grads(fn, x, w, dy, direction):
    y, vjp = jax.vjp(lambda x, w: fn(x, w, axis_name=T, direction=direction), x, w)
    return (y, *vjp(dy))


def relative_errors(p, dtype):
    """[len(FUNCS) * len(DIRS), 3] max relative errors of (y, dx, dw) vs the plain path."""
    mesh = _mesh(p)
    specs = [s for name in FUNCS for s in SPECS[name]]
    args = [jax.device_put(a, NamedSharding(mesh, s)) for a, s in zip(_inputs(p), specs)]

    def body(*arrays):
        errs = []
        for i, name in enumerate(FUNCS):
            x, w, dy = (a.astype(dtype) for a in arrays[3 * i:3 * i + 3])
            # The reference runs in fp32 on the same (rounded) inputs.
            ref = _value_and_grads(getattr(cm, "plain_" + name), x.astype(jnp.float32),
                                   w.astype(jnp.float32), dy.astype(jnp.float32), "uni")
            for d in DIRS:
                got = _value_and_grads(getattr(cm, name), x, w, dy, d)
                assert all(g.dtype == dtype for g in got)
                errs.append(jnp.stack([_rel_err(g, r) for g, r in zip(got, ref)]))
        return jnp.stack(errs)[None]

    f = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=tuple(specs), out_specs=P(T)))
    return np.asarray(f(*args)).max(axis=0)


def _check_errors(p, dtype, tol):
    errs = relative_errors(p, dtype)
    cases = [f"{n}/{d}" for n in FUNCS for d in DIRS]
    bad = {c: e.round(7).tolist() for c, e in zip(cases, errs) if (e > tol).any()}
    assert not bad, f"P={p} {jnp.dtype(dtype).name}: (y, dx, dw) rel err above {tol}: {bad}"
    assert (errs < tol).all()


@pytest.mark.parametrize("p", [2, 4, 8])
def test_values_and_grads_fp32(p):
    _check_errors(p, jnp.float32, 1e-5)


def test_values_and_grads_bf16_p4():
    _check_errors(4, jnp.bfloat16, 2e-2)


@pytest.mark.slow
@pytest.mark.parametrize("p", [2, 8])
def test_values_and_grads_bf16(p):
    _check_errors(p, jnp.bfloat16, 2e-2)


def test_decomposed_matches_dense_numpy():
    """Anchor both sides on global numpy math too, not only on jax's own collectives."""
    p = 4
    mesh = _mesh(p)
    x, w = (np.asarray(a, np.float64) for a in _inputs(p)[:2])
    specs = (P(None, T, None), P(None, T), P(None, None, T), P(T, None))

    def body(xa, wa, xr, wr):
        return (cm.all_gather_matmul(xa, wa, axis_name=T, direction="bidi"),
                cm.matmul_reduce_scatter(xr, wr, axis_name=T),
                cm.matmul_all_reduce(xr, wr, axis_name=T, direction="bidi"))

    f = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=specs,
                              out_specs=(P(None, None, T), P(None, T, None), P(T))))
    args = [jax.device_put(a.astype(np.float32), NamedSharding(mesh, s))
            for a, s in zip((x, w, x, w), specs)]
    y_ag, y_rs, y_ar = (np.asarray(a) for a in f(*args))
    np.testing.assert_allclose(y_ag, x @ w, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(y_rs, x @ w, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(y_ar, np.concatenate([x @ w] * p), rtol=1e-5, atol=1e-5)
