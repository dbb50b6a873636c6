"""Data-dependent block masks (masks.block_selection): the pattern and exact block map
against NumPy written from the definition; attention under them equals the dense masked
reference on every implementation; the chunked path schedules each row on its own and
never reads a tile its row did not select."""

from __future__ import annotations

import functools

import jax.numpy as jnp
import numpy as np
import pytest

import jattn
from jattn import masks, reference
from jattn.core.chunked import BlockSizes, chunked_attention, tile_schedule
from pallas_kernels.flash.common import EMPTY, FULL, PARTIAL
from tests.conftest import as_implementation, check_against_reference, qkv


def _dense(indices, block_q, block_kv, T, S):
    """[B, N, T, S] from the definition, element by element."""
    indices = np.asarray(indices)
    B, N = indices.shape[:2]
    out = np.zeros((B, N, T, S), bool)
    for b in range(B):
        for n in range(N):
            for t in range(T):
                chosen = set(indices[b, n, t // block_q].tolist()) - {-1}
                for s in range(S):
                    out[b, n, t, s] = s // block_kv in chosen
    return out


def _random_indices(seed, B, N, nq, nk, k):
    """k distinct key blocks per row, some slots -1."""
    rng = np.random.default_rng(seed)
    idx = np.stack([rng.permutation(nk)[:k] for _ in range(B * N * nq)]).reshape(B, N, nq, k)
    idx[rng.random(idx.shape) < 0.2] = -1
    return idx.astype(np.int32)


@pytest.mark.parametrize("block_q,block_kv,T,S", [(4, 8, 21, 37), (1, 5, 9, 23), (8, 8, 32, 32)])
def test_pattern_and_block_map(block_q, block_kv, T, S):
    nq, nk = -(-T // block_q), -(-S // block_kv)
    idx = _random_indices(0, 2, 3, nq, nk, 2)
    mask = masks.block_selection(idx, block_q, block_kv)
    want = _dense(idx, block_q, block_kv, T, S)
    np.testing.assert_array_equal(mask.materialize(T, S), want)
    for tq, tk in [(4, 4), (3, 7), (16, 8)]:
        kinds = np.asarray(mask.block_map(T, S, tq, tk))
        for i in range(kinds.shape[2]):
            for j in range(kinds.shape[3]):
                tile = want[:, :, i * tq:(i + 1) * tq, j * tk:(j + 1) * tk]
                expect = np.where(tile.all((2, 3)), FULL,
                                  np.where(tile.any((2, 3)), PARTIAL, EMPTY))
                np.testing.assert_array_equal(kinds[:, :, i, j], expect, err_msg=str((i, j)))


B, N, K, T, S = 2, 4, 2, 40, 48
BLOCK = 8


def _mask(seed=1, per_head=True):
    idx = _random_indices(seed, B, N if per_head else 1, T // BLOCK, S // BLOCK, 2)
    return masks.block_selection(idx, BLOCK, BLOCK)


@pytest.mark.parametrize("implementation", [
    "xla", "chunked", "chunked_small_blocks", "pallas_gpu_small_blocks",
    "pallas_tpu_small_blocks"])
def test_attention_equals_the_dense_mask(implementation):
    """Per (batch, head) selections combined with causal and segment ids, GQA."""
    q, k, v = qkv(B=B, T=T, S=S, N=N, K=K)
    sel = _mask()
    seg = np.repeat(np.array([[0, 1], [0, 0]]), [20, 28], axis=1).astype(np.int32)
    # a query whose selection misses its segment or the causal part has no key: rows of 0
    extra = masks.causal(offset=S - T) & masks.segments(seg[:, :T], seg)

    def fn(q, k, v):
        return jattn.dot_product_attention(q, k, v, mask=sel & extra,
                                           implementation=as_implementation(implementation))

    dense = jnp.asarray(np.asarray((sel & extra).materialize(T, S)))
    check_against_reference(fn, lambda q, k, v: reference.dot_product_attention(
        q, k, v, mask=dense), (q, k, v))


def test_float64_gradients_of_the_per_row_path():
    q, k, v = qkv(B=B, T=T, S=S, N=N, K=K)
    sel = _mask(seed=3)
    fn = functools.partial(jattn.dot_product_attention, mask=sel,
                           implementation=as_implementation("chunked_small_blocks"))
    dense = jnp.asarray(np.asarray(sel.materialize(T, S)))
    check_against_reference(fn, lambda q, k, v: reference.dot_product_attention(
        q, k, v, mask=dense), (q, k, v), dtype=jnp.float64)


def test_each_row_visits_exactly_its_selected_tiles():
    sel = _mask(seed=4)
    idx = np.asarray(sel.indices)
    G = N // K
    for b in range(B):
        for kh in range(K):
            heads = jnp.arange(kh * G, (kh + 1) * G)
            counts = np.asarray(tile_schedule(sel.rows(b, heads), T, S, BLOCK, BLOCK).counts)
            for i in range(T // BLOCK):
                chosen = set(idx[b, kh * G:(kh + 1) * G, i].ravel().tolist()) - {-1}
                assert counts[i] == len(chosen), (b, kh, i)


def test_unselected_tiles_are_never_read():
    """NaN in a key block that one (batch row, kv head) never selects but others do: that
    row's output stays finite (a schedule over the union of all rows would read it)."""
    q, k, v = qkv(B=B, T=T, S=S, N=N, K=K)
    nq = T // BLOCK
    idx = np.tile(np.array([[3, 1]], np.int32), (B, N, nq, 1))
    idx[0, :2] = [[0, 1]]  # batch 0, kv head 0 (query heads 0, 1) never selects block 3
    v = v.at[0, 3 * BLOCK:4 * BLOCK, 0].set(jnp.nan)
    mask = masks.block_selection(idx, BLOCK, BLOCK)
    out, _ = chunked_attention(q, k, v, None, mask, scale=0.3,
                               block_sizes=BlockSizes(BLOCK, BLOCK))
    assert np.isfinite(np.asarray(out)[0, :, :2]).all()
    # The check has teeth: where block 3 is selected (batch 0, kv head 1), poisoning that
    # head's copy of it does reach the output.
    v2 = v.at[0, 3 * BLOCK:4 * BLOCK, 1].set(jnp.nan)
    out2, _ = chunked_attention(q, k, v2, None, mask, scale=0.3,
                                block_sizes=BlockSizes(BLOCK, BLOCK))
    assert not np.isfinite(np.asarray(out2)[0, :, 2:]).all()
    assert np.isfinite(np.asarray(out2)[0, :, :2]).all()


def test_score_mod_sees_global_batch_and_head_indices_on_the_per_row_path():
    q, k, v = qkv(B=B, T=T, S=S, N=N, K=K)
    w = 1.0 + jnp.arange(B * N, dtype=jnp.float32).reshape(B, N) / 4
    sel = _mask(seed=5)

    def mod(s, b, h, i, j):
        return s * w[b, h]

    got = jattn.dot_product_attention(q, k, v, mask=sel, score_mod=mod,
                                      implementation="chunked")
    want = jattn.dot_product_attention(q, k, v, mask=sel, score_mod=mod, implementation="xla")
    np.testing.assert_allclose(got, want, atol=2e-5)


def test_validation():
    with pytest.raises(ValueError, match="rows"):
        jattn.dot_product_attention(*qkv(B=1, T=16, S=16, N=2, K=2),
                                    mask=masks.block_selection(jnp.zeros((3, 1), jnp.int32),
                                                               8, 8))
    with pytest.raises(ValueError, match="indices"):
        jattn.dot_product_attention(*qkv(B=1, T=16, S=16, N=2, K=2),
                                    mask=masks.block_selection(jnp.full((2, 1), 2, jnp.int32),
                                                               8, 8))
    with pytest.raises(TypeError, match="indices"):
        masks.block_selection(jnp.zeros((2, 1)), 8, 8)


def test_rows_of_every_mask_kind_equal_slices_of_the_dense_pattern():
    """Mask.rows(b, heads), which the per-row schedules evaluate, against slicing the
    materialised pattern of the whole mask."""
    T = S = 12
    seg = np.array([[0] * 5 + [1] * 7, [0] * 9 + [1] * 3], np.int32)
    mask = (masks.causal() & masks.segments(seg) & masks.lengths(kv_lengths=[10, 12])
            & ~masks.dense(np.eye(12, dtype=bool)[None, None].repeat(4, 1)
                           & (np.arange(4) % 2 == 0)[None, :, None, None])
            | _mask_for(T, S))
    whole = np.asarray(mask.materialize(T, S))  # [2, 4, T, S]
    for b in range(2):
        for heads in ([0, 1], [2, 3], [3]):
            got = np.asarray(mask.rows(jnp.int32(b), jnp.asarray(heads)).materialize(T, S))
            np.testing.assert_array_equal(got[0], whole[b, heads], err_msg=str((b, heads)))


def _mask_for(T, S):
    idx = _random_indices(6, 2, 4, -(-T // 4), -(-S // 4), 1)
    return masks.block_selection(idx, 4, 4)


def test_tiles_follow_the_mask():
    from jattn.core.chunked import DEFAULT_BLOCK_SIZES, block_sizes_for
    assert block_sizes_for(None) == DEFAULT_BLOCK_SIZES
    assert block_sizes_for(masks.causal()) == DEFAULT_BLOCK_SIZES
    assert block_sizes_for(masks.local_window(300, 0)) == DEFAULT_BLOCK_SIZES
    assert block_sizes_for(masks.causal() & masks.local_window(40, 0)) == BlockSizes(128, 128)
    # 2-D: a 7 x 7 window spans 6 rows of 64 and 7 columns of flat positions (391 > 256)
    assert block_sizes_for(masks.neighborhood((64, 64), 7)) == DEFAULT_BLOCK_SIZES
    assert block_sizes_for(masks.neighborhood((4096,), 127)) == BlockSizes(128, 128)
    sel = masks.block_selection(jnp.zeros((8, 2), jnp.int32), 1, 64)
    assert block_sizes_for(sel & masks.causal()) == BlockSizes(64, 64)


@pytest.mark.parametrize("platform", ["gpu", "tpu"])
def test_kernels_take_whole_tile_selections_from_the_block_map_alone(platform):
    """Selection blocks that are whole kernel tiles need no in-tile mask: the kernels get
    the block map only, and the result equals the dense reference."""
    from jattn.core.kernels import flash_implementation, kernel_mask
    from pallas_kernels.flash.common import BlockSizes as FlashBlockSizes

    T = S = 48
    idx = _random_indices(7, B, N, T // 16, S // 16, 2)
    mask = masks.block_selection(idx, 16, 16) & masks.causal()
    assert "dense_mask" not in kernel_mask(mask, B, T, S, 16, 16)
    assert "dense_mask" in kernel_mask(mask, B, T, S, 32, 16)  # blocks not whole tiles
    q, k, v = qkv(B=B, T=T, S=S, N=N, K=K)
    got, _ = flash_implementation(platform, q, k, v, None, mask, scale=0.3,
                                  logits_soft_cap=None, dropout=None,
                                  block_sizes=FlashBlockSizes(16, 16))
    want = reference.dot_product_attention(q, k, v, mask=jnp.asarray(
        np.asarray(mask.materialize(T, S))), scale=0.3)
    np.testing.assert_allclose(got, want, atol=2e-5)
