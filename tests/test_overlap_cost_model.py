"""The alpha-beta model: limits it must respect, and the trends it must reproduce."""
import pytest

from jaxpar.overlap import cost_model as cmod

NV, PCIE = cmod.GPU_NVLINK, cmod.GPU_PCIE


@pytest.mark.parametrize("op", cmod.OPS)
@pytest.mark.parametrize("direction", ["uni", "bidi"])
def test_speedup_never_beats_perfect_overlap(op, direction):
    """decomposed >= max(compute, comm) - model slack; speedup <= (c + x) / max(c, x)."""
    for m, k, n, p in [(8192, 4256, 2128, 8), (8192, 18432, 9216, 16), (512, 512, 64, 4)]:
        for hw in (NV, PCIE):
            pr = cmod.predict(op, m, k, n, p, hw, direction=direction)
            bound = (pr.compute_s + pr.comm_s) / max(pr.compute_s, pr.comm_s)
            assert pr.speedup <= bound + 1e-9, (op, m, k, n, p, hw.name)
            assert pr.plain_s == pytest.approx(pr.compute_s + pr.comm_s)


def test_cannot_overlap_backend_never_pays():
    for op in cmod.OPS:
        assert cmod.predict(op, 8192, 4256, 2128, 8, cmod.CPU_HOST).speedup < 1
        assert cmod.choose(op, 8192, 4256, 2128, 8, cmod.CPU_HOST) == ("none", "uni")


def test_hand_computed_all_gather_matmul():
    """P=2, uni, no latency/launch, compute-bound: plain c + x, decomposed c/2 + max(c/2, x/…)."""
    hw = cmod.Hardware("toy", link_bandwidth=1e9, link_latency=0.0, peak_flops=1e12,
                       matmul_efficiency=1.0, hbm_bandwidth=1e18, launch_overhead=0.0)
    m, k, n = 1000, 1000, 500
    c = 2 * m * k * n / 1e12                     # 1 ms
    x_plain = (m / 2) * k * 2 / 2 / 1e9          # one block, both directions: 0.5 ms
    x_hop = (m / 2) * k * 2 / 1e9                # one block, one direction: 1 ms
    pr = cmod.predict("all_gather_matmul", m, k, n, 2, hw, direction="uni")
    assert pr.plain_s == pytest.approx(c + x_plain)
    assert pr.decomposed_s == pytest.approx(c / 2 + max(c / 2, x_hop))
    bidi = cmod.predict("all_gather_matmul", m, k, n, 2, hw, direction="bidi")
    assert bidi.decomposed_s == pytest.approx(c / 2 + max(c / 2, x_hop / 2))


def test_trends_overlap_pays_for_large_matmuls_and_stops_for_small_ones():
    big = cmod.predict("all_gather_matmul", 8192, 4256, 4 * 4256 // 8, 8, NV)
    small = cmod.predict("all_gather_matmul", 256, 4256, 4 * 4256 // 16, 16, NV)
    assert big.speedup > 1.1
    assert small.speedup < 1.0
    assert cmod.choose("all_gather_matmul", 8192, 4256, 4 * 4256 // 8, 8, NV)[0] == \
        "collective_matmul"
    assert cmod.choose("all_gather_matmul", 256, 4256, 4 * 4256 // 16, 16, NV) == ("none",
                                                                                  "uni")
    # Gains peak where compute ~ comm: on a slow link, the big PaLM-like matmul hides its
    # transfer better than the T-NLG-like one, on NVLink the other way round.
    palm = lambda hw: cmod.predict("all_gather_matmul", 8192, 18432, 73728 // 8, 8, hw)  # noqa
    tnlg = lambda hw: cmod.predict("all_gather_matmul", 8192, 4256, 17024 // 8, 8, hw)  # noqa
    assert palm(PCIE).speedup > tnlg(PCIE).speedup
    assert tnlg(NV).speedup > palm(NV).speedup
    # A break-even token count exists between the two.
    t = cmod.break_even_tokens("all_gather_matmul", lambda p: 4256, lambda p: 4 * 4256 // p, 16,
                               NV)
    assert t is not None and 256 < t <= 8192


def test_measured_chunk_efficiency_replaces_the_roofline():
    slow_chunks = NV.replace(chunk_efficiency=((2, 0.9), (16, 0.3)))
    a = cmod.predict("all_gather_matmul", 8192, 4256, 2128, 8, NV)
    b = cmod.predict("all_gather_matmul", 8192, 4256, 2128, 8, slow_chunks)
    assert b.decomposed_s > a.decomposed_s and b.plain_s == a.plain_s


def test_sublayer_table_covers_models_tps_and_links():
    rows = cmod.sublayer_table()
    assert {r["tp"] for r in rows} == {4, 8, 16}
    assert len({r["hardware"] for r in rows}) == 2 and len({r["model"] for r in rows}) == 2
    assert any(r["speedup"] < 1 for r in rows) and any(r["speedup"] > 1.2 for r in rows)


def test_bad_op_and_direction():
    with pytest.raises(ValueError, match="valid choices"):
        cmod.predict("matmul", 8, 8, 8, 2, NV)
    with pytest.raises(ValueError, match="direction='up'"):
        cmod.predict("all_gather_matmul", 8, 8, 8, 2, NV, direction="up")
