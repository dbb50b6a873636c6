"""Losses on attention maps: cross-attention map losses for text-to-image models (P03
DiffCloth, P57 DisenDiff) and adversarial perturbation of the attention scores as a training
regulariser (P78, Attention AT and iAT).

**Token maps.** In text-to-image cross attention the queries are the image positions
(T = h * w) and the keys the text tokens (S). The map of text token s is column s of the
weights [B, N, T, S] over all image queries, averaged over the heads: :func:`token_maps`
gives [B, C, T] (or [B, C, h, w]) for C chosen tokens. Only those columns are needed, and
:func:`jattn.attention_weights` forms exactly them from the forward pass's log-sum-exp
(``key_positions=tokens``), at O(T x C) memory instead of the [T, S] map of every head, with
gradients that flow back into the queries and keys.

**Map losses** (each a differentiable scalar, the mean over the batch and the pairs or
concepts; maps are non-negative, [B, C, T] or [B, C, h, w]; p is a map normalised to sum 1
over its positions):

* :func:`bundle_loss` (DiffCloth's semantic-bundled attention): an attribute adjective's
  map should have the spatial structure of its part noun's map: 1 - cos(p_adj, p_noun).
* :func:`separate_loss` (DisenDiff, "separated"): two concepts' maps should not overlap:
  sum_t min(p_t, q_t), the mass they share.
* :func:`strengthen_loss` (DisenDiff, "strengthened"): a concept's map should be peaked:
  1 - max_t p_t.
* :func:`suppress_loss` (DisenDiff, "suppress the attention activation of different
  classes"): the mean of the unnormalised map, optionally inside a region.

**Adversarial training on attention** (P78): a model run with a perturbation r added to its
attention scores (the logits before the softmax; in jattn the ``logit_bias`` of
:class:`jattn.analysis.intervene.Edits`, or the ``bias`` of
:func:`jattn.dot_product_attention`) is trained on loss(0) + weight * loss(r_adv), where
r_adv is the worst perturbation of norm epsilon to first order:
r_adv = epsilon g / ||g||_2, g = d loss / d r at r = 0 (one gradient, not differentiated
through). :func:`adversarial_logit_bias` normalises per example (AT),
:func:`interpretable_adversarial_logit_bias` per attention row (iAT, the library's reading),
and :func:`attention_at_loss` forms the training loss.

Example:
    >>> import jax, jax.numpy as jnp, jattn
    >>> kq, kk = jax.random.split(jax.random.key(0))
    >>> q = jax.random.normal(kq, (1, 16, 2, 8))           # a 4 x 4 image: T = 16, 2 heads
    >>> k = jax.random.normal(kk, (1, 5, 2, 8))            # 5 text tokens
    >>> out, lse = jattn.dot_product_attention(q, k, k, return_lse=True)
    >>> columns = jattn.attention_weights(q, k, lse=lse, key_positions=[1, 3])
    >>> columns.shape                                      # [B, N, T, C]: only two columns
    (1, 2, 16, 2)
    >>> maps = token_maps(columns, spatial=(4, 4))          # every column given: tokens=None
    >>> full = jattn.attention_weights(q, k)               # the whole [B, N, T, S] map
    >>> bool(jnp.allclose(maps, token_maps(full, [1, 3], spatial=(4, 4)), atol=1e-6))
    True
    >>> maps.shape
    (1, 2, 4, 4)
    >>> float(separate_loss(maps[:, :1], maps[:, 1:])) < 1.0
    True

References:
    P03 DiffCloth, "DiffCloth: Diffusion Based Garment Synthesis and Manipulation via
    Structural Cross-modal Semantic Alignment" (semantic-bundled cross-attention);
    P57 DisenDiff, "Attention Calibration for Disentangled Text-to-Image Personalization";
    P78 Kitada & Iyatomi, "Attention Meets Perturbations: Robust and Interpretable Attention
    with Adversarial Training".
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jattn.core.shapes import (
    Array,
    DTypeError,
    accumulation_dtype,
    check_floating,
    check_int,
    check_integer,
    check_rank,
    check_values_in_range,
    is_concrete,
)

HEAD_REDUCTIONS = ("mean", "max")
AT_FORMS = ("at", "iat")


# --------------------------------------------------------------------------------------------
# Token maps and map losses (P03, P57)


def token_maps(weights: Array, tokens=None, *, head_reduction: str = "mean",
               spatial: Sequence[int] | None = None) -> Array:
    """The cross-attention maps of chosen text tokens: columns of the weights over all image
    queries, reduced over the heads.

    Args:
        weights: [B, N, T, S] attention weights (queries: T image positions, keys: S text
            tokens), e.g. from :func:`jattn.attention_weights`; pass the columns it gave for
            ``key_positions=tokens`` with ``tokens=None``.
        tokens: None (every column), ints [C] (the same tokens for every example) or [B, C]
            (per example) in [0, S).
        head_reduction: "mean" (the usual token map) or "max" over the heads.
        spatial: None, or (h, w) with h * w = T: return the maps as images.

    Returns:
        [B, C, T] (or [B, C, h, w]) float32 (float64 for float64 weights).

    Raises:
        ValueError: wrong ranks, tokens out of range (checked when concrete) or of another
            batch size, an empty token list, an unknown head reduction, a spatial shape that
            does not hold T.
        DTypeError: non-floating weights, non-integer tokens.

    Example:
        >>> import jax.numpy as jnp
        >>> w = jnp.zeros((1, 2, 4, 3)).at[:, 0, :, 2].set(1.0)    # head 0: all on token 2
        >>> token_maps(w, [2], spatial=(2, 2)).tolist()             # mean over 2 heads
        [[[[0.5, 0.5], [0.5, 0.5]]]]

    References:
        P03 DiffCloth, P57 DisenDiff (cross-attention maps of text tokens; module
        docstring).
    """
    weights = jnp.asarray(weights)
    check_rank("weights", weights, (4,), "[B, N, T, S]")
    check_floating("weights", weights)
    B, _, T, S = shape = weights.shape
    if head_reduction not in HEAD_REDUCTIONS:
        raise ValueError(f"head_reduction: expected one of {HEAD_REDUCTIONS}, "
                         f"got {head_reduction!r}")
    weights = weights.astype(accumulation_dtype(weights.dtype))
    if tokens is not None:
        tokens = jnp.asarray(tokens)
        if tokens.size == 0:
            raise ValueError(f"tokens: expected at least one token, got shape {tokens.shape}")
        check_rank("tokens", tokens, (1, 2), "[C] or [B, C]")
        check_integer("tokens", tokens)
        check_values_in_range("tokens", tokens, 0, S - 1)
        if tokens.ndim == 1:
            weights = jnp.take(weights, tokens, axis=3)
        else:
            if tokens.shape[0] != B:
                raise ValueError(f"tokens: expected [B={B}, C] to match weights "
                                 f"{shape}, got {tokens.shape}")
            weights = jnp.take_along_axis(weights, tokens[:, None, None, :], axis=3)
    maps = weights.mean(1) if head_reduction == "mean" else weights.max(1)
    maps = jnp.swapaxes(maps, 1, 2)  # [B, C, T]
    if spatial is not None:
        spatial = tuple(check_int("spatial", s) for s in spatial)
        if math.prod(spatial) != T:
            raise ValueError(f"spatial: expected sizes whose product is T={T} (weights "
                             f"{shape}), got {spatial}")
        maps = maps.reshape(*maps.shape[:2], *spatial)
    return maps


def _flat_maps(name: str, maps: Array) -> Array:
    """Maps [B, C, T] or [B, C, h, w] as [B, C, P] in the accumulation dtype."""
    maps = jnp.asarray(maps)
    check_rank(name, maps, (3, 4), "[B, C, T] or [B, C, h, w]")
    check_floating(name, maps)
    if maps.size == 0:
        raise ValueError(f"{name}: expected non-empty maps, got shape {maps.shape}")
    return maps.reshape(*maps.shape[:2], -1).astype(accumulation_dtype(maps.dtype))


def _map_pair(maps_a: Array, maps_b: Array) -> tuple[Array, Array]:
    a = _flat_maps("maps_a", maps_a)
    b = _flat_maps("maps_b", maps_b)
    if jnp.shape(maps_a) != jnp.shape(maps_b):
        raise ValueError(f"maps_b: expected the shape of maps_a {jnp.shape(maps_a)} (one map "
                         f"per pair), got {jnp.shape(maps_b)}")
    return a, b


def _normalise(maps: Array) -> Array:
    """Each map divided by its sum over the positions; an all-zero map stays zero."""
    total = maps.sum(-1, keepdims=True)
    return maps / jnp.where(total > 0, total, 1)


def bundle_loss(maps_a: Array, maps_b: Array) -> Array:
    r"""DiffCloth's semantic-bundled attention: each map of ``maps_a`` (an attribute
    adjective) should have the spatial structure of the same pair's map in ``maps_b`` (its
    part noun).

    .. math::
        L = \mathrm{mean}_{b, c}\Big(1 - \frac{\langle p_{bc}, q_{bc}\rangle}
        {\lVert p_{bc}\rVert_2 \lVert q_{bc}\rVert_2}\Big),
        \qquad p = a / \textstyle\sum_t a_t,\; q = b / \textstyle\sum_t b_t

    The library reads "preserve the spatial structure similarities" as 1 - cosine
    similarity: it compares where the two tokens attend, not how much attention each
    receives (an adjective usually draws less than its noun), is smooth wherever both maps
    are non-zero, and lies in [0, 1] for non-negative maps (0 for maps equal up to scale,
    1 for disjoint ones). Normalising to sum 1 first does not change the cosine; it only keeps
    the norms well scaled. An L1 (total variation) distance has no gradient where the maps
    agree, and an L2 distance of the normalised maps depends on how peaked they are. A pair
    with an all-zero map counts as dissimilar (cosine 0) with zero gradient.

    Args:
        maps_a, maps_b: [B, C, T] or [B, C, h, w], one shape: C pairs of non-negative maps
            (e.g. :func:`token_maps` of the adjectives and of their nouns).

    Returns:
        A scalar, float32 (float64 for float64 maps).

    Raises:
        ValueError: wrong ranks, different shapes, empty maps.
        DTypeError: non-floating maps.

    Example:
        >>> import jax.numpy as jnp
        >>> noun = jnp.array([[[0.0, 2.0, 2.0, 0.0]]])
        >>> float(bundle_loss(noun / 4, noun)), float(bundle_loss(1 - noun / 2, noun))
        (0.0, 1.0)

    References:
        P03 DiffCloth, "DiffCloth: Diffusion Based Garment Synthesis and Manipulation via
        Structural Cross-modal Semantic Alignment" (semantic-bundled cross-attention).
    """
    a, b = _map_pair(maps_a, maps_b)
    p, q = _normalise(a), _normalise(b)
    squares = jnp.sum(p * p, -1) * jnp.sum(q * q, -1)
    ok = squares > 0
    cosine = jnp.where(ok, jnp.sum(p * q, -1) * jax.lax.rsqrt(jnp.where(ok, squares, 1)), 0)
    return jnp.mean(1 - cosine)


def separate_loss(maps_a: Array, maps_b: Array) -> Array:
    r"""DisenDiff's separation of concepts: the maps of two concepts (e.g. two class tokens)
    should not overlap.

    .. math::
        L = \mathrm{mean}_{b, c} \sum_t \min(p_{bct}, q_{bct}),
        \qquad p = a / \textstyle\sum_t a_t,\; q = b / \textstyle\sum_t b_t

    The library reads "separated" as the attention mass the two normalised maps share
    (1 - their total variation distance): 0 exactly when their supports are disjoint, 1 when
    they are equal, whatever their sharpness. A product overlap sum_t p_t q_t would vanish
    for two diffuse maps that cover the same region; the minimum does not. Its gradient
    lowers, at each position, the smaller of the two maps there. All-zero maps share nothing.

    Args:
        maps_a, maps_b: [B, C, T] or [B, C, h, w], one shape: C pairs of non-negative maps
            of two concepts.

    Returns:
        A scalar in [0, 1], float32 (float64 for float64 maps).

    Raises:
        ValueError: wrong ranks, different shapes, empty maps.
        DTypeError: non-floating maps.

    Example:
        >>> import jax.numpy as jnp
        >>> left, right = jnp.array([[[1.0, 1.0, 0.0, 0.0]]]), jnp.array([[[0.0, 1.0, 1.0, 0.0]]])
        >>> float(separate_loss(left, right)), float(separate_loss(left, 3 * left))
        (0.5, 1.0)

    References:
        P57 DisenDiff, "Attention Calibration for Disentangled Text-to-Image
        Personalization" ("the classes are separated and strengthened").
    """
    a, b = _map_pair(maps_a, maps_b)
    return jnp.mean(jnp.sum(jnp.minimum(_normalise(a), _normalise(b)), -1))


def strengthen_loss(maps: Array) -> Array:
    r"""DisenDiff's strengthening of a concept: its map should be peaked, not spread thin.

    .. math::
        L = \mathrm{mean}_{b, c}\big(1 - \max_t p_{bct}\big),
        \qquad p = a / \textstyle\sum_t a_t

    The library's reading of "strengthened": the share of the map's mass at its strongest
    position should grow, so that the concept owns a place in the image. Complementary to
    :func:`separate_loss`, which a pair of uniform maps cannot satisfy but which two diffuse
    maps on disjoint halves already do. The gradient reaches every position through the
    normalisation. An all-zero map gives 1.

    Args:
        maps: [B, C, T] or [B, C, h, w], non-negative.

    Returns:
        A scalar in [0, 1), float32 (float64 for float64 maps).

    Raises:
        ValueError: wrong ranks, empty maps.
        DTypeError: non-floating maps.

    Example:
        >>> import jax.numpy as jnp
        >>> float(strengthen_loss(jnp.array([[[1.0, 3.0, 0.0, 0.0]]])))
        0.25

    References:
        P57 DisenDiff, "Attention Calibration for Disentangled Text-to-Image
        Personalization" ("the classes are separated and strengthened").
    """
    p = _normalise(_flat_maps("maps", maps))
    return jnp.mean(1 - jnp.max(p, -1))


def suppress_loss(maps: Array, region: Array | None = None) -> Array:
    r"""DisenDiff's suppression: push a token's map down where it should not attend.

    .. math::
        L = \mathrm{mean}_{b, c} \frac{\sum_t m_{bct} a_{bct}}{\sum_t m_{bct}}

    the mean activation of the unnormalised map a (m = 1: over every position), e.g. of one
    class token over the region of another class, "to mitigate mutual influence among
    concepts". A map with an empty region contributes 0.

    Args:
        maps: [B, C, T] or [B, C, h, w].
        region: None (every position) or a mask of the maps' rank broadcastable to their
            shape (e.g. [B, 1, h, w]): bool, or floating weights in [0, 1] (a soft mask).

    Returns:
        A scalar, float32 (float64 for float64 maps).

    Raises:
        ValueError: wrong ranks, empty maps, a region that does not broadcast.
        DTypeError: non-floating maps; a region neither bool nor floating.

    Example:
        >>> import jax.numpy as jnp
        >>> a = jnp.array([[[0.1, 0.3, 0.5, 0.7]]])
        >>> round(float(suppress_loss(a)), 6), round(float(suppress_loss(a, a > 0.4)), 6)
        (0.4, 0.6)

    References:
        P57 DisenDiff, "Attention Calibration for Disentangled Text-to-Image
        Personalization" ("suppress the attention activation of different classes").
    """
    a = _flat_maps("maps", maps)
    if region is None:
        return jnp.mean(a)
    region = jnp.asarray(region)
    if region.dtype != jnp.bool_ and not jnp.issubdtype(region.dtype, jnp.floating):
        raise DTypeError(f"region: expected a bool or floating mask, got {region.dtype} "
                         f"(shape {region.shape})")
    shape = jnp.shape(maps)
    if region.ndim != len(shape) or not all(r in (1, s) for r, s in zip(
            region.shape, shape, strict=True)):
        raise ValueError(f"region: expected a shape of rank {len(shape)} broadcastable to the "
                         f"maps {shape}, got {region.shape}")
    m = jnp.broadcast_to(region, shape).astype(a.dtype).reshape(a.shape)
    size = m.sum(-1)
    inside = (a * m).sum(-1) / jnp.where(size > 0, size, 1)
    return jnp.mean(inside)


# --------------------------------------------------------------------------------------------
# Adversarial perturbation of the attention scores (P78)


def _check_epsilon(epsilon) -> None:
    if isinstance(epsilon, bool):
        raise ValueError(f"epsilon: expected a positive number, got {epsilon!r}")
    if not is_concrete(epsilon):
        return  # traced (an argument of a jitted function): cannot be read here
    value = np.asarray(epsilon)
    if value.shape != () or value.dtype.kind not in "iuf" or not (
            np.isfinite(value) and value > 0):
        raise ValueError(f"epsilon: expected a positive finite number, got {epsilon!r}")


def _bias_shape(bias_shape) -> tuple[int, ...]:
    if isinstance(bias_shape, int | np.integer):
        bias_shape = (bias_shape,)
    shape = tuple(check_int("bias_shape", s) for s in bias_shape)
    if not shape:
        raise ValueError("bias_shape: expected at least one axis (the first is the examples), "
                         "got ()")
    return shape


def _loss_and_gradient(loss_of_bias: Callable[[Array], Array], bias_shape,
                       dtype) -> tuple[Array, Array]:
    """loss(0) (differentiable w.r.t. what the function closes over) and g = d loss / d r
    at r = 0 (stop-gradient), from one forward and one backward pass."""
    if not callable(loss_of_bias):
        raise ValueError(f"loss_of_bias: expected a function r -> scalar loss, "
                         f"got {type(loss_of_bias).__name__}")
    zero = jnp.zeros(_bias_shape(bias_shape), dtype)
    check_floating("dtype", zero)
    loss, backward = jax.vjp(loss_of_bias, zero)
    if not hasattr(loss, "shape") or loss.shape != () or not jnp.issubdtype(
            loss.dtype, jnp.floating):
        raise ValueError(f"loss_of_bias: expected a floating scalar loss, got "
                         f"{getattr(loss, 'shape', type(loss))} "
                         f"{getattr(loss, 'dtype', '')}".rstrip())
    (gradient,) = backward(jnp.ones_like(loss))
    return loss, jax.lax.stop_gradient(gradient)


def _scale_to_norm(gradient: Array, epsilon, axes: tuple[int, ...]) -> Array:
    """epsilon * g / ||g||_2 over ``axes``; zero where g is zero (never NaN). g is divided by
    its largest magnitude first, so tiny gradients do not underflow to a zero norm."""
    peak = jnp.max(jnp.abs(gradient), axis=axes, keepdims=True)
    unit = gradient / jnp.where(peak > 0, peak, 1)
    norm = jnp.sqrt(jnp.sum(unit * unit, axis=axes, keepdims=True))
    r = unit / jnp.where(norm > 0, norm, 1) * jnp.asarray(epsilon, gradient.dtype)
    return jax.lax.stop_gradient(r)


def _perturbation(gradient: Array, epsilon, form: str) -> Array:
    if form == "at":
        axes = tuple(range(1, gradient.ndim))
    else:
        axes = (gradient.ndim - 1,)
    return _scale_to_norm(gradient, epsilon, axes)


def adversarial_logit_bias(loss_of_bias: Callable[[Array], Array], bias_shape: Sequence[int],
                           epsilon: float, *, dtype=None) -> Array:
    r"""The adversarial perturbation of the attention scores (Attention AT): the additive
    logit bias of norm epsilon per example that raises the loss most, to first order.

    .. math::
        r_{adv} = \epsilon\, \frac{g}{\lVert g \rVert_2}, \qquad
        g = \frac{\partial\, \mathrm{loss}(r)}{\partial r}\Big|_{r = 0}

    with the norm taken per example (over every axis but the first). P78 perturbs the
    attention scores, so r is added to the logits before the softmax: a perturbation of the
    weights themselves would leave the simplex, while one of the logits keeps every row a
    distribution and is what :class:`jattn.analysis.intervene.Edits` ``(logit_bias=r)`` and
    the ``bias`` of :func:`jattn.dot_product_attention` add. g is computed once at r = 0 and
    not differentiated through (stop-gradient), as in adversarial training. An example whose
    gradient is zero gets a zero perturbation.

    Args:
        loss_of_bias: r -> scalar loss of the model run with r added to its attention logits
            (e.g. ``lambda r: loss(attend(q, k, v, intervention=Intervention(Edits(
            logit_bias=r)))[0])``); under :func:`jax.grad` of the caller, whatever it closes
            over (the parameters) may be traced.
        bias_shape: the shape of r, broadcastable to the logits it is added to; its first
            axis is the examples (e.g. [B, N, T, S], or [B, 1, 1, S] to perturb each key's
            score alike in every head and row).
        epsilon: the norm of each example's perturbation, > 0.
        dtype: of r (default: JAX's default float).

    Returns:
        r_adv of ``bias_shape`` (stop-gradient).

    Raises:
        ValueError: epsilon <= 0 or not finite (checked when concrete), an empty or
            non-integer ``bias_shape``, a loss that is not a floating scalar.

    Example:
        >>> import jax.numpy as jnp
        >>> def loss(r):                       # a convex toy: its gradient at 0 is [3, 4]
        ...     return jnp.sum(jnp.array([[3.0, 4.0]]) * r + r * r)
        >>> (10 * adversarial_logit_bias(loss, (1, 2), 0.5)).round().tolist()   # 0.5 * [.6, .8]
        [[3.0, 4.0]]

    References:
        P78 Kitada & Iyatomi, "Attention Meets Perturbations: Robust and Interpretable
        Attention with Adversarial Training" (Attention AT).
    """
    _check_epsilon(epsilon)
    _, gradient = _loss_and_gradient(loss_of_bias, bias_shape, dtype)
    return _perturbation(gradient, epsilon, "at")


def interpretable_adversarial_logit_bias(loss_of_bias: Callable[[Array], Array],
                                         bias_shape: Sequence[int], epsilon: float, *,
                                         dtype=None) -> Array:
    r"""The perturbation of Attention iAT in the library's reading: the first-order worst
    logit bias normalised per attention row, so that every query's scores are pushed.

    .. math::
        r_{adv}[\dots, :] = \epsilon\, \frac{g[\dots, :]}{\lVert g[\dots, :] \rVert_2}

    over the last axis (the keys of one query row, of one head and example). The P78 abstract
    says only that iAT "introduces adversarial perturbation, which enhances the difference in
    the attention of the sentences" and gives more interpretable attention; it does not fix
    the construction. The library's reading: under AT's global normalisation the rows with
    the largest gradients take almost all of epsilon and most rows are barely perturbed;
    normalising each row gives every row a perturbation of norm epsilon, so every query's
    attention is pushed to differ, by the same amount, in the direction that hurts the loss
    most. Each row then has norm epsilon, and an example's whole perturbation
    epsilon * sqrt(rows); for a single query row per example (the one-query attention
    classifiers of P78) it equals :func:`adversarial_logit_bias`. Rows whose gradient is zero
    (e.g. masked ones) are not perturbed. For softmax rows g sums to zero over the keys, so
    r_adv does too: it only redistributes attention within the row.

    Args:
        loss_of_bias, bias_shape, dtype: as in :func:`adversarial_logit_bias`; the last axis
            of ``bias_shape`` is the keys (e.g. [B, N, T, S]).
        epsilon: the norm of each row's perturbation, > 0.

    Returns:
        r_adv of ``bias_shape`` (stop-gradient).

    Raises:
        ValueError: as :func:`adversarial_logit_bias`.

    Example:
        >>> import jax.numpy as jnp
        >>> g = jnp.array([[[3.0, 4.0], [0.0, 0.1]]])           # one example, two rows
        >>> r = interpretable_adversarial_logit_bias(lambda r: jnp.sum(g * r), (1, 2, 2), 1.0)
        >>> (10 * r).round().tolist()                          # each row has norm 1
        [[[6.0, 8.0], [0.0, 10.0]]]

    References:
        P78 Kitada & Iyatomi, "Attention Meets Perturbations: Robust and Interpretable
        Attention with Adversarial Training" (Attention iAT; the per-row reading is the
        library's).
    """
    _check_epsilon(epsilon)
    _, gradient = _loss_and_gradient(loss_of_bias, bias_shape, dtype)
    return _perturbation(gradient, epsilon, "iat")


def attention_at_loss(loss_of_bias: Callable[[Array], Array], bias_shape: Sequence[int],
                      epsilon: float, *, weight: float = 1.0, form: str = "at",
                      dtype=None) -> Array:
    r"""The adversarial-training loss on attention: the clean loss plus the loss under the
    adversarial perturbation of the attention scores.

    .. math::
        L = \mathrm{loss}(0) + \lambda\, \mathrm{loss}(r_{adv})

    r_adv from :func:`adversarial_logit_bias` (``form="at"``, Attention AT) or
    :func:`interpretable_adversarial_logit_bias` (``form="iat"``), held constant; the
    gradient of L with respect to what ``loss_of_bias`` closes over is that of both terms.
    Costs two forward passes and one backward pass more than the clean loss (loss(0) and g
    come from one forward and one backward).

    Args:
        loss_of_bias, bias_shape, epsilon, dtype: as in :func:`adversarial_logit_bias`.
        weight: lambda >= 0, the weight of the adversarial term.
        form: "at" (per-example norm) or "iat" (per-row norm).

    Returns:
        A scalar, the dtype of the loss.

    Raises:
        ValueError: as :func:`adversarial_logit_bias`; a negative weight; an unknown form.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from jattn.analysis.intervene import Edits, Intervention, attend
        >>> x = jax.random.normal(jax.random.key(0), (2, 5, 1, 4))   # [B, T, N, H]
        >>> def loss(params, r):
        ...     iv = Intervention(Edits(logit_bias=r))
        ...     out, _ = attend(x * params, x, x, intervention=iv)
        ...     return jnp.mean(out.sum((1, 2, 3)) ** 2)
        >>> def train_loss(params):
        ...     return attention_at_loss(lambda r: loss(params, r), (2, 1, 5, 5), 0.1)
        >>> clean = loss(jnp.ones(4), jnp.zeros((2, 1, 5, 5)))
        >>> bool(train_loss(jnp.ones(4)) >= 2 * clean)
        True
        >>> jax.grad(train_loss)(jnp.ones(4)).shape
        (4,)

    References:
        P78 Kitada & Iyatomi, "Attention Meets Perturbations: Robust and Interpretable
        Attention with Adversarial Training" (Attention AT and iAT).
    """
    _check_epsilon(epsilon)
    if form not in AT_FORMS:
        raise ValueError(f"form: expected one of {AT_FORMS}, got {form!r}")
    if is_concrete(weight) and not np.asarray(weight) >= 0:
        raise ValueError(f"weight: expected a number >= 0, got {weight!r}")
    clean, gradient = _loss_and_gradient(loss_of_bias, bias_shape, dtype)
    adversarial = loss_of_bias(_perturbation(gradient, epsilon, form))
    return clean + jnp.asarray(weight, clean.dtype) * adversarial
