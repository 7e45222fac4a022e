"""The whole Streaming DiLoCo state (replicas, inner state, globals, outer momentum, the
pending fragment, the step) round-trips through orbax mid-way with identical continuation."""
import jax
import numpy as np
import optax
import orbax.checkpoint as ocp

from jaxpar.diloco import replica_grads, streaming_diloco
from jaxpar.mesh import make_mesh

from diloco_helpers import batches_M, loss_fn, tiny_params


def test_orbax_roundtrip_mid_flight(tmp_path):
    mesh = make_mesh(replica=2, data=4)
    sd = streaming_diloco(optax.adam(3e-3), num_replicas=2, sync_every=4, num_fragments=2,
                          overlap_steps=1, alpha=0.5, quantize="fp4_e3m0", mesh=mesh)
    grad = replica_grads(loss_fn, mesh=mesh)
    step = jax.jit(lambda s, b: sd.update(grad(s.params, b)[1], s))

    state = sd.init(tiny_params(5))
    for t in range(1, 7):  # fragment 0 syncs at t=6: its merge (t=7) is still pending
        state = step(state, batches_M(t))
    assert int(state.pending_fragment) == 0
    assert float(np.abs(np.asarray(state.pending_delta[0][0])).max()) > 0

    with ocp.StandardCheckpointer() as ckpt:
        ckpt.save(tmp_path / "ckpt", state)
        ckpt.wait_until_finished()
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
        restored = ckpt.restore(tmp_path / "ckpt", abstract)

    assert jax.tree.structure(restored) == jax.tree.structure(state)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), restored, state)
    assert restored.params["head"].sharding == state.params["head"].sharding

    a, b = state, restored
    for t in range(7, 14):
        a, b = step(a, batches_M(t)), step(b, batches_M(t))
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a, b)
    assert int(b.step) == 13
