"""H3: FFT kernels against the step-by-step recurrences, causality, the module, its init."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jattn import reference
from jattn.mixers import h3 as h3lib
from jattn.mixers.h3 import ShiftSSM, diag_ssm_kernel, h3_mix, h3_ssm
from jattn.nn import H3
from tests.conftest import h3_inputs, normal, normalised_error, output_and_vjp, to64


# The shift state shorter (5) and longer (16) than the length, 13.
@pytest.mark.parametrize("discretization,M", [("bilinear", 5), ("zoh", 16)])
def test_fft_path_matches_recurrence_float64(discretization, M):
    with jax.enable_x64(True):
        (q, k, v), shift, diag = to64(h3_inputs(jnp.float64, M=M))
        cotangent = normal(7, q.shape, jnp.float64)
        args = (q, k, v, shift, diag)
        got, g_got = output_and_vjp(
            functools.partial(h3_ssm, discretization=discretization), cotangent)(*args)
        want, g_want = output_and_vjp(
            functools.partial(reference.h3_ssm, discretization=discretization), cotangent)(*args)
        assert normalised_error(got, want) < 1e-12
        for a, w in zip(jax.tree.leaves(g_got), jax.tree.leaves(g_want), strict=True):
            assert normalised_error(a, w) < 1e-11


def test_float32_path_matches_float64_reference():
    (q, k, v), shift, diag = h3_inputs(jnp.float32)
    got = jax.jit(h3_ssm)(q, k, v, shift, diag)
    assert got.dtype == jnp.float32
    with jax.enable_x64(True):
        want = jax.jit(reference.h3_ssm)(*to64((q, k, v, shift, diag)))
    assert normalised_error(got, want) < 2e-5


def test_shift_kernel_with_e1_is_the_taps():
    C = normal(1, (2, 3, 6))
    e1 = jnp.zeros_like(C).at[..., 0].set(1.0)
    ssm = ShiftSSM(e1, C, jnp.zeros((2, 3)))
    np.testing.assert_allclose(h3lib.shift_ssm_kernel(ssm, 10)[:6], jnp.moveaxis(C, -1, 0),
                               atol=1e-6)
    np.testing.assert_array_equal(h3lib.shift_ssm_kernel(ssm, 10)[6:], 0.0)
    np.testing.assert_allclose(h3lib.shift_ssm_kernel(ssm, 4), jnp.moveaxis(C, -1, 0)[:4],
                               atol=1e-6)


def test_zoh_kernel_is_the_closed_form():
    """K[l] = 2 Re(sum_z C_z (exp(dt A_z) - 1) / A_z exp(dt A_z l)) with B = 1."""
    _, _, diag = h3_inputs(jnp.float32)
    diag = diag._replace(B=jnp.zeros_like(diag.B).at[..., 0].set(1.0))
    dt = np.exp(np.asarray(diag.log_dt, np.float64))[:, None, None]
    A = (-np.exp(np.asarray(diag.log_A_real, np.float64))
         + 1j * np.asarray(diag.A_imag, np.float64))[..., None]
    C = (np.asarray(diag.C[..., 0], np.float64) + 1j * np.asarray(diag.C[..., 1]))[..., None]
    lags = np.arange(9)
    want = 2 * (C * (np.exp(dt * A) - 1) / A * np.exp(dt * A * lags)).sum(1).real  # [N, L]
    got = diag_ssm_kernel(diag, 9, discretization="zoh")
    np.testing.assert_allclose(got, want.T, rtol=1e-4, atol=1e-6)


def _assert_causal(fn, x, t=6):
    fn = jax.jit(fn)
    x2 = x.at[:, t + 1:].set(normal(9, x[:, t + 1:].shape))
    y, y2 = fn(x), fn(x2)
    np.testing.assert_allclose(y[:, :t + 1], y2[:, :t + 1], rtol=1e-5, atol=1e-5)
    assert not np.allclose(y[:, t + 1:], y2[:, t + 1:], atol=1e-5)


def test_h3_is_causal():
    (q, k, v), shift, diag = h3_inputs()
    _assert_causal(lambda x: h3_ssm(x, x, x, shift, diag), q)
    _assert_causal(lambda x: h3_ssm(q, x, v, shift, diag), k)  # through the shift SSM only
    module = H3(8, l_max=16, rngs=nnx.Rngs(0))
    _assert_causal(lambda x: nnx.merge(*nnx.split(module))(x),
                   normal(3, (2, 16, 8)))


def test_module_equals_functional_call_on_its_parameters():
    module = H3(8, l_max=16, head_dim=2, d_state=6, rngs=nnx.Rngs(1))
    u = normal(2, (2, 12, 8))

    def project(layer):
        return (u @ layer.kernel[...] + layer.bias[...]).reshape(2, 12, 4, 2)

    q, k, v = project(module.q_proj), project(module.k_proj), project(module.v_proj)
    y = jax.jit(reference.h3_ssm)(q, k, v, module.shift_ssm(), module.diag_ssm())
    want = y.reshape(2, 12, 8) @ module.out_proj.kernel[...] + module.out_proj.bias[...]
    np.testing.assert_allclose(nnx.jit(lambda m, x: m(x))(module, u), want, atol=2e-5)


def test_initialisation_is_s4d_lin_and_shift_e1():
    m = H3(64, l_max=32, rngs=nnx.Rngs(3))  # Zoology: head_dim 2, d_state = l_max
    heads, modes = 32, 16
    assert m.num_heads == heads and m.head_dim == 2
    assert m.shift_C.shape == (heads, 2, 32) and m.C.shape == (heads, modes, 2)
    dt = jnp.exp(m.log_dt[...])
    assert float(dt.min()) >= 1e-3 * 0.999 and float(dt.max()) <= 1e-1 * 1.001
    assert float(dt.max() / dt.min()) > 10  # spread log-uniformly over the range
    np.testing.assert_allclose(-jnp.exp(m.log_A_real[...]), -0.5)
    np.testing.assert_allclose(m.A_imag[...], jnp.tile(math.pi * jnp.arange(modes),
                                                        (heads, 1)), rtol=1e-6)
    np.testing.assert_array_equal(m.B[...][..., 0], 1.0)
    np.testing.assert_array_equal(m.B[...][..., 1], 0.0)
    assert 0.6 < float(jnp.std(m.C[...])) < 0.8  # complex standard normal: parts var 1/2
    np.testing.assert_array_equal(m.shift_B[...][..., 0], 1.0)
    np.testing.assert_array_equal(m.shift_B[...][..., 1:], 0.0)
    assert float(jnp.abs(m.shift_C[...]).max()) <= 1 / math.sqrt(32)
    assert m.D.shape == (heads,) and m.shift_D.shape == (heads, 2)


def test_jit_vmap_grad():
    (q, k, v), shift, diag = h3_inputs()
    expected = jax.jit(h3_ssm)(q, k, v, shift, diag)
    batched = jax.jit(jax.vmap(
        lambda a, b, c: h3_ssm(a[None], b[None], c[None], shift, diag)[0]))
    np.testing.assert_allclose(batched(q, k, v), expected, atol=1e-5)
    grads = jax.jit(jax.grad(lambda s, d: h3_ssm(q, k, v, s, d).sum(), argnums=(0, 1)))(
        shift, diag)
    assert all(bool(jnp.isfinite(g).all()) for g in jax.tree.leaves(grads))


@pytest.mark.parametrize("call,name,error", [
    (lambda q, k, v, sk, dk, D, sD: h3_mix(q, k[:, :-1], v, sk, dk, D, sD), "k", ValueError),
    (lambda q, k, v, sk, dk, D, sD: h3_mix(q.astype(jnp.int32), k, v, sk, dk, D, sD), "q",
     TypeError),
    (lambda q, k, v, sk, dk, D, sD: h3_mix(q, k, v, sk[:5], dk, D, sD), "shift_kernel",
     ValueError),
    (lambda q, k, v, sk, dk, D, sD: h3_mix(q, k, v, sk, dk[:, :2], D, sD), "diag_kernel",
     ValueError),
    (lambda q, k, v, sk, dk, D, sD: h3_mix(q, k, v, sk, dk, D[:2], sD), "D", ValueError),
    (lambda q, k, v, sk, dk, D, sD: h3_mix(q, k, v, sk, dk, D, sD[:, :1]), "shift_D",
     ValueError),
    (lambda q, k, v, sk, dk, D, sD: h3_mix(q[0], k[0], v[0], sk, dk, D, sD), "v", ValueError),
])
def test_bad_input_to_mix(call, name, error):
    (q, k, v), shift, diag = h3_inputs()
    sk, dk = h3lib.shift_ssm_kernel(shift, 13), diag_ssm_kernel(diag, 13)
    with pytest.raises(error, match=rf"^{name}:"):
        call(q, k, v, sk, dk, diag.D, shift.D)


def test_bad_ssm_parameters_and_options():
    (q, k, v), shift, diag = h3_inputs()
    with pytest.raises(ValueError, match=r"^discretization:"):
        diag_ssm_kernel(diag, 8, discretization="euler")
    with pytest.raises(ValueError, match=r"^length:"):
        diag_ssm_kernel(diag, 0)
    with pytest.raises(ValueError, match=r"^ssm.C:"):
        diag_ssm_kernel(diag._replace(C=diag.C[:, :2]), 8)
    with pytest.raises(ValueError, match=r"^ssm.B:"):
        h3lib.shift_ssm_kernel(shift._replace(B=shift.B[..., :2]), 8)
    with pytest.raises(ValueError, match=r"^shift.C:"):
        h3_ssm(q, k, v, shift._replace(C=shift.C[:2]), diag)
    with pytest.raises(ValueError, match=r"^diag.log_dt:"):
        h3_ssm(q, k, v, shift, diag._replace(log_dt=diag.log_dt[:2]))
    with pytest.raises(ValueError, match=r"^head_dim:"):
        H3(8, 16, head_dim=3, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"^d_state:"):
        H3(8, 16, d_state=1, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"^u:"):
        H3(8, 16, rngs=nnx.Rngs(0))(jnp.ones((1, 17, 8)))
