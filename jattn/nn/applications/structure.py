"""NNX modules for structure-aware attention (``jattn.applications.structure``): projections, the
learned bias parameters, and the functions.

* :class:`GraphAttention` (P12): attention over a graph with a learned bias per edge type
  and head.
* :class:`RelationAwareAttention` (P14): pairwise features projected to a per-head bias.
* :class:`BoxRelativeAttention` (P29): a per-head bias from the objects' relative 2-D
  geometry, for self attention among objects or a decoder's cross attention to them.

Linear layers start as torch.nn.Linear does; the bias tables and projections start at zero,
so each module starts as plain (masked) attention.

References:
    P12 GAST; P14 TransRefer3D; P29 OAT. Titles in :mod:`jattn.applications.structure`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jattn.applications.structure import (
    box_relative_attention,
    graph_attention,
    relation_aware_attention,
)
from jattn.core.shapes import check_heads
from jattn.nn.layers import QKVProjection, torch_linear


def _merge_heads(x: jax.Array) -> jax.Array:
    return x.reshape(*x.shape[:-2], -1)


def _key_mask(mask: jax.Array | None) -> jax.Array | None:
    return None if mask is None else mask[:, None, None, :]


class GraphAttention(nnx.Module):
    """Multi-head graph attention with an edge-type bias
    (:func:`jattn.applications.structure.graph_attention`): nodes attend to their neighbours
    (and themselves), with a learned scalar per head for each of ``num_edge_types`` edge types
    (None: no type bias).

    Example:
        >>> import jax.numpy as jnp
        >>> from flax import nnx
        >>> gat = GraphAttention(16, 2, num_edge_types=3, rngs=nnx.Rngs(0))
        >>> adj = jnp.eye(4, k=1, dtype=bool) | jnp.eye(4, k=-1, dtype=bool)
        >>> gat(jnp.ones((1, 4, 16)), adj, edge_types=jnp.zeros((4, 4), int)).shape
        (1, 4, 16)
    """

    def __init__(self, d_model: int, num_heads: int = 1, *, num_edge_types: int | None = None,
                 self_loops: bool = True, is_causal: bool = False, qkv_bias: bool = True,
                 rngs: nnx.Rngs):
        check_heads(d_model, num_heads)
        self.self_loops = self_loops
        self.is_causal = is_causal
        self.proj = QKVProjection(d_model, num_heads, use_bias=qkv_bias, rngs=rngs)
        self.out_proj = torch_linear(d_model, d_model, rngs)
        self.edge_type_table = nnx.data(None)
        if num_edge_types is not None:
            if num_edge_types < 1:
                raise ValueError(f"num_edge_types: expected >= 1 or None, got {num_edge_types}")
            self.edge_type_table = nnx.Param(jnp.zeros((num_edge_types, num_heads)))

    def __call__(self, x: jax.Array, adjacency: jax.Array, *,
                 edge_types: jax.Array | None = None) -> jax.Array:
        """x [B, T, d_model], adjacency bool [B, T, T] or [T, T], edge_types int (same
        shape) -> [B, T, d_model]."""
        if (edge_types is None) != (self.edge_type_table is None):
            raise ValueError("edge_types: give them exactly when the layer has "
                             "num_edge_types")
        q, k, v = self.proj(x)
        table = None if self.edge_type_table is None else self.edge_type_table[...]
        out = graph_attention(q, k, v, adjacency, edge_types=edge_types, edge_type_table=table,
                              self_loops=self.self_loops, is_causal=self.is_causal)
        return self.out_proj(_merge_heads(out))


class _PairwiseBias(nnx.Module):
    """The [F, N] projection of pairwise features to heads and its [N] bias (zeros)."""

    def __init__(self, pairwise_dim: int, num_heads: int):
        if pairwise_dim < 1:
            raise ValueError(f"pairwise_dim: expected >= 1, got {pairwise_dim}")
        self.relation_weight = nnx.Param(jnp.zeros((pairwise_dim, num_heads)))
        self.relation_bias = nnx.Param(jnp.zeros((num_heads,)))


class RelationAwareAttention(nnx.Module):
    """Multi-head attention with pairwise relation features as a per-head logit bias
    (:func:`jattn.relation_aware_attention`); self attention, or cross attention
    to a ``context`` with features for every (token, context token) pair.

    Example:
        >>> import jax.numpy as jnp
        >>> from flax import nnx
        >>> ra = RelationAwareAttention(16, 2, pairwise_dim=5, rngs=nnx.Rngs(0))
        >>> ra(jnp.ones((1, 4, 16)), jnp.ones((1, 4, 4, 5))).shape
        (1, 4, 16)
    """

    def __init__(self, d_model: int, num_heads: int = 1, *, pairwise_dim: int,
                 is_causal: bool = False, qkv_bias: bool = True, rngs: nnx.Rngs):
        check_heads(d_model, num_heads)
        self.is_causal = is_causal
        self.proj = QKVProjection(d_model, num_heads, use_bias=qkv_bias, rngs=rngs)
        self.out_proj = torch_linear(d_model, d_model, rngs)
        self.bias = _PairwiseBias(pairwise_dim, num_heads)

    def __call__(self, x: jax.Array, pairwise: jax.Array, *,
                 context: jax.Array | None = None,
                 context_mask: jax.Array | None = None) -> jax.Array:
        """x [B, T, d_model], pairwise [B, T, S, F] (S = T, or the context's length),
        context [B, S, d_model] with ``context_mask`` bool [B, S] -> [B, T, d_model]."""
        q, k, v = self.proj(x, context)
        out = relation_aware_attention(q, k, v, pairwise, self.bias.relation_weight[...],
                                       self.bias.relation_bias[...],
                                       mask=_key_mask(context_mask), is_causal=self.is_causal)
        return self.out_proj(_merge_heads(out))


class BoxRelativeAttention(nnx.Module):
    """Multi-head attention between objects with a bias from their relative 2-D position
    (:func:`jattn.box_relative_attention`): self attention among objects
    (encoder), or cross attention from the query objects (e.g. a scanpath's fixated objects,
    ``is_causal`` for the decoder's self attention) to a ``context`` of objects.

    Example:
        >>> import jax.numpy as jnp
        >>> from flax import nnx
        >>> layer = BoxRelativeAttention(16, 2, embed_dim=16, rngs=nnx.Rngs(0))
        >>> boxes = jnp.array([[[0.0, 0.0, 1.0, 1.0], [2.0, 0.0, 3.0, 2.0]]])
        >>> layer(jnp.ones((1, 2, 16)), boxes).shape
        (1, 2, 16)
    """

    def __init__(self, d_model: int, num_heads: int = 1, *, box_format: str = "xyxy",
                 kind: str = "signed", embed_dim: int | None = None, is_causal: bool = False,
                 qkv_bias: bool = True, rngs: nnx.Rngs):
        check_heads(d_model, num_heads)
        self.box_options = dict(box_format=box_format, kind=kind, embed_dim=embed_dim)
        self.is_causal = is_causal
        self.proj = QKVProjection(d_model, num_heads, use_bias=qkv_bias, rngs=rngs)
        self.out_proj = torch_linear(d_model, d_model, rngs)
        self.bias = _PairwiseBias(4 if embed_dim is None else embed_dim, num_heads)

    def __call__(self, x: jax.Array, boxes: jax.Array, *, context: jax.Array | None = None,
                 context_boxes: jax.Array | None = None,
                 context_mask: jax.Array | None = None) -> jax.Array:
        """x [B, T, d_model] with boxes [B, T, 4]; optional context [B, S, d_model] with
        context_boxes [B, S, 4] and context_mask bool [B, S] -> [B, T, d_model]."""
        if (context is None) != (context_boxes is None):
            raise ValueError("context, context_boxes: give both or neither")
        q, k, v = self.proj(x, context)
        out = box_relative_attention(
            q, k, v, boxes, boxes if context_boxes is None else context_boxes,
            self.bias.relation_weight[...], self.bias.relation_bias[...],
            mask=_key_mask(context_mask), is_causal=self.is_causal, **self.box_options)
        return self.out_proj(_merge_heads(out))
