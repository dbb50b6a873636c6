"""Plain ground truth for every primitive, written from the definitions.

Nothing here is fast and nothing here is shared with the implementations it checks: masks are
built with plain index comparisons, GQA repeats K/V, the softmax is written out. Run it in
float64 (``jax.enable_x64``) to get a reference the tests compare fast paths against, forward
and gradients. Signatures match the public functions.
"""

from __future__ import annotations

import math

import jax
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

    out, lse = _masked_softmax_average(logits, allowed, v)
    out = out.astype(query.dtype)
    if batch_free:
        out, lse = out[0], lse[0]
    return (out, lse) if return_lse else out


def _softmax_terms(logits: Array, allowed: Array, axis: int = -1) -> tuple[Array, Array, Array]:
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


def _masked_softmax(logits: Array, allowed: Array, axis: int = -1) -> Array:
    """Softmax over ``axis`` among the allowed entries; a row with none is all zeros."""
    terms, total, _ = _softmax_terms(logits, allowed, axis)
    return terms / jnp.where(total > 0, total, 1)


def _masked_softmax_average(logits: Array, allowed: Array, v: Array) -> tuple[Array, Array]:
    """out[b,t,n] = sum_s p[b,n,t,s] v[b,s,n]; rows with nothing allowed give 0 and lse -inf."""
    weights, total, row_max = _softmax_terms(logits, allowed)
    nonempty = total > 0
    probs = weights / jnp.where(nonempty, total, 1)
    out = jnp.einsum("bnts,bsnh->btnh", probs, v)
    neg = jnp.asarray(-jnp.inf, logits.dtype)
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


def neighborhood_mask(spatial, kernel_size, dilation=1, is_causal=False):
    """Dense boolean [L, L] (L = prod(spatial), row-major flat positions): query p may attend
    key q, built position by position from NATTEN's definition (P72).

    Per spatial axis of length n, kernel k, dilation d: positions split into d groups by
    index mod d; key q is in query p's window when it is in p's group and its rank in the
    group (index // d) lies in [lo, lo + k) with lo = r - k // 2 clipped to [0, len - k]
    (r: p's rank, len: the group's size), or, causal, in [r - k + 1, r]. A key is allowed
    when it is in the window along every axis.
    """
    import itertools

    import numpy as np

    spatial = tuple(spatial)
    n = len(spatial)

    def per_axis(x):
        return tuple(x) if isinstance(x, (tuple, list)) else (x,) * n

    kernel_size, dilation, is_causal = per_axis(kernel_size), per_axis(dilation), per_axis(
        is_causal)

    def in_window(axis, p, q):
        length, k, d = spatial[axis], kernel_size[axis], dilation[axis]
        if p % d != q % d:
            return False
        group_size = len(range(p % d, length, d))
        rank, key_rank = p // d, q // d
        if is_causal[axis]:
            return rank - k + 1 <= key_rank <= rank
        lo = min(max(rank - k // 2, 0), group_size - k)
        return lo <= key_rank < lo + k

    positions = list(itertools.product(*(range(s) for s in spatial)))
    mask = np.zeros((len(positions), len(positions)), bool)
    for i, p in enumerate(positions):
        for j, q in enumerate(positions):
            mask[i, j] = all(in_window(a, p[a], q[a]) for a in range(n))
    return mask


def neighborhood_attention(query, key, value, *, kernel_size, dilation=1, is_causal=False,
                           scale=None, extra_key=None, extra_value=None):
    """Neighbourhood attention as dense softmax attention under :func:`neighborhood_mask`,
    with the extra keys appended as columns every query may attend. Same arguments and
    meaning as :func:`jattn.neighborhood.neighborhood_attention`."""
    import numpy as np

    query, key, value = (jnp.asarray(x) for x in (query, key, value))
    B, spatial, N, H = query.shape[0], query.shape[1:-2], query.shape[-2], query.shape[-1]
    L = math.prod(spatial)
    mask = neighborhood_mask(spatial, kernel_size, dilation, is_causal)
    k = key.reshape(B, L, *key.shape[-2:])
    v = value.reshape(B, L, *value.shape[-2:])
    if extra_key is not None:
        k = jnp.concatenate([k, jnp.asarray(extra_key)], axis=1)
        v = jnp.concatenate([v, jnp.asarray(extra_value)], axis=1)
        mask = np.concatenate([mask, np.ones((L, extra_key.shape[1]), bool)], axis=1)
    out = dot_product_attention(query.reshape(B, L, N, H), k, v, mask=jnp.asarray(mask),
                                scale=scale)
    return out.reshape(B, *spatial, N, value.shape[-1])


def _spatial_positions(spatial):
    """Every position of a grid as a tuple of coordinates, in row-major order."""
    import itertools
    return list(itertools.product(*(range(n) for n in spatial)))


def _flat_attention(query, key, value, allowed, bias, scale):
    """Dense softmax attention over the row-major flattened grid, then back to the grid."""
    spatial = query.shape[1:-2]
    q, k, v = (x.reshape(x.shape[0], -1, *x.shape[-2:]) for x in (query, key, value))
    out = dot_product_attention(q, k, v, bias=bias, mask=jnp.asarray(allowed), scale=scale)
    return out.reshape(out.shape[0], *spatial, *out.shape[-2:])


def window_attention(query, key, value, *, window_size, shift=0, relative_position_bias=None,
                     scale=None, is_causal=False):
    """Swin (shifted) window attention from a dense [L, L] mask and [N, L, L] bias, by loops.

    Per axis the grid is padded to L_pad (a multiple of w) and position p sits at rolled
    coordinate r = (p - shift) mod L_pad. Query p attends to key p' iff on every axis they
    share the window floor(r / w) and Swin's region label (0: r < L_pad - w, 1:
    r < L_pad - shift, 2: otherwise; all 0 without shift). The bias of the pair is the table
    entry of the offset (r mod w) - (r' mod w) + w - 1, row-major over (2 w - 1) per axis.
    Only real positions exist here, so padded keys are never attended. Same arguments and
    meaning as :func:`jattn.window_attention` (no validation).
    """
    import numpy as np

    spatial = query.shape[1:-2]
    d = len(spatial)
    w = (window_size,) * d if isinstance(window_size, int) else tuple(window_size)
    s = (shift,) * d if isinstance(shift, int) else tuple(shift)
    padded = [-(-n // ww) * ww for n, ww in zip(spatial, w, strict=True)]

    def region(r, a):
        if s[a] == 0 or r < padded[a] - w[a]:
            return 0
        return 1 if r < padded[a] - s[a] else 2

    positions = _spatial_positions(spatial)
    L = len(positions)
    allowed = np.zeros((L, L), bool)
    index = np.zeros((L, L), int)
    for i, p in enumerate(positions):
        for j, pk in enumerate(positions):
            same, offset = True, 0
            for a in range(d):
                r, rk = (p[a] - s[a]) % padded[a], (pk[a] - s[a]) % padded[a]
                same = same and r // w[a] == rk // w[a] and region(r, a) == region(rk, a)
                offset = offset * (2 * w[a] - 1) + (r % w[a] - rk % w[a] + w[a] - 1)
            allowed[i, j] = same
            index[i, j] = offset if same else 0
    bias = None
    if relative_position_bias is not None:
        bias = jnp.asarray(relative_position_bias)[:, index][None]  # [1, N, L, L]
    return _flat_attention(query, key, value, allowed, bias, scale)


def halo_attention(query, key, value, *, block_size, halo_size, is_causal=False, scale=None):
    """HaloNet blocked attention with halos from a dense [L, L] mask built by loops.

    Query p attends to key p' iff on every axis floor(p / b) b - h <= p' < floor(p / b) b + b
    + h (keys outside the grid do not exist here), and p' <= p when causal (1-D). Same
    arguments and meaning as :func:`jattn.halo_attention` (no validation).
    """
    import numpy as np

    spatial = query.shape[1:-2]
    d = len(spatial)
    b = (block_size,) * d if isinstance(block_size, int) else tuple(block_size)
    h = (halo_size,) * d if isinstance(halo_size, int) else tuple(halo_size)
    positions = _spatial_positions(spatial)
    L = len(positions)
    allowed = np.zeros((L, L), bool)
    for i, p in enumerate(positions):
        for j, pk in enumerate(positions):
            ok = all(p[a] // b[a] * b[a] - h[a] <= pk[a] < p[a] // b[a] * b[a] + b[a] + h[a]
                     for a in range(d))
            if is_causal:
                ok = ok and pk <= p
            allowed[i, j] = ok
    return _flat_attention(query, key, value, allowed, None, scale)


def agent_attention(query, key, value, *, n_agents=None, agents=None, agent_key_bias=None,
                    query_agent_bias=None, is_causal=False, scale=None):
    """Agent attention from its definition, materialising the [T, S] weights P2 P1.

    Agents: the mean of the queries over positions [floor(a T / n), ceil((a + 1) T / n))
    (a loop over segments), unless given. P1 = softmax(scale A K^T + B1) over the keys, P2 =
    softmax(scale Q A^T + B2) over the agents, out = (P2 P1) V. Causal: agent a with last
    position e_a sees keys j <= e_a, query t sees agents with e_a <= t. Same arguments and
    meaning as :func:`jattn.agent_attention`.
    """
    _, T, N, H = query.shape
    S, K = key.shape[1], key.shape[2]
    dtype = jnp.promote_types(query.dtype, jnp.float32)
    q = query.astype(dtype)
    k = jnp.repeat(key.astype(dtype), N // K, axis=2)
    v = jnp.repeat(value.astype(dtype), N // K, axis=2)
    scale = H ** -0.5 if scale is None else scale
    if agents is None:
        last = []
        pooled = []
        for a in range(n_agents):
            start = (a * T) // n_agents
            end = math.ceil((a + 1) * T / n_agents)
            pooled.append(q[:, start:end].mean(axis=1))
            last.append(end - 1)
        agents = jnp.stack(pooled, axis=1)
    agents = agents.astype(dtype)
    n = agents.shape[1]

    logits1 = jnp.einsum("banh,bsnh->bnas", agents, k) * scale
    if agent_key_bias is not None:
        logits1 = logits1 + left_pad_rank(jnp.asarray(agent_key_bias), 4).astype(dtype)
    logits2 = jnp.einsum("btnh,banh->bnta", q, agents) * scale
    if query_agent_bias is not None:
        logits2 = logits2 + left_pad_rank(jnp.asarray(query_agent_bias), 4).astype(dtype)
    allowed1 = jnp.ones((n, S), bool)
    allowed2 = jnp.ones((T, n), bool)
    if is_causal:
        e = jnp.asarray(last)
        allowed1 = jnp.arange(S)[None, :] <= e[:, None]
        allowed2 = e[None, :] <= jnp.arange(T)[:, None]

    weights = jnp.einsum("bnta,bnas->bnts", _masked_softmax(logits2, allowed2),
                         _masked_softmax(logits1, allowed1))  # [B, N, T, S], rows sum to 1 or 0
    return jnp.einsum("bnts,bsnv->btnv", weights, v).astype(query.dtype)


def landmark_attention(query, key, value, landmark_keys, *, block_size, is_causal=True,
                       top_k=None, scale=None):
    """Landmark attention as the paper writes it, on the sequence with landmarks inserted.

    Builds the extended key sequence (block 0's tokens, landmark 0, block 1's tokens,
    landmark 1, ...; a landmark after every block, the last one too), with query i at
    extended position i + i // block_size. For query i in block p: visible entries are those
    at extended positions <= its own when causal (all when not); the group of a token is its
    block, the group of another block's landmark is p, the own landmark is ignored. Grouped
    softmax S (softmax within each group, written out pairwise), then the paper's weights:
    0 for landmarks, S_ij for tokens of the own group, S_ij * S_i,landmark(j) for tokens of
    other blocks. With top_k, the other blocks whose landmark is beaten by k or more visible
    landmarks (higher score, or equal score and earlier) are removed, landmark and tokens.
    Same arguments and meaning as :func:`jattn.landmark_attention`.
    """
    B, T, N, H = query.shape
    S, K = key.shape[1], key.shape[2]
    nb = landmark_keys.shape[1]
    dtype = jnp.promote_types(query.dtype, jnp.float32)
    scale = H ** -0.5 if scale is None else scale
    keys, values, block, landmark = [], [], [], []
    for c in range(nb):
        for j in range(c * block_size, min((c + 1) * block_size, S)):
            keys.append(key[:, j])
            values.append(value[:, j])
            block.append(c)
            landmark.append(False)
        keys.append(landmark_keys[:, c])
        values.append(jnp.zeros_like(value[:, 0]))
        block.append(c)
        landmark.append(True)
    E = len(keys)
    k = jnp.repeat(jnp.stack(keys, 1).astype(dtype), N // K, axis=2)  # [B, E, N, H]
    v = jnp.repeat(jnp.stack(values, 1).astype(dtype), N // K, axis=2)
    block = jnp.asarray(block)
    landmark = jnp.asarray(landmark)
    # Extended index of block c's landmark: after the block's min((c+1) bs, S) - c bs tokens
    # and the c earlier landmarks.
    landmark_index = jnp.asarray([min((c + 1) * block_size, S) + c for c in range(nb)])
    logits = jnp.einsum("btnh,benh->bnte", query.astype(dtype), k) * scale  # [B, N, T, E]

    i = jnp.arange(T)
    own = i // block_size  # [T]
    query_pos = i + own
    visible = (jnp.arange(E)[None, :] <= query_pos[:, None]) if is_causal else jnp.ones(
        (T, E), bool)
    own_landmark = landmark[None, :] & (block[None, :] == own[:, None])
    other_landmark = landmark[None, :] & ~own_landmark & visible  # [T, E]
    group = jnp.where(landmark[None, :], own[:, None], block[None, :])  # [T, E]
    allowed = jnp.broadcast_to(visible & ~own_landmark, (B, N, T, E))
    if top_k is not None:
        mine = logits[..., :, None]  # landmark e
        rival = logits[..., None, :]  # landmark e'
        earlier = jnp.arange(E)[None, :] < jnp.arange(E)[:, None]  # [e, e']: e' before e
        beats = other_landmark[:, None, :] & ((rival > mine) | ((rival == mine) & earlier))
        dropped = other_landmark & (beats.sum(-1) >= top_k)  # [B, N, T, E] landmarks
        # A block is dropped with its landmark: the landmark of token e's block is at the
        # extended index of the last entry of that block.
        dropped = dropped | (~landmark[None, :] & (block[None, :] != own[:, None])
                             & jnp.take(dropped, landmark_index[block], axis=-1))
        allowed = allowed & ~dropped

    # Grouped softmax: S[e] = exp(l[e]) / sum over allowed e' of the same group exp(l[e']).
    same = (group[:, :, None] == group[:, None, :]) & allowed[..., None, :]  # [B, N, T, E, E]
    peak = jnp.max(jnp.where(same, logits[..., None, :], -jnp.inf), axis=-1)
    peak = lax.stop_gradient(jnp.where(jnp.isfinite(peak), peak, 0))  # see _softmax_terms
    terms = jnp.where(same, jnp.exp(jnp.where(same, logits[..., None, :], peak[..., None])
                                    - peak[..., None]), 0)
    denominator = terms.sum(-1)
    probs = jnp.where(allowed, jnp.exp(jnp.where(allowed, logits, peak) - peak)
                      / jnp.where(denominator > 0, denominator, 1), 0)

    in_own_group = group == own[:, None]  # [T, E]
    gate = jnp.take(probs, landmark_index[block], axis=-1)  # S_i,landmark(e)
    weights = jnp.where(landmark[None, :], 0,
                        jnp.where(in_own_group, probs, probs * gate))
    return jnp.einsum("bnte,benv->btnv", weights, v).astype(query.dtype)



def favor_features(x, projection):
    """Performer's FAVOR+ positive random features, written from the definition.

    phi(x) = exp(W x' - |x'|^2 / 2) / sqrt(m) with x' = x / H^(1/4) and W = ``projection``
    [m, H]; no stabilisation. Pass ``feature_map=lambda x: favor_features(x, w)`` to
    :func:`linear_attention` for the reference of ``jattn.linear_attention(...,
    feature_map="favor+")`` with the same W.
    """
    h = x.shape[-1]
    scaled = x / h ** 0.25
    w = jnp.asarray(projection).astype(x.dtype)
    exponent = scaled @ w.T - 0.5 * (scaled ** 2).sum(-1, keepdims=True)
    return jnp.exp(exponent) / math.sqrt(w.shape[0])


def cosformer_attention(query, key, value, *, query_positions, key_positions, max_length,
                        is_causal=False, decay=None, normalize=True, eps=1e-6):
    """cosFormer attention with the cos re-weighting materialised from its definition.

    out_i = sum_j w_ij (relu(q_i) . relu(k_j)) v_j / (sum_j w_ij relu(q_i) . relu(k_j) + eps)
    with w_ij = cos(pi/2 (p_i - p_j) / M) times, when causal, [p_j <= p_i] gamma^(p_i - p_j).
    Positions are explicit (query_positions [T], key_positions [S], absolute), so a call that
    continues a sequence from a state is checked against this one on the whole key sequence.
    """
    query, key, value = (jnp.asarray(x) for x in (query, key, value))
    N, K = query.shape[2], key.shape[2]
    dtype = jnp.promote_types(query.dtype, jnp.float32)
    rq = jnp.maximum(query.astype(dtype), 0)
    rk = jnp.maximum(jnp.repeat(key.astype(dtype), N // K, axis=2), 0)
    v = jnp.repeat(value.astype(dtype), N // K, axis=2)
    pi = jnp.asarray(query_positions)[:, None]
    pj = jnp.asarray(key_positions)[None, :]
    weight = jnp.cos(jnp.pi / 2 * (pi - pj).astype(dtype) / max_length)[None]  # [1, T, S]
    if is_causal:
        gamma = jnp.ones((N,), dtype) if decay is None else jnp.asarray(decay).astype(dtype)
        seen = pj <= pi
        lag = jnp.where(seen, pi - pj, 0)
        weight = jnp.where(seen, weight * gamma[:, None, None] ** lag, 0)  # [N, T, S]
    scores = jnp.einsum("btnh,bsnh->bnts", rq, rk) * weight
    num = jnp.einsum("bnts,bsnv->btnv", scores, v)
    if normalize:
        num = num / (jnp.einsum("bnts->btn", scores) + eps)[..., None]
    return num.astype(query.dtype)


def routing_attention(query, key, value, state, *, num_clusters, window=None, is_causal=False,
                      update=False, decay=0.999, scale=None):
    """Routing Transformer attention from its definition: per cluster a dense [T, S] mask.

    Cluster c's member queries are those whose rank (by similarity of the unit query to the
    unit centroid, ties to the smaller position) is below w, likewise its keys; the cluster's
    mask is member query x member key (x key <= query when causal); a softmax attention under
    each cluster's mask, then each query averages the clusters in which it saw a key (zeros
    if none). The EMA update loops over centroid heads and clusters. Returns
    (output, state with new centroids).
    """
    query, key, value = (jnp.asarray(x) for x in (query, key, value))
    B, T, N, H = query.shape
    S, K = key.shape[1], key.shape[2]
    G = N // K
    C = num_clusters
    dtype = jnp.promote_types(query.dtype, jnp.float32)
    q, k, v = (x.astype(dtype) for x in (query, key, value))
    cent = jnp.asarray(state.centroids).astype(dtype)
    Hc = cent.shape[0]
    wq = math.ceil(T / C) if window is None else window
    wk = math.ceil(S / C) if window is None else window

    def unit(x):
        norm = jnp.sqrt(jnp.sum(x * x, axis=-1, keepdims=True))
        return jnp.where(norm > 0, x / jnp.where(norm > 0, norm, 1), 0)

    q_hat, k_hat, c_hat = unit(q), unit(k), unit(cent)
    # Centroid set of query head n: n itself (Hc == N) or its key/value head n // G.
    c_of_head = jnp.stack([c_hat[n if Hc == N else n // G] for n in range(N)])  # [N, C, H]
    k_hat_n = jnp.repeat(k_hat, G, axis=2)  # [B, S, N, H]

    def members(scores, w):  # scores [B, N, L] -> [B, N, L] bool, top-w by rank
        L = scores.shape[-1]
        i = jnp.arange(L)
        s_i, s_j = scores[..., :, None], scores[..., None, :]
        beaten = (s_j > s_i) | ((s_j == s_i) & (i[None, :] < i[:, None]))
        return beaten.sum(-1) < w

    total = jnp.zeros((B, T, N, value.shape[3]), dtype)
    count = jnp.zeros((B, T, N), dtype)
    for c in range(C):
        q_in = members(jnp.einsum("btnh,nh->bnt", q_hat, c_of_head[:, c]), wq)
        k_in = members(jnp.einsum("bsnh,nh->bns", k_hat_n, c_of_head[:, c]), wk)
        mask = q_in[..., :, None] & k_in[..., None, :]  # [B, N, T, S]
        if is_causal:
            mask &= jnp.arange(S)[None, :] <= jnp.arange(T)[:, None]
        out_c = dot_product_attention(q, k, v, mask=mask, scale=scale)
        saw = jnp.swapaxes(mask.any(-1), 1, 2).astype(dtype)  # [B, T, N]
        total = total + out_c * saw[..., None]
        count = count + saw
    out = (total / jnp.maximum(count, 1)[..., None]).astype(query.dtype)
    if not update:
        return out, state

    new = []
    for h in range(Hc):
        heads = [h] if Hc == N else list(range(h * G, (h + 1) * G))
        kv = h // G if Hc == N else h
        vectors = jnp.concatenate([q_hat[:, :, heads].reshape(-1, H),
                                   k_hat[:, :, kv].reshape(-1, H)])
        nearest = jnp.argmax(vectors @ c_hat[h].T, axis=-1)
        rows = []
        for c in range(C):
            chosen = (nearest == c)[:, None]
            n_chosen = chosen.sum()
            mean = jnp.where(chosen, vectors, 0).sum(0) / jnp.maximum(n_chosen, 1)
            moved = unit(decay * cent[h, c] + (1 - decay) * mean)
            rows.append(jnp.where(n_chosen > 0, moved, cent[h, c]))
        new.append(jnp.stack(rows))
    centroids = jnp.stack(new).astype(jnp.asarray(state.centroids).dtype)
    return out, state._replace(centroids=centroids)


def bilevel_routing_attention(query, key, value, *, region_size, topk, is_causal=False,
                              scale=None):
    """Bi-level routing attention (P59 BiFormer) as a dense boolean mask + softmax.

    Region of each position by loops over positions; region means as matrix products with
    the membership matrix; routing by a stable descending sort of the region affinities
    (summed over heads); the token mask is 'key region routed by the query's region' (and,
    causal 1-D, routed among regions before the query's by the prefix mean of its region's
    queries, own region always, key position <= query position). Same signature as
    :func:`jattn.bilevel.bilevel_routing_attention`.
    """
    import numpy as np

    query, key, value = (jnp.asarray(x) for x in (query, key, value))
    spatial, spatial_k = query.shape[1:-2], key.shape[1:-2]
    n = len(spatial)
    region = tuple(region_size) if isinstance(region_size, (tuple, list)) else (region_size,) * n
    B, N, H = query.shape[0], query.shape[-2], query.shape[-1]
    K, Hv = key.shape[-2], value.shape[-1]
    G = N // K
    L, S = math.prod(spatial), math.prod(spatial_k)

    def region_of(shape):
        grid = tuple(-(-s // r) for s, r in zip(shape, region, strict=True))
        ids = [int(np.ravel_multi_index(
            tuple(p // r for p, r in zip(pos, region, strict=True)), grid))
            for pos in np.ndindex(*shape)]
        return np.array(ids), math.prod(grid)

    rq, Rq = region_of(spatial)
    rk, Rk = region_of(spatial_k)
    member_q = np.zeros((L, Rq))
    member_q[np.arange(L), rq] = 1
    member_k = np.zeros((S, Rk))
    member_k[np.arange(S), rk] = 1
    dtype = jnp.promote_types(query.dtype, jnp.float32)
    q = query.reshape(B, L, N, H).astype(dtype)
    k_rep = jnp.repeat(key.reshape(B, S, K, H).astype(dtype), G, axis=2)
    k_mean = jnp.einsum("sr,bsnh->brnh", jnp.asarray(member_k / member_k.sum(0), dtype), k_rep)
    if not is_causal:
        q_mean = jnp.einsum("lr,blnh->brnh", jnp.asarray(member_q / member_q.sum(0), dtype), q)
        affinity = jnp.einsum("binh,bjnh->bij", q_mean, k_mean)
        order = jnp.argsort(-affinity, axis=-1, stable=True)
        routed = jax.nn.one_hot(order[..., :topk], Rk).sum(-2) > 0  # [B, Rq, Rk]
        mask = routed[:, rq][:, :, rk]  # [B, L, S]
    else:
        prefix = np.zeros((L, L))
        for t in range(L):
            members = [u for u in range(L) if rq[u] == rq[t] and u <= t]
            prefix[t, members] = 1.0 / len(members)
        q_prefix = jnp.einsum("tu,bunh->btnh", jnp.asarray(prefix, dtype), q)
        affinity = jnp.einsum("btnh,bjnh->btj", q_prefix, k_mean)  # [B, L, Rk]
        earlier = np.array([[j < rq[t] for j in range(Rk)] for t in range(L)])
        affinity = jnp.where(earlier, affinity, -jnp.inf)
        rank = jnp.argsort(jnp.argsort(-affinity, axis=-1, stable=True), axis=-1, stable=True)
        own = np.array([[j == rq[t] for j in range(Rk)] for t in range(L)])
        routed = (earlier & (rank < topk - 1)) | own  # [B, L, Rk]
        before = np.array([[s <= t for s in range(S)] for t in range(L)])
        mask = routed[:, :, rk] & before
    mask = jax.lax.stop_gradient(mask)[:, None]
    out = dot_product_attention(query.reshape(B, L, N, H), key.reshape(B, S, K, H),
                                value.reshape(B, S, K, Hv), mask=mask, scale=scale)
    return out.reshape(B, *spatial, N, Hv)


def longheads_attention(query, key, value, *, chunk_size, topk, scale=None,
                        summary="attention"):
    """LongHeads (P61) as a dense boolean mask + causal softmax, per query head.

    Chunk of each position t // chunk_size; summaries from the chunk membership matrix
    (attention-pooled: the chunk's mean query softmax-attends over the chunk's keys; or the
    mean key); candidates for query t are the chunks 1 .. chunk(t) - 1 (loops); the
    ``topk - 2`` best by a stable descending sort of q_t . c_j are kept with chunk 0 and
    chunk(t); the token mask adds key position <= query position. Same signature as
    :func:`jattn.longheads.longheads_attention`.
    """
    import numpy as np

    query, key, value = (jnp.asarray(x) for x in (query, key, value))
    _, T, N, H = query.shape
    K = key.shape[2]
    scale = H ** -0.5 if scale is None else scale
    dtype = jnp.promote_types(query.dtype, jnp.float32)
    q = query.astype(dtype)
    k = jnp.repeat(key.astype(dtype), N // K, axis=2)
    chunk = np.array([t // chunk_size for t in range(T)])
    m = int(chunk.max()) + 1
    member = np.zeros((T, m))
    member[np.arange(T), chunk] = 1
    mean_matrix = jnp.asarray(member / member.sum(0), dtype)
    if summary == "mean":
        summ = jnp.einsum("tm,btnh->bmnh", mean_matrix, k)
    else:
        q_mean = jnp.einsum("tm,btnh->bmnh", mean_matrix, q)
        logits = jnp.einsum("bmnh,btnh->bnmt", q_mean, k) * scale
        pool = jax.nn.softmax(jnp.where(member.T.astype(bool), logits, -jnp.inf), axis=-1)
        summ = jnp.einsum("bnmt,btnh->bmnh", pool, k)
    score = jnp.einsum("btnh,bmnh->bntm", q, summ)
    candidate = np.array([[1 <= j < chunk[t] for j in range(m)] for t in range(T)])
    score = jnp.where(candidate, score, -jnp.inf)
    rank = jnp.argsort(jnp.argsort(-score, axis=-1, stable=True), axis=-1, stable=True)
    always = np.array([[j == 0 or j == chunk[t] for j in range(m)] for t in range(T)])
    chosen = (candidate & (rank < topk - 2)) | always  # [B, N, T, m]
    before = np.array([[s <= t for s in range(T)] for t in range(T)])
    mask = jax.lax.stop_gradient(chosen[..., chunk] & before)
    return dot_product_attention(query, key, value, mask=mask, scale=scale)



def route_heads(routed_logits, *, topk, shared_logits=None, mix_logits=None):
    """Mixture-of-heads gates (P19) token by token: softmax over the routed heads, the topk
    largest kept by a stable descending sort, shared heads and the two-way mix by their own
    softmaxes; the load-balancing loss sum_j f_j P_j from its definition. Same signature as
    :func:`jattn.heads.route_heads`; returns (gates, routed_index, routed_probs, loss)."""
    r = jnp.asarray(routed_logits)
    dtype = jnp.promote_types(r.dtype, jnp.float32)
    probs = jax.nn.softmax(r.astype(dtype), axis=-1)
    order = jnp.argsort(-lax.stop_gradient(probs), axis=-1, stable=True)[..., :topk]
    rank = jnp.argsort(jnp.argsort(-lax.stop_gradient(probs), axis=-1, stable=True), axis=-1)
    chosen = rank < topk
    routed = jnp.where(chosen, probs, 0)
    if shared_logits is None:
        gates = routed
    else:
        alpha = jax.nn.softmax(jnp.asarray(mix_logits).astype(dtype), axis=-1)
        shared = jax.nn.softmax(jnp.asarray(shared_logits).astype(dtype), axis=-1)
        gates = jnp.concatenate([alpha[..., :1] * shared, alpha[..., 1:] * routed], axis=-1)
    tokens = chosen.shape[0] * chosen.shape[1]
    f = chosen.sum((0, 1)) / tokens
    P = probs.sum((0, 1)) / tokens
    return gates, jnp.asarray(order, jnp.int32), probs, jnp.sum(f * P)


def mixture_of_heads_attention(query, key, value, out_kernel, routing, *, is_causal=False,
                               scale=None, form="dense", capacity_factor=None):
    """Every head by :func:`dot_product_attention`, each weighted by its gate and projected
    by its slice of W_O, summed. With a ``capacity_factor`` ("dispatch"), a (token, routed
    head) pair is dropped when more than ceil(factor T topk / Nr) earlier tokens of the
    sequence selected that head (counted in a loop). Same signature as
    :func:`jattn.heads.mixture_of_heads_attention` (``form`` changes nothing else)."""
    import numpy as np

    del form
    gates, probs = routing[0], routing[2]
    B, T, N = gates.shape
    Nr = probs.shape[-1]
    heads = dot_product_attention(query, key, value, is_causal=is_causal, scale=scale)
    keep = np.ones((B, T, N), bool)
    if capacity_factor is not None:
        index = np.asarray(routing[1])
        cap = min(T, math.ceil(capacity_factor * T * index.shape[-1] / Nr))
        for b in range(B):
            taken = [0] * Nr
            for t in range(T):
                for j in index[b, t]:
                    taken[j] += 1
                    keep[b, t, N - Nr + j] = taken[j] <= cap
    dtype = heads.dtype
    w = jnp.where(keep, gates.astype(dtype), 0)
    return jnp.einsum("btnh,btn,nhd->btd", heads, w, jnp.asarray(out_kernel).astype(dtype))


def context_query_pooling(hidden, context, query_factors, key_factors, *, mask=None):
    """LAMA (P33) from its definition, one head at a time: f_{i,t} = tanh((c . p_i)(q_i . h_t)),
    f_t / ||f_t|| over the heads, softmax over the valid tokens, M = A H."""
    hidden, context = jnp.asarray(hidden), jnp.asarray(context)
    P, Q = jnp.asarray(query_factors), jnp.asarray(key_factors)
    dtype = jnp.promote_types(jnp.result_type(hidden, context, P, Q), jnp.float32)
    B, n, _ = hidden.shape
    h = hidden.astype(dtype)
    c = jnp.broadcast_to(context.astype(dtype), (B, context.shape[-1]))
    P, Q = P.astype(dtype), Q.astype(dtype)
    heads = Q.shape[1]
    f = jnp.stack([jnp.tanh(jnp.einsum("bc,c->b", c, P[:, i])[:, None]
                            * jnp.einsum("bnd,d->bn", h, Q[:, i])) for i in range(heads)],
                  axis=1)  # [B, k, n]
    squared = sum(f[:, i] ** 2 for i in range(heads))  # [B, n]
    norm = jnp.sqrt(jnp.where(squared > 0, squared, 1.0))
    f = jnp.where(squared[:, None] > 0, f / norm[:, None], 0.0)
    allowed = jnp.ones((B, n), bool) if mask is None else jnp.asarray(mask)
    rows = []
    for i in range(heads):  # |f| <= 1: exp cannot overflow, no max shift needed
        e = jnp.where(allowed, jnp.exp(f[:, i]), 0.0)
        total = e.sum(-1, keepdims=True)
        rows.append(e / jnp.where(total > 0, total, 1.0))
    attention = jnp.stack(rows, axis=1)  # [B, k, n]
    pooled = jnp.stack([jnp.einsum("bn,bnd->bd", attention[:, i], h) for i in range(heads)],
                       axis=1)
    return pooled.astype(hidden.dtype), attention.astype(hidden.dtype)


def window_mean(x, window, *, mask=None):
    """MQSA's (P38) L-query pooling through an explicit [T, T] band matrix:
    W[t, s] = m_s [t - L < s <= t], out = W x / rowsum(W) (0 for an empty row)."""
    x = jnp.asarray(x)
    T = x.shape[1]
    dtype = jnp.promote_types(x.dtype, jnp.float32)
    t = jnp.arange(T)[:, None]
    s = jnp.arange(T)[None, :]
    band = ((s <= t) & (s > t - window))[None]  # [1, T, T]
    if mask is not None:
        band = band & jnp.asarray(mask)[:, None, :]
    weights = band.astype(dtype)
    rowsum = weights.sum(-1, keepdims=True)
    out = jnp.einsum("bts,bsd->btd", weights, x.astype(dtype))
    return jnp.where(rowsum > 0, out / jnp.where(rowsum > 0, rowsum, 1.0), 0.0).astype(x.dtype)


def decoupled_target_attention(target_att, behaviour_att, behaviour_repr, *, topk, mask=None,
                               scale=None, return_weights=False):
    """DARE (P47) from its definition: dense scores, the top-k valid behaviours by a stable
    argsort rank (ties to the lower index), a dense masked softmax attention over the
    representation embeddings (``dot_product_attention`` with a boolean mask)."""
    a_t, a, r = (jnp.asarray(x) for x in (target_att, behaviour_att, behaviour_repr))
    B, n, d_att = a.shape
    dtype = jnp.promote_types(a_t.dtype, jnp.float32)
    scale = d_att ** -0.5 if scale is None else scale
    scores = jnp.einsum("bd,bnd->bn", a_t.astype(dtype), a.astype(dtype)) * scale
    valid = jnp.ones((B, n), bool) if mask is None else jnp.asarray(mask)
    if topk is None:
        selected = valid
    else:
        order = jnp.argsort(jnp.where(valid, -scores, jnp.inf), axis=1, stable=True)
        rank = jnp.argsort(order, axis=1, stable=True)  # rank[b, i]: place of i in the order
        selected = valid & (rank < topk)
    pooled = dot_product_attention(a_t[:, None, None, :].astype(dtype),
                                   a[:, :, None, :].astype(dtype),
                                   r[:, :, None, :].astype(dtype),
                                   mask=selected[:, None, None, :], scale=scale)
    pooled = pooled[:, 0, 0].astype(r.dtype)
    if not return_weights:
        return pooled
    return pooled, _masked_softmax(scores, selected).astype(a_t.dtype)


def relative_attention(query, key, value, relative_key, content_bias, *, position_bias=None,
                       distance_bias=None, is_causal=True, scale=None, query_offset=None):
    """Relative attention (P16 RCMHA / Transformer-XL) with the distance table gathered per
    (t, s) pair: logits = scale [(q_t + u) k_s + (q_t + v) r[d] + b[d]] with d = p_t - s,
    the position terms only for 0 <= d < R; keys with s > p_t masked when causal. Same
    signature as :func:`jattn.heads.relative_attention`."""
    import numpy as np

    query, key, value = (jnp.asarray(x) for x in (query, key, value))
    _, T, _, H = query.shape
    S = key.shape[1]
    dtype = jnp.promote_types(query.dtype, jnp.float32)
    q, k = query.astype(dtype), key.astype(dtype)
    r = jnp.asarray(relative_key).astype(dtype)
    R = r.shape[0]
    offset = S - T if query_offset is None else query_offset
    d = np.array([[t + offset - s for s in range(S)] for t in range(T)])
    inside = (d >= 0) & (d < R)
    r_ts = r[np.clip(d, 0, R - 1)] * inside[..., None, None]  # [T, S, N, H]
    qv = q if position_bias is None else q + jnp.asarray(position_bias).astype(dtype)
    logits = (jnp.einsum("btnh,bsnh->bnts", q + jnp.asarray(content_bias).astype(dtype), k)
              + jnp.einsum("btnh,tsnh->bnts", qv, r_ts))
    if distance_bias is not None:
        b = jnp.asarray(distance_bias).astype(dtype)[np.clip(d, 0, R - 1)]  # [T, S, N]
        logits = logits + jnp.moveaxis(b * inside[..., None], -1, 0)
    scale = H ** -0.5 if scale is None else scale
    allowed = d >= 0 if is_causal else np.ones((T, S), bool)
    logits = jnp.where(allowed, logits * scale, -jnp.inf)
    probs = jax.nn.softmax(logits, axis=-1)
    return jnp.einsum("bnts,bsnh->btnh", probs, value.astype(dtype)).astype(query.dtype)


# --------------------------------------------------------------------------------------------
# Matching and contrastive losses (jattn.matching: P02, P04, P20, P28/P39/P73, P30). Masks
# must be concrete here (they select rows with NumPy indexing).


def _matching_unit(x):
    """x / ||x|| written out (the references are not fed zero vectors)."""
    return x / jnp.sqrt(jnp.sum(x * x, axis=-1, keepdims=True))


def _matching_dtype(*arrays):
    return jnp.promote_types(jnp.result_type(*arrays), jnp.float32)


def filip_similarity(image_tokens, text_tokens, *, image_mask=None, text_mask=None,
                     normalize=True):
    """FILIP (P20) one (image, text) pair at a time: the valid tokens are selected, the
    [P_b, W_c] similarity matrix formed, its row maxima averaged (image-to-text) and its
    column maxima averaged (text-to-image); 0 when a side is empty."""
    import numpy as np

    from jattn.matching import FILIPSimilarity

    out_dtype = jnp.result_type(image_tokens, text_tokens)
    dtype = _matching_dtype(image_tokens, text_tokens)
    x, y = jnp.asarray(image_tokens, dtype), jnp.asarray(text_tokens, dtype)
    if normalize:
        x, y = _matching_unit(x), _matching_unit(y)
    B, P, _ = x.shape
    C, W, _ = y.shape
    pm = np.ones((B, P), bool) if image_mask is None else np.asarray(image_mask)
    wm = np.ones((C, W), bool) if text_mask is None else np.asarray(text_mask)
    i2t, t2i = [], []
    for b in range(B):
        row_i, row_t = [], []
        for c in range(C):
            s = x[b][np.flatnonzero(pm[b])] @ y[c][np.flatnonzero(wm[c])].T
            if s.size == 0:
                row_i.append(jnp.zeros((), dtype))
                row_t.append(jnp.zeros((), dtype))
            else:
                row_i.append(s.max(axis=1).mean())
                row_t.append(s.max(axis=0).mean())
        i2t.append(jnp.stack(row_i))
        t2i.append(jnp.stack(row_t))
    return FILIPSimilarity(jnp.stack(i2t).astype(out_dtype), jnp.stack(t2i).astype(out_dtype))


def _matching_cross_entropy_diagonal(logits):
    """-(1/B) sum_i log(exp(l_ii) / sum_j exp(l_ij)), the softmax written out."""
    rows = [jnp.log(jnp.exp(logits[i, i]) / jnp.sum(jnp.exp(logits[i])))
            for i in range(logits.shape[0])]
    return -sum(rows) / logits.shape[0]


def filip_loss(image_tokens, text_tokens, *, temperature, image_mask=None, text_mask=None,
               normalize=True):
    """FILIP's (P20) loss: image rows over texts with s^I, text rows over images with s^T."""
    s = filip_similarity(image_tokens, text_tokens, image_mask=image_mask,
                         text_mask=text_mask, normalize=normalize)
    dtype = _matching_dtype(s.image_to_text)
    i2t = s.image_to_text.astype(dtype) / temperature
    t2i = s.text_to_image.astype(dtype) / temperature
    return 0.5 * (_matching_cross_entropy_diagonal(i2t) + _matching_cross_entropy_diagonal(t2i.T))


def info_nce(a, b, *, temperature, normalize=True):
    """Symmetric InfoNCE (P28, P73) from the definition: each a_i against every b_j and each
    b_j against every a_i, the matching index the positive."""
    dtype = _matching_dtype(a, b)
    a, b = jnp.asarray(a, dtype), jnp.asarray(b, dtype)
    if normalize:
        a, b = _matching_unit(a), _matching_unit(b)
    B = a.shape[0]
    logits = jnp.stack([jnp.stack([jnp.dot(a[i], b[j]) for j in range(B)]) for i in range(B)])
    logits = logits / temperature
    return 0.5 * (_matching_cross_entropy_diagonal(logits)
                  + _matching_cross_entropy_diagonal(logits.T))


def bidirectional_ranking_loss(similarity, *, margin, hardest=False, reduction="mean"):
    """The bidirectional hinge loss (P39) with explicit loops over the negatives."""
    s = jnp.asarray(similarity, _matching_dtype(similarity))
    B = s.shape[0]
    per_pair = []
    for i in range(B):
        to_b = [jnp.maximum(margin - s[i, i] + s[i, j], 0) for j in range(B) if j != i]
        to_a = [jnp.maximum(margin - s[i, i] + s[j, i], 0) for j in range(B) if j != i]
        if not to_b:
            per_pair.append(jnp.zeros((), s.dtype))
        elif hardest:
            per_pair.append(jnp.max(jnp.stack(to_b)) + jnp.max(jnp.stack(to_a)))
        else:
            per_pair.append(sum(to_b) + sum(to_a))
    per_pair = jnp.stack(per_pair)
    if reduction == "none":
        return per_pair
    return per_pair.sum() if reduction == "sum" else per_pair.mean()


def conditional_transport(x, y, *, x_weights=None, y_weights=None, temperature=1.0,
                          similarity="cosine"):
    """PatchCT's (P02) CT from the formulas: weights normalised, navigators
    p_j exp(s_ij / tau) / sum_j' p_j' exp(s_ij' / tau) written out (zero-weight points
    dropped, their rows 0), cost 1 - cos."""
    from jattn.matching import ConditionalTransport

    dtype = _matching_dtype(x, y)
    x = jnp.asarray(x, dtype)
    B, P, D = x.shape
    y = jnp.broadcast_to(jnp.asarray(y, dtype), (B, y.shape[-2], D))
    L = y.shape[1]
    theta = (jnp.ones((B, P), dtype) if x_weights is None
             else jnp.broadcast_to(jnp.asarray(x_weights, dtype), (B, P)))
    p = (jnp.ones((B, L), dtype) if y_weights is None
         else jnp.broadcast_to(jnp.asarray(y_weights, dtype), (B, L)))
    theta = theta / jnp.sum(theta, -1, keepdims=True)
    p = p / jnp.sum(p, -1, keepdims=True)
    xu, yu = _matching_unit(x), _matching_unit(y)
    s = (jnp.einsum("bpd,bld->bpl", xu, yu) if similarity == "cosine"
         else jnp.einsum("bpd,bld->bpl", x, y))
    e = jnp.exp(s / temperature)
    fwd = p[:, None, :] * e
    fwd = fwd / jnp.sum(fwd, -1, keepdims=True)
    fwd = jnp.where(theta[:, :, None] > 0, fwd, 0)
    bwd = theta[:, None, :] * jnp.swapaxes(e, 1, 2)
    bwd = bwd / jnp.sum(bwd, -1, keepdims=True)
    bwd = jnp.where(p[:, :, None] > 0, bwd, 0)
    c = 1 - jnp.einsum("bpd,bld->bpl", xu, yu)
    forward_cost = jnp.sum(theta[:, :, None] * fwd * c, axis=(1, 2))
    backward_cost = jnp.sum(p[:, :, None] * bwd * jnp.swapaxes(c, 1, 2), axis=(1, 2))
    return ConditionalTransport(forward_cost + backward_cost, forward_cost, backward_cost,
                                fwd, bwd)


def similarity_weighted_aggregation(query, keys, values, *, mask=None, temperature=1.0,
                                    similarity="cosine", return_weights=False):
    """VQ-Font's (P04) aggregation: w = exp(s/tau) / sum exp(s/tau) over the valid members,
    out = sum_k w_k v_k (zeros for an empty set)."""
    dtype = _matching_dtype(query, keys, values)
    q, k = jnp.asarray(query, dtype), jnp.asarray(keys, dtype)
    v = jnp.asarray(values, dtype)
    if similarity == "cosine":
        q, k = _matching_unit(q), _matching_unit(k)
    s = jnp.einsum("bd,bkd->bk", q, k) / temperature
    valid = jnp.ones(s.shape, bool) if mask is None else jnp.asarray(mask)
    w = _masked_softmax(s, valid)
    out = jnp.einsum("bk,bk...->b...", w, v)
    out = out.astype(jnp.asarray(values).dtype)
    return (out, w) if return_weights else out


def iterative_cross_attention(query, context, *, num_steps, inverse_temperature,
                              regulator=None, modulation=None, value=None, context_mask=None,
                              query_mask=None, normalize=True):
    """RCAR's (P30) rounds unrolled: per round the cosine (or dot) scores of the modulated
    queries, times lambda, a written-out softmax over the valid context, the weighted
    values (normalised), then the regulator's update."""
    from jattn.matching import IterativeCrossAttention

    dtype = _matching_dtype(query, context)
    q0 = jnp.asarray(query, dtype)
    k = jnp.asarray(context, dtype)
    v = k if value is None else jnp.asarray(value, dtype)
    B, T, D = q0.shape
    lam = jnp.broadcast_to(jnp.asarray(inverse_temperature, dtype), (B, T))
    m = (jnp.ones((B, T, D), dtype) if modulation is None
         else jnp.broadcast_to(jnp.asarray(modulation, dtype), (B, T, D)))
    valid = (jnp.ones((B, k.shape[1]), bool) if context_mask is None
             else jnp.asarray(context_mask))
    if normalize:
        k = _matching_unit(k)

    def one_round(lam, m):
        q = q0 * m
        if normalize:
            q = _matching_unit(q)
        scores = lam[:, :, None] * jnp.einsum("btd,bsd->bts", q, k)
        e = jnp.where(valid[:, None, :], jnp.exp(scores - scores.max(-1, keepdims=True)), 0)
        total = e.sum(-1, keepdims=True)
        weights = jnp.where(total > 0, e / jnp.where(total > 0, total, 1), 0)
        out = jnp.einsum("bts,bsd->btd", weights, v)
        if normalize:
            norm = jnp.sqrt(jnp.sum(out * out, -1, keepdims=True))
            out = jnp.where(norm > 0, out / jnp.where(norm > 0, norm, 1), 0)
        if query_mask is not None:
            out = jnp.where(jnp.asarray(query_mask)[..., None], out, 0)
        return out

    for step in range(num_steps):
        lam, m = regulator(step, q0, one_round(lam, m), lam, m)
        lam, m = jnp.asarray(lam, dtype), jnp.asarray(m, dtype)
    return IterativeCrossAttention(one_round(lam, m).astype(jnp.asarray(query).dtype), lam, m)


# --------------------------------------------------------------------------------------------
# Channel and spatial attention (P49 ECA-Net, P26 Sentence Attention Blocks, P07 MPU-Net /
# DANet) and pointer networks (P67): plain definitions for jattn.channel and jattn.pointer.


def _ref_channel_means(x):
    dtype = jnp.promote_types(x.dtype, jnp.float32)
    flat = x.astype(dtype).reshape(x.shape[0], -1, x.shape[-1])
    return flat.sum(1) / flat.shape[1]


def _ref_rescale(x, weights):
    shape = (x.shape[0],) + (1,) * (x.ndim - 2) + (x.shape[-1],)
    return (x.astype(weights.dtype) * weights.reshape(shape)).astype(x.dtype)


def eca_kernel_size(channels, gamma=2, b=1):
    """|log2(C) / gamma + b / gamma|_odd: the odd number nearest to t, ties upwards."""
    t = abs(math.log2(channels) / gamma + b / gamma)
    low = 2 * math.floor((t - 1) / 2) + 1  # largest odd <= t
    return low if t - low < 1 else low + 2


def eca(x, conv_kernel):
    """x * sigmoid(y), y_c = sum_j w_j z_{c + j - (k-1)/2}, z the channel means (zero
    outside the channels): the convolution written as a loop over the taps."""
    z = _ref_channel_means(x)
    w = jnp.asarray(conv_kernel).astype(z.dtype)
    k, C = w.shape[0], z.shape[1]
    half = (k - 1) // 2
    y = jnp.zeros_like(z)
    for j in range(k):
        for c in range(C):
            source = c + j - half
            if 0 <= source < C:
                y = y.at[:, c].add(w[j] * z[:, source])
    return _ref_rescale(x, 1 / (1 + jnp.exp(-y)))


def squeeze_excitation(x, w1, b1, w2, b2):
    """x * sigmoid(W2^T relu(W1^T z + b1) + b2), z the channel means."""
    z = _ref_channel_means(x)
    h = jnp.einsum("bc,cr->br", z, jnp.asarray(w1).astype(z.dtype))
    if b1 is not None:
        h = h + jnp.asarray(b1).astype(z.dtype)
    s = jnp.einsum("br,rc->bc", jnp.maximum(h, 0), jnp.asarray(w2).astype(z.dtype))
    if b2 is not None:
        s = s + jnp.asarray(b2).astype(z.dtype)
    return _ref_rescale(x, 1 / (1 + jnp.exp(-s)))


def conditioned_channel_attention(x, sentence, w1, b1, w2, b2, *, norm_scale=None,
                                  norm_bias=None, gate="softmax", pool_image=False, eps=1e-5):
    """x * gate(W2^T relu(LN(W1^T u + b1)) + b2), u = the sentence (or [channel means;
    sentence]); softmax written as exp / sum."""
    dtype = jnp.promote_types(jnp.result_type(x.dtype, sentence.dtype), jnp.float32)
    u = jnp.asarray(sentence).astype(dtype)
    if pool_image:
        u = jnp.concatenate([_ref_channel_means(x).astype(dtype), u], axis=1)
    h = jnp.einsum("bd,dm->bm", u, jnp.asarray(w1).astype(dtype))
    if b1 is not None:
        h = h + jnp.asarray(b1).astype(dtype)
    if norm_scale is not None:
        M = h.shape[1]
        mean = h.sum(1, keepdims=True) / M
        var = ((h - mean) ** 2).sum(1, keepdims=True) / M
        h = ((h - mean) / jnp.sqrt(var + eps) * jnp.asarray(norm_scale).astype(dtype)
             + jnp.asarray(norm_bias).astype(dtype))
    a = jnp.einsum("bm,mc->bc", jnp.maximum(h, 0), jnp.asarray(w2).astype(dtype))
    if b2 is not None:
        a = a + jnp.asarray(b2).astype(dtype)
    if gate == "softmax":
        e = jnp.exp(a - a.max(1, keepdims=True))
        a = e / e.sum(1, keepdims=True)
    else:
        a = 1 / (1 + jnp.exp(-a))
    return _ref_rescale(x, a)


def position_attention(x, wq, wk, wv, gamma, *, bq=None, bk=None, bv=None, scale=1.0):
    """DANet PAM: out_j = gamma sum_i softmax_i(scale q_j . k_i) v_i + x_j over the
    flattened positions, the softmax written out (no attention helper)."""
    dtype = jnp.promote_types(x.dtype, jnp.float32)
    B, C = x.shape[0], x.shape[-1]
    a = x.astype(dtype).reshape(B, -1, C)

    def project(w, b):
        y = jnp.einsum("blc,cd->bld", a, jnp.asarray(w).astype(dtype))
        return y if b is None else y + jnp.asarray(b).astype(dtype)

    q, k, v = project(wq, bq), project(wk, bk), project(wv, bv)
    energy = jnp.einsum("bjd,bid->bji", q, k) * scale
    e = jnp.exp(energy - energy.max(-1, keepdims=True))
    attention = e / e.sum(-1, keepdims=True)
    out = jnp.asarray(gamma).astype(dtype) * jnp.einsum("bji,bic->bjc", attention, v) + a
    return out.reshape(x.shape).astype(x.dtype)


def channel_attention(x, gamma, *, form="paper"):
    """DANet CAM: E = A A^T over channels; softmax_i(E_ji) (paper) or softmax_i(max_i' E_ji'
    - E_ji) (the public code); out_j = gamma sum_i att_ji A_i + A_j."""
    dtype = jnp.promote_types(x.dtype, jnp.float32)
    B, C = x.shape[0], x.shape[-1]
    a = jnp.swapaxes(x.astype(dtype).reshape(B, -1, C), 1, 2)  # [B, C, L]
    energy = jnp.einsum("bjl,bil->bji", a, a)
    if form == "max_minus":
        energy = energy.max(-1, keepdims=True) - energy
    e = jnp.exp(energy - energy.max(-1, keepdims=True))
    attention = e / e.sum(-1, keepdims=True)
    out = jnp.asarray(gamma).astype(dtype) * jnp.einsum("bji,bil->bjl", attention, a) + a
    return jnp.swapaxes(out, 1, 2).reshape(x.shape).astype(x.dtype)


def additive_scores(query, keys, w_q, w_k, v):
    """u[b, i, j] = v . tanh(W_k^T k_j + W_q^T q_i), one (i, j) pair at a time."""
    dtype = jnp.promote_types(jnp.result_type(query.dtype, keys.dtype), jnp.float32)
    q, k = jnp.asarray(query).astype(dtype), jnp.asarray(keys).astype(dtype)
    w_q, w_k, v = (jnp.asarray(a).astype(dtype) for a in (w_q, w_k, v))
    T, S = q.shape[1], k.shape[1]
    rows = []
    for i in range(T):
        rows.append(jnp.stack([jnp.tanh(k[:, j] @ w_k + q[:, i] @ w_q) @ v for j in range(S)],
                              axis=-1))
    return jnp.stack(rows, axis=1)


def pointer_distribution(scores, *, mask=None, chosen=None):
    """log softmax over the allowed positions (valid by mask, not chosen at an earlier step),
    -inf elsewhere; a step with nothing allowed is all -inf. The allowed set is built with
    Python loops."""
    import numpy as np

    scores = jnp.asarray(scores)
    B, T, S = scores.shape
    allowed = np.ones((B, T, S), bool)
    if mask is not None:
        m = np.asarray(mask)
        allowed &= m[:, None, :] if m.ndim == 2 else m
    if chosen is not None:
        c = np.asarray(chosen)
        for b in range(B):
            for t in range(T):
                for earlier in range(t):
                    if c[b, earlier] >= 0:
                        allowed[b, t, c[b, earlier]] = False
    logits = scores.astype(jnp.promote_types(scores.dtype, jnp.float32))
    safe = jnp.where(allowed, logits, -jnp.inf)
    top = jnp.where(allowed.any(-1, keepdims=True), safe.max(-1, keepdims=True), 0)
    total = jnp.where(allowed, jnp.exp(safe - top), 0).sum(-1, keepdims=True)
    log_probs = logits - top - jnp.log(jnp.where(total > 0, total, 1))
    return jnp.where(allowed, log_probs, -jnp.inf)


# --------------------------------------------------------------------------------------------
# jattn.fusion (P05, P08, P10, P11, P18, P55): written from the papers' definitions


def _fusion_attend(q, k, v, allowed, scale, bias=None):
    """Explicit softmax attention: q [B, T, N, H], k [B, S, K, H], v [B, S, K, Hv], allowed
    bool broadcastable to [B, N, T, S]; GQA by repeating K/V; empty rows give zeros."""
    dtype = jnp.promote_types(q.dtype, jnp.float32)
    N, K = q.shape[2], k.shape[2]
    k = jnp.repeat(k.astype(dtype), N // K, axis=2)
    v = jnp.repeat(v.astype(dtype), N // K, axis=2)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    logits = jnp.einsum("btnh,bsnh->bnts", q.astype(dtype), k) * scale
    if bias is not None:
        logits = logits + bias.astype(dtype)
    allowed = jnp.broadcast_to(allowed, logits.shape)
    out, _ = _masked_softmax_average(logits, allowed, v)
    return out.astype(q.dtype)


def cls_cross_attention(cls_query, cls_key, cls_value, patch_key, patch_value, *,
                        patch_mask=None, scale=None):
    """CrossViT: the CLS query over the keys [patches..., cls] (the CLS put last here)."""
    B, S = patch_key.shape[:2]
    k, v = patch_key, patch_value
    allowed = jnp.ones((B, S), bool) if patch_mask is None else patch_mask
    if cls_key is not None:
        k = jnp.concatenate([k, cls_key[:, None]], axis=1)
        v = jnp.concatenate([v, cls_value[:, None]], axis=1)
        allowed = jnp.concatenate([allowed, jnp.ones((B, 1), bool)], axis=1)
    return _fusion_attend(cls_query[:, None], k, v, allowed[:, None, None, :], scale)[:, 0]


def attention_rollout(attention_maps, *, residual=0.5, head_reduction="mean"):
    """prod_l rownorm((1 - r) reduce_heads(A_l) + r I), the last layer on the left."""
    maps = [jnp.asarray(a) for a in attention_maps]
    dtype = jnp.promote_types(maps[0].dtype, jnp.float32)
    T = maps[0].shape[-1]
    mixed = []
    for a in maps:
        a = a.astype(dtype)
        a = a.mean(1) if head_reduction == "mean" else a.max(1)
        a = (1 - residual) * a + residual * jnp.eye(T, dtype=dtype)
        row = a.sum(-1, keepdims=True)
        mixed.append(a / jnp.where(row == 0, 1, row))
    result = mixed[0]
    for a in mixed[1:]:
        result = jnp.matmul(a, result)
    return result


def global_local_cross_attention(query, key, value, scores, *, top_r, kv_mask=None,
                                 scale=None):
    """Sort the scores (stable, descending), keep the first R query rows, attend to all."""
    B, S = key.shape[:2]
    order = jnp.argsort(-scores.astype(jnp.float32), axis=1, stable=True)[:, :top_r]
    local = jnp.stack([query[b, order[b]] for b in range(B)])
    allowed = jnp.ones((B, S), bool) if kv_mask is None else kv_mask
    return _fusion_attend(local, key, value, allowed[:, None, None, :], scale), order


def appended_kv_attention(query, key, value, extra_key, extra_value, *, mask=None,
                          extra_mask=None, is_causal=False, scale=None):
    """Keys [own; external] (external put last here), own keys masked by mask and causal."""
    B, T, N = query.shape[:3]
    S, E = key.shape[1], extra_key.shape[1]
    own = jnp.ones((B, N, T, S), bool)
    if is_causal:
        own &= jnp.arange(S)[None, :] <= jnp.arange(T)[:, None]
    if isinstance(mask, Mask):
        own &= mask.materialize(T, S)
    elif mask is not None:
        own &= left_pad_rank(jnp.asarray(mask), 4)
    ext = jnp.ones((B, N, T, E), bool)
    if extra_mask is not None:
        ext &= extra_mask[:, None, None, :]
    k = jnp.concatenate([key, extra_key], axis=1)
    v = jnp.concatenate([value, extra_value], axis=1)
    return _fusion_attend(query, k, v, jnp.concatenate([own, ext], axis=-1), scale)


def pairwise_cross_attention(query, key, value, partner, *, mask=None, kv_mask=None,
                             scale=None):
    """Example by example: K_c = [K_b; K_partner(b)], V_c likewise."""
    B, T, N = query.shape[:3]
    S = key.shape[1]
    outs = []
    for b in range(B):
        p = int(partner[b])
        own = jnp.ones((1, N, T, S), bool)
        if mask is not None:
            m = mask.materialize(T, S) if isinstance(mask, Mask) else left_pad_rank(
                jnp.asarray(mask), 4)
            own &= m[b if m.shape[0] > 1 else 0][None]
        if kv_mask is not None:
            own &= kv_mask[b][None, None, None, :]
        other = jnp.ones((1, N, T, S), bool)
        if kv_mask is not None:
            other &= kv_mask[p][None, None, None, :]
        k = jnp.concatenate([key[b], key[p]])[None]
        v = jnp.concatenate([value[b], value[p]])[None]
        outs.append(_fusion_attend(query[b][None], k, v,
                                   jnp.concatenate([own, other], axis=-1), scale)[0])
    return jnp.stack(outs)


def cross_frame_attention(query, key, value, *, frames=("first", "previous"), extra_key=None,
                          extra_value=None, extra_mask=None, extra_frames="first", scale=None):
    """The whole video as one sequence of F * L tokens: token (f, l) may see token (g, m) when
    g is one of f's source frames (each frame once); the injected tokens are extra columns."""
    import numpy as np

    B, F, L, N = query.shape[:4]
    sources = {"first": lambda f: 0, "previous": lambda f: max(f - 1, 0), "self": lambda f: f}
    allowed = np.zeros((F * L, F * L), bool)
    for f in range(F):
        for g in {sources[name](f) for name in frames}:
            allowed[f * L:(f + 1) * L, g * L:(g + 1) * L] = True
    flat = [x.reshape(B, F * L, *x.shape[3:]) for x in (query, key, value)]
    allowed = jnp.broadcast_to(jnp.asarray(allowed), (B, N, F * L, F * L))
    k, v = flat[1], flat[2]
    if extra_key is not None:
        E = extra_key.shape[1]
        ext = np.zeros((F * L, E), bool)
        for f in range(F):
            if extra_frames == "all" or f == 0:
                ext[f * L:(f + 1) * L] = True
        ext = jnp.broadcast_to(jnp.asarray(ext), (B, N, F * L, E))
        if extra_mask is not None:
            ext = ext & extra_mask[:, None, None, :]
        allowed = jnp.concatenate([allowed, ext], axis=-1)
        k = jnp.concatenate([k, extra_key], axis=1)
        v = jnp.concatenate([v, extra_value], axis=1)
    out = _fusion_attend(flat[0], k, v, allowed, scale)
    return out.reshape(B, F, L, N, -1)


def attribute_conditioned_attention(query, key, value, attribute_query, attribute_key=None,
                                    *, mask=None, is_causal=False, scale=None):
    """Logits expanded: q.k + q.a_k + a_q.k + a_q.a_k, then the masked softmax."""
    B, T, N, H = query.shape
    S, K = key.shape[1:3]
    dtype = jnp.promote_types(query.dtype, jnp.float32)
    q = query.astype(dtype)
    k = jnp.repeat(key.astype(dtype), N // K, axis=2)
    aq = attribute_query.astype(dtype)
    ak = (jnp.zeros((B, K, H), dtype) if attribute_key is None
          else attribute_key.astype(dtype))
    ak = jnp.repeat(ak, N // K, axis=1)
    logits = (jnp.einsum("btnh,bsnh->bnts", q, k) + jnp.einsum("btnh,bnh->bnt", q, ak)[..., None]
              + jnp.einsum("bnh,bsnh->bns", aq, k)[:, :, None, :]
              + jnp.einsum("bnh,bnh->bn", aq, ak)[:, :, None, None])
    logits = logits * (H ** -0.5 if scale is None else scale)
    allowed = jnp.ones((B, N, T, S), bool)
    if is_causal:
        allowed &= jnp.arange(S)[None, :] <= jnp.arange(T)[:, None]
    if isinstance(mask, Mask):
        allowed &= mask.materialize(T, S)
    elif mask is not None:
        allowed &= left_pad_rank(jnp.asarray(mask), 4)
    v = jnp.repeat(value.astype(dtype), N // K, axis=2)
    out, _ = _masked_softmax_average(logits, allowed, v)
    return out.astype(query.dtype)


def region_pooling(features, masks):
    """Features repeated onto the pixel grid, then the mask-weighted pixel average."""
    dtype = jnp.promote_types(features.dtype, jnp.float32)
    f = features.astype(dtype)
    m = masks.astype(dtype)
    if features.ndim == 4:
        h, w = features.shape[1:3]
        Hm, Wm = masks.shape[2:]
        f = jnp.repeat(jnp.repeat(f, Hm // h, axis=1), Wm // w, axis=2)  # [B, Hm, Wm, D]
        f = f.reshape(f.shape[0], -1, f.shape[-1])
        m = m.reshape(*m.shape[:2], -1)
    total = m.sum(-1)
    tokens = jnp.einsum("bmp,bpd->bmd", m, f) / jnp.where(total == 0, 1, total)[..., None]
    return tokens.astype(features.dtype), total > 0


# --------------------------------------------------------------------------------------------
# jattn.structure (P12, P14, P29)


def graph_attention(query, key, value, adjacency, *, edge_types=None, edge_type_table=None,
                    self_loops=True, is_causal=False, scale=None):
    """Allowed: the adjacency (| identity), & causal; bias table[edge type] per head."""
    B, T, N = query.shape[:3]
    S = key.shape[1]
    allowed = jnp.broadcast_to(jnp.asarray(adjacency), (B, T, S))
    if self_loops:
        allowed = allowed | (jnp.arange(T)[:, None] == jnp.arange(S)[None, :])
    if is_causal:
        allowed = allowed & (jnp.arange(S)[None, :] <= jnp.arange(T)[:, None])
    bias = None
    if edge_types is not None:
        types = jnp.broadcast_to(jnp.asarray(edge_types), (B, T, S))
        bias = jnp.stack([edge_type_table[types, n] for n in range(N)], axis=1)
    return _fusion_attend(query, key, value, allowed[:, None], scale, bias)


def relation_aware_attention(query, key, value, pairwise, weight, bias=None, *, mask=None,
                             is_causal=False, scale=None):
    """bias[b, n, t, s] = pairwise[b, t, s] . weight[:, n] + c_n, then masked softmax."""
    B, T, N = query.shape[:3]
    S = key.shape[1]
    dtype = jnp.promote_types(pairwise.dtype, jnp.float32)
    head_bias = jnp.transpose(pairwise.astype(dtype) @ weight.astype(dtype), (0, 3, 1, 2))
    if bias is not None:
        head_bias = head_bias + bias.astype(dtype).reshape(1, N, 1, 1)
    allowed = jnp.ones((B, N, T, S), bool)
    if is_causal:
        allowed &= jnp.arange(S)[None, :] <= jnp.arange(T)[:, None]
    if isinstance(mask, Mask):
        allowed &= mask.materialize(T, S)
    elif mask is not None:
        allowed &= left_pad_rank(jnp.asarray(mask), 4)
    return _fusion_attend(query, key, value, allowed, scale, head_bias)


def box_pair_features(query_boxes, key_boxes, *, box_format="xyxy", kind="signed",
                      embed_dim=None, eps=1e-3):
    """Centres and sizes, then the four relative quantities per pair (and their sinusoids)."""
    dtype = jnp.promote_types(query_boxes.dtype, jnp.float32)

    def centre_size(b):
        b = b.astype(dtype)
        if box_format == "cxcywh":
            return b[..., :2], jnp.maximum(b[..., 2:], eps)
        return 0.5 * (b[..., :2] + b[..., 2:]), jnp.maximum(b[..., 2:] - b[..., :2], eps)

    qc, qs = centre_size(query_boxes)
    kc, ks = centre_size(key_boxes)
    delta = kc[:, None, :, :] - qc[:, :, None, :]  # [B, T, S, 2]
    size = qs[:, :, None, :]
    if kind == "signed":
        position = delta / size
    else:
        position = jnp.log(jnp.maximum(jnp.abs(delta), eps) / size)
    features = jnp.concatenate([position, jnp.log(ks[:, None, :, :] / size)], axis=-1)
    if embed_dim is None:
        return features
    d = embed_dim // 4
    rates = 1000.0 ** (-jnp.arange(0, d, 2, dtype=dtype) / d)
    angles = 100.0 * features[..., None] * rates  # [B, T, S, 4, d / 2]
    pairs = jnp.stack([jnp.sin(angles), jnp.cos(angles)], axis=-1)
    return pairs.reshape(*features.shape[:-1], embed_dim)


def box_relative_attention(query, key, value, query_boxes, key_boxes, weight, bias=None, *,
                           box_format="xyxy", kind="signed", embed_dim=None, mask=None,
                           is_causal=False, scale=None):
    """relation_aware_attention with the box pair features."""
    features = box_pair_features(query_boxes, key_boxes, box_format=box_format, kind=kind,
                                 embed_dim=embed_dim)
    return relation_aware_attention(query, key, value, features, weight, bias, mask=mask,
                                    is_causal=is_causal, scale=scale)


# --------------------------------------------------------------------------------------------
# Cross attention between sets (P01, P15, P58, P71, P77 label/query attention; P36, P14
# co-attention; P06, P60, P13 latent and multi-level cross attention; P34 pair encoding):
# plain definitions for jattn.cross, every softmax written out on the dense score matrix.


def label_attention(label_queries, features, values=None, *, num_heads=1, mask=None,
                    label_mask=None, scale=None, return_weights=False):
    """P77/P15/P58: per head n, A = softmax_s(scale q_l . f_s) over the valid features (and
    valid labels), o_l = sum_s A_ls v_s, heads concatenated."""
    f = jnp.asarray(features)
    dtype = jnp.promote_types(f.dtype, jnp.float32)
    B, S, D = f.shape
    v = f if values is None else jnp.asarray(values)
    q = jnp.broadcast_to(jnp.asarray(label_queries), (B, label_queries.shape[-2], D))
    L, N = q.shape[1], num_heads
    H, Hv = D // N, v.shape[-1] // N
    qh = q.astype(dtype).reshape(B, L, N, H)
    kh = f.astype(dtype).reshape(B, S, N, H)
    vh = v.astype(dtype).reshape(B, S, N, Hv)
    scale = H ** -0.5 if scale is None else scale
    logits = scale * jnp.einsum("blnh,bsnh->bnls", qh, kh)
    allowed = jnp.ones((B, N, L, S), bool)
    if mask is not None:
        allowed = allowed & jnp.asarray(mask)[:, None, None, :]
    if label_mask is not None:
        allowed = allowed & jnp.broadcast_to(jnp.asarray(label_mask), (B, L))[:, None, :, None]
    w = _masked_softmax(logits, allowed)
    pooled = jnp.einsum("bnls,bsnh->blnh", w, vh).reshape(B, L, N * Hv).astype(f.dtype)
    return (pooled, w) if return_weights else pooled


def label_logits(pooled, weight, bias=None):
    """y_l = w_l . o_l (+ b_l), or one shared w (+ b)."""
    pooled = jnp.asarray(pooled)
    dtype = jnp.promote_types(pooled.dtype, jnp.float32)
    w = jnp.asarray(weight, dtype)
    if w.ndim == 1:
        w = jnp.broadcast_to(w, pooled.shape[1:])
    y = jnp.einsum("bld,ld->bl", pooled.astype(dtype), w)
    if bias is not None:
        y = y + jnp.asarray(bias, dtype)
    return y.astype(pooled.dtype)


def co_attention(a, b, value_a=None, value_b=None, *, a_mask=None, b_mask=None, scale=None,
                 return_weights=False):
    """P36/P14 parallel co-attention: ONE affinity C = scale a b^T per head; a reads b with
    C's rows normalised, b reads a with C's columns normalised."""
    a, b = jnp.asarray(a), jnp.asarray(b)
    rank = a.ndim
    dtype = jnp.promote_types(a.dtype, jnp.float32)

    def heads(x):
        x = jnp.asarray(x)
        return (x[:, :, None, :] if x.ndim == 3 else x).astype(dtype)

    qa, qb = heads(a), heads(b)
    va = qa if value_a is None else heads(value_a)
    vb = qb if value_b is None else heads(value_b)
    B, Ta, _, H = qa.shape
    Tb = qb.shape[1]
    scale = H ** -0.5 if scale is None else scale
    C = scale * jnp.einsum("binh,bjnh->bnij", qa, qb)  # [B, N, Ta, Tb]
    am = jnp.ones((B, Ta), bool) if a_mask is None else jnp.asarray(a_mask)
    bm = jnp.ones((B, Tb), bool) if b_mask is None else jnp.asarray(b_mask)
    allowed = am[:, None, :, None] & bm[:, None, None, :]
    w_ab = _masked_softmax(C, allowed)
    # the column softmax of the same C, written on C itself and transposed afterwards
    w_ba = jnp.swapaxes(_masked_softmax(C, allowed, axis=2), 2, 3)  # [B, N, Tb, Ta]
    out_a = jnp.einsum("bnij,bjnh->binh", w_ab, vb).astype(a.dtype)
    out_b = jnp.einsum("bnji,binh->bjnh", w_ba, va).astype(a.dtype)
    if rank == 3:
        out_a, out_b = out_a[:, :, 0], out_b[:, :, 0]
    return (out_a, out_b, w_ab, w_ba) if return_weights else (out_a, out_b)


def latent_cross_attention(latents, keys, values, *, mask=None, latent_keys=None,
                           latent_values=None, scale=None):
    """P06/P60/P13: latents z_m attend to the inputs (and, Flamingo, to the latents' own
    keys/values appended): softmax over the materialised [inputs; latents] keys."""
    keys, values = jnp.asarray(keys), jnp.asarray(values)
    dtype = jnp.promote_types(keys.dtype, jnp.float32)
    B, S, K, H = keys.shape
    z = jnp.broadcast_to(jnp.asarray(latents), (B, *jnp.shape(latents)[-3:])).astype(dtype)
    M, N = z.shape[1], z.shape[2]
    k, v = keys.astype(dtype), values.astype(dtype)
    valid = jnp.ones((B, S), bool) if mask is None else jnp.asarray(mask)
    if latent_keys is not None:
        lk = jnp.broadcast_to(jnp.asarray(latent_keys), (B, M, K, H)).astype(dtype)
        lv = jnp.broadcast_to(jnp.asarray(latent_values), (B, M, K, v.shape[-1])).astype(dtype)
        k, v = jnp.concatenate([k, lk], 1), jnp.concatenate([v, lv], 1)
        valid = jnp.concatenate([valid, jnp.ones((B, M), bool)], 1)
    k, v = jnp.repeat(k, N // K, axis=2), jnp.repeat(v, N // K, axis=2)
    scale = H ** -0.5 if scale is None else scale
    logits = scale * jnp.einsum("bmnh,bjnh->bnmj", z, k)
    w = _masked_softmax(logits, jnp.broadcast_to(valid[:, None, None, :], logits.shape))
    return jnp.einsum("bnmj,bjnh->bmnh", w, v).astype(keys.dtype)


def multi_level_cross_attention(query, keys, values, *, masks=None, combine="joint",
                                scale=None):
    """P60/P13: "joint" = one softmax over all levels' keys concatenated; "sum" = one softmax
    per level, outputs added."""
    query = jnp.asarray(query)
    dtype = jnp.promote_types(query.dtype, jnp.float32)
    _, _, N, H = query.shape
    masks = [None] * len(keys) if masks is None else list(masks)
    scale = H ** -0.5 if scale is None else scale
    q = query.astype(dtype)
    parts = []
    for k, v, m in zip(keys, values, masks, strict=True):
        k, v = jnp.asarray(k, dtype), jnp.asarray(v, dtype)
        g = N // k.shape[2]
        parts.append((jnp.repeat(k, g, 2), jnp.repeat(v, g, 2),
                      jnp.ones(k.shape[:2], bool) if m is None else jnp.asarray(m)))

    def attend(k, v, valid):
        logits = scale * jnp.einsum("btnh,bsnh->bnts", q, k)
        w = _masked_softmax(logits, jnp.broadcast_to(valid[:, None, None, :],
                                                         logits.shape))
        return jnp.einsum("bnts,bsnh->btnh", w, v)

    if combine == "sum":
        out = sum(attend(*p) for p in parts)
    else:
        out = attend(*(jnp.concatenate([p[i] for p in parts], 1) for i in range(3)))
    return out.astype(query.dtype)


def pair_mask(segment_ids, *, mode="cross"):
    """P34: cross: M_ij = real(i) and real(j); bi: also same sentence."""
    s = jnp.asarray(segment_ids)
    i, j = s[:, :, None], s[:, None, :]
    allowed = (i >= 0) & (j >= 0)
    if mode == "bi":
        allowed = allowed & (i == j)
    return allowed[:, None]


def cross_encoder_score(hidden, weight, bias=None, *, segment_ids=None, pooling="first"):
    """P34: w . pool(h) + b with pool = first real token or mean of the real tokens."""
    h = jnp.asarray(hidden)
    dtype = jnp.promote_types(h.dtype, jnp.float32)
    h = h.astype(dtype)
    B, L, _ = h.shape
    real = jnp.ones((B, L), bool) if segment_ids is None else jnp.asarray(segment_ids) >= 0
    if pooling == "mean":
        pooled = (h * real[..., None]).sum(1) / real.sum(1, keepdims=True)
    else:
        first = jnp.argmax(real, axis=1)
        pooled = h[jnp.arange(B), first]
    y = pooled @ jnp.asarray(weight, dtype)
    return y if bias is None else y + jnp.asarray(bias, dtype)


def bi_encoder_score(hidden, segment_ids, *, eps=1e-8):
    """P34: cos(mean of sentence a's states, mean of sentence b's states)."""
    h = jnp.asarray(hidden)
    h = h.astype(jnp.promote_types(h.dtype, jnp.float32))
    s = jnp.asarray(segment_ids)

    def mean(sid):
        w = (s == sid)[..., None].astype(h.dtype)
        return (h * w).sum(1) / jnp.maximum(w.sum(1), 1)

    ha, hb = mean(0), mean(1)
    na = jnp.maximum(jnp.linalg.norm(ha, axis=-1), eps)
    nb = jnp.maximum(jnp.linalg.norm(hb, axis=-1), eps)
    return (ha * hb).sum(-1) / (na * nb)


def neural_memory(params, x, *, chunk_size=1, initial_state=None, retrieve="after",
                  max_grad_norm=None):
    """Titans neural memory (P37), one token at a time from the paper's equations:
    S_t = eta_t S_{t-1} - theta_t grad ||M(k_t) - v_t||^2, M_t = (1 - alpha_t) M_{t-1} + S_t,
    y_t = M_t(q_t) (``retrieve="after"``) or M_{t-1}(q_t) ("before").

    The gradient of token t is taken at the weights the memory had before the first token of
    t's chunk (chunk_size = 1: at M_{t-1}, the plain recurrence; chunk_size = c: frozen per
    chunk, paper Eqs. 16-18). A Python loop over tokens, weights with leading [B, N] axes,
    ``jax.grad`` of the summed inner loss (each (b, n) weight set only meets its own loss).

    Args: as :func:`jattn.memory.neural_memory` (``params`` a NeuralMemoryParams, ``x``
    [B, T, D], ``initial_state`` a NeuralMemoryState or None).

    Returns:
        (y [B, T, N, H] in x's dtype, final weight leaves, final momentum leaves, final
        convolution history or None); leaves in MemoryWeights order (matrices, scale, bias).
    """
    cfg = params.config
    x = jnp.asarray(x)
    dtype = jnp.promote_types(x.dtype, jnp.float32)
    B, T, _ = x.shape
    N, H = cfg.num_heads, cfg.head_dim
    xf = x.astype(dtype)
    f = lambda a: None if a is None else jnp.asarray(a, dtype)  # noqa: E731

    # Projections, causal depthwise convolution (last tap on the current token), SiLU, l2.
    u = jnp.concatenate([xf @ f(params.w_q), xf @ f(params.w_k), xf @ f(params.w_v)], -1)
    conv_out = None
    if params.conv is not None:
        kernel = f(params.conv)
        width = kernel.shape[0] - 1
        hist = (jnp.zeros((B, width, u.shape[-1]), dtype) if initial_state is None
                else f(initial_state.conv))
        full = jnp.concatenate([hist, u], 1)
        u = sum(kernel[j] * full[:, j:j + T] for j in range(width + 1))
        conv_out = full[:, full.shape[1] - width:]
    if cfg.activation == "silu":
        u = u * jax.nn.sigmoid(u)
    q, k, v = (u[..., i * N * H:(i + 1) * N * H].reshape(B, T, N, H) for i in range(3))
    if cfg.normalize_qk:
        q = q / jnp.sqrt(jnp.sum(q * q, -1, keepdims=True) + 1e-6)
        k = k / jnp.sqrt(jnp.sum(k * k, -1, keepdims=True) + 1e-6)
    theta = cfg.max_lr * jax.nn.sigmoid(xf @ f(params.w_lr) + f(params.b_lr))
    eta = (jax.nn.sigmoid(xf @ f(params.w_momentum) + f(params.b_momentum))
           if params.w_momentum is not None else jnp.zeros((B, T, N), dtype))
    alpha = (jax.nn.sigmoid(jnp.einsum("btd,dnc->btnc", xf, f(params.w_forget))
                            + f(params.b_forget))
             if params.w_forget is not None else jnp.zeros((B, T, N, 1), dtype))

    # Memory weights as a flat list: matrices..., then LayerNorm gain and bias (deep memory).
    depth = cfg.memory_depth
    if initial_state is None:
        weights = [jnp.broadcast_to(f(w), (B, *w.shape)) for w in
                   jax.tree_util.tree_leaves(params.memory)]
        momentum = [jnp.zeros_like(w) for w in weights]
    else:
        weights = [f(w) for w in jax.tree_util.tree_leaves(initial_state.weights)]
        momentum = [f(w) for w in jax.tree_util.tree_leaves(initial_state.momentum)]

    def memory(ws, inp):  # ws leaves [B, N, ...], inp [B, N, H]
        h = inp
        for i in range(depth):
            if i:
                h = 0.5 * h * (1 + jax.scipy.special.erf(h / math.sqrt(2)))
            h = jnp.einsum("bnp,bnpq->bnq", h, ws[i])
        if depth == 1:
            return h
        mu = h.mean(-1, keepdims=True)
        var = ((h - mu) ** 2).mean(-1, keepdims=True)
        return inp + (h - mu) / jnp.sqrt(var + 1e-5) * ws[depth] + ws[depth + 1]

    # Forget gate per leaf: one per head ([B, N, 1]) or per output unit of each leaf.
    sizes = [w.shape[-1] for w in weights]
    offsets = [sum(sizes[:i]) for i in range(len(sizes))]

    def leaf_gate(a, i):  # a [B, N, C] -> broadcastable to leaf i
        g = a if a.shape[-1] == 1 else a[..., offsets[i]:offsets[i] + sizes[i]]
        return g.reshape(B, N, *([1] * (weights[i].ndim - 3)), g.shape[-1])

    def expand(a, leaf):  # [B, N] -> [B, N, 1, ...]
        return a.reshape(B, N, *([1] * (leaf.ndim - 2)))

    ys = []
    frozen = weights
    for t in range(T):
        if t % chunk_size == 0:
            frozen = weights
        k_t, v_t = k[:, t], v[:, t]
        grads = jax.grad(lambda ws, k_t=k_t, v_t=v_t: jnp.sum((memory(ws, k_t) - v_t) ** 2))(
            frozen)
        theta_t = theta[:, t]
        if max_grad_norm is not None:
            norm = jnp.sqrt(sum(jnp.sum(g ** 2, axis=tuple(range(2, g.ndim))) for g in grads))
            theta_t = theta_t * jnp.minimum(1.0, max_grad_norm / norm)
        momentum = [expand(eta[:, t], s) * s - expand(theta_t, g) * g
                    for s, g in zip(momentum, grads, strict=True)]
        previous = weights
        weights = [(1 - leaf_gate(alpha[:, t], i)) * w + s
                   for i, (w, s) in enumerate(zip(weights, momentum, strict=True))]
        ys.append(memory(weights if retrieve == "after" else previous, q[:, t]))
    return jnp.stack(ys, 1).astype(x.dtype), weights, momentum, conv_out


def rwkv_wkv(w, u, k, v):
    """RWKV-4's WKV from its definition: per channel c, a softmax over positions i <= t with
    logits -(t-1-i) w + k_i for i < t and u + k_t for i = t, averaging v_i. Dense [T, T]
    logits per channel with a causal mask; stabilised by subtracting each row's max.
    w, u [C]; k, v [B, T, C] -> [B, T, C] in v's dtype (computed in float32 or wider)."""
    dtype = jnp.promote_types(jnp.result_type(w, u, k, v), jnp.float32)
    w, u, k32, v32 = (jnp.asarray(x).astype(dtype) for x in (w, u, k, v))
    T = k.shape[1]
    t = jnp.arange(T)[:, None]
    i = jnp.arange(T)[None, :]
    distance = (t - 1 - i).astype(dtype)  # [T, T]
    logits = -distance[None, :, :, None] * w + k32[:, None, :, :]  # [B, t, i, C]
    logits = jnp.where((i == t)[None, :, :, None], u + k32[:, :, None, :], logits)
    weights = _masked_softmax(logits, (i <= t)[None, :, :, None], axis=2)
    y = jnp.sum(weights * v32[:, None, :, :], axis=2)
    return y.astype(v.dtype)
