"""The mask algebra: one description of "which key may each query see", for every implementation.

A :class:`Mask` answers three questions about a [T, S] attention pattern:

* ``materialize(T, S)`` -- the dense boolean pattern, shape [Bm, Nm, T, S] where Bm and Nm
  are 1 or the batch/head size the mask's data carries;
* ``evaluate(q_pos, kv_pos)`` -- the same values for any vectors of query and key positions,
  which is what a kernel calls inside one tile;
* ``block_map(T, S, block_q, block_kv)`` -- int8 [Bm, Nm, ceil(T/block_q), ceil(S/block_kv)]
  saying whether each tile is ``EMPTY`` (nothing attends: skip it), ``FULL`` (everything
  attends: skip the mask arithmetic) or ``PARTIAL``. Only positions inside [0, T) x [0, S)
  count. Block maps are *sound*: EMPTY and FULL are always true statements; a PARTIAL tile may
  in rare cases be empty or full (segment ids whose per-tile ranges overlap without a match,
  or combinations such as ``a | b`` where neither side alone is full).

Masks are pytrees (their arrays are leaves), so they pass through ``jit``, ``vmap`` and
``grad`` like any argument. Combine them with ``&``, ``|`` and ``~``.

Conventions follow ``jax.nn.dot_product_attention``: ``True`` means "may attend"; causal is
aligned top-left (query i sees keys j <= i) unless an ``offset`` says otherwise.

References:
    P75 Dataset Decomposition (document masks for packed sequences); P17 EE-MLLM (composite
    attention); P27 Croc (mixed bidirectional/causal attention); P46 AKI (modality-mutual
    attention); P12 GAST (attention restricted to a graph's adjacency); P72 Faster
    Neighborhood Attention (neighbourhoods as a mask whose block map follows the window).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jattn.core.shapes import (
    Array,
    check_bool,
    check_int,
    check_integer,
    check_per_axis,
    check_rank,
    check_values_in_range,
    left_pad_rank,
)
from pallas_kernels.flash.common import EMPTY, FULL, PARTIAL  # the tile kinds, defined once


def _row(x: Array | None, batch, heads=None) -> Array | None:
    """``x`` [Bm, (Nm,) ...] restricted to one batch row (kept as an axis of 1) and, with
    ``heads``, to those heads along axis 1; axes of size 1 are left alone."""
    if x is None:
        return None
    if x.shape[0] > 1:
        x = lax.dynamic_slice_in_dim(x, batch, 1, axis=0)
    if heads is not None and x.shape[1] > 1:
        x = jnp.take(x, heads, axis=1)
    return x


def _pytree(data: Iterable[str], meta: Iterable[str] = ()):
    def wrap(cls):
        cls = dataclasses.dataclass(frozen=True)(cls)
        return jax.tree_util.register_dataclass(cls, data_fields=list(data), meta_fields=list(meta))

    return wrap


def _tile_ranges(length: int, block: int) -> tuple[np.ndarray, np.ndarray]:
    """First and last in-range position of each tile (static numpy)."""
    starts = np.arange(0, length, block)
    return starts, np.minimum(starts + block, length) - 1


def _pad_to_blocks(x: Array, axis: int, block: int) -> Array:
    """Pad ``axis`` to a multiple of ``block`` by repeating the last entry (keeps min/max exact)."""
    length = x.shape[axis]
    extra = -length % block
    if extra == 0:
        return x
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, extra)
    return jnp.pad(x, pad, mode="edge")


def _per_tile(x: Array, axis: int, block: int) -> Array:
    """Reshape ``axis`` (padded by edge repetition) into (tiles, block) for a reduction."""
    x = _pad_to_blocks(x, axis, block)
    shape = (*x.shape[:axis], x.shape[axis] // block, block, *x.shape[axis + 1 :])
    return x.reshape(shape)


def _check_token_data(name: str, *fields: tuple[str, Array, int], high: int | None = None):
    """Per-token integer data: each (field, array [B, length], length), values <= high."""
    for what, x, length in fields:
        check_integer(f"{name}.{what}", x)
        check_rank(f"{name}.{what}", x, (2,), "[B, length]")
        if x.shape[1] != length:
            raise ValueError(f"{name}.{what}: expected length {length}, got shape {x.shape}")
        if high is not None:
            check_values_in_range(f"{name}.{what}", x, 0, high)


def _kind(full: Array, empty: Array) -> Array:
    return jnp.where(empty, EMPTY, jnp.where(full, FULL, PARTIAL)).astype(jnp.int8)


class Mask:
    """Base class: a boolean attention pattern over (query position, key position)."""

    def evaluate(self, q_pos: Array, kv_pos: Array) -> Array:
        """Pattern at query positions ``q_pos`` [tq] and key positions ``kv_pos`` [tk].

        Returns:
            bool [Bm, Nm, tq, tk]. Positions past the data's length read its last entry.
        """
        raise NotImplementedError

    def block_map(self, T: int, S: int, block_q: int, block_kv: int) -> Array:
        """Tile kinds (EMPTY/PARTIAL/FULL), int8 [Bm, Nm, ceil(T/block_q), ceil(S/block_kv)]."""
        raise NotImplementedError

    def dims(self) -> tuple[int, int]:
        """(Bm, Nm): the batch and head sizes the mask's data carries (1 when it carries none)."""
        return (1, 1)

    def check(self, T: int, S: int, name: str) -> None:
        """Raise ValueError (naming ``name``) if the mask cannot describe a [T, S] pattern."""

    def tiles(self) -> tuple[int, int] | None:
        """The (query, key) block sizes the mask is made of, when it has them (a block
        selection); blocked implementations then tile at them. None otherwise."""
        return None

    def key_extent(self) -> int | None:
        """A static bound on how far apart two keys one query may see can lie (the span of
        its allowed key positions, first to last, inclusive), or None when unbounded or
        data-dependent. Blocked implementations size their tiles by it."""
        return None

    def materialize(self, T: int, S: int) -> Array:
        """Dense bool [Bm, Nm, T, S]."""
        return self.evaluate(jnp.arange(T, dtype=jnp.int32), jnp.arange(S, dtype=jnp.int32))

    sparse_rows = False
    """True when the block map differs from row to row by design (data-dependent block
    selection): blocked implementations then schedule each batch row and head on its own
    instead of visiting the union of every row's tiles."""

    def rows(self, batch, heads) -> Mask:
        """The mask of batch row ``batch`` (a traced int scalar) and query heads ``heads``
        (int [G]): dims (1, G or 1). Masks without per-example data return themselves."""
        return self

    def allows(self, q_pos, kv_pos, xp=jnp):
        """The pattern elementwise at broadcastable arrays of query and key positions (a
        column [tq, 1] and a row [1, tk], or two full tiles): what a kernel evaluates inside
        a tile. Defined for masks of positions only (``is_static``); ``xp`` is
        jax.numpy, or numpy for static block maps."""
        raise NotImplementedError(f"{type(self).__name__} carries data; use evaluate()")

    @property
    def is_static(self) -> bool:
        """True for a mask of positions only (no arrays), which a kernel can evaluate in a
        tile from its positions alone (:meth:`allows`)."""
        return not jax.tree_util.tree_leaves(self)

    def conjuncts(self) -> list[Mask]:
        """The masks this one is the ``&`` of, in order: ``a & (b & c)`` gives [a, b, c]; a
        mask that is no ``&`` gives itself. Implementations map each conjunct they know
        natively (a band, lengths, segment ids) onto their own arguments."""
        return [self]

    def __and__(self, other: Mask) -> Mask:
        return And(_as_mask(self), _as_mask(other))

    def __or__(self, other: Mask) -> Mask:
        return Or(_as_mask(self), _as_mask(other))

    def __invert__(self) -> Mask:
        return Not(self)


def _as_mask(m) -> Mask:
    if isinstance(m, Mask):
        return m
    raise TypeError(f"mask: can only combine Mask objects, got {type(m).__name__}")


def _broadcast_dims(*dims: tuple[int, int]) -> tuple[int, int]:
    return tuple(max(d[i] for d in dims) for i in range(2))  # type: ignore[return-value]


# --------------------------------------------------------------------------------------------
# Primitive masks
# --------------------------------------------------------------------------------------------


@_pytree(data=(), meta=("lo", "hi"))
class Band(Mask):
    """Diagonal band: ``lo <= kv - q <= hi`` (None leaves that side unbounded).

    ``causal(offset)`` is ``Band(None, offset)``; ``local_window(left, right)`` is
    ``Band(-left, right)``. The block map is exact.
    """

    lo: int | None
    hi: int | None

    def evaluate(self, q_pos, kv_pos):
        d = kv_pos[None, :] - q_pos[:, None]
        ok = jnp.ones(d.shape, bool)
        if self.lo is not None:
            ok &= d >= self.lo
        if self.hi is not None:
            ok &= d <= self.hi
        return ok[None, None]

    def block_map(self, T, S, block_q, block_kv):
        q0, q1 = _tile_ranges(T, block_q)
        k0, k1 = _tile_ranges(S, block_kv)
        dmin = k0[None, :] - q1[:, None]
        dmax = k1[None, :] - q0[:, None]
        lo = -math.inf if self.lo is None else self.lo
        hi = math.inf if self.hi is None else self.hi
        # The tile's offsets kv - q fill [dmin, dmax]; it is empty when that range misses
        # [lo, hi] (always, if lo > hi), full when it lies inside.
        empty = np.maximum(dmin, lo) > np.minimum(dmax, hi)
        full = (dmin >= lo) & (dmax <= hi)
        return _kind(jnp.asarray(full), jnp.asarray(empty))[None, None]

    def key_extent(self):
        if self.lo is None or self.hi is None:
            return None
        return max(self.hi - self.lo + 1, 0)


    def allows(self, q_pos, kv_pos, xp=jnp):
        d = kv_pos - q_pos
        ok = xp.ones(xp.broadcast_shapes(xp.shape(q_pos), xp.shape(kv_pos)), bool)
        if self.lo is not None:
            ok = ok & (d >= self.lo)
        if self.hi is not None:
            ok = ok & (d <= self.hi)
        return ok


@_pytree(data=("q_lengths", "kv_lengths"))
class Lengths(Mask):
    """Valid prefixes: ``q < q_lengths[b]`` and ``kv < kv_lengths[b]`` (either may be None).

    Padding masks use both; a prefix-LM's bidirectional part is ``Lengths(kv_lengths=p)``.
    The block map is exact.
    """

    q_lengths: Array | None = None  # [Bm]
    kv_lengths: Array | None = None  # [Bm]

    def _lengths(self):
        return [x for x in (self.q_lengths, self.kv_lengths) if x is not None]

    def rows(self, batch, heads):
        return Lengths(_row(self.q_lengths, batch), _row(self.kv_lengths, batch))

    def dims(self):
        return (max([1, *(x.shape[0] for x in self._lengths())]), 1)

    def check(self, T, S, name):
        for what, x, limit in (("q_lengths", self.q_lengths, T),
                               ("kv_lengths", self.kv_lengths, S)):
            if x is None:
                continue
            check_integer(f"{name}.{what}", x)
            check_rank(f"{name}.{what}", x, (1,), "[B]")
            check_values_in_range(f"{name}.{what}", x, 0, limit)

    def evaluate(self, q_pos, kv_pos):
        ok = jnp.ones((1, q_pos.shape[0], kv_pos.shape[0]), bool)
        if self.q_lengths is not None:
            ok = ok & (q_pos[None, :, None] < self.q_lengths[:, None, None])
        if self.kv_lengths is not None:
            ok = ok & (kv_pos[None, None, :] < self.kv_lengths[:, None, None])
        return ok[:, None]

    def block_map(self, T, S, block_q, block_kv):
        q0, q1 = _tile_ranges(T, block_q)
        k0, k1 = _tile_ranges(S, block_kv)
        full = jnp.ones((1, len(q0), len(k0)), bool)
        empty = jnp.zeros((1, len(q0), len(k0)), bool)
        if self.q_lengths is not None:
            ql = self.q_lengths[:, None, None]
            full = full & (q1[None, :, None] < ql)
            empty = empty | (q0[None, :, None] >= ql)
        if self.kv_lengths is not None:
            kl = self.kv_lengths[:, None, None]
            full = full & (k1[None, None, :] < kl)
            empty = empty | (k0[None, None, :] >= kl)
        return _kind(full, empty)[:, None]


@_pytree(data=("q_ids", "kv_ids"))
class Segments(Mask):
    """Document masking for packed sequences: ``q_ids[b, q] == kv_ids[b, kv]``.

    The block map compares each tile's id range: EMPTY when the ranges do not overlap, FULL
    when both tiles hold one and the same id. Exact for ids that increase along the sequence
    (packed documents); sound for any ids.
    """

    q_ids: Array  # [Bm, T]
    kv_ids: Array  # [Bm, S]

    def rows(self, batch, heads):
        return Segments(_row(self.q_ids, batch), _row(self.kv_ids, batch))

    def dims(self):
        return (max(self.q_ids.shape[0], self.kv_ids.shape[0]), 1)

    def check(self, T, S, name):
        _check_token_data(name, ("q_ids", self.q_ids, T), ("kv_ids", self.kv_ids, S))

    def evaluate(self, q_pos, kv_pos):
        q = jnp.take(self.q_ids, q_pos, axis=1, mode="clip")
        kv = jnp.take(self.kv_ids, kv_pos, axis=1, mode="clip")
        return (q[:, :, None] == kv[:, None, :])[:, None]

    def block_map(self, T, S, block_q, block_kv):
        q = _per_tile(self.q_ids, 1, block_q)
        kv = _per_tile(self.kv_ids, 1, block_kv)
        qmin, qmax = q.min(-1)[:, :, None], q.max(-1)[:, :, None]
        kmin, kmax = kv.min(-1)[:, None, :], kv.max(-1)[:, None, :]
        empty = (qmax < kmin) | (kmax < qmin)
        full = (qmin == qmax) & (kmin == kmax) & (qmin == kmin)
        return _kind(full, empty)[:, None]


@_pytree(data=("q_types", "kv_types"), meta=("allowed", "num_types"))
class TokenTypes(Mask):
    """Pairs of token types: ``(q_types[b, q], kv_types[b, kv]) in allowed``.

    ``allowed`` is a frozenset of (query type, key type) pairs over types 0..num_types-1.
    The block map is exact (it records which types each tile holds).
    """

    q_types: Array  # [Bm, T] ints in [0, num_types)
    kv_types: Array  # [Bm, S]
    allowed: frozenset
    num_types: int

    def rows(self, batch, heads):
        return TokenTypes(_row(self.q_types, batch), _row(self.kv_types, batch), self.allowed,
                          self.num_types)

    def dims(self):
        return (max(self.q_types.shape[0], self.kv_types.shape[0]), 1)

    def check(self, T, S, name):
        _check_token_data(name, ("q_types", self.q_types, T), ("kv_types", self.kv_types, S),
                          high=self.num_types - 1)

    def _table(self) -> np.ndarray:
        table = np.zeros((self.num_types, self.num_types), bool)
        for a, b in self.allowed:
            table[a, b] = True
        return table

    def evaluate(self, q_pos, kv_pos):
        q = jnp.take(self.q_types, q_pos, axis=1, mode="clip")
        kv = jnp.take(self.kv_types, kv_pos, axis=1, mode="clip")
        table = jnp.asarray(self._table())
        return table[q[:, :, None], kv[:, None, :]][:, None]

    def block_map(self, T, S, block_q, block_kv):
        types = jnp.arange(self.num_types)
        # present[b, tile, t]: tile holds a token of type t
        q_present = (_per_tile(self.q_types, 1, block_q)[..., None] == types).any(2)
        kv_present = (_per_tile(self.kv_types, 1, block_kv)[..., None] == types).any(2)
        both = q_present[:, :, None, :, None] & kv_present[:, None, :, None, :]
        table = jnp.asarray(self._table())
        empty = ~(both & table).any((-2, -1))
        full = ~(both & ~table).any((-2, -1))
        return _kind(full, empty)[:, None]


@_pytree(data=("array",))
class Dense(Mask):
    """An explicit boolean array broadcastable to [B, N, T, S]. The block map is exact."""

    array: Array  # [Bm, Nm, T | 1, S | 1]

    def rows(self, batch, heads):
        return Dense(_row(self.array, batch, heads))

    def dims(self):
        return (self.array.shape[0], self.array.shape[1])

    def check(self, T, S, name):
        t, s = self.array.shape[2:]
        if t not in (1, T) or s not in (1, S):
            raise ValueError(f"{name}: expected a shape broadcastable to (B, N, {T}, {S}), "
                             f"got {self.array.shape}")

    def evaluate(self, q_pos, kv_pos):
        t, s = self.array.shape[2:]
        q = q_pos if t > 1 else jnp.zeros_like(q_pos)
        kv = kv_pos if s > 1 else jnp.zeros_like(kv_pos)
        rows = jnp.take(self.array, q, axis=2, mode="clip")
        return jnp.take(rows, kv, axis=3, mode="clip")

    def block_map(self, T, S, block_q, block_kv):
        nq, nk = -(-T // block_q), -(-S // block_kv)
        a = self.array
        # Edge padding repeats in-range values, so any/all over a padded tile are exact.
        if a.shape[2] > 1:
            a = _per_tile(a, 2, block_q)
        else:
            a = a[:, :, :, None]
        if a.shape[4] > 1:
            a = _per_tile(a, 4, block_kv)
        else:
            a = a[..., None]
        full, empty = a.all((3, 5)), ~a.any((3, 5))
        kind = _kind(full, empty)
        return jnp.broadcast_to(kind, (*kind.shape[:2], nq, nk))


class _GridMask(Mask):
    """A mask of positions only on a row-major flattened grid of ``spatial`` positions
    (1 to 3 axes), defined by :meth:`allows` and bounded by :meth:`key_range`; its block map
    is exact, computed with NumPy from the static shapes once per tiling
    (:func:`_grid_block_map`), visiting only the key tiles between the lowest and highest
    flat key of each query tile."""

    spatial: tuple[int, ...]
    global_keys = False  # keys past the grid are allowed for every query (Neighborhood)

    @property
    def length(self) -> int:
        return math.prod(self.spatial)

    def check(self, T, S, name):
        if T != self.length or S < self.length:
            raise ValueError(f"{name}: a {type(self).__name__} mask over {self.spatial} needs "
                             f"T = {self.length} queries and at least as many keys, got "
                             f"T={T}, S={S}")

    def evaluate(self, q_pos, kv_pos):
        return self.allows(q_pos[:, None], kv_pos[None, :])[None, None]

    def block_map(self, T, S, block_q, block_kv):
        return jnp.asarray(_grid_block_map(self, T, S, block_q, block_kv))[None, None]

    def key_extent(self):
        lo, hi = self.key_range()
        return int((hi - lo).max()) + 1

    def key_range(self) -> tuple[np.ndarray, np.ndarray]:
        """Lowest and highest flat key each query may see on the grid, int64 [L] each."""
        raise NotImplementedError

    def _coordinates(self, pos, xp):
        """Per axis: (length, row-major step, coordinate) of the flat positions ``pos``
        (positions past the grid give garbage; callers mask them)."""
        for axis, n in enumerate(self.spatial):
            step = math.prod(self.spatial[axis + 1:])
            c = pos if step == 1 else pos // step
            if axis:  # the first axis needs no wrap inside the grid
                c = c % n
            yield n, step, c


@_pytree(data=(), meta=("spatial", "kernel_size", "dilation", "is_causal", "stride",
                        "global_keys"))
class Neighborhood(_GridMask):
    """NATTEN neighbourhoods (P72) on a row-major flattened grid of ``spatial`` positions.

    Along an axis of length n with kernel k, dilation d and stride s, position c lies in
    dilation group c mod d at rank r = c // d (the group holds ceil((n - g) / d) ranks).
    Queries are taken s ranks at a time; each uses the window of its stride group's leader
    (rank r - r mod s + s // 2, or the group's last rank r - r mod s + s - 1 when causal,
    never past the group's end; so stride = kernel_size gives blocked attention, as in
    NATTEN). The window holds the ranks
    clip(leader - k // 2, 0, len - k) + [0, k) (centred, shifted inward at a border), or,
    causal, max(leader - k + 1, 0) .. leader with keys after the query itself excluded. A
    key is allowed when it is in the query's group and window along every axis. Keys at
    flat positions >= prod(spatial) (extra keys appended after the grid) are allowed for
    every query when ``global_keys``, never otherwise.

    The block map is exact (``_GridMask``).
    """

    spatial: tuple[int, ...]
    kernel_size: tuple[int, ...]
    dilation: tuple[int, ...]
    is_causal: tuple[bool, ...]
    stride: tuple[int, ...]
    global_keys: bool = False

    def _windows(self, xp, pos):
        """Per axis: (group, rank, first allowed rank, last allowed rank) of the flat
        positions ``pos`` (NumPy or jnp, via ``xp``). Positions past the grid give garbage
        (callers mask them); operations a unit dilation or stride makes trivial are skipped,
        since a tile evaluates this for every row and column."""
        for (n, _, c), k, d, causal, s in zip(self._coordinates(pos, xp), self.kernel_size,
                                              self.dilation, self.is_causal, self.stride,
                                              strict=True):
            g, r = (0, c) if d == 1 else (c % d, c // d)
            group_len = n if d == 1 else (n - g + d - 1) // d
            leader = r
            if s > 1:
                leader = xp.minimum(r - r % s + (s - 1 if causal else s // 2), group_len - 1)
            if causal:
                first, last = xp.maximum(leader - k + 1, 0), r
            else:
                first = xp.clip(leader - k // 2, 0, group_len - k)
                last = first + k - 1
            yield g, r, first, last

    def allows(self, q_pos, kv_pos, xp=jnp):
        """The pattern at broadcastable arrays of query and key positions (e.g. a column
        [tq, 1] and a row [1, tk], or two full tiles), elementwise: what a kernel evaluates
        inside a tile. ``xp``: jax.numpy, or numpy for static block maps."""
        ok = (q_pos < self.length) & (kv_pos < self.length)
        for (gq, _, first, last), (gk, rk, _, _) in zip(self._windows(xp, q_pos),
                                                        self._windows(xp, kv_pos), strict=True):
            if self.dilation != (1,) * len(self.spatial):
                ok = ok & (gq == gk)
            ok = ok & (rk >= first) & (rk <= last)
        if self.global_keys:
            ok = ok | ((q_pos < self.length) & (kv_pos >= self.length))
        return ok

    def key_range(self):
        pos = np.arange(self.length)
        lo = np.zeros(self.length, np.int64)
        hi = np.zeros(self.length, np.int64)
        for (_, step, _), d, (g, _, first, last) in zip(
                self._coordinates(pos, np), self.dilation, self._windows(np, pos),
                strict=True):
            lo += step * (g + d * first)
            hi += step * (g + d * last)
        return lo, hi


@_pytree(data=(), meta=("spatial", "block_size", "halo", "shift"))
class BlockWindow(_GridMask):
    """Non-overlapping blocks of a row-major flattened grid, each seeing its own block
    widened by a halo: Swin windows (halo 0), Swin's shifted windows (``shift``) and
    HaloNet blocks (P09, P64, P53).

    Along an axis of length n with block b, halo h and shift s, position c lies in block
    i = floor((c - s) / b) (blocks start at s + i b; with 0 < s the positions before s form
    a block of their own, as Swin's rolled grid and shift mask make them). A query of block
    i sees the keys c' with s + i b - h <= c' < s + (i + 1) b + h on every axis (clipped to
    the grid). Keys past the grid are never allowed. The block map is exact
    (``_GridMask``).
    """

    spatial: tuple[int, ...]
    block_size: tuple[int, ...]
    halo: tuple[int, ...]
    shift: tuple[int, ...]

    def _spans(self, xp, pos):
        """Per axis: (coordinate, first and last key coordinate a query there sees)."""
        for (n, _, c), b, h, s in zip(self._coordinates(pos, xp), self.block_size,
                                      self.halo, self.shift, strict=True):
            start = (c - s) // b * b + s
            first, last = start - h, start + b - 1 + h
            yield c, xp.maximum(first, 0), xp.minimum(last, n - 1)

    def allows(self, q_pos, kv_pos, xp=jnp):
        ok = (q_pos < self.length) & (kv_pos < self.length)
        for (_, first, last), (ck, _, _) in zip(self._spans(xp, q_pos),
                                                self._spans(xp, kv_pos), strict=True):
            ok = ok & (ck >= first) & (ck <= last)
        return ok

    def key_range(self):
        pos = np.arange(self.length)
        lo = np.zeros(self.length, np.int64)
        hi = np.zeros(self.length, np.int64)
        for (_, step, _), (_, first, last) in zip(self._coordinates(pos, np),
                                                  self._spans(np, pos), strict=True):
            lo += step * first
            hi += step * last
        return lo, hi


@functools.lru_cache(maxsize=64)
def _grid_block_map(mask: _GridMask, T: int, S: int, block_q: int,
                    block_kv: int) -> np.ndarray:
    nq, nk = -(-T // block_q), -(-S // block_kv)
    kinds = np.full((nq, nk), EMPTY, np.int8)
    lo, hi = mask.key_range()
    extra = range(mask.length // block_kv, nk) if mask.global_keys else range(0)
    for i in range(nq):
        q = np.arange(i * block_q, min((i + 1) * block_q, T))
        window = range(lo[q].min() // block_kv, hi[q].max() // block_kv + 1)
        for j in sorted(set(window) | set(extra)):
            kv = np.arange(j * block_kv, min((j + 1) * block_kv, S))
            tile = mask.allows(q[:, None], kv[None, :], xp=np)
            kinds[i, j] = FULL if tile.all() else PARTIAL if tile.any() else EMPTY
    return kinds


@_pytree(data=("indices",), meta=("block_q", "block_kv"))
class BlockSelection(Mask):
    """Data-dependent block sparsity: query block i (``block_q`` queries; 1 for a choice per
    query) may see the key blocks ``indices[b, n, i, :]`` (``block_kv`` keys each); -1 is
    no block. This is how routing and retrieval methods (bi-level routing, landmark
    retrieval, LongHeads) restrict attention; ``indices`` may be traced.

    ``sparse_rows`` is True: blocked implementations give every batch row and head its own
    tile schedule, so each visits only its own selected tiles. The block map is exact: a
    tile is EMPTY when no selected block meets it and FULL when every (query block, key
    block) pair it overlaps is selected (summed-area counts over the selection grid).
    """

    indices: Array  # int [Bm, Nm, ceil(T / block_q), k]
    block_q: int
    block_kv: int
    sparse_rows = True

    def dims(self):
        return (self.indices.shape[0], self.indices.shape[1])

    def check(self, T, S, name):
        check_integer(f"{name}.indices", self.indices)
        check_rank(f"{name}.indices", self.indices, (4,), "[B, N, query blocks, k]")
        nq = -(-T // self.block_q)
        if self.indices.shape[2] != nq:
            raise ValueError(f"{name}.indices: {T} queries in blocks of {self.block_q} need "
                             f"{nq} rows, got shape {self.indices.shape}")
        check_values_in_range(f"{name}.indices", self.indices, -1, -(-S // self.block_kv) - 1)

    def rows(self, batch, heads):
        return BlockSelection(_row(self.indices, batch, heads), self.block_q, self.block_kv)

    def tiles(self):
        return (self.block_q, self.block_kv)

    def evaluate(self, q_pos, kv_pos):
        rows = jnp.minimum(q_pos // self.block_q, self.indices.shape[2] - 1)
        chosen = jnp.take(self.indices, rows, axis=2)  # [Bm, Nm, tq, k]
        return (chosen[:, :, :, None, :] == (kv_pos // self.block_kv)[:, None]).any(-1)

    def selected(self, S: int) -> Array:
        """The selection grid: bool [Bm, Nm, query blocks, ceil(S / block_kv)]."""
        nk = -(-S // self.block_kv)
        return (self.indices[..., None] == jnp.arange(nk)).any(-2)

    def block_map(self, T, S, block_q, block_kv):
        sel = self.selected(S).astype(jnp.int32)
        table = jnp.pad(sel.cumsum(2).cumsum(3), ((0, 0), (0, 0), (1, 0), (1, 0)))
        # Each tile's first and last query block and key block, in selection-grid units.
        q0, q1 = (x // self.block_q for x in _tile_ranges(T, block_q))
        k0, k1 = (x // self.block_kv for x in _tile_ranges(S, block_kv))

        def at(r, c):
            return table[:, :, r[:, None], c[None, :]]

        count = at(q1 + 1, k1 + 1) - at(q0, k1 + 1) - at(q1 + 1, k0) + at(q0, k0)
        area = (q1 - q0 + 1)[:, None] * (k1 - k0 + 1)[None, :]
        return _kind(count == area, count == 0)


# --------------------------------------------------------------------------------------------
# Combinators
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Binary(Mask):
    """Shared by And and Or: elementwise ``values`` on patterns, ``kinds`` on block maps."""

    a: Mask
    b: Mask
    values = None  # (bool, bool) -> bool
    kinds = None  # (kind, kind) -> kind; kinds are ordered EMPTY < PARTIAL < FULL

    def dims(self):
        return _broadcast_dims(self.a.dims(), self.b.dims())

    @property
    def sparse_rows(self):
        return self.a.sparse_rows or self.b.sparse_rows

    def allows(self, q_pos, kv_pos, xp=jnp):
        return self.values(self.a.allows(q_pos, kv_pos, xp), self.b.allows(q_pos, kv_pos, xp))

    def rows(self, batch, heads):
        return type(self)(self.a.rows(batch, heads), self.b.rows(batch, heads))

    def check(self, T, S, name):
        self.a.check(T, S, name)
        self.b.check(T, S, name)

    def evaluate(self, q_pos, kv_pos):
        return self.values(self.a.evaluate(q_pos, kv_pos), self.b.evaluate(q_pos, kv_pos))

    def block_map(self, T, S, block_q, block_kv):
        return self.kinds(self.a.block_map(T, S, block_q, block_kv),
                          self.b.block_map(T, S, block_q, block_kv))


@_pytree(data=("a", "b"))
class And(_Binary):
    """``a & b``: a key is allowed where both masks allow it; the block map is the tile-wise
    minimum of the two (EMPTY < PARTIAL < FULL)."""

    values = staticmethod(jnp.logical_and)
    kinds = staticmethod(jnp.minimum)

    def key_extent(self):
        known = [e for e in (self.a.key_extent(), self.b.key_extent()) if e is not None]
        return min(known) if known else None

    def tiles(self):
        return self.a.tiles() or self.b.tiles()

    def conjuncts(self) -> list[Mask]:
        return self.a.conjuncts() + self.b.conjuncts()


@_pytree(data=("a", "b"))
class Or(_Binary):
    """``a | b``: a key is allowed where either mask allows it; the block map is the tile-wise
    maximum of the two (EMPTY < PARTIAL < FULL)."""

    values = staticmethod(jnp.logical_or)
    kinds = staticmethod(jnp.maximum)


@_pytree(data=("a",))
class Not(Mask):
    """``~a``: a key is allowed where ``a`` forbids it; the block map swaps EMPTY and FULL
    (PARTIAL stays PARTIAL)."""

    a: Mask

    @property
    def sparse_rows(self):
        return self.a.sparse_rows

    def allows(self, q_pos, kv_pos, xp=jnp):
        return ~self.a.allows(q_pos, kv_pos, xp)

    def rows(self, batch, heads):
        return Not(self.a.rows(batch, heads))

    def dims(self):
        return self.a.dims()

    def check(self, T, S, name):
        self.a.check(T, S, name)

    def evaluate(self, q_pos, kv_pos):
        return ~self.a.evaluate(q_pos, kv_pos)

    def block_map(self, T, S, block_q, block_kv):
        return (FULL - self.a.block_map(T, S, block_q, block_kv)).astype(jnp.int8)


def all_of(masks: Iterable[Mask | None]) -> Mask | None:
    """``m1 & m2 & ...`` over the masks that are not None; None when there are none."""
    result = None
    for m in masks:
        if m is not None:
            result = m if result is None else And(result, m)
    return result


# --------------------------------------------------------------------------------------------
# Constructors
# --------------------------------------------------------------------------------------------


def causal(offset: int = 0) -> Mask:
    """Query i may see key j when ``j <= i + offset``.

    ``offset = S - T`` aligns the last query with the last key (a query block at the end of a
    longer key sequence, as in decoding with a KV cache).

    >>> causal().materialize(3, 3)[0, 0].astype(int).tolist()
    [[1, 0, 0], [1, 1, 0], [1, 1, 1]]
    """
    return Band(None, check_int("offset", offset, minimum=None))


def local_window(left: int | None, right: int | None = 0) -> Mask:
    """Query i may see key j when ``i - left <= j <= i + right`` (None: unbounded side).

    Same meaning as ``local_window_size=(left, right)`` in ``jax.nn.dot_product_attention``.

    >>> local_window(1, 0).materialize(3, 3)[0, 0].astype(int).tolist()
    [[1, 0, 0], [1, 1, 0], [0, 1, 1]]
    """
    for what, v in (("left", left), ("right", right)):
        if v is not None and check_int(what, v, minimum=None) < 0:
            raise ValueError(f"{what}: window size must be >= 0, got {v}")
    return Band(None if left is None else -int(left), None if right is None else int(right))


def _as_int_array(name: str, x, rank: int, layout: str) -> Array:
    x = jnp.asarray(x)
    check_integer(name, x)
    if x.ndim == rank - 1:
        x = x[None]
    check_rank(name, x, (rank,), layout)
    return x


def lengths(q_lengths=None, kv_lengths=None) -> Mask:
    """Padding: query q and key kv are real when ``q < q_lengths[b]`` and ``kv < kv_lengths[b]``.

    Args:
        q_lengths: int [B] (or scalar), or None for no query padding.
        kv_lengths: int [B] (or scalar), or None for no key padding.

    >>> lengths(kv_lengths=2).materialize(2, 3)[0, 0].astype(int).tolist()
    [[1, 1, 0], [1, 1, 0]]
    """
    if q_lengths is None and kv_lengths is None:
        raise ValueError("lengths: give q_lengths, kv_lengths or both")
    q = None if q_lengths is None else _as_int_array("q_lengths", q_lengths, 1, "[B]")
    kv = None if kv_lengths is None else _as_int_array("kv_lengths", kv_lengths, 1, "[B]")
    return Lengths(q, kv)


def segments(q_segment_ids, kv_segment_ids=None) -> Mask:
    """Document mask for packed sequences: tokens attend only within their own segment (P75).

    Args:
        q_segment_ids: int [B, T] (or [T]).
        kv_segment_ids: int [B, S] (or [S]); defaults to ``q_segment_ids`` (self-attention).

    >>> segments(jnp.array([0, 0, 1])).materialize(3, 3)[0, 0].astype(int).tolist()
    [[1, 1, 0], [1, 1, 0], [0, 0, 1]]
    """
    q = _as_int_array("q_segment_ids", q_segment_ids, 2, "[B, T]")
    kv = q if kv_segment_ids is None else _as_int_array("kv_segment_ids", kv_segment_ids, 2,
                                                        "[B, S]")
    return Segments(q, kv)


def prefix_lm(prefix_lengths) -> Mask:
    """Prefix-LM: bidirectional over the first ``prefix_lengths[b]`` tokens, causal after.

    Equals ``causal() | lengths(kv_lengths=prefix_lengths)``.

    >>> prefix_lm(2).materialize(4, 4)[0, 0].astype(int).tolist()
    [[1, 1, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0], [1, 1, 1, 1]]
    """
    return causal() | lengths(kv_lengths=prefix_lengths)


def token_types(q_types, kv_types=None, *, allowed: Iterable[tuple[int, int]],
                num_types: int | None = None) -> Mask:
    """Attend where (query type, key type) is an allowed pair.

    Args:
        q_types: int [B, T] (or [T]) token types in [0, num_types).
        kv_types: int [B, S] (or [S]); defaults to ``q_types``.
        allowed: (query type, key type) pairs that may attend.
        num_types: number of types; defaults to 1 + the largest type named in ``allowed``.
    """
    pairs = frozenset((int(a), int(b)) for a, b in allowed)
    largest = max([max(p) for p in pairs], default=0)
    n = largest + 1 if num_types is None else int(num_types)
    if n <= largest:
        raise ValueError(f"num_types: must exceed every type in allowed ({largest}), got {n}")
    q = _as_int_array("q_types", q_types, 2, "[B, T]")
    kv = q if kv_types is None else _as_int_array("kv_types", kv_types, 2, "[B, S]")
    return TokenTypes(q, kv, pairs, n)


def _visual_types(is_visual) -> Array:
    is_visual = jnp.asarray(is_visual)
    check_bool("is_visual", is_visual)
    return is_visual.astype(jnp.int32)


def composite_visual(is_visual) -> Mask:
    """P17 EE-MLLM composite attention: causal, but visual tokens do not attend to each other.

    A visual query keeps only itself among visual keys (its row is never empty); text queries
    attend causally to everything. Visual x visual tiles off the diagonal are EMPTY in the block
    map, so implementations skip that compute.

    Args:
        is_visual: bool [B, T] (or [T]); self-attention, so S == T.
    """
    vis = _visual_types(is_visual)
    visual_pair = token_types(vis, allowed=[(1, 1)], num_types=2)
    return causal() & (~visual_pair | local_window(0, 0))


def mixed_visual(is_visual) -> Mask:
    """P27 Croc mixed attention: bidirectional among visual tokens, causal for text.

    Args:
        is_visual: bool [B, T] (or [T]); self-attention, so S == T.
    """
    vis = _visual_types(is_visual)
    return causal() | token_types(vis, allowed=[(1, 1)], num_types=2)


def modality_mutual(is_visual) -> Mask:
    """P46 AKI modality-mutual attention: causal, and image tokens also see later text tokens.

    Args:
        is_visual: bool [B, T] (or [T]); self-attention, so S == T.
    """
    vis = _visual_types(is_visual)
    return causal() | token_types(vis, allowed=[(1, 0)], num_types=2)


def dense(array) -> Mask:
    """Wrap a boolean array broadcastable to [B, N, T, S] (rank 2 to 4; leading dims added).

    >>> dense(jnp.eye(2, dtype=bool)).materialize(2, 2).shape
    (1, 1, 2, 2)
    """
    array = jnp.asarray(array)
    check_bool("mask", array)
    check_rank("mask", array, (2, 3, 4), "broadcastable to [B, N, T, S]")
    return Dense(left_pad_rank(array, 4))


def adjacency(adj, *, self_loops: bool = True) -> Mask:
    """Graph attention (P12): node i attends node j where ``adj[..., i, j]``.

    Args:
        adj: bool [N_nodes, N_nodes] or [B, N_nodes, N_nodes].
        self_loops: also let every node attend to itself (rows are then never empty).
    """
    adj = jnp.asarray(adj)
    check_bool("adj", adj)
    check_rank("adj", adj, (2, 3), "[B?, nodes, nodes]")
    if adj.shape[-1] != adj.shape[-2]:
        raise ValueError(f"adj: expected a square adjacency matrix, got shape {adj.shape}")
    if self_loops:
        adj = adj | jnp.eye(adj.shape[-1], dtype=bool)
    if adj.ndim == 3:
        adj = adj[:, None]
    return dense(adj)


def neighborhood(spatial: Sequence[int], kernel_size, dilation=1, is_causal=False,
                 stride=1, global_keys: bool = False) -> Mask:
    """NATTEN neighbourhood attention (P72) as a mask on the flattened grid (see
    :class:`Neighborhood` for the windows).

    Args:
        spatial: the grid's shape (1 to 3 axes); queries and keys are its row-major flat
            positions, keys past it (extra keys) are never allowed.
        kernel_size, dilation, stride: an int or one per axis; kernel_size * dilation <= the
            axis length, stride <= kernel_size.
        is_causal: a bool or one per axis.
        global_keys: keys past the grid (extra keys appended after it) are allowed for every
            query.

    >>> neighborhood((5,), 3).materialize(5, 5)[0, 0].astype(int).tolist()
    [[1, 1, 1, 0, 0], [1, 1, 1, 0, 0], [0, 1, 1, 1, 0], [0, 0, 1, 1, 1], [0, 0, 1, 1, 1]]
    """
    spatial = tuple(check_int("spatial", n) for n in spatial)
    if not 1 <= len(spatial) <= 3:
        raise ValueError(f"spatial: expected 1 to 3 axes, got {spatial}")
    n = len(spatial)
    kernel_size = check_per_axis("kernel_size", kernel_size, n)
    dilation = check_per_axis("dilation", dilation, n)
    stride = check_per_axis("stride", stride, n)
    is_causal = check_per_axis("is_causal", is_causal, n, kind=bool)
    for axis, (length, k, d, s) in enumerate(zip(spatial, kernel_size, dilation, stride,
                                                 strict=True)):
        # Groups hold ceil((L - g) / d) positions; the shortest, floor(L / d), must fit a window.
        if k > length // d:
            raise ValueError(
                f"kernel_size, dilation: spatial axis {axis} of length {length} with dilation "
                f"{d} splits into groups of {length // d} to {-(-length // d)} positions, too "
                f"few for kernel_size {k} (need kernel_size * dilation <= length, got "
                f"{k} * {d} > {length}; spatial shape {spatial})")
        if s > k:
            raise ValueError(f"stride: at most kernel_size ({k}) along axis {axis}, got {s}")
    return Neighborhood(spatial, kernel_size, dilation, is_causal, stride, bool(global_keys))


def block_window(spatial: Sequence[int], block_size, halo=0, shift=0) -> Mask:
    """Blocks of a grid that see their own block widened by a halo (see
    :class:`BlockWindow`): Swin's window attention is ``block_window(spatial, w)``, its
    shifted window ``block_window(spatial, w, shift=w // 2)`` (the rolled grid and shift
    mask, written in the original positions), HaloNet's ``block_window(spatial, b,
    halo=h)``; ``& causal()`` for causal 1-D blocks.

    Args:
        spatial: the grid's shape (1 to 3 axes); queries and keys are its row-major flat
            positions, keys past it are never allowed.
        block_size: an int or one per axis, 1 <= block <= the axis length.
        halo: an int or one per axis, >= 0.
        shift: an int or one per axis, 0 <= shift < block.

    >>> m = block_window((6,), 3, shift=1).materialize(6, 6)[0, 0].tolist()
    >>> ["".join("x" if a else "." for a in row) for row in m]
    ['x.....', '.xxx..', '.xxx..', '.xxx..', '....xx', '....xx']
    """
    spatial = tuple(check_int("spatial", n) for n in spatial)
    if not 1 <= len(spatial) <= 3:
        raise ValueError(f"spatial: expected 1 to 3 axes, got {spatial}")
    n = len(spatial)
    block = check_per_axis("block_size", block_size, n, minimum=1)
    halo = check_per_axis("halo", halo, n, minimum=0)
    shift = check_per_axis("shift", shift, n, minimum=0)
    for axis, (length, b, s) in enumerate(zip(spatial, block, shift, strict=True)):
        if b > length:
            raise ValueError(f"block_size: at most the axis length {length} along axis "
                             f"{axis}, got {b} (spatial shape {spatial})")
        if s >= b:
            raise ValueError(f"shift: expected 0 <= shift < block_size ({b}) along axis "
                             f"{axis}, got {s}")
    return BlockWindow(spatial, block, halo, shift)


def block_selection(indices, block_q: int, block_kv: int) -> Mask:
    """Query block i (``block_q`` queries; 1 to choose per query) may see key blocks
    ``indices[..., i, :]`` (``block_kv`` keys each; -1: none). See :class:`BlockSelection`.

    Args:
        indices: int [B, N, query blocks, k] (leading axes of 1 may be omitted: [nq, k] is
            shared by every example and head).
        block_q, block_kv: the block sizes the indices count in.

    >>> m = block_selection(jnp.array([[0], [0]]), 2, 2)   # both query blocks see key block 0
    >>> m.materialize(4, 4)[0, 0].astype(int).tolist()
    [[1, 1, 0, 0], [1, 1, 0, 0], [1, 1, 0, 0], [1, 1, 0, 0]]
    """
    indices = jnp.asarray(indices)
    check_integer("indices", indices)
    check_rank("indices", indices, (2, 3, 4), "[B, N, query blocks, k]")
    return BlockSelection(left_pad_rank(indices, 4), check_int("block_q", block_q),
                          check_int("block_kv", block_kv))
