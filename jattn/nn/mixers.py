"""NNX modules for the convolutional mixers of jattn.mixers.

Initialisation follows PyTorch's defaults for Linear and Conv1d (uniform in
+-1/sqrt(fan_in)), as in the Zoology code these modules reproduce; models that re-initialise
(the Zoology figure-2 model does) overwrite it.

References:
    P24 Zoology (BaseConv; implicit long convolution; Hyena; Mamba).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from jattn.mixers import conv, selective_scan


def _uniform(rngs: nnx.Rngs, shape: tuple[int, ...], fan_in: int) -> nnx.Param:
    bound = 1.0 / math.sqrt(fan_in)
    return nnx.Param(jax.random.uniform(rngs.params(), shape, jnp.float32, -bound, bound))


def _torch_linear(d_in: int, d_out: int, rngs: nnx.Rngs) -> nnx.Linear:
    """nnx.Linear initialised like torch.nn.Linear: weight and bias uniform(+-1/sqrt(d_in))."""
    bound = 1.0 / math.sqrt(d_in)
    return nnx.Linear(
        d_in, d_out, rngs=rngs,
        kernel_init=nnx.initializers.variance_scaling(1 / 3, "fan_in", "uniform"),
        bias_init=lambda key, shape, dtype: jax.random.uniform(key, shape, dtype, -bound, bound))


class ShortConv(nnx.Module):
    """Causal depthwise convolution with a short kernel (``conv.short_causal_conv``)."""

    def __init__(self, d_model: int, kernel_size: int, *, rngs: nnx.Rngs):
        if kernel_size < 1:
            raise ValueError(f"kernel_size: expected >= 1, got {kernel_size}")
        self.kernel = _uniform(rngs, (kernel_size, d_model), kernel_size)
        self.bias = _uniform(rngs, (d_model,), kernel_size)

    def __call__(self, x: jax.Array) -> jax.Array:
        return conv.short_causal_conv(x, self.kernel[...], self.bias[...])


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
        self.w_in = _uniform(rngs, (emb_dim, order), emb_dim)
        self.b_in = _uniform(rngs, (order,), emb_dim)
        self.w_inner = _uniform(rngs, (num_inner_mlps, order, order), order)
        self.b_inner = _uniform(rngs, (num_inner_mlps, order), order)
        self.w_out = _uniform(rngs, (order, d_model), order)
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
    """y = fft_causal_conv(x, h) + x with h an :class:`ImplicitFilter` (width 16)."""

    def __init__(self, d_model: int, l_max: int, *, rngs: nnx.Rngs):
        self.filter = ImplicitFilter(d_model, l_max, order=16, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return conv.fft_causal_conv(x, self.filter(x.shape[1])) + x


class Hyena(nnx.Module):
    """Hyena as configured in Zoology: in_proj to 3d, short causal conv (k=3), order-2
    gated long convolution (``conv.hyena_mix``) with an implicit filter of width 64, out_proj.

    One deviation: the filter's positional features are fixed (the original trains them with
    a learning rate of 1e-5).
    """

    def __init__(self, d_model: int, l_max: int, *, filter_order: int = 64,
                 short_filter_order: int = 3, rngs: nnx.Rngs):
        self.in_proj = _torch_linear(d_model, 3 * d_model, rngs)
        self.short_conv = ShortConv(3 * d_model, short_filter_order, rngs=rngs)
        self.filter = ImplicitFilter(d_model, l_max, order=filter_order, rngs=rngs)
        self.skip = nnx.Param(jax.random.normal(rngs.params(), (d_model,)))
        self.out_proj = _torch_linear(d_model, d_model, rngs)

    def __call__(self, u: jax.Array) -> jax.Array:
        x1, x2, v = jnp.split(self.short_conv(self.in_proj(u)), 3, axis=-1)
        return self.out_proj(conv.hyena_mix(x1, x2, v, self.filter(u.shape[1]),
                                            self.skip[...]))


class BaseConv(nnx.Module):
    """Zoology's BaseConv: y = conv(u) * Linear(u) + u.

    ``kernel_size`` > 0 gives a short causal depthwise convolution, -1 an implicit long
    convolution over up to ``l_max`` positions.
    """

    def __init__(self, d_model: int, l_max: int, kernel_size: int = 3, *, rngs: nnx.Rngs):
        self.projection = _torch_linear(d_model, d_model, rngs)
        if kernel_size == -1:
            self.conv = ImplicitLongConv(d_model, l_max, rngs=rngs)
        elif kernel_size >= 1:
            self.conv = ShortConv(d_model, kernel_size, rngs=rngs)
        else:
            raise ValueError(f"kernel_size: expected -1 (implicit long) or >= 1, "
                             f"got {kernel_size}")

    def __call__(self, u: jax.Array) -> jax.Array:
        return self.conv(u) * self.projection(u) + u


class Mamba(nnx.Module):
    """Mamba block: in_proj to (x, z), causal conv + SiLU on x, input-dependent (delta, B, C)
    from x, selective scan (``jattn.mixers.selective_scan``), gate by SiLU(z), out_proj.

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

    def __call__(self, u: jax.Array) -> jax.Array:
        x, z = jnp.split(self.in_proj(u), 2, axis=-1)
        x = jax.nn.silu(self.conv(x))
        dt, B, C = jnp.split(self.x_proj(x), [self.dt_rank, self.dt_rank + self.d_state], axis=-1)
        delta = jax.nn.softplus(self.dt_proj(dt))
        y = selective_scan(x, delta, -jnp.exp(self.A_log[...]), B, C, self.D[...])
        return self.out_proj(y * jax.nn.silu(z))
