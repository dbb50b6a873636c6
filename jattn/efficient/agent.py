"""Agent attention: a few agent tokens aggregate from the keys and broadcast back to the queries.

Agent attention (P74) puts n agent tokens A between the queries and the keys. The agents
first attend to the keys and values (agent aggregation), then every query attends to the
agents (agent broadcast):

    V_A = softmax(A K^T * scale + B1) V          [n, Hv]
    O   = softmax(Q A^T * scale + B2) V_A        [T, Hv]

Cost O(n (T + S)) instead of O(T S); O = P2 P1 V is a rank-n ("generalised linear")
attention. By default the agents are the queries average-pooled over n contiguous segments
of the sequence (the public code pools the projected queries with adaptive average
pooling); they may also be passed in. B1 and B2 are the paper's agent biases.

Causal variant (ours, not in the paper, which is noncausal). Agents pooled from the whole
query sequence would leak the future, so causally an agent is usable only once its segment
is complete: agent a, pooled from query positions [start_a, end_a), aggregates the keys
j <= last_a = end_a - 1 (top-left aligned, as ``jattn.dot_product_attention``), and query t
uses agent a only when last_a <= t. Then O_t depends on q_t, on the agents with last_a <= t
(pooled from queries at positions <= t) and on their aggregates (keys and values at
positions <= t): nothing later. Queries before the end of the first segment see no agent
and return zeros; tokens of the current, incomplete segment are not seen at all (a model
would add a local or convolutional branch, as the paper adds a depthwise convolution).

``jattn.reference.agent_attention`` is the dense ground truth: it materialises the [T, S]
weights P2 P1.

References:
    P74 Agent Attention, "Agent Attention: On the Integration of Softmax and Linear
    Attention" (Han et al.).
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from jattn.core.attention import masked_softmax
from jattn.core.shapes import (
    Array,
    DTypeError,
    accumulation_dtype,
    check_broadcastable,
    check_floating,
    check_int,
    check_qkv,
    check_rank,
    left_pad_rank,
)


def agent_segments(length: int, num_agents: int) -> tuple[np.ndarray, np.ndarray]:
    """The positions [start_a, end_a) agent a pools, as adaptive average pooling does.

    start_a = floor(a L / n), end_a = ceil((a + 1) L / n): every segment is non-empty and
    they cover the sequence; when n does not divide L neighbouring segments may share a
    position (PyTorch's ``AdaptiveAvgPool1d``, which the public code uses in 2-D).

    >>> agent_segments(10, 4)
    (array([0, 2, 5, 7]), array([ 3,  5,  8, 10]))
    """
    a = np.arange(num_agents)
    return (a * length) // num_agents, -((-(a + 1) * length) // num_agents)


def pool_agents(x: Array, num_agents: int | tuple[int, ...]) -> Array:
    """Average-pool ``[B, *spatial, N, H]`` into contiguous segments (a grid of them in 2-D).

    Along each spatial axis the segments are those of :func:`agent_segments` (adaptive
    average pooling, separable across axes as PyTorch's ``AdaptiveAvgPool2d`` that the public
    code applies to images); the agents come out flattened in row-major order of the grid.
    The mean is taken in float32 (or wider) and returned in x's dtype. For an image, pass
    ``agents=pool_agents(q_image, (7, 7))`` to :func:`agent_attention` with the queries
    flattened to [B, h w, N, H].

    Args:
        x: [B, L, N, H] or ``[B, *spatial, N, H]``.
        num_agents: segments per spatial axis: an int (one spatial axis) or a tuple with one
            positive int per axis; may exceed the axis length (segments then repeat).

    Returns:
        [B, prod(num_agents), N, H].

    Raises:
        ValueError: x of rank below 4, num_agents not a positive int per spatial axis.
        TypeError: non-floating x.

    >>> import jax.numpy as jnp
    >>> pool_agents(jnp.arange(6.0).reshape(1, 6, 1, 1), 3)[0, :, 0, 0]
    Array([0.5, 2.5, 4.5], dtype=float32)
    >>> pool_agents(jnp.arange(16.0).reshape(1, 4, 4, 1, 1), (2, 2))[0, :, 0, 0]
    Array([ 2.5,  4.5, 10.5, 12.5], dtype=float32)
    """
    if x.ndim < 4:
        raise ValueError(f"x: expected rank >= 4 [B, *spatial, N, H], got shape {x.shape}")
    check_floating("x", x)
    spatial = x.shape[1:-2]
    counts = (num_agents,) if not isinstance(num_agents, tuple | list) else tuple(num_agents)
    if len(counts) != len(spatial):
        raise ValueError(f"num_agents: expected one count per spatial axis of x {x.shape}, "
                         f"got {num_agents!r}")
    counts = tuple(check_int("num_agents", n) for n in counts)
    dtype = accumulation_dtype(x.dtype)
    pooled = x.astype(dtype)
    for axis, (length, n) in enumerate(zip(spatial, counts, strict=True), start=1):
        start, end = agent_segments(length, n)
        pos = np.arange(length)
        inside = (pos[None, :] >= start[:, None]) & (pos[None, :] < end[:, None])
        averaging = jnp.asarray(inside / (end - start)[:, None], dtype)  # [n, length]
        pooled = jnp.moveaxis(jnp.tensordot(averaging, pooled, axes=((1,), (axis,))), 0, axis)
    return pooled.reshape(x.shape[0], -1, *x.shape[-2:]).astype(x.dtype)


def _check_bias(name: str, bias, target: tuple[int, ...], letters: str) -> Array:
    bias = jnp.asarray(bias)
    check_floating(name, bias)
    if bias.ndim > 4:
        raise ValueError(f"{name}: expected at most rank 4 {list(letters)}, got {bias.shape}")
    check_broadcastable(name, left_pad_rank(bias, 4).shape, target, letters)
    return left_pad_rank(bias, 4)


def agent_attention(query: Array, key: Array, value: Array, *, num_agents: int | None = None,
                    agents: Array | None = None, agent_key_bias: Array | None = None,
                    query_agent_bias: Array | None = None, is_causal: bool = False,
                    scale: float | None = None) -> Array:
    r"""Agent attention: agents aggregate softmax(A K^T) V, queries read softmax(Q A^T) V_A.

    .. math::
        V_A = \mathrm{softmax}(\mathrm{scale}\, A K^\top + B_1)\, V, \qquad
        O = \mathrm{softmax}(\mathrm{scale}\, Q A^\top + B_2)\, V_A

    with A [n, H] the agents (per batch and query head): by default
    ``pool_agents(query, num_agents)``, the queries averaged over n contiguous segments. When
    causal, agent a (pooled from positions [start_a, end_a), last_a = end_a - 1) aggregates
    only keys j <= last_a and query t uses only agents with last_a <= t (see the module
    docstring for why this leaks nothing); a query with no usable agent returns zeros.
    Softmax statistics in float32 (or wider). Cost O(n (T + S)).

    CAB patterns: noncausal self, noncausal cross, causal self, causal cross (top-left
    aligned: key j is visible from query position j on). The causal patterns need pooled
    agents: explicit ``agents`` with ``is_causal`` raise NotImplementedError, since nothing
    says which positions they were computed from.

    Args:
        query: [B, T, N, H].
        key: [B, S, K, H]; N % K == 0 (GQA: the agents of query heads k G .. k G + G - 1,
            G = N / K, share key/value head k).
        value: [B, S, K, Hv].
        num_agents: number of agents pooled from the query (may exceed T); inferred from
            ``agents`` when those are given.
        agents: [B, n, N, H] explicit agent tokens (query dtype) instead of pooling.
        agent_key_bias: B1, broadcastable to [B, N, n, S] (e.g. [N, n, S]; missing leading
            axes are added), added to the agent-aggregation logits.
        query_agent_bias: B2, broadcastable to [B, N, T, n] (e.g. [N, T, n]), added to the
            broadcast logits.
        is_causal: the causal variant above.
        scale: logit scale of both softmaxes; default 1 / sqrt(H) (as the public code).

    Returns:
        [B, T, N, Hv] in the query's dtype.

    Raises:
        ValueError: wrong ranks, shapes that disagree, heads that do not divide, num_agents
            missing or not a positive int, agents or biases of the wrong shape.
        TypeError: non-floating or mixed dtypes.
        NotImplementedError: explicit agents with is_causal.

    >>> import jax
    >>> x = jax.random.normal(jax.random.key(0), (2, 16, 4, 8))
    >>> agent_attention(x, x, x, num_agents=4).shape
    (2, 16, 4, 8)

    References:
        P74 Agent Attention, "Agent Attention: On the Integration of Softmax and Linear
        Attention".
    """
    B, T, N, H, S, K, Hv = check_qkv(query, key, value)
    if agents is None:
        if num_agents is None:
            raise ValueError("num_agents: expected a positive int when agents is not given, "
                             "got None")
        n = check_int("num_agents", num_agents)
    else:
        check_rank("agents", agents, (4,), "[B, n, N, H]")
        check_floating("agents", agents)
        if agents.dtype != query.dtype:
            raise DTypeError(f"agents: expected the query dtype {query.dtype}, got "
                            f"{agents.dtype} (shape {agents.shape})")
        n = agents.shape[1]
        if (agents.shape[0], agents.shape[2], agents.shape[3]) != (B, N, H) or n == 0:
            raise ValueError(f"agents: expected [B={B}, n > 0, N={N}, H={H}], got "
                             f"{agents.shape}")
        if num_agents is not None and check_int("num_agents", num_agents) != n:
            raise ValueError(f"num_agents: expected {n} (agents {agents.shape}), got {num_agents}")
        if is_causal:
            raise NotImplementedError(
                "agent_attention: explicit agents cannot be causal: nothing says which query "
                "positions they depend on; pass num_agents to pool them causally")
    b1 = None if agent_key_bias is None else _check_bias(
        "agent_key_bias", agent_key_bias, (B, N, n, S), "BNnS")
    b2 = None if query_agent_bias is None else _check_bias(
        "query_agent_bias", query_agent_bias, (B, N, T, n), "BNTn")
    scale = H ** -0.5 if scale is None else scale

    G = N // K
    dtype = accumulation_dtype(query.dtype)
    q = query.astype(dtype)
    a = pool_agents(q, n) if agents is None else agents.astype(dtype)

    aggregate_allowed = broadcast_allowed = jnp.asarray(True)  # every entry
    if is_causal:
        _, end = agent_segments(T, n)
        last = end - 1
        aggregate_allowed = jnp.asarray(np.arange(S)[None, :] <= last[:, None])  # [n, S]
        broadcast_allowed = jnp.asarray(last[None, :] <= np.arange(T)[:, None])  # [T, n]

    # Agent aggregation, per kv head k and its G query heads: [B, K, G, n, S].
    logits = jnp.einsum("bakgh,bskh->bkgas", a.reshape(B, n, K, G, H), key.astype(dtype))
    logits = logits * scale
    if b1 is not None:
        logits = logits + _split_heads(b1.astype(dtype), K, G)
    agent_values = jnp.einsum("bkgas,bskv->bkgav", masked_softmax(logits, aggregate_allowed),
                              value.astype(dtype))

    # Agent broadcast: [B, N, T, n] over the agents.
    logits = jnp.einsum("btnh,banh->bnta", q, a) * scale
    if b2 is not None:
        logits = logits + b2.astype(dtype)
    probs = masked_softmax(logits, broadcast_allowed)
    out = jnp.einsum("bnta,bnav->btnv", probs, agent_values.reshape(B, N, n, Hv))
    return out.astype(query.dtype)


def _split_heads(bias: Array, K: int, G: int) -> Array:
    """[b, N or 1, x, y] -> [b, K or 1, G or 1, x, y] (query head n = k G + g)."""
    if bias.shape[1] == 1:
        return bias[:, :, None]
    return bias.reshape(bias.shape[0], K, G, *bias.shape[2:])
