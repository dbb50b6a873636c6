"""NNX module for softmax self-attention over [B, T, d_model] sequences.

References:
    P24 Zoology (the attention and sliding-window attention mixers: one fused qkv projection
    with bias, attention dropout, causal, an output projection); P68 Sigma (DiffQKV heads
    through :class:`jattn.nn.QKVProjection`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

import jattn
from jattn.analysis.intervene import Intervention, attend
from jattn.core.positions import apply_rope
from jattn.nn.layers import QKVProjection, torch_linear


class MultiHeadAttention(nnx.Module):
    """Causal multi-head self-attention through :func:`jattn.dot_product_attention`.

    ``window`` restricts each query to itself and the ``window - 1`` keys before it (sliding
    window attention); ``dropout_rate`` drops attention probabilities when the call gets a
    ``dropout_rng``. The head layout options (GQA/MQA with ``num_kv_heads``, DiffQKV with
    ``num_value_heads``, ``value_head_dim`` and the augmented query's ``query_mlp_dim``) are
    :class:`jattn.nn.QKVProjection`'s. ``rope_base`` turns on rotary embeddings of the
    queries and keys (:func:`jattn.positions.apply_rope` with ``rope_fraction``,
    ``rope_scaling`` "linear"/"ntk" and ``rope_factor``), at positions 0.. in a full call and
    continuing from the cache when decoding. ``implementation`` is
    :func:`jattn.dot_product_attention`'s (None: the best available). Linear layers start as
    torch.nn.Linear does.

    A call with ``intervention`` (:class:`jattn.analysis.Intervention`: a static capture
    spec and an edits pytree) returns ``(output, captures)``. It is an argument, not NNX
    intermediates (``sow``), because the edits must go in as well as the captures come
    out, the result stays a pure function of its inputs (jit, vmap and grad with respect to
    the edits need nothing else), and the compiled program changes only with the spec.

    Example:
        >>> import jax.numpy as jnp
        >>> from flax import nnx
        >>> mha = MultiHeadAttention(16, num_heads=2, rngs=nnx.Rngs(0))
        >>> mha(jnp.ones((1, 5, 16))).shape
        (1, 5, 16)
    """

    def __init__(self, d_model: int, num_heads: int = 1, *, is_causal: bool = True,
                 window: int | None = None, qkv_bias: bool = True, dropout_rate: float = 0.0,
                 num_kv_heads: int | None = None, num_value_heads: int | None = None,
                 value_head_dim: int | None = None, query_mlp_dim: int | None = None,
                 rope_base: float | None = None, rope_fraction: float = 1.0,
                 rope_scaling: str | None = None, rope_factor: float = 1.0,
                 implementation=None, rngs: nnx.Rngs):
        if window is not None and window < 1:
            raise ValueError(f"window: expected >= 1 or None, got {window}")
        self.rope = None if rope_base is None else dict(
            base=rope_base, fraction=rope_fraction, scaling=rope_scaling, factor=rope_factor)
        self.num_heads = num_heads
        self.is_causal = is_causal
        self.window = window
        self.dropout_rate = dropout_rate
        self.implementation = implementation
        self.proj = QKVProjection(d_model, num_heads, num_kv_heads=num_kv_heads,
                                  num_value_heads=num_value_heads,
                                  value_head_dim=value_head_dim, query_mlp_dim=query_mlp_dim,
                                  use_bias=qkv_bias, rngs=rngs)
        self.out_proj = torch_linear(num_heads * self.proj.value_head_dim, d_model, rngs)

    def __call__(self, x: jax.Array, *, context: jax.Array | None = None,
                 context_mask: jax.Array | None = None, mask=None,
                 dropout_rng: jax.Array | None = None,
                 intervention: Intervention | None = None):
        """x [B, T, d_model] -> [B, T, d_model]; dropout only when ``dropout_rng`` is given.

        ``mask`` (a :class:`jattn.masks.Mask` or a bool array broadcastable to
        [B, N, T, T]) restricts self-attention further: it is combined with the layer's
        causal flag and window (e.g. ``jattn.masks.composite_visual(is_visual)``, whose
        empty tiles the chunked path and the kernels skip). With ``context`` [B, S, d_model]
        this is cross attention: keys and values come from the context (``context_mask``
        bool [B, S] marks its real tokens); the layer's causal flag and window then do not
        apply. With ``intervention``: (output, captures).

        Raises:
            ValueError: ``mask`` together with ``context``.
        """
        if context is not None and mask is not None:
            raise ValueError("mask: restricts self-attention; cross attention takes "
                             "context_mask")
        q, k, v = self.proj(x, context)
        rate = self.dropout_rate if dropout_rng is not None else 0.0
        if context is None and self.rope is not None:
            q, k = (apply_rope(a, **self.rope) for a in (q, k))
        options = dict(dropout_rate=rate, dropout_rng=dropout_rng,
                       implementation=self.implementation)
        if context is not None:
            options["mask"] = None if context_mask is None else context_mask[:, None, None, :]
        else:
            window = None if self.window is None else (self.window - 1, 0 if self.is_causal else
                                                       self.window - 1)
            options.update(is_causal=self.is_causal, local_window_size=window, mask=mask)
        out, captures = attend(q, k, v, intervention=intervention, **options)
        y = self.out_proj(out.reshape(*x.shape[:-1], -1))
        return y if intervention is None else (y, captures)

    def prefill(self, x: jax.Array, *, max_length: int, sinks: int = 0
                ) -> tuple[jax.Array, jattn.KVCache]:
        """Causal forward of a prompt x [B, T, d_model] that also returns the KV cache
        (``max_length`` slots, or a ring of ``window`` slots) for :meth:`step`. With a
        window, the first ``sinks`` positions stay visible to every query
        (:func:`jattn.init_cache`)."""
        self._check_causal()
        p = self.proj
        cache = jattn.init_cache(x.shape[0], max_length, p.num_kv_heads, p.head_dim,
                                 value_head_dim=p.value_head_dim,
                                 num_value_heads=p.num_value_heads, window=self.window,
                                 sinks=sinks, dtype=x.dtype)
        return self.step(x, cache)

    def step(self, x: jax.Array, cache: jattn.KVCache, *, position=None
             ) -> tuple[jax.Array, jattn.KVCache]:
        """The next tokens x [B, T, d_model] against the cache: (output, updated cache).
        ``position`` (the tokens before x) is implied by the cache and not needed."""
        del position
        self._check_causal()
        q, k, v = self.proj(x)
        if self.rope is not None:
            where = cache.length + jnp.arange(x.shape[1])
            q, k = (apply_rope(a, where, **self.rope) for a in (q, k))
        out, cache = jattn.cached_attention(q, k, v, cache)
        return self.out_proj(out.reshape(*x.shape[:-1], -1)), cache

    def _check_causal(self) -> None:
        if not self.is_causal:
            raise NotImplementedError("decoding token by token needs a causal layer")
