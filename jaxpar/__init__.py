"""jaxpar: long-context, bandwidth-frugal training on JAX/XLA."""
from jaxpar.mesh import AXES, MeshConfig, make_mesh

__all__ = ["AXES", "MeshConfig", "make_mesh"]
