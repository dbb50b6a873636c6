"""LongHeads: fast path vs the dense masked reference (forward and gradients), the first and
own chunk always kept, full selection == causal attention, no leak from the future, dtypes,
jit/vmap, errors, the NNX module."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jattn import reference
from jattn.efficient.longheads import longheads_attention
from jattn.nn.efficient.longheads import LongHeadsAttention
from tests.conftest import assert_close, normal, normalised_error, output_and_vjp, to64


def _qkv(T, dtype=jnp.float32, B=2, N=4, K=2, H=8, Hv=6, seed=0):
    return (normal(seed, (B, T, N, H), dtype), normal(seed + 1, (B, T, K, H), dtype),
            normal(seed + 2, (B, T, K, Hv), dtype))


# (T, chunk_size, top_k, summary, N, K): lengths not multiples of the chunk, GQA and MHA,
# top_k = 2 (first + own only), more chunks than top_k, both summaries.
CASES = [
    (21, 4, 3, "attention", 4, 2),
    (23, 3, 4, "attention", 2, 2),
    (21, 4, 4, "mean", 4, 1),
    (17, 5, 2, "attention", 4, 2),
]


@pytest.mark.parametrize("T,chunk,top_k,summary,N,K", CASES)
def test_matches_reference_float64(T, chunk, top_k, summary, N, K):
    kw = dict(chunk_size=chunk, top_k=top_k, summary=summary)
    with jax.enable_x64(True):
        args = to64(_qkv(T, N=N, K=K))
        cotangent = normal(9, (2, T, N, 6), jnp.float64)
        got, g_got = output_and_vjp(functools.partial(longheads_attention, **kw),
                                     cotangent)(*args)
        want, g_want = output_and_vjp(functools.partial(reference.longheads_attention, **kw),
                                       cotangent)(*args)
        assert got.dtype == jnp.float64
        assert_close(got, want, jnp.float64, "forward")
        for a, b in zip(g_got, g_want, strict=True):
            assert_close(a, b, jnp.float64, "grad")
        # The selection drops chunks: not causal attention.
        plain = reference.dot_product_attention(*args, is_causal=True)
        assert normalised_error(want, plain) > 1e-3


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_dtypes_against_reference(dtype):
    kw = dict(chunk_size=4, top_k=3)
    args = _qkv(22, dtype=dtype, seed=3)
    cotangent = normal(7, (2, 22, 4, 6), dtype)
    got, g_got = output_and_vjp(functools.partial(longheads_attention, **kw), cotangent)(*args)
    with jax.enable_x64(True):
        want, g_want = output_and_vjp(functools.partial(reference.longheads_attention, **kw),
                                       to64(cotangent))(*to64(args))
    assert got.dtype == dtype
    assert_close(got, want, dtype, "forward")
    for a, b in zip(g_got, g_want, strict=True):
        assert a.dtype == dtype
        assert_close(a, b, dtype, "grad")


@pytest.mark.parametrize("T,chunk,top_k", [(21, 4, 6), (21, 4, 9), (8, 8, 2), (5, 1, 5)])
def test_all_chunks_is_causal_attention(T, chunk, top_k):
    args = _qkv(T, seed=5)
    got = jax.jit(functools.partial(longheads_attention, chunk_size=chunk, top_k=top_k))(*args)
    want = reference.dot_product_attention(*args, is_causal=True)
    assert_close(got, want, jnp.float32, "forward")


def test_topk2_is_first_plus_own_chunk():
    # Written straight from the rule, no scores involved: chunk 0 and the own chunk, causal.
    T, c = 19, 4
    args = _qkv(T, seed=6)
    got = longheads_attention(*args, chunk_size=c, top_k=2)
    t, s = np.arange(T)[:, None], np.arange(T)[None, :]
    mask = ((s // c == 0) | (s // c == t // c)) & (s <= t)
    want = reference.dot_product_attention(*args, mask=jnp.asarray(mask))
    assert_close(got, want, jnp.float32, "forward")


def test_first_chunk_kept_even_when_it_scores_worst():
    # Push chunk 0's keys far from every query; with top_k = 3 a late query still attends it.
    T, c = 20, 4
    q, k, v = _qkv(T, seed=8, N=2, K=2)
    k = k.at[:, :c].set(-10.0 * jnp.sign(q.mean(1, keepdims=True)))
    f = jax.jit(functools.partial(longheads_attention, chunk_size=c, top_k=3))
    base = f(q, k, v)
    moved = f(q, k, v.at[:, :c].add(1.0))
    assert not np.allclose(moved[:, -1], base[:, -1])


@pytest.mark.parametrize("T,chunk,top_k", [(18, 4, 3), (16, 3, 4)])
def test_no_leak_from_the_future(T, chunk, top_k):
    q, k, v = _qkv(T, seed=11)
    f = jax.jit(functools.partial(longheads_attention, chunk_size=chunk, top_k=top_k))
    base = f(q, k, v)
    for t in range(T - 1):
        later = (jnp.arange(T) > t)[None, :, None, None]
        bumped = [jnp.where(later, x + 3.0 * normal(20 + t, x.shape), x) for x in (q, k, v)]
        out = f(*bumped)
        # Equal up to rounding: later queries' picks change which tiles a query tile visits
        # and in what order (a masked tile adds exact zeros), not what row t sees.
        np.testing.assert_allclose(out[:, :t + 1], base[:, :t + 1], rtol=0, atol=2e-6)
        assert not np.allclose(out[:, t + 1:], base[:, t + 1:])


def test_jit_and_vmap_and_finite_grads():
    q, k, v = (x.reshape(2, 1, *x.shape[1:]) for x in _qkv(14, seed=4))
    f = functools.partial(longheads_attention, chunk_size=4, top_k=3)
    one = jax.jit(f)
    looped = jnp.stack([one(q[i], k[i], v[i]) for i in range(2)])
    np.testing.assert_allclose(jax.jit(jax.vmap(f))(q, k, v), looped, rtol=1e-5, atol=1e-6)
    grads = jax.jit(jax.grad(lambda *a: f(*a).sum(), argnums=(0, 1, 2)))(q[0], k[0], v[0])
    assert all(np.isfinite(np.asarray(g)).all() for g in grads)


def test_errors():
    q, k, v = _qkv(8)
    f = longheads_attention
    with pytest.raises(ValueError, match="query"):
        f(q[0], k[0], v[0], chunk_size=2, top_k=2)
    with pytest.raises(ValueError, match="heads"):
        f(q[:, :, :3], k, v, chunk_size=2, top_k=2)
    with pytest.raises(TypeError, match="dtype"):
        f(q.astype(jnp.bfloat16), k, v, chunk_size=2, top_k=2)
    with pytest.raises(ValueError, match="chunk_size"):
        f(q, k, v, chunk_size=0, top_k=2)
    with pytest.raises(TypeError, match="chunk_size"):
        f(q, k, v, chunk_size=2.0, top_k=2)
    with pytest.raises(ValueError, match="top_k"):
        f(q, k, v, chunk_size=2, top_k=1)
    with pytest.raises(ValueError, match="summary"):
        f(q, k, v, chunk_size=2, top_k=2, summary="max")
    with pytest.raises(NotImplementedError, match="cross"):
        f(q, k[:, :6], v[:, :6], chunk_size=2, top_k=2)


def test_module_equals_function():
    layer = LongHeadsAttention(16, num_heads=4, num_kv_heads=2, chunk_size=3, top_k=3,
                               rngs=nnx.Rngs(0))
    x = normal(1, (2, 13, 16))
    heads = layer.qkv_proj(x).reshape(2, 13, 8, 4)
    q, k, v = heads[:, :, :4], heads[:, :, 4:6], heads[:, :, 6:]
    want = layer.out_proj(longheads_attention(q, k, v, chunk_size=3, top_k=3).reshape(x.shape))
    np.testing.assert_allclose(layer(x), want, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="num_kv_heads"):
        LongHeadsAttention(16, num_heads=4, num_kv_heads=3, chunk_size=3, top_k=3,
                           rngs=nnx.Rngs(0))
