"""LongHeads: fast path vs the dense masked reference (forward and gradients), the first and
own chunk always kept, full selection == causal attention, no leak from the future, dtypes,
jit/vmap, errors, the NNX module. Position remapping (rope_base): vs the reference's own
rotation at the remapped positions, the identity when every chunk is kept, top_k = 2 as RoPE
attention over [chunk 0, own chunk]; decoding: a prefill then steps equal one call."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jattn import reference
from jattn.core.cache import init_cache
from jattn.core.positions import apply_rope
from jattn.efficient.longheads import (
    LongHeadsCache,
    init_longheads_cache,
    longheads_attention,
    longheads_decode,
)
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


def _against_reference_float64(kw, T, N, K, seed):
    """The function against the float64 reference, forward and gradients: (args, want)."""
    args = to64(_qkv(T, N=N, K=K, seed=seed))
    cotangent = normal(9, (2, T, N, 6), jnp.float64)
    got, g_got = output_and_vjp(functools.partial(longheads_attention, **kw), cotangent)(*args)
    want, g_want = output_and_vjp(functools.partial(reference.longheads_attention, **kw),
                                   cotangent)(*args)
    assert got.dtype == jnp.float64
    assert_close(got, want, jnp.float64, "forward")
    for a, b in zip(g_got, g_want, strict=True):
        assert_close(a, b, jnp.float64, "grad")
    return args, want


@pytest.mark.parametrize("T,chunk,top_k,summary,N,K", CASES)
def test_matches_reference_float64(T, chunk, top_k, summary, N, K):
    kw = dict(chunk_size=chunk, top_k=top_k, summary=summary)
    with jax.enable_x64(True):
        args, want = _against_reference_float64(kw, T, N, K, seed=0)
        # The selection drops chunks: not causal attention.
        plain = reference.dot_product_attention(*args, is_causal=True)
        assert normalised_error(want, plain) > 1e-3


# A small rotary base: the angles turn fast enough at these lengths to matter.
ROPE = dict(rope_base=100.0)


@pytest.mark.parametrize("rope", [{}, ROPE])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_dtypes_against_reference(dtype, rope):
    kw = dict(chunk_size=4, top_k=3, **rope)
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


@pytest.mark.parametrize("rope", [{}, ROPE])
def test_jit_and_vmap_and_finite_grads(rope):
    q, k, v = (x.reshape(2, 1, *x.shape[1:]) for x in _qkv(14, seed=4))
    f = functools.partial(longheads_attention, chunk_size=4, top_k=3, **rope)
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


# --------------------------------------------------------------------------------------------
# Position remapping and decoding

# (T, chunk_size, top_k, summary, N, K, rope): T = 37 takes two query blocks of the gather
# (the second padded); partial rotation with NTK scaling.
REMAP_CASES = [
    (37, 4, 3, "attention", 4, 2, ROPE),
    (23, 3, 4, "mean", 2, 2, dict(rope_base=50.0, rope_fraction=0.5, rope_scaling="ntk",
                                  rope_factor=2.0)),
]


@pytest.mark.parametrize("T,chunk,top_k,summary,N,K,rope", REMAP_CASES)
def test_remapped_matches_reference_float64(T, chunk, top_k, summary, N, K, rope):
    kw = dict(chunk_size=chunk, top_k=top_k, summary=summary, **rope)
    with jax.enable_x64(True):
        args, want = _against_reference_float64(kw, T, N, K, seed=21)
        # The remapping matters: rotating at the original positions gives another output.
        options = dict(base=rope["rope_base"], fraction=rope.get("rope_fraction", 1.0),
                       scaling=rope.get("rope_scaling"), factor=rope.get("rope_factor", 1.0))
        q, k, v = args
        original = reference.longheads_attention(apply_rope(q, **options),
                                                 apply_rope(k, **options), v, chunk_size=chunk,
                                                 top_k=top_k, summary=summary)
        assert normalised_error(want, original) > 1e-3


def test_remapping_is_the_identity_when_every_chunk_is_kept():
    T, chunk, top_k = 21, 4, 6
    q, k, v = _qkv(T, seed=13)
    got = longheads_attention(q, k, v, chunk_size=chunk, top_k=top_k, **ROPE)
    want = reference.dot_product_attention(apply_rope(q, base=100.0), apply_rope(k, base=100.0),
                                           v, is_causal=True)
    assert_close(got, want, jnp.float32, "forward")


def test_top2_is_rope_attention_over_first_and_own_chunk():
    # Written from the layout alone: a query in chunk i >= 1 sees the sequence [chunk 0,
    # chunk i] at positions 0 .. 2c - 1, whatever i (the pairs stacked on the batch axis).
    T, c = 20, 4
    q, k, v = _qkv(T, seed=14)
    got = longheads_attention(q, k, v, chunk_size=c, top_k=2, **ROPE)
    m = T // c

    def pairs(x):  # [B, T, ...] -> [(m - 1) B, 2c, ...]: chunk 0 then chunk i, i = 1 .. m-1
        chunks = x.reshape(x.shape[0], m, c, *x.shape[2:])
        first = jnp.broadcast_to(chunks[:, :1], chunks[:, 1:].shape)
        return jnp.moveaxis(jnp.concatenate([first, chunks[:, 1:]], 2), 1, 0).reshape(
            -1, 2 * c, *x.shape[2:])

    qp, kp, vp = (pairs(x) for x in (q, k, v))
    want = reference.dot_product_attention(apply_rope(qp, base=100.0),
                                           apply_rope(kp, base=100.0), vp, is_causal=True)
    want = jnp.moveaxis(want[:, c:].reshape(m - 1, 2, c, 4, 6), 0, 1).reshape(2, T - c, 4, 6)
    assert_close(got[:, c:], want, jnp.float32, "forward")


@pytest.mark.parametrize("summary,rope", [("attention", ROPE), ("mean", {})])
def test_decode_prefill_then_steps_equal_one_call(summary, rope):
    # A prompt, a two-token step, then one token at a time through one jitted step (the
    # length traced); two spare slots past the end are ignored.
    T, T0, c, top_k = 19, 7, 3, 3
    q, k, v = _qkv(T, seed=12)
    kw = dict(chunk_size=c, top_k=top_k, summary=summary, **rope)
    cache = init_longheads_cache(2, T + 2, 4, 2, 8, chunk_size=c, value_head_dim=6)
    step = jax.jit(functools.partial(longheads_decode, **kw))
    outs = []
    for a, b in [(0, T0), (T0, T0 + 2)] + [(t, t + 1) for t in range(T0 + 2, T)]:
        out, cache = step(q[:, a:b], k[:, a:b], v[:, a:b], cache)
        outs.append(out)
    want = longheads_attention(q, k, v, **kw)
    np.testing.assert_allclose(jnp.concatenate(outs, 1), want, rtol=1e-5, atol=1e-6)
    assert int(cache.kv.length) == T
    # Complete chunks have a summary; the partial last chunk and the spare one none yet.
    done = np.abs(np.asarray(cache.summary_keys)).sum((0, 2, 3)) > 0
    np.testing.assert_array_equal(done, np.arange(done.size) < T // c)


def test_remapped_and_decode_errors():
    q, k, v = _qkv(8)
    f = functools.partial(longheads_attention, chunk_size=2, top_k=2)
    with pytest.raises(ValueError, match="rope_base"):
        f(q, k, v, rope_base=-1.0)
    with pytest.raises(ValueError, match="rope_base"):
        f(q, k, v, rope_base="10000")
    with pytest.raises(ValueError, match="rope_fraction"):
        f(q, k, v, rope_base=1e4, rope_fraction=0.1)
    with pytest.raises(ValueError, match="rope_scaling"):
        f(q, k, v, rope_base=1e4, rope_scaling="cubic")
    with pytest.raises(ValueError, match="implementation"):
        f(q, k, v, rope_base=1e4, implementation="xla")
    cache = init_longheads_cache(2, 8, 4, 2, 8, chunk_size=2, value_head_dim=6)
    d = functools.partial(longheads_decode, chunk_size=2, top_k=2)
    with pytest.raises(ValueError, match="key"):
        d(q[:, :2], k[:, :3], v[:, :3], cache)
    with pytest.raises(ValueError, match="cache"):
        d(q, k, v, cache.kv)
    with pytest.raises(ValueError, match="cache"):
        d(q, k, v, cache._replace(kv=init_cache(2, 8, 2, 8, value_head_dim=6, window=4)))
    with pytest.raises(ValueError, match="cache"):
        d(q, k, v, cache, chunk_size=3)
    with pytest.raises(ValueError, match="cache"):
        d(*(jnp.concatenate([x, x], 1) for x in (q, k, v)), cache)
    with pytest.raises(ValueError, match="rope_factor"):
        d(q, k, v, cache, rope_base=1e4, rope_scaling="ntk", rope_factor=0.0)
    with pytest.raises(ValueError, match="num_kv_heads"):
        init_longheads_cache(2, 8, 4, 3, 8, chunk_size=2)
    assert isinstance(cache, LongHeadsCache)


def test_module_with_rope_equals_function_and_decodes():
    layer = LongHeadsAttention(16, num_heads=4, num_kv_heads=2, chunk_size=3, top_k=3,
                               rope_base=100.0, rngs=nnx.Rngs(0))
    x = normal(2, (2, 13, 16))
    heads = layer.qkv_proj(x).reshape(2, 13, 8, 4)
    q, k, v = heads[:, :, :4], heads[:, :, 4:6], heads[:, :, 6:]
    out = longheads_attention(q, k, v, chunk_size=3, top_k=3, rope_base=100.0)
    full = layer(x)
    np.testing.assert_allclose(full, layer.out_proj(out.reshape(x.shape)), rtol=1e-5,
                               atol=1e-5)
    y, cache = layer.prefill(x[:, :8], max_length=13)
    ys = [y]
    for t in range(8, 13):
        y, cache = layer.step(x[:, t:t + 1], cache)
        ys.append(y)
    np.testing.assert_allclose(jnp.concatenate(ys, 1), full, rtol=1e-5, atol=1e-5)
