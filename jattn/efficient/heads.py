"""Head structures: mixture-of-heads routing (P19) and relative attention (P16).

Mixture-of-heads (MoH) treats attention heads as experts. A layer with N heads has
``Ns`` shared heads, always on, and ``Nr = N - Ns`` routed heads, of which each token keeps
its ``top_k`` best. The output is a weighted sum of the heads' projected outputs,
y_t = sum_i g_{t,i} O_{t,i} W_O^i, instead of multi-head attention's plain sum.

Relative attention scores query t against key s by content and by their distance
p_t - s: Transformer-XL's (q + u) . k + (q + v) . r_{p_t - s} (RMHA) and RCMHA's learned
table form (q + u) . k + q . r_{p_t - s} + b_{p_t - s}.

References:
    P19 MoH, "MoH: Multi-Head Attention as Mixture-of-Head Attention".
    P16 RCMHA, "RCMHA: Relative Convolutional Multi-Head Attention for Natural Language
    Modelling".
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from jattn.core import masks
from jattn.core.attention import dot_product_attention
from jattn.core.positions import relative_logits
from jattn.core.shapes import (
    Array,
    accumulation_dtype,
    check_floating,
    check_qkv,
    check_rank,
    check_shape,
)

FORMS = ("dense", "dispatch")


class HeadRouting(NamedTuple):
    """Per-token head weights of a mixture-of-heads layer (shared heads first)."""

    gates: Array  # [B, T, N] float32 (float64 for float64 logits); 0 for unselected heads
    routed_index: Array  # [B, T, top_k] int32, the selected routed heads (0 .. Nr - 1)
    routed_probs: Array  # [B, T, Nr] as gates, softmax over the routed heads (before top-k)
    load_balance_loss: Array  # [] as gates


def route_heads(routed_logits: Array, *, top_k: int, shared_logits: Array | None = None,
                mix_logits: Array | None = None) -> HeadRouting:
    r"""Mixture-of-heads gates from router logits.

    .. math::
        g_{t,i} = \alpha_{t,1}\,\mathrm{softmax}(s_t)_i \ (i < N_s),\qquad
        g_{t,N_s+j} = \alpha_{t,2}\,\mathrm{softmax}(r_t)_j\,
            [j \in \mathrm{top}_k(r_t)],\qquad
        \alpha_t = \mathrm{softmax}(m_t)

    and the load-balancing loss over the routed heads and all B T tokens,
    :math:`L_b = \sum_j f_j P_j`, with :math:`f_j` the fraction of tokens that select head j
    and :math:`P_j` the mean of :math:`\mathrm{softmax}(r_t)_j`. The softmax of the routed
    heads runs over all of them, before the top-k. Without shared heads ``alpha_2 = 1``.
    Ties go to the lower head index.

    Args:
        routed_logits: [B, T, Nr], the routed heads' router scores r_t = x_t W_r.
        top_k: routed heads kept per token, 1 <= top_k <= Nr.
        shared_logits: [B, T, Ns] (s_t = x_t W_s), or None for no shared heads.
        mix_logits: [B, T, 2] (m_t = x_t W_h), required with shared heads.

    Returns:
        :class:`HeadRouting` with gates [B, T, Ns + Nr] in float32 (float64 for float64 logits).

    Raises:
        TypeError: non-floating logits.
        ValueError: mismatched shapes, top_k out of range, ``mix_logits`` missing with shared
            heads or given without them.

    Example:
        >>> import jax.numpy as jnp, jattn
        >>> r = jattn.route_heads(jnp.array([[[0.0, 2.0, 1.0]]]), top_k=2)
        >>> r.routed_index.tolist(), (r.gates > 0).tolist()
        ([[[1, 2]]], [[[False, True, True]]])

    References:
        P19 MoH, "MoH: Multi-Head Attention as Mixture-of-Head Attention".
    """
    routed_logits = jnp.asarray(routed_logits)
    check_rank("routed_logits", routed_logits, (3,), "[B, T, Nr]")
    check_floating("routed_logits", routed_logits)
    B, T, Nr = routed_logits.shape
    if not 1 <= top_k <= Nr:
        raise ValueError(f"top_k: expected 1 <= top_k <= Nr={Nr}, got {top_k}")
    if (shared_logits is None) != (mix_logits is None):
        raise ValueError("shared_logits, mix_logits: give both (shared heads) or neither")
    acc = accumulation_dtype(routed_logits.dtype)
    probs = jax.nn.softmax(routed_logits.astype(acc), axis=-1)
    _, index = jax.lax.top_k(probs, top_k)
    chosen = jax.nn.one_hot(index, Nr, dtype=acc).sum(-2)  # [B, T, Nr]
    routed = probs * chosen
    if shared_logits is None:
        gates = routed
    else:
        shared_logits, mix_logits = jnp.asarray(shared_logits), jnp.asarray(mix_logits)
        check_rank("shared_logits", shared_logits, (3,), "[B, T, Ns]")
        check_floating("shared_logits", shared_logits)
        check_shape("shared_logits", shared_logits, (B, T, shared_logits.shape[-1]), "BTN")
        check_floating("mix_logits", mix_logits)
        check_shape("mix_logits", mix_logits, (B, T, 2), "BT2")
        alpha = jax.nn.softmax(mix_logits.astype(acc), axis=-1)
        shared = jax.nn.softmax(shared_logits.astype(acc), axis=-1)
        gates = jnp.concatenate([alpha[..., :1] * shared, alpha[..., 1:] * routed], axis=-1)
    f = jax.lax.stop_gradient(chosen).mean((0, 1))
    loss = jnp.sum(f * probs.mean((0, 1)))
    return HeadRouting(gates, index.astype(jnp.int32), probs, loss)


def capacity(T: int, num_routed: int, top_k: int, capacity_factor: float | None) -> int:
    """Tokens each routed head takes per sequence in the "dispatch" form: T when
    ``capacity_factor`` is None (nothing dropped), else ceil(factor * T * top_k / Nr), at most T.
    """
    if capacity_factor is None:
        return T
    if not capacity_factor > 0:
        raise ValueError(f"capacity_factor: expected a positive number or None, "
                         f"got {capacity_factor}")
    return min(T, math.ceil(capacity_factor * T * top_k / num_routed))


def mixture_of_heads_attention(query: Array, key: Array, value: Array, out_kernel: Array,
                               routing: HeadRouting, *, is_causal: bool = False,
                               scale: float | None = None, form: str = "dense",
                               capacity_factor: float | None = None) -> Array:
    r"""Softmax attention whose heads are mixed per token by mixture-of-heads gates.

    .. math::
        y_t = \sum_{i=1}^{N} g_{t,i}\, O_{t,i} W_O^i,\qquad
        O_{t,i} = \mathrm{softmax}(\mathrm{scale}\; q_{t,i} K_i^\top) V_i

    with the ``N - Nr`` shared heads first (Nr = ``routing.routed_probs.shape[-1]``).
    ``form="dense"`` computes every head and weights them (the zero gates of unselected heads
    remove them). ``form="dispatch"`` computes a routed head
    only for the tokens that selected it: per sequence and routed head, the selecting tokens
    (in order of position, at most ``capacity(T, Nr, top_k, capacity_factor)``; later ones are
    dropped, their gate for that head lost) are gathered, attend (keys at positions <= their
    own when causal), are projected by that head's W_O^i alone and are added back, weighted.
    Attention and output projection of the unselected (token, head) pairs are skipped. With
    ``capacity_factor=None`` nothing is dropped and both forms agree.

    Args:
        query: [B, T, N, H]; key: [B, S, K, H]; value: [B, S, K, Hv] (GQA when K < N).
        out_kernel: [N, Hv, D], W_O split by head.
        routing: from :func:`route_heads` with gates [B, T, N].
        is_causal: query t sees keys s <= t.
        scale: logits scale; default 1 / sqrt(H).
        form: "dense" or "dispatch".
        capacity_factor: "dispatch" only: None (no drops) or a positive factor.

    Returns:
        [B, T, D] in the query dtype.

    Raises:
        ValueError: shapes that do not match, an unknown form, a capacity factor with the
            dense form, or (dispatch with GQA) shared heads not a multiple of N / K.

    Example:
        >>> import jax, jax.numpy as jnp, jattn
        >>> q = k = v = jax.random.normal(jax.random.key(0), (1, 6, 4, 8))
        >>> routing = jattn.route_heads(jnp.zeros((1, 6, 3)), top_k=1,
        ...     shared_logits=jnp.zeros((1, 6, 1)), mix_logits=jnp.zeros((1, 6, 2)))
        >>> w_o = jnp.ones((4, 8, 16))
        >>> jattn.mixture_of_heads_attention(q, k, v, w_o, routing, is_causal=True).shape
        (1, 6, 16)

    References:
        P19 MoH, "MoH: Multi-Head Attention as Mixture-of-Head Attention".
    """
    B, T, N, _, _, _, Hv = check_qkv(query, key, value)
    out_kernel = jnp.asarray(out_kernel)
    check_rank("out_kernel", out_kernel, (3,), "[N, Hv, D]")
    check_shape("out_kernel", out_kernel, (N, Hv, out_kernel.shape[-1]), "NHD")
    check_shape("routing.gates", routing.gates, (B, T, N), "BTN")
    top_k = routing.routed_index.shape[-1]
    check_shape("routing.routed_index", routing.routed_index, (B, T, top_k), "BTk")
    Nr = routing.routed_probs.shape[-1]
    check_shape("routing.routed_probs", routing.routed_probs, (B, T, Nr), "BTN")
    if not top_k <= Nr <= N:
        raise ValueError(f"routing: expected top_k={top_k} <= routed heads Nr={Nr} <= N={N}")
    if form not in FORMS:
        raise ValueError(f"form: expected one of {FORMS}, got {form!r}")
    if form == "dense":
        if capacity_factor is not None:
            raise ValueError("capacity_factor: only the dispatch form drops tokens")
        heads = dot_product_attention(query, key, value, is_causal=is_causal, scale=scale)
        return gated_output(heads, routing.gates, out_kernel).astype(query.dtype)
    return _dispatch(query, key, value, out_kernel, routing, is_causal=is_causal, scale=scale,
                     capacity_factor=capacity_factor).astype(query.dtype)


def gated_output(heads: Array, gates: Array, out_kernel: Array) -> Array:
    """sum_i g_i O_i W_O^i: the mixture of heads' output from every head's attention output
    (heads [B, T, n, Hv]), the gates [B, T, n] and the output kernel split by head
    [n, Hv, D]. Returns [B, T, D] in float32 or wider (the caller casts)."""
    weighted = heads * gates[..., None].astype(heads.dtype)
    return jnp.einsum("btnh,nhd->btd", weighted, out_kernel.astype(heads.dtype),
                      preferred_element_type=accumulation_dtype(heads.dtype))


def _dispatch(query, key, value, out_kernel, routing, *, is_causal, scale, capacity_factor):
    B, T, N, _ = query.shape
    S, K = key.shape[1], key.shape[2]
    top_k = routing.routed_index.shape[-1]
    Nr = routing.routed_probs.shape[-1]
    num_shared = N - Nr
    G = N // K
    if num_shared % G:
        raise ValueError(f"routing: with GQA (N={N}, K={K}) the dispatch form needs shared "
                         f"heads in whole key/value groups of {G}, got {num_shared}")
    C = capacity(T, Nr, top_k, capacity_factor)
    split = num_shared // G
    y = jnp.zeros((B, T, out_kernel.shape[-1]), accumulation_dtype(query.dtype))
    if num_shared:
        shared = dot_product_attention(query[:, :, :num_shared], key[:, :, :split],
                                       value[:, :, :split], is_causal=is_causal, scale=scale)
        y = y + gated_output(shared, routing.gates[..., :num_shared], out_kernel[:num_shared])

    # Slot of each (token, routed head): its rank among the head's selecting tokens.
    chosen = jax.nn.one_hot(routing.routed_index, Nr, dtype=jnp.int32).sum(-2)  # [B, T, Nr]
    rank = jnp.cumsum(chosen, axis=1) - 1
    slot = jnp.where((chosen > 0) & (rank < C), rank, C)  # C = dropped or not chosen
    b = jnp.arange(B)[:, None, None]
    r = jnp.arange(Nr)[None, None, :]
    t = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32)[None, :, None], (B, T, Nr))
    token = jnp.zeros((B, Nr, C), jnp.int32).at[b, r, slot].set(t, mode="drop")
    filled = jnp.zeros((B, Nr, C), bool).at[b, r, slot].set(True, mode="drop")

    q_routed = jnp.moveaxis(query[:, :, num_shared:], 2, 1)  # [B, Nr, T, H]
    q_slots = jnp.take_along_axis(q_routed, token[..., None], axis=2)  # [B, Nr, C, H]
    allowed = filled[..., None]
    if is_causal:
        allowed = allowed & (jnp.arange(S) <= token[..., None])
    out = dot_product_attention(jnp.moveaxis(q_slots, 1, 2), key[:, :, split:],
                                value[:, :, split:], mask=allowed, scale=scale)  # [B, C, Nr, Hv]
    gate = jnp.take_along_axis(jnp.moveaxis(routing.gates[..., num_shared:], 2, 1), token,
                               axis=2) * filled  # [B, Nr, C]
    contrib = jnp.einsum("bcrh,brc,rhd->brcd", out, gate.astype(out.dtype),
                         out_kernel[num_shared:].astype(out.dtype),
                         preferred_element_type=y.dtype)
    return y.at[b, token].add(contrib)



def relative_attention(query: Array, key: Array, value: Array, relative_key: Array,
                       content_bias: Array, *, position_bias: Array | None = None,
                       distance_bias: Array | None = None, is_causal: bool = True,
                       scale: float | None = None, query_offset: int | None = None) -> Array:
    r"""Softmax attention with relative position terms in the scores.

    .. math::
        \ell_{ts} = \mathrm{scale}\,\big[(q_t + u) \cdot k_s + (q_t + v) \cdot r_{p_t - s}
            + b_{p_t - s}\big],\qquad \mathrm{out}_t = \sum_s \mathrm{softmax}_s(\ell_{ts})\, v_s

    with p_t = query_offset + t (default S - T, the queries at the end of the keys, as with a
    memory or a KV cache). Position terms exist for distances 0 .. R - 1; keys further back
    get only the content term, and keys ahead of the query (negative distance) too, which is
    why the causal form is the natural one (``is_causal=False`` lets queries see later keys
    by content alone). Transformer-XL / RMHA: r = sinusoids projected by W_R, u and v
    learned, no b. RCMHA: r a learned table, u and b learned, no v.

    Args:
        query: [B, T, N, H]; key: [B, S, N, H]; value: [B, S, N, Hv] (one key/value head per
            query head: the position terms are per head).
        relative_key: r, [R, N, H].
        content_bias: u, [N, H].
        position_bias: v, [N, H] or None.
        distance_bias: b, [R, N] or None.
        is_causal: key s visible to query t only when s <= p_t.
        scale: default 1 / sqrt(H), applied to every term as in Transformer-XL.
        query_offset: see above.

    Returns:
        [B, T, N, Hv] in the query dtype (scores and softmax in float32 or wider).

    Raises:
        ValueError: shapes that do not match (including K != N), a negative offset.
        TypeError: non-floating inputs, mismatched dtypes.

    Example:
        >>> import jax, jax.numpy as jnp, jattn
        >>> q = k = v = jax.random.normal(jax.random.key(0), (1, 6, 2, 4))
        >>> r, u = jnp.zeros((8, 2, 4)), jnp.zeros((2, 4))
        >>> out = jattn.relative_attention(q, k, v, r, u)
        >>> bool(jnp.allclose(out, jattn.dot_product_attention(q, k, v, is_causal=True),
        ...                   atol=1e-6))
        True

    References:
        P16 RCMHA, "RCMHA: Relative Convolutional Multi-Head Attention for Natural Language
        Modelling" (RCMHA and RMHA); "Transformer-XL: Attentive Language Models Beyond a
        Fixed-Length Context".
    """
    _, T, N, H, S, K, _ = check_qkv(query, key, value)
    if K != N:
        raise ValueError(f"key: relative attention needs one key head per query head, got "
                         f"N={N}, K={K}")
    check_shape("content_bias", content_bias, (N, H), "NH")
    offset = S - T if query_offset is None else query_offset
    if offset < 0:
        raise ValueError(f"query_offset: expected >= 0, got {offset}")
    scale = H ** -0.5 if scale is None else scale
    acc = accumulation_dtype(query.dtype)
    by_content = jnp.einsum("nh,bsnh->bns", jnp.asarray(content_bias).astype(acc),
                            key.astype(acc))[:, :, None, :]
    by_position = relative_logits(query, S, relative_key, position_bias=position_bias,
                                  distance_bias=distance_bias, query_offset=offset)
    bias = scale * (by_content + by_position)
    return dot_product_attention(query, key, value, bias=bias, scale=scale,
                                 mask=masks.causal(offset) if is_causal else None)
