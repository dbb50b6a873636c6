"""Pointer networks: attention as a pointer to a position of the input.

A pointer network (P67) decodes a sequence of *input positions*: at decoder step i the
additive (Bahdanau) attention scores of the decoder state d_i against the encoder states
e_1..e_S are not used to blend the encoder states but are themselves the output
distribution over the S input positions, so the output vocabulary is the input, whatever
its length.

* ``additive_scores``: u_ij = v^T tanh(W_k e_j + W_q d_i), [B, T, S].
* ``pointer_distribution``: log-softmax of the scores over the input positions, with invalid
  positions (padding) and positions already chosen at earlier steps masked out.
* ``greedy_pointer_decode``: the argmax decoding loop (``lax.scan``) around a user step
  function, masking each chosen position from the later steps.

CAB patterns: the scores are cross attention from the decoder steps to the encoder states
with no mask of their own (noncausal cross); the decoding order is carried by the decoder
state and by ``chosen``, not by a causal mask. Plain references are in
:mod:`jattn.reference`.

References:
    P67 Pointer Networks, Vinyals, Fortunato and Jaitly, "Pointer Networks" (NeurIPS 2015).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from jattn.core.shapes import (
    Array,
    accumulation_dtype,
    check_bool,
    check_floating,
    check_int,
    check_integer,
    check_rank,
    check_shape,
    check_values_in_range,
)


def additive_scores(query: Array, keys: Array, w_q: Array, w_k: Array, v: Array) -> Array:
    r"""Additive attention scores u_ij = v^T tanh(W_k k_j + W_q q_i).

    .. math::
        u_{b,i,j} = \sum_a v_a \tanh\Big(\sum_d k_{b,j,d} W_{k,da}
            + \sum_d q_{b,i,d} W_{q,da}\Big)

    (Bahdanau et al.'s score, the pointer of Vinyals et al. eq. 3, with W_1 = W_k acting on
    the encoder states and W_2 = W_q on the decoder states). Computed in float32 (or wider);
    the [B, T, S, A] tanh argument is materialised, so keep T * S * A moderate. CAB pattern:
    noncausal cross (every query sees every key; masks go to ``pointer_distribution``).

    Args:
        query: [B, T, Dq] decoder states.
        keys: [B, S, Dk] encoder states.
        w_q: [Dq, A].
        w_k: [Dk, A].
        v: [A].

    Returns:
        [B, T, S] scores in float32 (or wider).

    Raises:
        ValueError: wrong ranks or shapes that disagree.
        TypeError: non-floating inputs.

    >>> import jax.numpy as jnp
    >>> q, k = jnp.zeros((1, 2, 3)), jnp.ones((1, 4, 5))
    >>> additive_scores(q, k, jnp.ones((3, 6)), jnp.ones((5, 6)), jnp.ones(6)).shape
    (1, 2, 4)

    References:
        P67 Pointer Networks (eq. 3: u^i_j = v^T tanh(W_1 e_j + W_2 d_i)).
    """
    query, keys, w_q, w_k, v = (jnp.asarray(a) for a in (query, keys, w_q, w_k, v))
    check_rank("query", query, (3,), "[B, T, Dq]")
    check_rank("keys", keys, (3,), "[B, S, Dk]")
    check_rank("v", v, (1,), "[A]")
    for name, a in (("query", query), ("keys", keys), ("w_q", w_q), ("w_k", w_k), ("v", v)):
        check_floating(name, a)
    B, _, Dq = query.shape
    if keys.shape[0] != B:
        raise ValueError(f"keys: expected batch {B} as query {query.shape}, got {keys.shape}")
    A = v.shape[0]
    check_shape("w_q", w_q, (Dq, A), ["Dq", "A"])
    check_shape("w_k", w_k, (keys.shape[2], A), ["Dk", "A"])
    dtype = accumulation_dtype(jnp.result_type(query.dtype, keys.dtype, w_q.dtype))
    projected_q = query.astype(dtype) @ w_q.astype(dtype)  # [B, T, A]
    projected_k = keys.astype(dtype) @ w_k.astype(dtype)  # [B, S, A]
    hidden = jnp.tanh(projected_q[:, :, None, :] + projected_k[:, None, :, :])
    return hidden @ v.astype(dtype)


def _allowed(scores_shape: tuple[int, ...], mask: Array | None,
             chosen: Array | None) -> Array | None:
    """bool [B, T, S]: valid and not chosen at an earlier step (None when nothing masked)."""
    B, T, S = scores_shape
    allowed = None
    if mask is not None:
        allowed = jnp.broadcast_to(mask if mask.ndim == 3 else mask[:, None, :], (B, T, S))
    if chosen is not None:
        # taken[b, t, s]: position s was chosen at some step t' < t.
        hit = (chosen[:, :, None] == jnp.arange(S)).astype(jnp.int32)  # negative: no hit
        taken = jnp.cumsum(hit, axis=1) - hit > 0  # hits at steps before t
        allowed = ~taken if allowed is None else allowed & ~taken
    return allowed


def pointer_distribution(scores: Array, *, mask: Array | None = None,
                         chosen: Array | None = None) -> Array:
    r"""Log-probabilities over the input positions: log-softmax of the allowed scores.

    .. math::
        \log p(j \mid i) = u_{ij} - \log \sum_{j' \in \mathcal{A}_i} e^{u_{ij'}}
        \;(j \in \mathcal{A}_i), \qquad -\infty \;(j \notin \mathcal{A}_i)

    where the allowed set A_i holds the positions j that ``mask`` marks valid and that were
    not chosen at an earlier step (``chosen[b, i'] == j`` for some i' < i). A masked position
    gets -inf (probability exactly 0, never picked by an argmax). A step with no allowed
    position (everything masked, or more steps than valid positions) gets -inf everywhere:
    probabilities all 0, no NaN, and zero gradients for that step. Pick the log-probability
    of a target with ``jnp.take_along_axis`` (or ``jnp.where``), not by multiplying by a
    one-hot vector (0 * -inf is NaN). Statistics in float32 (or wider). CAB pattern: the
    distribution of noncausal cross attention; ``chosen`` makes the steps depend on the
    earlier ones (teacher forcing in training).

    Args:
        scores: [B, T, S] pointer scores (``additive_scores``).
        mask: bool [B, S] (the same for every step) or [B, T, S]; True = a valid position.
            None: all valid.
        chosen: int [B, T], the position picked at each step (in training the targets);
            step t excludes chosen[:, :t]. Negative ids (e.g. -1 for padding steps) exclude
            nothing. None: nothing excluded.

    Returns:
        [B, T, S] log-probabilities in float32 (or wider).

    Raises:
        ValueError: wrong ranks or shapes, chosen ids >= S (checked when concrete).
        TypeError: non-floating scores, non-boolean mask, non-integer chosen.

    >>> import jax.numpy as jnp
    >>> scores = jnp.zeros((1, 3, 3))
    >>> logp = pointer_distribution(scores, chosen=jnp.array([[2, 0, 1]]))
    >>> # step 1 excludes position 2, step 2 positions 2 and 0
    >>> [[round(float(p), 2) for p in row] for row in jnp.exp(logp)[0]]
    [[0.33, 0.33, 0.33], [0.5, 0.5, 0.0], [0.0, 1.0, 0.0]]

    References:
        P67 Pointer Networks (eq. 3: p(C_i | C_1..C_{i-1}, P) = softmax(u^i)); the masking
        of chosen positions is the usual constraint for permutation outputs.
    """
    scores = jnp.asarray(scores)
    check_rank("scores", scores, (3,), "[B, T, S]")
    check_floating("scores", scores)
    B, T, S = scores.shape
    if S == 0:
        raise ValueError(f"scores: expected at least one input position, got {scores.shape}")
    if mask is not None:
        mask = jnp.asarray(mask)
        check_bool("mask", mask)
        if mask.shape not in ((B, S), (B, T, S)):
            raise ValueError(f"mask: expected shape {(B, S)} [B, S] or {(B, T, S)} [B, T, S] "
                             f"for scores {scores.shape}, got {mask.shape}")
    if chosen is not None:
        chosen = jnp.asarray(chosen)
        check_integer("chosen", chosen)
        check_shape("chosen", chosen, (B, T), "BT")
        check_values_in_range("chosen", jnp.maximum(chosen, -1), -1, S - 1)
    logits = scores.astype(accumulation_dtype(scores.dtype))
    allowed = _allowed(scores.shape, mask, chosen)
    if allowed is None:
        return jax.nn.log_softmax(logits, axis=-1)
    row_max = jnp.max(jnp.where(allowed, logits, -jnp.inf), axis=-1, keepdims=True)
    row_max = lax.stop_gradient(jnp.where(jnp.isfinite(row_max), row_max, 0))
    shifted = jnp.where(allowed, logits - row_max, 0)  # finite everywhere: safe gradients
    total = jnp.sum(jnp.where(allowed, jnp.exp(shifted), 0), axis=-1, keepdims=True)
    log_total = jnp.log(jnp.where(total > 0, total, 1))
    return jnp.where(allowed, shifted - log_total, -jnp.inf)


StepFn = Callable[[Any, Array], tuple[Array, Any]]


def greedy_pointer_decode(step_fn: StepFn, carry: Any, valid: Array, *,
                          num_steps: int | None = None) -> tuple[Array, Array]:
    r"""Greedy pointer decoding: at each step point to the most probable allowed position.

    .. math::
        c_i = \arg\max_{j \in \mathcal{A}_i} \log p(j \mid i), \qquad
        \mathcal{A}_{i+1} = \mathcal{A}_i \setminus \{c_i\}

    A ``lax.scan`` over ``num_steps`` steps: ``step_fn(carry, previous)`` gets the position
    chosen at the step before (int [B]; -1 at the first step, where a decoder feeds its
    learned "go" input) and returns (scores [B, S], new carry). The scores become
    log-probabilities with :func:`pointer_distribution`, masked to the valid positions not
    yet chosen. Once a sequence has no allowed position left, its later steps choose -1 and
    their log-probabilities are all -inf. Ties go to the lower position. jit/vmap safe
    (``step_fn`` is traced once).

    Args:
        step_fn: (carry, previous int [B]) -> (scores [B, S], carry).
        carry: the decoder state (any pytree), e.g. the encoder's final LSTM state.
        valid: bool [B, S], True for real input positions.
        num_steps: decoding steps; None: S (a full permutation).

    Returns:
        (chosen int32 [B, num_steps], log_probs [B, num_steps, S] in float32).

    Raises:
        ValueError: valid not [B, S], num_steps not a positive int, scores of the wrong
            shape from step_fn.
        TypeError: a non-boolean valid.

    >>> import jax.numpy as jnp
    >>> x = jnp.array([[0.3, 0.1, 0.2]])
    >>> step = lambda carry, previous: (-x, carry)  # prefer small values: sorts x
    >>> chosen, _ = greedy_pointer_decode(step, (), jnp.ones((1, 3), bool))
    >>> chosen
    Array([[1, 2, 0]], dtype=int32)

    References:
        P67 Pointer Networks (decoding; the paper uses beam search, greedy is beam size 1).
    """
    valid = jnp.asarray(valid)
    check_rank("valid", valid, (2,), "[B, S]")
    check_bool("valid", valid)
    B, S = valid.shape
    num_steps = S if num_steps is None else num_steps
    check_int("num_steps", num_steps)
    first = -jnp.ones((B,), jnp.int32)
    scores_shape = jax.eval_shape(step_fn, carry, first)[0].shape
    if tuple(scores_shape) != (B, S):
        raise ValueError(f"step_fn: expected scores of shape {(B, S)} [B, S], "
                         f"got {tuple(scores_shape)}")

    def body(state, _):
        carry, previous, allowed = state
        scores, carry = step_fn(carry, previous)
        log_probs = pointer_distribution(scores[:, None, :], mask=allowed)[:, 0]
        best = jnp.argmax(log_probs, axis=-1).astype(jnp.int32)
        chosen = jnp.where(allowed.any(-1), best, -1)
        allowed = allowed & (jnp.arange(S) != chosen[:, None])
        return (carry, chosen, allowed), (chosen, log_probs)

    _, (chosen, log_probs) = lax.scan(body, (carry, first, valid), None, length=num_steps)
    return jnp.swapaxes(chosen, 0, 1), jnp.swapaxes(log_probs, 0, 1)
