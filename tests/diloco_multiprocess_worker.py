"""One process of the two-process Streaming DiLoCo test (also run in-process as the reference).

    python diloco_multiprocess_worker.py PORT PROCESS_ID OUT.npz
"""
import os
import sys

STEPS = 9
# M=2: the default all-gather of codes, and the reduce-scatter (all_to_all) + all-gather
COLLECTIVES = ("auto", "reduce_scatter")


def run(how="auto", steps=STEPS):
    """Streaming DiLoCo on mesh replica=2 × data=4 over all global devices; returns numpy trees."""
    import jax
    import numpy as np
    import optax
    from jax.experimental import multihost_utils
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from diloco_helpers import batches_M, loss_fn, tiny_params
    from jaxpar.diloco import replica_grads, streaming_diloco
    from jaxpar.mesh import make_mesh

    mesh = make_mesh(replica=2, data=4)
    sd = streaming_diloco(optax.adam(3e-3), num_replicas=2, sync_every=4, num_fragments=2,
                          overlap_steps=1, alpha=0.5, quantize="fp4_e3m0", mesh=mesh,
                          low_bit_collective=how)
    grad = replica_grads(loss_fn, mesh=mesh)
    step = jax.jit(lambda s, b: sd.update(grad(s.params, b)[1], s))
    batch_sharding = NamedSharding(mesh, P("replica", "data"))

    def global_batch(t):  # every process knows the whole batch; each places its own shards
        return tuple(jax.make_array_from_callback(x.shape, batch_sharding,
                                                  lambda i, x=x: np.asarray(x)[i])
                     for x in batches_M(t))

    state = sd.init(tiny_params(7))
    for t in range(1, steps + 1):
        state = step(state, global_batch(t))
    gather = lambda x: np.asarray(multihost_utils.process_allgather(x, tiled=True))
    replica_procs = [sorted({d.process_index for d in mesh.devices[r].flat}) for r in range(2)]
    return {"global": jax.tree.map(gather, state.global_params),
            "replicas": jax.tree.map(gather, state.params), "replica_procs": replica_procs}


def main(port, process_id, out):
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
    os.environ["JAX_PLATFORMS"] = "cpu"
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import jax

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2,
                               process_id=process_id)
    assert jax.device_count() == 8 and jax.local_device_count() == 4
    flat = {}
    for how in COLLECTIVES:
        result = run(how)
        import jax.tree_util as tu

        trees = {"global": result["global"], "replicas": result["replicas"]}
        flat |= {how + "/" + "/".join(str(k) for k in path): v
                 for path, v in tu.tree_flatten_with_path(trees)[0]}
    if process_id == 0:
        import numpy as np

        np.savez(out, replica_procs=np.array(result["replica_procs"]), **flat)
    jax.distributed.shutdown()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
