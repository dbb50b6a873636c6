"""Selective state-space scan (Mamba's S6), computed in parallel with an associative scan.

For each channel d and state n, with input-dependent step sizes and projections:

    h_t = exp(delta_t A) * h_{t-1} + delta_t B_t u_t        (zero-order hold on A,
    y_t = <h_t, C_t> + D u_t                                  Euler on B, as in Mamba)

The recurrence h_t = a_t h_{t-1} + b_t is associative in pairs (a, b), so
``jax.lax.associative_scan`` evaluates it in O(log L) depth; ``jattn.reference.selective_scan``
is the sequential definition the tests compare against.

References:
    P24 Zoology (the Mamba mixer: d_state 16, d_conv 4, expand 2); Mamba, "Linear-Time
    Sequence Modeling with Selective State Spaces".
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from jattn.typing import Array, check_floating, check_rank, check_shape


def _check(u, delta, A, B, C, D) -> None:
    check_rank("u", u, (3,), "[B, L, D]")
    check_floating("u", u)
    b, L, d = u.shape
    check_shape("delta", delta, u.shape, "BLD")
    check_rank("A", A, (2,), "[D, N]")
    if A.shape[0] != d:
        raise ValueError(f"A: expected [D={d}, N], got {A.shape}")
    n = A.shape[1]
    check_shape("B", B, (b, L, n), "BLN")
    check_shape("C", C, (b, L, n), "BLN")
    if D is not None:
        check_shape("D", D, (d,), "D")


def selective_scan(u: Array, delta: Array, A: Array, B: Array, C: Array,
                   D: Array | None = None) -> Array:
    """y[b, t, d] = sum_n h[b, t, d, n] C[b, t, n] + D[d] u[b, t, d] (see module docstring).

    Args:
        u: [B, L, D] input; delta: [B, L, D] positive step sizes.
        A: [D, N] state matrix (diagonal per channel; negative for stability).
        B, C: [B, L, N] input and output projections.
        D: [D] skip weights or None.

    Returns:
        [B, L, D] in u's dtype (the scan runs in float32 or wider).

    >>> import jax.numpy as jnp
    >>> u = jnp.ones((1, 3, 1)); ones = jnp.ones((1, 3, 1))
    >>> selective_scan(u, ones * jnp.log(2.0), -jnp.ones((1, 1)), ones, ones)[0, :, 0]
    Array([0.6931472, 1.0397208, 1.2130076], dtype=float32)
    """
    _check(u, delta, A, B, C, D)
    dtype = jnp.promote_types(u.dtype, jnp.float32)
    u32, delta32 = u.astype(dtype), delta.astype(dtype)
    decay = jnp.exp(delta32[..., None] * A.astype(dtype))  # [B, L, D, N]
    drive = (delta32 * u32)[..., None] * B.astype(dtype)[:, :, None, :]

    def combine(earlier, later):
        a1, b1 = earlier
        a2, b2 = later
        return a1 * a2, a2 * b1 + b2

    _, h = lax.associative_scan(combine, (decay, drive), axis=1)
    y = jnp.einsum("bldn,bln->bld", h, C.astype(dtype))
    if D is not None:
        y = y + D.astype(dtype) * u32
    return y.astype(u.dtype)
