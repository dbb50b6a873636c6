"""Plain ground truth for every primitive, written from the definitions.

Nothing here is fast and nothing here is shared with the implementations it checks: masks are
built with plain index comparisons, GQA repeats K/V, the softmax is written out. Run it in
float64 (``jax.enable_x64``) to get a reference the tests compare fast paths against, forward
and gradients. Signatures match the public functions.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from jattn.masks import Mask
from jattn.typing import Array, left_pad_rank


def dot_product_attention(query, key, value, bias=None, mask=None, *, scale=None,
                          is_causal=False, query_seq_lengths=None, key_value_seq_lengths=None,
                          local_window_size=None, query_segment_ids=None, kv_segment_ids=None,
                          logits_soft_cap=None, return_lse=False):
    """softmax(cap(scale * q k^T + bias), masked) v, with empty rows giving zeros (lse -inf).

    Same arguments and meaning as :func:`jattn.dot_product_attention` (no validation: the
    reference assumes valid input). Computes in ``promote_types(dtype, float32)``.
    """
    query, key, value = (jnp.asarray(x) for x in (query, key, value))
    batch_free = query.ndim == 3
    if batch_free:
        query, key, value = query[None], key[None], value[None]
    B, T, N, H = query.shape
    S, K = key.shape[1], key.shape[2]
    dtype = jnp.promote_types(query.dtype, jnp.float32)

    q = query.astype(dtype)
    k = jnp.repeat(key.astype(dtype), N // K, axis=2)
    v = jnp.repeat(value.astype(dtype), N // K, axis=2)
    scale = H ** -0.5 if scale is None else scale
    logits = jnp.einsum("btnh,bsnh->bnts", q, k) * scale
    if bias is not None:
        logits = logits + left_pad_rank(jnp.asarray(bias), 4).astype(dtype)
    if logits_soft_cap is not None:
        logits = logits_soft_cap * jnp.tanh(logits / logits_soft_cap)

    allowed = jnp.ones((B, N, T, S), bool)
    i = jnp.arange(T)[:, None]
    j = jnp.arange(S)[None, :]
    if is_causal:
        allowed &= j <= i
    if local_window_size is not None:
        left, right = ((local_window_size, local_window_size)
                       if isinstance(local_window_size, int) else local_window_size)
        allowed &= (i - j <= left) & (j - i <= right)
    if query_seq_lengths is not None:
        allowed &= (i < jnp.asarray(query_seq_lengths).reshape(-1, 1, 1, 1))
    if key_value_seq_lengths is not None:
        allowed &= (j < jnp.asarray(key_value_seq_lengths).reshape(-1, 1, 1, 1))
    if query_segment_ids is not None or kv_segment_ids is not None:
        q_ids = jnp.asarray(query_segment_ids if query_segment_ids is not None
                            else kv_segment_ids).reshape(-1, T)
        kv_ids = jnp.asarray(kv_segment_ids if kv_segment_ids is not None
                             else query_segment_ids).reshape(-1, S)
        allowed &= (q_ids[:, None, :, None] == kv_ids[:, None, None, :])
    if isinstance(mask, Mask):
        allowed &= mask.materialize(T, S)
    elif mask is not None:
        allowed &= left_pad_rank(jnp.asarray(mask), 4)

    out, lse = _masked_softmax_average(logits, allowed, v)
    out = out.astype(query.dtype)
    if batch_free:
        out, lse = out[0], lse[0]
    return (out, lse) if return_lse else out


def _masked_softmax_average(logits: Array, allowed: Array, v: Array) -> tuple[Array, Array]:
    """out[b,t,n] = sum_s p[b,n,t,s] v[b,s,n]; rows with nothing allowed give 0 and lse -inf."""
    neg = jnp.asarray(-jnp.inf, logits.dtype)
    row_max = jnp.max(jnp.where(allowed, logits, neg), axis=-1, keepdims=True)
    row_max = jnp.where(jnp.isfinite(row_max), row_max, 0)
    weights = jnp.where(allowed, jnp.exp(jnp.where(allowed, logits, row_max) - row_max), 0)
    total = weights.sum(-1, keepdims=True)
    nonempty = total > 0
    probs = weights / jnp.where(nonempty, total, 1)
    out = jnp.einsum("bnts,bsnh->btnh", probs, v)
    lse = jnp.where(nonempty, row_max + jnp.log(jnp.where(nonempty, total, 1)), neg)[..., 0]
    return out, lse


def causal_conv(x: Array, filt: Array) -> Array:
    """y[b, t, d] = sum_{s=0}^{min(t, K-1)} filt[s, d] * x[b, t - s, d], as a Toeplitz matmul.

    The reference for ``jattn.mixers.fft_causal_conv`` (filt [L, D]) and, with the kernel
    reversed, ``short_causal_conv`` (kernel [K, D]).
    """
    L, K = x.shape[1], filt.shape[0]
    lag = jnp.arange(L)[:, None] - jnp.arange(L)[None, :]  # t - tau
    valid = (lag >= 0) & (lag < K)
    toeplitz = jnp.where(valid[..., None], filt[jnp.clip(lag, 0, K - 1)], 0)  # [L, L, D]
    return jnp.einsum("tud,bud->btd", toeplitz, x)


def selective_scan(u, delta, A, B, C, D=None):
    """The selective-scan recurrence one step at a time (lax.scan over the length).

    h_t = exp(delta_t A) h_{t-1} + delta_t B_t u_t;  y_t = <h_t, C_t> + D u_t.
    """
    dtype = jnp.promote_types(u.dtype, jnp.float32)

    def step(h, inputs):
        u_t, delta_t, B_t, C_t = inputs  # [b, d], [b, d], [b, n], [b, n]
        h = jnp.exp(delta_t[..., None] * A) * h + (delta_t * u_t)[..., None] * B_t[:, None, :]
        return h, jnp.einsum("bdn,bn->bd", h, C_t)

    h0 = jnp.zeros((u.shape[0], u.shape[2], A.shape[1]), dtype)
    xs = tuple(jnp.swapaxes(x.astype(dtype), 0, 1) for x in (u, delta, B, C))
    _, y = lax.scan(step, h0, xs)
    y = jnp.swapaxes(y, 0, 1)
    if D is not None:
        y = y + D * u.astype(dtype)
    return y.astype(u.dtype)
