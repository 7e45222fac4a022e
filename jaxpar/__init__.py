"""jaxpar: long-context, bandwidth-frugal training on JAX/XLA.

    jaxpar.attention   sequence-parallel attention: ulysses, ring, tokenring, hybrid
    jaxpar.overlap     T3-style collective matmuls and tensor-parallel Flax layers
    jaxpar.diloco      streaming DiLoCo outer optimizer around any optax optimizer
    jaxpar.comm        collective bytes from compiled HLO, and closed forms
    jaxpar.hf          Hugging Face Llama checkpoints: load (sharded reads), save
"""
from jaxpar import attention, comm, diloco, hf, overlap
from jaxpar.attention import sequence_parallel_attention
from jaxpar.diloco import DiLoCoState, StreamingDiLoCo, streaming_diloco
from jaxpar.mesh import AXES, MeshConfig, make_mesh
from jaxpar.overlap import (ColumnParallelDense, ParallelMLP, RowParallelDense,
                            all_gather_matmul, hlo_report, matmul_all_reduce,
                            matmul_reduce_scatter)

__all__ = [
    "AXES", "MeshConfig", "make_mesh", "attention", "comm", "diloco", "hf", "overlap",
    "sequence_parallel_attention", "streaming_diloco", "StreamingDiLoCo", "DiLoCoState",
    "all_gather_matmul", "matmul_reduce_scatter", "matmul_all_reduce", "hlo_report",
    "ColumnParallelDense", "RowParallelDense", "ParallelMLP",
]
