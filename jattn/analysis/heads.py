"""What individual heads do and how to steer them: retrieval heads (P41), attention sinks
and their calibration (P50), head-specific emphasis of chosen tokens (P62).

Every function takes attention weights as :func:`jattn.attention_weights` returns them
([B, ..., P, S]: rows of the chosen queries over all keys, any axes such as layers and heads
in between) and returns scores, masks or :class:`~jattn.analysis.Edits` to apply with an
:class:`~jattn.analysis.Intervention`.

References:
    P41 Wu et al., "Retrieval Head Mechanistically Explains Long-Context Factuality";
    P50 Yu et al., "Unveiling and Harnessing Hidden Attention Sinks" (ACT); P62 "Fixing
    Imbalanced Attention to Mitigate In-Context Hallucination of Large Vision-Language
    Model". Facts from their public code: ../shared/notes/analysis.md.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import jax.numpy as jnp
import numpy as np

from jattn.analysis.intervene import Edits
from jattn.analysis.tokens import _token_mask, keep_top_tokens
from jattn.core.masks import causal
from jattn.core.shapes import Array, check_bool, check_floating, check_integer, check_rank


def retrieval_scores(weights: Array, context, predicted, needle, *, rows=None) -> Array:
    """Retrieval score per head: the fraction of the needle's tokens that the head copies.

    At each decoding row the head's top-1 key (ties: the first) counts when it lies inside
    the needle and holds the token the model produces there; the count is divided by the
    needle's length. A head that reads every needle token as it is copied scores 1.

    Args:
        weights: [B, ..., P, S]: the P decoding rows of any heads (e.g. [B, L, N, P, S]).
        context: int [B, S]: the tokens at the key positions.
        predicted: int [B, P]: the token produced at each row.
        needle: bool [B, S]: the needle's positions.
        rows: None, or bool [B, P]: the rows that count (e.g. those inside the answer).

    Returns:
        [B, ...] float32 scores in [0, 1].

    Example:
        >>> import jax.numpy as jnp
        >>> w = jnp.array([[[[0.1, 0.8, 0.1], [0.1, 0.1, 0.8]]]])  # [B=1, N=1, P=2, S=3]
        >>> retrieval_scores(w, jnp.array([[5, 6, 7]]), jnp.array([[6, 9]]),
        ...                  jnp.array([[False, True, True]])).tolist()
        [[0.5]]

    References:
        P41 (the detection code's score: ``+1/|needle|`` per copied token under the head's
        top-1 attention).
    """
    weights = jnp.asarray(weights)
    check_floating("weights", weights)
    if weights.ndim < 3:
        raise ValueError(f"weights: expected [B, ..., P, S], got shape {weights.shape}")
    B, P, S = weights.shape[0], weights.shape[-2], weights.shape[-1]
    context, predicted, needle = (jnp.asarray(x) for x in (context, predicted, needle))
    check_integer("context", context)
    check_integer("predicted", predicted)
    check_bool("needle", needle)
    for name, x, shape in (("context", context, (B, S)), ("predicted", predicted, (B, P)),
                           ("needle", needle, (B, S))):
        if x.shape != shape:
            raise ValueError(f"{name}: expected shape {shape}, got {x.shape}")
    top = jnp.argmax(weights, axis=-1)  # [B, ..., P]
    flat = top.reshape(B, -1)
    token_at = jnp.take_along_axis(context, flat, axis=1).reshape(top.shape)
    in_needle = jnp.take_along_axis(needle, flat, axis=1).reshape(top.shape)
    lead = (B, *([1] * (weights.ndim - 3)), P)
    hit = in_needle & (token_at == predicted.reshape(lead))
    if rows is not None:
        rows = jnp.asarray(rows)
        check_bool("rows", rows)
        hit = hit & rows.reshape(lead)
    length = needle.sum(-1).reshape(B, *([1] * (weights.ndim - 3)))
    return hit.sum(-1) / jnp.maximum(length, 1).astype(jnp.float32)


def sink_scores(weights: Array, *, visible=None, is_causal: bool = True) -> Array:
    """Attention each key receives, divided by how many queries can see it.

    Args:
        weights: [B, ..., T, S]: every query row (T == S with ``is_causal``).
        visible: None, or bool broadcastable to [B, ..., T, S]: which queries can see which
            keys; default: causal (query i sees keys j <= i) or all.
        is_causal: the default pattern when ``visible`` is None.

    Returns:
        [B, ..., S] float32.

    Example:
        >>> import jax.numpy as jnp
        >>> w = jnp.array([[1.0, 0.0], [0.5, 0.5]])
        >>> sink_scores(w).tolist()
        [0.75, 0.5]

    References:
        P50 (ACT's score: received attention over the number of queries that see a token).
    """
    weights = jnp.asarray(weights, jnp.float32)
    if weights.ndim < 2:
        raise ValueError(f"weights: expected [..., T, S], got shape {weights.shape}")
    T, S = weights.shape[-2:]
    if visible is None:
        if is_causal and T != S:
            raise ValueError(f"visible: needed for causal weights with T={T} != S={S}")
        visible = causal().materialize(T, S)[0, 0] if is_causal else jnp.ones((T, S), bool)
    visible = jnp.asarray(visible)
    check_bool("visible", visible)
    count = jnp.broadcast_to(visible, weights.shape).sum(-2)
    return weights.sum(-2) / jnp.maximum(count, 1)


def find_sinks(weights: Array, *, threshold: float = 0.1, visible=None,
               is_causal: bool = True, exclude_first: bool = False) -> Array:
    """Sink tokens per head: :func:`sink_scores` above ``threshold`` (ACT's 0.1).

    ``exclude_first`` leaves the first token out (it is the sink of most heads of trained
    models; ACT's hidden sinks are the others).

    Returns:
        bool [B, ..., S].

    References:
        P50.
    """
    if not threshold > 0:
        raise ValueError(f"threshold: expected > 0, got {threshold}")
    sinks = sink_scores(weights, visible=visible, is_causal=is_causal) > threshold
    if exclude_first:
        sinks = sinks.at[..., 0].set(False)
    return sinks


def calibration_edits(sinks: Mapping[int, Array], heads: Mapping[int, Sequence[int]],
                      num_heads: int, *, scale: float = 0.4) -> dict[int, Edits]:
    """ACT's training-free calibration as edits: in the chosen heads every row's weight on
    its sinks is multiplied by ``scale`` and the freed mass goes to the other keys in
    proportion to their weights.

    Args:
        sinks: {layer: bool [B, N, S]} (:func:`find_sinks` on that layer's weights).
        heads: {layer: [head, ...]}: the heads to calibrate (:func:`choose_heads`).
        num_heads: heads per layer.
        scale: the factor of the sinks' weights (ACT: 0.4).

    Returns:
        {layer: Edits} with ``sinks`` and a per-head ``sink_scale`` (1 for the others).

    Example:
        >>> import jax.numpy as jnp
        >>> e = calibration_edits({0: jnp.zeros((1, 2, 4), bool)}, {0: [1]}, 2)
        >>> e[0].sink_scale.tolist()
        [1.0, 0.4000000059604645]

    References:
        P50.
    """
    if not scale >= 0:
        raise ValueError(f"scale: expected >= 0, got {scale}")
    out = {}
    for layer, chosen in heads.items():
        if layer not in sinks:
            raise ValueError(f"sinks: no sinks given for layer {layer}")
        chosen = list(chosen)
        bad = [h for h in chosen if not 0 <= h < num_heads]
        if bad:
            raise ValueError(f"heads[{layer}]: heads {bad} out of range [0, {num_heads})")
        per_head = np.ones(num_heads, np.float32)
        per_head[chosen] = scale
        out[layer] = Edits(sinks=jnp.asarray(sinks[layer]), sink_scale=jnp.asarray(per_head))
    return out


def choose_heads(evaluate: Callable[[dict[int, list[int]]], float],
                 candidates: Sequence[tuple[int, int]], *, min_gain: float = 0.0
                 ) -> tuple[dict[int, list[int]], dict[tuple[int, int], float]]:
    """ACT's head search on held-out data: calibrate each candidate head alone and keep
    those that raise the held-out score by more than ``min_gain``.

    Args:
        evaluate: {layer: [heads]} -> held-out score (higher is better); {} is the
            uncalibrated model.
        candidates: (layer, head) pairs to try.

    Returns:
        ({layer: [heads kept]}, {(layer, head): gain}).

    Example:
        >>> chosen, gains = choose_heads(lambda h: float(h.get(0) == [1]), [(0, 0), (0, 1)])
        >>> chosen, gains[(0, 1)]
        ({0: [1]}, 1.0)

    References:
        P50 (per-(layer, head) search on held-out samples).
    """
    baseline = float(evaluate({}))
    gains, chosen = {}, {}
    for layer, head in candidates:
        gains[(layer, head)] = float(evaluate({layer: [head]})) - baseline
        if gains[(layer, head)] > min_gain:
            chosen.setdefault(layer, []).append(head)
    return chosen, gains


def head_sensitivity(weights: Array, tokens) -> Array:
    """Each head's sensitivity to a token set: the mean attention mass its rows put on it.

    Args:
        weights: [B, ..., N, P, S].
        tokens: bool [B, S] or [S] (e.g. the image tokens).

    Returns:
        [..., N] float32: mean over the batch and the rows.

    References:
        P62 (the measured visual sensitivity of each head).
    """
    weights = jnp.asarray(weights, jnp.float32)
    if weights.ndim < 3:
        raise ValueError(f"weights: expected [B, ..., P, S], got shape {weights.shape}")
    tokens = _token_mask("tokens", tokens, weights.shape[0], weights.shape[-1])
    tokens = tokens.reshape(-1, *([1] * (weights.ndim - 2)), weights.shape[-1])
    mass = jnp.where(tokens, weights, 0.0).sum(-1)  # [B, ..., P]
    return mass.mean(-1).mean(0)


def emphasis_bias(sensitivity: Array, tokens, *, strength: float = 1.0) -> Array:
    """Logit bias that amplifies the chosen tokens in each head in proportion to its
    sensitivity: the tokens' weights are multiplied by 1 + strength * s_h / max(s) and the
    rows renormalised (so the other tokens' weights shrink), which is the same as adding
    log(1 + strength * s_h / max(s)) to their logits.

    Args:
        sensitivity: [..., N] (:func:`head_sensitivity`).
        tokens: bool [S] or [B, S]: the tokens to emphasise (:func:`dual_stream_tokens`).
        strength: the amplification of the most sensitive head (>= 0).

    Returns:
        [..., N, 1, S] (or [B, ..., N, 1, S] for per-example tokens) float32, for
        ``Edits(logit_bias=...)`` (one layer's slice for one layer).

    Example:
        >>> import jax.numpy as jnp
        >>> b = emphasis_bias(jnp.array([0.5, 0.25]), jnp.array([True, False]))
        >>> [[round(float(x), 3) for x in row] for row in jnp.exp(b[:, 0])]
        [[2.0, 1.0], [1.5, 1.0]]

    References:
        P62 (head-specific modulation by visual sensitivity); PASTA-style steering is the
        negative of the same bias on the other tokens.
    """
    if not strength >= 0:
        raise ValueError(f"strength: expected >= 0, got {strength}")
    sensitivity = jnp.asarray(sensitivity, jnp.float32)
    tokens = jnp.asarray(tokens)
    check_bool("tokens", tokens)
    relative = sensitivity / jnp.maximum(sensitivity.max(), 1e-12)
    gain = jnp.log1p(strength * relative)[..., None, None]  # [..., N, 1, 1]
    if tokens.ndim == 2:  # per example: [B, 1..., 1, 1, S]
        tokens = tokens.reshape(tokens.shape[0], *([1] * (sensitivity.ndim + 1)),
                                tokens.shape[1])
    return jnp.where(tokens, gain, 0.0)


def dual_stream_tokens(received: Array, features: Array, grid: tuple[int, int], *,
                       num_local: int, num_attended: int) -> Array:
    """P62's dual-stream choice of image tokens to emphasise, as this library reads it:
    the ``num_local`` tokens whose features differ most from the mean of their 3 x 3
    neighbourhood (locally informative: edges, small objects) together with the
    ``num_attended`` tokens that receive the most attention (spatially significant: where
    the model looks).

    Args:
        received: [B, h * w]: attention each image token receives (e.g. the mean over heads
            and text rows of :func:`jattn.attention_weights`).
        features: [B, h * w, d]: the image tokens' features.
        grid: (h, w).
        num_local, num_attended: how many tokens each stream picks.

    Returns:
        bool [B, h * w]: the union of both streams.

    References:
        P62 (dual-stream token selection; the streams' scores are this library's reading of
        "locally informative and spatially significant").
    """
    h, w = grid
    received, features = jnp.asarray(received, jnp.float32), jnp.asarray(features, jnp.float32)
    check_rank("features", features, (3,), "[B, h * w, d]")
    B, L, d = features.shape
    if L != h * w or received.shape != (B, L):
        raise ValueError(f"received, features: expected [B, {h * w}] and [B, {h * w}, d] for "
                         f"grid {grid}, got {received.shape} and {features.shape}")
    for name, k in (("num_local", num_local), ("num_attended", num_attended)):
        if not 0 <= k <= L:
            raise ValueError(f"{name}: expected 0 <= {name} <= {L}, got {k}")
    image = features.reshape(B, h, w, d)
    padded = jnp.pad(image, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="edge")
    neighbourhood = sum(padded[:, i:i + h, j:j + w] for i in range(3) for j in range(3)) / 9
    contrast = jnp.linalg.norm(image - neighbourhood, axis=-1).reshape(B, L)

    def top(scores, k):
        chosen = jnp.zeros((B, L), bool)
        if k == 0:
            return chosen
        return chosen.at[jnp.arange(B)[:, None], keep_top_tokens(scores, k)].set(True)

    return top(contrast, num_local) | top(received, num_attended)
