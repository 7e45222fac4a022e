"""Tensor-parallel Flax (Linen) layers on the collective matmuls, Megatron-SP layout.

Between blocks, activations x[..., N, E] are sequence-sharded over the tensor axis (each
device holds N/P tokens). A block is

  ColumnParallelDense   all_gather(x over N) @ W[E, F/P]   -> h[..., N, F] sharded on F
  RowParallelDense      reduce_scatter(h @ W[F/P, E], N)   -> y[..., N, E] sharded on N

so the all-gather and reduce-scatter sit right next to matmuls: the collective matmuls can
hide them. The layers take and return GLOBAL arrays and call `shard_map` themselves, with
params annotated by `nn.with_partitioning` (kernel (None, tensor) / (tensor, None)).

FSDP: when the rules in scope (`nn.logical_axis_rules`) also shard a kernel's other dim
(`embed -> fsdp`), the kernel enters the shard_map sharded as stored and is all-gathered
over those axes inside it, right before its matmul. The transpose of that `all_gather` is a
`psum_scatter`, so the backward reduce-scatters the kernel's gradient (XLA on its own, with
the gather outside the shard_map, all-reduces the full gradient and slices it); the kernel
is first cast varying over the other batch/sequence axes, so their all-reduce runs on the
1/fsdp shard, after the reduce-scatter. XLA's scheduler may start the gather early, under the
previous layer's compute (async collectives on GPU/TPU).

Any mesh: Explicit (`jax.make_mesh`), Auto, or `jaxpar.make_mesh`; inputs sharded or not.
On Explicit axes shard_map checks the inputs' typed shardings against its in_specs, so x and
the kernel are `jax.reshard`ed to the layer's specs first (on Auto axes shard_map reshards by
itself). The params' partitioning is metadata only: the layer never applies it as a
`with_sharding_constraint`, which on Explicit axes would assert instead of resharding; use
`init_sharded` (or jit out_shardings) to create them sharded. With `batch_axes=None` the
batch stays sharded over the axes x's typed sharding already names.

overlap:
  "none"               plain all_gather / psum_scatter + one matmul (first-class path: the
                       right choice for small matmuls, few devices, or backends that cannot
                       overlap, e.g. CPU);
  "collective_matmul"  the decomposed ring (`direction` 'uni' or 'bidi');
  "auto"               asks cost_model.choose with the local shapes at trace time.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxpar import _spmd
from jaxpar.mesh import TENSOR
from jaxpar.overlap import collective_matmul as cm
from jaxpar.overlap import cost_model

OVERLAPS = ("none", "collective_matmul", "auto")


def resolve_overlap(overlap: str, direction: str, op: str, m: int, k: int, n: int, p: int,
                    dtype, hardware: cost_model.Hardware | None = None) -> tuple[str, str]:
    """The (overlap, direction) a layer will use for one matmul of per-device size m·k·n."""
    if overlap not in OVERLAPS:
        raise ValueError(f"overlap={overlap!r}; valid choices are {OVERLAPS}")
    if direction not in cm.DIRECTIONS:
        raise ValueError(f"direction={direction!r}; valid choices are {cm.DIRECTIONS}")
    if overlap != "auto":
        return overlap, direction
    return cost_model.choose(op, m, k, n, p, hardware,
                             dtype_bytes=jnp.dtype(dtype).itemsize)


def _impl(op: str, overlap: str) -> Callable:
    return getattr(cm, op if overlap == "collective_matmul" else "plain_" + op)


def _leading_spec(ndim: int, batch_axes) -> tuple:
    """Spec entries for the dims before [N, features]: batch on `batch_axes`, rest None."""
    return (batch_axes,) + (None,) * (ndim - 3) if ndim >= 3 else ()


def _value(param):
    """A param's array without applying its partitioning as a constraint."""
    return param.unbox(apply_constraint=False) if isinstance(param, nn.Partitioned) else param


def to_spec(x, mesh: Mesh, spec: P):
    """x brought to `spec` where shard_map would otherwise reject it: `jax.reshard` on a mesh
    with Explicit axes (typed shardings must equal the in_specs); unchanged on Auto axes,
    where shard_map (also under DiLoCo's vmap) inserts the resharding itself."""
    if AxisType.Explicit in mesh.axis_types:
        return jax.reshard(x, NamedSharding(mesh, spec))
    return x


class _TPDense(nn.Module):
    features: int
    mesh: Mesh
    axis: str = TENSOR
    overlap: str = "none"
    direction: str = "uni"
    use_bias: bool = False
    dtype: Any = None
    param_dtype: Any = jnp.float32
    kernel_init: Callable = nn.initializers.lecun_normal()
    batch_axes: str | Sequence[str] | None = None
    hardware: cost_model.Hardware | None = None
    # mesh axes that already split N outside this layer (context parallelism): N is sharded
    # over (*seq_axes, axis) between blocks and over seq_axes inside
    seq_axes: Sequence[str] = ()
    # logical names of the kernel's (in, out) dims; None = physical (None, axis)/(axis, None)
    kernel_axes: Sequence[str] | None = None

    def _size(self) -> int:
        return self.mesh.shape[self.axis]

    def _n_spec(self, with_axis: bool):
        axes = (*self.seq_axes, self.axis) if with_axis else tuple(self.seq_axes)
        return axes[0] if len(axes) == 1 else (axes or None)

    def _kernel(self, shape, physical, spec: P | None = None):
        init = (nn.with_logical_partitioning(self.kernel_init, tuple(self.kernel_axes))
                if self.kernel_axes is not None else nn.with_partitioning(self.kernel_init,
                                                                          physical))
        # unbox=False: the partitioning is metadata, not a constraint (see module docstring)
        kernel = _value(self.param("kernel", init, shape, self.param_dtype, unbox=False))
        return to_spec(kernel, self.mesh, spec if spec is not None else P(*physical))

    def _lead(self, x):
        """Spec entries of x's leading dims: `batch_axes`, else the axes x's batch is on."""
        batch = self.batch_axes
        if batch is None and x.ndim >= 3:
            batch = _spmd.batch_axes(x, self.mesh, (*self.seq_axes, self.axis), x.shape[0])
        return _leading_spec(x.ndim, batch)

    def _gather_axes(self, dim: int) -> tuple[str, ...]:
        """Mesh axes (FSDP) the rules in scope put on kernel dim `dim`, the one that is not
        the tensor-parallel dim; () without rules or logical kernel names."""
        if self.kernel_axes is None or not nn.get_logical_axis_rules():
            return ()
        entry = nn.logical_to_mesh_axes(tuple(self.kernel_axes))[dim]
        axes = (entry,) if isinstance(entry, str) else tuple(entry or ())
        return tuple(a for a in axes if self.mesh.shape.get(a, 1) > 1)

    def _kernel_io(self, dim: int, physical: tuple, lead: tuple):
        """(kernel in_spec, local fn gathering dim `dim` of the kernel inside the shard_map)."""
        axes = self._gather_axes(dim)
        if not axes:
            return P(*physical), lambda w: w
        spec = list(physical)
        spec[dim] = axes[0] if len(axes) == 1 else axes
        others = {a for e in (*lead, *self.seq_axes) for a in ((e,) if isinstance(e, str)
                                                              else (e or ()))} - set(axes)

        def gather(w):
            w = _spmd.vary_over(w, others)  # their all-reduce then runs on the 1/fsdp shard
            return jax.lax.all_gather(w, axes, axis=dim, tiled=True)
        return P(*spec), gather

    def _check(self, x, what: str):
        p = self._size()
        for a in self.seq_axes:
            p *= self.mesh.shape[a]
        if x.ndim < 2:
            raise ValueError(f"{type(self).__name__}: x needs [..., N, {what}], got {x.shape}")
        if x.shape[-2] % p:
            where = (f"axis {self.axis!r}" if not self.seq_axes
                     else f"axes {(*self.seq_axes, self.axis)}")
            raise ValueError(f"{type(self).__name__}: sequence length N={x.shape[-2]} of "
                             f"x{list(x.shape)} not divisible by size {p} of {where}; pad N "
                             f"to a multiple of {p}")


class ColumnParallelDense(_TPDense):
    """x[..., N, E] (N sharded on `axis`) -> all_gather over N, @ kernel[E, F] (F sharded)."""

    @nn.compact
    def __call__(self, x):
        self._check(x, "E")
        p, e = self._size(), x.shape[-1]
        if self.features % p:
            raise ValueError(f"ColumnParallelDense: features={self.features} not divisible by "
                             f"size {p} of axis {self.axis!r}")
        dtype = self.dtype or jnp.result_type(x.dtype, self.param_dtype)
        lead = self._lead(x)
        x_spec = P(*lead, self._n_spec(True), None)
        k_spec, gather = self._kernel_io(0, (None, self.axis), lead)
        kernel = self._kernel((e, self.features), (None, self.axis), k_spec)
        x = to_spec(x, self.mesh, x_spec)

        def local(x, w):
            w = gather(w)
            m = x.size // x.shape[-1] * p  # gathered rows on this device
            overlap, direction = resolve_overlap(self.overlap, self.direction,
                                                 "all_gather_matmul", m, e, w.shape[1], p,
                                                 dtype, self.hardware)
            return _impl("all_gather_matmul", overlap)(x, w, axis_name=self.axis,
                                                       direction=direction)

        y = jax.shard_map(local, mesh=self.mesh, in_specs=(x_spec, k_spec),
                          out_specs=P(*lead, self._n_spec(False), self.axis))(x.astype(dtype),
                                                               kernel.astype(dtype))
        if self.use_bias:
            bias = _value(self.param("bias", nn.with_partitioning(nn.initializers.zeros,
                                                                    (self.axis,)),
                                       (self.features,), self.param_dtype, unbox=False))
            y = y + to_spec(bias, self.mesh, P(self.axis)).astype(dtype)
        return y


class RowParallelDense(_TPDense):
    """h[..., N, F] (F sharded on `axis`) -> @ kernel[F, E] (F sharded), reduce-scatter over N."""

    @nn.compact
    def __call__(self, h):
        self._check(h, "F")
        p, f = self._size(), h.shape[-1]
        if f % p:
            raise ValueError(f"RowParallelDense: input features F={f} not divisible by size "
                             f"{p} of axis {self.axis!r}")
        dtype = self.dtype or jnp.result_type(h.dtype, self.param_dtype)
        lead = self._lead(h)
        h_spec = P(*lead, self._n_spec(False), self.axis)
        k_spec, gather = self._kernel_io(1, (self.axis, None), lead)
        kernel = self._kernel((f, self.features), (self.axis, None), k_spec)
        h = to_spec(h, self.mesh, h_spec)

        def local(h, w):
            w = gather(w)
            m = h.size // h.shape[-1]
            overlap, direction = resolve_overlap(self.overlap, self.direction,
                                                 "matmul_reduce_scatter", m, w.shape[0],
                                                 self.features, p, dtype, self.hardware)
            return _impl("matmul_reduce_scatter", overlap)(h, w, axis_name=self.axis,
                                                           direction=direction)

        y = jax.shard_map(local, mesh=self.mesh,
                          in_specs=(h_spec, k_spec),
                          out_specs=P(*lead, self._n_spec(True), None))(h.astype(dtype),
                                                               kernel.astype(dtype))
        if self.use_bias:
            bias = self.param("bias", nn.initializers.zeros, (self.features,), self.param_dtype)
            y = y + to_spec(bias, self.mesh, P()).astype(dtype)
        return y


class ParallelMLP(nn.Module):
    """Megatron-SP MLP: x[..., N, E] seq-sharded -> column(F) -> gelu -> row(E) seq-sharded."""

    mlp: int
    mesh: Mesh
    axis: str = TENSOR
    overlap: str = "none"
    direction: str = "uni"
    dtype: Any = None
    param_dtype: Any = jnp.float32
    batch_axes: str | Sequence[str] | None = None
    hardware: cost_model.Hardware | None = None
    activation: Callable = nn.gelu

    @nn.compact
    def __call__(self, x):
        common = dict(mesh=self.mesh, axis=self.axis, overlap=self.overlap,
                      direction=self.direction, dtype=self.dtype, param_dtype=self.param_dtype,
                      batch_axes=self.batch_axes, hardware=self.hardware)
        h = ColumnParallelDense(self.mlp, name="up", **common)(x)
        return RowParallelDense(x.shape[-1], name="down", **common)(self.activation(h))


__all__ = ["OVERLAPS", "ColumnParallelDense", "RowParallelDense", "ParallelMLP",
           "resolve_overlap", "init_sharded"]


def init_sharded(module: nn.Module, rng, *args):
    """module.init with every param placed by its `nn.with_partitioning` spec on module.mesh
    (any mesh, under `jax.set_mesh` or not)."""
    abstract = jax.eval_shape(module.init, rng, *args)
    shardings = jax.tree.map(lambda spec: NamedSharding(module.mesh, spec),
                             nn.get_partition_spec(abstract))
    return jax.jit(module.init, out_shardings=shardings)(rng, *args)
