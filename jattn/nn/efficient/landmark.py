"""NNX module for landmark attention (``jattn.landmark_attention``).

References:
    P21 Landmark Attention, "Landmark Attention: Random-Access Infinite Context Length for
    Transformers".
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

import jattn
from jattn.core.shapes import check_heads
from jattn.efficient.landmark import (
    landmark_attention,
    landmark_decode,
    mean_landmark_keys,
    num_blocks,
)
from jattn.nn.layers import torch_linear


class LandmarkAttention(nnx.Module):
    """Landmark self-attention over [B, T, d_model] (:func:`jattn.landmark_attention`).

    The landmark keys: by default the mean key of each block plus a learned landmark key
    per head (``self.landmark_key`` [num_heads, head_dim],
    :func:`jattn.efficient.landmark.mean_landmark_keys`), a one-layer stand-in for the paper's
    landmark tokens; or, when the call gets
    ``landmark_states`` [B, num_blocks, d_model] (the hidden states of landmark tokens that a
    model carries through its layers, as in the paper), their key projections. ``top_k``
    (None: every block, the training form) retrieves the k best blocks per query and head
    at inference; a call's ``top_k`` overrides the module's (None keeps it). Linear layers
    start as torch.nn.Linear does.

    Example:
        >>> import jax.numpy as jnp
        >>> layer = LandmarkAttention(16, num_heads=2, block_size=4, rngs=nnx.Rngs(0))
        >>> layer(jnp.ones((1, 10, 16))).shape
        (1, 10, 16)
    """

    def __init__(self, d_model: int, num_heads: int = 1, block_size: int = 64, *,
                 is_causal: bool = True, top_k: int | None = None, qkv_bias: bool = True,
                 rngs: nnx.Rngs):
        check_heads(d_model, num_heads)
        if block_size < 1:
            raise ValueError(f"block_size: expected a positive int, got {block_size}")
        self.num_heads = num_heads
        self.block_size = block_size
        self.is_causal = is_causal
        self.top_k = top_k
        self.q_proj = torch_linear(d_model, d_model, rngs, use_bias=qkv_bias)
        self.k_proj = torch_linear(d_model, d_model, rngs, use_bias=qkv_bias)
        self.v_proj = torch_linear(d_model, d_model, rngs, use_bias=qkv_bias)
        self.out_proj = torch_linear(d_model, d_model, rngs)
        self.landmark_key = nnx.Param(
            0.02 * jax.random.normal(rngs.params(), (num_heads, d_model // num_heads)))

    def __call__(self, x: jax.Array, *, landmark_states: jax.Array | None = None,
                 top_k: int | None = None) -> jax.Array:
        """x [B, T, d_model] -> [B, T, d_model]."""
        B, T, D = x.shape
        q, k, v = (proj(x).reshape(B, T, self.num_heads, -1)
                   for proj in (self.q_proj, self.k_proj, self.v_proj))
        if landmark_states is None:
            landmarks = mean_landmark_keys(k, self.block_size, offset=self.landmark_key[...])
        else:
            nb = num_blocks(T, self.block_size)
            if landmark_states.shape != (B, nb, D):
                raise ValueError(f"landmark_states: expected [B, num_blocks, d_model] = "
                                 f"{(B, nb, D)}, got {landmark_states.shape}")
            landmarks = self.k_proj(landmark_states).reshape(B, nb, self.num_heads, -1)
        landmarks = landmarks.astype(jnp.result_type(q))
        out = landmark_attention(q, k, v, landmarks, block_size=self.block_size,
                                 is_causal=self.is_causal,
                                 top_k=self.top_k if top_k is None else top_k)
        return self.out_proj(out.reshape(B, T, D))

    def prefill(self, x: jax.Array, *, max_length: int) -> tuple[jax.Array, jattn.KVCache]:
        """Causal forward of a prompt x [B, T, d_model] and the KV cache (``max_length``
        slots) for :meth:`step`; the module's ``top_k`` applies (landmarks: the default
        block-mean keys)."""
        self._check_decodable()
        B, _, D = x.shape
        cache = jattn.init_cache(B, max_length, self.num_heads, D // self.num_heads,
                                 dtype=x.dtype)
        return self.step(x, cache)

    def step(self, x: jax.Array, cache: jattn.KVCache, *, position=None
             ) -> tuple[jax.Array, jattn.KVCache]:
        """The next tokens x [B, T, d_model] against the cache (:func:`jattn.landmark_decode`
        after writing their keys and values; landmarks are the block-mean keys of the
        cache): (output, updated cache). ``position`` is implied by the cache."""
        del position
        self._check_decodable()
        B, T, D = x.shape
        q, k, v = (proj(x).reshape(B, T, self.num_heads, -1)
                   for proj in (self.q_proj, self.k_proj, self.v_proj))
        cache = jattn.write_cache(cache, k, v)
        keys, values = cache.key.astype(q.dtype), cache.value.astype(q.dtype)
        landmarks = mean_landmark_keys(keys, self.block_size, offset=self.landmark_key[...])
        out = landmark_decode(q, keys, values, landmarks.astype(q.dtype), cache.length,
                              block_size=self.block_size, top_k=self.top_k)
        return self.out_proj(out.reshape(B, T, D)), cache

    def _check_decodable(self) -> None:
        if not self.is_causal:
            raise NotImplementedError("decoding token by token needs a causal layer")
