"""The pytest plugin: XLA host devices set before jax starts, and two fixtures.

    pytest -p jaxpar.testing --host-devices 8

or, in the project's pyproject.toml,

    [tool.pytest.ini_options]
    addopts = "-p jaxpar.testing --host-devices 8"

XLA reads `XLA_FLAGS` once, when the first jax backend starts (the first `jax.devices()`,
array or jit call), not when jax is imported; pytest loads `-p` plugins and parses their
options before it imports any conftest.py or test module, and `pytest_load_initial_conftests`
runs right then, so the flags are set in time even when a conftest imports jax at the top.
A backend that already started (something used jax before pytest loaded the plugin) cannot
be changed: a different device count is a one-line usage error.
"""
from __future__ import annotations

import math
import os
import re

import pytest

COUNT_FLAG = "--xla_force_host_platform_device_count"
# 8 host devices can share 2 cores: a collective's rendezvous can wait longer than XLA:CPU's
# default termination timeout under load, which aborts the whole process; a real deadlock
# still ends, after 10 minutes. (The DFS-scheduler flag comes from `import jaxpar`.)
TIMEOUT_FLAG = "--xla_cpu_collective_call_terminate_timeout_seconds=600"
DEFAULT_DEVICES = 8


def xla_flags(count: int, flags: str = "") -> str:
    """`flags` with the host device count set to `count` (an earlier count replaced) and
    XLA:CPU's collective timeout raised unless `flags` sets it."""
    flags = re.sub(rf"{COUNT_FLAG}=\S*", "", flags)
    if "xla_cpu_collective_call_terminate_timeout_seconds" not in flags:
        flags += f" {TIMEOUT_FLAG}"
    return " ".join(f"{flags} {COUNT_FLAG}={count}".split())


def _started_count() -> int | None:
    """Devices of the jax backend if one has started, else None (nothing imported)."""
    import sys

    if "jax" not in sys.modules:
        return None
    from jax._src import xla_bridge

    if not xla_bridge.backends_are_initialized():
        return None
    import jax

    return jax.device_count()


def use_host_devices(count: int) -> None:
    """Make jax start with `count` XLA:CPU host devices (and the CPU platform, unless
    JAX_PLATFORMS says otherwise). Raises pytest.UsageError if a backend has already started
    with another count."""
    if not isinstance(count, int) or count < 1:
        raise pytest.UsageError(f"--host-devices={count!r} must be a positive integer")
    started = _started_count()
    if started is not None:
        if started != count:
            raise pytest.UsageError(
                f"--host-devices {count}: jax already started with {started} devices before "
                f"jaxpar.testing could set XLA_FLAGS; load the plugin first (-p "
                f"jaxpar.testing on the command line or in addopts) and use no jax before it")
        return
    os.environ["XLA_FLAGS"] = xla_flags(count, os.environ.get("XLA_FLAGS", ""))
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import jaxpar  # noqa: F401  (adds XLA:CPU's DFS-scheduler flag; starts no backend)


def pytest_addoption(parser):
    parser.getgroup("jaxpar").addoption(
        "--host-devices", type=int, default=DEFAULT_DEVICES, dest="host_devices",
        help=f"XLA:CPU host devices jax starts with (default {DEFAULT_DEVICES})")


@pytest.hookimpl(tryfirst=True)
def pytest_load_initial_conftests(early_config, parser, args):
    use_host_devices(early_config.known_args_namespace.host_devices)


def pytest_configure(config):
    # again for `pytest_plugins = ["jaxpar.testing"]` in a conftest, which loads after the
    # hook above has fired; a no-op when it already ran
    use_host_devices(config.getoption("host_devices"))


@pytest.fixture(scope="session")
def host_devices(pytestconfig) -> int:
    """The number of devices jax sees: the --host-devices count."""
    import jax

    n = jax.device_count()
    assert n == pytestconfig.getoption("host_devices"), (
        f"--host-devices {pytestconfig.getoption('host_devices')} but jax sees {n} devices")
    return n


@pytest.fixture
def host_mesh():
    """`host_mesh(data=4, tensor=2)`: a jaxpar mesh (all six named axes, unnamed ones of
    size 1) on the first data·tensor·... host devices."""
    import jax

    from jaxpar.mesh import make_mesh

    def build(**sizes):
        n = math.prod(sizes.values())
        if n > jax.device_count():
            raise ValueError(f"host_mesh({sizes}) needs {n} devices; jax has "
                             f"{jax.device_count()} (--host-devices)")
        return make_mesh(devices=jax.devices()[:n], **sizes)
    return build
