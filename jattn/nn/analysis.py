"""Circuit analysis of a :class:`jattn.nn.TransformerLM`: the pieces of
:mod:`jattn.analysis.circuits` that need the model's own weights (each head's slice of the
output projection, the final norm, the unembedding).

References:
    P25 (direct logit attribution per head, the final norm's scale frozen).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from jattn.analysis.circuits import direct_logit_attribution
from jattn.analysis.intervene import Capture, Intervention
from jattn.nn.attention import MultiHeadAttention
from jattn.nn.transformer import TransformerLM


def head_outputs_in_stream(attention: MultiHeadAttention, heads: jax.Array) -> jax.Array:
    """What each head adds to the residual stream: its output [..., N, Hv] times its slice
    of the output projection, [..., N, d_model] (the projection's bias is not in it)."""
    kernel = attention.out_proj.kernel[...]
    N, Hv = heads.shape[-2:]
    return jnp.einsum("...nh,nhd->...nd", heads, kernel.reshape(N, Hv, -1))


def _unembedding(model: TransformerLM) -> jax.Array:
    if model.head is None:
        return model.embed.tokens.embedding[...].T
    return model.head.kernel[...]


def logit_attribution(model: TransformerLM, tokens: jax.Array, *,
                      positions: Sequence[int]) -> dict[str, jax.Array]:
    """Direct logit attribution of every head of every layer, and of the rest of the stream.

    The residual stream entering the final norm at ``positions`` is split into the
    embedding, each head's projected output, each layer's output-projection bias (with the
    layer's non-attention mixer if it has one) and MLP, and the final norm's bias. Each
    part's logits are taken through the norm with its scale frozen
    (:func:`jattn.analysis.circuits.direct_logit_attribution`); the parts sum to the model's
    logits (dropout off).

    Args:
        model: a TransformerLM (attention layers get per-head entries; other mixers one
            entry in "layers").
        tokens: int [B, T].
        positions: the query positions to explain.

    Returns:
        {"heads": [B, P, L, N, V] (0 for layers without heads), "layers": [B, P, L, 2, V]
        (the layer's non-head attention part, its MLP), "embedding": [B, P, V], "bias":
        [B, P, V] (the final norm's bias), "logits": [B, P, V] (the model's own)}.

    References:
        P25.
    """
    L = len(model.blocks)
    positions = tuple(int(p) for p in positions)
    capture = Capture(("heads", "attention", "mlp", "residual"), query_positions=positions)
    blocks = list(model.blocks)
    per_head = {i for i, b in enumerate(blocks) if isinstance(b.mixer, MultiHeadAttention)}
    if not per_head:
        raise ValueError("model: no softmax attention layer to attribute to heads")
    N = max(blocks[i].mixer.num_heads for i in per_head)
    logits, captures = model(tokens, intervention=Intervention(capture=capture))
    final = captures[L]["residual"]  # [B, P, d]
    B, P, d = final.shape
    heads = jnp.zeros((B, P, L, N, d), jnp.float32)
    layer_parts = []
    for i, block in enumerate(blocks):
        branch = captures[i]["attention"]
        if i in per_head:
            stream = head_outputs_in_stream(block.mixer, captures[i]["heads"])
            heads = heads.at[:, :, i, :stream.shape[-2]].set(stream)
            branch = branch - stream.sum(-2)
        layer_parts.append(jnp.stack([branch, captures[i]["mlp"]], axis=-2))
    components = jnp.concatenate([heads.reshape(B, P, L * N, d),
                                  jnp.stack(layer_parts, 2).reshape(B, P, 2 * L, d),
                                  captures[0]["residual"][:, :, None]], axis=2)
    norm = model.final_norm
    kind = "layernorm" if isinstance(norm, nnx.LayerNorm) else "rmsnorm"
    unembed = _unembedding(model)
    parts = direct_logit_attribution(components, final, unembed, norm=kind,
                                     norm_scale=norm.scale[...], epsilon=norm.epsilon)
    bias = (jnp.zeros((B, P, unembed.shape[1])) if getattr(norm, "bias", None) is None
            else jnp.broadcast_to(norm.bias[...] @ unembed, (B, P, unembed.shape[1])))
    V = unembed.shape[1]
    return {"heads": parts[:, :, :L * N].reshape(B, P, L, N, V),
            "layers": parts[:, :, L * N:L * N + 2 * L].reshape(B, P, L, 2, V),
            "embedding": parts[:, :, -1], "bias": bias,
            "logits": jnp.take(logits, jnp.asarray(positions), axis=1)}
