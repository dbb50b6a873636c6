"""jattn.nn.MultiHeadAttention equals the functional call on its own parameters."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jattn import positions, reference
from jattn.nn import MultiHeadAttention


def _expected(mha, x, *, window=None):
    B, L, D = x.shape
    qkv = x @ mha.proj.qkv_proj.kernel[...] + mha.proj.qkv_proj.bias[...]
    q, k, v = (a.reshape(B, L, mha.num_heads, -1) for a in jnp.split(qkv, 3, axis=-1))
    allowed = np.tril(np.ones((L, L), bool))
    if window is not None:
        allowed &= ~np.tril(np.ones((L, L), bool), -window)
    out = reference.dot_product_attention(q, k, v, mask=allowed)
    return out.reshape(B, L, D) @ mha.out_proj.kernel[...] + mha.out_proj.bias[...]


@pytest.mark.parametrize("window", [None, 3])
def test_module_equals_causal_attention_on_its_projections(window):
    mha = MultiHeadAttention(12, num_heads=3, window=window, dropout_rate=0.5,
                             rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (2, 9, 12))
    np.testing.assert_allclose(mha(x), _expected(mha, x, window=window), atol=1e-5)


def test_dropout_needs_a_key_and_bad_sizes_raise():
    mha = MultiHeadAttention(8, dropout_rate=0.5, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (1, 6, 8))
    np.testing.assert_array_equal(mha(x), mha(x))
    assert not np.allclose(mha(x), mha(x, dropout_rng=jax.random.key(0)))
    with pytest.raises(ValueError, match="num_heads"):
        MultiHeadAttention(10, num_heads=3, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="window"):
        MultiHeadAttention(8, window=0, rngs=nnx.Rngs(0))


def test_rope_rotates_queries_and_keys_before_attention():
    mha = MultiHeadAttention(16, num_heads=2, rope_base=500.0, rope_scaling="ntk",
                             rope_factor=2.0, rngs=nnx.Rngs(2))
    x = jax.random.normal(jax.random.key(3), (2, 7, 16))
    q, k, v = mha.proj(x)
    options = dict(base=500.0, scaling="ntk", factor=2.0)
    out = reference.dot_product_attention(positions.apply_rope(q, **options),
                                          positions.apply_rope(k, **options), v,
                                          is_causal=True)
    want = out.reshape(2, 7, 16) @ mha.out_proj.kernel[...] + mha.out_proj.bias[...]
    np.testing.assert_allclose(mha(x), want, atol=1e-5)
    # Relative: shifting every position by the same amount changes nothing.
    shifted = reference.dot_product_attention(
        positions.apply_rope(q, jnp.arange(7) + 11, **options),
        positions.apply_rope(k, jnp.arange(7) + 11, **options), v, is_causal=True)
    np.testing.assert_allclose(shifted, out, atol=1e-5)
