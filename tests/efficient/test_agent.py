"""Agent attention: fast path against the dense reference (which materialises the [T, S]
weights), pooling, causality, errors, module."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jattn
from jattn import reference
from jattn.efficient.agent import agent_attention, agent_segments, pool_agents
from jattn.nn.efficient.agent import AgentAttention
from tests.conftest import assert_close, normal, normalised_error, output_and_vjp, qkv, to64


# T = 11, 7 and S = 9 are no multiple of num_agents (overlapping segments); 13 > T agents.
@pytest.mark.parametrize("num_agents,is_causal,T,S", [
    (4, True, 11, 11), (13, True, 11, 11), (3, False, 7, 9), (5, True, 11, 6)])
def test_matches_dense_reference_float64(num_agents, is_causal, T, S):
    with jax.enable_x64(True):
        q, k, v = to64(qkv(T=T, S=S))
        cotangent = normal(5, (*q.shape[:3], v.shape[3]), jnp.float64)
        options = {"num_agents": num_agents, "is_causal": is_causal}
        got, g_got = output_and_vjp(functools.partial(agent_attention, **options),
                                     cotangent)(q, k, v)
        want, g_want = output_and_vjp(functools.partial(reference.agent_attention, **options),
                                       cotangent)(q, k, v)
        assert normalised_error(got, want) < 1e-12
        for a, w in zip(g_got, g_want, strict=True):
            assert normalised_error(a, w) < 1e-11


def test_biases_match_reference_with_gradients(is_causal=True):
    with jax.enable_x64(True):
        q, k, v = to64(qkv(T=10, S=10))
        b1 = normal(6, (4, 3, 10), jnp.float64)  # [N, n, S]
        b2 = normal(7, (2, 1, 10, 3), jnp.float64)  # [B, 1, T, n]
        cotangent = normal(8, (2, 10, 4, 6), jnp.float64)

        def call(fn, q, k, v, b1, b2):
            return fn(q, k, v, num_agents=3, agent_key_bias=b1, query_agent_bias=b2,
                      is_causal=is_causal)
        got, g_got = output_and_vjp(functools.partial(call, agent_attention), cotangent)(
            q, k, v, b1, b2)
        want, g_want = output_and_vjp(functools.partial(call, reference.agent_attention),
                                       cotangent)(q, k, v, b1, b2)
        assert normalised_error(got, want) < 1e-12
        for a, w in zip(g_got, g_want, strict=True):
            assert normalised_error(a, w) < 1e-11


def test_explicit_agents_match_reference():
    with jax.enable_x64(True):
        q, k, v = to64(qkv(T=6, S=9))
        agents = normal(9, (2, 5, 4, 8), jnp.float64)
        got = jax.jit(agent_attention)(q, k, v, agents=agents)
        want = jax.jit(reference.agent_attention)(q, k, v, agents=agents)
        assert normalised_error(got, want) < 1e-12


def test_one_agent_is_attention_of_the_mean_query():
    # One agent: the broadcast softmax is over a single agent, so every query gets V_A, which
    # is softmax attention of the mean query.
    q, k, v = qkv(T=9, S=7)
    got = jax.jit(functools.partial(agent_attention, num_agents=1))(q, k, v)
    mean_query = q.mean(axis=1, keepdims=True)
    want = jattn.dot_product_attention(mean_query, k, v)
    np.testing.assert_allclose(got, jnp.broadcast_to(want, got.shape), atol=1e-5)


def test_weights_are_convex_combinations():
    # Values all one: each output is the sum of its weights, 1 (0 for causal rows that see
    # no completed segment yet: positions before the end of the first segment).
    q, k, _ = qkv(T=11, S=11)
    ones = jnp.ones((2, 11, 2, 3))
    fn = jax.jit(agent_attention, static_argnames=("num_agents", "is_causal"))
    np.testing.assert_allclose(fn(q, k, ones, num_agents=4), 1, atol=1e-6)
    causal = fn(q, k, ones, num_agents=4, is_causal=True)
    _, end = agent_segments(11, 4)
    np.testing.assert_array_equal(causal[:, :end[0] - 1], 0)
    np.testing.assert_allclose(causal[:, end[0] - 1:], 1, atol=1e-6)


def test_float32_and_bfloat16_match_float64_reference():
    for dtype in (jnp.float32, jnp.bfloat16):
        q, k, v = qkv(dtype)
        cotangent = normal(5, (2, 11, 4, 6), dtype)
        fn = functools.partial(agent_attention, num_agents=4, is_causal=True)
        got, grads = output_and_vjp(fn, cotangent)(q, k, v)
        assert got.dtype == dtype
        with jax.enable_x64(True):
            want, want_grads = output_and_vjp(
                functools.partial(reference.agent_attention, num_agents=4, is_causal=True),
                to64(cotangent))(*to64((q, k, v)))
            assert_close(got, want, dtype, "forward")
            for a, w in zip(grads, want_grads, strict=True):
                assert_close(a, w, dtype, "grad")


def test_pool_agents_averages_contiguous_segments():
    x = normal(3, (2, 10, 3, 4))
    start, end = agent_segments(10, 4)
    assert start[0] == 0 and end[-1] == 10 and (end > start).all()
    assert (start[1:] <= end[:-1]).all()  # contiguous cover (neighbours may share one)
    pooled = pool_agents(x, 4)
    for a in range(4):
        np.testing.assert_allclose(pooled[:, a], np.asarray(x)[:, start[a]:end[a]].mean(1),
                                   atol=1e-6)
    # Divisible lengths: plain non-overlapping means.
    np.testing.assert_allclose(pool_agents(x, 5), np.asarray(x).reshape(2, 5, 2, 3, 4).mean(2),
                               atol=1e-6)


@pytest.mark.parametrize("T,S", [(11, 11), (8, 13)])
def test_causal_variant_does_not_see_the_future(T, S):
    q, k, v = qkv(T=T, S=S, N=2, K=2)
    fn = jax.jit(functools.partial(agent_attention, num_agents=3, is_causal=True))
    y = fn(q, k, v)
    for t in (2, T - 3):
        rng = np.random.default_rng(t)
        later = [np.asarray(x).copy() for x in (q, k, v)]
        for x in later:
            x[:, t + 1:] = rng.standard_normal(x[:, t + 1:].shape)
        y2 = fn(*later)
        np.testing.assert_allclose(y[:, :t + 1], y2[:, :t + 1], atol=1e-6)
        assert not np.allclose(y[:, t + 1:], y2[:, t + 1:])
    # Noncausal agents do see the future (the pooled agents carry it).
    noncausal = jax.jit(functools.partial(agent_attention, num_agents=3))
    changed = np.asarray(q).copy()
    changed[:, -1] += 1.0
    assert not np.allclose(noncausal(q, k, v)[:, 0], noncausal(changed, k, v)[:, 0])


def test_jit_vmap_grad():
    q, k, v = qkv()
    fn = functools.partial(agent_attention, num_agents=3, is_causal=True)
    expected = jax.jit(fn)(q, k, v)
    batched = jax.jit(jax.vmap(lambda a, b, c: fn(a[None], b[None], c[None])[0]))(q, k, v)
    np.testing.assert_allclose(batched, expected, atol=1e-6)
    grads = jax.jit(jax.grad(lambda *a: fn(*a).sum(), argnums=(0, 1, 2)))(q, k, v)
    assert all(bool(jnp.isfinite(g).all()) for g in grads)


@pytest.mark.parametrize("change,name,error", [
    ({"num_agents": None}, "num_agents", ValueError),
    ({"num_agents": 0}, "num_agents", ValueError),
    ({"num_agents": 2.5}, "num_agents", ValueError),
    ({"key": jnp.ones((2, 11, 2, 7))}, "key", ValueError),
    ({"key": jnp.ones((2, 11, 3, 8)), "value": jnp.ones((2, 11, 3, 6))}, "query, key",
     ValueError),
    ({"query": jnp.ones((2, 11, 4, 8), jnp.int32)}, "query", TypeError),
    ({"agents": jnp.ones((2, 3, 4, 7))}, "agents", ValueError),
    ({"agents": jnp.ones((2, 3, 4, 8), jnp.bfloat16)}, "agents", TypeError),
    ({"agents": jnp.ones((2, 3, 4, 8)), "num_agents": 4}, "num_agents", ValueError),
    ({"agent_key_bias": jnp.ones((4, 3, 10))}, "agent_key_bias", ValueError),
    ({"agent_key_bias": jnp.ones((1, 2, 4, 3, 11))}, "agent_key_bias", ValueError),
    ({"query_agent_bias": jnp.ones((4, 11, 2))}, "query_agent_bias", ValueError),
])
def test_bad_input(change, name, error):
    q, k, v = qkv()
    args = {"query": q, "key": k, "value": v, "num_agents": 3} | change
    with pytest.raises(error, match=rf"^{name}:"):
        agent_attention(**args)


def test_explicit_agents_cannot_be_causal():
    q, k, v = qkv()
    with pytest.raises(NotImplementedError, match="causal"):
        agent_attention(q, k, v, agents=q[:, :3], is_causal=True)


def _project(linear, x):
    return x @ linear.kernel[...] + linear.bias[...]


@pytest.mark.parametrize("cross", [False, True])
def test_module_equals_functional_call(cross):
    module = AgentAttention(8, num_heads=2, num_agents=3, max_length=12, rngs=nnx.Rngs(0))
    x = normal(1, (2, 10, 8))
    context = normal(2, (2, 7, 8)) if cross else x
    S = context.shape[1]
    q = _project(module.q_proj, x).reshape(2, 10, 2, 4)
    kv = _project(module.kv_proj, context)
    k, v = kv[..., :8].reshape(2, S, 2, 4), kv[..., 8:].reshape(2, S, 2, 4)
    y = jax.jit(functools.partial(reference.agent_attention, num_agents=3))(
        q, k, v, agent_key_bias=module.agent_key_bias[:, :, :S],
        query_agent_bias=module.query_agent_bias[:, :10])
    want = _project(module.out_proj, y.reshape(2, 10, 8))
    got = nnx.jit(lambda m, x, c: m(x, c if cross else None))(module, x, context)
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_module_causal_with_convolution_sees_no_future():
    module = AgentAttention(8, num_heads=2, num_agents=3, is_causal=True, dwc_kernel_size=3,
                            rngs=nnx.Rngs(0))
    x = normal(1, (2, 10, 8))
    call = nnx.jit(lambda m, x: m(x))
    y, y2 = call(module, x), call(module, x.at[:, 6:].add(1.0))
    np.testing.assert_allclose(y[:, :6], y2[:, :6], atol=1e-6)
    assert not np.allclose(y[:, 6:], y2[:, 6:])
    with pytest.raises(ValueError, match=r"^num_heads:"):
        AgentAttention(8, num_heads=3, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"^x:"):
        AgentAttention(8, max_length=4, rngs=nnx.Rngs(0))(x)


def test_pool_agents_on_a_grid_and_as_explicit_agents():
    image = normal(4, (2, 5, 6, 4, 8))  # [B, h, w, N, H]
    agents = pool_agents(image, (2, 3))
    rows, row_end = agent_segments(5, 2)
    cols, col_end = agent_segments(6, 3)
    x = np.asarray(image)
    want = np.stack([x[:, rows[i]:row_end[i], cols[j]:col_end[j]].mean((1, 2))
                     for i in range(2) for j in range(3)], 1)
    np.testing.assert_allclose(agents, want, atol=1e-6)
    q = image.reshape(2, 30, 4, 8)
    k, v = q[:, :, :2], q[:, :, 2:, :6]
    got = jax.jit(agent_attention)(q, k, v, agents=agents)
    np.testing.assert_allclose(got, jax.jit(reference.agent_attention)(q, k, v, agents=agents),
                               atol=1e-5)
    with pytest.raises(ValueError, match=r"^num_agents:"):
        pool_agents(image, 3)
