"""Ground truth of the application family (:mod:`jattn.applications`), written from the
papers' definitions, every softmax on the dense score matrix."""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jattn.core.masks import Mask
from jattn.core.shapes import Array, left_pad_rank
from jattn.reference.core import dot_product_attention, masked_softmax, masked_softmax_average


# The matching functions return these; the same fields, declared here so that the references
# share no code with what they check.
class FILIPSimilarity(NamedTuple):
    """What :func:`filip_similarity` returns: FILIP's image-to-text and text-to-image
    similarities, [B, B'] each (the fields of
    :class:`jattn.applications.matching.FILIPSimilarity`)."""

    image_to_text: Array
    text_to_image: Array


class ConditionalTransport(NamedTuple):
    """What :func:`conditional_transport` returns: the bidirectional CT cost [B], its forward
    and backward parts [B] and the two navigators [B, P, L] and [B, L, P] (the fields of
    :class:`jattn.applications.matching.ConditionalTransport`)."""

    cost: Array
    forward_cost: Array
    backward_cost: Array
    forward_navigator: Array
    backward_navigator: Array


class IterativeCrossAttention(NamedTuple):
    """What :func:`iterative_cross_attention` returns: the last round's output [B, T, Dv] and
    the inverse temperature [B, T] and query modulation [B, T, D] that produced it (the fields
    of :class:`jattn.applications.matching.IterativeCrossAttention`)."""

    attended: Array
    inverse_temperature: Array
    modulation: Array


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


def decoupled_target_attention(target_att, behaviour_att, behaviour_repr, *, top_k, mask=None,
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
    if top_k is None:
        selected = valid
    else:
        order = jnp.argsort(jnp.where(valid, -scores, jnp.inf), axis=1, stable=True)
        rank = jnp.argsort(order, axis=1, stable=True)  # rank[b, i]: place of i in the order
        selected = valid & (rank < top_k)
    pooled = dot_product_attention(a_t[:, None, None, :].astype(dtype),
                                   a[:, :, None, :].astype(dtype),
                                   r[:, :, None, :].astype(dtype),
                                   mask=selected[:, None, None, :], scale=scale)
    pooled = pooled[:, 0, 0].astype(r.dtype)
    if not return_weights:
        return pooled
    return pooled, masked_softmax(scores, selected).astype(a_t.dtype)


# --------------------------------------------------------------------------------------------
# Matching and contrastive losses (jattn.applications.matching: P02, P04, P20, P28/P39/P73,
# P30). Masks must be concrete here (they select rows with NumPy indexing).


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
    w = masked_softmax(s, valid)
    out = jnp.einsum("bk,bk...->b...", w, v)
    out = out.astype(jnp.asarray(values).dtype)
    return (out, w) if return_weights else out


def iterative_cross_attention(query, context, *, num_steps, inverse_temperature,
                              regulator=None, modulation=None, value=None, context_mask=None,
                              query_mask=None, normalize=True):
    """RCAR's (P30) rounds unrolled: per round the cosine (or dot) scores of the modulated
    queries, times lambda, a written-out softmax over the valid context, the weighted
    values (normalised), then the regulator's update."""

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
        # The shift is a constant for the gradient (the softmax does not depend on it; the
        # gradient of max() hinges on an equality test that XLA may recompute differently).
        shift = jax.lax.stop_gradient(scores.max(-1, keepdims=True))
        e = jnp.where(valid[:, None, :], jnp.exp(scores - shift), 0)
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
# DANet) and pointer networks (P67): plain definitions for jattn.applications.channel and
# jattn.applications.pointer.


def _ref_channel_means(x):
    dtype = jnp.promote_types(x.dtype, jnp.float32)
    flat = x.astype(dtype).reshape(x.shape[0], -1, x.shape[-1])
    return flat.sum(1) / flat.shape[1]


def _ref_rescale(x, weights):
    shape = (x.shape[0],) + (1,) * (x.ndim - 2) + (x.shape[-1],)
    return (x.astype(weights.dtype) * weights.reshape(shape)).astype(x.dtype)


def eca_kernel_size(channels, gamma=2, b=1):
    """``|log2(C) / gamma + b / gamma|_odd``: the odd number nearest to t, ties upwards."""
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
    e = jnp.exp(energy - jax.lax.stop_gradient(energy.max(-1, keepdims=True)))  # a shift
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
    e = jnp.exp(energy - jax.lax.stop_gradient(energy.max(-1, keepdims=True)))  # a shift
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
    top = jax.lax.stop_gradient(  # a shift: the log-softmax does not depend on it
        jnp.where(allowed.any(-1, keepdims=True), safe.max(-1, keepdims=True), 0))
    total = jnp.where(allowed, jnp.exp(safe - top), 0).sum(-1, keepdims=True)
    log_probs = logits - top - jnp.log(jnp.where(total > 0, total, 1))
    return jnp.where(allowed, log_probs, -jnp.inf)


# --------------------------------------------------------------------------------------------
# jattn.applications.fusion (P05, P08, P10, P11, P18, P55): written from the papers' definitions


def _allowed(mask, is_causal: bool, B: int, N: int, T: int, S: int) -> Array:
    """bool [B, N, T, S]: ``mask`` (an array or a Mask) and, if ``is_causal``, s <= t,
    written out."""
    allowed = jnp.ones((B, N, T, S), bool)
    if is_causal:
        allowed &= jnp.arange(S)[None, :] <= jnp.arange(T)[:, None]
    if isinstance(mask, Mask):
        allowed &= mask.materialize(T, S)
    elif mask is not None:
        allowed &= left_pad_rank(jnp.asarray(mask), 4)
    return allowed


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
    out, _ = masked_softmax_average(logits, allowed, v)
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
    own = _allowed(mask, is_causal, B, N, T, S)
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
    allowed = _allowed(mask, is_causal, B, N, T, S)
    v = jnp.repeat(value.astype(dtype), N // K, axis=2)
    out, _ = masked_softmax_average(logits, allowed, v)
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
# jattn.applications.structure (P12, P14, P29)


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
    allowed = _allowed(mask, is_causal, B, N, T, S)
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
# plain definitions for jattn.applications.cross, every softmax written out on the dense
# score matrix.


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
    w = masked_softmax(logits, allowed)
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
    w_ab = masked_softmax(C, allowed)
    # the column softmax of the same C, written on C itself and transposed afterwards
    w_ba = jnp.swapaxes(masked_softmax(C, allowed, axis=2), 2, 3)  # [B, N, Tb, Ta]
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
    w = masked_softmax(logits, jnp.broadcast_to(valid[:, None, None, :], logits.shape))
    return jnp.einsum("bnmj,bjnh->bmnh", w, v).astype(keys.dtype)


def slot_attention(slots, keys, values, *, mask=None, scale=None, eps=1e-8):
    """P06: for each input a softmax over the slots (masked inputs: none), + eps, then each
    slot's weighted mean of the inputs; K/V heads repeated, float64 where given."""
    keys, values = jnp.asarray(keys), jnp.asarray(values)
    dtype = jnp.promote_types(keys.dtype, jnp.float32)
    B, S, K, H = keys.shape
    z = jnp.broadcast_to(jnp.asarray(slots), (B, *jnp.shape(slots)[-3:])).astype(dtype)
    N = z.shape[2]
    k = jnp.repeat(keys.astype(dtype), N // K, axis=2)
    v = jnp.repeat(values.astype(dtype), N // K, axis=2)
    valid = (jnp.ones((B, S), bool) if mask is None else jnp.asarray(mask))[:, None, None, :]
    scale = H ** -0.5 if scale is None else scale
    logits = scale * jnp.einsum("bmnh,bsnh->bnms", z, k)
    e = jnp.exp(logits - logits.max(axis=2, keepdims=True))
    attention = jnp.where(valid, e / e.sum(axis=2, keepdims=True), 0.0)
    weights = jnp.where(valid, attention + eps, 0.0)
    weights = weights / weights.sum(axis=3, keepdims=True)
    return (jnp.einsum("bnms,bsnh->bmnh", weights, v).astype(keys.dtype),
            attention.astype(jnp.promote_types(dtype, jnp.float32)))


def concept_explanation_loss(attention, target, *, mask=None):
    """P06: per row, the squared distance between the mean attention over concepts (heads
    and valid tokens) and the annotations normalised to sum one; rows without annotations
    count zero; mean over rows."""
    attention, target = jnp.asarray(attention), jnp.asarray(target)
    B, N, T, _ = attention.shape
    valid = jnp.ones((B, T), bool) if mask is None else jnp.asarray(mask)
    share = (attention * valid[:, None, :, None]).sum((1, 2)) / (
        N * jnp.maximum(valid.sum(1), 1))[:, None]
    total = target.sum(1, keepdims=True)
    wanted = target / jnp.where(total > 0, total, 1)
    return jnp.where(total[:, 0] > 0, ((share - wanted) ** 2).sum(1), 0).mean()


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
        w = masked_softmax(logits, jnp.broadcast_to(valid[:, None, None, :],
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
