"""The alpha-beta model: limits it must respect, the H200 matmul measurements it must
reproduce, and the trends it must show."""
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


# Measured on one NVIDIA H200, bf16, jax 0.11.2, 2026-11-26: seconds of the whole matmul
# (c=1) and of the same matmul as c sequential row chunks, typed in from
# shared/measurements/h200-attention-and-chunking.json ("chunking", key "s") -- not from
# cost_model's table, so a wrong number on either side fails these tests.
MEASURED_S = {
    (16384, 8192, 4096): {1: 2.033170e-3, 2: 2.330691e-3, 4: 2.346438e-3, 8: 2.000427e-3,
                          16: 2.182338e-3},
    (8192, 4096, 2048): {1: 5.155865e-4, 2: 3.936980e-4, 4: 5.311600e-4, 8: 7.187550e-4,
                         16: 5.631165e-4},
    (4096, 4096, 1024): {1: 1.386570e-4, 2: 2.086270e-4, 4: 2.270125e-4, 8: 2.542660e-4,
                         16: 5.698835e-4},
}


@pytest.mark.parametrize("shape", list(MEASURED_S))
def test_model_reproduces_the_measured_matmuls(shape):
    """At a measured shape, whole and chunked times are the H200's (chunks faster than the
    whole matmul are capped at the whole matmul's time: no credit for a poor unsplit kernel)."""
    m, k, n = shape
    s = MEASURED_S[shape]
    assert cmod.matmul_time(m, k, n, NV) == pytest.approx(s[1], rel=1e-3)
    for c in (2, 4, 8, 16):
        chunked = c * cmod.matmul_time(m // c, k, n, NV, chunks=c)
        assert chunked == pytest.approx(max(s[c], s[1]), rel=2e-3), (shape, c)


def test_interpolation_between_and_outside_the_measured_shapes():
    small, mid, big = sorted(MEASURED_S, key=lambda s: s[0] * s[1] * s[2])
    flops = {s: 2.0 * s[0] * s[1] * s[2] for s in MEASURED_S}
    rate = {s: flops[s] / MEASURED_S[s][1] for s in MEASURED_S}
    # Log-linear in FLOPs: at the geometric mean of two shapes' FLOPs, the arithmetic mean.
    geo = (flops[small] * flops[mid]) ** 0.5
    assert cmod.matmul_throughput(geo, NV) == pytest.approx((rate[small] + rate[mid]) / 2,
                                                            rel=1e-3)
    e = {s: MEASURED_S[s][1] / MEASURED_S[s][8] for s in (small, mid)}
    assert cmod.chunk_efficiency(geo, 8, NV) == pytest.approx((e[small] + e[mid]) / 2, rel=2e-3)
    # Clamped outside: the nearest measured shape.
    assert cmod.matmul_throughput(flops[small] / 100, NV) == pytest.approx(rate[small], rel=1e-3)
    assert cmod.matmul_throughput(flops[big] * 100, NV) == pytest.approx(rate[big], rel=1e-3)
    # Between measured chunk counts: linear in log(c), e.g. c = 4·√2 halfway from 4 to 8.
    e4, e8 = (MEASURED_S[small][1] / MEASURED_S[small][c] for c in (4, 8))
    assert cmod.chunk_efficiency(flops[small], 4 * 2 ** 0.5, NV) == pytest.approx(
        (e4 + e8) / 2, rel=2e-3)


def test_chunks_beyond_the_table_pay_the_same_overhead_per_chunk():
    """32 chunks: time = whole + 32 × (per-chunk overhead measured at 16 chunks)."""
    m, k, n = 4096, 4096, 1024
    s = MEASURED_S[(m, k, n)]
    expected = s[1] + 32 * (s[16] - s[1]) / 16
    assert 32 * cmod.matmul_time(m // 32, k, n, NV, chunks=32) == pytest.approx(expected,
                                                                                rel=2e-3)


def test_predict_with_free_links_is_the_measured_chunking_loss():
    """With infinitely fast links and no contention, decomposed/plain = time(whole)/time(c
    chunks) of the table: all_gather_matmul at P=4 uni cuts the matmul in 4, at P=8 bidi in
    16, matmul_reduce_scatter likewise (plus its adds)."""
    free = NV.replace(link_bandwidth=1e30, link_latency=0.0, overlap_slowdown=0.0)
    m, k, n = 16384, 8192, 4096
    s = MEASURED_S[(m, k, n)]
    uni = cmod.predict("all_gather_matmul", m, k, n, 4, free, direction="uni")
    assert uni.plain_s == pytest.approx(s[1], rel=1e-3)
    assert uni.decomposed_s == pytest.approx(s[4], rel=2e-3)
    assert uni.speedup == pytest.approx(0.866, abs=2e-3)
    bidi = cmod.predict("all_gather_matmul", m, k, n, 8, free, direction="bidi")
    assert bidi.decomposed_s == pytest.approx(s[16], rel=2e-3)
    rs = cmod.predict("matmul_reduce_scatter", m, k, n, 4, free, direction="uni")
    add = NV.launch_overhead + 3 * (m // 4) * n * 2 / NV.hbm_bandwidth  # read 2, write 1
    assert rs.decomposed_s == pytest.approx(s[4] + 3 * add, rel=2e-3)


def test_replacing_compute_drops_the_measured_table():
    assert NV.matmuls and PCIE.matmuls == NV.matmuls
    assert NV.replace(link_bandwidth=1e9).matmuls == NV.matmuls
    roof = NV.replace(peak_flops=1e15, matmul_efficiency=1.0)
    assert roof.matmuls == ()
    assert cmod.matmul_time(8192, 8192, 8192, roof) == pytest.approx(
        NV.launch_overhead + 2 * 8192 ** 3 / 1e15)


def test_trends_overlap_pays_where_comm_is_a_large_share_and_chunks_stay_efficient():
    def fc1(t, p, hw):
        return cmod.predict_best("all_gather_matmul", t, 4256, 17024 // p, p, hw)[1].speedup

    # On the slow link the T-NLG-like FC-1 pays at every TP; on NVLink its collective is a
    # smaller share and chunking loses more than hiding gains once blocks get small.
    for p in (4, 8, 16):
        assert fc1(8192, p, PCIE) > fc1(8192, p, NV)
        assert fc1(8192, p, PCIE) > 1.15
    assert fc1(8192, 16, NV) < 1.0   # 16 blocks of a 74 GFLOP matmul: efficiency ~0.6
    assert fc1(8192, 8, NV) > 1.05   # 16 half blocks of a 148 GFLOP matmul: ~0.92
    # Small batches do not pay.
    assert fc1(256, 16, NV) < 1.0 and fc1(256, 16, PCIE) < 1.0
    assert cmod.choose("all_gather_matmul", 8192, 4256, 17024 // 8, 8, NV) == \
        ("collective_matmul", "bidi")
    assert cmod.choose("all_gather_matmul", 256, 4256, 17024 // 16, 16, NV) == ("none", "uni")
    # Gains peak where compute ~ comm: on the slow link the big PaLM-like matmul hides its
    # transfer better than the T-NLG-like one, on NVLink the other way round.
    palm = lambda hw: cmod.predict("all_gather_matmul", 8192, 18432, 73728 // 8, 8, hw)  # noqa
    tnlg = lambda hw: cmod.predict("all_gather_matmul", 8192, 4256, 17024 // 8, 8, hw)  # noqa
    assert palm(PCIE).speedup > tnlg(PCIE).speedup
    assert tnlg(NV).speedup > palm(NV).speedup
    # Where the collective is below the assumed 5 % contention it never pays (PaLM-like FC-1
    # at TP 4 on NVLink: comm ≈ 4 % of the matmul at any token count).
    assert cmod.break_even_tokens("all_gather_matmul", lambda p: 18432, lambda p: 73728 // p,
                                  4, NV) is None
    # A break-even token count exists for T-NLG-like FC-1, and it pays at every count above.
    t = cmod.break_even_tokens("all_gather_matmul", lambda p: 4256, lambda p: 17024 // p, 16,
                               NV)
    assert t is not None and 8192 < t <= 65536
    assert all(fc1(u, 16, NV) > 1.0 for u in (t, 2 * t, 8 * t))
    assert fc1(t // 2, 16, NV) <= 1.0


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
