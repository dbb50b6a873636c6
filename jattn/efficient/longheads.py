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
after t affects out_t.

Positions. Without ``rope_base`` positions are the caller's (rotate q and k before the call,
or use none), and the attention is softmax attention under a per-query, per-head block
selection (:func:`jattn.masks.block_selection`) and the causal mask: on the chunked path a
tile of each (batch row, head) is visited when any of its queries picked that chunk, with no
gathered copy of the keys; chunk scores cost O(T * T / chunk_size).

With ``rope_base`` the function takes unrotated queries and keys and applies the paper's
position remapping: per query and head, the selected chunks are laid side by side in their
original order (chunk 0 first, the own chunk last), so the token at offset o of the chunk in
slot r takes position r * chunk_size + o, and the query the position of its own offset in the
last slot, (n - 1) * chunk_size + t mod chunk_size, n the number of chunks it selected (n =
min(top_k, i + 1)). Both are rotated there (:func:`jattn.positions.apply_rope`): a head never
sees a distance of top_k * chunk_size or more, whatever the sequence length, which is how
LongHeads keeps a model trained on short sequences in distribution. While a query has no more
than top_k chunks to choose from (i < top_k) the layout is the identity. Chunk summaries and
scores use the unrotated queries and keys. Each query has its own layout, so this path gathers
each query's selected chunks (top_k * chunk_size keys per query and head, a block of queries
at a time, recomputed in the backward pass): O(T top_k chunk_size) time, memory bounded by
the block.

Reading of the paper's rule: the public code (github.com/LuLuLuyi/LongHeads,
modeling_longheads/modeling_llama.py) gathers a query's selected chunks sorted by chunk index,
concatenates them, rotates the concatenation at positions 0, 1, ... and the query at the
position of its own token at the end ((chunks - 1) * window + offset), at prefill and when
decoding. That code also always keeps the chunk before the own chunk and pools its summaries
from keys rotated by their offset in the chunk; here the selection is the rule above and the
summaries are of the unrotated vectors.

Decoding (:func:`longheads_decode`): new tokens against a :class:`LongHeadsCache`. The
attention-pooled summary of a chunk needs its mean query, which a KV cache does not keep, so
the cache also holds each chunk's running query sum and the summary key of each complete
chunk, computed once, by the call that completes it (as the public code caches its chunk
keys). Each new token selects and positions its chunks by the same rule: a prefill followed
by steps equals one call over the whole sequence.

References:
    P61 LongHeads, "LongHeads: Multi-Head Attention is Secretly a Long Context Processor".
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jattn.core import masks
from jattn.core.attention import (
    dot_product_attention,
    hashable_implementation,
    masked_softmax,
)
from jattn.core.cache import KVCache, _check_new_tokens, init_cache, write_cache
from jattn.core.positions import apply_rope, rope_frequencies
from jattn.core.shapes import Array, accumulation_dtype, check_int, check_qkv
from jattn.efficient.landmark import _blocks, _gather_blocks

SUMMARIES = ("attention", "mean")
_QUERY_BLOCK = 32  # queries whose selected chunks the remapped path gathers at once


class LongHeadsCache(NamedTuple):
    """Decoding state of LongHeads attention (:func:`longheads_decode`): the KV cache and,
    per chunk, the running sum of its queries and its summary key (once complete).

    query_sum and summary_keys are float32 (float64 for float64 caches); num_chunks =
    ceil(max_length / chunk_size).
    """

    kv: KVCache  # unrotated key [B, max_length, K, H], value [B, max_length, K, Hv], length
    query_sum: Array  # [B, num_chunks, N, H]: sum of the queries of each chunk seen so far
    summary_keys: Array  # [B, num_chunks, N, H]: c_j of each complete chunk j (else 0)


def init_longheads_cache(batch: int, max_length: int, num_heads: int, num_kv_heads: int,
                         head_dim: int, *, chunk_size: int, value_head_dim: int | None = None,
                         dtype=jnp.float32) -> LongHeadsCache:
    """An empty :class:`LongHeadsCache` of ``max_length`` positions.

    Args:
        batch: B.
        max_length: positions the cache holds.
        num_heads: N query heads (the summaries are per query head).
        num_kv_heads: K key/value heads, N % K == 0.
        head_dim: H; value_head_dim: Hv (default H).
        chunk_size: tokens per chunk, as given to :func:`longheads_decode`.
        dtype: of the keys and values.

    Returns:
        LongHeadsCache with length 0.

    Raises:
        ValueError: a size that is not a positive int, heads that do not divide.

    >>> init_longheads_cache(1, 10, 4, 2, 8, chunk_size=4).summary_keys.shape
    (1, 3, 4, 8)
    """
    for name, n in (("batch", batch), ("max_length", max_length), ("num_heads", num_heads),
                    ("num_kv_heads", num_kv_heads), ("head_dim", head_dim),
                    ("chunk_size", chunk_size)):
        check_int(name, n)
    if num_heads % num_kv_heads:
        raise ValueError(f"num_kv_heads: expected a divisor of num_heads={num_heads}, got "
                         f"{num_kv_heads}")
    sums = jnp.zeros((batch, -(-max_length // chunk_size), num_heads, head_dim),
                     accumulation_dtype(dtype))
    kv = init_cache(batch, max_length, num_kv_heads, head_dim, value_head_dim=value_head_dim,
                    dtype=dtype)
    return LongHeadsCache(kv, sums, sums)


def longheads_attention(query: Array, key: Array, value: Array, *, chunk_size: int, top_k: int,
                        scale: float | None = None, summary: str = "attention",
                        rope_base: float | None = None, rope_fraction: float = 1.0,
                        rope_scaling: str | None = None, rope_factor: float = 1.0,
                        implementation="chunked") -> Array:
    r"""Causal attention of each query, per head, over the first chunk, its own chunk and the
    ``top_k - 2`` earlier chunks whose summary keys score highest against it.

    .. math::
        c_j = \mathrm{softmax}(\mathrm{scale}\;\bar q_j K_j^\top) K_j,\quad
        \mathcal{C}(t) = \{0, i(t)\} \cup \mathrm{top}_{k-2}\{j: 1 \le j < i(t)\}\;
        q_t \cdot c_j,\\
        \mathrm{out}_t = \sum_{s \le t,\; s \in \cup_{j \in \mathcal{C}(t)} j}
            \mathrm{softmax}_s(\mathrm{scale}\; R_{P_t} q_t \cdot R_{P_{ts}} k_s)\, v_s

    per query head (GQA: head n reads key head n // (N / K)); i(t) = t // chunk_size, q̄_j the
    mean query of chunk j. Without ``rope_base`` R is the identity; with it R_p is the rotary
    embedding at position p, P_ts = r c + (s mod c) for s in the chunk in slot r of C(t) in
    ascending order, ``P_t = (|C(t)| - 1) c + (t mod c)``, c = chunk_size (the module docstring
    has the paper's rule). Ties go to the lower chunk index. With top_k >= the number of
    chunks this is plain causal attention (with rope_base: at positions 0 .. T - 1).

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
        rope_base: None (positions are the caller's), or the rotary base: query and key are
            unrotated and rotated here at the remapped positions.
        rope_fraction, rope_scaling, rope_factor: the rotary embedding's other options
            (``fraction``, ``scaling``, ``factor`` of :func:`jattn.positions.apply_rope`).
        implementation: as in :func:`jattn.dot_product_attention` (default "chunked"), for
            the block-selection path; the remapped path gathers and takes only the default.

    Returns:
        [B, T, N, Hv] in the query's dtype.

    Raises:
        ValueError: wrong ranks or shapes, heads that do not divide, chunk_size < 1,
            top_k < 2, an unknown summary, bad rope options, an implementation with
            rope_base.
        TypeError: non-floating or mixed dtypes, non-int chunk_size or top_k.
        NotImplementedError: key length != query length (cross attention).

    >>> import jax
    >>> from jattn.efficient.longheads import longheads_attention
    >>> x = jax.random.normal(jax.random.key(0), (1, 20, 2, 8))
    >>> longheads_attention(x, x, x, chunk_size=4, top_k=3).shape
    (1, 20, 2, 8)
    >>> longheads_attention(x, x, x, chunk_size=4, top_k=3, rope_base=1e4).shape
    (1, 20, 2, 8)

    References:
        P61 LongHeads, "LongHeads: Multi-Head Attention is Secretly a Long Context
        Processor".
    """
    _, T, _, H, S, _, _ = check_qkv(query, key, value)
    chunk_size, top_k, rope = _check_options(H, chunk_size, top_k, summary, rope_base,
                                             rope_fraction, rope_scaling, rope_factor)
    if S != T:
        raise NotImplementedError(
            f"key: LongHeads is causal self-attention; cross attention (key length {S} != "
            f"query length {T}, key {key.shape}, query {query.shape}) is not supported")
    if rope is not None and implementation not in (None, "chunked"):
        raise ValueError(f"implementation: the remapped path (rope_base) gathers each query's "
                         f"chunks and has no backends, got {implementation!r}")
    scale = H ** -0.5 if scale is None else float(scale)
    return _longheads_attention(query, key, value, chunk_size, top_k, scale, summary, rope,
                                hashable_implementation(implementation))


@functools.partial(jax.jit, static_argnums=(3, 4, 5, 6, 7, 8))
def _longheads_attention(query: Array, key: Array, value: Array, c: int, top_k: int,
                         scale: float, summary: str, rope: tuple | None,
                         implementation) -> Array:
    """:func:`longheads_attention` after its checks, as one program."""
    B, T, N, H = query.shape
    K = key.shape[2]
    dtype = accumulation_dtype(query.dtype)
    m = -(-T // c)
    q = query.reshape(B, T, K, N // K, H)
    key_blocks = _blocks(key, c)  # [B, K, m, c, H]
    q_mean = jnp.pad(q.astype(dtype), [(0, 0), (0, m * c - T), (0, 0), (0, 0), (0, 0)])
    q_mean = q_mean.reshape(B, m, c, K, N // K, H).sum(2) / c
    position = jnp.arange(T)
    chunks = _selected_chunks(q, _summaries(q_mean, key_blocks, scale, summary), position, c,
                              top_k)
    if rope is None:
        mask = masks.block_selection(jnp.moveaxis(chunks.reshape(B, T, N, -1), 1, 2), 1, c)
        return dot_product_attention(query, key, value, mask=mask & masks.causal(),
                                     scale=scale, implementation=implementation)
    out = _gathered_attention(q, key_blocks, _blocks(value, c), chunks, position, c, scale,
                              rope)
    return out.reshape(B, T, N, -1).astype(query.dtype)


def longheads_decode(query: Array, key: Array, value: Array, cache: LongHeadsCache, *,
                     chunk_size: int, top_k: int, scale: float | None = None,
                     summary: str = "attention", rope_base: float | None = None,
                     rope_fraction: float = 1.0, rope_scaling: str | None = None,
                     rope_factor: float = 1.0) -> tuple[Array, LongHeadsCache]:
    r"""LongHeads attention of T new tokens against a :class:`LongHeadsCache` (a prompt, or
    one token per step); the updated cache.

    Writes the new keys and values (unrotated when ``rope_base`` is given) into the cache,
    adds the new queries to their chunks' query sums, computes the summary key of each chunk
    that the new tokens complete (and only those: a chunk's summary is computed once), then
    each new token at position p = length + t selects chunk 0, its own chunk and the
    ``top_k - 2`` best complete chunks before it by q . c_j, and attends causally over their
    tokens, gathered from the cache, with the remapped rotary positions when ``rope_base`` is
    given: :func:`longheads_attention`'s rows p of the whole sequence, at O(S / chunk_size +
    top_k chunk_size) per token.

    Args:
        query: [B, T, N, H], key: [B, T, K, H], value: [B, T, K, Hv] of the new tokens.
        cache: from :func:`init_longheads_cache` (with this chunk_size) or a previous call
            with the same options.
        chunk_size, top_k, scale, summary, rope_base, rope_fraction, rope_scaling, rope_factor: as
            in :func:`longheads_attention`.

    Returns:
        (output [B, T, N, Hv] in the query's dtype, the updated cache).

    Raises:
        ValueError: shapes that do not match each other or the cache, a cache with a window
            or built for another chunk_size, more tokens than free slots (when the length
            is known), bad options as in :func:`longheads_attention`.
        TypeError: non-floating or mixed dtypes, non-int chunk_size or top_k.

    >>> import jax
    >>> x = jax.random.normal(jax.random.key(0), (1, 9, 2, 8))
    >>> cache = init_longheads_cache(1, 9, 2, 2, 8, chunk_size=2)
    >>> options = dict(chunk_size=2, top_k=3, rope_base=1e4)
    >>> first, cache = longheads_decode(x[:, :8], x[:, :8], x[:, :8], cache, **options)
    >>> last, cache = longheads_decode(x[:, 8:], x[:, 8:], x[:, 8:], cache, **options)
    >>> full = longheads_attention(x, x, x, **options)
    >>> bool(jnp.allclose(last, full[:, 8:], atol=1e-5)), int(cache.kv.length)
    (True, 9)

    References:
        P61 LongHeads, "LongHeads: Multi-Head Attention is Secretly a Long Context
        Processor".
    """
    B, T, N, H, S, _, _ = check_qkv(query, key, value)
    chunk_size, top_k, rope = _check_options(H, chunk_size, top_k, summary, rope_base,
                                             rope_fraction, rope_scaling, rope_factor)
    if S != T:
        raise ValueError(f"key: expected the new tokens' keys [B, T={T}, K, H] (as query "
                         f"{query.shape}), got {key.shape}")
    if not isinstance(cache, LongHeadsCache):
        raise ValueError(f"cache: expected a LongHeadsCache (init_longheads_cache), got "
                         f"{type(cache).__name__}")
    if cache.kv.window is not None:
        raise ValueError(f"cache: LongHeads selects among all earlier chunks and needs every "
                         f"position, got a ring of window={cache.kv.window}")
    _check_new_tokens(cache.kv, key, value)
    chunks = (B, -(-cache.kv.key.shape[1] // chunk_size), N, H)
    for name in ("query_sum", "summary_keys"):
        if getattr(cache, name).shape != chunks:
            raise ValueError(f"cache: expected {name} [B, ceil(max_length / chunk_size="
                             f"{chunk_size}), N, H] = {chunks}, got "
                             f"{getattr(cache, name).shape}")
    scale = H ** -0.5 if scale is None else float(scale)
    return _longheads_decode(query, key, value, cache, chunk_size, top_k, scale, summary, rope)


@functools.partial(jax.jit, static_argnums=(4, 5, 6, 7, 8))
def _longheads_decode(query: Array, key: Array, value: Array, cache: LongHeadsCache, c: int,
                      top_k: int, scale: float, summary: str, rope: tuple | None
                      ) -> tuple[Array, LongHeadsCache]:
    """:func:`longheads_decode` after its checks, as one program."""
    B, T, N, H = query.shape
    K = key.shape[2]
    G = N // K
    m = cache.query_sum.shape[1]
    start = cache.kv.length
    kv = write_cache(cache.kv, key, value)
    position = start + jnp.arange(T, dtype=start.dtype)
    query_sum = cache.query_sum.at[:, position // c].add(query.astype(cache.query_sum.dtype))
    key_blocks = _blocks(kv.key.astype(query.dtype), c)  # [B, K, m, c, H]
    # The chunks the new tokens fall in; those now complete get their summary (once: a chunk
    # completed by an earlier call is not among them).
    touched = start // c + jnp.arange(min((T - 1) // c + 2, m))
    inside = jnp.minimum(touched, m - 1)
    q_mean = query_sum[:, inside].reshape(B, -1, K, G, H) / c
    new = _summaries(q_mean, key_blocks[:, :, inside], scale, summary)
    complete = (touched + 1) * c <= kv.length
    summary_keys = cache.summary_keys.at[:, jnp.where(complete, touched, m)].set(
        new.reshape(B, -1, N, H).astype(cache.summary_keys.dtype), mode="drop")
    q = query.reshape(B, T, K, G, H)
    chunks = _selected_chunks(q, summary_keys.reshape(B, m, K, G, H), position, c, top_k)
    out = _gathered_attention(q, key_blocks, _blocks(kv.value.astype(query.dtype), c), chunks,
                              position, c, scale, rope)
    out = out.reshape(B, T, N, -1).astype(query.dtype)
    return out, LongHeadsCache(kv, query_sum, summary_keys)


def _check_options(head_dim: int, chunk_size, top_k, summary, base, fraction, scaling,
                   factor) -> tuple[int, int, tuple | None]:
    """(chunk_size, top_k, :func:`apply_rope`'s options as a hashable tuple or None without a
    rotary base), checked with the argument names of :func:`longheads_attention`."""
    chunk_size = check_int("chunk_size", chunk_size)
    if check_int("top_k", top_k, minimum=None) < 2:
        raise ValueError(f"top_k: expected >= 2 (the first and the own chunk are always "
                         f"kept), got {top_k}")
    if summary not in SUMMARIES:
        raise ValueError(f"summary: expected one of {SUMMARIES}, got {summary!r}")
    if base is None:
        return chunk_size, top_k, None
    if isinstance(base, bool) or not isinstance(base, int | float | np.number) or base <= 0:
        raise ValueError(f"rope_base: expected None or a number > 0, got {base!r}")
    options = dict(base=float(base), fraction=fraction, scaling=scaling, factor=factor)
    try:
        rope_frequencies(head_dim, **options)
    except ValueError as error:  # "fraction: ..." -> "rope_fraction: ..."
        raise ValueError(f"rope_{error}") from None
    return chunk_size, top_k, tuple(options.items())


def _summaries(q_mean: Array, key_blocks: Array, scale: float, summary: str) -> Array:
    """Summary keys c_j [B, m, K, G, H] (float32 or wider) of chunks key_blocks
    [B, K, m, c, H] with mean queries q_mean [B, m, K, G, H]. A partial last chunk's summary
    (padded keys included) is never used: queries use complete chunks only."""
    dtype = accumulation_dtype(q_mean.dtype)
    kb = key_blocks.astype(dtype)
    if summary == "mean":
        return jnp.broadcast_to(jnp.moveaxis(kb.mean(3), 1, 2)[:, :, :, None], q_mean.shape)
    logits = jnp.einsum("bmkgh,bkmch->bmkgc", q_mean.astype(dtype), kb) * scale
    return jnp.einsum("bmkgc,bkmch->bmkgh", jax.nn.softmax(logits, axis=-1), kb)


def _selected_chunks(q: Array, summary_keys: Array, position: Array, c: int,
                     top_k: int) -> Array:
    """Each query's chunks [B, T, K, G, W] in ascending order, -1 (unused slots) last: chunk
    0, its own chunk position // c and the top_k - 2 chunks among 1 .. own - 1 whose summary
    keys summary_keys [B, m, K, G, H] score highest against q [B, T, K, G, H] (ties to the
    lower index)."""
    B, T, K, G, _ = q.shape
    m = summary_keys.shape[1]
    dtype = summary_keys.dtype
    own = (position // c).astype(jnp.int32)
    scores = lax.stop_gradient(jnp.einsum("btkgh,bmkgh->btkgm", q.astype(dtype), summary_keys))
    j = jnp.arange(m)
    candidate = (j >= 1) & (j < own[:, None])  # [T, m]
    scores = jnp.where(candidate[None, :, None, None, :], scores, -jnp.inf)
    shape = (B, T, K, G, 1)
    chunks = [jnp.zeros(shape, jnp.int32),
              jnp.broadcast_to(jnp.where(own > 0, own, -1)[None, :, None, None, None], shape)]
    n_more = min(top_k - 2, max(m - 2, 0))
    if n_more:
        best, index = lax.top_k(scores, n_more)
        chunks.append(jnp.where(jnp.isfinite(best), index, -1).astype(jnp.int32))
    chunks = jnp.concatenate(chunks, -1)
    ordered = jnp.sort(jnp.where(chunks >= 0, chunks, m), axis=-1)
    return jnp.where(ordered < m, ordered, -1)


def _gathered_attention(q: Array, key_blocks: Array, value_blocks: Array, chunks: Array,
                        position: Array, c: int, scale: float, rope: tuple | None) -> Array:
    """out [B, T, K, G, Hv] (float32 or wider): query q [B, T, K, G, H] at position [T]
    attends to the tokens at positions <= its own of its chunks [B, T, K, G, W] (ascending,
    -1 last), gathered from key_blocks [B, K, m, c, H] and value_blocks [B, K, m, c, Hv];
    with ``rope`` (apply_rope's options) the key at offset o of slot w is rotated at w c + o
    and the query at (used slots - 1) c + position mod c. A block of queries at a time,
    recomputed in the backward pass, so the gathered keys take O(block W c H) memory."""
    B, T, K, G, H = q.shape
    W = chunks.shape[-1]
    dtype = accumulation_dtype(q.dtype)
    Q = min(_QUERY_BLOCK, T)
    nq = -(-T // Q)
    pad = nq * Q - T

    def blocks_of(x, fill=0):
        x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2), constant_values=fill)
        return jnp.moveaxis(x.reshape(B, nq, Q, *x.shape[2:]), 1, 0)

    @jax.checkpoint
    def block(args):
        q_blk, c_blk, p_blk = args  # [B, Q, K, G, H], [B, Q, K, G, W], [Q]
        index = jnp.moveaxis(jnp.maximum(c_blk, 0), 1, 3)  # [B, K, G, Q, W]
        k_sel = _gather_blocks(key_blocks, index)  # [B, K, G, Q, W, c, H]
        v_sel = _gather_blocks(value_blocks, index).reshape(B, K, G, Q, W * c, -1)
        if rope is not None:
            used = (c_blk >= 0).sum(-1)  # [B, Q, K, G]
            remapped = (used - 1) * c + (p_blk % c)[None, :, None, None]
            q_blk = apply_rope(q_blk.reshape(-1, 1, 1, H), remapped.reshape(-1, 1),
                               **dict(rope)).reshape(q_blk.shape)
            k_sel = apply_rope(k_sel.reshape(-1, W * c, 1, H), jnp.arange(W * c),
                               **dict(rope)).reshape(k_sel.shape)
        logits = jnp.einsum("bqkgh,bkgqwjh->bqkgwj", q_blk, k_sel,
                            preferred_element_type=dtype) * scale
        token = c_blk[..., None] * c + jnp.arange(c)  # [B, Q, K, G, W, c]
        seen = (c_blk[..., None] >= 0) & (token <= p_blk[None, :, None, None, None, None])
        weights = masked_softmax(logits.reshape(B, Q, K, G, W * c),
                                 seen.reshape(B, Q, K, G, W * c))
        return jnp.einsum("bqkgj,bkgqjd->bqkgd", weights, v_sel.astype(dtype))

    # Padded queries select nothing (-1) and give zeros.
    out = lax.map(block, (blocks_of(q), blocks_of(chunks, -1),
                          jnp.pad(position, (0, pad)).reshape(nq, Q)))
    return jnp.moveaxis(out, 0, 1).reshape(B, nq * Q, K, G, -1)[:, :T]
