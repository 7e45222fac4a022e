"""Bytes counted from compiled HLO equal the closed forms; the headline scaling property."""
import jax
import jax.numpy as jnp
import pytest

from jaxpar import comm, make_mesh
from jaxpar.attention import sequence_parallel_attention


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
