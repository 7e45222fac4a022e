"""Eight simulated CPU devices, set before jax is imported anywhere in the test session."""
import atexit
import os
import shutil
import tempfile

# 8 host devices share 2 cores in CI: a collective's rendezvous can wait longer than XLA:CPU's
# default termination timeout under load, which aborts the whole pytest process, so the
# timeout is raised (a real deadlock still ends, after 10 minutes).
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    " --xla_cpu_collective_call_terminate_timeout_seconds=600"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

# One persistent compilation cache for the session and every process its tests start: the
# suite compiles the same small programs many times over (a killed run and its resume, each
# equivalence test's reference), and a hit skips XLA. Removed at exit unless the caller
# chose the folder (JAX_COMPILATION_CACHE_DIR).
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _cache = tempfile.mkdtemp(prefix="jaxpar-tests-xla-cache-")
    atexit.register(shutil.rmtree, _cache, ignore_errors=True)
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")

import jaxpar  # noqa: E402,F401  (adds XLA:CPU's DFS-scheduler flag before the backend starts)
import jax  # noqa: E402

jax.config.update("jax_enable_x64", False)
assert jax.device_count() == 8, f"expected 8 host devices, got {jax.device_count()}"
