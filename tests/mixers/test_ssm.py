"""Selective scan: the associative scan against the sequential recurrence; the Mamba block."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jattn import reference
from jattn.mixers import selective_scan
from jattn.nn import Mamba
from tests.conftest import scan_inputs


# L=37: one chunk (None, 64) or chunks of 8 with a partial last one (the padding path).
@pytest.mark.parametrize("chunk_size", [None, 8, 64])
@pytest.mark.parametrize("dtype,tol", [(jnp.float64, 1e-12), (jnp.float32, 2e-5)])
def test_associative_scan_matches_sequential_recurrence(dtype, tol, chunk_size):
    with jax.enable_x64(True):
        args = scan_inputs(dtype)
        scan = functools.partial(selective_scan, chunk_size=chunk_size)
        want = reference.selective_scan(*(a.astype(jnp.float64) for a in args))
        np.testing.assert_allclose(scan(*args), want, atol=tol)

        def loss(fn):
            return lambda *a: (fn(*a) ** 2).sum()

        got_grads = jax.grad(loss(scan), argnums=range(6))(*args)
        want_grads = jax.grad(loss(reference.selective_scan), argnums=range(6))(
            *(a.astype(jnp.float64) for a in args))
        for g, w in zip(got_grads, want_grads, strict=True):
            np.testing.assert_allclose(g, w, atol=tol * 50 * max(1.0, float(jnp.abs(w).max())))


def test_scan_is_causal():
    u, delta, A, B, C, D = scan_inputs(jnp.float32)
    y = selective_scan(u, delta, A, B, C, D)
    u2 = u.at[:, 20:].set(0.0)
    y2 = selective_scan(u2, delta, A, B, C, D)
    np.testing.assert_allclose(y[:, :20], y2[:, :20], atol=1e-6)
    assert not np.allclose(y[:, 20:], y2[:, 20:])


def test_mamba_block_is_causal_and_equals_its_definition():
    m = Mamba(8, rngs=nnx.Rngs(0))
    u = jax.random.normal(jax.random.key(1), (2, 16, 8))
    x, z = jnp.split(u @ m.in_proj.kernel[...], 2, axis=-1)
    x = jax.nn.silu(reference.causal_conv(x, m.conv.kernel[...][::-1]) + m.conv.bias[...])
    dbc = x @ m.x_proj.kernel[...]
    dt, B, C = dbc[..., :1], dbc[..., 1:17], dbc[..., 17:]
    delta = jax.nn.softplus(dt @ m.dt_proj.kernel[...] + m.dt_proj.bias[...])
    y = reference.selective_scan(x, delta, -jnp.exp(m.A_log[...]), B, C, m.D[...])
    want = (y * jax.nn.silu(z)) @ m.out_proj.kernel[...]
    np.testing.assert_allclose(m(u), want, atol=1e-5)
    u2 = u.at[:, 9:].set(1.0)
    np.testing.assert_allclose(m(u)[:, :9], m(u2)[:, :9], atol=1e-6)


def test_mamba_initial_step_sizes():
    m = Mamba(32, rngs=nnx.Rngs(2))
    dt = jax.nn.softplus(m.dt_proj.bias[...])
    assert m.A_log.shape == (64, 16) and m.dt_rank == 2
    assert float(dt.min()) >= 1e-3 * 0.999 and float(dt.max()) <= 1e-1 * 1.001


@pytest.mark.parametrize("change,name", [
    ({"delta": jnp.ones((2, 36, 5))}, "delta"),
    ({"A": jnp.ones((4, 4))}, "A"),
    ({"B": jnp.ones((2, 37, 3))}, "B"),
    ({"D": jnp.ones((4,))}, "D"),
    ({"chunk_size": 0}, "chunk_size"),
])
def test_bad_input(change, name):
    u, delta, A, B, C, D = scan_inputs(jnp.float32)
    args = {"u": u, "delta": delta, "A": A, "B": B, "C": C, "D": D} | change
    with pytest.raises(ValueError, match=name):
        selective_scan(**args)
