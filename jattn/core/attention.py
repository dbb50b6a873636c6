"""Softmax dot-product attention: the public function, its implementations and the dispatcher.

``dot_product_attention`` is a superset of ``jax.nn.dot_product_attention``. It validates the
input, turns every masking option (``is_causal``, windows, lengths, segment ids, boolean
arrays, :class:`jattn.masks.Mask` objects) into one ``Mask``, and hands normalised 4-D arrays
to an implementation from the registry:

* ``"xla"``: materialises the [B, N, T, S] scores; fastest for short sequences.
* ``"chunked"``: online softmax over key blocks with a recomputing backward pass, memory
  O(T * block), empty tiles skipped (:mod:`jattn.core.chunked`).
* ``"cudnn"``: ``jax.nn``'s cuDNN flash attention where its features allow (GPU only).
* ``"pallas_gpu"``, ``"pallas_tpu"``, ``"pallas"``: jattn's own flash kernels
  (:mod:`jattn.core.kernels`); ``"pallas"`` is the first choice on GPUs and TPUs.

An implementation raises ``NotImplementedError`` for what it lacks and the dispatcher moves on.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import NamedTuple, Protocol

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jattn.core import chunked as _chunked
from jattn.core import kernels as _kernels
from jattn.core import masks as _masks
from jattn.core import score_mod as _score_mod
from jattn.core.masks import Mask
from jattn.core.shapes import (
    Array,
    DTypeError,
    accumulation_dtype,
    check_broadcastable,
    check_floating,
    check_integer,
    check_qkv,
    check_rank,
    check_shape,
    check_values_in_range,
    left_pad_rank,
)


class Implementation(Protocol):
    """What the registry holds: normalised inputs in, (output, lse) out.

    Args:
        query: [B, T, N, H]; key: [B, S, K, H]; value: [B, S, K, Hv]; one floating dtype.
        bias: None or floating [B|1, N|1, T|1, S|1].
        mask: None or a Mask whose dims() broadcast to (B, N).
        scale: Python float.
        logits_soft_cap: None or a positive Python float.
        dropout: None or a :class:`Dropout` (an implementation without it raises
            NotImplementedError).
        score_mod: passed only when the call has one: a function (score, batch, head,
            q_index, kv_index) -> score for scalars (:mod:`jattn.core.score_mod`), applied
            to scale q.k + bias before the soft cap.

    Returns:
        (output [B, T, N, Hv] in the input dtype, lse [B, N, T] in float32 or wider).
    """

    def __call__(self, query: Array, key: Array, value: Array, bias: Array | None,
                 mask: Mask | None, *, scale: float, logits_soft_cap: float | None,
                 dropout: Dropout | None, score_mod=None) -> tuple[Array, Array]: ...


class Dropout(NamedTuple):
    """Attention-probability dropout: each probability is zeroed with chance ``rate`` and the
    kept ones are scaled by 1 / (1 - rate); ``rng`` is a JAX key."""

    rate: float
    rng: Array


_MAX_BATCH_AXES = 8  # leading batch axes of query [*batch, T, N, H]


def masked_softmax(logits: Array, allowed: Array) -> Array:
    """Softmax over the last axis restricted to ``allowed``; a row with nothing allowed gives
    zeros and zero gradients, never NaN (every exp sees a finite argument). The subtracted
    row maximum is a constant for the gradient: the softmax does not depend on it, and the
    gradient of max() would hinge on an equality test between the maximum and the logits,
    which XLA may recompute with different roundings in different fusions.

    >>> import jax.numpy as jnp
    >>> masked_softmax(jnp.zeros((2, 2)), jnp.array([[True, True], [False, False]])).tolist()
    [[0.5, 0.5], [0.0, 0.0]]
    """
    row_max = jnp.max(jnp.where(allowed, logits, -jnp.inf), axis=-1, keepdims=True)
    row_max = lax.stop_gradient(jnp.where(jnp.isfinite(row_max), row_max, 0))
    weights = jnp.where(allowed, jnp.exp(jnp.where(allowed, logits - row_max, 0)), 0)
    total = weights.sum(-1, keepdims=True)
    return weights / jnp.where(total > 0, total, 1)


def register_implementation(name: str) -> Callable[[Implementation], Implementation]:
    """Decorator adding an implementation under ``name``."""

    def add(fn: Implementation) -> Implementation:
        _REGISTRY[name] = fn
        return fn

    return add


def implementations() -> tuple[str, ...]:
    """Names of the registered implementations."""
    return tuple(_REGISTRY)


def _auto_order(T: int, S: int) -> list[str]:
    """On a GPU or TPU the Pallas kernel first (it falls through on what it lacks). Then
    "xla" while the problem fits in one chunked tile (nothing to skip, no loop overhead),
    "chunked" beyond: it is faster from T = S = 1024 on (docs/benchmarks.md) and its
    memory does not grow with T * S."""
    first = ["pallas"] if jax.default_backend() in ("gpu", "tpu") else []
    one_tile = _chunked.DEFAULT_BLOCK_SIZES
    if T <= one_tile.block_q and S <= one_tile.block_kv:
        return [*first, "xla", "chunked"]
    return [*first, "chunked", "xla"]


def dot_product_attention(query, key, value, bias=None, mask=None, *, scale=None,
                          is_causal=False, query_seq_lengths=None, key_value_seq_lengths=None,
                          local_window_size=None, query_segment_ids=None, kv_segment_ids=None,
                          logits_soft_cap=None, score_mod=None, return_lse=False,
                          implementation=None, return_residual=False, dropout_rate=0.0,
                          dropout_rng=None):
    r"""Scaled dot-product attention, a superset of ``jax.nn.dot_product_attention``.

    .. math::
        \mathrm{out} = \mathrm{softmax}_S\big(\mathrm{cap}(\mathrm{mod}(\mathrm{scale}\,
        q k^\top + \mathrm{bias})) \text{ where allowed, } -\infty \text{ elsewhere}\big)\,
        v, \qquad \mathrm{cap}(x) = c \tanh(x / c)

    A query row that may attend to nothing returns zeros (and zero gradients), never NaN.
    Scores and softmax statistics are computed in float32 (or wider) whatever the input dtype.

    Args:
        query: [B, T, N, H], [T, N, H], or ``[*batch, T, N, H]`` with several batch axes (run as
            one flattened batch B = prod(batch); every per-example argument below then has
            those axes where it has B).
        key: [B, S, K, H] or [S, K, H]; N % K == 0 gives GQA/MQA without repeating K/V.
        value: [B, S, Kv, Hv] or [S, Kv, Hv]; Hv may differ from H, and Kv (a divisor of N)
            from K: query head n reads key head n // (N / K) and value head n // (N / Kv)
            (DiffQKV; "xla" only).
        bias: additive logits bias broadcastable to [B, N, T, S] (leading dims are added).
        mask: bool array broadcastable to [B, N, T, S] (True = may attend) or a
            :class:`jattn.masks.Mask` (whose data, if per example, follows the flattened
            batch).
        scale: logits scale; default 1 / sqrt(H).
        is_causal: query i sees keys j <= i (top-left aligned, as in jax.nn).
        query_seq_lengths: int [B]; queries at or past the length are padding (output 0).
        key_value_seq_lengths: int [B]; keys at or past the length are ignored.
        local_window_size: int w (meaning (w, w)) or (left, right): query i sees keys
            i - left .. i + right.
        query_segment_ids: int [B, T]; with ``kv_segment_ids`` int [B, S] (default: the
            query ids, for self-attention) a query sees only keys of its own segment.
        kv_segment_ids: int [B, S].
        logits_soft_cap: c > 0; logits become c * tanh(logits / c) before masking.
        score_mod: a function ``(score, batch, head, q_index, kv_index) -> score`` written
            for scalars (FlexAttention's contract), applied to every logit after the bias
            and before the soft cap. ALiBi, T5 buckets, relative-position tables and
            per-head re-weighting this way never form a [T, S] array ("xla" does form its
            [B, N, T, S] logits anyway). Gradients reach the arrays it closes over. Supported
            by "xla", "chunked" and the Pallas kernels (:mod:`jattn.core.score_mod`).
        return_lse: also return the log-sum-exp of the masked logits, [B, N, T] (or [N, T]),
            float32; -inf for rows with nothing to attend to. Differentiable.
        implementation: None (the best available here), a name from ``implementations()``,
            a callable of the :class:`jattn.core.attention.Implementation` signature, or a list
            of those tried in turn.
        return_residual: jax.nn's form of ``return_lse``, kept so jax.nn code runs unchanged:
            the log-sum-exp as [B, T, N] (or [T, N]) in the input dtype, without gradient.
        dropout_rate: chance in [0, 1) of zeroing each attention probability (kept ones are
            scaled by 1 / (1 - rate)), as in training-time attention dropout; 0 = off.
            Supported by "xla"; the log-sum-exp is that of the logits, before dropout.
        dropout_rng: a JAX key, required when ``dropout_rate`` > 0.

    Returns:
        output ``[*batch, T, N, Hv]`` in the input dtype; with ``return_lse`` the pair (output,
        lse ``[*batch, N, T]``); with ``return_residual`` the pair (output, residual).

    Raises:
        TypeError: non-floating q/k/v, mismatched dtypes, non-boolean mask, non-integer ids
            or lengths.
        ValueError: wrong ranks or shapes, heads that do not divide, lengths out of range,
            negative windows, a non-positive soft cap, a dropout rate outside [0, 1) or
            without a key, an unknown implementation.
        NotImplementedError: no requested implementation supports the call.

    Example:
        >>> import jax, jax.numpy as jnp, jattn
        >>> q = jax.random.normal(jax.random.key(0), (2, 16, 4, 8))
        >>> kv = jax.random.normal(jax.random.key(1), (2, 16, 2, 8))
        >>> jattn.dot_product_attention(q, kv, kv, is_causal=True).shape
        (2, 16, 4, 8)

    References:
        P68 Sigma (DiffQKV: different K/V head counts and head dims); P75 Dataset
        Decomposition (document masks); P23 CAB (causal/non-causal, self/cross patterns).
    """
    if return_lse and return_residual:
        raise ValueError("return_lse, return_residual: ask for one of them")
    query, key, value = (jnp.asarray(x) for x in (query, key, value))
    batch = _Batch.of(query, key, value)
    query, key, value = (batch.flatten(x, 3) for x in (query, key, value))
    _, T, N, H, S, _, _ = check_qkv(query, key, value, separate_value_heads=True)

    if bias is not None:
        bias = jnp.asarray(bias)
        check_floating("bias", bias)
        bias = batch.broadcastable("bias", bias, (N, T, S), "NTS")

    combined = _combine_masks(
        mask, batch, N=N, T=T, S=S, is_causal=is_causal,
        query_seq_lengths=query_seq_lengths, key_value_seq_lengths=key_value_seq_lengths,
        local_window_size=local_window_size, query_segment_ids=query_segment_ids,
        kv_segment_ids=kv_segment_ids)

    if scale is None:
        scale = float(H) ** -0.5
    if logits_soft_cap is not None and not logits_soft_cap > 0:
        raise ValueError(f"logits_soft_cap: expected a positive number, got {logits_soft_cap}")
    _score_mod.check(score_mod)

    dropout = None
    if not 0.0 <= dropout_rate < 1.0:
        raise ValueError(f"dropout_rate: expected a number in [0, 1), got {dropout_rate}")
    if dropout_rate > 0.0:
        if dropout_rng is None:
            raise ValueError(f"dropout_rng: a key is required with dropout_rate={dropout_rate}")
        dropout = Dropout(float(dropout_rate), dropout_rng)

    out, lse = _dispatch(implementation, query, key, value, bias, combined, scale=scale,
                         logits_soft_cap=logits_soft_cap, dropout=dropout, score_mod=score_mod)
    out, lse = batch.restore(out), batch.restore(lse)
    if return_residual:
        return out, lax.stop_gradient(jnp.swapaxes(lse, -1, -2).astype(out.dtype))
    return (out, lse) if return_lse else out


def attention_weights(query, key, bias=None, mask=None, *, scale=None, is_causal=False,
                      query_seq_lengths=None, key_value_seq_lengths=None,
                      local_window_size=None, query_segment_ids=None, kv_segment_ids=None,
                      logits_soft_cap=None, score_mod=None, lse=None, heads=None,
                      query_positions=None, key_positions=None):
    r"""Exact attention probabilities of chosen heads, query rows and keys, without the
    [T, S] matrix of every head.

    The weights are those :func:`dot_product_attention` computes with the same arguments:
    softmax over keys of cap(scale q k^T + bias) where allowed. Only the selected rows are
    formed, so memory is O(rows x keys): at T = S = 32k with 8 heads, 16 rows of every head
    take 16 MB against 32 GB for the dense map.

    With ``lse`` (the float32 log-sum-exp an implementation returned,
    ``dot_product_attention(..., return_lse=True)``) the weights are exp(logit - lse): the
    normaliser of the forward pass itself, so columns (``key_positions``) of every row cost
    O(rows x columns), and gradients reach q and k both directly and through the lse's
    inputs (the forward's own backward pass). Without it each selected row is normalised
    over all its keys here.

    Args:
        query: ``[*batch, T, N, H]``; key: ``[*batch, S, K, H]`` (GQA and batch axes as in
            :func:`dot_product_attention`).
        bias, mask, scale, is_causal, query_seq_lengths, key_value_seq_lengths: as in
            :func:`dot_product_attention` (pass the same ones as the forward).
        local_window_size, query_segment_ids, kv_segment_ids, logits_soft_cap, score_mod: as
            in :func:`dot_product_attention` (pass the same ones as the forward).
        lse: None or floating ``[*batch, N, T]``: the forward's log-sum-exp.
        heads: None (all) or ints in [0, N): the query heads to return, in that order.
        query_positions: None (all) or ints in [0, T): the query rows.
        key_positions: None (all) or ints in [0, S): the key columns.

    Returns:
        ``[*batch, len(heads), len(query_positions), len(key_positions)]`` float32 (float64 for
        float64 input); weights of masked keys, and whole rows with nothing allowed, are 0.

    Raises:
        ValueError: an index outside its range (checked when concrete), an ``lse`` of the
            wrong shape; and what :func:`dot_product_attention` raises for its arguments.

    Example:
        >>> import jax.numpy as jnp, jattn
        >>> p = jattn.attention_weights(jnp.zeros((1, 3, 1, 2)), jnp.zeros((1, 3, 1, 2)),
        ...                             is_causal=True)
        >>> (p[0, 0] * 6).round().tolist()
        [[6.0, 0.0, 0.0], [3.0, 3.0, 0.0], [2.0, 2.0, 2.0]]
        >>> q = jnp.ones((1, 3, 1, 2))
        >>> out, lse = jattn.dot_product_attention(q, q, q, is_causal=True, return_lse=True)
        >>> jattn.attention_weights(q, q, is_causal=True, lse=lse, query_positions=[2]).shape
        (1, 1, 1, 3)

    References:
        P25 (attention patterns of chosen heads), P41, P50, P03/P57 (maps from the rows and
        columns that matter); ../shared/notes/analysis.md on why the float32 lse matters.
    """
    query, key = jnp.asarray(query), jnp.asarray(key)
    batch = _Batch.of(query, key, key)
    query, key = batch.flatten(query, 3), batch.flatten(key, 3)
    _, T, N, H, S, K, _ = check_qkv(query, key, key)
    acc = accumulation_dtype(query.dtype)
    hp = _positions("heads", heads, N)
    qp = _positions("query_positions", query_positions, T)
    kp = _positions("key_positions", key_positions, S)
    if lse is None and key_positions is not None:  # normalise over every key, then select
        rows = attention_weights(
            batch.restore(query), batch.restore(key), bias, mask, scale=scale,
            is_causal=is_causal, query_seq_lengths=query_seq_lengths,
            key_value_seq_lengths=key_value_seq_lengths, local_window_size=local_window_size,
            query_segment_ids=query_segment_ids, kv_segment_ids=kv_segment_ids,
            logits_soft_cap=logits_soft_cap, score_mod=score_mod, heads=hp, query_positions=qp)
        return jnp.take(rows, kp, axis=-1)
    q = jnp.take(jnp.take(query, qp, axis=1), hp, axis=2)  # [B, P, Nh, H]
    k = jnp.take(jnp.take(key, kp, axis=1), hp // (N // K), axis=2)  # [B, Sk, Nh, H]
    logits = jnp.einsum("bpnh,bsnh->bnps", q, k, preferred_element_type=acc)
    logits = logits * (float(H) ** -0.5 if scale is None else scale)
    if bias is not None:
        bias = jnp.asarray(bias)
        check_floating("bias", bias)
        bias = batch.broadcastable("bias", bias, (N, T, S), "NTS")
        for axis, index in ((1, hp), (2, qp), (3, kp)):
            if bias.shape[axis] > 1:
                bias = jnp.take(bias, index, axis=axis)
        logits = logits + bias.astype(acc)
    if score_mod is not None:
        _score_mod.check(score_mod)
        logits = _score_mod.apply(score_mod, logits, score_indices(logits.shape[0], hp, qp, kp))
    if logits_soft_cap is not None:
        if not logits_soft_cap > 0:
            raise ValueError(f"logits_soft_cap: expected a positive number, got "
                             f"{logits_soft_cap}")
        logits = logits_soft_cap * jnp.tanh(logits / logits_soft_cap)
    combined = _combine_masks(
        mask, batch, N=N, T=T, S=S, is_causal=is_causal, query_seq_lengths=query_seq_lengths,
        key_value_seq_lengths=key_value_seq_lengths, local_window_size=local_window_size,
        query_segment_ids=query_segment_ids, kv_segment_ids=kv_segment_ids)
    allowed = logits > -jnp.inf
    if combined is not None:
        pattern = combined.evaluate(qp, kp)  # [Bm, Nm, P, Sk]
        if pattern.shape[1] > 1:
            pattern = jnp.take(pattern, hp, axis=1)
        allowed = allowed & pattern
    if lse is None:
        return batch.restore(masked_softmax(logits, allowed))
    lse = jnp.asarray(lse)
    check_floating("lse", lse)
    check_shape("lse", lse, (*batch.shape, N, T), "*" * len(batch.shape) + "NT")
    lse = jnp.take(jnp.take(batch.flatten(lse, 2), hp, axis=1), qp, axis=2)
    lse = lse.astype(acc)[..., None]
    ok = allowed & (lse > -jnp.inf)
    weights = jnp.where(ok, jnp.exp(jnp.where(ok, logits - lse, 0)), 0)
    return batch.restore(weights)


def _positions(name: str, index, size: int) -> Array:
    """Selected indices as int32 [P]: all of ``range(size)`` for None; concrete values are
    checked to lie in [0, size)."""
    if index is None:
        return jnp.arange(size, dtype=jnp.int32)
    index = jnp.asarray(index)
    if index.ndim != 1:
        raise ValueError(f"{name}: expected a 1-D sequence of indices, got shape {index.shape}")
    check_integer(name, index)
    check_values_in_range(name, index, 0, size - 1)
    return index.astype(jnp.int32)


class _Batch(NamedTuple):
    """The leading batch axes of a call: query [*shape, T, N, H] runs as [B, T, N, H] with
    B = prod(shape) (1 for a batch-free call, shape ()); per-example arguments are
    flattened the same way and the results restored."""

    shape: tuple[int, ...]

    @classmethod
    def of(cls, query: Array, key: Array, value: Array) -> _Batch:
        check_rank("query", query, range(3, 3 + _MAX_BATCH_AXES + 1),
                   "[*batch, T, N, H] (e.g. [B, T, N, H] or [T, N, H])")
        shape = tuple(query.shape[:-3])
        for name, x in (("key", key), ("value", value)):
            if x.ndim != query.ndim or x.shape[:-3] != shape:
                raise ValueError(f"{name}: expected the query's batch axes {shape} and "
                                 f"[S, K, H] after them, got shape {x.shape} (query "
                                 f"{query.shape})")
        return cls(shape)

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def target(self) -> tuple[int, ...]:
        """The batch axes per-example arrays broadcast against (one axis of 1 when none)."""
        return self.shape or (1,)

    def flatten(self, x: Array, trailing: int) -> Array:
        """[*shape, *rest] (``trailing`` = len(rest)) -> [B, *rest]."""
        return x.reshape(self.size, *x.shape[x.ndim - trailing:])

    def restore(self, x: Array) -> Array:
        """[B, *rest] -> [*shape, *rest]."""
        return x.reshape(*self.shape, *x.shape[1:])

    def per_example(self, name: str, x, trailing: tuple[int, ...], letters: str) -> Array:
        """Integer data of shape [*shape, *trailing] as [B, *trailing]."""
        x = jnp.asarray(x)
        check_integer(name, x)
        check_shape(name, x, (*self.shape, *trailing), "*" * len(self.shape) + letters)
        return self.flatten(x, len(trailing))

    def broadcastable(self, name: str, x: Array, trailing: tuple[int, ...],
                      letters: str) -> Array:
        """An array broadcastable to [*shape, *trailing] (leading axes of 1 added) as
        [B | 1, *trailing | 1]."""
        rank = len(self.target) + len(trailing)
        layout = "[*batch, " + ", ".join(letters) + "]"
        check_rank(name, x, range(rank + 1), f"broadcastable to {layout}")
        x = left_pad_rank(x, rank)
        check_broadcastable(name, x.shape, (*self.target, *trailing),
                            "B" * len(self.target) + letters)
        lead = x.shape[:len(self.target)]
        if math.prod(lead) == 1:
            return x.reshape(1, *x.shape[len(self.target):])
        x = jnp.broadcast_to(x, (*self.target, *x.shape[len(self.target):]))
        return x.reshape(self.size, *x.shape[len(self.target):])


def _combine_masks(mask, batch: _Batch, *, N, T, S, is_causal, query_seq_lengths,
                   key_value_seq_lengths, local_window_size, query_segment_ids,
                   kv_segment_ids) -> Mask | None:
    """Every masking option as one Mask over the flattened batch, validated against the
    call's shapes."""
    B = batch.size
    parts: list[Mask] = []
    if mask is not None:
        if isinstance(mask, Mask):
            user = mask
        else:
            array = jnp.asarray(mask)
            if array.dtype != jnp.bool_:
                raise DTypeError(f"mask: expected a boolean array or a jattn.masks.Mask, "
                                f"got dtype {array.dtype} (shape {array.shape})")
            user = _masks.Dense(batch.broadcastable("mask", array, (N, T, S), "NTS"))
        parts.append(user)
    if is_causal:
        parts.append(_masks.causal())
    if local_window_size is not None:
        window = local_window_size
        if isinstance(window, int | np.integer):
            window = (window, window)
        if not (isinstance(window, Sequence) and len(window) == 2):
            raise ValueError(f"local_window_size: expected an int or (left, right), "
                             f"got {local_window_size!r}")
        try:
            parts.append(_masks.local_window(*window))
        except (TypeError, ValueError) as e:
            raise type(e)(f"local_window_size: {e}") from None
    if query_seq_lengths is not None or key_value_seq_lengths is not None:
        parts.append(_masks.lengths(
            _lengths_array("query_seq_lengths", query_seq_lengths, batch, T),
            _lengths_array("key_value_seq_lengths", key_value_seq_lengths, batch, S)))
    if query_segment_ids is not None or kv_segment_ids is not None:
        q_ids = query_segment_ids if query_segment_ids is not None else kv_segment_ids
        kv_ids = kv_segment_ids if kv_segment_ids is not None else query_segment_ids
        if (query_segment_ids is None or kv_segment_ids is None) and T != S:
            raise ValueError(f"query_segment_ids, kv_segment_ids: give both when T={T} != S={S}")
        parts.append(_masks.segments(
            _per_example_ints("query_segment_ids", q_ids, batch, (T,), "T"),
            _per_example_ints("kv_segment_ids", kv_ids, batch, (S,), "S")))
    for part in parts:
        part.check(T, S, "mask")
        check_broadcastable("mask", part.dims(), (B, N), "BN")
    return _masks.all_of(parts)


def _per_example_ints(name: str, x, batch: _Batch, trailing: tuple[int, ...],
                      letters: str) -> Array:
    """Integer data [*batch, *trailing] as [B, *trailing]; a batch-free call also takes a
    leading axis of 1."""
    x = jnp.asarray(x)
    if not batch.shape and x.ndim == len(trailing) + 1 and x.shape[0] == 1:
        x = x[0]
    return batch.per_example(name, x, trailing, letters)


def _lengths_array(name, x, batch: _Batch, limit) -> Array | None:
    if x is None:
        return None
    x = _per_example_ints(name, x, batch, (), "")
    check_values_in_range(name, x, 0, limit)
    return x


def hashable_implementation(implementation):
    """``implementation`` as a static argument of a jitted function: a list (an order of
    choices) becomes a tuple; names, callables and None are hashable already."""
    return tuple(implementation) if isinstance(implementation, list) else implementation


def _dispatch(implementation, query, key, value, bias, mask, *, scale, logits_soft_cap,
              dropout, score_mod=None):
    if implementation is None:
        choices = _auto_order(query.shape[1], key.shape[1])
    elif isinstance(implementation, str) or callable(implementation):
        choices = [implementation]
    else:
        choices = list(implementation)
    unknown = [c for c in choices if not callable(c) and c not in _REGISTRY]
    if unknown or not choices:
        raise ValueError(f"implementation: unknown {unknown or choices!r}; expected None, one "
                         f"of {sorted(_REGISTRY)}, an Implementation callable, or a list")
    # score_mod is passed only when there is one, so Implementations written before it
    # existed keep working.
    extra = {} if score_mod is None else {"score_mod": score_mod}
    reasons = []
    for choice in choices:
        fn = choice if callable(choice) else _REGISTRY[choice]
        try:
            return fn(query, key, value, bias, mask, scale=scale,
                      logits_soft_cap=logits_soft_cap, dropout=dropout, **extra)
        except NotImplementedError as e:
            name = choice if isinstance(choice, str) else getattr(choice, "__name__", choice)
            reasons.append(f"{name}: {e}")
    raise NotImplementedError("no implementation supports this call: " + "; ".join(reasons))


# --------------------------------------------------------------------------------------------
# Implementations
# --------------------------------------------------------------------------------------------


def score_indices(B: int, heads, q_index, kv_index) -> tuple[Array, ...]:
    """The (batch, head, q_index, kv_index) arguments of a score_mod over logits
    [B, len(heads), len(q_index), len(kv_index)], each an int32 array of that rank."""
    return (jnp.arange(B, dtype=jnp.int32).reshape(B, 1, 1, 1),
            jnp.asarray(heads, jnp.int32).reshape(1, -1, 1, 1),
            jnp.asarray(q_index, jnp.int32).reshape(1, 1, -1, 1),
            jnp.asarray(kv_index, jnp.int32).reshape(1, 1, 1, -1))


def xla_attention(query, key, value, bias, mask, *, scale, logits_soft_cap, dropout,
                  score_mod=None):
    """Materialised scores [B, N, T, S], differentiated by JAX. Memory O(B N T S).

    Masked logits are set to the dtype's lowest finite value (not -inf) so jax.nn.softmax
    stays NaN-free; rows with nothing allowed are then zeroed at the output.
    """
    B, T, N, H = query.shape
    S, K = key.shape[1:3]
    Kv, Hv = value.shape[2:]
    G = N // K
    acc = accumulation_dtype(query.dtype)
    # Heads first before the products: on XLA:CPU the batched matmuls run 15-25% faster
    # forward+backward on [B, N, T, H] operands than on einsums over [B, T, N, H]
    # (docs/benchmarks.md); other backends choose their layouts themselves.
    query, key, value = (jnp.swapaxes(x, 1, 2) for x in (query, key, value))
    if G == 1:
        logits = jnp.einsum("bnth,bnsh->bnts", query, key, preferred_element_type=acc)
    else:
        logits = jnp.einsum("bkgth,bksh->bkgts", query.reshape(B, K, G, T, H), key,
                            preferred_element_type=acc).reshape(B, N, T, S)
    logits = logits * scale
    allowed = None if mask is None else mask.materialize(T, S)
    if bias is not None:
        logits = logits + bias.astype(acc)
    if score_mod is not None:
        logits = _score_mod.apply(score_mod, logits, score_indices(B, range(N), range(T),
                                                                    range(S)))
    if logits_soft_cap is not None:
        logits = logits_soft_cap * jnp.tanh(logits / logits_soft_cap)
    elif bias is not None or score_mod is not None:
        # An additive -inf is a mask too; keep it out of the softmax (it would give NaN rows).
        finite = logits > -jnp.inf
        allowed = finite if allowed is None else allowed & finite
    if allowed is not None:
        logits = jnp.where(allowed, logits, jnp.finfo(acc).min)
    probs = jax.nn.softmax(logits, axis=-1)
    if dropout is not None:
        keep = jax.random.bernoulli(dropout.rng, 1.0 - dropout.rate, probs.shape)
        probs = jnp.where(keep, probs / (1.0 - dropout.rate), 0.0)
    probs = probs.astype(value.dtype)
    lse = jax.nn.logsumexp(logits, axis=-1)
    if Kv == N:
        out = jnp.einsum("bnts,bnsh->bnth", probs, value, preferred_element_type=acc)
    else:
        out = jnp.einsum("bkgts,bksh->bkgth", probs.reshape(B, Kv, N // Kv, T, S), value,
                         preferred_element_type=acc).reshape(B, N, T, Hv)
    if allowed is not None:
        nonempty = jnp.broadcast_to(allowed.any(-1), (B, N, T))
        out = out * nonempty[..., None]
        lse = jnp.where(nonempty, lse, -jnp.inf)
    return jnp.swapaxes(out, 1, 2).astype(query.dtype), lse


def _cudnn_mask_options(mask: Mask | None):
    """Map a Mask onto jax.nn's cuDNN options, or raise NotImplementedError."""
    leaves = [] if mask is None else mask.conjuncts()
    is_causal, window, q_len, kv_len = False, None, None, None
    for m in leaves:
        if isinstance(m, _masks.Band) and m.lo is None and m.hi == 0:
            is_causal = True
        elif isinstance(m, _masks.Band) and m.lo is not None and m.hi == 0 and window is None:
            window = (-m.lo, 0)
        elif isinstance(m, _masks.Lengths) and q_len is None and kv_len is None:
            q_len, kv_len = m.q_lengths, m.kv_lengths
        else:
            raise NotImplementedError(f"cuDNN supports causal, left-only windows and lengths, "
                                      f"not {type(m).__name__}")
    return is_causal, window, q_len, kv_len


def cudnn_attention(query, key, value, bias, mask, *, scale, logits_soft_cap, dropout,
                    score_mod=None):
    """jax.nn's cuDNN flash attention (GPU, float16/bfloat16, H == Hv <= 256, H % 8 == 0)."""
    if score_mod is not None:
        raise NotImplementedError("cuDNN has no score_mod")
    if jax.default_backend() != "gpu":
        raise NotImplementedError(f"cuDNN needs a GPU, the backend is {jax.default_backend()}")
    if query.dtype not in (jnp.float16, jnp.bfloat16):
        raise NotImplementedError(f"cuDNN needs float16/bfloat16, got {query.dtype}")
    H, Hv = query.shape[-1], value.shape[-1]
    if value.shape[2] != key.shape[2]:
        raise NotImplementedError("cuDNN needs as many value heads as key heads")
    if H != Hv or H > 256 or H % 8:
        raise NotImplementedError(f"cuDNN needs H == Hv <= 256 and H % 8 == 0, got {H}, {Hv}")
    if logits_soft_cap is not None:
        raise NotImplementedError("cuDNN path has no logits soft cap")
    if dropout is not None:
        raise NotImplementedError("jax.nn's cuDNN path has no attention dropout")
    is_causal, window, q_len, kv_len = _cudnn_mask_options(mask)
    B = query.shape[0]

    def as_int32(x):
        return None if x is None else jnp.broadcast_to(x, (B,)).astype(jnp.int32)

    out, lse = jax.nn.dot_product_attention(
        query, key, value, bias, scale=scale, is_causal=is_causal,
        query_seq_lengths=as_int32(q_len), key_value_seq_lengths=as_int32(kv_len),
        local_window_size=window, implementation="cudnn", return_residual=True)
    return out, jnp.swapaxes(lse, 1, 2).astype(jnp.float32)


# Every implementation of the library, in one place (the chunked path at its default tiles).
_REGISTRY: dict[str, Implementation] = {
    "xla": xla_attention,
    "chunked": _chunked.chunked_attention,
    "cudnn": cudnn_attention,
    "pallas_gpu": _kernels.pallas_gpu_attention,
    "pallas_tpu": _kernels.pallas_tpu_attention,
    "pallas": _kernels.pallas_attention,
}
