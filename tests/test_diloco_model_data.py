"""The experiment's model and data: GQA causal attention against a naive reference, the
pluggable attention argument, deterministic byte batches, fragments of the real param tree."""
import jax
import jax.numpy as jnp
import numpy as np

from jaxpar.diloco import split_fragments
from jaxpar.models.transformer import Transformer, TransformerConfig, causal_attention
from jaxpar.train.loop import cross_entropy
from jaxpar.data import DEFAULT_CORPUS, ByteData

CFG = TransformerConfig(layers=4, embed=32, heads=4, kv_heads=2, head_dim=8, mlp=64)


def naive_attention(q, k, v):
    q, k, v = map(np.asarray, (q, k, v))
    B, N, H, D = q.shape
    rep = H // k.shape[2]
    out = np.zeros_like(q)
    for b in range(B):
        for h in range(H):
            s = q[b, :, h] @ k[b, :, h // rep].T / np.sqrt(D)
            s = np.where(np.tril(np.ones((N, N), bool)), s, -np.inf)
            p = np.exp(s - s.max(-1, keepdims=True))
            out[b, :, h] = (p / p.sum(-1, keepdims=True)) @ v[b, :, h // rep]
    return out


def test_causal_gqa_attention_matches_naive():
    kq, kk, kv = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(kq, (2, 7, 4, 8))
    k, v = jax.random.normal(kk, (2, 7, 2, 8)), jax.random.normal(kv, (2, 7, 2, 8))
    np.testing.assert_allclose(causal_attention(q, k, v), naive_attention(q, k, v), rtol=1e-5, atol=1e-5)


def test_attention_is_pluggable_and_causal():
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 256, (2, 16)), jnp.int32)
    params = Transformer(CFG).init(jax.random.key(1), tokens)["params"]
    seen = []

    def spy(q_BNHD, k_BNKD, v_BNKD, segment_ids_BN, positions_BN):
        seen.append((q_BNHD.shape, k_BNKD.shape))
        return causal_attention(q_BNHD, k_BNKD, v_BNKD, segment_ids_BN, positions_BN)

    a = Transformer(CFG).apply({"params": params}, tokens)
    b = Transformer(CFG, attention_fn=spy).apply({"params": params}, tokens)
    np.testing.assert_allclose(a, b, rtol=1e-6)
    assert seen == [((2, 16, 4, 8), (2, 16, 2, 8))] * 4
    # causal: changing the last token leaves earlier logits unchanged
    c = Transformer(CFG).apply({"params": params}, tokens.at[:, -1].set(0))
    np.testing.assert_allclose(a[:, :-1], c[:, :-1], rtol=1e-5, atol=1e-5)
    # a different attention really changes the output
    d = Transformer(CFG, attention_fn=lambda q, k, v, *_: jnp.zeros_like(q)).apply({"params": params}, tokens)
    assert not np.allclose(a, d)


def test_byte_data_is_deterministic():
    assert 300_000 < DEFAULT_CORPUS.stat().st_size < 2_000_000
    d1, d2 = ByteData.load(seq_len=32), ByteData.load(seq_len=32)
    np.testing.assert_array_equal(d1.batch(5, 4, replica=1), d2.batch(5, 4, replica=1))
    assert not np.array_equal(d1.batch(5, 4, replica=0), d1.batch(5, 4, replica=1))
    assert not np.array_equal(d1.batch(5, 4), d1.batch(6, 4))
    assert d1.replica_batches(3, 4, 2).shape == (2, 4, 33)
    ev = d1.eval_batches(4, 3)
    np.testing.assert_array_equal(ev, d2.eval_batches(4, 3))
    assert ev.shape == (3, 4, 33) and ev.max() < 256
    text = bytes(d1.batch(0, 1)[0].astype(np.uint8)).decode("ascii")
    assert text.isprintable() or "\n" in text


def test_fragments_of_the_model_are_strided_and_balanced():
    data = ByteData.load(seq_len=16)
    model = Transformer(CFG)
    params = model.init(jax.random.key(0), jnp.asarray(data.batch(0, 2))[:, :-1])["params"]
    fr = split_fragments(params, 2, 8)
    assert fr.layers(0) == ("layers_0", "layers_2") and fr.layers(1) == ("layers_1", "layers_3")
    sizes = [fr.size(p) for p in range(2)]
    assert max(sizes) / min(sizes) < 1.2
    w = jnp.asarray(data.batch(0, 2))
    logits = model.apply({"params": params}, w[:, :-1])
    assert float(cross_entropy(logits, w[:, 1:])) > 4.0  # untrained ≈ ln 256
