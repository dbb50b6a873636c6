"""Attention-map losses (P03 DiffCloth, P57 DisenDiff) and adversarial perturbation of the
attention scores (P78 AT, iAT): every quantity against a NumPy float64 version written from
its definition here, gradients against finite differences of those, jit, and bad inputs."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jattn
from jattn.analysis import maps
from jattn.analysis.maps import (
    adversarial_logit_bias,
    attention_at_loss,
    bundle_loss,
    interpretable_adversarial_logit_bias,
    separate_loss,
    strengthen_loss,
    suppress_loss,
    token_maps,
)
from jattn.core.shapes import DTypeError

RNG = np.random.default_rng(0)


def _softmax(x, axis=-1):
    e = np.exp(x - x.max(axis, keepdims=True))
    return e / e.sum(axis, keepdims=True)


def _finite_difference(f, x, step=1e-5):
    """Central differences of the NumPy function f at x (float64)."""
    x = np.array(x, np.float64)
    g = np.zeros_like(x)
    for i in np.ndindex(x.shape):
        up, down = x.copy(), x.copy()
        up[i] += step
        down[i] -= step
        g[i] = (f(up) - f(down)) / (2 * step)
    return g


def _maps(shape, seed):
    return np.random.default_rng(seed).uniform(0.05, 1.0, shape)


# --------------------------------------------------------------------------------------------
# Token maps


def test_token_maps_are_head_reduced_columns():
    w = _softmax(RNG.normal(size=(2, 3, 6, 5)))
    token_maps = jax.jit(maps.token_maps, static_argnames=("head_reduction", "spatial"))
    got = token_maps(jnp.asarray(w, jnp.float32), [4, 1])
    np.testing.assert_allclose(got, w[..., [4, 1]].mean(1).transpose(0, 2, 1), rtol=1e-6)
    got = token_maps(jnp.asarray(w, jnp.float32), [1], head_reduction="max", spatial=(2, 3))
    np.testing.assert_allclose(got, w[..., [1]].max(1).transpose(0, 2, 1).reshape(2, 1, 2, 3),
                               rtol=1e-6)
    per_example = np.array([[0, 2], [3, 4]])
    got = token_maps(jnp.asarray(w, jnp.float32), per_example)
    want = np.stack([w[b][..., per_example[b]].mean(0).T for b in range(2)])
    np.testing.assert_allclose(got, want, rtol=1e-6)
    np.testing.assert_allclose(token_maps(jnp.asarray(w, jnp.float32)),
                               w.mean(1).transpose(0, 2, 1), rtol=1e-6)
    assert token_maps(jnp.asarray(w, jnp.bfloat16), [0]).dtype == jnp.float32


def test_token_maps_from_the_selected_columns_of_attention_weights():
    """attention_weights with the forward's lse and key_positions gives the same maps as the
    full weights, gradients included."""
    kq, kk = jax.random.split(jax.random.key(1))
    q, k = jax.random.normal(kq, (1, 6, 2, 4)), jax.random.normal(kk, (1, 5, 2, 4))

    def from_columns(q):
        _, lse = jattn.dot_product_attention(q, k, k, return_lse=True)
        return token_maps(jattn.attention_weights(q, k, lse=lse, key_positions=[1, 3]))

    def from_full(q):
        return token_maps(jattn.attention_weights(q, k), [1, 3])

    np.testing.assert_allclose(jax.jit(from_columns)(q), jax.jit(from_full)(q), rtol=1e-5,
                               atol=1e-7)
    g_cols = jax.jit(jax.grad(lambda q: strengthen_loss(from_columns(q))))(q)
    g_full = jax.jit(jax.grad(lambda q: strengthen_loss(from_full(q))))(q)
    np.testing.assert_allclose(g_cols, g_full, rtol=1e-4, atol=1e-6)


# --------------------------------------------------------------------------------------------
# Map losses


def _norm(m):
    m = m.reshape(*m.shape[:2], -1)
    total = m.sum(-1, keepdims=True)
    return m / np.where(total > 0, total, 1)


def _bundle(a, b):
    p, q = _norm(a), _norm(b)
    cos = (p * q).sum(-1) / np.sqrt((p * p).sum(-1) * (q * q).sum(-1))
    return np.mean(1 - cos)


def _separate(a, b):
    return np.mean(np.minimum(_norm(a), _norm(b)).sum(-1))


def _strengthen(a):
    return np.mean(1 - _norm(a).max(-1))


def _suppress(a, region):
    m = np.broadcast_to(region, a.shape).astype(np.float64).reshape(*a.shape[:2], -1)
    a = a.reshape(*a.shape[:2], -1)
    size = m.sum(-1)
    return np.mean(np.where(size > 0, (a * m).sum(-1) / np.where(size > 0, size, 1), 0))


SHAPE = (2, 2, 2, 3)  # [B, C, h, w]
REGION = np.array([[[[1, 0, 1], [0, 1, 1]]], [[[0, 0, 0], [0, 0, 0]]]], bool)  # b=1 empty


@pytest.mark.parametrize("name", ["bundle", "separate", "strengthen", "suppress"])
def test_losses_match_numpy_forward_and_finite_differences(name):
    a, b = _maps(SHAPE, 1), _maps(SHAPE, 2)
    fn, ref, args = {
        "bundle": (bundle_loss, _bundle, (a, b)),
        "separate": (separate_loss, _separate, (a, b)),
        "strengthen": (strengthen_loss, _strengthen, (a,)),
        "suppress": (lambda x: suppress_loss(x, REGION), lambda x: _suppress(x, REGION), (a,)),
    }[name]
    got = jax.jit(fn)(*(jnp.asarray(x, jnp.float32) for x in args))
    assert got.shape == () and got.dtype == jnp.float32
    np.testing.assert_allclose(got, ref(*args), rtol=1e-5)
    with jax.enable_x64(True):
        grad = jax.jit(jax.grad(fn, argnums=tuple(range(len(args)))))
        grads = grad(*(jnp.asarray(x) for x in args))
    for i, g in enumerate(grads):
        def partial(x, i=i):
            return ref(*(x if j == i else args[j] for j in range(len(args))))
        np.testing.assert_allclose(g, _finite_difference(partial, args[i]), rtol=1e-5,
                                   atol=1e-8)


def test_losses_at_their_extremes_and_on_zero_maps():
    blob = np.zeros((1, 1, 4, 4))
    blob[..., :2, :2] = 1.0
    other = np.zeros_like(blob)
    other[..., 2:, 2:] = 1.0
    f32 = [jnp.asarray(x, jnp.float32) for x in (blob, other)]
    bundle_loss, separate_loss, strengthen_loss, suppress_loss = (jax.jit(f) for f in (
        maps.bundle_loss, maps.separate_loss, maps.strengthen_loss, maps.suppress_loss))
    assert float(bundle_loss(f32[0], 5 * f32[0])) == pytest.approx(0.0, abs=1e-6)
    assert float(bundle_loss(*f32)) == pytest.approx(1.0)
    assert float(separate_loss(f32[0], 5 * f32[0])) == pytest.approx(1.0)
    assert float(separate_loss(*f32)) == 0.0
    assert float(strengthen_loss(f32[0])) == pytest.approx(0.75)
    assert float(suppress_loss(f32[0])) == pytest.approx(0.25)
    assert float(suppress_loss(f32[0], f32[1] > 0)) == 0.0
    assert float(suppress_loss(f32[0], 0.5 * f32[0] + 0.5 * f32[1])) == pytest.approx(0.5)
    zero = jnp.zeros((1, 1, 4, 4))
    for fn in (lambda z: bundle_loss(z, f32[0]), lambda z: separate_loss(z, f32[0]),
               strengthen_loss, suppress_loss):
        value, grad = jax.jit(jax.value_and_grad(fn))(zero)
        assert np.isfinite(float(value)) and np.all(np.isfinite(grad))
    assert float(bundle_loss(zero, f32[0])) == 1.0 and float(strengthen_loss(zero)) == 1.0


def test_losses_jit_and_bfloat16():
    a, b = (jnp.asarray(_maps((2, 3, 6), s), jnp.float32) for s in (3, 4))
    for fn, args in ((bundle_loss, (a, b)), (separate_loss, (a, b)), (strengthen_loss, (a,)),
                     (suppress_loss, (a, a > 0.5))):
        np.testing.assert_allclose(jax.jit(fn)(*args), fn(*args), rtol=1e-6)
    low = bundle_loss(a.astype(jnp.bfloat16), b.astype(jnp.bfloat16))
    assert low.dtype == jnp.float32
    np.testing.assert_allclose(low, bundle_loss(a, b), atol=1e-2)


def test_bad_map_inputs_name_the_argument():
    w = jnp.ones((1, 2, 4, 3)) / 3
    for call, error, name in [
        (lambda: token_maps(w[0], [0]), ValueError, "weights"),
        (lambda: token_maps(w.astype(jnp.int32), [0]), DTypeError, "weights"),
        (lambda: token_maps(w, [3]), ValueError, "tokens"),
        (lambda: token_maps(w, [0.5]), DTypeError, "tokens"),
        (lambda: token_maps(w, []), ValueError, "tokens"),
        (lambda: token_maps(w, [[0], [1]]), ValueError, "tokens"),
        (lambda: token_maps(w, [0], head_reduction="sum"), ValueError, "head_reduction"),
        (lambda: token_maps(w, [0], spatial=(3, 2)), ValueError, "spatial"),
        (lambda: bundle_loss(jnp.ones((1, 2, 4)), jnp.ones((1, 1, 4))), ValueError, "maps_b"),
        (lambda: separate_loss(jnp.ones((2, 4)), jnp.ones((2, 4))), ValueError, "maps_a"),
        (lambda: strengthen_loss(jnp.ones((1, 1, 4), jnp.int32)), DTypeError, "maps"),
        (lambda: suppress_loss(jnp.ones((1, 1, 0))), ValueError, "maps"),
        (lambda: suppress_loss(jnp.ones((1, 2, 4)), jnp.ones((1, 3, 4), bool)), ValueError,
         "region"),
        (lambda: suppress_loss(jnp.ones((1, 2, 4)), jnp.ones((2, 4), bool)), ValueError,
         "region"),
        (lambda: suppress_loss(jnp.ones((1, 2, 4)), jnp.ones((1, 1, 4), jnp.int32)),
         DTypeError, "region"),
    ]:
        with pytest.raises(error, match=f"^{name}"):
            call()
    assert issubclass(DTypeError, ValueError)


# --------------------------------------------------------------------------------------------
# Adversarial perturbation of the attention scores (P78)

X = RNG.normal(size=(2, 5, 3))          # a sentence of 5 words per example, dim 3
Y = np.array([1.0, -1.0])
U, V = RNG.normal(size=3), RNG.normal(size=3)


def _classifier_np(u, v, r):
    """A one-query attention classifier in NumPy: scores x u + r, softmax over the words,
    pooled words, a linear logit and the logistic loss (mean over examples)."""
    a = _softmax(X @ u + r)
    logit = np.einsum("bt,btd->bd", a, X) @ v
    return np.mean(np.logaddexp(0.0, -Y * logit))


def _classifier(u, v, r):
    x, y, u, v = (jnp.asarray(a, r.dtype) for a in (X, Y, u, v))
    a = jax.nn.softmax(x @ u + r, axis=-1)
    logit = jnp.einsum("bt,btd->bd", a, x) @ v
    return jnp.mean(jnp.logaddexp(0.0, -y * logit))


WQ, WK = RNG.normal(size=(3, 2, 2)), RNG.normal(size=(3, 2, 2))  # [d, N, H]


def _heads_np(r):
    """A two-head self-attention classifier (rows: every head and query) in NumPy."""
    q, k = np.einsum("btd,dnh->bnth", X, WQ), np.einsum("btd,dnh->bnth", X, WK)
    a = _softmax(np.einsum("bnth,bnsh->bnts", q, k) + r)
    pooled = np.einsum("bnts,bsd->bd", a, X) / a.shape[1] / a.shape[2]
    return np.mean(np.logaddexp(0.0, -Y * (pooled @ V)))


def _heads(r):
    x, wq, wk, y, v = (jnp.asarray(a, r.dtype) for a in (X, WQ, WK, Y, V))
    q, k = jnp.einsum("btd,dnh->bnth", x, wq), jnp.einsum("btd,dnh->bnth", x, wk)
    a = jax.nn.softmax(jnp.einsum("bnth,bnsh->bnts", q, k) + r, axis=-1)
    pooled = jnp.einsum("bnts,bsd->bd", a, x) / a.shape[1] / a.shape[2]
    return jnp.mean(jnp.logaddexp(0.0, -y * (pooled @ v)))


def test_adversarial_bias_is_the_normalised_gradient_per_example():
    g = _finite_difference(lambda r: _classifier_np(U, V, r), np.zeros((2, 5)))
    want = 0.3 * g / np.linalg.norm(g, axis=1, keepdims=True)
    def adversarial():
        return adversarial_logit_bias(lambda r: _classifier(U, V, r), (2, 5), 0.3)

    with jax.enable_x64(True):
        got = jax.jit(adversarial)()
        assert got.dtype == jnp.float64
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 0.3, rtol=1e-12)
    got32 = jax.jit(adversarial)()
    assert got32.dtype == jnp.float32
    np.testing.assert_allclose(got32, want, rtol=1e-4, atol=1e-6)


def test_interpretable_bias_is_the_normalised_gradient_per_row():
    g = _finite_difference(_heads_np, np.zeros((2, 2, 5, 5)))
    want = 0.2 * g / np.linalg.norm(g, axis=-1, keepdims=True)
    with jax.enable_x64(True):
        got, at = jax.jit(lambda: (
            interpretable_adversarial_logit_bias(_heads, (2, 2, 5, 5), 0.2),
            adversarial_logit_bias(_heads, (2, 2, 5, 5), 0.2)))()
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(np.linalg.norm(got, axis=-1), 0.2, rtol=1e-12)
    np.testing.assert_allclose(np.asarray(got).sum(-1), 0.0, atol=1e-12)  # rows only shift
    np.testing.assert_allclose(np.linalg.norm(np.asarray(at).reshape(2, -1), axis=1), 0.2)
    # one row per example: iAT is AT
    with jax.enable_x64(True):
        np.testing.assert_allclose(*jax.jit(lambda: [
            fn(lambda r: _classifier(U, V, r), (2, 5), 0.3) for fn in (
                interpretable_adversarial_logit_bias, adversarial_logit_bias)])(), rtol=1e-12)


def test_first_order_worst_case_on_a_convex_toy():
    """loss(r) = <c, r> + |r|^2 / 2: on the sphere |r| = epsilon the loss is <c, r> + const,
    so r_adv maximises it and beats every random direction of the same norm."""
    c = jnp.asarray(RNG.normal(size=(1, 4, 3)), jnp.float32)

    def loss(r):
        return jnp.sum(c * r) + 0.5 * jnp.sum(r * r)

    r_adv = jax.jit(lambda: adversarial_logit_bias(loss, (1, 4, 3), 0.5))()
    np.testing.assert_allclose(jnp.linalg.norm(r_adv), 0.5, rtol=1e-6)
    random = RNG.normal(size=(200, 1, 4, 3))
    random *= 0.5 / np.linalg.norm(random.reshape(200, -1), axis=1)[:, None, None, None]
    worst = float(jax.jit(jax.vmap(loss))(jnp.asarray(random, jnp.float32)).max())
    assert float(loss(r_adv)) >= worst
    np.testing.assert_allclose(loss(r_adv), 0.5 * jnp.linalg.norm(c) + 0.125, rtol=1e-5)


def test_zero_gradient_gives_zero_perturbation():
    def perturbations():
        constant = [fn(lambda r: jnp.float32(2.0), (2, 3, 4), 1.0) for fn in (
            adversarial_logit_bias, interpretable_adversarial_logit_bias)]
        # example 1 does not reach the loss; a tiny gradient still gets the full norm
        tiny = adversarial_logit_bias(lambda r: 1e-30 * jnp.sum(r[0] * jnp.arange(3.0)),
                                      (2, 3), 1.0)
        return constant, tiny

    constant, tiny = jax.jit(perturbations)()
    for r in constant:
        assert r.shape == (2, 3, 4) and not np.any(np.asarray(r))
    np.testing.assert_allclose(tiny, [[0.0, 1 / 5 ** 0.5, 2 / 5 ** 0.5], [0.0, 0.0, 0.0]],
                               rtol=1e-6)
    value, grad = jax.jit(jax.value_and_grad(
        lambda s: attention_at_loss(lambda r: s * jnp.float32(2.0), (2, 3), 1.0)))(1.0)
    assert float(value) == 4.0 and float(grad) == 4.0


def test_at_loss_and_its_gradient_against_finite_differences():
    """AT: loss(0) + w loss(r_adv) with r_adv held fixed; the parameters' gradient matches
    finite differences of that objective in NumPy, for AT and iAT."""
    w, eps = 0.7, 0.4
    g = _finite_difference(lambda r: _classifier_np(U, V, r), np.zeros((2, 5)))
    r_adv = eps * g / np.linalg.norm(g, axis=1, keepdims=True)
    params = np.concatenate([U, V])

    def objective(p):
        return _classifier_np(p[:3], p[3:], 0.0) + w * _classifier_np(p[:3], p[3:], r_adv)

    def at(p, form="at"):
        return attention_at_loss(lambda r: _classifier(p[:3], p[3:], r), (2, 5), eps,
                                 weight=w, form=form)

    with jax.enable_x64(True):
        p = jnp.asarray(params)
        value, grad = jax.jit(jax.value_and_grad(at))(p)
        grad_iat = jax.jit(jax.grad(at), static_argnums=1)(p, "iat")
    np.testing.assert_allclose(value, objective(params), rtol=1e-8)
    np.testing.assert_allclose(grad, _finite_difference(objective, params), rtol=1e-6,
                               atol=1e-9)
    np.testing.assert_allclose(grad_iat, grad, rtol=1e-10)  # one row per example
    assert float(value) > (1 + w) * _classifier_np(U, V, 0.0)  # r_adv raises the loss


def test_jit_with_static_and_traced_epsilon():
    def adv(u, eps):
        return adversarial_logit_bias(lambda r: _classifier(u, V, r), (2, 5), eps)

    u = jnp.asarray(U, jnp.float32)
    static = jax.jit(adv, static_argnums=1)(u, 0.3)
    np.testing.assert_allclose(np.linalg.norm(static, axis=1), 0.3, rtol=1e-6)
    np.testing.assert_allclose(jax.jit(adv)(u, 0.3), static, rtol=1e-6)  # epsilon traced
    train = jax.jit(jax.value_and_grad(lambda u: attention_at_loss(
        lambda r: _classifier(u, V, r), (2, 5), 0.3, form="iat")))
    value, grad = train(u)
    assert np.isfinite(float(value)) and grad.shape == (3,)


def test_bad_adversarial_inputs_name_the_argument():
    def loss(r):
        return jnp.sum(r)

    for call, name in [
        (lambda: adversarial_logit_bias(loss, (2, 3), 0.0), "epsilon"),
        (lambda: adversarial_logit_bias(loss, (2, 3), -1.0), "epsilon"),
        (lambda: interpretable_adversarial_logit_bias(loss, (2, 3), float("nan")), "epsilon"),
        (lambda: attention_at_loss(loss, (2, 3), jnp.zeros(())), "epsilon"),
        (lambda: adversarial_logit_bias(loss, (2, 3), jnp.ones(2)), "epsilon"),
        (lambda: adversarial_logit_bias(loss, (), 1.0), "bias_shape"),
        (lambda: adversarial_logit_bias(loss, (2, 0), 1.0), "bias_shape"),
        (lambda: adversarial_logit_bias(lambda r: r, (2, 3), 1.0), "loss_of_bias"),
        (lambda: adversarial_logit_bias(None, (2, 3), 1.0), "loss_of_bias"),
        (lambda: adversarial_logit_bias(loss, (2, 3), 1.0, dtype=jnp.int32), "dtype"),
        (lambda: attention_at_loss(loss, (2, 3), 1.0, weight=-1.0), "weight"),
        (lambda: attention_at_loss(loss, (2, 3), 1.0, form="pgd"), "form"),
    ]:
        with pytest.raises(ValueError, match=f"^{name}"):
            call()
