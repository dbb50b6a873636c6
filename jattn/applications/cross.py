"""Cross attention between sets: label/query decoders, co-attention, latent resamplers,
multi-level cross attention, and the cross-encoder's joint pair encoding.

* ``label_attention`` (P77 KeNet, P15 CrossTune, P58 RAM++, P01 SMTR, P71 PMP): a set of
  label (or learned, or text-derived) queries attends to a sequence of features; each label
  gets its own pooled feature. ``label_logits`` is the per-label (or shared) linear scoring
  head on those features.
* ``co_attention`` (P36 M3EL, P14 TransRefer3D's entity co-attention): two sequences attend to
  each other through ONE shared affinity matrix, softmax-normalised along each direction.
* ``latent_cross_attention`` (P06 Concept-Centric Transformers, P60 TextHawk, P13 gCOG): a few
  latent (concept) slots read an input by cross attention (Perceiver); optionally the slots'
  own keys/values are appended to the input's (Flamingo's Perceiver resampler).
* ``multi_level_cross_attention`` (P60 TextHawk's MLCA, P13): queries attend to several feature
  levels of different lengths, with one softmax over all levels ("joint") or one per level,
  summed ("sum").
* ``pair_inputs`` / ``pair_mask`` / ``cross_encoder_score`` / ``bi_encoder_score`` (P34
  Trans-Encoder): a sentence pair as one joint sequence with segment ids; the mask that makes
  one encoder a cross-encoder (every valid token sees both sentences) or a bi-encoder (each
  sentence sees only itself), and the two scoring heads.

Every attention runs through :func:`jattn.dot_product_attention` (probabilities, when asked
for, through :func:`jattn.attention_weights`). Of CAB's four patterns these are non-causal
cross attention only (a set of labels, latents, feature levels or a second sentence has no
order a causal mask could respect, so no causal option is offered), and the pair mask is
non-causal self-attention over the joint sequence. Plain dense ground truth
for each lives in :mod:`jattn.reference`.

References:
    P01 SMTR, "Out of Length Text Recognition with Sub-String Matching".
    P06 Concept-Centric Transformers, "Concept-Centric Transformers: Enhancing Model
    Interpretability through Object-Centric Concept Learning within a Shared Global
    Workspace".
    P13 gCOG, "On the generalization capacity of neural networks during generic multimodal
    reasoning".
    P14 TransRefer3D, "TransRefer3D: Entity-and-Relation Aware Transformer for Fine-Grained 3D
    Visual Grounding".
    P15 CrossTune, "CrossTune: Black-Box Few-Shot Classification with Label Enhancement".
    P34 Trans-Encoder, "Trans-Encoder: Unsupervised sentence-pair modelling through self- and
    mutual-distillations".
    P36 M3EL, "Multi-level Matching Network for Multimodal Entity Linking".
    P58 open-set tagging (RAM++), "Inject Semantic Concepts into Image Tagging for Open-Set
    Recognition".
    P60 TextHawk, "TextHawk: Exploring Efficient Fine-Grained Perception of Multimodal Large
    Language Models".
    P71 PMP, "Prompt-Guided Mask Proposal for Two-Stage Open-Vocabulary Segmentation".
    P77 KeNet, "KeNet: Knowledge-enhanced Doc-Label Attention Network for Multi-label text
    classification".
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp

from jattn.core.attention import attention_weights, dot_product_attention, masked_softmax
from jattn.core.shapes import (
    Array,
    DTypeError,
    accumulation_dtype,
    check_bool,
    check_floating,
    check_int,
    check_rank,
    check_shape,
    is_concrete,
)

COMBINES = ("joint", "sum")
PAIR_MODES = ("cross", "bi")
POOLINGS = ("first", "mean")


# --------------------------------------------------------------------------------------------
# shared checks


def _check_mask(name: str, mask, shape: tuple[int, ...], letters: str) -> Array | None:
    if mask is None:
        return None
    mask = jnp.asarray(mask)
    check_bool(name, mask)
    check_shape(name, mask, shape, letters)
    return mask


def _check_same_dtype(names: str, *arrays: Array) -> None:
    if len({a.dtype for a in arrays}) > 1:
        raise DTypeError(f"{names}: expected one dtype, got "
                        f"{', '.join(str(a.dtype) for a in arrays)}")


def _split_heads(name: str, x: Array, num_heads: int) -> Array:
    """[..., D] -> [..., num_heads, D // num_heads]."""
    if x.shape[-1] % num_heads:
        raise ValueError(f"{name}: last dim {x.shape[-1]} is not a multiple of num_heads="
                         f"{num_heads} (shape {x.shape})")
    return x.reshape(*x.shape[:-1], num_heads, x.shape[-1] // num_heads)


# --------------------------------------------------------------------------------------------
# label / query cross attention (P01, P15, P58, P71, P77)


def label_attention(label_queries: Array, features: Array, values: Array | None = None, *,
                    num_heads: int = 1, mask: Array | None = None,
                    label_mask: Array | None = None, scale: float | None = None,
                    return_weights: bool = False) -> Array | tuple[Array, Array]:
    r"""Label-wise attention: every label query pools the features with its own softmax.

    .. math::
        A^{(n)}_{l,s} = \mathrm{softmax}_{s:\,m_s}\big(\mathrm{scale}\,
        \langle q^{(n)}_l, f^{(n)}_s\rangle\big), \qquad
        o^{(n)}_l = \sum_s A^{(n)}_{l,s}\, v^{(n)}_s

    with heads n splitting the feature dim (D = N * H, Dv = N * Hv) and o_l the concatenation
    of the heads. The queries are learned label embeddings (KeNet's label embedding, LSAN-style
    label-wise attention), text-derived label descriptions (CrossTune's label descriptions,
    RAM++'s LLM tag descriptions: one [L, D] set shared by the batch, or [B, L, D] per
    example), or a decoder's queries (SMTR's next/previous queries, PMP's query tokens).
    Projections are the caller's (see :class:`jattn.nn.LabelAttention`): this is the
    attention between projected queries and features. ``values`` defaults to the features
    (the document's hidden states serve as keys and values, as in label-wise attention).
    A padded label (``label_mask`` False) and a label with no valid feature get a zero row.

    Of CAB's four patterns: non-causal cross only (a label set has no order).

    Args:
        label_queries: [L, D] (shared by the batch) or [B, L, D].
        features: [B, S, D] the keys.
        values: [B, S, Dv] (default: ``features``); Dv a multiple of ``num_heads``.
        num_heads: N, a divisor of D and Dv.
        mask: bool [B, S], True for real features; None: all valid.
        label_mask: bool [L] or [B, L], True for real labels; None: all valid.
        scale: logits scale; default 1 / sqrt(D / N).
        return_weights: also return the attention probabilities.

    Returns:
        pooled [B, L, Dv] in the features' dtype; with ``return_weights`` the pair (pooled,
        weights [B, N, L, S] float32, 0 on masked entries).

    Raises:
        ValueError: wrong ranks, shapes that disagree, dims not divisible by ``num_heads``,
            masks of the wrong shape.
        TypeError: non-floating arrays, queries/features/values of different dtypes,
            non-boolean masks.

    >>> import jax, jax.numpy as jnp
    >>> labels = jax.random.normal(jax.random.key(0), (5, 8))      # 5 label embeddings
    >>> doc = jax.random.normal(jax.random.key(1), (2, 11, 8))     # 2 documents, 11 tokens
    >>> label_attention(labels, doc, num_heads=2).shape
    (2, 5, 8)

    References:
        P77 KeNet, "KeNet: Knowledge-enhanced Doc-Label Attention Network for Multi-label text
        classification"; P15 CrossTune, "CrossTune: Black-Box Few-Shot Classification with
        Label Enhancement"; P58 RAM++, "Inject Semantic Concepts into Image Tagging for
        Open-Set Recognition"; P01 SMTR; P71 PMP.
    """
    label_queries, features = jnp.asarray(label_queries), jnp.asarray(features)
    values = features if values is None else jnp.asarray(values)
    check_rank("label_queries", label_queries, (2, 3), "[L, D] or [B, L, D]")
    check_rank("features", features, (3,), "[B, S, D]")
    check_rank("values", values, (3,), "[B, S, Dv]")
    for name, x in (("label_queries", label_queries), ("features", features),
                    ("values", values)):
        check_floating(name, x)
    _check_same_dtype("label_queries, features, values", label_queries, features, values)
    num_heads = check_int("num_heads", num_heads)
    B, S, D = features.shape
    L = label_queries.shape[-2]
    if label_queries.shape[-1] != D or (label_queries.ndim == 3 and label_queries.shape[0] != B):
        raise ValueError(f"label_queries: expected [L, D={D}] or [B={B}, L, D={D}] to match "
                         f"features {features.shape}, got {label_queries.shape}")
    if values.shape[:2] != (B, S):
        raise ValueError(f"values: expected [B={B}, S={S}, Dv] as features, got {values.shape}")
    mask = _check_mask("mask", mask, (B, S), "BS")
    if label_mask is not None:
        label_mask = jnp.asarray(label_mask)
        check_bool("label_mask", label_mask)
        if label_mask.shape not in ((L,), (B, L)):
            raise ValueError(f"label_mask: expected shape ({L},) or ({B}, {L}), "
                             f"got {label_mask.shape}")

    q = _split_heads("label_queries", jnp.broadcast_to(label_queries, (B, L, D)), num_heads)
    k = _split_heads("features", features, num_heads)
    v = _split_heads("values", values, num_heads)
    allowed = None
    if mask is not None or label_mask is not None:
        allowed = jnp.ones((B, 1, L, S), bool)
        if mask is not None:
            allowed = allowed & mask[:, None, None, :]
        if label_mask is not None:
            allowed = allowed & jnp.broadcast_to(label_mask, (B, L))[:, None, :, None]
    out = dot_product_attention(q, k, v, mask=allowed, scale=scale)
    pooled = out.reshape(B, L, -1)
    if not return_weights:
        return pooled
    return pooled, attention_weights(q, k, mask=allowed, scale=scale)


def label_logits(pooled: Array, weight: Array, bias: Array | None = None) -> Array:
    r"""Score each label from its own pooled feature: :math:`y_l = \langle w_l, o_l\rangle
    + b_l` (per-label weights, KeNet / LSAN / ML-Decoder's group linear layer) or
    :math:`y_l = \langle w, o_l\rangle + b` (one shared weight: open-set labels, RAM++).

    Args:
        pooled: [B, L, D] from :func:`label_attention`.
        weight: [L, D] (per label) or [D] (shared).
        bias: [L] or [] (scalar); None: no bias.

    Returns:
        logits [B, L], accumulated in float32 or wider, in pooled's dtype.

    Raises:
        ValueError: shapes that disagree. TypeError: non-floating arrays.

    >>> import jax.numpy as jnp
    >>> label_logits(jnp.ones((1, 2, 3)), jnp.array([[1.0, 0, 0], [1, 1, 1]])).tolist()
    [[1.0, 3.0]]

    References:
        P77 KeNet; P58 RAM++; P15 CrossTune.
    """
    pooled, weight = jnp.asarray(pooled), jnp.asarray(weight)
    check_rank("pooled", pooled, (3,), "[B, L, D]")
    check_floating("pooled", pooled)
    check_floating("weight", weight)
    _, L, D = pooled.shape
    if weight.shape not in ((L, D), (D,)):
        raise ValueError(f"weight: expected shape ({L}, {D}) or ({D},) to match pooled "
                         f"{pooled.shape}, got {weight.shape}")
    dtype = accumulation_dtype(jnp.result_type(pooled, weight))
    logits = jnp.sum(pooled.astype(dtype) * weight.astype(dtype), axis=-1)
    if bias is not None:
        bias = jnp.asarray(bias)
        check_floating("bias", bias)
        if bias.shape not in ((L,), ()):
            raise ValueError(f"bias: expected shape ({L},) or () , got {bias.shape}")
        logits = logits + bias.astype(dtype)
    return logits.astype(pooled.dtype)


# --------------------------------------------------------------------------------------------
# co-attention (P36, P14)


def _as_heads(name: str, x: Array) -> Array:
    check_rank(name, x, (3, 4), "[B, T, D] or [B, T, N, H]")
    check_floating(name, x)
    return x[:, :, None, :] if x.ndim == 3 else x


def co_attention(a: Array, b: Array, value_a: Array | None = None,
                 value_b: Array | None = None, *, a_mask: Array | None = None,
                 b_mask: Array | None = None, scale: float | None = None,
                 return_weights: bool = False):
    r"""Parallel co-attention: one affinity matrix between two sequences, normalised along
    each direction, so that each sequence reads the other.

    .. math::
        C = \mathrm{scale}\; a\, b^\top \in \mathbb{R}^{T_a \times T_b}, \quad
        \tilde a = \mathrm{softmax}_{\text{rows}}(C)\, v_b, \quad
        \tilde b = \mathrm{softmax}_{\text{rows}}(C^\top)\, v_a

    (per head, masked entries excluded). The reading chosen for M3EL's bidirectional
    textual-to-visual / visual-to-textual matching and TransRefer3D's entity co-attention is
    Lu et al.'s parallel co-attention with the dot-product affinity of projected features
    (a bilinear affinity a W b^T is the same thing with W folded into one side's
    projection): both directions share C, which is what makes them one co-attention rather
    than two unrelated cross attentions (for the latter, call
    :func:`jattn.dot_product_attention` twice with separate projections). Swapping the
    inputs swaps the outputs. A padded token (mask False) gets a zero output row.

    Of CAB's four patterns: non-causal cross only (the two sequences are not aligned in
    time, so "causal" has no meaning between them).

    Args:
        a: [B, Ta, D] or [B, Ta, N, H] (projected affinity features of the first sequence).
        b: [B, Tb, D] or [B, Tb, N, H], same rank, D / (N, H) as ``a``.
        value_a: what b reads from a: [B, Ta, Dv] or [B, Ta, N, Hv] (default: ``a``).
        value_b: what a reads from b: [B, Tb, Dv'] or [B, Tb, N, Hv'] (default: ``b``).
        a_mask: bool [B, Ta], True for real tokens; None: all valid.
        b_mask: bool [B, Tb].
        scale: logits scale; default 1 / sqrt(H) (H = D for rank-3 inputs).
        return_weights: also return the two probability maps.

    Returns:
        (a_attends_b [B, Ta, (N,) Hv'], b_attends_a [B, Tb, (N,) Hv]) in the inputs' rank and
        dtype; with ``return_weights`` also (weights_ab [B, N, Ta, Tb], weights_ba [B, N, Tb,
        Ta]) float32, the latter the column-normalised transpose of the same affinity.

    Raises:
        ValueError: wrong ranks, shapes that disagree, masks of the wrong shape.
        TypeError: non-floating or mixed dtypes, non-boolean masks.

    >>> import jax, jax.numpy as jnp
    >>> a = jax.random.normal(jax.random.key(0), (2, 5, 8))
    >>> b = jax.random.normal(jax.random.key(1), (2, 7, 8))
    >>> ab, ba = co_attention(a, b)
    >>> ab.shape, ba.shape
    ((2, 5, 8), (2, 7, 8))

    References:
        P36 M3EL, "Multi-level Matching Network for Multimodal Entity Linking"; P14
        TransRefer3D, "TransRefer3D: Entity-and-Relation Aware Transformer for Fine-Grained
        3D Visual Grounding" (entity co-attention).
    """
    a, b = jnp.asarray(a), jnp.asarray(b)
    rank = a.ndim
    qa, qb = _as_heads("a", a), _as_heads("b", b)
    if b.ndim != rank:
        raise ValueError(f"b: expected rank {rank} as a {a.shape}, got shape {b.shape}")
    va = qa if value_a is None else _as_heads("value_a", jnp.asarray(value_a))
    vb = qb if value_b is None else _as_heads("value_b", jnp.asarray(value_b))
    for name, v in (("value_a", value_a), ("value_b", value_b)):
        if v is not None and jnp.ndim(v) != rank:
            raise ValueError(f"{name}: expected rank {rank} as a {a.shape}, got shape "
                             f"{jnp.shape(v)}")
    _check_same_dtype("a, b, value_a, value_b", qa, qb, va, vb)
    B, Ta, N, H = qa.shape
    Tb = qb.shape[1]
    if qb.shape[0] != B or qb.shape[2:] != (N, H):
        raise ValueError(f"b: expected [B={B}, Tb, {'N, H' if rank == 4 else 'D'}] to match "
                         f"a {a.shape}, got {b.shape}")
    if va.shape[:3] != (B, Ta, N):
        raise ValueError(f"value_a: expected its leading dims to match a {a.shape}, got "
                         f"{va.shape}")
    if vb.shape[:3] != (B, Tb, N):
        raise ValueError(f"value_b: expected its leading dims to match b {b.shape}, got "
                         f"{vb.shape}")
    a_mask = _check_mask("a_mask", a_mask, (B, Ta), "BT")
    b_mask = _check_mask("b_mask", b_mask, (B, Tb), "BT")
    ab_mask = None
    if a_mask is not None or b_mask is not None:
        am = jnp.ones((B, Ta), bool) if a_mask is None else a_mask
        bm = jnp.ones((B, Tb), bool) if b_mask is None else b_mask
        ab_mask = am[:, None, :, None] & bm[:, None, None, :]  # [B, 1, Ta, Tb]
    ba_mask = None if ab_mask is None else jnp.swapaxes(ab_mask, -1, -2)
    # One affinity, two normalisations: a -> b uses C = scale a b^T, b -> a uses C^T.
    a_reads_b = dot_product_attention(qa, qb, vb, mask=ab_mask, scale=scale)
    b_reads_a = dot_product_attention(qb, qa, va, mask=ba_mask, scale=scale)
    if rank == 3:
        a_reads_b, b_reads_a = a_reads_b[:, :, 0], b_reads_a[:, :, 0]
    if not return_weights:
        return a_reads_b, b_reads_a
    return (a_reads_b, b_reads_a, attention_weights(qa, qb, mask=ab_mask, scale=scale),
            attention_weights(qb, qa, mask=ba_mask, scale=scale))


# --------------------------------------------------------------------------------------------
# latent slots / resampler (P06, P60, P13)


def _check_slot_inputs(name: str, queries, keys, values) -> tuple[Array, Array, Array]:
    """Queries [M, N, H] or [B, M, N, H] (shared or per example), keys [B, S, K, H] and
    values [B, S, K, Hv], as arrays."""
    queries, keys, values = (jnp.asarray(x) for x in (queries, keys, values))
    check_rank(name, queries, (3, 4), "[M, N, H] or [B, M, N, H]")
    check_rank("keys", keys, (4,), "[B, S, K, H]")
    check_rank("values", values, (4,), "[B, S, K, Hv]")
    B = keys.shape[0]
    if queries.ndim == 4 and queries.shape[0] != B:
        raise ValueError(f"{name}: expected [B={B}, M, N, H] to match keys {keys.shape}, "
                         f"got {queries.shape}")
    return queries, keys, values


def latent_cross_attention(latents: Array, keys: Array, values: Array, *,
                           mask: Array | None = None, latent_keys: Array | None = None,
                           latent_values: Array | None = None, scale: float | None = None
                           ) -> Array:
    r"""Latent slots read an input by cross attention (Perceiver); optionally they also see
    themselves (Flamingo's Perceiver resampler).

    .. math::
        o_m = \mathrm{softmax}_{j}\big(\mathrm{scale}\, \langle z_m, k_j \rangle\big)\,
        v_j,\qquad j \in \{\text{valid inputs}\} \;[\,\cup\, \{\text{latents}\}\,]

    The M latent queries are learned (the same for every example, [M, N, H]) or per example
    ([B, M, N, H], e.g. TextHawk's query proposal network). With ``latent_keys`` /
    ``latent_values`` (the latents' own keys and values, from the same key/value projection
    in Flamingo) the keys are the concatenation [inputs; latents], so each latent's softmax
    also covers the latents: Flamingo's resampler. Without them it is Perceiver / Q-Former
    cross attention (inputs only). Concept-Centric Transformers' concept slots read the input
    embeddings this way; the broadcast back (inputs reading the slots) is plain
    :func:`jattn.dot_product_attention` with the roles swapped. A latent with no valid input
    and no latent keys returns zeros.

    Of CAB's four patterns: non-causal cross only (latent slots have no position in the
    input's order).

    Args:
        latents: [M, N, H] (shared) or [B, M, N, H], the projected latent queries.
        keys: [B, S, K, H] (N % K == 0: GQA).
        values: [B, S, K, Hv].
        mask: bool [B, S], True for real inputs; None: all valid.
        latent_keys: [M, K, H] or [B, M, K, H]; give with ``latent_values`` or not at all.
        latent_values: [M, K, Hv] or [B, M, K, Hv].
        scale: logits scale; default 1 / sqrt(H).

    Returns:
        [B, M, N, Hv] in the inputs' dtype.

    Raises:
        ValueError: wrong ranks or shapes, only one of latent_keys / latent_values.
        TypeError: non-floating or mixed dtypes, a non-boolean mask.

    >>> import jax, jax.numpy as jnp
    >>> z = jax.random.normal(jax.random.key(0), (4, 2, 8))          # 4 latents, 2 heads
    >>> x = jax.random.normal(jax.random.key(1), (3, 50, 2, 8))      # 50 input tokens
    >>> latent_cross_attention(z, x, x).shape
    (3, 4, 2, 8)

    References:
        P06 Concept-Centric Transformers (concept slots attending to input embeddings); P60
        TextHawk (the resampler); P13 gCOG (Perceiver-style cross attention between input
        domains).
    """
    latents, keys, values = _check_slot_inputs("latents", latents, keys, values)
    B, S, K, H = keys.shape
    M = latents.shape[-3]
    q = jnp.broadcast_to(latents, (B, *latents.shape[-3:]))
    mask = _check_mask("mask", mask, (B, S), "BS")
    if (latent_keys is None) != (latent_values is None):
        raise ValueError("latent_keys, latent_values: give both or neither")
    if latent_keys is not None:
        lk, lv = jnp.asarray(latent_keys), jnp.asarray(latent_values)
        check_rank("latent_keys", lk, (3, 4), "[M, K, H] or [B, M, K, H]")
        check_rank("latent_values", lv, (3, 4), "[M, K, Hv] or [B, M, K, Hv]")
        if lk.shape[-3:] != (M, K, H) or (lk.ndim == 4 and lk.shape[0] != B):
            raise ValueError(f"latent_keys: expected [(B={B},) M={M}, K={K}, H={H}], got "
                             f"{lk.shape}")
        if lv.shape[-3:] != (M, K, values.shape[-1]) or (lv.ndim == 4 and lv.shape[0] != B):
            raise ValueError(f"latent_values: expected [(B={B},) M={M}, K={K}, "
                             f"Hv={values.shape[-1]}], got {lv.shape}")
        _check_same_dtype("keys, latent_keys, values, latent_values", keys, lk, values, lv)
        keys = jnp.concatenate([keys, jnp.broadcast_to(lk, (B, M, K, H))], axis=1)
        values = jnp.concatenate([values, jnp.broadcast_to(lv, (B, *lv.shape[-3:]))], axis=1)
        if mask is not None:
            mask = jnp.concatenate([mask, jnp.ones((B, M), bool)], axis=1)
    if mask is not None:
        mask = mask[:, None, None, :]
    return dot_product_attention(q, keys, values, mask=mask, scale=scale)


def slot_attention(slots: Array, keys: Array, values: Array, *, mask: Array | None = None,
                   scale: float | None = None, eps: float = 1e-8) -> tuple[Array, Array]:
    r"""One round of slot competition (Slot Attention): the slots compete for each input,
    then each slot takes the weighted mean of the inputs it won.

    .. math::
        a_{mj} = \mathrm{softmax}_{m}\big(\mathrm{scale}\, \langle z_m, k_j \rangle\big)
        + \epsilon, \qquad u_m = \sum_j \frac{a_{mj}}{\sum_{j'} a_{mj'}}\, v_j

    The softmax runs over the slots (not over the inputs as in
    :func:`latent_cross_attention`), so the slots divide the inputs between them: the
    object-centric memory of Concept-Centric Transformers. A module iterates this with a
    GRU update (``jattn.nn.SlotAttention``). Masked inputs take part in no competition.

    Args:
        slots: [M, N, H] (shared) or [B, M, N, H], the projected slot queries.
        keys: [B, S, K, H] (N % K == 0: GQA).
        values: [B, S, K, Hv].
        mask: bool [B, S], True for real inputs; None: all valid.
        scale: logits scale; default 1 / sqrt(H).
        eps: added to every valid attention weight before the per-slot normalisation (a
            slot that wins nothing still averages the inputs, uniformly).

    Returns:
        (updates [B, M, N, Hv] in the inputs' dtype, attention [B, N, M, S] float32: each
        input's distribution over the slots, 0 at masked inputs).

    Raises:
        ValueError: wrong ranks or shapes, a non-positive eps.
        TypeError: non-floating or mixed dtypes, a non-boolean mask.

    >>> import jax
    >>> z = jax.random.normal(jax.random.key(0), (3, 1, 8))           # 3 slots, 1 head
    >>> x = jax.random.normal(jax.random.key(1), (2, 20, 1, 8))
    >>> updates, attention = slot_attention(z, x, x)
    >>> updates.shape, bool(jnp.allclose(attention.sum(2), 1.0))
    ((2, 3, 1, 8), True)

    References:
        P06 Concept-Centric Transformers (an object-centric memory extracts the concepts);
        Locatello et al., "Object-Centric Learning with Slot Attention", 2020.
    """
    slots, keys, values = _check_slot_inputs("slots", slots, keys, values)
    B, S, K, H = keys.shape
    M, N = slots.shape[-3], slots.shape[-2]
    if slots.shape[-1] != H or N % K or values.shape[:3] != (B, S, K):
        raise ValueError(f"slots, keys, values: expected slots [.., M, N, H={H}] with N a "
                         f"multiple of K={K} and values [B={B}, S={S}, K={K}, Hv], got "
                         f"{slots.shape}, {keys.shape}, {values.shape}")
    check_floating("keys", keys)
    _check_same_dtype("slots, keys, values", slots, keys, values)
    mask = _check_mask("mask", mask, (B, S), "BS")
    if not eps > 0:
        raise ValueError(f"eps: expected a positive number, got {eps!r}")
    scale = H ** -0.5 if scale is None else scale
    dtype = accumulation_dtype(keys.dtype)
    z = jnp.broadcast_to(slots, (B, M, N, H)).reshape(B, M, K, N // K, H)
    logits = jnp.einsum("bmkgh,bskh->bkgms", z, keys, preferred_element_type=dtype) * scale
    attention = jax.nn.softmax(logits, axis=3)  # over the slots
    valid = jnp.ones((B, S), bool) if mask is None else mask
    attention = jnp.where(valid[:, None, None, None, :], attention, 0.0)
    weights = jnp.where(valid[:, None, None, None, :], attention + eps, 0.0)
    weights = weights / weights.sum(-1, keepdims=True)
    updates = jnp.einsum("bkgms,bskh->bmkgh", weights, values.astype(dtype))
    Hv = values.shape[-1]
    return (updates.reshape(B, M, N, Hv).astype(keys.dtype),
            attention.reshape(B, N, M, S).astype(jnp.float32))


def concept_explanation_loss(attention: Array, target: Array, *,
                             mask: Array | None = None) -> Array:
    r"""The explanation loss of concept-based transformers: the concepts' share of the
    attention, averaged over heads and valid input tokens, against annotated concept
    relevance normalised to sum to one (squared Euclidean distance, mean over the batch).

    .. math::
        \mathcal{L} = \frac{1}{B} \sum_b \Big\lVert \frac{1}{N |T_b|} \sum_{n, t \in T_b}
        A_{bntc} - \frac{y_{bc}}{\sum_{c'} y_{bc'}} \Big\rVert^2

    Our reading: Concept-Centric Transformers name "standard classification and explanation
    losses"; the explanation loss of the Concept Transformer it builds on is this distance
    between the attention over concepts and the human-annotated concepts. Rows with no
    annotated concept (all zeros) contribute nothing.

    Args:
        attention: [B, N, T, C], each token's attention over C concepts (rows sum to one),
            e.g. ``jattn.latent_cross_attention``'s weights with the roles swapped.
        target: [B, C] non-negative concept annotations.
        mask: bool [B, T], the tokens that count (None: all).

    Returns:
        float32 scalar.

    Raises:
        ValueError: wrong ranks or shapes, a negative target (when its values are known).
        TypeError: non-floating attention or target, a non-boolean mask.

    >>> import jax.numpy as jnp
    >>> a = jnp.array([[[[0.75, 0.25], [0.25, 0.75]]]])   # B=1, N=1, T=2, C=2
    >>> float(concept_explanation_loss(a, jnp.array([[1.0, 1.0]])))
    0.0

    References:
        P06 Concept-Centric Transformers; Rigotti et al., "Attention-based Interpretability
        with Concept Transformers", 2022.
    """
    attention, target = jnp.asarray(attention), jnp.asarray(target)
    check_rank("attention", attention, (4,), "[B, N, T, C]")
    check_rank("target", target, (2,), "[B, C]")
    check_floating("attention", attention)
    check_floating("target", target)
    B, N, T, C = attention.shape
    if target.shape != (B, C):
        raise ValueError(f"target: expected [B={B}, C={C}] to match attention "
                         f"{attention.shape}, got {target.shape}")
    if is_concrete(target) and bool((target < 0).any()):
        raise ValueError(f"target: expected non-negative annotations, got a minimum of "
                         f"{float(target.min())}")
    mask = _check_mask("mask", mask, (B, T), "BT")
    valid = jnp.ones((B, T), bool) if mask is None else mask
    a = attention.astype(jnp.float32)
    count = jnp.maximum(valid.sum(1), 1) * N  # [B]
    share = jnp.where(valid[:, None, :, None], a, 0.0).sum((1, 2)) / count[:, None]
    total = target.astype(jnp.float32).sum(1, keepdims=True)
    annotated = total[:, 0] > 0
    wanted = target.astype(jnp.float32) / jnp.where(annotated[:, None], total, 1.0)
    per_row = jnp.where(annotated, ((share - wanted) ** 2).sum(1), 0.0)
    return per_row.mean()


def multi_level_cross_attention(query: Array, keys: Sequence[Array], values: Sequence[Array],
                                *, masks: Sequence[Array | None] | None = None,
                                combine: str = "joint", scale: float | None = None) -> Array:
    r"""Queries attend to several feature levels (e.g. stages of a visual encoder) of
    different lengths.

    .. math::
        \text{joint:}\quad o = \mathrm{softmax}_{(l, j)}\big(\mathrm{scale}\,
        \langle q, k^{(l)}_j\rangle\big)\, v^{(l)}_j
        = \sum_l \frac{e^{\mathrm{lse}_l}}{\sum_{l'} e^{\mathrm{lse}_{l'}}}\, o_l,
        \qquad \text{sum:}\quad o = \sum_l o_l

    where o_l = softmax_j(scale <q, k^(l)_j>) v^(l)_j is one level's attention and lse_l its
    log-sum-exp. "joint" is one softmax over the union of all levels' keys (every key
    competes with every other; equal to attending to the concatenated levels), computed
    level by level and merged through the log-sum-exps, without concatenating. "sum" runs an
    independent softmax per level and adds the outputs (each level contributes a full unit
    of attention). The default is "joint": TextHawk's MLCA feeds features of several
    encoder stages to the resampler's cross attention, and a single softmax keeps the output
    a convex combination of values whatever the number of levels. (TextHawk routes one
    stage to each resampler layer: that routing is :class:`jattn.nn.PerceiverResampler`'s
    ``routing``; this function is the several-levels-at-once form.) A level whose keys are
    all masked contributes nothing (its weight is 0, its "sum" term 0).

    Of CAB's four patterns: non-causal cross only (levels of different lengths share no
    time axis with the queries).

    Args:
        query: [B, T, N, H].
        keys: a non-empty sequence of [B, S_l, K_l, H] (lengths and key head counts may
            differ per level; N % K_l == 0).
        values: the matching [B, S_l, K_l, Hv] (one Hv for all levels).
        masks: None, or one entry per level: None or bool [B, S_l].
        combine: "joint" or "sum".
        scale: logits scale; default 1 / sqrt(H).

    Returns:
        [B, T, N, Hv] in the query's dtype (levels merged in float32 or wider).

    Raises:
        ValueError: no level, keys and values (or masks) of different counts, shapes that
            disagree, an unknown ``combine``.
        TypeError: non-floating or mixed dtypes, non-boolean masks.

    >>> import jax, jax.numpy as jnp
    >>> q = jax.random.normal(jax.random.key(0), (1, 4, 2, 8))
    >>> levels = [jax.random.normal(jax.random.key(i), (1, s, 2, 8)) for i, s in
    ...           enumerate([64, 16, 4])]
    >>> multi_level_cross_attention(q, levels, levels).shape
    (1, 4, 2, 8)

    References:
        P60 TextHawk (Multi-Level Cross-Attention); P13 gCOG.
    """
    if combine not in COMBINES:
        raise ValueError(f"combine: expected one of {COMBINES}, got {combine!r}")
    keys, values = list(keys), list(values)
    if not keys:
        raise ValueError("keys: expected at least one level, got none")
    if len(values) != len(keys):
        raise ValueError(f"values: expected {len(keys)} levels as keys, got {len(values)}")
    masks = [None] * len(keys) if masks is None else list(masks)
    if len(masks) != len(keys):
        raise ValueError(f"masks: expected {len(keys)} levels as keys, got {len(masks)}")
    query = jnp.asarray(query)
    check_rank("query", query, (4,), "[B, T, N, H]")
    B = query.shape[0]
    outs, lses = [], []
    for i, (k, v, m) in enumerate(zip(keys, values, masks, strict=True)):
        k, v = jnp.asarray(k), jnp.asarray(v)
        check_rank(f"keys[{i}]", k, (4,), "[B, S_l, K_l, H]")
        check_rank(f"values[{i}]", v, (4,), "[B, S_l, K_l, Hv]")
        m = _check_mask(f"masks[{i}]", m, (B, k.shape[1]), "BS")
        try:
            out, lse = dot_product_attention(
                query, k, v, mask=None if m is None else m[:, None, None, :], scale=scale,
                return_lse=True)
        except (TypeError, ValueError) as e:
            raise type(e)(f"keys[{i}], values[{i}]: {e}") from None
        outs.append(out)
        lses.append(lse)
    if len({o.shape for o in outs}) > 1:
        raise ValueError(f"values: expected one value head dim for all levels, got "
                         f"{[jnp.shape(v)[-1] for v in values]}")
    dtype = accumulation_dtype(query.dtype)
    stacked = jnp.stack(outs).astype(dtype)  # [L, B, T, N, Hv]
    if combine == "sum":
        return stacked.sum(0).astype(query.dtype)
    lse = jnp.moveaxis(jnp.stack(lses).astype(dtype), 0, -1)  # [B, N, T, L]; -inf: no key
    weight = masked_softmax(lse, jnp.isfinite(lse))  # each level's share of the joint softmax
    weight = jnp.transpose(weight, (3, 0, 2, 1))[..., None]  # [L, B, T, N, 1]
    return (weight * stacked).sum(0).astype(query.dtype)


# --------------------------------------------------------------------------------------------
# cross-encoder vs bi-encoder over one joint sequence (P34)


class PairInputs(NamedTuple):
    """A sentence pair as one joint sequence (``pair_inputs``).

    - tokens: [B, Ta + Tb, ...] a's slots then b's slots (padding stays in place).
    - segment_ids: int32 [B, Ta + Tb]: 0 for a's real tokens, 1 for b's, -1 for padding.
    - positions: int32 [B, Ta + Tb]: position in the joint sequence counting real tokens only
      (a packed [a; b] numbering, as a cross-encoder sees it); -1 for padding.
    - segment_positions: int32 [B, Ta + Tb]: position within the token's own sentence (as a
      bi-encoder sees it); -1 for padding.
    """

    tokens: Array
    segment_ids: Array
    positions: Array
    segment_positions: Array


def pair_inputs(a: Array, b: Array, *, a_mask: Array | None = None,
                b_mask: Array | None = None) -> PairInputs:
    """Join two padded sentences into one sequence with segment ids and positions.

    The cross-encoder input [a; b] (BERT's [CLS] a [SEP] b [SEP] when the caller's token
    sequences carry those markers). Padding is not moved: attention masks it out
    (:func:`pair_mask`) and ``positions`` count real tokens only, so the joint sequence
    behaves as the packed one.

    Args:
        a: [B, Ta, ...] token ids or embeddings of the first sentence.
        b: [B, Tb, ...] of the second, same dtype and trailing shape.
        a_mask: bool [B, Ta], True for real tokens; None: all real.
        b_mask: bool [B, Tb].

    Returns:
        :class:`PairInputs`.

    Raises:
        ValueError: shapes that disagree. TypeError: mixed dtypes, non-boolean masks.

    >>> import jax.numpy as jnp
    >>> p = pair_inputs(jnp.array([[1, 2, 0]]), jnp.array([[3, 0]]),
    ...                 a_mask=jnp.array([[True, True, False]]), b_mask=jnp.array([[True, False]]))
    >>> p.segment_ids.tolist(), p.positions.tolist()
    ([[0, 0, -1, 1, -1]], [[0, 1, -1, 2, -1]])

    References:
        P34 Trans-Encoder, "Trans-Encoder: Unsupervised sentence-pair modelling through
        self- and mutual-distillations".
    """
    a, b = jnp.asarray(a), jnp.asarray(b)
    check_rank("a", a, range(2, 8), "[B, Ta, ...]")
    if b.ndim != a.ndim or b.shape[0] != a.shape[0] or b.shape[2:] != a.shape[2:]:
        raise ValueError(f"b: expected [B={a.shape[0]}, Tb{', ...' if a.ndim > 2 else ''}] "
                         f"to match a {a.shape}, got {b.shape}")
    _check_same_dtype("a, b", a, b)
    B, Ta, Tb = a.shape[0], a.shape[1], b.shape[1]
    am = _check_mask("a_mask", a_mask, (B, Ta), "BT")
    bm = _check_mask("b_mask", b_mask, (B, Tb), "BT")
    am = jnp.ones((B, Ta), bool) if am is None else am
    bm = jnp.ones((B, Tb), bool) if bm is None else bm
    valid = jnp.concatenate([am, bm], axis=1)
    segment = jnp.concatenate([jnp.zeros((B, Ta), jnp.int32), jnp.ones((B, Tb), jnp.int32)],
                              axis=1)
    segment_ids = jnp.where(valid, segment, -1)
    positions = jnp.where(valid, jnp.cumsum(valid, axis=1, dtype=jnp.int32) - 1, -1)
    own = jnp.concatenate([jnp.cumsum(am, axis=1, dtype=jnp.int32),
                           jnp.cumsum(bm, axis=1, dtype=jnp.int32)], axis=1) - 1
    return PairInputs(jnp.concatenate([a, b], axis=1), segment_ids, positions,
                      jnp.where(valid, own, -1))


def pair_mask(segment_ids: Array, *, mode: str = "cross") -> Array:
    r"""The self-attention mask of a joint pair sequence.

    .. math::
        \text{cross:}\ M_{ij} = [s_i \ge 0][s_j \ge 0], \qquad
        \text{bi:}\ M_{ij} = [s_i \ge 0][s_i = s_j]

    "cross": every real token attends to both sentences (a cross-encoder: inter-sentence
    interaction in every layer). "bi": each sentence attends to itself only, so one
    forward pass over the joint sequence encodes the two sentences independently (a
    bi-encoder; with per-sentence positions it equals two separate passes). Trans-Encoder
    alternates the same pre-trained encoder between these two formulations. Padding rows
    are all False (their outputs are zeros).

    Args:
        segment_ids: int [B, L], 0/1 per sentence, negative for padding (``pair_inputs``).
        mode: "cross" or "bi".

    Returns:
        bool [B, 1, L, L], broadcastable to [B, N, T, S] for
        :func:`jattn.dot_product_attention`.

    Raises:
        ValueError: not [B, L], an unknown mode. TypeError: non-integer ids.

    >>> import jax.numpy as jnp
    >>> pair_mask(jnp.array([[0, 1, -1]]), mode="bi")[0, 0].astype(int).tolist()
    [[1, 0, 0], [0, 1, 0], [0, 0, 0]]

    References:
        P34 Trans-Encoder (cross-encoder vs bi-encoder).
    """
    if mode not in PAIR_MODES:
        raise ValueError(f"mode: expected one of {PAIR_MODES}, got {mode!r}")
    segment_ids = jnp.asarray(segment_ids)
    check_rank("segment_ids", segment_ids, (2,), "[B, L]")
    if not jnp.issubdtype(segment_ids.dtype, jnp.integer):
        raise DTypeError(f"segment_ids: expected an integer dtype, got {segment_ids.dtype} "
                        f"(shape {segment_ids.shape})")
    valid = segment_ids >= 0
    allowed = valid[:, :, None] & valid[:, None, :]
    if mode == "bi":
        allowed = allowed & (segment_ids[:, :, None] == segment_ids[:, None, :])
    return allowed[:, None]


def _segment_mean(hidden: Array, where: Array) -> Array:
    dtype = accumulation_dtype(hidden.dtype)
    w = where.astype(dtype)[..., None]
    return (hidden.astype(dtype) * w).sum(1) / jnp.maximum(w.sum(1), 1)


def cross_encoder_score(hidden: Array, weight: Array, bias: Array | None = None, *,
                        segment_ids: Array | None = None, pooling: str = "first") -> Array:
    r"""The cross-encoder's scoring head: :math:`y = \langle w, \mathrm{pool}(h)\rangle + b`.

    "first" pools the first real token of the joint sequence (BERT's [CLS]); "mean" the mean
    of all real tokens. The score is a logit (Trans-Encoder applies a sigmoid and trains on
    the bi-encoder's pseudo-labels).

    Args:
        hidden: [B, L, D] the encoder's output on the joint sequence.
        weight: [D]; bias: [] or None.
        segment_ids: int [B, L] from :func:`pair_inputs` (negative = padding); None: all real.
        pooling: "first" or "mean".

    Returns:
        [B] float32 (float64 for float64 input).

    Raises:
        ValueError: shapes that disagree, an unknown pooling. TypeError: wrong dtypes.

    >>> import jax.numpy as jnp
    >>> h = jnp.arange(6.0).reshape(1, 3, 2)
    >>> cross_encoder_score(h, jnp.array([1.0, 0.0]), pooling="mean").tolist()
    [2.0]

    References:
        P34 Trans-Encoder.
    """
    if pooling not in POOLINGS:
        raise ValueError(f"pooling: expected one of {POOLINGS}, got {pooling!r}")
    hidden, weight = jnp.asarray(hidden), jnp.asarray(weight)
    check_rank("hidden", hidden, (3,), "[B, L, D]")
    check_floating("hidden", hidden)
    check_floating("weight", weight)
    B, L, D = hidden.shape
    check_shape("weight", weight, (D,), "D")
    valid = jnp.ones((B, L), bool)
    if segment_ids is not None:
        segment_ids = jnp.asarray(segment_ids)
        check_shape("segment_ids", segment_ids, (B, L), "BL")
        valid = segment_ids >= 0
    dtype = accumulation_dtype(jnp.result_type(hidden, weight))
    if pooling == "mean":
        pooled = _segment_mean(hidden, valid)
    else:
        first = jnp.argmax(valid, axis=1)
        pooled = jnp.take_along_axis(hidden, first[:, None, None], axis=1)[:, 0].astype(dtype)
    score = pooled @ weight.astype(dtype)
    if bias is not None:
        bias = jnp.asarray(bias)
        check_shape("bias", bias, (), "")
        score = score + bias.astype(dtype)
    return score


def bi_encoder_score(hidden: Array, segment_ids: Array, *, eps: float = 1e-8) -> Array:
    r"""The bi-encoder's score on a joint sequence: the cosine of the two sentences' mean
    pooled states, :math:`\cos(\bar h_a, \bar h_b)`, with :math:`\bar h_x` the mean over
    segment x's real tokens (a zero vector, and a zero score, for an empty sentence).

    Args:
        hidden: [B, L, D] the encoder's output (with ``pair_mask(mode="bi")`` the two
            sentences were encoded independently).
        segment_ids: int [B, L]: 0 / 1 / negative for padding.
        eps: floor of the norms.

    Returns:
        [B] float32 (float64 for float64 input), in [-1, 1].

    Raises:
        ValueError: hidden not [B, L, D], segment ids of another shape.
        TypeError: non-floating hidden.

    >>> import jax.numpy as jnp
    >>> h = jnp.array([[[1.0, 0.0], [0.0, 2.0]]])
    >>> bi_encoder_score(h, jnp.array([[0, 1]])).tolist()
    [0.0]

    References:
        P34 Trans-Encoder (the bi-encoder formulation).
    """
    hidden, segment_ids = jnp.asarray(hidden), jnp.asarray(segment_ids)
    check_rank("hidden", hidden, (3,), "[B, L, D]")
    check_floating("hidden", hidden)
    check_shape("segment_ids", segment_ids, hidden.shape[:2], "BL")
    ha = _segment_mean(hidden, segment_ids == 0)
    hb = _segment_mean(hidden, segment_ids == 1)
    # sqrt of a floored square: no NaN gradient for an empty (zero) sentence
    norm = (jnp.sqrt(jnp.maximum(jnp.sum(ha * ha, -1), eps * eps))
            * jnp.sqrt(jnp.maximum(jnp.sum(hb * hb, -1), eps * eps)))
    return jnp.sum(ha * hb, axis=-1) / norm
