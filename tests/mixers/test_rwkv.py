"""RWKV-4 WKV: scan and sequential against the dense definition; state continuation; the
time-mixing module against its definition."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jattn import reference
from jattn.mixers.rwkv import WKVState, token_shift, wkv
from jattn.nn.mixers import RWKV4TimeMix

IMPLEMENTATIONS = ["scan", "sequential"]
# Jitted: one compilation per test instead of one per operation of the scan.
jwkv = jax.jit(wkv, static_argnames=("implementation", "return_state"))


def _inputs(dtype, b=2, t=13, c=5, seed=0, k_scale=2.0):
    ks = jax.random.split(jax.random.key(seed), 4)
    w = jnp.exp(jax.random.normal(ks[0], (c,), jnp.float32)).astype(dtype)
    u = jax.random.normal(ks[1], (c,), dtype)
    k = (k_scale * jax.random.normal(ks[2], (b, t, c), jnp.float32)).astype(dtype)
    v = jax.random.normal(ks[3], (b, t, c), dtype)
    return w, u, k, v


def _loss(fn, projection):
    return lambda *a: jnp.sum(fn(*a) * projection)


def _value_and_grads(fn, projection, args):
    """(fn(*args), gradients of <fn(*args), projection> wrt every argument), jitted."""
    grads = jax.grad(_loss(fn, projection), argnums=tuple(range(len(args))))
    return jax.jit(lambda *a: (fn(*a), grads(*a)))(*args)


def _assert_grads_close(got, want, tol):
    for name, g, w in zip("wukv", got, want, strict=True):
        scale = max(1.0, float(jnp.abs(w).max()))
        np.testing.assert_allclose(np.asarray(g, np.float64), np.asarray(w, np.float64),
                                   atol=tol * scale, err_msg=f"gradient wrt {name}")


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("t", [1, 37])
def test_matches_definition_float64(implementation, t):
    with jax.enable_x64(True):
        args = _inputs(jnp.float64, t=t)
        fn = functools.partial(jwkv, implementation=implementation)
        projection = jax.random.normal(jax.random.key(9), args[2].shape, jnp.float64)
        got, got_grads = _value_and_grads(fn, projection, args)
        want, want_grads = _value_and_grads(reference.rwkv_wkv, projection, args)
        assert got.dtype == jnp.float64
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
        _assert_grads_close(got_grads, want_grads, 1e-11)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_float32_against_float64_definition(implementation):
    args = _inputs(jnp.float32, t=29)
    fn = functools.partial(jwkv, implementation=implementation)
    projection = jax.random.normal(jax.random.key(9), args[2].shape)
    got, got_grads = _value_and_grads(fn, projection, args)
    with jax.enable_x64(True):
        args64 = [a.astype(jnp.float64) for a in args]
        want, want_grads = _value_and_grads(reference.rwkv_wkv,
                                            projection.astype(jnp.float64), args64)
        assert got.dtype == jnp.float32
        np.testing.assert_allclose(got, want, atol=2e-5)
        _assert_grads_close(got_grads, want_grads, 1e-4)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_bfloat16_is_close(implementation):
    args = _inputs(jnp.bfloat16, t=17)
    got = jax.jit(functools.partial(jwkv, implementation=implementation))(*args)
    assert got.dtype == jnp.bfloat16
    want = reference.rwkv_wkv(*(a.astype(jnp.float32) for a in args))
    np.testing.assert_allclose(got.astype(jnp.float32), want, atol=2e-2)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_large_keys_are_finite_and_correct(implementation):
    """k = +-60 (and +-200, where e^k overflows float32) stays finite and exact."""
    w, u, _, v = _inputs(jnp.float32, t=24)
    signs = jnp.sign(jax.random.normal(jax.random.key(3), v.shape))
    fn = jax.jit(jax.value_and_grad(
        lambda w, u, k, v, p: jnp.sum(jwkv(w, u, k, v, implementation=implementation) * p),
        argnums=(0, 1, 2, 3)))
    out = jax.jit(functools.partial(jwkv, implementation=implementation))
    projection = jax.random.normal(jax.random.key(4), v.shape)
    for size in (60.0, 200.0):
        # Float32 exponents near +-size carry rounding of about size * 2^-24 each.
        tol = 1e-5 * size / 60
        k = size * signs
        got = out(w, u, k, v)
        _, grads = fn(w, u, k, v, projection)
        assert bool(jnp.all(jnp.isfinite(got)))
        assert all(bool(jnp.all(jnp.isfinite(g))) for g in grads)
        with jax.enable_x64(True):
            args64 = [a.astype(jnp.float64) for a in (w, u, k, v)]
            want, want_grads = _value_and_grads(reference.rwkv_wkv,
                                                projection.astype(jnp.float64), args64)
            np.testing.assert_allclose(got, want, atol=tol)
            _assert_grads_close(grads, want_grads, 10 * tol)


def test_long_sequence_strong_decay_float32():
    """Decays up to e^3 over 300 tokens: exponents down to about -6000, still finite."""
    w, u, k, v = _inputs(jnp.float32, b=1, t=300, c=4, seed=5)
    w = jnp.array([1e-4, 0.5, 5.0, math.exp(3.0)], jnp.float32)
    got = jwkv(w, u, k, v)
    np.testing.assert_allclose(got, jwkv(w, u, k, v, implementation="sequential"), atol=2e-5)
    with jax.enable_x64(True):
        want = reference.rwkv_wkv(*(a.astype(jnp.float64) for a in (w, u, k, v)))
        np.testing.assert_allclose(got, want, atol=2e-5)


def test_known_values():
    """No decay, no bonus, k = 0: the running mean of v; a huge bonus: v itself."""
    v = jnp.arange(1.0, 5.0).reshape(1, 4, 1)
    k = jnp.zeros_like(v)
    for implementation in IMPLEMENTATIONS:
        mean = wkv(jnp.zeros(1), jnp.zeros(1), k, v, implementation=implementation)
        np.testing.assert_allclose(mean[0, :, 0], [1.0, 1.5, 2.0, 2.5], rtol=1e-6)
        itself = wkv(jnp.ones(1), jnp.full(1, 100.0), k, v, implementation=implementation)
        np.testing.assert_allclose(itself, v, rtol=1e-6)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_jit_and_vmap(implementation):
    w, u, k, v = _inputs(jnp.float32, b=2, t=9)
    fn = jax.jit(functools.partial(jwkv, implementation=implementation))
    want = reference.rwkv_wkv(w, u, k, v)
    np.testing.assert_allclose(fn(w, u, k, v), want, atol=2e-5)
    # vmap over a stack of [B, T, C] inputs and over per-stack decays.
    ks, vs = jnp.stack([k, 2 * k]), jnp.stack([v, -v])
    ws = jnp.stack([w, 0.5 * w])
    got = jax.vmap(fn, in_axes=(0, None, 0, 0))(ws, u, ks, vs)
    for i in range(2):
        np.testing.assert_allclose(got[i], reference.rwkv_wkv(ws[i], u, ks[i], vs[i]),
                                   atol=2e-5)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_causal(implementation):
    w, u, k, v = _inputs(jnp.float32, t=16)
    y = jwkv(w, u, k, v, implementation=implementation)
    y2 = jwkv(w, u, k.at[:, 10:].set(7.0), v.at[:, 10:].add(3.0),
              implementation=implementation)
    np.testing.assert_allclose(y[:, :10], y2[:, :10], atol=1e-6)
    assert not np.allclose(y[:, 10:], y2[:, 10:])


@pytest.mark.parametrize("prefill_impl,step_impl",
                         [("scan", "scan"), ("sequential", "sequential"),
                          ("scan", "sequential")])
def test_state_continuation(prefill_impl, step_impl):
    """Prefill of T1 tokens, then one token at a time, then a block: equals one call."""
    w, u, k, v = _inputs(jnp.float32, t=15)
    full = jwkv(w, u, k, v, implementation=prefill_impl)
    y, state = jwkv(w, u, k[:, :6], v[:, :6], implementation=prefill_impl, return_state=True)
    assert isinstance(state, WKVState) and state.num.shape == (2, 5)
    ys = [y]
    for t in range(6, 10):
        y, state = jwkv(w, u, k[:, t:t + 1], v[:, t:t + 1], implementation=step_impl,
                       initial_state=state, return_state=True)
        ys.append(y)
    y, state = jwkv(w, u, k[:, 10:], v[:, 10:], implementation=step_impl,
                   initial_state=state, return_state=True)
    ys.append(y)
    np.testing.assert_allclose(jnp.concatenate(ys, axis=1), full, atol=2e-6)
    # The final state is that of the whole sequence at once.
    _, whole = jwkv(w, u, k, v, implementation=prefill_impl, return_state=True)
    np.testing.assert_allclose(state.num * jnp.exp(state.max_exponent - whole.max_exponent),
                               whole.num, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(state.den * jnp.exp(state.max_exponent - whole.max_exponent),
                               whole.den, rtol=1e-5)


def test_state_gradients_match_one_call():
    """Gradients flow through the state: d/d(k, v) of a continued call == of one call."""
    w, u, k, v = _inputs(jnp.float32, t=10)
    projection = jax.random.normal(jax.random.key(1), v.shape)

    def split_call(k, v):
        y1, s = jwkv(w, u, k[:, :4], v[:, :4], return_state=True)
        y2 = jwkv(w, u, k[:, 4:], v[:, 4:], implementation="sequential", initial_state=s)
        return jnp.sum(jnp.concatenate([y1, y2], 1) * projection)

    got = jax.jit(jax.grad(split_call, argnums=(0, 1)))(k, v)
    want = jax.grad(lambda k, v: jnp.sum(reference.rwkv_wkv(w, u, k, v) * projection),
                    argnums=(0, 1))(k, v)
    for g, r in zip(got, want, strict=True):
        np.testing.assert_allclose(g, r, atol=1e-5)


def test_token_shift():
    x = jnp.arange(12.0).reshape(1, 4, 3)
    np.testing.assert_array_equal(token_shift(x)[0], [[0, 0, 0], [0, 1, 2], [3, 4, 5],
                                                      [6, 7, 8]])
    prev = jnp.full((1, 3), -1.0)
    np.testing.assert_array_equal(token_shift(x, prev)[0, 0], [-1, -1, -1])
    np.testing.assert_array_equal(token_shift(x, prev)[0, 1:], x[0, :3])


@pytest.mark.parametrize("change,name", [
    ({"k": jnp.ones((2, 13))}, "k"),
    ({"v": jnp.ones((2, 12, 5))}, "v"),
    ({"w": jnp.ones((4,))}, "w"),
    ({"u": jnp.ones((5, 1))}, "u"),
    ({"k": jnp.ones((2, 0, 5)), "v": jnp.ones((2, 0, 5))}, "k"),
    ({"implementation": "cuda"}, "implementation"),
    ({"initial_state": WKVState(jnp.zeros((2, 5)), jnp.zeros((2, 5)), jnp.zeros((3, 5)))},
     "initial_state.max_exponent"),
])
def test_bad_input(change, name):
    w, u, k, v = _inputs(jnp.float32)
    args = {"w": w, "u": u, "k": k, "v": v} | change
    with pytest.raises(ValueError, match=name):
        wkv(**args)


def test_bad_types():
    w, u, k, v = _inputs(jnp.float32)
    with pytest.raises(TypeError, match="k"):
        wkv(w, u, k.astype(jnp.int32), v)
    with pytest.raises(TypeError, match="initial_state"):
        wkv(w, u, k, v, initial_state=(1, 2, 3))
    with pytest.raises(ValueError, match="x"):
        token_shift(jnp.ones((2, 3)))
    with pytest.raises(ValueError, match="previous"):
        token_shift(jnp.ones((2, 3, 4)), jnp.ones((2, 3)))


# --- the module ----------------------------------------------------------------------------

def _module_by_hand(m: RWKV4TimeMix, x):
    """The time mixing written out on the module's parameters with the dense WKV."""
    previous = jnp.pad(x, ((0, 0), (1, 0), (0, 0)))[:, :-1]

    def lerp(mu):
        return x * mu[...] + previous * (1 - mu[...])

    k = lerp(m.mu_k) @ m.key.kernel[...]
    v = lerp(m.mu_v) @ m.value.kernel[...]
    r = lerp(m.mu_r) @ m.receptance.kernel[...]
    mixed = reference.rwkv_wkv(jnp.exp(m.time_decay[...]), m.time_first[...], k, v)
    return (jax.nn.sigmoid(r) * mixed) @ m.output.kernel[...]


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_module_equals_definition(implementation):
    m = RWKV4TimeMix(8, layer=1, num_layers=2, implementation=implementation,
                     rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (2, 11, 8))
    call = nnx.jit(lambda m, x: m(x))
    y = call(m, x)
    assert y.shape == x.shape and y.dtype == x.dtype
    np.testing.assert_allclose(y, _module_by_hand(m, x), atol=1e-5)
    # Causal through the token shift too.
    y2 = call(m, x.at[:, 7:].set(1.0))
    np.testing.assert_allclose(y[:, :7], y2[:, :7], atol=1e-6)
    assert not np.allclose(y[:, 7:], y2[:, 7:])


def test_module_gradients_match_definition():
    m = RWKV4TimeMix(6, rngs=nnx.Rngs(2))
    x = jax.random.normal(jax.random.key(3), (2, 9, 6))
    projection = jax.random.normal(jax.random.key(4), x.shape)
    got = nnx.jit(nnx.grad(lambda m: jnp.sum(m(x) * projection)))(m)
    want = nnx.jit(nnx.grad(lambda m: jnp.sum(_module_by_hand(m, x) * projection)))(m)
    for (path, g), (_, w) in zip(nnx.to_flat_state(got), nnx.to_flat_state(want),
                                 strict=True):
        np.testing.assert_allclose(g[...], w[...], atol=1e-5, err_msg=str(path))


def test_module_bfloat16():
    m = RWKV4TimeMix(8, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (2, 7, 8))
    call = nnx.jit(lambda m, x: m(x))
    y = call(m, x.astype(jnp.bfloat16))
    # nnx.Linear promotes to its float32 parameters: k, v, r and the output are float32.
    assert y.dtype == jnp.float32
    np.testing.assert_allclose(y.astype(jnp.float32), call(m, x), atol=5e-2)


def test_module_initialisation_follows_rwkv4():
    d = 6
    first = RWKV4TimeMix(d, layer=0, num_layers=2, rngs=nnx.Rngs(0))
    last = RWKV4TimeMix(d, layer=1, num_layers=2, rngs=nnx.Rngs(0))
    i = np.arange(d)
    # layer 0: ratio_0_to_1 = 0, ratio_1_to_almost0 = 1.
    np.testing.assert_allclose(first.mu_k[...], i / d, atol=1e-7)
    np.testing.assert_allclose(first.mu_v[...], i / d, atol=1e-7)
    np.testing.assert_allclose(first.mu_r[...], np.sqrt(i / d), atol=1e-7)
    np.testing.assert_allclose(first.time_decay[...], -5 + 8 * (i / (d - 1)) ** 0.7,
                               atol=1e-6)
    # layer 1 of 2: ratio_0_to_1 = 1, ratio_1_to_almost0 = 1/2.
    np.testing.assert_allclose(last.mu_k[...], (i / d) ** 0.5, atol=1e-7)
    np.testing.assert_allclose(last.mu_v[...], (i / d) ** 0.5 + 0.3, atol=1e-7)
    np.testing.assert_allclose(last.mu_r[...], (i / d) ** 0.25, atol=1e-7)
    np.testing.assert_allclose(last.time_decay[...], -5 + 8 * (i / (d - 1)) ** 2.0,
                               atol=1e-6)
    zigzag = [0.0, 0.5, -0.5, 0.0, 0.5, -0.5]
    np.testing.assert_allclose(first.time_first[...], np.log(0.3) + np.array(zigzag),
                               atol=1e-6)
    assert first.key.bias is None and first.output.bias is None
    # A single layer and a single channel are defined too (the original divides by zero).
    one = RWKV4TimeMix(1, layer=0, num_layers=1, rngs=nnx.Rngs(0))
    assert bool(jnp.all(jnp.isfinite(one.time_decay[...])))


def test_module_bad_input():
    with pytest.raises(ValueError, match="layer"):
        RWKV4TimeMix(8, layer=2, num_layers=2, rngs=nnx.Rngs(0))
    m = RWKV4TimeMix(8, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="u"):
        m(jnp.ones((2, 5, 7)))
    _, state = m.prefill(jnp.ones((2, 3, 8)))
    with pytest.raises(ValueError, match=r"state\.last"):
        m.step(jnp.ones((3, 1, 8)), state)
