"""jaxpar: long-context, bandwidth-frugal training on JAX/XLA.

    jaxpar.attention   sequence-parallel attention: ulysses, ring, tokenring, hybrid
    jaxpar.overlap     T3-style collective matmuls and tensor-parallel Flax layers
    jaxpar.diloco      streaming DiLoCo outer optimizer around any optax optimizer
    jaxpar.comm        collective bytes from compiled HLO, and closed forms
    jaxpar.hf          Hugging Face Llama checkpoints: load (sharded reads), save
"""
import os

# XLA:CPU's concurrency-optimized (BFS) scheduler runs a program's independent collectives
# side by side; with 8 simulated devices on a few cores their rendezvous can deadlock (a ring
# + DiLoCo run aborted 2 of 2 times with it, passed 3 of 3 without). The DFS scheduler runs
# them one at a time. Read when the backend starts; it changes CPU compiles only.
_CPU_SCHEDULER_FLAG = "--xla_cpu_enable_concurrency_optimized_scheduler=false"
if "xla_cpu_enable_concurrency_optimized_scheduler" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_CPU_SCHEDULER_FLAG}".strip()

from jaxpar._xla_cpu import unique_permute_channels  # noqa: E402

unique_permute_channels()  # every permute its own rendezvous key on XLA:CPU (_xla_cpu.py)

from jaxpar import attention, comm, diloco, hf, overlap  # noqa: E402
from jaxpar.attention import sequence_parallel_attention  # noqa: E402
from jaxpar.diloco import DiLoCoState, StreamingDiLoCo, streaming_diloco  # noqa: E402
from jaxpar.mesh import AXES, MeshConfig, make_mesh  # noqa: E402
from jaxpar.overlap import (  # noqa: E402
    ColumnParallelDense, ParallelMLP, RowParallelDense, all_gather_matmul, hlo_report,
    matmul_all_reduce, matmul_reduce_scatter)

__all__ = [
    "AXES", "MeshConfig", "make_mesh", "attention", "comm", "diloco", "hf", "overlap",
    "sequence_parallel_attention", "streaming_diloco", "StreamingDiLoCo", "DiLoCoState",
    "all_gather_matmul", "matmul_reduce_scatter", "matmul_all_reduce", "hlo_report",
    "ColumnParallelDense", "RowParallelDense", "ParallelMLP",
]
