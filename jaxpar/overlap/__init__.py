"""T3-style overlap: tensor-parallel collectives decomposed into collective matmuls.

See docs/overlap.md. Functions run inside `shard_map` over the tensor axis; layers take
global arrays.
"""
from jaxpar.overlap.collective_matmul import (DIRECTIONS, all_gather_matmul,
                                              matmul_all_reduce, matmul_reduce_scatter,
                                              plain_all_gather_matmul,
                                              plain_matmul_all_reduce,
                                              plain_matmul_reduce_scatter)
from jaxpar.overlap.cost_model import Hardware, Prediction, predict
from jaxpar.overlap.hlo_report import CollectiveInfo, HloReport, hlo_report, report
from jaxpar.overlap.layers import (OVERLAPS, ColumnParallelDense, ParallelMLP,
                                   RowParallelDense, init_sharded, resolve_overlap)

__all__ = [
    "DIRECTIONS", "OVERLAPS", "all_gather_matmul", "matmul_reduce_scatter", "matmul_all_reduce",
    "plain_all_gather_matmul", "plain_matmul_reduce_scatter", "plain_matmul_all_reduce",
    "Hardware", "Prediction", "predict", "CollectiveInfo", "HloReport", "hlo_report", "report",
    "ColumnParallelDense", "RowParallelDense", "ParallelMLP", "init_sharded", "resolve_overlap",
]
