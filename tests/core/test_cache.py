"""KV-cache decoding equals the full causal forward on the same sequence."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jattn import reference
from jattn.core.cache import cached_attention, init_cache, write_cache

B, L, N, K, H, HV = 2, 11, 4, 2, 8, 6


def _sequence(seed=0, value_heads=K):
    k = jax.random.split(jax.random.key(seed), 3)
    return (jax.random.normal(k[0], (B, L, N, H)), jax.random.normal(k[1], (B, L, K, H)),
            jax.random.normal(k[2], (B, L, value_heads, HV)))


def _full(q, k, v, window, sinks=0):
    t, s = np.arange(L)[:, None], np.arange(L)[None, :]
    allowed = s <= t if window is None else (s <= t) & ((s > t - window) | (s < sinks))
    return reference.dot_product_attention(q, k, v, mask=jnp.asarray(allowed)[None, None])


def _decode(q, k, v, cache, splits):
    """Feed the sequence in blocks ending at ``splits`` through a jitted step."""
    step = jax.jit(cached_attention)
    outs, start = [], 0
    for end in [*splits, L]:
        out, cache = step(q[:, start:end], k[:, start:end], v[:, start:end], cache)
        outs.append(out)
        start = end
    return jnp.concatenate(outs, 1), cache


@pytest.mark.parametrize("window", [None, 1, 4])
@pytest.mark.parametrize("splits", [list(range(1, L)), [6], [2, 9]],
                         ids=["token-by-token", "prefill-6", "blocks"])
def test_decoding_equals_the_full_causal_forward(window, splits):
    q, k, v = _sequence()
    cache = init_cache(B, L, K, H, value_head_dim=HV, window=window)
    got, cache = _decode(q, k, v, cache, splits)
    np.testing.assert_allclose(got, _full(q, k, v, window), atol=2e-5)
    assert int(cache.length) == L


@pytest.mark.parametrize("value_heads", [1, 4])
def test_diffqkv_cache_holds_its_own_value_heads(value_heads):
    # DiffQKV (P68): K = 2 key heads, 1 or 4 value heads, one cache.
    q, k, v = _sequence(2, value_heads)
    cache = init_cache(B, L, K, H, value_head_dim=HV, num_value_heads=value_heads)
    assert cache.value.shape == (B, L, value_heads, HV)
    got, _ = _decode(q, k, v, cache, [5, 6, 7])
    np.testing.assert_allclose(got, _full(q, k, v, None), atol=2e-5)


def test_prefill_then_decode_equals_decoding_from_scratch():
    q, k, v = _sequence(1)
    for window in (None, 3):
        fresh = init_cache(B, L, K, H, value_head_dim=HV, window=window)
        a, cache_a = _decode(q, k, v, fresh, list(range(1, L)))
        b, cache_b = _decode(q, k, v, fresh, [7])
        np.testing.assert_allclose(a, b, atol=2e-5)
        np.testing.assert_allclose(cache_a.key, cache_b.key, atol=0)
        np.testing.assert_allclose(cache_a.value, cache_b.value, atol=0)


@pytest.mark.parametrize("window,sinks", [(1, 2), (4, 3), (3, 20)])
@pytest.mark.parametrize("splits", [list(range(1, L)), [6], [2, 9], []],
                         ids=["token-by-token", "prefill-6", "blocks", "one-call"])
def test_sinks_stay_visible_beside_the_window(window, sinks, splits):
    q, k, v = _sequence(3)
    cache = init_cache(B, L, K, H, value_head_dim=HV, window=window, sinks=sinks)
    assert cache.key.shape[1] == sinks + window
    got, cache = _decode(q, k, v, cache, splits)
    np.testing.assert_allclose(got, _full(q, k, v, window, sinks), atol=2e-5)
    # The sink slots hold the first positions, the ring the last `window` after them.
    for p in range(min(sinks, L)):
        np.testing.assert_array_equal(cache.key[:, p], k[:, p])
    for p in range(max(sinks, L - window), L):
        np.testing.assert_array_equal(cache.key[:, sinks + (p - sinks) % window], k[:, p])


def test_ring_keeps_the_last_window_tokens():
    q, k, v = _sequence(2)
    _, cache = cached_attention(q, k, v, init_cache(B, L, K, H, value_head_dim=HV, window=4))
    for p in range(L - 4, L):  # position p lives in slot p mod 4
        np.testing.assert_array_equal(cache.key[:, p % 4], k[:, p])


def test_errors():
    q, k, v = _sequence()
    cache = init_cache(B, 4, K, H, value_head_dim=HV)
    with pytest.raises(ValueError, match="cache"):
        cached_attention(q, k, v, cache)  # 11 tokens into 4 slots
    with pytest.raises(ValueError, match="value"):
        cached_attention(q[:, :1], k[:, :1], v[:, :1, :, :4], cache)
    with pytest.raises(ValueError, match="window"):
        init_cache(B, 4, K, H, window=0)
    with pytest.raises(ValueError, match="sinks"):
        init_cache(B, 4, K, H, sinks=2)  # sinks need a window
    with pytest.raises(ValueError, match="sinks"):
        init_cache(B, 4, K, H, window=2, sinks=-1)


@pytest.mark.parametrize("window", [None, 4])
def test_decoding_with_x64_enabled(window):
    """With jax_enable_x64 on, Python ints become int64 beside the cache's int32 length; the
    cache still writes (full cache: a dynamic slice update) and decodes as without x64."""
    q, k, v = _sequence(5)
    want, _ = _decode(q, k, v, init_cache(B, L, K, H, value_head_dim=HV, window=window),
                      [4, 5, 8])
    with jax.enable_x64(True):
        cache = init_cache(B, L, K, H, value_head_dim=HV, window=window)
        got, cache = _decode(q, k, v, cache, [4, 5, 8])
        assert int(cache.length) == L
    np.testing.assert_allclose(got, want, atol=1e-6)
    np.testing.assert_allclose(got, _full(q, k, v, window), atol=2e-5)


def test_write_cache_checks_the_new_tokens():
    cache = init_cache(2, 4, 1, 8)
    x = jnp.ones((2, 3, 1, 8))
    assert int(write_cache(cache, x, x).length) == 3
    with pytest.raises(ValueError, match="key"):
        write_cache(cache, x[:1], x)  # another batch size
    with pytest.raises(ValueError, match="value"):
        write_cache(cache, x, x[..., :4])  # another head size
    with pytest.raises(ValueError, match="do not fit"):
        write_cache(write_cache(cache, x, x), x, x)
