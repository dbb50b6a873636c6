"""Head tools (P41 retrieval scores, P50 sinks and calibration, P62 emphasis) against loops
written from the definitions in NumPy, and the calibration edits against the calibrated
softmax computed densely."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jattn.analysis import Capture, Intervention, attend, heads
from tests.conftest import normal


def random_weights(seed, shape):
    w = np.random.default_rng(seed).random(shape)
    return w / w.sum(-1, keepdims=True)


def test_retrieval_scores_count_copied_needle_tokens():
    rng = np.random.default_rng(0)
    B, L, N, P, S = 2, 2, 3, 5, 9
    w = random_weights(1, (B, L, N, P, S))
    context = rng.integers(0, 4, (B, S))
    needle = np.zeros((B, S), bool)
    needle[0, 2:6], needle[1, 4:7] = True, True
    predicted = rng.integers(0, 4, (B, P))
    rows = rng.random((B, P)) > 0.3
    got = heads.retrieval_scores(w, context, predicted, needle, rows=rows)
    want = np.zeros((B, L, N))
    for b, layer, n, p in np.ndindex(B, L, N, P):
        j = int(np.argmax(w[b, layer, n, p]))
        if rows[b, p] and needle[b, j] and context[b, j] == predicted[b, p]:
            want[b, layer, n] += 1 / needle[b].sum()
    np.testing.assert_allclose(got, want, rtol=1e-6)
    # a head that looks at the token it copies scores 1
    copy = np.zeros((1, 1, 4, 6))
    copy[0, 0, np.arange(4), np.arange(1, 5)] = 1.0
    ctx = np.array([[0, 7, 8, 9, 3, 0]])
    assert float(heads.retrieval_scores(copy, ctx, ctx[:, 1:5], ctx > 0)[0, 0]) == 1.0
    assert jax.jit(heads.retrieval_scores)(w, context, predicted, needle).shape == (B, L, N)


def test_sink_scores_and_sinks():
    T = 6
    w = random_weights(2, (2, 3, T, T)) * np.tril(np.ones((T, T)))
    w /= w.sum(-1, keepdims=True)
    got = heads.sink_scores(w)
    want = np.zeros((2, 3, T))
    for j in range(T):
        want[..., j] = w[..., j:, j].sum(-1) / (T - j)
    np.testing.assert_allclose(got, want, rtol=1e-6)
    np.testing.assert_allclose(heads.sink_scores(w, is_causal=False), w.sum(-2) / T, rtol=1e-6)
    sinks = heads.find_sinks(w, threshold=0.3)
    np.testing.assert_array_equal(sinks, want > 0.3)
    assert not np.asarray(heads.find_sinks(w, threshold=0.3, exclude_first=True))[..., 0].any()


def test_calibration_edits_give_the_calibrated_softmax():
    B, T, N, H = 1, 7, 3, 4
    q, k, v = normal(0, (B, T, N, H)), normal(1, (B, T, N, H)), normal(2, (B, T, N, H))
    sinks = np.zeros((B, N, T), bool)
    sinks[:, :, [0, 3]] = True
    edits = heads.calibration_edits({0: sinks}, {0: [0, 2]}, N, scale=0.4)[0]
    out, cap = attend(q, k, v, is_causal=True,
                      intervention=Intervention(edits, Capture("weights")))
    logits = np.einsum("btnh,bsnh->bnts", np.asarray(q, np.float64), np.asarray(k)) / 2.0
    logits = np.where(np.tril(np.ones((T, T), bool)), logits, -np.inf)
    w = np.exp(logits - logits.max(-1, keepdims=True))
    w /= w.sum(-1, keepdims=True)
    want = w.copy()
    for n in (0, 2):
        for t in range(T):
            row = w[0, n, t]
            mass = row[sinks[0, n]].sum()
            if mass < 1 - 1e-9:
                want[0, n, t] = np.where(sinks[0, n], 0.4 * row, row * (1 - 0.4 * mass)
                                         / (1 - mass))
    np.testing.assert_allclose(cap["weights"], want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out, np.einsum("bnts,bsnh->btnh", want, np.asarray(v)),
                               rtol=1e-5, atol=1e-5)


def test_choose_heads_keeps_the_heads_that_help():
    good = {(0, 1): 0.2, (1, 0): 0.05, (1, 2): -0.1}

    def evaluate(selection):
        return 0.5 + sum(good.get((layer, h), 0.0) for layer, hs in selection.items()
                         for h in hs)
    chosen, gains = heads.choose_heads(evaluate, [*good, (0, 0)], min_gain=0.01)
    assert chosen == {0: [1], 1: [0]}
    assert gains[(1, 2)] == pytest.approx(-0.1)


def test_emphasis_reweights_and_renormalises():
    N, T, S = 3, 4, 6
    w = random_weights(4, (2, N, T, S))
    image = np.array([False, True, True, False, True, False])
    sens = heads.head_sensitivity(w, image)
    np.testing.assert_allclose(sens, (w * image).sum(-1).mean((0, 2)), rtol=1e-6)
    bias = np.asarray(heads.emphasis_bias(sens, image, strength=2.0))
    assert bias.shape == (N, 1, S)
    # adding the bias to the logits == scaling the image tokens' weights and renormalising
    logits = np.log(w)
    biased = np.exp(logits + bias)
    biased /= biased.sum(-1, keepdims=True)
    factor = 1 + 2.0 * np.asarray(sens) / np.asarray(sens).max()
    scaled = w * np.where(image, factor[:, None, None], 1.0)
    np.testing.assert_allclose(biased, scaled / scaled.sum(-1, keepdims=True), rtol=1e-5)
    per_example = heads.emphasis_bias(sens, np.stack([image, ~image]))
    assert per_example.shape == (2, N, 1, S)


def test_dual_stream_tokens():
    rng = np.random.default_rng(5)
    h, w, d = 3, 4, 2
    feats = rng.normal(size=(2, h * w, d))
    received = rng.random((2, h * w))
    got = np.asarray(heads.dual_stream_tokens(received, feats, (h, w), num_local=2,
                                              num_attended=3))
    grid = feats.reshape(2, h, w, d)
    for b in range(2):
        contrast = np.zeros(h * w)
        for i, j in np.ndindex(h, w):
            nb = [grid[b, min(max(i + di, 0), h - 1), min(max(j + dj, 0), w - 1)]
                  for di in (-1, 0, 1) for dj in (-1, 0, 1)]
            contrast[i * w + j] = np.linalg.norm(grid[b, i, j] - np.mean(nb, 0))
        want = np.zeros(h * w, bool)
        want[np.argsort(-contrast, kind="stable")[:2]] = True
        want[np.argsort(-received[b], kind="stable")[:3]] = True
        np.testing.assert_array_equal(got[b], want)


def test_errors():
    w = random_weights(0, (1, 2, 3, 4))
    with pytest.raises(ValueError, match="needle"):
        heads.retrieval_scores(w, np.zeros((1, 4), int), np.zeros((1, 3), int),
                               np.zeros((1, 5), bool))
    with pytest.raises(ValueError, match="visible"):
        heads.sink_scores(w)
    with pytest.raises(ValueError, match="threshold"):
        heads.find_sinks(w, threshold=0.0, is_causal=False)
    with pytest.raises(ValueError, match=r"heads\[0\]"):
        heads.calibration_edits({0: np.zeros((1, 2, 4), bool)}, {0: [2]}, 2)
    with pytest.raises(ValueError, match="sinks"):
        heads.calibration_edits({}, {0: [1]}, 2)
    with pytest.raises(ValueError, match="tokens"):
        heads.head_sensitivity(w, np.zeros(5, bool))
    with pytest.raises(ValueError, match="num_local"):
        heads.dual_stream_tokens(jnp.ones((1, 4)), jnp.ones((1, 4, 2)), (2, 2), num_local=5,
                                 num_attended=1)


def test_calibration_gradients_are_finite_on_empty_rows():
    """A batch with no keys (lengths 0) and rows that see only sinks: outputs 0 or unchanged,
    gradients finite."""
    B, T, N, H = 2, 5, 2, 4
    q, k, v = normal(0, (B, T, N, H)), normal(1, (B, T, N, H)), normal(2, (B, T, N, H))
    sinks = np.zeros((B, N, T), bool)
    sinks[:, :, 0] = True
    edits = heads.calibration_edits({0: sinks}, {0: [0, 1]}, N)[0]

    def loss(q, k, v):
        out, cap = attend(q, k, v, is_causal=True, key_value_seq_lengths=jnp.array([0, T]),
                          intervention=Intervention(edits, Capture("weights")))
        return (out ** 2).sum() + (cap["weights"] ** 2).sum(), out

    (_, out), grads = jax.value_and_grad(loss, (0, 1, 2), has_aux=True)(q, k, v)
    assert np.all(np.asarray(out[0]) == 0)
    plain = attend(q, k, v, is_causal=True)[0]
    np.testing.assert_allclose(out[1, 0], plain[1, 0], rtol=1e-6)  # row 0 sees the sink only
    assert all(np.isfinite(np.asarray(g)).all() for g in grads)
