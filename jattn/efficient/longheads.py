"""LongHeads (P61): per head, each query attends to a few chunks picked by query/chunk scores.

The keys are cut into chunks of ``chunk_size`` tokens (the last one partial when the length
is not a multiple). Each chunk gets one summary key per head. The paper's summary (the
default, ``summary="attention"``) is an attention-pooled key: the mean query of the chunk,
q̄_j, attends over the chunk's own keys, c_j = softmax(scale q̄_j K_j^T) K_j; ``summary="mean"``
uses the plain mean of the chunk's keys instead. A query at position t in chunk i, per head,
keeps the first chunk (attention sinks) and its own chunk i always, plus the ``top_k - 2``
chunks among 1 .. i - 1 (complete chunks strictly between them, all ending before t) with
the highest q_t . c_j, and attends causally (keys at positions <= t) to the tokens of those
chunks, in one softmax. A summary is used only by queries after its whole chunk, so nothing
after t affects out_t. The attention is softmax attention under a per-query, per-head block
selection (:func:`jattn.masks.block_selection`) and the causal mask: on the chunked path a
tile of each (batch row, head) is visited when any of its queries picked that chunk, with
no gathered copy of the keys; chunk scores cost O(T * T / chunk_size).

LongHeads also remaps the positions of the selected chunks to stay within the trained
length; that concerns position encodings applied before this function (rotary embeddings
are the caller's), so it is not part of this primitive.

References:
    P61 LongHeads, "LongHeads: Multi-Head Attention is Secretly a Long Context Processor".
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from jax import lax

from jattn.core import masks
from jattn.core.attention import dot_product_attention, masked_softmax
from jattn.core.shapes import Array, accumulation_dtype, check_int, check_qkv

SUMMARIES = ("attention", "mean")


def longheads_attention(query: Array, key: Array, value: Array, *, chunk_size: int, top_k: int,
                        scale: float | None = None, summary: str = "attention",
                        implementation="chunked") -> Array:
    r"""Causal attention of each query, per head, over the first chunk, its own chunk and the
    ``top_k - 2`` earlier chunks whose summary keys score highest against it.

    .. math::
        c_j = \mathrm{softmax}(\mathrm{scale}\;\bar q_j K_j^\top) K_j,\quad
        \mathcal{C}(t) = \{0, i(t)\} \cup \mathrm{top}_{k-2}\{j: 1 \le j < i(t)\}\;
        q_t \cdot c_j,\\
        \mathrm{out}_t = \sum_{s \le t,\; s \in \cup_{j \in \mathcal{C}(t)} j}
            \mathrm{softmax}_s(\mathrm{scale}\; q_t \cdot k_s)\, v_s

    per query head (GQA: head n reads key head n // (N / K)); i(t) = t // chunk_size, q̄_j the
    mean query of chunk j. Ties go to the lower chunk index. With top_k >= the number of chunks
    this is plain causal attention.

    CAB patterns: causal self only. Noncausal attention and cross attention raise
    NotImplementedError: chunks are chosen among those before the query in one sequence,
    and the summaries are pooled by the chunk's own queries, which need query and key
    positions to be the same.

    Args:
        query: [B, T, N, H].
        key: [B, T, K, H], N % K == 0 (the query's length).
        value: [B, T, K, Hv].
        chunk_size: tokens per chunk, >= 1.
        top_k: chunks per query and head, including the first and the own chunk, >= 2.
        scale: logits scale (also in the attention-pooled summaries); default 1 / sqrt(H).
        summary: "attention" (the paper's attention-pooled key) or "mean" (mean key).
        implementation: as in :func:`jattn.dot_product_attention` (default "chunked").

    Returns:
        [B, T, N, Hv] in the query's dtype.

    Raises:
        ValueError: wrong ranks or shapes, heads that do not divide, chunk_size < 1,
            top_k < 2, an unknown summary.
        TypeError: non-floating or mixed dtypes, non-int chunk_size or top_k.
        NotImplementedError: key length != query length (cross attention).

    >>> import jax
    >>> from jattn.efficient.longheads import longheads_attention
    >>> x = jax.random.normal(jax.random.key(0), (1, 20, 2, 8))
    >>> longheads_attention(x, x, x, chunk_size=4, top_k=3).shape
    (1, 20, 2, 8)

    References:
        P61 LongHeads, "LongHeads: Multi-Head Attention is Secretly a Long Context
        Processor".
    """
    B, T, N, H, S, K, _ = check_qkv(query, key, value)
    check_int("chunk_size", chunk_size)
    if check_int("top_k", top_k, minimum=None) < 2:
        raise ValueError(f"top_k: expected >= 2 (the first and the own chunk are always "
                         f"kept), got {top_k}")
    if summary not in SUMMARIES:
        raise ValueError(f"summary: expected one of {SUMMARIES}, got {summary!r}")
    if S != T:
        raise NotImplementedError(
            f"key: LongHeads is causal self-attention; cross attention (key length {S} != "
            f"query length {T}, key {key.shape}, query {query.shape}) is not supported")
    scale = H ** -0.5 if scale is None else scale
    dtype = accumulation_dtype(query.dtype)
    G, c = N // K, chunk_size
    m = -(-T // c)
    pad = [(0, 0), (0, m * c - T), (0, 0), (0, 0)]
    q = query.astype(dtype).reshape(B, T, K, G, H)
    kc = jnp.pad(key.astype(dtype), pad).reshape(B, m, c, K, H)
    real = np.arange(m * c).reshape(m, c) < T  # [m, c]

    # Summaries (only those of complete chunks before a query are ever used).
    if summary == "mean":
        summ = jnp.broadcast_to((kc.sum(2) / c)[:, :, :, None], (B, m, K, G, H))
    else:
        qc = jnp.pad(q, [*pad, (0, 0)]).reshape(B, m, c, K, G, H)
        q_mean = qc.sum(2) / jnp.asarray(np.maximum(real.sum(1), 1), dtype)[:, None, None,
                                                                             None]
        pool = masked_softmax(jnp.einsum("bmkgh,bmckh->bmkgc", q_mean, kc) * scale,
                               jnp.asarray(real)[None, :, None, None, :])
        summ = jnp.einsum("bmkgc,bmckh->bmkgh", pool, kc)
    scores = lax.stop_gradient(jnp.einsum("btkgh,bmkgh->btkgm", q, summ))
    own = np.arange(T) // c
    candidate = (np.arange(m)[None, :] >= 1) & (np.arange(m)[None, :] < own[:, None])
    scores = jnp.where(jnp.asarray(candidate)[None, :, None, None, :], scores, -jnp.inf)

    shape = (B, T, K, G, 1)
    chunks = [jnp.zeros(shape, jnp.int32), jnp.broadcast_to(jnp.asarray(own, jnp.int32)
                                                             [None, :, None, None, None], shape)]
    ok = [jnp.ones(shape, bool), jnp.broadcast_to(jnp.asarray(own > 0)[None, :, None, None,
                                                                         None], shape)]
    n_more = min(top_k - 2, max(m - 2, 0))
    if n_more:
        best, idx = lax.top_k(scores, n_more)
        chunks.append(idx.astype(jnp.int32))
        ok.append(jnp.isfinite(best))
    chunks = jnp.where(jnp.concatenate(ok, -1), jnp.concatenate(chunks, -1), -1)
    chunks = jnp.moveaxis(chunks.reshape(B, T, N, -1), 1, 2)  # [B, N, T, W], -1: unused slot
    mask = masks.block_selection(chunks, 1, c) & masks.causal()
    return dot_product_attention(query, key, value, mask=mask, scale=scale,
                                 implementation=implementation)
