"""Streaming DiLoCo against independent references: plain DiLoCo, data-parallel SGD, and a
schedule worked out by hand."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxpar.diloco import replica_grads, split_fragments, streaming_diloco, sync_phase
from jaxpar.mesh import make_mesh

from diloco_helpers import M, batch_for, batches_M, loss_fn, run_streaming, tiny_params


def test_p1_tau0_alpha0_equals_plain_diloco():
    """Reference written without the library: per-replica Python loop, hand-written Nesterov."""
    H, steps, lr_in, lr_out, mu = 5, 15, 1e-2, 0.7, 0.9
    params = tiny_params()
    mesh = make_mesh(replica=2, data=4)
    sd = streaming_diloco(optax.adam(lr_in), num_replicas=M, sync_every=H, mesh=mesh)
    got = run_streaming(sd, params, steps, mesh)

    inner = optax.adam(lr_in)
    glob = jax.tree.map(np.asarray, params)
    mom = jax.tree.map(np.zeros_like, glob)
    reps = [jax.tree.map(jnp.asarray, glob) for _ in range(M)]
    opt = [inner.init(r) for r in reps]
    g_fn = jax.jit(jax.grad(loss_fn))
    for t in range(1, steps + 1):
        for r in range(M):
            g = g_fn(reps[r], batch_for(t, r))
            u, opt[r] = inner.update(g, opt[r], reps[r])
            reps[r] = optax.apply_updates(reps[r], u)
        if t % H == 0:
            delta = jax.tree.map(lambda gl, *rs: gl - np.mean([np.asarray(x) for x in rs], 0), glob, *reps)
            mom = jax.tree.map(lambda m, d: mu * m + d, mom, delta)
            glob = jax.tree.map(lambda gl, m, d: gl - lr_out * (d + mu * m), glob, mom, delta)
            reps = [jax.tree.map(jnp.asarray, glob) for _ in range(M)]
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-6), got.global_params, glob)
    for r in range(M):
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a[r], b, rtol=2e-5, atol=2e-6), got.params, reps[r])


def test_h1_sgd_equals_data_parallel():
    """H=1, SGD inner, outer SGD lr 1 momentum 0: every step is one data-parallel SGD step."""
    lr, steps = 0.1, 8
    params = tiny_params(1)
    mesh = make_mesh(replica=2, data=4)
    sd = streaming_diloco(optax.sgd(lr), num_replicas=M, sync_every=1,
                          outer_optimizer=optax.sgd(1.0), mesh=mesh)
    grad = replica_grads(loss_fn, mesh=mesh)
    step = jax.jit(lambda s, b: sd.update(grad(s.params, b)[1], s))
    state = sd.init(params)

    def dp_loss(p, t):  # mean loss over the union of the replicas' batches
        return jnp.mean(jnp.stack([loss_fn(p, batch_for(t, r)) for r in range(M)]))

    dp = params
    for t in range(1, steps + 1):
        state = step(state, batches_M(t))
        g = jax.grad(dp_loss)(dp, t)
        dp = jax.tree.map(lambda p, g: p - lr * g, dp, g)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), state.global_params, dp)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a[0], b, rtol=1e-5, atol=1e-6), state.params, dp)
    # and it actually moved
    assert float(jnp.max(jnp.abs(dp["head"] - params["head"]))) > 1e-3


def test_schedule_delay_and_mixing_by_hand():
    """4 scalar layers, P=2, H=4, τ=1, α=0.5, outer SGD lr 0.5, inner SGD lr 1 with constant
    gradients 1 (replica 0) and 3 (replica 1). Fragment 0 = layers 0,2 syncs at t=2,6 and
    merges at t=3,7; fragment 1 = layers 1,3 syncs at t=4 and merges at t=5."""
    params = {f"layers_{i}": {"w": jnp.zeros(())} for i in range(4)}
    sd = streaming_diloco(optax.sgd(1.0), num_replicas=2, sync_every=4, num_fragments=2,
                          overlap_steps=1, alpha=0.5, outer_optimizer=optax.sgd(0.5))
    assert [sync_phase(p, 2, 4) for p in range(2)] == [2, 0]
    grads = {f"layers_{i}": {"w": jnp.array([1.0, 3.0])} for i in range(4)}
    step = jax.jit(lambda s: sd.update(grads, s))
    # expected replica values (r0, r1) and global value of fragment 0 and fragment 1, by hand:
    expect = {
        1: ((-1, -3), 0, (-1, -3), 0),
        2: ((-2, -6), 0, (-2, -6), 0),            # sync f0: mean Δ = (2 + 6)/2 = 4, pending
        3: ((-2.5, -5.5), -2, (-3, -9), 0),       # merge f0: g = 0 − .5·4; r = .5·(−3,−9) + .5·(−2)
        4: ((-3.5, -8.5), -2, (-4, -12), 0),      # sync f1: mean Δ = (4 + 12)/2 = 8
        5: ((-4.5, -11.5), -2, (-4.5, -9.5), -4),  # merge f1: g = −4; r = .5·(−5,−15) + .5·(−4)
        6: ((-5.5, -14.5), -2, (-5.5, -12.5), -4),  # sync f0: Δ = mean(−2+5.5, −2+14.5) = 8
        7: ((-6.25, -11.75), -6, (-6.5, -15.5), -4),  # merge f0: g = −2 − 4; r = .5·(−6.5,−17.5) + .5·(−6)
    }
    state = sd.init(params)
    pending = {2: 0, 3: -1, 4: 1, 5: -1, 6: 0, 7: -1}
    for t in range(1, 8):
        state = step(state)
        r0, g0, r1, g1 = expect[t]
        for i, (r, g) in enumerate([(r0, g0), (r1, g1), (r0, g0), (r1, g1)]):
            np.testing.assert_allclose(state.params[f"layers_{i}"]["w"], r, err_msg=f"t={t} layer {i}")
            np.testing.assert_allclose(state.global_params[f"layers_{i}"]["w"], g, err_msg=f"t={t} layer {i}")
        if t in pending:
            assert int(state.pending_fragment) == pending[t], t


def test_fragments_strided_and_errors():
    params = {f"layers_{i}": {"w": jnp.zeros((3,))} for i in range(12)} | {"embed": jnp.zeros((5,)),
                                                                          "Dense_0": jnp.zeros((2,))}
    fr = split_fragments(params, 3, 6)
    assert fr.layers(0) == ("layers_0", "layers_3", "layers_6", "layers_9")  # numeric, not lexicographic
    assert fr.layers(2) == ("layers_2", "layers_5", "layers_8", "layers_11")
    # the lone Dense_0 and the embedding are not layers; they fill the smallest fragments
    assert sorted(fr.size(p) for p in range(3)) == [12, 14, 17]
    with pytest.raises(ValueError, match=r"num_fragments=4.*Valid num_fragments: \[1, 2, 3, 6\]"):
        split_fragments(params, 4, 6)
    with pytest.raises(ValueError, match=r"found no layers.*Valid num_fragments: \[1\]"):
        split_fragments({"a": jnp.zeros(2), "b": jnp.zeros(2)}, 2, 4)
    # Flax NNX / list-style integer keys count as layers too
    assert split_fragments({"blocks": [{"w": jnp.zeros(1)}] * 4}, 4).layers(3) == ("blocks/3",)
    with pytest.raises(ValueError, match="overlap_steps=2"):
        streaming_diloco(optax.sgd(1.0), num_replicas=2, sync_every=4, num_fragments=2, overlap_steps=2)


def test_finalize_applies_the_pending_merge():
    params = {f"layers_{i}": {"w": jnp.zeros(())} for i in range(4)}
    sd = streaming_diloco(optax.sgd(1.0), num_replicas=2, sync_every=4, num_fragments=2,
                          overlap_steps=1, alpha=0.5, outer_optimizer=optax.sgd(0.5))
    grads = {f"layers_{i}": {"w": jnp.array([1.0, 3.0])} for i in range(4)}
    state = sd.init(params)
    for _ in range(2):  # fragment 0 synced at t=2 with mean Δ = 4; merge due at t=3
        state = sd.update(grads, state)
    done = sd.finalize(state)
    np.testing.assert_allclose(done.global_params["layers_0"]["w"], -2.0)  # 0 − 0.5·4
    np.testing.assert_allclose(done.params["layers_0"]["w"], [-2.0, -4.0])  # .5·(−2,−6) + .5·(−2)
    np.testing.assert_allclose(done.global_params["layers_1"]["w"], 0.0)
    assert int(done.pending_fragment) == -1
    again = sd.finalize(done)  # nothing pending: a no-op
    jax.tree.map(np.testing.assert_array_equal, again, done)
