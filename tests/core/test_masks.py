"""The mask algebra against plain NumPy boolean logic (hypothesis property tests)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from jattn import masks
from jattn.core.masks import EMPTY, FULL, PARTIAL
from tests.conftest import block_map_of

SETTINGS = settings(max_examples=40, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


# ------------------------------------------------------------------ NumPy definitions


def np_band(T, S, lo, hi):
    d = np.arange(S)[None, :] - np.arange(T)[:, None]
    ok = np.ones((T, S), bool)
    if lo is not None:
        ok &= d >= lo
    if hi is not None:
        ok &= d <= hi
    return ok[None, None]


def np_lengths(T, S, q_len, kv_len):
    ok = np.ones((len(q_len if q_len is not None else kv_len), T, S), bool)
    if q_len is not None:
        ok &= np.arange(T)[None, :, None] < np.asarray(q_len)[:, None, None]
    if kv_len is not None:
        ok &= np.arange(S)[None, None, :] < np.asarray(kv_len)[:, None, None]
    return ok[:, None]


def np_pairs(q_vals, kv_vals, relation):
    """relation(a, b) over every (query, key) pair, per batch row."""
    return np.array([[[relation(a, b) for b in kv_row] for a in q_row]
                     for q_row, kv_row in zip(q_vals, kv_vals, strict=True)])[:, None]


# ------------------------------------------------------------------ strategies


@st.composite
def primitive(draw, T, S, B):
    """(Mask, its NumPy dense pattern, whether its block map is exact)."""
    kind = draw(st.sampled_from(["band", "lengths", "segments", "types", "dense"]))
    if kind == "band":
        lo = draw(st.one_of(st.none(), st.integers(-T - 2, S + 2)))
        hi = draw(st.one_of(st.none(), st.integers(-T - 2, S + 2)))
        return masks.Band(lo, hi), np_band(T, S, lo, hi), True
    if kind == "lengths":
        q_len = draw(st.one_of(st.none(), st.lists(st.integers(0, T), min_size=B, max_size=B)))
        kv_len = draw(st.lists(st.integers(0, S), min_size=B, max_size=B))
        m = masks.lengths(None if q_len is None else np.array(q_len, np.int32),
                          np.array(kv_len, np.int32))
        return m, np_lengths(T, S, q_len, kv_len), True
    if kind == "segments":
        sorted_ids = draw(st.booleans())
        ids = st.lists(st.integers(0, 3), min_size=T, max_size=T)
        kv_ids_s = st.lists(st.integers(0, 3), min_size=S, max_size=S)
        q = np.array([draw(ids) for _ in range(B)], np.int32)
        kv = np.array([draw(kv_ids_s) for _ in range(B)], np.int32)
        if sorted_ids:
            q, kv = np.sort(q, 1), np.sort(kv, 1)
        dense = np_pairs(q, kv, lambda a, b: a == b)
        return masks.segments(q, kv), dense, False
    if kind == "types":
        allowed = draw(st.sets(st.tuples(st.integers(0, 2), st.integers(0, 2)), max_size=9))
        q = np.array([draw(st.lists(st.integers(0, 2), min_size=T, max_size=T))
                      for _ in range(B)], np.int32)
        kv = np.array([draw(st.lists(st.integers(0, 2), min_size=S, max_size=S))
                       for _ in range(B)], np.int32)
        dense = np_pairs(q, kv, lambda a, b: (a, b) in allowed)
        return masks.token_types(q, kv, allowed=allowed, num_types=3), dense, True
    shape = (draw(st.sampled_from([1, B])), draw(st.sampled_from([1, 3])),
             draw(st.sampled_from([1, T])), draw(st.sampled_from([1, S])))
    p = draw(st.sampled_from([0.0, 0.5, 0.9, 1.0]))
    seed = draw(st.integers(0, 2**16))
    array = np.random.RandomState(seed).rand(*shape) < p
    return masks.dense(array), np.broadcast_to(array, (*shape[:2], T, S)), True


@st.composite
def mask_tree(draw, T, S, B, depth=2):
    if depth == 0 or draw(st.booleans()):
        m, dense, _ = draw(primitive(T, S, B))
        return m, dense
    op = draw(st.sampled_from(["and", "or", "not"]))
    a, da = draw(mask_tree(T, S, B, depth - 1))
    if op == "not":
        return ~a, ~da
    b, db = draw(mask_tree(T, S, B, depth - 1))
    return (a & b, da & db) if op == "and" else (a | b, da | db)


sizes = st.tuples(st.integers(1, 33), st.integers(1, 33), st.integers(1, 2),
                  st.integers(1, 17), st.integers(1, 17))


# ------------------------------------------------------------------ properties


@SETTINGS
@given(data=st.data(), sizes=sizes)
def test_primitive_dense_and_exact_block_map(data, sizes):
    T, S, B, bq, bk = sizes
    mask, want, exact = data.draw(primitive(T, S, B))
    got = np.asarray(mask.materialize(T, S))
    np.testing.assert_array_equal(np.broadcast_to(got, want.shape), want)
    kinds = np.asarray(mask.block_map(T, S, bq, bk))
    want_kinds = block_map_of(np.broadcast_to(want, got.shape), bq, bk)
    assert kinds.shape[2:] == want_kinds.shape[2:]
    kinds = np.broadcast_to(kinds, want_kinds.shape)
    if exact:
        np.testing.assert_array_equal(kinds, want_kinds)
    else:
        _assert_sound(kinds, want_kinds)


@pytest.mark.slow
@SETTINGS
@given(data=st.data(), sizes=sizes)
def test_algebra_agrees_with_boolean_logic(data, sizes):
    T, S, B, bq, bk = sizes
    mask, want = data.draw(mask_tree(T, S, B))
    got = np.asarray(mask.materialize(T, S))
    np.testing.assert_array_equal(np.broadcast_to(got, np.broadcast_shapes(got.shape, want.shape)),
                                  np.broadcast_to(want, np.broadcast_shapes(got.shape,
                                                                            want.shape)))
    kinds = np.asarray(mask.block_map(T, S, bq, bk))
    full_shape = np.broadcast_shapes(got.shape, want.shape)
    want_kinds = block_map_of(np.broadcast_to(want, full_shape), bq, bk)
    _assert_sound(np.broadcast_to(kinds, want_kinds.shape), want_kinds)
    # evaluate() at arbitrary positions (some past the end) agrees with the dense pattern.
    q_pos = np.array(data.draw(st.lists(st.integers(0, T - 1), min_size=1, max_size=5)))
    kv_pos = np.array(data.draw(st.lists(st.integers(0, S - 1), min_size=1, max_size=5)))
    sub = np.asarray(mask.evaluate(jnp.asarray(q_pos), jnp.asarray(kv_pos)))
    np.testing.assert_array_equal(np.broadcast_to(sub, (*full_shape[:2], len(q_pos), len(kv_pos))),
                                  np.broadcast_to(want, full_shape)[:, :, q_pos][:, :, :, kv_pos])


def _assert_sound(kinds, exact):
    """EMPTY and FULL must be true; PARTIAL is always allowed."""
    assert not np.any((kinds == EMPTY) & (exact != EMPTY)), "tile called EMPTY is not empty"
    assert not np.any((kinds == FULL) & (exact != FULL)), "tile called FULL is not full"


# ------------------------------------------------------------------ constructors, by hand


def dense_of(mask, T, S=None):
    return np.asarray(mask.materialize(T, T if S is None else S))[0, 0].astype(int).tolist()


def test_causal_offset_aligns_queries_to_the_end():
    assert dense_of(masks.causal(offset=2), 2, 4) == [[1, 1, 1, 0], [1, 1, 1, 1]]
    assert dense_of(masks.causal(offset=-1), 3) == [[0, 0, 0], [1, 0, 0], [1, 1, 0]]


def test_local_window_matches_jax_nn_convention():
    # jax.nn: with (3, 2), token 6 sees 3..8.
    row = dense_of(masks.local_window(3, 2), 10)[6]
    assert row == [0, 0, 0, 1, 1, 1, 1, 1, 1, 0]
    assert dense_of(masks.local_window(None, 0), 3) == dense_of(masks.causal(), 3)


def test_modality_masks_by_hand():
    # tokens: text, image, image, text
    vis = np.array([False, True, True, False])
    assert dense_of(masks.mixed_visual(vis), 4) == [
        [1, 0, 0, 0], [1, 1, 1, 0], [1, 1, 1, 0], [1, 1, 1, 1]]
    assert dense_of(masks.modality_mutual(vis), 4) == [
        [1, 0, 0, 0], [1, 1, 0, 1], [1, 1, 1, 1], [1, 1, 1, 1]]
    assert dense_of(masks.composite_visual(vis), 4) == [
        [1, 0, 0, 0], [1, 1, 0, 0], [1, 0, 1, 0], [1, 1, 1, 1]]


def test_composite_visual_skips_visual_tiles():
    vis = np.zeros(64, bool)
    vis[16:48] = True
    kinds = np.asarray(masks.composite_visual(vis).block_map(64, 64, 8, 8))[0, 0]
    # query tile 4 (tokens 32..39) vs key tile 2 (16..23): both visual, off the diagonal.
    assert kinds[4, 2] == EMPTY and kinds[4, 4] == PARTIAL and kinds[6, 1] == FULL


def test_prefix_lm_and_adjacency():
    assert dense_of(masks.prefix_lm(np.array([3])), 4) == [
        [1, 1, 1, 0], [1, 1, 1, 0], [1, 1, 1, 0], [1, 1, 1, 1]]
    adj = np.array([[0, 1, 0], [0, 0, 0], [1, 0, 0]], bool)
    assert dense_of(masks.adjacency(adj), 3) == [[1, 1, 0], [0, 1, 0], [1, 0, 1]]
    assert dense_of(masks.adjacency(adj, self_loops=False), 3) == adj.astype(int).tolist()


def test_masks_are_pytrees_through_jit_and_vmap():
    ids = jnp.array([[0, 0, 1, 1], [0, 1, 1, 1]], jnp.int32)
    mask = masks.causal() & masks.segments(ids)
    jitted = jax.jit(lambda m: m.materialize(4, 4))(mask)
    np.testing.assert_array_equal(jitted, mask.materialize(4, 4))
    per_row = jax.vmap(lambda i: masks.segments(i[None]).materialize(4, 4))(ids)
    np.testing.assert_array_equal(per_row[:, 0], masks.segments(ids).materialize(4, 4))


@pytest.mark.parametrize("make,error,name", [
    (lambda: masks.local_window(-1, 0), ValueError, "left"),
    (lambda: masks.local_window(1, 1.5), TypeError, "right"),
    (lambda: masks.causal(offset=True), TypeError, "offset"),
    (lambda: masks.lengths(), ValueError, "lengths"),
    (lambda: masks.lengths(kv_lengths=np.array([1.0])), TypeError, "kv_lengths"),
    (lambda: masks.segments(np.zeros((1, 2, 3), np.int32)), ValueError, "q_segment_ids"),
    (lambda: masks.token_types(np.zeros(3, np.int32), allowed=[(0, 4)], num_types=3),
     ValueError, "num_types"),
    (lambda: masks.dense(np.zeros((2, 2))), TypeError, "mask"),
    (lambda: masks.adjacency(np.zeros((2, 3), bool)), ValueError, "adj"),
    (lambda: masks.modality_mutual(np.zeros(3, np.int32)), TypeError, "is_visual"),
    (lambda: masks.causal() & np.ones((2, 2), bool), TypeError, "mask"),
])
def test_constructor_errors(make, error, name):
    with pytest.raises(error, match=name):
        make()


def test_check_rejects_data_of_the_wrong_length():
    with pytest.raises(ValueError, match=r"mask\.q_ids"):
        masks.segments(np.zeros((1, 5), np.int32)).check(4, 4, "mask")
    with pytest.raises(ValueError, match=r"mask\.q_types"):
        masks.token_types(np.array([[0, 5]]), allowed=[(0, 0)], num_types=2).check(2, 2, "mask")


def test_empty_band_has_empty_tiles():
    # Found by hypothesis: lo > hi allows nothing, so every tile is EMPTY.
    kinds = np.asarray(masks.Band(1, 0).block_map(1, 2, 1, 2))
    assert kinds.tolist() == [[[[EMPTY]]]]
