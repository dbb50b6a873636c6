"""The Pallas flash kernels at their own interface, in interpret mode on CPU.

Both backends take the same arguments (pallas_kernels.flash.common describes the mask pieces)
and are checked against jattn.reference.dot_product_attention given the equivalent dense
mask: output, log-sum-exp, and the gradients of both.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.flash.common import EMPTY, schedule
from tests.conftest import (
    KERNEL_BLOCKS,
    block_map_of,
    check_kernel_against_reference,
    dense_mask,
    flash_kernel,
    normal,
)

BACKENDS = ["gpu", "tpu"]


@pytest.fixture(params=BACKENDS)
def backend(request):
    return request.param


def test_schedule_lists_the_nonempty_tiles_of_each_row():
    block_map = np.random.default_rng(0).integers(0, 3, (2, 3, 4, 5)).astype(np.int8)
    s = schedule(jnp.asarray(block_map))
    for idx in np.ndindex(block_map.shape[:3]):
        row = block_map[idx]
        cols = np.flatnonzero(row != EMPTY)
        count = int(s.count[idx])
        assert count == len(cols)
        np.testing.assert_array_equal(s.index[idx][:count], cols)
        np.testing.assert_array_equal(s.kind[idx][:count], row[cols])
        assert (np.asarray(s.kind[idx][count:]) == EMPTY).all()
        assert (np.asarray(s.index[idx][count:]) == (cols[-1] if count else 0)).all()


@pytest.mark.parametrize("case", [
    dict(),
    dict(spec=dict(hi=0)),
    dict(spec=dict(lo=-5, hi=3)),
    dict(T=20, S=45, spec=dict(q_lengths=np.array([20, 7]), kv_lengths=np.array([45, 18]))),
    dict(spec=dict(q_segment_ids=np.repeat([[0, 1, 2], [0, 0, 1]], [10, 20, 7], axis=1),
                   kv_segment_ids=np.repeat([[0, 1, 2], [0, 0, 1]], [10, 20, 7], axis=1))),
    dict(spec=dict(hi=0, dense_mask=np.random.default_rng(5).random((2, 4, 37, 37)) < 0.3)),
    dict(logits_soft_cap=3.0, scale=0.4, spec=dict(hi=0)),
    dict(N=3, K=1, H=40, Hv=24),
    dict(spec=dict(hi=0), with_block_map=False),
], ids=["full", "causal", "window", "cross-lengths", "segments", "dense", "softcap", "mqa-dims",
        "no-block-map"])
def test_matches_reference_float32(backend, case, request):
    # The TPU kernel in TPU interpret mode for two cases and in the generic interpreter for
    # the rest (3x faster; the mask logic is the same in both, test_tpu.py checks the
    # TPU-specific behaviour in TPU interpret mode).
    faithful = backend == "gpu" or request.node.callspec.id.endswith(("causal", "segments"))
    check_kernel_against_reference(backend, interpret=True if faithful else "hlo", **case)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_matches_reference_half(backend, dtype):
    check_kernel_against_reference(backend, dtype=dtype, spec=dict(hi=0))


def test_empty_tiles_are_never_visited(backend):
    """Keys and values in tiles the block map calls EMPTY are NaN: visiting one would poison
    the output or the gradients."""
    B, T, S, N, H = 1, 40, 48, 2, 32
    blocks = KERNEL_BLOCKS
    kv_len = S - blocks.block_kv  # the last key tile holds only masked keys
    q = normal(0, (B, T, N, H))
    k = normal(1, (B, S, N, H)).at[:, kv_len:].set(jnp.nan)
    v = normal(2, (B, S, N, H)).at[:, kv_len:].set(jnp.nan)
    allowed = dense_mask(dict(kv_lengths=np.array([kv_len])), B, T, S)
    block_map = block_map_of(allowed, blocks.block_q, blocks.block_kv)
    assert (block_map[..., -1] == EMPTY).all()
    flash = flash_kernel(backend)

    def loss(q, k, v):
        out, lse = flash(q, k, v, kv_lengths=jnp.array([kv_len]),
                         block_map=jnp.asarray(block_map), block_sizes=blocks, interpret=True)
        return (out ** 2).sum() + lse.sum()

    value, grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))(q, k, v)
    assert np.isfinite(value)
    assert np.isfinite(grads[0]).all()
    assert np.isfinite(grads[1][:, :kv_len]).all() and np.isfinite(grads[2][:, :kv_len]).all()
