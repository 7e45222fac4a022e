"""Streaming DiLoCo: M replicas train alone, syncing P staggered fragments of low-bit outer
gradients."""
from jaxpar.diloco.fragments import Fragments, split_fragments, sync_phase
from jaxpar.diloco.islands import Island, IslandError
from jaxpar.diloco.outer import (
    DiLoCoState,
    StreamingDiLoCo,
    data_parallel_bytes,
    default_outer_optimizer,
    replica_grads,
    streaming_diloco,
)
# the submodule `quantize` keeps its name (quantize.quantize / quantize.dequantize live there)
from jaxpar.diloco.quantize import FORMATS, roundtrip, wire_bytes

__all__ = [
    "DiLoCoState", "FORMATS", "Fragments", "Island", "IslandError", "StreamingDiLoCo",
    "data_parallel_bytes",
    "default_outer_optimizer", "replica_grads", "roundtrip",
    "split_fragments", "streaming_diloco", "sync_phase", "wire_bytes",
]
