"""NNX modules for the attention-free mixers of jattn.mixers: convolutions, SSMs, RWKV.

Initialisation follows PyTorch's defaults for Linear and Conv1d (jattn.nn.layers), as in the
Zoology code these modules reproduce.

Every module decodes: ``prefill(x, max_length=...) -> (y, state)`` runs the full causal
forward on a prompt and returns the state, ``step(x, state, position=...) -> (y, state)``
continues it on the next tokens (the interface of :class:`jattn.nn.TransformerLM`). The
states are the last inputs of each convolution (``jattn.mixers.conv_history``; a long
filter keeps ``max_length - 1`` of them) and the recurrent states of the SSMs.

References:
    P24 Zoology (BaseConv; implicit long convolution; Hyena; H3; Mamba; RWKV-4); RWKV,
    "RWKV: Reinventing RNNs for the Transformer Era" (RWKV-4).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from jattn.core.shapes import check_rank, check_shape
from jattn.mixers import conv, selective_scan
from jattn.mixers.h3 import (
    DISCRETIZATIONS,
    DiagonalSSM,
    H3State,
    ShiftSSM,
    h3_prefill,
    h3_ssm,
    h3_step,
)
from jattn.mixers.rwkv import WKVState, token_shift, wkv
from jattn.nn.layers import torch_linear, torch_uniform


class ShortConv(nnx.Module):
    """Causal depthwise convolution with a short kernel (``conv.short_causal_conv``)."""

    def __init__(self, d_model: int, kernel_size: int, *, rngs: nnx.Rngs):
        if kernel_size < 1:
            raise ValueError(f"kernel_size: expected >= 1, got {kernel_size}")
        self.kernel = torch_uniform(rngs, (kernel_size, d_model), kernel_size)
        self.bias = torch_uniform(rngs, (d_model,), kernel_size)

    def __call__(self, x: jax.Array) -> jax.Array:
        return conv.short_causal_conv(x, self.kernel[...], self.bias[...])

    def prefill(self, x: jax.Array, *, max_length: int | None = None):
        """(y, history [B, K - 1, D]) of a prompt; the history does not grow."""
        del max_length
        return self(x), conv.conv_history(x, self.kernel.shape[0] - 1)

    def step(self, x: jax.Array, history: jax.Array, *, position=None):
        """The next tokens: (y, new history)."""
        del position
        y, history = conv.causal_conv_step(x, self.kernel[...][::-1], history)
        return y + self.bias[...].astype(y.dtype), history


class ImplicitFilter(nnx.Module):
    """A long filter [L, d_model] generated from positions (``conv.implicit_filter``).

    The MLP maps ``emb_dim`` positional features through ``num_inner_mlps + 1`` hidden layers
    of width ``order`` (sine activations with one shared, trainable frequency) to ``d_model``
    channels; the result decays exponentially along time. Positions are normalised by
    ``l_max``, so a filter for a shorter input is a prefix of the full one.
    """

    def __init__(self, d_model: int, l_max: int, *, emb_dim: int = 3, order: int = 16,
                 num_inner_mlps: int = 2, frequency: float = 1.0, rngs: nnx.Rngs):
        self.l_max = l_max
        self.emb_dim = emb_dim
        self.w_in = torch_uniform(rngs, (emb_dim, order), emb_dim)
        self.b_in = torch_uniform(rngs, (order,), emb_dim)
        self.w_inner = torch_uniform(rngs, (num_inner_mlps, order, order), order)
        self.b_inner = torch_uniform(rngs, (num_inner_mlps, order), order)
        self.w_out = torch_uniform(rngs, (order, d_model), order)
        self.frequency = nnx.Param(jnp.full((order,), frequency, jnp.float32))

    def __call__(self, length: int) -> jax.Array:
        """The first ``length`` taps, [length, d_model]."""
        if length > self.l_max:
            raise ValueError(f"length: at most l_max={self.l_max}, got {length}")
        z, t = conv.positional_features(self.l_max, self.emb_dim)
        weights = [self.w_in[...], *self.w_inner[...], self.w_out[...]]
        biases = [self.b_in[...], *self.b_inner[...]]
        rates = conv.decay_rates(self.w_out.shape[1])
        return conv.implicit_filter(z[:length], t[:length], weights, biases,
                                    self.frequency[...], rates)


class ImplicitLongConv(nnx.Module):
    """y = long_causal_conv(x, h) + x with h an :class:`ImplicitFilter` (width 16)."""

    def __init__(self, d_model: int, l_max: int, *, rngs: nnx.Rngs):
        self.filter = ImplicitFilter(d_model, l_max, order=16, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return conv.long_causal_conv(x, self.filter(x.shape[1])) + x

    def prefill(self, x: jax.Array, *, max_length: int):
        """(y, history [B, max_length - 1, D]): decoding may reach ``max_length`` tokens."""
        return self(x), conv.conv_history(x, max_length - 1)

    def step(self, x: jax.Array, history: jax.Array, *, position=None):
        """The next tokens: (y, new history)."""
        del position
        y, history = conv.causal_conv_step(x, self.filter(history.shape[1] + 1), history)
        return y + x, history


class HyenaState(NamedTuple):
    """Decoding state of :class:`Hyena`."""

    short: jax.Array  # [B, K - 1, 3 D]: last inputs of the short convolution
    long: jax.Array  # [B, max_length - 1, D]: last gated inputs x1 v of the long convolution


class Hyena(nnx.Module):
    """Hyena as configured in Zoology: in_proj to 3d, short causal conv (k=3), order-2
    gated long convolution (``conv.hyena_mix``) with an implicit filter of width 64, out_proj.

    One deviation: the filter's positional features are fixed (the original trains them with
    a learning rate of 1e-5).
    """

    def __init__(self, d_model: int, l_max: int, *, filter_order: int = 64,
                 short_filter_order: int = 3, rngs: nnx.Rngs):
        self.in_proj = torch_linear(d_model, 3 * d_model, rngs)
        self.short_conv = ShortConv(3 * d_model, short_filter_order, rngs=rngs)
        self.filter = ImplicitFilter(d_model, l_max, order=filter_order, rngs=rngs)
        self.skip = nnx.Param(jax.random.normal(rngs.params(), (d_model,)))
        self.out_proj = torch_linear(d_model, d_model, rngs)

    def __call__(self, u: jax.Array) -> jax.Array:
        x1, x2, v = jnp.split(self.short_conv(self.in_proj(u)), 3, axis=-1)
        return self.out_proj(conv.hyena_mix(x1, x2, v, self.filter(u.shape[1]),
                                            self.skip[...]))

    def prefill(self, u: jax.Array, *, max_length: int):
        """(y, :class:`HyenaState`) of a prompt; decoding may reach ``max_length`` tokens."""
        z = self.in_proj(u)
        x1, x2, v = jnp.split(self.short_conv(z), 3, axis=-1)
        y = self.out_proj(conv.hyena_mix(x1, x2, v, self.filter(u.shape[1]), self.skip[...]))
        short = conv.conv_history(z, self.short_conv.kernel.shape[0] - 1)
        return y, HyenaState(short, conv.conv_history(x1 * v, max_length - 1))

    def step(self, u: jax.Array, state: HyenaState, *, position=None):
        """The next tokens: (y, new state)."""
        del position
        z, short = self.short_conv.step(self.in_proj(u), state.short)
        x1, x2, v = jnp.split(z, 3, axis=-1)
        gated = x1 * v
        long, history = conv.causal_conv_step(gated, self.filter(state.long.shape[1] + 1),
                                              state.long)
        # hyena_mix's formula, with the long convolution continued over its history.
        y = x2 * (long + self.skip[...] * gated)
        return self.out_proj(y), HyenaState(short, history)


class BaseConv(nnx.Module):
    """Zoology's BaseConv: y = conv(u) * Linear(u) + u.

    ``kernel_size`` > 0 gives a short causal depthwise convolution, -1 an implicit long
    convolution over up to ``l_max`` positions.
    """

    def __init__(self, d_model: int, l_max: int, kernel_size: int = 3, *, rngs: nnx.Rngs):
        self.projection = torch_linear(d_model, d_model, rngs)
        if kernel_size == -1:
            self.conv = ImplicitLongConv(d_model, l_max, rngs=rngs)
        elif kernel_size >= 1:
            self.conv = ShortConv(d_model, kernel_size, rngs=rngs)
        else:
            raise ValueError(f"kernel_size: expected -1 (implicit long) or >= 1, "
                             f"got {kernel_size}")

    def __call__(self, u: jax.Array) -> jax.Array:
        return self.conv(u) * self.projection(u) + u

    def prefill(self, u: jax.Array, *, max_length: int):
        """(y, the convolution's history) of a prompt."""
        y, history = self.conv.prefill(u, max_length=max_length)
        return y * self.projection(u) + u, history

    def step(self, u: jax.Array, history: jax.Array, *, position=None):
        """The next tokens: (y, new history)."""
        y, history = self.conv.step(u, history, position=position)
        return y * self.projection(u) + u, history


class RecurrentMixer(nnx.Module):
    """A mixer whose decoding state has a fixed size: a subclass defines
    ``_mix(u, state, return_state) -> (y, new state or None)`` (``state`` None: from the
    start) and gets the full forward, ``prefill`` and ``step`` from it."""

    def __call__(self, u: jax.Array) -> jax.Array:
        return self._mix(u, None, return_state=False)[0]

    def prefill(self, u: jax.Array, *, max_length: int | None = None):
        """(y, state) of a prompt; the state does not grow with the length."""
        del max_length
        return self._mix(u, None, return_state=True)

    def step(self, u: jax.Array, state, *, position=None):
        """The next tokens (one or more): (y, new state)."""
        del position
        return self._mix(u, state, return_state=True)


class MambaState(NamedTuple):
    """Decoding state of :class:`Mamba`."""

    conv: jax.Array  # [B, d_conv - 1, d_inner]: last inputs of the causal convolution
    ssm: jax.Array  # [B, d_inner, d_state]: the selective scan's state (float32 or wider)


class Mamba(RecurrentMixer):
    """Mamba block: in_proj to (x, z), causal conv + SiLU on x, input-dependent (delta, B, C)
    from x, selective scan (``jattn.mixers.selective_scan``), gate by SiLU(z), out_proj; decoding
    (``prefill``/``step``) carries a :class:`MambaState`.

    Initialisation as in Mamba: A = -[1..d_state] per channel (stored as log), D = 1, and
    the dt projection's bias set so that softplus(bias) is log-uniform in [dt_min, dt_max].
    """

    def __init__(self, d_model: int, *, d_state: int = 16, d_conv: int = 4, expand: int = 2,
                 dt_rank: int | None = None, dt_min: float = 1e-3, dt_max: float = 1e-1,
                 rngs: nnx.Rngs):
        d_inner = expand * d_model
        self.dt_rank = math.ceil(d_model / 16) if dt_rank is None else dt_rank
        self.d_state = d_state
        self.in_proj = nnx.Linear(d_model, 2 * d_inner, use_bias=False, rngs=rngs)
        self.conv = ShortConv(d_inner, d_conv, rngs=rngs)
        self.x_proj = nnx.Linear(d_inner, self.dt_rank + 2 * d_state, use_bias=False, rngs=rngs)
        dt = jnp.exp(jax.random.uniform(rngs.params(), (d_inner,), jnp.float32,
                                        math.log(dt_min), math.log(dt_max)))
        dt = jnp.maximum(dt, 1e-4)
        bound = self.dt_rank ** -0.5
        self.dt_proj = nnx.Linear(
            self.dt_rank, d_inner, rngs=rngs,
            kernel_init=lambda key, shape, dtype: jax.random.uniform(key, shape, dtype, -bound,
                                                                     bound),
            bias_init=lambda key, shape, dtype: (dt + jnp.log(-jnp.expm1(-dt))).astype(dtype))
        self.A_log = nnx.Param(jnp.log(jnp.tile(jnp.arange(1, d_state + 1, dtype=jnp.float32),
                                                (d_inner, 1))))
        self.D = nnx.Param(jnp.ones((d_inner,), jnp.float32))
        self.out_proj = nnx.Linear(d_inner, d_model, use_bias=False, rngs=rngs)

    def _mix(self, u, state: MambaState | None, return_state: bool):
        x, z = jnp.split(self.in_proj(u), 2, axis=-1)
        if state is None:
            history = conv.conv_history(x, self.conv.kernel.shape[0] - 1)
            x = self.conv(x)
        else:
            x, history = self.conv.step(x, state.conv)
        x = jax.nn.silu(x)
        dt, B, C = jnp.split(self.x_proj(x), [self.dt_rank, self.dt_rank + self.d_state], axis=-1)
        delta = jax.nn.softplus(self.dt_proj(dt))
        result = selective_scan(x, delta, -jnp.exp(self.A_log[...]), B, C, self.D[...],
                                initial_state=None if state is None else state.ssm,
                                return_state=return_state)
        y, ssm = result if return_state else (result, None)
        y = self.out_proj(y * jax.nn.silu(z))
        return (y, MambaState(history, ssm)) if return_state else (y, None)


class H3(nnx.Module):
    """H3 (``jattn.mixers.h3``): q/k/v projections, shift SSM on k, diagonal SSM on k v^T
    per head, contraction with q, output projection.

    Defaults are Zoology's figure-2 settings: ``head_dim=2`` and ``d_state=l_max`` (the
    original's own defaults are 64 and 1). Initialisation as in the public code: shift SSM
    B = e_1, C uniform(+-1/sqrt(d_state)), skip standard normal per channel; S4D-Lin diagonal
    SSM with d_state // 2 complex modes A = -1/2 + i pi z, B = 1, C complex standard normal,
    log dt uniform in [log dt_min, log dt_max], skip standard normal per head; projections
    like torch.nn.Linear.

    Deviations: the original truncates its kernels to ``l_max`` taps for longer inputs; here
    a longer input is an error. Its output channels come out ordered (head_dim, head) before
    the output projection, here (head, head_dim): a fixed permutation that the output
    projection absorbs (same function class, same initial distribution).
    """

    def __init__(self, d_model: int, l_max: int, *, head_dim: int = 2,
                 d_state: int | None = None, dt_min: float = 1e-3, dt_max: float = 1e-1,
                 discretization: str = "bilinear", rngs: nnx.Rngs):
        if head_dim < 1 or d_model % head_dim:
            raise ValueError(f"head_dim: expected a divisor of d_model={d_model}, "
                             f"got {head_dim}")
        d_state = l_max if d_state is None else d_state
        if d_state < 2:
            raise ValueError(f"d_state: expected >= 2 (d_state // 2 complex modes), "
                             f"got {d_state}")
        if not 0 < dt_min <= dt_max:
            raise ValueError(f"dt_min, dt_max: expected 0 < dt_min <= dt_max, "
                             f"got {dt_min}, {dt_max}")
        if discretization not in DISCRETIZATIONS:
            raise ValueError(f"discretization: expected one of {DISCRETIZATIONS}, "
                             f"got {discretization!r}")
        self.l_max = l_max
        self.head_dim = head_dim
        self.num_heads = heads = d_model // head_dim
        self.discretization = discretization
        modes = d_state // 2
        self.q_proj = torch_linear(d_model, d_model, rngs)
        self.k_proj = torch_linear(d_model, d_model, rngs)
        self.v_proj = torch_linear(d_model, d_model, rngs)
        # torch's kaiming_uniform_(a=sqrt(5)) on C [channels, 1, d_state]: fan_in = d_state.
        self.shift_B = nnx.Param(
            jnp.zeros((heads, head_dim, d_state), jnp.float32).at[..., 0].set(1.0))
        self.shift_C = torch_uniform(rngs, (heads, head_dim, d_state), d_state)
        self.shift_D = nnx.Param(jax.random.normal(rngs.params(), (heads, head_dim)))
        self.log_dt = nnx.Param(jax.random.uniform(
            rngs.params(), (heads,), jnp.float32, math.log(dt_min), math.log(dt_max)))
        self.log_A_real = nnx.Param(jnp.full((heads, modes), math.log(0.5), jnp.float32))
        self.A_imag = nnx.Param(jnp.tile(math.pi * jnp.arange(modes, dtype=jnp.float32),
                                         (heads, 1)))
        self.B = nnx.Param(jnp.zeros((heads, modes, 2), jnp.float32).at[..., 0].set(1.0))
        # A complex standard normal: real and imaginary parts of variance 1/2.
        self.C = nnx.Param(jax.random.normal(rngs.params(), (heads, modes, 2)) * math.sqrt(0.5))
        self.D = nnx.Param(jax.random.normal(rngs.params(), (heads,)))
        self.out_proj = torch_linear(d_model, d_model, rngs)

    def shift_ssm(self) -> ShiftSSM:
        return ShiftSSM(self.shift_B[...], self.shift_C[...], self.shift_D[...])

    def diag_ssm(self) -> DiagonalSSM:
        return DiagonalSSM(self.log_dt[...], self.log_A_real[...], self.A_imag[...],
                           self.B[...], self.C[...], self.D[...])

    def __call__(self, u: jax.Array) -> jax.Array:
        if u.ndim != 3 or u.shape[1] > self.l_max:
            raise ValueError(f"u: expected [B, T <= l_max={self.l_max}, D], got {u.shape}")
        y = h3_ssm(*self._qkv(u), self.shift_ssm(), self.diag_ssm(),
                   discretization=self.discretization)
        return self.out_proj(y.reshape((*u.shape[:2], -1)))

    def prefill(self, u: jax.Array, *, max_length: int | None = None):
        """(y, :class:`jattn.mixers.H3State`) of a prompt (at most ``l_max`` tokens); the
        state does not grow, so decoding may go past ``l_max``."""
        del max_length
        if u.ndim != 3 or u.shape[1] > self.l_max:
            raise ValueError(f"u: expected [B, T <= l_max={self.l_max}, D], got {u.shape}")
        y, state = h3_prefill(*self._qkv(u), self.shift_ssm(), self.diag_ssm(),
                              discretization=self.discretization)
        return self.out_proj(y.reshape((*u.shape[:2], -1))), state

    def step(self, u: jax.Array, state: H3State, *, position=None):
        """The next tokens: (y, new state)."""
        del position
        y, state = h3_step(*self._qkv(u), self.shift_ssm(), self.diag_ssm(), state,
                           discretization=self.discretization)
        return self.out_proj(y.reshape((*u.shape[:2], -1))), state

    def _qkv(self, u: jax.Array):
        heads = (*u.shape[:2], self.num_heads, self.head_dim)
        return tuple(proj(u).reshape(heads) for proj in (self.q_proj, self.k_proj, self.v_proj))


# --------------------------------------------------------------------------------------------
# RWKV-4 time mixing as an NNX module (the "RWKV" mixer of Zoology's figure 2).
#
#     x_prev   = token_shift(x)                          (the previous token; 0 at t = 0)
#     k, v, r  = key(lerp_k), value(lerp_v), receptance(lerp_r),
#                lerp_* = mu_* x + (1 - mu_*) x_prev     (per channel)
#     y        = output(sigmoid(r) * wkv(exp(time_decay), time_first, k, v))
#
# with ``jattn.mixers.rwkv.wkv`` and ``token_shift`` doing the maths.
#
# Initialisation, as RWKV-4's time mixing (and Zoology's copy of it) for layer l of n, with
# r0 = l / (n - 1) (0 when n = 1, where the original divides by zero), r1 = 1 - l / n and
# channels i = 0..d-1:
#
# * mu_k = (i/d)^r1, mu_v = (i/d)^r1 + 0.3 r0, mu_r = (i/d)^(0.5 r1);
# * time_decay_i = -5 + 8 (i/(d-1))^(0.7 + 1.3 r0) (0^p = 0; i/(d-1) is 0 when d = 1);
# * time_first_i = log(0.3) + 0.5 ((i+1) mod 3 - 1): the paper code's "zigzag"
#   0, 0.5, -0.5, 0, 0.5, ... around log 0.3;
# * key, value, receptance, output: linear without bias, initialised like torch.nn.Linear
#   (RWKV-4's own trainer zero-initialises key/receptance/output and makes value orthogonal;
#   the Zoology figure-2 model re-initialises every linear layer with normal(0.02) anyway).


class RWKVState(NamedTuple):
    """Decoding state of :class:`RWKV4TimeMix`."""

    last: jax.Array  # [B, d_model]: the last input token (for the token shift)
    wkv: WKVState  # [B, d_model] each: the WKV running sums (float32 or wider)


def rwkv4_time_mix_init(d_model: int, layer: int, num_layers: int) -> dict[str, jax.Array]:
    """RWKV-4's layer-dependent initial mu_k, mu_v, mu_r, time_decay, time_first ([d_model]
    each, float32); see the module docstring."""
    ratio_0_to_1 = layer / (num_layers - 1) if num_layers > 1 else 0.0
    ratio_1_to_almost0 = 1.0 - layer / num_layers
    i = jnp.arange(d_model, dtype=jnp.float32)
    x = i / d_model
    spread = i / (d_model - 1) if d_model > 1 else jnp.zeros_like(i)
    zigzag = 0.5 * (((jnp.arange(d_model) + 1) % 3) - 1).astype(jnp.float32)
    return {
        "mu_k": x ** ratio_1_to_almost0,
        "mu_v": x ** ratio_1_to_almost0 + 0.3 * ratio_0_to_1,
        "mu_r": x ** (0.5 * ratio_1_to_almost0),
        "time_decay": -5.0 + 8.0 * spread ** (0.7 + 1.3 * ratio_0_to_1),
        "time_first": math.log(0.3) + zigzag,
    }


class RWKV4TimeMix(RecurrentMixer):
    """RWKV-4 time mixing: token-shift lerps, key/value/receptance projections, WKV gated by
    sigmoid(receptance), output projection. Input and output [B, T, d_model]; decoding
    (``prefill``/``step``) carries an :class:`RWKVState`.

    ``implementation`` picks :func:`jattn.mixers.rwkv.wkv`'s ("scan" or "sequential").
    """

    def __init__(self, d_model: int, *, layer: int = 0, num_layers: int = 2,
                 implementation: str = "scan", rngs: nnx.Rngs):
        if d_model < 1:
            raise ValueError(f"d_model: expected >= 1, got {d_model}")
        if num_layers < 1 or not 0 <= layer < num_layers:
            raise ValueError(f"layer, num_layers: expected 0 <= layer < num_layers, "
                             f"got layer={layer}, num_layers={num_layers}")
        self.d_model = d_model
        self.implementation = implementation
        init = rwkv4_time_mix_init(d_model, layer, num_layers)
        self.mu_k = nnx.Param(init["mu_k"])
        self.mu_v = nnx.Param(init["mu_v"])
        self.mu_r = nnx.Param(init["mu_r"])
        self.time_decay = nnx.Param(init["time_decay"])
        self.time_first = nnx.Param(init["time_first"])
        self.key = torch_linear(d_model, d_model, rngs, use_bias=False)
        self.value = torch_linear(d_model, d_model, rngs, use_bias=False)
        self.receptance = torch_linear(d_model, d_model, rngs, use_bias=False)
        self.output = torch_linear(d_model, d_model, rngs, use_bias=False)

    def _mix(self, u: jax.Array, state: RWKVState | None, return_state: bool):
        check_rank("u", u, (3,), "[B, T, d_model]")
        if u.shape[-1] != self.d_model:
            raise ValueError(f"u: expected [B, T, d_model={self.d_model}], got {u.shape}")
        if state is not None:
            check_shape("state.last", state.last, (u.shape[0], self.d_model), "BD")
        shifted = token_shift(u, None if state is None else state.last)

        def lerp(mu):
            mu = mu[...].astype(u.dtype)
            return u * mu + shifted * (1 - mu)

        k = self.key(lerp(self.mu_k))
        v = self.value(lerp(self.mu_v))
        r = self.receptance(lerp(self.mu_r))
        result = wkv(jnp.exp(self.time_decay[...]), self.time_first[...], k, v,
                     implementation=self.implementation,
                     initial_state=None if state is None else state.wkv,
                     return_state=return_state)
        mixed, wkv_state = result if return_state else (result, None)
        y = self.output(jax.nn.sigmoid(r) * mixed)
        return (y, RWKVState(u[:, -1], wkv_state)) if return_state else (y, None)
