"""PyTorch's default initialisations, for modules that reproduce PyTorch code (Zoology).

torch.nn.Linear and torch.nn.Conv1d draw weights and biases uniformly in +-1/sqrt(fan_in).
Models that re-initialise (the Zoology figure-2 model does) overwrite these.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx


def torch_uniform(rngs: nnx.Rngs, shape: tuple[int, ...], fan_in: int) -> nnx.Param:
    """A parameter uniform in +-1/sqrt(fan_in)."""
    bound = 1.0 / math.sqrt(fan_in)
    return nnx.Param(jax.random.uniform(rngs.params(), shape, jnp.float32, -bound, bound))


def torch_linear(d_in: int, d_out: int, rngs: nnx.Rngs, *, use_bias: bool = True) -> nnx.Linear:
    """nnx.Linear initialised like torch.nn.Linear: weight and bias uniform(+-1/sqrt(d_in))."""
    bound = 1.0 / math.sqrt(d_in)
    return nnx.Linear(
        d_in, d_out, use_bias=use_bias, rngs=rngs,
        kernel_init=nnx.initializers.variance_scaling(1 / 3, "fan_in", "uniform"),
        bias_init=lambda key, shape, dtype: jax.random.uniform(key, shape, dtype, -bound, bound))
