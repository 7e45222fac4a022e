"""Eight simulated CPU devices, set before jax is imported anywhere in the test session."""
import atexit
import os
import shutil
import tempfile

# One persistent compilation cache for the session and every process its tests start: the
# suite compiles the same small programs many times over (a killed run and its resume, each
# equivalence test's reference), and a hit skips XLA. Removed at exit unless the caller
# chose the folder (JAX_COMPILATION_CACHE_DIR).
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _cache = tempfile.mkdtemp(prefix="jaxpar-tests-xla-cache-")
    atexit.register(shutil.rmtree, _cache, ignore_errors=True)
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")

# jaxpar.testing's own setup (its pytest plugin's): 8 host devices, the CPU platform, XLA:CPU's
# collective timeout raised (8 devices share 2 cores in CI) and the DFS-scheduler flag
from jaxpar.testing.plugin import use_host_devices  # noqa: E402

use_host_devices(8)
import jax  # noqa: E402

jax.config.update("jax_enable_x64", False)
assert jax.device_count() == 8, f"expected 8 host devices, got {jax.device_count()}"
