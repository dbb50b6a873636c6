"""Landmark attention: a landmark key per block gates attention to that block's tokens.

Landmark attention (P21) cuts the key sequence into blocks of ``block_size`` tokens; in the
paper a landmark token is inserted after each block and its key comes to represent the
block. A query at position i, in block b(i), attends through a grouped softmax:

* one softmax group ("own group") holds the query's own block's tokens (those at positions
  <= i when causal) and the landmarks of the other blocks (the earlier blocks when causal);
  its own block's landmark is ignored;
* the tokens of every other block c form a group of their own, softmaxed within the block;
* the final weight of a token in its own block is its own-group probability; of a token j
  in another block c it is (within-block probability of j) * (own-group probability of
  landmark c); landmarks themselves get weight 0. The weights sum to one.

At inference (``top_k``) each query keeps only the k other blocks whose landmarks score
highest (per query and head; ties to the earlier block) and applies the same grouped
softmax with the landmarks and tokens of the blocks not kept removed: cost O(T (S / block_size
+ (k + 1) block_size)) instead of O(T S). When k covers all the candidate blocks this is
exactly the training-time attention (the public code does the same: its cache puts the
retrieved blocks, landmarks included, back into the grouped softmax). The training form
(``top_k=None``) computes every score, O(T S) like softmax attention, as in the paper.

Here the landmark keys are an input [B, num_blocks, K, H], one per block, num_blocks =
ceil(S / block_size): the keys of the inserted landmark tokens (their values are never
used, since landmarks get weight 0). When causal the last block's landmark is never used
(no query follows it), so a final partial block needs no real landmark; any value works.

CAB patterns: causal self (the paper's) and noncausal self (every other block is gated by
its landmark). Cross attention raises NotImplementedError: each query is placed in the block
of the key sequence at its own position, which a separate query sequence (T != S) does not
have.

``jattn.reference.landmark_attention`` is the dense ground truth: it builds the sequence
with the landmark tokens inserted and applies the paper's grouping and weights literally.

References:
    P21 Landmark Attention, "Landmark Attention: Random-Access Infinite Context Length for
    Transformers" (Mohtashami and Jaggi).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jattn.core import masks
from jattn.core.attention import dot_product_attention, hashable_implementation
from jattn.core.shapes import (
    Array,
    DTypeError,
    accumulation_dtype,
    check_floating,
    check_int,
    check_qkv,
    check_rank,
    is_concrete,
)


def num_blocks(length: int, block_size: int) -> int:
    """ceil(length / block_size): the number of blocks (and landmark keys) of a sequence.

    >>> num_blocks(11, 4)
    3
    """
    return -(-length // block_size)


def _check_landmark_args(landmark_keys: Array, query: Array, key: Array, block_size,
                         top_k) -> tuple[int, int | None, int]:
    """Validate block_size, top_k and landmark_keys [B, ceil(S / block_size), K, H] in the
    query's dtype (query and key already checked): (block_size, top_k, block count)."""
    bs = check_int("block_size", block_size)
    k_top = check_int("top_k", top_k, minimum=0, allow_none=True)
    B, S, K, H = key.shape
    nb = num_blocks(S, bs)
    check_rank("landmark_keys", landmark_keys, (4,), "[B, num_blocks, K, H]")
    check_floating("landmark_keys", landmark_keys)
    if landmark_keys.dtype != query.dtype:
        raise DTypeError(f"landmark_keys: expected the query dtype {query.dtype}, got "
                        f"{landmark_keys.dtype} (shape {landmark_keys.shape})")
    if landmark_keys.shape != (B, nb, K, H):
        raise ValueError(f"landmark_keys: expected [B, num_blocks=ceil({S}/{bs}), K, H] = "
                         f"{(B, nb, K, H)}, got {landmark_keys.shape}")
    return bs, k_top, nb


def _blocks(x: Array, bs: int) -> Array:
    """[B, S, K, D] -> [B, K, num_blocks, bs, D], the last block zero-padded."""
    B, S, K, D = x.shape
    nb = num_blocks(S, bs)
    x = jnp.pad(x, ((0, 0), (0, nb * bs - S), (0, 0), (0, 0)))
    return jnp.moveaxis(x.reshape(B, nb, bs, K, D), 3, 1)


# blocks [B, K, nb, bs, D] gathered at indices [B, K, ...] -> [B, K, ..., bs, D]
_gather_blocks = jax.vmap(jax.vmap(lambda table, i: table[i]))


def landmark_attention(query: Array, key: Array, value: Array, landmark_keys: Array, *,
                       block_size: int, is_causal: bool = True, top_k: int | None = None,
                       scale: float | None = None, implementation="chunked") -> Array:
    r"""Grouped-softmax attention in which each block's landmark gates its tokens.

    .. math::
        s_{ij} = \mathrm{scale}\, q_i \cdot k_j, \quad \ell_{ic} = \mathrm{scale}\,
        q_i \cdot l_c, \quad Z_i = \sum_{j \in b(i)} e^{s_{ij}} + \sum_{c \in C(i)}
        e^{\ell_{ic}}

        \mathrm{out}_i = \sum_{j \in b(i)} \frac{e^{s_{ij}}}{Z_i} v_j
            + \sum_{c \in C(i)} \frac{e^{\ell_{ic}}}{Z_i} \sum_{j \in c}
            \frac{e^{s_{ij}}}{\sum_{j' \in c} e^{s_{ij'}}} v_j

    where b(i) is the query's own block (positions <= i when causal) and C(i) the other
    blocks (the earlier ones when causal); with ``top_k`` = k, C(i) keeps only the k blocks
    of highest \ell_{ic} (ties to the earlier block). Softmax statistics in float32 (or
    wider). Lengths that are not a multiple of block_size end in a shorter block.

    CAB patterns: causal self, noncausal self; cross (T != S) raises NotImplementedError.

    Args:
        query: [B, T, N, H], T == S.
        key: [B, S, K, H]; N % K == 0.
        value: [B, S, K, Hv].
        landmark_keys: [B, num_blocks, K, H], num_blocks = ceil(S / block_size), query dtype:
            the key of block c's landmark (the last one is unused when causal).
        block_size: tokens per block (the last block may be shorter).
        is_causal: query i sees positions <= i of its own block and the earlier blocks.
        top_k: None (training: every block) or k >= 0: inference-time retrieval of the k
            other blocks with the highest landmark scores, per query and head.
        scale: logit scale; default 1 / sqrt(H).
        implementation: as in :func:`jattn.dot_product_attention` (default "chunked").

    Returns:
        [B, T, N, Hv] in the query's dtype.

    Raises:
        ValueError: wrong ranks, shapes that disagree, heads that do not divide, a
            block_size that is not a positive int, a top_k that is not None or an int >= 0.
        TypeError: non-floating or mixed dtypes.
        NotImplementedError: cross attention (T != S).

    >>> import jax
    >>> x = jax.random.normal(jax.random.key(0), (2, 10, 4, 8))
    >>> landmarks = jax.random.normal(jax.random.key(1), (2, 3, 4, 8))
    >>> landmark_attention(x, x, x, landmarks, block_size=4, top_k=1).shape
    (2, 10, 4, 8)

    References:
        P21 Landmark Attention, "Landmark Attention: Random-Access Infinite Context Length
        for Transformers".
    """
    _, T, _, H, S, _, _ = check_qkv(query, key, value)
    bs, k_top, nb = _check_landmark_args(landmark_keys, query, key, block_size, top_k)
    if T != S:
        raise NotImplementedError(
            f"landmark_attention: cross attention (T={T} != S={S}) is not supported: each "
            "query belongs to the block of the key sequence at its own position")
    scale = H ** -0.5 if scale is None else float(scale)
    return _landmark_attention(query, key, value, landmark_keys, bs, k_top, nb, bool(is_causal),
                               scale, hashable_implementation(implementation))


@functools.partial(jax.jit, static_argnums=(4, 5, 6, 7, 8, 9))
def _landmark_attention(query: Array, key: Array, value: Array, landmark_keys: Array, bs: int,
                        k_top: int | None, nb: int, is_causal: bool, scale: float,
                        implementation) -> Array:
    """:func:`landmark_attention` after its checks, as one program."""
    B, T, N, H = query.shape
    K = key.shape[2]
    G = N // K
    dtype = accumulation_dtype(query.dtype)
    q = query.reshape(B, T, K, G, H)
    # Landmark scores l[b, k, g, t, c] and the candidate blocks C(t).
    landmark_logits = jnp.einsum("btkgh,bckh->bkgtc", q, landmark_keys,
                                 preferred_element_type=dtype) * scale
    own = np.arange(T) // bs
    blocks = np.arange(nb)
    others = (blocks[None, :] < own[:, None]) if is_causal else (
        blocks[None, :] != own[:, None])  # [T, nb]
    k_keep = nb if k_top is None else min(k_top, nb)
    # top_k keeps equal scores in index order (ties to the earlier block); slots that fall
    # outside C(t) (-inf) become -1.
    scores, chosen = lax.top_k(jnp.where(others, landmark_logits, -jnp.inf), k_keep)
    chosen = jnp.where(jnp.isfinite(scores), chosen, -1).astype(jnp.int32)
    # A retrieved token j of block c weighs gate_tc * softmax_{j in c}(s_tj): one softmax
    # over the own block and the retrieved tokens, with logits s_tj + l_tc - log W_tc
    # (W_tc = sum_{j in c} exp s_tj), has exactly these weights and normaliser Z_t.
    log_w = _block_lse(q, key, chosen, bs, scale) if k_keep else scores  # [B, K, G, T, k]
    own_block = jnp.broadcast_to(jnp.asarray(own, jnp.int32)[None, None, None, :, None],
                                 (B, K, G, T, 1))
    picked = jnp.concatenate([own_block, chosen], -1)  # [B, K, G, T, 1 + k]
    shift = jnp.concatenate([jnp.zeros((B, K, G, T, 1), log_w.dtype),
                             jnp.where(chosen >= 0, scores - log_w, -jnp.inf)], -1)
    # Less the row's largest shift (the softmax is unchanged), so the logits of the block
    # that dominates stay near their own size and keep float32's precision.
    shift = shift - lax.stop_gradient(shift.max(-1, keepdims=True))
    shift = jnp.where(picked >= 0, shift, 0).reshape(B, N, T, k_keep + 1)
    picked = picked.reshape(B, N, T, k_keep + 1)

    def retrieved(score, b, h, t, j):
        return score + jnp.where(picked[b, h, t] == j // bs, shift[b, h, t], 0).sum()

    mask = masks.block_selection(picked, 1, bs)
    if is_causal:
        mask = mask & masks.causal()
    return dot_product_attention(query, key, value, mask=mask, scale=scale,
                                 score_mod=retrieved, implementation=implementation)


def landmark_decode(query: Array, key: Array, value: Array, landmark_keys: Array,
                    length, *, block_size: int, top_k: int | None = None,
                    scale: float | None = None) -> Array:
    r"""Causal landmark attention of the last T positions against a KV cache (decoding).

    The same grouped softmax as :func:`landmark_attention` with ``is_causal=True``, for
    queries at positions ``length - T .. length - 1`` of a sequence whose keys and values
    fill the first ``length`` slots of ``key`` and ``value`` (slots past it are ignored):
    each query retrieves the ``top_k`` earlier blocks whose landmarks score highest (every
    earlier block when None), gathers their tokens and its own block's, and computes

    .. math::
        \mathrm{out}_t = \mathrm{softmax}ig(\{s_{tj}\}_{j \in b(t),\, j \le p_t} \cup
        \{s_{tj} + \ell_{tc} - \log W_{tc}\}_{c \in C(t),\, j \in c}ig) \cdot v,
        \quad W_{tc} = \sum_{j \in c} e^{s_{tj}}

    in O(T (S / block_size + (top_k + 1) block_size)) time and memory: the paper's
    random-access retrieval from the cache, equal to :func:`landmark_attention`'s last T
    rows (top_k and ties alike).

    Args:
        query: [B, T, N, H], the new tokens' queries (their keys and values already in the
            cache).
        key: [B, S, K, H] cache slots; N % K == 0.
        value: [B, S, K, Hv].
        landmark_keys: [B, ceil(S / block_size), K, H], query dtype: block c's landmark key
            (used only for blocks before a query's own, all complete; e.g.
            :func:`mean_landmark_keys` of the cache's keys).
        length: int (or int32 array): positions written, T <= length <= S.
        block_size: tokens per block.
        top_k: None (every earlier block) or k >= 0 retrieved blocks per query and head.
        scale: logit scale; default 1 / sqrt(H).

    Returns:
        [B, T, N, Hv] in the query's dtype.

    Raises:
        ValueError: wrong ranks or shapes, heads that do not divide, a bad block_size or
            top_k, a known length outside [T, S].
        TypeError: non-floating or mixed dtypes.

    >>> import jax
    >>> x = jax.random.normal(jax.random.key(0), (1, 12, 2, 8))
    >>> marks = mean_landmark_keys(x, 4)
    >>> last = landmark_decode(x[:, -1:], x, x, marks, 12, block_size=4, top_k=1)
    >>> full = landmark_attention(x, x, x, marks, block_size=4, top_k=1)
    >>> bool(jnp.allclose(last, full[:, -1:], atol=1e-5))
    True

    References:
        P21 Landmark Attention, "Landmark Attention: Random-Access Infinite Context Length
        for Transformers".
    """
    _, T, _, H, S, _, _ = check_qkv(query, key, value)
    bs, k_top, _ = _check_landmark_args(landmark_keys, query, key, block_size, top_k)
    if is_concrete(length) and not T <= int(length) <= S:
        raise ValueError(f"length: expected T={T} <= length <= S={S}, got {int(length)}")
    scale = H ** -0.5 if scale is None else float(scale)
    return _landmark_decode(query, key, value, landmark_keys, jnp.asarray(length, jnp.int32),
                            bs, k_top, scale)


@functools.partial(jax.jit, static_argnums=(5, 6, 7))
def _landmark_decode(query: Array, key: Array, value: Array, landmark_keys: Array,
                     length: Array, bs: int, k_top: int | None, scale: float) -> Array:
    """:func:`landmark_decode` after its checks, as one program (also when called eagerly:
    a decoding step is many small operations)."""
    B, T, N, H = query.shape
    S, K, Hv = key.shape[1], key.shape[2], value.shape[-1]
    nb = num_blocks(S, bs)
    G = N // K
    dtype = accumulation_dtype(query.dtype)
    position = length - T + jnp.arange(T, dtype=jnp.int32)  # [T]
    own = position // bs
    q = query.reshape(B, T, K, G, H)
    landmark_logits = jnp.einsum("btkgh,bckh->bkgtc", q, landmark_keys,
                                 preferred_element_type=dtype) * scale
    earlier = jnp.arange(nb)[None, :] < own[:, None]  # [T, nb]: C(t)
    k_keep = nb if k_top is None else min(k_top, nb)
    scores, chosen = lax.top_k(jnp.where(earlier, landmark_logits, -jnp.inf), k_keep)
    chosen = jnp.where(jnp.isfinite(scores), chosen, -1).astype(jnp.int32)
    picked = jnp.concatenate([jnp.broadcast_to(own[:, None], (B, K, G, T, 1)), chosen], -1)

    index = jnp.maximum(picked, 0)
    k_sel = _gather_blocks(_blocks(key, bs), index)
    v_sel = _gather_blocks(_blocks(value, bs), index)
    s = jnp.einsum("btkgh,bkgtcjh->bkgtcj", q, k_sel, preferred_element_type=dtype) * scale
    token = picked[..., None] * bs + jnp.arange(bs)  # [B, K, G, T, 1 + k, bs]
    seen = (picked[..., None] >= 0) & (token <= position[:, None, None])
    s = jnp.where(seen, s, -jnp.inf)
    # A retrieved block's tokens carry l_tc - log W_tc; its blocks are complete (c < own).
    log_w = jax.nn.logsumexp(s[..., 1:, :], axis=-1)
    shift = jnp.where(chosen >= 0, scores - jnp.where(chosen >= 0, log_w, 0), 0)
    s = s.at[..., 1:, :].add(shift[..., None])
    weights = jax.nn.softmax(s.reshape(B, K, G, T, -1), axis=-1)
    out = jnp.einsum("bkgtj,bkgtjd->btkgd", weights,
                     v_sel.reshape(B, K, G, T, -1, Hv).astype(dtype))
    return out.reshape(B, T, N, Hv).astype(query.dtype)


_QUERY_CHUNK = 64  # queries whose retrieved keys are gathered at once by _block_lse


def _block_lse(q: Array, key: Array, chosen: Array, bs: int, scale: float) -> Array:
    """log sum_{j in block chosen[...]} exp(scale q_t . k_j), float32 [B, K, G, T, k]
    (0 where chosen is -1): the retrieved keys are gathered a chunk of queries at a time,
    recomputed in the backward pass, so memory is O(chunk * k * block), not O(T * k * block).
    """
    B, T, K, G, H = q.shape
    S = key.shape[1]
    nb = -(-S // bs)
    dtype = accumulation_dtype(q.dtype)
    kt = _blocks(key, bs)  # [B, K, nb, bs, H]
    valid = jnp.asarray(np.arange(nb * bs).reshape(nb, bs) < S)
    nc = -(-T // _QUERY_CHUNK)
    Tp = nc * _QUERY_CHUNK
    qc = jnp.pad(q, ((0, 0), (0, Tp - T), (0, 0), (0, 0), (0, 0)))
    cc = jnp.pad(chosen, ((0, 0), (0, 0), (0, 0), (0, Tp - T), (0, 0)), constant_values=-1)
    qc = jnp.moveaxis(qc.reshape(B, nc, _QUERY_CHUNK, K, G, H), 1, 0)
    cc = jnp.moveaxis(cc.reshape(B, K, G, nc, _QUERY_CHUNK, -1), 3, 0)

    @jax.checkpoint
    def chunk(args):
        q_blk, c_blk = args  # [B, c, K, G, H], [B, K, G, c, k]
        index = jnp.maximum(c_blk, 0)
        k_sel = _gather_blocks(kt, index)  # [B, K, G, c, k, bs, H]
        s = jnp.einsum("bqkgh,bkgqcjh->bkgqcj", q_blk, k_sel,
                       preferred_element_type=dtype) * scale
        s = jnp.where(valid[index][..., :], s, -jnp.inf)
        return jnp.where(c_blk >= 0, jax.nn.logsumexp(s, axis=-1), 0)

    out = lax.map(chunk, (qc, cc))  # [nc, B, K, G, c, k]
    return jnp.moveaxis(out, 0, 3).reshape(B, K, G, Tp, -1)[:, :, :, :T]


def mean_landmark_keys(key: Array, block_size: int, *, offset: Array | None = None) -> Array:
    """Landmark keys derived from the blocks: the mean key of each block, plus an offset.

    Not the paper's construction: there a landmark is a token inserted after each block,
    whose key comes from its own hidden state, which the earlier layers compute by attending
    over its block. A single attention layer has no earlier layers, so this summary stands
    in for them; ``offset`` (e.g. a learned [K, H] landmark key) is added to every block.

    Args:
        key: [B, S, K, H].
        block_size: tokens per block; the last block may be shorter (its mean is over the
            tokens it has).
        offset: optional, broadcastable to [B, num_blocks, K, H] (e.g. [K, H]).

    Returns:
        [B, ceil(S / block_size), K, H] in key's dtype.

    Raises:
        ValueError: key not rank 4, a block_size that is not a positive int.
        TypeError: non-floating key.

    >>> import jax.numpy as jnp
    >>> mean_landmark_keys(jnp.arange(5.0).reshape(1, 5, 1, 1), 2)[0, :, 0, 0]
    Array([0.5, 2.5, 4. ], dtype=float32)
    """
    check_rank("key", key, (4,), "[B, S, K, H]")
    check_floating("key", key)
    bs = check_int("block_size", block_size)
    B, S, K, H = key.shape
    nb = num_blocks(S, bs)
    dtype = accumulation_dtype(key.dtype)
    blocks = jnp.pad(key.astype(dtype), ((0, 0), (0, nb * bs - S), (0, 0), (0, 0)))
    counts = np.minimum(bs, S - np.arange(nb) * bs)  # tokens per block
    means = blocks.reshape(B, nb, bs, K, H).sum(2) / jnp.asarray(counts, dtype)[:, None, None]
    if offset is not None:
        means = means + jnp.asarray(offset).astype(dtype)
    return means.astype(key.dtype)
