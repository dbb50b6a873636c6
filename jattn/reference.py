"""Plain ground truth for every primitive, written from the definitions.

Nothing here is fast and nothing here is shared with the implementations it checks: masks are
built with plain index comparisons, GQA repeats K/V, the softmax is written out. Run it in
float64 (``jax.enable_x64``) to get a reference the tests compare fast paths against, forward
and gradients. Signatures match the public functions.
"""

from __future__ import annotations

import math

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

    The reference for ``jattn.mixers.long_causal_conv`` (filt [L, D]) and, with the kernel
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


def linear_attention(query, key, value, *, feature_map="elu+1", is_causal=False, decay=None,
                     normalize=True, eps=1e-6, initial_state=None, return_state=False):
    """Linear attention as the quadratic sum of its definition (GQA repeats K/V).

    out_t = sum_s w_ts (phi(q_t) . phi(k_s)) v_s / (sum_s w_ts phi(q_t) . phi(k_s) + eps),
    w_ts = [s <= t] gamma^(t - s) when causal (gamma = 1 without decay), 1 otherwise; the
    initial state (kv [B, N, F, Hv], k_sum [B, N, F]) enters query t with gamma^(t + 1).
    Same arguments and meaning as :func:`jattn.linear_attention`; returns (output, (kv,
    k_sum)) with ``return_state``.
    """
    query, key, value = (jnp.asarray(x) for x in (query, key, value))
    B, T, N, _ = query.shape
    S, K = key.shape[1], key.shape[2]
    dtype = jnp.promote_types(query.dtype, jnp.float32)
    maps = {
        "identity": lambda x: x,
        "elu+1": lambda x: jnp.where(x > 0, x + 1, jnp.exp(jnp.minimum(x, 0))),
        "relu": lambda x: jnp.maximum(x, 0),
        "taylor": _taylor_features,
    }
    phi = maps[feature_map] if isinstance(feature_map, str) else feature_map
    pq = phi(query.astype(dtype))
    pk = phi(jnp.repeat(key.astype(dtype), N // K, axis=2))
    v = jnp.repeat(value.astype(dtype), N // K, axis=2)

    t = jnp.arange(T)[:, None]
    s = jnp.arange(S)[None, :]
    gamma = jnp.ones((N,), dtype) if decay is None else jnp.asarray(decay).astype(dtype)
    if is_causal:
        seen = s <= t
        weight = jnp.where(seen, gamma[:, None, None] ** jnp.where(seen, t - s, 0), 0)
        from_state = gamma[None, :] ** (jnp.arange(T)[:, None] + 1)  # [T, N]
        to_state = gamma[None, :] ** (S - 1 - jnp.arange(S)[:, None])  # [S, N]
        carried = gamma ** S
    else:
        weight = jnp.ones((N, T, S), dtype)
        from_state = jnp.ones((T, N), dtype)
        to_state = jnp.ones((S, N), dtype)
        carried = jnp.ones((N,), dtype)
    scores = jnp.einsum("btnf,bsnf->bnts", pq, pk) * weight
    num = jnp.einsum("bnts,bsnv->btnv", scores, v)
    den = jnp.einsum("bnts->btn", scores)
    F = pq.shape[-1]
    kv0 = jnp.zeros((B, N, F, v.shape[-1]), dtype)
    z0 = jnp.zeros((B, N, F), dtype)
    if initial_state is not None:
        kv0, z0 = (jnp.asarray(x).astype(dtype) for x in initial_state)
    num = num + jnp.einsum("btnf,bnfv->btnv", pq, kv0) * from_state[..., None]
    den = den + jnp.einsum("btnf,bnf->btn", pq, z0) * from_state
    out = num / (den + eps)[..., None] if normalize else num
    out = out.astype(query.dtype)
    if not return_state:
        return out
    kv = carried[:, None, None] * kv0 + jnp.einsum("bsnf,sn,bsnv->bnfv", pk, to_state, v)
    z = carried[:, None] * z0 + jnp.einsum("bsnf,sn->bnf", pk, to_state)
    return out, (kv, z)


def _taylor_features(x: Array) -> Array:
    """[1, x / d^(1/4), x_i x_j / sqrt(2 d) for every (i, j)]: phi(x).phi(y) = 1 + x.y/sqrt(d)
    + (x.y)^2 / (2 d)."""
    d = x.shape[-1]
    pairs = jnp.einsum("...i,...j->...ij", x, x).reshape(*x.shape[:-1], d * d)
    return jnp.concatenate([jnp.ones((*x.shape[:-1], 1), x.dtype), x * d ** -0.25,
                            pairs / jnp.sqrt(2.0 * d).astype(x.dtype)], axis=-1)


def h3_ssm(q, k, v, shift, diag, *, discretization="bilinear"):
    """H3 by its two recurrences, one time step at a time (lax.scan over the length).

    Shift SSM per channel: s_t = (0, s_{t-1}[:-1]) + B k_t, k'_t = <C, s_t> + D_s k_t.
    Diagonal SSM per head and (i, j) channel, Z complex modes (each with its conjugate):
    x_t = dA x_{t-1} + dB k'_t[i] v_t[j], w_t = 2 Re <C, x_t> + D kv_t;
    y_t[j] = sum_i q_t[i] w_t[i, j]. dA, dB: bilinear (1 + dt A/2) / (1 - dt A/2),
    dt B / (1 - dt A/2), or zero-order hold exp(dt A), (exp(dt A) - 1) B / A.
    Same arguments and meaning as :func:`jattn.mixers.h3.h3_ssm`.
    """
    dtype = jnp.promote_types(v.dtype, jnp.float32)
    q, k, v = (jnp.asarray(x).astype(dtype) for x in (q, k, v))
    Bsz, _, N, P = v.shape
    dt = jnp.exp(diag.log_dt.astype(dtype))[:, None]
    A = -jnp.exp(diag.log_A_real.astype(dtype)) + 1j * diag.A_imag.astype(dtype)
    B = diag.B[..., 0].astype(dtype) + 1j * diag.B[..., 1].astype(dtype)
    C = diag.C[..., 0].astype(dtype) + 1j * diag.C[..., 1].astype(dtype)
    if discretization == "zoh":
        dA, dB = jnp.exp(dt * A), (jnp.exp(dt * A) - 1) * B / A
    else:
        dA, dB = (1 + dt * A / 2) / (1 - dt * A / 2), dt * B / (1 - dt * A / 2)
    sB, sC = shift.B.astype(dtype), shift.C.astype(dtype)

    def step(carry, inputs):
        s, x = carry  # [b, N, P, M] real, [b, N, P, P, Z] complex
        q_t, k_t, v_t = inputs  # [b, N, P] each
        s = jnp.concatenate([jnp.zeros_like(s[..., :1]), s[..., :-1]], axis=-1)
        s = s + sB * k_t[..., None]
        k_t = (s * sC).sum(-1) + shift.D.astype(dtype) * k_t
        kv = k_t[..., :, None] * v_t[..., None, :]  # [b, N, P, P]
        x = dA[:, None, None, :] * x + dB[:, None, None, :] * kv[..., None]
        w = 2 * (C[:, None, None, :] * x).sum(-1).real + diag.D.astype(dtype)[:, None, None] * kv
        return (s, x), (q_t[..., :, None] * w).sum(-2)

    s0 = jnp.zeros((Bsz, N, P, shift.C.shape[-1]), dtype)
    x0 = jnp.zeros((Bsz, N, P, P, A.shape[-1]), dA.dtype)
    xs = tuple(jnp.swapaxes(x, 0, 1) for x in (q, k, v))
    _, y = lax.scan(step, (s0, x0), xs)
    return jnp.swapaxes(y, 0, 1).astype(v.dtype)


def topk_attention(query, key, value, *, top_k=None, is_causal=True, scale=None):
    """Softmax over each query's top_k allowed keys, from dense scores and an explicit mask.

    Key j is kept for query i when it is allowed (j <= i if causal) and fewer than top_k
    allowed keys beat it (a higher score, or the same score at a smaller index); top_k None
    means ceil(sqrt(S)). Same arguments and meaning as :func:`jattn.topk_attention`.
    """
    B, T, N, H = query.shape
    S, K = key.shape[1], key.shape[2]
    dtype = jnp.promote_types(query.dtype, jnp.float32)
    k = jnp.repeat(key.astype(dtype), N // K, axis=2)
    v = jnp.repeat(value.astype(dtype), N // K, axis=2)
    scale = H ** -0.5 if scale is None else scale
    logits = jnp.einsum("btnh,bsnh->bnts", query.astype(dtype), k) * scale
    i = jnp.arange(T)[:, None]
    j = jnp.arange(S)[None, :]
    allowed = jnp.broadcast_to(j <= i if is_causal else True, (B, N, T, S))
    top_k = math.ceil(math.sqrt(S)) if top_k is None else top_k
    mine = logits[..., :, None]  # [B, N, T, S, 1]: candidate key c
    other = logits[..., None, :]  # [B, N, T, 1, S]: competitor key c'
    earlier = jnp.arange(S)[None, :] < jnp.arange(S)[:, None]  # [c, c']: c' < c
    beats = allowed[..., None, :] & ((other > mine) | ((other == mine) & earlier))
    keep = allowed & (beats.sum(-1) < top_k)
    out, _ = _masked_softmax_average(logits, keep, v)
    return out.astype(query.dtype)
