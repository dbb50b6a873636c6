"""Pooling and target attention: a few queries (a context vector, a target item, a window
mean) attend over a sequence of hidden states or behaviours.

* ``context_query_pooling`` (P33 LAMA): k attention distributions over the tokens from a
  low-rank factorised bilinear affinity with one global context vector; returns the k pooled
  vectors (a structured sentence embedding). ``masked_mean`` gives the "LAMA + ctx" context.
* ``window_mean`` (P38 MQSA): the masked mean of the last L items at every position, the
  pooled query of L-query self-attention (the attention itself is causal
  ``jattn.dot_product_attention``; see ``jattn.nn.LQuerySelfAttention``).
* ``decoupled_target_attention`` (P47 DARE): one target attends to its top-k behaviours,
  scored with attention embeddings, averaging separate representation embeddings.
* Text-embedding pooling of an LLM's hidden states (P35): ``masked_mean``,
  ``last_token_pool`` (the EOS/last real token, left or right padding),
  ``latent_attention_pool`` (every token attends to a trainable latent array, then the mean)
  and ``multi_layer_pool`` (trainable queries attend over the last-token states of all
  layers: Multi-Layers Trainable Pooling).

Of CAB's four patterns, LAMA and DARE are non-causal cross attention with one (or k) queries
over a whole set: a causal form would need a query per position, which neither paper defines,
so none is offered. The window mean looks only backwards (causal by construction) and feeds
causal self-attention. Plain dense ground truth for each lives in :mod:`jattn.reference`.

References:
    P33 Low-rank factorised MHSA, "Low Rank Factorization for Compact Multi-Head
    Self-Attention".
    P38 MQSA-TED, "Collaboration and Transition: Distilling Item Transitions into Multi-Query
    Self-Attention for Sequential Recommendation".
    P47 DARE, "Long-Sequence Recommendation Models Need Decoupled Embeddings".
    P35 "Pooling And Attention: What Are Effective Designs For LLM-Based Embedding Models?".
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np
from jax import lax

from jattn.core.attention import dot_product_attention, masked_softmax
from jattn.core.shapes import (
    Array,
    DTypeError,
    accumulation_dtype,
    check_bool,
    check_floating,
    check_heads,
    check_int,
    check_rank,
    check_shape,
)


def _check_mask(mask: Array | None, shape: tuple[int, ...], letters: str) -> None:
    if mask is not None:
        check_shape("mask", mask, shape, letters)
        check_bool("mask", mask)


# --------------------------------------------------------------------------------------------
# P33 LAMA


def masked_mean(hidden: Array, *, mask: Array | None = None) -> Array:
    r"""The mean of the valid tokens of each sequence, the context of "LAMA + ctx".

    .. math::
        c = \frac{\sum_t m_t h_t}{\sum_t m_t}\quad(0 \text{ when no token is valid})

    Args:
        hidden: [B, n, d].
        mask: bool [B, n], True for real tokens; None: all valid.

    Returns:
        [B, d] in hidden's dtype (summed in float32 or wider).

    Raises:
        ValueError: hidden not [B, n, d], a mask of another shape.
        TypeError: non-floating hidden, non-boolean mask.

    >>> import jax.numpy as jnp
    >>> h = jnp.array([[[1.0], [3.0], [100.0]]])
    >>> masked_mean(h, mask=jnp.array([[True, True, False]]))
    Array([[2.]], dtype=float32)

    References:
        P33 Low-rank factorised MHSA, "Low Rank Factorization for Compact Multi-Head
        Self-Attention" (the LAMA + ctx variant).
    """
    check_rank("hidden", hidden, (3,), "[B, n, d]")
    check_floating("hidden", hidden)
    _check_mask(mask, hidden.shape[:2], "Bn")
    h = hidden.astype(accumulation_dtype(hidden.dtype))
    if mask is None:
        return h.mean(1).astype(hidden.dtype)
    m = mask.astype(h.dtype)[..., None]
    count = m.sum(1)
    return ((h * m).sum(1) / jnp.maximum(count, 1)).astype(hidden.dtype)


def context_query_pooling(hidden: Array, context: Array, query_factors: Array,
                          key_factors: Array, *, mask: Array | None = None
                          ) -> tuple[Array, Array]:
    r"""LAMA pooling: k attention distributions over the tokens from a low-rank bilinear
    affinity with one global context vector, and the k pooled vectors.

    .. math::
        f_t = \tanh\big((P^\top c) \odot (Q^\top h_t)\big) \in \mathbb{R}^k, \quad
        \hat f_t = f_t / \lVert f_t \rVert_2, \quad
        A_{i,:} = \mathrm{softmax}_t(\hat f_{t,i}), \quad M = A H \in \mathbb{R}^{k \times d}

    Head i scores token t with the rank-one bilinear form c^T p_i q_i^T h_t (squashed by
    tanh), so k distributions cost 2 d k parameters instead of a d x d matrix per head. Each
    f_t is L2-normalised over the k heads (a zero f_t stays zero) before the softmax over the
    valid tokens. A sequence with no valid token gets zero attention and a zero M, never NaN.
    Of CAB's four patterns only the non-causal one: one query per sequence, which sees every
    token (a causal form would need a context per position, which the paper does not define).

    Args:
        hidden: [B, n, d] token states H (n >= 1).
        context: [B, d_c] or [d_c] the global context vector c (a learned vector, or
            ``masked_mean(hidden, mask=mask)`` for LAMA + ctx, where d_c = d).
        query_factors: [d_c, k] P, one column p_i per head.
        key_factors: [d, k] Q, one column q_i per head.
        mask: bool [B, n], True for real tokens; None: all valid.

    Returns:
        (pooled M [B, k, d], attention A [B, k, n]), both in hidden's dtype; the affinity
        and softmax run in float32 (float64 for float64 input).

    Raises:
        ValueError: wrong ranks, shapes that disagree (batch, d, d_c, k), n = 0, a mask of
            another shape.
        TypeError: non-floating arrays, a non-boolean mask.

    >>> import jax, jax.numpy as jnp
    >>> h = jax.random.normal(jax.random.key(0), (2, 7, 16))
    >>> P = jax.random.normal(jax.random.key(1), (16, 4))
    >>> Q = jax.random.normal(jax.random.key(2), (16, 4))
    >>> pooled, attn = context_query_pooling(h, masked_mean(h), P, Q)
    >>> pooled.shape, attn.shape, bool(jnp.allclose(attn.sum(-1), 1))
    ((2, 4, 16), (2, 4, 7), True)

    References:
        P33 Low-rank factorised MHSA, "Low Rank Factorization for Compact Multi-Head
        Self-Attention" (LAMA).
    """
    check_rank("hidden", hidden, (3,), "[B, n, d]")
    check_rank("context", context, (1, 2), "[B, d_c] or [d_c]")
    check_rank("query_factors", query_factors, (2,), "[d_c, k]")
    check_rank("key_factors", key_factors, (2,), "[d, k]")
    for name, x in (("hidden", hidden), ("context", context), ("query_factors", query_factors),
                    ("key_factors", key_factors)):
        check_floating(name, x)
    B, n, d = hidden.shape
    if n == 0:
        raise ValueError(f"hidden: expected at least one token, got shape {hidden.shape}")
    if context.ndim == 2 and context.shape[0] != B:
        raise ValueError(f"context: expected [B={B}, d_c] to match hidden {hidden.shape}, "
                         f"got {context.shape}")
    d_c = context.shape[-1]
    k = key_factors.shape[1]
    if key_factors.shape[0] != d:
        raise ValueError(f"key_factors: expected [d={d}, k] to match hidden {hidden.shape}, "
                         f"got {key_factors.shape}")
    check_shape("query_factors", query_factors, (d_c, k), ["d_c", "k"])
    _check_mask(mask, (B, n), "Bn")

    dtype = accumulation_dtype(jnp.result_type(hidden, context, query_factors, key_factors))
    h = hidden.astype(dtype)
    c = jnp.broadcast_to(context.astype(dtype), (B, d_c))
    context_part = c @ query_factors.astype(dtype)  # [B, k]
    token_part = h @ key_factors.astype(dtype)  # [B, n, k]
    f = jnp.tanh(context_part[:, None, :] * token_part)
    squared = jnp.sum(f * f, axis=-1, keepdims=True)
    nonzero = squared > 0  # the norm's gradient at 0 is NaN: keep it out of both branches
    f = jnp.where(nonzero, f * lax.rsqrt(jnp.where(nonzero, squared, 1)), 0)
    logits = jnp.swapaxes(f, 1, 2)  # [B, k, n]
    allowed = (jnp.ones((B, 1, n), bool) if mask is None else mask[:, None, :])
    attention = masked_softmax(logits, allowed)
    pooled = jnp.einsum("bkn,bnd->bkd", attention, h)
    return pooled.astype(hidden.dtype), attention.astype(hidden.dtype)


# --------------------------------------------------------------------------------------------
# P38 MQSA


def window_mean(x: Array, window: int, *, mask: Array | None = None) -> Array:
    r"""The masked mean of the last ``window`` items, at every position (L-query pooling).

    .. math::
        \bar q_t = \frac{\sum_{l=0}^{L-1} m_{t-l}\, x_{t-l}}{\sum_{l=0}^{L-1} m_{t-l}}
        \quad (\text{positions } < 0 \text{ count as padding; } 0 \text{ when none is valid})

    The query of MQSA's L-query self-attention (the current item and the L - 1 before it;
    fewer at the start). ``window=1`` gives x with padding zeroed. A window longer than the
    sequence is allowed (early positions are prefix means anyway). Causal: position t reads
    nothing after t. Each window is summed directly (``lax.reduce_window``: O(T L D) adds,
    O(T D) memory, no cancellation as with a difference of cumulative sums).

    Args:
        x: [B, T, D].
        window: L >= 1, the number of trailing positions averaged.
        mask: bool [B, T], True for real items; None: all valid.

    Returns:
        [B, T, D] in x's dtype (summed in float32 or wider).

    Raises:
        ValueError: x not [B, T, D], a window that is not a positive int, a mask of another
            shape.
        TypeError: non-floating x, a non-boolean mask.

    >>> import jax.numpy as jnp
    >>> x = jnp.array([[[1.0], [2.0], [4.0], [8.0]]])
    >>> window_mean(x, 2)[0, :, 0]
    Array([1. , 1.5, 3. , 6. ], dtype=float32)
    >>> window_mean(x, 2, mask=jnp.array([[False, True, True, True]]))[0, :, 0]
    Array([0., 2., 3., 6.], dtype=float32)

    References:
        P38 MQSA-TED, "Collaboration and Transition: Distilling Item Transitions into
        Multi-Query Self-Attention for Sequential Recommendation" (Eq. 7, L-query pooling).
    """
    check_rank("x", x, (3,), "[B, T, D]")
    check_floating("x", x)
    window = check_int("window", window)
    B, T, _ = x.shape
    _check_mask(mask, (B, T), "BT")
    dtype = accumulation_dtype(x.dtype)
    values = x.astype(dtype)

    def trailing_sum(a):  # sum of a[:, t - window + 1 .. t], zeros before the start
        dims = (1, window) + (1,) * (a.ndim - 2)
        padding = ((0, 0), (window - 1, 0)) + ((0, 0),) * (a.ndim - 2)
        return lax.reduce_window(a, np.array(0, a.dtype), lax.add, dims, (1,) * a.ndim,
                                 padding)

    if mask is None:
        count = jnp.minimum(jnp.arange(1, T + 1, dtype=dtype), window)[None, :, None]
        return (trailing_sum(values) / count).astype(x.dtype)
    m = mask.astype(dtype)
    count = trailing_sum(m)[..., None]
    total = trailing_sum(values * m[..., None])
    return (total / jnp.maximum(count, 1)).astype(x.dtype)


# --------------------------------------------------------------------------------------------
# P47 DARE


def decoupled_target_attention(target_att: Array, behaviour_att: Array, behaviour_repr: Array,
                               *, top_k: int | None, mask: Array | None = None,
                               scale: float | None = None, return_weights: bool = False
                               ) -> Array | tuple[Array, Array]:
    r"""DARE target attention: score behaviours with attention embeddings, keep the top-k,
    average their representation embeddings.

    .. math::
        s_i = \mathrm{scale}\, \langle a_t, a_i \rangle, \quad
        w = \mathrm{softmax}_{i \in \mathrm{top}_k(s)}(s_i), \quad
        h = \sum_{i \in \mathrm{top}_k(s)} w_i\, r_i

    a = rows of the attention table E^Att (dim d_att), r = rows of the representation table
    E^Repr (dim d_repr, may differ: DARE shrinks d_att to speed up the search). top_k(s) is
    the set of the k highest scores among the valid behaviours, ties to the lower index; with
    fewer than k valid behaviours all valid ones are kept, with none h = 0. Selection is hard
    (no gradient through which behaviours are chosen); gradients reach the attention
    embeddings through the softmax over the selected ones. ``top_k=None`` is soft attention
    over all valid behaviours (DARE's auxiliary-loss path, also DIN-style target attention
    without the MLP). Only the k selected representation rows are gathered.

    DARE's code scores the item/category part and the time part of the embeddings each with
    its own 1/sqrt(dim); get that by dividing each part of ``target_att`` by sqrt(its dim)
    and passing ``scale=1.0``.

    Non-causal cross attention with one query (the target) per example.

    Args:
        target_att: [B, d_att] the target's attention embedding a_t.
        behaviour_att: [B, n, d_att] the behaviours' attention embeddings.
        behaviour_repr: [B, n, d_repr] the behaviours' representation embeddings.
        top_k: behaviours kept (the code's default is 20), or None for all.
        mask: bool [B, n], True for real behaviours; None: all valid.
        scale: score scale; default 1 / sqrt(d_att).
        return_weights: also return the attention weights.

    Returns:
        h [B, d_repr] in behaviour_repr's dtype; with ``return_weights`` the pair (h, w) with
        w [B, n] the attention weights in target_att's dtype, zero off the selected set.
        Scores and softmax run in float32 (float64 for float64 input).

    Raises:
        ValueError: wrong ranks, shapes that disagree, n = 0, a top_k that is not a positive
            int or None, a mask of another shape.
        TypeError: non-floating embeddings, attention embeddings of two dtypes, a
            non-boolean mask.

    >>> import jax, jax.numpy as jnp
    >>> a = jax.random.normal(jax.random.key(0), (3, 50, 8))    # attention embeddings
    >>> r = jax.random.normal(jax.random.key(1), (3, 50, 32))   # representation embeddings
    >>> h = decoupled_target_attention(a[:, 0], a, r, top_k=5)
    >>> h.shape
    (3, 32)

    References:
        P47 DARE, "Long-Sequence Recommendation Models Need Decoupled Embeddings".
    """
    check_rank("target_att", target_att, (2,), "[B, d_att]")
    check_rank("behaviour_att", behaviour_att, (3,), "[B, n, d_att]")
    check_rank("behaviour_repr", behaviour_repr, (3,), "[B, n, d_repr]")
    for name, x in (("target_att", target_att), ("behaviour_att", behaviour_att),
                    ("behaviour_repr", behaviour_repr)):
        check_floating(name, x)
    if target_att.dtype != behaviour_att.dtype:
        raise DTypeError(f"target_att, behaviour_att: expected one dtype, got "
                        f"{target_att.dtype}, {behaviour_att.dtype}")
    B, n, d_att = behaviour_att.shape
    check_shape("target_att", target_att, (B, d_att), ["B", "d_att"])
    if behaviour_repr.shape[:2] != (B, n):
        raise ValueError(f"behaviour_repr: expected [B={B}, n={n}, d_repr] as behaviour_att "
                         f"{behaviour_att.shape}, got {behaviour_repr.shape}")
    if n == 0:
        raise ValueError(f"behaviour_att: expected at least one behaviour, got shape "
                         f"{behaviour_att.shape}")
    _check_mask(mask, (B, n), "Bn")
    check_int("top_k", top_k, allow_none=True)
    scale = 1 / math.sqrt(d_att) if scale is None else scale

    dtype = accumulation_dtype(target_att.dtype)
    repr_dtype = accumulation_dtype(behaviour_repr.dtype)
    scores = jnp.einsum("bd,bnd->bn", target_att.astype(dtype),
                        behaviour_att.astype(dtype)) * scale
    valid = jnp.ones((B, n), bool) if mask is None else mask
    if top_k is None or top_k >= n:  # every valid behaviour is kept: plain masked softmax
        weights = masked_softmax(scores, valid)
        pooled = jnp.einsum("bn,bnd->bd", weights.astype(repr_dtype),
                            behaviour_repr.astype(repr_dtype))
    else:
        k = int(top_k)  # < n here
        # lax.top_k lists equal values in index order (ties to the lower index); invalid
        # behaviours sit at -inf, come last, and are dropped by ``kept``.
        values, index = lax.top_k(jnp.where(valid, scores, -jnp.inf), k)  # [B, k]
        kept = jnp.take_along_axis(valid, index, axis=1)
        selected = masked_softmax(values, kept)
        chosen = jnp.take_along_axis(behaviour_repr, index[..., None], axis=1)  # [B, k, d_r]
        pooled = jnp.einsum("bk,bkd->bd", selected.astype(repr_dtype),
                            chosen.astype(repr_dtype))
        weights = jnp.zeros((B, n), dtype).at[jnp.arange(B)[:, None], index].add(selected)
    pooled = pooled.astype(behaviour_repr.dtype)
    return (pooled, weights.astype(target_att.dtype)) if return_weights else pooled


# --------------------------------------------------------------------------------------------
# P35 pooling for LLM embeddings


def last_token_pool(hidden: Array, *, mask: Array | None = None) -> Array:
    r"""The hidden state of each sequence's last real token (EOS-last pooling).

    The last position where ``mask`` is True, so right padding (real tokens first) and left
    padding (real tokens last) both work; a row with no real token gives zeros.

    Args:
        hidden: [..., n, d].
        mask: bool [..., n], True for real tokens; None: the last position.

    Returns:
        [..., d] in hidden's dtype.

    Raises:
        ValueError: hidden of rank < 2, a mask of another shape.
        TypeError: non-floating hidden, non-boolean mask.

    >>> import jax.numpy as jnp
    >>> h = jnp.arange(4.0).reshape(1, 4, 1)
    >>> last_token_pool(h, mask=jnp.array([[True, True, True, False]]))[0].tolist()
    [2.0]

    References:
        P35 (EOS-last token pooling).
    """
    check_rank("hidden", hidden, range(2, 8), "[..., n, d]")
    check_floating("hidden", hidden)
    if mask is None:
        return hidden[..., -1, :]
    _check_mask(mask, hidden.shape[:-1], "...n")
    n = hidden.shape[-2]
    last = n - 1 - jnp.argmax(mask[..., ::-1], axis=-1)  # first True from the end
    picked = jnp.take_along_axis(hidden, last[..., None, None], axis=-2)[..., 0, :]
    return jnp.where(mask.any(-1)[..., None], picked, 0).astype(hidden.dtype)


def latent_attention_pool(hidden: Array, latent_keys: Array, latent_values: Array, *,
                          num_heads: int, mask: Array | None = None,
                          transform=None) -> Array:
    r"""Latent-attention pooling: each token attends to a trainable latent array, then the
    masked mean.

    .. math::
        o_t = \mathrm{MHA}(q = h_t,\ K = L_K,\ V = L_V), \qquad
        e = \frac{1}{|\{t: m_t\}|} \sum_{t: m_t} f(o_t)

    The latents are shared by every sequence; the heads split the model dim (``num_heads``
    must divide it). ``transform`` is f, the MLP the pooling layer applies to each output
    before the mean (identity when None). This is the trainable pooling layer P35 compares
    (NV-Embed's latent attention layer).

    Args:
        hidden: [B, n, d] last-layer hidden states (the queries).
        latent_keys: [r, d]; latent_values: [r, d].
        num_heads: heads of the cross attention.
        mask: bool [B, n], True for real tokens.
        transform: None or a function [B, n, d] -> [B, n, d'].

    Returns:
        [B, d'] in hidden's dtype.

    Raises:
        ValueError: shapes that disagree, heads that do not divide d.

    >>> import jax.numpy as jnp
    >>> h = jnp.ones((2, 5, 8)); lat = jnp.ones((3, 8))
    >>> latent_attention_pool(h, lat, 2 * lat, num_heads=2).shape
    (2, 8)

    References:
        P35 (the trainable latent-attention pooling layer).
    """
    check_rank("hidden", hidden, (3,), "[B, n, d]")
    check_floating("hidden", hidden)
    B, n, d = hidden.shape
    check_rank("latent_keys", latent_keys, (2,), "[r, d]")
    if latent_keys.shape[1] != d:
        raise ValueError(f"latent_keys: expected [r, d={d}], got {latent_keys.shape}")
    check_shape("latent_values", latent_values, latent_keys.shape, "rd")
    check_heads(d, num_heads)
    _check_mask(mask, (B, n), "Bn")
    H = d // num_heads
    r = latent_keys.shape[0]

    def latents(x):
        return jnp.broadcast_to(x.astype(hidden.dtype).reshape(1, r, num_heads, H),
                                (B, r, num_heads, H))

    out = dot_product_attention(hidden.reshape(B, n, num_heads, H), latents(latent_keys),
                                latents(latent_values)).reshape(B, n, d)
    if transform is not None:
        out = transform(out)
    return masked_mean(out, mask=mask)


def multi_layer_pool(layer_states: Array, queries: Array, *, num_heads: int,
                     layer_embeddings: Array | None = None,
                     key_kernel: Array | None = None, value_kernel: Array | None = None,
                     transform=None) -> Array:
    r"""Multi-Layers Trainable Pooling: trainable queries attend over the last-token states
    of all layers, and the results are averaged.

    .. math::
        z_l = x_l + e_l, \quad o_j = \mathrm{MHA}(q_j,\ K = Z W_K,\ V = Z W_V), \quad
        e = \frac1r \sum_j f(o_j)

    with x_l the last-token state of layer l (:func:`last_token_pool` of each layer), e_l a
    learned layer embedding (so the attention can tell layers apart), q_j one of r trainable
    queries. The abstract says the pooling "transforms the outputs of all hidden layers ...
    using a cross-attention network"; this is that reading, the latent-attention layer turned
    around to query across layers.

    Args:
        layer_states: [B, L, d], one vector per layer (e.g. ``last_token_pool`` of the
            stacked hidden states [B, L, n, d]).
        queries: [r, d] trainable queries.
        num_heads: heads of the cross attention (a divisor of d).
        layer_embeddings: [L, d] or None.
        key_kernel, value_kernel: [d, d] projections, or None for the identity.
        transform: None or a function [B, r, d] -> [B, r, d'] (the MLP).

    Returns:
        [B, d'] in layer_states' dtype.

    Raises:
        ValueError: shapes that disagree, heads that do not divide d.

    >>> import jax.numpy as jnp
    >>> multi_layer_pool(jnp.ones((2, 4, 8)), jnp.ones((3, 8)), num_heads=2).shape
    (2, 8)

    References:
        P35 (Multi-Layers Trainable Pooling).
    """
    check_rank("layer_states", layer_states, (3,), "[B, L, d]")
    check_floating("layer_states", layer_states)
    B, L, d = layer_states.shape
    check_rank("queries", queries, (2,), "[r, d]")
    if queries.shape[1] != d:
        raise ValueError(f"queries: expected [r, d={d}], got {queries.shape}")
    check_heads(d, num_heads)
    z = layer_states
    if layer_embeddings is not None:
        check_shape("layer_embeddings", layer_embeddings, (L, d), "Ld")
        z = z + layer_embeddings.astype(z.dtype)
    keys, values = z, z
    for name, kernel in (("key_kernel", key_kernel), ("value_kernel", value_kernel)):
        if kernel is not None:
            check_shape(name, kernel, (d, d), "dd")
    if key_kernel is not None:
        keys = z @ key_kernel.astype(z.dtype)
    if value_kernel is not None:
        values = z @ value_kernel.astype(z.dtype)
    r, H = queries.shape[0], d // num_heads
    q = jnp.broadcast_to(queries.astype(z.dtype).reshape(1, r, num_heads, H),
                         (B, r, num_heads, H))
    out = dot_product_attention(q, keys.reshape(B, L, num_heads, H),
                                values.reshape(B, L, num_heads, H)).reshape(B, r, d)
    if transform is not None:
        out = transform(out)
    return masked_mean(out)
