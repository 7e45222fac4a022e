"""Device meshes with named axes: replica, data, fsdp, seq, seq_inner, tensor.

`replica` is outermost (DiLoCo replicas, slow links), `tensor` innermost (fastest links).
The order follows how often and how much each axis talks: `data` all-reduces gradients
once per step; `fsdp` (ZeRO-3, MaxText's name) all-gathers each layer's weights and
reduce-scatters its gradients, once per layer and step, so it sits inside `data` (on a
faster link); `seq` rings K/V blocks inside every attention and `tensor` gathers or
scatters activations around every matmul, so they sit innermost. `jax.make_mesh` lays the
last axes over the closest devices (NVLink / ICI neighbours). `seq_inner` exists for 2-D
(hybrid) sequence parallelism: Ulysses inside `seq_inner`, a ring across `seq`. Axes of
size 1 are kept so every spec can name every axis.
"""
from __future__ import annotations

import dataclasses

import jax
from jax.sharding import AxisType, Mesh

AXES = ("replica", "data", "fsdp", "seq", "seq_inner", "tensor")
# the names every module uses (defaults of `axis=` arguments, the rules table)
REPLICA, DATA, FSDP, SEQ, SEQ_INNER, TENSOR = AXES


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    replica: int = 1
    data: int = 1
    fsdp: int = 1
    seq: int = 1
    seq_inner: int = 1
    tensor: int = 1

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(getattr(self, a) for a in AXES)

    @property
    def size(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    def validate(self, device_count: int) -> None:
        for a in AXES:
            v = getattr(self, a)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"mesh.{a}={v!r} must be a positive integer")
        if self.size == device_count:
            return
        fits = []
        for a in AXES:
            rest = self.size // getattr(self, a)
            if device_count % rest == 0:
                fits.append(f"{a}={device_count // rest}")
        hint = f"; with the other axes unchanged, {' or '.join(fits)} would fit" if fits else ""
        raise ValueError(
            f"mesh {self.describe()} needs {self.size} devices but {device_count} are available; "
            f"the axis sizes must multiply to {device_count}{hint}"
        )

    def describe(self) -> str:
        return " ".join(f"{a}={getattr(self, a)}" for a in AXES)


def make_mesh(config: MeshConfig | None = None, *, devices=None, **sizes) -> Mesh:
    """Build a `jax.sharding.Mesh` with all six named axes (Auto axis types).

    `make_mesh(seq=8)` and `make_mesh(MeshConfig(seq=8))` are the same mesh.
    """
    if config is None:
        unknown = set(sizes) - set(AXES)
        if unknown:
            raise ValueError(f"unknown mesh axis {sorted(unknown)}; valid axes are {list(AXES)}")
        config = MeshConfig(**sizes)
    elif sizes:
        raise ValueError("pass either a MeshConfig or axis sizes, not both")
    devices = list(devices) if devices is not None else jax.devices()
    config.validate(len(devices))
    return jax.make_mesh(
        config.shape, AXES, axis_types=(AxisType.Auto,) * len(AXES), devices=devices
    )
