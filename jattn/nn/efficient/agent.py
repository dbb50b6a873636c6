"""NNX module for agent attention (``jattn.agent_attention``).

References:
    P74 Agent Attention, "Agent Attention: On the Integration of Softmax and Linear
    Attention".
"""

from __future__ import annotations

import jax
from flax import nnx

from jattn.core.shapes import check_heads
from jattn.efficient.agent import agent_attention
from jattn.nn.layers import torch_linear


class AgentAttention(nnx.Module):
    """Agent attention over [B, T, d_model]: agents pooled from the queries aggregate from the
    keys and values, then broadcast back to the queries (:func:`jattn.agent_attention`).

    Self-attention, or cross-attention when ``__call__`` gets a ``context`` [B, S, d_model].
    With ``max_length`` the module learns the paper's agent biases, one per head, agent and
    position (truncated normal, std 0.02, as the public code), sliced to the input lengths:
    [num_heads, num_agents, max_length] for the aggregation and [num_heads, max_length,
    num_agents] for the broadcast. With ``dwc_kernel_size`` it adds the paper's depthwise
    convolution of the values to the attention output (1-D here; causal padding when
    causal, self-attention only). Linear layers start as torch.nn.Linear does.

    Example:
        >>> import jax.numpy as jnp
        >>> layer = AgentAttention(16, num_heads=2, num_agents=4, rngs=nnx.Rngs(0))
        >>> layer(jnp.ones((1, 10, 16))).shape
        (1, 10, 16)
    """

    def __init__(self, d_model: int, num_heads: int = 1, num_agents: int = 16, *,
                 is_causal: bool = False, max_length: int | None = None,
                 dwc_kernel_size: int | None = None, qkv_bias: bool = True,
                 rngs: nnx.Rngs):
        check_heads(d_model, num_heads)
        if num_agents < 1:
            raise ValueError(f"num_agents: expected a positive int, got {num_agents}")
        if max_length is not None and max_length < 1:
            raise ValueError(f"max_length: expected a positive int or None, got {max_length}")
        if dwc_kernel_size is not None and dwc_kernel_size < 1:
            raise ValueError(f"dwc_kernel_size: expected a positive int or None, "
                             f"got {dwc_kernel_size}")
        self.num_heads = num_heads
        self.num_agents = num_agents
        self.is_causal = is_causal
        self.max_length = max_length
        self.q_proj = torch_linear(d_model, d_model, rngs, use_bias=qkv_bias)
        self.kv_proj = torch_linear(d_model, 2 * d_model, rngs, use_bias=qkv_bias)
        self.out_proj = torch_linear(d_model, d_model, rngs)
        if max_length is None:
            self.agent_key_bias = self.query_agent_bias = nnx.data(None)
        else:
            init = nnx.initializers.truncated_normal(0.02)
            self.agent_key_bias = nnx.Param(
                init(rngs.params(), (num_heads, num_agents, max_length)))
            self.query_agent_bias = nnx.Param(
                init(rngs.params(), (num_heads, max_length, num_agents)))
        self.dwc = nnx.data(None) if dwc_kernel_size is None else nnx.Conv(
            d_model, d_model, kernel_size=(dwc_kernel_size,), feature_group_count=d_model,
            padding="CAUSAL" if is_causal else "SAME", rngs=rngs)

    def __call__(self, x: jax.Array, context: jax.Array | None = None) -> jax.Array:
        """x [B, T, d_model] (and context [B, S, d_model]) -> [B, T, d_model]."""
        B, T, D = x.shape
        source = x if context is None else context
        S = source.shape[1]
        for name, array in (("x", x), ("context", source)):
            if self.max_length is not None and array.shape[1] > self.max_length:
                raise ValueError(f"{name}: expected a length <= max_length="
                                 f"{self.max_length}, got shape {array.shape}")
        if self.dwc is not None and context is not None:
            raise ValueError("context: the depthwise convolution (dwc_kernel_size) needs "
                             f"self-attention, got context {context.shape}")
        q = self.q_proj(x).reshape(B, T, self.num_heads, -1)
        kv = self.kv_proj(source).reshape(B, S, 2, self.num_heads, -1)
        k, v = kv[:, :, 0], kv[:, :, 1]
        biases = {}
        if self.max_length is not None:
            biases = {"agent_key_bias": self.agent_key_bias[:, :, :S],
                      "query_agent_bias": self.query_agent_bias[:, :T]}
        out = agent_attention(q, k, v, num_agents=self.num_agents, is_causal=self.is_causal,
                              **biases).reshape(B, T, D)
        if self.dwc is not None:
            out = out + self.dwc(v.reshape(B, S, D))
        return self.out_proj(out)
