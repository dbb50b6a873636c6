"""What is particular to the chunked implementation: its custom_vjp, its schedule, its memory."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from jattn import masks
from jattn.core.chunked import BlockSizes, chunked_attention, tile_schedule
from jattn.core.masks import EMPTY


def _inputs(B=1, T=21, S=27, N=4, K=2, H=4, Hv=3, dtype=jnp.float32, seed=0):
    keys = jax.random.split(jax.random.key(seed), 4)
    return (jax.random.normal(keys[0], (B, T, N, H), dtype),
            jax.random.normal(keys[1], (B, S, K, H), dtype),
            jax.random.normal(keys[2], (B, S, K, Hv), dtype),
            jax.random.normal(keys[3], (B, 1, T, S), dtype))


def test_custom_vjp_against_finite_differences():
    """Numerical derivatives (float64), independent of any autodiff of a reference."""
    with jax.enable_x64(True):
        q, k, v, bias = _inputs(dtype=jnp.float64)
        mask = masks.causal(offset=6) & ~masks.local_window(0, 0)

        def f(q, k, v, bias):
            out, lse = chunked_attention(q, k, v, bias, mask, scale=0.4, logits_soft_cap=3.0,
                                         block_sizes=BlockSizes(8, 4, 4, 8))
            return out, jnp.where(jnp.isfinite(lse), lse, 0)

        check_grads(f, (q, k, v, bias), order=1, modes=["rev"], atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("mask,T,S,bq,bk", [
    (None, 20, 30, 8, 8),
    (masks.causal(), 32, 32, 8, 8),
    (masks.causal(offset=8), 16, 24, 4, 8),
    (masks.local_window(3, 0), 64, 64, 8, 8),
    (masks.segments(np.repeat(np.arange(4), 8)[None].astype(np.int32)), 32, 32, 8, 8),
])
def test_schedule_visits_exactly_the_non_empty_tiles(mask, T, S, bq, bk):
    schedule = tile_schedule(mask, T, S, bq, bk)
    dense = np.ones((T, S), bool) if mask is None else np.asarray(mask.materialize(T, S))[0, 0]
    nq, nk = -(-T // bq), -(-S // bk)
    for i in range(nq):
        tiles = [dense[i * bq:(i + 1) * bq, j * bk:(j + 1) * bk] for j in range(nk)]
        # A key block running past S is padded, so it always needs masking.
        full = [j for j, t in enumerate(tiles) if t.all() and (j + 1) * bk <= S]
        partial = [j for j, t in enumerate(tiles) if t.any() and j not in full]
        order = np.asarray(schedule.order[i]).tolist()
        assert int(schedule.full[i]) == len(full)
        assert int(schedule.counts[i]) == len(full) + len(partial)
        assert order[:len(full)] == full
        assert order[len(full):len(full) + len(partial)] == partial


def test_causal_visits_about_half_the_tiles():
    counts = tile_schedule(masks.causal(), 8192, 8192, 512, 512).counts
    assert int(counts.sum()) == 16 * 17 // 2


def test_empty_tiles_are_never_read():
    """NaN in a key block: only query blocks whose schedule visits it may see a NaN."""
    q, k, v, _ = _inputs(T=64, S=64, N=2, K=2)
    v = v.at[:, 40:48].set(jnp.nan)  # key block 5 (block size 8)
    mask = masks.local_window(3, 0)
    out, _ = chunked_attention(q, k, v, None, mask, scale=0.5,
                               block_sizes=BlockSizes(8, 8, 8, 8))
    kinds = np.asarray(tile_schedule(mask, 64, 64, 8, 8).kinds)
    finite_rows = np.isfinite(np.asarray(out)).all((0, 2, 3))
    for i in range(8):
        if kinds[i, 5] == EMPTY:
            assert finite_rows[i * 8:(i + 1) * 8].all(), f"query block {i} read key block 5"
    assert not finite_rows.all()  # the visited blocks do see the NaN: the check has teeth


def test_memory_is_linear_in_sequence_length():
    """Forward+backward temporaries stay below one [N, T, S] score matrix."""
    T, N, H = 2048, 2, 16
    q = jnp.zeros((1, T, N, H))

    def loss(q, k, v):
        out, _ = chunked_attention(q, k, v, None, masks.causal(), scale=0.25,
                                   block_sizes=BlockSizes(256, 256, 256, 256))
        return out.sum()

    compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(q, q, q).compile()
    analysis = compiled.memory_analysis()
    scores_bytes = N * T * T * 4
    assert analysis.temp_size_in_bytes < scores_bytes / 4, (analysis.temp_size_in_bytes,
                                                            scores_bytes)


@pytest.mark.parametrize("kwargs", [{"block_q": 0}, {"block_kv": -3}, {"block_q": 2.5},
                                    {"block_q_bwd": 0}, {"num_warps": True}])
def test_block_sizes_are_validated(kwargs):
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        BlockSizes(**{"block_q": 16, "block_kv": 16} | kwargs)


def test_block_sizes_backward_defaults_to_the_forward_tiles():
    assert BlockSizes(16, 8).backward == (16, 8)
    assert BlockSizes(16, 8, block_kv_bwd=32).backward == (16, 32)
    BlockSizes(16, 8, block_q_bwd=16).check_shared_tiles()
    with pytest.raises(ValueError, match="block_sizes"):
        BlockSizes(16, 8, block_q_bwd=8).check_shared_tiles()


@pytest.mark.parametrize("change,error,name", [
    ({"query": jnp.zeros((4, 2, 4))}, ValueError, "query"),
    ({"key": jnp.zeros((1, 5, 3, 4)), "value": jnp.zeros((1, 5, 3, 4))}, ValueError, "key"),
    ({"bias": jnp.zeros((1, 1, 3, 5))}, ValueError, "bias"),
    ({"mask": jnp.ones((4, 5), bool)}, TypeError, "mask"),
])
def test_direct_calls_are_validated(change, error, name):
    args = {"query": jnp.zeros((1, 4, 2, 4)), "key": jnp.zeros((1, 5, 1, 4)),
            "value": jnp.zeros((1, 5, 1, 4)), "bias": None, "mask": None} | change
    with pytest.raises(error, match=name):
        chunked_attention(**args, scale=1.0)
