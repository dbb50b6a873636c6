"""NNX module for bi-level routing attention (``jattn.efficient.bilevel``) over
``[B, *spatial, d_model]``.

References:
    P59 BiFormer, "BiFormer: Vision Transformer with Bi-Level Routing Attention".
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
from flax import nnx

from jattn.core.shapes import check_heads
from jattn.efficient.bilevel import bilevel_routing_attention
from jattn.nn.layers import torch_linear


class BiLevelRoutingAttention(nnx.Module):
    """Multi-head bi-level routing attention
    (:func:`jattn.bilevel_routing_attention`) over sequences [B, T, d_model] or
    images [B, X, Y, d_model].

    One fused qkv projection (``num_heads`` query heads, ``num_kv_heads`` key/value heads,
    GQA when fewer), the function, an output projection; linear layers start as
    torch.nn.Linear does. ``lepe_kernel_size`` (BiFormer uses 5) adds BiFormer's local
    context enhancement: a depthwise convolution of the projected values (each value channel
    feeds num_heads / num_kv_heads output channels), added to the attention output before
    the output projection; causal layers pad it on the left only, so it stays causal.
    ``spatial_axes`` (1 for sequences, 2 for images) fixes that convolution's rank; causal
    layers take sequences (spatial_axes=1).

    Example:
        >>> import jax.numpy as jnp
        >>> from flax import nnx
        >>> layer = BiLevelRoutingAttention(16, num_heads=2, region_size=2, top_k=2,
        ...                                 lepe_kernel_size=3, rngs=nnx.Rngs(0))
        >>> layer(jnp.ones((1, 5, 6, 16))).shape
        (1, 5, 6, 16)
    """

    def __init__(self, d_model: int, num_heads: int = 1, *, region_size: int | Sequence[int],
                 top_k: int, is_causal: bool = False, num_kv_heads: int | None = None,
                 qkv_bias: bool = True, lepe_kernel_size: int | None = None,
                 spatial_axes: int = 2, rngs: nnx.Rngs):
        num_kv_heads = check_heads(d_model, num_heads, num_kv_heads)
        if lepe_kernel_size is not None and lepe_kernel_size < 1:
            raise ValueError(f"lepe_kernel_size: expected a positive int or None, got "
                             f"{lepe_kernel_size}")
        if spatial_axes not in (1, 2):
            raise ValueError(f"spatial_axes: expected 1 (sequences) or 2 (images), got "
                             f"{spatial_axes}")
        if is_causal and spatial_axes != 1:
            raise ValueError("is_causal: causal layers take sequences; pass spatial_axes=1")
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = d_model // num_heads
        self.region_size = (tuple(region_size) if isinstance(region_size, Sequence)
                            else region_size)
        self.top_k = top_k
        self.is_causal = is_causal
        width = (num_heads + 2 * num_kv_heads) * self.head_dim
        self.qkv_proj = torch_linear(d_model, width, rngs, use_bias=qkv_bias)
        self.out_proj = torch_linear(d_model, d_model, rngs)
        lepe = None
        if lepe_kernel_size is not None:
            k = lepe_kernel_size
            channels = num_kv_heads * self.head_dim
            bound = 1.0 / math.sqrt(k ** spatial_axes)
            padding = [(k - 1, 0)] if is_causal else "SAME"
            lepe = nnx.Conv(
                channels, d_model, (k,) * spatial_axes, padding=padding,
                feature_group_count=channels, rngs=rngs,
                kernel_init=nnx.initializers.variance_scaling(1 / 3, "fan_in", "uniform"),
                bias_init=lambda key, shape, dtype: jax.random.uniform(key, shape, dtype,
                                                                       -bound, bound))
        self.lepe = nnx.data(lepe)

    def _split(self, projected: jax.Array):
        """[..., (N + 2K) * h] -> q [..., N, h], k [..., K, h], v [..., K, h]."""
        N, K, h = self.num_heads, self.num_kv_heads, self.head_dim
        heads = projected.reshape(*projected.shape[:-1], N + 2 * K, h)
        return heads[..., :N, :], heads[..., N:N + K, :], heads[..., N + K:, :]

    def __call__(self, x: jax.Array) -> jax.Array:
        """x ``[B, *spatial, d_model]`` -> like x."""
        q, k, v = self._split(self.qkv_proj(x))
        out = bilevel_routing_attention(q, k, v, region_size=self.region_size,
                                        top_k=self.top_k, is_causal=self.is_causal)
        out = out.reshape(x.shape)
        if self.lepe is not None:
            out = out + self.lepe(v.reshape(*v.shape[:-2], -1))
        return self.out_proj(out)
