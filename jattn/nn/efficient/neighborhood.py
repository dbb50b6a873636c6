"""NNX module for neighbourhood attention (``jattn.efficient.neighborhood``) over
``[B, *spatial, d_model]``.

References:
    P72 Faster Neighborhood Attention, "Faster Neighborhood Attention: Reducing the O(n^2)
    Cost of Self Attention at the Threadblock Level".
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
from flax import nnx

from jattn.core.shapes import check_heads
from jattn.efficient.neighborhood import neighborhood_attention
from jattn.nn.layers import torch_linear


class NeighborhoodAttention(nnx.Module):
    """Multi-head neighbourhood self-attention (:func:`jattn.neighborhood_attention`)
    over ``[B, *spatial, d_model]`` inputs: sequences [B, T, d], images [B, X, Y, d], ...

    One fused qkv projection (``num_heads`` query heads, ``num_kv_heads`` key/value heads,
    GQA when fewer), the function, an output projection; linear layers start as
    torch.nn.Linear does. Optional global tokens ``extra`` [B, E, d_model] (class or
    register tokens) pass through the same key/value projection and are attended by every
    position, in the same softmax as its neighbourhood.

    Example:
        >>> import jax.numpy as jnp
        >>> from flax import nnx
        >>> layer = NeighborhoodAttention(16, num_heads=2, kernel_size=3, rngs=nnx.Rngs(0))
        >>> layer(jnp.ones((1, 5, 6, 16))).shape
        (1, 5, 6, 16)
    """

    def __init__(self, d_model: int, num_heads: int = 1, *, kernel_size: int | Sequence[int],
                 dilation: int | Sequence[int] = 1, is_causal: bool | Sequence[bool] = False,
                 stride: int | Sequence[int] = 1, num_kv_heads: int | None = None,
                 qkv_bias: bool = True, rngs: nnx.Rngs):
        num_kv_heads = check_heads(d_model, num_heads, num_kv_heads)
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = d_model // num_heads
        self.kernel_size = tuple(kernel_size) if isinstance(kernel_size, Sequence) else kernel_size
        self.dilation = tuple(dilation) if isinstance(dilation, Sequence) else dilation
        self.is_causal = tuple(is_causal) if isinstance(is_causal, Sequence) else is_causal
        self.stride = tuple(stride) if isinstance(stride, Sequence) else stride
        width = (num_heads + 2 * num_kv_heads) * self.head_dim
        self.qkv_proj = torch_linear(d_model, width, rngs, use_bias=qkv_bias)
        self.out_proj = torch_linear(d_model, d_model, rngs)

    def _split(self, projected: jax.Array):
        """[..., (N + 2K) * h] -> q [..., N, h], k [..., K, h], v [..., K, h]."""
        N, K, h = self.num_heads, self.num_kv_heads, self.head_dim
        heads = projected.reshape(*projected.shape[:-1], N + 2 * K, h)
        return heads[..., :N, :], heads[..., N:N + K, :], heads[..., N + K:, :]

    def __call__(self, x: jax.Array, extra: jax.Array | None = None) -> jax.Array:
        """x ``[B, *spatial, d_model]`` (extra [B, E, d_model] global tokens) -> like x."""
        q, k, v = self._split(self.qkv_proj(x))
        extra_key = extra_value = None
        if extra is not None:
            _, extra_key, extra_value = self._split(self.qkv_proj(extra))
        out = neighborhood_attention(q, k, v, kernel_size=self.kernel_size,
                                     dilation=self.dilation, is_causal=self.is_causal,
                                     stride=self.stride, extra_key=extra_key,
                                     extra_value=extra_value)
        return self.out_proj(out.reshape(x.shape))
