"""impl="auto": the choice logic on the cost model, the library entry points, the trainer.

The choice tests use made-up profiles whose answer is known independently (bytes from the
closed forms, call counts), not the measured CPU profile, so they test the logic, not the
machine. The end-to-end tests check auto's outputs against the dense reference.
"""
import dataclasses
import importlib.util
import json
import pathlib

import jax
import numpy as np
import pytest

from jaxpar import comm, make_mesh
from jaxpar.attention import (attention, auto, blockwise, choose_impl, dense_attention,
                              sequence_parallel_attention)

SLOW_LINK = auto.Profile("slow link", kernel_flops=1e18, call_s=0.0, link_bw=1e6,
                         latency_s=0.0, mem_bw=1e18, overlap=False, bidirectional=False,
                         shared_cores=False)
SHAPE = dict(batch=1, seq_len=4096, head_dim=64, causal=True)


def fwd_bwd_bytes(c, heads, kv_heads, seq_len=4096):
    """Bytes per device of a candidate, from the closed forms alone."""
    kw = dict(batch=1, seq_len=seq_len, heads=heads, kv_heads=kv_heads, head_dim=64,
              backward=True, causal=True)
    if c.impl == "hybrid":
        pr, pu = c.shards
        kv_u = kv_heads if kv_heads % pu == 0 else pu
        a2a = comm.attention_bytes("ulysses", **(kw | {"seq_len": seq_len // pr}), shards=pu)
        ring = comm.attention_bytes(c.ring_impl, **(kw | {"heads": heads // pu,
                                                          "kv_heads": kv_u // pu}), shards=pr)
        return sum(a2a.values()) + sum(ring.values())
    return sum(comm.attention_bytes(c.impl, **kw, shards=c.shards[0]).values())


@pytest.mark.parametrize("heads,kv_heads", [(8, 8), (8, 1), (16, 2), (6, 6)])
@pytest.mark.parametrize("p", [4, 8])
def test_link_bound_picks_fewest_bytes(heads, kv_heads, p):
    # With free compute and a slow link, the fastest schedule is the one that sends least:
    # the pick must be the runnable candidate with the fewest closed-form bytes.
    cands = auto.flexible(p)
    choice = auto.choose(cands, heads=heads, kv_heads=kv_heads, profile=SLOW_LINK, **SHAPE)
    runnable = [c for c in cands if c.label in choice.predicted_s]
    fewest = min(runnable, key=lambda c: fwd_bwd_bytes(c, heads, kv_heads))
    assert fwd_bwd_bytes(choice.pick, heads, kv_heads) == pytest.approx(
        fwd_bwd_bytes(fewest, heads, kv_heads))
    assert choice.pick.label == min(choice.predicted_s, key=choice.predicted_s.get)


def test_gqa_link_bound_is_ring_mha_is_not():
    # K = H/8: ring's K/V are 1/8 of TokenRing's queries + partials; K = H, no Ulysses: the
    # causal TokenRing sends less than ring's K/V + dK/dV
    gqa = auto.choose(auto.candidates(8), heads=6, kv_heads=1, profile=SLOW_LINK,
                      **SHAPE | {"seq_len": 8192})
    assert gqa.pick.impl == "ring" and "ulysses(P=8)" in gqa.skipped


def test_call_bound_picks_ulysses_and_never_what_cannot_run():
    # Expensive kernel calls: Ulysses makes 2, a ring of P makes 2P; but with heads that do
    # not split over P it must not be picked, however cheap the model says it is.
    calls = dataclasses.replace(SLOW_LINK, link_bw=1e18, call_s=1.0)
    ok = auto.choose(auto.flexible(8), heads=8, kv_heads=8, profile=calls, **SHAPE)
    assert ok.pick.impl == "ulysses"
    bad = auto.choose(auto.flexible(8), heads=6, kv_heads=6, profile=calls, **SHAPE)
    assert bad.pick.impl == "hybrid" and bad.pick.shards == (4, 2)  # 6 heads split over 2
    assert set(bad.skipped) == {"ulysses(P=8)", "hybrid[ring](ring 2 × ulysses 4)",
                                "hybrid[tokenring](ring 2 × ulysses 4)"}
    assert "do not split over 8" in bad.skipped["ulysses(P=8)"]
    with pytest.raises(ValueError, match="no schedule can run"):
        auto.choose(auto.candidates(4), heads=8, kv_heads=8, profile=calls,
                    **SHAPE | {"seq_len": 4100})


def test_overlap_and_bidirectional_links():
    # A GPU-like profile hides a ring's transfers behind its compute; without overlap the
    # two add up. TokenRing's two directions at once halve its busier direction's time.
    s = auto.Shape(1, 8192, 8, 8, 64, 2, False)
    base = dataclasses.replace(auto.H200, kernel_by_len=None, link_bw=20e9)  # link-bound
    ring = auto.Candidate("ring", (8,))
    over = auto.predict(ring, s, base)
    serial = auto.predict(ring, s, dataclasses.replace(base, overlap=False))
    assert serial > over > 0
    tr = auto.Candidate("tokenring", (8,))
    assert auto.predict(tr, s, base) < auto.predict(
        tr, s, dataclasses.replace(base, bidirectional=False))


def test_tokenring_extra_scales_tokenring_bytes_only():
    # Profile.tokenring_extra: each TokenRing byte costs (1 + extra) link-times; ring and
    # Ulysses are untouched. With free compute and no latency the time is the bytes alone.
    s = auto.Shape(1, 4096, 8, 8, 64, 4, True)
    extra = dataclasses.replace(SLOW_LINK, tokenring_extra=0.5)
    for c in auto.flexible(8):
        base, more = auto.predict(c, s, SLOW_LINK), auto.predict(c, s, extra)
        if c.impl == "tokenring":
            assert more == pytest.approx(1.5 * fwd_bwd_bytes(c, 8, 8) / SLOW_LINK.link_bw)
        elif c.impl == "hybrid" and c.ring_impl == "tokenring":
            assert base < more < 1.5 * base  # its Ulysses all-to-alls stay as they were
        else:
            assert more == base
    assert auto.profile_for("cpu").tokenring_extra >= 0.0


def test_profiles():
    cpu = auto.profile_for("cpu")
    assert cpu.shared_cores and not cpu.overlap and cpu.tile_cost is not None
    assert auto.profile_for("gpu").name == "h200"
    with pytest.raises(ValueError, match="no cost profile for backend 'tpu'"):
        auto.profile_for("tpu")


@pytest.mark.parametrize("lq,lk,tile", [(1024, 1024, 256), (768, 768, 256), (256, 128, 256),
                                        (96, 96, 64), (4096, 4096, 1024)])
@pytest.mark.parametrize("causal", [False, True])
def test_tile_model_counts_the_kernels_tiles(lq, lk, tile, causal):
    # Count by positions, as the kernel decides (blockwise._tile_has_work): a tile has work
    # unless its last query is before its first key. One unit per tile.
    if causal and lq != lk:
        pytest.skip("causal calls have equal lengths")
    tq, tk = np.gcd(lq, tile), np.gcd(lk, tile)
    q_last = np.arange(lq).reshape(-1, tq).max(1)
    k_first = np.arange(lk).reshape(-1, tk).min(1)
    want = int((q_last[:, None] >= k_first[None, :]).sum()) if causal else (lq // tq) * (lk // tk)
    per_tile = auto.TileCost(tile, call_s=0.0, tile_s=1.0, score_s=0.0, score_d_s=0.0)
    assert per_tile.seconds(lq, lk, 8, 32, causal) == want
    per_score = auto.TileCost(tile, call_s=0.0, tile_s=0.0, score_s=1.0, score_d_s=1.0,
                              gqa_s=100.0)
    assert per_score.seconds(lq, lk, 3, 16, causal) == want * tq * tk * 3 * 17
    assert per_score.seconds(lq, lk, 3, 16, causal, kv_heads=1) == want * tq * tk * 3 * 117
    # a tile's operands: q and k slices of its sides, every head, D wide
    per_operand = auto.TileCost(tile, call_s=0.0, tile_s=0.0, score_s=0.0, score_d_s=0.0,
                                operand_s=1.0)
    assert per_operand.seconds(lq, lk, 3, 16, causal) == want * 3 * (tq + tk) * 16


def test_tile_model_uses_the_kernels_few_heads_tile():
    # the model cuts tiles as the kernel does: calls over few heads take the larger tile
    few = blockwise.FEW_HEADS_TILES["cpu"]
    cost = auto.TileCost(256, call_s=0.0, tile_s=1.0, score_s=0.0, score_d_s=0.0,
                         few_heads=few)
    n = 4 * few[1]
    assert cost.seconds(n, n, few[0], 32, False) == (n // few[1]) ** 2
    assert cost.seconds(n, n, few[0] + 1, 32, False) == (n // 256) ** 2
    assert auto.profile_for("cpu").tile_cost.few_heads == tuple(few)
    assert auto.profile_for("cpu").tile_cost.tile == blockwise.tile_sizes()[1]


def test_cpu_profile_fits_its_own_calibration_calls():
    # profile_cpu.json holds the measured calls the tile model was fitted to: the model must
    # reproduce each (fit quality, recomputed here from the raw CPU seconds)
    raw = json.loads(auto.CPU_PROFILE.read_text())
    cost, n_dev = auto.profile_for("cpu").tile_cost, raw["measurements"]["devices"]
    calls = raw["measurements"]["kernel_calls"]
    assert len(calls) >= 12 and {c["D"] for c in calls} >= {16, 32, 64, 128}
    assert any(c["K"] < c["H"] for c in calls) and any(c["causal"] for c in calls)
    ratios = [cost.seconds(c["Lq"], c["Lk"], c["H"], c["D"], c["causal"], c["K"]) /
              (c["cpu_s"] / n_dev) for c in calls]
    assert 0.75 < min(ratios) and max(ratios) < 1.33, ratios


def test_heldout_grid_is_unseen_and_its_scores_are_todays_model():
    # docs/attention.md's held-out tables come from two timings of the grid (JSON): no
    # kernel call of its schedules is a calibration call, and re-scoring its measured rows
    # with the committed profile gives the summary it holds (a model change without
    # `--rescore` fails here), in which auto beats the fixed rule and always-ring
    root = pathlib.Path(__file__).parents[1]
    spec = importlib.util.spec_from_file_location("bench_attention_auto",
                                                  root / "scripts/bench_attention_auto.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    bench.assert_heldout_unseen()
    for timing in ("attention_auto_heldout.json", "attention_auto_heldout_run2.json"):
        saved = json.loads((root / "docs" / timing).read_text())
        rows = [{k: r[k] for k in ("P", "N", "H", "K", "D", "causal", "measured")}
                for r in saved["rows"]]
        assert len(rows) == len(bench.HELDOUT) == 24
        summary = bench.score(rows, auto.profile_for("cpu"))
        for policy, got in summary.items():
            assert got == pytest.approx(saved["summary"][policy]), (timing, policy)
        ours = summary["auto"]
        for base in ("fixed rule", "always ring"):
            assert ours["within_10pct"] >= summary[base]["within_10pct"], (timing, base)
            assert ours["mean_slowdown"] < summary[base]["mean_slowdown"], (timing, base)


# --- the library: impl="auto" runs what it picks, and it matches dense -----------------


def inputs(n=64, h=4, kh=2, d=16):
    kq, kk, kv = jax.random.split(jax.random.key(0), 3)
    return (jax.random.normal(kq, (1, n, h, d)), jax.random.normal(kk, (1, n, kh, d)),
            jax.random.normal(kv, (1, n, kh, d)))


@pytest.mark.slow
def test_sequence_parallel_auto_matches_dense_one_and_two_axes():
    q, k, v = inputs(h=6, kh=2)  # 6 heads: Ulysses cannot take 4 shards
    want = dense_attention(q, k, v, causal=True)
    mesh = jax.make_mesh((4,), ("seq",), devices=jax.devices()[:4])
    choice = choose_impl(q, k, mesh=mesh, causal=True)
    assert choice.pick.impl in ("ring", "tokenring") and "ulysses(P=4)" in choice.skipped
    got = sequence_parallel_attention(q, k, v, mesh=mesh, impl="auto", causal=True)
    np.testing.assert_allclose(got, want, atol=2e-5)
    mesh2 = make_mesh(seq=2, seq_inner=2, devices=jax.devices()[:4])
    choice2 = choose_impl(q, k, mesh=mesh2, axis=("seq", "seq_inner"), causal=True)
    assert choice2.pick.impl == "hybrid" and set(choice2.pick.axes) == {"seq", "seq_inner"}
    got2 = sequence_parallel_attention(q, k, v, mesh=mesh2, impl="auto",
                                       axis=("seq", "seq_inner"), causal=True)
    np.testing.assert_allclose(got2, want, atol=2e-5)


@pytest.mark.slow
def test_per_device_auto_matches_dense():
    q, k, v = inputs()
    mesh = make_mesh(seq=2, devices=jax.devices()[:2])
    spec = jax.sharding.PartitionSpec(None, "seq")
    f = jax.jit(jax.shard_map(lambda q, k, v: attention(q, k, v, impl="auto", axis="seq"),
                              mesh=mesh, in_specs=(spec,) * 3, out_specs=spec))
    np.testing.assert_allclose(f(q, k, v), dense_attention(q, k, v), atol=2e-5)


def test_auto_bad_axis():
    q, k, _ = inputs()
    mesh = jax.make_mesh((2,), ("seq",), devices=jax.devices()[:2])
    with pytest.raises(ValueError, match="axis 'sp' is not in the mesh"):
        choose_impl(q, k, mesh=mesh, axis="sp")


# --- the trainer: attention.impl=auto is resolved before anything is built ------------


def test_trainer_resolves_and_records_auto(tmp_path, capsys):
    from jaxpar.train import attention_choice
    from jaxpar.train.config import load_config
    from jaxpar.train.checks import validate

    run_dir = tmp_path / "run"
    cfg = load_config("configs/base.yaml", [
        "attention.impl=auto", "mesh.data=2", "mesh.seq=4", "model.heads=6", "model.kv_heads=2",
        "model.embed=48", "train.seq_len=64", f"train.run_dir={run_dir}"])
    validate(cfg, 8)  # accepted
    resolved = attention_choice.apply(cfg)
    a, m = resolved.attention, resolved.mesh
    assert m.seq * m.seq_inner == 4 and a.impl != "ulysses"  # 6 heads do not split over 4
    assert (a.impl == "hybrid") == (m.seq_inner > 1)
    record = json.loads((run_dir / "attention_choice.json").read_text())
    assert record["impl"] == a.impl and record["mesh"] == {"seq": m.seq,
                                                           "seq_inner": m.seq_inner}
    assert "ulysses(P=4)" in record["cannot_run"] and record["label"] in record["predicted_ms"]
    assert "attention impl=auto picked" in capsys.readouterr().out
    validate(resolved, 8)
    one = load_config("configs/base.yaml", ["attention.impl=auto"])
    assert attention_choice.resolve(one)[0].attention.impl == "dense"  # no sequence shards
