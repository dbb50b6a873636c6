"""Local attention on 1-D sequences and 2-D grids: Swin windows and HaloNet blocks with halos.

* ``window_attention``: Swin's (shifted) window attention. The grid is cut into
  non-overlapping windows and every position attends inside its own window only; with a
  shift the grid is first rolled cyclically by -shift, so that the windows straddle the
  previous layer's window borders, and Swin's shift mask keeps apart the positions that the
  roll brought together from different ends of the grid. An optional learned relative
  position bias table (indexed by the offset between two positions of a window) is added to
  the logits.
* ``halo_attention``: HaloNet's blocked local attention. Queries are cut into
  non-overlapping blocks; each block attends to its own block of keys extended by a halo of
  ``halo_size`` positions on every side (clipped at the borders), optionally causal (1-D).

Both work blockwise by default (``implementation="blocked"``): windows and blocks are
reshaped (and the halo gathered) so that the cost is O(L * window) and no L x L mask is ever
built. Spatial sizes that are not a multiple of the window or block are padded up to one and
the padded keys are masked out (they are never attended); the padded queries are dropped
from the output. Any other ``implementation`` (an implementation of
:func:`jattn.dot_product_attention`: "chunked", the Pallas kernels) runs the same pattern
as one softmax under :func:`jattn.masks.block_window` on the flattened grid (the relative
position bias as a ``score_mod``): the way to the GPU and TPU kernels. On the CPU the
blocked form is the faster one: it computes exactly the window's logits, while 1-D tiles of
a flattened 2-D grid cut across windows. The dense, loop-built references are
``jattn.reference.window_attention`` and ``jattn.reference.halo_attention``.

References:
    P09 Attention Swin U-Net, "Attention Swin U-Net: Cross-Contextual Attention Mechanism
    for Skin Lesion Segmentation" (Swin window / shifted-window attention blocks).
    P64 TextMonkey, "TextMonkey: An OCR-Free Large Multimodal Model for Understanding
    Document" (shifted window attention with zero initialisation).
    P53 HaloNet, "Scaling Local Self-Attention for Parameter Efficient Visual Backbones"
    (blocked local self-attention with halos).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jattn.core import masks
from jattn.core.attention import dot_product_attention, masked_softmax
from jattn.core.shapes import (
    Array,
    accumulation_dtype,
    check_floating,
    check_per_axis,
    check_spatial_qkv,
)

__all__ = ["halo_attention", "relative_position_index", "window_attention"]


def _spatial_qkv(query: Array, key: Array, value: Array, what: str):
    """Validate [B, *spatial, N, H] inputs with one or two spatial axes (self-attention
    only) and return (spatial shape, flat dims)."""
    spatial, key_spatial, dims = check_spatial_qkv(query, key, value, max_spatial_axes=2)
    if key_spatial != spatial:
        raise NotImplementedError(
            f"{what}: cross attention (key spatial shape {key_spatial} differs from "
            f"query's {spatial}) is not supported: windows and blocks pair each query "
            "position with the key positions around the same place on one grid.")
    return spatial, dims


def _pad_axes(x: Array, pads: Sequence[tuple[int, int]]) -> Array:
    """Zero-pad the spatial axes 1..d of [B, *spatial, ...]."""
    if not any(lo or hi for lo, hi in pads):
        return x
    return jnp.pad(x, [(0, 0), *pads] + [(0, 0)] * (x.ndim - 1 - len(pads)))


def _to_blocks(x: Array, ndim: int) -> Array:
    """[B, n1, w1, (n2, w2,) C, D] -> [B, n1 (n2), w1 (w2), C, D] -> [B, nW, P, C, D]."""
    perm = [0, *(1 + 2 * a for a in range(ndim)), *(2 + 2 * a for a in range(ndim)),
            x.ndim - 2, x.ndim - 1]
    x = x.transpose(perm)
    nblocks = math.prod(x.shape[1:1 + ndim])
    return x.reshape(x.shape[0], nblocks, -1, *x.shape[-2:])


def _from_blocks(x: Array, counts: Sequence[int], sizes: Sequence[int]) -> Array:
    """[B, nW, P, C, D] -> [B, n1 * w1, (n2 * w2,) C, D]."""
    ndim = len(counts)
    x = x.reshape(x.shape[0], *counts, *sizes, *x.shape[-2:])
    perm = [0]
    for a in range(ndim):
        perm += [1 + a, 1 + ndim + a]
    x = x.transpose(*perm, x.ndim - 2, x.ndim - 1)
    return x.reshape(x.shape[0], *(n * w for n, w in zip(counts, sizes, strict=True)),
                     *x.shape[-2:])


def _combine_axes(per_axis: Sequence[np.ndarray], op) -> np.ndarray:
    """Per-axis arrays [n_a, p_a] -> [prod n_a, prod p_a] combined with ``op`` (row-major,
    matching :func:`_to_blocks`)."""
    out = per_axis[0]
    for arr in per_axis[1:]:
        n0, p0 = out.shape
        n1, p1 = arr.shape
        out = op(out[:, None, :, None], arr[None, :, None, :]).reshape(n0 * n1, p0 * p1)
    return out


def _blockwise_softmax(q: Array, k: Array, v: Array, allowed, bias, scale: float,
                       out_dtype) -> Array:
    """q [B, W, Pq, N, H], k [B, W, Pk, K, H], v [B, W, Pk, K, Hv], allowed a boolean array
    broadcastable to [W, Pq, Pk] (None: everything), bias [N, Pq, Pk] or None
    -> [B, W, Pq, N, Hv].

    float32 (or wider) logits and statistics; a row with nothing allowed gives zeros."""
    B, W, Pq, N, H = q.shape
    K = k.shape[3]
    dtype = accumulation_dtype(q.dtype)
    qg = q.astype(dtype).reshape(B, W, Pq, K, N // K, H)
    logits = jnp.einsum("bwtkgh,bwskh->bwkgts", qg, k.astype(dtype)) * scale
    if bias is not None:
        logits = logits + bias.astype(dtype).reshape(K, N // K, Pq, -1)
    if allowed is None:
        probs = jax.nn.softmax(logits, axis=-1)
    else:
        allowed = allowed[None, :, None, None]  # [1, W, 1, 1, Pq, Pk]
        probs = masked_softmax(logits, allowed)
    out = jnp.einsum("bwkgts,bwskd->bwtkgd", probs, v.astype(dtype))
    return out.reshape(B, W, Pq, N, v.shape[-1]).astype(out_dtype)


def relative_position_index(window_size: Sequence[int]) -> np.ndarray:
    """[P, P] index into a Swin relative position bias table of prod(2 w - 1) entries.

    For positions i, j of a window (row-major, P = prod(w)) with coordinates c_i, c_j, the
    entry is the row-major index of the offset c_i - c_j + (w - 1) in a grid of shape
    (2 w - 1) per axis.

    >>> relative_position_index((2,))
    array([[1, 0],
           [2, 1]])
    """
    coords = np.stack(np.meshgrid(*(np.arange(w) for w in window_size), indexing="ij"))
    coords = coords.reshape(len(window_size), -1)  # [d, P]
    offset = coords[:, :, None] - coords[:, None, :] + (np.asarray(window_size) - 1)[:, None,
                                                                                     None]
    sides = [2 * w - 1 for w in window_size]
    return np.ravel_multi_index(tuple(offset), sides)


def window_attention(query: Array, key: Array, value: Array, *, window_size,
                     shift=0, relative_position_bias: Array | None = None,
                     scale: float | None = None, is_causal: bool = False,
                     implementation: str | None = "blocked") -> Array:
    r"""Swin (shifted) window attention: softmax attention inside non-overlapping windows.

    With the grid rolled by -shift (positions p -> r = (p - shift) mod L_pad per axis), query
    p attends to key p' iff both fall in the same window of the rolled grid
    (floor(r / w) equal on every axis) and carry the same Swin region label on every axis,
    where the label of a rolled coordinate r is 0 for r < L_pad - w, 1 for
    L_pad - w <= r < L_pad - shift and 2 otherwise (Swin's shift mask: positions that the
    roll wrapped around from the far side never mix with the others):

    .. math::
        \mathrm{out}_p = \sum_{p' \in \mathcal{W}(p)}
            \mathrm{softmax}_{p'}\big(\mathrm{scale}\; q_p \cdot k_{p'}
            + B[c(p) - c(p')]\big)\, v_{p'}

    with c(p) the coordinate of p inside its window and B the relative position bias table.
    With shift 0 this is plain window attention (W-MSA), with 0 < shift < w Swin's SW-MSA;
    the output is rolled back, so it is aligned with the input. Swin masks with a logit of
    -100, this masks exactly (a logit of -inf). Swin requires the spatial size to be a
    multiple of the window; here other sizes are zero-padded at the end of each axis up to
    L_pad, a multiple of w (before the roll, as Swin's detection code does), and the padded
    keys are masked, so they are never attended. Logits and softmax in float32 (or wider).

    CAB patterns: noncausal self only. Causal raises NotImplementedError (windows of an
    image have no token order; for causal local attention use ``halo_attention`` with
    ``is_causal=True``); cross attention (a key grid of another shape) raises
    NotImplementedError (a window pairs positions of one grid).

    Args:
        query: [B, L, N, H] or [B, L1, L2, N, H].
        key: ``[B, *spatial, K, H]`` with the query's spatial shape; N % K == 0 (GQA).
        value: ``[B, *spatial, K, Hv]``.
        window_size: w, an int or one int per spatial axis, 1 <= w <= spatial size.
        shift: an int or one per axis, 0 <= shift < w (Swin uses w // 2 every other block).
        relative_position_bias: optional [N, prod(2 w - 1)] table (Swin's learned bias;
            entry ``relative_position_index(w)[i, j]`` is added to the logit of window
            positions i, j).
        scale: logits scale; default 1 / sqrt(H).
        is_causal: must be False.
        implementation: "blocked" (windows reshaped into a batch, exact work) or an
            implementation of :func:`jattn.dot_product_attention` run under
            ``masks.block_window(spatial, w, shift=shift)`` (see the module docstring).

    Returns:
        ``[B, *spatial, N, Hv]`` in the query's dtype.

    Raises:
        ValueError: wrong ranks, shapes that disagree, heads that do not divide, a window
            outside [1, spatial size], a shift outside [0, w), a bias table of the wrong
            shape.
        TypeError: non-floating or mixed dtypes.
        NotImplementedError: is_causal=True, cross attention.

    >>> import jax, jattn.efficient.local
    >>> x = jax.random.normal(jax.random.key(0), (1, 8, 8, 2, 4))
    >>> jattn.window_attention(x, x, x, window_size=4, shift=2).shape
    (1, 8, 8, 2, 4)

    References:
        P09 Attention Swin U-Net (Swin window and shifted-window attention);
        P64 TextMonkey (shifted window attention).
    """
    if is_causal:
        raise NotImplementedError(
            "is_causal: window attention is defined on image windows, which have no token "
            "order (and the shift wraps the end of the grid to its start); use "
            "halo_attention(is_causal=True) or dot_product_attention(local_window_size=...) "
            "for causal local attention.")
    spatial, dims = _spatial_qkv(query, key, value, "window_attention")
    ndim = len(spatial)
    window = check_per_axis("window_size", window_size, ndim, minimum=1)
    if any(w > n for w, n in zip(window, spatial, strict=True)):
        raise ValueError(f"window_size: expected at most the spatial size {spatial} on every "
                         f"axis, got {window} (query {query.shape})")
    shifts = check_per_axis("shift", shift, ndim, minimum=0)
    if any(s >= w for s, w in zip(shifts, window, strict=True)):
        raise ValueError(f"shift: expected 0 <= shift < window_size {window} on every axis, "
                         f"got {shifts}")
    if relative_position_bias is not None:
        entries = math.prod(2 * w - 1 for w in window)
        if relative_position_bias.shape != (dims.N, entries):
            raise ValueError(f"relative_position_bias: expected shape (N={dims.N}, "
                             f"prod(2 * window - 1)={entries}), got "
                             f"{relative_position_bias.shape}")
        check_floating("relative_position_bias", relative_position_bias)
    scale = dims.H ** -0.5 if scale is None else scale
    if implementation != "blocked":
        score_mod = None
        if relative_position_bias is not None:
            score_mod = _relative_bias_mod(relative_position_bias, spatial, window)
        return _on_mask(query, key, value, masks.block_window(spatial, window, shift=shifts),
                        scale, score_mod, implementation)

    counts = tuple(-(-n // w) for n, w in zip(spatial, window, strict=True))
    padded = tuple(c * w for c, w in zip(counts, window, strict=True))
    pads = [(0, p - n) for p, n in zip(padded, spatial, strict=True)]
    axes = tuple(range(1, 1 + ndim))
    negative = tuple(-s for s in shifts)

    def windows(x: Array) -> Array:
        x = _pad_axes(x, pads)
        if any(shifts):
            x = jnp.roll(x, negative, axis=axes)
        return _to_blocks(x.reshape(x.shape[0], *(v for c, w in zip(counts, window,
                                                                    strict=True)
                                                  for v in (c, w)), *x.shape[-2:]), ndim)

    # Per axis and rolled coordinate r: the Swin region label and whether the position it
    # holds, (r + shift) mod L_pad, is a real (not padded) one. Static, [n_a, w_a] each.
    labels, real = [], []
    for n, p, w, s in zip(spatial, padded, window, shifts, strict=True):
        r = np.arange(p)
        label = np.where(r < p - w, 0, np.where(r < p - s, 1, 2)) if s else np.zeros(p, int)
        labels.append(label.reshape(-1, w))
        real.append(((r + s) % p < n).reshape(-1, w))
    label = _combine_axes(labels, lambda a, b: 3 * a + b)  # [nW, P]
    valid = _combine_axes(real, np.logical_and)
    allowed = None
    if any(shifts) or not valid.all():
        # Built in the graph from [nW, P] constants: no [nW, P, P] literal in the program.
        label, valid = jnp.asarray(label), jnp.asarray(valid)
        allowed = (label[:, :, None] == label[:, None, :]) & valid[:, None, :]  # [nW, P, P]

    bias = None
    if relative_position_bias is not None:
        bias = relative_position_bias[:, relative_position_index(window)]  # [N, P, P]
    out = _blockwise_softmax(windows(query), windows(key), windows(value), allowed, bias,
                             scale, query.dtype)
    out = _from_blocks(out, counts, window)
    if any(shifts):
        out = jnp.roll(out, shifts, axis=axes)
    return out[(slice(None), *(slice(0, n) for n in spatial))]


def _relative_bias_mod(table: Array, spatial, window):
    """Swin's relative position bias as a score_mod on flat grid positions: inside one
    (shifted) window the offset of two positions' window coordinates is the offset of their
    grid coordinates, so entry ``relative_position_index`` of that offset is added (pairs
    of different windows are masked; their index is clipped into the table)."""
    sides = [2 * w - 1 for w in window]

    def mod(score, batch, head, q_index, kv_index):
        index, step = 0, 1
        for axis in reversed(range(len(spatial))):
            n, w = spatial[axis], window[axis]
            offset = (q_index // step) % n - (kv_index // step) % n + (w - 1)
            index = index + jnp.clip(offset, 0, sides[axis] - 1) * math.prod(
                sides[axis + 1:])
            step *= n
        return score + table[head, index].astype(score.dtype)

    return mod


def _on_mask(query, key, value, mask, scale, score_mod, implementation) -> Array:
    """Attention of the flattened grid under ``mask`` through dot_product_attention."""
    B, *spatial, N, H = query.shape
    L = math.prod(spatial)
    out = dot_product_attention(
        query.reshape(B, L, N, H), key.reshape(B, L, *key.shape[-2:]),
        value.reshape(B, L, *value.shape[-2:]), mask=mask, scale=scale, score_mod=score_mod,
        implementation=implementation)
    return out.reshape(B, *spatial, N, -1)


def halo_attention(query: Array, key: Array, value: Array, *, block_size, halo_size,
                   is_causal: bool = False, scale: float | None = None,
                   implementation: str | None = "blocked") -> Array:
    r"""HaloNet blocked local attention: each query block attends to its key block plus a halo.

    Per axis, query position p lies in block i = floor(p / b); it attends to key p' iff
    i b - h <= p' < (i + 1) b + h on every axis (and 0 <= p' < L: the halo is clipped at
    the borders, out-of-range keys are masked rather than padded with attendable zeros);
    causal (1-D only): additionally p' <= p.

    .. math::
        \mathrm{out}_p = \sum_{p' \in \mathcal{N}(p)}
            \mathrm{softmax}_{p'}(\mathrm{scale}\; q_p \cdot k_{p'})\, v_{p'}

    Spatial sizes that are not a multiple of b are padded at the end of each axis (padded
    keys masked, padded queries dropped). Logits and softmax in float32 (or wider). HaloNet's
    relative position embeddings are not part of this function.

    CAB patterns: noncausal self (1-D and 2-D), causal self (1-D). Causal 2-D raises
    NotImplementedError (a grid has no single token order: raster order and per-axis order
    give different neighbourhoods; flatten to 1-D for raster order). Cross attention (a key
    grid of another shape) raises NotImplementedError (a block pairs the positions of one
    grid).

    Args:
        query: [B, L, N, H] or [B, L1, L2, N, H].
        key: ``[B, *spatial, K, H]`` with the query's spatial shape; N % K == 0 (GQA).
        value: ``[B, *spatial, K, Hv]``.
        block_size: b, an int or one per spatial axis, 1 <= b <= spatial size.
        halo_size: h >= 0, an int or one per spatial axis.
        is_causal: query p sees only keys p' <= p (1-D only).
        scale: logits scale; default 1 / sqrt(H).
        implementation: "blocked" (blocks reshaped into a batch, halos gathered) or an
            implementation of :func:`jattn.dot_product_attention` run under
            ``masks.block_window(spatial, b, halo=h)`` (``& masks.causal()``).

    Returns:
        ``[B, *spatial, N, Hv]`` in the query's dtype.

    Raises:
        ValueError: wrong ranks, shapes that disagree, heads that do not divide, a block
            outside [1, spatial size], a negative halo.
        TypeError: non-floating or mixed dtypes.
        NotImplementedError: is_causal with two spatial axes, cross attention.

    >>> import jax, jattn.efficient.local
    >>> x = jax.random.normal(jax.random.key(0), (1, 10, 2, 4))
    >>> jattn.halo_attention(x, x, x, block_size=4, halo_size=1, is_causal=True).shape
    (1, 10, 2, 4)

    References:
        P53 HaloNet, "Scaling Local Self-Attention for Parameter Efficient Visual Backbones".
    """
    spatial, dims = _spatial_qkv(query, key, value, "halo_attention")
    ndim = len(spatial)
    if is_causal and ndim != 1:
        raise NotImplementedError(
            "is_causal: causal halo attention is defined for one spatial axis only: a 2-D "
            "grid has no single token order (raster and per-axis orders disagree); flatten "
            "the grid to 1-D for raster order.")
    block = check_per_axis("block_size", block_size, ndim, minimum=1)
    if any(b > n for b, n in zip(block, spatial, strict=True)):
        raise ValueError(f"block_size: expected at most the spatial size {spatial} on every "
                         f"axis, got {block} (query {query.shape})")
    halo = check_per_axis("halo_size", halo_size, ndim, minimum=0)
    scale = dims.H ** -0.5 if scale is None else scale
    if implementation != "blocked":
        mask = masks.block_window(spatial, block, halo=halo)
        return _on_mask(query, key, value, mask & masks.causal() if is_causal else mask,
                        scale, None, implementation)

    counts = tuple(-(-n // b) for n, b in zip(spatial, block, strict=True))
    # A halo wider than (blocks - 1) * b reaches past both borders from every block: the
    # keys it adds are all out of range, so clip it (same result, less padding).
    halo = tuple(min(h, (c - 1) * b) for h, c, b in zip(halo, counts, block, strict=True))
    right = tuple(0 if is_causal else h for h in halo)  # causal: later keys never attended

    # Queries: pad to a multiple of the block and cut into blocks.
    q = _pad_axes(query, [(0, c * b - n) for c, b, n in zip(counts, block, spatial,
                                                               strict=True)])
    q = _to_blocks(q.reshape(q.shape[0], *(v for c, b in zip(counts, block, strict=True)
                                           for v in (c, b)), *q.shape[-2:]), ndim)

    # Keys: pad by the halo on each side, then gather each block's neighbourhood with a
    # static index per axis: block i reads padded positions i b + [0, b + h + right).
    pads = [(h, c * b - n + r) for h, r, c, b, n in zip(halo, right, counts, block, spatial,
                                                        strict=True)]
    index = [np.arange(c)[:, None] * b + np.arange(b + h + r)[None, :]
             for c, b, h, r in zip(counts, block, halo, right, strict=True)]

    def neighbourhoods(x: Array) -> Array:
        x = _pad_axes(x, pads)
        for a in range(ndim):  # axis 1 + 2a becomes (blocks, neighbourhood)
            x = jnp.take(x, jnp.asarray(index[a]), axis=1 + 2 * a)
        return _to_blocks(x, ndim)

    # Mask: keys in range on every axis ([blocks, Pk]), and in 1-D causal order. Query t of
    # block i sits at i b + t and key j of its neighbourhood at i b + j - h: the order
    # depends on (t, j) only, a [b, Pk] mask shared by every block.
    real = [((idx - h >= 0) & (idx - h < n)) for idx, h, n in zip(index, halo, spatial,
                                                                   strict=True)]
    valid = _combine_axes(real, np.logical_and)  # [blocks, Pk]
    allowed = None if valid.all() else jnp.asarray(valid)[:, None, :]
    if is_causal:
        (b,), (h,) = block, halo
        order = jnp.asarray(np.arange(b + h)[None, :] - h <= np.arange(b)[:, None])[None]
        allowed = order if allowed is None else allowed & order

    out = _blockwise_softmax(q, neighbourhoods(key), neighbourhoods(value), allowed, None,
                             scale, query.dtype)
    out = _from_blocks(out, counts, block)
    return out[(slice(None), *(slice(0, n) for n in spatial))]
