"""Attention rollout: how much each output token draws on each input token through a stack
of attention layers, from the layers' attention maps.

References:
    P18 DCAL, "Dual Cross-Attention Learning for Fine-Grained Visual Categorization and
    Object Re-Identification"; Abnar & Zuidema, "Quantifying Attention Flow in Transformers".
"""

from __future__ import annotations

from collections.abc import Sequence

import jax.numpy as jnp

from jattn.core.shapes import Array, accumulation_dtype, check_floating, check_rank

HEAD_REDUCTIONS = ("mean", "max")


def attention_rollout(attention_maps: Array | Sequence[Array], *, residual: float = 0.5,
                      head_reduction: str = "mean") -> Array:
    r"""Attention rollout: the product of the layers' residual-mixed attention maps.

    .. math::
        \bar S_l = \mathrm{rownorm}\big((1 - r)\,\mathrm{reduce}_{heads} A_l + r I\big),
        \qquad \hat S = \bar S_L \bar S_{L-1} \cdots \bar S_1

    DCAL (following Abnar & Zuidema's rollout) accumulates the attention of every layer up to
    the GLCA layer, mixing each map with the identity to account for the residual connection
    (r = 0.5: S-bar = 0.5 S + 0.5 E in DCAL). Rows are re-normalised to sum to 1, which
    matters only for rows that did not sum to 1 (masked queries with nothing to attend to
    become identity rows). Row i of the result says how much token i at the top draws on each
    input token; DCAL reads the CLS row. The maps may come from any attention pattern
    (causal ones give a lower-triangular rollout).

    Args:
        attention_maps: [L, B, N, T, T] (layer 1 first) or a sequence of L arrays
            [B, N, T, T], e.g. from :func:`jattn.attention_weights`.
        residual: r in [0, 1], the weight of the identity (0.5 in DCAL).
        head_reduction: "mean" (DCAL) or "max" over the heads.

    Returns:
        [B, T, T] float32 (float64 for float64 maps).

    Raises:
        ValueError: wrong ranks, non-square maps, an empty stack, r outside [0, 1], an
            unknown head reduction.
        TypeError: non-floating maps.

    >>> import jax.numpy as jnp
    >>> uniform = jnp.full((1, 1, 1, 2, 2), 0.5)           # one layer, one head
    >>> attention_rollout(uniform)[0].tolist()             # 0.5 * uniform + 0.5 * I
    [[0.75, 0.25], [0.25, 0.75]]

    References:
        P18 DCAL, "Dual Cross-Attention Learning for Fine-Grained Visual Categorization and
        Object Re-Identification" (attention rollout for GLCA); Abnar & Zuidema,
        "Quantifying Attention Flow in Transformers".
    """
    if not isinstance(attention_maps, Sequence):
        attention_maps = jnp.asarray(attention_maps)
        check_rank("attention_maps", attention_maps, (5,), "[L, B, N, T, T]")
        maps = [attention_maps[i] for i in range(attention_maps.shape[0])]
    else:
        maps = [jnp.asarray(a) for a in attention_maps]
        for i, a in enumerate(maps):
            check_rank(f"attention_maps[{i}]", a, (4,), "[B, N, T, T]")
    if not maps:
        raise ValueError("attention_maps: expected at least one layer, got none")
    shape = maps[0].shape
    for i, a in enumerate(maps):
        check_floating(f"attention_maps[{i}]", a)
        if a.shape != shape or a.shape[-1] != a.shape[-2]:
            raise ValueError(f"attention_maps[{i}]: expected square maps of one shape "
                             f"[B, N, T, T] = {shape}, got {a.shape}")
    if not 0.0 <= residual <= 1.0:
        raise ValueError(f"residual: expected a number in [0, 1], got {residual!r}")
    if head_reduction not in HEAD_REDUCTIONS:
        raise ValueError(f"head_reduction: expected one of {HEAD_REDUCTIONS}, "
                         f"got {head_reduction!r}")
    dtype = accumulation_dtype(maps[0].dtype)
    eye = jnp.eye(shape[-1], dtype=dtype)
    rollout = None
    for a in maps:
        a = a.astype(dtype)
        a = a.mean(1) if head_reduction == "mean" else a.max(1)
        a = (1.0 - residual) * a + residual * eye
        total = a.sum(-1, keepdims=True)
        a = a / jnp.where(total > 0, total, 1)
        rollout = a if rollout is None else jnp.einsum("bij,bjk->bik", a, rollout)
    return rollout
