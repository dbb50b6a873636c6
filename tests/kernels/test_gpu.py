"""GPU flash kernel specifics, in interpret mode on CPU: what tests/kernels/test_flash.py does
not cover (vmap, head-dim padding, broadcast masks, FULL tiles unmasked, argument errors,
default block sizes). Checks against jattn.reference.dot_product_attention in float64."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jattn import reference
from pallas_kernels.flash.common import FULL, BlockSizes
from pallas_kernels.flash.gpu import default_block_sizes, flash_attention
from tests.conftest import (
    assert_close,
    check_kernel_against_reference,
    normal,
)

BLOCKS = BlockSizes(16, 16)


def test_non_power_of_two_head_dims_and_broadcast_dense_mask():
    """H = 72 pads to 128, Hv = 20 to 32; a dense mask shared by the batch (Bm = 1)."""
    dense = np.random.default_rng(3).random((1, 1, 21, 35)) < 0.5
    check_kernel_against_reference("gpu", B=2, T=21, S=35, N=2, K=1, H=72, Hv=20,
                            spec=dict(dense_mask=dense, lo=-20))


def test_gqa_segments_lengths_and_soft_cap_together_bfloat16():
    seg = np.repeat([[0, 1], [0, 1]], [12, 18], axis=1)
    check_kernel_against_reference("gpu", B=2, T=30, S=30, N=4, K=2, H=32, dtype=jnp.bfloat16,
                            logits_soft_cap=5.0,
                            spec=dict(hi=0, q_segment_ids=seg, kv_segment_ids=seg,
                                      q_lengths=np.array([30, 11]),
                                      kv_lengths=np.array([25, 30])))


def test_full_tiles_are_not_masked():
    """A block map that calls every tile FULL is trusted: the causal band is not applied
    (this is how we know FULL tiles skip the mask arithmetic)."""
    B, T, N, H = 1, 32, 2, 32
    q, k, v = (normal(i, (B, T, N, H)) for i in range(3))
    full = jnp.full((1, 1, 2, 2), FULL, jnp.int8)
    out, _ = flash_attention(q, k, v, hi=0, block_map=full, block_sizes=BLOCKS, interpret=True)
    with jax.enable_x64(True):
        want = reference.dot_product_attention(*(x.astype(jnp.float64) for x in (q, k, v)))
    assert_close(out, want, jnp.float32, "forward")


def test_vmap_matches_the_batched_call_forward_and_grad():
    B, T, N, K, H = 2, 20, 2, 1, 32
    q = normal(0, (B, T, N, H))
    k = normal(1, (B, T, K, H))
    v = normal(2, (B, T, K, H))
    lengths = jnp.array([20, 9])

    def loss(q, k, v, lengths):
        out, lse = flash_attention(q, k, v, hi=0, kv_lengths=lengths, block_sizes=BLOCKS,
                                   interpret=True)
        return (out ** 2).sum() + jnp.where(jnp.isfinite(lse), lse, 0).sum()

    grad = jax.grad(loss, argnums=(0, 1, 2))
    want = jax.jit(grad)(q, k, v, lengths)
    per_row = jax.jit(jax.vmap(lambda *a: grad(*(x[None] for x in a))))(q, k, v, lengths)
    for g, w in zip(per_row, want, strict=True):
        np.testing.assert_allclose(g[:, 0], w, rtol=1e-5, atol=1e-5)


def test_default_block_sizes():
    assert default_block_sizes(8192, 8192, 128, jnp.bfloat16) == BlockSizes(128, 64)
    assert default_block_sizes(8192, 8192, 256, jnp.float16) == BlockSizes(64, 64)
    assert default_block_sizes(8192, 8192, 256, jnp.float32) == BlockSizes(32, 32)
    assert default_block_sizes(3, 40, 64, jnp.bfloat16) == BlockSizes(16, 64)
    small = default_block_sizes(1, 1, 32, jnp.float32)
    assert (small.block_q, small.block_kv) == (16, 16)


@pytest.mark.parametrize("kwargs, match", [
    (dict(block_sizes=BlockSizes(24, 16)), "block_sizes"),
    (dict(block_sizes=BlockSizes(8, 16)), "block_sizes"),
    (dict(key_shape=(1, 16, 3, 32)), "key"),
    (dict(key_shape=(1, 16, 2, 16)), "key"),
    (dict(value_shape=(1, 15, 2, 32)), "value"),
    (dict(block_map=jnp.ones((1, 1, 2, 2), jnp.int8)), "block_map"),
    (dict(dense_mask=jnp.ones((1, 3, 16, 16), bool)), "dense_mask"),
    (dict(q_segment_ids=jnp.zeros((1, 16), jnp.int32)), "segment_ids"),
    (dict(q_lengths=jnp.zeros((2,), jnp.int32)), "q_lengths"),
    (dict(logits_soft_cap=-1.0), "logits_soft_cap"),
    (dict(hi=0.5), "hi"),
])
def test_bad_arguments_raise_naming_them(kwargs, match):
    key_shape = kwargs.pop("key_shape", (1, 16, 2, 32))
    value_shape = kwargs.pop("value_shape", key_shape)
    q = jnp.zeros((1, 16, 4, 32))
    with pytest.raises(ValueError, match=match):
        flash_attention(q, jnp.zeros(key_shape), jnp.zeros(value_shape),
                        **{"block_sizes": BlockSizes(16, 16), **kwargs}, interpret=True)
