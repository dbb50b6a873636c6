"""Ground truth of the analysis tools (:mod:`jattn.analysis`)."""

from __future__ import annotations

import jax.numpy as jnp


def attention_rollout(attention_maps, *, residual=0.5, head_reduction="mean"):
    """prod_l rownorm((1 - r) reduce_heads(A_l) + r I), the last layer on the left."""
    maps = [jnp.asarray(a) for a in attention_maps]
    dtype = jnp.promote_types(maps[0].dtype, jnp.float32)
    T = maps[0].shape[-1]
    mixed = []
    for a in maps:
        a = a.astype(dtype)
        a = a.mean(1) if head_reduction == "mean" else a.max(1)
        a = (1 - residual) * a + residual * jnp.eye(T, dtype=dtype)
        row = a.sum(-1, keepdims=True)
        mixed.append(a / jnp.where(row == 0, 1, row))
    result = mixed[0]
    for a in mixed[1:]:
        result = jnp.matmul(a, result)
    return result
