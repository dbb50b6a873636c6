"""Bi-level routing attention (BiFormer, P59): coarse region routing, then token attention.

The spatial positions (one axis for sequences, two for images) are cut into regions of
``region_size`` positions per axis (an axis whose length is not a multiple is padded at its
end; padded positions are never attended and never counted in a region mean). Each region
gets a region-level query and key, the mean of its tokens' queries and keys; the region
affinity A = Q_r K_r^T (summed over heads, so one routing is shared by all heads, as in the
paper) picks, for each query region, its ``top_k`` key regions; every query token of the
region then attends, in one softmax, to all tokens of those regions. That is softmax
attention under a data-dependent block mask (:func:`jattn.masks.block_selection`, regions
made contiguous): the chunked path visits, per batch row, only the routed (query region,
key region) tiles: O(L * top_k * region) scores, never an L x L matrix, and no gathered
copy of the keys.

Causal (1-D, self only). The region mean of a query's own region includes later tokens of
that region, so routing a region by its plain mean would let a token's key set depend on
queries after it (a leak). Here a causal query at position t in region i routes by the
mean of the queries of region i at positions <= t (its prefix mean; the last token of a
region routes exactly by the paper's region mean), scoring only regions strictly before
region i (complete, so their key means hold only keys before t); it keeps its own region
always plus the ``top_k - 1`` best earlier ones, and inside them sees keys at positions
<= t. Routing becomes per token (a block selection per query): O(L * L / region)
affinities; a tile is visited when any of its queries routed to it.

References:
    P59 BiFormer, "BiFormer: Vision Transformer with Bi-Level Routing Attention".
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jattn.core import masks
from jattn.core.attention import dot_product_attention, hashable_implementation
from jattn.core.shapes import (
    Array,
    accumulation_dtype,
    check_int,
    check_per_axis,
    check_spatial_qkv,
)

MAX_SPATIAL_AXES = 2


def _check_inputs(query, key, value):
    """Validate; return the query and key spatial shapes and (B, N, H, K, Hv)."""
    spatial, key_spatial, d = check_spatial_qkv(query, key, value,
                                                max_spatial_axes=MAX_SPATIAL_AXES)
    return spatial, key_spatial, (d.B, d.N, d.H, d.K, d.Hv)


def _to_regions(x: Array, spatial, region, xp=jnp) -> Array:
    """[B, *spatial, ...] -> [B, R, P, ...] (zero padded), R regions of P positions each,
    regions and positions in row-major order."""
    n = len(spatial)
    grid = [-(-s // r) for s, r in zip(spatial, region, strict=True)]
    pad = [(0, 0)] + [(0, g * r - s) for g, r, s in zip(grid, region, spatial, strict=True)]
    x = xp.pad(x, pad + [(0, 0)] * (x.ndim - 1 - n))
    rest = x.shape[1 + n:]
    split = [d for g, r in zip(grid, region, strict=True) for d in (g, r)]
    x = x.reshape(x.shape[0], *split, *rest)
    order = [0] + [1 + 2 * a for a in range(n)] + [2 + 2 * a for a in range(n)]
    x = x.transpose(*order, *range(1 + 2 * n, x.ndim))
    return x.reshape(x.shape[0], math.prod(grid), math.prod(region), *rest)


def _from_regions(x: Array, spatial, region) -> Array:
    """Inverse of :func:`_to_regions`, cropping the padding."""
    n = len(spatial)
    grid = [-(-s // r) for s, r in zip(spatial, region, strict=True)]
    rest = x.shape[3:]
    x = x.reshape(x.shape[0], *grid, *region, *rest)
    order = [0] + [d for a in range(n) for d in (1 + a, 1 + n + a)]
    x = x.transpose(*order, *range(1 + 2 * n, x.ndim))
    x = x.reshape(x.shape[0], *(g * r for g, r in zip(grid, region, strict=True)), *rest)
    return x[(slice(None), *(slice(0, s) for s in spatial))]


def _region_valid(spatial, region) -> np.ndarray:
    """[R, P]: which region slots hold a real (not padded) position."""
    return _to_regions(np.ones((1, *spatial, 1), bool), spatial, region, xp=np)[0, ..., 0]


def bilevel_routing_attention(query: Array, key: Array, value: Array, *,
                              region_size: int | Sequence[int], top_k: int,
                              is_causal: bool = False, scale: float | None = None,
                              implementation="chunked") -> Array:
    r"""Bi-level routing attention: route each query region to its top-k key regions, then
    softmax attention over the tokens of those regions.

    .. math::
        \bar q_i = \mathrm{mean}_{t \in i}\, q_t,\quad \bar k_j = \mathrm{mean}_{s \in j}\, k_s,
        \quad A_{ij} = \sum_n \bar q_i^{(n)} \cdot \bar k_j^{(n)},\quad
        \mathcal{R}(i) = \mathrm{topk}_j A_{ij},\\
        \mathrm{out}_t = \sum_{s \in \cup_{j \in \mathcal{R}(i(t))} j}
            \mathrm{softmax}_s(\mathrm{scale}\; q_t \cdot k_s)\, v_s

    Regions are ``region_size`` positions per spatial axis (a last, partial region per axis
    when the length is not a multiple; its padding is masked and not in the means). With GQA
    head n uses key head n // (N / K) in the affinity sum and the attention. Ties in A go to
    the lower region index. Causal (1-D): query t in region i routes by the mean of region
    i's queries at positions <= t, among regions j < i only, keeps region i plus the
    ``top_k - 1`` best of them, and attends to keys s <= t; nothing at a position after t
    changes out_t (see the module docstring).

    CAB patterns: noncausal self; noncausal cross (key/value may have another spatial shape
    than the query, with as many axes; regions are cut the same way in both); causal self
    (1-D only). Causal cross (key length != query length) and causal images raise
    NotImplementedError: there is no order between the positions to make causal.

    Args:
        query: ``[B, *spatial, N, H]`` with 1 (sequence) or 2 (image) spatial axes.
        key: ``[B, *spatial_k, K, H]``, N % K == 0.
        value: ``[B, *spatial_k, K, Hv]``.
        region_size: positions per region along each axis, an int or one per axis (not the
            number of regions: a fixed region size keeps the attended length independent of
            the input size).
        top_k: routed key regions per query region, 1 <= top_k <= number of key regions.
        is_causal: causal 1-D self attention.
        scale: logits scale; default 1 / sqrt(H).
        implementation: as in :func:`jattn.dot_product_attention`; the default "chunked"
            visits only the routed tiles of each batch row.

    Returns:
        ``[B, *spatial, N, Hv]`` in the query's dtype.

    Raises:
        ValueError: wrong ranks or shapes, heads that do not divide, a bad region_size, a
            top_k out of range.
        TypeError: non-floating or mixed dtypes, a non-int top_k or non-bool is_causal.
        NotImplementedError: is_causal with 2 spatial axes or key length != query length.

    >>> import jax
    >>> from jattn.efficient.bilevel import bilevel_routing_attention
    >>> x = jax.random.normal(jax.random.key(0), (1, 6, 7, 2, 8))  # a 6 x 7 image
    >>> bilevel_routing_attention(x, x, x, region_size=3, top_k=2).shape
    (1, 6, 7, 2, 8)

    References:
        P59 BiFormer, "BiFormer: Vision Transformer with Bi-Level Routing Attention".
    """
    spatial, spatial_k, _ = _check_inputs(query, key, value)
    n = len(spatial)
    region = check_per_axis("region_size", region_size, n)
    if not isinstance(is_causal, bool | np.bool_):
        raise TypeError(f"is_causal: expected a bool, got {is_causal!r}")
    check_int("top_k", top_k, minimum=None)
    n_key_regions = math.prod(-(-s // r) for s, r in zip(spatial_k, region, strict=True))
    if not 1 <= top_k <= n_key_regions:
        raise ValueError(f"top_k: expected 1 <= top_k <= {n_key_regions} (the key regions of "
                         f"key {key.shape} with region_size {region}), got {top_k}")
    if is_causal and n != 1:
        raise NotImplementedError(
            f"is_causal: causal bi-level routing is defined for sequences (1 spatial axis); "
            f"an image has no order to make causal, got query {query.shape}")
    if is_causal and spatial_k != spatial:
        raise NotImplementedError(
            f"is_causal: causal cross attention (key length {spatial_k[0]} != query length "
            f"{spatial[0]}) is not supported: routing needs query and key positions aligned")
    scale = None if scale is None else float(scale)
    return _bilevel_routing_attention(query, key, value, region, top_k, bool(is_causal), scale,
                                      hashable_implementation(implementation))


@functools.partial(jax.jit, static_argnums=(3, 4, 5, 6, 7))
def _bilevel_routing_attention(query: Array, key: Array, value: Array, region: tuple,
                               top_k: int, is_causal: bool, scale: float | None,
                               implementation) -> Array:
    """:func:`bilevel_routing_attention` after its checks, as one program."""
    spatial, spatial_k = query.shape[1:-2], key.shape[1:-2]
    B, N, H, K, Hv = query.shape[0], *query.shape[-2:], key.shape[-2], value.shape[-1]
    dtype = accumulation_dtype(query.dtype)
    G = N // K
    # Regions made contiguous (row-major within each), padded where an axis is not a multiple.
    q = _to_regions(query, spatial, region)  # [B, Rq, P, N, H]
    k = _to_regions(key, spatial_k, region)  # [B, Rk, P, K, H]
    v = _to_regions(value, spatial_k, region)  # [B, Rk, P, K, Hv]
    Rq, P = q.shape[1], q.shape[2]
    valid_k = _region_valid(spatial_k, region)
    count_k = valid_k.sum(1).astype(np.float64)
    k_mean = k.astype(dtype).sum(2) / jnp.asarray(count_k, dtype)[:, None, None]  # [B, Rk, K, H]
    q_groups = q.astype(dtype).reshape(B, Rq, P, K, G, H)
    if not is_causal:
        count_q = _region_valid(spatial, region).sum(1).astype(np.float64)
        q_mean = q_groups.sum(2) / jnp.asarray(count_q, dtype)[:, None, None, None]
        affinity = lax.stop_gradient(jnp.einsum("brkgh,bskh->brs", q_mean, k_mean))
        _, routed = lax.top_k(affinity, top_k)  # [B, Rq, top_k]
        mask = masks.block_selection(routed[:, None], P, P)
        if not valid_k.all():  # padded key slots: segment 1, never matched by a query
            pad = np.where(valid_k.ravel(), 0, 1).astype(np.int32)[None]
            mask = mask & masks.segments(np.zeros((1, Rq * P), np.int32), pad)
    else:
        # Causal, 1-D: per-token routing by the prefix mean of the own region's queries.
        q_prefix = jnp.cumsum(q_groups, axis=2) / jnp.arange(1, P + 1, dtype=dtype)[
            :, None, None, None]
        affinity = lax.stop_gradient(jnp.einsum("brpkgh,bskh->brps", q_prefix, k_mean))
        earlier = np.arange(Rq)[None, :] < np.arange(Rq)[:, None]  # [i, j]: j < i
        affinity = jnp.where(jnp.asarray(earlier)[None, :, None, :], affinity, -jnp.inf)
        routed = [jnp.broadcast_to(jnp.arange(Rq)[None, :, None, None], (B, Rq, P, 1))]
        n_earlier = min(top_k - 1, Rq - 1)
        if n_earlier:
            best, idx = lax.top_k(affinity, n_earlier)  # [B, Rq, P, n_earlier]
            routed.append(jnp.where(jnp.isfinite(best), idx, -1))
        routed = jnp.concatenate(routed, -1).reshape(B, 1, Rq * P, -1)
        mask = masks.block_selection(routed, 1, P) & masks.causal()
    flat = [x.reshape(B, x.shape[1] * P, *x.shape[3:]) for x in (q, k, v)]
    out = dot_product_attention(*flat, mask=mask, scale=scale, implementation=implementation)
    return _from_regions(out.reshape(B, Rq, P, N, Hv), spatial, region)
