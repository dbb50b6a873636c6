"""NNX module for LongHeads attention (``jattn.efficient.longheads``) over [B, T, d_model].

References:
    P61 LongHeads, "LongHeads: Multi-Head Attention is Secretly a Long Context Processor".
"""

from __future__ import annotations

import jax
from flax import nnx

from jattn.core.shapes import check_heads
from jattn.efficient.longheads import (
    SUMMARIES,
    LongHeadsCache,
    init_longheads_cache,
    longheads_attention,
    longheads_decode,
)
from jattn.nn.layers import torch_linear


class LongHeadsAttention(nnx.Module):
    """Causal multi-head LongHeads self-attention
    (:func:`jattn.longheads_attention`): per head, each token attends to the first
    chunk, its own chunk and the ``top_k - 2`` earlier chunks that score best against it.

    One fused qkv projection (``num_heads`` query heads, ``num_kv_heads`` key/value heads,
    GQA when fewer), the function, an output projection; linear layers start as
    torch.nn.Linear does. ``rope_base`` turns on rotary embeddings at LongHeads' remapped
    positions (each head's selected chunks laid side by side; ``rope_fraction``,
    ``rope_scaling``, ``rope_factor`` as in :class:`jattn.nn.MultiHeadAttention`); without
    it the layer has no position encoding. :meth:`prefill` and :meth:`step` decode against a
    :class:`jattn.LongHeadsCache` (:func:`jattn.longheads_decode`).

    Example:
        >>> import jax.numpy as jnp
        >>> from flax import nnx
        >>> layer = LongHeadsAttention(16, num_heads=2, chunk_size=4, top_k=3,
        ...                            rngs=nnx.Rngs(0))
        >>> layer(jnp.ones((1, 10, 16))).shape
        (1, 10, 16)
        >>> layer = LongHeadsAttention(16, num_heads=2, chunk_size=4, top_k=3, rope_base=1e4,
        ...                            rngs=nnx.Rngs(0))
        >>> y, cache = layer.prefill(jnp.ones((1, 10, 16)), max_length=12)
        >>> y, cache = layer.step(jnp.ones((1, 1, 16)), cache)
        >>> y.shape, int(cache.kv.length)
        ((1, 1, 16), 11)
    """

    def __init__(self, d_model: int, num_heads: int = 1, *, chunk_size: int, top_k: int,
                 num_kv_heads: int | None = None, summary: str = "attention",
                 rope_base: float | None = None, rope_fraction: float = 1.0,
                 rope_scaling: str | None = None, rope_factor: float = 1.0,
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
        self.rope = dict(rope_base=rope_base, rope_fraction=rope_fraction,
                         rope_scaling=rope_scaling, rope_factor=rope_factor)
        width = (num_heads + 2 * num_kv_heads) * self.head_dim
        self.qkv_proj = torch_linear(d_model, width, rngs, use_bias=qkv_bias)
        self.out_proj = torch_linear(d_model, d_model, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        """x [B, T, d_model] -> [B, T, d_model]."""
        q, k, v = self._heads(x)
        out = longheads_attention(q, k, v, chunk_size=self.chunk_size, top_k=self.top_k,
                                  summary=self.summary, **self.rope)
        return self.out_proj(out.reshape(x.shape))

    def prefill(self, x: jax.Array, *, max_length: int) -> tuple[jax.Array, LongHeadsCache]:
        """The forward of a prompt x [B, T, d_model] and the cache (``max_length``
        positions) for :meth:`step`."""
        cache = init_longheads_cache(x.shape[0], max_length, self.num_heads,
                                     self.num_kv_heads, self.head_dim,
                                     chunk_size=self.chunk_size, dtype=x.dtype)
        return self.step(x, cache)

    def step(self, x: jax.Array, cache: LongHeadsCache, *, position=None
             ) -> tuple[jax.Array, LongHeadsCache]:
        """The next tokens x [B, T, d_model] against the cache (:func:`jattn.longheads_decode`):
        (output, updated cache). ``position`` is implied by the cache."""
        del position
        q, k, v = self._heads(x)
        out, cache = longheads_decode(q, k, v, cache, chunk_size=self.chunk_size,
                                      top_k=self.top_k, summary=self.summary, **self.rope)
        return self.out_proj(out.reshape(x.shape)), cache

    def _heads(self, x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        N, K, h = self.num_heads, self.num_kv_heads, self.head_dim
        heads = self.qkv_proj(x).reshape(*x.shape[:-1], N + 2 * K, h)
        return heads[..., :N, :], heads[..., N:N + K, :], heads[..., N + K:, :]
