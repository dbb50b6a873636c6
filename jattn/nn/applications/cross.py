"""NNX modules for cross attention between sets (``jattn.applications.cross``): projections around
the functions, no maths of their own.

* :class:`LabelAttention`: label-wise attention with learned label embeddings or
  text-derived label descriptions, and a per-label (or shared) scoring head (P77, P15, P58).
* :class:`QueryDecoderLayer` / :class:`QueryDecoder`: learned or given queries; optional
  self-attention among the queries, cross attention to one or more contexts in turn, an MLP
  (P01 SMTR, P71 PMP, P58 RAM++).
* :class:`CoAttention`: parallel co-attention with one shared affinity (P36, P14).
* :class:`LatentCrossAttention` / :class:`PerceiverResampler`: latent slots reading an
  input, Flamingo-style latents-in-keys option, TextHawk's routing of feature levels to
  resampler layers (P06, P60, P13).
* :class:`MultiLevelCrossAttention`: queries attending to several feature levels of their
  own widths and lengths (P60, P13).
* :class:`PairEncoder`: one Transformer encoder used as a cross-encoder or a bi-encoder over
  a joint pair sequence, with both scoring heads (P34).

Linear layers start as torch.nn.Linear does (:func:`jattn.nn.layers.torch_linear`).

References:
    P01 SMTR; P06 Concept-Centric Transformers; P13 gCOG; P14 TransRefer3D; P15 CrossTune;
    P34 Trans-Encoder; P36 M3EL; P58 RAM++ (open-set tagging); P60 TextHawk; P71 PMP;
    P77 KeNet (titles in :mod:`jattn.applications.cross`).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from jattn.analysis.tokens import distinct_token_scores, gather_tokens, keep_top_tokens
from jattn.applications.cross import (
    COMBINES,
    PAIR_MODES,
    POOLINGS,
    bi_encoder_score,
    co_attention,
    cross_encoder_score,
    label_attention,
    label_logits,
    latent_cross_attention,
    multi_level_cross_attention,
    pair_inputs,
    pair_mask,
    slot_attention,
)
from jattn.core.attention import dot_product_attention
from jattn.core.shapes import check_heads, check_int
from jattn.nn.attention import MultiHeadAttention
from jattn.nn.layers import MLP, QKVProjection, torch_linear


def _split_heads(x: jax.Array, heads: int) -> jax.Array:
    return x.reshape(*x.shape[:-1], heads, x.shape[-1] // heads)


class LabelAttention(nnx.Module):
    """Label-wise attention (:func:`jattn.label_attention`) and label scores.

    With ``num_labels`` the module holds a learned label table [num_labels, d_label]
    (N(0, 0.02) at start; KeNet's label embeddings) and a per-label scoring head; without
    it, label embeddings come with each call (text-derived: CrossTune's label descriptions,
    RAM++'s tag descriptions, any [L, d_label] or [B, L, d_label] set) and one shared
    scoring head scores every label (open-set). Queries are projected from the labels, keys
    and values from the features; the pooled per-label features go through
    :func:`jattn.label_logits`.

    Example:
        >>> import jax.numpy as jnp
        >>> from flax import nnx
        >>> m = LabelAttention(16, num_labels=5, num_heads=2, rngs=nnx.Rngs(0))
        >>> logits, pooled = m(jnp.ones((3, 7, 16)))
        >>> logits.shape, pooled.shape
        ((3, 5), (3, 5, 16))
    """

    def __init__(self, d_model: int, *, num_labels: int | None = None, num_heads: int = 1,
                 d_label: int | None = None, use_bias: bool = True, rngs: nnx.Rngs):
        check_heads(d_model, num_heads)
        check_int("num_labels", num_labels, allow_none=True)
        self.num_heads = num_heads
        self.num_labels = num_labels
        d_label = d_model if d_label is None else d_label
        self.labels = nnx.data(None)
        if num_labels is not None:
            self.labels = nnx.Param(0.02 * jax.random.normal(rngs.params(),
                                                             (num_labels, d_label)))
        self.query_proj = torch_linear(d_label, d_model, rngs, use_bias=use_bias)
        self.kv_proj = torch_linear(d_model, 2 * d_model, rngs, use_bias=use_bias)
        head = (num_labels, d_model) if num_labels is not None else (d_model,)
        self.score_weight = nnx.Param(jax.random.uniform(rngs.params(), head, jnp.float32,
                                                         -d_model ** -0.5, d_model ** -0.5))
        self.score_bias = nnx.Param(jnp.zeros(head[:-1]))

    def __call__(self, features: jax.Array, *, label_embeddings: jax.Array | None = None,
                 mask: jax.Array | None = None, label_mask: jax.Array | None = None,
                 return_weights: bool = False):
        """features [B, S, d_model] (``mask`` bool [B, S]) -> (logits [B, L], pooled
        [B, L, d_model]) (and the weights [B, N, L, S] with ``return_weights``).

        ``label_embeddings`` [L, d_label] or [B, L, d_label] replaces the learned table
        (required without ``num_labels``; with a per-label head L must be num_labels)."""
        if label_embeddings is None:
            if self.labels is None:
                raise ValueError("label_embeddings: this module has no label table "
                                 "(num_labels=None); pass the label embeddings")
            label_embeddings = self.labels[...]
        q = self.query_proj(label_embeddings)
        k, v = jnp.split(self.kv_proj(features), 2, axis=-1)
        out = label_attention(q, k, v, num_heads=self.num_heads, mask=mask,
                              label_mask=label_mask, return_weights=return_weights)
        pooled = out[0] if return_weights else out
        logits = label_logits(pooled, self.score_weight[...], self.score_bias[...])
        return (logits, pooled, out[1]) if return_weights else (logits, pooled)


class QueryDecoderLayer(nnx.Module):
    """Pre-norm query decoder layer: [q + SelfAttn(norm q)], q + CrossAttn_c(norm q,
    context_c) for each context c in turn, q + MLP(norm q).

    The self-attention among the queries is non-causal with padded queries masked as keys
    (``self_attention=False`` drops it, as ML-Decoder does); each cross attention is a
    :class:`jattn.nn.MultiHeadAttention` with its own weights. Several contexts cover PMP's
    decoder (queries attend to the image features and to the text-prompt tokens) and SMTR's
    two steps (queries read the sub-string encoding, then the image features).

    Example:
        >>> import jax.numpy as jnp
        >>> from flax import nnx
        >>> layer = QueryDecoderLayer(16, num_heads=2, num_contexts=2, rngs=nnx.Rngs(0))
        >>> layer(jnp.ones((1, 4, 16)), [jnp.ones((1, 9, 16)), jnp.ones((1, 3, 16))]).shape
        (1, 4, 16)
    """

    def __init__(self, d_model: int, *, num_heads: int = 1, num_contexts: int = 1,
                 self_attention: bool = True, mlp: str = "gelu",
                 mlp_hidden: int | None = None, rngs: nnx.Rngs):
        check_int("num_contexts", num_contexts, allow_none=True)
        self.self_attn = self.self_norm = nnx.data(None)
        if self_attention:
            self.self_attn = MultiHeadAttention(d_model, num_heads, is_causal=False, rngs=rngs)
            self.self_norm = nnx.LayerNorm(d_model, rngs=rngs)
        self.cross = nnx.List([MultiHeadAttention(d_model, num_heads, is_causal=False, rngs=rngs)
                               for _ in range(num_contexts)])
        self.cross_norms = nnx.List([nnx.LayerNorm(d_model, rngs=rngs)
                                     for _ in range(num_contexts)])
        self.mlp_norm = nnx.LayerNorm(d_model, rngs=rngs)
        self.mlp = MLP(d_model, mlp_hidden or 4 * d_model, kind=mlp, rngs=rngs)

    def __call__(self, queries: jax.Array, contexts: jax.Array | Sequence[jax.Array], *,
                 context_masks: jax.Array | Sequence[jax.Array | None] | None = None,
                 query_mask: jax.Array | None = None) -> jax.Array:
        """queries [B, M, d_model], contexts: one [B, S, d_model] or one per cross
        attention (masks likewise: bool [B, S_c] or None) -> [B, M, d_model]."""
        contexts, context_masks = _as_list(contexts, context_masks, len(self.cross))
        x = queries
        if self.self_attn is not None:
            h = self.self_norm(x)
            x = x + self.self_attn(h, context=h, context_mask=query_mask)
        for attn, norm, ctx, ctx_mask in zip(self.cross, self.cross_norms, contexts,
                                             context_masks, strict=True):
            x = x + attn(norm(x), context=ctx, context_mask=ctx_mask)
        return x + self.mlp(self.mlp_norm(x))


def _as_list(contexts, masks, count: int):
    """One context (and its mask) or a sequence of them -> two lists of ``count``."""
    if isinstance(contexts, list | tuple):
        contexts = list(contexts)
        masks = [None] * len(contexts) if masks is None else list(masks)
    else:
        contexts, masks = [contexts], [masks]
    if len(contexts) != count:
        raise ValueError(f"contexts: expected {count} (one per cross attention), "
                         f"got {len(contexts)}")
    if len(masks) != count:
        raise ValueError(f"context_masks: expected {count} (one per context), got {len(masks)}")
    return contexts, masks


class QueryDecoder(nnx.Module):
    """A stack of :class:`QueryDecoderLayer` with learned queries (``num_queries``, N(0, 1)
    at start: DETR / Mask2Former / Query2Label-style object, tag or character queries) or
    queries given per call (text-derived), and a final LayerNorm.

    Example:
        >>> import jax.numpy as jnp
        >>> from flax import nnx
        >>> dec = QueryDecoder(16, num_layers=2, num_queries=6, num_heads=2, rngs=nnx.Rngs(0))
        >>> dec(jnp.ones((3, 10, 16))).shape
        (3, 6, 16)
    """

    def __init__(self, d_model: int, *, num_layers: int = 1, num_queries: int | None = None,
                 num_heads: int = 1, num_contexts: int = 1, self_attention: bool = True,
                 mlp: str = "gelu", mlp_hidden: int | None = None, rngs: nnx.Rngs):
        check_int("num_layers", num_layers, allow_none=True)
        check_int("num_queries", num_queries, allow_none=True)
        self.queries = nnx.data(None)
        if num_queries is not None:
            self.queries = nnx.Param(jax.random.normal(rngs.params(), (num_queries, d_model)))
        self.layers = nnx.List([
            QueryDecoderLayer(d_model, num_heads=num_heads, num_contexts=num_contexts,
                              self_attention=self_attention, mlp=mlp, mlp_hidden=mlp_hidden,
                              rngs=rngs) for _ in range(num_layers)])
        self.norm = nnx.LayerNorm(d_model, rngs=rngs)

    def __call__(self, contexts, *, queries: jax.Array | None = None, context_masks=None,
                 query_mask: jax.Array | None = None, return_all: bool = False):
        """contexts as in :class:`QueryDecoderLayer`; ``queries`` [M, d] or [B, M, d]
        replaces the learned ones -> [B, M, d_model] (normed), or with ``return_all`` the
        list of every layer's normed output (per-layer predictions, as PMP's mask proposals
        after each decoding layer)."""
        first = contexts if not isinstance(contexts, list | tuple) else contexts[0]
        if queries is None:
            if self.queries is None:
                raise ValueError("queries: this decoder has no learned queries "
                                 "(num_queries=None); pass them")
            queries = self.queries[...]
        if queries.ndim == 2:
            queries = jnp.broadcast_to(queries, (first.shape[0], *queries.shape))
        x, outs = queries.astype(first.dtype), []
        for layer in self.layers:
            x = layer(x, contexts, context_masks=context_masks, query_mask=query_mask)
            outs.append(self.norm(x))
        return outs if return_all else outs[-1]


class CoAttention(nnx.Module):
    """Parallel co-attention (:func:`jattn.co_attention`) between two sequences of
    widths ``d_a`` and ``d_b``: each side is projected to affinity features and values
    (``num_heads`` heads of ``head_dim``), one shared affinity, and each side's reading of
    the other is projected back to its own width (no residual: add it where you want it).

    Example:
        >>> import jax.numpy as jnp
        >>> from flax import nnx
        >>> co = CoAttention(16, 8, num_heads=2, rngs=nnx.Rngs(0))
        >>> [y.shape for y in co(jnp.ones((1, 5, 16)), jnp.ones((1, 3, 8)))]
        [(1, 5, 16), (1, 3, 8)]
    """

    def __init__(self, d_a: int, d_b: int | None = None, *, num_heads: int = 1,
                 head_dim: int | None = None, use_bias: bool = True, rngs: nnx.Rngs):
        d_b = d_a if d_b is None else d_b
        if head_dim is None:
            check_heads(d_a, num_heads)
            head_dim = d_a // num_heads
        check_int("num_heads", num_heads, allow_none=True)
        check_int("head_dim", head_dim, allow_none=True)
        self.num_heads = num_heads
        inner = num_heads * head_dim
        self.a_proj = torch_linear(d_a, 2 * inner, rngs, use_bias=use_bias)
        self.b_proj = torch_linear(d_b, 2 * inner, rngs, use_bias=use_bias)
        self.a_out = torch_linear(inner, d_a, rngs)
        self.b_out = torch_linear(inner, d_b, rngs)

    def __call__(self, a: jax.Array, b: jax.Array, *, a_mask: jax.Array | None = None,
                 b_mask: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
        """a [B, Ta, d_a], b [B, Tb, d_b] -> (a's reading of b [B, Ta, d_a], b's reading of
        a [B, Tb, d_b])."""
        ka, va = (_split_heads(x, self.num_heads)
                  for x in jnp.split(self.a_proj(a), 2, axis=-1))
        kb, vb = (_split_heads(x, self.num_heads)
                  for x in jnp.split(self.b_proj(b), 2, axis=-1))
        ab, ba = co_attention(ka, kb, va, vb, a_mask=a_mask, b_mask=b_mask)
        return (self.a_out(ab.reshape(*a.shape[:-1], -1)),
                self.b_out(ba.reshape(*b.shape[:-1], -1)))


class LatentCrossAttention(nnx.Module):
    """Latents read a context (:func:`jattn.latent_cross_attention`): queries from the
    latents, keys and values from the context (``d_context`` wide), optionally
    (``latents_in_keys``) also from the latents through the same key/value projection, as
    Flamingo's resampler (then ``d_context`` must equal ``d_model``).

    Example:
        >>> import jax.numpy as jnp
        >>> from flax import nnx
        >>> m = LatentCrossAttention(16, d_context=32, num_heads=2, rngs=nnx.Rngs(0))
        >>> m(jnp.ones((4, 16)), jnp.ones((2, 9, 32))).shape
        (2, 4, 16)
    """

    def __init__(self, d_model: int, *, d_context: int | None = None, num_heads: int = 1,
                 num_kv_heads: int | None = None, latents_in_keys: bool = False,
                 use_bias: bool = False, rngs: nnx.Rngs):
        d_context = d_model if d_context is None else d_context
        self.num_kv_heads = check_heads(d_model, num_heads, num_kv_heads)
        if latents_in_keys and d_context != d_model:
            raise ValueError(f"d_context: latents_in_keys projects latents and context with "
                             f"one key/value projection, so d_context must be d_model="
                             f"{d_model}, got {d_context}")
        self.num_heads = num_heads
        self.head_dim = d_model // num_heads
        self.latents_in_keys = latents_in_keys
        self.q_proj = torch_linear(d_model, d_model, rngs, use_bias=use_bias)
        self.kv_proj = torch_linear(d_context, 2 * self.num_kv_heads * self.head_dim, rngs,
                                    use_bias=use_bias)
        self.out_proj = torch_linear(d_model, d_model, rngs, use_bias=use_bias)

    def _kv(self, x):
        k, v = jnp.split(self.kv_proj(x), 2, axis=-1)
        return _split_heads(k, self.num_kv_heads), _split_heads(v, self.num_kv_heads)

    def __call__(self, latents: jax.Array, context: jax.Array, *,
                 context_mask: jax.Array | None = None) -> jax.Array:
        """latents [M, d_model] or [B, M, d_model], context [B, S, d_context] (``context_mask``
        bool [B, S]) -> [B, M, d_model]."""
        q = _split_heads(self.q_proj(latents), self.num_heads)
        k, v = self._kv(context)
        lk = lv = None
        if self.latents_in_keys:
            lk, lv = self._kv(latents)
        out = latent_cross_attention(q, k, v, mask=context_mask, latent_keys=lk,
                                     latent_values=lv)
        return self.out_proj(out.reshape(*out.shape[:-2], -1))


class PerceiverResampler(nnx.Module):
    """Learned latents [num_latents, d_model] resample a variable-length input into a fixed
    number of tokens: per layer, z + LatentCrossAttention(norm z, norm x), z + MLP(norm z);
    a final LayerNorm.

    ``latents_in_keys=True`` (default) is Flamingo's Perceiver resampler (the latents'
    keys/values are appended to the input's); False is Perceiver / Q-Former cross attention.
    With a list of feature levels (e.g. the stages of a visual encoder) layer i reads level
    ``routing[i]`` (TextHawk's multi-level cross-attention routes different encoder stages to
    different resampling layers; default: level i for layer i, which needs as many levels as
    layers). The latents start N(0, 1) as in Flamingo; ``latents=`` in the call replaces them
    (TextHawk's query proposal network makes them per example).

    Example:
        >>> import jax.numpy as jnp
        >>> from flax import nnx
        >>> r = PerceiverResampler(16, 4, num_layers=2, num_heads=2, rngs=nnx.Rngs(0))
        >>> r(jnp.ones((2, 30, 16))).shape
        (2, 4, 16)
    """

    def __init__(self, d_model: int, num_latents: int, *, num_layers: int = 1,
                 num_heads: int = 1, d_context: int | None = None,
                 latents_in_keys: bool = True, routing: Sequence[int] | None = None,
                 mlp: str = "gelu", mlp_hidden: int | None = None, rngs: nnx.Rngs):
        check_int("num_latents", num_latents, allow_none=True)
        check_int("num_layers", num_layers, allow_none=True)
        d_context = d_model if d_context is None else d_context
        if routing is not None:
            routing = tuple(int(r) for r in routing)
            if len(routing) != num_layers or min(routing) < 0:
                raise ValueError(f"routing: expected {num_layers} non-negative level indices "
                                 f"(one per layer), got {routing}")
        self.routing = routing
        self.latents = nnx.Param(jax.random.normal(rngs.params(), (num_latents, d_model)))
        self.attn = nnx.List([
            LatentCrossAttention(d_model, d_context=d_context, num_heads=num_heads,
                                 latents_in_keys=latents_in_keys, rngs=rngs)
            for _ in range(num_layers)])
        self.latent_norms = nnx.List([nnx.LayerNorm(d_model, rngs=rngs)
                                      for _ in range(num_layers)])
        self.context_norms = nnx.List([nnx.LayerNorm(d_context, rngs=rngs)
                                       for _ in range(num_layers)])
        self.mlp_norms = nnx.List([nnx.LayerNorm(d_model, rngs=rngs)
                                   for _ in range(num_layers)])
        self.mlps = nnx.List([MLP(d_model, mlp_hidden or 4 * d_model, kind=mlp, rngs=rngs)
                              for _ in range(num_layers)])
        self.norm = nnx.LayerNorm(d_model, rngs=rngs)

    def __call__(self, features, *, mask=None, latents: jax.Array | None = None) -> jax.Array:
        """features [B, S, d_context] (``mask`` bool [B, S]) or a list of levels [B, S_l,
        d_context] (``mask``: None or a list of bool [B, S_l] / None) -> [B, M, d_model]."""
        num_layers = len(self.attn)
        if isinstance(features, list | tuple):
            levels = list(features)
            masks = [None] * len(levels) if mask is None else list(mask)
            if len(masks) != len(levels):
                raise ValueError(f"mask: expected {len(levels)} (one per level), "
                                 f"got {len(masks)}")
            routing = self.routing if self.routing is not None else tuple(range(num_layers))
            if self.routing is None and len(levels) != num_layers:
                raise ValueError(f"features: {len(levels)} levels for {num_layers} layers; "
                                 f"give as many levels as layers or a routing")
            if max(routing) >= len(levels):
                raise ValueError(f"routing: level {max(routing)} requested, only "
                                 f"{len(levels)} levels given")
            per_layer = [(levels[r], masks[r]) for r in routing]
        else:
            per_layer = [(features, mask)] * num_layers
        z = self.latents[...] if latents is None else latents
        if z.ndim == 2:
            z = jnp.broadcast_to(z, (per_layer[0][0].shape[0], *z.shape))
        for attn, zn, cn, mn, mlp, (x, m) in zip(self.attn, self.latent_norms,
                                                 self.context_norms, self.mlp_norms, self.mlps,
                                                 per_layer, strict=True):
            z = z + attn(zn(z), cn(x), context_mask=m)
            z = z + mlp(mn(z))
        return self.norm(z)


class SlotAttention(nnx.Module):
    """Slot Attention: ``num_slots`` learned slots compete for the inputs over
    ``num_iterations`` rounds (:func:`jattn.slot_attention`: softmax over the slots, each
    slot's weighted mean of what it won); each round a GRU turns the slots' updates into
    new slots, then a residual MLP. The object-centric memory of Concept-Centric
    Transformers, which extracts the concepts that the inputs then read
    (:class:`LatentCrossAttention`). The initial slots are learned (``slots=`` in the call
    replaces them, e.g. with noisy samples as in the original Slot Attention).

    Example:
        >>> import jax.numpy as jnp
        >>> from flax import nnx
        >>> m = SlotAttention(16, 4, num_heads=2, rngs=nnx.Rngs(0))
        >>> slots, attention = m(jnp.ones((2, 30, 16)))
        >>> slots.shape, attention.shape
        ((2, 4, 16), (2, 2, 4, 30))

    References:
        P06 Concept-Centric Transformers; Locatello et al., "Object-Centric Learning with
        Slot Attention", 2020.
    """

    def __init__(self, d_model: int, num_slots: int, *, num_iterations: int = 3,
                 num_heads: int = 1, d_context: int | None = None,
                 mlp_hidden: int | None = None, rngs: nnx.Rngs):
        check_heads(d_model, num_heads)
        check_int("num_slots", num_slots)
        self.num_iterations = check_int("num_iterations", num_iterations)
        self.num_heads = num_heads
        d_context = d_model if d_context is None else d_context
        self.slots = nnx.Param(jax.random.normal(rngs.params(), (num_slots, d_model)))
        self.input_norm = nnx.LayerNorm(d_context, rngs=rngs)
        self.slot_norm = nnx.LayerNorm(d_model, rngs=rngs)
        self.mlp_norm = nnx.LayerNorm(d_model, rngs=rngs)
        self.q_proj = torch_linear(d_model, d_model, rngs, use_bias=False)
        self.kv_proj = torch_linear(d_context, 2 * d_model, rngs, use_bias=False)
        self.gru = nnx.GRUCell(d_model, d_model, rngs=rngs)
        self.mlp = MLP(d_model, mlp_hidden or 2 * d_model, rngs=rngs)

    def __call__(self, x: jax.Array, *, mask: jax.Array | None = None,
                 slots: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
        """x [B, S, d_context] (``mask`` bool [B, S]) -> (slots [B, M, d_model], the last
        round's attention [B, num_heads, M, S], each input's distribution over the
        slots)."""
        B = x.shape[0]
        z = self.slots[...] if slots is None else slots
        z = jnp.broadcast_to(z, (B, *z.shape[-2:]))
        M, D = z.shape[1:]
        k, v = (_split_heads(a, self.num_heads)
                for a in jnp.split(self.kv_proj(self.input_norm(x)), 2, axis=-1))
        attention = None
        for _ in range(self.num_iterations):
            q = _split_heads(self.q_proj(self.slot_norm(z)), self.num_heads)
            updates, attention = slot_attention(q, k, v, mask=mask)
            z, _ = self.gru(z.reshape(B * M, D), updates.reshape(B * M, D))
            z = z.reshape(B, M, D)
            z = z + self.mlp(self.mlp_norm(z))
        return z, attention


class TokenResampler(nnx.Module):
    """TextMonkey's token resampler: keep the ``num_keep`` tokens least like the others
    (:func:`jattn.analysis.tokens.distinct_token_scores`, highest scores, in position
    order) and let them read every token by cross attention:
    kept + LatentCrossAttention(norm(kept), norm(x)), then a LayerNorm. The selection itself
    passes no gradient (it is an index); the kept tokens and the attention do.

    Example:
        >>> import jax.numpy as jnp
        >>> from flax import nnx
        >>> r = TokenResampler(16, 4, num_heads=2, rngs=nnx.Rngs(0))
        >>> out, kept = r(jnp.arange(480.0).reshape(1, 30, 16) % 7)
        >>> out.shape, kept.shape
        ((1, 4, 16), (1, 4))

    References:
        P64 TextMonkey, "TextMonkey: An OCR-Free Large Multimodal Model for Understanding
        Document".
    """

    def __init__(self, d_model: int, num_keep: int, *, num_heads: int = 1, rngs: nnx.Rngs):
        self.num_keep = check_int("num_keep", num_keep)
        self.attn = LatentCrossAttention(d_model, num_heads=num_heads, rngs=rngs)
        self.query_norm = nnx.LayerNorm(d_model, rngs=rngs)
        self.context_norm = nnx.LayerNorm(d_model, rngs=rngs)
        self.norm = nnx.LayerNorm(d_model, rngs=rngs)

    def __call__(self, x: jax.Array, *, mask: jax.Array | None = None
                 ) -> tuple[jax.Array, jax.Array]:
        """x [B, S, d_model] (``mask`` bool [B, S]) -> (resampled [B, num_keep, d_model],
        the kept positions int32 [B, num_keep])."""
        kept = keep_top_tokens(distinct_token_scores(x, mask=mask), self.num_keep)
        queries = gather_tokens(x, kept)
        mask = None if mask is None else jnp.broadcast_to(mask, x.shape[:2])
        out = queries + self.attn(self.query_norm(queries), self.context_norm(x),
                                  context_mask=mask)
        return self.norm(out), kept


class MultiLevelCrossAttention(nnx.Module):
    """Queries attend to several feature levels at once
    (:func:`jattn.multi_level_cross_attention`, ``combine`` "joint" or "sum"): one
    query projection, one key/value projection per level (levels may differ in width and
    length), an output projection.

    Example:
        >>> import jax.numpy as jnp
        >>> from flax import nnx
        >>> m = MultiLevelCrossAttention(16, [8, 32], num_heads=2, rngs=nnx.Rngs(0))
        >>> m(jnp.ones((1, 4, 16)), [jnp.ones((1, 20, 8)), jnp.ones((1, 5, 32))]).shape
        (1, 4, 16)
    """

    def __init__(self, d_model: int, level_dims: Sequence[int], *, num_heads: int = 1,
                 combine: str = "joint", use_bias: bool = True, rngs: nnx.Rngs):
        check_heads(d_model, num_heads)
        if combine not in COMBINES:
            raise ValueError(f"combine: expected one of {COMBINES}, got {combine!r}")
        level_dims = list(level_dims)
        if not level_dims:
            raise ValueError("level_dims: expected at least one level")
        self.num_heads = num_heads
        self.combine = combine
        self.q_proj = torch_linear(d_model, d_model, rngs, use_bias=use_bias)
        self.kv_projs = nnx.List([torch_linear(d, 2 * d_model, rngs, use_bias=use_bias)
                                  for d in level_dims])
        self.out_proj = torch_linear(d_model, d_model, rngs, use_bias=use_bias)

    def __call__(self, x: jax.Array, levels: Sequence[jax.Array], *,
                 masks: Sequence[jax.Array | None] | None = None) -> jax.Array:
        """x [B, T, d_model], levels [B, S_l, level_dims[l]] -> [B, T, d_model]."""
        if len(levels) != len(self.kv_projs):
            raise ValueError(f"levels: expected {len(self.kv_projs)}, got {len(levels)}")
        q = _split_heads(self.q_proj(x), self.num_heads)
        keys, values = [], []
        for proj, level in zip(self.kv_projs, levels, strict=True):
            k, v = jnp.split(proj(level), 2, axis=-1)
            keys.append(_split_heads(k, self.num_heads))
            values.append(_split_heads(v, self.num_heads))
        out = multi_level_cross_attention(q, keys, values, masks=masks, combine=self.combine)
        return self.out_proj(out.reshape(*x.shape[:-1], -1))


class PairEncoder(nnx.Module):
    """One Transformer encoder used both ways on a sentence pair (Trans-Encoder).

    The pair becomes one joint sequence (:func:`jattn.pair_inputs`); each pre-norm
    layer runs self-attention with :func:`jattn.pair_mask` ("cross": the two sentences
    see each other; "bi": each sees itself only) and an MLP. Learned positions are added
    (the joint numbering for "cross", per-sentence for "bi", so "bi" equals encoding each
    sentence alone). The score is :func:`jattn.cross_encoder_score` (a linear head on
    the first token, a logit) for "cross", :func:`jattn.bi_encoder_score` (cosine of
    the mean-pooled sentences) for "bi": the same weights serve both formulations, which
    Trans-Encoder alternates between (its self-distillation loop is the user's).

    Example:
        >>> import jax.numpy as jnp
        >>> from flax import nnx
        >>> enc = PairEncoder(16, num_heads=2, max_length=32, rngs=nnx.Rngs(0))
        >>> a, b = jnp.ones((2, 5, 16)), jnp.ones((2, 4, 16))
        >>> enc(a, b, mode="cross").shape, enc(a, b, mode="bi").shape
        ((2,), (2,))
    """

    def __init__(self, d_model: int, *, num_layers: int = 1, num_heads: int = 1,
                 max_length: int = 512, pooling: str = "first", mlp: str = "gelu",
                 mlp_hidden: int | None = None, rngs: nnx.Rngs):
        check_int("num_layers", num_layers, allow_none=True)
        check_int("max_length", max_length, allow_none=True)
        if pooling not in POOLINGS:
            raise ValueError(f"pooling: expected one of {POOLINGS}, got {pooling!r}")
        self.pooling = pooling
        self.max_length = max_length
        self.positions = nnx.Param(0.02 * jax.random.normal(rngs.params(),
                                                            (max_length, d_model)))
        self.attn_norms = nnx.List([nnx.LayerNorm(d_model, rngs=rngs)
                                    for _ in range(num_layers)])
        self.projs = nnx.List([QKVProjection(d_model, num_heads, rngs=rngs)
                               for _ in range(num_layers)])
        self.outs = nnx.List([torch_linear(d_model, d_model, rngs)
                              for _ in range(num_layers)])
        self.mlp_norms = nnx.List([nnx.LayerNorm(d_model, rngs=rngs)
                                   for _ in range(num_layers)])
        self.mlps = nnx.List([MLP(d_model, mlp_hidden or 4 * d_model, kind=mlp, rngs=rngs)
                              for _ in range(num_layers)])
        self.norm = nnx.LayerNorm(d_model, rngs=rngs)
        self.score = torch_linear(d_model, 1, rngs)

    def encode(self, a: jax.Array, b: jax.Array, *, a_mask=None, b_mask=None,
               mode: str = "cross") -> tuple[jax.Array, jax.Array]:
        """a [B, Ta, d_model], b [B, Tb, d_model] embeddings -> (hidden [B, Ta + Tb,
        d_model], segment ids [B, Ta + Tb]); padding rows of hidden are not meaningful."""
        if mode not in PAIR_MODES:
            raise ValueError(f"mode: expected one of {PAIR_MODES}, got {mode!r}")
        pair = pair_inputs(a, b, a_mask=a_mask, b_mask=b_mask)
        if pair.tokens.shape[1] > self.max_length:
            raise ValueError(f"a, b: {pair.tokens.shape[1]} joint positions, more than "
                             f"max_length={self.max_length}")
        where = pair.positions if mode == "cross" else pair.segment_positions
        x = pair.tokens + self.positions[...][jnp.maximum(where, 0)]
        allowed = pair_mask(pair.segment_ids, mode=mode)
        for norm, proj, out, mlp_norm, mlp in zip(self.attn_norms, self.projs, self.outs,
                                                  self.mlp_norms, self.mlps, strict=True):
            q, k, v = proj(norm(x))
            y = dot_product_attention(q, k, v, mask=allowed)
            x = x + out(y.reshape(*x.shape[:-1], -1))
            x = x + mlp(mlp_norm(x))
        return self.norm(x), pair.segment_ids

    def __call__(self, a: jax.Array, b: jax.Array, *, a_mask=None, b_mask=None,
                 mode: str = "cross") -> jax.Array:
        """The pair's score [B]: a logit ("cross") or a cosine ("bi")."""
        hidden, segment_ids = self.encode(a, b, a_mask=a_mask, b_mask=b_mask, mode=mode)
        if mode == "bi":
            return bi_encoder_score(hidden, segment_ids)
        return cross_encoder_score(hidden, self.score.kernel[...][:, 0],
                                   self.score.bias[...][0], segment_ids=segment_ids,
                                   pooling=self.pooling)
