"""Matching and contrastive losses (P02, P04, P20, P28, P30, P39, P73): fast paths against the
dense references (forward and gradients, float64/float32/bfloat16), the defining properties
(FILIP's max over the full similarity tensor, padding invariance, navigator rows summing to
1, CT symmetry under swapping the sets, permutation invariance of the aggregation), jit and
vmap, error messages, and the NNX modules against the functional calls."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jattn import reference
from jattn.applications.matching import (
    bidirectional_ranking_loss,
    conditional_transport,
    filip_loss,
    filip_similarity,
    info_nce,
    iterative_cross_attention,
    similarity_weighted_aggregation,
)
from jattn.nn.applications.matching import (
    ConditionalTransportAlignment,
    FILIPLoss,
    InfoNCELoss,
    RecurrentCorrespondenceRegulator,
)
from tests.conftest import assert_close, check_against_reference, normal, to64

# jitted forms for the property tests: one compilation instead of many eager dispatches
_filip = jax.jit(filip_similarity, static_argnames="normalize")
_filip_loss = jax.jit(filip_loss, static_argnames="normalize")
_info_nce = jax.jit(info_nce, static_argnames="normalize")
_ranking = jax.jit(bidirectional_ranking_loss, static_argnames=("margin", "hardest",
                                                                "reduction"))
_ct = jax.jit(conditional_transport, static_argnames="similarity")
_aggregate = jax.jit(similarity_weighted_aggregation,
                     static_argnames=("similarity", "return_weights"))
_iterate = jax.jit(iterative_cross_attention,
                   static_argnames=("num_steps", "regulator", "normalize"))






def _run(dtype, check):
    with jax.enable_x64(dtype == jnp.float64):
        check()


# --------------------------------------------------------------------------------------------
# P20 FILIP

IMAGE_MASK = jnp.array([[True] * 5, [True, False, True, True, False], [False] * 5])
TEXT_MASK = jnp.array([[True] * 6, [True, True, True, False, False, False],
                       [False] * 6, [False, True, True, True, True, True]])


@pytest.mark.parametrize("dtype,masked,normalize,grad", [
    (jnp.float32, True, True, True), (jnp.float32, False, False, False),
    (jnp.bfloat16, True, True, True)])
def test_filip_similarity_matches_reference(dtype, masked, normalize, grad):
    masks = dict(image_mask=IMAGE_MASK, text_mask=TEXT_MASK) if masked else {}
    args = (normal(0, (3, 5, 8)), normal(1, (4, 6, 8)))
    cotangent = (normal(2, (3, 4)), normal(3, (3, 4)))
    _run(dtype, lambda: check_against_reference(
        functools.partial(filip_similarity, normalize=normalize, **masks),
        functools.partial(reference.filip_similarity, normalize=normalize, **masks),
        args, dtype, cotangent=cotangent, grad=grad))


@pytest.mark.parametrize("seed", [0, 1])
def test_filip_equals_max_over_dense_similarity_tensor(seed):
    x, y = normal(seed, (3, 7, 5)), normal(seed + 10, (2, 4, 5))
    s = _filip(x, y, normalize=False)
    dense = np.einsum("bpd,cwd->bcpw", np.asarray(x, np.float64), np.asarray(y, np.float64))
    np.testing.assert_allclose(s.image_to_text, dense.max(axis=3).mean(axis=2), rtol=1e-5,
                               atol=1e-5)
    np.testing.assert_allclose(s.text_to_image, dense.max(axis=2).mean(axis=2), rtol=1e-5,
                               atol=1e-5)
    # the same on one pair by brute force over every (patch, word)
    pair = [[float(np.dot(x[1, p], y[0, w])) for w in range(4)] for p in range(7)]
    assert math.isclose(float(s.image_to_text[1, 0]),
                        np.mean([max(row) for row in pair]), rel_tol=1e-5)


def test_filip_invariant_to_padding_tokens():
    x, y = normal(0, (2, 4, 6)), normal(1, (3, 5, 6))
    plain = _filip(x, y)
    # pad with large random tokens, some in the middle of the sequence
    x_pad = jnp.concatenate([x[:, :2], 50 * normal(2, (2, 3, 6)), x[:, 2:]], axis=1)
    x_mask = jnp.array([[True] * 2 + [False] * 3 + [True] * 2] * 2)
    y_pad = jnp.concatenate([y, 50 * normal(3, (3, 4, 6))], axis=1)
    y_mask = jnp.array([[True] * 5 + [False] * 4] * 3)
    padded = _filip(x_pad, y_pad, image_mask=x_mask, text_mask=y_mask)
    for a, b in zip(plain, padded, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


def test_filip_empty_side_gives_zero_without_nan():
    x, y = normal(0, (2, 3, 4)), normal(1, (2, 3, 4))
    image_mask = jnp.array([[True, True, True], [False, False, False]])
    s = _filip(x, y, image_mask=image_mask)
    np.testing.assert_array_equal(s.image_to_text[1], 0)
    np.testing.assert_array_equal(s.text_to_image[1], 0)
    grads = jax.grad(lambda x: sum(v.sum() for v in _filip(
        x, y, image_mask=image_mask)))(x)
    assert np.isfinite(grads).all()
    np.testing.assert_array_equal(grads[1], 0)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_filip_loss_matches_reference(dtype):
    masks = dict(image_mask=IMAGE_MASK[:3], text_mask=TEXT_MASK[jnp.array([0, 1, 3])])
    args = (normal(0, (3, 5, 8)), normal(1, (3, 6, 8)), jnp.asarray(0.2))
    _run(dtype, lambda: check_against_reference(
        lambda x, y, t: filip_loss(x, y, temperature=t, **masks),
        lambda x, y, t: reference.filip_loss(x, y, temperature=t, **masks),
        args, dtype, cotangent=jnp.asarray(1.0)))


# --------------------------------------------------------------------------------------------
# P28, P73 InfoNCE; P39 ranking loss


@pytest.mark.parametrize("dtype,normalize", [(jnp.float32, True), (jnp.bfloat16, False)])
def test_info_nce_matches_reference(dtype, normalize):
    args = (normal(0, (5, 7)), normal(1, (5, 7)), jnp.asarray(0.5 if normalize else 3.0))
    _run(dtype, lambda: check_against_reference(
        lambda a, b, t: info_nce(a, b, temperature=t, normalize=normalize),
        lambda a, b, t: reference.info_nce(a, b, temperature=t, normalize=normalize),
        args, dtype, cotangent=jnp.asarray(1.0)))


def test_info_nce_properties():
    a, b = normal(0, (6, 4)), normal(1, (6, 4))
    loss = float(_info_nce(a, b, temperature=0.3))
    assert math.isclose(loss, float(_info_nce(b, a, temperature=0.3)), rel_tol=1e-6)
    scales = jnp.arange(1.0, 7.0)[:, None]
    assert math.isclose(loss, float(_info_nce(a * scales, b, temperature=0.3)), rel_tol=1e-5)
    perm = jnp.array([3, 0, 5, 1, 4, 2])  # re-pairing consistently changes nothing
    assert math.isclose(loss, float(_info_nce(a[perm], b[perm], temperature=0.3)),
                        rel_tol=1e-5)
    assert float(_info_nce(jnp.eye(6), jnp.eye(6), temperature=0.01)) < 1e-6
    ones = jnp.ones((6, 4))  # every logit equal: chance level, log B
    assert math.isclose(float(_info_nce(ones, ones, temperature=0.3)), math.log(6),
                        rel_tol=1e-5)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_ranking_loss_matches_reference(dtype):
    sim = 0.3 * normal(0, (4, 4)) + jnp.eye(4) * 0.2
    cases = [(False, "none"), (True, "none"), (False, "mean"), (True, "sum")]
    cotangent = (normal(1, (4,)), normal(2, (4,)), jnp.asarray(1.0), jnp.asarray(0.5))

    def every_case(loss):
        return lambda s: tuple(loss(s, margin=0.2, hardest=h, reduction=r) for h, r in cases)
    _run(dtype, lambda: check_against_reference(
        every_case(bidirectional_ranking_loss), every_case(reference.bidirectional_ranking_loss),
        (sim,), dtype, cotangent=cotangent))


def test_ranking_loss_by_hand():
    s = jnp.array([[0.9, 0.3, 0.1], [0.8, 0.5, 0.6], [0.0, 0.2, 0.7]])
    # pair 1: captions for image 1: [0.2-0.5+0.8]+ + [0.2-0.5+0.6]+ = 0.5 + 0.3;
    #         images for caption 1: [0.2-0.5+0.3]+ + [0.2-0.5+0.2]+ = 0 + 0
    per_pair = _ranking(s, margin=0.2, reduction="none")
    np.testing.assert_allclose(per_pair, [0.1, 0.8, 0.1], atol=1e-6)
    hardest = _ranking(s, margin=0.2, hardest=True, reduction="none")
    np.testing.assert_allclose(hardest, [0.1, 0.5, 0.1], atol=1e-6)
    assert float(_ranking(jnp.ones((1, 1)), margin=0.2)) == 0.0


# --------------------------------------------------------------------------------------------
# P02 conditional transport

X_WEIGHTS = jnp.array([[1.0, 1, 1, 1, 1, 1, 1], [0.5, 0.0, 2.0, 1.0, 0.0, 1.0, 1.0]])
Y_WEIGHTS = jnp.array([[1.0, 0.0, 1.0, 0.0, 0.0], [0.0, 0.0, 0.3, 0.7, 1.0]])


@pytest.mark.parametrize("dtype,shared_labels,weighted,similarity,grad", [
    (jnp.float32, True, True, "cosine", True), (jnp.float32, False, False, "cosine", False),
    (jnp.float32, False, True, "dot", False), (jnp.bfloat16, False, True, "cosine", True)])
def test_conditional_transport_matches_reference(dtype, shared_labels, weighted, similarity,
                                                 grad):
    y_shape = (5, 6) if shared_labels else (2, 5, 6)
    x = normal(0, (2, 7, 6)) * (0.3 if similarity == "dot" else 1.0)
    args = (x, normal(1, y_shape), jnp.asarray(0.25))
    weights = dict(x_weights=X_WEIGHTS, y_weights=Y_WEIGHTS) if weighted else {}
    cotangent = (normal(2, (2,)), normal(3, (2,)), normal(4, (2,)), normal(5, (2, 7, 5)),
                 normal(6, (2, 5, 7)))
    _run(dtype, lambda: check_against_reference(
        lambda x, y, t: conditional_transport(x, y, temperature=t, similarity=similarity,
                                              **weights),
        lambda x, y, t: reference.conditional_transport(x, y, temperature=t,
                                                        similarity=similarity, **weights),
        args, dtype, cotangent=cotangent, grad=grad))


def test_conditional_transport_navigators_are_distributions():
    x, y = normal(0, (2, 7, 6)), normal(1, (2, 5, 6))
    ct = _ct(x, y, x_weights=X_WEIGHTS, y_weights=Y_WEIGHTS,
                               temperature=0.1)
    rows_f = ct.forward_navigator.sum(-1)
    rows_b = ct.backward_navigator.sum(-1)
    np.testing.assert_allclose(rows_f, (X_WEIGHTS > 0).astype(float), atol=1e-6)
    np.testing.assert_allclose(rows_b, (Y_WEIGHTS > 0).astype(float), atol=1e-6)
    # absent labels receive no mass, absent patches are never visited
    np.testing.assert_array_equal(ct.forward_navigator[0][:, Y_WEIGHTS[0] == 0], 0)
    np.testing.assert_array_equal(ct.backward_navigator[1][:, X_WEIGHTS[1] == 0], 0)
    assert (ct.forward_navigator >= 0).all() and (ct.backward_navigator >= 0).all()
    assert ((ct.cost >= 0) & (ct.cost <= 4)).all()


def test_conditional_transport_symmetric_when_sets_swap():
    x, y = normal(0, (2, 7, 6)), normal(1, (2, 5, 6))
    ct = _ct(x, y, x_weights=X_WEIGHTS, y_weights=Y_WEIGHTS,
                               temperature=0.2)
    swapped = _ct(y, x, x_weights=Y_WEIGHTS, y_weights=X_WEIGHTS,
                                    temperature=0.2)
    np.testing.assert_allclose(ct.cost, swapped.cost, rtol=1e-6)
    np.testing.assert_allclose(ct.forward_cost, swapped.backward_cost, rtol=1e-6)
    np.testing.assert_allclose(ct.backward_cost, swapped.forward_cost, rtol=1e-6)
    np.testing.assert_allclose(ct.forward_navigator, swapped.backward_navigator, atol=1e-7)
    np.testing.assert_allclose(ct.backward_navigator, swapped.forward_navigator, atol=1e-7)


def test_conditional_transport_extreme_costs():
    x = normal(0, (1, 4, 8))
    near = _ct(x, x, temperature=0.01)  # each point goes to itself
    assert float(near.cost[0]) < 1e-3
    far = _ct(x[:, :1], -x[:, :1])  # one point each, opposite: 2 + 2
    assert math.isclose(float(far.cost[0]), 4.0, rel_tol=1e-6)


def test_conditional_transport_all_zero_weights_is_zero_not_nan():
    x, y = normal(0, (2, 3, 4)), normal(1, (2, 5, 4))
    y_weights = jnp.array([[1.0, 1, 0, 0, 0], [0.0, 0, 0, 0, 0]])

    def total(x):
        return _ct(x, y, y_weights=y_weights).cost.sum()
    ct = _ct(x, y, y_weights=y_weights)
    np.testing.assert_array_equal(ct.cost[1], 0)
    np.testing.assert_array_equal(ct.forward_navigator[1], 0)
    grads = jax.grad(total)(x)
    assert np.isfinite(grads).all()
    np.testing.assert_array_equal(grads[1], 0)


# --------------------------------------------------------------------------------------------
# P04 similarity-weighted aggregation

AGG_MASK = jnp.array([[True] * 4, [False, True, False, True], [False] * 4])


@pytest.mark.parametrize("dtype,masked,similarity,value_shape,grad", [
    (jnp.float32, True, "cosine", (3, 4, 2, 3, 3), True),
    (jnp.float32, False, "dot", (3, 4), False), (jnp.bfloat16, True, "cosine", (3, 4, 5), True)])
def test_similarity_aggregation_matches_reference(dtype, masked, similarity, value_shape,
                                                  grad):
    options = dict(mask=AGG_MASK if masked else None, similarity=similarity,
                   return_weights=True)
    args = (normal(0, (3, 6)), normal(1, (3, 4, 6)), normal(2, value_shape),
            jnp.asarray(0.7))
    cotangent = (normal(3, (3, *value_shape[2:])), normal(4, (3, 4)))
    _run(dtype, lambda: check_against_reference(
        lambda q, k, v, t: similarity_weighted_aggregation(q, k, v, temperature=t, **options),
        lambda q, k, v, t: reference.similarity_weighted_aggregation(q, k, v, temperature=t,
                                                                     **options),
        args, dtype, cotangent=cotangent, grad=grad))


def test_similarity_aggregation_permutation_invariant_and_empty():
    q, k, v = normal(0, (3, 6)), normal(1, (3, 4, 6)), normal(2, (3, 4, 5))
    out = _aggregate(q, k, v, mask=AGG_MASK)
    perm = jnp.array([2, 0, 3, 1])
    permuted = _aggregate(q, k[:, perm], v[:, perm],
                                               mask=AGG_MASK[:, perm])
    np.testing.assert_allclose(out, permuted, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(out[2], 0)
    grads = jax.grad(lambda k: _aggregate(q, k, v, mask=AGG_MASK).sum())(k)
    assert np.isfinite(grads).all()
    # one member: its value exactly
    np.testing.assert_allclose(_aggregate(q, k[:, :1], v[:, :1]),
                               v[:, 0], rtol=1e-6)


# --------------------------------------------------------------------------------------------
# P30 iterative cross attention


def _toy_regulator(step, q, a, lam, m):
    """A smooth update touching both lambda and m (any function of the signature works)."""
    lam = lam * (1.5 + 0.5 * jnp.tanh(jnp.mean(a, -1))) + 0.1 * step
    m = m * (1 + 0.2 * jnp.tanh(jnp.mean(a, -1, keepdims=True))) + 0.05 * jnp.tanh(q)
    return lam, m


@pytest.mark.parametrize("dtype,num_steps,masked,separate_value,normalize,grad", [
    (jnp.float32, 3, True, True, True, True), (jnp.float32, 0, False, False, True, False),
    (jnp.float32, 2, False, False, False, False), (jnp.bfloat16, 1, True, False, True, True)])
def test_iterative_cross_attention_matches_unrolled_reference(dtype, num_steps, masked,
                                                              separate_value, normalize, grad):
    B, T, S, D = 2, 5, 7, 6
    Dv = 3 if separate_value else D
    options = dict(num_steps=num_steps, regulator=_toy_regulator, normalize=normalize,
                   context_mask=(jnp.arange(S) < jnp.array([[S], [4]])) if masked else None,
                   query_mask=(jnp.arange(T) < jnp.array([[3], [T]])) if masked else None)
    value = normal(3, (B, S, Dv)) if separate_value else None
    args = (normal(0, (B, T, D)), normal(1, (B, S, D)), 0.5 + jnp.abs(normal(2, (B, T))),
            normal(4, (B, T, D)) if num_steps == 1 else jnp.ones((1, 1, D)))
    cotangent = (normal(5, (B, T, Dv)), normal(6, (B, T)), normal(7, (B, T, D)))

    def fast(q, c, lam, m):
        return iterative_cross_attention(q, c, inverse_temperature=lam, modulation=m,
                                         value=None if value is None else value.astype(q.dtype),
                                         **options)

    def ref(q, c, lam, m):
        return reference.iterative_cross_attention(
            q, c, inverse_temperature=lam, modulation=m,
            value=None if value is None else value.astype(q.dtype), **options)

    _run(dtype, lambda: check_against_reference(fast, ref, args, dtype, cotangent=cotangent,
                                                grad=grad))


def test_iterative_zero_steps_is_one_plain_attention():
    q, c = normal(0, (2, 4, 5)), normal(1, (2, 6, 5))
    out = _iterate(q, c, num_steps=0, inverse_temperature=3.0,
                                    normalize=False)
    want = jax.jit(lambda q, c: reference.dot_product_attention(
        q[:, :, None], c[:, :, None], c[:, :, None], scale=3.0)[:, :, 0])(q, c)
    np.testing.assert_allclose(out.attended, want, rtol=1e-5, atol=1e-6)
    # a regulator that only sharpens reaches the same result as starting sharper
    sharpen = _iterate(q, c, num_steps=2, inverse_temperature=0.75,
                                        regulator=lambda s, q, a, lam, m: (2 * lam, m),
                                        normalize=False)
    np.testing.assert_allclose(sharpen.attended, out.attended, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(sharpen.inverse_temperature, 3.0)


# --------------------------------------------------------------------------------------------
# jit and vmap


def test_jit_and_vmap_agree_with_loops():
    xs, ys = normal(0, (3, 2, 4, 5)), normal(1, (3, 2, 6, 5))
    fns = {
        "filip": lambda x, y: filip_similarity(x, y).image_to_text,
        "info_nce": lambda x, y: info_nce(x[:, 0], y[:, 0], temperature=0.1),
        "ct": lambda x, y: conditional_transport(x, y, temperature=0.3).cost,
        "aggregate": lambda x, y: similarity_weighted_aggregation(x[:, 0], y, y),
        "iterative": lambda x, y: iterative_cross_attention(
            x, y, num_steps=2, inverse_temperature=5.0, regulator=_toy_regulator).attended,
    }
    for name, fn in fns.items():
        batched = jax.jit(jax.vmap(fn))(xs, ys)
        one = jax.jit(fn)
        looped = jnp.stack([one(x, y) for x, y in zip(xs, ys, strict=True)])
        np.testing.assert_allclose(batched, looped, rtol=2e-5, atol=2e-6, err_msg=name)


# --------------------------------------------------------------------------------------------
# errors


@pytest.mark.parametrize("call,match", [
    (lambda: filip_similarity(jnp.ones((2, 3)), jnp.ones((2, 3, 4))), "image_tokens"),
    (lambda: filip_similarity(jnp.ones((2, 3, 4)), jnp.ones((2, 3, 5))), "text_tokens"),
    (lambda: filip_similarity(jnp.ones((2, 3, 4)), jnp.ones((2, 3, 4)),
                              image_mask=jnp.ones((2, 4), bool)), "image_mask"),
    (lambda: filip_similarity(jnp.ones((2, 3, 4)), jnp.ones((2, 3, 4)),
                              text_mask=jnp.ones((2, 3))), "text_mask"),
    (lambda: filip_loss(jnp.ones((2, 3, 4)), jnp.ones((3, 3, 4)), temperature=0.1),
     "image_tokens, text_tokens"),
    (lambda: filip_loss(jnp.ones((2, 3, 4)), jnp.ones((2, 3, 4)), temperature=0.0),
     "temperature"),
    (lambda: info_nce(jnp.ones((2, 3)), jnp.ones((3, 3)), temperature=0.1), "a, b"),
    (lambda: info_nce(jnp.ones((0, 3)), jnp.ones((0, 3)), temperature=0.1), "a, b"),
    (lambda: filip_similarity(jnp.ones((2, 0, 4)), jnp.ones((2, 3, 4))),
     "image_tokens, text_tokens"),
    (lambda: filip_similarity(jnp.ones((2, 3, 4), int), jnp.ones((2, 3, 4))), "image_tokens"),
    (lambda: info_nce(jnp.ones((2, 3)), jnp.ones((2, 3)), temperature=jnp.ones(2)),
     "temperature"),
    (lambda: info_nce(jnp.ones((2, 3), int), jnp.ones((2, 3)), temperature=0.1), "a"),
    (lambda: bidirectional_ranking_loss(jnp.ones((2, 3)), margin=0.2), "similarity"),
    (lambda: bidirectional_ranking_loss(jnp.ones((2, 2)), margin="big"), "margin"),
    (lambda: bidirectional_ranking_loss(jnp.ones((2, 2)), margin=0.2, reduction="max"),
     "reduction"),
    (lambda: conditional_transport(jnp.ones((2, 3, 4)), jnp.ones((3, 5, 4))), "y"),
    (lambda: conditional_transport(jnp.ones((2, 3, 4)), jnp.ones((5, 4)),
                                   y_weights=jnp.ones((2, 4))), "y_weights"),
    (lambda: conditional_transport(jnp.ones((2, 3, 4)), jnp.ones((5, 4)),
                                   x_weights=jnp.ones((2, 3), int)), "x_weights"),
    (lambda: conditional_transport(jnp.ones((2, 3, 4)), jnp.ones((5, 4)),
                                   similarity="l2"), "similarity"),
    (lambda: conditional_transport(jnp.ones((2, 3, 4)), jnp.ones((5, 4)), temperature=-1),
     "temperature"),
    (lambda: similarity_weighted_aggregation(jnp.ones((2, 3)), jnp.ones((2, 4, 5)),
                                             jnp.ones((2, 4))), "keys"),
    (lambda: similarity_weighted_aggregation(jnp.ones((2, 3)), jnp.ones((2, 4, 3)),
                                             jnp.ones((2, 5))), "values"),
    (lambda: similarity_weighted_aggregation(jnp.ones((2, 3)), jnp.ones((2, 4, 3)),
                                             jnp.ones((2, 4)), mask=jnp.ones((2, 3), bool)),
     "mask"),
    (lambda: iterative_cross_attention(jnp.ones((2, 3, 4)), jnp.ones((2, 5, 3)),
                                       num_steps=0, inverse_temperature=1.0), "context"),
    (lambda: iterative_cross_attention(jnp.ones((2, 3, 4)), jnp.ones((2, 5, 4)),
                                       num_steps=2, inverse_temperature=1.0), "regulator"),
    (lambda: iterative_cross_attention(jnp.ones((2, 3, 4)), jnp.ones((2, 5, 4)),
                                       num_steps=-1, inverse_temperature=1.0), "num_steps"),
    (lambda: iterative_cross_attention(jnp.ones((2, 3, 4)), jnp.ones((2, 5, 4)),
                                       num_steps=0, inverse_temperature=0.0),
     "inverse_temperature"),
    (lambda: iterative_cross_attention(jnp.ones((2, 3, 4)), jnp.ones((2, 5, 4)),
                                       num_steps=0, inverse_temperature=jnp.ones((2, 4))),
     "inverse_temperature"),
    (lambda: iterative_cross_attention(jnp.ones((2, 3, 4)), jnp.ones((2, 5, 4)),
                                       num_steps=1, inverse_temperature=1.0,
                                       regulator=lambda s, q, a, lam, m: (lam[0], m)),
     "regulator"),
    (lambda: iterative_cross_attention(jnp.ones((2, 3, 4)), jnp.ones((2, 5, 4)),
                                       num_steps=0, inverse_temperature=1.0,
                                       value=jnp.ones((2, 4, 4))), "value"),
])
def test_bad_input_names_the_argument(call, match):
    with pytest.raises((ValueError, TypeError), match=match):
        call()


# --------------------------------------------------------------------------------------------
# NNX modules


def _call(module, *args, **kwargs):
    """module(*args, **kwargs) under nnx.jit."""
    return nnx.jit(lambda m, *a: m(*a, **kwargs))(module, *args)


def _grads(module, loss_fn):
    """nnx.grad of loss_fn(module) under nnx.jit."""
    return nnx.jit(lambda m: nnx.grad(loss_fn)(m))(module)


def test_info_nce_module_equals_function_and_clamps():
    a, b = normal(0, (4, 6)), normal(1, (4, 6))
    loss = InfoNCELoss(rngs=nnx.Rngs(0))
    np.testing.assert_allclose(_call(loss, a, b), _info_nce(a, b, temperature=0.07),
                               rtol=1e-5)
    grads = _grads(loss, lambda m: m(a, b))
    assert float(grads.log_inverse_temperature[...]) != 0.0
    loss.log_inverse_temperature[...] = jnp.asarray(math.log(1000.0))
    assert math.isclose(float(loss.temperature()), 0.01, rel_tol=1e-6)
    np.testing.assert_allclose(_call(loss, a, b), _info_nce(a, b, temperature=0.01),
                               rtol=1e-5)
    grads = _grads(loss, lambda m: m(a, b))
    assert float(grads.log_inverse_temperature[...]) == 0.0  # clamped: CLIP's max scale 100
    fixed = InfoNCELoss(initial_temperature=0.5, learn=False, rngs=nnx.Rngs(0))
    assert not jax.tree_util.tree_leaves(nnx.state(fixed, nnx.Param))
    np.testing.assert_allclose(_call(fixed, a, b), _info_nce(a, b, temperature=0.5),
                               rtol=1e-5)


def test_filip_module_equals_function():
    x, y = normal(0, (3, 5, 8)), normal(1, (3, 6, 8))
    loss = FILIPLoss(initial_temperature=0.2, rngs=nnx.Rngs(0))
    masks = dict(image_mask=IMAGE_MASK, text_mask=TEXT_MASK[:3])
    np.testing.assert_allclose(_call(loss, x, y, **masks),
                               _filip_loss(x, y, temperature=0.2, **masks), rtol=1e-5)


def test_conditional_transport_module_equals_function_on_projections():
    module = ConditionalTransportAlignment(10, 7, dim=6, initial_temperature=0.3,
                                           learn_temperature=True, rngs=nnx.Rngs(0))
    patches, labels = normal(0, (2, 7, 10)), normal(1, (5, 7))
    got = _call(module, patches, labels, patch_weights=X_WEIGHTS, label_weights=Y_WEIGHTS)
    x = patches @ module.patch_proj.kernel[...] + module.patch_proj.bias[...]
    y = labels @ module.label_proj.kernel[...] + module.label_proj.bias[...]
    want = _ct(x, y, x_weights=X_WEIGHTS, y_weights=Y_WEIGHTS, temperature=0.3)
    for a, b in zip(got, want, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    grads = _grads(module, lambda m: m(patches, labels, label_weights=Y_WEIGHTS).cost.sum())
    assert all(np.isfinite(g).all() for g in jax.tree_util.tree_leaves(grads))
    assert float(grads.log_inverse_temperature[...]) != 0.0
    with pytest.raises(ValueError, match="dim"):
        ConditionalTransportAlignment(10, 7, rngs=nnx.Rngs(0))


def _plain_rcr_regulator(module):
    """RCAR's regulator written out from the module's weights (kernel [in, out], bias)."""
    weights = [{name: (jnp.asarray(getattr(p, name).kernel[...]),
                       jnp.asarray(getattr(p, name).bias[...]))
                for name in ("alignment", "factor_hidden", "factor_out", "modulation_hidden",
                             "modulation_out")} for p in module.steps]

    def regulate(step, q, a, lam, m):
        def linear(name, h):
            kernel, bias = weights[step][name]
            return h @ kernel.astype(h.dtype) + bias.astype(h.dtype)
        h = linear("alignment", (q - a) ** 2)
        h = h / jnp.sqrt(jnp.sum(h * h, -1, keepdims=True))
        factor = linear("factor_out", jnp.tanh(linear("factor_hidden", h)))[..., 0]
        change = jnp.tanh(linear("modulation_out", jnp.tanh(linear("modulation_hidden", h))))
        return jnp.maximum(lam + factor, 0), jnp.minimum(jnp.maximum(m + change, -1), 1)
    return regulate


def test_rcr_module_matches_unrolled_reference():
    module = RecurrentCorrespondenceRegulator(6, num_steps=3, sim_dim=8,
                                              initial_inverse_temperature=9.0,
                                              rngs=nnx.Rngs(0))
    q, c = normal(0, (2, 5, 6)), normal(1, (2, 7, 6))
    context_mask = jnp.arange(7) < jnp.array([[7], [4]])
    got = _call(module, q, c, context_mask=context_mask)
    regulator = _plain_rcr_regulator(module)
    with jax.enable_x64(True):
        want = jax.jit(lambda q, c: reference.iterative_cross_attention(
            q, c, num_steps=3, inverse_temperature=9.0, regulator=regulator,
            context_mask=context_mask))(*to64((q, c)))
    for a, b in zip(got, want, strict=True):
        assert_close(a, b, jnp.float32, "forward")
    assert not np.allclose(got.inverse_temperature, 9.0)  # the regulator did move lambda
    sim = module.similarity(q, got.attended)
    cos = np.sum(np.asarray(q) * np.asarray(got.attended), -1) / (
        np.linalg.norm(q, axis=-1) * np.linalg.norm(got.attended, axis=-1))
    np.testing.assert_allclose(sim, cos.mean(-1), rtol=1e-5)
    grads = _grads(module, lambda m: m(q, c).attended.sum())
    assert all(np.isfinite(g).all() for g in jax.tree_util.tree_leaves(grads))
