"""The reference itself, against a row-by-row NumPy loop written from the definition."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from jattn import reference


def numpy_attention(q, k, v, bias, allowed, scale, cap):
    """One query row and one head at a time; float64."""
    B, T, N, _ = q.shape
    S, K = k.shape[1], k.shape[2]
    out = np.zeros((B, T, N, v.shape[-1]))
    lse = np.full((B, N, T), -np.inf)
    for b in range(B):
        for n in range(N):
            kv_head = n // (N // K)
            for t in range(T):
                logits = np.array([q[b, t, n] @ k[b, s, kv_head] * scale for s in range(S)])
                logits = logits + bias[b, n, t]
                if cap is not None:
                    logits = cap * np.tanh(logits / cap)
                keep = allowed[b, n, t]
                if not keep.any():
                    continue
                weights = np.exp(logits[keep] - logits[keep].max())
                out[b, t, n] = (weights / weights.sum()) @ v[b, keep, kv_head]
                lse[b, n, t] = logits[keep].max() + np.log(weights.sum())
    return out, lse


@pytest.mark.parametrize("is_causal,window,cap", [(False, None, None), (True, (2, 1), 2.0)])
def test_reference_matches_numpy_loop(is_causal, window, cap):
    rng = np.random.RandomState(0)
    B, T, S, N, K, H, Hv = 2, 6, 7, 4, 2, 3, 5
    q, k, v = rng.randn(B, T, N, H), rng.randn(B, S, K, H), rng.randn(B, S, K, Hv)
    bias = rng.randn(B, N, T, S)
    kv_len = np.array([7, 3])
    ids_q, ids_kv = np.array([[0, 0, 1, 1, 1, 2]] * 2), np.array([[0, 0, 0, 1, 1, 1, 1]] * 2)
    i, j = np.arange(T)[:, None], np.arange(S)[None, :]
    allowed = np.ones((B, N, T, S), bool)
    allowed &= (j < kv_len[:, None, None, None])
    allowed &= ids_q[:, None, :, None] == ids_kv[:, None, None, :]
    if is_causal:
        allowed &= j <= i
    if window:
        allowed &= (i - j <= window[0]) & (j - i <= window[1])
    want_out, want_lse = numpy_attention(q, k, v, bias, allowed, 0.7, cap)
    with jax.enable_x64(True):
        out, lse = reference.dot_product_attention(
            q, k, v, bias, scale=0.7, is_causal=is_causal, local_window_size=window,
            key_value_seq_lengths=kv_len, query_segment_ids=ids_q, kv_segment_ids=ids_kv,
            logits_soft_cap=cap, return_lse=True)
    assert (~allowed.any(-1)).any()  # some rows are empty, so that path is checked too
    np.testing.assert_allclose(out, want_out, atol=1e-12)
    np.testing.assert_allclose(lse, want_lse, atol=1e-12)
