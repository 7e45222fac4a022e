"""Tensor-parallel layers: every overlap mode equals dense math, value and gradient."""
import contextlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxpar import comm
from jaxpar.mesh import make_mesh
from jaxpar.overlap import cost_model
from jaxpar.overlap.layers import (ColumnParallelDense, ParallelMLP, resolve_overlap,
                                   init_sharded)

T = "tensor"
MODES = (("none", "uni"), ("collective_matmul", "uni"), ("collective_matmul", "bidi"))
B, N, E, F = 2, 32, 16, 64


def _setup(p, dtype=None):
    mesh = make_mesh(tensor=p, devices=jax.devices()[:p])
    x = jax.random.normal(jax.random.key(0), (B, N, E))
    x_sharded = jax.device_put(x, NamedSharding(mesh, P(None, T, None)))
    params = init_sharded(ParallelMLP(F, mesh, dtype=dtype), jax.random.key(1), x_sharded)
    return mesh, x, x_sharded, params


def _dense_loss(w1, w2, x):
    return jnp.sum(jnp.sin(nn.gelu(x @ w1) @ w2))


def _check_mlp(p, dtype, tol):
    mesh, x, xs, params = _setup(p, dtype)

    def loss(params, x, overlap, direction):
        y = ParallelMLP(F, mesh, overlap=overlap, direction=direction, dtype=dtype).apply(params,
                                                                                          x)
        assert y.dtype == (dtype or jnp.float32)
        return jnp.sum(jnp.sin(y.astype(jnp.float32)))

    grads = jax.jit(lambda pr, x: [jax.value_and_grad(loss, argnums=(0, 1))(pr, x, o, d)
                                   for o, d in MODES])(params, xs)
    w1 = np.asarray(nn.unbox(params)["params"]["up"]["kernel"])
    w2 = np.asarray(nn.unbox(params)["params"]["down"]["kernel"])
    ref_val, ref_grads = jax.value_and_grad(_dense_loss, argnums=(0, 1, 2))(w1, w2, x)
    for (overlap, direction), (val, (g_params, g_x)) in zip(MODES, grads):
        g = nn.unbox(g_params)["params"]
        got = (g["up"]["kernel"], g["down"]["kernel"], g_x)
        where = f"P={p} overlap={overlap} direction={direction}"
        assert abs(float(val) - float(ref_val)) <= tol * max(1.0, abs(float(ref_val))), where
        for name, a, b in zip(("d_up", "d_down", "dx"), got, ref_grads):
            a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
            err = np.abs(a - b).max() / np.abs(b).max()
            assert err < tol, f"{where}: {name} rel err {err:.2e}"
    return grads


def test_mlp_all_modes_match_dense_fp32_p8():
    _check_mlp(8, None, 1e-5)


def test_mlp_all_modes_match_dense_bf16_p4():
    _check_mlp(4, jnp.bfloat16, 3e-2)


@pytest.mark.slow
@pytest.mark.parametrize("p", [2, 4])
def test_mlp_all_modes_match_dense_fp32(p):
    _check_mlp(p, None, 1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("p", [2, 8])
def test_mlp_all_modes_match_dense_bf16(p):
    _check_mlp(p, jnp.bfloat16, 3e-2)


def test_params_are_sharded_on_the_tensor_axis():
    _, _, _, params = _setup(4)
    p = nn.unbox(params)["params"]
    assert p["up"]["kernel"].sharding.spec == P(None, T)
    assert p["down"]["kernel"].sharding.spec == P(T, None)
    assert p["up"]["kernel"].addressable_shards[0].data.shape == (E, F // 4)


def _collective_kinds(mesh, xs, params, **kw):
    fn = lambda pr, x: ParallelMLP(F, mesh, **kw).apply(pr, x)  # noqa: E731
    return set(comm.bytes_by_kind(fn, params, xs))


def test_auto_follows_the_cost_model():
    mesh, _, xs, params = _setup(4)
    # CPU host devices cannot overlap: auto keeps the plain collectives.
    assert _collective_kinds(mesh, xs, params, overlap="auto",
                             hardware=cost_model.CPU_HOST) == {"all-gather", "reduce-scatter"}
    # Hardware on which these tiny matmuls take as long as their transfers (the case
    # overlap is for) and nothing costs latency: auto decomposes.
    balanced = cost_model.GPU_NVLINK.replace(link_bandwidth=1e6, link_latency=0.0,
                                             peak_flops=2e7, matmul_efficiency=1.0,
                                             hbm_bandwidth=1e15, launch_overhead=0.0,
                                             overlap_slowdown=0.0)
    assert cost_model.predict("all_gather_matmul", B * N, E, F // 4, 4, balanced).speedup > 1.3
    assert _collective_kinds(mesh, xs, params, overlap="auto",
                             hardware=balanced) == {"collective-permute"}
    assert _collective_kinds(mesh, xs, params, overlap="none") == {"all-gather",
                                                                   "reduce-scatter"}


def test_resolve_overlap():
    assert resolve_overlap("none", "bidi", "all_gather_matmul", 8, 8, 8, 4, jnp.float32) == (
        "none", "bidi")
    assert resolve_overlap("auto", "uni", "all_gather_matmul", 64, 64, 16, 4, jnp.float32,
                           cost_model.CPU_HOST) == ("none", "uni")
    with pytest.raises(ValueError, match=r"overlap='fast'.*\('none', 'collective_matmul', "
                                         r"'auto'\)"):
        resolve_overlap("fast", "uni", "all_gather_matmul", 8, 8, 8, 4, jnp.float32)


def test_layer_errors_name_the_shape_and_axis():
    mesh = make_mesh(tensor=4, devices=jax.devices()[:4])
    with pytest.raises(ValueError, match=r"N=6 of x\[2, 6, 16\] not divisible by size 4 of "
                                         r"axis 'tensor'"):
        jax.eval_shape(ColumnParallelDense(8, mesh).init, jax.random.key(0),
                       jnp.zeros((2, 6, 16)))
    with pytest.raises(ValueError, match="features=6 not divisible by size 4"):
        jax.eval_shape(ColumnParallelDense(6, mesh).init, jax.random.key(0),
                       jnp.zeros((2, 8, 16)))


@pytest.mark.parametrize("axis_type", ["Explicit",
                                       pytest.param("Auto", marks=pytest.mark.slow)])
def test_layers_on_a_plain_jax_mesh(axis_type):
    """The issue's reproduction: ParallelMLP on `jax.make_mesh` (Explicit or Auto axes), init
    with and without `jax.set_mesh`, unsharded and data-sharded inputs, under jit and grad:
    value and grads equal plain dense math on unsharded copies."""
    types = (getattr(jax.sharding.AxisType, axis_type),) * 2
    mesh = jax.make_mesh((2, 4), ("data", T), axis_types=types)
    x = jax.random.normal(jax.random.key(0), (2, 16, 32))
    mlp = ParallelMLP(64, mesh=mesh)
    with jax.set_mesh(mesh):
        params = init_sharded(mlp, jax.random.key(1), x)
    assert init_sharded(mlp, jax.random.key(1), x)["params"]["up"]["kernel"].value.sharding \
        .spec == P(None, T)
    w1, w2 = (np.asarray(nn.unbox(params)["params"][k]["kernel"]) for k in ("up", "down"))
    ref_val, ref_grads = jax.value_and_grad(_dense_loss, argnums=(0, 1, 2))(w1, w2, x)

    def loss(params, x):
        return jnp.sum(jnp.sin(mlp.apply(params, x)))

    step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
    # unsharded input under set_mesh; data-sharded input without it
    for x_in, ctx in ((x, jax.set_mesh(mesh)),
                      (jax.device_put(x, NamedSharding(mesh, P("data"))),
                       contextlib.nullcontext())):
        with ctx:
            val, (g_params, g_x) = step(params, x_in)
        g = nn.unbox(g_params)["params"]
        got = (g["up"]["kernel"], g["down"]["kernel"], g_x)
        np.testing.assert_allclose(float(val), float(ref_val), rtol=1e-5)
        for a, b in zip(got, ref_grads):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)
