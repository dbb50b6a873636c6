"""NNX modules for fusion by attention (``jattn.applications.fusion``): projections around the
functions.

* :class:`CrossViTFusion` (P05): both branches' CLS tokens exchange information with the
  other branch's patches.
* :class:`GlobalLocalCrossAttention` (P18 GLCA) and :class:`PairwiseCrossAttention`
  (P18 PWCA, training only).
* :class:`ReferenceAttention` (P08) and :class:`CrossFrameAttention` (P10): self- or
  cross-frame attention with injected keys and values.
* :class:`FairIdentityAttention` (P11): attribute-conditioned self-attention.
* :class:`RegionTokens` (P55): region tokens pooled from pixel masks, appended to the patch
  tokens.

Linear layers start as torch.nn.Linear does (:func:`jattn.nn.layers.torch_linear`).

References:
    P05 CrossViT; P08 IDM-VTON; P10 VideoBooth; P11 FairDomain; P18 DCAL; P55
    Region-to-entity (MaskOVEN-Wiki). Titles in :mod:`jattn.applications.fusion`.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from jattn.analysis.rollout import attention_rollout
from jattn.applications.fusion import (
    appended_kv_attention,
    attribute_conditioned_attention,
    cls_cross_attention,
    cross_frame_attention,
    global_local_cross_attention,
    pairwise_cross_attention,
    region_pooling,
)
from jattn.core.attention import dot_product_attention
from jattn.core.shapes import check_heads
from jattn.nn.layers import QKVProjection, torch_linear


def _merge_heads(x: jax.Array) -> jax.Array:
    return x.reshape(*x.shape[:-2], -1)


class _Branch(nnx.Module):
    """One direction of CrossViT's fusion: branch a's CLS token reads branch b's patches."""

    def __init__(self, d_from: int, d_to: int, num_heads: int, qkv_bias: bool, rngs: nnx.Rngs):
        check_heads(d_to, num_heads)
        self.num_heads = num_heads
        self.project_norm = nnx.LayerNorm(d_from, rngs=rngs)
        self.project = torch_linear(d_from, d_to, rngs)  # f: to the other branch's width
        self.norm = nnx.LayerNorm(d_to, rngs=rngs)
        self.proj = QKVProjection(d_to, num_heads, use_bias=qkv_bias, rngs=rngs)
        self.out_proj = torch_linear(d_to, d_to, rngs)
        self.revert_norm = nnx.LayerNorm(d_to, rngs=rngs)
        self.revert = torch_linear(d_to, d_from, rngs)  # g: back to this branch's width

    def __call__(self, own: jax.Array, other: jax.Array, other_mask: jax.Array | None
                 ) -> jax.Array:
        cls = self.project(jax.nn.gelu(self.project_norm(own[:, :1])))  # f(x_cls), [B, 1, d]
        seq = self.norm(jnp.concatenate([cls, other[:, 1:]], axis=1))
        q, k, v = self.proj(seq[:, :1], seq)
        fused = cls_cross_attention(q[:, 0], k[:, 0], v[:, 0], k[:, 1:], v[:, 1:],
                                    patch_mask=None if other_mask is None else other_mask[:, 1:])
        y = cls + self.out_proj(_merge_heads(fused))[:, None]
        new_cls = self.revert(jax.nn.gelu(self.revert_norm(y)))
        return jnp.concatenate([new_cls, own[:, 1:]], axis=1)


class CrossViTFusion(nnx.Module):
    """CrossViT's cross-attention fusion of two branches (token 0 of each is its CLS).

    For each branch: its CLS token is projected to the other branch's width (f), prepended
    to the other branch's patch tokens, layer-normed, and used as the only query of a
    multi-head cross attention over that sequence (:func:`jattn.cls_cross_attention`,
    linear in the tokens); the output projection is added to the projected CLS (residual),
    projected back (g) and replaces the branch's CLS token. The patch tokens pass through.
    f and g are LayerNorm, GELU, Linear (the paper says only "projection"; this is the
    usual form).

    Example:
        >>> import jax.numpy as jnp
        >>> from flax import nnx
        >>> fuse = CrossViTFusion((8, 16), num_heads=2, rngs=nnx.Rngs(0))
        >>> small, large = fuse(jnp.ones((2, 10, 8)), jnp.ones((2, 5, 16)))
        >>> small.shape, large.shape
        ((2, 10, 8), (2, 5, 16))
    """

    def __init__(self, dims: tuple[int, int], num_heads: int | tuple[int, int] = 1, *,
                 qkv_bias: bool = True, rngs: nnx.Rngs):
        if len(dims) != 2:
            raise ValueError(f"dims: expected the two branch widths, got {dims!r}")
        heads = (num_heads, num_heads) if isinstance(num_heads, int) else tuple(num_heads)
        d_a, d_b = dims
        # heads[i] is the head count of the attention run at branch (1 - i)'s width
        self.a_reads_b = _Branch(d_a, d_b, heads[1], qkv_bias, rngs)
        self.b_reads_a = _Branch(d_b, d_a, heads[0], qkv_bias, rngs)

    def __call__(self, x_a: jax.Array, x_b: jax.Array, *, mask_a: jax.Array | None = None,
                 mask_b: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
        """x_a [B, 1 + P_a, d_a], x_b [B, 1 + P_b, d_b] (masks bool [B, 1 + P], True = real
        token) -> the two branches with their CLS tokens fused."""
        return self.a_reads_b(x_a, x_b, mask_b), self.b_reads_a(x_b, x_a, mask_a)


class GlobalLocalCrossAttention(nnx.Module):
    """DCAL's GLCA: the top-R tokens by attention rollout attend to every token.

    The rollout of the given attention maps (the previous layers', e.g. from
    :func:`jattn.attention_weights`) is read at the CLS row (``cls_index``, excluded from the
    selection); the R highest-scoring tokens' queries attend to all keys
    (:func:`jattn.global_local_cross_attention`). Own projections (DCAL does not share
    GLCA's weights with self-attention). Returns the output projection of the R attended
    tokens and their positions.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from flax import nnx
        >>> glca = GlobalLocalCrossAttention(16, 2, top_r=3, rngs=nnx.Rngs(0))
        >>> maps = jax.nn.softmax(jnp.zeros((2, 1, 2, 7, 7)))      # 2 layers, uniform
        >>> out, idx = glca(jnp.ones((1, 7, 16)), maps)
        >>> out.shape, idx.shape
        ((1, 3, 16), (1, 3))
    """

    def __init__(self, d_model: int, num_heads: int = 1, *, top_r: int, residual: float = 0.5,
                 qkv_bias: bool = True, rngs: nnx.Rngs):
        check_heads(d_model, num_heads)
        self.top_r = top_r
        self.residual = residual
        self.proj = QKVProjection(d_model, num_heads, use_bias=qkv_bias, rngs=rngs)
        self.out_proj = torch_linear(d_model, d_model, rngs)

    def scores(self, attention_maps, cls_index: int | None = 0) -> jax.Array:
        """The selection scores [B, T]: the rollout's CLS row, -inf at the CLS itself."""
        rollout = attention_rollout(attention_maps, residual=self.residual)
        if cls_index is None:  # no CLS token: how much each token is drawn on overall
            return rollout.mean(1)
        row = rollout[:, cls_index]
        return row.at[:, cls_index].set(-jnp.inf)

    def __call__(self, x: jax.Array, attention_maps, *, cls_index: int | None = 0,
                 kv_mask: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
        """x [B, T, d_model], attention maps [L, B, N', T, T] (or a list) -> (out
        [B, R, d_model], indices int32 [B, R]). ``cls_index=None``: no CLS, the tokens are
        ranked by their mean rollout column."""
        q, k, v = self.proj(x)
        out, indices = global_local_cross_attention(
            q, k, v, self.scores(attention_maps, cls_index), top_r=self.top_r,
            kv_mask=kv_mask)
        return self.out_proj(_merge_heads(out)), indices


class PairwiseCrossAttention(nnx.Module):
    """DCAL's PWCA: self-attention whose keys and values also hold another image's.

    **Training only**: with ``partner`` (int [B], the batch element paired with each one)
    the call returns the pair-wise cross attention
    (:func:`jattn.applications.fusion.pairwise_cross_attention`); without it, the plain
    self-attention with the same weights, which is what DCAL keeps at inference (the PWCA
    branch shares its weights with self-attention and is removed).

    Example:
        >>> import jax.numpy as jnp
        >>> from flax import nnx
        >>> pwca = PairwiseCrossAttention(16, 2, rngs=nnx.Rngs(0))
        >>> pwca(jnp.ones((2, 5, 16)), partner=jnp.array([1, 0])).shape
        (2, 5, 16)
    """

    def __init__(self, d_model: int, num_heads: int = 1, *, qkv_bias: bool = True,
                 rngs: nnx.Rngs):
        check_heads(d_model, num_heads)
        self.proj = QKVProjection(d_model, num_heads, use_bias=qkv_bias, rngs=rngs)
        self.out_proj = torch_linear(d_model, d_model, rngs)

    def __call__(self, x: jax.Array, *, partner: jax.Array | None = None,
                 kv_mask: jax.Array | None = None) -> jax.Array:
        """x [B, T, d_model] -> [B, T, d_model]; ``kv_mask`` bool [B, T] marks real tokens."""
        q, k, v = self.proj(x)
        if partner is None:
            mask = None if kv_mask is None else kv_mask[:, None, None, :]
            out = dot_product_attention(q, k, v, mask=mask)
        else:
            out = pairwise_cross_attention(q, k, v, partner, kv_mask=kv_mask)
        return self.out_proj(_merge_heads(out))


class ReferenceAttention(nnx.Module):
    """Self-attention with a reference's tokens appended to the keys and values (IDM-VTON).

    The reference tokens (e.g. the garment UNet's features at this layer) are projected by
    the same key and value weights as the tokens themselves, so the call equals
    self-attention over [x; reference] with the output kept for x's tokens
    (:func:`jattn.appended_kv_attention`). Without a reference it is plain
    self-attention. ``is_causal`` applies to x's own tokens; the reference is always visible.

    Example:
        >>> import jax.numpy as jnp
        >>> from flax import nnx
        >>> attn = ReferenceAttention(16, 2, rngs=nnx.Rngs(0))
        >>> attn(jnp.ones((2, 5, 16)), jnp.ones((2, 7, 16))).shape
        (2, 5, 16)
    """

    def __init__(self, d_model: int, num_heads: int = 1, *, is_causal: bool = False,
                 qkv_bias: bool = True, rngs: nnx.Rngs):
        check_heads(d_model, num_heads)
        self.is_causal = is_causal
        self.proj = QKVProjection(d_model, num_heads, use_bias=qkv_bias, rngs=rngs)
        self.out_proj = torch_linear(d_model, d_model, rngs)

    def __call__(self, x: jax.Array, reference: jax.Array | None = None, *,
                 reference_mask: jax.Array | None = None) -> jax.Array:
        """x [B, T, d_model], reference [B, E, d_model] (``reference_mask`` bool [B, E])
        -> [B, T, d_model]."""
        q, k, v = self.proj(x)
        if reference is None:
            out = dot_product_attention(q, k, v, is_causal=self.is_causal)
        else:
            _, rk, rv = self.proj(reference)
            out = appended_kv_attention(q, k, v, rk, rv, extra_mask=reference_mask,
                                        is_causal=self.is_causal)
        return self.out_proj(_merge_heads(out))


class CrossFrameAttention(nnx.Module):
    """Cross-frame attention of a video with an injected image prompt (VideoBooth).

    Frame f's tokens attend to the tokens of ``frames`` (default: the first and the
    previous frame) and, with a ``prompt``, to the prompt's keys and values (only in the
    first frame with ``extra_frames="first"``): :func:`jattn.cross_frame_attention`.
    The prompt is projected by the frames' key/value weights, or by its own
    (``separate_prompt_kv=True``, as when the injected keys get their own fine-tuned
    projections).

    Example:
        >>> import jax.numpy as jnp
        >>> from flax import nnx
        >>> attn = CrossFrameAttention(16, 2, rngs=nnx.Rngs(0))
        >>> attn(jnp.ones((1, 3, 4, 16)), prompt=jnp.ones((1, 6, 16))).shape
        (1, 3, 4, 16)
    """

    def __init__(self, d_model: int, num_heads: int = 1, *,
                 frames: Sequence[str] = ("first", "previous"), extra_frames: str = "first",
                 separate_prompt_kv: bool = False, qkv_bias: bool = True, rngs: nnx.Rngs):
        check_heads(d_model, num_heads)
        self.frames = tuple(frames)
        self.extra_frames = extra_frames
        self.proj = QKVProjection(d_model, num_heads, use_bias=qkv_bias, rngs=rngs)
        self.prompt_proj = nnx.data(None)
        if separate_prompt_kv:
            self.prompt_proj = QKVProjection(d_model, num_heads, use_bias=qkv_bias, rngs=rngs)
        self.out_proj = torch_linear(d_model, d_model, rngs)

    def __call__(self, x: jax.Array, *, prompt: jax.Array | None = None,
                 prompt_mask: jax.Array | None = None) -> jax.Array:
        """x [B, F, L, d_model], prompt [B, E, d_model] (``prompt_mask`` bool [B, E])
        -> [B, F, L, d_model]."""
        q, k, v = self.proj(x)
        pk = pv = None
        if prompt is not None:
            _, pk, pv = (self.prompt_proj or self.proj)(prompt)
        out = cross_frame_attention(q, k, v, frames=self.frames, extra_key=pk, extra_value=pv,
                                    extra_mask=prompt_mask, extra_frames=self.extra_frames)
        return self.out_proj(_merge_heads(out))


class FairIdentityAttention(nnx.Module):
    """FairDomain's fair identity attention: self-attention conditioned on an attribute.

    A learned embedding e_a of each example's attribute (e.g. a demographic group) is added
    to the tokens on the query and key side only: q = (x + e_a) W_q, k = (x + e_a) W_k,
    v = x W_v (:func:`jattn.attribute_conditioned_attention` with offsets e_a W_q,
    e_a W_k); the output projection is added to x (plug-in residual block). The embeddings
    start at zero, so the block starts as plain self-attention.

    Example:
        >>> import jax.numpy as jnp
        >>> from flax import nnx
        >>> fia = FairIdentityAttention(16, 2, num_attributes=3, rngs=nnx.Rngs(0))
        >>> fia(jnp.ones((2, 5, 16)), jnp.array([0, 2])).shape
        (2, 5, 16)
    """

    def __init__(self, d_model: int, num_heads: int = 1, *, num_attributes: int,
                 is_causal: bool = False, residual: bool = True, qkv_bias: bool = True,
                 rngs: nnx.Rngs):
        check_heads(d_model, num_heads)
        if num_attributes < 1:
            raise ValueError(f"num_attributes: expected >= 1, got {num_attributes}")
        self.is_causal = is_causal
        self.residual = residual
        self.attribute_embedding = nnx.Param(jnp.zeros((num_attributes, d_model)))
        self.proj = QKVProjection(d_model, num_heads, use_bias=qkv_bias, rngs=rngs)
        self.out_proj = torch_linear(d_model, d_model, rngs)

    def offsets(self, attribute: jax.Array) -> tuple[jax.Array, jax.Array]:
        """(a_q [B, N, H], a_k [B, K, H]): the attribute embedding through W_q and W_k."""
        p = self.proj
        e = self.attribute_embedding[...][attribute]  # [B, d_model]
        kernel = p.qkv_proj.kernel[...]
        wq, wk, _ = p.widths
        a_q = (e @ kernel[:, :wq]).reshape(-1, p.num_heads, p.head_dim)
        a_k = (e @ kernel[:, wq:wq + wk]).reshape(-1, p.num_kv_heads, p.head_dim)
        return a_q, a_k

    def __call__(self, x: jax.Array, attribute: jax.Array, *,
                 mask: jax.Array | None = None) -> jax.Array:
        """x [B, T, d_model], attribute int [B] -> [B, T, d_model]; ``mask`` bool [B, T]
        marks real tokens."""
        q, k, v = self.proj(x)
        a_q, a_k = self.offsets(attribute)
        out = attribute_conditioned_attention(
            q, k, v, a_q, a_k, mask=None if mask is None else mask[:, None, None, :],
            is_causal=self.is_causal)
        out = self.out_proj(_merge_heads(out))
        return x + out if self.residual else out


class RegionTokens(nnx.Module):
    """MaskOVEN's visual semantic tokens: pooled regions appended to the patch tokens.

    Region tokens are the mask-weighted averages of the patch features
    (:func:`jattn.region_pooling`); patches and regions go through one projection to
    ``d_model``, and regions get a learned type embedding. Returns the token sequence
    [patches; regions] and its key mask (empty regions are masked), ready for any attention
    ("region-interacted attention": e.g. ``MultiHeadAttention(..., context=tokens,
    context_mask=token_mask)`` or self-attention over the tokens).

    Example:
        >>> import jax.numpy as jnp
        >>> from flax import nnx
        >>> regions = RegionTokens(8, 16, rngs=nnx.Rngs(0))
        >>> tokens, mask = regions(jnp.ones((1, 2, 2, 8)), jnp.ones((1, 3, 8, 8), bool))
        >>> tokens.shape, mask.shape
        ((1, 7, 16), (1, 7))
    """

    def __init__(self, feature_dim: int, d_model: int, *, rngs: nnx.Rngs):
        self.proj = torch_linear(feature_dim, d_model, rngs)
        self.region_type = nnx.Param(jnp.zeros((d_model,)))

    def __call__(self, features: jax.Array, masks: jax.Array) -> tuple[jax.Array, jax.Array]:
        """features [B, h, w, C] (or [B, P, C]), masks [B, M, Hm, Wm] (or [B, M, P]) ->
        (tokens [B, P + M, d_model], token_mask bool [B, P + M])."""
        pooled, valid = region_pooling(features, masks)
        patches = features.reshape(features.shape[0], -1, features.shape[-1])
        regions = self.proj(pooled) + self.region_type[...]
        tokens = jnp.concatenate([self.proj(patches), regions], axis=1)
        mask = jnp.concatenate([jnp.ones(patches.shape[:2], bool), valid], axis=1)
        return tokens, mask
