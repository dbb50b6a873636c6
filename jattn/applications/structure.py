"""Structure-aware attention scores: a graph, pairwise relations or object geometry as bias.

* ``edge_type_bias`` and ``graph_attention`` (P12 GAST): attention restricted to a graph's
  edges (:func:`jattn.masks.adjacency`) with a learned per-head bias for each edge type
  (e.g. a dependency relation).
* ``relation_bias`` and ``relation_aware_attention`` (P14 TransRefer3D): pairwise features
  [B, T, S, F] between the tokens projected to a per-head additive bias.
* ``box_pair_features`` and ``box_relative_attention`` (P29 OAT): 2-D relative position
  between objects, from their boxes, as pairwise features and then a per-head bias.

Every attention runs through :func:`jattn.dot_product_attention` with ``bias=`` (and a mask
for graphs). The biases are [B, N, T, S] float32 and may also be passed to any other
attention that takes a bias. Plain dense ground truth lives in :mod:`jattn.reference`.

References:
    P12 GAST, "Graph Adaptive Semantic Transfer for Cross-domain Sentiment Classification"
    (hybrid graph attention over dependency relations).
    P14 TransRefer3D, "TransRefer3D: Entity-and-Relation Aware Transformer for Fine-Grained
    3D Visual Grounding".
    P29 OAT, "OAT: Object-Level Attention Transformer for Gaze Scanpath Prediction".
"""

from __future__ import annotations

import jax.numpy as jnp

from jattn.core import masks as _masks
from jattn.core.attention import dot_product_attention
from jattn.core.masks import Mask
from jattn.core.shapes import (
    Array,
    accumulation_dtype,
    check_bool,
    check_floating,
    check_integer,
    check_qkv,
    check_rank,
    check_shape,
    check_values_in_range,
)

BOX_FORMATS = ("xyxy", "cxcywh")
BOX_FEATURES = ("signed", "log_abs")


def _user_mask(mask) -> Mask | None:
    """A boolean array or Mask as a Mask (validated later against the call's shapes)."""
    if mask is None or isinstance(mask, Mask):
        return mask
    mask = jnp.asarray(mask)
    check_bool("mask", mask)
    check_rank("mask", mask, (2, 3, 4), "broadcastable to [B, N, T, S]")
    return _masks.dense(mask)


# --------------------------------------------------------------------------------------------
# P12 GAST


def edge_type_bias(edge_types: Array, table: Array) -> Array:
    r"""A learned bias per edge type and head: bias[b, n, t, s] = table[edge_types[b, t, s], n].

    Args:
        edge_types: int [B, T, S] or [T, S] (one graph for the whole batch), types in
            [0, num_types).
        table: [num_types, N] floating, the per-head bias of each type.

    Returns:
        [B|1, N, T, S] float32 (float64 for a float64 table).

    Raises:
        ValueError: wrong ranks, types outside [0, num_types) (when concrete).
        TypeError: non-integer types, a non-floating table.

    >>> import jax.numpy as jnp
    >>> edge_type_bias(jnp.array([[0, 1], [1, 0]]), jnp.array([[0.0], [2.0]]))[0, 0].tolist()
    [[0.0, 2.0], [2.0, 0.0]]

    References:
        P12 GAST (edge-type bias of the hybrid graph attention).
    """
    edge_types = jnp.asarray(edge_types)
    check_integer("edge_types", edge_types)
    check_rank("edge_types", edge_types, (2, 3), "[B, T, S] or [T, S]")
    check_floating("table", table)
    check_rank("table", table, (2,), "[num_types, N]")
    check_values_in_range("edge_types", edge_types, 0, table.shape[0] - 1)
    if edge_types.ndim == 2:
        edge_types = edge_types[None]
    table = table.astype(accumulation_dtype(table.dtype))
    return jnp.moveaxis(table[edge_types], -1, 1)


def graph_attention(query: Array, key: Array, value: Array, adjacency: Array, *,
                    edge_types: Array | None = None, edge_type_table: Array | None = None,
                    self_loops: bool = True, is_causal: bool = False,
                    scale: float | None = None) -> Array:
    r"""Graph attention: each node attends to its neighbours, with an edge-type bias.

    .. math::
        \mathrm{out}_i = \sum_{j:\, A_{ij}} \mathrm{softmax}_j\big(\mathrm{scale}\;
        q_i \cdot k_j + \beta_{n, \tau(i, j)}\big)\, v_j

    GAST's hybrid graph attention attends over the dependency graph of a sentence and
    distinguishes the dependency relations. The abstract does not fix the score; we take the
    transformer reading (as in relation-aware graph transformers): scaled dot-product scores,
    restricted to the edges A (:func:`jattn.masks.adjacency`, with self loops by default) plus
    a learned scalar beta per head and edge type tau(i, j) (:func:`edge_type_bias`). GAT's
    additive LeakyReLU score is not this function. A node with no edge (and no self loop)
    gets zeros. All four CAB patterns: self (T == S) or bipartite cross attention (T != S,
    rectangular adjacency, ``self_loops=False``), optionally ANDed with causal.

    Args:
        query: [B, T, N, H]; key: [B, S, K, H] (N % K == 0: GQA); value: [B, S, K, Hv].
        adjacency: bool [B, T, S] or [T, S]; True where node t may attend node s.
        edge_types: int [B, T, S] or [T, S], with ``edge_type_table``; None: no type bias.
        edge_type_table: [num_types, N] the learned bias per edge type and head.
        self_loops: also let every node attend to itself (needs T == S).
        is_causal: also require s <= t.
        scale: logits scale, default 1 / sqrt(H).

    Returns:
        [B, T, N, Hv] in the input dtype.

    Raises:
        ValueError: shapes that disagree, self loops on a rectangular adjacency, only one of
            edge_types / edge_type_table, types out of range.
        TypeError: a non-boolean adjacency, non-integer types, non-floating arrays.

    >>> import jax.numpy as jnp
    >>> q = jnp.zeros((1, 3, 1, 2)); k = jnp.zeros((1, 3, 1, 2))
    >>> v = jnp.arange(3.0).reshape(1, 3, 1, 1)
    >>> path = jnp.array([[0, 1, 0], [1, 0, 1], [0, 1, 0]], bool)   # 0 - 1 - 2
    >>> graph_attention(q, k, v, path)[0, :, 0, 0].tolist()          # mean over neighbours
    [0.5, 1.0, 1.5]

    References:
        P12 GAST, "Graph Adaptive Semantic Transfer for Cross-domain Sentiment
        Classification" (hybrid graph attention over dependency relations).
    """
    B, T, _, _, S, _, _ = check_qkv(query, key, value)
    adjacency = jnp.asarray(adjacency)
    check_bool("adjacency", adjacency)
    check_rank("adjacency", adjacency, (2, 3), "[B, T, S] or [T, S]")
    if adjacency.shape[-2:] != (T, S) or (adjacency.ndim == 3 and adjacency.shape[0] not in (
            1, B)):
        raise ValueError(f"adjacency: expected [B={B}, T={T}, S={S}] or [T, S], "
                         f"got {adjacency.shape}")
    if self_loops and T != S:
        raise ValueError(f"self_loops: needs a square adjacency (T == S), got T={T}, S={S}; "
                         f"pass self_loops=False for bipartite cross attention")
    if T == S:
        mask = _masks.adjacency(adjacency, self_loops=self_loops)
    else:
        mask = _masks.dense(adjacency[:, None] if adjacency.ndim == 3 else adjacency)
    if (edge_types is None) != (edge_type_table is None):
        raise ValueError("edge_types, edge_type_table: give both or neither")
    bias = None
    if edge_types is not None:
        edge_types = jnp.asarray(edge_types)
        if edge_types.shape[-2:] != (T, S):
            raise ValueError(f"edge_types: expected [B, T={T}, S={S}] or [T, S], "
                             f"got {edge_types.shape}")
        bias = edge_type_bias(edge_types, edge_type_table)
    return dot_product_attention(query, key, value, bias=bias, mask=mask, is_causal=is_causal,
                                 scale=scale)


# --------------------------------------------------------------------------------------------
# P14 TransRefer3D


def relation_bias(pairwise: Array, weight: Array, bias: Array | None = None) -> Array:
    r"""Pairwise features projected to a per-head attention bias.

    .. math::
        \beta_{b n t s} = \sum_f R_{b t s f}\, W_{f n} + c_n

    Args:
        pairwise: [B, T, S, F] a feature vector per (query, key) pair.
        weight: [F, N] the projection to the heads.
        bias: [N] or None.

    Returns:
        [B, N, T, S] float32 (float64 for float64 input).

    Raises:
        ValueError: wrong ranks or sizes. TypeError: non-floating arrays.

    >>> import jax.numpy as jnp
    >>> relation_bias(jnp.ones((1, 2, 3, 4)), jnp.ones((4, 2)), jnp.array([0.0, 1.0])).shape
    (1, 2, 2, 3)

    References:
        P14 TransRefer3D (relation-aware attention).
    """
    check_floating("pairwise", pairwise)
    check_rank("pairwise", pairwise, (4,), "[B, T, S, F]")
    check_floating("weight", weight)
    check_rank("weight", weight, (2,), "[F, N]")
    if weight.shape[0] != pairwise.shape[-1]:
        raise ValueError(f"weight: expected [F={pairwise.shape[-1]}, N] to match pairwise "
                         f"{pairwise.shape}, got {weight.shape}")
    dtype = accumulation_dtype(jnp.result_type(pairwise.dtype, weight.dtype))
    out = jnp.einsum("btsf,fn->bnts", pairwise.astype(dtype), weight.astype(dtype))
    if bias is not None:
        check_floating("bias", bias)
        check_shape("bias", bias, (weight.shape[1],), "N")
        out = out + bias.astype(dtype)[:, None, None]
    return out


def relation_aware_attention(query: Array, key: Array, value: Array, pairwise: Array,
                             weight: Array, bias: Array | None = None, *, mask=None,
                             is_causal: bool = False, scale: float | None = None) -> Array:
    r"""Relation-aware attention: pairwise features enter the scores as a per-head bias.

    .. math::
        \mathrm{out}_t = \sum_s \mathrm{softmax}_s\big(\mathrm{scale}\; q_t \cdot k_s
        + R_{ts} W_{:, n} + c_n\big)\, v_s

    TransRefer3D's relation-aware attention matches pair-wise visual relation features
    (between objects i and j, e.g. from their centres and sizes) against the language. Our
    reading of the relation part: the pairwise features are projected to one scalar per head
    and added to the attention logits between the two objects (the standard way pairwise
    features enter attention, as in Relation Networks and Graphormer). The co-attention with
    the language (the other half of the paper's module) is ordinary cross attention. All
    four CAB patterns: self or cross, ``is_causal`` or not.

    Args:
        query: [B, T, N, H]; key: [B, S, K, H] (N % K == 0: GQA); value: [B, S, K, Hv].
        pairwise: [B, T, S, F] the relation features of every (query, key) pair.
        weight: [F, N]; bias: [N] or None (see :func:`relation_bias`).
        mask: bool broadcastable to [B, N, T, S] or a :class:`jattn.masks.Mask`.
        is_causal: query t sees keys s <= t.
        scale: logits scale, default 1 / sqrt(H).

    Returns:
        [B, T, N, Hv] in the input dtype.

    Raises:
        ValueError: shapes that disagree. TypeError: non-floating arrays.

    >>> import jax.numpy as jnp
    >>> q = jnp.zeros((1, 1, 1, 2)); k = jnp.zeros((1, 2, 1, 2))
    >>> v = jnp.array([0.0, 1.0]).reshape(1, 2, 1, 1)
    >>> rel = jnp.array([0.0, 30.0]).reshape(1, 1, 2, 1)   # object 1 strongly related
    >>> float(relation_aware_attention(q, k, v, rel, jnp.ones((1, 1)))[0, 0, 0, 0])
    1.0

    References:
        P14 TransRefer3D, "TransRefer3D: Entity-and-Relation Aware Transformer for
        Fine-Grained 3D Visual Grounding" (relation-aware attention).
    """
    B, T, N, _, S, _, _ = check_qkv(query, key, value)
    check_rank("pairwise", pairwise, (4,), "[B, T, S, F]")
    if pairwise.shape[:3] != (B, T, S):
        raise ValueError(f"pairwise: expected [B={B}, T={T}, S={S}, F], got {pairwise.shape}")
    if weight.ndim == 2 and weight.shape[1] != N:
        raise ValueError(f"weight: expected [F, N={N}] (one column per query head), "
                         f"got {weight.shape}")
    return dot_product_attention(query, key, value, bias=relation_bias(pairwise, weight, bias),
                                 mask=_user_mask(mask), is_causal=is_causal, scale=scale)


# --------------------------------------------------------------------------------------------
# P29 OAT


def _centre_size(boxes: Array, box_format: str) -> tuple[Array, Array, Array, Array]:
    if box_format == "xyxy":
        x0, y0, x1, y1 = (boxes[..., i] for i in range(4))
        return (x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0
    cx, cy, w, h = (boxes[..., i] for i in range(4))
    return cx, cy, w, h


def box_pair_features(query_boxes: Array, key_boxes: Array, *, box_format: str = "xyxy",
                      kind: str = "signed", embed_dim: int | None = None,
                      eps: float = 1e-3) -> Array:
    r"""2-D relative position of every (query object, key object) pair, from their boxes.

    .. math::
        \text{signed:}\quad \Big(\frac{x_s - x_t}{w_t}, \frac{y_s - y_t}{h_t},
        \log\frac{w_s}{w_t}, \log\frac{h_s}{h_t}\Big) \qquad
        \text{log\_abs:}\quad \Big(\log\frac{\max(|x_s - x_t|, \epsilon)}{w_t},
        \log\frac{\max(|y_s - y_t|, \epsilon)}{h_t}, \log\frac{w_s}{w_t},
        \log\frac{h_s}{h_t}\Big)

    with (x, y) the box centre and (w, h) its size (sizes below eps are clamped to eps).
    "signed" keeps the direction (left/right, above/below), which a scanpath needs;
    "log_abs" is Relation Networks' translation- and scale-invariant geometry. With
    ``embed_dim`` each of the 4 features is embedded with sinusoids (Relation Networks:
    wavelengths 1000^(2i/d) of 100 * feature, d = embed_dim / 4) and the embeddings are
    concatenated.

    Args:
        query_boxes: [B, T, 4]; key_boxes: [B, S, 4] (floating).
        box_format: "xyxy" (x0, y0, x1, y1) or "cxcywh".
        kind: "signed" or "log_abs".
        embed_dim: None (the 4 raw features) or a multiple of 8.
        eps: the smallest size / distance, for the logarithms.

    Returns:
        [B, T, S, 4 or embed_dim] float32 (float64 for float64 boxes).

    Raises:
        ValueError: wrong shapes, an unknown format or kind, a bad embed_dim.
        TypeError: non-floating boxes.

    >>> import jax.numpy as jnp
    >>> a = jnp.array([[[0.0, 0.0, 2.0, 2.0]]]); b = jnp.array([[[2.0, 0.0, 6.0, 2.0]]])
    >>> [round(float(x), 4) for x in box_pair_features(a, b)[0, 0, 0]]   # 1.5 widths right
    [1.5, 0.0, 0.6931, 0.0]

    References:
        P29 OAT (2-D relative position between objects); Hu et al., "Relation Networks for
        Object Detection" (box geometry features and their embedding).
    """
    for name, boxes in (("query_boxes", query_boxes), ("key_boxes", key_boxes)):
        check_floating(name, boxes)
        check_rank(name, boxes, (3,), "[B, objects, 4]")
        if boxes.shape[-1] != 4:
            raise ValueError(f"{name}: expected [B, objects, 4], got {boxes.shape}")
    if key_boxes.shape[0] != query_boxes.shape[0]:
        raise ValueError(f"key_boxes: expected batch {query_boxes.shape[0]} as query_boxes, "
                         f"got {key_boxes.shape}")
    if box_format not in BOX_FORMATS:
        raise ValueError(f"box_format: expected one of {BOX_FORMATS}, got {box_format!r}")
    if kind not in BOX_FEATURES:
        raise ValueError(f"kind: expected one of {BOX_FEATURES}, got {kind!r}")
    if embed_dim is not None and (embed_dim < 8 or embed_dim % 8):
        raise ValueError(f"embed_dim: expected None or a positive multiple of 8, "
                         f"got {embed_dim!r}")
    dtype = accumulation_dtype(jnp.result_type(query_boxes.dtype, key_boxes.dtype))
    qx, qy, qw, qh = (a[:, :, None] for a in _centre_size(query_boxes.astype(dtype),
                                                         box_format))
    kx, ky, kw, kh = (a[:, None, :] for a in _centre_size(key_boxes.astype(dtype), box_format))
    qw, qh, kw, kh = (jnp.maximum(a, eps) for a in (qw, qh, kw, kh))
    dx, dy = kx - qx, ky - qy
    if kind == "signed":
        first = [dx / qw, dy / qh]
    else:
        first = [jnp.log(jnp.maximum(jnp.abs(dx), eps) / qw),
                 jnp.log(jnp.maximum(jnp.abs(dy), eps) / qh)]
    features = jnp.stack([*first, jnp.log(kw / qw), jnp.log(kh / qh)], axis=-1)
    if embed_dim is None:
        return features
    # jattn.positions.sinusoidal's formula, in the boxes' precision (it computes in float32)
    d = embed_dim // 4
    inverse_frequencies = 1000.0 ** (-jnp.arange(0, d, 2, dtype=dtype) / d)
    angles = 100.0 * features[..., None] * inverse_frequencies  # [B, T, S, 4, d / 2]
    embedded = jnp.stack([jnp.sin(angles), jnp.cos(angles)], axis=-1)
    return embedded.reshape(*features.shape[:-1], embed_dim)


def box_relative_attention(query: Array, key: Array, value: Array, query_boxes: Array,
                           key_boxes: Array, weight: Array, bias: Array | None = None, *,
                           box_format: str = "xyxy", kind: str = "signed",
                           embed_dim: int | None = None, mask=None, is_causal: bool = False,
                           scale: float | None = None) -> Array:
    r"""Attention between objects with a per-head bias from their 2-D relative position.

    .. math::
        \mathrm{out}_t = \sum_s \mathrm{softmax}_s\big(\mathrm{scale}\; q_t \cdot k_s
        + g(b_t, b_s) W_{:, n} + c_n\big)\, v_s

    OAT's object-level positional encoding "reflects spatial relationships between objects";
    the abstract does not give its form. Our reading: the relative geometry g of the two
    objects' boxes (:func:`box_pair_features`) linearly mapped to a bias per head, added to
    the logits of self attention among objects (encoder) and of the decoder's cross attention
    from the fixated objects (query boxes) to all objects (key boxes). This is
    :func:`relation_aware_attention` with geometric pairwise features. All four CAB patterns
    (the decoder's self attention over the scanpath is causal).

    Args:
        query: [B, T, N, H]; key: [B, S, K, H] (N % K == 0: GQA); value: [B, S, K, Hv].
        query_boxes: [B, T, 4]; key_boxes: [B, S, 4].
        weight: [4 or embed_dim, N]; bias: [N] or None.
        box_format, kind, embed_dim: as in :func:`box_pair_features`.
        mask: bool broadcastable to [B, N, T, S] or a :class:`jattn.masks.Mask`.
        is_causal: query t sees keys s <= t.
        scale: logits scale, default 1 / sqrt(H).

    Returns:
        [B, T, N, Hv] in the input dtype.

    Raises:
        ValueError: shapes that disagree (boxes of another length than the tokens).
        TypeError: non-floating arrays.

    >>> import jax.numpy as jnp
    >>> boxes = jnp.array([[[0.0, 0.0, 1.0, 1.0], [5.0, 0.0, 6.0, 1.0]]])
    >>> x = jnp.zeros((1, 2, 1, 2)); v = jnp.array([0.0, 1.0]).reshape(1, 2, 1, 1)
    >>> w = jnp.array([[10.0], [0.0], [0.0], [0.0]])     # bias 10 dx / w: look right
    >>> box_relative_attention(x, x, v, boxes, boxes, w)[0, :, 0, 0].round(3).tolist()
    [1.0, 1.0]

    References:
        P29 OAT, "OAT: Object-Level Attention Transformer for Gaze Scanpath Prediction"
        (relative position between objects); Hu et al., "Relation Networks for Object
        Detection".
    """
    B, T, _, _, S, _, _ = check_qkv(query, key, value)
    check_rank("query_boxes", query_boxes, (3,), "[B, T, 4]")
    check_rank("key_boxes", key_boxes, (3,), "[B, S, 4]")
    check_shape("query_boxes", query_boxes, (B, T, 4), "BT4")
    check_shape("key_boxes", key_boxes, (B, S, 4), "BS4")
    features = box_pair_features(query_boxes, key_boxes, box_format=box_format, kind=kind,
                                 embed_dim=embed_dim)
    return relation_aware_attention(query, key, value, features, weight, bias, mask=mask,
                                    is_causal=is_causal, scale=scale)
