"""A jattn.nn.TransformerLM written out in NumPy float64 from its parameters, with the
places an intervention can change: the independent reference of the circuit tools' tests.

Supports the configuration the tests build: learned positions, LayerNorm, GELU MLP, causal
softmax attention without window or RoPE, tied embeddings, no dropout.
"""

from __future__ import annotations

import numpy as np


def _p(v) -> np.ndarray:
    return np.asarray(v[...], np.float64)


def _layernorm(x, norm):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + norm.epsilon) * _p(norm.scale) + _p(norm.bias)


def _linear(x, layer):
    y = x @ _p(layer.kernel)
    return y if layer.bias is None else y + _p(layer.bias)


def _gelu(x):
    return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)))


def softmax_attention(q, k, v):
    """Causal attention of [B, T, N, H] heads (K = Kv = N here): per-head outputs and
    weights [B, N, T, S]."""
    T, H = q.shape[1], q.shape[-1]
    logits = np.einsum("btnh,bsnh->bnts", q, k) / np.sqrt(H)
    logits = np.where(np.tril(np.ones((T, T), bool)), logits, -np.inf)
    w = np.exp(logits - logits.max(-1, keepdims=True))
    w /= w.sum(-1, keepdims=True)
    return np.einsum("bnts,bsnh->btnh", w, v), w


def forward(lm, tokens, edit=None):
    """Logits [B, T, V] and every layer's tensors {layer: {name: array}}; ``edit(layer,
    name, array) -> array`` may change "query", "key", "value", "heads", "residual",
    "attention" and "mlp" where the model computes them."""
    edit = edit or (lambda layer, name, x: x)
    tokens = np.asarray(tokens)
    T = tokens.shape[1]
    x = _p(lm.embed.tokens.embedding)[tokens] + _p(lm.embed.learned.table)[:T]
    record = {}
    for i, block in enumerate(lm.blocks):
        rec = record[i] = {}
        x = rec["residual"] = edit(i, "residual", x)
        attn = block.mixer
        proj = attn.proj
        h = _linear(_layernorm(x, block.mixer_norm), proj.qkv_proj)
        wq, wk, _ = proj.widths
        q, k, v = np.split(h, [wq, wq + wk], axis=-1)
        N, H = proj.num_heads, proj.head_dim
        q, k, v = (a.reshape(*a.shape[:2], -1, H) for a in (q, k, v))
        q, k, v = (edit(i, n, a) for n, a in (("query", q), ("key", k), ("value", v)))
        rec.update(query=q, key=k, value=v)
        heads, rec["weights"] = softmax_attention(q, k, v)
        heads = rec["heads"] = edit(i, "heads", heads)
        branch = _linear(heads.reshape(*heads.shape[:2], N * H), attn.out_proj)
        branch = rec["attention"] = edit(i, "attention", branch)
        x = x + branch
        mlp = block.mlp
        m = _linear(_gelu(_linear(_layernorm(x, block.mlp_norm), mlp.up)), mlp.down)
        m = rec["mlp"] = edit(i, "mlp", m)
        x = x + m
    record[len(lm.blocks)] = {"residual": x}
    logits = _layernorm(x, lm.final_norm) @ _p(lm.embed.tokens.embedding).T
    return logits, record
