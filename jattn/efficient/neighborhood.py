"""Neighbourhood attention: each query attends to a fixed-size window of keys around it.

``neighborhood_attention`` follows NATTEN's semantics (P72, Faster Neighborhood Attention):
one or more spatial axes (sequences, images, volumes), a kernel size, a dilation, a stride and
causality per axis. Along an axis of length L with dilation d the positions split into d
groups by index mod d; a query attends only within its group, to the ``kernel_size`` group
members around it. The window is centred on the query and, at a border, shifts inward so
that it always holds exactly ``kernel_size`` keys (zero padding is never attended). The
neighbourhood of a query in several dimensions is the product of its per-axis windows.

This is P72's "GEMM-based, fused" neighbourhood attention: softmax attention over the
flattened positions under :func:`jattn.masks.neighborhood`, whose block map follows the
window, so the chunked path (and the flash kernels) compute only the tiles a window touches,
with whole matrix products per tile and no per-query gather.
``jattn.reference.neighborhood_attention`` is the dense ground truth (a materialised boolean
mask built position by position).

References:
    P72 Faster Neighborhood Attention, "Faster Neighborhood Attention: Reducing the O(n^2)
    Cost of Self Attention at the Threadblock Level".
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax.numpy as jnp

from jattn.core import masks
from jattn.core.attention import dot_product_attention
from jattn.core.shapes import (
    Array,
    DTypeError,
    check_floating,
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


def neighborhood_attention(query: Array, key: Array, value: Array, *,
                           kernel_size: int | Sequence[int], dilation: int | Sequence[int] = 1,
                           is_causal: bool | Sequence[bool] = False,
                           stride: int | Sequence[int] = 1, scale: float | None = None,
                           extra_key: Array | None = None, extra_value: Array | None = None,
                           implementation="chunked") -> Array:
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
    most recent positions of the group up to i itself (fewer at the start). With a stride
    s, the ranks are taken s at a time and every query of such a group uses the window of
    its leader (the middle one; causal: the last, with keys after the query itself
    excluded), as NATTEN's strided neighbourhood attention (:class:`jattn.masks.Neighborhood`
    states the exact rule). Scores and softmax in float32 (or wider). On the "chunked" path
    (the default) no L x L array exists: only the tiles of the flattened [L, L] pattern that
    a window touches are computed, so time and memory grow as L times the window's extent
    in flat positions (for a 1-D window, L * (kernel_size * dilation + a tile)).

    CAB patterns: noncausal self and causal self (causality per axis). Cross attention
    (key/value at other positions than the query) is not supported: a neighbourhood needs a
    geometry shared by queries and keys (NotImplementedError).

    Args:
        query: ``[B, *spatial, N, H]`` with 1, 2 or 3 spatial axes.
        key: ``[B, *spatial, K, H]``, the query's spatial shape; N % K == 0 (GQA/MQA without
            repeating K/V).
        value: ``[B, *spatial, K, Hv]``.
        kernel_size: keys per axis (per dilation group), an int or one per spatial axis.
        dilation: an int or one per spatial axis; kernel_size * dilation <= length per axis.
        is_causal: a bool or one per spatial axis.
        stride: an int or one per spatial axis, at most kernel_size: queries that share a
            window.
        scale: logits scale; default 1 / sqrt(H).
        extra_key: optional [B, E, K, H] global keys every query attends to, in the same
            softmax as its neighbours.
        extra_value: [B, E, K, Hv], with extra_key.
        implementation: as in :func:`jattn.dot_product_attention`; the default "chunked" is
            the block-sparse path ("xla" materialises the [L, L + E] scores).

    Returns:
        ``[B, *spatial, N, Hv]`` in the query's dtype.

    Raises:
        ValueError: wrong ranks, shapes that disagree, heads that do not divide, a
            kernel_size, dilation or stride that is not a positive int (per axis), a kernel
            that does not fit in every dilation group, a stride over the kernel size,
            extra_key without extra_value.
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
    mask = masks.neighborhood(spatial, kernel_size, dilation, is_causal, stride,
                              global_keys=bool(E))
    L = math.prod(spatial)
    q = query.reshape(B, L, N, H)
    k = key.reshape(B, L, K, H)
    v = value.reshape(B, L, K, Hv)
    if E:  # extra keys after the grid, allowed for every query (global_keys)
        k = jnp.concatenate([k, extra_key], axis=1)
        v = jnp.concatenate([v, extra_value], axis=1)
    out = dot_product_attention(q, k, v, mask=mask, scale=scale,
                                implementation=implementation)
    return out.reshape(B, *spatial, N, Hv)
