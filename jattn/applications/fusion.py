"""Fusion by attention: one set of tokens reads another through keys and values.

* ``cls_cross_attention`` (P05 CrossViT): one branch's CLS token is the only query over
  [its own key; the other branch's patch keys]; linear in the number of tokens.
* ``global_local_cross_attention`` (P18 DCAL, GLCA): the top-R queries by a score (DCAL: the
  CLS row of :func:`jattn.attention_rollout`) attending to every key.
* ``appended_kv_attention`` (P08 IDM-VTON, P10 VideoBooth, P18 DCAL): attention whose keys
  and values are extended with an external set (a reference image's or garment's features,
  an image prompt, another image of the batch); ``pairwise_cross_attention`` (P18 PWCA) is the
  case where the external set is another batch element's own keys and values, and
  ``cross_frame_attention`` (P10) the video case where every frame attends to the first (and
  previous) frame, with the external set appended to the first frame's attention.
* ``attribute_conditioned_attention`` (P11 FairDomain, fair identity attention): queries and
  keys shifted by a projected attribute embedding.
* ``region_pooling`` (P55 MaskOVEN): region tokens as mask-weighted averages of patch
  features, to be attended together with the patch tokens.

Every softmax attention here runs through :func:`jattn.dot_product_attention`; plain dense
ground truth for each function lives in :mod:`jattn.reference`.

References:
    P05 CrossViT, "CrossViT: Cross-Attention Multi-Scale Vision Transformer for Image
    Classification".
    P08 IDM-VTON, "Improving Diffusion Models for Virtual Try-on".
    P10 VideoBooth, "VideoBooth: Diffusion-based Video Generation with Image Prompts".
    P11 FairDomain, "FairDomain: Achieving Fairness in Cross-Domain Medical Image
    Segmentation and Classification".
    P18 DCAL, "Dual Cross-Attention Learning for Fine-Grained Visual Categorization and
    Object Re-Identification".
    P55 Region-to-entity, "Reverse Region-to-Entity Annotation for Pixel-Level Visual Entity
    Linking".
"""

from __future__ import annotations

from collections.abc import Sequence

import jax.numpy as jnp
import numpy as np
from jax import lax

from jattn.core import masks as _masks
from jattn.core.attention import dot_product_attention
from jattn.core.masks import Mask
from jattn.core.shapes import (
    Array,
    DTypeError,
    accumulation_dtype,
    check_bool,
    check_broadcastable,
    check_floating,
    check_int,
    check_integer,
    check_qkv,
    check_rank,
    check_shape,
    check_values_in_range,
    left_pad_rank,
)

FRAME_SOURCES = ("first", "previous", "self")
EXTRA_FRAMES = ("first", "all")


def _check_key_mask(name: str, mask: Array | None, B: int, S: int) -> None:
    if mask is not None:
        check_bool(name, mask)
        check_shape(name, mask, (B, S), "BS")


def _check_same_dtype(first: tuple[str, Array], second: tuple[str, Array], dtype) -> None:
    """Both arrays floating and of ``dtype`` (the arrays they are concatenated with)."""
    for name, x in (first, second):
        check_floating(name, x)
        if x.dtype != dtype:
            raise DTypeError(f"{name}: expected dtype {dtype} as the keys/values it joins, "
                            f"got {x.dtype} (shape {x.shape})")


# --------------------------------------------------------------------------------------------
# P05 CrossViT


def cls_cross_attention(cls_query: Array, cls_key: Array | None, cls_value: Array | None,
                        patch_key: Array, patch_value: Array, *,
                        patch_mask: Array | None = None, scale: float | None = None,
                        is_causal: bool = False) -> Array:
    r"""CrossViT's cross-attention token fusion: a CLS token queries the other branch's patches.

    .. math::
        \mathrm{out} = \mathrm{softmax}\big(\mathrm{scale}\; q_{cls}
        [k_{cls}; K_{patch}]^\top\big)\, [v_{cls}; V_{patch}]

    CrossViT projects branch l's CLS token to branch s's width (f^l), concatenates it with
    branch s's patch tokens, and lets only the CLS token query that sequence: one query row,
    so time and memory are linear in the number of patches (the "linear cross attention" of
    the paper). The CLS token's own key and value are part of the key set, as in the paper's
    equations and code; pass ``cls_key = cls_value = None`` to attend to the patches alone.
    The patches form a set: permuting them (with their mask) leaves the output unchanged.
    Of CAB's patterns only non-causal cross is defined (one summary token reads another
    branch's set; no order between the two exists): ``is_causal=True`` raises
    NotImplementedError.

    Args:
        cls_query: [B, N, H] the CLS token's query heads.
        cls_key: [B, K, H] its key heads, or None (then ``cls_value`` is None too).
        cls_value: [B, K, Hv] its value heads, or None.
        patch_key: [B, S, K, H] the other branch's patch keys (N % K == 0: GQA).
        patch_value: [B, S, K, Hv].
        patch_mask: bool [B, S], True for real patches; None: all real.
        scale: logits scale, default 1 / sqrt(H).
        is_causal: must be False (see above).

    Returns:
        [B, N, Hv] in the input dtype: the fused CLS token per head.

    Raises:
        ValueError: wrong ranks or shapes, only one of cls_key / cls_value given.
        TypeError: non-floating arrays, mismatched dtypes, a non-boolean mask.
        NotImplementedError: ``is_causal=True``.

    >>> import jax.numpy as jnp
    >>> q = jnp.zeros((1, 2, 4)); k = jnp.zeros((1, 2, 4))
    >>> v = jnp.ones((1, 2, 3))
    >>> pk = jnp.zeros((1, 5, 2, 4)); pv = jnp.zeros((1, 5, 2, 3))
    >>> cls_cross_attention(q, k, v, pk, pv)[0, 0].tolist()    # 1 of 6 equal keys has v = 1
    [0.1666666716337204, 0.1666666716337204, 0.1666666716337204]

    References:
        P05 CrossViT, "CrossViT: Cross-Attention Multi-Scale Vision Transformer for Image
        Classification" (cross-attention token fusion).
    """
    if is_causal:
        raise NotImplementedError("is_causal: CrossViT's CLS token reads the other branch's "
                                  "unordered patch set; there is no causal form")
    check_rank("cls_query", cls_query, (3,), "[B, N, H]")
    check_rank("patch_key", patch_key, (4,), "[B, S, K, H]")
    check_rank("patch_value", patch_value, (4,), "[B, S, K, Hv]")
    if (cls_key is None) != (cls_value is None):
        raise ValueError("cls_key, cls_value: give both or neither")
    try:
        check_qkv(cls_query[:, None], patch_key, patch_value)
    except (TypeError, ValueError) as error:
        raise type(error)(f"cls_query, patch_key, patch_value: {error} (cls_query "
                          f"{cls_query.shape})") from None
    B, S = patch_key.shape[:2]
    _check_key_mask("patch_mask", patch_mask, B, S)
    key, value, mask = patch_key, patch_value, patch_mask
    if cls_key is not None:
        check_rank("cls_key", cls_key, (3,), "[B, K, H]")
        check_rank("cls_value", cls_value, (3,), "[B, K, Hv]")
        check_shape("cls_key", cls_key, (B, *patch_key.shape[2:]), "BKH")
        check_shape("cls_value", cls_value, (B, *patch_value.shape[2:]), "BKH")
        _check_same_dtype(("cls_key", cls_key), ("cls_value", cls_value), patch_key.dtype)
        key = jnp.concatenate([cls_key[:, None], patch_key], axis=1)
        value = jnp.concatenate([cls_value[:, None], patch_value], axis=1)
        if mask is not None:
            mask = jnp.concatenate([jnp.ones((B, 1), bool), mask], axis=1)
    attn_mask = None if mask is None else mask[:, None, None, :]
    out = dot_product_attention(cls_query[:, None], key, value, mask=attn_mask, scale=scale)
    return out[:, 0]


# --------------------------------------------------------------------------------------------
# P18 DCAL: global-local cross attention


def global_local_cross_attention(query: Array, key: Array, value: Array, scores: Array, *,
                                 top_r: int, kv_mask: Array | None = None,
                                 scale: float | None = None,
                                 is_causal: bool = False) -> tuple[Array, Array]:
    r"""DCAL's global-local cross attention: the top-R queries attend to all keys.

    .. math::
        \mathcal{R} = \mathrm{top}_R(\text{scores}), \qquad
        \mathrm{out}_r = \mathrm{softmax}\big(\mathrm{scale}\; q_{\mathcal{R}_r} K^\top\big) V

    The scores are usually the CLS row of :func:`attention_rollout` (DCAL: the accumulated
    attention of the CLS token to every patch; give the CLS position itself a score of -inf
    to keep it out). Only the R selected queries are computed, against every key: cost
    O(R S) instead of O(T S). Ties go to the lower index. The selection is not
    differentiable; gradients flow through the selected queries, the keys and the values.
    Non-causal (self or cross): the selection ranks all positions by a global score (the
    rollout of non-causal maps), so a causal form would leak; ``is_causal=True`` raises
    NotImplementedError.

    Args:
        query: [B, T, N, H].
        key: [B, S, K, H] (N % K == 0: GQA).
        value: [B, S, K, Hv].
        scores: [B, T] a score per query position (floating).
        top_r: R, the number of local queries (1 <= R <= T; DCAL uses 10% of the tokens).
        kv_mask: bool [B, S], True for real keys; None: all real.
        scale: logits scale, default 1 / sqrt(H).
        is_causal: must be False (see above).

    Returns:
        (out [B, R, N, Hv] in the input dtype, indices int32 [B, R]: the selected query
        positions, highest score first).

    Raises:
        ValueError: wrong shapes, R not in 1..T.
        TypeError: non-floating inputs or scores, a non-boolean mask.
        NotImplementedError: ``is_causal=True``.

    >>> import jax.numpy as jnp
    >>> q = jnp.zeros((1, 4, 1, 2)); kv = jnp.ones((1, 3, 1, 2))
    >>> out, idx = global_local_cross_attention(q, kv, kv, jnp.array([[0.1, 0.9, 0.5, 0.0]]),
    ...                                         top_r=2)
    >>> out.shape, idx.tolist()
    ((1, 2, 1, 2), [[1, 2]])

    References:
        P18 DCAL, "Dual Cross-Attention Learning for Fine-Grained Visual Categorization and
        Object Re-Identification" (global-local cross-attention, GLCA).
    """
    if is_causal:
        raise NotImplementedError("is_causal: GLCA selects queries by a global rollout score "
                                  "and reads every key; a causal form would leak")
    B, T, _, _, S, _, _ = check_qkv(query, key, value)
    check_floating("scores", scores)
    check_shape("scores", scores, (B, T), "BT")
    top_r = check_int("top_r", top_r)
    if top_r > T:
        raise ValueError(f"top_r: expected at most T={T} (query {query.shape}), got {top_r}")
    _check_key_mask("kv_mask", kv_mask, B, S)
    _, indices = lax.top_k(lax.stop_gradient(scores.astype(jnp.float32)), top_r)
    local = jnp.take_along_axis(query, indices[:, :, None, None], axis=1)
    attn_mask = None if kv_mask is None else kv_mask[:, None, None, :]
    out = dot_product_attention(local, key, value, mask=attn_mask, scale=scale)
    return out, indices.astype(jnp.int32)


# --------------------------------------------------------------------------------------------
# P08, P10, P18: keys and values extended with an external set


def _own_mask(mask, B: int, N: int, T: int, S: int) -> Array | None:
    """The caller's mask over its own keys as a dense bool [B|1, N|1, T, S] (None: none)."""
    if mask is None:
        return None
    if isinstance(mask, Mask):
        mask.check(T, S, "mask")
        check_broadcastable("mask", mask.dims(), (B, N), "BN")
        return mask.materialize(T, S)
    mask = jnp.asarray(mask)
    check_bool("mask", mask)
    check_rank("mask", mask, range(5), "broadcastable to [B, N, T, S]")
    mask = left_pad_rank(mask, 4)
    check_broadcastable("mask", mask.shape, (B, N, T, S), "BNTS")
    return jnp.broadcast_to(mask, (*mask.shape[:2], T, S))


def appended_kv_attention(query: Array, key: Array, value: Array, extra_key: Array,
                          extra_value: Array, *, mask=None, extra_mask: Array | None = None,
                          is_causal: bool = False, scale: float | None = None) -> Array:
    r"""Attention whose keys and values are extended with an external set.

    .. math::
        \mathrm{out} = \mathrm{softmax}\big(\mathrm{scale}\; q\, [K_{ext}; K]^\top
        \text{ where allowed}\big)\, [V_{ext}; V]

    The mechanism of reference / injected attention: IDM-VTON fuses the garment UNet's
    features into the try-on UNet's self-attention (tokens concatenated, the output for the
    person's tokens kept: exactly this, with the garment features projected by the same
    key/value weights); VideoBooth appends the image prompt's keys and values to cross-frame
    attention; DCAL's pair-wise cross attention appends another image's keys and values. The
    external tokens are always visible (they are context, not sequence): ``is_causal`` and
    ``mask`` apply to the own keys only, ``extra_mask`` says which external tokens are real.
    With every external token masked the result equals plain attention over the own keys.
    All four CAB patterns: own keys self or cross, causal (top-left aligned) or not.

    Args:
        query: [B, T, N, H].
        key: [B, S, K, H] the own keys (N % K == 0: GQA).
        value: [B, S, K, Hv].
        extra_key: [B, E, K, H] the external keys (E >= 1).
        extra_value: [B, E, K, Hv].
        mask: over the own keys: bool broadcastable to [B, N, T, S] or a
            :class:`jattn.masks.Mask`.
        extra_mask: bool [B, E], True for real external tokens; None: all real.
        is_causal: query i sees own keys j <= i (and every external key).
        scale: logits scale, default 1 / sqrt(H).

    Returns:
        [B, T, N, Hv] in the input dtype.

    Raises:
        ValueError: wrong ranks or shapes (external set of another batch, head count or head
            dim), a mask of the wrong shape.
        TypeError: non-floating arrays, an external set of another dtype than the keys, a
            non-boolean mask.

    >>> import jax.numpy as jnp
    >>> q = jnp.zeros((1, 2, 1, 4)); k = jnp.zeros((1, 2, 1, 4)); v = jnp.zeros((1, 2, 1, 1))
    >>> ek = jnp.zeros((1, 2, 1, 4)); ev = jnp.ones((1, 2, 1, 1))
    >>> appended_kv_attention(q, k, v, ek, ev, is_causal=True)[0, :, 0, 0].tolist()
    [0.6666666865348816, 0.5]

    References:
        P08 IDM-VTON (garment features fused into self-attention); P10 VideoBooth (image
        prompt keys/values appended to cross-frame attention); P18 DCAL (pair-wise
        cross-attention).
    """
    B, T, N, H, S, K, Hv = check_qkv(query, key, value)
    check_rank("extra_key", extra_key, (4,), "[B, E, K, H]")
    check_rank("extra_value", extra_value, (4,), "[B, E, K, Hv]")
    E = extra_key.shape[1]
    check_shape("extra_key", extra_key, (B, E, K, H), "BEKH")
    check_shape("extra_value", extra_value, (B, E, K, Hv), "BEKH")
    if E == 0:
        raise ValueError(f"extra_key: expected at least one external token, got "
                         f"{extra_key.shape}")
    _check_same_dtype(("extra_key", extra_key), ("extra_value", extra_value), key.dtype)
    _check_key_mask("extra_mask", extra_mask, B, E)
    own = _own_mask(mask, B, N, T, S)
    parts: list[Mask] = []
    if own is not None:
        parts.append(_masks.dense(jnp.concatenate(
            [jnp.ones((*own.shape[:3], E), bool), own], axis=-1)))
    if extra_mask is not None:
        parts.append(_masks.dense(jnp.concatenate(
            [extra_mask, jnp.ones((B, S), bool)], axis=-1)[:, None, None, :]))
    if is_causal:
        parts.append(_masks.causal(E))  # own key j sits at E + j: visible when j <= i
    keys = jnp.concatenate([extra_key, key], axis=1)
    values = jnp.concatenate([extra_value, value], axis=1)
    return dot_product_attention(query, keys, values, mask=_masks.all_of(parts), scale=scale)


def pairwise_cross_attention(query: Array, key: Array, value: Array, partner: Array, *,
                             mask=None, kv_mask: Array | None = None,
                             scale: float | None = None, is_causal: bool = False) -> Array:
    r"""DCAL's pair-wise cross attention: another image's keys and values join the softmax.

    .. math::
        \mathrm{out}_b = \mathrm{softmax}\big(\mathrm{scale}\; Q_b [K_b; K_{p(b)}]^\top\big)
        [V_b; V_{p(b)}], \qquad p = \text{partner}

    The partner image acts as a distractor that the query must learn to ignore: a training
    regulariser. **Training-only by design**: DCAL removes the PWCA branch at inference
    (it shares its weights with self-attention, so the inference model is the plain
    self-attention one); there is no meaningful inference form. Partners are indices into the
    batch (DCAL pairs each image with a random other one; p(b) = b gives the self-attention
    over a duplicated sequence, which equals plain self-attention). Non-causal self-attention
    as in DCAL (images have no token order; ``is_causal=True`` raises NotImplementedError);
    ``mask`` restricts the own keys and ``kv_mask`` marks the real tokens of the own and the
    partner's keys.

    Args:
        query: [B, T, N, H]; key: [B, S, K, H]; value: [B, S, K, Hv].
        partner: int [B] in [0, B), the batch element whose keys/values are appended.
        mask: over the own keys, as in :func:`appended_kv_attention`.
        kv_mask: bool [B, S], True for real tokens (applied to own and partner keys).
        scale: logits scale, default 1 / sqrt(H).
        is_causal: must be False (see above).

    Returns:
        [B, T, N, Hv] in the input dtype.

    Raises:
        ValueError: wrong shapes, partner indices outside [0, B) (when concrete).
        TypeError: non-integer partner, non-floating arrays, a non-boolean mask.
        NotImplementedError: ``is_causal=True``.

    >>> import jax.numpy as jnp
    >>> q = jnp.zeros((2, 1, 1, 2)); k = jnp.zeros((2, 1, 1, 2))
    >>> v = jnp.array([0.0, 1.0]).reshape(2, 1, 1, 1)
    >>> pairwise_cross_attention(q, k, v, jnp.array([1, 0]))[:, 0, 0, 0].tolist()
    [0.5, 0.5]

    References:
        P18 DCAL, "Dual Cross-Attention Learning for Fine-Grained Visual Categorization and
        Object Re-Identification" (pair-wise cross-attention, PWCA).
    """
    if is_causal:
        raise NotImplementedError("is_causal: DCAL's pair-wise cross attention is between "
                                  "two images' unordered patches; there is no causal form")
    dims = check_qkv(query, key, value)
    B, S = dims.B, dims.S
    partner = jnp.asarray(partner)
    check_integer("partner", partner)
    check_shape("partner", partner, (B,), "B")
    check_values_in_range("partner", partner, 0, B - 1)
    _check_key_mask("kv_mask", kv_mask, B, S)
    own = mask
    if kv_mask is not None:
        padding = kv_mask[:, None, None, :]
        own = padding if own is None else _masks.dense(padding) & (
            own if isinstance(own, Mask) else _masks.dense(jnp.asarray(own)))
    return appended_kv_attention(
        query, key, value, key[partner], value[partner], mask=own,
        extra_mask=None if kv_mask is None else kv_mask[partner], scale=scale)


def cross_frame_attention(query: Array, key: Array, value: Array, *,
                          frames: Sequence[str] = ("first", "previous"),
                          extra_key: Array | None = None, extra_value: Array | None = None,
                          extra_mask: Array | None = None, extra_frames: str = "first",
                          scale: float | None = None) -> Array:
    r"""Cross-frame attention of video diffusion, with optional injected keys and values.

    .. math::
        \mathrm{out}_f = \mathrm{softmax}\big(\mathrm{scale}\; Q_f
        [K_{ext}; K_{\phi_1(f)}; K_{\phi_2(f)}; \dots]^\top\big)
        [V_{ext}; V_{\phi_1(f)}; \dots]

    Frame f's queries attend to the tokens of the frames named by ``frames``: "first"
    (frame 0), "previous" (frame max(f - 1, 0)), "self" (frame f). ("first", "previous") is
    the sparse-causal cross-frame attention of Tune-A-Video that VideoBooth's base model uses;
    a frame named twice (frame 0 is both first and previous for f <= 1) is counted once.
    VideoBooth's attention injection appends the image prompt's keys and values
    (``extra_key``/``extra_value``, one set per video): with ``extra_frames="first"`` (our
    reading of "refines the details in the first frame and then it is propagated to the
    remaining frames") only frame 0's queries see them, and the later frames receive them
    through frame 0's tokens in the next layers; ``"all"`` appends them to every frame.
    Within a frame attention is non-causal (spatial); across frames it is causal by
    construction (frame f never reads a later frame). Cost ``O(F L (|frames| L + E))``.

    Args:
        query: [B, F, L, N, H] (F frames of L tokens).
        key: [B, F, L, K, H] (N % K == 0: GQA).
        value: [B, F, L, K, Hv].
        frames: a non-empty sequence of distinct names from ("first", "previous", "self").
        extra_key: [B, E, K, H] injected keys (e.g. an image prompt's), or None.
        extra_value: [B, E, K, Hv], with ``extra_key``.
        extra_mask: bool [B, E], True for real injected tokens; None: all real.
        extra_frames: "first" or "all": which frames' queries see the injected set.
        scale: logits scale, default 1 / sqrt(H).

    Returns:
        [B, F, L, N, Hv] in the input dtype.

    Raises:
        ValueError: wrong ranks or shapes, unknown or repeated frame names, only one of
            extra_key / extra_value, an unknown ``extra_frames``.
        TypeError: non-floating arrays, a non-boolean mask.

    >>> import jax.numpy as jnp
    >>> x = jnp.zeros((1, 3, 2, 1, 4))
    >>> v = jnp.arange(3.0).reshape(1, 3, 1, 1, 1) * jnp.ones((1, 3, 2, 1, 1))
    >>> cross_frame_attention(x, x, v)[0, :, 0, 0, 0].tolist()   # frames {0}, {0}, {0, 1}
    [0.0, 0.0, 0.5]

    References:
        P10 VideoBooth, "VideoBooth: Diffusion-based Video Generation with Image Prompts"
        (attention injection into cross-frame attention); Tune-A-Video (sparse-causal
        attention).
    """
    for name, x in (("query", query), ("key", key), ("value", value)):
        check_rank(name, x, (5,), "[B, F, L, heads, dim]")
    if query.shape[1:3] != key.shape[1:3]:
        raise ValueError(f"key: expected the query's frames and tokens [F, L] = "
                         f"{query.shape[1:3]}, got {key.shape}")
    B, F, L = query.shape[:3]
    flat = [x.reshape(B * F, L, *x.shape[3:]) for x in (query, key, value)]
    _, _, N, H, _, K, Hv = check_qkv(*flat)
    frames = tuple(frames) if not isinstance(frames, str) else (frames,)
    if not frames or any(f not in FRAME_SOURCES for f in frames) or len(set(frames)) != len(
            frames):
        raise ValueError(f"frames: expected distinct names from {FRAME_SOURCES}, got {frames!r}")
    if extra_frames not in EXTRA_FRAMES:
        raise ValueError(f"extra_frames: expected one of {EXTRA_FRAMES}, got {extra_frames!r}")
    if (extra_key is None) != (extra_value is None):
        raise ValueError("extra_key, extra_value: give both or neither")

    f = np.arange(F)
    source = {"first": np.zeros(F, int), "previous": np.maximum(f - 1, 0), "self": f}
    idx = np.stack([source[name] for name in frames], axis=1)  # [F, M] static
    M = idx.shape[1]
    first_time = np.array([[idx[i, m] not in idx[i, :m] for m in range(M)] for i in range(F)])
    k = key[:, idx].reshape(B * F, M * L, K, H)  # [B, F, M, L, K, H] -> per frame
    v = value[:, idx].reshape(B * F, M * L, K, Hv)
    own = None
    if not first_time.all():
        own = jnp.asarray(np.repeat(first_time, L, axis=1))[:, None, None, :]  # [F,1,1,M L]
        own = jnp.tile(own, (B, 1, 1, 1))
    q = flat[0]
    if extra_key is None:
        out = dot_product_attention(q, k, v, mask=own, scale=scale)
        return out.reshape(B, F, L, N, Hv)
    check_rank("extra_key", extra_key, (4,), "[B, E, K, H]")
    check_rank("extra_value", extra_value, (4,), "[B, E, K, Hv]")
    E = extra_key.shape[1]
    check_shape("extra_key", extra_key, (B, E, K, H), "BEKH")
    check_shape("extra_value", extra_value, (B, E, K, Hv), "BEKH")
    _check_key_mask("extra_mask", extra_mask, B, E)
    visible = jnp.ones((B, F, E), bool) if extra_mask is None else jnp.broadcast_to(
        extra_mask[:, None, :], (B, F, E))
    if extra_frames == "first":
        visible = visible & (jnp.arange(F) == 0)[None, :, None]
    ek = jnp.repeat(extra_key, F, axis=0)
    ev = jnp.repeat(extra_value, F, axis=0)
    out = appended_kv_attention(q, k, v, ek, ev, mask=own,
                                extra_mask=visible.reshape(B * F, E), scale=scale)
    return out.reshape(B, F, L, N, Hv)


# --------------------------------------------------------------------------------------------
# P11 FairDomain


def attribute_conditioned_attention(query: Array, key: Array, value: Array,
                                    attribute_query: Array, attribute_key: Array | None = None,
                                    *, mask=None, is_causal: bool = False,
                                    scale: float | None = None) -> Array:
    r"""Attention whose queries and keys are shifted by an attribute embedding (fair identity
    attention).

    .. math::
        \mathrm{out} = \mathrm{softmax}\big(\mathrm{scale}\,(q_t + a^q_b)(k_s + a^k_b)^\top
        \big)\, v

    FairDomain's FIA "uses self-attention to adjust feature importance based on demographic
    attributes". The abstract leaves the form open; our reading: a learned embedding e_a of
    the example's attribute (e.g. race, sex, ethnicity group) is added to the tokens before
    the query and key projections, while the values stay the image features, so the
    attention pattern (which features matter) depends on the attribute and the content
    mixed does not. With linear projections, (x + e_a) W = x W + e_a W: the attribute enters
    as a per-example offset a^q = e_a W_q, a^k = e_a W_k of the query and key heads, which is
    what this function takes (:class:`jattn.nn.FairIdentityAttention` holds e and W).
    Every CAB pattern (``is_causal``, T != S) is supported; the offset is per example.

    Args:
        query: [B, T, N, H]; key: [B, S, K, H] (N % K == 0: GQA); value: [B, S, K, Hv].
        attribute_query: [B, N, H] the attribute's query offset a^q.
        attribute_key: [B, K, H] the attribute's key offset a^k, or None (no key offset).
        mask: bool broadcastable to [B, N, T, S] or a :class:`jattn.masks.Mask`.
        is_causal: query i sees keys j <= i.
        scale: logits scale, default 1 / sqrt(H).

    Returns:
        [B, T, N, Hv] in the input dtype.

    Raises:
        ValueError: wrong shapes. TypeError: non-floating arrays, mismatched dtypes.

    >>> import jax.numpy as jnp
    >>> q = jnp.zeros((1, 1, 1, 1)); k = jnp.array([0.0, 1.0]).reshape(1, 2, 1, 1)
    >>> v = jnp.array([0.0, 1.0]).reshape(1, 2, 1, 1)
    >>> a = jnp.full((1, 1, 1), 50.0)      # the attribute makes the second key win
    >>> float(attribute_conditioned_attention(q, k, v, a)[0, 0, 0, 0])
    1.0

    References:
        P11 FairDomain, "FairDomain: Achieving Fairness in Cross-Domain Medical Image
        Segmentation and Classification" (fair identity attention, FIA).
    """
    B, _, N, H, _, K, _ = check_qkv(query, key, value)
    check_floating("attribute_query", attribute_query)
    check_shape("attribute_query", attribute_query, (B, N, H), "BNH")
    q = query + attribute_query[:, None].astype(query.dtype)
    k = key
    if attribute_key is not None:
        check_floating("attribute_key", attribute_key)
        check_shape("attribute_key", attribute_key, (B, K, H), "BKH")
        k = key + attribute_key[:, None].astype(key.dtype)
    return dot_product_attention(q, k, value, mask=mask, is_causal=is_causal, scale=scale)


# --------------------------------------------------------------------------------------------
# P55 region tokens


def _mask_weights(masks: Array, grid: tuple[int, ...]) -> Array:
    """Pixel masks [B, M, *pixels] -> the covered fraction of each feature cell [B, M, *grid]
    (mean over each cell's pixels; the pixel grid must be a whole multiple of the feature
    grid)."""
    pixels = masks.shape[2:]
    if len(pixels) != len(grid) or any(p % g for p, g in zip(pixels, grid, strict=True)):
        raise ValueError(f"masks: expected pixel sizes that are whole multiples of the feature "
                         f"grid {grid}, got masks {masks.shape}")
    shape = [*masks.shape[:2]]
    for p, g in zip(pixels, grid, strict=True):
        shape += [g, p // g]
    w = masks.reshape(shape)
    return w.mean(axis=tuple(range(3, 3 + 2 * len(grid), 2)))


def region_pooling(features: Array, masks: Array) -> tuple[Array, Array]:
    r"""Region tokens: the mask-weighted average of the features under each region's mask.

    .. math::
        r_m = \frac{\sum_p w_{mp}\, f_p}{\sum_p w_{mp}}, \qquad
        w_{mp} = \text{fraction of feature cell } p \text{ covered by mask } m

    MaskOVEN's visual semantic tokenization: each pixel mask (a referred object) becomes one
    token, the average of the patch features it covers, and the region tokens are then
    attended together with the patch tokens (concatenate them as extra keys/values, or as
    extra tokens of self-attention, with ``valid`` as their key mask). Pixel masks finer than
    the feature grid are area-averaged per cell (the pixel grid must be a whole multiple of
    the feature grid; resize beforehand otherwise). Soft masks (weights in [0, 1]) are
    accepted. Pixels outside every mask do not matter; an empty mask gives a zero token and
    ``valid`` False. Not an attention itself (no softmax); it produces the tokens one.

    Args:
        features: [B, h, w, D] (or [B, P, D] with flat masks) patch features.
        masks: [B, M, Hm, Wm] bool or floating (Hm, Wm multiples of h, w), or [B, M, P] for
            flat features.

    Returns:
        (tokens [B, M, D] in the features' dtype, valid bool [B, M]).

    Raises:
        ValueError: wrong ranks, mismatched batch, a pixel grid that is not a multiple of the
            feature grid. TypeError: non-floating features, masks neither bool nor floating.

    >>> import jax.numpy as jnp
    >>> f = jnp.arange(4.0).reshape(1, 2, 2, 1)             # a 2 x 2 grid of 1-d features
    >>> m = jnp.zeros((1, 1, 4, 4), bool).at[0, 0, :2, :].set(True)   # the top row of cells
    >>> tokens, valid = region_pooling(f, m)
    >>> tokens.tolist(), valid.tolist()
    ([[[0.5]]], [[True]])

    References:
        P55 Region-to-entity, "Reverse Region-to-Entity Annotation for Pixel-Level Visual
        Entity Linking" (region-interacted attention via visual semantic tokenization).
    """
    check_floating("features", features)
    check_rank("features", features, (3, 4), "[B, h, w, D] or [B, P, D]")
    spatial = features.ndim - 2
    check_rank("masks", masks, (2 + spatial,), "[B, M, Hm, Wm]" if spatial == 2 else "[B, M, P]")
    if masks.dtype != jnp.bool_ and not jnp.issubdtype(masks.dtype, jnp.floating):
        raise DTypeError(f"masks: expected a boolean or floating dtype, got {masks.dtype} "
                        f"(shape {masks.shape})")
    if masks.shape[0] != features.shape[0]:
        raise ValueError(f"masks: expected batch {features.shape[0]} as features "
                         f"{features.shape}, got {masks.shape}")
    dtype = accumulation_dtype(features.dtype)
    weights = _mask_weights(masks.astype(dtype), tuple(features.shape[1:-1]))
    B, M = masks.shape[:2]
    weights = weights.reshape(B, M, -1)
    flat = features.reshape(B, -1, features.shape[-1]).astype(dtype)
    total = weights.sum(-1)
    valid = total > 0
    summed = jnp.einsum("bmp,bpd->bmd", weights, flat)
    tokens = summed / jnp.where(valid, total, 1)[..., None]
    return tokens.astype(features.dtype), valid
