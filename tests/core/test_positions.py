"""Positions against direct formulas (NumPy loops), RoPE's relative property, and use as
attention biases."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jattn
from jattn import positions as P


def test_sinusoidal_matches_the_formula():
    got = np.asarray(P.sinusoidal(jnp.arange(7), 6, base=100.0))
    for p in range(7):
        for i in range(3):
            angle = p / 100.0 ** (2 * i / 6)
            np.testing.assert_allclose(got[p, 2 * i], math.sin(angle), atol=1e-6)
            np.testing.assert_allclose(got[p, 2 * i + 1], math.cos(angle), atol=1e-6)


def _rope_loop(x, positions, base, rotary, interleaved, scale_positions=1.0):
    x = np.asarray(x, np.float64)
    out = x.copy()
    B, T = x.shape[:2]
    for b in range(B):
        for t in range(T):
            for i in range(rotary // 2):
                angle = positions[t] / scale_positions * base ** (-2 * i / rotary)
                j, k = (2 * i, 2 * i + 1) if interleaved else (i, i + rotary // 2)
                a, c = x[b, t, :, j], x[b, t, :, k]
                out[b, t, :, j] = a * math.cos(angle) - c * math.sin(angle)
                out[b, t, :, k] = a * math.sin(angle) + c * math.cos(angle)
    return out


@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("fraction", [1.0, 0.5])
def test_rope_matches_the_rotation(interleaved, fraction):
    x = jax.random.normal(jax.random.key(0), (2, 5, 3, 8))
    pos = np.array([0, 3, 4, 9, 20])
    got = P.apply_rope(x, jnp.asarray(pos), base=50.0, fraction=fraction,
                       interleaved=interleaved)
    want = _rope_loop(x, pos, 50.0, int(8 * fraction), interleaved)
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_rope_scalings():
    x = jax.random.normal(jax.random.key(1), (1, 4, 2, 8))
    pos = np.arange(4) * 7
    linear = P.apply_rope(x, jnp.asarray(pos), scaling="linear", factor=4.0)
    np.testing.assert_allclose(linear, _rope_loop(x, pos, 10000.0, 8, False, 4.0), atol=1e-5)
    ntk = P.apply_rope(x, jnp.asarray(pos), scaling="ntk", factor=4.0)
    base = 10000.0 * 4.0 ** (8 / 6)
    np.testing.assert_allclose(ntk, _rope_loop(x, pos, base, 8, False), atol=1e-5)


def test_rope_scores_depend_only_on_offsets():
    q = jax.random.normal(jax.random.key(2), (1, 1, 2, 16))
    k = jax.random.normal(jax.random.key(3), (1, 1, 2, 16))

    def score(m, n):
        return np.asarray(jnp.einsum("btnh,bsnh->bn", P.apply_rope(q, jnp.array([m])),
                                     P.apply_rope(k, jnp.array([n]))))

    np.testing.assert_allclose(score(5, 2), score(103, 100), rtol=1e-4)
    np.testing.assert_allclose(score(0, 7), score(40, 47), rtol=1e-4)
    assert not np.allclose(score(5, 2), score(5, 3), rtol=1e-3)


def test_rope_2d_rotates_halves_by_row_and_column():
    x = jax.random.normal(jax.random.key(4), (1, 6, 1, 8))
    rows, cols = jnp.array([0, 0, 1, 1, 2, 2]), jnp.array([0, 1, 0, 1, 0, 1])
    got = P.apply_rope_2d(x, rows, cols)
    np.testing.assert_allclose(got[..., :4], _rope_loop(x[..., :4], rows, 1e4, 4, False),
                               atol=1e-5)
    np.testing.assert_allclose(got[..., 4:], _rope_loop(x[..., 4:], cols, 1e4, 4, False),
                               atol=1e-5)


def test_alibi_slopes_and_bias():
    np.testing.assert_allclose(P.alibi_slopes(8), [2.0**-i for i in range(1, 9)])
    np.testing.assert_allclose(P.alibi_slopes(12), [2.0**-i for i in range(1, 9)]
                               + [2.0**-0.5, 2.0**-1.5, 2.0**-2.5, 2.0**-3.5])
    bias = np.asarray(P.alibi_bias(3, 2, 5))  # queries at positions 3, 4 of 5 keys
    slopes = P.alibi_slopes(3)
    for n in range(3):
        for t in range(2):
            for s in range(5):
                assert bias[n, t, s] == pytest.approx(-slopes[n] * (t + 3 - s))
    sym = np.asarray(P.alibi_bias(2, 4, 4, is_causal=False))
    assert sym[0, 0, 3] == sym[0, 3, 0] == pytest.approx(-3 * P.alibi_slopes(2)[0])


@pytest.mark.parametrize("rel,bucket", [(0, 0), (-1, 1), (1, 17), (-7, 7), (-8, 8), (-20, 10),
                                        (-128, 15), (-1000, 15), (20, 26)])
def test_t5_bucket_values(rel, bucket):
    # 32 buckets, max distance 128: 16 per side; 8 exact; log-spaced to 128 beyond.
    assert int(P.t5_bucket(jnp.array(rel))) == bucket


def test_t5_causal_buckets_and_bias():
    rel = jnp.arange(-300, 5)
    causal = np.asarray(P.t5_bucket(rel, bidirectional=False))
    assert (causal[rel > 0] == 0).all() and causal[300] == 0  # future and self
    assert (np.diff(causal[::-1][5:]) >= 0).all() and causal.max() == 31  # grows with distance
    table = jax.random.normal(jax.random.key(5), (32, 4))
    bias = np.asarray(P.t5_bias(table, 3, 6))
    for t in range(3):
        for s in range(6):
            b = int(P.t5_bucket(jnp.array(s - (t + 3))))
            np.testing.assert_allclose(bias[:, t, s], table[b])


def test_xl_relative_logits_match_the_formula():
    B, T, S, N, H, R = 1, 3, 5, 2, 4, 6
    k = jax.random.split(jax.random.key(6), 5)
    q, key = jax.random.normal(k[0], (B, T, N, H)), jax.random.normal(k[1], (B, S, N, H))
    r = jax.random.normal(k[2], (R, N, H))
    u, v = jax.random.normal(k[3], (N, H)), jax.random.normal(k[4], (N, H))
    got = np.asarray(P.xl_relative_logits(q, key, r, u, v))
    for n in range(N):
        for t in range(T):
            for s in range(S):
                d = t + (S - T) - s
                want = float((q[0, t, n] + u[n]) @ key[0, s, n])
                if 0 <= d < R:
                    want += float((q[0, t, n] + v[n]) @ r[d, n])
                np.testing.assert_allclose(got[0, n, t, s], want, rtol=1e-5, atol=1e-5)


def test_biases_plug_into_attention_and_jit():
    q = jax.random.normal(jax.random.key(7), (2, 6, 4, 8))
    bias = P.alibi_bias(4, 6, 6)
    out = jax.jit(lambda q: jattn.dot_product_attention(q, q, q, bias=bias, is_causal=True))(q)
    want = jattn.reference.dot_product_attention(q, q, q, bias=bias, is_causal=True)
    np.testing.assert_allclose(out, want, atol=2e-5)
    rotated = jax.vmap(lambda x: P.apply_rope(x[None])[0])(q)
    np.testing.assert_allclose(rotated, P.apply_rope(q), atol=1e-6)


@pytest.mark.parametrize("call,name", [
    (lambda: P.sinusoidal(jnp.arange(3), 5), "dim"),
    (lambda: P.apply_rope(jnp.ones((1, 2, 1, 8)), fraction=0.1), "fraction"),
    (lambda: P.apply_rope(jnp.ones((1, 2, 1, 8)), scaling="yarn"), "scaling"),
    (lambda: P.apply_rope(jnp.ones((1, 2, 1, 8)), jnp.arange(3)), "positions"),
    (lambda: P.apply_rope(jnp.ones((2, 8)), None), "x"),
    (lambda: P.apply_rope_2d(jnp.ones((1, 2, 1, 6)), jnp.arange(2), jnp.arange(2)), "x"),
    (lambda: P.alibi_slopes(0), "num_heads"),
    (lambda: P.t5_bucket(jnp.arange(3), num_buckets=2), "num_buckets"),
    (lambda: P.xl_relative_logits(jnp.ones((1, 2, 2, 4)), jnp.ones((1, 3, 2, 4)),
                                  jnp.ones((4, 2, 4)), jnp.ones((2, 3)), jnp.ones((2, 4))),
     "content_bias"),
])
def test_bad_input_names_the_argument(call, name):
    with pytest.raises(ValueError, match=name):
        call()
