"""H3 (Hungry Hungry Hippos): a shift SSM and a diagonal SSM around a multiplicative gate.

Per head (N heads of P = head_dim channels; layout [B, L, N, P])::

    k'      = shift_ssm(k) + shift_D * k                      (per channel, P of them per head)
    kv[t]   = k'[t] v[t]^T                                    (P x P channels per head)
    y[t]    = q[t]^T (diag_ssm(kv)[t] + D * kv[t])            (contract the first P axis)

Both SSMs are linear and time-invariant, so each is a causal convolution with the SSM's
impulse response K[l] = C A^l B, computed once and applied as a long convolution
(``jattn.mixers.conv.long_causal_conv``).

* Shift SSM (state size M = d_state): A is the down-shift matrix, so the state is the last
  M inputs weighted by B, and K[l] = sum_m B[m] C[m + l] for l < M, 0 after. With B = e_1
  (its initial value) K is the taps C padded with zeros to the length.
* Diagonal SSM, S4D (Z = d_state // 2 complex modes, each standing for a conjugate pair):
  A_z = -exp(log_A_real_z) + i A_imag_z, step dt = exp(log_dt) per head, and

  ::

      K[l] = 2 Re( sum_z C_z dB_z dA_z^l )
      bilinear (default, as in the public code): dA = (1 + dt A/2) / (1 - dt A/2),
                                                 dB = B dt / (1 - dt A/2)
      zero-order hold ("zoh"):                   dA = exp(dt A),  dB = B (exp(dt A) - 1) / A

  S4D-Lin initialisation: A_z = -1/2 + i pi z, B_z = 1, C_z complex standard normal,
  log dt uniform in [log 1e-3, log 1e-1].

``jattn.reference.h3_ssm`` runs both recurrences one step at a time; the tests compare.

Decoding (``h3_prefill`` then ``h3_step``) keeps the recurrent state instead: the shift
SSM's last M - 1 inputs k and the diagonal SSM's complex state x [B, N, Z, P, P] over kv,
so a new token costs O(M + Z P^2) per head whatever the length so far.

Notes on the public code (HazyResearch/H3 ``src/models/ssm``, copied into Zoology's
``zoology/mixers/h3``), which this follows:

* Zoology configures H3 with ``d_state = l_max = L`` and ``head_dim = 2`` and passes no kernel
  options, so the diagonal kernel uses ``disc='bilinear'`` (the S4D kernel's default), not
  zero-order hold. Both are offered here; ``"bilinear"`` is the default.
* Learned: q/k/v/out projections, the shift SSM's B (initialised to e_1) and C, its skip
  ``shift_D`` (standard normal, one per channel), the diagonal SSM's log dt, A (real part
  through its log, imaginary part directly), B, C, and its skip D (standard normal, one per
  head). Complex B and C are stored as (real, imaginary) pairs, as the original stores them.

References:
    P24 Zoology (H3 as configured there: head_dim 2, d_state = L); H3, "Hungry Hungry Hippos:
    Towards Language Modeling with State Space Models"; S4D, "On the Parameterization and
    Initialization of Diagonal State Space Models".
"""

from __future__ import annotations

from typing import NamedTuple

import jax.numpy as jnp
from jax import lax

from jattn.core.shapes import Array, check_floating, check_rank, check_shape
from jattn.mixers.conv import causal_conv_step, conv_history, long_causal_conv

DISCRETIZATIONS = ("bilinear", "zoh")


class ShiftSSM(NamedTuple):
    """Parameters of the shift SSM applied to k, one SSM per channel."""

    B: Array  # [N, P, M] input vector (e_1 at initialisation)
    C: Array  # [N, P, M] output taps
    D: Array  # [N, P] skip weight


class H3State(NamedTuple):
    """Decoding state of :func:`h3_step`."""

    shift: Array  # [B, M - 1, N * P]: the last M - 1 inputs k of the shift SSM
    diag: Array  # complex [B, N, Z, P, P]: the diagonal SSM's state over kv


class DiagonalSSM(NamedTuple):
    """Parameters of the diagonal (S4D) SSM applied to k v^T, one SSM per head."""

    log_dt: Array  # [N] log step size
    log_A_real: Array  # [N, Z] A = -exp(log_A_real) + i A_imag
    A_imag: Array  # [N, Z]
    B: Array  # [N, Z, 2] complex input vector as (real, imaginary)
    C: Array  # [N, Z, 2] complex output vector as (real, imaginary)
    D: Array  # [N] skip weight


def _complex(x: Array) -> Array:
    return lax.complex(x[..., 0], x[..., 1])


def _check_length(length: int) -> None:
    if not isinstance(length, int) or length < 1:
        raise ValueError(f"length: expected a positive int, got {length!r}")


def shift_ssm_kernel(ssm: ShiftSSM, length: int) -> Array:
    """K[l, n, p] = sum_m B[n, p, m] C[n, p, m + l] for l < M, zero for M <= l < length.

    The impulse response of x_t = shift(x_{t-1}) + B u_t, y_t = <C, x_t> (``shift`` moves
    every state entry one place down and drops the last). With B = e_1, K = C padded.

    Args:
        ssm: :class:`ShiftSSM` with B, C [N, P, M] (D is not used here).
        length: number of taps to return.

    Returns:
        [length, N, P] in float32 (or wider).

    Raises:
        ValueError: B and C of different or wrong shapes, a length that is not positive.

    >>> import jax.numpy as jnp
    >>> ssm = ShiftSSM(jnp.array([[[1.0, 0.0]]]), jnp.array([[[3.0, 4.0]]]), jnp.ones((1, 1)))
    >>> shift_ssm_kernel(ssm, 3)[:, 0, 0]
    Array([3., 4., 0.], dtype=float32)

    References:
        H3, "Hungry Hungry Hippos" (the shift SSM); P24 Zoology.
    """
    _check_length(length)
    check_rank("ssm.C", ssm.C, (3,), "[N, P, M]")
    check_floating("ssm.C", ssm.C)
    check_shape("ssm.B", ssm.B, ssm.C.shape, "NPM")
    M = ssm.C.shape[2]
    dtype = jnp.promote_types(ssm.C.dtype, jnp.float32)
    B, C = ssm.B.astype(dtype), ssm.C.astype(dtype)
    # Cross-correlation of C with B by a 2M-point FFT (no wrap-around for lags < M).
    spectrum = jnp.conj(jnp.fft.rfft(B, n=2 * M, axis=-1)) * jnp.fft.rfft(C, n=2 * M, axis=-1)
    taps = jnp.fft.irfft(spectrum, n=2 * M, axis=-1)[..., :min(M, length)]
    taps = jnp.moveaxis(taps, -1, 0)  # [taps, N, P]
    return jnp.pad(taps, ((0, length - taps.shape[0]), (0, 0), (0, 0)))


def discretize(ssm: DiagonalSSM, discretization: str = "bilinear") -> tuple[Array, Array]:
    """The discrete diagonal SSM: (dA, dB), complex [N, Z] each.

    x_t = dA x_{t-1} + dB u_t and y_t = 2 Re <C, x_t> is the SSM's discrete recurrence, with
    dt = exp(log_dt), A = -exp(log_A_real) + i A_imag and

        bilinear: dA = (1 + dt A/2) / (1 - dt A/2),  dB = B dt / (1 - dt A/2)
        zoh:      dA = exp(dt A),                    dB = B (exp(dt A) - 1) / A

    Args:
        ssm: :class:`DiagonalSSM` (C and D are not used here).
        discretization: ``"bilinear"`` (the public code's default) or ``"zoh"``.

    Returns:
        (dA, dB), complex64 (or complex128 for float64 parameters), [N, Z] each.

    Raises:
        ValueError: an unknown discretization.

    >>> import jax.numpy as jnp
    >>> ssm = DiagonalSSM(jnp.zeros(1), jnp.zeros((1, 1)), jnp.zeros((1, 1)),
    ...                   jnp.array([[[1.0, 0.0]]]), jnp.zeros((1, 1, 2)), jnp.zeros(1))
    >>> dA, dB = discretize(ssm)  # dt = 1, A = -1
    >>> float(dA.real[0, 0]), float(dB.real[0, 0])
    (0.3333333432674408, 0.6666666865348816)

    References:
        S4D, "On the Parameterization and Initialization of Diagonal State Space Models".
    """
    if discretization not in DISCRETIZATIONS:
        raise ValueError(f"discretization: expected one of {DISCRETIZATIONS}, "
                         f"got {discretization!r}")
    dtype = jnp.promote_types(ssm.log_dt.dtype, jnp.float32)
    dt = jnp.exp(ssm.log_dt.astype(dtype))[:, None]
    A = lax.complex(-jnp.exp(ssm.log_A_real.astype(dtype)), ssm.A_imag.astype(dtype))
    B = _complex(ssm.B.astype(dtype))
    dtA = dt * A
    if discretization == "zoh":
        return jnp.exp(dtA), B * (jnp.exp(dtA) - 1) / A
    return (1 + dtA / 2) / (1 - dtA / 2), B * dt / (1 - dtA / 2)


def _check_diagonal(ssm: DiagonalSSM) -> None:
    check_rank("ssm.log_dt", ssm.log_dt, (1,), "[N]")
    check_floating("ssm.log_dt", ssm.log_dt)
    N = ssm.log_dt.shape[0]
    check_rank("ssm.log_A_real", ssm.log_A_real, (2,), "[N, Z]")
    if ssm.log_A_real.shape[0] != N:
        raise ValueError(f"ssm.log_A_real: expected [N={N}, Z], got {ssm.log_A_real.shape}")
    Z = ssm.log_A_real.shape[1]
    check_shape("ssm.A_imag", ssm.A_imag, (N, Z), "NZ")
    check_shape("ssm.B", ssm.B, (N, Z, 2), "NZ2")
    check_shape("ssm.C", ssm.C, (N, Z, 2), "NZ2")


def diag_ssm_kernel(ssm: DiagonalSSM, length: int, *,
                    discretization: str = "bilinear") -> Array:
    """K[l, n] = 2 Re( sum_z C[n, z] dB[n, z] dA[n, z]^l ), l = 0 .. length - 1.

    Args:
        ssm: :class:`DiagonalSSM` (D is not used here).
        length: number of taps.
        discretization: ``"bilinear"`` (the public code's default) or ``"zoh"``.

    Returns:
        [length, N] in float32 (or wider). Memory O(N Z length) (a Vandermonde matrix).

    Raises:
        ValueError: parameter shapes that disagree, a length that is not positive, an
            unknown discretization.

    >>> import jax.numpy as jnp
    >>> ssm = DiagonalSSM(jnp.log(jnp.array([0.1])), jnp.log(jnp.full((1, 1), 0.5)),
    ...                   jnp.zeros((1, 1)), jnp.array([[[1.0, 0.0]]]),
    ...                   jnp.array([[[0.5, 0.0]]]), jnp.ones(1))
    >>> diag_ssm_kernel(ssm, 3, discretization="zoh")[:, 0].round(4)  # ~ dt e^{-dt l / 2}
    Array([0.0975, 0.0928, 0.0883], dtype=float32)

    References:
        S4D (the Vandermonde form of the kernel); P24 Zoology (H3's diagonal SSM).
    """
    _check_length(length)
    _check_diagonal(ssm)
    dA, dB = discretize(ssm, discretization)
    weights = _complex(ssm.C.astype(dB.real.dtype)) * dB  # [N, Z]
    # dA^l as exp(l log dA): integer powers do not depend on the branch of the logarithm.
    powers = jnp.exp(jnp.log(dA)[..., None] * jnp.arange(length, dtype=dB.real.dtype))
    return 2 * jnp.einsum("nz,nzl->ln", weights, powers).real


def _check_mix(q, k, v) -> None:
    check_rank("v", v, (4,), "[B, L, N, P]")
    check_floating("v", v)
    for name, x in (("q", q), ("k", k)):
        check_shape(name, x, v.shape, "BLNP")
        check_floating(name, x)


def h3_mix(q: Array, k: Array, v: Array, shift_kernel: Array, diag_kernel: Array, D: Array,
           shift_D: Array | None = None) -> Array:
    """y[t, n, j] = sum_i q[t, n, i] ((K_d * kv)[t, n, i, j] + D[n] kv[t, n, i, j]).

    With k' = K_s * k + shift_D k and kv[t, n, i, j] = k'[t, n, i] v[t, n, j]; ``*`` is a
    causal convolution along time, by FFT.

    Args:
        q, k, v: [B, L, N, P] (N heads of P channels).
        shift_kernel: [L', N, P] with L' >= L (only the first L taps are used).
        diag_kernel: [L', N] with L' >= L, shared by the P x P channels of a head.
        D: [N] skip of the diagonal SSM.
        shift_D: [N, P] skip of the shift SSM, or None for none.

    Returns:
        [B, L, N, P] in v's dtype (the convolutions run in float32 or wider).

    Raises:
        ValueError: q, k, v of different shapes or not rank 4, kernels too short or of the
            wrong shape, skips of the wrong shape.
        TypeError: non-floating q, k or v.

    >>> import jax.numpy as jnp
    >>> x = jnp.ones((1, 3, 1, 1))
    >>> y = h3_mix(x, x, x, jnp.ones((3, 1, 1)), jnp.ones((3, 1)), jnp.zeros(1))
    >>> y[0, :, 0, 0].round(4)  # cumsum(cumsum(1))
    Array([1., 3., 6.], dtype=float32)

    References:
        H3, "Hungry Hungry Hippos" (multi-head H3); P24 Zoology (head_dim 2).
    """
    _check_mix(q, k, v)
    Bsz, L, N, P = v.shape
    check_rank("shift_kernel", shift_kernel, (3,), "[L, N, P]")
    if shift_kernel.shape[0] < L or shift_kernel.shape[1:] != (N, P):
        raise ValueError(f"shift_kernel: expected [L >= {L}, N={N}, P={P}], "
                         f"got {shift_kernel.shape}")
    check_rank("diag_kernel", diag_kernel, (2,), "[L, N]")
    if diag_kernel.shape[0] < L or diag_kernel.shape[1] != N:
        raise ValueError(f"diag_kernel: expected [L >= {L}, N={N}], got {diag_kernel.shape}")
    check_shape("D", D, (N,), "N")
    if shift_D is not None:
        check_shape("shift_D", shift_D, (N, P), "NP")

    dtype = jnp.promote_types(v.dtype, jnp.float32)
    q, k, v = (x.astype(dtype) for x in (q, k, v))
    shifted = long_causal_conv(k.reshape(Bsz, L, N * P),
                              shift_kernel[:L].reshape(L, N * P)).reshape(k.shape)
    if shift_D is not None:
        shifted = shifted + shift_D.astype(dtype) * k
    kv = shifted[..., :, None] * v[..., None, :]  # [B, L, N, P, P]
    filt = jnp.broadcast_to(diag_kernel[:L, :, None], (L, N, P * P)).reshape(L, N * P * P)
    state = long_causal_conv(kv.reshape(Bsz, L, N * P * P), filt).reshape(kv.shape)
    state = state + D.astype(dtype)[:, None, None] * kv
    return jnp.einsum("blni,blnij->blnj", q, state).astype(v.dtype)


def h3_ssm(q: Array, k: Array, v: Array, shift: ShiftSSM, diag: DiagonalSSM, *,
       discretization: str = "bilinear") -> Array:
    """The H3 mixing of q, k, v with the two SSMs' kernels computed from their parameters.

    ``h3_mix(q, k, v, shift_ssm_kernel(shift, L), diag_ssm_kernel(diag, L), diag.D,
    shift.D)``; see the module docstring for the maths.

    Args:
        q, k, v: [B, L, N, P].
        shift: :class:`ShiftSSM` with B, C [N, P, M], D [N, P].
        diag: :class:`DiagonalSSM` with log_dt [N], log_A_real, A_imag [N, Z], B, C
            [N, Z, 2], D [N].
        discretization: ``"bilinear"`` (default, as the public code) or ``"zoh"``.

    Returns:
        [B, L, N, P] in v's dtype.

    Raises:
        ValueError, TypeError: as :func:`h3_mix`, :func:`shift_ssm_kernel` and
            :func:`diag_ssm_kernel`; SSM parameters whose N or P disagree with q, k, v.

    >>> import jax, jax.numpy as jnp
    >>> x = jax.random.normal(jax.random.key(0), (2, 8, 3, 2))
    >>> shift = ShiftSSM(jnp.zeros((3, 2, 8)).at[..., 0].set(1), jnp.ones((3, 2, 8)),
    ...                  jnp.ones((3, 2)))
    >>> diag = DiagonalSSM(jnp.full((3,), -3.0), jnp.full((3, 4), jnp.log(0.5)),
    ...                    jnp.pi * jnp.arange(4.0) * jnp.ones((3, 1)),
    ...                    jnp.ones((3, 4, 2)), jnp.ones((3, 4, 2)), jnp.ones(3))
    >>> h3_ssm(x, x, x, shift, diag).shape
    (2, 8, 3, 2)

    References:
        H3, "Hungry Hungry Hippos"; P24 Zoology (H3 with d_state = L, head_dim 2).
    """
    _check_mix(q, k, v)
    _, L, N, P = v.shape
    if shift.C.ndim != 3 or shift.C.shape[:2] != (N, P):
        raise ValueError(f"shift.C: expected [N={N}, P={P}, M] to match v {v.shape}, "
                         f"got {shift.C.shape}")
    if diag.log_dt.shape != (N,):
        raise ValueError(f"diag.log_dt: expected [N={N}] to match v {v.shape}, "
                         f"got {diag.log_dt.shape}")
    return h3_mix(q, k, v, shift_ssm_kernel(shift, L),
                  diag_ssm_kernel(diag, L, discretization=discretization), diag.D, shift.D)


def _shifted(k: Array, shift: ShiftSSM, history: Array | None):
    """k' = shift_ssm(k) + shift_D k, [B, L, N, P] in float32 or wider, and the new
    history of the shift SSM (its last M - 1 inputs)."""
    Bsz, L, N, P = k.shape
    M = shift.C.shape[2]
    taps = shift_ssm_kernel(shift, M).reshape(M, N * P)
    flat = k.reshape(Bsz, L, N * P)
    if history is None:
        out, history = long_causal_conv(flat, jnp.pad(taps, ((0, max(0, L - M)), (0, 0)))), \
            conv_history(flat, M - 1)
    else:
        out, history = causal_conv_step(flat, taps, history)
    return out.reshape(k.shape) + shift.D.astype(out.dtype) * k, history


def h3_prefill(q: Array, k: Array, v: Array, shift: ShiftSSM, diag: DiagonalSSM, *,
               discretization: str = "bilinear") -> tuple[Array, H3State]:
    """:func:`h3_ssm` on a prompt, and the :class:`H3State` that :func:`h3_step` continues.

    The diagonal state after L inputs is x = sum_t dA^{L-1-t} dB kv[t], computed in parallel.

    Args:
        q, k, v: [B, L, N, P]; shift, diag, discretization: as :func:`h3_ssm`.

    Returns:
        (y [B, L, N, P], state).

    >>> import jax, jax.numpy as jnp
    >>> x = jax.random.normal(jax.random.key(0), (1, 5, 1, 2))
    >>> shift = ShiftSSM(jnp.ones((1, 2, 3)), jnp.ones((1, 2, 3)), jnp.ones((1, 2)))
    >>> diag = DiagonalSSM(jnp.zeros(1), jnp.zeros((1, 2)), jnp.ones((1, 2)),
    ...                    jnp.ones((1, 2, 2)), jnp.ones((1, 2, 2)), jnp.ones(1))
    >>> y, state = h3_prefill(x, x, x, shift, diag)
    >>> state.shift.shape, state.diag.shape
    ((1, 2, 2), (1, 1, 2, 2, 2))
    """
    y = h3_ssm(q, k, v, shift, diag, discretization=discretization)
    L = v.shape[1]
    shifted, history = _shifted(k, shift, None)
    kv = shifted[..., :, None] * v.astype(shifted.dtype)[..., None, :]
    dA, dB = discretize(diag, discretization)
    age = jnp.arange(L - 1, -1, -1, dtype=dB.real.dtype)  # L - 1 - t
    weights = dB[..., None] * jnp.exp(jnp.log(dA)[..., None] * age)  # [N, Z, L]
    state = jnp.einsum("nzl,blnij->bnzij", weights, kv.astype(weights.dtype))
    return y, H3State(history, state)


def h3_step(q: Array, k: Array, v: Array, shift: ShiftSSM, diag: DiagonalSSM, state: H3State,
            *, discretization: str = "bilinear") -> tuple[Array, H3State]:
    """The next T tokens of H3 from ``state`` (the recurrences, one token at a time).

    x_t = dA x_{t-1} + dB kv_t and y_t = q_t^T (2 Re <C, x_t> + D kv_t), with kv_t built
    from the shift SSM continued over its history.

    Args:
        q, k, v: [B, T, N, P] of the new tokens; shift, diag, discretization: as
            :func:`h3_ssm`; state: from :func:`h3_prefill` or a previous step.

    Returns:
        (y [B, T, N, P] in v's dtype, the new state).

    Raises:
        ValueError: a state whose shapes do not match q, k, v and the SSMs.
    """
    _check_mix(q, k, v)
    Bsz, _, N, P = v.shape
    _check_diagonal(diag)
    Z = diag.log_A_real.shape[1]
    if state.diag.shape != (Bsz, N, Z, P, P):
        raise ValueError(f"state.diag: expected [B={Bsz}, N={N}, Z={Z}, P={P}, P={P}], "
                         f"got {state.diag.shape}")
    shifted, history = _shifted(k, shift, state.shift)
    kv = shifted[..., :, None] * v.astype(shifted.dtype)[..., None, :]  # [B, T, N, P, P]
    dA, dB = discretize(diag, discretization)
    C = _complex(diag.C.astype(dB.real.dtype))

    def advance(x, kv_t):  # x [B, N, Z, P, P], kv_t [B, N, P, P]
        x = dA[..., None, None] * x + dB[..., None, None] * kv_t[:, :, None].astype(x.dtype)
        return x, 2 * jnp.einsum("nz,bnzij->bnij", C, x).real

    x, ssm = lax.scan(advance, state.diag.astype(dA.dtype), jnp.moveaxis(kv, 1, 0))
    total = jnp.moveaxis(ssm, 0, 1) + diag.D.astype(kv.dtype)[:, None, None] * kv
    y = jnp.einsum("btni,btnij->btnj", q.astype(kv.dtype), total).astype(v.dtype)
    return y, H3State(history, x)
