"""Bad use raises a ValueError that says what to change."""
import jax
import jax.numpy as jnp
import pytest

from jaxpar import make_mesh
from jaxpar.attention import attention, sequence_parallel_attention


@pytest.fixture(scope="module")
def mesh4():
    return make_mesh(seq=4, devices=jax.devices()[:4])


def qkv(n=64, h=4, kh=4, d=8, b=1):
    return jnp.ones((b, n, h, d)), jnp.ones((b, n, kh, d)), jnp.ones((b, n, kh, d))


def test_unknown_impl(mesh4):
    with pytest.raises(ValueError, match=r"unknown attention impl='flash2'.*'ulysses'.*'tokenring'"):
        sequence_parallel_attention(*qkv(), mesh=mesh4, impl="flash2")


def test_ulysses_heads_not_divisible(mesh4):
    with pytest.raises(ValueError, match=r"heads=6 not divisible by 'seq' axis size 4; use "
                                         r"impl='ring'.*\[1, 2, 3, 6\]"):
        sequence_parallel_attention(*qkv(h=6, kh=6), mesh=mesh4, impl="ulysses")


def test_ulysses_kv_heads_incompatible():
    mesh = make_mesh(seq=4, devices=jax.devices()[:4])
    with pytest.raises(ValueError, match=r"kv heads=3 and 'seq' axis size 4"):
        sequence_parallel_attention(*qkv(h=12, kh=3), mesh=mesh, impl="ulysses")


def test_causal_needs_2p_divisible_length(mesh4):
    with pytest.raises(ValueError, match=r"N=36 divisible by 2·P=8.*e\.g\. 32 or 40"):
        sequence_parallel_attention(*qkv(n=36), mesh=mesh4, impl="ring", causal=True)


def test_length_not_divisible_by_axis(mesh4):
    with pytest.raises(ValueError, match=r"N=66 not divisible by the \('seq',\) axis size 4"):
        sequence_parallel_attention(*qkv(n=66), mesh=mesh4, impl="tokenring")


def test_wrong_rank(mesh4):
    q, k, v = qkv()
    with pytest.raises(ValueError, match=r"must be rank 4 \[B, N, heads, D\]; got ranks 3, 4, 4"):
        sequence_parallel_attention(q[0], k, v, mesh=mesh4, impl="ring")


def test_mismatched_shapes(mesh4):
    q, k, v = qkv()
    with pytest.raises(ValueError, match=r"must be q\[B,N,H,D\] and k, v\[B,N,K,D\]"):
        sequence_parallel_attention(q, k[:, :32], v[:, :32], mesh=mesh4, impl="ring")


def test_gqa_heads_not_multiple(mesh4):
    with pytest.raises(ValueError, match=r"query heads=4 must be a multiple of kv heads=3"):
        sequence_parallel_attention(*qkv(h=4, kh=3), mesh=mesh4, impl="ring")


def test_segment_ids_shape(mesh4):
    with pytest.raises(ValueError, match=r"segment_ids shape \(1, 32\) must be \[B, N\]"):
        sequence_parallel_attention(*qkv(), mesh=mesh4, impl="ring",
                                    segment_ids=jnp.zeros((1, 32), jnp.int32))


def test_hybrid_needs_two_axes(mesh4):
    with pytest.raises(ValueError, match=r"impl='hybrid' needs axis=\(ring_axis, ulysses_axis\)"):
        sequence_parallel_attention(*qkv(), mesh=mesh4, impl="hybrid", axis="seq")


def test_axis_not_in_mesh(mesh4):
    with pytest.raises(ValueError, match=r"axis 'sequence' is not in the mesh; mesh axes are"):
        sequence_parallel_attention(*qkv(), mesh=mesh4, impl="ring", axis="sequence")


def test_dense_is_not_a_per_device_impl():
    with pytest.raises(ValueError, match=r"impl='dense' is the global-array reference"):
        attention(*qkv(), impl="dense")


def test_mesh_size_mismatch_lists_what_fits():
    with pytest.raises(ValueError, match=r"needs 3 devices but 8 are available.*seq=8"):
        make_mesh(seq=3)
    with pytest.raises(ValueError, match=r"unknown mesh axis \['model'\]"):
        make_mesh(model=8)
