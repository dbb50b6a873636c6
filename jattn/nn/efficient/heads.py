"""NNX head structures: query/key/value projections for MHA, GQA, MQA and DiffQKV,
mixture-of-heads attention, convolutional / relative multi-head attention, and Wings'
low-rank residual attention learners.

References:
    P68 Sigma, "Sigma: Differential Rescaling of Query, Key and Value for Efficient Language
    Models" (DiffQKV: separate key and value head counts and dims, augmented Q);
    P19 MoH, "MoH: Multi-Head Attention as Mixture-of-Head Attention";
    P16 RCMHA, "RCMHA: Relative Convolutional Multi-Head Attention for Natural Language
    Modelling" (with MDHA and RMHA beside it);
    P31 Wings, "Wings: Learning Multimodal LLMs without Text-only Forgetting" (LoRRA
    learners and their attention-based router).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jattn.core import cache as cache_lib
from jattn.core.attention import dot_product_attention
from jattn.core.positions import sinusoidal
from jattn.core.shapes import check_heads
from jattn.efficient.heads import (
    FORMS,
    capacity,
    gated_output,
    mixture_of_heads_attention,
    relative_attention,
    route_heads,
)
from jattn.mixers.conv import short_causal_conv
from jattn.nn.layers import QKVProjection, torch_linear, torch_uniform


class MixtureOfHeadsAttention(nnx.Module):
    """Mixture-of-heads self-attention (:func:`jattn.mixture_of_heads_attention`).

    ``num_shared`` heads are always on; each token keeps ``top_k`` of the other
    ``num_heads - num_shared`` heads, chosen by a linear router on the layer input (no
    bias, as the paper's W_r, W_s, W_h). The gates weight each head's projected output; the
    output projection W_O (torch.nn.Linear-initialised, with bias) is used split by head. The
    call returns the output and the load-balancing loss, which training adds to the task
    loss times a small weight (the paper uses 0.01). Gates follow the paper's equations,
    not the official code's rescaled ones (there the routed gates are renormalised over
    the top-k and everything is scaled to be about 1 at start).

    Example:
        >>> import jax.numpy as jnp
        >>> from flax import nnx
        >>> moh = MixtureOfHeadsAttention(16, 4, num_shared=2, top_k=1, rngs=nnx.Rngs(0))
        >>> y, balance = moh(jnp.ones((1, 5, 16)))
        >>> y.shape, balance.shape
        ((1, 5, 16), ())
    """

    def __init__(self, d_model: int, num_heads: int, *, num_shared: int, top_k: int,
                 num_kv_heads: int | None = None, is_causal: bool = True, form: str = "dense",
                 capacity_factor: float | None = None, qkv_bias: bool = True,
                 rngs: nnx.Rngs):
        if not 0 <= num_shared < num_heads:
            raise ValueError(f"num_shared: expected 0 <= num_shared < num_heads={num_heads}, "
                             f"got {num_shared}")
        if not 1 <= top_k <= num_heads - num_shared:
            raise ValueError(f"top_k: expected 1 <= top_k <= {num_heads - num_shared} routed "
                             f"heads, got {top_k}")
        if form not in FORMS:
            raise ValueError(f"form: expected one of {FORMS}, got {form!r}")
        capacity(1, 1, 1, capacity_factor)  # validates the factor
        self.proj = QKVProjection(d_model, num_heads, num_kv_heads=num_kv_heads,
                                  use_bias=qkv_bias, rngs=rngs)
        group = num_heads // self.proj.num_kv_heads
        if form == "dispatch" and num_shared % group:
            raise ValueError(f"num_shared: the dispatch form needs whole key/value groups of "
                             f"{group} heads, got {num_shared}")
        routed = num_heads - num_shared
        self.routed_router = torch_linear(d_model, routed, rngs, use_bias=False)
        self.shared_router = self.mix_router = nnx.data(None)
        if num_shared:
            self.shared_router = torch_linear(d_model, num_shared, rngs, use_bias=False)
            self.mix_router = torch_linear(d_model, 2, rngs, use_bias=False)
        self.out_proj = torch_linear(d_model, d_model, rngs)
        self.top_k = top_k
        self.is_causal = is_causal
        self.form = form
        self.capacity_factor = capacity_factor

    def route(self, x: jax.Array):
        """The :class:`jattn.HeadRouting` of x [B, T, d_model]."""
        shared = None if self.shared_router is None else self.shared_router(x)
        mix = None if self.mix_router is None else self.mix_router(x)
        return route_heads(self.routed_router(x), top_k=self.top_k, shared_logits=shared,
                           mix_logits=mix)

    def prefill(self, x: jax.Array, *, max_length: int):
        """Causal forward of a prompt x [B, T, d_model] and the KV cache of every head
        (``max_length`` slots) for :meth:`step`."""
        p = self.proj
        return self.step(x, cache_lib.init_cache(x.shape[0], max_length, p.num_kv_heads,
                                                 p.head_dim, dtype=x.dtype))

    def step(self, x: jax.Array, cache: cache_lib.KVCache, *, position=None):
        """The next tokens x [B, T, d_model] against the cache: (output, updated cache).

        Every head attends (the dense form: the gates pick heads per token, and a later
        token may pick a head an earlier one skipped, so every head's keys are cached)."""
        del position
        if not self.is_causal:
            raise NotImplementedError("decoding token by token needs a causal layer")
        if self.capacity_factor is not None:
            raise NotImplementedError("a capacity limit drops tokens by their rank in the "
                                      "whole sequence, which decoding does not see")
        q, k, v = self.proj(x)
        heads, cache = cache_lib.cached_attention(q, k, v, cache)
        kernel = self.out_proj.kernel[...].reshape(q.shape[2], v.shape[3], -1)
        out = gated_output(heads, self.route(x).gates, kernel).astype(x.dtype)
        return out + self.out_proj.bias[...], cache

    def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """x [B, T, d_model] -> (output [B, T, d_model], load-balancing loss [])."""
        q, k, v = self.proj(x)
        routing = self.route(x)
        kernel = self.out_proj.kernel[...].reshape(q.shape[2], v.shape[3], -1)
        out = mixture_of_heads_attention(q, k, v, kernel, routing, is_causal=self.is_causal,
                                         form=self.form,
                                         capacity_factor=self.capacity_factor)
        return out + self.out_proj.bias[...], routing.load_balance_loss


# (depthwise conv on q/k/v, relative position scores) for each of P16's four layers.
CONV_RELATIVE_VARIANTS = {"mha": (False, None), "mdha": (True, None), "rmha": (False, "xl"),
                          "rcmha": (True, "learned")}


class ConvRelativeAttention(nnx.Module):
    """Causal self-attention in P16's four variants: MHA, MDHA, RMHA and RCMHA.

    * conv (MDHA, RCMHA): a causal depthwise convolution of width ``conv_kernel_size`` along
      the sequence on each of Q, K and V after their projections
      (:func:`jattn.mixers.conv.short_causal_conv`), one kernel per channel (Primer's MDHA);
      ``shared_conv=True`` shares one [width, head_dim] kernel across heads, as RCMHA's code
      does. Kernels and biases start as a torch.nn.Conv1d's.
    * relative scores (:func:`jattn.relative_attention`, distances below
      ``max_distance``): RMHA is Transformer-XL's (sinusoids projected by W_R, learned u and
      v); RCMHA's code learns the table r directly with a scalar bias b per distance and
      head, and u (no v); all start at zero, as there.

    Example:
        >>> import jax.numpy as jnp
        >>> from flax import nnx
        >>> layer = ConvRelativeAttention(16, 4, variant="rcmha", rngs=nnx.Rngs(0))
        >>> layer(jnp.ones((2, 7, 16))).shape
        (2, 7, 16)
    """

    def __init__(self, d_model: int, num_heads: int, *, variant: str = "rcmha",
                 conv_kernel_size: int = 3, shared_conv: bool = False,
                 max_distance: int = 512, rngs: nnx.Rngs):
        if variant not in CONV_RELATIVE_VARIANTS:
            raise ValueError(f"variant: expected one of {sorted(CONV_RELATIVE_VARIANTS)}, "
                             f"got {variant!r}")
        if conv_kernel_size < 1:
            raise ValueError(f"conv_kernel_size: expected >= 1, got {conv_kernel_size}")
        if max_distance < 1:
            raise ValueError(f"max_distance: expected >= 1, got {max_distance}")
        conv, self.relative = CONV_RELATIVE_VARIANTS[variant]
        self.variant = variant
        self.proj = QKVProjection(d_model, num_heads, rngs=rngs)
        N, H = num_heads, self.proj.head_dim
        self.convs = nnx.data(None)
        if conv:
            channels = H if shared_conv else N * H
            self.convs = nnx.List([
                nnx.List([torch_uniform(rngs, (conv_kernel_size, channels), conv_kernel_size),
                          torch_uniform(rngs, (channels,), conv_kernel_size)])
                for _ in range(3)])
        zeros = nnx.initializers.zeros
        self.relative_key = self.position_proj = self.position_bias = nnx.data(None)
        self.distance_bias = nnx.data(None)
        if self.relative is not None:
            self.content_bias = nnx.Param(zeros(rngs.params(), (N, H)))
        if self.relative == "learned":
            self.relative_key = nnx.Param(zeros(rngs.params(), (max_distance, N, H)))
            self.distance_bias = nnx.Param(zeros(rngs.params(), (max_distance, N)))
        elif self.relative == "xl":
            self.position_proj = torch_linear(d_model, N * H, rngs, use_bias=False)
            self.position_bias = nnx.Param(zeros(rngs.params(), (N, H)))
        self.d_model = d_model
        self.max_distance = max_distance
        self.out_proj = torch_linear(d_model, d_model, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        """x [B, T, d_model] -> [B, T, d_model]."""
        heads = self.proj(x)
        if self.convs is not None:
            heads = tuple(_conv_heads(h, kernel[...], bias[...])
                          for h, (kernel, bias) in zip(heads, self.convs, strict=True))
        q, k, v = heads
        if self.relative is None:
            out = dot_product_attention(q, k, v, is_causal=True)
        elif self.relative == "learned":
            out = relative_attention(q, k, v, self.relative_key[...], self.content_bias[...],
                                     distance_bias=self.distance_bias[...])
        else:
            table = sinusoidal(jnp.arange(self.max_distance), self.d_model)
            r = self.position_proj(table).reshape(self.max_distance, *q.shape[2:])
            out = relative_attention(q, k, v, r, self.content_bias[...],
                                     position_bias=self.position_bias[...])
        return self.out_proj(out.reshape(x.shape))


def _conv_heads(x: jax.Array, kernel: jax.Array, bias: jax.Array) -> jax.Array:
    """Causal depthwise conv of heads [B, T, N, H] with a [K, N*H] or head-shared [K, H]
    kernel."""
    B, T, N, H = x.shape
    if kernel.shape[1] == H and N > 1:
        kernel, bias = jnp.tile(kernel, (1, N)), jnp.tile(bias, N)
    return short_causal_conv(x.reshape(B, T, N * H), kernel, bias).reshape(B, T, N, H)


class LowRankResidualAttention(nnx.Module):
    """Wings' LoRRA learner: multi-head attention whose projections are identity plus low
    rank, from hidden states to another set of features (image or text token embeddings).

    q = x (I + A_q B_q), k = f (I + A_k B_k), v = f (I + A_v B_v) split into ``num_heads``
    heads, softmax attention (:func:`jattn.dot_product_attention`), then the purely low-rank
    output out = concat(heads) A_o B_o. A starts truncated-normal (std 0.02) and B at zero,
    as in the official code, so a new learner adds nothing until trained.

    Example:
        >>> import jax.numpy as jnp
        >>> from flax import nnx
        >>> learner = LowRankResidualAttention(16, 4, rank=2, rngs=nnx.Rngs(0))
        >>> learner(jnp.ones((1, 5, 16)), jnp.ones((1, 9, 16))).shape
        (1, 5, 16)
    """

    def __init__(self, d_model: int, num_heads: int, *, rank: int = 8, rngs: nnx.Rngs):
        check_heads(d_model, num_heads)
        if rank < 1:
            raise ValueError(f"rank: expected >= 1, got {rank}")
        self.num_heads = num_heads
        init = nnx.initializers.truncated_normal(0.02)
        # Rows: the q, k, v and output projections.
        self.down = nnx.Param(init(rngs.params(), (4, d_model, rank)))
        self.up = nnx.Param(jnp.zeros((4, rank, d_model)))

    def __call__(self, x: jax.Array, features: jax.Array, *, mask: jax.Array | None = None,
                 is_causal: bool = False) -> jax.Array:
        """x [B, T, d_model] attends to features [B, S, d_model] -> [B, T, d_model];
        ``mask`` bool broadcastable to [B, N, T, S] (e.g. key padding [B, 1, 1, S])."""
        down, up = self.down[...], self.up[...]

        def heads(a, i):
            a = a + (a @ down[i]) @ up[i]
            return a.reshape(*a.shape[:-1], self.num_heads, -1)

        out = dot_product_attention(heads(x, 0), heads(features, 1), heads(features, 2),
                                    mask=mask, is_causal=is_causal)
        return (out.reshape(x.shape) @ down[3]) @ up[3]


class AttentionShiftRouter(nnx.Module):
    """Wings' router: per token, weights over the learners from where the main attention
    looks. The main attention's map summed over heads, a [B, T, S] row per token, goes
    through a linear layer over key positions (the first S of ``max_length`` inputs), SiLU,
    and a softmax over the ``num_learners`` outputs.

    Example:
        >>> import jax.numpy as jnp
        >>> from flax import nnx
        >>> router = AttentionShiftRouter(32, rngs=nnx.Rngs(0))
        >>> router(jnp.full((1, 4, 6, 6), 1 / 6)).shape
        (1, 6, 2)
    """

    def __init__(self, max_length: int, num_learners: int = 2, *, rngs: nnx.Rngs):
        if max_length < 1 or num_learners < 1:
            raise ValueError(f"max_length, num_learners: expected >= 1, got {max_length}, "
                             f"{num_learners}")
        self.max_length = max_length
        self.proj = torch_linear(max_length, num_learners, rngs)

    def __call__(self, attention_probs: jax.Array) -> jax.Array:
        """attention_probs [B, N, T, S] (S <= max_length) -> weights [B, T, num_learners]."""
        S = attention_probs.shape[-1]
        if attention_probs.ndim != 4 or S > self.max_length:
            raise ValueError(f"attention_probs: expected [B, N, T, S] with S <= max_length="
                             f"{self.max_length}, got {attention_probs.shape}")
        summed = attention_probs.sum(1)
        logits = summed @ self.proj.kernel[...][:S] + self.proj.bias[...]
        return jax.nn.softmax(jax.nn.silu(logits), axis=-1)


class WingsLearners(nnx.Module):
    """Wings' two learners beside a layer's main attention: a visual LoRRA attending to the
    image token embeddings and a textual one attending to the text token embeddings, mixed
    per token by the :class:`AttentionShiftRouter` reading the main attention map:
    h + w_visual * LoRRA_v(h, image) + w_text * LoRRA_t(h, text), with h the hidden state
    after the main attention. Visual tokens are all visible; ``text_mask`` (bool [B, S_text])
    marks real text tokens.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from flax import nnx
        >>> wings = WingsLearners(16, 4, rank=2, max_length=32, rngs=nnx.Rngs(0))
        >>> h, image, text = jnp.ones((1, 6, 16)), jnp.ones((1, 9, 16)), jnp.ones((1, 5, 16))
        >>> probs = jnp.full((1, 4, 6, 6), 1 / 6)
        >>> wings(h, probs, image, text).shape
        (1, 6, 16)
    """

    def __init__(self, d_model: int, num_heads: int, *, rank: int = 8, max_length: int,
                 rngs: nnx.Rngs):
        self.visual = LowRankResidualAttention(d_model, num_heads, rank=rank, rngs=rngs)
        self.textual = LowRankResidualAttention(d_model, num_heads, rank=rank, rngs=rngs)
        self.router = AttentionShiftRouter(max_length, 2, rngs=rngs)

    def __call__(self, hidden: jax.Array, attention_probs: jax.Array, image: jax.Array,
                 text: jax.Array, *, text_mask: jax.Array | None = None) -> jax.Array:
        """hidden [B, T, d], the main attention's probs [B, N, T, S], image [B, S_img, d],
        text [B, S_text, d] -> [B, T, d]."""
        weights = self.router(attention_probs)
        mask = None if text_mask is None else text_mask[:, None, None, :]
        return (hidden + weights[..., :1] * self.visual(hidden, image)
                + weights[..., 1:] * self.textual(hidden, text, mask=mask))
