"""Ground truth of softmax attention: ``dot_product_attention`` with every masking option
written as plain index comparisons, and the written-out masked softmax the other references
use (a row with nothing allowed gives zeros, never NaN)."""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from jattn.core.masks import Mask
from jattn.core.shapes import Array, left_pad_rank


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
    v = jnp.repeat(value.astype(dtype), N // value.shape[2], axis=2)
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

    out, lse = masked_softmax_average(logits, allowed, v)
    out = out.astype(query.dtype)
    if batch_free:
        out, lse = out[0], lse[0]
    return (out, lse) if return_lse else out


def softmax_terms(logits: Array, allowed: Array, axis: int = -1) -> tuple[Array, Array, Array]:
    """exp(logits - m) on the allowed entries (0 elsewhere), their sum over ``axis`` and the
    shift m (each row's largest allowed logit, 0 for a row with none).

    The shift is a constant for the gradient: the softmax does not depend on it, and
    differentiating max() would route the gradient through an equality test between the
    maximum and the logits, which XLA is free to recompute with different roundings in
    different fusions (at LLVM optimisation level 0 it does, and the gradient becomes 0/0).
    """
    row_max = jnp.max(jnp.where(allowed, logits, -jnp.inf), axis=axis, keepdims=True)
    row_max = lax.stop_gradient(jnp.where(jnp.isfinite(row_max), row_max, 0))
    terms = jnp.where(allowed, jnp.exp(jnp.where(allowed, logits, row_max) - row_max), 0)
    return terms, terms.sum(axis, keepdims=True), row_max


def masked_softmax(logits: Array, allowed: Array, axis: int = -1) -> Array:
    """Softmax over ``axis`` among the allowed entries; a row with none is all zeros."""
    terms, total, _ = softmax_terms(logits, allowed, axis)
    return terms / jnp.where(total > 0, total, 1)


def masked_softmax_average(logits: Array, allowed: Array, v: Array) -> tuple[Array, Array]:
    """out[b,t,n] = sum_s p[b,n,t,s] v[b,s,n]; rows with nothing allowed give 0 and lse -inf."""
    weights, total, row_max = softmax_terms(logits, allowed)
    nonempty = total > 0
    probs = weights / jnp.where(nonempty, total, 1)
    out = jnp.einsum("bnts,bsnh->btnh", probs, v)
    neg = jnp.asarray(-jnp.inf, logits.dtype)
    lse = jnp.where(nonempty, row_max + jnp.log(jnp.where(nonempty, total, 1)), neg)[..., 0]
    return out, lse
