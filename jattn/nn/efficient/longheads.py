"""NNX module for LongHeads attention (``jattn.efficient.longheads``) over [B, T, d_model].

References:
    P61 LongHeads, "LongHeads: Multi-Head Attention is Secretly a Long Context Processor".
"""

from __future__ import annotations

import jax
from flax import nnx

from jattn.core.shapes import check_heads
from jattn.efficient.longheads import SUMMARIES, longheads_attention
from jattn.nn.layers import torch_linear


class LongHeadsAttention(nnx.Module):
    """Causal multi-head LongHeads self-attention
    (:func:`jattn.longheads_attention`): per head, each token attends to the first
    chunk, its own chunk and the ``top_k - 2`` earlier chunks that score best against it.

    One fused qkv projection (``num_heads`` query heads, ``num_kv_heads`` key/value heads,
    GQA when fewer), the function, an output projection; linear layers start as
    torch.nn.Linear does. Position encodings (and LongHeads' position remapping) are not
    part of this layer.

    Example:
        >>> import jax.numpy as jnp
        >>> from flax import nnx
        >>> layer = LongHeadsAttention(16, num_heads=2, chunk_size=4, top_k=3,
        ...                            rngs=nnx.Rngs(0))
        >>> layer(jnp.ones((1, 10, 16))).shape
        (1, 10, 16)
    """

    def __init__(self, d_model: int, num_heads: int = 1, *, chunk_size: int, top_k: int,
                 num_kv_heads: int | None = None, summary: str = "attention",
                 qkv_bias: bool = True, rngs: nnx.Rngs):
        num_kv_heads = check_heads(d_model, num_heads, num_kv_heads)
        if summary not in SUMMARIES:
            raise ValueError(f"summary: expected one of {SUMMARIES}, got {summary!r}")
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = d_model // num_heads
        self.chunk_size = chunk_size
        self.top_k = top_k
        self.summary = summary
        width = (num_heads + 2 * num_kv_heads) * self.head_dim
        self.qkv_proj = torch_linear(d_model, width, rngs, use_bias=qkv_bias)
        self.out_proj = torch_linear(d_model, d_model, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        """x [B, T, d_model] -> [B, T, d_model]."""
        N, K, h = self.num_heads, self.num_kv_heads, self.head_dim
        heads = self.qkv_proj(x).reshape(*x.shape[:-1], N + 2 * K, h)
        q, k, v = heads[..., :N, :], heads[..., N:N + K, :], heads[..., N + K:, :]
        out = longheads_attention(q, k, v, chunk_size=self.chunk_size, top_k=self.top_k,
                                  summary=self.summary)
        return self.out_proj(out.reshape(x.shape))
