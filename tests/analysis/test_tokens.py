"""Choosing tokens from attention (P66 FasterVLM/FastV, P40 LSceneLLM, P42 DyVTE, P52 READ):
each function against a NumPy reference written from its definition, ties, jit, gradients
where they mean something, and errors that name the argument."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jattn.analysis.tokens import (
    attention_exit,
    compact,
    distinct_token_scores,
    drop_modality,
    exit_gate,
    gather_tokens,
    init_exit_gate,
    keep_fraction,
    keep_top_tokens,
    peak_points,
    prune_by_attention,
    random_tokens,
    rank_tokens,
    select_dense_regions,
    similarity_map,
)
from jattn.core.shapes import DTypeError

B, N, P, S = 2, 3, 4, 10
RNG = np.random.default_rng(0)


def _weights(b=B, n=N, p=P, s=S):
    logits = RNG.normal(size=(b, n, p, s))
    w = np.exp(logits)
    return (w / w.sum(-1, keepdims=True)).astype(np.float32)


def _top_positions(scores_row, r):
    """Reference: the r best positions by (score descending, position ascending), sorted."""
    order = sorted(range(len(scores_row)), key=lambda j: (-scores_row[j], j))
    return sorted(order[:r])


# --------------------------------------------------------------------------------------------
# P66 FasterVLM / FastV


def test_rank_tokens_is_the_mean_over_heads_and_rows():
    w = _weights()
    visual = np.zeros(S, bool)
    visual[3:] = True
    got = rank_tokens(w, query_positions=[0, 2], candidates=visual)
    want = w[:, :, [0, 2]].astype(np.float64).mean(axis=(1, 2))
    want[:, ~visual] = -np.inf
    np.testing.assert_allclose(got, want, rtol=1e-6)
    np.testing.assert_allclose(rank_tokens(w), w.mean(axis=(1, 2)), rtol=1e-6)
    per_row = np.stack([visual, ~visual])
    got = rank_tokens(jnp.asarray(w, jnp.bfloat16), candidates=per_row)
    assert got.dtype == jnp.float32 and np.isneginf(np.asarray(got)[1, 3:]).all()
    layers = np.stack([w, w[::-1]])  # vmap over a stack of layers
    np.testing.assert_allclose(jax.vmap(rank_tokens)(layers), layers.mean(axis=(2, 3)),
                               rtol=1e-6)


def test_keep_top_tokens_matches_the_reference_and_breaks_ties_early():
    scores = np.round(RNG.uniform(size=(3, S)), 1).astype(np.float32)  # many ties
    scores[0, :] = 0.5
    scores[2, 4] = -np.inf
    for r in (1, 4, S):
        got = np.asarray(keep_top_tokens(scores, r))
        assert got.dtype == np.int32
        assert got.tolist() == [_top_positions(row, r) for row in scores]
    assert keep_top_tokens(scores, 3)[0].tolist() == [0, 1, 2]
    jitted = jax.jit(keep_top_tokens, static_argnums=1)
    np.testing.assert_array_equal(jitted(scores, 4), keep_top_tokens(scores, 4))


def test_keep_fraction_rounds_half_up_and_keeps_one():
    assert [keep_fraction(576, f) for f in (0.5, 0.25, 0.1, 0.05)] == [288, 144, 58, 29]
    assert keep_fraction(5, 0.5) == 3 and keep_fraction(3, 0.01) == 1
    assert keep_fraction(7, 1.0) == 7


def test_gather_tokens_matches_indexing_and_has_gradients():
    x = RNG.normal(size=(B, S, 2, 3)).astype(np.float32)
    idx = np.array([[0, 4, 9], [2, 3, 5]])
    want = np.stack([x[b, idx[b]] for b in range(B)])
    np.testing.assert_array_equal(gather_tokens(x, idx), want)
    np.testing.assert_array_equal(gather_tokens(x, idx[0]), x[:, idx[0]])
    grad = jax.jit(jax.grad(lambda v: gather_tokens(v, idx).sum()))(x)
    counts = np.zeros((B, S))
    for b in range(B):
        counts[b, idx[b]] += 1
    np.testing.assert_array_equal(grad, np.broadcast_to(counts[..., None, None], x.shape))


def _prune_reference(x, scores, r, candidates, protect):
    fixed = ~candidates | protect
    kept = []
    for b in range(x.shape[0]):
        eligible = [j for j in range(x.shape[1]) if not fixed[b, j]]
        best = sorted(eligible, key=lambda j: (-scores[b, j], j))[:r]
        kept.append(sorted([j for j in range(x.shape[1]) if fixed[b, j]] + best))
    kept = np.array(kept)
    return np.stack([x[b, kept[b]] for b in range(x.shape[0])]), kept


def test_prune_by_attention_keeps_text_and_the_top_candidates():
    x = RNG.normal(size=(B, S, 4)).astype(np.float32)
    w = _weights()
    candidates = np.array([[False, True, True, False, True, True, True, True, True, True],
                           [True, True, False, True, True, False, True, True, True, True]])
    protect = np.zeros((B, S), bool)
    protect[0, 9], protect[1, 1] = True, True  # the best-scored may also be protected
    scores = w.astype(np.float64).mean(axis=(1, 2))
    for r, prot in ((3, None), (2, protect)):
        kept, idx = prune_by_attention(x, w, r, candidates=candidates, protect=prot)
        want_x, want_idx = _prune_reference(
            x, scores, r, candidates, np.zeros((B, S), bool) if prot is None else prot)
        np.testing.assert_array_equal(idx, want_idx)
        np.testing.assert_array_equal(kept, want_x)
    # precomputed scores, all tokens candidates, ties: earlier first
    flat = np.zeros((B, S), np.float32)
    _, idx = prune_by_attention(x, flat, 3)
    assert idx.tolist() == [[0, 1, 2]] * B


def test_prune_by_attention_under_jit_and_grad():
    x = RNG.normal(size=(B, S, 4)).astype(np.float32)
    w = _weights()
    visual = np.arange(S) >= 2
    want = prune_by_attention(x, w, 3, candidates=visual)
    closed = jax.jit(lambda x, w: prune_by_attention(x, w, 3, candidates=visual))
    traced = jax.jit(lambda x, w, c: prune_by_attention(x, w, 3, candidates=c, num_fixed=2))
    for got in (closed(x, w), traced(x, w, visual)):
        np.testing.assert_array_equal(got[1], want[1])
        np.testing.assert_array_equal(got[0], want[0])
    grad = jax.jit(jax.grad(
        lambda x: prune_by_attention(x, w, 3, candidates=visual)[0].sum()))(x)
    kept = np.zeros((B, S), bool)
    np.put_along_axis(kept, np.asarray(want[1]), True, axis=1)
    np.testing.assert_array_equal(np.asarray(grad)[..., 0], kept.astype(np.float32))
    with pytest.raises(ValueError, match="num_fixed"):
        jax.jit(lambda c: prune_by_attention(x, w, 3, candidates=c))(visual)


def test_random_tokens_are_distinct_sorted_and_uniform():
    idx = np.asarray(random_tokens(jax.random.key(0), 8, 3, batch_size=4000))
    assert idx.shape == (4000, 3) and idx.dtype == np.int32
    assert (np.diff(idx, axis=1) > 0).all() and idx.min() >= 0 and idx.max() < 8
    frequency = np.bincount(idx.ravel(), minlength=8) / 4000
    np.testing.assert_allclose(frequency, 3 / 8, atol=0.03)
    same = random_tokens(jax.random.key(0), 8, 3, batch_size=4000)
    np.testing.assert_array_equal(same, idx)


def test_p66_errors_name_the_argument():
    scores = np.zeros((B, S), np.float32)
    with pytest.raises(ValueError, match=r"r: expected 1 <= r <= S=10, got 0"):
        keep_top_tokens(scores, 0)
    with pytest.raises(ValueError, match="r: expected 1 <= r <= S=10, got 11"):
        keep_top_tokens(scores, 11)
    with pytest.raises(DTypeError, match="r"):
        keep_top_tokens(scores, 2.0)
    with pytest.raises(DTypeError, match="scores"):
        keep_top_tokens(np.zeros((B, S), np.int32), 2)
    with pytest.raises(ValueError, match="weights"):
        rank_tokens(np.zeros((B, P, S), np.float32))
    with pytest.raises(ValueError, match="query_positions"):
        rank_tokens(_weights(), query_positions=[P])
    with pytest.raises(ValueError, match="candidates"):
        rank_tokens(_weights(), candidates=np.ones(S + 1, bool))
    with pytest.raises(DTypeError, match="candidates"):
        rank_tokens(_weights(), candidates=np.ones(S))
    with pytest.raises(ValueError, match="fraction"):
        keep_fraction(10, 0.0)
    with pytest.raises(ValueError, match="indices"):
        gather_tokens(np.zeros((B, S)), np.array([[0, S], [1, 2]]))
    with pytest.raises(DTypeError, match="indices"):
        gather_tokens(np.zeros((B, S)), np.zeros((B, 2)))
    x = np.zeros((B, S, 2), np.float32)
    uneven = np.ones((B, S), bool)
    uneven[0, 0] = False
    with pytest.raises(ValueError, match="candidates: expected the same number"):
        prune_by_attention(x, scores, 2, candidates=uneven)
    with pytest.raises(ValueError, match="r: expected 1 <= r <= S - num_fixed=9"):
        prune_by_attention(x, scores, 10, candidates=np.arange(S) > 0)
    with pytest.raises(ValueError, match="num_fixed"):
        prune_by_attention(x, scores, 2, candidates=np.arange(S) > 0, num_fixed=2)
    with pytest.raises(ValueError, match="weights"):
        prune_by_attention(x, np.zeros((B, S + 1), np.float32), 2)
    with pytest.raises(ValueError, match="query_positions"):
        prune_by_attention(x, scores, 2, query_positions=[0])
    with pytest.raises(ValueError, match="r"):
        random_tokens(jax.random.key(0), 4, 5)


# --------------------------------------------------------------------------------------------
# P40 LSceneLLM


def _regions_reference(scores, grid, k, window):
    h, w = grid
    rh, rw = window
    found = []
    for row in scores:
        boxes = []
        for i in range(0, h, rh):
            for j in range(0, w, rw):
                tokens = [(i + a) * w + (j + c) for a in range(rh) for c in range(rw)]
                boxes.append((-row[tokens].sum(), len(boxes), (i, j), tokens))
        found.append(sorted(boxes)[:k])
    return found


@pytest.mark.parametrize("grid,window,k", [((4, 6), (2, 3), 3), ((4, 6), (1, 1), 5),
                                           ((12,), (3,), 2)])
def test_select_dense_regions_matches_the_window_sums(grid, window, k):
    scores = RNG.uniform(size=(B, 24 if len(grid) == 2 else 12)).astype(np.float32)
    out = jax.jit(select_dense_regions, static_argnums=(1, 2), static_argnames="region")(
        scores, grid, k, region=window)
    want = _regions_reference(scores, (1, *grid) if len(grid) == 1 else grid, k,
                              (1, *window) if len(window) == 1 else window)
    for b in range(B):
        assert out.regions[b].tolist() == [box[1] for box in want[b]]
        assert out.tokens[b].tolist() == [box[3] for box in want[b]]
        corners = [list(box[2]) if len(grid) == 2 else [box[2][1]] for box in want[b]]
        assert out.corners[b].tolist() == corners
        np.testing.assert_allclose(out.scores[b], [-box[0] for box in want[b]], rtol=1e-6)


def test_select_dense_regions_from_attention_rows_and_under_jit():
    w = _weights(s=16)
    ranked = select_dense_regions(w, (4, 4), 2, region=2, query_positions=[1, 3])
    scores = w[:, :, [1, 3]].mean(axis=(1, 2))
    want = _regions_reference(scores, (4, 4), 2, (2, 2))
    assert ranked.regions.tolist() == [[box[1] for box in row] for row in want]
    jitted = jax.jit(lambda m: select_dense_regions(m, (4, 4), 2, region=2))
    np.testing.assert_array_equal(jitted(scores).tokens,
                                  select_dense_regions(scores, (4, 4), 2, region=2).tokens)
    ties = select_dense_regions(np.zeros((1, 16), np.float32), (4, 4), 3, region=2)
    assert ties.regions.tolist() == [[0, 1, 2]]


def test_p40_errors_name_the_argument():
    scores = np.zeros((B, 24), np.float32)
    with pytest.raises(ValueError, match="grid"):
        select_dense_regions(scores, (4, 5), 1)
    with pytest.raises(ValueError, match="region"):
        select_dense_regions(scores, (4, 6), 1, region=4)
    with pytest.raises(ValueError, match=r"k: expected 1 <= k <= R=6, got 7"):
        select_dense_regions(scores, (4, 6), 7, region=2)
    with pytest.raises(ValueError, match="weights_map"):
        select_dense_regions(np.zeros((B, 4, 6), np.float32), (4, 6), 1)


# --------------------------------------------------------------------------------------------
# P42 DyVTE


def test_exit_gate_is_the_pooled_mlp():
    d, hidden = 6, 5
    gate = init_exit_gate(jax.random.key(1), d, hidden)
    gate = gate._replace(b1=jnp.linspace(-0.5, 0.5, hidden), b2=jnp.asarray(0.3))
    states = RNG.normal(size=(B, S, d)).astype(np.float32)
    text = np.zeros((B, S), bool)
    text[0, :4], text[1, 6:] = True, True
    w1, b1, w2, b2 = (np.asarray(p, np.float64) for p in gate)
    pooled = np.stack([states[b, text[b]].mean(0) for b in range(B)])
    want = 1 / (1 + np.exp(-(np.maximum(pooled @ w1 + b1, 0) @ w2 + b2)))
    np.testing.assert_allclose(exit_gate(gate, states, text_mask=text), want, rtol=1e-5)
    np.testing.assert_allclose(exit_gate(tuple(gate), states), exit_gate(
        gate, states, text_mask=np.ones(S, bool)), rtol=1e-6)
    grads = jax.jit(jax.grad(lambda g: exit_gate(g, states, text_mask=text).sum()))(gate)
    assert all(np.isfinite(np.asarray(g)).all() for g in grads)
    assert np.abs(np.asarray(grads.w2)).sum() > 0
    assert [p.shape for p in gate] == [(d, hidden), (hidden,), (hidden,), ()]


def test_attention_exit_thresholds_the_visual_mass():
    w = _weights()
    visual = np.arange(S) < 6
    mass = (w[:, :, 1:] * visual).sum(-1).mean(axis=(1, 2))
    threshold = float(mass.mean())
    got = attention_exit(w, visual, threshold, query_positions=[1, 2, 3])
    np.testing.assert_array_equal(got, mass < threshold)
    assert got.dtype == jnp.bool_
    np.testing.assert_array_equal(attention_exit(w, visual, 2.0), [True, True])
    jitted = jax.jit(attention_exit)(w, visual, jnp.asarray([0.0, 2.0]))
    np.testing.assert_array_equal(jitted, [False, True])


def test_drop_modality_and_compact():
    visual = np.zeros(S, bool)
    visual[2:7] = True
    exits = np.array([True, False])
    keep = drop_modality(np.zeros((B, S, 3)), visual, exits)
    np.testing.assert_array_equal(keep, ~(visual[None] & exits[:, None]))
    previous = np.ones((B, S), bool)
    previous[1, 0] = False
    chained = drop_modality(np.zeros((B, S)), visual, jnp.asarray(True), key_mask=previous)
    np.testing.assert_array_equal(chained, previous & ~visual[None])

    x = RNG.normal(size=(B, S, 2)).astype(np.float32)
    size = int(np.asarray(keep).sum(-1).max())
    out = jax.jit(compact, static_argnums=2)(x, keep, size)
    for b in range(B):
        positions = np.flatnonzero(np.asarray(keep)[b])  # kept tokens, in order
        n = len(positions)
        np.testing.assert_array_equal(out.indices[b, :n], positions)
        np.testing.assert_array_equal(out.x[b, :n], x[b, positions])
        np.testing.assert_array_equal(out.x[b, n:], 0)
        assert out.valid[b].tolist() == [True] * n + [False] * (size - n)


def test_p42_errors_name_the_argument():
    gate = init_exit_gate(jax.random.key(0), 4, 3)
    with pytest.raises(ValueError, match="params"):
        exit_gate(gate, np.zeros((B, S, 5), np.float32))
    with pytest.raises(ValueError, match="params"):
        exit_gate(gate[:3], np.zeros((B, S, 4), np.float32))
    with pytest.raises(ValueError, match="text_state"):
        exit_gate(gate, np.zeros((S, 4), np.float32))
    with pytest.raises(DTypeError, match="text_mask"):
        exit_gate(gate, np.zeros((B, S, 4), np.float32), text_mask=np.ones(S))
    with pytest.raises(ValueError, match="hidden"):
        init_exit_gate(jax.random.key(0), 4, 0)
    with pytest.raises(ValueError, match="visual"):
        attention_exit(_weights(), np.ones(S - 1, bool), 0.5)
    with pytest.raises(ValueError, match="threshold"):
        attention_exit(_weights(), np.ones(S, bool), np.ones(B + 1))
    with pytest.raises(ValueError, match="exit"):
        drop_modality(np.zeros((B, S)), np.ones(S, bool), np.ones(B + 1, bool))
    with pytest.raises(DTypeError, match="exit"):
        drop_modality(np.zeros((B, S)), np.ones(S, bool), np.ones(B))
    with pytest.raises(ValueError, match="size: expected at least"):
        compact(np.zeros((B, S)), np.ones((B, S), bool), 4)
    with pytest.raises(ValueError, match="size: expected 1 <= size <= S=10, got 11"):
        compact(np.zeros((B, S)), np.ones((B, S), bool), 11)


# --------------------------------------------------------------------------------------------
# P52 READ


def test_similarity_map_is_the_cosine_on_the_grid():
    h, w, d = 3, 4, 5
    query = RNG.normal(size=(B, d)).astype(np.float32)
    image = RNG.normal(size=(B, h * w, d)).astype(np.float32)
    image[1, 5] = 0.0  # a zero token: similarity 0, finite gradients
    q, k = query.astype(np.float64), image.astype(np.float64)
    norms = np.maximum(np.linalg.norm(k, axis=-1), 1e-6) * np.linalg.norm(q, axis=-1)[:, None]
    cos = np.einsum("bd,bsd->bs", q, k) / norms
    np.testing.assert_allclose(similarity_map(query, image, (h, w)), cos.reshape(B, h, w),
                               atol=1e-6)
    low, high = cos.min(1, keepdims=True), cos.max(1, keepdims=True)
    scaled = ((cos - low) / (high - low)).reshape(B, h, w)
    jitted = jax.jit(similarity_map, static_argnums=2, static_argnames="normalize")
    np.testing.assert_allclose(jitted(query, image, (h, w), normalize=True), scaled, atol=1e-6)
    grads = jax.jit(jax.grad(lambda q, k: similarity_map(q, k, (h, w), normalize=True).sum(),
                             argnums=(0, 1)))(query, image)
    assert all(np.isfinite(np.asarray(g)).all() for g in grads)
    flat = jitted(query, np.ones((B, h * w, d), np.float32), (h, w), normalize=True)
    np.testing.assert_array_equal(flat, 0.0)


def test_distinct_token_scores_from_the_definition():
    """P64 TextMonkey: -max cosine to another valid token, by loops in float64; invalid
    tokens -inf; a lone valid token 1; the kept tokens drop a near-duplicate."""
    S, d = 9, 4
    x = RNG.normal(size=(B, S, d)).astype(np.float32)
    x[0, 4] = 3.0 * x[0, 1] + 1e-3  # a near-twin of token 1
    x[1, 2] = 0.0  # a zero vector: similarity 0 to everything
    mask = np.ones((B, S), bool)
    mask[1, 6:] = False

    def reference(x, mask):
        out = np.full(x.shape[:2], -np.inf)
        for b in range(x.shape[0]):
            for t in range(x.shape[1]):
                if not mask[b, t]:
                    continue
                cos = [x[b, t] @ x[b, s] / (max(np.linalg.norm(x[b, t]), 1e-6)
                                            * max(np.linalg.norm(x[b, s]), 1e-6))
                       for s in range(x.shape[1]) if s != t and mask[b, s]]
                out[b, t] = -max(cos) if cos else 1.0
        return out

    x64 = x.astype(np.float64)
    np.testing.assert_allclose(distinct_token_scores(x), reference(x64, np.ones_like(mask)),
                               atol=1e-6)
    got = jax.jit(distinct_token_scores)(x, mask=mask)
    np.testing.assert_allclose(got, reference(x64, mask), atol=1e-6)
    lone = distinct_token_scores(x[:, :3], mask=np.array([True, False, False]))
    np.testing.assert_array_equal(lone[:, 0], 1.0)
    kept = keep_top_tokens(distinct_token_scores(x), S - 1)
    assert 1 not in kept[0].tolist() or 4 not in kept[0].tolist()
    with pytest.raises(ValueError, match="x"):
        distinct_token_scores(x[0])
    with pytest.raises(ValueError, match="mask"):
        distinct_token_scores(x, mask=mask[:, :3])


def _peaks_reference(sim, k, m):
    """From the definition: no higher point in the window, no equal earlier one; padded with
    the highest other points."""
    h, w = sim.shape
    peaks, others = [], []
    for i in range(h):
        for j in range(w):
            window = [(a, c) for a in range(max(0, i - m), min(h, i + m + 1))
                      for c in range(max(0, j - m), min(w, j + m + 1)) if (a, c) != (i, j)]
            is_peak = sim[i, j] > -np.inf and all(
                sim[i, j] > sim[a, c] if (a, c) < (i, j) else sim[i, j] >= sim[a, c]
                for a, c in window)
            (peaks if is_peak else others).append((-sim[i, j], i * w + j, (i, j)))
    chosen = (sorted(peaks) + sorted(others))[:k]
    return [list(p[2]) for p in chosen], [-p[0] for p in chosen]


@pytest.mark.parametrize("m", [0, 1, 2])
def test_peak_points_are_the_highest_local_maxima(m):
    sims = np.round(RNG.uniform(size=(3, 6, 7)), 1).astype(np.float32)  # plateaus and ties
    sims[2] = 0.5
    sims[2, 1, 1] = sims[2, 4, 5] = 0.9
    sims[1, 0, 0] = -np.inf
    k = 6
    jitted = jax.jit(peak_points, static_argnums=1, static_argnames="min_distance")
    points, values = jitted(sims, k, min_distance=m)
    assert points.dtype == jnp.int32 and points.shape == (3, k, 2)
    for b in range(3):
        want_points, want_values = _peaks_reference(sims[b], k, m)
        assert points[b].tolist() == want_points
        np.testing.assert_array_equal(values[b], want_values)
    # two separated peaks, then the plateau: one peak at most, the rest padding in order
    assert points[2, :3].tolist() == [[1, 1], [4, 5], [0, 0]]


def test_peak_point_values_have_gradients():
    sim = jnp.asarray(RNG.uniform(size=(1, 4, 4)), jnp.float32)
    points = peak_points(sim, 2)[0][0]
    grad = np.asarray(jax.jit(jax.grad(lambda s: peak_points(s, 2)[1].sum()))(sim))[0]
    want = np.zeros((4, 4))
    for i, j in points.tolist():
        want[i, j] = 1
    np.testing.assert_array_equal(grad, want)


def test_p52_errors_name_the_argument():
    with pytest.raises(ValueError, match="grid"):
        similarity_map(np.zeros((B, 3), np.float32), np.zeros((B, 12, 3), np.float32), (3, 5))
    with pytest.raises(ValueError, match="query_token"):
        similarity_map(np.zeros((B, 4), np.float32), np.zeros((B, 12, 3), np.float32), (3, 4))
    with pytest.raises(ValueError, match="eps"):
        similarity_map(np.zeros((B, 3), np.float32), np.zeros((B, 12, 3), np.float32), (3, 4),
                       eps=0.0)
    with pytest.raises(DTypeError, match="image_tokens"):
        similarity_map(np.zeros((B, 3), np.float32), np.zeros((B, 12, 3), np.int32), (3, 4))
    with pytest.raises(ValueError, match=r"k: expected 1 <= k <= h\*w=12, got 13"):
        peak_points(np.zeros((B, 3, 4), np.float32), 13)
    with pytest.raises(ValueError, match="min_distance"):
        peak_points(np.zeros((B, 3, 4), np.float32), 2, min_distance=-1)
    with pytest.raises(ValueError, match="sim_map"):
        peak_points(np.zeros((3, 4), np.float32), 2)
