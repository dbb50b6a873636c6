"""NNX modules for linear attention over [B, T, d_model] sequences (:mod:`jattn.efficient.linear`).

Linear layers start as torch.nn.Linear does (jattn.nn.layers), as in the Zoology code that
:class:`BasedLinearAttention` reproduces.

References:
    P24 Zoology (Based: linear attention with a second-order Taylor feature map of feature
    dimension 8, 1 head); P22 Lightning Attention (chunked causal form, per-head decay);
    "Rethinking Attention with Performers" (FAVOR+); "cosFormer: Rethinking Softmax in
    Attention". Performer / RFA random features are not P63 (:mod:`jattn.analysis.rf_lens`).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from jattn.core.shapes import check_heads
from jattn.efficient.linear import FeatureMap, LinearAttentionState, linear_attention
from jattn.nn.layers import torch_linear


class RandomFeatureRng(nnx.Variable):
    """The fixed PRNG key of a layer's FAVOR+ random features: drawn once at init, not
    trained (not an ``nnx.Param``), saved with the layer so the features stay the same."""


class LinearAttention(nnx.Module):
    """Multi-head linear attention: q/k/v projections, :func:`jattn.linear_attention`, out_proj.

    Heads have ``d_model // num_heads`` dims; ``num_kv_heads`` < ``num_heads`` gives GQA.
    ``decay`` (fixed, one gamma in (0, 1] per head) weights key s at query t by
    gamma^(t - s), as in Lightning Attention. ``initial_state`` / ``return_state`` carry the
    running sums across calls (streaming, step-by-step decoding).

    ``feature_map="favor+"`` (Performer): the key of the random features is drawn from
    ``rngs.params()`` at init and kept in ``feature_rng`` (a :class:`RandomFeatureRng`, not
    trained), so every call uses the same W [num_features, head_dim]; pass ``rng=`` to a
    call to redraw them (as Performer does now and then during training).
    ``feature_map="cosformer"``: ``max_length`` is M; to stream, give it and pass
    ``offset`` (tokens before this call) with the state.

    Example:
        >>> import jax.numpy as jnp
        >>> from flax import nnx
        >>> layer = LinearAttention(16, num_heads=2, rngs=nnx.Rngs(0))
        >>> layer(jnp.ones((1, 5, 16))).shape
        (1, 5, 16)
        >>> performer = LinearAttention(16, num_heads=2, feature_map="favor+", is_causal=False,
        ...                             num_features=32, rngs=nnx.Rngs(0))
        >>> performer(jnp.ones((1, 5, 16))).shape
        (1, 5, 16)
    """

    def __init__(self, d_model: int, num_heads: int = 1, *, num_kv_heads: int | None = None,
                 feature_map: str | FeatureMap = "elu+1", is_causal: bool = True,
                 decay: Sequence[float] | None = None, normalize: bool = True,
                 eps: float = 1e-6, use_bias: bool = True, form: str = "chunked",
                 chunk_size: int = 64, num_features: int | None = None,
                 max_length: int | None = None, rngs: nnx.Rngs):
        if num_features is not None and feature_map != "favor+":
            raise ValueError(f"num_features: only used by feature_map='favor+', got "
                             f"{feature_map!r}")
        if max_length is not None and feature_map != "cosformer":
            raise ValueError(f"max_length: only used by feature_map='cosformer', got "
                             f"{feature_map!r}")
        num_kv_heads = check_heads(d_model, num_heads, num_kv_heads)
        head_dim = d_model // num_heads
        self.num_heads, self.num_kv_heads = num_heads, num_kv_heads
        self.feature_map = feature_map
        self.is_causal = is_causal
        # A tuple of floats: a fixed hyper-parameter, not a trained one.
        self.decay = None if decay is None else tuple(float(g) for g in decay)
        self.normalize, self.eps = normalize, eps
        self.form, self.chunk_size = form, chunk_size
        self.num_features, self.max_length = num_features, max_length
        self.feature_rng = (RandomFeatureRng(rngs.params()) if feature_map == "favor+"
                            else None)
        self.q_proj = torch_linear(d_model, num_heads * head_dim, rngs, use_bias=use_bias)
        self.k_proj = torch_linear(d_model, num_kv_heads * head_dim, rngs, use_bias=use_bias)
        self.v_proj = torch_linear(d_model, num_kv_heads * head_dim, rngs, use_bias=use_bias)
        self.out_proj = torch_linear(num_heads * head_dim, d_model, rngs, use_bias=use_bias)

    def __call__(self, x: jax.Array, *, initial_state: LinearAttentionState | None = None,
                 return_state: bool = False, offset=0, rng=None):
        """x [B, T, d_model] -> [B, T, d_model] (and the state with ``return_state``).

        ``offset``: position of x's first token ("cosformer"); ``rng``: redraw the "favor+"
        features with this key instead of the stored ``feature_rng``.
        """
        extra = {}
        if self.feature_map == "favor+":
            extra = dict(rng=self.feature_rng[...] if rng is None else rng,
                         num_features=self.num_features)
        elif self.feature_map == "cosformer":
            extra = dict(max_length=self.max_length, offset=offset)
        return _attend(self, x, initial_state, return_state, self.feature_map,
                       None if self.decay is None else jnp.asarray(self.decay), **extra)


    def prefill(self, x: jax.Array, *, max_length: int | None = None):
        """Causal forward of a prompt that also returns the state for :meth:`step`
        (constant size: ``max_length`` is not needed)."""
        del max_length
        return self.step(x, None, position=0)

    def step(self, x: jax.Array, state: LinearAttentionState | None, *, position=0):
        """The next tokens x [B, T, d_model] from the state after ``position`` tokens:
        (output, new state)."""
        if not self.is_causal:
            raise NotImplementedError("decoding token by token needs a causal layer")
        return self(x, initial_state=state, return_state=True, offset=position)


class BasedLinearAttention(nnx.Module):
    """Based's linear attention (Zoology): Taylor-feature causal linear attention.

    q_proj and k_proj map d_model to ``feature_dim`` per head (the Taylor map then makes
    1 + feature_dim + feature_dim^2 features, 73 for the default 8); v_proj keeps
    d_model // num_heads dims per head; out_proj maps back to d_model. No biases and a
    denominator eps of 1e-12, as in the original.

    Example:
        >>> import jax.numpy as jnp
        >>> from flax import nnx
        >>> layer = BasedLinearAttention(16, rngs=nnx.Rngs(0))
        >>> y, state = layer(jnp.ones((1, 5, 16)), return_state=True)
        >>> y.shape, state.kv.shape
        ((1, 5, 16), (1, 1, 73, 16))
    """

    def __init__(self, d_model: int, *, feature_dim: int = 8, num_heads: int = 1,
                 num_kv_heads: int | None = None, is_causal: bool = True, eps: float = 1e-12,
                 form: str = "chunked", chunk_size: int = 64, rngs: nnx.Rngs):
        if feature_dim < 1:
            raise ValueError(f"feature_dim: expected >= 1, got {feature_dim}")
        num_kv_heads = check_heads(d_model, num_heads, num_kv_heads)
        head_dim = d_model // num_heads
        self.num_heads, self.num_kv_heads = num_heads, num_kv_heads
        self.is_causal, self.eps = is_causal, eps
        self.normalize = True
        self.form, self.chunk_size = form, chunk_size
        self.q_proj = torch_linear(d_model, num_heads * feature_dim, rngs, use_bias=False)
        self.k_proj = torch_linear(d_model, num_kv_heads * feature_dim, rngs, use_bias=False)
        self.v_proj = torch_linear(d_model, num_kv_heads * head_dim, rngs, use_bias=False)
        self.out_proj = torch_linear(num_heads * head_dim, d_model, rngs, use_bias=False)

    def __call__(self, x: jax.Array, *, initial_state: LinearAttentionState | None = None,
                 return_state: bool = False):
        """x [B, T, d_model] -> [B, T, d_model] (and the state with ``return_state``)."""
        return _attend(self, x, initial_state, return_state, "taylor", None)


    def prefill(self, x: jax.Array, *, max_length: int | None = None):
        """Causal forward of a prompt that also returns the state for :meth:`step`."""
        del max_length
        return self.step(x, None)

    def step(self, x: jax.Array, state: LinearAttentionState | None, *, position=None):
        """The next tokens x [B, T, d_model] from the state: (output, new state)."""
        del position
        if not self.is_causal:
            raise NotImplementedError("decoding token by token needs a causal layer")
        return self(x, initial_state=state, return_state=True)


def _attend(layer, x, initial_state, return_state, feature_map, decay, **extra):
    """Project, split heads, call linear_attention, merge heads, project back."""
    if x.ndim != 3:
        raise ValueError(f"x: expected rank 3 [B, T, d_model], got shape {x.shape}")
    B, T, _ = x.shape
    q = layer.q_proj(x).reshape(B, T, layer.num_heads, -1)
    k = layer.k_proj(x).reshape(B, T, layer.num_kv_heads, -1)
    v = layer.v_proj(x).reshape(B, T, layer.num_kv_heads, -1)
    result = linear_attention(
        q, k, v, feature_map=feature_map, is_causal=layer.is_causal, decay=decay,
        normalize=layer.normalize, eps=layer.eps, form=layer.form,
        chunk_size=layer.chunk_size, initial_state=initial_state, return_state=return_state,
        **extra)
    out, state = result if return_state else (result, None)
    y = layer.out_proj(out.reshape(B, T, -1))
    return (y, state) if return_state else y
