"""The tile logic of blocked attention, defined once: the tile kinds of a block map, block
sizes, the treatment of the padded last key tile, the tile schedule, the in-tile mask and the
kernels' input checks. The GPU and TPU flash kernels use it, and so do ``jattn.masks`` (block
maps) and ``jattn``'s chunked path (tiles in plain JAX).

A kernel call describes its mask with a few native pieces, all optional:

* a static band ``lo <= kv - q <= hi`` (causal is ``hi = 0``; a window (left, right) is
  ``lo = -left, hi = right``);
* segment ids (``q_segment_ids[b, q] == kv_segment_ids[b, kv]``);
* valid lengths (``q < q_lengths[b]`` and ``kv < kv_lengths[b]``);
* a static mask: any hashable object with ``allows(q_pos, kv_pos)`` evaluated elementwise on
  broadcastable position arrays inside each tile (a mask of positions only, such as
  ``jattn.masks.neighborhood``; part of the compiled kernel, no array of its own);
* a dense boolean mask [Bm, Nm, T, S] (Bm in {1, B}, Nm in {1, N}) for anything else;

and, to skip work, a *block map*: int8 [Bm, Nm, ceil(T / block_q), ceil(S / block_kv)] whose
entries say whether a tile is EMPTY (skipped entirely), FULL (no mask arithmetic) or PARTIAL
(masked elementwise). The block map is a promise the caller makes: EMPTY and FULL must be
true of the elementwise mask. Keys past S (padding to a whole block) are masked in any case:
the last key tile of such a call is never FULL (:func:`mark_padded_keys`).

A score modifier (``score_mod`` and the arrays it reads) may change every tile's logits
before the soft cap and the mask (:func:`modified_scores`); the kernels differentiate it
in the tile, w.r.t. the logits and those arrays.

This module imports jax only.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp

EMPTY, PARTIAL, FULL = 0, 1, 2
"""Tile kinds of a block map (int8): nothing attends (skip the tile), some attend (mask it),
all attend (no mask arithmetic). Ordered, so ``&`` of two maps is min, ``|`` is max and ``~``
is ``FULL - kind``."""


@dataclasses.dataclass(frozen=True, repr=False)
class BlockSizes:
    """Tile sizes of one blocked-attention call.

    ``block_q`` x ``block_kv`` tiles the forward pass; ``block_q_bwd`` / ``block_kv_bwd``
    tile the backward pass (None: as the forward). The Pallas kernels share one tiling (and
    one block map) between the forward, dK/dV and dQ kernels, so they take no separate
    backward sizes. ``num_warps`` / ``num_stages`` are Triton's (GPU kernel only); None lets
    the kernel pick.

    >>> BlockSizes(128, 64)
    BlockSizes(block_q=128, block_kv=64)
    >>> BlockSizes(512, 512, block_q_bwd=256).backward
    (256, 512)
    """

    block_q: int
    block_kv: int
    block_q_bwd: int | None = None
    block_kv_bwd: int | None = None
    num_warps: int | None = None
    num_stages: int | None = None

    def __post_init__(self):
        for field in dataclasses.fields(self):
            size = getattr(self, field.name)
            if size is None and field.default is None:
                continue
            if isinstance(size, bool) or not isinstance(size, int) or size < 1:
                raise ValueError(f"{field.name}: expected a positive int, got {size!r}")

    def __repr__(self) -> str:
        given = [f"{f.name}={getattr(self, f.name)}" for f in dataclasses.fields(self)
                 if f.default is dataclasses.MISSING or getattr(self, f.name) is not None]
        return f"BlockSizes({', '.join(given)})"

    @property
    def backward(self) -> tuple[int, int]:
        """(block_q, block_kv) of the backward pass."""
        return (self.block_q if self.block_q_bwd is None else self.block_q_bwd,
                self.block_kv if self.block_kv_bwd is None else self.block_kv_bwd)

    def check_shared_tiles(self) -> None:
        """Raise unless the backward pass tiles as the forward (the kernels' one tiling)."""
        if self.backward != (self.block_q, self.block_kv):
            raise ValueError(f"block_sizes: the flash kernels tile the forward and backward "
                             f"passes alike, got {self}")


def cdiv(a: int, b: int) -> int:
    """Ceiling division: the smallest integer >= a / b (b > 0), e.g. tiles of size b covering a."""
    return -(-a // b)


def mark_padded_keys(kinds: jax.Array, S: int, block_kv: int) -> jax.Array:
    """The block map ``kinds`` [..., nq, nk] with its last key tile never FULL when S is not
    a multiple of ``block_kv``: that tile holds padding keys, which must be masked.

    >>> mark_padded_keys(jnp.array([[FULL, FULL]], jnp.int8), S=7, block_kv=4).tolist()
    [[2, 1]]
    """
    if S % block_kv == 0:
        return kinds
    last = kinds[..., -1]
    return kinds.at[..., -1].set(jnp.where(last == FULL, PARTIAL, last).astype(kinds.dtype))


class Schedule(NamedTuple):
    """The non-empty tiles of each row of a block map, in ascending column order.

    Entries past ``count`` repeat the row's last non-empty column (0 for an empty row) with
    kind EMPTY, so a pipelined kernel that walks all columns re-reads the same tile instead
    of fetching a new one.
    """

    index: jax.Array  # int32 [Bm, Nm, rows, cols]: column of the i-th non-empty tile
    kind: jax.Array  # int8 [Bm, Nm, rows, cols]: its kind (EMPTY past count)
    count: jax.Array  # int32 [Bm, Nm, rows]: number of non-empty tiles in the row


def schedule(block_map: jax.Array) -> Schedule:
    """Schedule of the rows of ``block_map`` [Bm, Nm, rows, cols] (transpose the last two
    axes first to walk columns, as the dK/dV kernel does).

    >>> s = schedule(jnp.array([[[[0, 2, 0, 1]]]], jnp.int8))
    >>> s.index.tolist(), s.kind.tolist(), s.count.tolist()
    ([[[[1, 3, 3, 3]]]], [[[[2, 1, 0, 0]]]], [[[2]]])
    """
    cols = block_map.shape[-1]
    nonempty = block_map != EMPTY
    order = jnp.argsort(~nonempty, axis=-1, stable=True).astype(jnp.int32)
    count = nonempty.sum(-1, dtype=jnp.int32)
    position = jnp.arange(cols, dtype=jnp.int32)
    last = jnp.take_along_axis(order, jnp.maximum(count - 1, 0)[..., None], axis=-1)
    valid = position < count[..., None]
    index = jnp.where(valid, order, last)
    index = jnp.where(count[..., None] > 0, index, 0)
    kind = jnp.where(valid, jnp.take_along_axis(block_map, index, axis=-1), EMPTY)
    return Schedule(index, kind.astype(jnp.int8), count)


def tile_allowed(q_pos: jax.Array, kv_pos: jax.Array, *, kv_limit: int,
                 lo: int | None = None, hi: int | None = None,
                 q_segment_ids: jax.Array | None = None,
                 kv_segment_ids: jax.Array | None = None,
                 q_length: jax.Array | None = None, kv_length: jax.Array | None = None,
                 dense: jax.Array | None = None, static=None) -> jax.Array:
    """Elementwise mask of one tile, bool [bq, bk] (or [bk, bq] from transposed inputs).

    The one definition of the mask pieces, used by both kernels. Positions and ids are
    either vectors (queries along the first axis, keys along the second) or 2-D arrays that
    broadcast to the tile in the caller's orientation.

    Args:
        q_pos: int32 [bq] or broadcastable 2-D: the tile's query positions.
        kv_pos: int32 [bk] or broadcastable 2-D: its key positions.
        kv_limit: S; keys at or past it are padding.
        lo, hi: the static band (None: unbounded).
        q_segment_ids, kv_segment_ids: the tile's ids, as the positions (both or neither).
        q_length, kv_length: scalars for this batch row.
        dense: the tile of the dense mask (nonzero = allowed).
        static: the static mask (``static.allows(q_pos, kv_pos)``), or None.
    """
    def rows(x):
        return x[:, None] if x.ndim == 1 else x

    def cols(x):
        return x[None, :] if x.ndim == 1 else x

    q_pos, kv_pos = rows(q_pos), cols(kv_pos)
    ok = kv_pos < kv_limit
    if lo is not None:
        ok &= kv_pos - q_pos >= lo
    if hi is not None:
        ok &= kv_pos - q_pos <= hi
    if q_segment_ids is not None:
        ok &= rows(q_segment_ids) == cols(kv_segment_ids)
    if q_length is not None:
        ok &= q_pos < q_length
    if kv_length is not None:
        ok &= kv_pos < kv_length
    if dense is not None:
        ok &= dense != 0
    if static is not None:
        ok &= static.allows(q_pos, kv_pos)
    return ok


def floating_args(args) -> list[int]:
    """Indices of the floating arrays in ``args`` (the differentiable ones)."""
    return [i for i, a in enumerate(args) if jnp.issubdtype(jnp.result_type(a), jnp.inexact)]


def modified_scores(score_mod, score: jax.Array, indices, args=(), *, pullback: bool = False):
    """A tile's logits after a score modifier: ``score_mod(score, *indices, *args)``.

    ``score_mod`` is vectorised: it takes the tile's float32 logits and the (batch, head,
    q_index, kv_index) int32 arrays, all of the score's rank and broadcastable to it, then
    the arrays it reads (a bias table, per-head slopes), and returns the modified logits
    (``jattn.core.score_mod`` builds one from a scalar FlexAttention-style function).

    With ``pullback`` also returns ``back(d_score) -> (d_raw, d_args)``: the cotangent of the
    modified logits taken back to the unmodified ones and to ``args`` (one entry per arg,
    None for an integer one, such as an index table).

    >>> alibi = lambda s, b, h, q, k, slope: s - slope * jnp.abs(k - q)
    >>> q, k = jnp.arange(3)[:, None], jnp.arange(3)[None, :]
    >>> s, back = modified_scores(alibi, jnp.zeros((3, 3)), (0, 0, q, k), (jnp.float32(0.5),),
    ...                           pullback=True)
    >>> s[0].tolist()
    [0.0, -0.5, -1.0]
    >>> d_raw, (d_slope,) = back(jnp.ones((3, 3)))
    >>> float(d_slope)  # minus the sum of |k - q|
    -8.0
    """
    if not pullback:
        return score_mod(score, *indices, *args)
    where = floating_args(args)

    def modify(s, floats):
        full = list(args)
        for i, a in zip(where, floats, strict=True):
            full[i] = a
        return score_mod(s, *indices, *full)

    out, vjp = jax.vjp(modify, score, tuple(args[i] for i in where))

    def back(d_score):
        d_raw, d_floats = vjp(d_score)
        by_index = dict(zip(where, d_floats, strict=True))
        return d_raw, tuple(by_index.get(i) for i in range(len(args)))

    return out, back


def leading_index_map(lead: int, whole: int):
    """A BlockSpec index map that keeps the first ``lead`` grid indices and covers the
    ``whole`` trailing axes with one block (the score_mod's arguments and their per-program
    cotangents).

    >>> leading_index_map(2, 3)(4, 5, 6)
    (4, 5, 0, 0, 0)
    """
    return lambda *ids: (*ids[:lead], *(0,) * whole)


def zero_cotangents(args) -> tuple:
    """Zeros for the floating ``args`` and None for the integer ones: the start of a
    ``modified_scores`` pullback's accumulated ``d_args``."""
    where = floating_args(args)
    return tuple(jnp.zeros(jnp.shape(a), jnp.result_type(a)) if i in where else None
                 for i, a in enumerate(args))


# --------------------------------------------------------------------------------------------
# Input checks shared by the kernels


class DTypeError(ValueError, TypeError):
    """A wrong dtype. Both a TypeError (what it is) and a ValueError (what
    ``jax.nn.dot_product_attention`` raises for it, so code written for jax.nn that catches
    ValueError keeps working). jattn raises it for every dtype problem."""


DTYPES = ("float32", "bfloat16", "float16")
MAX_HEAD_DIM = 256


class KernelDims(NamedTuple):
    """The sizes of a kernel call: query [B, T, N, H], key [B, S, K, H], value [B, S, K, Hv]."""

    B: int
    T: int
    N: int
    H: int
    S: int
    K: int
    Hv: int
    dtype: jnp.dtype


def _check_static_int(name: str, x) -> None:
    if x is not None and (isinstance(x, bool) or not isinstance(x, int)):
        raise ValueError(f"{name}: expected a Python int or None, got {x!r}")


def _check_ints(name: str, x, shape: tuple[int, ...], letters: str) -> None:
    if tuple(jnp.shape(x)) != shape:
        raise ValueError(f"{name}: expected [{letters}] = {shape}, got {tuple(jnp.shape(x))}")
    if not jnp.issubdtype(jnp.result_type(x), jnp.integer):
        raise DTypeError(f"{name}: expected an integer dtype, got {jnp.result_type(x)}")


def check_inputs(query, key, value, *, lo=None, hi=None, q_segment_ids=None,
                 kv_segment_ids=None, q_lengths=None, kv_lengths=None, dense_mask=None,
                 logits_soft_cap=None) -> KernelDims:
    """Validate a flash kernel's arguments (see ``gpu.flash_attention``) and return the sizes.

    Raises:
        ValueError: naming the argument: wrong ranks or shapes, N % K != 0, an empty
            dimension, a head dim over ``MAX_HEAD_DIM``, a band that is not a Python int,
            segment ids without their partner, a non-positive soft cap.
        DTypeError: a dtype other than ``DTYPES``, mixed dtypes, non-integer ids or
            lengths, a non-boolean dense mask.
    """
    for name, x in (("query", query), ("key", key), ("value", value)):
        if jnp.ndim(x) != 4:
            raise ValueError(f"{name}: expected a 4-d array [B, T|S, N|K, H], got shape "
                             f"{tuple(jnp.shape(x))}")
    B, T, N, H = query.shape
    _, S, K, _ = key.shape
    Hv = value.shape[-1]
    if key.shape[0] != B or key.shape[3] != H:
        raise ValueError(f"key: expected [B={B}, S, K, H={H}], got {tuple(key.shape)}")
    if value.shape[:3] != key.shape[:3]:
        raise ValueError(f"value: expected [B, S, K] = {tuple(key.shape[:3])} leading dims, "
                         f"got {tuple(value.shape)}")
    if min(T, S, N, K, H, Hv) < 1:
        raise ValueError(f"query, key, value: empty dimension in {tuple(query.shape)}, "
                         f"{tuple(key.shape)}, {tuple(value.shape)}")
    if N % K:
        raise ValueError(f"key: query heads N={N} must be a multiple of kv heads K={K}; "
                         f"query {tuple(query.shape)}, key {tuple(key.shape)}")
    if max(H, Hv) > MAX_HEAD_DIM:
        raise ValueError(f"query, value: head dims up to {MAX_HEAD_DIM}, got H={H}, Hv={Hv}")
    dtype = jnp.dtype(jnp.result_type(query))
    if dtype.name not in DTYPES:
        raise DTypeError(f"query: expected one of {DTYPES}, got {dtype}")
    for name, x in (("key", key), ("value", value)):
        if jnp.result_type(x) != dtype:
            raise DTypeError(f"{name}: expected dtype {dtype} like query, got "
                             f"{jnp.result_type(x)}")
    _check_static_int("lo", lo)
    _check_static_int("hi", hi)
    if logits_soft_cap is not None and (
            isinstance(logits_soft_cap, bool) or not isinstance(logits_soft_cap, int | float)
            or not logits_soft_cap > 0):
        raise ValueError(f"logits_soft_cap: expected None or a positive float, got "
                         f"{logits_soft_cap!r}")
    if (q_segment_ids is None) != (kv_segment_ids is None):
        raise ValueError("q_segment_ids, kv_segment_ids: give both or neither")
    if q_segment_ids is not None:
        _check_ints("q_segment_ids", q_segment_ids, (B, T), "B, T")
        _check_ints("kv_segment_ids", kv_segment_ids, (B, S), "B, S")
    for name, x in (("q_lengths", q_lengths), ("kv_lengths", kv_lengths)):
        if x is not None:
            _check_ints(name, x, (B,), "B")
    if dense_mask is not None:
        shape = tuple(jnp.shape(dense_mask))
        if len(shape) != 4 or shape[0] not in (1, B) or shape[1] not in (1, N) or (
                shape[2:] != (T, S)):
            raise ValueError(f"dense_mask: expected [1 or B={B}, 1 or N={N}, T={T}, S={S}], "
                             f"got {shape}")
        if jnp.result_type(dense_mask) != jnp.bool_:
            raise DTypeError(f"dense_mask: expected a boolean dtype, got "
                             f"{jnp.result_type(dense_mask)}")
    return KernelDims(B, T, N, H, S, K, Hv, dtype)


def check_block_map(block_map, dims: KernelDims, block_sizes: BlockSizes) -> jax.Array | None:
    """The block map as int8 [Bm, Nm, nq, nk] with its padded last key tile never FULL
    (:func:`mark_padded_keys`); None stays None (every tile PARTIAL)."""
    bq, bk = block_sizes.block_q, block_sizes.block_kv
    nq, nk = cdiv(dims.T, bq), cdiv(dims.S, bk)
    if block_map is None:
        return None
    shape = tuple(jnp.shape(block_map))
    if len(shape) != 4 or shape[0] not in (1, dims.B) or shape[1] not in (1, dims.N) or (
            shape[2:] != (nq, nk)):
        raise ValueError(f"block_map: expected [1 or B={dims.B}, 1 or N={dims.N}, "
                         f"ceil(T/block_q)={nq}, ceil(S/block_kv)={nk}] (tiles of {bq} x {bk}), "
                         f"got {shape}")
    return mark_padded_keys(jnp.asarray(block_map).astype(jnp.int8), dims.S, bk)
