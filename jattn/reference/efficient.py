"""Ground truth of the efficient family (:mod:`jattn.efficient`): each mechanism written
as dense attention over an explicit mask or as the recurrence of its definition."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jattn.core.shapes import Array, left_pad_rank
from jattn.reference.core import (
    dot_product_attention,
    masked_softmax,
    masked_softmax_average,
)


def linear_attention(query, key, value, *, feature_map="elu+1", is_causal=False, decay=None,
                     log_decay=None, segment_ids=None, normalize=True, eps=1e-6,
                     initial_state=None, return_state=False):
    """Linear attention as the quadratic sum of its definition (GQA repeats K/V).

    out_t = sum_s w_ts (phi(q_t) . phi(k_s)) v_s / (sum_s w_ts phi(q_t) . phi(k_s) + eps),
    w_ts = [s <= t] gamma^(t - s) when causal (gamma = 1 without decay), 1 otherwise; the
    initial state (kv [B, N, F, Hv], k_sum [B, N, F]) enters query t with gamma^(t + 1).
    With ``log_decay`` [B, T, N] every w also carries exp(sum of log_decay[r] over the
    positions r it spans, s < r <= t (the state: r <= t)), each sum written out over an
    indicator of r; with ``segment_ids`` w is 0 when the id changes anywhere in s < r <= t
    (the state: 0 < r <= t). Same arguments and meaning as :func:`jattn.linear_attention`;
    returns (output, (kv, k_sum)) with ``return_state``.
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
    weight = jnp.broadcast_to(weight, (B, N, T, S))
    from_state = jnp.broadcast_to(from_state, (B, T, N))
    to_state = jnp.broadcast_to(to_state, (B, S, N))
    carried = jnp.broadcast_to(carried, (B, N))
    r = jnp.arange(T)
    # span[t, s, r]: r lies in (s, t]; into[t, r]: r in [0, t] (the state to query t);
    # out_of[s, r]: r in (s, S - 1] (key s to the end); 0 < r marks a change as a reset.
    span = (r[None, None, :] > s[..., None]) & (r[None, None, :] <= t[..., None])
    into = r[None, :] <= t
    out_of = r[None, :] > s[0][:, None]
    if log_decay is not None:
        a = jnp.asarray(log_decay).astype(dtype)  # [B, T, N]
        weight = weight * jnp.exp(jnp.einsum("tsr,brn->bnts", span.astype(dtype), a))
        from_state = from_state * jnp.exp(jnp.einsum("tr,brn->btn", into.astype(dtype), a))
        to_state = to_state * jnp.exp(jnp.einsum("sr,brn->bsn", out_of.astype(dtype), a))
        carried = carried * jnp.exp(a.sum(1))
    if segment_ids is not None:
        ids = jnp.asarray(segment_ids)
        change = jnp.concatenate([jnp.zeros_like(ids[:, :1], bool), ids[:, 1:] != ids[:, :-1]],
                                 axis=1)  # [B, T]: a reset at r
        cut = jnp.einsum("tsr,br->bts", span, change) > 0
        weight = jnp.where(cut[:, None], 0, weight)
        from_state = jnp.where((jnp.einsum("tr,br->bt", into, change) > 0)[..., None], 0,
                               from_state)
        to_state = jnp.where((jnp.einsum("sr,br->bs", out_of, change) > 0)[..., None], 0,
                             to_state)
        carried = jnp.where(change.any(1)[:, None], 0, carried)
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
    kv = carried[..., None, None] * kv0 + jnp.einsum("bsnf,bsn,bsnv->bnfv", pk, to_state, v)
    z = carried[..., None] * z0 + jnp.einsum("bsnf,bsn->bnf", pk, to_state)
    return out, (kv, z)


def _taylor_features(x: Array) -> Array:
    """[1, x / d^(1/4), x_i x_j / sqrt(2 d) for every (i, j)]: phi(x).phi(y) = 1 + x.y/sqrt(d)
    + (x.y)^2 / (2 d)."""
    d = x.shape[-1]
    pairs = jnp.einsum("...i,...j->...ij", x, x).reshape(*x.shape[:-1], d * d)
    return jnp.concatenate([jnp.ones((*x.shape[:-1], 1), x.dtype), x * d ** -0.25,
                            pairs / jnp.sqrt(2.0 * d).astype(x.dtype)], axis=-1)


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
    out, _ = masked_softmax_average(logits, keep, v)
    return out.astype(query.dtype)


def neighborhood_mask(spatial, kernel_size, dilation=1, is_causal=False, stride=1):
    """Dense boolean [L, L] (L = prod(spatial), row-major flat positions): query p may attend
    key q, built position by position from NATTEN's definition (P72).

    Per spatial axis of length n, kernel k, dilation d, stride s: positions split into d
    groups by index mod d. The query's rank r in its group (index // d) is replaced by its
    stride group's leader: rank s // 2 of the s ranks from s * (r // s), or the last of
    them when causal, never past the group's last rank. Key q is in the window
    when it is in p's group and its rank lies in [lo, lo + k) with lo = leader - k // 2
    clipped to [0, len - k] (len: the group's size), or, causal, in [leader - k + 1, leader]
    and not after r. A key is allowed when it is in the window along every axis.
    """
    import itertools


    spatial = tuple(spatial)
    n = len(spatial)

    def per_axis(x):
        return tuple(x) if isinstance(x, (tuple, list)) else (x,) * n

    kernel_size, dilation, is_causal, stride = (per_axis(x) for x in (
        kernel_size, dilation, is_causal, stride))

    def in_window(axis, p, q):
        length, k, d, s = spatial[axis], kernel_size[axis], dilation[axis], stride[axis]
        if p % d != q % d:
            return False
        group_size = len(range(p % d, length, d))
        rank, key_rank = p // d, q // d
        members = list(range(s * (rank // s), s * (rank // s) + s))
        leader = min(members[-1] if is_causal[axis] else members[s // 2], group_size - 1)
        if is_causal[axis]:
            return leader - k + 1 <= key_rank <= rank
        lo = min(max(leader - k // 2, 0), group_size - k)
        return lo <= key_rank < lo + k

    positions = list(itertools.product(*(range(s) for s in spatial)))
    mask = np.zeros((len(positions), len(positions)), bool)
    for i, p in enumerate(positions):
        for j, q in enumerate(positions):
            mask[i, j] = all(in_window(a, p[a], q[a]) for a in range(n))
    return mask


def neighborhood_attention(query, key, value, *, kernel_size, dilation=1, is_causal=False,
                           stride=1, scale=None, extra_key=None, extra_value=None):
    """Neighbourhood attention as dense softmax attention under :func:`neighborhood_mask`,
    with the extra keys appended as columns every query may attend. Same arguments and
    meaning as :func:`jattn.neighborhood_attention`."""

    query, key, value = (jnp.asarray(x) for x in (query, key, value))
    B, spatial, N, H = query.shape[0], query.shape[1:-2], query.shape[-2], query.shape[-1]
    L = math.prod(spatial)
    mask = neighborhood_mask(spatial, kernel_size, dilation, is_causal, stride)
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


def agent_attention(query, key, value, *, num_agents=None, agents=None, agent_key_bias=None,
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
        for a in range(num_agents):
            start = (a * T) // num_agents
            end = math.ceil((a + 1) * T / num_agents)
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

    weights = jnp.einsum("bnta,bnas->bnts", masked_softmax(logits2, allowed2),
                         masked_softmax(logits1, allowed1))  # [B, N, T, S], rows sum to 1 or 0
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
    peak = lax.stop_gradient(jnp.where(jnp.isfinite(peak), peak, 0))  # see softmax_terms
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

    ``phi(x) = exp(W x' - |x'|^2 / 2) / sqrt(m)`` with x' = x / H^(1/4) and W =
    ``projection`` [m, H]; no stabilisation. Pass ``feature_map=lambda x: favor_features(x, w)`` to
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


def bilevel_routing_attention(query, key, value, *, region_size, top_k, is_causal=False,
                              scale=None):
    """Bi-level routing attention (P59 BiFormer) as a dense boolean mask + softmax.

    Region of each position by loops over positions; region means as matrix products with
    the membership matrix; routing by a stable descending sort of the region affinities
    (summed over heads); the token mask is 'key region routed by the query's region' (and,
    causal 1-D, routed among regions before the query's by the prefix mean of its region's
    queries, own region always, key position <= query position). Same signature as
    :func:`jattn.bilevel_routing_attention`.
    """

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
        routed = jax.nn.one_hot(order[..., :top_k], Rk).sum(-2) > 0  # [B, Rq, Rk]
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
        routed = (earlier & (rank < top_k - 1)) | own  # [B, L, Rk]
        before = np.array([[s <= t for s in range(S)] for t in range(L)])
        mask = routed[:, :, rk] & before
    mask = jax.lax.stop_gradient(mask)[:, None]
    out = dot_product_attention(query.reshape(B, L, N, H), key.reshape(B, S, K, H),
                                value.reshape(B, S, K, Hv), mask=mask, scale=scale)
    return out.reshape(B, *spatial, N, Hv)


def longheads_attention(query, key, value, *, chunk_size, top_k, scale=None,
                        summary="attention", rope_base=None, rope_fraction=1.0,
                        rope_scaling=None, rope_factor=1.0):
    """LongHeads (P61) as a dense boolean mask + causal softmax, per query head.

    Chunk of each position t // chunk_size; summaries from the chunk membership matrix
    (attention-pooled: the chunk's mean query softmax-attends over the chunk's keys; or the
    mean key); candidates for query t are the chunks 1 .. chunk(t) - 1 (loops); the
    ``top_k - 2`` best by a stable descending sort of q_t . c_j are kept with chunk 0 and
    chunk(t); the token mask adds key position <= query position. With ``rope_base`` the
    chosen chunks of (query t, head n) are laid side by side: the slot of a chosen chunk is
    the count of chosen chunks before it, key s takes slot * chunk_size + s mod chunk_size,
    query t (number chosen - 1) * chunk_size + t mod chunk_size, and q_t and each k_s are
    rotated (``_rotary``) at those positions before the dot product. Same signature as
    :func:`jattn.longheads_attention` (without ``implementation``).
    """

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
    chosen = jax.lax.stop_gradient((candidate & (rank < top_k - 2)) | always)  # [B, N, T, m]
    before = np.array([[s <= t for s in range(T)] for t in range(T)])
    mask = chosen[..., chunk] & before
    if rope_base is None:
        return dot_product_attention(query, key, value, mask=mask, scale=scale)
    rope = dict(base=rope_base, fraction=rope_fraction, scaling=rope_scaling,
                factor=rope_factor)
    offset = np.arange(T) % chunk_size
    slot = jnp.cumsum(chosen, axis=-1) - chosen  # chosen chunks before each chunk
    key_position = slot[..., chunk] * chunk_size + offset  # [B, N, T, S]
    query_position = (chosen.sum(-1) - 1) * chunk_size + offset  # [B, N, T]
    qr = _rotary(jnp.moveaxis(q, 1, 2), query_position, **rope)  # [B, N, T, H]
    kr = _rotary(jnp.moveaxis(k, 1, 2)[:, :, None], key_position, **rope)  # [B, N, T, S, H]
    logits = jnp.einsum("bnth,bntsh->bnts", qr, kr) * scale
    v = jnp.repeat(value.astype(dtype), N // K, axis=2)
    out, _ = masked_softmax_average(logits, mask, v)
    return out.astype(query.dtype)


def _rotary(x, positions, *, base, fraction, scaling, factor):
    """Rotary embedding of x [..., H] at positions [...] (broadcast against x[..., 0]): with
    r = fraction * H rounded down to even, channels i and i + r/2 (i < r/2) turned by
    p * base^(-2i/r); "ntk" scaling uses base * factor^(r / (r - 2)) (r > 2), "linear"
    p / factor; channels r.. unchanged."""
    H = x.shape[-1]
    r = int(H * fraction) // 2 * 2
    if scaling == "ntk" and r > 2:
        base = base * factor ** (r / (r - 2))
    p = jnp.asarray(positions / factor if scaling == "linear" else positions)
    x = jnp.broadcast_to(x, (*jnp.broadcast_shapes(x.shape[:-1], p.shape), H))
    angle = p[..., None] * base ** (-2.0 * np.arange(r // 2) / r)
    a, b = x[..., :r // 2], x[..., r // 2:r]
    cos, sin = jnp.cos(angle).astype(x.dtype), jnp.sin(angle).astype(x.dtype)
    return jnp.concatenate([a * cos - b * sin, a * sin + b * cos, x[..., r:]], axis=-1)


def route_heads(routed_logits, *, top_k, shared_logits=None, mix_logits=None):
    """Mixture-of-heads gates (P19) token by token: softmax over the routed heads, the top_k
    largest kept by a stable descending sort, shared heads and the two-way mix by their own
    softmaxes; the load-balancing loss sum_j f_j P_j from its definition. Same signature as
    :func:`jattn.route_heads`; returns (gates, routed_index, routed_probs, loss)."""
    r = jnp.asarray(routed_logits)
    dtype = jnp.promote_types(r.dtype, jnp.float32)
    probs = jax.nn.softmax(r.astype(dtype), axis=-1)
    order = jnp.argsort(-lax.stop_gradient(probs), axis=-1, stable=True)[..., :top_k]
    rank = jnp.argsort(jnp.argsort(-lax.stop_gradient(probs), axis=-1, stable=True), axis=-1)
    chosen = rank < top_k
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
    head) pair is dropped when more than ceil(factor T top_k / Nr) earlier tokens of the
    sequence selected that head (counted in a loop). Same signature as
    :func:`jattn.mixture_of_heads_attention` (``form`` changes nothing else)."""

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


def relative_attention(query, key, value, relative_key, content_bias, *, position_bias=None,
                       distance_bias=None, is_causal=True, scale=None, query_offset=None):
    """Relative attention (P16 RCMHA / Transformer-XL) with the distance table gathered per
    (t, s) pair: logits = scale [(q_t + u) k_s + (q_t + v) r[d] + b[d]] with d = p_t - s,
    the position terms only for 0 <= d < R; keys with s > p_t masked when causal. Same
    signature as :func:`jattn.relative_attention`."""

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
