"""Memory-efficient softmax attention in plain JAX: online softmax over tiles, tiles skipped.

The [T, S] score matrix is never materialised. Queries are processed one block at a time;
for each query block only the key blocks that the mask's block map calls non-empty are
visited (a compacted list, so a causal mask visits about half the tiles and a local window
only the band), and tiles the block map calls FULL skip the mask arithmetic. The backward
pass is a ``custom_vjp`` that recomputes each tile's probabilities from the saved
log-sum-exp (FlashAttention-2 style), so memory stays O(T * block) forward and backward.

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

from jattn.masks import EMPTY, FULL, PARTIAL, Mask
from jattn.typing import Array, accumulation_dtype


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tile sizes; each is clipped to the sequence length it tiles."""

    block_q: int = 512
    block_kv: int = 512

    def __post_init__(self):
        for name in ("block_q", "block_kv"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name}: expected a positive int, got {value!r}")


@dataclasses.dataclass(frozen=True)
class _Static:
    """Everything the traced code needs that is a Python value (hashable for custom_vjp)."""

    scale: float
    soft_cap: float | None
    T: int
    S: int
    bq: int
    bk: int

    @property
    def nq(self) -> int:
        return -(-self.T // self.bq)

    @property
    def nk(self) -> int:
        return -(-self.S // self.bk)


def chunked_attention(query: Array, key: Array, value: Array, bias: Array | None = None,
                      mask: Mask | None = None, *, scale: float,
                      logits_soft_cap: float | None = None,
                      block_sizes: BlockSizes = BlockSizes()) -> tuple[Array, Array]:
    """Softmax attention computed tile by tile, with empty tiles skipped.

    Same contract as the ``"chunked"`` entry of ``jattn.dot_product_attention`` (which
    validates the input); call this directly only to choose block sizes.

    Args:
        query: [B, T, N, H]; key: [B, S, K, H]; value: [B, S, K, Hv]; one floating dtype.
        bias: None or [B|1, N|1, T|1, S|1] floating (differentiable).
        mask: None or a :class:`jattn.masks.Mask` with dims broadcastable to (B, N).
        scale: logits scale.
        logits_soft_cap: None or c > 0 (logits -> c tanh(logits / c), before masking).
        block_sizes: query and key tile sizes.

    Returns:
        (output [B, T, N, Hv] in the input dtype, lse [B, N, T]; -inf where nothing attends).

    Example:
        >>> import jax.numpy as jnp
        >>> from jattn import masks
        >>> q = jnp.ones((1, 8, 2, 4))
        >>> out, lse = chunked_attention(q, q, q, mask=masks.causal(), scale=0.5,
        ...                              block_sizes=BlockSizes(4, 4))
        >>> out.shape, lse.shape
        ((1, 8, 2, 4), (1, 2, 8))
    """
    T, S = query.shape[1], key.shape[1]
    st = _Static(scale=float(scale), soft_cap=None if logits_soft_cap is None
                 else float(logits_soft_cap), T=T, S=S,
                 bq=min(block_sizes.block_q, T), bk=min(block_sizes.block_kv, S))
    schedule = _schedule(mask, st)
    return _attention(st, query, key, value, bias, mask, *schedule)


class TileSchedule(NamedTuple):
    """Which tiles the chunked implementation visits, per query block."""

    kinds: Array  # int8 [nq, nk]: EMPTY / PARTIAL / FULL over the whole batch and all heads
    order: Array  # int32 [nq, nk]: non-empty key blocks first, in increasing order
    counts: Array  # int32 [nq]: how many key blocks each query block visits


def tile_schedule(mask: Mask | None, T: int, S: int,
                  block_sizes: BlockSizes = BlockSizes()) -> TileSchedule:
    """The tiles ``chunked_attention`` visits for ``mask`` on a [T, S] problem.

    >>> from jattn import masks
    >>> tile_schedule(masks.causal(), 8, 8, BlockSizes(4, 4)).counts.tolist()
    [1, 2]
    """
    st = _Static(scale=1.0, soft_cap=None, T=T, S=S, bq=min(block_sizes.block_q, T),
                 bk=min(block_sizes.block_kv, S))
    return _schedule(mask, st)


def _schedule(mask: Mask | None, st: _Static) -> TileSchedule:
    kinds = _tile_kinds(mask, st)
    order = jnp.argsort(kinds == EMPTY, axis=1, stable=True).astype(jnp.int32)
    counts = (kinds != EMPTY).sum(1).astype(jnp.int32)
    return TileSchedule(kinds, order, counts)


def _tile_kinds(mask: Mask | None, st: _Static) -> Array:
    if mask is None:
        kinds = jnp.full((st.nq, st.nk), FULL, jnp.int8)
    else:
        per_row = mask.block_map(st.T, st.S, st.bq, st.bk).reshape(-1, st.nq, st.nk)
        kinds = jnp.where((per_row == EMPTY).all(0), EMPTY,
                          jnp.where((per_row == FULL).all(0), FULL, PARTIAL)).astype(jnp.int8)
    if st.S % st.bk:
        # The last key block runs past S: its padding must be masked, so it is never FULL.
        last = kinds[:, -1]
        kinds = kinds.at[:, -1].set(jnp.where(last == FULL, PARTIAL, last).astype(jnp.int8))
    return kinds


# --------------------------------------------------------------------------------------------
# Layout helpers: heads grouped as [B, K, G, ...] so GQA never copies K/V.
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


def _to_blocks(query, key, value, st: _Static):
    """query -> [B, K, G, Tp, H]; key, value -> [B, K, Sp, H|Hv] (zero padded)."""
    B, T, N, H = query.shape
    K = key.shape[2]
    q = query.reshape(B, T, K, N // K, H).transpose(0, 2, 3, 1, 4)
    k = key.transpose(0, 2, 1, 3)
    v = value.transpose(0, 2, 1, 3)
    return (_pad_axis(q, 3, st.nq * st.bq), _pad_axis(k, 2, st.nk * st.bk),
            _pad_axis(v, 2, st.nk * st.bk))


def _bias_tile(bias: Array | None, qb, kb, st: _Static, K: int) -> Array | None:
    """The bias for tile (qb, kb) as [B|1, K|1, G|1, bq|1, bk|1] (bias is pre-padded)."""
    if bias is None:
        return None
    if bias.shape[2] > 1:
        bias = lax.dynamic_slice_in_dim(bias, qb * st.bq, st.bq, axis=2)
    if bias.shape[3] > 1:
        bias = lax.dynamic_slice_in_dim(bias, kb * st.bk, st.bk, axis=3)
    return _group(bias, K)


def _tile_logits(q_blk, k_blk, bias, mask, qb, kb, kind, st: _Static):
    """Masked logits of one tile, [B, K, G, bq, bk] (-inf where not allowed).

    Also returns tanh(raw / cap) for the soft cap's derivative (None without a cap).
    """
    K = k_blk.shape[1]
    acc = accumulation_dtype(q_blk.dtype)
    s = jnp.einsum("bkgqh,bksh->bkgqs", q_blk, k_blk, preferred_element_type=acc) * st.scale
    b = _bias_tile(bias, qb, kb, st, K)
    if b is not None:
        s = s + b.astype(acc)
    t = None
    if st.soft_cap is not None:
        t = jnp.tanh(s / st.soft_cap)
        s = st.soft_cap * t
    padded_keys = st.S % st.bk != 0
    if mask is None and not padded_keys:
        return s, t

    def masked(s):
        q_pos = qb * st.bq + jnp.arange(st.bq, dtype=jnp.int32)
        kv_pos = kb * st.bk + jnp.arange(st.bk, dtype=jnp.int32)
        allowed = kv_pos < st.S
        if mask is not None:
            allowed = _group(mask.evaluate(q_pos, kv_pos), K) & allowed
        return jnp.where(allowed, s, -jnp.inf)

    return lax.cond(kind == FULL, lambda s: s, masked, s), t


def _visit(counts, order, kinds, qb, body, carry):
    """Run ``body(kb, kind, carry)`` over the non-empty key blocks of query block ``qb``."""

    def step(state):
        i, c = state
        kb = order[qb, i]
        return i + 1, body(kb, kinds[qb, kb], c)

    _, carry = lax.while_loop(lambda state: state[0] < counts[qb], step, (jnp.int32(0), carry))
    return carry


# --------------------------------------------------------------------------------------------
# Forward and backward
# --------------------------------------------------------------------------------------------


def _forward(st: _Static, query, key, value, bias, mask, kinds, order, counts):
    B, T, N, _ = query.shape
    K, Hv = key.shape[2], value.shape[-1]
    G = N // K
    acc_t = accumulation_dtype(query.dtype)
    q, k, v = _to_blocks(query, key, value, st)
    bias = _pad_bias(bias, st)

    def one_query_block(qb):
        q_blk = lax.dynamic_slice_in_dim(q, qb * st.bq, st.bq, axis=3)

        def update(kb, kind, carry):
            m, l, o = carry
            k_blk = lax.dynamic_slice_in_dim(k, kb * st.bk, st.bk, axis=2)
            v_blk = lax.dynamic_slice_in_dim(v, kb * st.bk, st.bk, axis=2)
            s, _ = _tile_logits(q_blk, k_blk, bias, mask, qb, kb, kind, st)
            m_new = jnp.maximum(m, s.max(-1))
            m_safe = jnp.where(m_new == -jnp.inf, 0, m_new)
            alpha = jnp.exp(m - m_safe)
            p = jnp.exp(s - m_safe[..., None])
            pv = jnp.einsum("bkgqs,bksh->bkgqh", p.astype(v.dtype), v_blk,
                            preferred_element_type=acc_t)
            return m_new, alpha * l + p.sum(-1), alpha[..., None] * o + pv

        init = (jnp.full((B, K, G, st.bq), -jnp.inf, acc_t), jnp.zeros((B, K, G, st.bq), acc_t),
                jnp.zeros((B, K, G, st.bq, Hv), acc_t))
        m, l, o = _visit(counts, order, kinds, qb, update, init)
        nonempty = l > 0
        safe_l = jnp.where(nonempty, l, 1)
        return o / safe_l[..., None], jnp.where(nonempty, m + jnp.log(safe_l), -jnp.inf)

    o, lse = lax.map(one_query_block, jnp.arange(st.nq, dtype=jnp.int32))
    # o: [nq, B, K, G, bq, Hv] -> [B, T, N, Hv]; lse: [nq, B, K, G, bq] -> [B, N, T]
    o = o.transpose(1, 0, 4, 2, 3, 5).reshape(B, st.nq * st.bq, N, Hv)[:, :T]
    lse = lse.transpose(1, 2, 3, 0, 4).reshape(B, N, st.nq * st.bq)[:, :, :T]
    return o.astype(query.dtype), lse


def _pad_bias(bias, st: _Static):
    if bias is None:
        return None
    if bias.shape[2] > 1:
        bias = _pad_axis(bias, 2, st.nq * st.bq)
    if bias.shape[3] > 1:
        bias = _pad_axis(bias, 3, st.nk * st.bk)
    return bias


@partial(jax.custom_vjp, nondiff_argnums=(0,))
def _attention(st, query, key, value, bias, mask, kinds, order, counts):
    return _forward(st, query, key, value, bias, mask, kinds, order, counts)


def _attention_fwd(st, query, key, value, bias, mask, kinds, order, counts):
    out, lse = _forward(st, query, key, value, bias, mask, kinds, order, counts)
    return (out, lse), (query, key, value, bias, mask, kinds, order, counts, out, lse)


def _attention_bwd(st, residuals, cotangents):
    query, key, value, bias, mask, kinds, order, counts, out, lse = residuals
    d_out, d_lse = cotangents
    B, T, N, H = query.shape
    K, Hv = key.shape[2], value.shape[-1]
    G = N // K
    acc_t = accumulation_dtype(query.dtype)
    q, k, v = _to_blocks(query, key, value, st)
    padded_bias = _pad_bias(bias, st)
    Tp = st.nq * st.bq

    def grouped_rows(x, width):  # [B, T, N, width] -> [B, K, G, Tp, width]
        x = x.reshape(B, T, K, G, width).transpose(0, 2, 3, 1, 4)
        return _pad_axis(x, 3, Tp)

    def grouped_stats(x):  # [B, N, T] -> [B, K, G, Tp]
        return _pad_axis(x.reshape(B, K, G, T), 3, Tp)

    do = grouped_rows(d_out, Hv)
    # D_i = sum_h dO_ih O_ih, the softmax Jacobian's row term; dlse enters the same way.
    delta = grouped_stats((d_out.astype(acc_t) * out.astype(acc_t)).sum(-1).swapaxes(1, 2))
    row_term = grouped_stats(d_lse.astype(acc_t)) - delta
    lse_g = grouped_stats(lse)
    lse_safe = jnp.where(lse_g == -jnp.inf, 0, lse_g)

    def one_query_block(qb, grads):
        qb = qb.astype(jnp.int32)  # the loop index is int64 under jax_enable_x64
        dq, dk, dv, dbias = grads
        q_blk = lax.dynamic_slice_in_dim(q, qb * st.bq, st.bq, axis=3)
        do_blk = lax.dynamic_slice_in_dim(do, qb * st.bq, st.bq, axis=3)
        lse_blk = lax.dynamic_slice_in_dim(lse_safe, qb * st.bq, st.bq, axis=3)
        row_blk = lax.dynamic_slice_in_dim(row_term, qb * st.bq, st.bq, axis=3)

        def update(kb, kind, carry):
            dq_blk, dk, dv, dbias = carry
            k_blk = lax.dynamic_slice_in_dim(k, kb * st.bk, st.bk, axis=2)
            v_blk = lax.dynamic_slice_in_dim(v, kb * st.bk, st.bk, axis=2)
            s, t = _tile_logits(q_blk, k_blk, padded_bias, mask, qb, kb, kind, st)
            p = jnp.exp(s - lse_blk[..., None])
            dp = jnp.einsum("bkgqh,bksh->bkgqs", do_blk, v_blk, preferred_element_type=acc_t)
            ds = p * (dp + row_blk[..., None])
            if t is not None:
                ds = ds * (1 - t * t)
            if dbias is not None:
                dbias = _add_bias_tile(dbias, ds, qb, kb, st)
            ds_q = (ds * st.scale).astype(query.dtype)
            dq_blk = dq_blk + jnp.einsum("bkgqs,bksh->bkgqh", ds_q, k_blk,
                                         preferred_element_type=acc_t)
            dk_tile = jnp.einsum("bkgqs,bkgqh->bksh", ds_q, q_blk, preferred_element_type=acc_t)
            dv_tile = jnp.einsum("bkgqs,bkgqh->bksh", p.astype(value.dtype), do_blk,
                                 preferred_element_type=acc_t)
            dk = _add_slice(dk, dk_tile, kb * st.bk, axis=2)
            dv = _add_slice(dv, dv_tile, kb * st.bk, axis=2)
            return dq_blk, dk, dv, dbias

        dq_blk = jnp.zeros((B, K, G, st.bq, H), acc_t)
        dq_blk, dk, dv, dbias = _visit(counts, order, kinds, qb, update, (dq_blk, dk, dv, dbias))
        dq = lax.dynamic_update_slice_in_dim(dq, dq_blk, qb * st.bq, axis=3)
        return dq, dk, dv, dbias

    Sp = st.nk * st.bk
    grads = (jnp.zeros((B, K, G, Tp, H), acc_t), jnp.zeros((B, K, Sp, H), acc_t),
             jnp.zeros((B, K, Sp, Hv), acc_t),
             None if bias is None else jnp.zeros(padded_bias.shape, acc_t))
    dq, dk, dv, dbias = lax.fori_loop(0, st.nq, one_query_block, grads)

    dq = dq[:, :, :, :T].transpose(0, 3, 1, 2, 4).reshape(B, T, N, H).astype(query.dtype)
    dk = dk[:, :, : st.S].transpose(0, 2, 1, 3).astype(key.dtype)
    dv = dv[:, :, : st.S].transpose(0, 2, 1, 3).astype(value.dtype)
    if dbias is not None:
        dbias = dbias[:, :, : bias.shape[2], : bias.shape[3]].astype(bias.dtype)
    return dq, dk, dv, dbias, None, None, None, None


def _add_slice(x: Array, update: Array, start, axis: int) -> Array:
    current = lax.dynamic_slice_in_dim(x, start, update.shape[axis], axis=axis)
    return lax.dynamic_update_slice_in_dim(x, current + update, start, axis=axis)


def _add_bias_tile(dbias: Array, ds: Array, qb, kb, st: _Static) -> Array:
    """Accumulate d(logits) of one tile into the bias gradient, summing broadcast dims."""
    Bb, Nb, Tb, Sb = dbias.shape
    B, K, G, bq, bk = ds.shape
    g = ds.reshape(B, K * G, bq, bk)
    axes = tuple(i for i, (want, have) in enumerate(zip((Bb, Nb, Tb, Sb), g.shape, strict=True))
                 if want == 1 and have != 1)
    g = g.sum(axes, keepdims=True)
    zero = jnp.int32(0)
    start = (zero, zero, qb * st.bq if Tb > 1 else zero, kb * st.bk if Sb > 1 else zero)
    current = lax.dynamic_slice(dbias, start, g.shape)
    return lax.dynamic_update_slice(dbias, current + g, start)


_attention.defvjp(_attention_fwd, _attention_bwd)
