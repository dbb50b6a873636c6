"""Routing attention: online k-means routes queries and keys to clusters, attention within.

The Routing Transformer (P51) replaces dense self-attention by attention inside content
clusters. Queries and keys are normalised to unit length and compared with C centroids (one
set per head, explicit state: :class:`RoutingState`); every cluster takes its ``w`` most
similar queries and its ``w`` most similar keys (balanced clusters, ``w = ceil(L / C)`` by
default) and its member queries attend to its member keys. The work is O(C w^2) per head,
O(L^1.5) with C = sqrt(L), instead of O(L^2).

References:
    P51 Routing Transformer, "Efficient Content-Based Sparse Attention with Routing
    Transformers" (Roy, Saffar, Vaswani, Grangier).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from jattn.core.attention import masked_softmax
from jattn.core.shapes import (
    Array,
    accumulation_dtype,
    check_floating,
    check_int,
    check_qkv,
    check_rank,
)

_EPS = 1e-12


class RoutingState(NamedTuple):
    """The k-means centroids of routing attention.

    centroids: [Hc, C, H] with Hc = N (one set per query head) or K (one set per key/value
    head, shared by the query heads of its group); C clusters; H the query/key head dim.
    """

    centroids: Array  # [Hc, C, H]


def init_routing_state(rng: Array, num_heads: int, num_clusters: int, head_dim: int,
                       dtype=jnp.float32) -> RoutingState:
    """Random unit-length centroids: normal draws divided by their norm.

    Args:
        key: a PRNG key.
        num_heads: Hc, the number of query heads N or of key/value heads K.
        num_clusters: C.
        head_dim: H.
        dtype: the centroids' dtype (float32 by default).

    Returns:
        RoutingState with centroids [num_heads, num_clusters, head_dim].

    Raises:
        ValueError: a size that is not a positive int.

    >>> import jax
    >>> init_routing_state(jax.random.key(0), 2, 3, 4).centroids.shape
    (2, 3, 4)
    """
    for name, n in (("num_heads", num_heads), ("num_clusters", num_clusters),
                    ("head_dim", head_dim)):
        check_int(name, n)
    c = jax.random.normal(rng, (num_heads, num_clusters, head_dim), jnp.float32)
    return RoutingState((c / jnp.linalg.norm(c, axis=-1, keepdims=True)).astype(dtype))


def _unit(x: Array) -> Array:
    """x / |x| over the last axis; a zero vector stays zero."""
    norm = jnp.sqrt(jnp.sum(x * x, axis=-1, keepdims=True))
    return x / jnp.maximum(norm, _EPS)


def _check_options(state, num_clusters, window, decay, T, S, N, K, H):
    check_int("num_clusters", num_clusters)
    if not isinstance(state, RoutingState):
        raise TypeError(f"state: expected a RoutingState, got {type(state).__name__}")
    centroids = state.centroids
    check_rank("state.centroids", centroids, (3,), "[N or K, C, H]")
    check_floating("state.centroids", centroids)
    heads, clusters, dim = centroids.shape
    if heads not in (N, K) or clusters != num_clusters or dim != H:
        raise ValueError(f"state.centroids: expected [N={N} or K={K}, C={num_clusters}, "
                         f"H={H}], got {centroids.shape}")
    if window is None:
        wq, wk = math.ceil(T / num_clusters), math.ceil(S / num_clusters)
    else:
        if check_int("window", window) > min(T, S):
            raise ValueError(f"window: expected a positive int <= min(T={T}, S={S}) or None, "
                             f"got {window!r}")
        wq = wk = window
    if not 0.0 <= float(decay) <= 1.0:
        raise ValueError(f"decay: expected a value in [0, 1], got {decay!r}")
    return wq, wk


def _route(q_hat: Array, k_hat: Array, unit_c: Array, wq: int, wk: int
           ) -> tuple[Array, Array]:
    """The w_q best queries and w_k best keys of each cluster, by unit-vector similarity."""
    B, _, N, H = q_hat.shape
    S, K = k_hat.shape[1], k_hat.shape[2]
    C, G = unit_c.shape[1], N // K
    unit_cn = unit_c if unit_c.shape[0] == N else jnp.repeat(unit_c, G, axis=0)  # [N, C, H]
    q_score = jnp.einsum("btnh,nch->bnct", q_hat, unit_cn)
    k_score = jnp.einsum("bskh,kgch->bkgcs", k_hat, unit_cn.reshape(K, G, C, H))
    # lax.top_k lists equal values in index order: ties go to the earlier position.
    _, q_idx = lax.top_k(q_score, wq)  # [B, N, C, wq]
    _, k_idx = lax.top_k(k_score.reshape(B, N, C, S), wk)  # [B, N, C, wk]
    return q_idx, k_idx


def route_to_clusters(query: Array, key: Array, state: RoutingState, *, num_clusters: int,
                      window: int | None = None) -> tuple[Array, Array]:
    """The members of each cluster, as :func:`routing_attention` picks them.

    Cluster c of query head n holds the w_q queries (and w_k keys) whose unit vectors are
    most similar to its unit centroid, most similar first, ties to the earlier position.

    Args:
        query: [B, T, N, H].
        key: [B, S, K, H]; N % K == 0.
        state: RoutingState, centroids [N or K, C, H].
        num_clusters: C.
        window: cluster size; None for ceil(T / C) queries and ceil(S / C) keys.

    Returns:
        (query positions [B, N, C, w_q], key positions [B, N, C, w_k]), int32.

    Raises:
        ValueError, TypeError: as :func:`routing_attention`.

    >>> import jax
    >>> x = jax.random.normal(jax.random.key(0), (1, 10, 2, 4))
    >>> state = init_routing_state(jax.random.key(1), 2, 3, 4)
    >>> [i.shape for i in route_to_clusters(x, x, state, num_clusters=3)]
    [(1, 2, 3, 4), (1, 2, 3, 4)]

    References:
        P51 Routing Transformer.
    """
    _, T, N, H, S, K, _ = check_qkv(query, key, key)
    wq, wk = _check_options(state, num_clusters, window, 0.0, T, S, N, K, H)
    dtype = accumulation_dtype(query.dtype)
    unit_c = _unit(lax.stop_gradient(state.centroids).astype(dtype))
    return _route(_unit(lax.stop_gradient(query).astype(dtype)),
                  _unit(lax.stop_gradient(key).astype(dtype)), unit_c, wq, wk)


def routing_attention(query: Array, key: Array, value: Array, state: RoutingState, *,
                      num_clusters: int, window: int | None = None, is_causal: bool = False,
                      update: bool = False, decay: float = 0.999,
                      scale: float | None = None) -> tuple[Array, RoutingState]:
    r"""Attention within balanced k-means clusters of queries and keys (Routing Transformer).

    With unit vectors :math:`\hat q_i = q_i/|q_i|`, :math:`\hat k_j = k_j/|k_j|` and unit
    centroids :math:`\hat\mu_c` (per head), cluster c has the members

    .. math::
        Q_c = \mathrm{top}_{w_q}\{i: \hat\mu_c \cdot \hat q_i\}, \qquad
        K_c = \mathrm{top}_{w_k}\{j: \hat\mu_c \cdot \hat k_j\}

    (ties to the smaller position; :math:`w_q = \lceil T/C \rceil`, :math:`w_k = \lceil S/C
    \rceil`, or both ``window``), so every cluster has the same size and a token is in 0, 1
    or several clusters. For :math:`i \in Q_c`, with :math:`A_c(i) = \{j \in K_c: j \le i
    \text{ if causal}\}`,

    .. math::
        o_{c,i} = \sum_{j \in A_c(i)} \mathrm{softmax}_j(\mathrm{scale}\; q_i \cdot k_j)\,
        v_j, \qquad
        \mathrm{out}_i = \frac{1}{|\{c: i \in Q_c, A_c(i) \ne \emptyset\}|}
        \sum_{c:\, i \in Q_c,\, A_c(i) \ne \emptyset} o_{c,i}

    i.e. a query's output is the average of its per-cluster outputs (as the public
    implementations scatter-mean them); a query in no cluster, or whose clusters hold no key
    it may see, outputs zeros (the library's rule for an empty row). Attention logits use the
    raw q, k; the normalised vectors only route. Routing is discrete: no gradient flows
    through it, and none into the centroids (``stop_gradient``).

    Shared or separate QK: the function routes whatever query and key it is given with the
    same centroids; pass ``key=query`` for the paper's shared-QK self-attention (what
    :class:`jattn.nn.RoutingAttention` does by default).

    Centroid update (``update=True``; the paper's mini-batch k-means): every normalised query
    and key vector routed by a centroid head (the query heads using it, every batch element,
    plus its key head's keys) is assigned to its nearest unit centroid (largest
    :math:`\hat\mu_c \cdot x`, ties to the smaller c). A cluster with assigned vectors gets
    :math:`\mu_c \leftarrow \mathrm{unit}(\lambda \mu_c + (1 - \lambda)\, m_c)` with
    :math:`m_c` their mean and :math:`\lambda` = ``decay``; the others keep their centroid.
    The paper writes half the sum over queries plus half over keys; the mean (as public
    implementations) keeps the step independent of batch size, and the renormalisation
    (spherical k-means) keeps centroids on the unit sphere that the vectors live on. Routing
    uses the centroids passed in; the new ones are returned for the next call.

    Causal (``is_causal=True``): inside a cluster, query i sees member keys j <= i
    (top-left aligned, as :func:`jattn.dot_product_attention`). The balanced selection is
    over the whole sequence, so *which* tokens share a cluster depends on later tokens (they
    compete for the w places). This leaks: the output at t can change when the query/key
    content after t changes. What is guaranteed: values after t never reach outputs at or
    before t (output[:t+1] does not depend on value[t+1:]), and with routing held fixed the
    gradient of output[:t+1] with respect to key[t+1:] is zero. The paper trains
    autoregressive language models with exactly this (masking inside clusters only). A
    strictly causal variant would assign each token to its nearest centroid only (unbalanced
    clusters), which this fixed-size O(C w^2) kernel does not do.

    CAB patterns: noncausal self, causal self (with the leak above), noncausal cross, causal
    cross (top-left aligned; same leak).

    Args:
        query: [B, T, N, H].
        key: [B, S, K, H]; N % K == 0 (GQA: keys of a K head route with the centroids of
            each query head of its group).
        value: [B, S, K, Hv].
        state: RoutingState, centroids [N or K, C, H].
        num_clusters: C.
        window: cluster size for both queries and keys; None for ceil(T / C) and ceil(S / C).
        is_causal: mask inside clusters, key position <= query position.
        update: return EMA-updated centroids (training); else ``state`` unchanged.
        decay: the EMA's lambda in [0, 1].
        scale: logits scale; default 1 / sqrt(H).

    Returns:
        (output [B, T, N, Hv] in the query's dtype, RoutingState with centroids of
        ``state``'s shape and dtype).

    Raises:
        ValueError: wrong ranks or shapes, heads that do not divide, centroids that are not
            [N or K, C, H], num_clusters not a positive int, a window outside [1, min(T, S)],
            decay outside [0, 1].
        TypeError: non-floating or mixed dtypes, a state that is not a RoutingState.

    >>> import jax, jattn
    >>> x = jax.random.normal(jax.random.key(0), (2, 16, 4, 8))
    >>> state = init_routing_state(jax.random.key(1), 4, 4, 8)
    >>> out, state = routing_attention(x, x, x, state, num_clusters=4, update=True)
    >>> out.shape, state.centroids.shape
    ((2, 16, 4, 8), (4, 4, 8))

    References:
        P51 Routing Transformer, "Efficient Content-Based Sparse Attention with Routing
        Transformers".
    """
    B, T, N, H, S, K, Hv = check_qkv(query, key, value)
    wq, wk = _check_options(state, num_clusters, window, decay, T, S, N, K, H)
    G = N // K
    scale = H ** -0.5 if scale is None else scale
    dtype = accumulation_dtype(query.dtype)

    centroids = lax.stop_gradient(state.centroids).astype(dtype)
    unit_c = _unit(centroids)  # [Hc, C, H]
    q_hat = _unit(lax.stop_gradient(query).astype(dtype))  # [B, T, N, H]
    k_hat = _unit(lax.stop_gradient(key).astype(dtype))  # [B, S, K, H]
    q_idx, k_idx = _route(q_hat, k_hat, unit_c, wq, wk)

    b = jnp.arange(B)[:, None, None, None]
    n = jnp.arange(N)[None, :, None, None]
    q_members = jnp.swapaxes(query, 1, 2)[b, n, q_idx].astype(dtype)  # [B, N, C, wq, H]
    kv_head = n // G
    k_members = jnp.swapaxes(key, 1, 2)[b, kv_head, k_idx].astype(dtype)  # [B, N, C, wk, H]
    v_members = jnp.swapaxes(value, 1, 2)[b, kv_head, k_idx].astype(dtype)  # [.., wk, Hv]

    logits = jnp.einsum("bncqh,bnckh->bncqk", q_members, k_members) * scale
    if is_causal:
        seen = k_idx[..., None, :] <= q_idx[..., :, None]  # [B, N, C, wq, wk]
    else:
        seen = jnp.ones(logits.shape, bool)
    probs = masked_softmax(logits, seen)
    per_cluster = jnp.einsum("bncqk,bnckd->bncqd", probs, v_members)  # [B, N, C, wq, Hv]

    # A query sits at most once in a cluster (top_k indices are distinct), so scatter-adding
    # the rows that saw a key, and counting them, gives the average over its clusters.
    has_key = jnp.any(seen, axis=-1).astype(dtype)  # [B, N, C, wq]
    summed = jnp.zeros((B, N, T, Hv), dtype).at[b, n, q_idx].add(
        per_cluster * has_key[..., None])
    count = jnp.zeros((B, N, T), dtype).at[b, n, q_idx].add(has_key)
    out = summed / jnp.maximum(count, 1)[..., None]
    out = jnp.swapaxes(out, 1, 2).astype(query.dtype)

    if not update:
        return out, state
    return out, RoutingState(_ema_update(centroids, unit_c, q_hat, k_hat, decay, G)
                             .astype(state.centroids.dtype))


def _ema_update(centroids: Array, unit_c: Array, q_hat: Array, k_hat: Array, decay: float,
                G: int) -> Array:
    """Mini-batch spherical k-means step on the vectors each centroid head routes."""
    B, T, N, H = q_hat.shape
    S, K = k_hat.shape[1], k_hat.shape[2]
    if centroids.shape[0] == N:
        qv = jnp.transpose(q_hat, (2, 0, 1, 3)).reshape(N, B * T, H)
        kv = jnp.transpose(jnp.repeat(k_hat, G, axis=2), (2, 0, 1, 3)).reshape(N, B * S, H)
    else:
        qv = jnp.transpose(q_hat.reshape(B, T, K, G, H), (2, 0, 1, 3, 4)).reshape(
            K, B * T * G, H)
        kv = jnp.transpose(k_hat, (2, 0, 1, 3)).reshape(K, B * S, H)
    vectors = jnp.concatenate([qv, kv], axis=1)  # [Hc, M, H]
    nearest = jnp.argmax(jnp.einsum("amh,ach->amc", vectors, unit_c), axis=-1)
    onehot = jax.nn.one_hot(nearest, unit_c.shape[1], dtype=vectors.dtype)  # [Hc, M, C]
    count = onehot.sum(1)  # [Hc, C]
    mean = jnp.einsum("amc,amh->ach", onehot, vectors) / jnp.maximum(count, 1)[..., None]
    moved = _unit(decay * centroids + (1 - decay) * mean)
    return jnp.where(count[..., None] > 0, moved, centroids)
