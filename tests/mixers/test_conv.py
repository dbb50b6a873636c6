"""Convolutional mixers: fast paths against the direct convolution, causality, modules."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jattn import reference
from jattn.mixers import conv
from jattn.nn import BaseConv, Hyena, ImplicitLongConv, ShortConv


def _rand(seed, *shape, dtype=jnp.float32):
    return jax.random.normal(jax.random.key(seed), shape, dtype)


@pytest.mark.parametrize("batch,length", [(2, 19), (1, 19), (1, 2), (3, 1)])
def test_short_conv_matches_direct_convolution(batch, length):
    """Both the batched and the one-sequence ([L, D]) forms, and a kernel longer than the
    sequence; values, gradients and forward-mode tangents (its custom JVP) against a direct
    convolution in float64."""
    with jax.enable_x64(True):
        x, k, b = (_rand(0, batch, length, 5, dtype=jnp.float64),
                   _rand(1, 4, 5, dtype=jnp.float64), _rand(2, 5, dtype=jnp.float64))
        got = conv.short_causal_conv(x, k, b)
        want = reference.causal_conv(x, k[::-1]) + b  # last tap is the current input
        np.testing.assert_allclose(got, want, atol=1e-12)
        r = _rand(3, batch, length, 5, dtype=jnp.float64)
        grads = jax.grad(lambda *a: jnp.sum(conv.short_causal_conv(*a) * r), (0, 1, 2))(x, k, b)
        want = jax.grad(lambda x, k, b: jnp.sum((reference.causal_conv(x, k[::-1]) + b) * r),
                        (0, 1, 2))(x, k, b)
        for g, w in zip(grads, want, strict=True):
            np.testing.assert_allclose(g, w, atol=1e-12)
        tangents = (_rand(4, batch, length, 5, dtype=jnp.float64),
                    _rand(5, 4, 5, dtype=jnp.float64))
        got = jax.jvp(lambda x, k: conv.short_causal_conv(x, k, b), (x, k), tangents)[1]
        want = jax.jvp(lambda x, k: reference.causal_conv(x, k[::-1]), (x, k), tangents)[1]
        np.testing.assert_allclose(got, want, atol=1e-12)


@pytest.mark.parametrize("form", ["fft", "direct"])
@pytest.mark.parametrize("dtype,tol", [(jnp.float64, 1e-10), (jnp.float32, 2e-5)])
def test_long_conv_matches_direct_convolution(form, dtype, tol):
    with jax.enable_x64(True):
        x, h = _rand(3, 2, 33, 6, dtype=dtype), _rand(4, 40, 6, dtype=dtype)
        got = conv.long_causal_conv(x, h, form=form)
        x64, h64 = np.asarray(x, np.float64), np.asarray(h, np.float64)
        want = np.stack([np.stack([np.convolve(x64[b, :, d], h64[:, d])[:33]
                                   for d in range(6)], -1) for b in range(2)])
        assert got.dtype == dtype
        np.testing.assert_allclose(got, want, atol=tol * float(np.abs(want).max()))
        grad = jax.grad(lambda x, h: (conv.long_causal_conv(x, h, form=form) ** 2).sum(),
                        (0, 1))(x, h)
        grad_want = jax.grad(lambda x, h: (reference.causal_conv(x, h[:33]) ** 2).sum(),
                             (0, 1))(x.astype(jnp.float64), h.astype(jnp.float64))
        for g, w in zip(grad, grad_want, strict=True):
            np.testing.assert_allclose(g, w, atol=tol * 10 * float(jnp.abs(w).max()))


def test_long_conv_auto_picks_by_length():
    """"auto" equals the named forms (direct up to L=64, FFT beyond)."""
    for L in (64, 65):
        x, h = _rand(9, 1, L, 3), _rand(10, L, 3)
        np.testing.assert_allclose(conv.long_causal_conv(x, h),
                                   conv.long_causal_conv(x, h, form="fft"), atol=1e-4)
    with pytest.raises(ValueError, match=r"^form"):
        conv.long_causal_conv(x, h, form="winograd")


def _assert_causal(fn, L=24, D=4, t=11):
    """Changing inputs after t leaves outputs up to t unchanged (and changes a later one)."""
    x = _rand(5, 2, L, D)
    x2 = x.at[:, t + 1:].set(_rand(6, 2, L - t - 1, D))
    y, y2 = fn(x), fn(x2)
    np.testing.assert_allclose(y[:, :t + 1], y2[:, :t + 1], atol=1e-5)
    assert not np.allclose(y[:, t + 1:], y2[:, t + 1:])


def test_functions_are_causal():
    _assert_causal(lambda x: conv.short_causal_conv(x, _rand(7, 3, 4)))
    _assert_causal(lambda x: conv.long_causal_conv(x, _rand(8, 24, 4), form="fft"))
    _assert_causal(lambda x: conv.long_causal_conv(x, _rand(8, 24, 4), form="direct"))


@pytest.mark.parametrize("kernel_size", [3, -1])
def test_base_conv_is_causal_and_equals_its_definition(kernel_size):
    module = BaseConv(4, l_max=24, kernel_size=kernel_size, rngs=nnx.Rngs(0))
    _assert_causal(module)
    u = _rand(9, 2, 24, 4)
    want = module.conv(u) * (u @ module.projection.kernel[...] + module.projection.bias[...]) + u
    np.testing.assert_allclose(module(u), want, atol=1e-6)


def test_implicit_long_conv_is_the_fft_conv_of_its_filter():
    module = ImplicitLongConv(6, l_max=32, rngs=nnx.Rngs(1))
    x = _rand(10, 2, 20, 6)
    h = module.filter(20)
    assert h.shape == (20, 6)
    np.testing.assert_allclose(h, module.filter(32)[:20], atol=1e-6)  # a prefix
    np.testing.assert_allclose(module(x), reference.causal_conv(x, h) + x, atol=1e-5)
    # The modulation decays the filter: later taps are smaller on average.
    full = jnp.abs(module.filter(32))
    assert float(full[-8:].mean()) < float(full[:8].mean())
    with pytest.raises(ValueError, match="l_max"):
        module.filter(33)


def test_short_conv_module_and_gradients():
    module = ShortConv(4, 3, rngs=nnx.Rngs(2))
    x = _rand(11, 1, 9, 4)
    np.testing.assert_allclose(
        module(x), conv.short_causal_conv(x, module.kernel[...], module.bias[...]), atol=1e-6)
    grads = nnx.grad(lambda m: (m(x) ** 2).sum())(module)
    assert jnp.isfinite(grads.kernel[...]).all() and grads.kernel[...].shape == (3, 4)


@pytest.mark.parametrize("call,error,name", [
    (lambda: conv.short_causal_conv(jnp.zeros((2, 5)), jnp.zeros((3, 5))), ValueError, "x"),
    (lambda: conv.short_causal_conv(jnp.zeros((1, 5, 4)), jnp.zeros((3, 5))), ValueError,
     "kernel"),
    (lambda: conv.short_causal_conv(jnp.zeros((1, 5, 4), jnp.int32), jnp.zeros((3, 4))),
     TypeError, "x"),
    (lambda: conv.long_causal_conv(jnp.zeros((1, 5, 4)), jnp.zeros((4, 4))), ValueError, "filt"),
    (lambda: conv.positional_features(8, 4), ValueError, "emb_dim"),
    (lambda: conv.hyena_mix(*[jnp.zeros((1, 5, 4))] * 3, jnp.zeros((5, 4)), jnp.zeros(3)),
     ValueError, "skip"),
    (lambda: conv.hyena_mix(jnp.zeros((1, 5, 3)), *[jnp.zeros((1, 5, 4))] * 2,
                            jnp.zeros((5, 4)), jnp.zeros(4)), ValueError, "x1"),
    (lambda: BaseConv(4, 8, kernel_size=0, rngs=nnx.Rngs(0)), ValueError, "kernel_size"),
])
def test_bad_input(call, error, name):
    with pytest.raises(error, match=name):
        call()


def test_hyena_is_causal_and_equals_its_definition():
    module = Hyena(4, l_max=24, filter_order=8, rngs=nnx.Rngs(3))
    _assert_causal(module)
    u = _rand(12, 2, 24, 4)
    proj = u @ module.in_proj.kernel[...] + module.in_proj.bias[...]
    k = module.short_conv.kernel[...]
    z = reference.causal_conv(proj, k[::-1]) + module.short_conv.bias[...]
    x1, x2, v = z[..., :4], z[..., 4:8], z[..., 8:]
    gated = x1 * v
    inner = x2 * (reference.causal_conv(gated, module.filter(24)) + module.skip[...] * gated)
    want = inner @ module.out_proj.kernel[...] + module.out_proj.bias[...]
    np.testing.assert_allclose(module(u), want, atol=2e-5)
