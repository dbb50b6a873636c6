"""Ground truth of the attention-free mixers (:mod:`jattn.mixers`): convolutions, scans and
recurrences one step at a time."""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from jattn.core.shapes import Array
from jattn.reference.core import masked_softmax


def causal_conv(x: Array, filt: Array) -> Array:
    """y[b, t, d] = sum_{s=0}^{min(t, K-1)} filt[s, d] * x[b, t - s, d], as a Toeplitz matmul.

    The reference for ``jattn.mixers.long_causal_conv`` (filt [L, D]) and, with the kernel
    reversed, ``short_causal_conv`` (kernel [K, D]).
    """
    L, K = x.shape[1], filt.shape[0]
    lag = jnp.arange(L)[:, None] - jnp.arange(L)[None, :]  # t - tau
    valid = (lag >= 0) & (lag < K)
    toeplitz = jnp.where(valid[..., None], filt[jnp.clip(lag, 0, K - 1)], 0)  # [L, L, D]
    return jnp.einsum("tud,bud->btd", toeplitz, x)


def selective_scan(u, delta, A, B, C, D=None):
    """The selective-scan recurrence one step at a time (lax.scan over the length).

    h_t = exp(delta_t A) h_{t-1} + delta_t B_t u_t;  y_t = <h_t, C_t> + D u_t.
    """
    dtype = jnp.promote_types(u.dtype, jnp.float32)

    def step(h, inputs):
        u_t, delta_t, B_t, C_t = inputs  # [b, d], [b, d], [b, n], [b, n]
        h = jnp.exp(delta_t[..., None] * A) * h + (delta_t * u_t)[..., None] * B_t[:, None, :]
        return h, jnp.einsum("bdn,bn->bd", h, C_t)

    h0 = jnp.zeros((u.shape[0], u.shape[2], A.shape[1]), dtype)
    xs = tuple(jnp.swapaxes(x.astype(dtype), 0, 1) for x in (u, delta, B, C))
    _, y = lax.scan(step, h0, xs)
    y = jnp.swapaxes(y, 0, 1)
    if D is not None:
        y = y + D * u.astype(dtype)
    return y.astype(u.dtype)


def h3_ssm(q, k, v, shift, diag, *, discretization="bilinear"):
    """H3 by its two recurrences, one time step at a time (lax.scan over the length).

    Shift SSM per channel: s_t = (0, s_{t-1}[:-1]) + B k_t, k'_t = <C, s_t> + D_s k_t.
    Diagonal SSM per head and (i, j) channel, Z complex modes (each with its conjugate):
    x_t = dA x_{t-1} + dB k'_t[i] v_t[j], w_t = 2 Re <C, x_t> + D kv_t;
    y_t[j] = sum_i q_t[i] w_t[i, j]. dA, dB: bilinear (1 + dt A/2) / (1 - dt A/2),
    dt B / (1 - dt A/2), or zero-order hold exp(dt A), (exp(dt A) - 1) B / A.
    Same arguments and meaning as :func:`jattn.mixers.h3.h3_ssm`.
    """
    dtype = jnp.promote_types(v.dtype, jnp.float32)
    q, k, v = (jnp.asarray(x).astype(dtype) for x in (q, k, v))
    Bsz, _, N, P = v.shape
    dt = jnp.exp(diag.log_dt.astype(dtype))[:, None]
    A = -jnp.exp(diag.log_A_real.astype(dtype)) + 1j * diag.A_imag.astype(dtype)
    B = diag.B[..., 0].astype(dtype) + 1j * diag.B[..., 1].astype(dtype)
    C = diag.C[..., 0].astype(dtype) + 1j * diag.C[..., 1].astype(dtype)
    if discretization == "zoh":
        dA, dB = jnp.exp(dt * A), (jnp.exp(dt * A) - 1) * B / A
    else:
        dA, dB = (1 + dt * A / 2) / (1 - dt * A / 2), dt * B / (1 - dt * A / 2)
    sB, sC = shift.B.astype(dtype), shift.C.astype(dtype)

    def step(carry, inputs):
        s, x = carry  # [b, N, P, M] real, [b, N, P, P, Z] complex
        q_t, k_t, v_t = inputs  # [b, N, P] each
        s = jnp.concatenate([jnp.zeros_like(s[..., :1]), s[..., :-1]], axis=-1)
        s = s + sB * k_t[..., None]
        k_t = (s * sC).sum(-1) + shift.D.astype(dtype) * k_t
        kv = k_t[..., :, None] * v_t[..., None, :]  # [b, N, P, P]
        x = dA[:, None, None, :] * x + dB[:, None, None, :] * kv[..., None]
        w = 2 * (C[:, None, None, :] * x).sum(-1).real + diag.D.astype(dtype)[:, None, None] * kv
        return (s, x), (q_t[..., :, None] * w).sum(-2)

    s0 = jnp.zeros((Bsz, N, P, shift.C.shape[-1]), dtype)
    x0 = jnp.zeros((Bsz, N, P, P, A.shape[-1]), dA.dtype)
    xs = tuple(jnp.swapaxes(x, 0, 1) for x in (q, k, v))
    _, y = lax.scan(step, (s0, x0), xs)
    return jnp.swapaxes(y, 0, 1).astype(v.dtype)


def rwkv_wkv(w, u, k, v):
    """RWKV-4's WKV from its definition: per channel c, a softmax over positions i <= t with
    logits -(t-1-i) w + k_i for i < t and u + k_t for i = t, averaging v_i. Dense [T, T]
    logits per channel with a causal mask; stabilised by subtracting each row's max.
    w, u [C]; k, v [B, T, C] -> [B, T, C] in v's dtype (computed in float32 or wider)."""
    dtype = jnp.promote_types(jnp.result_type(w, u, k, v), jnp.float32)
    w, u, k32, v32 = (jnp.asarray(x).astype(dtype) for x in (w, u, k, v))
    T = k.shape[1]
    t = jnp.arange(T)[:, None]
    i = jnp.arange(T)[None, :]
    distance = (t - 1 - i).astype(dtype)  # [T, T]
    logits = -distance[None, :, :, None] * w + k32[:, None, :, :]  # [B, t, i, C]
    logits = jnp.where((i == t)[None, :, :, None], u + k32[:, :, None, :], logits)
    weights = masked_softmax(logits, (i <= t)[None, :, :, None], axis=2)
    y = jnp.sum(weights * v32[:, None, :, :], axis=2)
    return y.astype(v.dtype)
