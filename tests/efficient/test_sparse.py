"""Input-dependent sparse attention: top-k against the dense masked reference, Zoology's
selective lookups, modules."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jattn
from jattn import reference
from jattn.efficient.sparse import (
    selection_penalty,
    selection_weights,
    selective_lookup,
    topk_attention,
)
from jattn.nn import SelectiveLookups, SparseAttention
from tests.conftest import normal, normalised_error, output_and_vjp, qkv, to64


def _jit(fn, **options):
    return jax.jit(functools.partial(fn, **options))



# Causal rows 0 .. top_k - 2 have fewer allowed keys than top_k and keep all of them.
@pytest.mark.parametrize("top_k,is_causal,T", [(1, True, 11), (3, True, 11), (4, False, 11),
                                               (None, True, 11), (3, True, 7)])
def test_matches_dense_reference_float64(top_k, is_causal, T):
    with jax.enable_x64(True):
        q, k, v = to64(qkv(T=T))
        cotangent = normal(5, (*q.shape[:3], v.shape[3]), jnp.float64)
        options = {"top_k": top_k, "is_causal": is_causal}
        got, g_got = output_and_vjp(functools.partial(topk_attention, **options),
                                     cotangent)(q, k, v)
        want, g_want = output_and_vjp(functools.partial(reference.topk_attention, **options),
                                       cotangent)(q, k, v)
        assert normalised_error(got, want) < 1e-12
        for a, w in zip(g_got, g_want, strict=True):
            assert normalised_error(a, w) < 1e-11


def test_float32_matches_float64_reference():
    q, k, v = qkv()
    got = jax.jit(functools.partial(topk_attention, top_k=3))(q, k, v)
    assert got.dtype == jnp.float32
    with jax.enable_x64(True):
        want = _jit(reference.topk_attention, top_k=3)(*to64((q, k, v)))
    assert normalised_error(got, want) < 2e-5


def test_ties_go_to_the_earlier_key():
    q, k, v = qkv(N=1, K=1, T=6, S=6)
    k = jnp.broadcast_to(k[:, :1], k.shape)  # every key equal: every score ties
    got = _jit(topk_attention, top_k=2)(q, k, v)
    # Each row keeps keys 0 and 1 (row 0 only key 0), averaged with equal weights.
    want = jnp.concatenate([v[:, :1], jnp.broadcast_to(v[:, :2].mean(1, keepdims=True),
                                                       (2, 5, 1, 6))], axis=1)
    np.testing.assert_allclose(got, want, atol=1e-6)
    np.testing.assert_allclose(got, _jit(reference.topk_attention, top_k=2)(q, k, v),
                               atol=1e-6)


@pytest.mark.parametrize("is_causal", [True, False])
def test_top_k_at_least_length_is_softmax_attention(is_causal):
    q, k, v = qkv()
    dense = _jit(jattn.dot_product_attention, is_causal=is_causal)(q, k, v)
    for top_k in (11, 50):
        got = _jit(topk_attention, top_k=top_k, is_causal=is_causal)(q, k, v)
        np.testing.assert_allclose(got, dense, atol=1e-5)


def test_default_top_k_is_ceil_sqrt_length():
    q, k, v = qkv()
    np.testing.assert_array_equal(jax.jit(topk_attention)(q, k, v),
                                  _jit(topk_attention, top_k=4)(q, k, v))


def test_causal():
    q, k, v = qkv(N=2, K=2)
    t = 5
    later = normal(8, (2, 11 - t - 1, 2, 8))
    fn = _jit(topk_attention, top_k=3)
    y = fn(q, k, v)
    y2 = fn(q.at[:, t + 1:].set(later), k.at[:, t + 1:].set(later),
                        v.at[:, t + 1:].set(later[..., :6]))
    np.testing.assert_allclose(y[:, :t + 1], y2[:, :t + 1], atol=1e-6)
    assert not np.allclose(y[:, t + 1:], y2[:, t + 1:])


def test_jit_vmap_grad():
    q, k, v = qkv()
    fn = functools.partial(topk_attention, top_k=3)
    expected = jax.jit(fn)(q, k, v)
    np.testing.assert_allclose(fn(q, k, v), expected, atol=1e-6)  # eager
    batched = jax.jit(jax.vmap(lambda a, b, c: fn(a[None], b[None], c[None])[0]))(q, k, v)
    np.testing.assert_allclose(batched, expected, atol=1e-6)
    grads = jax.jit(jax.grad(lambda *a: fn(*a).sum(), argnums=(0, 1, 2)))(q, k, v)
    assert all(bool(jnp.isfinite(g).all()) for g in grads)


@pytest.mark.parametrize("change,name,error", [
    ({"top_k": 0}, "top_k", ValueError),
    ({"top_k": 2.5}, "top_k", ValueError),
    ({"key": jnp.ones((2, 11, 2, 7))}, "key", ValueError),
    ({"key": jnp.ones((2, 11, 3, 8)), "value": jnp.ones((2, 11, 3, 6))}, "query, key",
     ValueError),
    ({"value": jnp.ones((2, 10, 2, 6))}, "value", ValueError),
    ({"query": jnp.ones((2, 11, 4), jnp.float32)}, "query", ValueError),
    ({"query": jnp.ones((2, 11, 4, 8), jnp.int32)}, "query", TypeError),
    ({"query": jnp.ones((2, 11, 4, 8), jnp.bfloat16)}, "query, key, value", TypeError),
])
def test_bad_input(change, name, error):
    q, k, v = qkv()
    args = {"query": q, "key": k, "value": v, "top_k": 3} | change
    with pytest.raises(error, match=rf"^{name}:"):
        topk_attention(**args)


def test_sparse_attention_module_equals_functional_call():
    module = SparseAttention(8, num_heads=2, rngs=nnx.Rngs(0))
    x = normal(1, (2, 10, 8))
    qkv = (x @ module.qkv_proj.kernel[...] + module.qkv_proj.bias[...]).reshape(2, 10, 3, 2, 4)
    y = _jit(reference.topk_attention, top_k=4)(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2])
    want = y.reshape(2, 10, 8) @ module.out_proj.kernel[...] + module.out_proj.bias[...]
    np.testing.assert_allclose(nnx.jit(lambda m, x: m(x))(module, x), want, atol=1e-5)
    with pytest.raises(ValueError, match=r"^num_heads:"):
        SparseAttention(8, num_heads=3, rngs=nnx.Rngs(0))


def test_selective_lookup_updates_only_the_selected_positions():
    x = normal(2, (2, 9, 4))
    a = normal(3, (2, 9, 4))
    s = selection_weights(normal(4, (2, 9)))
    np.testing.assert_allclose(s.sum(1), 1.0, rtol=1e-6)
    np.testing.assert_allclose(selective_lookup(x, a, s), x + s[..., None] * a, atol=1e-6)
    y = selective_lookup(x, a, s, select=True)  # ceil(sqrt(9)) = 3 positions per row
    changed = np.asarray((y != x).any(-1))
    assert changed.sum(1).tolist() == [3, 3]
    top3 = np.argsort(-np.asarray(s), axis=1)[:, :3]
    for row in range(2):
        assert set(np.flatnonzero(changed[row])) == set(top3[row])
    ties = selective_lookup(x, a, jnp.ones((2, 9)), top_k=2, select=True)
    assert np.asarray((ties != x).any(-1))[:, :2].all()
    assert not np.asarray((ties != x).any(-1))[:, 2:].any()
    assert float(selection_penalty(jnp.full((1, 16), 0.1), weight=1.0)) == 0.0
    with pytest.raises(ValueError, match=r"^selection:"):
        selective_lookup(x, a, s[:, :4])
    with pytest.raises(ValueError, match=r"^activation:"):
        selection_weights(s, activation="relu")


@pytest.mark.parametrize("activation", ["softmax", "sigmoid"])
def test_selective_lookups_module(activation):
    m = SelectiveLookups(8, activation=activation, rngs=nnx.Rngs(0))
    x = normal(5, (2, 9, 8))
    qkv = (x @ m.qkv_proj.kernel[...] + m.qkv_proj.bias[...]).reshape(2, 9, 3, 1, 8)
    context = _jit(reference.dot_product_attention, is_causal=True)(
        qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2])
    attended = context.reshape(2, 9, 8) @ m.out_proj.kernel[...] + m.out_proj.bias[...]
    logits = (x @ m.selecting.kernel[...])[..., 0]
    if activation == "softmax":
        logits = logits + m.selecting.bias[...]
        s = jax.nn.softmax(logits, axis=1)
    else:
        assert m.selecting.bias is None
        s = jax.nn.sigmoid(logits)
    call = nnx.jit(lambda m, x: m(x))
    np.testing.assert_allclose(call(m, x), x + s[..., None] * attended, atol=1e-5)
    penalty = 1e-3 * max(0.0, float(s.mean()) - 3 / 9) if activation == "sigmoid" else 0.0
    np.testing.assert_allclose(m.auxiliary_loss[...], penalty, atol=1e-7)
    m.eval()
    y = call(m, x)
    np.testing.assert_array_equal(m.auxiliary_loss[...], 0.0)
    assert np.asarray((y != x).any(-1)).sum(1).tolist() == [math.ceil(math.sqrt(9))] * 2


def test_selective_lookups_attention_dropout():
    m = SelectiveLookups(8, dropout_rate=0.5, rngs=nnx.Rngs(0, dropout=1))
    x = normal(6, (1, 9, 8))
    call = nnx.jit(lambda m, x: m(x))
    assert not np.allclose(call(m, x), call(m, x))  # a new dropout mask per call
    m.eval()
    np.testing.assert_array_equal(call(m, x), call(m, x))
