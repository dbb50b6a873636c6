"""NNX modules for input-dependent sparse attention (``jattn.efficient.sparse``).

References:
    P24 Zoology (input-dependent sparse attention; ``SelectiveLookups`` and
    ``SigmoidLookups`` in its public code).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jattn.core.attention import dot_product_attention
from jattn.core.shapes import check_heads
from jattn.efficient.sparse import (
    ACTIVATIONS,
    selection_penalty,
    selection_weights,
    selective_lookup,
    topk_attention,
)
from jattn.nn.layers import torch_linear


class SelectionPenalty(nnx.Variable):
    """The auxiliary loss of the last training call of a :class:`SelectiveLookups` layer."""


class SparseAttention(nnx.Module):
    """Top-k attention (``jattn.topk_attention``): each query attends to its ``top_k``
    best-scoring allowed keys (None: ceil(sqrt(T)) for an input of length T).

    A fused qkv projection and an output projection, both with biases and initialised like
    torch.nn.Linear (as Zoology's attention mixer).
    """

    def __init__(self, d_model: int, num_heads: int = 1, top_k: int | None = None, *,
                 is_causal: bool = True, rngs: nnx.Rngs):
        check_heads(d_model, num_heads)
        if top_k is not None and top_k < 1:
            raise ValueError(f"top_k: expected a positive int or None, got {top_k}")
        self.num_heads = num_heads
        self.top_k = top_k
        self.is_causal = is_causal
        self.qkv_proj = torch_linear(d_model, 3 * d_model, rngs)
        self.out_proj = torch_linear(d_model, d_model, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        B, T, d = x.shape
        q, k, v = (self.qkv_proj(x).reshape(B, T, 3, self.num_heads, -1)[:, :, i]
                   for i in range(3))
        y = topk_attention(q, k, v, top_k=self.top_k, is_causal=self.is_causal)
        return self.out_proj(y.reshape(B, T, d))


class SelectiveLookups(nnx.Module):
    """Zoology's learned input-dependent sparse attention (``selective_lookup`` of
    :mod:`jattn.efficient.sparse`).

    y = x + s * out_proj(causal_attention(qkv_proj(x))), with s a learned selection weight
    per position (a linear map of x to one logit, then a softmax over the sequence or a
    sigmoid). In training mode (``deterministic=False``, nnx's ``.train()``) every position
    is updated; in evaluation mode (``.eval()``) only the ``num_lookups`` (default
    ceil(sqrt(T))) positions with the largest s. With ``activation="sigmoid"`` each training
    call stores the auxiliary loss ``jattn.efficient.sparse.selection_penalty`` in
    ``self.auxiliary_loss`` (a :class:`SelectionPenalty` variable, 0 otherwise), to be added
    to the training loss (read it inside the differentiated function, e.g. through
    ``nnx.state(model, SelectionPenalty)``).

    As in the public code the mixer adds its own input (the residual is inside), and the
    softmax selection and the evaluation-time top-k look at the whole sequence, so they are
    not causal. Attention dropout uses the ``dropout`` stream of ``rngs`` (the public
    configs use 0.1).
    """

    def __init__(self, d_model: int, num_heads: int = 1, *, activation: str = "softmax",
                 num_lookups: int | None = None, penalty: float = 1e-3,
                 dropout_rate: float = 0.0, deterministic: bool = False, rngs: nnx.Rngs):
        check_heads(d_model, num_heads)
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation: expected one of {ACTIVATIONS}, got {activation!r}")
        self.num_heads = num_heads
        self.activation = activation
        self.num_lookups = num_lookups
        self.penalty = penalty
        self.dropout_rate = dropout_rate
        self.deterministic = deterministic
        self.qkv_proj = torch_linear(d_model, 3 * d_model, rngs)
        # SelectiveLookups has a bias on its selection logit, SigmoidLookups none.
        self.selecting = torch_linear(d_model, 1, rngs, use_bias=activation == "softmax")
        self.out_proj = torch_linear(d_model, d_model, rngs)
        self.rngs = rngs["dropout"].fork() if dropout_rate > 0 else nnx.data(None)
        self.auxiliary_loss = SelectionPenalty(jnp.zeros((), jnp.float32))

    def __call__(self, x: jax.Array) -> jax.Array:
        B, T, d = x.shape
        q, k, v = (self.qkv_proj(x).reshape(B, T, 3, self.num_heads, -1)[:, :, i]
                   for i in range(3))
        dropout = self.dropout_rate if not self.deterministic else 0.0
        context = dot_product_attention(
            q, k, v, is_causal=True, dropout_rate=dropout,
            dropout_rng=self.rngs() if dropout > 0 else None)
        attended = self.out_proj(context.reshape(B, T, d))
        selection = selection_weights(self.selecting(x)[..., 0], activation=self.activation)
        penalty = jnp.zeros((), jnp.float32)
        if not self.deterministic and self.activation == "sigmoid":
            penalty = selection_penalty(selection, num_lookups=self.num_lookups,
                                        weight=self.penalty)
        self.auxiliary_loss[...] = penalty
        return selective_lookup(x, attended, selection, top_k=self.num_lookups,
                                select=self.deterministic)
