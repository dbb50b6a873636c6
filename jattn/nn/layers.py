"""The building blocks every NNX module of jattn makes its layers from: PyTorch's default
initialisations (for modules that reproduce PyTorch code, Zoology), the query/key/value
projection of every head layout (MHA, GQA, MQA, DiffQKV) and the feed-forward MLP. (The
check of a head layout, ``check_heads``, is in :mod:`jattn.core.shapes` with the others.)

torch.nn.Linear and torch.nn.Conv1d draw weights and biases uniformly in +-1/sqrt(fan_in).
Models that re-initialise (the Zoology figure-2 model does) overwrite these.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from jattn.core.shapes import check_heads


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


class QKVProjection(nnx.Module):
    """Query, key and value heads of [B, T, d_model] inputs, one fused kernel.

    ``num_heads`` query heads and ``num_kv_heads`` key heads of ``head_dim``;
    ``num_value_heads`` value heads of ``value_head_dim`` (both default to the keys'). Fewer
    key/value heads than query heads is GQA (one: MQA); separate key and value counts and
    dims is DiffQKV (P68), e.g. Sigma's 32 query, 4 key and 16 value heads. Nothing is
    repeated: the attention functions map query head n to key head n // (N / K) and value
    head n // (N / Kv).

    ``query_mlp_dim`` adds Sigma's augmented Q, read from the paper's code listing as a gated
    MLP on the projected query before it is split into heads,
    q = W_down(silu(W_gate q0) * (W_up q0)) with W_gate, W_up: [N H, query_mlp_dim] and
    W_down: [query_mlp_dim, N H] (Sigma uses 1.5 d_model); the query head dim is unchanged,
    so the dot product with the keys is the usual one. Linear layers start as torch.nn.Linear
    does; the query MLP has no biases.

    Example:
        >>> import jax.numpy as jnp
        >>> from flax import nnx
        >>> proj = QKVProjection(32, 8, num_kv_heads=1, num_value_heads=4, rngs=nnx.Rngs(0))
        >>> [a.shape for a in proj(jnp.ones((2, 5, 32)))]
        [(2, 5, 8, 4), (2, 5, 1, 4), (2, 5, 4, 4)]
    """

    def __init__(self, d_model: int, num_heads: int, *, head_dim: int | None = None,
                 num_kv_heads: int | None = None, num_value_heads: int | None = None,
                 value_head_dim: int | None = None, query_mlp_dim: int | None = None,
                 use_bias: bool = True, rngs: nnx.Rngs):
        if head_dim is None:
            check_heads(d_model, num_heads)
            head_dim = d_model // num_heads
        self.num_heads = num_heads
        self.num_kv_heads = check_heads(num_heads, num_heads, num_kv_heads)
        self.num_value_heads = self.num_kv_heads if num_value_heads is None else num_value_heads
        if self.num_value_heads < 1 or num_heads % self.num_value_heads:
            raise ValueError(f"num_value_heads: expected a divisor of num_heads={num_heads}, "
                             f"got {num_value_heads}")
        self.head_dim = head_dim
        self.value_head_dim = head_dim if value_head_dim is None else value_head_dim
        for name, size in (("head_dim", self.head_dim), ("value_head_dim", self.value_head_dim),
                           ("query_mlp_dim", query_mlp_dim or 1)):
            if size < 1:
                raise ValueError(f"{name}: expected >= 1, got {size}")
        self.widths = (num_heads * head_dim, self.num_kv_heads * head_dim,
                       self.num_value_heads * self.value_head_dim)
        self.qkv_proj = torch_linear(d_model, sum(self.widths), rngs, use_bias=use_bias)
        self.query_mlp = nnx.data(None)
        if query_mlp_dim is not None:
            width = self.widths[0]
            self.query_mlp = nnx.List([
                torch_linear(width, query_mlp_dim, rngs, use_bias=False),  # gate
                torch_linear(width, query_mlp_dim, rngs, use_bias=False),  # up
                torch_linear(query_mlp_dim, width, rngs, use_bias=False)])  # down

    def __call__(self, x: jax.Array, context: jax.Array | None = None
                 ) -> tuple[jax.Array, jax.Array, jax.Array]:
        """x [B, T, d_model] (and ``context`` [B, S, d_model] for cross attention: keys and
        values come from it) -> query [B, T, N, H], key [B, S, K, H], value [B, S, Kv, Hv]."""
        wq, wk, _ = self.widths
        if context is None:
            q, k, v = jnp.split(self.qkv_proj(x), [wq, wq + wk], axis=-1)
        else:
            kernel = self.qkv_proj.kernel[...]
            bias = (jnp.zeros(kernel.shape[1]) if self.qkv_proj.bias is None
                    else self.qkv_proj.bias[...])
            q = x @ kernel[:, :wq] + bias[:wq]
            k, v = jnp.split(context @ kernel[:, wq:] + bias[wq:], [wk], axis=-1)
        if self.query_mlp is not None:
            gate, up, down = self.query_mlp
            q = down(jax.nn.silu(gate(q)) * up(q))
        return (q.reshape(*q.shape[:-1], self.num_heads, self.head_dim),
                k.reshape(*k.shape[:-1], self.num_kv_heads, self.head_dim),
                v.reshape(*v.shape[:-1], self.num_value_heads, self.value_head_dim))


MLPS = ("gelu", "swiglu")


class MLP(nnx.Module):
    """The feed-forward half of a block: GELU MLP d -> hidden -> d, or SwiGLU
    W_down(silu(W_gate x) * W_up x)."""

    def __init__(self, d_model: int, hidden: int, *, kind: str = "gelu", rngs: nnx.Rngs):
        if kind not in MLPS:
            raise ValueError(f"mlp: expected one of {MLPS}, got {kind!r}")
        self.kind = kind
        self.up = nnx.Linear(d_model, hidden, rngs=rngs)
        self.gate = (nnx.Linear(d_model, hidden, rngs=rngs) if kind == "swiglu"
                     else nnx.data(None))
        self.down = nnx.Linear(hidden, d_model, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        if self.kind == "gelu":
            return self.down(jax.nn.gelu(self.up(x)))
        return self.down(jax.nn.silu(self.gate(x)) * self.up(x))
