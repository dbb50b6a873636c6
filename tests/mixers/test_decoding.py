"""Decoding states of the attention-free mixers: continuing from a state equals the full
causal forward (against the plain references in float64), for the pure functions and for
every NNX mixer, and prefilling equals stepping from scratch."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jattn import reference
from jattn.mixers import (
    H3State,
    causal_conv_step,
    conv_history,
    h3_prefill,
    h3_step,
    selective_scan,
)
from jattn.nn import H3, BaseConv, Hyena, Mamba, RWKV4TimeMix, ShortConv
from tests.conftest import h3_inputs, normal, normalised_error, scan_inputs, to64

PIECES = (5, 1, 1, 1, 3)  # a prompt of 5, three single tokens, a block of 3: 11 in all


def _split(x, axis=1):
    return np.split(x, np.cumsum(PIECES)[:-1], axis=axis)


@pytest.mark.parametrize("taps", [1, 4, 16])  # no history, a short kernel, longer than L
def test_conv_step_continues_the_convolution(taps):
    with jax.enable_x64(True):
        x = normal(0, (2, sum(PIECES), 3), jnp.float64)
        filt = normal(1, (taps, 3), jnp.float64)
        history = conv_history(x[:, :0], taps - 1)
        pieces = []
        for piece in _split(x):
            y, history = causal_conv_step(piece, filt, history)
            pieces.append(y)
        want = reference.causal_conv(x, filt)
        assert normalised_error(jnp.concatenate(pieces, 1), want) < 1e-12
        np.testing.assert_array_equal(history, conv_history(x, taps - 1))


def test_conv_step_rejects_a_history_of_the_wrong_width():
    with pytest.raises(ValueError, match="history"):
        causal_conv_step(jnp.ones((1, 2, 3)), jnp.ones((4, 3)), jnp.zeros((1, 2, 3)))
    with pytest.raises(ValueError, match="width"):
        conv_history(jnp.ones((1, 2, 3)), -1)


@pytest.mark.parametrize("chunk_size", [None, 4])
def test_selective_scan_continues_from_its_state(chunk_size):
    with jax.enable_x64(True):
        u, delta, A, B, C, D = to64(scan_inputs(jnp.float64, L=sum(PIECES)))
        want = reference.selective_scan(u, delta, A, B, C, D)
        state, pieces = None, []
        for part in zip(*(_split(a) for a in (u, delta, B, C)), strict=True):
            pu, pdelta, pB, pC = part
            y, state = selective_scan(pu, pdelta, A, pB, pC, D, chunk_size=chunk_size,
                                      initial_state=state, return_state=True)
            pieces.append(y)
        assert normalised_error(jnp.concatenate(pieces, 1), want) < 1e-12
        with pytest.raises(ValueError, match="initial_state"):
            selective_scan(u, delta, A, B, C, D, initial_state=state[:, :1])


# The shift SSM shorter (5) and longer (16) than the 11 tokens.
@pytest.mark.parametrize("discretization,M", [("bilinear", 5), ("zoh", 16)])
def test_h3_prefill_and_steps_equal_the_recurrence(discretization, M):
    with jax.enable_x64(True):
        (q, k, v), shift, diag = to64(h3_inputs(jnp.float64, L=sum(PIECES), M=M))
        want = reference.h3_ssm(q, k, v, shift, diag, discretization=discretization)
        parts = list(zip(*(_split(a) for a in (q, k, v)), strict=True))
        y, state = h3_prefill(*parts[0], shift, diag, discretization=discretization)
        pieces = [y]
        step = jax.jit(functools.partial(h3_step, discretization=discretization))
        for part in parts[1:]:
            y, state = step(*part, shift, diag, state)
            pieces.append(y)
        assert normalised_error(jnp.concatenate(pieces, 1), want) < 1e-11

        # Stepping the prompt from an empty state reaches the state prefill computes.
        B, _, N, P = q.shape
        Z = diag.log_A_real.shape[1]
        empty = H3State(jnp.zeros((B, M - 1, N * P)), jnp.zeros((B, N, Z, P, P), jnp.complex128))
        _, from_scratch = step(*parts[0], shift, diag, empty)
        _, prefilled = h3_prefill(*parts[0], shift, diag, discretization=discretization)
        for a, b in zip(from_scratch, prefilled, strict=True):
            assert normalised_error(jnp.abs(a - b), jnp.zeros(a.shape)) < 1e-12


def test_h3_step_rejects_a_mismatched_state():
    (q, k, v), shift, diag = h3_inputs(L=3)
    _, state = h3_prefill(q, k, v, shift, diag)
    with pytest.raises(ValueError, match=r"state\.diag"):
        h3_step(q, k, v, shift, diag, state._replace(diag=state.diag[:, :1]))


MODULES = {
    "short_conv": lambda: ShortConv(6, 3, rngs=nnx.Rngs(0)),
    "base_conv": lambda: BaseConv(6, 16, 3, rngs=nnx.Rngs(1)),
    "base_conv_long": lambda: BaseConv(6, 16, -1, rngs=nnx.Rngs(2)),
    "hyena": lambda: Hyena(6, 16, filter_order=8, rngs=nnx.Rngs(3)),
    "mamba": lambda: Mamba(6, d_state=4, rngs=nnx.Rngs(4)),
    "h3": lambda: H3(6, 16, d_state=4, rngs=nnx.Rngs(5)),
    "rwkv": lambda: RWKV4TimeMix(6, layer=1, num_layers=3, rngs=nnx.Rngs(6)),
}


@pytest.mark.parametrize("name", MODULES)
def test_module_decoding_equals_the_full_forward(name):
    layer = MODULES[name]()
    x = normal(9, (2, sum(PIECES), 6))
    full = layer(x)
    parts = _split(x)
    y, state = layer.prefill(parts[0], max_length=16)
    pieces = [y]
    step = nnx.jit(lambda m, x, s: m.step(x, s, position=None))
    for part in parts[1:]:
        y, state = step(layer, part, state)
        pieces.append(y)
    np.testing.assert_allclose(jnp.concatenate(pieces, 1), full, atol=2e-5, rtol=1e-5)
    # A one-token prompt, then the rest one token at a time: decoding from scratch.
    y, state = layer.prefill(x[:, :1], max_length=16)
    pieces = [y]
    for t in range(1, x.shape[1]):
        y, state = step(layer, x[:, t:t + 1], state)
        pieces.append(y)
    np.testing.assert_allclose(jnp.concatenate(pieces, 1), full, atol=2e-5, rtol=1e-5)
