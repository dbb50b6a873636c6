"""Memory-efficient softmax attention in plain JAX: online softmax over tiles, tiles skipped.

The [T, S] score matrix is never materialised. Queries are processed one block at a time;
for each query block only the key blocks that the mask's block map calls non-empty are
visited (a compacted list, so a causal mask visits about half the tiles and a local window
only the band), and tiles the block map calls FULL skip the mask arithmetic. The backward
pass is a ``custom_vjp`` that recomputes each tile's probabilities from the saved
log-sum-exp (FlashAttention-2 style), so memory stays O(T * block) forward and backward.
Q, K and V are sliced in their own [B, T, N, H] layout (no whole-array transposes), and
outputs are written in place into their final layout.

The block map is taken over the whole batch and all heads (a tile is visited when any batch
row or head needs it), so per-example masks skip only what every example can skip.
"""

from __future__ import annotations

import dataclasses
from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from jattn.core import score_mod as _score_mod
from jattn.core.masks import EMPTY, FULL, PARTIAL, Mask
from jattn.core.shapes import (
    Array,
    DTypeError,
    accumulation_dtype,
    check_broadcastable,
    check_floating,
    check_rank,
)
from pallas_kernels.flash.common import (
    BlockSizes,
    mark_padded_keys,
    modified_scores,
    zero_cotangents,
)

DEFAULT_BLOCK_SIZES = BlockSizes(512, 512, block_q_bwd=256, block_kv_bwd=512)
"""The chunked path's tiles, chosen on a 2-core x86 CPU at T = 8k, H = 64
(docs/benchmarks.md): the backward pass, with five matmuls and more elementwise work per
tile, prefers shorter query blocks. Each is clipped to its sequence."""

MIN_BAND_BLOCK = 128
"""The smallest tile :func:`block_sizes_for` picks for a narrow band: below it the loop's
per-tile overhead outweighs the skipped work on XLA:CPU (docs/benchmarks.md)."""


def block_sizes_for(mask: Mask | None) -> BlockSizes:
    """The default tiles for ``mask``: ``DEFAULT_BLOCK_SIZES``, or smaller ones where
    the mask says more. A mask made of blocks (:meth:`Mask.tiles`, a block selection) tiles
    at its key blocks (query tiles as long, or as its query blocks if longer), so each tile
    is one selected block; a mask with a key extent (:meth:`Mask.key_extent`) narrower than a
    default tile gets square tiles of the power of two at or above it (at least
    ``MIN_BAND_BLOCK``), so a query tile of a sliding window or a neighbourhood visits
    about two key tiles of about the window's width instead of two of 512 keys.

    >>> from jattn import masks
    >>> block_sizes_for(masks.local_window(126, 0))
    BlockSizes(block_q=128, block_kv=128)
    """
    largest = DEFAULT_BLOCK_SIZES.block_kv
    if mask is None:
        return DEFAULT_BLOCK_SIZES
    tiles = mask.tiles()
    if tiles is not None and tiles[1] < largest:
        return BlockSizes(max(tiles), tiles[1])
    extent = mask.key_extent()
    if extent is None or extent >= largest:
        return DEFAULT_BLOCK_SIZES
    size = max(MIN_BAND_BLOCK, 1 << max(extent - 1, 0).bit_length())
    return BlockSizes(size, size) if size < largest else DEFAULT_BLOCK_SIZES


@dataclasses.dataclass(frozen=True)
class _Tiling:
    T: int
    S: int
    bq: int
    bk: int

    @classmethod
    def of(cls, T: int, S: int, block_q: int, block_kv: int) -> _Tiling:
        return cls(T, S, min(block_q, T), min(block_kv, S))

    @property
    def nq(self) -> int:
        return -(-self.T // self.bq)

    @property
    def nk(self) -> int:
        return -(-self.S // self.bk)


@dataclasses.dataclass(frozen=True)
class _Static:
    """Everything the traced code needs that is a Python value (hashable for custom_vjp)."""

    scale: float
    soft_cap: float | None
    fwd: _Tiling
    bwd: _Tiling
    mod: _score_mod.Converted | None = None


def chunked_attention(query: Array, key: Array, value: Array, bias: Array | None = None,
                      mask: Mask | None = None, *, scale: float,
                      logits_soft_cap: float | None = None, dropout=None, score_mod=None,
                      block_sizes: BlockSizes | None = None) -> tuple[Array, Array]:
    """Softmax attention computed tile by tile, with empty tiles skipped.

    Same contract as the ``"chunked"`` entry of ``jattn.dot_product_attention`` (which
    validates the input); call this directly only to choose block sizes.

    Args:
        query: [B, T, N, H]; key: [B, S, K, H]; value: [B, S, K, Hv]; one floating dtype.
        bias: None or [B|1, N|1, T|1, S|1] floating (differentiable).
        mask: None or a :class:`jattn.masks.Mask` with dims broadcastable to (B, N).
        scale: logits scale.
        logits_soft_cap: None or c > 0 (logits -> c tanh(logits / c), before masking).
        dropout: must be None (attention dropout is an "xla" feature).
        score_mod: None or a function (score, batch, head, q_index, kv_index) -> score
            (:mod:`jattn.core.score_mod`), applied to each tile's logits before the soft cap;
            gradients reach the arrays it closes over.
        block_sizes: query and key tile sizes, forward and backward (the backward pass
            tiles as the forward where its sizes are None); None:
            :func:`jattn.core.chunked.block_sizes_for` the mask.

    Returns:
        (output [B, T, N, Hv] in the input dtype, lse [B, N, T]; -inf where nothing attends).

    Raises:
        NotImplementedError: dropout, or a value head count other than the key's (DiffQKV
            runs on "xla").

    Example:
        >>> import jax.numpy as jnp
        >>> from jattn import masks
        >>> q = jnp.ones((1, 8, 2, 4))
        >>> out, lse = chunked_attention(q, q, q, mask=masks.causal(), scale=0.5,
        ...                              block_sizes=BlockSizes(4, 4))
        >>> out.shape, lse.shape
        ((1, 8, 2, 4), (1, 2, 8))
    """
    if dropout is not None:
        raise NotImplementedError("chunked has no attention dropout")
    _check_normalised(query, key, value, bias, mask)
    T, S = query.shape[1], key.shape[1]
    bs = block_sizes_for(mask) if block_sizes is None else block_sizes
    mod, consts = None, ()
    if score_mod is not None:
        _score_mod.check(score_mod)
        mod, consts = _score_mod.convert(score_mod, accumulation_dtype(query.dtype))
    st = _Static(scale=float(scale),
                 soft_cap=None if logits_soft_cap is None else float(logits_soft_cap),
                 fwd=_Tiling.of(T, S, bs.block_q, bs.block_kv),
                 bwd=_Tiling.of(T, S, *bs.backward), mod=mod)
    if mask is not None and mask.sparse_rows and mask.dims() != (1, 1):
        return _per_row(st, query, key, value, bias, mask, consts)
    return _attention(st, query, key, value, bias, mask, consts, jnp.zeros(2, jnp.int32),
                      None)


def _per_row(st: _Static, query, key, value, bias, mask: Mask, consts):
    """Every batch row and kv head on its own tile schedule (``vmap`` over both): a mask
    whose block map differs from row to row (``Mask.sparse_rows``) then costs each row only
    its own tiles, not the union of all rows' tiles. The G query heads of a kv head share
    one schedule (the union of theirs)."""
    B, T, N, H = query.shape
    K = key.shape[2]
    G = N // K
    # Each tiling's longest row schedule per query block, over all rows: the shared trip
    # count of the vmapped loops (see _visit).
    limits = tuple(_row_counts(mask, tl, K).max((0, 1)) for tl in (st.fwd, st.bwd))

    def one(b, kh, q, k, v):  # q [T, G, H], k [S, H], v [S, Hv]
        heads = kh * G + jnp.arange(G, dtype=jnp.int32)
        row_bias = None
        if bias is not None:
            row_bias = bias if bias.shape[0] == 1 else lax.dynamic_slice_in_dim(bias, b, 1, 0)
            if row_bias.shape[1] > 1:
                row_bias = jnp.take(row_bias, heads, axis=1)
        out, lse = _attention(st, q[None], k[None, :, None], v[None, :, None], row_bias,
                              mask.rows(b, heads), consts, jnp.stack([b, kh * G]), limits)
        return out[0], lse[0]  # [T, G, Hv], [G, T]

    ids = jnp.arange(max(B, K), dtype=jnp.int32)
    per_head = jax.vmap(one, in_axes=(None, 0, 1, 1, 1))
    out, lse = jax.vmap(per_head, in_axes=(0, None, 0, 0, 0))(
        ids[:B], ids[:K], query.reshape(B, T, K, G, H), key, value)
    # out [B, K, T, G, Hv] -> [B, T, N, Hv]; lse [B, K, G, T] -> [B, N, T]
    return (jnp.moveaxis(out, 1, 2).reshape(B, T, N, -1), lse.reshape(B, N, T))


def _check_normalised(query, key, value, bias, mask) -> None:
    """The normalised form dot_product_attention hands over, for direct callers."""
    for name, x in (("query", query), ("key", key), ("value", value)):
        check_rank(name, x, (4,), "[B, T|S, N|K, H|Hv]")
        check_floating(name, x)
    B, _, N, H = query.shape
    if value.shape[:2] == key.shape[:2] and value.shape[2] != key.shape[2]:
        raise NotImplementedError(f"chunked attention needs as many value heads as key heads, "
                                  f"got {value.shape[2]} and {key.shape[2]}")
    if key.shape[0] != B or key.shape[3] != H or value.shape[:3] != key.shape[:3]:
        raise ValueError(f"key, value: expected [B={B}, S, K, H={H}] and [B, S, K, Hv], got "
                         f"{key.shape} and {value.shape}")
    if N % key.shape[2]:
        raise ValueError(f"query, key: need N % K == 0, got {query.shape} and {key.shape}")
    if not query.dtype == key.dtype == value.dtype:
        raise DTypeError(f"query, key, value: expected one dtype, got {query.dtype}, "
                         f"{key.dtype}, {value.dtype}")
    if bias is not None:
        check_rank("bias", bias, (4,), "[B|1, N|1, T|1, S|1]")
        check_broadcastable("bias", bias.shape, (B, N, query.shape[1], key.shape[1]), "BNTS")
    if mask is not None and not isinstance(mask, Mask):
        raise TypeError(f"mask: expected a jattn.masks.Mask or None, got {type(mask).__name__}")


class TileSchedule(NamedTuple):
    """Which tiles the chunked implementation visits, per query block."""

    kinds: Array  # int8 [nq, nk]: EMPTY / PARTIAL / FULL over the whole batch and all heads
    order: Array  # int32 [nq, nk]: FULL key blocks, then PARTIAL ones, then EMPTY ones
    full: Array  # int32 [nq]: how many FULL key blocks lead ``order`` (visited unmasked)
    counts: Array  # int32 [nq]: how many key blocks each query block visits (FULL + PARTIAL)


def tile_schedule(mask: Mask | None, T: int, S: int, block_q: int, block_kv: int
                  ) -> TileSchedule:
    """The tiles ``chunked_attention`` visits for ``mask`` on a [T, S] problem.

    >>> from jattn import masks
    >>> tile_schedule(masks.causal(), 8, 8, 4, 4).counts.tolist()
    [1, 2]
    """
    return _schedule(mask, _Tiling.of(T, S, block_q, block_kv))


def _row_counts(mask: Mask, tl: _Tiling, K: int) -> Array:
    """Non-empty tiles per query block of every (batch row, kv head): int32 [Bm, K|1, nq]
    (the query heads of a kv head share a schedule, the union of theirs)."""
    kinds = mask.block_map(tl.T, tl.S, tl.bq, tl.bk)
    Bm, Nm, nq, nk = kinds.shape
    nonempty = mark_padded_keys(kinds, tl.S, tl.bk) != EMPTY
    if Nm > 1:
        nonempty = nonempty.reshape(Bm, K, Nm // K, nq, nk).any(2)
    return nonempty.sum(-1, dtype=jnp.int32)


def _schedule(mask: Mask | None, tl: _Tiling) -> TileSchedule:
    kinds = _tile_kinds(mask, tl)
    # FULL (2) first, then PARTIAL (1), then EMPTY (0); stable, so increasing within a kind.
    order = jnp.argsort(FULL - kinds, axis=1, stable=True).astype(jnp.int32)
    full = (kinds == FULL).sum(1).astype(jnp.int32)
    counts = (kinds != EMPTY).sum(1).astype(jnp.int32)
    return TileSchedule(kinds, order, full, counts)


def _tile_kinds(mask: Mask | None, tl: _Tiling) -> Array:
    if mask is None:
        kinds = jnp.full((tl.nq, tl.nk), FULL, jnp.int8)
    else:
        per_row = mask.block_map(tl.T, tl.S, tl.bq, tl.bk).reshape(-1, tl.nq, tl.nk)
        kinds = jnp.where((per_row == EMPTY).all(0), EMPTY,
                          jnp.where((per_row == FULL).all(0), FULL, PARTIAL)).astype(jnp.int8)
    return mark_padded_keys(kinds, tl.S, tl.bk)


def _visit(schedule: TileSchedule, qb, body, carry, limit=None):
    """Run ``body(kb, masked, live, carry)`` over the non-empty key blocks of query block
    ``qb``.

    FULL tiles come first with ``masked=False`` (no mask arithmetic at all), then PARTIAL
    ones with ``masked=True``: two loops, so no tile pays for a conditional; ``live`` is
    None. With ``limit`` (per-row schedules under ``vmap``, where each row's count differs)
    one loop runs a trip count shared by all rows, ``limit`` >= every row's count, so no
    row's carry is selected per step; every tile is masked, and ``live`` (false past the
    row's own count, where ``order`` repeats an empty tile) empties the tile.
    """
    if limit is not None:
        def one(i, c):
            return body(schedule.order[qb, i], True, i < schedule.counts[qb], c)

        return lax.fori_loop(0, limit, one, carry)

    def loop(start, stop, masked, carry):
        def step(state):
            i, c = state
            return i + 1, body(schedule.order[qb, i], masked, None, c)

        return lax.while_loop(lambda state: state[0] < stop, step, (start, carry))[1]

    carry = loop(jnp.int32(0), schedule.full[qb], False, carry)
    return loop(schedule.full[qb], schedule.counts[qb], True, carry)


# --------------------------------------------------------------------------------------------
# Tiles. Queries are viewed as [B, T, K, G, H] (a free reshape) so GQA never copies K/V;
# scores of a tile are [B, K, G, bq, bk].
# --------------------------------------------------------------------------------------------


def _pad_axis(x: Array, axis: int, size: int) -> Array:
    extra = size - x.shape[axis]
    if extra == 0:
        return x
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, extra)
    return jnp.pad(x, pad)


def _group(x: Array, K: int) -> Array:
    """[B', N|1, ...] -> [B', K|1, G|1, ...]."""
    if x.shape[1] == 1:
        return x[:, :, None]
    return x.reshape(x.shape[0], K, x.shape[1] // K, *x.shape[2:])


def _padded_inputs(query, key, value, bias, tl: _Tiling):
    """q [B, Tp, K, G, H]; k, v [B, Sp, K, *]; bias padded where it is not broadcast."""
    B, T, N, H = query.shape
    K = key.shape[2]
    q = _pad_axis(query.reshape(B, T, K, N // K, H), 1, tl.nq * tl.bq)
    k = _pad_axis(key, 1, tl.nk * tl.bk)
    v = _pad_axis(value, 1, tl.nk * tl.bk)
    if bias is not None:
        if bias.shape[2] > 1:
            bias = _pad_axis(bias, 2, tl.nq * tl.bq)
        if bias.shape[3] > 1:
            bias = _pad_axis(bias, 3, tl.nk * tl.bk)
    return q, k, v, bias


def _block(x: Array, index, size: int, axis: int) -> Array:
    return lax.dynamic_slice_in_dim(x, index * size, size, axis=axis)


def _heads_major(x: Array) -> Array:
    """A block [B, rows, K, (G,) W] -> [B, K, (G,) rows, W], the layout the tile matmuls want."""
    return jnp.moveaxis(x, 1, -2)


def _bias_tile(bias: Array | None, qb, kb, tl: _Tiling, K: int) -> Array | None:
    """The bias of tile (qb, kb) as [B|1, K|1, G|1, bq|1, bk|1] (bias is pre-padded)."""
    if bias is None:
        return None
    if bias.shape[2] > 1:
        bias = _block(bias, qb, tl.bq, axis=2)
    if bias.shape[3] > 1:
        bias = _block(bias, kb, tl.bk, axis=3)
    return _group(bias, K)


def _tile_logits(q_blk, k_blk, bias, mask, consts, origin, qb, kb, masked: bool, live,
                 tl: _Tiling, st: _Static, pullback: bool = False):
    """Logits of one tile, [B, K, G, bq, bk]; with ``masked``, -inf where not allowed.

    With ``pullback`` also returns ``back(ds) -> (ds_raw, d_consts)``: the cotangent of the
    final logits taken back through the soft cap and the score_mod to ``scale q.k + bias``
    (and to the score_mod's closed-over arrays; None without a score_mod). ``origin`` is
    the (batch, head) index of the tile's first row and head, for the score_mod.
    """
    B, K, G = q_blk.shape[:3]
    acc = accumulation_dtype(q_blk.dtype)
    s = jnp.einsum("bkgqh,bksh->bkgqs", q_blk, k_blk, preferred_element_type=acc) * st.scale
    b = _bias_tile(bias, qb, kb, tl, K)
    if b is not None:
        s = s + b.astype(acc)
    q_pos = qb * tl.bq + jnp.arange(tl.bq, dtype=jnp.int32)
    kv_pos = kb * tl.bk + jnp.arange(tl.bk, dtype=jnp.int32)
    mod_back = None
    if st.mod is not None:
        # Padded rows and columns read the last real index (their values are discarded).
        idx = (origin[0] + jnp.arange(B, dtype=jnp.int32).reshape(B, 1, 1, 1, 1),
               origin[1] + jnp.arange(K * G, dtype=jnp.int32).reshape(1, K, G, 1, 1),
               jnp.minimum(q_pos, tl.T - 1).reshape(1, 1, 1, -1, 1),
               jnp.minimum(kv_pos, tl.S - 1).reshape(1, 1, 1, 1, -1))
        s = modified_scores(st.mod, s, idx, consts, pullback=pullback)
        if pullback:
            s, mod_back = s
    t = None
    if st.soft_cap is not None:
        t = jnp.tanh(s / st.soft_cap)
        s = st.soft_cap * t
    if masked:
        allowed = kv_pos < tl.S
        if live is not None:
            allowed = allowed & live
        if mask is not None:
            allowed = _group(mask.evaluate(q_pos, kv_pos), K) & allowed
        s = jnp.where(allowed, s, -jnp.inf)
    if not pullback:
        return s

    def back(ds):
        if t is not None:
            ds = ds * (1 - t * t)
        return (ds, ()) if mod_back is None else mod_back(ds)

    return s, back


def _rows(x: Array) -> Array:
    """[B, K, G, bq, W] -> [B, bq, K, G, W]: a tile's rows in the query layout."""
    return x.transpose(0, 3, 1, 2, 4)


# --------------------------------------------------------------------------------------------
# Forward and backward
# --------------------------------------------------------------------------------------------


class _Shapes(NamedTuple):
    B: int
    T: int
    N: int
    H: int
    K: int
    G: int
    Hv: int


def _shapes(query: Array, key: Array, value: Array) -> _Shapes:
    B, T, N, H = query.shape
    K, Hv = key.shape[2], value.shape[-1]
    return _Shapes(B, T, N, H, K, N // K, Hv)


def _forward(st: _Static, query, key, value, bias, mask, consts, origin, limits):
    tl = st.fwd
    schedule = _schedule(mask, tl)
    B, T, N, _, K, G, Hv = _shapes(query, key, value)
    acc_t = accumulation_dtype(query.dtype)
    q, k, v, bias = _padded_inputs(query, key, value, bias, tl)

    def one_query_block(qb, outputs):
        out, lse = outputs
        q_blk = _heads_major(_block(q, qb, tl.bq, axis=1))

        def update(kb, masked, live, carry):
            m, l, o = carry
            k_blk = _heads_major(_block(k, kb, tl.bk, axis=1))
            v_blk = _heads_major(_block(v, kb, tl.bk, axis=1))
            s = _tile_logits(q_blk, k_blk, bias, mask, consts, origin, qb, kb, masked, live,
                             tl, st)
            m_new = jnp.maximum(m, s.max(-1))
            m_safe = jnp.where(m_new == -jnp.inf, 0, m_new)
            alpha = jnp.exp(m - m_safe)
            p = jnp.exp(s - m_safe[..., None])
            pv = jnp.einsum("bkgqs,bksh->bkgqh", p.astype(v.dtype), v_blk,
                            preferred_element_type=acc_t)
            return m_new, alpha * l + p.sum(-1), alpha[..., None] * o + pv

        init = (jnp.full((B, K, G, tl.bq), -jnp.inf, acc_t), jnp.zeros((B, K, G, tl.bq), acc_t),
                jnp.zeros((B, K, G, tl.bq, Hv), acc_t))
        m, l, o = _visit(schedule, qb, update, init, None if limits is None else limits[0][qb])
        nonempty = l > 0
        safe_l = jnp.where(nonempty, l, 1)
        o_rows = _rows(o / safe_l[..., None]).astype(query.dtype)
        lse_blk = jnp.where(nonempty, m + jnp.log(safe_l), -jnp.inf)
        out = lax.dynamic_update_slice_in_dim(out, o_rows, qb * tl.bq, axis=1)
        lse = lax.dynamic_update_slice_in_dim(lse, lse_blk, qb * tl.bq, axis=3)
        return out, lse

    Tp = tl.nq * tl.bq
    outputs = (jnp.zeros((B, Tp, K, G, Hv), query.dtype), jnp.zeros((B, K, G, Tp), acc_t))
    out, lse = lax.fori_loop(0, tl.nq, lambda i, o: one_query_block(i.astype(jnp.int32), o),
                             outputs)
    return out[:, :T].reshape(B, T, N, Hv), lse[..., :T].reshape(B, N, T)


@partial(jax.custom_vjp, nondiff_argnums=(0,))
def _attention(st, query, key, value, bias, mask, consts, origin, limits):
    return _forward(st, query, key, value, bias, mask, consts, origin, limits)


def _attention_fwd(st, query, key, value, bias, mask, consts, origin, limits):
    out, lse = _forward(st, query, key, value, bias, mask, consts, origin, limits)
    return (out, lse), (query, key, value, bias, mask, consts, origin, limits, out, lse)


def _attention_bwd(st, residuals, cotangents):
    query, key, value, bias, mask, consts, origin, limits, out, lse = residuals
    d_out, d_lse = cotangents
    tl = st.bwd
    schedule = _schedule(mask, tl)
    B, T, N, H, K, G, Hv = _shapes(query, key, value)
    acc_t = accumulation_dtype(query.dtype)
    q, k, v, padded_bias = _padded_inputs(query, key, value, bias, tl)
    Tp, Sp = tl.nq * tl.bq, tl.nk * tl.bk

    def stats(x):  # [B, N, T] -> [B, K, G, Tp]
        return _pad_axis(x.astype(acc_t).reshape(B, K, G, T), 3, Tp)

    do = _pad_axis(d_out.reshape(B, T, K, G, Hv), 1, Tp)
    # D_i = sum_h dO_ih O_ih, the softmax Jacobian's row term; dlse enters the same way.
    delta = (d_out.astype(acc_t) * out.astype(acc_t)).sum(-1).transpose(0, 2, 1)
    row_term = stats(d_lse) - stats(delta)
    lse_g = stats(lse)
    lse_safe = jnp.where(lse_g == -jnp.inf, 0, lse_g)

    def one_query_block(qb, grads):
        q_blk = _heads_major(_block(q, qb, tl.bq, axis=1))
        do_blk = _heads_major(_block(do, qb, tl.bq, axis=1))
        lse_blk = _block(lse_safe, qb, tl.bq, axis=3)
        row_blk = _block(row_term, qb, tl.bq, axis=3)

        def update(kb, masked, live, carry):
            dq_blk, dk, dv, dbias, dconsts = carry
            k_blk = _heads_major(_block(k, kb, tl.bk, axis=1))
            v_blk = _heads_major(_block(v, kb, tl.bk, axis=1))
            s, back = _tile_logits(q_blk, k_blk, padded_bias, mask, consts, origin, qb, kb,
                                   masked, live, tl, st, pullback=True)
            p = jnp.exp(s - lse_blk[..., None])
            dp = jnp.einsum("bkgqh,bksh->bkgqs", do_blk, v_blk, preferred_element_type=acc_t)
            ds, dc = back(p * (dp + row_blk[..., None]))
            dconsts = jax.tree.map(jnp.add, dconsts, dc)
            if dbias is not None:
                dbias = _add_bias_tile(dbias, ds, qb, kb, tl)
            ds_q = (ds * st.scale).astype(query.dtype)
            dq_blk = dq_blk + jnp.einsum("bkgqs,bksh->bkgqh", ds_q, k_blk,
                                         preferred_element_type=acc_t)
            dk_tile = jnp.einsum("bkgqs,bkgqh->bskh", ds_q, q_blk, preferred_element_type=acc_t)
            dv_tile = jnp.einsum("bkgqs,bkgqh->bskh", p.astype(value.dtype), do_blk,
                                 preferred_element_type=acc_t)
            dk = _add_slice(dk, dk_tile, kb * tl.bk, axis=1)
            dv = _add_slice(dv, dv_tile, kb * tl.bk, axis=1)
            return dq_blk, dk, dv, dbias, dconsts

        dq, dk, dv, dbias, dconsts = grads
        dq_blk = jnp.zeros((B, K, G, tl.bq, H), acc_t)
        dq_blk, dk, dv, dbias, dconsts = _visit(
            schedule, qb, update, (dq_blk, dk, dv, dbias, dconsts),
            None if limits is None else limits[1][qb])
        dq = lax.dynamic_update_slice_in_dim(dq, _rows(dq_blk).astype(query.dtype), qb * tl.bq,
                                             axis=1)
        return dq, dk, dv, dbias, dconsts

    # The score_mod's floating closed-over arrays get cotangents (integer ones, such as
    # index tables, are not differentiable and get None).
    grads = (jnp.zeros((B, Tp, K, G, H), query.dtype), jnp.zeros((B, Sp, K, H), acc_t),
             jnp.zeros((B, Sp, K, Hv), acc_t),
             None if bias is None else jnp.zeros(padded_bias.shape, acc_t),
             zero_cotangents(consts))
    # The loop index is int64 under jax_enable_x64; slices want one index dtype.
    dq, dk, dv, dbias, dconsts = lax.fori_loop(
        0, tl.nq, lambda i, g: one_query_block(i.astype(jnp.int32), g), grads)

    dq = dq[:, :T].reshape(B, T, N, H)
    dk = dk[:, : tl.S].astype(key.dtype)
    dv = dv[:, : tl.S].astype(value.dtype)
    if dbias is not None:
        dbias = dbias[:, :, : bias.shape[2], : bias.shape[3]].astype(bias.dtype)
    return dq, dk, dv, dbias, None, dconsts, None, None


def _add_slice(x: Array, update: Array, start, axis: int) -> Array:
    current = lax.dynamic_slice_in_dim(x, start, update.shape[axis], axis=axis)
    return lax.dynamic_update_slice_in_dim(x, current + update, start, axis=axis)


def _add_bias_tile(dbias: Array, ds: Array, qb, kb, tl: _Tiling) -> Array:
    """Accumulate d(logits) of one tile into the bias gradient, summing broadcast dims."""
    Bb, Nb, Tb, Sb = dbias.shape
    B, K, G, bq, bk = ds.shape
    g = ds.reshape(B, K * G, bq, bk)
    axes = tuple(i for i, (want, have) in enumerate(zip((Bb, Nb, Tb, Sb), g.shape, strict=True))
                 if want == 1 and have != 1)
    g = g.sum(axes, keepdims=True)
    zero = jnp.int32(0)
    start = (zero, zero, qb * tl.bq if Tb > 1 else zero, kb * tl.bk if Sb > 1 else zero)
    current = lax.dynamic_slice(dbias, start, g.shape)
    return lax.dynamic_update_slice(dbias, current + g, start)


_attention.defvjp(_attention_fwd, _attention_bwd)
