"""Landmark attention: fast paths (grouped softmax, top-k retrieval) against the reference
that inserts the landmark tokens and applies the paper's grouping literally; special cases,
causality, errors, module."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jattn import reference
from jattn.efficient.landmark import landmark_attention, mean_landmark_keys, num_blocks
from jattn.nn.efficient.landmark import LandmarkAttention
from tests.conftest import assert_close, normal, normalised_error, output_and_vjp, to64


def _inputs(dtype=jnp.float32, B=2, T=11, N=4, K=2, H=8, Hv=6, block_size=4, seed=0):
    nb = num_blocks(T, block_size)
    return (normal(seed, (B, T, N, H), dtype), normal(seed + 1, (B, T, K, H), dtype),
            normal(seed + 2, (B, T, K, Hv), dtype), normal(seed + 3, (B, nb, K, H), dtype))



# T = 11 with blocks of 4 (last block 3 tokens), 3 (last block 2), 1, and 16 (one block).
@pytest.mark.parametrize("block_size,is_causal,top_k", [
    (4, True, None), (1, True, 2), (3, False, 2), (16, True, 1)])
def test_matches_reference_float64(block_size, is_causal, top_k):
    with jax.enable_x64(True):
        args = to64(_inputs(block_size=block_size))
        cotangent = normal(7, (2, 11, 4, 6), jnp.float64)
        options = {"block_size": block_size, "is_causal": is_causal, "top_k": top_k}
        got, g_got = output_and_vjp(functools.partial(landmark_attention, **options),
                                     cotangent)(*args)
        want, g_want = output_and_vjp(
            functools.partial(reference.landmark_attention, **options), cotangent)(*args)
        assert normalised_error(got, want) < 1e-12
        for a, w in zip(g_got, g_want, strict=True):
            assert normalised_error(a, w) < 1e-11


@pytest.mark.parametrize("is_causal", [True, False])
def test_top_k_covering_all_blocks_is_the_grouped_softmax(is_causal):
    # 11 tokens in blocks of 3: 4 blocks, at most 3 other blocks per query.
    args = _inputs(block_size=3)
    dense = jax.jit(functools.partial(landmark_attention, block_size=3,
                                      is_causal=is_causal))(*args)
    for top_k in (3, 10):
        retrieved = jax.jit(functools.partial(landmark_attention, block_size=3,
                                              is_causal=is_causal, top_k=top_k))(*args)
        np.testing.assert_allclose(retrieved, dense, atol=1e-6)
    fewer = jax.jit(functools.partial(landmark_attention, block_size=3, is_causal=is_causal,
                                      top_k=1))(*args)
    assert not np.allclose(fewer, dense, atol=1e-3)


def test_one_block_is_causal_softmax_attention():
    q, k, v, landmarks = _inputs(block_size=11)
    got = jax.jit(functools.partial(landmark_attention, block_size=11))(q, k, v, landmarks)
    want = jax.jit(functools.partial(reference.dot_product_attention, is_causal=True))(q, k, v)
    np.testing.assert_allclose(got, want, atol=1e-6)


def test_no_retrieval_is_attention_within_the_block():
    q, k, v, landmarks = _inputs(block_size=4)
    i = np.arange(11)
    same_block = (i[:, None] // 4 == i[None, :] // 4) & (i[None, :] <= i[:, None])
    got = jax.jit(functools.partial(landmark_attention, block_size=4, top_k=0))(
        q, k, v, landmarks)
    want = jax.jit(reference.dot_product_attention)(q, k, v, mask=same_block)
    np.testing.assert_allclose(got, want, atol=1e-6)


def test_weights_sum_to_one():
    q, k, _, landmarks = _inputs(block_size=3)
    ones = jnp.ones((2, 11, 2, 3))
    for is_causal, top_k in ((True, None), (False, 2)):
        out = jax.jit(functools.partial(landmark_attention, block_size=3, is_causal=is_causal,
                                        top_k=top_k))(q, k, ones, landmarks)
        np.testing.assert_allclose(out, 1, atol=1e-6)


def test_landmark_gates_the_block():
    # A landmark far above everything else takes (almost) all of the own-group mass: the
    # output of a query in a later block is the within-block softmax average of that block.
    q, k, v, landmarks = _inputs(N=1, K=1, block_size=4)
    landmarks = landmarks.at[:, 0].set(1e3 * q[:, 10])  # query 10 (block 2) sees block 0
    out = jax.jit(functools.partial(landmark_attention, block_size=4))(q, k, v, landmarks)
    logits = jnp.einsum("bh,bjh->bj", q[:, 10, 0], k[:, :4, 0]) / np.sqrt(8)
    want = jnp.einsum("bj,bjv->bv", jax.nn.softmax(logits, -1), v[:, :4, 0])
    np.testing.assert_allclose(out[:, 10, 0], want, atol=1e-5)


def test_float32_and_bfloat16_match_float64_reference():
    for dtype, top_k in ((jnp.float32, None), (jnp.bfloat16, 2)):
        args = _inputs(dtype, block_size=3)
        cotangent = normal(5, (2, 11, 4, 6), dtype)
        options = {"block_size": 3, "top_k": top_k}
        got, grads = output_and_vjp(functools.partial(landmark_attention, **options),
                                     cotangent)(*args)
        assert got.dtype == dtype
        with jax.enable_x64(True):
            want, want_grads = output_and_vjp(
                functools.partial(reference.landmark_attention, **options),
                to64(cotangent))(*to64(args))
            assert_close(got, want, dtype, "forward")
            for a, w in zip(grads, want_grads, strict=True):
                assert_close(a, w, dtype, "grad")


@pytest.mark.parametrize("top_k", [None, 1])
def test_causal_does_not_see_the_future(top_k):
    q, k, v, landmarks = _inputs(N=2, K=2, block_size=3)
    fn = jax.jit(functools.partial(landmark_attention, block_size=3, top_k=top_k))
    y = fn(q, k, v, landmarks)
    for t in (4, 8):
        rng = np.random.default_rng(t)
        later = [np.asarray(x).copy() for x in (q, k, v, landmarks)]
        for x in later[:3]:
            x[:, t + 1:] = rng.standard_normal(x[:, t + 1:].shape)
        # The landmarks of query t's block and of later blocks come after t.
        later[3][:, t // 3:] = rng.standard_normal(later[3][:, t // 3:].shape)
        y2 = fn(*later)
        np.testing.assert_allclose(y[:, :t + 1], y2[:, :t + 1], atol=1e-6)
        assert not np.allclose(y[:, t + 1:], y2[:, t + 1:])


def test_jit_vmap_grad():
    args = _inputs(block_size=3)
    fn = functools.partial(landmark_attention, block_size=3, top_k=2)
    expected = jax.jit(fn)(*args)
    batched = jax.jit(jax.vmap(lambda *a: fn(*(x[None] for x in a))[0]))(*args)
    np.testing.assert_allclose(batched, expected, atol=1e-6)
    grads = jax.jit(jax.grad(lambda *a: fn(*a).sum(), argnums=(0, 1, 2, 3)))(*args)
    assert all(bool(jnp.isfinite(g).all()) for g in grads)


@pytest.mark.parametrize("change,name,error", [
    ({"block_size": 0}, "block_size", ValueError),
    ({"block_size": 2.0}, "block_size", ValueError),
    ({"top_k": -1}, "top_k", ValueError),
    ({"landmark_keys": jnp.ones((2, 2, 2, 8))}, "landmark_keys", ValueError),
    ({"landmark_keys": jnp.ones((2, 3, 2, 8), jnp.bfloat16)}, "landmark_keys", TypeError),
    ({"landmark_keys": jnp.ones((2, 3, 2))}, "landmark_keys", ValueError),
    ({"key": jnp.ones((2, 11, 2, 7))}, "key", ValueError),
    ({"value": jnp.ones((2, 10, 2, 6))}, "value", ValueError),
    ({"query": jnp.ones((2, 11, 4, 8), jnp.int32)}, "query", TypeError),
])
def test_bad_input(change, name, error):
    q, k, v, landmarks = _inputs(block_size=4)
    args = {"query": q, "key": k, "value": v, "landmark_keys": landmarks,
            "block_size": 4} | change
    with pytest.raises(error, match=rf"^{name}:"):
        landmark_attention(**args)


def test_cross_attention_is_not_implemented():
    q, k, v, landmarks = _inputs(block_size=4)
    with pytest.raises(NotImplementedError, match="cross"):
        landmark_attention(q[:, :5], k, v, landmarks, block_size=4)


def test_mean_landmark_keys():
    k = normal(3, (2, 11, 2, 4))
    offset = normal(4, (2, 4))
    got = mean_landmark_keys(k, 4, offset=offset)
    kn = np.asarray(k)
    want = np.stack([kn[:, 0:4].mean(1), kn[:, 4:8].mean(1), kn[:, 8:11].mean(1)], 1)
    np.testing.assert_allclose(got, want + np.asarray(offset), atol=1e-6)


def _project(linear, x):
    return x @ linear.kernel[...] + linear.bias[...]


@pytest.mark.parametrize("with_states", [False, True])
def test_module_equals_functional_call(with_states):
    module = LandmarkAttention(8, num_heads=2, block_size=3, top_k=1, rngs=nnx.Rngs(0))
    x = normal(1, (2, 10, 8))
    states = normal(2, (2, 4, 8)) if with_states else None
    q, k, v = (_project(p, x).reshape(2, 10, 2, 4)
               for p in (module.q_proj, module.k_proj, module.v_proj))
    if with_states:
        landmarks = _project(module.k_proj, states).reshape(2, 4, 2, 4)
    else:
        kn = np.asarray(k)
        landmarks = jnp.stack([kn[:, i:i + 3].mean(1) for i in (0, 3, 6, 9)], 1)
        landmarks = landmarks + module.landmark_key[...]
    y = jax.jit(functools.partial(reference.landmark_attention, block_size=3, top_k=1))(
        q, k, v, landmarks)
    want = _project(module.out_proj, y.reshape(2, 10, 8))
    got = nnx.jit(lambda m, x, s: m(x, landmark_states=s))(module, x, states)
    np.testing.assert_allclose(got, want, atol=1e-5)
    with pytest.raises(ValueError, match=r"^num_heads:"):
        LandmarkAttention(8, num_heads=3, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"^landmark_states:"):
        module(x, landmark_states=jnp.ones((2, 3, 8)))


# ---------------------------------------------------------------- decoding against a cache


@pytest.mark.parametrize("top_k,T", [(None, 1), (0, 3), (2, 3)])
def test_decode_equals_the_last_rows_of_the_reference(top_k, T):
    """Queries at the last T positions of 23 tokens (last block partial) against a cache of
    28 slots whose unwritten slots hold garbage: the float64 reference's last rows, with
    the length traced under jit."""
    from jattn.efficient.landmark import landmark_decode

    S, slots, bs = 23, 28, 4
    with jax.enable_x64(True):
        q, k, v, marks = to64(_inputs(T=slots, block_size=bs, seed=3))
        garbage = (slice(None), slice(S, None))
        k, v = k.at[garbage].set(1e3), v.at[garbage].set(-1e3)
        decode = jax.jit(functools.partial(landmark_decode, block_size=bs, top_k=top_k))
        got = decode(q[:, S - T:S], k, v, marks, jnp.int32(S))
        want = reference.landmark_attention(q[:, :S], k[:, :S], v[:, :S],
                                            marks[:, :num_blocks(S, bs)], block_size=bs,
                                            top_k=top_k)[:, S - T:]
        assert normalised_error(got, want) < 1e-12
    # float32 against the chunked training form's rows
    q, k, v, marks = _inputs(T=S, block_size=bs, seed=3)
    got = landmark_decode(q[:, -T:], k, v, marks, S, block_size=bs, top_k=top_k)
    want = landmark_attention(q, k, v, marks, block_size=bs, top_k=top_k)[:, -T:]
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=1e-4)


def test_decode_bad_length():
    from jattn.efficient.landmark import landmark_decode

    q, k, v, marks = _inputs(T=8, block_size=4)
    for length in (1, 9):  # fewer than the 3 queries, more than the 8 slots
        with pytest.raises(ValueError, match="length"):
            landmark_decode(q[:, :3], k, v, marks, length, block_size=4)


@pytest.mark.parametrize("top_k", [None, 1])
def test_module_decoding_equals_the_full_forward(top_k):
    """prefill(5 tokens), 4 single steps, then a block of 3: the full causal forward."""
    layer = LandmarkAttention(16, num_heads=2, block_size=3, top_k=top_k, rngs=nnx.Rngs(2))
    x = normal(5, (2, 12, 16))
    full = layer(x)
    y, cache = nnx.jit(lambda m, x: m.prefill(x, max_length=16))(layer, x[:, :5])
    pieces = [y]
    step = nnx.jit(lambda m, x, c: m.step(x, c))
    for t in range(5, 9):
        y, cache = step(layer, x[:, t:t + 1], cache)
        pieces.append(y)
    y, cache = step(layer, x[:, 9:], cache)
    pieces.append(y)
    assert int(cache.length) == 12
    np.testing.assert_allclose(jnp.concatenate(pieces, 1), full, atol=2e-5, rtol=1e-4)
