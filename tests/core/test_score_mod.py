"""score_mod: every modifier equals the same bias materialised, forward and gradients (with
respect to q, k, v and to the arrays the modifier closes over), on every implementation that
takes one: xla, chunked and both Pallas kernels (interpreted)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jattn
from jattn import reference
from tests.conftest import as_implementation, check_against_reference, normal, qkv

IMPLEMENTATIONS = ["xla", "chunked", "chunked_small_blocks", "pallas_gpu_small_blocks",
                   "pallas_tpu_small_blocks"]
B, T, S, N, K = 2, 37, 45, 4, 2


def _alibi_slopes(n):
    return 2.0 ** (-8.0 * (np.arange(n) + 1) / n)


def _t5_bucket(rel, num_buckets=8, max_distance=20):
    """T5's bidirectional relative-position bucket of kv - q (any integer array type)."""
    half = num_buckets // 2
    sign = jnp.where(rel > 0, half, 0)
    rel = jnp.abs(rel)
    exact = half // 2
    large = exact + (jnp.log(jnp.maximum(rel, 1) / exact) / np.log(max_distance / exact)
                     * (half - exact)).astype(jnp.int32)
    return sign + jnp.where(rel < exact, rel, jnp.minimum(large, half - 1))


def _grid():
    """Dense index grids matching logits [B, N, T, S]."""
    return (np.arange(B)[:, None, None, None], np.arange(N)[None, :, None, None],
            np.arange(T)[None, None, :, None], np.arange(S)[None, None, None, :])


# Each case: (make_mod(table) -> score_mod, make_bias(table) -> [B, N, T, S], table).
CASES = {
    "alibi": (lambda slopes: lambda s, b, h, q, k: s - slopes[h] * jnp.abs(k - q),
              lambda slopes: -slopes[:, None, None] * np.abs(
                  np.arange(S)[None, None, :] - np.arange(T)[None, :, None])[None],
              _alibi_slopes(N)),
    "t5_buckets": (lambda table: lambda s, b, h, q, k: s + table[h, _t5_bucket(k - q)],
                   lambda table: table[:, _t5_bucket(np.arange(S)[None, :]
                                                     - np.arange(T)[:, None])][None],
                   normal(7, (N, 8))),
    "relative_table": (lambda table: lambda s, b, h, q, k: s + table[h, k - q + T - 1],
                       lambda table: table[:, np.arange(S)[None, :] - np.arange(T)[:, None]
                                           + T - 1][None],
                       normal(8, (N, T + S - 1))),
    "per_batch_and_head_weight": (
        lambda w: lambda s, b, h, q, k: s * w[b, h],
        None,  # not a bias: checked against the reference's logits directly
        1.0 + 0.5 * normal(9, (B, N))),
}


def _reference(q, k, v, table, case, **kw):
    _, make_bias, _ = CASES[case]
    if make_bias is None:  # a multiplicative modifier: scale the logits of each (b, h)
        w = table[:, :, None, None]
        scale = q.shape[-1] ** -0.5
        # softmax(w * scale q.k) = attention at per-(b, h) scale; written out densely.
        qh, kh = jnp.moveaxis(q, 1, 2), jnp.repeat(jnp.moveaxis(k, 1, 2), N // K, axis=1)
        logits = w * scale * jnp.einsum("bnth,bnsh->bnts", qh, kh)
        allowed = jnp.ones(logits.shape, bool)
        if kw.get("is_causal"):
            allowed = allowed & (np.arange(S)[None, :] <= np.arange(T)[:, None])
        p = reference.masked_softmax(logits, allowed)
        vh = jnp.repeat(jnp.moveaxis(v, 1, 2), N // K, axis=1)
        return jnp.moveaxis(jnp.einsum("bnts,bnsh->bnth", p, vh), 1, 2)
    return reference.dot_product_attention(q, k, v, bias=make_bias(table), **kw)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("case", CASES)
def test_score_mod_equals_the_materialised_bias(case, implementation):
    make_mod, _, table = CASES[case]
    q, k, v = qkv(B=B, T=T, S=S, N=N, K=K)
    table = jnp.asarray(table, jnp.float32)

    def fn(q, k, v, table):
        return jattn.dot_product_attention(q, k, v, score_mod=make_mod(table), is_causal=True,
                                           implementation=as_implementation(implementation))

    check_against_reference(fn, lambda q, k, v, t: _reference(q, k, v, t, case,
                                                               is_causal=True),
                            (q, k, v, table))


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_soft_cap_as_a_score_mod_equals_logits_soft_cap(implementation):
    q, k, v = qkv(B=B, T=T, S=S, N=N, K=K)
    q = 4 * q  # logits large enough for the cap to matter
    cap = 2.0

    def fn(q, k, v):
        return jattn.dot_product_attention(
            q, k, v, score_mod=lambda s, b, h, i, j: cap * jnp.tanh(s / cap),
            local_window_size=(9, 3), implementation=as_implementation(implementation))

    check_against_reference(fn, lambda q, k, v: reference.dot_product_attention(
        q, k, v, logits_soft_cap=cap, local_window_size=(9, 3)), (q, k, v))


def test_lse_and_weights_carry_the_score_mod():
    """The returned lse is that of the modified logits, and attention_weights with the same
    score_mod reproduces the forward's probabilities (rows sum to 1 against that lse)."""
    q, k, v = qkv(B=B, T=T, S=S, N=N, K=K)
    slopes = jnp.asarray(_alibi_slopes(N), jnp.float32)

    def mod(s, b, h, i, j):
        return s - slopes[h] * jnp.abs(j - i)

    _, lse = jattn.dot_product_attention(q, k, v, score_mod=mod, is_causal=True,
                                           return_lse=True, implementation="chunked")
    _, want = jattn.dot_product_attention(q, k, v, score_mod=mod, is_causal=True,
                                          return_lse=True, implementation="xla")
    np.testing.assert_allclose(lse, want, atol=2e-5)
    w = jattn.attention_weights(q, k, score_mod=mod, is_causal=True, lse=lse)
    np.testing.assert_allclose(w.sum(-1), 1.0, atol=2e-5)
    bias = CASES["alibi"][1](np.asarray(slopes))
    np.testing.assert_allclose(w, jattn.attention_weights(q, k, bias, is_causal=True),
                               atol=2e-6)


def test_chunked_memory_does_not_grow_with_a_bias():
    """ALiBi through score_mod on the chunked path needs no [N, T, S] array: its compiled
    temporaries stay within 1.2x of the same call without a modifier."""
    T = 2048
    q = jax.ShapeDtypeStruct((1, T, 8, 64), jnp.float32)
    slopes = jnp.asarray(_alibi_slopes(8), jnp.float32)

    def run(mod):
        def f(q):
            return jattn.dot_product_attention(q, q, q, is_causal=True, score_mod=mod,
                                               implementation="chunked").sum()
        compiled = jax.jit(jax.grad(f)).lower(q).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    plain = run(None)
    alibi = run(lambda s, b, h, i, j: s - slopes[h] * jnp.abs(j - i))
    assert alibi <= 1.2 * plain, (alibi, plain)
    assert alibi < 8 * T * T * 4 / 4  # far below a quarter of the [N, T, S] bias


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_integer_tables_segments_and_window(implementation):
    """An integer bucket table (no gradient, no error) next to a learned float table, under
    segment ids, a window and GQA: the materialised bias, forward and gradients (the float
    table's included)."""
    q, k, v = qkv(B=B, T=T, S=T, N=N, K=K)
    buckets = jnp.arange(2 * T - 1, dtype=jnp.int32) // 5
    weights = jnp.asarray(normal(3, (N, int(buckets[-1]) + 1)), jnp.float32)
    segments = jnp.asarray(np.repeat([[0, 1, 2], [0, 0, 1]], [12, 13, 12], axis=1), jnp.int32)
    window = (11, 4)

    def fn(q, k, v, w):
        def mod(s, b, h, i, j):
            return s + w[h, buckets[j - i + T - 1]]

        return jattn.dot_product_attention(
            q, k, v, score_mod=mod, local_window_size=window, query_segment_ids=segments,
            kv_segment_ids=segments, implementation=as_implementation(implementation))

    def ref(q, k, v, w):
        rel = np.arange(T)[None, :] - np.arange(T)[:, None] + T - 1
        return reference.dot_product_attention(
            q, k, v, bias=w[:, np.asarray(buckets)[rel]][None], local_window_size=window,
            query_segment_ids=segments, kv_segment_ids=segments)

    check_against_reference(fn, ref, (q, k, v, weights))


def test_validation():
    q, k, v = qkv(B=1, T=9, S=9, N=2, K=2)
    with pytest.raises(TypeError, match="score_mod"):
        jattn.dot_product_attention(q, k, v, score_mod="alibi")
    with pytest.raises(TypeError, match="score_mod"):
        jattn.dot_product_attention(q, k, v, score_mod=lambda s, b, h, i, j: jnp.stack([s, s]),
                                    implementation="chunked")
