"""One Streaming DiLoCo island as its own process (4 CPU devices, its own JAX program), and the
single-program reference it is compared with.

    python diloco_islands_worker.py --store DIR --count 2 --id 0 --out OUT.npz [--die-at T]
        [--corrupt-round R] [--quantize fp4_e3m0] [--wait-s 60] [--step-sleep 0]

Island k holds global replica k (one replica per island) and reads the rows replica k reads
in the single-program run (`diloco_helpers.batch_for(step, k)`). Exit status 3 and one line on
stderr for an IslandError.
"""
import argparse
import json
import os
import signal
import sys
import time

STEPS, H, P, TAU, ALPHA, LR = 13, 4, 2, 1, 0.5, 3e-3


def settings(quantize, num_replicas, mesh):
    import optax

    from jaxpar.diloco import streaming_diloco

    return streaming_diloco(optax.adam(LR), num_replicas=num_replicas, sync_every=H,
                            num_fragments=P, overlap_steps=TAU, alpha=ALPHA, quantize=quantize,
                            mesh=mesh)


def reference(quantize, steps=STEPS, replicas=2):
    """The single-program run (mesh replica=M × data=8/M): per-step losses [steps, M], θ_global."""
    import jax
    import numpy as np

    from diloco_helpers import batches_M, loss_fn, tiny_params
    from jaxpar.diloco import replica_grads
    from jaxpar.mesh import make_mesh

    mesh = make_mesh(replica=replicas, data=8 // replicas)
    sd = settings(quantize, replicas, mesh)
    grad = replica_grads(loss_fn, mesh=mesh)

    @jax.jit
    def step(s, b):
        loss_M, g = grad(s.params, b)
        return sd.update(g, s), loss_M

    state, losses = sd.init(tiny_params(7)), []
    for t in range(1, steps + 1):
        state, loss_M = step(state, batches_M(t, replicas))
        losses.append(np.asarray(loss_M))
    state = sd.finalize(state)
    return np.stack(losses), jax.tree.map(np.asarray, state.global_params)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--store", required=True)
    ap.add_argument("--count", type=int, required=True)
    ap.add_argument("--id", type=int, required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, default=STEPS)
    ap.add_argument("--quantize", default="none")
    ap.add_argument("--wait-s", type=float, default=60.0)
    ap.add_argument("--heartbeat-s", type=float, default=0.5)
    ap.add_argument("--step-sleep", type=float, default=0.0)
    ap.add_argument("--die-at", type=int, default=0)
    ap.add_argument("--corrupt-round", type=int, default=-1)
    # an island of several processes (jax.distributed inside the island, 4 devices in all)
    ap.add_argument("--procs", type=int, default=1)
    ap.add_argument("--proc", type=int, default=0)
    ap.add_argument("--port", type=int, default=0)
    a = ap.parse_args()

    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={4 // a.procs}"
    os.environ["JAX_PLATFORMS"] = "cpu"
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import jax

    if a.procs > 1:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(coordinator_address=f"127.0.0.1:{a.port}",
                                   num_processes=a.procs, process_id=a.proc)
    import numpy as np
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as Ps

    from diloco_helpers import batch_for, loss_fn, tiny_params
    from jaxpar.diloco import replica_grads
    from jaxpar.diloco import store as st
    from jaxpar.diloco.islands import Island, IslandError
    from jaxpar.mesh import make_mesh

    assert jax.device_count() == 4 and jax.process_count() == a.procs
    mesh = make_mesh(replica=1, data=4)
    sd = settings(a.quantize, 1, mesh)
    grad = replica_grads(loss_fn, mesh=mesh)
    batch_sharding = NamedSharding(mesh, Ps("replica", "data"))

    @jax.jit
    def inner_step(s, b):
        loss_M, g = grad(s.params, b)
        return sd.inner_update(g, s), loss_M

    def batch(t):  # global replica m = island id × replicas per island + local replica
        x, y = batch_for(t, a.id)  # every process knows it; each places its own shards
        return tuple(jax.make_array_from_callback((1,) + v.shape, batch_sharding,
                                                  lambda i, v=v: v[None][i]) for v in (x, y))

    try:
        island = Island(sd, a.store, count=a.count, island_id=a.id, wait_s=a.wait_s,
                        heartbeat_s=a.heartbeat_s, poll_s=0.02)
        if a.corrupt_round >= 0:  # a torn write of this island's delta of one round
            put = island.store.put

            def torn_put(key, value):
                if key.startswith(st.round_prefix(a.corrupt_round)) and "/delta-" in key:
                    value = value[: len(value) // 2]
                put(key, value)
            island.store.put = torn_put
        state = sd.init(tiny_params(7))
        # compiled before join, as the trainer does: a rejoining island is ready to train when
        # it announces itself
        inner_step = inner_step.lower(state, batch(1)).compile()
        state = island.join(state)
        first, joined_at = island.step, time.time()
        losses = {}
        while island.step < a.steps:
            t = island.step + 1
            if t == a.die_at:
                print(f"island {a.id}: SIGKILL at step {t}", file=sys.stderr, flush=True)
                os.kill(os.getpid(), signal.SIGKILL)
            t0 = time.monotonic()
            state, loss_M = inner_step(state, batch(t))
            losses[t] = float(np.asarray(loss_M.addressable_data(0))[0])
            state = island.after_step(state)
            time.sleep(max(0.0, a.step_sleep - (time.monotonic() - t0)))
        state = island.finish(state)
        island.close()
    except IslandError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(3)
    from jax.experimental import multihost_utils

    host = lambda x: np.asarray(multihost_utils.process_allgather(x, tiled=True))
    glob = [host(x) for x in jax.tree.leaves(state.global_params)]
    outer = [host(x) for x in jax.tree.leaves(state.outer_state)]
    steps = sorted(losses)
    np.savez(a.out, steps=np.array(steps), losses=np.array([losses[t] for t in steps]),
             first=first, joined_at=joined_at, rounds=json.dumps(island.rounds),
             **{f"g{i}": x for i, x in enumerate(glob)},
             **{f"o{i}": x for i, x in enumerate(outer)})
    if a.procs > 1:
        jax.distributed.shutdown()


if __name__ == "__main__":
    main()
