"""Bytes counted from compiled HLO equal the closed forms; the headline scaling property."""
import jax
import jax.numpy as jnp
import pytest

from jaxpar import comm, make_mesh
from jaxpar.attention import attention, sequence_parallel_attention


def counted(impl, p, *, n=64, h=4, kh=2, d=16, b=1, backward=False, segments=False,
            dtype=jnp.float32):
    devices = jax.devices()[:p]
    if impl == "hybrid":
        mesh, axis = make_mesh(seq=p // 2, seq_inner=2, devices=devices), ("seq", "seq_inner")
    else:
        mesh, axis = make_mesh(seq=p, devices=devices), "seq"
    q = jnp.ones((b, n, h, d), dtype)
    kv = jnp.ones((b, n, kh, d), dtype)
    # an argument, not a closed-over constant, or XLA folds its collectives away
    seg = jnp.zeros((b, n), jnp.int32) if segments else None

    def f(q, k, v, seg):
        return sequence_parallel_attention(q, k, v, mesh=mesh, impl=impl, axis=axis,
                                           segment_ids=seg).astype(jnp.float32).sum()

    # value_and_grad: plain grad would drop the (dead) forward output all-to-all of Ulysses
    fn = jax.value_and_grad(f, argnums=(0, 1, 2)) if backward else f
    return comm.bytes_by_kind(fn, q, kv, kv, seg)


def expected(impl, p, *, n=64, h=4, kh=2, d=16, b=1, backward=False, segments=False,
             itemsize=4):
    shards = (p // 2, 2) if impl == "hybrid" else p
    return comm.attention_bytes(impl, batch=b, seq_len=n, heads=h, kv_heads=kh, head_dim=d,
                                shards=shards, backward=backward, segment_ids=segments,
                                itemsize=itemsize)


def strip_reductions(bytes_by_kind):
    # the final `.sum()` of the test function adds a scalar all-reduce; not attention traffic
    return {k: v for k, v in bytes_by_kind.items() if k != "all-reduce"}


@pytest.mark.parametrize("impl", ["ulysses", "ring", "tokenring", "hybrid"])
@pytest.mark.parametrize("backward", [False, True])
def test_counted_bytes_equal_closed_form(impl, backward):
    # hybrid on 8 devices = ring of 4 × Ulysses of 2 (a ring of 2 turns both ways at once,
    # and XLA then rightly reuses the forward's K/V transfer in the backward)
    p = 8 if impl == "hybrid" else 4
    got = strip_reductions(counted(impl, p, backward=backward, segments=True))
    want = expected(impl, p, backward=backward, segments=True)
    assert got.keys() == want.keys()
    for kind in want:
        assert got[kind] == pytest.approx(want[kind], rel=1e-9), kind


def per_device_counted(impl, p, causal, backward, *, n=64, h=4, kh=2, d=16, b=1):
    """Every collective of the per-device schedule (inputs taken as already in zigzag
    order, so no reorder permutes), no loss reduction: nothing needs stripping."""
    mesh = make_mesh(seq=p, devices=jax.devices()[:p])
    spec = jax.sharding.PartitionSpec(None, "seq")
    q, w = jnp.ones((b, n, h, d)), jnp.ones((b, n, h, d))
    kv, seg = jnp.ones((b, n, kh, d)), jnp.zeros((b, n), jnp.int32)
    attn = jax.shard_map(lambda q, k, v, s: attention(q, k, v, impl=impl, axis="seq",
                                                      causal=causal, segment_ids=s),
                         mesh=mesh, in_specs=(spec,) * 4, out_specs=spec)
    if not backward:
        return comm.bytes_by_kind(attn, q, kv, kv, seg)

    def fwd_bwd(q, k, v, seg, w):  # the cotangent w is an argument: no all-reduce of a loss
        out, vjp = jax.vjp(lambda q, k, v: attn(q, k, v, seg), q, k, v)
        return out, vjp(w)

    return comm.bytes_by_kind(fwd_bwd, q, kv, kv, seg, w)


@pytest.mark.parametrize("impl,p,backward", [
    ("tokenring", 4, True),  # fwd+bwd: the forward's collectives are in it too
    pytest.param("tokenring", 4, False, marks=pytest.mark.slow),
    pytest.param("tokenring", 5, True, marks=pytest.mark.slow),  # odd P
    pytest.param("ring", 4, True, marks=pytest.mark.slow)])
def test_causal_counted_bytes_equal_closed_form_all_kinds(impl, p, backward):
    # causal TokenRing sends its query blocks and partials (and dQ) without the dead
    # half-rows: 3/4 of the non-causal bytes; every collective is compared, all-reduces
    # included
    got = per_device_counted(impl, p, True, backward, n=16 * p)
    want = comm.attention_bytes(impl, batch=1, seq_len=16 * p, heads=4, kv_heads=2,
                                head_dim=16, shards=p, backward=backward, segment_ids=True,
                                causal=True)
    assert got.keys() == want.keys()
    for kind in want:
        assert got[kind] == pytest.approx(want[kind], rel=1e-9), kind
    if impl == "tokenring":  # counted from both HLOs: 3/4 of the non-causal bytes
        full = per_device_counted(impl, p, False, backward, n=16 * p)
        assert got["collective-permute"] / full["collective-permute"] == pytest.approx(0.75)


def test_gqa_ring_sends_kv_heads_not_query_heads():
    mha = strip_reductions(counted("ring", 4, h=4, kh=4))["collective-permute"]
    gqa = strip_reductions(counted("ring", 4, h=4, kh=1))["collective-permute"]
    assert gqa == pytest.approx(mha / 4)


def test_bf16_bytes_follow_the_wire_dtype():
    # XLA:CPU widens bf16 collectives to f32 before sending (no bf16 collectives on host);
    # GPU/TPU send bf16. The count reads the dtype from the compiled HLO either way.
    wire_itemsize = 4 if jax.default_backend() == "cpu" else 2
    bf16 = strip_reductions(counted("ulysses", 4, dtype=jnp.bfloat16))["all-to-all"]
    assert bf16 == pytest.approx(expected("ulysses", 4, itemsize=wire_itemsize)["all-to-all"])


def test_ulysses_constant_when_n_and_p_grow_together_ring_does_not_shrink():
    # N/P fixed at 32 tokens per device: Ulysses bytes per device stay within (P−1)/P of a
    # constant; ring bytes grow ∝ P − 1.
    ul = {p: sum(strip_reductions(counted("ulysses", p, n=32 * p, h=8, kh=8)).values())
          for p in (2, 4, 8)}
    ring = {p: sum(strip_reductions(counted("ring", p, n=32 * p, h=8, kh=8)).values())
            for p in (2, 4, 8)}
    assert ul[8] / ul[2] == pytest.approx((7 / 8) / (1 / 2))  # bounded: < 2× for 4× the P
    assert ring[8] / ring[2] == pytest.approx(7.0)
    # At fixed N: Ulysses shrinks with P, ring/TokenRing do not.
    fixed = {impl: {p: sum(strip_reductions(counted(impl, p, n=128, h=8, kh=8)).values())
                    for p in (2, 8)} for impl in ("ulysses", "ring", "tokenring")}
    assert fixed["ulysses"][8] < 0.5 * fixed["ulysses"][2]
    assert fixed["ring"][8] >= fixed["ring"][2]
    assert fixed["tokenring"][8] >= fixed["tokenring"][2]


HLO = """HloModule m, num_partitions=8

%body (p: (s32[], f32[4,8])) -> (s32[], f32[4,8]) {
  %x = f32[4,8]{1,0} parameter(0)
  %cp = f32[4,8]{1,0} collective-permute(%x), channel_id=1, source_target_pairs={{0,1},{1,2},{2,3},{3,4},{4,5},{5,6},{6,7},{7,0}}
}

%cond (p: (s32[], f32[4,8])) -> pred[] {
  ROOT %c = pred[] constant(true)
}

ENTRY %main (a: f32[4,8]) -> f32[8,8] {
  %a = f32[4,8]{1,0} parameter(0)
  %w = (s32[], f32[4,8]) while(%t), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"3"}}
  %ag = f32[8,8]{1,0} all-gather(%a), channel_id=2, replica_groups=mesh['axis_0'=2,'axis_1'=4] {'axis_0'}, dimensions={0}
  %ar = bf16[4,8]{1,0} all-reduce(%a), channel_id=3, replica_groups=[2,4]<=[8], to_apply=%sum
  ROOT %r = f32[8,8]{1,0} copy(%ag)
}
"""


def test_hlo_parser_weights_loops_and_reads_group_formats():
    ops = {op.kind: op for op in comm.collectives_from_hlo(HLO)}
    assert ops["collective-permute"].bytes_per_device == 3 * 4 * 8 * 4  # 3 trips, full shift
    assert ops["all-gather"].group_size == 2
    assert ops["all-gather"].bytes_per_device == 8 * 8 * 4 / 2
    assert ops["all-reduce"].group_size == 4
    assert ops["all-reduce"].bytes_per_device == 2 * 4 * 8 * 2 * 3 / 4


def test_hlo_parser_refuses_loops_of_unknown_length():
    with pytest.raises(ValueError, match="no known trip count"):
        comm.collectives_from_hlo(HLO.replace(', backend_config={"known_trip_count":{"n":"3"}}', ""))
