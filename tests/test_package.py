"""The package's import: every name in `jaxpar.__all__` exists, and `import jaxpar` turns
XLA:CPU's concurrency-optimized scheduler off unless the user chose a setting."""
import os
import subprocess
import sys

import jaxpar

FLAG = "xla_cpu_enable_concurrency_optimized_scheduler"


def test_every_exported_name_exists():
    missing = [n for n in jaxpar.__all__ if not hasattr(jaxpar, n)]
    assert not missing, missing


def flags_after_import(xla_flags: str) -> str:
    env = dict(os.environ, XLA_FLAGS=xla_flags, JAX_PLATFORMS="cpu")
    code = "import os, jaxpar; print(os.environ['XLA_FLAGS'])"
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                          text=True, check=True, timeout=120).stdout.strip()


def test_import_adds_the_dfs_scheduler_flag_and_keeps_a_users_choice():
    assert flags_after_import("--xla_force_host_platform_device_count=2") == (
        f"--xla_force_host_platform_device_count=2 --{FLAG}=false")
    assert flags_after_import(f"--{FLAG}=true") == f"--{FLAG}=true"
