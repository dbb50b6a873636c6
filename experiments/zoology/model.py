"""The language model of Zoology's figure 2, with a ``faithful`` switch.

Token embeddings tied to the LM head; learned absolute position embeddings for mixers that
need them (attention-like ones); a stack of pre-LayerNorm blocks with a sequence mixer;
a final LayerNorm. Embedding dropout 0.1, residual dropout 0.

``faithful=True`` reproduces the original block wiring, quirk included: a block returns
``norm2(residual)`` (its state mixer is the identity) together with the residual, and the next
block adds that normalised tensor into the residual stream again. ``faithful=False`` is the
clean pre-LN block ``x += mixer(norm1(x)); x += mlp(norm2(x))`` with a GELU MLP.

Both re-initialise as the original: every linear and embedding weight normal(0, 0.02), biases
zero, output projections normal(0, 0.02 / sqrt(2 num_layers)); convolutions keep PyTorch's
default and LayerNorms start at (1, 0).

References:
    P24 Zoology (figure 2; notes/zoology.md "Backbone of figure 2").
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import jax
import jax.numpy as jnp
from flax import nnx

from jattn.nn import MIXERS, ImplicitFilter

INIT_STD = 0.02
LAYER_NORM_EPS = 1e-5  # torch.nn.LayerNorm's default, as in the original


@dataclass(frozen=True)
class Figure2Mixer:
    """A sequence mixer of figure 2 as the library's mixers (:data:`jattn.nn.MIXERS`) layer by
    layer, and what the model around it needs."""

    layers: Callable[[int, int], tuple[str, dict]]  # (layer, l_max) -> (mixer name, options)
    positions: bool = False  # learned absolute position embeddings in the model
    takes_dropout_rng: bool = False  # its __call__ accepts dropout_rng=


def _attention(window: int | None = None) -> Figure2Mixer:
    return Figure2Mixer(lambda layer, l_max: ("attention", dict(window=window, dropout_rate=0.1)),
                        positions=True, takes_dropout_rng=True)


def _hybrid(odd: Callable[[int], tuple[str, dict]]) -> Callable[[int, int], tuple[str, dict]]:
    """Even layers a short-conv BaseConv, odd layers ``odd(l_max)`` (the sub-quadratic
    lookup)."""
    return lambda layer, l_max: ("base_conv", dict(kernel_size=3)) if layer % 2 == 0 else (
        odd(l_max))


FIGURE2: dict[str, Figure2Mixer] = {
    "attention": _attention(),
    "sliding_window": _attention(window=16),
    # Kernel sizes per layer [3, -1, 3, -1]: short conv, implicit long conv, ...
    "base_conv": Figure2Mixer(
        lambda layer, l_max: ("base_conv", dict(kernel_size=(3, -1)[layer % 2]))),
    "hyena": Figure2Mixer(lambda layer, l_max: ("hyena", {})),
    "h3": Figure2Mixer(lambda layer, l_max: ("h3", dict(head_dim=2))),
    "mamba": Figure2Mixer(lambda layer, l_max: ("mamba", {})),
    # The original's time mixer keeps its default n_layer=12 for its initialisation (the
    # figure-2 config does not pass the model's depth).
    "rwkv": Figure2Mixer(lambda layer, l_max: ("rwkv", dict(layer=layer, num_layers=12))),
    "linear": Figure2Mixer(lambda layer, l_max: ("linear", dict(feature_map="elu+1"))),
    "based": Figure2Mixer(_hybrid(lambda l_max: ("based", dict(feature_dim=8)))),
    "sparse": Figure2Mixer(
        _hybrid(lambda l_max: ("sparse", dict(top_k=math.ceil(math.sqrt(l_max))))),
        positions=True),
}
"""Zoology's figure-2 mixers by the names of the sweeps (every one with a single head)."""


class Block(nnx.Module):
    """One pre-LayerNorm block: a sequence mixer and (clean variant) a GELU MLP."""

    def __init__(self, d_model: int, layer: int, l_max: int, spec: Figure2Mixer, *,
                 faithful: bool, attention_implementation=None, rngs: nnx.Rngs):
        name, options = spec.layers(layer, l_max)
        if name == "attention" and attention_implementation is not None:
            options = {**options, "implementation": attention_implementation}
        self.mixer = MIXERS[name](d_model, num_heads=1, is_causal=True, max_length=l_max,
                                  rngs=rngs, **options)
        self.takes_dropout_rng = spec.takes_dropout_rng
        self.norm1 = nnx.LayerNorm(d_model, epsilon=LAYER_NORM_EPS, rngs=rngs)
        self.norm2 = nnx.LayerNorm(d_model, epsilon=LAYER_NORM_EPS, rngs=rngs)
        self.faithful = faithful
        if not faithful:
            self.fc1 = nnx.Linear(d_model, 4 * d_model, rngs=rngs)
            self.fc2 = nnx.Linear(4 * d_model, d_model, rngs=rngs)

    def mix(self, x: jax.Array, dropout_rng: jax.Array | None) -> jax.Array:
        if self.takes_dropout_rng:
            return self.mixer(x, dropout_rng=dropout_rng)
        return self.mixer(x)

    def mlp(self, x: jax.Array) -> jax.Array:
        return self.fc2(jax.nn.gelu(self.fc1(x), approximate=False))


def _dropout(x: jax.Array, rate: float, rng: jax.Array | None) -> jax.Array:
    if rng is None or rate == 0.0:
        return x
    keep = jax.random.bernoulli(rng, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), 0.0)


class LanguageModel(nnx.Module):
    """Zoology's figure-2 LM over token ids [B, L] (see the module docstring).

    Args:
        vocab_size, d_model, num_layers: sizes.
        max_len: the longest sequence (position embeddings, implicit filters).
        mixer: a key of :data:`FIGURE2`.
        faithful: the original wiring with its residual quirk and identity state mixer
            (True), or the clean pre-LN block with an MLP (False).
        embed_dropout: dropout on the embeddings while training.
        attention_implementation: the attention mixers' ``implementation`` (e.g.
            :func:`jattn.parallel.context_parallel` for a sequence-sharded model); None: the
            default.
    """

    def __init__(self, *, vocab_size: int, d_model: int, num_layers: int, max_len: int,
                 mixer: str, faithful: bool = True, embed_dropout: float = 0.1,
                 attention_implementation=None, rngs: nnx.Rngs):
        if mixer not in FIGURE2:
            raise ValueError(f"mixer: expected one of {sorted(FIGURE2)}, got {mixer!r}")
        spec = FIGURE2[mixer]
        self.faithful = faithful
        self.embed_dropout = embed_dropout
        self.embed = nnx.Embed(vocab_size, d_model, rngs=rngs)
        self.positions = nnx.Embed(max_len, d_model, rngs=rngs) if spec.positions else None
        self.blocks = nnx.List([Block(d_model, i, max_len, spec, faithful=faithful,
                                      attention_implementation=attention_implementation,
                                      rngs=rngs)
                                for i in range(num_layers)])
        self.norm_f = nnx.LayerNorm(d_model, epsilon=LAYER_NORM_EPS, rngs=rngs)
        _reinitialise(self, rngs.params(), num_layers)

    def __call__(self, tokens: jax.Array, *, targets_at: jax.Array | None = None,
                 dropout_rng: jax.Array | None = None) -> jax.Array:
        """Logits [B, L, V], or [B, P, V] at positions ``targets_at`` [B, P] only.

        Computing the tied head only where labels exist is exact for the loss and the
        accuracy and saves most of the cost (the vocabulary is large, labels are few).
        Dropout is active when ``dropout_rng`` is given.
        """
        rngs = [None] * (len(self.blocks) + 1)
        if dropout_rng is not None:
            rngs = list(jax.random.split(dropout_rng, len(self.blocks) + 1))
        h = self.embed(tokens)
        if self.positions is not None:
            h = h + self.positions(jnp.arange(tokens.shape[1]))
        h = _dropout(h, self.embed_dropout, rngs[-1])
        if self.faithful:
            residual = None
            for block, rng in zip(self.blocks, rngs, strict=False):
                residual = h if residual is None else h + residual
                residual = block.mix(block.norm1(residual), rng) + residual
                h = block.norm2(residual)  # the identity state mixer's output ...
            h = self.norm_f(h + residual)  # ... is added into the stream again (the quirk)
        else:
            for block, rng in zip(self.blocks, rngs, strict=False):
                h = h + block.mix(block.norm1(h), rng)
                h = h + block.mlp(block.norm2(h))
            h = self.norm_f(h)
        if targets_at is not None:
            h = jnp.take_along_axis(h, targets_at[..., None], axis=1)
        return self.embed.attend(h)


def _reinitialise(model: nnx.Module, rng: jax.Array, num_layers: int) -> None:
    """The original's init: linear/embedding weights N(0, 0.02), zero biases, output
    projections N(0, 0.02 / sqrt(2 num_layers)). Implicit filters are linear layers there."""
    counter = iter(range(1 << 30))

    def normal(shape, std=INIT_STD):
        return std * jax.random.normal(jax.random.fold_in(rng, next(counter)), shape)

    for path, module in nnx.iter_graph(model):
        if isinstance(module, nnx.Linear):
            std = INIT_STD / math.sqrt(2 * num_layers) if path[-1] in ("out_proj", "fc2") \
                else INIT_STD
            module.kernel[...] = normal(module.kernel.shape, std)
            if module.bias is not None:
                module.bias[...] = jnp.zeros(module.bias.shape)
        elif isinstance(module, nnx.Embed):
            module.embedding[...] = normal(module.embedding.shape)
        elif isinstance(module, ImplicitFilter):
            for name in ("w_in", "w_inner", "w_out"):
                getattr(module, name)[...] = normal(getattr(module, name).shape)
            for name in ("b_in", "b_inner"):
                getattr(module, name)[...] = jnp.zeros(getattr(module, name).shape)
