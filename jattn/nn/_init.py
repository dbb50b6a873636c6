"""Shared pieces of the NNX modules: PyTorch's default initialisations (for modules that
reproduce PyTorch code, Zoology) and the check of a head layout.

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


def check_heads(d_model: int, num_heads: int, num_kv_heads: int | None = None) -> int:
    """Validate a head layout; return the number of key/value heads (default: num_heads).

    Raises:
        ValueError: num_heads not a divisor of d_model, or num_kv_heads not of num_heads.
    """
    if num_heads < 1 or d_model % num_heads:
        raise ValueError(f"num_heads: expected a divisor of d_model={d_model}, got {num_heads}")
    num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
    if num_kv_heads < 1 or num_heads % num_kv_heads:
        raise ValueError(f"num_kv_heads: expected a divisor of num_heads={num_heads}, "
                         f"got {num_kv_heads}")
    return num_kv_heads
