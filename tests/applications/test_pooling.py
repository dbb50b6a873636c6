"""Pooling and target attention (LAMA P33, MQSA P38, DARE P47): fast paths against the dense
references, hand-worked cases from the definitions, padding, modules."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jattn
from jattn import reference
from jattn.applications.pooling import (
    context_query_pooling,
    decoupled_target_attention,
    masked_mean,
    window_mean,
)
from jattn.nn.applications.pooling import (
    ContextQueryPooling,
    DecoupledEmbeddings,
    LQuerySelfAttention,
    MultiQuerySelfAttention,
)
from tests.conftest import assert_close, normal, output_and_vjp, to64

# Row 0: all valid; row 1: left padding and a hole; row 2: nothing valid.
PAD_MASK = jnp.array([[True] * 9,
                      [False, False, True, True, False, True, True, True, True],
                      [False] * 9])


def _check_against_reference(fn, ref, args, cotangent, dtype):
    """fn(*args) in ``dtype`` against ref in float64: forward and the vjp of ``cotangent``."""
    args = jax.tree_util.tree_map(lambda x: x.astype(dtype)
                                  if jnp.issubdtype(x.dtype, jnp.floating) else x, args)
    got, g_got = output_and_vjp(fn, jax.tree_util.tree_map(lambda c: c.astype(dtype),
                                                           cotangent))(*args)
    with jax.enable_x64(True):
        want, g_want = output_and_vjp(ref, to64(cotangent))(*to64(args))
    for a, w in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want),
                    strict=True):
        assert a.dtype == dtype
        assert_close(a, w, dtype, "forward")
    for a, w in zip(jax.tree_util.tree_leaves(g_got), jax.tree_util.tree_leaves(g_want),
                    strict=True):
        assert_close(a, w, dtype, "grad")


# --------------------------------------------------------------------------------------------
# P33 LAMA


def _lama_args(B=3, n=9, d=6, k=4, context_rank=2, seed=0):
    context_shape = (B, d) if context_rank == 2 else (d,)
    return (normal(seed, (B, n, d)), normal(seed + 1, context_shape),
            normal(seed + 2, (d, k)), normal(seed + 3, (d, k)))


@pytest.mark.parametrize("dtype,masked,context_rank", [
    (jnp.float64, False, 2), (jnp.float64, True, 1), (jnp.float32, True, 2),
    (jnp.bfloat16, True, 1)])
def test_lama_matches_reference(dtype, masked, context_rank):
    args = _lama_args(context_rank=context_rank)
    mask = PAD_MASK if masked else None
    cotangent = (normal(7, (3, 4, 6)), normal(8, (3, 4, 9)))
    with jax.enable_x64(dtype == jnp.float64):
        _check_against_reference(
            functools.partial(context_query_pooling, mask=mask),
            functools.partial(reference.context_query_pooling, mask=mask),
            args, cotangent, dtype)


def test_lama_hand_worked():
    # c = (1, 1), P = Q = I: f_t = tanh(h_t), then normalised over the two heads.
    h = jnp.array([[[math.atanh(0.6), math.atanh(0.8)], [0.0, 0.0], [5.0, 7.0]]])
    eye = jnp.eye(2)
    mask = jnp.array([[True, True, False]])
    pooled, attention = context_query_pooling(h, jnp.ones(2), eye, eye, mask=mask)
    # Token 0: f = (0.6, 0.8), norm 1. Token 1: f = 0 stays 0. Token 2: padding.
    e = np.exp
    want = np.array([[e(0.6), 1, 0], [e(0.8), 1, 0]]) / np.array([[e(0.6) + 1], [e(0.8) + 1]])
    np.testing.assert_allclose(attention[0], want, rtol=1e-6)
    np.testing.assert_allclose(pooled[0], want @ np.asarray(h[0]), rtol=1e-6)
    grads = jax.jit(jax.grad(lambda x: context_query_pooling(x, jnp.ones(2), eye, eye,
                                                             mask=mask)[0].sum()))(h)
    assert bool(jnp.isfinite(grads).all())  # the zero f_t has a finite gradient
    np.testing.assert_array_equal(grads[0, 2], 0)  # padding gets none


def test_lama_one_head_is_sign_softmax():
    # k = 1: the L2 normalisation leaves sign(f_t), so A = softmax(sign(h_t)).
    h = jnp.array([[[0.3], [-2.0], [4.0], [-0.1]]])
    _, attention = context_query_pooling(h, jnp.array([2.0]), jnp.ones((1, 1)), jnp.ones((1, 1)))
    s = np.array([1.0, -1.0, 1.0, -1.0])
    np.testing.assert_allclose(attention[0, 0], np.exp(s) / np.exp(s).sum(), rtol=1e-6)


def test_lama_padding_is_ignored_and_empty_rows_are_zero():
    h, c, P, Q = _lama_args()
    noisy = jnp.where(PAD_MASK[..., None], h, 1e3)
    fn = jax.jit(functools.partial(context_query_pooling, mask=PAD_MASK))
    pooled, attention = fn(h, c, P, Q)
    pooled2, attention2 = fn(noisy, c, P, Q)
    np.testing.assert_allclose(pooled2, pooled, atol=1e-6)
    np.testing.assert_allclose(attention2, attention, atol=1e-6)
    np.testing.assert_array_equal(attention[~PAD_MASK[:, None, :].repeat(4, 1)], 0)
    np.testing.assert_allclose(attention[:2].sum(-1), 1, rtol=1e-6)
    np.testing.assert_array_equal(pooled[2], 0)
    grads = jax.grad(lambda *a: fn(*a)[0].sum(), argnums=(0, 1, 2, 3))(h, c, P, Q)
    assert all(bool(jnp.isfinite(g).all()) for g in grads)


def test_masked_mean():
    h = normal(0, (3, 9, 5))
    got = masked_mean(h, mask=PAD_MASK)
    m = np.asarray(PAD_MASK, np.float32)[..., None]
    np.testing.assert_allclose(got[:2], (np.asarray(h) * m).sum(1)[:2] / m.sum(1)[:2],
                               rtol=1e-5)
    np.testing.assert_array_equal(got[2], 0)
    np.testing.assert_allclose(masked_mean(h), h.mean(1), rtol=1e-6)


def test_lama_jit_vmap():
    h, c, P, Q = _lama_args()
    expected = jax.jit(context_query_pooling)(h, c, P, Q)
    batched = jax.jit(jax.vmap(lambda a, b: tuple(
        y[0] for y in context_query_pooling(a[None], b[None], P, Q))))(h, c)
    for a, w in zip(batched, expected, strict=True):
        np.testing.assert_allclose(a, w, atol=1e-6)


@pytest.mark.parametrize("change,name,error", [
    ({"hidden": jnp.ones((3, 9))}, "hidden", ValueError),
    ({"hidden": jnp.ones((3, 0, 6))}, "hidden", ValueError),
    ({"hidden": jnp.ones((3, 9, 6), jnp.int32)}, "hidden", TypeError),
    ({"context": jnp.ones((2, 6))}, "context", ValueError),
    ({"context": jnp.ones((3, 1, 6))}, "context", ValueError),
    ({"query_factors": jnp.ones((6, 3))}, "query_factors", ValueError),
    ({"key_factors": jnp.ones((5, 4))}, "key_factors", ValueError),
    ({"mask": jnp.ones((3, 8), bool)}, "mask", ValueError),
    ({"mask": jnp.ones((3, 9), jnp.int32)}, "mask", TypeError),
])
def test_lama_bad_input(change, name, error):
    h, c, P, Q = _lama_args()
    args = {"hidden": h, "context": c, "query_factors": P, "key_factors": Q} | change
    with pytest.raises(error, match=rf"^{name}:"):
        context_query_pooling(**args)


@pytest.mark.parametrize("context", ["learned", "mean"])
def test_lama_module_equals_functional_call(context):
    module = ContextQueryPooling(6, num_heads=4, context=context, rngs=nnx.Rngs(0))
    h = normal(1, (3, 9, 6))
    c = (module.context_vector[...] if context == "learned"
         else reference.window_mean(h, 9, mask=PAD_MASK)[:, -1])  # the mean of all valid
    got = module(h, mask=PAD_MASK)
    want = reference.context_query_pooling(h, c, module.query_factors[...],
                                           module.key_factors[...], mask=PAD_MASK)
    for a, w in zip(got, want, strict=True):
        np.testing.assert_allclose(a, w, atol=1e-5)
    with pytest.raises(ValueError, match="context"):
        ContextQueryPooling(6, 4, context="max", rngs=nnx.Rngs(0))


# --------------------------------------------------------------------------------------------
# P38 MQSA


@pytest.mark.parametrize("dtype,window,masked", [
    (jnp.float64, 1, True), (jnp.float64, 2, False), (jnp.float64, 3, True),
    (jnp.float64, 20, True), (jnp.float32, 3, True), (jnp.bfloat16, 4, True)])
def test_window_mean_matches_reference(dtype, window, masked):
    mask = PAD_MASK if masked else None
    x = normal(0, (3, 9, 5))
    with jax.enable_x64(dtype == jnp.float64):
        _check_against_reference(functools.partial(window_mean, window=window, mask=mask),
                                 functools.partial(reference.window_mean, window=window,
                                                   mask=mask),
                                 (x,), normal(1, (3, 9, 5)), dtype)


def test_window_mean_hand_worked():
    x = jnp.array([[1.0, 2.0, 4.0, 8.0, 16.0]])[..., None]
    mask = jnp.array([[True, False, True, True, True]])
    np.testing.assert_allclose(window_mean(x, 3)[0, :, 0],
                               [1, 1.5, 7 / 3, 14 / 3, 28 / 3], rtol=1e-6)
    np.testing.assert_allclose(window_mean(x, 3, mask=mask)[0, :, 0],
                               [1, 1, 2.5, 6, 28 / 3], rtol=1e-6)
    np.testing.assert_allclose(window_mean(x, 1, mask=mask)[0, :, 0], [1, 0, 4, 8, 16])


def test_window_mean_is_causal_and_window_one_is_identity():
    x = normal(0, (3, 9, 5))
    y = window_mean(x, 3, mask=PAD_MASK)
    y2 = window_mean(x.at[:, 5:].set(7.0), 3, mask=PAD_MASK)
    np.testing.assert_array_equal(y[:, :5], y2[:, :5])
    np.testing.assert_array_equal(window_mean(x, 1, mask=PAD_MASK),
                                  jnp.where(PAD_MASK[..., None], x, 0))
    np.testing.assert_array_equal(window_mean(x, 1), x)


def test_window_mean_jit_vmap():
    x = normal(0, (3, 9, 5))
    fn = jax.jit(functools.partial(window_mean, window=3))
    batched = jax.jit(jax.vmap(lambda a, m: window_mean(a[None], 3, mask=m[None])[0]))
    np.testing.assert_allclose(batched(x, PAD_MASK), window_mean(x, 3, mask=PAD_MASK),
                               atol=1e-6)
    np.testing.assert_allclose(fn(x), window_mean(x, 3), atol=1e-6)


@pytest.mark.parametrize("change,name,error", [
    ({"window": 0}, "window", ValueError),
    ({"window": 2.0}, "window", ValueError),
    ({"window": True}, "window", ValueError),
    ({"x": jnp.ones((3, 9))}, "x", ValueError),
    ({"x": jnp.ones((3, 9, 5), jnp.int32)}, "x", TypeError),
    ({"mask": jnp.ones((3, 5), bool)}, "mask", ValueError),
    ({"mask": jnp.ones((3, 9))}, "mask", TypeError),
])
def test_window_mean_bad_input(change, name, error):
    args = {"x": jnp.ones((3, 9, 5)), "window": 2, "mask": PAD_MASK} | change
    with pytest.raises(error, match=rf"^{name}:"):
        window_mean(**args)


def _linear(layer, x):
    return x @ layer.kernel[...] + layer.bias[...]


def _l_query_by_hand(layer, x, mask, *, pooled=None):
    """LQuerySelfAttention written out from the spec with the reference functions."""
    B, T, D = x.shape
    qbar = reference.window_mean(x, layer.window, mask=mask) if pooled is None else pooled
    mean = qbar.mean(-1, keepdims=True)
    var = ((qbar - mean) ** 2).mean(-1, keepdims=True)
    norm = layer.query_norm
    normed = (qbar - mean) / jnp.sqrt(var + 1e-8) * norm.scale[...] + norm.bias[...]
    heads = (B, T, layer.num_heads, D // layer.num_heads)
    q = _linear(layer.query_proj, normed).reshape(heads)
    k = _linear(layer.key_proj, x).reshape(heads)
    v = _linear(layer.value_proj, x).reshape(heads)
    out = reference.dot_product_attention(q, k, v, is_causal=True,
                                          mask=mask[:, None, None, :]).reshape(B, T, D)
    if layer.residual:
        out = out + normed
    return jnp.where(mask[..., None], out, 0)


@pytest.mark.parametrize("window,num_heads,residual", [(1, 1, True), (3, 2, True),
                                                      (4, 1, False)])
def test_l_query_module_equals_definition(window, num_heads, residual):
    layer = LQuerySelfAttention(8, window, num_heads, residual=residual, rngs=nnx.Rngs(0))
    x = normal(1, (3, 9, 8))
    np.testing.assert_allclose(layer(x, mask=PAD_MASK), _l_query_by_hand(layer, x, PAD_MASK),
                               atol=2e-5)


def test_window_one_is_causal_self_attention():
    layer = LQuerySelfAttention(8, 1, 2, residual=False, rngs=nnx.Rngs(0))
    x = normal(1, (3, 9, 8))
    mask = jnp.ones((3, 9), bool)
    # The pooled query of window 1 is the item itself: ordinary causal self-attention.
    by_hand = _l_query_by_hand(layer, x, mask, pooled=x)
    np.testing.assert_allclose(layer(x), by_hand, atol=2e-5)
    np.testing.assert_allclose(layer(x, mask=mask), by_hand, atol=2e-5)


def test_multi_query_mixes_two_separate_towers():
    layer = MultiQuerySelfAttention(8, long_window=3, alpha=0.3, rngs=nnx.Rngs(0))
    assert (layer.short.window, layer.long.window) == (1, 3)
    assert not np.allclose(layer.short.query_proj.kernel[...], layer.long.query_proj.kernel[...])
    x = normal(1, (3, 9, 8))
    want = (0.3 * _l_query_by_hand(layer.short, x, PAD_MASK)
            + 0.7 * _l_query_by_hand(layer.long, x, PAD_MASK))
    np.testing.assert_allclose(layer(x, mask=PAD_MASK), want, atol=2e-5)
    assert bool(jnp.isfinite(layer(x, mask=PAD_MASK)).all())
    noisy = MultiQuerySelfAttention(8, dropout_rate=0.5, rngs=nnx.Rngs(0))
    dropped = noisy(x, mask=PAD_MASK, dropout_rng=jax.random.key(0))
    assert not np.allclose(dropped, noisy(x, mask=PAD_MASK))


def test_mqsa_module_bad_options():
    with pytest.raises(ValueError, match="window"):
        LQuerySelfAttention(8, 0, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="num_heads"):
        LQuerySelfAttention(8, 2, 3, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="alpha"):
        MultiQuerySelfAttention(8, alpha=1.5, rngs=nnx.Rngs(0))


# --------------------------------------------------------------------------------------------
# P47 DARE


def _dare_args(B=3, n=9, d_att=4, d_repr=6, seed=0):
    return (normal(seed, (B, d_att)), normal(seed + 1, (B, n, d_att)),
            normal(seed + 2, (B, n, d_repr)))


@pytest.mark.parametrize("dtype,top_k,masked", [
    (jnp.float64, 1, False), (jnp.float64, 3, True), (jnp.float64, 5, True),
    (jnp.float64, None, True), (jnp.float64, 20, False), (jnp.float32, 3, True),
    (jnp.float32, None, False), (jnp.bfloat16, 5, True)])
def test_dare_matches_reference(dtype, top_k, masked):
    mask = PAD_MASK if masked else None
    options = {"top_k": top_k, "mask": mask, "return_weights": True}
    cotangent = (normal(7, (3, 6)), normal(8, (3, 9)))
    with jax.enable_x64(dtype == jnp.float64):
        _check_against_reference(functools.partial(decoupled_target_attention, **options),
                                 functools.partial(reference.decoupled_target_attention,
                                                   **options),
                                 _dare_args(), cotangent, dtype)


def test_dare_hand_worked():
    target = jnp.array([[1.0, 0.0]])
    att = jnp.array([[[1.0, 0.0], [2.0, 0.0], [0.0, 1.0], [3.0, 0.0], [2.0, 5.0]]])
    rep = jnp.arange(15.0).reshape(1, 5, 3)
    mask = jnp.array([[True, True, True, True, False]])
    # Scores 1, 2, 0, 3 (and padding): top-2 = behaviours 3 and 1.
    h, w = decoupled_target_attention(target, att, rep, top_k=2, mask=mask, scale=1.0,
                                      return_weights=True)
    p = np.exp([2.0, 3.0]) / np.exp([2.0, 3.0]).sum()
    np.testing.assert_allclose(w[0], [0, p[0], 0, p[1], 0], rtol=1e-6)
    np.testing.assert_allclose(h[0], p[0] * rep[0, 1] + p[1] * rep[0, 3], rtol=1e-6)
    # The default scale is 1 / sqrt(d_att).
    np.testing.assert_allclose(decoupled_target_attention(target, att, rep, top_k=2),
                               decoupled_target_attention(target, att, rep, top_k=2,
                                                          scale=2 ** -0.5), rtol=1e-6)


def test_dare_ties_go_to_the_lower_index_and_few_valid_keep_all():
    target = jnp.ones((1, 2))
    att = jnp.ones((1, 6, 2))  # every score ties
    rep = normal(0, (1, 6, 3))
    _, w = decoupled_target_attention(target, att, rep, top_k=2, return_weights=True)
    np.testing.assert_allclose(w[0], [0.5, 0.5, 0, 0, 0, 0])
    mask = jnp.array([[False, False, False, True, False, True]])
    h, w = decoupled_target_attention(target, normal(1, (1, 6, 2)), rep, top_k=4, mask=mask,
                                      return_weights=True)
    assert bool((w[0, [3, 5]] > 0).all()) and float(w.sum()) == pytest.approx(1.0)
    np.testing.assert_allclose(h[0], w[0, 3] * rep[0, 3] + w[0, 5] * rep[0, 5], rtol=1e-6)


def test_dare_per_part_scaling_by_prescaling_the_target():
    # DARE's code scores the item/category part and the time part each with its own
    # 1/sqrt(dim); the docstring's recipe: divide the target's parts, pass scale=1.
    a_t, a, r = _dare_args(d_att=6)
    prescaled = jnp.concatenate([a_t[:, :4] / 2, a_t[:, 4:] / math.sqrt(2)], axis=1)
    _, w = decoupled_target_attention(prescaled, a, r, top_k=None, scale=1.0,
                                      return_weights=True)
    t, b = np.asarray(a_t, np.float64), np.asarray(a, np.float64)
    s = (np.einsum("bd,bnd->bn", t[:, :4], b[..., :4]) / 2
         + np.einsum("bd,bnd->bn", t[:, 4:], b[..., 4:]) / math.sqrt(2))
    want = np.exp(s - s.max(1, keepdims=True))
    np.testing.assert_allclose(w, want / want.sum(1, keepdims=True), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("top_k", [9, 50, None])
def test_dare_topk_at_least_n_is_softmax_attention(top_k):
    a_t, a, r = _dare_args()
    dense = jattn.dot_product_attention(a_t[:, None, None], a[:, :, None], r[:, :, None],
                                        mask=PAD_MASK[:, None, None, :])[:, 0, 0]
    np.testing.assert_allclose(decoupled_target_attention(a_t, a, r, top_k=top_k, mask=PAD_MASK),
                               dense, atol=1e-6)


def test_dare_empty_rows_are_zero_with_finite_gradients():
    a_t, a, r = _dare_args()
    for top_k in (3, None):
        fn = functools.partial(decoupled_target_attention, top_k=top_k, mask=PAD_MASK)
        np.testing.assert_array_equal(fn(a_t, a, r)[2], 0)
        grads = jax.jit(jax.grad(lambda *x: fn(*x).sum(),  # noqa: B023
                                 argnums=(0, 1, 2)))(a_t, a, r)
        assert all(bool(jnp.isfinite(g).all()) for g in grads)
        np.testing.assert_array_equal(grads[2][2], 0)


def test_dare_jit_vmap():
    a_t, a, r = _dare_args()
    fn = functools.partial(decoupled_target_attention, top_k=3)
    expected = jax.jit(fn)(a_t, a, r)
    batched = jax.jit(jax.vmap(lambda *x: fn(*(y[None] for y in x))[0]))(a_t, a, r)
    np.testing.assert_allclose(batched, expected, atol=1e-6)
    np.testing.assert_allclose(fn(a_t, a, r), expected, atol=1e-6)


@pytest.mark.parametrize("change,name,error", [
    ({"top_k": 0}, "top_k", ValueError),
    ({"top_k": 2.5}, "top_k", ValueError),
    ({"target_att": jnp.ones((3, 5))}, "target_att", ValueError),
    ({"target_att": jnp.ones((3, 4), jnp.bfloat16)}, "target_att, behaviour_att", TypeError),
    ({"behaviour_att": jnp.ones((3, 9))}, "behaviour_att", ValueError),
    ({"behaviour_att": jnp.ones((3, 0, 4)), "behaviour_repr": jnp.ones((3, 0, 6)),
      "mask": None}, "behaviour_att", ValueError),
    ({"behaviour_repr": jnp.ones((3, 8, 6))}, "behaviour_repr", ValueError),
    ({"behaviour_repr": jnp.ones((3, 9, 6), jnp.int32)}, "behaviour_repr", TypeError),
    ({"mask": jnp.ones((3, 8), bool)}, "mask", ValueError),
])
def test_dare_bad_input(change, name, error):
    a_t, a, r = _dare_args()
    args = {"target_att": a_t, "behaviour_att": a, "behaviour_repr": r, "top_k": 3,
            "mask": PAD_MASK} | change
    with pytest.raises(error, match=rf"^{name}:"):
        decoupled_target_attention(**args)


@pytest.mark.parametrize("full_attention,cross_feature", [(False, True), (True, False)])
def test_dare_module_equals_functional_call(full_attention, cross_feature):
    dare = DecoupledEmbeddings(20, 4, 6, top_k=3, cross_feature=cross_feature,
                               rngs=nnx.Rngs(0))
    target = jnp.array([3, 7, 19])
    behaviours = jnp.array(np.random.default_rng(0).integers(1, 20, (3, 9))) * PAD_MASK
    A, R = dare.attention_table.embedding[...], dare.representation_table.embedding[...]
    h = reference.decoupled_target_attention(A[target], A[behaviours], R[behaviours],
                                             top_k=None if full_attention else 3,
                                             mask=behaviours != 0)
    parts = [R[target], h, R[target] * h] if cross_feature else [R[target], h]
    got = dare(target, behaviours, full_attention=full_attention)
    assert got.shape == (3, 6 * len(parts))
    np.testing.assert_allclose(got, jnp.concatenate(parts, -1), atol=1e-5)


def test_dare_tables_are_decoupled():
    dare = DecoupledEmbeddings(20, 2, 6, top_k=2, rngs=nnx.Rngs(0))
    target = jnp.array([3])
    behaviours = jnp.array([[1, 2, 4, 5, 0]])
    graphdef, state = nnx.split(dare)

    def loss(state):
        return nnx.merge(graphdef, state)(target, behaviours).sum()

    grads = jax.jit(jax.grad(loss))(state)
    g_repr = np.abs(np.asarray(grads["representation_table"]["embedding"][...])).sum(-1)
    g_att = np.abs(np.asarray(grads["attention_table"]["embedding"][...])).sum(-1)
    # Representation rows get gradient only for the target and the 2 selected behaviours;
    # attention rows for the target and the selected ones (through the softmax).
    assert set(np.flatnonzero(g_repr)) <= {1, 2, 3, 4, 5} and np.count_nonzero(g_repr) == 3
    assert g_att[3] > 0 and g_att[0] == 0 and np.count_nonzero(g_att) == 3
    with pytest.raises(ValueError, match="behaviour_ids"):
        dare(target, jnp.array([[1, 20]]))
    with pytest.raises(TypeError, match="target_ids"):
        dare(jnp.array([1.0]), behaviours)


# --------------------------------------------------------------------------------------------
# P35: pooling of LLM hidden states


def _np_attention(q, k, v, heads):
    """Multi-head softmax attention in float64 NumPy: q [n, d], k, v [m, d] -> [n, d]."""
    n, d = q.shape
    H = d // heads
    out = np.zeros((n, d))
    for h in range(heads):
        sl = slice(h * H, (h + 1) * H)
        s = q[:, sl] @ k[:, sl].T / np.sqrt(H)
        p = np.exp(s - s.max(-1, keepdims=True))
        out[:, sl] = (p / p.sum(-1, keepdims=True)) @ v[:, sl]
    return out


def test_last_token_pool_handles_left_and_right_padding():
    h = np.asarray(normal(0, (3, 6, 4)))
    mask = np.array([[1, 1, 1, 0, 0, 0], [0, 0, 1, 1, 1, 1], [0, 0, 0, 0, 0, 0]], bool)
    got = jattn.last_token_pool(jnp.asarray(h), mask=jnp.asarray(mask))
    np.testing.assert_array_equal(got, np.stack([h[0, 2], h[1, 5], np.zeros(4)]))
    np.testing.assert_array_equal(jattn.last_token_pool(jnp.asarray(h)), h[:, -1])
    with pytest.raises(ValueError, match="mask"):
        jattn.last_token_pool(jnp.asarray(h), mask=jnp.asarray(mask[:, :5]))


def test_latent_attention_pool_matches_numpy_and_ignores_padding():
    B, n, d, r, heads = 2, 7, 8, 5, 2
    h, lk, lv = normal(1, (B, n, d)), normal(2, (r, d)), normal(3, (r, d))
    mask = jnp.asarray(np.arange(n)[None] < np.array([[7], [4]]))
    got = jattn.latent_attention_pool(h, lk, lv, num_heads=heads, mask=mask,
                                      transform=jnp.tanh)
    want = [np.tanh(_np_attention(np.asarray(h[b], np.float64), np.asarray(lk, np.float64),
                                  np.asarray(lv, np.float64), heads))[:m].mean(0)
            for b, m in enumerate((7, 4))]
    np.testing.assert_allclose(got, np.stack(want), atol=1e-5)
    padded = h.at[1, 4:].set(1e3)  # the padding's content does not matter
    np.testing.assert_allclose(jattn.latent_attention_pool(padded, lk, lv, num_heads=heads,
                                                           mask=mask, transform=jnp.tanh),
                               got, atol=1e-6)
    with pytest.raises(ValueError, match="num_heads"):
        jattn.latent_attention_pool(h, lk, lv, num_heads=3)
    with pytest.raises(ValueError, match="latent_values"):
        jattn.latent_attention_pool(h, lk, lv[:2], num_heads=2)


def test_multi_layer_pool_matches_numpy_and_is_order_free_without_layer_embeddings():
    B, L, d, r, heads = 2, 5, 8, 3, 4
    x, q = normal(4, (B, L, d)), normal(5, (r, d))
    e, wk, wv = normal(6, (L, d)), normal(7, (d, d)), normal(8, (d, d))
    got = jattn.multi_layer_pool(x, q, num_heads=heads, layer_embeddings=e, key_kernel=wk,
                                 value_kernel=wv)
    f64 = [np.asarray(a, np.float64) for a in (x, q, e, wk, wv)]
    want = [_np_attention(f64[1], (f64[0][b] + f64[2]) @ f64[3], (f64[0][b] + f64[2]) @ f64[4],
                          heads).mean(0) for b in range(B)]
    np.testing.assert_allclose(got, np.stack(want), atol=1e-5)
    order = np.random.default_rng(0).permutation(L)
    plain = jattn.multi_layer_pool(x, q, num_heads=heads)
    np.testing.assert_allclose(jattn.multi_layer_pool(x[:, order], q, num_heads=heads), plain,
                               atol=1e-6)
    with pytest.raises(ValueError, match="layer_embeddings"):
        jattn.multi_layer_pool(x, q, num_heads=heads, layer_embeddings=e[:2])


def test_llm_pooling_modules_equal_their_functions_and_train():
    from jattn.nn.applications.pooling import LatentAttentionPooling, MultiLayerTrainablePooling

    hidden = normal(9, (2, 3, 6, 8))  # [B, L, n, d]
    mask = jnp.asarray(np.arange(6)[None] < np.array([[6], [3]]))
    latent = LatentAttentionPooling(8, num_latents=4, num_heads=2, rngs=nnx.Rngs(0))
    np.testing.assert_allclose(
        latent(hidden[:, -1], mask=mask),
        jattn.latent_attention_pool(hidden[:, -1], latent.latent_keys[...],
                                    latent.latent_values[...], num_heads=2, mask=mask,
                                    transform=latent.mlp), atol=1e-6)
    multi = MultiLayerTrainablePooling(8, num_layers=3, num_queries=2, num_heads=2,
                                       rngs=nnx.Rngs(1))
    last = jattn.last_token_pool(hidden, mask=jnp.broadcast_to(mask[:, None], (2, 3, 6)))
    np.testing.assert_allclose(
        multi(hidden, mask=mask),
        jattn.multi_layer_pool(last, multi.queries[...], num_heads=2,
                               layer_embeddings=multi.layer_embeddings[...],
                               key_kernel=multi.key_proj.kernel[...],
                               value_kernel=multi.value_proj.kernel[...], transform=multi.mlp),
        atol=1e-6)
    grads = nnx.grad(lambda m: (m(hidden, mask=mask) ** 2).sum())(multi)
    assert all(np.isfinite(g).all() and np.abs(g).sum() > 0
               for g in jax.tree.leaves(grads) if g.ndim)
    out = jax.jit(jax.vmap(lambda h, m: jattn.last_token_pool(h, mask=m)))(hidden[:, -1], mask)
    np.testing.assert_array_equal(out, jattn.last_token_pool(hidden[:, -1], mask=mask))
