"""Neighbourhood attention: each query attends to a fixed-size window of keys around it.

``neighborhood_attention`` follows NATTEN's semantics (P72, Faster Neighborhood Attention):
one or more spatial axes (sequences, images, volumes), a kernel size, a dilation and
causality per axis. Along an axis of length L with dilation d the positions split into d
groups by index mod d; a query attends only within its group, to the ``kernel_size`` group
members around it. The window is centred on the query and, at a border, shifts inward so
that it always holds exactly ``kernel_size`` keys (zero padding is never attended). The
neighbourhood of a query in several dimensions is the product of its per-axis windows.

The fast path gathers each query's neighbour indices (computed with NumPy at trace time from
the static shapes) and takes the softmax over just those keys: O(L * prod(kernel_size))
time and memory, never the dense L x L score matrix. ``jattn.reference.neighborhood_attention``
is the dense ground truth (a materialised boolean mask built position by position).

References:
    P72 Faster Neighborhood Attention, "Faster Neighborhood Attention: Reducing the O(n^2)
    Cost of Self Attention at the Threadblock Level".
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jattn.core.attention import masked_softmax
from jattn.core.shapes import (
    Array,
    DTypeError,
    accumulation_dtype,
    check_floating,
    check_per_axis,
    check_spatial_qkv,
)

MAX_SPATIAL_AXES = 3


def _check_inputs(query, key, value, extra_key, extra_value):
    """Validate shapes and dtypes; return the spatial shape and (B, N, H, K, Hv, E)."""
    spatial, key_spatial, d = check_spatial_qkv(query, key, value,
                                                max_spatial_axes=MAX_SPATIAL_AXES)
    if key_spatial != spatial:
        raise NotImplementedError(
            f"key: neighbourhood attention is self-attention only (noncausal or causal self): "
            f"a neighbourhood is defined by positions shared by queries and keys, so key's "
            f"spatial shape must equal the query's {spatial}; got key {key.shape}, query "
            f"{query.shape} (cross attention is not supported)")
    B, N, H, K = d.B, d.N, d.H, d.K
    Hv = value.shape[-1]
    if (extra_key is None) != (extra_value is None):
        raise ValueError("extra_key, extra_value: expected both or neither, got "
                         f"{'extra_key' if extra_value is None else 'extra_value'} only")
    E = 0
    if extra_key is not None:
        for name, x in (("extra_key", extra_key), ("extra_value", extra_value)):
            if x.ndim != 4:
                raise ValueError(f"{name}: expected rank 4 [B, E, K, H], got shape {x.shape}")
            check_floating(name, x)
            if x.dtype != query.dtype:
                raise DTypeError(f"{name}: expected the query's dtype {query.dtype}, "
                                f"got {x.dtype}")
        E = extra_key.shape[1]
        if extra_key.shape != (B, E, K, H):
            raise ValueError(f"extra_key: expected shape [B={B}, E, K={K}, H={H}], "
                             f"got {extra_key.shape}")
        if extra_value.shape != (B, E, K, Hv):
            raise ValueError(f"extra_value: expected shape [B={B}, E={E}, K={K}, Hv={Hv}], "
                             f"got {extra_value.shape}")
    return spatial, (B, N, H, K, Hv, E)


def _check_kernel_fits(spatial, kernel_size, dilation) -> None:
    for axis, (length, k, d) in enumerate(zip(spatial, kernel_size, dilation, strict=True)):
        # Groups hold ceil((L - g) / d) positions; the shortest, floor(L / d), must fit a window.
        if k > length // d:
            raise ValueError(
                f"kernel_size, dilation: spatial axis {axis} of length {length} with dilation "
                f"{d} splits into groups of {length // d} to {-(-length // d)} positions, too "
                f"few for kernel_size {k} (need kernel_size * dilation <= length, got "
                f"{k} * {d} > {length}; spatial shape {spatial})")


def _axis_neighbors(length: int, kernel: int, dilation: int, is_causal: bool):
    """Indices [length, kernel] of the keys each position attends to along one axis, and
    which of them are real (causal windows at the start of a group hold fewer keys)."""
    pos = np.arange(length)
    group, rank = pos % dilation, pos // dilation
    group_length = (length - group + dilation - 1) // dilation
    if is_causal:
        first = rank - (kernel - 1)
    else:
        # Centred (for an even kernel one more key before than after), clipped to the group.
        first = np.clip(rank - kernel // 2, 0, group_length - kernel)
    slot = first[:, None] + np.arange(kernel)[None, :]
    valid = slot >= 0
    return group[:, None] + dilation * np.maximum(slot, 0), valid


def neighbor_table(spatial: Sequence[int], kernel_size: Sequence[int],
                   dilation: Sequence[int], is_causal: Sequence[bool]):
    """Flat key indices [L, W] (L = prod(spatial), W = prod(kernel_size)) attended by each flat
    query position, and a boolean [L, W] saying which slots hold a key (all True unless some
    axis is causal). NumPy, from static shapes."""
    n = len(spatial)
    strides = [math.prod(spatial[a + 1:]) for a in range(n)]
    index = np.zeros((1,) * (2 * n), np.int64)
    valid = np.ones((1,) * (2 * n), bool)
    for a, (length, k, d, c) in enumerate(zip(spatial, kernel_size, dilation, is_causal,
                                              strict=True)):
        idx, ok = _axis_neighbors(length, k, d, c)
        shape = [1] * (2 * n)
        shape[a], shape[n + a] = length, k  # layout [*spatial, *kernel]
        index = index + strides[a] * idx.reshape(shape)
        valid = valid & ok.reshape(shape)
    L, W = math.prod(spatial), math.prod(kernel_size)
    full = tuple(spatial) + tuple(kernel_size)
    return (np.broadcast_to(index, full).reshape(L, W).astype(np.int32),
            np.broadcast_to(valid, full).reshape(L, W))


def neighborhood_attention(query: Array, key: Array, value: Array, *,
                           kernel_size: int | Sequence[int], dilation: int | Sequence[int] = 1,
                           is_causal: bool | Sequence[bool] = False, scale: float | None = None,
                           extra_key: Array | None = None,
                           extra_value: Array | None = None) -> Array:
    r"""Softmax attention of each position over its NATTEN neighbourhood (plus global keys).

    .. math::
        \mathrm{out}_i = \sum_{j \in \mathcal{N}(i) \cup \mathcal{E}}
            \frac{e^{s_{ij}}}{\sum_{j' \in \mathcal{N}(i) \cup \mathcal{E}} e^{s_{ij'}}}\,
            v_j, \qquad s_{ij} = \mathrm{scale}\; q_i \cdot k_j

    where N(i) is the product over spatial axes of the per-axis windows and E the optional
    extra (global) keys, shared by every query. Along an axis of length L, with kernel size k
    and dilation d, position i lies in group g = i mod d (positions g, g + d, ..., that is
    ceil((L - g) / d) of them) at rank r = i // d. Non-causal: the window is the group ranks
    clip(r - k // 2, 0, len(g) - k) + [0, k) (centred on i, one more key before it than after
    it for an even k, shifted inward at a border so that it always holds k keys: exactly
    prod(kernel_size) neighbours per query). Causal: the ranks max(r - k + 1, 0) .. r, the k
    most recent positions of the group up to i itself (fewer at the start). Scores and
    softmax in float32 (or wider); never an L x L matrix: the keys of each neighbourhood are
    gathered, O(L * prod(kernel_size)) time and memory.

    CAB patterns: noncausal self and causal self (causality per axis). Cross attention
    (key/value at other positions than the query) is not supported: a neighbourhood needs a
    geometry shared by queries and keys (NotImplementedError).

    Args:
        query: [B, *spatial, N, H] with 1, 2 or 3 spatial axes.
        key: [B, *spatial, K, H], the query's spatial shape; N % K == 0 (GQA/MQA without
            repeating K/V).
        value: [B, *spatial, K, Hv].
        kernel_size: keys per axis (per dilation group), an int or one per spatial axis.
        dilation: an int or one per spatial axis; kernel_size * dilation <= length per axis.
        is_causal: a bool or one per spatial axis.
        scale: logits scale; default 1 / sqrt(H).
        extra_key: optional [B, E, K, H] global keys every query attends to, in the same
            softmax as its neighbours.
        extra_value: [B, E, K, Hv], with extra_key.

    Returns:
        [B, *spatial, N, Hv] in the query's dtype.

    Raises:
        ValueError: wrong ranks, shapes that disagree, heads that do not divide, a
            kernel_size or dilation that is not a positive int (per axis) or a kernel that
            does not fit in every dilation group, extra_key without extra_value.
        TypeError: non-floating or mixed dtypes, a non-bool is_causal.
        NotImplementedError: key/value with another spatial shape than the query (cross).

    >>> import jax
    >>> from jattn.efficient.neighborhood import neighborhood_attention
    >>> x = jax.random.normal(jax.random.key(0), (1, 6, 7, 2, 8))  # a 6 x 7 image
    >>> neighborhood_attention(x, x, x, kernel_size=3, dilation=(1, 2)).shape
    (1, 6, 7, 2, 8)

    References:
        P72 Faster Neighborhood Attention, "Faster Neighborhood Attention: Reducing the
        O(n^2) Cost of Self Attention at the Threadblock Level".
    """
    spatial, (B, N, H, K, Hv, E) = _check_inputs(query, key, value, extra_key, extra_value)
    n = len(spatial)
    kernel_size = check_per_axis("kernel_size", kernel_size, n)
    dilation = check_per_axis("dilation", dilation, n)
    is_causal = check_per_axis("is_causal", is_causal, n, kind=bool)
    _check_kernel_fits(spatial, kernel_size, dilation)
    scale = H ** -0.5 if scale is None else scale

    index, valid = neighbor_table(spatial, kernel_size, dilation, is_causal)
    L, G = math.prod(spatial), N // K
    dtype = accumulation_dtype(query.dtype)
    q = query.reshape(B, L, K, G, H).astype(dtype)
    k = key.reshape(B, L, K, H).astype(dtype)[:, index]  # [B, L, W, K, H]
    v = value.reshape(B, L, K, Hv).astype(dtype)[:, index]  # [B, L, W, K, Hv]
    logits = jnp.einsum("blkgh,blwkh->blkgw", q, k) * scale
    if E:
        extra_logits = jnp.einsum("blkgh,bekh->blkge", q, extra_key.astype(dtype)) * scale
        logits = jnp.concatenate([logits, extra_logits], axis=-1)
        valid = np.concatenate([valid, np.ones((L, E), bool)], axis=-1)
    if valid.all():
        probs = jax.nn.softmax(logits, axis=-1)
    else:
        # masked_softmax keeps masked slots (which hold a stand-in index) out of the softmax
        # and of the gradients.
        probs = masked_softmax(logits, jnp.asarray(valid)[None, :, None, None, :])
    out = jnp.einsum("blkgw,blwkv->blkgv", probs[..., :index.shape[1]], v)
    if E:
        out = out + jnp.einsum("blkge,bekv->blkgv", probs[..., index.shape[1]:],
                               extra_value.astype(dtype))
    return out.reshape(B, *spatial, N, Hv).astype(query.dtype)
