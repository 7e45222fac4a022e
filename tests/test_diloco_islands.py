"""Streaming DiLoCo islands in one process (islands in threads, mesh-less): the store's wire
format, bad input, and islands of 2 + 1 replicas against the single-program run with M=3.
The real-process tests are in test_diloco_islands_procs.py."""
import os
import threading

import jax
import numpy as np
import optax
import pytest

from jaxpar.diloco import replica_grads, streaming_diloco
from jaxpar.diloco import store as st
from jaxpar.diloco.islands import Island, IslandError

from diloco_helpers import batch_for, loss_fn, tiny_params

H, P, TAU, STEPS = 4, 2, 1, 9


def _sd(replicas, quantize="none"):
    return streaming_diloco(optax.adam(3e-3), num_replicas=replicas, sync_every=H,
                            num_fragments=P, overlap_steps=TAU, alpha=0.5, quantize=quantize)


def _batch(t, replicas):
    xs, ys = zip(*(batch_for(t, m) for m in replicas))
    return np.stack(xs), np.stack(ys)


def test_blob_checksum_names_torn_and_flipped_files():
    blob = st.pack({"kind": "delta"}, {"a": np.arange(6, dtype=np.float32).reshape(2, 3)})
    header, arrays = st.unpack(blob, "x")
    np.testing.assert_array_equal(arrays["a"], np.arange(6, dtype=np.float32).reshape(2, 3))
    assert header["kind"] == "delta"
    with pytest.raises(st.CorruptBlob, match="torn/delta is torn or corrupt"):
        st.unpack(blob[:-5], "torn/delta")
    flipped = bytearray(blob)
    flipped[-1] ^= 1
    with pytest.raises(st.CorruptBlob, match="sha256 mismatch"):
        st.unpack(bytes(flipped), "flipped")


def test_create_if_absent_has_one_winner(tmp_path):
    s = st.SyncStore(str(tmp_path / "store"))
    wins = [s.create("rounds/00000000/record.json", str(i).encode()) for i in range(3)]
    assert wins == [True, False, False]
    assert s.get("rounds/00000000/record.json")[0] == b"0"


def _run_islands(store, replicas_per_island, steps=STEPS, quantize="none"):
    """Islands in threads; island k holds global replicas offset..offset+m−1."""
    out, errors = {}, []
    offsets = np.cumsum([0] + replicas_per_island)

    def run(k, m):
        try:
            sd = _sd(m, quantize)
            grad = replica_grads(loss_fn)
            step = jax.jit(lambda s, b: (lambda lg: (sd.inner_update(lg[1], s), lg[0]))(
                grad(s.params, b)))
            isl = Island(sd, store, count=len(replicas_per_island), island_id=k, wait_s=30,
                         heartbeat_s=0.2, poll_s=0.01)
            state = isl.join(sd.init(tiny_params(7)))
            losses = []
            while isl.step < steps:
                state, loss_M = step(state, _batch(isl.step + 1, range(offsets[k], offsets[k] + m)))
                losses.append(np.asarray(loss_M))
                state = isl.after_step(state)
            state = isl.finish(state)
            isl.close()
            out[k] = (np.stack(losses), jax.device_get(state.global_params),
                      jax.device_get(state.outer_state), isl.rounds)
        except Exception as e:  # reported by the test thread
            errors.append(e)

    threads = [threading.Thread(target=run, args=(k, m)) for k, m in enumerate(replicas_per_island)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    return out


def test_islands_2_plus_1_replicas_equal_single_program_m3(tmp_path):
    """Token weighting: the mean is over the members' replicas (3), as in the single program;
    θ_global and the outer state are bit-identical on both islands."""
    got = _run_islands(str(tmp_path / "store"), [2, 1])
    sd = _sd(3)
    grad = replica_grads(loss_fn)
    step = jax.jit(lambda s, b: (lambda lg: (sd.update(lg[1], s), lg[0]))(grad(s.params, b)))
    state, ref = sd.init(tiny_params(7)), []
    for t in range(1, STEPS + 1):
        state, loss_M = step(state, _batch(t, range(3)))
        ref.append(np.asarray(loss_M))
    state = sd.finalize(state)
    ref = np.stack(ref)
    np.testing.assert_allclose(got[0][0], ref[:, :2], rtol=0, atol=1e-5)
    np.testing.assert_allclose(got[1][0], ref[:, 2:], rtol=0, atol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=1e-5),
                 got[0][1], jax.device_get(state.global_params))
    for a, b in zip(jax.tree.leaves(got[0][1:3]), jax.tree.leaves(got[1][1:3])):
        np.testing.assert_array_equal(a, b)  # bitwise
    assert [r["members"] for r in got[0][3]] == [[0, 1]] * 4
    assert got[0][3][0]["round"] == 0 and got[0][3][0]["step"] == H // P + TAU
    # training moved the params: the comparison is not of two initial states
    assert np.max(np.abs(got[0][1]["head"] - tiny_params(7)["head"])) > 1e-3


def _island(store, k=0, count=2, quantize="none", **kw):
    return Island(_sd(1, quantize), store, count=count, island_id=k, wait_s=5, heartbeat_s=0.2,
                  **kw)


def test_bad_input_is_one_line(tmp_path):
    store = str(tmp_path / "store")
    with pytest.raises(IslandError, match=r"diloco.islands.id=2 must be in 0..1"):
        _island(store, k=2)
    blocker = tmp_path / "file"
    blocker.write_text("x")  # a store path under a regular file cannot be created
    with pytest.raises(IslandError, match="sync store .* failed") as e:
        _island(str(blocker / "store")).join(_sd(1).init(tiny_params(7)))
    assert "\n" not in str(e.value)
    params = tiny_params(7)
    first = _island(store)
    first.join(_sd(1).init(params))
    try:  # same id while the first is alive: its heartbeat advances
        with pytest.raises(IslandError, match=r"diloco.islands.id=0 is already taken"):
            _island(store).join(_sd(1).init(params))
        with pytest.raises(IslandError, match=r"quantize='int8' \(store: 'none'\)"):
            _island(store, k=1, quantize="int8").join(_sd(1, "int8").init(params))
        with pytest.raises(IslandError, match=r"count=3 \(store: 2\)"):
            _island(store, k=1, count=3).join(_sd(1).init(params))
        with pytest.raises(IslandError, match="initial params differ"):
            _island(store, k=1).join(_sd(1).init(tiny_params(8)))
    finally:
        first.close()
    # a resumed island (step > 0) on an empty store: the store was lost
    state = _sd(1).init(params)
    with pytest.raises(IslandError, match="holds no rounds, but island 0 resumes at step 5"):
        _island(str(tmp_path / "empty")).join(state._replace(step=state.step + 5))


def test_rejoin_with_missing_or_corrupt_global_state(tmp_path):
    store = str(tmp_path / "store")
    _run_islands(store, [1, 1], steps=5)
    root = tmp_path / "store"
    newest = max(os.listdir(root / "global"))
    path = root / "global" / newest
    path.write_bytes(path.read_bytes()[:-3])
    with pytest.raises(IslandError, match=f"island 0 cannot rejoin: .*global/{newest} is torn"):
        _island(store).join(_sd(1).init(tiny_params(7)))
    for name in os.listdir(root / "global"):
        os.remove(root / "global" / name)
    with pytest.raises(IslandError, match="has rounds but no global state"):
        _island(store).join(_sd(1).init(tiny_params(7)))


def test_config_section_and_id_from_environment(tmp_path):
    from pathlib import Path

    from jaxpar.diloco.islands import ID_ENV, islands_config
    from jaxpar.train.config import ConfigError, load_config
    from jaxpar.train.checks import validate

    base = Path(__file__).resolve().parents[1] / "configs" / "base.yaml"
    # train.nonfinite=rollback (the default) would rewind one island behind the others
    common = [f"train.run_dir={tmp_path / 'run'}", "mesh.data=8", "diloco.enabled=true",
              "train.nonfinite=skip"]
    cfg = load_config(base, common + ["diloco.islands={store: /s, count: 3, wait_s: 30}",
                                      "diloco.islands.id=2"])
    validate(cfg, 8)
    assert islands_config(cfg.diloco.islands) == islands_config(
        {"store": "/s", "count": 3, "wait_s": 30}, env={ID_ENV: "2"})
    bad = (("{store: /s, count: 3, id: 3}", "id=3 must be in 0..2"),
           ("{store: /s, count: 3}", "diloco.islands.id is required"),
           ("{store: /s, count: 2, id: 0, wait: 3}",
            "unknown key diloco.islands.wait (valid keys: store, count, id, wait_s)"))
    for value, words in bad:
        with pytest.raises(ConfigError) as e:
            validate(load_config(base, common + [f"diloco.islands={value}"]), 8)
        assert words in str(e.value)
