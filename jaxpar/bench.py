"""Small helpers shared by the benchmark scripts: wall time and the machine it ran on."""
from __future__ import annotations

import os
import platform
import statistics
import time

import jax


def timed(fn, args, repeats: int) -> float:
    """Median wall seconds of `fn(*args)` over `repeats` runs, after one compile/warm-up run."""
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def machine() -> str:
    """e.g. 'x86_64, 2 cores, 8 cpu devices, jax 0.10.2' — written next to every number."""
    devices = jax.devices()
    kind = devices[0].device_kind if devices[0].platform != "cpu" else "cpu"
    return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
            f"{len(devices)} {kind} devices, jax {jax.__version__}")
