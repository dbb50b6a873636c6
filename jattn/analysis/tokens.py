"""Choosing tokens from attention: rank and prune visual tokens by the attention they receive
(FasterVLM, FastV), pick the focus regions of an attention map for a magnifier (LSceneLLM),
let a modality's tokens exit after a layer (DyVTE), read points off a similarity map
(READ), and keep the tokens least like the others (TextMonkey).

Every function is a pure function of arrays. Selections have static sizes (``r``, ``k``,
``size`` are Python ints), so they run under jit; indices are int32, sorted by position
unless said otherwise, and ties go to the earlier token. Boolean token masks are [B, S] or
[S] (the same for every example). Each function checks its arguments in Python, then runs
its array work as one jitted program (compiled once per shape and static argument, also
when called eagerly).

    scores = rank_tokens(weights, candidates=visual)     # [B, N, P, S] -> [B, S]
    kept, idx = prune_by_attention(x, scores, r, candidates=visual)

References:
    P66 FasterVLM, "[CLS] Attention is All You Need for Training-Free Visual Token Pruning:
    Make VLM Inference Faster"; FastV, Chen et al., "An Image is Worth 1/2 Tokens After
    Layer 2"; P40 LSceneLLM, "LSceneLLM: Enhancing Large 3D Scene Understanding Using
    Adaptive Visual Preferences"; P42 DyVTE, "Accelerating Multimodal Large Language Models
    via Dynamic Visual-Token Exit and the Empirical Findings"; P52 READ, "Reasoning to
    Attend: Try to Understand How <SEG> Token Works"; P64 TextMonkey, "TextMonkey: An
    OCR-Free Large Multimodal Model for Understanding Document".
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jattn.core.shapes import (
    Array,
    accumulation_dtype,
    check_bool,
    check_floating,
    check_int,
    check_integer,
    check_per_axis,
    check_rank,
    check_values_in_range,
    is_concrete,
)

# --------------------------------------------------------------------------------------------
# Shared checks


def _concrete(x) -> np.ndarray | None:
    """``x`` as a NumPy array when its values can be read now (not a tracer), else None."""
    if x is None or not is_concrete(x):
        return None
    return np.asarray(x)


def _check_count(name: str, value, upper: int, letter: str) -> int:
    """A static count ``1 <= value <= upper`` (``letter`` names the upper bound)."""
    value = check_int(name, value, minimum=None)
    if not 1 <= value <= upper:
        raise ValueError(f"{name}: expected 1 <= {name} <= {letter}={upper}, got {value}")
    return value


def _token_mask(name: str, mask, B: int, S: int) -> Array | None:
    """A boolean token mask [S] or [B, S] (None passes through); the jitted cores broadcast
    it to [B, S] with :func:`_full`."""
    if mask is None:
        return None
    mask = jnp.asarray(mask)
    check_bool(name, mask)
    check_rank(name, mask, (1, 2), "[S] or [B, S]")
    if mask.shape[-1] != S or (mask.ndim == 2 and mask.shape[0] != B):
        raise ValueError(f"{name}: expected shape [S={S}] or [B={B}, S={S}], got {mask.shape}")
    return mask


def _full(mask: Array, B: int, S: int) -> Array:
    return jnp.broadcast_to(mask, (B, S))


def _check_weights(weights) -> Array:
    weights = jnp.asarray(weights)
    check_rank("weights", weights, (4,), "[B, N, P, S]")
    check_floating("weights", weights)
    if 0 in weights.shape[1:]:
        raise ValueError(f"weights: expected N, P, S > 0, got shape {weights.shape}")
    return weights


def _check_rows(query_positions, P: int) -> Array | None:
    """The query rows to use, int [rows] in [0, P) (range checked when concrete)."""
    if query_positions is None:
        return None
    rows = jnp.asarray(query_positions)
    check_integer("query_positions", rows)
    check_rank("query_positions", rows, (0, 1), "(ints in [0, P))")
    if rows.size == 0:
        raise ValueError("query_positions: expected at least one row, got none")
    raw = _concrete(query_positions)
    if raw is not None:
        check_values_in_range("query_positions", raw, 0, P - 1)
    return rows


def _select_rows(weights: Array, rows: Array | None) -> Array:
    """weights [B, N, P, S] restricted to ``rows`` (None: all), in the accumulation dtype."""
    weights = weights.astype(accumulation_dtype(weights.dtype))
    return weights if rows is None else jnp.take(weights, rows.reshape(-1), axis=2)


def _check_tokens(name: str, x) -> Array:
    x = jnp.asarray(x)
    if x.ndim < 2:
        raise ValueError(f"{name}: expected [B, S, ...], got shape {x.shape}")
    return x


def _lexicographic_order(first: Array, scores: Array) -> Array:
    """Per row, the positions ordered by (``first`` True before False, higher ``scores``
    first, earlier position first); NaN scores come after every number."""
    by_score = jnp.argsort(-scores, axis=-1, stable=True)
    later = jnp.logical_not(jnp.take_along_axis(first, by_score, axis=-1)).astype(jnp.int8)
    return jnp.take_along_axis(by_score, jnp.argsort(later, axis=-1, stable=True), axis=-1)


# --------------------------------------------------------------------------------------------
# P66 FasterVLM / FastV: rank tokens by the attention they receive and keep the top r


def rank_tokens(weights, *, query_positions=None, candidates=None) -> Array:
    """Importance of each key token: the attention it receives, averaged over the heads and
    the chosen query rows.

    FasterVLM ranks the visual tokens by the [CLS] token's attention in the vision encoder
    (one row, mean over heads); FastV by the attention the image tokens receive at layer K
    of the language model. Both are this mean; pass the rows of the queries that matter, e.g.
    ``jattn.attention_weights(q, k, query_positions=[cls])`` or the last query. Under a
    causal mask a key receives nothing from earlier queries; the mean counts those zeros.

    Args:
        weights: floating [B, N, P, S], attention probabilities of P query rows of N heads
            over S keys.
        query_positions: None (all P rows) or ints in [0, P): the rows to average.
        candidates: None (all keys) or bool [B, S] or [S]: the keys that may be ranked
            (e.g. the visual tokens); the others score -inf.

    Returns:
        [B, S] float32 (float64 for float64 weights).

    Raises:
        ValueError: wrong ranks or shapes, a row index outside [0, P) (checked when
            concrete).
        TypeError: non-floating weights, a non-boolean ``candidates``, non-integer rows.

    Example:
        >>> import jax.numpy as jnp
        >>> w = jnp.array([[[[0.25, 0.5, 0.25], [0.75, 0.0, 0.25]]]])   # [1, 1, 2, 3]
        >>> rank_tokens(w, query_positions=[1]).tolist()
        [[0.75, 0.0, 0.25]]
        >>> rank_tokens(w, candidates=jnp.array([False, True, True])).tolist()
        [[-inf, 0.25, 0.25]]

    References:
        P66 FasterVLM ([CLS] attention, mean over heads); FastV, "An Image is Worth 1/2
        Tokens After Layer 2" (attention received at layer K).
    """
    weights = _check_weights(weights)
    B, _, P, S = weights.shape
    return _rank_tokens(weights, _check_rows(query_positions, P),
                        _token_mask("candidates", candidates, B, S))


@jax.jit
def _rank_tokens(weights: Array, rows: Array | None, candidates: Array | None) -> Array:
    scores = _select_rows(weights, rows).mean(axis=(1, 2))
    if candidates is not None:
        scores = jnp.where(_full(candidates, *scores.shape), scores, -jnp.inf)
    return scores


def keep_fraction(num_tokens: int, fraction: float) -> int:
    """How many of ``num_tokens`` tokens a keep ratio keeps: max(1, round(fraction * S)),
    rounding halves up. A reduction ratio rho keeps ``fraction = 1 - rho``.

    Args:
        num_tokens: S >= 1.
        fraction: the share of tokens kept, in (0, 1].

    Returns:
        A Python int in [1, S].

    Raises:
        ValueError: S < 1, a fraction outside (0, 1].
        TypeError: a non-integer S.

    Example:
        >>> keep_fraction(576, 1 - 0.9), keep_fraction(576, 0.05), keep_fraction(10, 0.01)
        (58, 29, 1)

    References:
        P66 FasterVLM (reduction ratios of the visual tokens; the rounding is the
        library's choice).
    """
    S = check_int("num_tokens", num_tokens)
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction: expected a number in (0, 1], got {fraction!r}")
    return min(S, max(1, math.floor(fraction * S + 0.5)))


def keep_top_tokens(scores, r: int) -> Array:
    """Indices of the r highest-scoring tokens of each row, in position order.

    Ties go to the earlier token; -inf scores (non-candidates) come after every finite
    score, NaN after everything.

    Args:
        scores: floating [B, S], e.g. from :func:`rank_tokens`.
        r: static int, 1 <= r <= S.

    Returns:
        int32 [B, r], ascending in each row.

    Raises:
        ValueError: a rank other than 2, r outside [1, S].
        TypeError: non-floating scores, a non-integer r.

    Example:
        >>> import jax.numpy as jnp
        >>> keep_top_tokens(jnp.array([[0.1, 0.5, 0.2, 0.5]]), 2).tolist()
        [[1, 3]]
        >>> keep_top_tokens(jnp.array([[0.3, 0.1, 0.3, 0.3]]), 2).tolist()   # a tie
        [[0, 2]]

    References:
        P66 FasterVLM (keep the top-k visual tokens by [CLS] attention); FastV.
    """
    scores = jnp.asarray(scores)
    check_rank("scores", scores, (2,), "[B, S]")
    check_floating("scores", scores)
    return _keep_top_tokens(scores, _check_count("r", r, scores.shape[1], "S"))


@functools.partial(jax.jit, static_argnums=1)
def _keep_top_tokens(scores: Array, r: int) -> Array:
    top = jnp.argsort(-scores, axis=-1, stable=True)[:, :r]
    return jnp.sort(top, axis=-1).astype(jnp.int32)


def gather_tokens(x, indices) -> Array:
    """The tokens ``indices`` of each example: ``out[b, i] = x[b, indices[b, i]]``.

    Args:
        x: [B, S, ...], any dtype.
        indices: int [B, r] (or [r], the same for every example), in [0, S).

    Returns:
        [B, r, ...] in the dtype of x; differentiable in x.

    Raises:
        ValueError: wrong ranks or batch sizes, an index outside [0, S) (checked when
            concrete).
        TypeError: non-integer indices.

    Example:
        >>> import jax.numpy as jnp
        >>> gather_tokens(jnp.arange(8).reshape(2, 4), jnp.array([[0, 3], [1, 2]])).tolist()
        [[0, 3], [5, 6]]

    References:
        P66 FasterVLM (the kept visual tokens go on to the language model).
    """
    x = _check_tokens("x", x)
    B, S = x.shape[:2]
    idx = jnp.asarray(indices)
    check_integer("indices", idx)
    check_rank("indices", idx, (1, 2), "[B, r] or [r]")
    if idx.ndim == 2 and idx.shape[0] != B:
        raise ValueError(f"indices: expected [B={B}, r] to match x {x.shape}, got {idx.shape}")
    raw = _concrete(indices)
    if raw is not None:
        check_values_in_range("indices", raw, 0, S - 1)
    return _gather_tokens(x, idx)


@jax.jit
def _gather_tokens(x: Array, indices: Array) -> Array:
    indices = jnp.broadcast_to(indices, (x.shape[0], indices.shape[-1]))
    return jax.vmap(lambda xb, ib: jnp.take(xb, ib, axis=0))(x, indices)


def prune_by_attention(x, weights, r: int, *, candidates=None, protect=None,
                       query_positions=None, num_fixed: int | None = None
                       ) -> tuple[Array, Array]:
    """Keep every non-candidate token (e.g. the text) and the r candidates (e.g. the visual
    tokens) that receive the most attention, in their original order.

    The kept length S_keep = num_fixed + r is static: ``num_fixed``, the number of tokens
    kept whatever their score (non-candidates and ``protect``-ed ones), must be the same in
    every row. It is counted from ``candidates`` and ``protect`` when those are concrete
    (a NumPy array, or a jax array outside jit); pass it when they are traced.

    Random pruning, the baseline to set attention-based pruning beside, is this function
    with random scores: ``prune_by_attention(x, jax.random.uniform(rng, (B, S)), r, ...)``.

    Args:
        x: [B, S, ...], the token states.
        weights: floating [B, N, P, S] attention rows (ranked by :func:`rank_tokens`) or
            [B, S] scores already computed.
        r: static int, the candidates kept, 1 <= r <= S - num_fixed.
        candidates: None (every token) or bool [B, S] or [S]: the tokens that may be pruned.
        protect: None or bool [B, S] or [S]: candidates kept whatever their score.
        query_positions: for [B, N, P, S] weights, the rows to average (None: all).
        num_fixed: None (count it) or the number of tokens kept whatever their score, per row.

    Returns:
        (kept x [B, num_fixed + r, ...], kept positions int32 [B, num_fixed + r] ascending).

    Raises:
        ValueError: wrong ranks or shapes, rows with different numbers of fixed tokens, a
            ``num_fixed`` that disagrees with the masks (both checked when concrete) or
            missing for traced masks, r outside [1, S - num_fixed].
        TypeError: non-floating weights, non-boolean masks.

    Example:
        >>> import jax.numpy as jnp
        >>> x = jnp.arange(6.0)[None]                            # 2 text, then 4 visual
        >>> visual = jnp.array([False, False, True, True, True, True])
        >>> scores = jnp.array([[0.0, 0.0, 0.1, 0.4, 0.2, 0.3]])
        >>> kept, idx = prune_by_attention(x, scores, 2, candidates=visual)
        >>> idx.tolist(), kept.tolist()
        ([[0, 1, 3, 5]], [[0.0, 1.0, 3.0, 5.0]])

    References:
        P66 FasterVLM (prune visual tokens by [CLS] attention, text kept); FastV.
    """
    x = _check_tokens("x", x)
    B, S = x.shape[:2]
    weights = jnp.asarray(weights)
    check_rank("weights", weights, (2, 4), "[B, S] or [B, N, P, S]")
    if weights.ndim == 2:
        check_floating("weights", weights)
        if query_positions is not None:
            raise ValueError("query_positions: only for [B, N, P, S] weights, got scores "
                             f"{weights.shape}")
        if weights.shape != (B, S):
            raise ValueError(f"weights: expected scores [B={B}, S={S}] or [B, N, P, S={S}] "
                             f"to match x {x.shape}, got {weights.shape}")
        scores = weights
    else:
        weights = _check_weights(weights)
        if weights.shape[0] != B or weights.shape[3] != S:
            raise ValueError(f"weights: expected [B={B}, N, P, S={S}] to match x {x.shape}, "
                             f"got {weights.shape}")
        scores = _rank_tokens(weights, _check_rows(query_positions, weights.shape[2]), None)
    masks = (_token_mask("candidates", candidates, B, S), _token_mask("protect", protect, B, S))
    num_fixed = _count_fixed(candidates, protect, B, S, num_fixed)
    r = _check_count("r", r, S - num_fixed, "S - num_fixed")
    return _prune(x, scores, *masks, num_fixed + r)


@functools.partial(jax.jit, static_argnums=4)
def _prune(x: Array, scores: Array, candidates: Array | None, protect: Array | None,
           size: int) -> tuple[Array, Array]:
    B, S = scores.shape
    fixed = jnp.zeros((B, S), bool)
    if candidates is not None:
        fixed = jnp.logical_not(_full(candidates, B, S))
    if protect is not None:
        fixed = fixed | _full(protect, B, S)
    order = _lexicographic_order(fixed, scores.astype(accumulation_dtype(scores.dtype)))
    indices = jnp.sort(order[:, :size], axis=-1).astype(jnp.int32)
    return _gather_tokens(x, indices), indices


def _count_fixed(candidates, protect, B: int, S: int, num_fixed: int | None) -> int:
    """The per-row number of tokens kept whatever their score, from concrete masks, checked
    against ``num_fixed`` when given."""
    if num_fixed is not None:
        num_fixed = check_int("num_fixed", num_fixed, minimum=0)
        if num_fixed >= S:
            raise ValueError(f"num_fixed: expected 0 <= num_fixed < S={S}, got {num_fixed}")
    raws = [_concrete(m) for m in (candidates, protect)]
    if any(m is not None and raw is None for m, raw in zip((candidates, protect), raws,
                                                           strict=True)):
        if num_fixed is None:
            raise ValueError("num_fixed: required when candidates or protect are traced "
                             "(under jit); pass the number of tokens kept whatever their "
                             "score, the same in every row")
        return num_fixed
    cand, prot = raws
    fixed = np.zeros((B, S), bool)
    if cand is not None:
        fixed |= ~np.broadcast_to(cand, (B, S))
    if prot is not None:
        fixed |= np.broadcast_to(prot, (B, S))
    counts = fixed.sum(-1)
    if (counts != counts[0]).any():
        raise ValueError(f"candidates: expected the same number of non-candidate (or "
                         f"protected) tokens in every row, got {counts.tolist()}")
    if num_fixed is not None and num_fixed != counts[0]:
        raise ValueError(f"num_fixed: the masks keep {int(counts[0])} tokens per row whatever "
                         f"their score, got num_fixed={num_fixed}")
    return int(counts[0])


def random_tokens(rng, num_tokens: int, r: int, *, batch_size: int = 1) -> Array:
    """r distinct tokens of S drawn uniformly at random per row, in position order: the
    baseline selection to set attention-ranked selection beside.

    Args:
        rng: a JAX key.
        num_tokens: S, the tokens to choose from (e.g. the number of candidates; map the
            result through the candidates' positions).
        r: static int, 1 <= r <= S.
        batch_size: B, independent draws.

    Returns:
        int32 [B, r], ascending and distinct in each row.

    Raises:
        ValueError: S or B below 1, r outside [1, S].
        TypeError: non-integer sizes.

    Example:
        >>> import jax
        >>> random_tokens(jax.random.key(0), 10, 3, batch_size=2).shape
        (2, 3)

    References:
        P66 FasterVLM (random pruning as the baseline of attention-based pruning).
    """
    S = check_int("num_tokens", num_tokens)
    B = check_int("batch_size", batch_size)
    return _random_tokens(rng, B, S, _check_count("r", r, S, "S"))


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def _random_tokens(rng: Array, B: int, S: int, r: int) -> Array:
    draws = jax.random.uniform(rng, (B, S))
    return jnp.sort(jnp.argsort(draws, axis=-1)[:, :r], axis=-1).astype(jnp.int32)


# --------------------------------------------------------------------------------------------
# P40 LSceneLLM: the focus regions of an attention map


class DenseRegions(NamedTuple):
    """The regions :func:`select_dense_regions` picks, most-attended first.

    - regions: int32 [B, k], region ids (row-major over the grid of windows).
    - tokens: int32 [B, k, prod(region)], the flat positions of each region's tokens
      (row-major inside the window).
    - corners: int32 [B, k, len(grid)], the grid coordinates of each region's first token.
    - scores: [B, k], the attention summed over each region.
    """

    regions: Array
    tokens: Array
    corners: Array
    scores: Array


def select_dense_regions(weights_map, grid, k: int, *, region=1,
                         query_positions=None) -> DenseRegions:
    """The k areas of a visual token grid that the instruction attends to most, for a
    magnifier to fetch finer tokens there.

    LSceneLLM's dense token selector "examines the attention map of LLM to identify visual
    preferences for the instruction input. It then magnifies fine-grained details of the
    focusing area". The library's reading of that sentence: each visual token scores the
    attention it receives (mean over heads and the chosen query rows, as
    :func:`rank_tokens`); the grid is cut into non-overlapping windows of ``region`` tokens
    per axis; the k windows with the largest summed attention are the focus areas (region=1:
    the top-k tokens). The magnifier itself (fetching dense tokens of the areas, e.g. at
    ``corners * f`` in a grid f times finer) belongs to the model.

    Args:
        weights_map: floating [B, S] attention per visual token, or [B, N, P, S] attention
            rows (averaged over heads and rows), with S = prod(grid).
        grid: (h, w) of a row-major 2-D grid, or S (or (S,)) for a 1-D sequence.
        k: static int, 1 <= k <= R, R the number of windows.
        region: window size, an int for every axis or one per axis, dividing the grid.
        query_positions: for [B, N, P, S] maps, the rows to average (None: all).

    Returns:
        :class:`DenseRegions` (regions, tokens, corners, scores), most-attended first, ties
        to the earlier region.

    Raises:
        ValueError: wrong ranks, a grid that does not hold S tokens, a region that does not
            divide the grid, k outside [1, R].
        TypeError: a non-floating map, non-integer sizes.

    Example:
        >>> import jax.numpy as jnp
        >>> att = jnp.zeros((1, 16)).at[0, jnp.array([10, 11, 14])].set(1.0)   # 4 x 4 grid
        >>> out = select_dense_regions(att, (4, 4), 1, region=2)
        >>> out.regions.tolist(), out.corners.tolist(), out.tokens.tolist()
        ([[3]], [[[2, 2]]], [[[10, 11, 14, 15]]])

    References:
        P40 LSceneLLM, "LSceneLLM: Enhancing Large 3D Scene Understanding Using Adaptive
        Visual Preferences" (dense token selector, scene magnifier).
    """
    weights_map = jnp.asarray(weights_map)
    check_rank("weights_map", weights_map, (2, 4), "[B, S] or [B, N, P, S]")
    check_floating("weights_map", weights_map)
    if weights_map.ndim == 4:
        weights_map = _check_weights(weights_map)
        rows = _check_rows(query_positions, weights_map.shape[2])
        scores = _rank_tokens(weights_map, rows, None)
    elif query_positions is not None:
        raise ValueError("query_positions: only for [B, N, P, S] maps, got weights_map "
                         f"{weights_map.shape}")
    else:
        scores = weights_map
    S = scores.shape[1]
    grid = _check_grid(grid, S, (1, 2))
    windows = check_per_axis("region", region, len(grid))
    if any(g % w for g, w in zip(grid, windows, strict=True)):
        raise ValueError(f"region: expected window sizes dividing the grid {grid}, "
                         f"got {windows}")
    k = _check_count("k", k, math.prod(grid) // math.prod(windows), "R")
    return _select_dense_regions(scores, grid, windows, k)


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def _select_dense_regions(scores: Array, grid: tuple[int, ...], windows: tuple[int, ...],
                          k: int) -> DenseRegions:
    B = scores.shape[0]
    h, w = (1, *grid) if len(grid) == 1 else grid
    rh, rw = (1, *windows) if len(grid) == 1 else windows
    gh, gw = h // rh, w // rw
    scores = scores.astype(accumulation_dtype(scores.dtype))
    sums = scores.reshape(B, gh, rh, gw, rw).sum(axis=(2, 4)).reshape(B, gh * gw)
    regions = jnp.argsort(-sums, axis=-1, stable=True)[:, :k].astype(jnp.int32)
    row, col = (regions // gw) * rh, (regions % gw) * rw
    inner = (jnp.arange(rh)[:, None] * w + jnp.arange(rw)[None, :]).reshape(-1)
    tokens = (row * w + col)[..., None] + inner.astype(jnp.int32)
    corners = jnp.stack([row, col] if len(grid) == 2 else [col], axis=-1)
    return DenseRegions(regions, tokens, corners, jnp.take_along_axis(sums, regions, axis=-1))


def _check_grid(grid, S: int, num_axes: Sequence[int]) -> tuple[int, ...]:
    dims = tuple(grid) if isinstance(grid, Sequence) else (grid,)
    if len(dims) not in num_axes:
        raise ValueError(f"grid: expected {' or '.join(str(n) for n in num_axes)} sizes, "
                         f"got {grid!r}")
    dims = tuple(check_int("grid", d) for d in dims)
    if math.prod(dims) != S:
        raise ValueError(f"grid: expected sizes whose product is S={S}, got {dims}")
    return dims


# --------------------------------------------------------------------------------------------
# P42 DyVTE: let a modality's tokens exit after a layer


class ExitGate(NamedTuple):
    """Parameters of :func:`exit_gate`: a two-layer MLP d -> hidden -> 1."""

    w1: Array  # [d, hidden]
    b1: Array  # [hidden]
    w2: Array  # [hidden]
    b2: Array  # []


def init_exit_gate(rng, d_model: int, hidden: int, *, dtype=jnp.float32) -> ExitGate:
    """Initial :class:`ExitGate` parameters: weights N(0, 1 / fan_in), biases 0 (an untrained
    gate says about 0.5).

    Args:
        rng: a JAX key.
        d_model: d, the width of the token states.
        hidden: the gate's hidden width.
        dtype: a floating dtype.

    Returns:
        ExitGate(w1 [d, hidden], b1 [hidden], w2 [hidden], b2 []).

    Raises:
        ValueError: sizes below 1.
        TypeError: non-integer sizes.

    Example:
        >>> import jax
        >>> [p.shape for p in init_exit_gate(jax.random.key(0), 8, 4)]
        [(8, 4), (4,), (4,), ()]

    References:
        P42 DyVTE (the gate's architecture is the library's reading, see :func:`exit_gate`).
    """
    d = check_int("d_model", d_model)
    hidden = check_int("hidden", hidden)
    k1, k2 = jax.random.split(rng)
    return ExitGate(jax.random.normal(k1, (d, hidden), dtype) / math.sqrt(d),
                    jnp.zeros((hidden,), dtype),
                    jax.random.normal(k2, (hidden,), dtype) / math.sqrt(hidden),
                    jnp.zeros((), dtype))


def exit_gate(params, text_state, *, text_mask=None) -> Array:
    """Probability that the visual tokens can exit after this layer, from the text tokens'
    states: sigmoid(w2 . relu(w1^T m + b1) + b2), m the mean state of the text tokens.

    DyVTE "uses lightweight hyper-networks to perceive the text token status and decide the
    removal of all visual tokens after a certain layer". The architecture here (mean-pooled
    text states, one ReLU hidden layer, a sigmoid) is the library's reading of that
    sentence, not the paper's exact network. A row with no text token pools to zeros.

    Args:
        params: :class:`ExitGate` or a tuple (w1 [d, h], b1 [h], w2 [h], b2 []), floating.
        text_state: floating [B, S, d], the states after the layer.
        text_mask: None (every token) or bool [B, S] or [S]: the text tokens.

    Returns:
        [B], probabilities in (0, 1); differentiable in params and states. Exit where it is
        above a threshold (e.g. 0.5), then :func:`drop_modality`.

    Raises:
        ValueError: wrong ranks or shapes, params not four arrays.
        TypeError: non-floating params or states, a non-boolean mask.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> gate = init_exit_gate(jax.random.key(0), 8, 4)._replace(w2=jnp.zeros(4))
        >>> exit_gate(gate, jnp.ones((2, 5, 8))).tolist()
        [0.5, 0.5]

    References:
        P42 DyVTE, "Accelerating Multimodal Large Language Models via Dynamic Visual-Token
        Exit and the Empirical Findings".
    """
    if not isinstance(params, Sequence) or len(params) != 4:
        raise ValueError(f"params: expected (w1, b1, w2, b2), got {type(params).__name__}")
    w1, b1, w2, b2 = (jnp.asarray(p) for p in params)
    for name, p, rank, layout in (("w1", w1, 2, "[d, hidden]"), ("b1", b1, 1, "[hidden]"),
                                  ("w2", w2, 1, "[hidden]"), ("b2", b2, 0, "[]")):
        check_rank(f"params.{name}", p, (rank,), layout)
        check_floating(f"params.{name}", p)
    text_state = jnp.asarray(text_state)
    check_rank("text_state", text_state, (3,), "[B, S, d]")
    check_floating("text_state", text_state)
    B, S, d = text_state.shape
    hidden = w1.shape[1]
    if w1.shape[0] != d or b1.shape != (hidden,) or w2.shape != (hidden,):
        raise ValueError(f"params: expected w1 [d={d}, hidden], b1 [hidden], w2 [hidden] to "
                         f"match text_state {text_state.shape}, got {w1.shape}, {b1.shape}, "
                         f"{w2.shape}")
    return _exit_gate(w1, b1, w2, b2, text_state, _token_mask("text_mask", text_mask, B, S))


@jax.jit
def _exit_gate(w1: Array, b1: Array, w2: Array, b2: Array, text_state: Array,
               text_mask: Array | None) -> Array:
    B, S, _ = text_state.shape
    dtype = accumulation_dtype(jnp.result_type(text_state.dtype, w1.dtype))
    states = text_state.astype(dtype)
    if text_mask is None:
        pooled = states.mean(axis=1)
    else:
        m = _full(text_mask, B, S).astype(dtype)
        pooled = jnp.einsum("bs,bsd->bd", m, states) / jnp.maximum(m.sum(1), 1)[:, None]
    h = jax.nn.relu(pooled @ w1.astype(dtype) + b1.astype(dtype))
    return jax.nn.sigmoid(h @ w2.astype(dtype) + b2.astype(dtype))


def attention_exit(weights, visual, threshold, *, query_positions=None) -> Array:
    """Training-free exit: the visual tokens exit when the text queries put less than
    ``threshold`` of their attention on them (mass summed over the visual keys, mean over
    heads and rows).

    DyVTE observes that "visual tokens will stop contributing to reasoning when the text
    tokens receive enough image information"; the attention mass the text puts on the
    image is a measured proxy of that state which needs no training.

    Args:
        weights: floating [B, N, P, S], attention rows of the text queries (e.g.
            ``jattn.attention_weights(..., query_positions=text_positions)``).
        visual: bool [B, S] or [S], the visual keys.
        threshold: a number or floating [B]: exit below it.
        query_positions: None (all P rows) or ints in [0, P): the text rows among them.

    Returns:
        bool [B], True where the visual tokens exit.

    Raises:
        ValueError: wrong ranks or shapes, a row index outside [0, P) (when concrete).
        TypeError: non-floating weights, a non-boolean ``visual``.

    Example:
        >>> import jax.numpy as jnp
        >>> w = jnp.array([[[[0.9, 0.05, 0.05]]], [[[0.2, 0.4, 0.4]]]])   # [2, 1, 1, 3]
        >>> attention_exit(w, jnp.array([False, True, True]), 0.25).tolist()
        [True, False]

    References:
        P42 DyVTE (visual tokens stop contributing once the text has read the image).
    """
    weights = _check_weights(weights)
    B, _, P, S = weights.shape
    if visual is None:
        raise ValueError("visual: expected a bool [B, S] or [S] mask, got None")
    threshold = jnp.asarray(threshold)
    if threshold.shape not in ((), (B,)):
        raise ValueError(f"threshold: expected a number or shape [B={B}], got "
                         f"{threshold.shape}")
    return _attention_exit(weights, _check_rows(query_positions, P),
                           _token_mask("visual", visual, B, S), threshold)


@jax.jit
def _attention_exit(weights: Array, rows: Array | None, visual: Array,
                    threshold: Array) -> Array:
    weights = _select_rows(weights, rows)
    B, N, P, S = weights.shape
    mass = jnp.einsum("bnps,bs->b", weights, _full(visual, B, S).astype(weights.dtype))
    return mass / (N * P) < threshold.astype(weights.dtype)


def drop_modality(x, modality, exit, *, key_mask=None) -> Array:
    """The key mask that drops a modality's tokens in the rows where ``exit`` is True.

    Shapes are static under jit, so the tokens are not removed: later layers pass the mask
    to attention (``mask=keep[:, None, None, :]``) and the exited tokens are no longer read.
    :func:`compact` gathers the kept tokens into a shorter static length when that pays.

    Args:
        x: [B, S, ...], the token states (their shape only).
        modality: bool [B, S] or [S], the modality's tokens (e.g. the visual ones).
        exit: bool [B] (or a scalar for every row): whether the modality exits.
        key_mask: None or bool [B, S] or [S], the mask so far (kept by ANDing).

    Returns:
        bool [B, S]: False for the modality's tokens in exiting rows (and where
        ``key_mask`` is False).

    Raises:
        ValueError: wrong ranks or shapes.
        TypeError: non-boolean masks.

    Example:
        >>> import jax.numpy as jnp
        >>> visual = jnp.array([True, True, False])
        >>> drop_modality(jnp.zeros((2, 3, 4)), visual, jnp.array([True, False])).tolist()
        [[False, False, True], [True, True, True]]

    References:
        P42 DyVTE (remove all visual tokens after the layer the gate chooses).
    """
    x = _check_tokens("x", x)
    B, S = x.shape[:2]
    if modality is None:
        raise ValueError("modality: expected a bool [B, S] or [S] mask, got None")
    modality = _token_mask("modality", modality, B, S)
    exit = jnp.asarray(exit)
    check_bool("exit", exit)
    if exit.shape not in ((), (B,)):
        raise ValueError(f"exit: expected shape [B={B}] or [], got {exit.shape}")
    return _drop_modality(modality, exit, _token_mask("key_mask", key_mask, B, S), B, S)


@functools.partial(jax.jit, static_argnums=(3, 4))
def _drop_modality(modality: Array, exit: Array, key_mask: Array | None, B: int,
                   S: int) -> Array:
    keep = jnp.logical_not(_full(modality, B, S) & jnp.broadcast_to(exit, (B,))[:, None])
    return keep if key_mask is None else keep & _full(key_mask, B, S)


class Compacted(NamedTuple):
    """What :func:`compact` returns: x [B, size, ...] (zeros in invalid slots), valid bool
    [B, size], indices int32 [B, size] (the source positions; those of invalid slots are
    dropped tokens)."""

    x: Array
    valid: Array
    indices: Array


def compact(x, keep_mask, size: int) -> Compacted:
    """Gather the kept tokens of each row to the front, in their order, into a static
    length ``size``, with a validity mask.

    Args:
        x: [B, S, ...].
        keep_mask: bool [B, S] or [S], e.g. from :func:`drop_modality`.
        size: static int, 1 <= size <= S, at least the number of kept tokens of every row
            (checked when concrete; under jit a row with more loses its last kept tokens).

    Returns:
        :class:`Compacted` (x [B, size, ...], valid [B, size], indices [B, size]).

    Raises:
        ValueError: wrong ranks or shapes, size outside [1, S] or below a row's count.
        TypeError: a non-boolean mask, a non-integer size.

    Example:
        >>> import jax.numpy as jnp
        >>> out = compact(jnp.arange(1.0, 5.0)[None], jnp.array([False, True, False, True]), 3)
        >>> out.x.tolist(), out.valid.tolist()
        ([[2.0, 4.0, 0.0]], [[True, True, False]])

    References:
        P42 DyVTE (the exited tokens leave the sequence).
    """
    x = _check_tokens("x", x)
    B, S = x.shape[:2]
    if keep_mask is None:
        raise ValueError("keep_mask: expected a bool [B, S] or [S] mask, got None")
    keep = _token_mask("keep_mask", keep_mask, B, S)
    size = _check_count("size", size, S, "S")
    raw = _concrete(keep_mask)
    if raw is not None:
        most = int(np.broadcast_to(raw, (B, S)).sum(-1).max())
        if most > size:
            raise ValueError(f"size: expected at least the number of kept tokens of every row "
                             f"({most}), got {size}")
    return _compact(x, keep, size)


@functools.partial(jax.jit, static_argnums=2)
def _compact(x: Array, keep: Array, size: int) -> Compacted:
    B, S = x.shape[:2]
    keep = _full(keep, B, S)
    dropped = jnp.logical_not(keep).astype(jnp.int8)
    indices = jnp.argsort(dropped, axis=-1, stable=True)[:, :size].astype(jnp.int32)
    valid = jnp.arange(size)[None, :] < keep.sum(-1)[:, None]
    gathered = _gather_tokens(x, indices)
    gathered = jnp.where(valid.reshape(B, size, *(1,) * (x.ndim - 2)), gathered,
                         jnp.zeros((), x.dtype))
    return Compacted(gathered, valid, indices)


# --------------------------------------------------------------------------------------------
# P52 READ: similarity as points


def _unit(v: Array, dtype, eps: float) -> Array:
    """v / max(|v|, eps) along the last axis, in ``dtype``."""
    v = v.astype(dtype)
    return v * jax.lax.rsqrt(jnp.maximum((v * v).sum(-1, keepdims=True), eps * eps))


def distinct_token_scores(x, *, mask=None, eps: float = 1e-6) -> Array:
    r"""How little each token resembles the others: the negated largest cosine similarity
    to any other valid token of its example, TextMonkey's measure of a significant (not
    redundant) token.

    .. math::
        d_t = -\max_{s \ne t,\ s\ \mathrm{valid}} \cos(x_t, x_s)

    Keep the most distinct ones with :func:`keep_top_tokens` (``jattn.nn.TokenResampler``
    then lets them read every token by cross attention).

    Args:
        x: floating [B, S, d].
        mask: bool [B, S] or [S], True for valid tokens (None: all); invalid tokens score
            -inf and are never anyone's neighbour.
        eps: vector norms are clamped to at least eps (a zero vector has similarity 0).

    Returns:
        [B, S] float32 (float64 for float64 inputs), in [-1, 1]; a valid token with no
        other valid token scores 1.

    Raises:
        ValueError: wrong ranks or shapes.
        TypeError: non-floating x, a non-boolean mask.

    Example:
        >>> import jax.numpy as jnp
        >>> x = jnp.array([[[1.0, 0.0], [2.0, 0.1], [0.0, 1.0]]])
        >>> keep_top_tokens(distinct_token_scores(x), 2).tolist()   # one of the twins goes
        [[0, 2]]

    References:
        P64 TextMonkey, "TextMonkey: An OCR-Free Large Multimodal Model for Understanding
        Document" (similarity-based filtering of redundant image tokens; the kept ones are
        the resampler's queries).
    """
    x = jnp.asarray(x)
    check_rank("x", x, (3,), "[B, S, d]")
    check_floating("x", x)
    B, S, _ = x.shape
    mask = _token_mask("mask", mask, B, S)
    if not eps > 0:
        raise ValueError(f"eps: expected a positive number, got {eps!r}")
    return _distinct_token_scores(x, mask, float(eps))


@functools.partial(jax.jit, static_argnums=2)
def _distinct_token_scores(x: Array, mask: Array | None, eps: float) -> Array:
    unit = _unit(x, accumulation_dtype(x.dtype), eps)
    sim = jnp.einsum("bsd,btd->bst", unit, unit)
    S = x.shape[1]
    neighbour = ~jnp.eye(S, dtype=bool)[None]
    if mask is not None:
        valid = _full(mask, x.shape[0], S)
        neighbour = neighbour & valid[:, None, :]
    closest = jnp.where(neighbour, sim, -jnp.inf).max(-1)
    score = jnp.where(jnp.isfinite(closest), -closest, 1.0)
    return score if mask is None else jnp.where(valid, score, -jnp.inf)


def similarity_map(query_token, image_tokens, grid, *, normalize: bool = False,
                   eps: float = 1e-6) -> Array:
    """Cosine similarity between one query token (e.g. READ's <SEG>) and every image token,
    laid out on the image grid.

    Args:
        query_token: floating [B, d].
        image_tokens: floating [B, h * w, d] (row-major).
        grid: (h, w).
        normalize: min-max scale each example's map to [0, 1] (a constant map gives zeros).
        eps: vector norms are clamped to at least eps (a zero vector has similarity 0).

    Returns:
        [B, h, w] float32 (float64 for float64 inputs); differentiable.

    Raises:
        ValueError: wrong ranks or shapes, a grid that does not hold h * w tokens.
        TypeError: non-floating inputs.

    Example:
        >>> import jax.numpy as jnp
        >>> img = jnp.array([[[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, 3.0]]])
        >>> similarity_map(jnp.array([[2.0, 0.0]]), img, (2, 2)).tolist()
        [[[1.0, 0.0], [-1.0, 0.0]]]
        >>> similarity_map(jnp.array([[2.0, 0.0]]), img, (2, 2), normalize=True).tolist()
        [[[1.0, 0.5], [0.0, 0.5]]]

    References:
        P52 READ, "Reasoning to Attend: Try to Understand How <SEG> Token Works" (similarity
        maps between the <SEG> token and the image token embeddings).
    """
    query_token, image_tokens = jnp.asarray(query_token), jnp.asarray(image_tokens)
    check_rank("query_token", query_token, (2,), "[B, d]")
    check_rank("image_tokens", image_tokens, (3,), "[B, h * w, d]")
    check_floating("query_token", query_token)
    check_floating("image_tokens", image_tokens)
    B, S, d = image_tokens.shape
    if query_token.shape != (B, d):
        raise ValueError(f"query_token: expected [B={B}, d={d}] to match image_tokens "
                         f"{image_tokens.shape}, got {query_token.shape}")
    grid = _check_grid(grid, S, (2,))
    if not eps > 0:
        raise ValueError(f"eps: expected a positive number, got {eps!r}")
    return _similarity_map(query_token, image_tokens, grid, bool(normalize), float(eps))


@functools.partial(jax.jit, static_argnums=(2, 3, 4))
def _similarity_map(query_token: Array, image_tokens: Array, grid: tuple[int, int],
                    normalize: bool, eps: float) -> Array:
    dtype = accumulation_dtype(jnp.result_type(query_token.dtype, image_tokens.dtype))
    sim = jnp.einsum("bd,bsd->bs", _unit(query_token, dtype, eps),
                     _unit(image_tokens, dtype, eps))
    if normalize:
        low, high = sim.min(-1, keepdims=True), sim.max(-1, keepdims=True)
        spread = high - low
        sim = jnp.where(spread > 0, (sim - low) / jnp.where(spread > 0, spread, 1), 0)
    return sim.reshape(sim.shape[0], *grid)


def peak_points(sim_map, k: int, *, min_distance: int = 1) -> tuple[Array, Array]:
    """The k highest local maxima of each map, as (row, col) points: non-maximum
    suppression in a (2 m + 1) x (2 m + 1) window, m = ``min_distance``.

    A point is a peak when no point of its window (clipped at the border) is higher and no
    earlier point (row-major) of its window is equal, so a plateau gives one peak, its
    first point; -inf and NaN points are never peaks. Peaks come highest first (ties to the
    earlier point). When a map has fewer than k peaks the rest are padded with the highest
    remaining points, in the same order, so the result always has k distinct points.

    Args:
        sim_map: floating [B, h, w], e.g. from :func:`similarity_map`.
        k: static int, 1 <= k <= h * w.
        min_distance: m >= 0 (0: every point is a peak, a plain top-k).

    Returns:
        (points int32 [B, k, 2] as (row, col), values [B, k] in the map's dtype, which
        are differentiable in the map).

    Raises:
        ValueError: a rank other than 3, k outside [1, h * w], m < 0.
        TypeError: a non-floating map, non-integer k or m.

    Example:
        >>> import jax.numpy as jnp
        >>> m = jnp.array([[[0.875, 0.75, 0.125, 0.0],
        ...                 [0.125, 0.25, 0.5, 0.625]]])
        >>> points, values = peak_points(m, 3)
        >>> points.tolist(), values.tolist()                    # 0.75 is padding
        ([[[0, 0], [1, 3], [0, 1]]], [[0.875, 0.625, 0.75]])

    References:
        P52 READ, "Reasoning to Attend: Try to Understand How <SEG> Token Works" (Similarity
        as Points: highly activated points of the similarity map guide where to attend).
    """
    sim_map = jnp.asarray(sim_map)
    check_rank("sim_map", sim_map, (3,), "[B, h, w]")
    check_floating("sim_map", sim_map)
    _, h, w = sim_map.shape
    k = _check_count("k", k, h * w, "h*w")
    m = check_int("min_distance", min_distance, minimum=0)
    return _peak_points(sim_map, k, m)


@functools.partial(jax.jit, static_argnums=(1, 2))
def _peak_points(sim_map: Array, k: int, m: int) -> tuple[Array, Array]:
    B, h, w = sim_map.shape
    padded = jnp.pad(sim_map, ((0, 0), (m, m), (m, m)), constant_values=-jnp.inf)
    peak = sim_map > -jnp.inf
    for di in range(-m, m + 1):
        for dj in range(-m, m + 1):
            if di == dj == 0:
                continue
            other = padded[:, m + di:m + di + h, m + dj:m + dj + w]
            earlier = di < 0 or (di == 0 and dj < 0)
            peak = peak & (sim_map > other if earlier else sim_map >= other)
    flat = sim_map.reshape(B, h * w)
    order = _lexicographic_order(peak.reshape(B, h * w), flat)[:, :k]
    points = jnp.stack([order // w, order % w], axis=-1).astype(jnp.int32)
    return points, jnp.take_along_axis(flat, order, axis=-1)

