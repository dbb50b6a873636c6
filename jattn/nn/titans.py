"""NNX modules for Titans: the neural long-term memory as a layer, and the four architectures
of the paper (LMM, MAG, MAL, MAC) as sequence mixers for :class:`jattn.nn.TransformerLM`.

Every module is wiring: the memory is :func:`jattn.memory.titans.neural_memory` (and its
pieces ``memory_inputs`` / ``apply_memory`` for MAC's read-only retrieval), attention is
:func:`jattn.dot_product_attention` with a :mod:`jattn.core.masks` mask (or
:class:`jattn.nn.MultiHeadAttention` itself), persistent tokens are
:func:`jattn.memory.titans.prepend_persistent`. With xp = [persistent || x] (N_p tokens):

* :class:`NeuralMemory`: out = W_o(RMSNorm(M(x)) * sigmoid(x W_g)), the paper's
  "normalisation and a linear gate before the output projection" read as a per-head RMSNorm
  (one gain over the head dim, shared by the heads) of the retrieved heads, multiplied by a
  sigmoid gate computed from the layer's input by a linear map, then the output projection.
* LMM (:class:`TitansLMM`): NeuralMemory(xp), persistent positions dropped.
* MAG (:class:`TitansMAG`, Eqs. 26-28): y = SW-Attn*(xp), m = NeuralMemory(xp),
  o = RMSNorm_y(y) * sigmoid(RMSNorm_m(m)) (each branch normalised with a learned gain, the
  non-linearity on the memory branch). SW-Attn* is causal sliding-window attention over xp
  with the persistent tokens visible to every query:
  ``masks.local_window(window - 1, 0) | masks.lengths(kv_lengths=N_p)`` (the prefix is
  bidirectional, as in the paper's Figure 3b).
* MAL (:class:`TitansMAL`, Eqs. 29-31): y = NeuralMemory(xp), o = SW-Attn(y), plain causal
  sliding-window attention (:class:`jattn.nn.MultiHeadAttention` with ``window``).
* MAC (:class:`TitansMAC`, Eqs. 21-25), segment by segment (``segment_size`` C tokens,
  ``lax.scan`` over the full segments, the shorter last one after it):

  1. retrieve h = M_{t-1}(S W_Q): the queries of the segment's tokens (from
     ``memory_inputs`` on the whole input, so the short convolution runs over x) read the
     memory *as left by the previous segment* (``apply_memory`` on its weights: retrieval
     before any write of this segment, the paper's M*_{t-1}), then the memory's output head;
  2. attend: queries from the segment, keys and values from [persistent || h || segment]
     (N_p + 2 C positions, C the segment's length: the last one may be shorter), mask
     (query i of the segment, key position k)::

         retrieved="causal":  masks.causal(N_p) | (masks.causal(N_p + C)
                                                  & ~masks.lengths(kv_lengths=N_p + C))
         retrieved="prefix":  masks.causal(N_p + C) | masks.lengths(kv_lengths=N_p + C)

     Persistent tokens are visible to every query in both. With "causal" (the default)
     query i sees h_j for j <= i and the segment's tokens j <= i. "prefix" is the paper's
     figure (persistent and retrieved tokens visible to every query of the segment), but
     h_j is read with x_j's query, so in a causal LM it leaks tokens j > i into output i
     (tested): use it only where that is acceptable;
  3. update: write y into the memory (``neural_memory`` on y with the state carried from the
     previous segment) and read z_i = M_i(q(y_i)) with ``retrieve="after"``: the state after
     the segment's writes up to token i (the paper's M*_t(y_t) taken token by token, so that
     output i never sees a later token's write). With ``residual`` (the default) y is the
     segment's residual stream after the attention, y = x + Attn(...); otherwise the
     attention output alone;
  4. o = RMSNorm_y(y) * sigmoid(RMSNorm_m(z)), the same gate as MAG.

  The paper writes y_t = Attn(S~(t)) and states that every block has residual connections
  (Sec. 4.4), not whether the memory's y_t includes the residual. We take it to: at
  initialisation the attention output alone is a near-uniform average over the segment, so
  the memory's keys of one segment's tokens all but coincide (mean cosine 0.89 against 0.14
  for the block's input), and the outer gradient grows with every segment at the memory
  rates the LMM trains with (docs/titans.md has the measurements and the recall runs of
  both).

  The memory state carried between segments is the one of the y stream (weights, momentum,
  convolution history of y); the queries' convolution runs over x, whose history a call
  returns beside it (:class:`MACState`). Chunks of the chunked form restart at every
  segment, so take ``segment_size`` a multiple of ``chunk_size``.

Options of the memory (``memory_depth``, ``memory_expansion``, ``chunk_size``,
``implementation``, ``momentum``, ``forget``, ``channelwise_forget``, ``max_grad_norm``,
``gate_granularity``, ``num_persistent``, ...) pass through every architecture to
:class:`NeuralMemory`. Outputs are in the input's dtype. All four mixers are causal only
(the memory is a recurrence). LMM, MAG and MAL decode (``prefill``/``step``: the memory
state, plus the attention KV cache of MAG (a ring of the window beside the persistent tokens'
slots) and MAL) when the memory writes token by token (``chunk_size=1`` or
``implementation="sequential"``; otherwise NotImplementedError). MAC decodes too: its state
is the one after the last complete segment plus the current segment's tokens, which each
new token recomputes (O(segment) per token, as the segment's attention costs anyway).

:data:`jattn.nn.transformer.MIXERS` names them "titans_lmm", "titans_mag", "titans_mal" and
"titans_mac".

References:
    P37 Titans: "Titans: Learning to Memorize at Test Time" (Behrouz, Zhong, Mirrokni),
    Sec. 3 (memory), Sec. 4 (MAC, MAG, MAL), Sec. 4.4 (architectural details).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax

import jattn
from jattn.core import masks
from jattn.core.shapes import check_heads, check_int, check_rank, check_shape
from jattn.memory.titans import (
    GATE_GRANULARITIES,
    MemoryWeights,
    NeuralMemoryParams,
    NeuralMemoryState,
    apply_memory,
    init_neural_memory,
    initial_memory_state,
    memory_inputs,
    neural_memory,
    prepend_persistent,
)
from jattn.nn.attention import MultiHeadAttention
from jattn.nn.layers import torch_linear

_FIELDS = ("w_q", "w_k", "w_v", "conv", "w_lr", "b_lr", "w_momentum", "b_momentum",
           "w_forget", "b_forget", "persistent")
IMPLEMENTATIONS = ("chunked", "sequential")
RETRIEVE = ("after", "before")
RETRIEVED_MASKS = ("causal", "prefix")


def _choice(name: str, value, allowed: tuple) -> None:
    if value not in allowed:
        raise ValueError(f"{name}: expected one of {allowed}, got {value!r}")


class NeuralMemory(nnx.Module):
    """The Titans neural memory as a layer: [B, T, d_model] -> [B, T, d_model].

    out = W_o(RMSNorm(y) * sigmoid(x W_g)) with y = ``neural_memory(params, x, ...)``
    [B, T, N, H] (RMSNorm over the head dim, one gain shared by the heads; W_g and W_o
    torch.nn.Linear-initialised, with bias). The memory's outer-loop parameters
    (:class:`jattn.memory.titans.NeuralMemoryParams`, from ``init_neural_memory``) are held as
    ``nnx.Param`` leaves; :attr:`params` reassembles them. Persistent tokens are held here but
    not prepended by the call (the architectures do it).

    Args:
        d_model: model width D. num_heads: memory heads N. head_dim: H (default D / N).
        memory_depth, memory_expansion, conv_size, activation, normalize_qk, momentum, forget: as
            :func:`jattn.memory.titans.init_neural_memory`.
        channelwise_forget, max_lr, num_persistent, initial_lr, initial_momentum, initial_forget:
            as :func:`jattn.memory.titans.init_neural_memory`.
        chunk_size, implementation, retrieve, max_grad_norm, gate_granularity: as
            :func:`jattn.memory.titans.neural_memory` (``gate_granularity="chunk"``: one
            theta, eta, alpha per chunk, those of its first token).
        rngs: ``nnx.Rngs`` (``params`` stream).

    Raises:
        ValueError: an option out of range (named).

    Example:
        >>> import jax.numpy as jnp
        >>> from flax import nnx
        >>> mem = NeuralMemory(16, 2, chunk_size=4, rngs=nnx.Rngs(0))
        >>> mem(jnp.ones((1, 6, 16))).shape
        (1, 6, 16)
    """

    def __init__(self, d_model: int, num_heads: int = 1, *, head_dim: int | None = None,
                 memory_depth: int = 2, memory_expansion: int = 4, conv_size: int | None = 4,
                 activation: str | None = "silu", normalize_qk: bool = True,
                 momentum: bool = True, forget: bool = True, channelwise_forget: bool = False,
                 max_lr: float = 1.0, num_persistent: int = 0, initial_lr: float = 0.01,
                 initial_momentum: float = 0.9, initial_forget: float = 0.01,
                 chunk_size: int = 16, implementation: str = "chunked",
                 retrieve: str = "after", max_grad_norm: float | None = None,
                 gate_granularity: str = "token", rngs: nnx.Rngs):
        if head_dim is None:
            check_heads(d_model, num_heads)
            head_dim = d_model // num_heads
        check_int("chunk_size", chunk_size)
        _choice("implementation", implementation, IMPLEMENTATIONS)
        _choice("retrieve", retrieve, RETRIEVE)
        _choice("gate_granularity", gate_granularity, GATE_GRANULARITIES)
        if max_grad_norm is not None and not max_grad_norm > 0:
            raise ValueError(f"max_grad_norm: expected None or > 0, got {max_grad_norm!r}")
        p = init_neural_memory(
            rngs.params(), dim=d_model, num_heads=num_heads, head_dim=head_dim,
            memory_depth=memory_depth, memory_expansion=memory_expansion, conv_size=conv_size,
            activation=activation, normalize_qk=normalize_qk, momentum=momentum, forget=forget,
            channelwise_forget=channelwise_forget, max_lr=max_lr, num_persistent=num_persistent,
            initial_lr=initial_lr, initial_momentum=initial_momentum,
            initial_forget=initial_forget)
        self.config = p.config
        self.chunk_size, self.implementation = chunk_size, implementation
        self.retrieve, self.max_grad_norm = retrieve, max_grad_norm
        self.gate_granularity = gate_granularity
        for field in _FIELDS:
            value = getattr(p, field)
            setattr(self, field, nnx.data(None) if value is None else nnx.Param(value))
        self.memory_matrices = nnx.List([nnx.Param(m) for m in p.memory.matrices])
        self.memory_scale = nnx.data(None) if p.memory.scale is None else nnx.Param(
            p.memory.scale)
        self.memory_bias = nnx.data(None) if p.memory.bias is None else nnx.Param(p.memory.bias)
        self.norm = nnx.RMSNorm(head_dim, rngs=rngs)
        self.gate = torch_linear(d_model, num_heads * head_dim, rngs)
        self.out_proj = torch_linear(num_heads * head_dim, d_model, rngs)

    @property
    def num_persistent(self) -> int:
        return self.config.num_persistent

    @property
    def params(self) -> NeuralMemoryParams:
        """The memory's outer-loop parameters as a
        :class:`jattn.memory.titans.NeuralMemoryParams` pytree."""
        def value(v):
            return None if v is None else v[...]
        return NeuralMemoryParams(
            config=self.config, **{f: value(getattr(self, f)) for f in _FIELDS},
            memory=MemoryWeights(tuple(m[...] for m in self.memory_matrices),
                                 value(self.memory_scale), value(self.memory_bias)))

    def output(self, y: jax.Array, x: jax.Array) -> jax.Array:
        """The output head: retrieved heads y [B, T, N, H] gated by the layer input x
        [B, T, D] -> W_o(RMSNorm(y) * sigmoid(x W_g)) [B, T, D]."""
        gate = jax.nn.sigmoid(self.gate(x)).reshape(y.shape)
        return self.out_proj((self.norm(y) * gate).reshape(*x.shape[:-1], -1))

    def decoding(self) -> None:
        """Check that decoding (a prompt, then a few tokens per call) computes what one call on
        the whole sequence computes: true when every token is written on its own
        (``implementation="sequential"`` or ``chunk_size=1``). Chunks restart at every call,
        so with larger chunks the calls would freeze the gradients at other points.

        Raises:
            NotImplementedError: chunked with ``chunk_size`` > 1.
        """
        if self.implementation == "chunked" and self.chunk_size > 1:
            raise NotImplementedError(
                f"decoding: chunks restart at every call, so decoding with chunk_size="
                f"{self.chunk_size} would differ from the full forward; use chunk_size=1 or "
                "implementation='sequential'")

    def prepend_persistent(self, x: jax.Array) -> jax.Array:
        """[persistent || x]: [B, T, D] -> [B, N_p + T, D]."""
        return prepend_persistent(self.params, x) if self.num_persistent else x

    def __call__(self, x: jax.Array, *, initial_state: NeuralMemoryState | None = None,
                 return_state: bool = False):
        """x [B, T, D] -> [B, T, D] (with ``return_state`` also the final
        :class:`jattn.memory.titans.NeuralMemoryState`): writes every token, reads every query
        (``retrieve`` chooses M_t or M_{t-1}), then the output head."""
        out = neural_memory(self.params, x, chunk_size=self.chunk_size,
                            implementation=self.implementation, initial_state=initial_state,
                            return_state=return_state, retrieve=self.retrieve,
                            max_grad_norm=self.max_grad_norm,
                            gate_granularity=self.gate_granularity)
        y, state = out if return_state else (out, None)
        y = self.output(y, x).astype(x.dtype)
        return (y, state) if return_state else y


def _memory(d_model, num_heads, memory_heads, rngs, options) -> NeuralMemory:
    return NeuralMemory(d_model, num_heads if memory_heads is None else memory_heads,
                        rngs=rngs, **options)


def _check_window(window) -> None:
    check_int("window", window)


class _BranchGate(nnx.Module):
    """o = RMSNorm_y(y) * sigmoid(RMSNorm_m(m)), each branch with its own learned gain."""

    def __init__(self, d_model: int, rngs: nnx.Rngs):
        self.norm_y = nnx.RMSNorm(d_model, rngs=rngs)
        self.norm_m = nnx.RMSNorm(d_model, rngs=rngs)

    def __call__(self, y: jax.Array, m: jax.Array) -> jax.Array:
        return self.norm_y(y) * jax.nn.sigmoid(self.norm_m(m))


class TitansLMM(nnx.Module):
    """LMM: the neural memory alone, on [persistent || x] (persistent positions dropped).

    Args:
        d_model, num_heads: width and attention heads (memory heads default to num_heads).
        memory_heads: memory heads N (default num_heads).
        **memory_options: :class:`NeuralMemory` options.

    Example:
        >>> import jax.numpy as jnp
        >>> from flax import nnx
        >>> TitansLMM(16, 2, num_persistent=2, chunk_size=4, rngs=nnx.Rngs(0))(
        ...     jnp.ones((1, 6, 16))).shape
        (1, 6, 16)
    """

    def __init__(self, d_model: int, num_heads: int = 1, *, memory_heads: int | None = None,
                 rngs: nnx.Rngs, **memory_options):
        self.memory = _memory(d_model, num_heads, memory_heads, rngs, memory_options)

    def __call__(self, x: jax.Array) -> jax.Array:
        """x [B, T, D] -> [B, T, D]."""
        out = self.memory(self.memory.prepend_persistent(x))
        return out[:, self.memory.num_persistent:].astype(x.dtype)

    def prefill(self, x: jax.Array, *, max_length: int | None = None):
        """(output, :class:`jattn.memory.titans.NeuralMemoryState`) of a prompt x [B, T, D]; the
        state does not grow with the length. Token-by-token writes only: see
        :meth:`NeuralMemory.decoding`."""
        del max_length
        self.memory.decoding()
        out, state = self.memory(self.memory.prepend_persistent(x), return_state=True)
        return out[:, self.memory.num_persistent:].astype(x.dtype), state

    def step(self, x: jax.Array, state: NeuralMemoryState, *, position=None):
        """The next tokens x [B, T, D]: (output, new state); ``position`` is not needed."""
        del position
        out, state = self.memory(x, initial_state=state, return_state=True)
        return out.astype(x.dtype), state


class TitansMAG(nnx.Module):
    """MAG (memory as a gate): sliding-window attention over [persistent || x] gated with the
    memory branch (see the module docstring for the mask and the gate).

    Args:
        d_model, num_heads: width and attention heads.
        window: attention window (each query sees itself and ``window - 1`` tokens before it,
            plus every persistent token).
        memory_heads: memory heads (default num_heads).
        num_persistent: N_p persistent tokens (default 4).
        **memory_options: :class:`NeuralMemory` options.

    Example:
        >>> import jax.numpy as jnp
        >>> from flax import nnx
        >>> TitansMAG(16, 2, window=3, chunk_size=4, rngs=nnx.Rngs(0))(
        ...     jnp.ones((1, 6, 16))).shape
        (1, 6, 16)
    """

    def __init__(self, d_model: int, num_heads: int = 1, *, window: int = 64,
                 memory_heads: int | None = None, num_persistent: int = 4, rngs: nnx.Rngs,
                 **memory_options):
        _check_window(window)
        self.window = window
        self.attention = MultiHeadAttention(d_model, num_heads, is_causal=True, window=window,
                                            rngs=rngs)
        self.memory = _memory(d_model, num_heads, memory_heads, rngs,
                              dict(memory_options, num_persistent=num_persistent))
        self.gate = _BranchGate(d_model, rngs)

    def attention_mask(self) -> masks.Mask:
        """Causal window of ``window`` tokens, every persistent token visible."""
        return (masks.local_window(self.window - 1, 0)
                | masks.lengths(kv_lengths=self.memory.num_persistent))

    def __call__(self, x: jax.Array) -> jax.Array:
        """x [B, T, D] -> [B, T, D]."""
        xt = self.memory.prepend_persistent(x)
        q, k, v = self.attention.proj(xt)
        y = jattn.dot_product_attention(q, k, v, mask=self.attention_mask())
        y = self.attention.out_proj(y.reshape(*xt.shape[:-1], -1))
        out = self.gate(y, self.memory(xt))[:, self.memory.num_persistent:]
        return out.astype(x.dtype)

    def prefill(self, x: jax.Array, *, max_length: int):
        """(output, (memory state, attention KV cache)) of a prompt x [B, T, D]: the cache
        keeps the N_p persistent tokens (always visible) and a ring of ``window``; its size
        does not depend on ``max_length``. Token-by-token writes only: see
        :meth:`NeuralMemory.decoding`."""
        self.memory.decoding()
        xt = self.memory.prepend_persistent(x)
        num_persistent = self.memory.num_persistent
        # Persistent queries see the persistent tokens causally here (all of them in
        # __call__); their outputs are dropped either way.
        y, cache = self.attention.prefill(xt, max_length=max_length + num_persistent,
                                          sinks=num_persistent)
        m, memory = self.memory(xt, return_state=True)
        out = self.gate(y, m)[:, num_persistent:]
        return out.astype(x.dtype), (memory, cache)

    def step(self, x: jax.Array, state, *, position=None):
        """The next tokens x [B, T, D]: (output, new state); ``position`` is not needed."""
        del position
        memory, cache = state
        y, cache = self.attention.step(x, cache)
        m, memory = self.memory(x, initial_state=memory, return_state=True)
        return self.gate(y, m).astype(x.dtype), (memory, cache)


class TitansMAL(nnx.Module):
    """MAL (memory as a layer): the neural memory on [persistent || x], then causal
    sliding-window attention (:class:`jattn.nn.MultiHeadAttention` with ``window``).

    Args: as :class:`TitansMAG`.

    Example:
        >>> import jax.numpy as jnp
        >>> from flax import nnx
        >>> TitansMAL(16, 2, window=3, chunk_size=4, rngs=nnx.Rngs(0))(
        ...     jnp.ones((1, 6, 16))).shape
        (1, 6, 16)
    """

    def __init__(self, d_model: int, num_heads: int = 1, *, window: int = 64,
                 memory_heads: int | None = None, num_persistent: int = 4, rngs: nnx.Rngs,
                 **memory_options):
        _check_window(window)
        self.memory = _memory(d_model, num_heads, memory_heads, rngs,
                              dict(memory_options, num_persistent=num_persistent))
        self.attention = MultiHeadAttention(d_model, num_heads, is_causal=True, window=window,
                                            rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        """x [B, T, D] -> [B, T, D]."""
        y = self.memory(self.memory.prepend_persistent(x))
        return self.attention(y)[:, self.memory.num_persistent:].astype(x.dtype)

    def prefill(self, x: jax.Array, *, max_length: int):
        """(output, (memory state, attention KV cache)) of a prompt x [B, T, D] (a cache of
        ``max_length`` + N_p slots, or a ring of ``window``). Token-by-token writes only: see
        :meth:`NeuralMemory.decoding`."""
        self.memory.decoding()
        y, memory = self.memory(self.memory.prepend_persistent(x), return_state=True)
        out, cache = self.attention.prefill(y, max_length=max_length + self.memory.num_persistent)
        return out[:, self.memory.num_persistent:].astype(x.dtype), (memory, cache)

    def step(self, x: jax.Array, state, *, position=None):
        """The next tokens x [B, T, D]: (output, new state); ``position`` is not needed."""
        del position
        memory, cache = state
        y, memory = self.memory(x, initial_state=memory, return_state=True)
        out, cache = self.attention.step(y, cache)
        return out.astype(x.dtype), (memory, cache)


class MACState(NamedTuple):
    """What a :class:`TitansMAC` call leaves for the next one.

    - memory: the :class:`jattn.memory.titans.NeuralMemoryState` of the memory written with
      the attention outputs.
    - query_conv: [B, conv_size - 1, 3 N H], the convolution history of the input stream that
      makes the retrieval queries (None without a convolution).
    """

    memory: NeuralMemoryState
    query_conv: jax.Array | None


class MACDecodeState(NamedTuple):
    """Decoding state of :class:`TitansMAC`: the state after the last complete segment and
    the tokens of the current one so far.

    start: :class:`MACState` after the last complete segment.
    segment: [B, C, D], the current segment's tokens (zeros after the first ``count``).
    count: [] int32, how many of them there are (0 <= count < C).
    """

    start: MACState
    segment: jax.Array
    count: jax.Array


def mac_mask(num_persistent: int, length: int, retrieved: str = "causal") -> masks.Mask:
    """MAC's attention mask for a segment of ``length`` queries over the keys
    [persistent (N_p) || retrieved (length) || segment (length)] (see the module docstring).

    >>> mac_mask(1, 2).materialize(2, 5)[0, 0].astype(int).tolist()
    [[1, 1, 0, 1, 0], [1, 1, 1, 1, 1]]
    >>> mac_mask(1, 2, "prefix").materialize(2, 5)[0, 0].astype(int).tolist()
    [[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]]
    """
    _choice("retrieved", retrieved, RETRIEVED_MASKS)
    prefix = num_persistent + length
    if retrieved == "prefix":
        return masks.causal(prefix) | masks.lengths(kv_lengths=prefix)
    return masks.causal(num_persistent) | (masks.causal(prefix)
                                           & ~masks.lengths(kv_lengths=prefix))


class TitansMAC(nnx.Module):
    """MAC (memory as context): per segment, retrieve from the memory before writing, attend
    over [persistent || retrieved || segment], write the attention output, gate it with the
    memory's read of it (see the module docstring for the order, the mask and the gate).

    Args:
        d_model, num_heads: width and attention heads.
        segment_size: C, tokens per segment (the attention's span; default 64).
        retrieved: the retrieved tokens' mask (``RETRIEVED_MASKS``): "causal" (query i
            sees retrieved tokens j <= i) or "prefix" (every retrieved token visible: the
            paper's figure, which lets a query see the future in an LM).
        residual: write (and gate) y = x + Attn(...), the segment's residual stream after
            the attention (default), rather than the attention output alone (False; see the
            module docstring for why).
        memory_heads: memory heads (default num_heads).
        num_persistent: N_p persistent tokens (default 4).
        **memory_options: :class:`NeuralMemory` options (``retrieve`` is fixed by MAC's
            order and may not be given).

    Example:
        >>> import jax.numpy as jnp
        >>> from flax import nnx
        >>> TitansMAC(16, 2, segment_size=4, chunk_size=2, rngs=nnx.Rngs(0))(
        ...     jnp.ones((1, 6, 16))).shape
        (1, 6, 16)
    """

    def __init__(self, d_model: int, num_heads: int = 1, *, segment_size: int = 64,
                 retrieved: str = "causal", residual: bool = True,
                 memory_heads: int | None = None, num_persistent: int = 4, rngs: nnx.Rngs,
                 **memory_options):
        check_int("segment_size", segment_size)
        _choice("retrieved", retrieved, RETRIEVED_MASKS)
        self.residual = residual
        if "retrieve" in memory_options:
            raise ValueError("retrieve: MAC reads before writing (retrieval) and after "
                             "(the output gate) by construction; do not set it")
        self.segment_size, self.retrieved = segment_size, retrieved
        self.attention = MultiHeadAttention(d_model, num_heads, is_causal=True, rngs=rngs)
        self.memory = _memory(d_model, num_heads, memory_heads, rngs,
                              dict(memory_options, num_persistent=num_persistent))
        self.gate = _BranchGate(d_model, rngs)

    def attend(self, state: NeuralMemoryState, x: jax.Array, query: jax.Array) -> jax.Array:
        """Steps 1-2 of a segment: retrieve from ``state`` (the memory after the previous
        segments) with the memory queries [B, C, N, H] of x [B, C, D], then attend over
        [persistent || retrieved || x]: the attention output y [B, C, D] (what the memory
        writes)."""
        if not isinstance(state, NeuralMemoryState):
            raise ValueError(f"state: expected a NeuralMemoryState, got {type(state).__name__}")
        check_rank("x", x, (3,), "[B, C, D]")
        B, N, H = state.weights.matrices[0].shape[:3]
        check_shape("x", x, (B, *x.shape[1:]), "BCD")
        check_shape("query", query, (B, x.shape[1], N, H), "BCNH")
        mem = self.memory
        h = mem.output(apply_memory(state.weights, query), x).astype(x.dtype)  # M*_{t-1}(S W_Q)
        context = jnp.concatenate([mem.prepend_persistent(h), x], axis=1)
        q, k, v = self.attention.proj(x, context)
        mask = mac_mask(mem.num_persistent, x.shape[1], self.retrieved)
        y = jattn.dot_product_attention(q, k, v, mask=mask)
        return self.attention.out_proj(y.reshape(*x.shape[:-1], -1))

    def segment(self, state: NeuralMemoryState, x: jax.Array, query: jax.Array
                ) -> tuple[NeuralMemoryState, jax.Array]:
        """One segment: state (the memory after the previous segments), x [B, C, D] and its
        memory queries [B, C, N, H] -> (state after this segment, output [B, C, D]): y =
        x + attend(...) (``residual``) or attend(...), written into the memory and gated."""
        y = self.attend(state, x, query)
        if self.residual:
            y = x + y
        z, state = self.memory(y, initial_state=state, return_state=True)  # write y, read M*_t(y)
        return state, self.gate(y, z).astype(x.dtype)

    def __call__(self, x: jax.Array, *, initial_state: MACState | None = None,
                 return_state: bool = False):
        """x [B, T, D] -> [B, T, D]; with ``return_state`` also the :class:`MACState` after
        the last segment, from which a next call continues (two calls equal one when the
        first one's length is a multiple of ``segment_size``). ``initial_state`` defaults to
        the learned initial memory and an empty convolution history."""
        B, T, _ = x.shape
        C = self.segment_size
        if initial_state is None:
            initial_state = MACState(initial_memory_state(self.memory.params, B), None)
        elif not isinstance(initial_state, MACState):
            raise ValueError(f"initial_state: expected a MACState, "
                             f"got {type(initial_state).__name__}")
        inputs, query_conv = memory_inputs(self.memory.params, x,
                                           conv_state=initial_state.query_conv)
        query = inputs.query
        full = T // C
        state, outputs = initial_state.memory, []
        if full:
            def body(state, seg):
                return self.segment(state, *seg)

            def split(a):
                return jnp.moveaxis(a[:, :full * C].reshape(B, full, C, *a.shape[2:]), 1, 0)

            state, out = lax.scan(body, state, (split(x), split(query)))
            outputs.append(jnp.moveaxis(out, 0, 1).reshape(B, full * C, -1))
        if T > full * C:
            state, out = self.segment(state, x[:, full * C:], query[:, full * C:])
            outputs.append(out)
        out = jnp.concatenate(outputs, axis=1) if len(outputs) > 1 else outputs[0]
        out = out.astype(x.dtype)
        return (out, MACState(state, query_conv)) if return_state else out

    def _segment_from(self, start: MACState, x: jax.Array) -> tuple[jax.Array, MACState]:
        """One segment x [B, C', D] from ``start``: (output, the state after it)."""
        inputs, query_conv = memory_inputs(self.memory.params, x, conv_state=start.query_conv)
        state, out = self.segment(start.memory, x, inputs.query)
        return out, MACState(state, query_conv)

    def prefill(self, x: jax.Array, *, max_length: int | None = None):
        """(output, :class:`MACDecodeState`) of a prompt x [B, T, D]: its complete segments as
        in :meth:`__call__`, the rest kept as the current segment. Token-by-token writes
        only: see :meth:`NeuralMemory.decoding`."""
        del max_length
        self.memory.decoding()
        check_rank("x", x, (3,), "[B, T, D]")
        B, T, D = x.shape
        if T == 0:
            raise ValueError(f"x: expected a prompt of at least one token, got shape {x.shape}")
        C = self.segment_size
        full = T // C * C
        memory = initial_memory_state(self.memory.params, B)
        start = MACState(memory, memory.conv)  # zeros: no history (a fixed state structure)
        outputs = []
        if full:
            out, start = self(x[:, :full], return_state=True)
            outputs.append(out)
        segment = jnp.zeros((B, C, D), x.dtype).at[:, :T - full].set(x[:, full:])
        if T > full:
            outputs.append(self._segment_from(start, segment)[0][:, :T - full])
        out = jnp.concatenate(outputs, axis=1) if len(outputs) > 1 else outputs[0]
        return out.astype(x.dtype), MACDecodeState(start, segment, jnp.int32(T - full))

    def step(self, x: jax.Array, state: MACDecodeState, *, position=None):
        """The next tokens x [B, T, D], one at a time: each recomputes its segment so far
        from the state at the segment's start (O(C) per token, as the segment's attention
        is), and a completed segment becomes the new start. ``position`` is not needed."""
        del position
        if not isinstance(state, MACDecodeState):
            raise ValueError(f"state: expected a MACDecodeState, got {type(state).__name__}")
        check_rank("x", x, (3,), "[B, T, D]")
        B, _, D = state.segment.shape
        check_shape("x", x, (B, x.shape[1], D), "BTD")
        C = self.segment_size

        def token(state: MACDecodeState, x_t):
            segment = lax.dynamic_update_slice_in_dim(state.segment, x_t[:, None], state.count,
                                                      axis=1)
            out, after = self._segment_from(state.start, segment)
            y = lax.dynamic_index_in_dim(out, state.count, axis=1, keepdims=False)
            complete = state.count + 1 == C
            start = jax.tree_util.tree_map(lambda a, b: jnp.where(complete, a, b), after,
                                           state.start)
            return MACDecodeState(start, jnp.where(complete, 0, segment).astype(segment.dtype),
                                  jnp.where(complete, 0, state.count + 1)), y

        state, y = lax.scan(token, state, jnp.moveaxis(x, 1, 0))
        return jnp.moveaxis(y, 0, 1).astype(x.dtype), state
