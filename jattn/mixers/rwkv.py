"""RWKV-4 time mixing: the WKV operator and the token shift.

Per channel c (w_c > 0 the decay, u_c the "bonus" of the current token), with k, v [B, T, C]:

    wkv_t = (sum_{i<t} e^{-(t-1-i) w + k_i} v_i + e^{u + k_t} v_t)
            / (sum_{i<t} e^{-(t-1-i) w + k_i}     + e^{u + k_t})

a softmax-weighted average of v_0..v_t whose logits decay linearly with distance. The RWKV-4
module computes k, v (and a receptance r) from a token-shifted mix of its input and returns
output(sigmoid(r) * wkv(exp(time_decay), time_first, k, v)).

The past enters through the running sums S_t = sum_{i<=t} e^{-(t-i) w + k_i} (v_i, 1), kept
as (num, den, max_exponent) with S_t = e^{max_exponent} (num, den): scaling by the largest
exponent seen keeps every e^x <= 1 whatever k is, as the RWKV-4 reference kernel does (its
exponent starts at -1e38, "nothing yet"). The state after the last token is exactly what the
next token needs, so a prompt can be continued token by token (``initial_state``,
``return_state``; :class:`WKVState`).

Two implementations, equal up to rounding:

* ``"scan"`` (default): the sums are a prefix scan of the monoid of decayed segments
  (decay d, num, den, exponent), combining an earlier segment a with a later b as
  a decayed by b's length (exponent - d_b) plus b, rescaled to the larger exponent. One
  ``jax.lax.associative_scan`` over T + 1 elements (the initial state first) gives all S_t in
  O(log T) depth; the outputs then add the current token with its bonus.
* ``"sequential"``: ``jax.lax.scan``, one token at a time (the reference kernel's loop).

References:
    P24 Zoology (the RWKV mixer of figure 2); RWKV, "RWKV: Reinventing RNNs for the
    Transformer Era" (RWKV-4 time mixing).
"""

from __future__ import annotations

from typing import NamedTuple

import jax.numpy as jnp
from jax import lax

from jattn.core.shapes import Array, check_floating, check_rank, check_shape

IMPLEMENTATIONS = ("scan", "sequential")

# The exponent of an empty sum: exp(EMPTY - x) underflows to 0 for any sensible x, and
# EMPTY minus a few thousand is still finite in float32 (no inf - inf in the gradients).
EMPTY = -1e38


class WKVState(NamedTuple):
    """Running sums of :func:`wkv` after a token: S = e^max_exponent (num, den)."""

    num: Array  # [B, C]: sum_i e^{-(t-i) w + k_i - max_exponent} v_i (float32 or wider)
    den: Array  # [B, C]: sum_i e^{-(t-i) w + k_i - max_exponent}
    max_exponent: Array  # [B, C]: the scale; -1e38 when nothing was seen


def empty_wkv_state(batch: int, channels: int, dtype=jnp.float32) -> WKVState:
    """The state before the first token (zero sums)."""
    zeros = jnp.zeros((batch, channels), dtype)
    return WKVState(zeros, zeros, jnp.full((batch, channels), EMPTY, dtype))


def _check(w, u, k, v, initial_state) -> None:
    check_rank("k", k, (3,), "[B, T, C]")
    check_shape("v", v, k.shape, "BTC")
    b, t, c = k.shape
    if t == 0:
        raise ValueError(f"k: expected at least one token, got shape {k.shape}")
    check_shape("w", w, (c,), "C")
    check_shape("u", u, (c,), "C")
    for name, x in (("w", w), ("u", u), ("k", k), ("v", v)):
        check_floating(name, x)
    if initial_state is not None:
        if not isinstance(initial_state, WKVState):
            raise TypeError(f"initial_state: expected a WKVState, got {type(initial_state)}")
        for name, x in zip(WKVState._fields, initial_state, strict=True):
            check_shape(f"initial_state.{name}", x, (b, c), "BC")


def wkv(w: Array, u: Array, k: Array, v: Array, *, implementation: str = "scan",
        initial_state: WKVState | None = None, return_state: bool = False):
    """RWKV-4's WKV: per channel, a softmax average of the values with decaying logits.

    wkv_t = (sum_{i<t} e^{-(t-1-i) w + k_i} v_i + e^{u + k_t} v_t)
            / (sum_{i<t} e^{-(t-1-i) w + k_i} + e^{u + k_t})

    Causal self-mixing only (each position sees itself and the past, by construction; there
    is no query/key split, so neither a noncausal nor a cross form exists). Numerically stable
    for any k (running max exponent), in float32 or wider.

    Args:
        w: [C] positive decay per channel (RWKV-4 passes exp(time_decay)).
        u: [C] bonus of the current token (RWKV-4's time_first).
        k: [B, T, C] keys (logits), T >= 1.
        v: [B, T, C] values.
        implementation: "scan" (parallel associative scan, default) or "sequential"
            (one token at a time).
        initial_state: :class:`WKVState` after the tokens before k (default: none).
        return_state: also return the state after the last token.

    Returns:
        [B, T, C] in v's dtype; with ``return_state``, (that, :class:`WKVState` [B, C] each,
        in the compute dtype: float32 or wider).

    Raises:
        ValueError: mismatched shapes, T = 0 or an unknown implementation.
        TypeError: non-floating inputs or an initial_state that is not a WKVState.

    >>> import jax.numpy as jnp
    >>> k = jnp.zeros((1, 3, 1)); v = jnp.array([1.0, 2.0, 3.0]).reshape(1, 3, 1)
    >>> wkv(jnp.zeros(1), jnp.zeros(1), k, v)[0, :, 0]  # no decay, no bonus: running mean
    Array([1. , 1.5, 2. ], dtype=float32)

    References:
        P24 Zoology; RWKV, "RWKV: Reinventing RNNs for the Transformer Era".
    """
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"implementation: expected one of {IMPLEMENTATIONS}, "
                         f"got {implementation!r}")
    _check(w, u, k, v, initial_state)
    dtype = jnp.promote_types(jnp.result_type(w, u, k, v), jnp.float32)
    b, _, c = k.shape
    w, u, k32, v32 = (x.astype(dtype) for x in (w, u, k, v))
    state = (empty_wkv_state(b, c, dtype) if initial_state is None
             else WKVState(*(x.astype(dtype) for x in initial_state)))
    run = _wkv_scan if implementation == "scan" else _wkv_sequential
    y, final = run(w, u, k32, v32, state)
    y = y.astype(v.dtype)
    return (y, final) if return_state else y


def _add_bonus_token(past: WKVState, u: Array, k: Array, v: Array) -> Array:
    """wkv from the sums over the past (at the current step) and the current token."""
    current = u + k
    bigger = jnp.maximum(past.max_exponent, current)
    a = jnp.exp(past.max_exponent - bigger)
    b = jnp.exp(current - bigger)
    return (a * past.num + b * v) / (a * past.den + b)


def _wkv_sequential(w, u, k, v, state: WKVState):
    def step(s: WKVState, kv):
        k_t, v_t = kv  # [B, C]
        y_t = _add_bonus_token(s, u, k_t, v_t)
        decayed = s.max_exponent - w
        bigger = jnp.maximum(decayed, k_t)
        a = jnp.exp(decayed - bigger)
        b = jnp.exp(k_t - bigger)
        return WKVState(a * s.num + b * v_t, a * s.den + b, bigger), y_t

    final, y = lax.scan(step, state, (jnp.swapaxes(k, 0, 1), jnp.swapaxes(v, 0, 1)))
    return jnp.swapaxes(y, 0, 1), final


def _combine(earlier, later):
    """Segment ``earlier`` followed by ``later``: decay the first by the second's length."""
    d1, n1, q1, m1 = earlier
    d2, n2, q2, m2 = later
    m1 = m1 - d2
    first_bigger = m1 >= m2
    # One exponential: the larger exponent's factor is 1. A where (not abs) keeps the
    # derivative of the chosen branch at ties.
    scale = jnp.exp(jnp.where(first_bigger, m2 - m1, m1 - m2))
    num = jnp.where(first_bigger, n1 + scale * n2, scale * n1 + n2)
    den = jnp.where(first_bigger, q1 + scale * q2, scale * q1 + q2)
    return d1 + d2, num, den, jnp.maximum(m1, m2)


def _wkv_scan(w, u, k, v, state: WKVState):
    _, t, c = k.shape
    # Element i (one token) is the segment (decay w, num v_i, den 1, exponent k_i); the
    # initial state goes first as a segment of length one (it is decayed like a token).
    decay = jnp.broadcast_to(w, (1, t + 1, c))
    num = jnp.concatenate([state.num[:, None], v], axis=1)
    den = jnp.concatenate([state.den[:, None], jnp.ones_like(v)], axis=1)
    exponent = jnp.concatenate([state.max_exponent[:, None], k], axis=1)
    _, num, den, exponent = lax.associative_scan(_combine, (decay, num, den, exponent), axis=1)
    # Prefix j holds the sums over the initial state and tokens < j: the past of token j.
    past = WKVState(num[:, :t], den[:, :t], exponent[:, :t])
    y = _add_bonus_token(past, u, k, v)
    return y, WKVState(num[:, t], den[:, t], exponent[:, t])


def token_shift(x: Array, previous: Array | None = None) -> Array:
    """x shifted right by one token along T: out[:, 0] = previous (default 0), out[:, t] =
    x[:, t - 1].

    Args:
        x: [B, T, C].
        previous: [B, C], the token before x (when continuing a sequence) or None for zeros.

    Returns:
        [B, T, C] in x's dtype.

    Raises:
        ValueError: x not of rank 3 or previous not [B, C].

    >>> import jax.numpy as jnp
    >>> token_shift(jnp.arange(1.0, 4.0).reshape(1, 3, 1))[0, :, 0]
    Array([0., 1., 2.], dtype=float32)

    References:
        RWKV, "RWKV: Reinventing RNNs for the Transformer Era" (token shift).
    """
    check_rank("x", x, (3,), "[B, T, C]")
    b, _, c = x.shape
    if previous is None:
        first = jnp.zeros((b, 1, c), x.dtype)
    else:
        check_shape("previous", previous, (b, c), "BC")
        first = previous.astype(x.dtype)[:, None]
    return jnp.concatenate([first, x[:, :-1]], axis=1)
