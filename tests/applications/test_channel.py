"""Channel and spatial attention for conv features (P49 ECA, P26 SE / sentence attention
block, P07 DANet position and channel attention): fast paths against the plain references
of jattn.reference (float64, forward and gradients), the adaptive kernel size against its
formula, properties, transforms, errors, modules."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jattn.applications.channel
from jattn import reference
from jattn.applications.channel import (
    channel_attention,
    conditioned_channel_attention,
    eca,
    eca_kernel_size,
    position_attention,
    squeeze_excitation,
)
from jattn.nn.applications.channel import (
    ECA,
    ChannelAttention,
    PositionAttention,
    SentenceAttentionBlock,
    SqueezeExcitation,
)
from tests.conftest import normal, normalised_error, to64


def _forward_and_grads(fn, args, seed=99):
    """(fn(*args), grads of <fn(*args), cotangent> w.r.t. every floating argument)."""
    out = fn(*args)
    cotangent = normal(seed, out.shape, out.dtype)
    floating = [i for i, a in enumerate(args)
                if hasattr(a, "dtype") and jnp.issubdtype(a.dtype, jnp.floating)]

    def scalar(*diff):
        full = list(args)
        for i, a in zip(floating, diff, strict=True):
            full[i] = a
        return jnp.sum(fn(*full) * cotangent)

    grads = jax.jit(jax.grad(scalar, argnums=tuple(range(len(floating)))))(
        *[args[i] for i in floating])
    return out, grads


def _assert_matches_reference(fast, ref, args, **options):
    """float64: fast path == reference, forward and gradients, to ~1e-12."""
    with jax.enable_x64(True):
        args = to64(args)
        got, g_got = _forward_and_grads(jax.jit(functools.partial(fast, **options)), args)
        want, g_want = _forward_and_grads(jax.jit(functools.partial(ref, **options)), args)
        assert got.dtype == jnp.float64
        assert normalised_error(got, want) < 1e-12
        for a, w in zip(g_got, g_want, strict=True):
            assert normalised_error(a, w) < 1e-11


# --------------------------------------------------------------------------------------------
# P49 ECA


def _code_kernel_size(channels, gamma=2, b=1):
    """The ECA-Net code's formula, written here independently of both implementations."""
    t = int(abs((math.log(channels, 2) + b) / gamma))
    return t if t % 2 else t + 1


@pytest.mark.parametrize("gamma,b", [(2, 1), (1, 0), (3, 2), (2.5, 0.5)])
def test_eca_kernel_size_matches_the_formula(gamma, b):
    for channels in [1, 2, 3, 7, 16, 24, 64, 100, 128, 256, 512, 1000, 1024, 2048, 4096]:
        k = eca_kernel_size(channels, gamma, b)
        assert k == _code_kernel_size(channels, gamma, b) == reference.eca_kernel_size(
            channels, gamma, b)
        assert k % 2 == 1
        t = math.log2(channels) / gamma + b / gamma
        assert abs(k - t) <= 1  # the nearest odd number


def test_eca_kernel_size_of_resnet_widths():
    # gamma=2, b=1: the sizes the adaptive rule gives for ResNet's stage widths.
    assert [eca_kernel_size(c) for c in (64, 128, 256, 512, 1024, 2048)] == [3, 5, 5, 5, 5, 7]


@pytest.mark.parametrize("channels,gamma", [(0, 2), (-3, 2), (2.0, 2), (True, 2), (8, 0),
                                            (8, -1)])
def test_eca_kernel_size_errors(channels, gamma):
    with pytest.raises(ValueError, match="channels" if gamma > 0 else "gamma"):
        eca_kernel_size(channels, gamma)


@pytest.mark.parametrize("shape,k", [((2, 3, 5, 7), 3), ((2, 6, 16), 5), ((1, 2, 3, 2, 6), 1),
                                     ((2, 3, 3, 3), 5)])  # last: kernel wider than C
def test_eca_matches_reference(shape, k):
    x = normal(0, shape)
    w = normal(1, (k,))
    _assert_matches_reference(eca, reference.eca, (x, w))


def test_eca_by_hand():
    # Channel means z = [1, 2, 3]; kernel [1, 0, -1] (cross-correlation, zero padded):
    # y = [0 - 2, 1 - 3, 2 - 0] = [-2, -2, 2].
    x = jnp.broadcast_to(jnp.array([1.0, 2.0, 3.0]), (1, 2, 2, 3))
    got = eca(x, jnp.array([1.0, 0.0, -1.0]))
    want = x * jax.nn.sigmoid(jnp.array([-2.0, -2.0, 2.0]))
    np.testing.assert_allclose(got, want, rtol=1e-6)


# --------------------------------------------------------------------------------------------
# P26 squeeze-excitation and the sentence attention block


def _se_weights(C=6, R=3, seed=10):
    return (normal(seed, (C, R)), normal(seed + 1, (R,)), normal(seed + 2, (R, C)),
            normal(seed + 3, (C,)))


@pytest.mark.parametrize("biases", [True, False])
@pytest.mark.parametrize("shape", [(2, 3, 4, 6), (3, 5, 6)])
def test_squeeze_excitation_matches_reference(shape, biases):
    w1, b1, w2, b2 = _se_weights(C=shape[-1])
    if not biases:
        b1 = b2 = None
    _assert_matches_reference(squeeze_excitation, reference.squeeze_excitation,
                              (normal(0, shape), w1, b1, w2, b2))


def _sab_args(C=6, D=5, M=8, pool_image=False, shape=(2, 3, 4)):
    x = normal(0, (*shape, C))
    sentence = normal(1, (shape[0], D))
    d_in = D + (C if pool_image else 0)
    return (x, sentence, normal(2, (d_in, M)), normal(3, (M,)), normal(4, (M, C)),
            normal(5, (C,)))


@pytest.mark.parametrize("gate,pool_image,layer_norm", [
    ("softmax", False, True), ("sigmoid", False, True), ("softmax", True, False),
    ("sigmoid", True, True)])
def test_conditioned_channel_attention_matches_reference(gate, pool_image, layer_norm):
    args = _sab_args(pool_image=pool_image)
    options = {"gate": gate, "pool_image": pool_image}
    if layer_norm:
        options.update(norm_scale=normal(6, (8,)), norm_bias=normal(7, (8,)))
    _assert_matches_reference(conditioned_channel_attention,
                              reference.conditioned_channel_attention, args, **options)


def test_softmax_gate_weights_sum_to_one_and_follow_the_sentence():
    _, sentence, w1, b1, w2, b2 = _sab_args()
    x = jnp.ones((2, 3, 4, 6))
    weights = conditioned_channel_attention(x, sentence, w1, b1, w2, b2)[:, 0, 0]
    np.testing.assert_allclose(weights.sum(-1), 1.0, rtol=1e-6)
    assert (weights > 0).all()
    # Another sentence, other channel weights; the image itself does not change them.
    other = conditioned_channel_attention(x, sentence[::-1], w1, b1, w2, b2)[:, 0, 0]
    np.testing.assert_allclose(other, weights[::-1], rtol=1e-6)
    assert not np.allclose(weights[0], weights[1])
    scaled = conditioned_channel_attention(3 * x, sentence, w1, b1, w2, b2)[:, 0, 0]
    np.testing.assert_allclose(scaled, 3 * weights, rtol=1e-6)


# --------------------------------------------------------------------------------------------
# P07 DANet position and channel attention


def _pam_args(shape=(2, 3, 5, 6), Cq=2, seed=0):
    C = shape[-1]
    return (normal(seed, shape), normal(seed + 1, (C, Cq)), normal(seed + 2, (C, Cq)),
            normal(seed + 3, (C, C)), jnp.asarray(0.7))


@pytest.mark.parametrize("shape,biases,scale", [((2, 3, 5, 6), True, 1.0),
                                                ((2, 7, 6), False, 0.5),
                                                ((1, 2, 3, 2, 6), True, 1.0)])
def test_position_attention_matches_reference(shape, biases, scale):
    x, wq, wk, wv, gamma = _pam_args(shape)
    options = {"scale": scale}
    if biases:
        options.update(bq=normal(7, (2,)), bk=normal(8, (2,)), bv=normal(9, (shape[-1],)))
    _assert_matches_reference(position_attention, reference.position_attention,
                              (x, wq, wk, wv, gamma), **options)


def test_position_attention_goes_through_dot_product_attention(monkeypatch):
    calls = []
    original = jattn.dot_product_attention

    def spy(*args, **kwargs):
        calls.append(args[0].shape)
        return original(*args, **kwargs)

    monkeypatch.setattr(jattn.applications.channel, "dot_product_attention", spy)
    x, wq, wk, wv, gamma = _pam_args()
    position_attention(x, wq, wk, wv, gamma)
    channel_attention(x, gamma)
    assert calls == [(2, 15, 1, 2), (2, 6, 1, 15)]  # 3*5 positions; then 6 channel tokens


@pytest.mark.parametrize("form", ["paper", "max_minus"])
@pytest.mark.parametrize("shape", [(2, 3, 5, 6), (1, 2, 2, 3, 4)])
def test_channel_attention_matches_reference(form, shape):
    # Scaled down so that the C x C affinities (sums over the positions) do not saturate the
    # softmax and the gradients stay informative.
    x = 0.3 * normal(0, shape)
    _assert_matches_reference(channel_attention, reference.channel_attention,
                              (x, jnp.asarray(-1.3)), form=form)


def test_channel_attention_forms_by_hand():
    # Two channels over two positions: A_0 = [1, 0], A_1 = [1, 1]; E = [[1, 1], [1, 2]].
    x = jnp.array([[[1.0, 1.0], [0.0, 1.0]]])  # [B=1, L=2, C=2]
    e = np.array([[1.0, 1.0], [1.0, 2.0]])
    a = np.array([[1.0, 0.0], [1.0, 1.0]])
    for form, logits in (("paper", e), ("max_minus", e.max(1, keepdims=True) - e)):
        p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
        want = (2.0 * p @ a + a).T[None]
        np.testing.assert_allclose(channel_attention(x, 2.0, form=form), want, rtol=1e-6)


def test_gamma_zero_is_the_identity():
    x, wq, wk, wv, _ = _pam_args()
    np.testing.assert_array_equal(position_attention(x, wq, wk, wv, 0.0), x)
    np.testing.assert_array_equal(channel_attention(x, 0.0), x)


def test_position_attention_is_permutation_equivariant():
    # No positional information: permuting the pixels permutes the output.
    x, wq, wk, wv, gamma = _pam_args(shape=(1, 12, 6))
    perm = np.random.default_rng(0).permutation(12)
    got = position_attention(x[:, perm], wq, wk, wv, gamma)
    np.testing.assert_allclose(got, position_attention(x, wq, wk, wv, gamma)[:, perm],
                               rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------------------
# dtypes and transforms


def _all_cases():
    x, wq, wk, wv, gamma = _pam_args()
    w1, b1, w2, b2 = _se_weights()
    _, sentence, s1, sb1, s2, sb2 = _sab_args()
    return {
        "eca": (eca, (x, normal(1, (3,)))),
        "se": (squeeze_excitation, (x, w1, b1, w2, b2)),
        "sab": (conditioned_channel_attention, (x, sentence[:2], s1, sb1, s2, sb2)),
        "pam": (position_attention, (x, wq, wk, wv, gamma)),
        "cam": (channel_attention, (0.3 * x, gamma)),
    }


@pytest.mark.parametrize("name", ["eca", "se", "sab", "pam", "cam"])
def test_float32_and_bfloat16_against_float64(name):
    fn, args = _all_cases()[name]
    with jax.enable_x64(True):
        want = jax.jit(fn)(*to64(args))
    got = jax.jit(fn)(*args)
    assert got.dtype == jnp.float32
    assert normalised_error(got, want) < 2e-5
    x16 = args[0].astype(jnp.bfloat16)
    got16 = jax.jit(fn)(x16, *args[1:])
    assert got16.dtype == jnp.bfloat16
    with jax.enable_x64(True):
        want16 = jax.jit(fn)(*to64((x16, *args[1:])))  # the same rounded input, exact maths
    assert normalised_error(got16, want16) < 2e-2


@pytest.mark.parametrize("name", ["eca", "se", "sab", "pam", "cam"])
def test_vmap_and_grad(name):
    fn, args = _all_cases()[name]
    x = args[0]
    if name == "sab":  # the sentence is per example too
        batched = jax.jit(jax.vmap(lambda xi, si: fn(xi[None], si[None], *args[2:])[0]))(
            x, args[1])
    else:
        batched = jax.jit(jax.vmap(lambda xi: fn(xi[None], *args[1:])[0]))(x)
    np.testing.assert_allclose(batched, jax.jit(fn)(*args), rtol=1e-5, atol=1e-6)
    argnums = (0, min(2, len(args) - 1))
    grads = jax.jit(jax.grad(lambda *a: jnp.sum(fn(*a) ** 2), argnums=argnums))(*args)
    for g in grads:
        assert np.isfinite(np.asarray(g)).all() and np.abs(np.asarray(g)).max() > 0


# --------------------------------------------------------------------------------------------
# errors


def test_errors_name_the_argument():
    x, wq, wk, wv, gamma = _pam_args()
    w1, b1, w2, b2 = _se_weights()
    _, sentence, s1, sb1, s2, sb2 = _sab_args()
    cases = [
        (lambda: eca(x[:, 0, 0], jnp.ones(3)), ValueError, "x: expected"),
        (lambda: eca(x.astype(jnp.int32), jnp.ones(3)), TypeError, "x: expected a floating"),
        (lambda: eca(jnp.ones((2, 0, 6)), jnp.ones(3)), ValueError, "x: expected non-empty"),
        (lambda: eca(x, jnp.ones(4)), ValueError, "conv_kernel: expected an odd"),
        (lambda: eca(x, jnp.ones((3, 1))), ValueError, "conv_kernel: expected rank 1"),
        (lambda: squeeze_excitation(x, w1[:5], b1, w2, b2), ValueError, "w1: expected shape"),
        (lambda: squeeze_excitation(x, w1, b1, w2[:, :5], b2), ValueError, "w2: expected"),
        (lambda: squeeze_excitation(x, w1, b1[:2], w2, b2), ValueError, "b1: expected"),
        (lambda: conditioned_channel_attention(x, sentence[:1], s1, sb1, s2, sb2),
         ValueError, "sentence: expected batch"),
        (lambda: conditioned_channel_attention(x, sentence, s1, sb1, s2, sb2, gate="relu"),
         ValueError, "gate"),
        (lambda: conditioned_channel_attention(x, sentence, s1, sb1, s2, sb2,
                                               norm_scale=jnp.ones(8)),
         ValueError, "norm_scale, norm_bias"),
        (lambda: conditioned_channel_attention(x, sentence, s1, sb1, s2, sb2, pool_image=True),
         ValueError, "w1: expected shape"),
        (lambda: position_attention(x, wq, wk[:, :1], wv, gamma), ValueError, "wk: expected"),
        (lambda: position_attention(x, wq, wk, wv[:, :2], gamma), ValueError, "wv: expected"),
        (lambda: position_attention(x, wq, wk, wv, jnp.ones(2)), ValueError, "gamma: expected"),
        (lambda: position_attention(x, wq, wk, wv, gamma, bv=jnp.ones(2)), ValueError,
         "bv: expected"),
        (lambda: channel_attention(x, gamma, form="code"), ValueError, "form"),
        (lambda: channel_attention(x[0, 0], gamma), ValueError, "x: expected"),
    ]
    for call, error, match in cases:
        with pytest.raises(error, match=match):
            call()


# --------------------------------------------------------------------------------------------
# modules


def _module_and_function(module, x, function, *extra):
    """(module(x, *extra), function(module) (x, *extra)) in one nnx.jit."""
    return nnx.jit(lambda m, x, *e: (m(x, *e), function(m)(x, *e)))(module, x, *extra)


def test_eca_module():
    layer = ECA(16, rngs=nnx.Rngs(0))
    assert layer.kernel_size == eca_kernel_size(16) == 3
    assert ECA(16, kernel_size=5, rngs=nnx.Rngs(0)).kernel.shape == (5,)
    got, want = _module_and_function(layer, normal(0, (2, 3, 4, 16)),
                                     lambda m: lambda x: eca(x, m.kernel[...]))
    np.testing.assert_array_equal(got, want)


def test_squeeze_excitation_module():
    se = SqueezeExcitation(16, reduction=4, rngs=nnx.Rngs(1))
    assert se.fc1.kernel.shape == (16, 4)
    got, want = _module_and_function(se, normal(0, (2, 3, 4, 16)), lambda m: lambda x: (
        squeeze_excitation(x, m.fc1.kernel[...], m.fc1.bias[...], m.fc2.kernel[...],
                           m.fc2.bias[...])))
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("options", [{}, {"gate": "sigmoid", "pool_image": True,
                                          "layer_norm": False}])
def test_sentence_attention_block_module(options):
    sab = SentenceAttentionBlock(16, 5, rngs=nnx.Rngs(2), **options)
    assert sab.fc1.kernel.shape == (5 + (16 if options else 0), 20)

    def function(m):
        norm = ({} if m.norm_scale is None else
                {"norm_scale": m.norm_scale[...], "norm_bias": m.norm_bias[...]})
        return lambda x, s: conditioned_channel_attention(
            x, s, m.fc1.kernel[...], m.fc1.bias[...], m.fc2.kernel[...], m.fc2.bias[...],
            gate=options.get("gate", "softmax"), pool_image=options.get("pool_image", False),
            **norm)

    got, want = _module_and_function(sab, normal(0, (2, 3, 4, 16)), function,
                                     normal(1, (2, 5)))
    np.testing.assert_array_equal(got, want)


def test_position_attention_module():
    x = normal(0, (2, 3, 4, 16))
    pam = PositionAttention(16, rngs=nnx.Rngs(3))
    assert pam.query.kernel.shape == (16, 2) and pam.value.kernel.shape == (16, 16)
    np.testing.assert_array_equal(pam(x), x)  # gamma starts at 0
    pam.gamma[...] = jnp.asarray(0.5)
    got, want = _module_and_function(pam, x, lambda m: lambda x: position_attention(
        x, m.query.kernel[...], m.key.kernel[...], m.value.kernel[...], m.gamma[...],
        bq=m.query.bias[...], bk=m.key.bias[...], bv=m.value.bias[...]))
    np.testing.assert_array_equal(got, want)
    assert normalised_error(got, x) > 1e-3


@pytest.mark.parametrize("form", ["paper", "max_minus"])
def test_channel_attention_module(form):
    x = normal(0, (2, 3, 4, 16))
    cam = ChannelAttention(form=form)
    np.testing.assert_array_equal(cam(x), x)  # gamma starts at 0
    cam.gamma[...] = jnp.asarray(-0.5)
    got, want = _module_and_function(
        cam, x, lambda m: lambda x: channel_attention(x, m.gamma[...], form=form))
    np.testing.assert_array_equal(got, want)


def test_module_errors():
    x = jnp.ones((2, 3, 3, 8))
    with pytest.raises(ValueError, match="x: expected"):
        ECA(16, rngs=nnx.Rngs(0))(x)
    with pytest.raises(ValueError, match="kernel_size"):
        ECA(16, kernel_size=4, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="channels"):
        SqueezeExcitation(0, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="gate"):
        SentenceAttentionBlock(8, 4, gate="tanh", rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="reduction"):
        PositionAttention(8, reduction=0, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="form"):
        ChannelAttention(form="both")


def test_module_trains_under_nnx_jit():
    block = PositionAttention(8, reduction=2, rngs=nnx.Rngs(0))
    block.gamma[...] = jnp.asarray(0.1)
    x = normal(0, (2, 3, 3, 8))

    @nnx.jit
    def grads(block, x):
        return nnx.grad(lambda m: jnp.sum(m(x) ** 2))(block)

    g = grads(block, x)
    assert float(jnp.abs(g["gamma"][...])) > 0
    assert float(jnp.abs(g["query"]["kernel"][...]).max()) > 0
