"""NNX modules for pooling and target attention (``jattn.applications.pooling``).

References:
    P33 Low-rank factorised MHSA, "Low Rank Factorization for Compact Multi-Head
    Self-Attention" (LAMA).
    P38 MQSA-TED, "Collaboration and Transition: Distilling Item Transitions into Multi-Query
    Self-Attention for Sequential Recommendation" (L-query and multi-query self-attention).
    P47 DARE, "Long-Sequence Recommendation Models Need Decoupled Embeddings".
    P35 "Pooling And Attention: What Are Effective Designs For LLM-Based Embedding Models?"
    (latent-attention and multi-layer trainable pooling).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jattn.applications.pooling import (
    context_query_pooling,
    decoupled_target_attention,
    last_token_pool,
    latent_attention_pool,
    masked_mean,
    multi_layer_pool,
    window_mean,
)
from jattn.core.attention import dot_product_attention
from jattn.core.shapes import (
    check_heads,
    check_int,
    check_integer,
    check_rank,
    check_values_in_range,
)
from jattn.nn.layers import MLP, torch_linear, torch_uniform

CONTEXTS = ("learned", "mean")


class ContextQueryPooling(nnx.Module):
    """LAMA pooling (``jattn.context_query_pooling``): ``num_heads`` attention
    distributions over the tokens, queried by one global context vector.

    ``context="learned"`` holds a learned context vector c (LAMA); ``"mean"`` uses the masked
    mean of the input (LAMA + ctx). The factors P, Q ([d_model, num_heads]) and c start
    uniform in +-1/sqrt(d_model), as a torch.nn.Linear(d_model, num_heads). The call returns
    (pooled [B, num_heads, d_model], attention [B, num_heads, n]); the paper flattens the
    pooled matrix (and may project it) before its classifier, which is left to the caller.

    Example:
        >>> import jax.numpy as jnp
        >>> from flax import nnx
        >>> pool = ContextQueryPooling(16, num_heads=4, rngs=nnx.Rngs(0))
        >>> pooled, attention = pool(jnp.ones((2, 7, 16)))
        >>> pooled.shape, attention.shape
        ((2, 4, 16), (2, 4, 7))
    """

    def __init__(self, d_model: int, num_heads: int, *, context: str = "learned",
                 rngs: nnx.Rngs):
        if num_heads < 1:
            raise ValueError(f"num_heads: expected a positive int, got {num_heads}")
        if context not in CONTEXTS:
            raise ValueError(f"context: expected one of {CONTEXTS}, got {context!r}")
        self.context_mode = context
        self.query_factors = torch_uniform(rngs, (d_model, num_heads), d_model)
        self.key_factors = torch_uniform(rngs, (d_model, num_heads), d_model)
        self.context_vector = (torch_uniform(rngs, (d_model,), d_model)
                               if context == "learned" else None)

    def __call__(self, hidden: jax.Array, *, mask: jax.Array | None = None
                 ) -> tuple[jax.Array, jax.Array]:
        """hidden [B, n, d_model], mask bool [B, n] -> (pooled, attention)."""
        context = (self.context_vector[...] if self.context_mode == "learned"
                   else masked_mean(hidden, mask=mask))
        return context_query_pooling(hidden, context, self.query_factors[...],
                                     self.key_factors[...], mask=mask)


class LQuerySelfAttention(nnx.Module):
    """MQSA's L-query self-attention: causal attention whose query at position t is the mean
    of the last ``window`` items (``jattn.window_mean``).

    As in the official code (a SASRec layer): Q = LayerNorm(window_mean(x)) W_Q, K = x W_K,
    V = x W_V (the un-pooled, un-normalised input), causal softmax attention with the padding
    keys masked out, no output projection, and (``residual=True``) the *pooled, normalised*
    query added back: out = attention + LayerNorm(qbar). ``residual=False`` returns only the
    attention, for blocks that add their own residual. Padding positions output 0. With
    ``window=1`` this is plain causal self-attention with a LayerNorm on the query side
    (SASRec). Dropout on the attention probabilities when the call gets a ``dropout_rng``.
    Linear layers start as torch.nn.Linear; the LayerNorm uses the code's epsilon 1e-8.

    Example:
        >>> import jax.numpy as jnp
        >>> from flax import nnx
        >>> layer = LQuerySelfAttention(16, window=3, rngs=nnx.Rngs(0))
        >>> layer(jnp.ones((2, 5, 16))).shape
        (2, 5, 16)
    """

    def __init__(self, d_model: int, window: int, num_heads: int = 1, *, residual: bool = True,
                 dropout_rate: float = 0.0, epsilon: float = 1e-8, rngs: nnx.Rngs):
        check_heads(d_model, num_heads)
        check_int("window", window)
        self.window = window
        self.num_heads = num_heads
        self.residual = residual
        self.dropout_rate = dropout_rate
        self.query_norm = nnx.LayerNorm(d_model, epsilon=epsilon, rngs=rngs)
        self.query_proj = torch_linear(d_model, d_model, rngs)
        self.key_proj = torch_linear(d_model, d_model, rngs)
        self.value_proj = torch_linear(d_model, d_model, rngs)

    def __call__(self, x: jax.Array, *, mask: jax.Array | None = None,
                 dropout_rng: jax.Array | None = None) -> jax.Array:
        """x [B, T, d_model], mask bool [B, T] (True = real item) -> [B, T, d_model]."""
        B, T, D = x.shape
        pooled = self.query_norm(window_mean(x, self.window, mask=mask))
        heads = (B, T, self.num_heads, D // self.num_heads)
        q = self.query_proj(pooled).reshape(heads)
        k = self.key_proj(x).reshape(heads)
        v = self.value_proj(x).reshape(heads)
        rate = self.dropout_rate if dropout_rng is not None else 0.0
        out = dot_product_attention(q, k, v, mask=None if mask is None else mask[:, None, None],
                                    is_causal=True, dropout_rate=rate, dropout_rng=dropout_rng)
        out = out.reshape(B, T, D)
        if self.residual:
            out = out + pooled
        return out if mask is None else jnp.where(mask[..., None], out, 0)


class MultiQuerySelfAttention(nnx.Module):
    """MQSA: a short-query (``short_window``, default 1) and a long-query (``long_window``,
    default 3, the code's L) :class:`LQuerySelfAttention` with separate weights, mixed as
    alpha * short + (1 - alpha) * long with a fixed alpha (default 0.5; 1 gives SASRec).

    The paper mixes the outputs of two whole towers (stacks of blocks with their FFNs); this
    module mixes at one layer. For the paper's form, build two towers whose attention layers
    are LQuerySelfAttention(window=1) and LQuerySelfAttention(window=L) and mix their final
    outputs with the same formula.

    Example:
        >>> import jax.numpy as jnp
        >>> from flax import nnx
        >>> layer = MultiQuerySelfAttention(16, long_window=3, rngs=nnx.Rngs(0))
        >>> layer(jnp.ones((2, 5, 16))).shape
        (2, 5, 16)
    """

    def __init__(self, d_model: int, long_window: int = 3, num_heads: int = 1, *,
                 alpha: float = 0.5, short_window: int = 1, residual: bool = True,
                 dropout_rate: float = 0.0, epsilon: float = 1e-8, rngs: nnx.Rngs):
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha: expected a weight in [0, 1], got {alpha!r}")
        self.alpha = alpha
        options = dict(num_heads=num_heads, residual=residual, dropout_rate=dropout_rate,
                       epsilon=epsilon, rngs=rngs)
        self.short = LQuerySelfAttention(d_model, short_window, **options)
        self.long = LQuerySelfAttention(d_model, long_window, **options)

    def __call__(self, x: jax.Array, *, mask: jax.Array | None = None,
                 dropout_rng: jax.Array | None = None) -> jax.Array:
        """x [B, T, d_model], mask bool [B, T] -> [B, T, d_model]."""
        short_rng = long_rng = None
        if dropout_rng is not None:
            short_rng, long_rng = jax.random.split(dropout_rng)
        short = self.short(x, mask=mask, dropout_rng=short_rng)
        long = self.long(x, mask=mask, dropout_rng=long_rng)
        return self.alpha * short + (1 - self.alpha) * long


class DecoupledEmbeddings(nnx.Module):
    """DARE: separate attention and representation embedding tables, and the target-attention
    features [r_t, h, r_t * h] (``jattn.decoupled_target_attention``).

    The attention table (``attention_dim``, may be smaller: DARE's faster search) scores the
    behaviours against the target; the ``top_k`` best (default 20, the code's) are averaged
    from the representation table (``representation_dim``). Behaviours equal to
    ``padding_id`` are ignored (None: no padding). ``cross_feature=False`` drops r_t * h.
    ``full_attention=True`` in the call is soft attention over all behaviours (the code's
    auxiliary-loss path). The prediction MLP is not part of this module. Tables start
    N(0, 1), torch.nn.Embedding's default (the official code is PyTorch).

    Example:
        >>> import jax.numpy as jnp
        >>> from flax import nnx
        >>> dare = DecoupledEmbeddings(100, 8, 16, top_k=4, rngs=nnx.Rngs(0))
        >>> dare(jnp.array([3, 7]), jnp.array([[1, 2, 3, 0], [5, 6, 0, 0]])).shape
        (2, 48)
    """

    def __init__(self, num_items: int, attention_dim: int, representation_dim: int, *,
                 top_k: int | None = 20, padding_id: int | None = 0,
                 cross_feature: bool = True, rngs: nnx.Rngs):
        check_int("top_k", top_k, allow_none=True)
        init = nnx.initializers.normal(1.0)
        self.num_items = num_items
        self.top_k = top_k
        self.padding_id = padding_id
        self.cross_feature = cross_feature
        self.attention_table = nnx.Embed(num_items, attention_dim, embedding_init=init,
                                         rngs=rngs)
        self.representation_table = nnx.Embed(num_items, representation_dim,
                                              embedding_init=init, rngs=rngs)

    def __call__(self, target_ids: jax.Array, behaviour_ids: jax.Array, *,
                 full_attention: bool = False) -> jax.Array:
        """target_ids int [B], behaviour_ids int [B, n] -> features [B, 3 * representation_dim]
        ([B, 2 * representation_dim] without the cross feature)."""
        check_rank("target_ids", target_ids, (1,), "[B]")
        check_rank("behaviour_ids", behaviour_ids, (2,), "[B, n]")
        check_integer("target_ids", target_ids)
        check_integer("behaviour_ids", behaviour_ids)
        if behaviour_ids.shape[0] != target_ids.shape[0]:
            raise ValueError(f"behaviour_ids: expected [B={target_ids.shape[0]}, n] to match "
                             f"target_ids {target_ids.shape}, got {behaviour_ids.shape}")
        check_values_in_range("target_ids", target_ids, 0, self.num_items - 1)
        check_values_in_range("behaviour_ids", behaviour_ids, 0, self.num_items - 1)
        mask = None if self.padding_id is None else behaviour_ids != self.padding_id
        r_t = self.representation_table(target_ids)
        h = decoupled_target_attention(
            self.attention_table(target_ids), self.attention_table(behaviour_ids),
            self.representation_table(behaviour_ids),
            top_k=None if full_attention else self.top_k, mask=mask)
        features = [r_t, h, r_t * h] if self.cross_feature else [r_t, h]
        return jnp.concatenate(features, axis=-1)


class LatentAttentionPooling(nnx.Module):
    """Trainable latent-attention pooling (``jattn.latent_attention_pool``): the
    tokens attend to ``num_latents`` learned key/value vectors, a GELU MLP (hidden
    ``mlp_dim``, default d_model) maps each output, and the valid tokens are averaged.
    Latents start N(0, 1/d_model) like an embedding, the MLP as flax's Linear.

    Example:
        >>> import jax.numpy as jnp
        >>> from flax import nnx
        >>> pool = LatentAttentionPooling(16, num_latents=8, num_heads=2, rngs=nnx.Rngs(0))
        >>> pool(jnp.ones((2, 5, 16)), mask=jnp.ones((2, 5), bool)).shape
        (2, 16)
    """

    def __init__(self, d_model: int, *, num_latents: int = 512, num_heads: int = 8,
                 mlp_dim: int | None = None, rngs: nnx.Rngs):
        check_heads(d_model, num_heads)
        if num_latents < 1:
            raise ValueError(f"num_latents: expected a positive int, got {num_latents}")
        std = d_model ** -0.5
        self.latent_keys = nnx.Param(std * jax.random.normal(rngs.params(),
                                                             (num_latents, d_model)))
        self.latent_values = nnx.Param(std * jax.random.normal(rngs.params(),
                                                               (num_latents, d_model)))
        self.mlp = MLP(d_model, mlp_dim or d_model, rngs=rngs)
        self.num_heads = num_heads

    def __call__(self, hidden: jax.Array, *, mask: jax.Array | None = None) -> jax.Array:
        """hidden [B, n, d_model] (last layer), mask bool [B, n] -> [B, d_model]."""
        return latent_attention_pool(hidden, self.latent_keys[...], self.latent_values[...],
                                     num_heads=self.num_heads, mask=mask, transform=self.mlp)


class MultiLayerTrainablePooling(nnx.Module):
    """Multi-Layers Trainable Pooling (``jattn.multi_layer_pool``): the last real
    token of every layer's hidden states, plus a learned layer embedding, is attended by
    ``num_queries`` trainable queries through key/value projections; a GELU MLP maps each
    output and the queries are averaged.

    Example:
        >>> import jax.numpy as jnp
        >>> from flax import nnx
        >>> pool = MultiLayerTrainablePooling(16, num_layers=4, num_heads=2, rngs=nnx.Rngs(0))
        >>> pool(jnp.ones((2, 4, 5, 16)), mask=jnp.ones((2, 5), bool)).shape
        (2, 16)
    """

    def __init__(self, d_model: int, *, num_layers: int, num_queries: int = 1,
                 num_heads: int = 8, mlp_dim: int | None = None, rngs: nnx.Rngs):
        check_heads(d_model, num_heads)
        for name, value in (("num_layers", num_layers), ("num_queries", num_queries)):
            if value < 1:
                raise ValueError(f"{name}: expected a positive int, got {value}")
        std = d_model ** -0.5
        self.queries = nnx.Param(std * jax.random.normal(rngs.params(), (num_queries, d_model)))
        self.layer_embeddings = nnx.Param(jnp.zeros((num_layers, d_model)))
        self.key_proj = torch_linear(d_model, d_model, rngs, use_bias=False)
        self.value_proj = torch_linear(d_model, d_model, rngs, use_bias=False)
        self.mlp = MLP(d_model, mlp_dim or d_model, rngs=rngs)
        self.num_heads = num_heads

    def __call__(self, hidden_states: jax.Array, *, mask: jax.Array | None = None
                 ) -> jax.Array:
        """hidden_states [B, L, n, d_model] (every layer's output), mask bool [B, n]
        -> [B, d_model]."""
        check_rank("hidden_states", hidden_states, (4,), "[B, L, n, d]")
        if mask is not None:
            mask = jnp.broadcast_to(mask[:, None], hidden_states.shape[:3])
        return multi_layer_pool(
            last_token_pool(hidden_states, mask=mask), self.queries[...],
            num_heads=self.num_heads, layer_embeddings=self.layer_embeddings[...],
            key_kernel=self.key_proj.kernel[...], value_kernel=self.value_proj.kernel[...],
            transform=self.mlp)
