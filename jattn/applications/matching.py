"""Matching and contrastive objectives between two sets or two batches of embeddings.

* ``filip_similarity`` / ``filip_loss`` (P20 FILIP): token-wise late interaction, each token's
  best match on the other side averaged over the (valid) tokens, and its symmetric InfoNCE.
* ``info_nce`` (P28 ALIGN, P73 MagicLens): the symmetric dual-encoder contrastive loss with
  in-batch negatives; ``bidirectional_ranking_loss`` (P39): the bidirectional hinge ranking
  loss (VSE sum of hinges, or the hardest negative only).
* ``conditional_transport`` (P02 PatchCT): forward/backward navigators between a patch set and
  a label set and the bidirectional CT cost.
* ``similarity_weighted_aggregation`` (P04 VQ-Font): a set aggregated with softmax weights of
  its members' similarity to a query.
* ``iterative_cross_attention`` (P30 RCAR): rounds of cross attention whose per-query
  inverse temperature (and query modulation) a regulator updates from the previous round.

The softmax attentions (P04, P30) run through :func:`jattn.dot_product_attention` and the
navigators (P02) through :func:`jattn.attention_weights`; every temperature is folded into the
query, so it may be a traced (learned) value. Of CAB's four patterns these are all non-causal
cross interactions between two given sets: no order is defined inside a set of patches,
labels or references, so there is no causal form. Plain dense ground truth for each function
lives in :mod:`jattn.reference`.

References:
    P02 PatchCT, "PatchCT: Aligning Patch Set and Label Set with Conditional Transport for
    Multi-Label Image Classification".
    P04 VQ-Font, "Few shot font generation via transferring similarity guided global style and
    quantization local style".
    P20 FILIP, "FILIP: Fine-grained Interactive Language-Image Pre-Training".
    P28 ALIGN, "Scaling Up Visual and Vision-Language Representation Learning With Noisy Text
    Supervision".
    P30 RCAR, "Plug-and-Play Regulators for Image-Text Matching".
    P39 image-text matching, "Deep Learning Applied to Image and Text Matching".
    P73 MagicLens, "MagicLens: Self-Supervised Image Retrieval with Open-Ended Instructions".
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jattn.core.attention import attention_weights, dot_product_attention
from jattn.core.shapes import (
    Array,
    accumulation_dtype,
    check_bool,
    check_floating,
    check_int,
    check_rank,
    check_shape,
)

SIMILARITIES = ("cosine", "dot")
REDUCTIONS = ("mean", "sum", "none")


# --------------------------------------------------------------------------------------------
# shared checks and pieces


def _check_mask(name: str, mask: Array | None, shape: tuple[int, ...], letters: str) -> None:
    if mask is not None:
        check_shape(name, mask, shape, letters)
        check_bool(name, mask)


def _check_temperature(name: str, temperature) -> None:
    """A positive Python number, or a floating scalar array (traced values are not checked)."""
    if isinstance(temperature, bool):
        raise TypeError(f"{name}: expected a positive number or a float scalar, got a bool")
    if isinstance(temperature, int | float | np.integer | np.floating):
        if not temperature > 0:
            raise ValueError(f"{name}: expected a positive number, got {temperature!r}")
        return
    temperature = jnp.asarray(temperature)
    if temperature.ndim != 0:
        raise ValueError(f"{name}: expected a scalar, got shape {temperature.shape}")
    check_floating(name, temperature)


def _check_similarity(similarity: str) -> None:
    if similarity not in SIMILARITIES:
        raise ValueError(f"similarity: expected one of {SIMILARITIES}, got {similarity!r}")


def _l2_normalize(x: Array, eps: float = 1e-12) -> Array:
    """x / max(||x||, eps): a zero vector stays zero with finite gradients."""
    squared = jnp.sum(x * x, axis=-1, keepdims=True)
    return x * jax.lax.rsqrt(jnp.maximum(squared, eps * eps))


def _masked_mean(x: Array, mask: Array | None, axis: int) -> Array:
    """Mean over ``axis`` of the entries where ``mask`` (broadcast to x) holds; 0 if none."""
    if mask is None:
        return x.mean(axis)
    m = jnp.broadcast_to(mask, x.shape).astype(x.dtype)
    return (x * m).sum(axis) / jnp.maximum(m.sum(axis), 1)


def _symmetric_cross_entropy(logits_ab: Array, logits_ba: Array) -> Array:
    """(CE(rows of logits_ab, diagonal) + CE(rows of logits_ba, diagonal)) / 2, averaged."""
    def one_direction(logits):
        log_p = jax.nn.log_softmax(logits, axis=-1)
        return -jnp.mean(jnp.diagonal(log_p))
    return 0.5 * (one_direction(logits_ab) + one_direction(logits_ba))


# --------------------------------------------------------------------------------------------
# P20 FILIP


class FILIPSimilarity(NamedTuple):
    """FILIP's two late-interaction similarities, both indexed [image b, text c]."""

    image_to_text: Array  # [B, B']: each patch's best word, averaged over patches
    text_to_image: Array  # [B, B']: each word's best patch, averaged over words


def filip_similarity(image_tokens: Array, text_tokens: Array, *,
                     image_mask: Array | None = None, text_mask: Array | None = None,
                     normalize: bool = True) -> FILIPSimilarity:
    r"""FILIP's token-wise maximum similarity between every image and every text of a batch.

    .. math::
        s_{pw}^{bc} = \langle x^b_p, y^c_w \rangle, \qquad
        s^I_{bc} = \frac{1}{|P_b|} \sum_{p \in P_b} \max_{w \in W_c} s^{bc}_{pw}, \qquad
        s^T_{bc} = \frac{1}{|W_c|} \sum_{w \in W_c} \max_{p \in P_b} s^{bc}_{pw}

    where P_b and W_c are the valid (unmasked) tokens: padding takes part neither in the max
    nor in the average, as in FILIP (which drops padded text tokens). An empty side gives 0.
    With ``normalize`` the tokens are L2-normalised first (FILIP's tokens are), so s is the
    cosine. Non-causal cross only (two unordered token sets). Materialises the
    [B, B', P, W] similarity tensor in float32 (or wider).

    Args:
        image_tokens: [B, P, D] patch embeddings x.
        text_tokens: [B', W, D] word embeddings y (B' may differ from B).
        image_mask: bool [B, P], True for real patches; None: all valid.
        text_mask: bool [B', W], True for real words; None: all valid.
        normalize: L2-normalise every token first.

    Returns:
        FILIPSimilarity(image_to_text [B, B'], text_to_image [B, B']) in the inputs' dtype.

    Raises:
        ValueError: wrong ranks, different D, P = 0 or W = 0, masks of another shape.
        TypeError: non-floating tokens, non-boolean masks.

    >>> import jax.numpy as jnp
    >>> x = jnp.array([[[1.0, 0.0], [0.0, 1.0]]])   # one image, patches e1 and e2
    >>> y = jnp.array([[[1.0, 0.0], [1.0, 1.0]]])   # one text, words e1 and (e1 + e2)
    >>> s = filip_similarity(x, y)
    >>> round(float(s.image_to_text[0, 0]), 3), round(float(s.text_to_image[0, 0]), 3)
    (0.854, 0.854)

    References:
        P20 FILIP, "FILIP: Fine-grained Interactive Language-Image Pre-Training" (cross-modal
        late interaction).
    """
    check_rank("image_tokens", image_tokens, (3,), "[B, P, D]")
    check_rank("text_tokens", text_tokens, (3,), "[B', W, D]")
    check_floating("image_tokens", image_tokens)
    check_floating("text_tokens", text_tokens)
    B, P, D = image_tokens.shape
    C, W, _ = text_tokens.shape
    if text_tokens.shape[2] != D:
        raise ValueError(f"text_tokens: expected [B', W, D={D}] to match image_tokens "
                         f"{image_tokens.shape}, got {text_tokens.shape}")
    if P == 0 or W == 0:
        raise ValueError(f"image_tokens, text_tokens: expected at least one token each, got "
                         f"{image_tokens.shape} and {text_tokens.shape}")
    _check_mask("image_mask", image_mask, (B, P), "BP")
    _check_mask("text_mask", text_mask, (C, W), "BW")
    out_dtype = jnp.result_type(image_tokens, text_tokens)
    dtype = accumulation_dtype(out_dtype)
    x, y = image_tokens.astype(dtype), text_tokens.astype(dtype)
    if normalize:
        x, y = _l2_normalize(x), _l2_normalize(y)
    sim = jnp.einsum("bpd,cwd->bcpw", x, y)
    pad_b = None if image_mask is None else image_mask[:, None, :]  # [B, 1, P]
    pad_c = None if text_mask is None else text_mask[None, :, :]  # [1, C, W]

    def best_match(scores, valid):  # max over the last axis, 0 where nothing is valid
        if valid is None:
            return scores.max(-1)
        best = jnp.where(valid, scores, -jnp.inf).max(-1)
        return jnp.where(valid.any(-1), best, 0)

    per_patch = best_match(sim, None if pad_c is None else pad_c[:, :, None, :])  # [B, C, P]
    per_word = best_match(jnp.swapaxes(sim, -1, -2),
                          None if pad_b is None else pad_b[:, :, None, :])  # [B, C, W]
    image_to_text = _masked_mean(per_patch, pad_b, axis=-1)
    text_to_image = _masked_mean(per_word, pad_c, axis=-1)
    return FILIPSimilarity(image_to_text.astype(out_dtype), text_to_image.astype(out_dtype))


def filip_loss(image_tokens: Array, text_tokens: Array, *, temperature,
               image_mask: Array | None = None, text_mask: Array | None = None,
               normalize: bool = True) -> Array:
    r"""FILIP's contrastive loss: symmetric InfoNCE over the late-interaction similarities.

    .. math::
        \mathcal{L} = \tfrac12\Big[-\tfrac1B \sum_b \log
        \frac{e^{s^I_{bb}/\tau}}{\sum_c e^{s^I_{bc}/\tau}}
        \;-\; \tfrac1B \sum_c \log \frac{e^{s^T_{cc}/\tau}}{\sum_b e^{s^T_{bc}/\tau}}\Big]

    Image b's row uses the image-to-text similarity s^I; text c's row (over images) uses the
    text-to-image similarity s^T (see :func:`filip_similarity`). Pair b of the batch is the
    positive, the other in-batch items the negatives.

    Args:
        image_tokens: [B, P, D]; text_tokens: [B, W, D] (the same B: pairs).
        temperature: tau > 0, a Python number or a float scalar (may be traced, e.g.
            learned: :class:`jattn.nn.FILIPLoss`).
        image_mask, text_mask, normalize: as in :func:`filip_similarity`.

    Returns:
        The scalar loss in float32 (float64 for float64 input).

    Raises:
        ValueError: what :func:`filip_similarity` rejects, batches of different sizes, a
            non-positive or non-scalar temperature.
        TypeError: non-floating tokens or temperature, non-boolean masks.

    >>> import jax, jax.numpy as jnp
    >>> x = jax.random.normal(jax.random.key(0), (4, 9, 8))
    >>> y = jax.random.normal(jax.random.key(1), (4, 5, 8))
    >>> filip_loss(x, y, temperature=0.07).shape
    ()

    References:
        P20 FILIP, "FILIP: Fine-grained Interactive Language-Image Pre-Training".
    """
    _check_temperature("temperature", temperature)
    if image_tokens.ndim == 3 and text_tokens.ndim == 3 and (
            image_tokens.shape[0] != text_tokens.shape[0]):
        raise ValueError(f"image_tokens, text_tokens: expected paired batches of one size, got "
                         f"{image_tokens.shape} and {text_tokens.shape}")
    s = filip_similarity(image_tokens, text_tokens, image_mask=image_mask, text_mask=text_mask,
                         normalize=normalize)
    dtype = accumulation_dtype(s.image_to_text.dtype)
    inv = 1.0 / jnp.asarray(temperature, dtype)
    return _symmetric_cross_entropy(s.image_to_text.astype(dtype) * inv,
                                    s.text_to_image.astype(dtype).T * inv)


# --------------------------------------------------------------------------------------------
# P28 ALIGN, P73 MagicLens, P39 image-text matching


def info_nce(a: Array, b: Array, *, temperature, normalize: bool = True) -> Array:
    r"""The symmetric dual-encoder contrastive loss (InfoNCE / normalised softmax loss).

    .. math::
        \ell_{ij} = \frac{\langle \hat a_i, \hat b_j \rangle}{\tau}, \qquad
        \mathcal{L} = \tfrac12\Big[-\tfrac1B \sum_i \log \mathrm{softmax}_j(\ell_{ij})_i
        - \tfrac1B \sum_j \log \mathrm{softmax}_i(\ell_{ij})_j\Big]

    Pair i is the positive of a_i and of b_i; the other B - 1 in-batch items are the
    negatives, in both directions (a -> b and b -> a), as in ALIGN's image-to-text plus
    text-to-image loss and MagicLens' query-to-target loss. ``normalize`` L2-normalises the
    embeddings (cosine logits). The learnable temperature lives in
    :class:`jattn.nn.InfoNCELoss`.

    Args:
        a: [B, D] embeddings of one side (images, or MagicLens' image + instruction queries).
        b: [B, D] embeddings of the other side (texts, or target images).
        temperature: tau > 0, a Python number or a float scalar (may be traced).
        normalize: L2-normalise a and b first.

    Returns:
        The scalar loss in float32 (float64 for float64 input).

    Raises:
        ValueError: a or b not [B, D], shapes that differ, B = 0, a non-positive or
            non-scalar temperature.
        TypeError: non-floating embeddings or temperature.

    >>> import jax.numpy as jnp
    >>> e = jnp.eye(3)
    >>> float(info_nce(e, e, temperature=0.01)) < 1e-6   # perfectly aligned pairs
    True
    >>> round(float(info_nce(e, jnp.ones((3, 3)), temperature=1.0)), 4)   # = log 3
    1.0986

    References:
        P28 ALIGN, "Scaling Up Visual and Vision-Language Representation Learning With Noisy
        Text Supervision"; P73 MagicLens, "MagicLens: Self-Supervised Image Retrieval with
        Open-Ended Instructions"; P39 image-text matching (bidirectional retrieval).
    """
    check_rank("a", a, (2,), "[B, D]")
    check_rank("b", b, (2,), "[B, D]")
    check_floating("a", a)
    check_floating("b", b)
    if a.shape != b.shape or a.shape[0] == 0:
        raise ValueError(f"a, b: expected one shape [B, D] with B >= 1, got {a.shape} and "
                         f"{b.shape}")
    _check_temperature("temperature", temperature)
    dtype = accumulation_dtype(jnp.result_type(a, b))
    a, b = a.astype(dtype), b.astype(dtype)
    if normalize:
        a, b = _l2_normalize(a), _l2_normalize(b)
    logits = (a @ b.T) / jnp.asarray(temperature, dtype)
    return _symmetric_cross_entropy(logits, logits.T)


def bidirectional_ranking_loss(similarity: Array, *, margin: float, hardest: bool = False,
                               reduction: str = "mean") -> Array:
    r"""The bidirectional hinge (triplet) ranking loss over a batch of matched pairs.

    .. math::
        \ell_i = \sum_{j \neq i} [m - s_{ii} + s_{ij}]_+ + \sum_{j \neq i} [m - s_{ii} + s_{ji}]_+

    Row i of ``similarity`` is anchor a_i (e.g. image i) against every b_j (caption j); the
    diagonal holds the positive pairs. The first sum ranks the captions for image i, the
    second the images for caption i. ``hardest=True`` replaces each sum by its largest term
    (VSE++'s max of hinges, the hardest in-batch negative); the default is VSE's sum of hinges.

    Args:
        similarity: [B, B] scores s_ij = score(a_i, b_j), B >= 1.
        margin: m, a Python number (0.2 is common for cosine scores).
        hardest: keep only the hardest negative of each direction.
        reduction: "mean" (over the B pairs), "sum" (as VSE/VSE++'s code returns), or "none"
            (the per-pair losses [B]).

    Returns:
        A scalar (or [B] for "none") in float32 (float64 for float64 input). With B = 1 there
        are no negatives and the loss is 0.

    Raises:
        ValueError: similarity not square [B, B], a margin that is not a number, an unknown
            reduction.
        TypeError: non-floating similarity.

    >>> import jax.numpy as jnp
    >>> s = jnp.array([[0.9, 0.3], [0.8, 0.5]])
    >>> [round(float(v), 3) for v in bidirectional_ranking_loss(s, margin=0.2,
    ...                                                        reduction="none")]
    [0.1, 0.5]
    >>> round(float(bidirectional_ranking_loss(s, margin=0.2, hardest=True, reduction="sum")), 3)
    0.6

    References:
        P39 image-text matching, "Deep Learning Applied to Image and Text Matching" (global
        bidirectional ranking objective with negative samples); P28 ALIGN (the dual-encoder
        retrieval setting).
    """
    check_rank("similarity", similarity, (2,), "[B, B]")
    check_floating("similarity", similarity)
    B = similarity.shape[0]
    if similarity.shape != (B, B) or B == 0:
        raise ValueError(f"similarity: expected a square [B, B] with B >= 1, got "
                         f"{similarity.shape}")
    if isinstance(margin, bool) or not isinstance(margin, int | float | np.integer | np.floating):
        raise ValueError(f"margin: expected a number, got {margin!r}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction: expected one of {REDUCTIONS}, got {reduction!r}")
    dtype = accumulation_dtype(similarity.dtype)
    s = similarity.astype(dtype)
    positive = jnp.diagonal(s)
    negative = ~jnp.eye(B, dtype=bool)
    rank_b = jnp.where(negative, jax.nn.relu(margin - positive[:, None] + s), 0)  # [i, j]
    rank_a = jnp.where(negative, jax.nn.relu(margin - positive[:, None] + s.T), 0)  # [i, j]
    if hardest:
        per_pair = rank_b.max(-1) + rank_a.max(-1)
    else:
        per_pair = rank_b.sum(-1) + rank_a.sum(-1)
    if reduction == "none":
        return per_pair
    return per_pair.sum() if reduction == "sum" else per_pair.mean()


# --------------------------------------------------------------------------------------------
# P02 PatchCT


class ConditionalTransport(NamedTuple):
    """The bidirectional CT cost between two weighted sets and its two navigators."""

    cost: Array  # [B]: forward_cost + backward_cost
    forward_cost: Array  # [B]: sum_i theta_i sum_j pi(y_j | x_i) c_ij
    backward_cost: Array  # [B]: sum_j p_j sum_i pi(x_i | y_j) c_ij
    forward_navigator: Array  # [B, P, L]: pi(y_j | x_i), rows sum to 1 (0 for absent x_i)
    backward_navigator: Array  # [B, L, P]: pi(x_i | y_j), rows sum to 1 (0 for absent y_j)


def _set_weights(name: str, weights: Array | None, batch: int, size: int, letters: str,
                 dtype) -> Array:
    """[batch, size] weights normalised to sum 1 (all-zero rows stay zero)."""
    if weights is None:
        return jnp.full((batch, size), 1.0 / size, dtype)
    weights = jnp.asarray(weights)
    check_floating(name, weights)
    if weights.ndim == 1:
        check_shape(name, weights, (size,), letters[1:])
        weights = jnp.broadcast_to(weights, (batch, size))
    else:
        check_shape(name, weights, (batch, size), letters)
    weights = weights.astype(dtype)
    total = weights.sum(-1, keepdims=True)
    return jnp.where(total > 0, weights / jnp.where(total > 0, total, 1), 0)


def _navigator(source: Array, target: Array, target_weights: Array, inv_temperature: Array
               ) -> Array:
    """pi(target_j | source_i) ∝ w_j exp(<source_i, target_j> / tau) over the w_j > 0,
    through :func:`jattn.attention_weights` with log w_j as the bias."""
    present = target_weights > 0
    log_w = jnp.log(jnp.where(present, target_weights, 1))
    q = (source * inv_temperature)[:, :, None, :]
    k = target[:, :, None, :]
    weights = attention_weights(q, k, bias=log_w[:, None, None, :],
                                mask=present[:, None, None, :], scale=1.0)
    return weights[:, 0]


def conditional_transport(x: Array, y: Array, *, x_weights: Array | None = None,
                          y_weights: Array | None = None, temperature=1.0,
                          similarity: str = "cosine") -> ConditionalTransport:
    r"""Conditional transport between two weighted sets (PatchCT's patch and label sets).

    .. math::
        \pi(y_j \mid x_i) = \frac{p_j\, e^{\,s(x_i, y_j)/\tau}}{\sum_{j'} p_{j'}\,
        e^{\,s(x_i, y_{j'})/\tau}}, \qquad
        \pi(x_i \mid y_j) = \frac{\theta_i\, e^{\,s(x_i, y_j)/\tau}}{\sum_{i'} \theta_{i'}\,
        e^{\,s(x_{i'}, y_j)/\tau}}

    .. math::
        \mathrm{CT} = \underbrace{\sum_i \theta_i \sum_j \pi(y_j \mid x_i)\, c_{ij}}_{
        \text{forward}} + \underbrace{\sum_j p_j \sum_i \pi(x_i \mid y_j)\, c_{ij}}_{
        \text{backward}}, \qquad c_{ij} = 1 - \cos(x_i, y_j)

    The reading chosen (PatchCT's abstract leaves the details open): each image is a discrete
    distribution over its patch embeddings x_i with weights theta (uniform by default) and
    over its label embeddings y_j with weights p (PatchCT: the ground-truth labels,
    normalised); the forward navigator sends each patch to the labels and the backward one
    each label to the patches, each a softmax over the other set of the similarities s / tau
    with the other side's weights as prior (as in the CT paper); the transport cost is the
    cosine distance. Both weight vectors are normalised to sum to 1; a zero weight removes a
    point from both directions (use it for padding and absent labels) and its navigator row
    is 0. The two parts are returned separately for a weighted mix (the CT paper's rho);
    ``cost`` is their sum. Swapping the sets swaps the directions: CT(x, y, theta, p) has
    the forward cost and navigator of CT(y, x, p, theta)'s backward ones, and the same total.
    Non-causal cross only (two unordered sets). Navigators through
    :func:`jattn.attention_weights`.

    Args:
        x: [B, P, D] patch embeddings.
        y: [B, L, D] label embeddings, or [L, D] shared by the whole batch.
        x_weights: theta, [B, P] nonnegative (or None: uniform).
        y_weights: p, [B, L] or [L] nonnegative (or None: uniform).
        temperature: tau > 0 of the navigators (Python number or float scalar; may be
            traced).
        similarity: s for the navigators, "cosine" (default) or "dot" (raw inner product).

    Returns:
        ConditionalTransport(cost [B], forward_cost [B], backward_cost [B],
        forward_navigator [B, P, L], backward_navigator [B, L, P]), float32 (or wider).

    Raises:
        ValueError: wrong ranks, sizes that disagree, an unknown similarity, a non-positive
            temperature.
        TypeError: non-floating arrays.

    >>> import jax, jax.numpy as jnp
    >>> x = jax.random.normal(jax.random.key(0), (2, 6, 8))
    >>> labels = jax.random.normal(jax.random.key(1), (5, 8))
    >>> present = jnp.array([[1.0, 0, 1, 0, 0], [0, 0, 0, 1, 1]])
    >>> ct = conditional_transport(x, labels, y_weights=present, temperature=0.1)
    >>> ct.cost.shape, bool(jnp.allclose(ct.forward_navigator.sum(-1), 1))
    ((2,), True)
    >>> ct.backward_navigator[0, 1].sum()   # label 1 is absent from image 0
    Array(0., dtype=float32)

    References:
        P02 PatchCT, "PatchCT: Aligning Patch Set and Label Set with Conditional Transport
        for Multi-Label Image Classification" (forward and backward navigators, the
        bidirectional CT cost).
    """
    check_rank("x", x, (3,), "[B, P, D]")
    check_rank("y", y, (2, 3), "[B, L, D] or [L, D]")
    check_floating("x", x)
    check_floating("y", y)
    _check_similarity(similarity)
    _check_temperature("temperature", temperature)
    B, P, D = x.shape
    if y.shape[-1] != D or (y.ndim == 3 and y.shape[0] != B):
        raise ValueError(f"y: expected [B={B}, L, D={D}] or [L, D={D}] to match x {x.shape}, "
                         f"got {y.shape}")
    L = y.shape[-2]
    if P == 0 or L == 0:
        raise ValueError(f"x, y: expected non-empty sets, got x {x.shape} and y {y.shape}")
    dtype = accumulation_dtype(jnp.result_type(x, y))
    x = x.astype(dtype)
    y = jnp.broadcast_to(y.astype(dtype), (B, L, D))
    theta = _set_weights("x_weights", x_weights, B, P, "BP", dtype)
    p = _set_weights("y_weights", y_weights, B, L, "BL", dtype)
    x_unit, y_unit = _l2_normalize(x), _l2_normalize(y)
    x_nav, y_nav = (x_unit, y_unit) if similarity == "cosine" else (x, y)
    inv = 1.0 / jnp.asarray(temperature, dtype)
    forward = jnp.where(theta[..., None] > 0, _navigator(x_nav, y_nav, p, inv), 0)  # [B,P,L]
    backward = jnp.where(p[..., None] > 0, _navigator(y_nav, x_nav, theta, inv), 0)  # [B,L,P]
    cost_matrix = 1 - jnp.einsum("bpd,bld->bpl", x_unit, y_unit)
    forward_cost = jnp.einsum("bp,bpl,bpl->b", theta, forward, cost_matrix)
    backward_cost = jnp.einsum("bl,blp,bpl->b", p, backward, cost_matrix)
    return ConditionalTransport(forward_cost + backward_cost, forward_cost, backward_cost,
                                forward, backward)


# --------------------------------------------------------------------------------------------
# P04 VQ-Font


def similarity_weighted_aggregation(query: Array, keys: Array, values: Array, *,
                                    mask: Array | None = None, temperature=1.0,
                                    similarity: str = "cosine", return_weights: bool = False):
    r"""Aggregate a set by the softmax of its members' similarity to a query.

    .. math::
        w_k = \mathrm{softmax}_k\big(s(q, k_k) / \tau\big), \qquad
        \mathrm{out} = \sum_k w_k\, v_k

    VQ-Font's similarity-guided global style: the target character's content feature q is
    compared with each reference glyph's content feature k_k (cosine similarity of the
    flattened features, temperature 1 in the official code) and the reference style
    features v_k (any trailing shape, e.g. [C, H, W]) are averaged with those weights. The
    order of the set does not matter (permuting keys, values and mask together gives the same
    output). Masked members get weight 0; an empty set gives zeros. Non-causal cross only (one
    query over an unordered set). Runs through :func:`jattn.dot_product_attention` (one query,
    one head, value dim = the flattened value size).

    Args:
        query: [B, D] query features.
        keys: [B, K, D] set members' features compared with the query.
        values: ``[B, K, *F]`` what is aggregated (F may be empty, or e.g. C, H, W).
        mask: bool [B, K], True for real members; None: all valid.
        temperature: tau > 0 (Python number or float scalar; may be traced).
        similarity: "cosine" (default, VQ-Font) or "dot".
        return_weights: also return the weights w.

    Returns:
        out ``[B, *F]`` in the values' dtype; with ``return_weights`` the pair (out, weights
        [B, K] float32 or wider).

    Raises:
        ValueError: wrong ranks, sizes that disagree, K = 0, an unknown similarity, a
            non-positive temperature, a mask of another shape.
        TypeError: non-floating arrays, a non-boolean mask.

    >>> import jax.numpy as jnp
    >>> q = jnp.array([[1.0, 0.0]])
    >>> k = jnp.array([[[1.0, 0.0], [0.0, 1.0]]])   # cosine 1 and 0
    >>> v = jnp.array([[[10.0], [0.0]]])
    >>> out, w = similarity_weighted_aggregation(q, k, v, return_weights=True)
    >>> [round(float(a), 4) for a in w[0]], round(float(out[0, 0]), 3)   # softmax(1, 0)
    ([0.7311, 0.2689], 7.311)

    References:
        P04 VQ-Font, "Few shot font generation via transferring similarity guided global style
        and quantization local style" (similarity-guided global style aggregation).
    """
    check_rank("query", query, (2,), "[B, D]")
    check_rank("keys", keys, (3,), "[B, K, D]")
    if values.ndim < 2:
        raise ValueError(f"values: expected [B, K, *F], got shape {values.shape}")
    for name, arr in (("query", query), ("keys", keys), ("values", values)):
        check_floating(name, arr)
    _check_similarity(similarity)
    _check_temperature("temperature", temperature)
    B, D = query.shape
    K = keys.shape[1]
    if keys.shape[0] != B or keys.shape[2] != D:
        raise ValueError(f"keys: expected [B={B}, K, D={D}] to match query {query.shape}, "
                         f"got {keys.shape}")
    if values.shape[:2] != (B, K):
        raise ValueError(f"values: expected [B={B}, K={K}, *F] to match keys {keys.shape}, "
                         f"got {values.shape}")
    if K == 0:
        raise ValueError(f"keys: expected a non-empty set, got {keys.shape}")
    _check_mask("mask", mask, (B, K), "BK")
    dtype = accumulation_dtype(jnp.result_type(query, keys, values))
    q, k = query.astype(dtype), keys.astype(dtype)
    if similarity == "cosine":
        q, k = _l2_normalize(q), _l2_normalize(k)
    q = (q / jnp.asarray(temperature, dtype))[:, None, None, :]  # [B, 1, 1, D]
    k = k[:, :, None, :]
    feature_shape = values.shape[2:]
    v = values.reshape(B, K, 1, -1).astype(dtype)
    attn_mask = None if mask is None else mask[:, None, None, :]
    out = dot_product_attention(q, k, v, mask=attn_mask, scale=1.0)  # [B, 1, 1, F]
    out = out.reshape(B, *feature_shape).astype(values.dtype)
    if not return_weights:
        return out
    return out, attention_weights(q, k, mask=attn_mask, scale=1.0)[:, 0, 0]


# --------------------------------------------------------------------------------------------
# P30 RCAR


class IterativeCrossAttention(NamedTuple):
    """The last round of :func:`iterative_cross_attention` and the state that produced it."""

    attended: Array  # [B, T, Dv]: the last round's attention output
    inverse_temperature: Array  # [B, T]: the per-query factor of the last round
    modulation: Array  # [B, T, D]: the query modulation of the last round


Regulator = Callable[[int, Array, Array, Array, Array], tuple[Array, Array]]


def iterative_cross_attention(query: Array, context: Array, *, num_steps: int,
                              inverse_temperature, regulator: Regulator | None = None,
                              modulation: Array | None = None, value: Array | None = None,
                              context_mask: Array | None = None,
                              query_mask: Array | None = None,
                              normalize: bool = True) -> IterativeCrossAttention:
    r"""Rounds of cross attention whose per-query temperature a regulator adapts (RCAR's RCR).

    .. math::
        a^{(r)}_t = \sum_s \mathrm{softmax}_s\big(\lambda^{(r)}_t \,
        \langle \widehat{m^{(r)}_t \odot q_t}, \hat k_s \rangle\big)\, v_s, \qquad
        (\lambda^{(r+1)}, m^{(r+1)}) = \mathrm{regulator}(r, q, a^{(r)}, \lambda^{(r)},
        m^{(r)})

    for r = 0 .. num_steps; the output is round num_steps (num_steps + 1 attentions,
    num_steps regulator updates; num_steps = 0 is one plain cross attention). lambda is an
    inverse temperature per query (RCAR's "attention factor", SCAN's lambda; 9 to 10 is
    usual for cosine scores) and m a per-query, per-channel modulation of the query
    (RCAR's "matrix", ones by default). The reading chosen: with ``normalize`` (default) the
    modulated query and the keys are L2-normalised (cosine scores) and each round's output
    too, as in RCAR's code; RCAR's extra score normalisation inherited from SCAN (LeakyReLU
    and an L2 norm over the words before the softmax) is not applied, so the scores are plain
    scaled cosines and the attention is :func:`jattn.dot_product_attention` with lambda
    folded into the query. The regulator is the learned part (RCAR: an alignment vector from
    (q - a)^2 and two MLPs, :class:`jattn.nn.RecurrentCorrespondenceRegulator`); any
    function with its signature works. Query rows in ``query_mask == False`` output 0.
    Non-causal cross only (words attend to an unordered set of regions, or back).

    Args:
        query: [B, T, D] the querying set (words for RCAR's text-to-image direction).
        context: [B, S, D] the attended set (regions), the keys.
        num_steps: R >= 0 regulator updates.
        inverse_temperature: lambda^(0): a Python number > 0, or a float array
            broadcastable to [B, T] (may be traced).
        regulator: ``(step, query, attended, inverse_temperature [B, T], modulation
            [B, T, D]) -> (inverse_temperature [B, T], modulation [B, T, D])``; required when
            num_steps > 0.
        modulation: m^(0), [B, T, D] or broadcastable; None: ones.
        value: [B, S, Dv] values; None: the context itself (RCAR).
        context_mask: bool [B, S], True for real context items; None: all valid.
        query_mask: bool [B, T], True for real queries; None: all valid.
        normalize: cosine scores and L2-normalised outputs (RCAR) instead of raw dot products.

    Returns:
        IterativeCrossAttention(attended [B, T, Dv] in the query's dtype,
        inverse_temperature [B, T], modulation [B, T, D]) of the last round, the last two
        float32 (or wider).

    Raises:
        ValueError: wrong ranks or shapes, a negative num_steps, num_steps > 0 without a
            regulator, a non-positive Python inverse_temperature, a regulator returning
            other shapes, masks of another shape.
        TypeError: non-floating arrays, non-boolean masks.

    >>> import jax, jax.numpy as jnp
    >>> words = jax.random.normal(jax.random.key(0), (2, 5, 8))
    >>> regions = jax.random.normal(jax.random.key(1), (2, 7, 8))
    >>> sharpen = lambda step, q, a, lam, m: (lam * 2.0, m)   # double lambda each round
    >>> out = iterative_cross_attention(words, regions, num_steps=2, inverse_temperature=4.0,
    ...                                 regulator=sharpen)
    >>> out.attended.shape, float(out.inverse_temperature[0, 0])
    ((2, 5, 8), 16.0)

    References:
        P30 RCAR, "Plug-and-Play Regulators for Image-Text Matching" (Recurrent
        Correspondence Regulator: adaptive attention factors over rounds).
    """
    check_rank("query", query, (3,), "[B, T, D]")
    check_rank("context", context, (3,), "[B, S, D]")
    check_floating("query", query)
    check_floating("context", context)
    B, T, D = query.shape
    S = context.shape[1]
    if context.shape[0] != B or context.shape[2] != D:
        raise ValueError(f"context: expected [B={B}, S, D={D}] to match query {query.shape}, "
                         f"got {context.shape}")
    if T == 0 or S == 0:
        raise ValueError(f"query, context: expected non-empty sets, got {query.shape} and "
                         f"{context.shape}")
    if value is None:
        value = context
    check_rank("value", value, (3,), "[B, S, Dv]")
    check_floating("value", value)
    if value.shape[:2] != (B, S):
        raise ValueError(f"value: expected [B={B}, S={S}, Dv] to match context "
                         f"{context.shape}, got {value.shape}")
    check_int("num_steps", num_steps, minimum=0)
    if num_steps > 0 and regulator is None:
        raise ValueError(f"regulator: required with num_steps={num_steps} > 0")
    _check_mask("context_mask", context_mask, (B, S), "BS")
    _check_mask("query_mask", query_mask, (B, T), "BT")
    dtype = accumulation_dtype(jnp.result_type(query, context, value))
    if isinstance(inverse_temperature, bool):
        raise TypeError("inverse_temperature: expected a positive number or a float array, "
                        "got a bool")
    if isinstance(inverse_temperature, int | float | np.integer | np.floating):
        if not inverse_temperature > 0:
            raise ValueError(f"inverse_temperature: expected a positive number, got "
                             f"{inverse_temperature!r}")
        lam = jnp.asarray(float(inverse_temperature), dtype)
    else:
        lam = jnp.asarray(inverse_temperature)
        check_floating("inverse_temperature", lam)
    try:
        lam = jnp.broadcast_to(lam.astype(dtype), (B, T))
    except ValueError:
        raise ValueError(f"inverse_temperature: expected a shape broadcastable to (B={B}, "
                         f"T={T}), got {lam.shape}") from None
    m = jnp.ones((B, T, D), dtype) if modulation is None else jnp.asarray(modulation)
    check_floating("modulation", m)
    try:
        m = jnp.broadcast_to(m.astype(dtype), (B, T, D))
    except ValueError:
        raise ValueError(f"modulation: expected a shape broadcastable to (B={B}, T={T}, "
                         f"D={D}), got {m.shape}") from None

    q0 = query.astype(dtype)
    k = context.astype(dtype)
    v = value.astype(dtype)
    if normalize:
        k = _l2_normalize(k)
    attn_mask = None if context_mask is None else context_mask[:, None, None, :]

    def attend(lam, m):
        q = q0 * m
        if normalize:
            q = _l2_normalize(q)
        out = dot_product_attention((q * lam[..., None])[:, :, None, :], k[:, :, None, :],
                                    v[:, :, None, :], mask=attn_mask, scale=1.0)[:, :, 0]
        if normalize:
            out = _l2_normalize(out)
        if query_mask is not None:
            out = jnp.where(query_mask[..., None], out, 0)
        return out

    for step in range(int(num_steps)):
        attended = attend(lam, m)
        new_lam, new_m = regulator(step, q0, attended, lam, m)
        new_lam, new_m = jnp.asarray(new_lam), jnp.asarray(new_m)
        if new_lam.shape != (B, T) or new_m.shape != (B, T, D):
            raise ValueError(f"regulator: expected (inverse_temperature {(B, T)}, modulation "
                             f"{(B, T, D)}), got {new_lam.shape} and {new_m.shape}")
        lam, m = new_lam.astype(dtype), new_m.astype(dtype)
    return IterativeCrossAttention(attend(lam, m).astype(query.dtype), lam, m)
