"""Input-dependent sparse attention: which positions attend is chosen from the input.

Two readings of Zoology's "input-dependent sparse attention" (P24):

* ``topk_attention``: every query keeps only its ``top_k`` highest-scoring allowed keys
  (default ceil(sqrt(S))) and takes the softmax over them. Sparse in the keys of each row.
* ``selective_lookup`` (with ``selection_weights`` and ``selection_penalty``): what the
  public Zoology code does (``zoology/mixers/selective.py``: ``SelectiveLookups``,
  ``SigmoidLookups``). A learned scalar per position (a linear map of the input, then a
  softmax over the sequence or a sigmoid) gates a dense causal attention output that is added
  to the input: y = x + s * attention(x). Training uses every position; at evaluation only
  the ceil(sqrt(L)) positions of each sequence with the largest s are updated, the others
  pass through (y = x). Sparse in the query positions. The sigmoid variant adds an auxiliary
  loss weight * relu(mean(s) - num_lookups / L) that pushes the mean selection down to about
  num_lookups (default sqrt(L)) positions.

Neither is a sub-quadratic kernel: scores are computed densely and then selected, which is
the definition (and what the public code does); the point is the recall of the sparse
pattern, not its speed. ``jattn.reference.topk_attention`` is the dense, explicitly masked
ground truth.

References:
    P24 Zoology, "Zoology: Measuring and Improving Recall in Efficient Language Models"
    (input-dependent sparse attention at the top ceil(sqrt(L)) positions).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax import lax

from jattn.core.attention import masked_softmax
from jattn.core.shapes import (
    Array,
    accumulation_dtype,
    check_floating,
    check_int,
    check_qkv,
    check_rank,
    check_shape,
)

ACTIVATIONS = ("softmax", "sigmoid")


def _check_top_k(top_k, length: int) -> int:
    """The number of keys/positions kept: top_k (None: ceil(sqrt(length))), at most length."""
    if top_k is None:
        return min(math.ceil(math.sqrt(length)), length)
    return min(check_int("top_k", top_k), length)


def topk_attention(query: Array, key: Array, value: Array, *, top_k: int | None = None,
                   is_causal: bool = True, scale: float | None = None) -> Array:
    r"""Softmax attention over each query's ``top_k`` highest-scoring allowed keys.

    .. math::
        s_{ij} = \mathrm{scale}\; q_i \cdot k_j, \qquad
        \mathrm{out}_i = \sum_{j \in \mathrm{top}_k(i)}
            \frac{e^{s_{ij}}}{\sum_{j' \in \mathrm{top}_k(i)} e^{s_{ij'}}}\, v_j

    where top_k(i) is the set of the k largest s_ij over the allowed keys j (j <= i when
    causal), ties broken towards the smaller j. A row with fewer than k allowed keys keeps
    all of them; a row with none returns zeros. With k >= S this is softmax attention.
    Scores and softmax in float32 (or wider).

    Args:
        query: [B, T, N, H].
        key: [B, S, K, H]; N % K == 0 (GQA/MQA without repeating K/V).
        value: [B, S, K, Hv].
        top_k: keys kept per query; None for ceil(sqrt(S)).
        is_causal: query i sees keys j <= i (top-left aligned, as jattn.dot_product_attention).
        scale: logits scale; default 1 / sqrt(H).

    Returns:
        [B, T, N, Hv] in the query's dtype.

    Raises:
        ValueError: wrong ranks, shapes that disagree, heads that do not divide, empty
            sequences, a top_k that is not a positive int.
        TypeError: non-floating or mixed dtypes.

    >>> import jax, jattn
    >>> x = jax.random.normal(jax.random.key(0), (2, 16, 4, 8))
    >>> jattn.topk_attention(x, x, x, top_k=4).shape
    (2, 16, 4, 8)

    References:
        P24 Zoology (input-dependent sparse attention, top ceil(sqrt(L)) positions).
    """
    B, T, N, H, S, K, _ = check_qkv(query, key, value)
    k = _check_top_k(top_k, S)
    scale = H ** -0.5 if scale is None else scale

    G = N // K
    dtype = accumulation_dtype(query.dtype)
    q = query.astype(dtype).reshape(B, T, K, G, H)
    logits = jnp.einsum("btkgh,bskh->bkgts", q, key.astype(dtype)) * scale
    t = jnp.arange(T)[:, None]
    allowed = jnp.arange(S)[None, :] <= t if is_causal else jnp.ones((T, S), bool)
    # lax.top_k puts equal values in index order, so ties go to the smaller key index; the
    # disallowed keys, at -inf, come last and are dropped below.
    values, index = lax.top_k(jnp.where(allowed, logits, -jnp.inf), k)  # [B, K, G, T, k]
    kept = index <= t if is_causal else jnp.ones(index.shape, bool)
    probs = masked_softmax(values, kept)
    v = jnp.swapaxes(value.astype(dtype), 1, 2)  # [B, K, S, Hv]
    gathered = jax.vmap(jax.vmap(lambda vv, ii: vv[ii]))(v, index)  # [B, K, G, T, k, Hv]
    out = jnp.einsum("bkgtj,bkgtjd->btkgd", probs, gathered)
    return out.reshape(B, T, N, value.shape[3]).astype(query.dtype)


def selection_weights(logits: Array, *, activation: str = "softmax") -> Array:
    """s = softmax of the logits over the sequence (axis 1), or their sigmoid.

    The softmax variant (Zoology's ``SelectiveLookups``) normalises over the whole sequence,
    so s_t depends on later positions too; the sigmoid variant (``SigmoidLookups``) is
    per position.

    Args:
        logits: [B, L] selection logits (a linear map of the input).
        activation: ``"softmax"`` or ``"sigmoid"``.

    Returns:
        [B, L] in float32 (or wider).

    Raises:
        ValueError: logits not [B, L], an unknown activation.
        TypeError: non-floating logits.

    >>> import jax.numpy as jnp
    >>> selection_weights(jnp.zeros((1, 4)))
    Array([[0.25, 0.25, 0.25, 0.25]], dtype=float32)

    References:
        P24 Zoology (``SelectiveLookups`` / ``SigmoidLookups`` in its public code).
    """
    check_rank("logits", logits, (2,), "[B, L]")
    check_floating("logits", logits)
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation: expected one of {ACTIVATIONS}, got {activation!r}")
    logits = logits.astype(accumulation_dtype(logits.dtype))
    if activation == "softmax":
        return jax.nn.softmax(logits, axis=1)
    return jax.nn.sigmoid(logits)


def selective_lookup(x: Array, attended: Array, selection: Array, *,
                     top_k: int | None = None, select: bool = False) -> Array:
    r"""y_t = x_t + m_t s_t a_t: add the attention output where the selection picks.

    .. math::
        y_t = x_t + m_t\, s_t\, a_t, \qquad m_t = 1 \text{ (training) or }
        [t \in \mathrm{top}_k(s)] \text{ (evaluation)}

    Args:
        x: [B, L, D] the layer input.
        attended: [B, T, D] the dense attention output a (with ``is_causal``).
        selection: [B, L] selection weights s (``selection_weights``).
        top_k: positions updated per sequence when selecting; None for ceil(sqrt(L)).
        select: False (training: every position, weighted by s) or True (evaluation: only
            the top_k positions of each sequence by s, ties to the earlier position).

    Returns:
        [B, L, D] in x's dtype.

    Raises:
        ValueError: shapes that disagree, a top_k that is not a positive int.
        TypeError: non-floating inputs.

    >>> import jax.numpy as jnp
    >>> x, a = jnp.zeros((1, 4, 1)), jnp.ones((1, 4, 1))
    >>> s = jnp.array([[0.1, 0.4, 0.2, 0.3]])
    >>> selective_lookup(x, a, s, top_k=2, select=True)[0, :, 0]
    Array([0. , 0.4, 0. , 0.3], dtype=float32)

    References:
        P24 Zoology (``SelectiveLookups`` / ``SigmoidLookups`` in its public code).
    """
    check_rank("x", x, (3,), "[B, L, D]")
    check_floating("x", x)
    check_shape("attended", attended, x.shape, "BLD")
    check_shape("selection", selection, x.shape[:2], "BL")
    check_floating("selection", selection)
    k = _check_top_k(top_k, x.shape[1])
    update = selection[..., None] * attended
    if select:
        _, index = lax.top_k(selection, k)  # equal weights: the earlier position first
        keep = jnp.zeros(selection.shape, bool).at[
            jnp.arange(x.shape[0])[:, None], index].set(True)
        update = jnp.where(keep[..., None], update, 0)
    return (x + update).astype(x.dtype)


def selection_penalty(selection: Array, *, num_lookups: float | None = None,
                      weight: float = 1e-3) -> Array:
    """weight * relu(mean(s) - num_lookups / L): the sigmoid variant's auxiliary loss.

    Args:
        selection: [B, L] selection weights.
        num_lookups: target number of selected positions; None for sqrt(L).
        weight: the penalty's weight (the public code's ``selection_penalty``, 1e-3).

    Returns:
        A scalar.

    Raises:
        ValueError: selection not [B, L].

    >>> import jax.numpy as jnp
    >>> float(selection_penalty(jnp.full((2, 16), 0.5), weight=1.0))
    0.25

    References:
        P24 Zoology (``SigmoidLookups`` in its public code).
    """
    check_rank("selection", selection, (2,), "[B, L]")
    length = selection.shape[1]
    target = math.sqrt(length) if num_lookups is None else num_lookups
    return weight * jax.nn.relu(jnp.mean(selection) - target / length)
