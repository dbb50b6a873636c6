"""NNX module for routing attention (``jattn.routing_attention``).

References:
    P51 Routing Transformer, "Efficient Content-Based Sparse Attention with Routing
    Transformers".
"""

from __future__ import annotations

import jax
from flax import nnx

from jattn.core.shapes import check_heads, check_int
from jattn.efficient.routing import RoutingState, init_routing_state, routing_attention
from jattn.nn.layers import torch_linear


class RoutingCentroids(nnx.Variable):
    """k-means centroids [num_heads, num_clusters, head_dim]: state, not a trained parameter
    (not an ``nnx.Param``, so optimisers filtering on Param leave it alone)."""


class RoutingAttention(nnx.Module):
    """Routing self-attention over [B, T, d_model] (:func:`jattn.routing_attention`).

    Shared QK by default, as the Routing Transformer: one projection gives the queries, used
    as keys too (``shared_qk=False``: separate query and key projections). One centroid set
    per head in ``self.centroids`` (a :class:`RoutingCentroids` variable, unit random
    vectors at start). In training mode (``deterministic=False``, nnx's ``.train()``) every
    call routes with the current centroids and then stores the EMA-updated ones; in
    evaluation mode (``.eval()``) they stay. Linear layers start as torch.nn.Linear does.

    Example:
        >>> import jax.numpy as jnp
        >>> layer = RoutingAttention(16, num_heads=2, num_clusters=2, rngs=nnx.Rngs(0))
        >>> layer(jnp.ones((1, 10, 16))).shape
        (1, 10, 16)
    """

    def __init__(self, d_model: int, num_heads: int = 1, num_clusters: int = 4, *,
                 window: int | None = None, is_causal: bool = False, shared_qk: bool = True,
                 decay: float = 0.999, qkv_bias: bool = True, deterministic: bool = False,
                 rngs: nnx.Rngs):
        check_heads(d_model, num_heads)
        check_int("num_clusters", num_clusters)
        self.num_heads = num_heads
        self.num_clusters = num_clusters
        self.window = window
        self.is_causal = is_causal
        self.shared_qk = shared_qk
        self.decay = decay
        self.deterministic = deterministic
        n_proj = 2 if shared_qk else 3
        self.in_proj = torch_linear(d_model, n_proj * d_model, rngs, use_bias=qkv_bias)
        self.out_proj = torch_linear(d_model, d_model, rngs)
        state = init_routing_state(rngs.params(), num_heads, num_clusters,
                                   d_model // num_heads)
        self.centroids = RoutingCentroids(state.centroids)

    def project(self, x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """x [B, T, d_model] -> query, key, value [B, T, num_heads, head_dim]."""
        B, T, _ = x.shape
        parts = self.in_proj(x).reshape(B, T, -1, self.num_heads, x.shape[-1] // self.num_heads)
        if self.shared_qk:
            return parts[:, :, 0], parts[:, :, 0], parts[:, :, 1]
        return parts[:, :, 0], parts[:, :, 1], parts[:, :, 2]

    def __call__(self, x: jax.Array) -> jax.Array:
        """x [B, T, d_model] -> [B, T, d_model]; updates the centroids in training mode."""
        B, T, D = x.shape
        q, k, v = self.project(x)
        update = not self.deterministic
        out, state = routing_attention(
            q, k, v, RoutingState(self.centroids[...]), num_clusters=self.num_clusters,
            window=self.window, is_causal=self.is_causal, update=update, decay=self.decay)
        if update:
            self.centroids[...] = state.centroids
        return self.out_proj(out.reshape(B, T, D))
