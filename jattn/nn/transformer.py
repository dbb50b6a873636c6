"""A Transformer that takes any sequence mixer of jattn: blocks, a decoder-only language
model with ``generate()``, and an encoder-decoder.

A mixer is given by name (``MIXERS``: softmax attention, windowed attention, linear and
Based attention, mixture-of-heads, routing attention, the Zoology convolutions and SSMs,
Titans' LMM/MAG/MAL/MAC memory layers) or
as a callable ``factory(d_model, *, num_heads, is_causal, max_length, rngs, **options)`` that
returns an NNX module mapping [B, T, d_model] to [B, T, d_model] (or to a pair whose second
item is an auxiliary loss, as mixture-of-heads returns; ``return_aux=True`` gives their
sum). A list gives one mixer per layer (hybrids), and a list of ``mixer_options`` one set of
options per layer.

Decoding token by token uses mixers that have ``prefill(x, max_length=...) -> (y, state)``
and ``step(x, state, position=...) -> (y, state)``: softmax attention keeps a KV cache
(full or, with a window, a ring), linear attention its running sums.

References:
    "Attention Is All You Need" (the encoder-decoder, sinusoidal positions); P24 Zoology (the
    mixers); P68 Sigma / P19 MoH heads through their modules.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from jattn.analysis.intervene import (
    ATTENTION_TENSORS,
    BLOCK_TENSORS,
    Capture,
    Edits,
    Intervention,
)
from jattn.core.positions import sinusoidal
from jattn.core.shapes import check_integer, check_rank
from jattn.nn.attention import MultiHeadAttention
from jattn.nn.efficient.heads import MixtureOfHeadsAttention
from jattn.nn.efficient.linear import BasedLinearAttention, LinearAttention
from jattn.nn.efficient.routing import RoutingAttention
from jattn.nn.efficient.sparse import SparseAttention
from jattn.nn.layers import MLP
from jattn.nn.mixers import H3, BaseConv, Hyena, Mamba, RWKV4TimeMix
from jattn.nn.titans import TitansLMM, TitansMAC, TitansMAG, TitansMAL

MixerFactory = Callable[..., nnx.Module]


def _mixer(cls, *, heads: bool = True, length: bool = False, causal_only: bool = False,
           defaults=None) -> MixerFactory:
    """The registry's factory for ``cls``: ``(d_model, *, num_heads, is_causal, max_length,
    rngs, **options) -> module``. The class gets num_heads (``heads``), the model's length
    as its second argument (``length``: filters and position tables span it) and is_causal,
    unless it is ``causal_only`` (then a bidirectional request raises ValueError);
    ``defaults(options, max_length)`` may fill options in."""

    def make(d_model, *, num_heads, is_causal, max_length, rngs, **options):
        if causal_only and not is_causal:
            raise ValueError(f"mixer: {cls.__name__} is causal only (it has no "
                             "bidirectional form)")
        if defaults is not None:
            options = defaults(options, max_length)
        fixed = {} if causal_only else {"is_causal": is_causal}
        if heads:
            fixed["num_heads"] = num_heads
        return cls(d_model, *((max_length,) if length else ()), rngs=rngs, **fixed, **options)

    make.__name__ = cls.__name__
    return make


def _cosformer_length(options: dict, max_length: int) -> dict:
    """cosFormer's re-weighting spans the model's length unless told otherwise."""
    if options.get("feature_map") == "cosformer":
        return {"max_length": max_length} | options
    return options


#: The mixers a :class:`TransformerBlock` takes by name: name -> factory.
MIXERS: dict[str, MixerFactory] = {
    "attention": _mixer(MultiHeadAttention),
    "linear": _mixer(LinearAttention, defaults=_cosformer_length),
    "based": _mixer(BasedLinearAttention),
    "sparse": _mixer(SparseAttention),
    "moh": _mixer(MixtureOfHeadsAttention),
    "routing": _mixer(RoutingAttention),
    "base_conv": _mixer(BaseConv, heads=False, length=True, causal_only=True),
    "hyena": _mixer(Hyena, heads=False, length=True, causal_only=True),
    "h3": _mixer(H3, heads=False, length=True, causal_only=True),
    "mamba": _mixer(Mamba, heads=False, causal_only=True),
    "rwkv": _mixer(RWKV4TimeMix, heads=False, causal_only=True),
    "titans_lmm": _mixer(TitansLMM, causal_only=True),
    "titans_mag": _mixer(TitansMAG, causal_only=True),
    "titans_mal": _mixer(TitansMAL, causal_only=True),
    "titans_mac": _mixer(TitansMAC, causal_only=True),
}
"""Every sequence mixer by name, each a factory ``(d_model, *, num_heads, is_causal,
max_length, rngs, **options)``; the options are the module's own keyword arguments. The one
registry of the library: the Zoology and Titans experiments build their models from it."""
NORMS = ("layernorm", "rmsnorm")
POSITIONS = ("learned", "sinusoidal", None)


def _make_mixer(mixer: str | MixerFactory, d_model, *, num_heads, is_causal, max_length, rngs,
                options) -> nnx.Module:
    if isinstance(mixer, str):
        if mixer not in MIXERS:
            raise ValueError(f"mixer: expected a callable or one of {sorted(MIXERS)}, "
                             f"got {mixer!r}")
        mixer = MIXERS[mixer]
    return mixer(d_model, num_heads=num_heads, is_causal=is_causal, max_length=max_length,
                 rngs=rngs, **(options or {}))


def _norm(kind: str, d_model: int, rngs: nnx.Rngs) -> nnx.Module:
    if kind not in NORMS:
        raise ValueError(f"norm: expected one of {NORMS}, got {kind!r}")
    return (nnx.LayerNorm(d_model, rngs=rngs) if kind == "layernorm"
            else nnx.RMSNorm(d_model, rngs=rngs))


class LearnedPositionEmbedding(nnx.Module):
    """A learned absolute position embedding: a [max_length, d_model] table read at the
    positions of the tokens (N(0, 0.02) at start).

    Example:
        >>> import jax.numpy as jnp
        >>> from flax import nnx
        >>> LearnedPositionEmbedding(16, 8, rngs=nnx.Rngs(0))(jnp.arange(5)).shape
        (5, 8)
    """

    def __init__(self, max_length: int, d_model: int, *, rngs: nnx.Rngs):
        if max_length < 1:
            raise ValueError(f"max_length: expected >= 1, got {max_length}")
        self.max_length = max_length
        self.table = nnx.Param(0.02 * jax.random.normal(rngs.params(), (max_length, d_model)))

    def __call__(self, positions: jax.Array) -> jax.Array:
        """positions (any shape, ints in [0, max_length)) -> [..., d_model]."""
        return self.table[...][positions]


class TokenEmbedding(nnx.Module):
    """Token embedding plus absolute positions ("learned", "sinusoidal" or None), with
    dropout: the input of a Transformer stack."""

    def __init__(self, vocab_size: int, d_model: int, *, max_length: int,
                 positions: str | None = "learned", dropout_rate: float = 0.0,
                 rngs: nnx.Rngs):
        if positions not in POSITIONS:
            raise ValueError(f"positions: expected one of {POSITIONS}, got {positions!r}")
        self.max_length = max_length
        self.positions = positions
        self.tokens = nnx.Embed(vocab_size, d_model, rngs=rngs)
        self.learned = (LearnedPositionEmbedding(max_length, d_model, rngs=rngs)
                        if positions == "learned" else nnx.data(None))
        self.dropout = nnx.Dropout(dropout_rate, rngs=rngs)

    def __call__(self, tokens: jax.Array, position=0, *, prefix: jax.Array | None = None
                 ) -> jax.Array:
        """tokens int [B, T] starting at ``position`` -> [B, T, d_model]. With ``prefix``
        [B, Tp, d_model] (embeddings made elsewhere, e.g. projected image features) placed
        before the tokens' embeddings: [B, Tp + T, d_model], positions counted from the
        prefix's first."""
        check_rank("tokens", tokens, (2,), "[B, T]")
        check_integer("tokens", tokens)
        x = self.tokens(tokens)
        if prefix is not None:
            check_rank("prefix", prefix, (3,), "[B, Tp, d_model]")
            if prefix.shape[0] != x.shape[0] or prefix.shape[2] != x.shape[2]:
                raise ValueError(f"prefix: expected [B={x.shape[0]}, Tp, "
                                 f"d_model={x.shape[2]}], got {prefix.shape}")
            x = jnp.concatenate([prefix.astype(x.dtype), x], axis=1)
        if x.shape[1] > self.max_length:
            raise ValueError(f"tokens: {x.shape[1]} positions, more than max_length="
                             f"{self.max_length}")
        where = position + jnp.arange(x.shape[1])
        if self.positions == "learned":
            x = x + self.learned(where)
        elif self.positions == "sinusoidal":
            x = x + sinusoidal(where, x.shape[-1]).astype(x.dtype)
        return self.dropout(x)


class TransformerBlock(nnx.Module):
    """Pre-norm block: x + mixer(norm(x)), [x + cross_attention(norm(x), context)],
    x + mlp(norm(x)), with dropout on each residual branch (active in ``train()`` mode).

    Example:
        >>> import jax.numpy as jnp
        >>> from flax import nnx
        >>> block = TransformerBlock(16, "linear", num_heads=2, rngs=nnx.Rngs(0))
        >>> block(jnp.ones((1, 5, 16))).shape
        (1, 5, 16)
    """

    def __init__(self, d_model: int, mixer: str | MixerFactory = "attention", *,
                 num_heads: int = 1, is_causal: bool = True, max_length: int = 2048,
                 mixer_options: dict | None = None, norm: str = "layernorm",
                 mlp: str = "gelu", mlp_hidden: int | None = None, dropout_rate: float = 0.0,
                 cross_attention: bool = False, rngs: nnx.Rngs):
        self.mixer_name = mixer if isinstance(mixer, str) else getattr(mixer, "__name__",
                                                                          "callable")
        self.mixer = _make_mixer(mixer, d_model, num_heads=num_heads, is_causal=is_causal,
                                 max_length=max_length, rngs=rngs, options=mixer_options)
        self.mixer_norm = _norm(norm, d_model, rngs)
        self.cross = self.cross_norm = nnx.data(None)
        if cross_attention:
            self.cross = MultiHeadAttention(d_model, num_heads, is_causal=False, rngs=rngs)
            self.cross_norm = _norm(norm, d_model, rngs)
        self.mlp_norm = _norm(norm, d_model, rngs)
        self.mlp = MLP(d_model, mlp_hidden or 4 * d_model, kind=mlp, rngs=rngs)
        self.dropout = nnx.Dropout(dropout_rate, rngs=rngs)

    def _cross(self, x, context, context_mask) -> jax.Array:
        if self.cross is not None:
            if context is None:
                raise ValueError("context: this block has cross attention and needs one")
            x = x + self.dropout(self.cross(self.cross_norm(x), context=context,
                                            context_mask=context_mask))
        return x

    def _rest(self, x, context, context_mask) -> jax.Array:
        """Cross attention and the MLP after the mixer (decoding)."""
        x = self._cross(x, context, context_mask)
        return x + self.dropout(self.mlp(self.mlp_norm(x)))

    def __call__(self, x: jax.Array, *, context: jax.Array | None = None,
                 context_mask: jax.Array | None = None, mask=None, return_aux: bool = False,
                 intervention: Intervention | None = None):
        """x [B, T, d_model] (and the encoder's output as ``context``) -> [B, T, d_model];
        ``mask`` goes to a softmax attention mixer (:class:`MultiHeadAttention`), combined
        with its own causal flag and window (ValueError for other mixers); with
        ``return_aux`` also the mixer's auxiliary loss (0 if it has none); with an
        ``intervention`` (one layer's, :mod:`jattn.analysis.intervene`) also the captures:
        (result, captures)."""
        edits = Edits() if intervention is None or intervention.edits is None else (
            intervention.edits)
        capture = None if intervention is None else intervention.capture
        tensors = () if capture is None else capture.tensors
        if capture is not None:
            capture.check(num_heads=None, length=x.shape[1])
        captures = {}

        def record(name, value):
            if name in tensors:
                captures[name] = capture.rows(value, 1)

        def edited(name, value):
            edit = getattr(edits, name)
            return value if edit is None else edit.apply(value)

        x = edited("residual", x)
        record("residual", x)
        out, aux = self._mix(self.mixer_norm(x), edits, capture, captures, mask)
        out = edited("attention", self.dropout(out))
        record("attention", out)
        x = self._cross(x + out, context, context_mask)
        mlp = edited("mlp", self.dropout(self.mlp(self.mlp_norm(x))))
        record("mlp", mlp)
        x = x + mlp
        result = (x, aux) if return_aux else x
        return result if intervention is None else (result, captures)

    def _mix(self, x, edits: Edits, capture: Capture | None, captures: dict, mask):
        """The mixer on x: (output, auxiliary loss); its attention-level edits and captures
        (into ``captures``) and the extra ``mask`` go to a softmax attention mixer."""
        inner_edits = edits._replace(residual=None, attention=None, mlp=None)
        inner = () if capture is None else tuple(t for t in capture.tensors
                                                 if t in ATTENTION_TENSORS)
        # capturing every layer takes attention tensors from the layers that have them
        is_attention = isinstance(self.mixer, MultiHeadAttention)
        if mask is not None and not is_attention:
            raise ValueError(f"mask: only softmax attention mixers take a mask, this layer's "
                             f"is {self.mixer_name}")
        masked = {} if mask is None else {"mask": mask}
        inner_capture = (Capture(inner, heads=capture.heads,
                                 query_positions=capture.query_positions)
                         if inner and (capture.layers is not None or is_attention) else None)
        aux = jnp.zeros((), jnp.float32)
        if inner_capture is None and all(e is None for e in inner_edits):
            out = self.mixer(x, **masked)
            if isinstance(out, tuple):  # (output, auxiliary loss), e.g. mixture-of-heads
                out, aux = out
            return out, aux
        if not is_attention:
            raise ValueError(f"intervention: this layer's mixer ({self.mixer_name}) is not "
                             "softmax attention; only block tensors "
                             f"{BLOCK_TENSORS} and residual edits apply to it")
        out, inner_captures = self.mixer(x, intervention=Intervention(inner_edits,
                                                                      inner_capture),
                                         **masked)
        captures.update(inner_captures)
        return out, aux

    def _decoder(self, method: str):
        fn = getattr(self.mixer, method, None)
        if fn is None:
            raise NotImplementedError(f"mixer {self.mixer_name!r} has no decoding state "
                                      f"(no {method}())")
        return fn

    def prefill(self, x, *, max_length, context=None, context_mask=None):
        """The block on a prompt, and its mixer's decoding state."""
        y, state = self._decoder("prefill")(self.mixer_norm(x), max_length=max_length)
        return self._rest(x + self.dropout(y), context, context_mask), state

    def step(self, x, state, *, position, context=None, context_mask=None):
        """The block on the next tokens, from and to its mixer's decoding state."""
        y, state = self._decoder("step")(self.mixer_norm(x), state, position=position)
        return self._rest(x + self.dropout(y), context, context_mask), state


def _per_layer(name: str, value, num_layers: int, single) -> list:
    """``value`` for every layer: one value (``single(value)``) or a sequence of one per
    layer."""
    if single(value):
        return [value] * num_layers
    values = list(value)
    if len(values) != num_layers:
        raise ValueError(f"{name}: expected one or {num_layers} (one per layer), "
                         f"got {len(values)}")
    return values


class TransformerLM(nnx.Module):
    """A decoder-only (causal) language model: token embedding, positions, blocks, final
    norm, output head (tied to the embedding by default).

    ``positions``: "learned" (:class:`jattn.nn.transformer.LearnedPositionEmbedding`),
    "sinusoidal", or None (for mixers that carry their own order, e.g. convolutions, SSMs, RoPE
    inside a custom mixer). Use :func:`generate` to sample.

    Example:
        >>> import jax.numpy as jnp
        >>> from flax import nnx
        >>> lm = TransformerLM(50, 16, 2, mixer=["attention", "linear"], num_heads=2,
        ...                    max_length=32, rngs=nnx.Rngs(0))
        >>> lm(jnp.zeros((1, 7), jnp.int32)).shape
        (1, 7, 50)
    """

    def __init__(self, vocab_size: int, d_model: int, num_layers: int, *,
                 mixer: str | MixerFactory | Sequence[str | MixerFactory] = "attention",
                 num_heads: int = 1, max_length: int = 2048, positions: str | None = "learned",
                 mixer_options: dict | Sequence[dict] | None = None, norm: str = "layernorm",
                 mlp: str = "gelu",
                 mlp_hidden: int | None = None, dropout_rate: float = 0.0,
                 tie_embeddings: bool = True, cross_attention: bool = False, rngs: nnx.Rngs):
        self.vocab_size, self.max_length = vocab_size, max_length
        self.embed = TokenEmbedding(vocab_size, d_model, max_length=max_length,
                                    positions=positions, dropout_rate=dropout_rate, rngs=rngs)
        self.blocks = nnx.List([
            TransformerBlock(d_model, m, num_heads=num_heads, is_causal=True,
                             max_length=max_length, mixer_options=options, norm=norm,
                             mlp=mlp, mlp_hidden=mlp_hidden, dropout_rate=dropout_rate,
                             cross_attention=cross_attention, rngs=rngs)
            for m, options in zip(
                _per_layer("mixer", mixer, num_layers, lambda m: isinstance(m, str) or
                           callable(m)),
                _per_layer("mixer_options", mixer_options, num_layers,
                           lambda o: o is None or isinstance(o, dict)), strict=True)])
        self.final_norm = _norm(norm, d_model, rngs)
        self.head = (nnx.data(None) if tie_embeddings
                     else nnx.Linear(d_model, vocab_size, use_bias=False, rngs=rngs))

    def _logits(self, x: jax.Array) -> jax.Array:
        x = self.final_norm(x)
        return self.embed.tokens.attend(x) if self.head is None else self.head(x)

    def __call__(self, tokens: jax.Array, *, context: jax.Array | None = None,
                 context_mask: jax.Array | None = None, prefix: jax.Array | None = None,
                 mask=None, return_aux: bool = False, logits_at: jax.Array | None = None,
                 intervention: Intervention | None = None):
        """tokens int [B, T] (and, with cross attention, the encoder output ``context``
        [B, S, d_model] with its ``context_mask`` bool [B, S]) -> logits [B, T, vocab];
        ``prefix`` [B, Tp, d_model] puts embeddings made elsewhere before the tokens' (a
        multimodal model's projected image features): the stack then runs on Tp + T
        positions and the logits (and ``logits_at``) cover all of them. ``mask`` (a
        :class:`jattn.masks.Mask` over those positions) restricts every softmax attention
        layer further, e.g. ``jattn.masks.composite_visual(is_visual)`` for EE-MLLM's
        composite attention (visual tokens do not attend to each other; the language
        model's own weights serve both modalities); with ``logits_at`` (int [B, P],
        positions in [0, T)) only the logits at those positions, [B, P, vocab] (a loss on a
        few positions never builds [B, T, vocab]);
        with ``return_aux`` also the sum of the mixers' auxiliary losses (e.g. MoH's load
        balance, to add to the task loss with a small weight).

        ``intervention`` (:class:`jattn.analysis.Intervention` with edits {layer: Edits})
        edits and captures the layers' attention and residual stream; the call then returns
        (the result above, captures {layer: {tensor: array}}), where layer ``num_layers``
        holds the final stream ("residual", the input of the final norm)."""
        x = self.embed(tokens, prefix=prefix)
        total = jnp.zeros((), jnp.float32)
        captures = {}
        L = len(self.blocks)
        for i, block in enumerate(self.blocks):
            iv = None if intervention is None else intervention.for_layer(i, L)
            out = block(x, context=context, context_mask=context_mask, mask=mask,
                        return_aux=True, intervention=iv)
            if iv is not None:
                out, captures[i] = out
            x, aux = out
            total = total + aux
        final = None if intervention is None else intervention.capture
        if (final is not None and "residual" in final.tensors
                and (final.layers is None or L in final.layers)):
            captures[L] = {"residual": final.rows(x, 1)}
        if logits_at is not None:
            check_integer("logits_at", logits_at)
            check_rank("logits_at", logits_at, (2,), "[B, P]")
            if logits_at.shape[0] != tokens.shape[0]:
                raise ValueError(f"logits_at: expected [B={tokens.shape[0]}, P], "
                                 f"got {logits_at.shape}")
            x = jnp.take_along_axis(x, logits_at[..., None], axis=1)
        logits = self._logits(x)
        out = (logits, total) if return_aux else logits
        return out if intervention is None else (out, captures)

    def prefill(self, tokens: jax.Array, *, max_length: int | None = None, context=None,
                context_mask=None):
        """Logits of a prompt [B, T] and every layer's decoding state (room for
        ``max_length`` positions in all, default the model's)."""
        max_length = self.max_length if max_length is None else max_length
        x = self.embed(tokens)
        states = []
        for block in self.blocks:
            x, state = block.prefill(x, max_length=max_length, context=context,
                                     context_mask=context_mask)
            states.append(state)
        return self._logits(x), states

    def step(self, tokens: jax.Array, states: list, position, *, context=None,
             context_mask=None) -> tuple[jax.Array, list]:
        """Logits of the next tokens [B, T'] at ``position`` (tokens before them), with the
        updated states."""
        x = self.embed(tokens, position)
        new_states = []
        for block, state in zip(self.blocks, states, strict=True):
            x, state = block.step(x, state, position=position, context=context,
                                  context_mask=context_mask)
            new_states.append(state)
        return self._logits(x), new_states


def _sample(logits: jax.Array, rng, temperature: float, top_k: int | None) -> jax.Array:
    if temperature == 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits.astype(jnp.float32) / temperature
    if top_k is not None:
        kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


# generate()'s two programs live at module level, so that a second generate() call with the
# same shapes reuses them instead of tracing and compiling again; each samples in-program.
@functools.partial(nnx.jit, static_argnames=("temperature", "top_k"))
def _prefill_and_sample(model, prompt, rng, context, context_mask, *, temperature, top_k):
    logits, states = model.prefill(prompt, context=context, context_mask=context_mask)
    return _sample(logits[:, -1], rng, temperature, top_k), states


@functools.partial(nnx.jit, static_argnames=("temperature", "top_k"))
def _step_and_sample(model, token, states, position, rng, context, context_mask, *,
                     temperature, top_k):
    logits, states = model.step(token[:, None], states, position, context=context,
                                context_mask=context_mask)
    return _sample(logits[:, -1], rng, temperature, top_k), states


def generate(model: TransformerLM, prompt: jax.Array, *, max_new_tokens: int,
             temperature: float = 0.0, top_k: int | None = None,
             rng: jax.Array | None = None, context: jax.Array | None = None,
             context_mask: jax.Array | None = None) -> jax.Array:
    """Continue ``prompt`` [B, T] by ``max_new_tokens`` tokens with the layers' decoding
    states: greedy when ``temperature`` is 0, else sampling from softmax(logits /
    temperature), restricted to the ``top_k`` most likely tokens when given (needs ``rng``).
    For an encoder-decoder, pass its decoder and ``context=model.encode(source)``.

    The prompt is prefilled in one call, then each step is one jitted call on one token.

    Returns:
        int32 [B, T + max_new_tokens].

    Example:
        >>> import jax.numpy as jnp
        >>> from flax import nnx
        >>> lm = TransformerLM(20, 8, 1, max_length=16, rngs=nnx.Rngs(0))
        >>> generate(lm, jnp.zeros((2, 3), jnp.int32), max_new_tokens=4).shape
        (2, 7)
    """
    check_rank("prompt", prompt, (2,), "[B, T]")
    check_integer("prompt", prompt)
    T = prompt.shape[1]
    if max_new_tokens < 0 or T + max_new_tokens > model.max_length:
        raise ValueError(f"max_new_tokens: prompt {T} + {max_new_tokens} new tokens must fit "
                         f"in max_length={model.max_length}")
    if temperature < 0:
        raise ValueError(f"temperature: expected >= 0, got {temperature}")
    if temperature > 0 and rng is None:
        raise ValueError("rng: sampling (temperature > 0) needs a PRNG key")
    if top_k is not None and not 1 <= top_k <= model.vocab_size:
        raise ValueError(f"top_k: expected 1 <= top_k <= vocab_size={model.vocab_size}, "
                         f"got {top_k}")
    if max_new_tokens == 0:
        return prompt.astype(jnp.int32)
    keys = (jax.random.split(rng, max_new_tokens) if rng is not None
            else [None] * max_new_tokens)
    options = dict(temperature=float(temperature), top_k=top_k)
    token, states = _prefill_and_sample(model, prompt, keys[0], context, context_mask,
                                        **options)
    out = [prompt.astype(jnp.int32), token[:, None]]
    for i in range(1, max_new_tokens):
        token, states = _step_and_sample(model, token, states, jnp.int32(T + i - 1), keys[i],
                                         context, context_mask, **options)
        out.append(token[:, None])
    return jnp.concatenate(out, axis=1)


class EncoderDecoder(nnx.Module):
    """Encoder-decoder Transformer: a bidirectional encoder over the source and a causal
    :class:`TransformerLM` whose blocks also cross-attend to the encoder's output.

    Example:
        >>> import jax.numpy as jnp
        >>> from flax import nnx
        >>> model = EncoderDecoder(30, 40, 16, num_heads=2, max_length=32, rngs=nnx.Rngs(0))
        >>> model(jnp.zeros((1, 9), jnp.int32), jnp.zeros((1, 5), jnp.int32)).shape
        (1, 5, 40)
    """

    def __init__(self, source_vocab: int, target_vocab: int, d_model: int, *,
                 encoder_layers: int = 2, decoder_layers: int = 2,
                 encoder_mixer: str | MixerFactory = "attention",
                 decoder_mixer: str | MixerFactory = "attention", num_heads: int = 1,
                 max_length: int = 2048, positions: str | None = "sinusoidal",
                 norm: str = "layernorm", mlp: str = "gelu", dropout_rate: float = 0.0,
                 tie_embeddings: bool = True, rngs: nnx.Rngs):
        options = dict(num_heads=num_heads, max_length=max_length, norm=norm, mlp=mlp,
                       dropout_rate=dropout_rate, rngs=rngs)
        self.source_embed = TokenEmbedding(source_vocab, d_model, max_length=max_length,
                                           positions=positions, dropout_rate=dropout_rate,
                                           rngs=rngs)
        self.encoder = nnx.List([TransformerBlock(d_model, encoder_mixer, is_causal=False,
                                                  **options)
                                 for _ in range(encoder_layers)])
        self.encoder_norm = _norm(norm, d_model, rngs)
        self.decoder = TransformerLM(target_vocab, d_model, decoder_layers,
                                     mixer=decoder_mixer, positions=positions,
                                     tie_embeddings=tie_embeddings, cross_attention=True,
                                     **options)

    def encode(self, source: jax.Array) -> jax.Array:
        """source int [B, S] -> encoder output [B, S, d_model]."""
        x = self.source_embed(source)
        for block in self.encoder:
            x = block(x)
        return self.encoder_norm(x)

    def __call__(self, source: jax.Array, target: jax.Array, *,
                 source_mask: jax.Array | None = None) -> jax.Array:
        """source [B, S], target [B, T] (teacher forcing) -> logits [B, T, target_vocab].
        ``source_mask`` bool [B, S] hides padded source tokens from the cross attention."""
        return self.decoder(target, context=self.encode(source), context_mask=source_mask)
