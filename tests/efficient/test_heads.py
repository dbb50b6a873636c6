"""Head structures: mixture-of-heads routing and attention (P19) against the float64
reference and hand-worked values, dense == dispatch, capacity drops, jit/vmap, errors; the
QKV projection (MHA/GQA/MQA/DiffQKV, augmented query, P68) and the NNX modules."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jattn
from jattn import positions as P
from jattn import reference
from jattn.efficient.heads import (
    HeadRouting,
    capacity,
    mixture_of_heads_attention,
    relative_attention,
    route_heads,
)
from jattn.nn import (
    AttentionShiftRouter,
    ConvRelativeAttention,
    LowRankResidualAttention,
    MixtureOfHeadsAttention,
    MultiHeadAttention,
    QKVProjection,
    WingsLearners,
)
from tests.conftest import assert_close, normal, normalised_error, output_and_vjp, to64


def _logits(B, T, Nr, Ns, seed=0, dtype=jnp.float32):
    shared = (normal(seed + 1, (B, T, Ns), dtype), normal(seed + 2, (B, T, 2), dtype))
    return normal(seed, (B, T, Nr), dtype), *(shared if Ns else (None, None))


def _moh_args(B=2, T=11, N=6, K=3, H=4, Hv=5, D=7, Ns=2, top_k=2, seed=0, dtype=jnp.float32):
    q = normal(seed, (B, T, N, H), dtype)
    k = normal(seed + 1, (B, T, K, H), dtype)
    v = normal(seed + 2, (B, T, K, Hv), dtype)
    w = normal(seed + 3, (N, Hv, D), dtype)
    routed, shared, mix = _logits(B, T, N - Ns, Ns, seed + 4, dtype)
    return (q, k, v, w), (routed, shared, mix), top_k


# ---- route_heads ---------------------------------------------------------------------------


def test_route_heads_hand_worked():
    # probs = (1, 2, 3) / 6; top-2 keeps heads 2 and 1; f = (0, 1, 1), P = probs.
    routed = jnp.log(jnp.array([[[1.0, 2.0, 3.0]]]))
    r = route_heads(routed, top_k=2)
    np.testing.assert_allclose(r.gates, [[[0, 2 / 6, 3 / 6]]], rtol=1e-6)
    assert r.routed_index.tolist() == [[[2, 1]]]
    np.testing.assert_allclose(r.load_balance_loss, 2 / 6 + 3 / 6, rtol=1e-6)
    # One shared head (softmax over one head = 1), mix (1, 3) / 4.
    r = route_heads(routed, top_k=1, shared_logits=jnp.zeros((1, 1, 1)),
                    mix_logits=jnp.log(jnp.array([[[1.0, 3.0]]])))
    np.testing.assert_allclose(r.gates, [[[1 / 4, 0, 0, 3 / 4 * 3 / 6]]], rtol=1e-6)


@pytest.mark.parametrize("Ns,top_k", [(0, 1), (0, 3), (2, 2), (1, 4)])
def test_route_heads_matches_reference_float64(Ns, top_k):
    with jax.enable_x64(True):
        routed, shared, mix = to64(_logits(3, 5, 4, Ns, seed=Ns + top_k))
        kw = dict(top_k=top_k)
        got = route_heads(routed, shared_logits=shared, mix_logits=mix, **kw)
        want = HeadRouting(*reference.route_heads(routed, shared_logits=shared,
                                                  mix_logits=mix, **kw))
        assert got.routed_index.tolist() == want.routed_index.tolist()
        for name in ("gates", "routed_probs", "load_balance_loss"):
            assert_close(getattr(got, name), getattr(want, name), jnp.float32, "forward")

        # Gradients of the gates and of the loss through the softmaxes (selection fixed).
        def scalar(fn):
            def f(routed, shared, mix):
                out = fn(routed, shared_logits=shared, mix_logits=mix, **kw)
                return jnp.sum(out[0] * jnp.arange(out[0].shape[-1])) + 3 * out[3]
            return f

        g_got = jax.grad(scalar(route_heads), argnums=(0, 1, 2))(routed, shared, mix)
        g_want = jax.grad(scalar(reference.route_heads), argnums=(0, 1, 2))(routed, shared, mix)
        for a, b in zip(g_got, g_want, strict=True):
            if b is not None:
                assert_close(a, b, jnp.float32, "grad")


def test_load_balance_loss_is_smallest_when_balanced():
    # Same mean probability per head; balanced selection gives top_k / Nr, collapse gives 1.
    balanced = jnp.log(jnp.eye(4) * 9 + 1)[None]  # token t prefers head t
    collapsed = jnp.log(jnp.ones((4, 4)).at[:, 0].set(10.0))[None]
    lb = route_heads(balanced, top_k=1).load_balance_loss
    lc = route_heads(collapsed, top_k=1).load_balance_loss
    np.testing.assert_allclose(lb, 1 / 4, rtol=1e-6)
    assert lc > 3 * lb


# ---- mixture_of_heads_attention ------------------------------------------------------------


def _routing(logits, top_k, fn=route_heads):
    routed, shared, mix = logits
    return HeadRouting(*fn(routed, top_k=top_k, shared_logits=shared, mix_logits=mix))


@pytest.mark.parametrize("form", ["dense", "dispatch"])
@pytest.mark.parametrize("is_causal", [True, False])
@pytest.mark.parametrize("N,K,Ns,top_k", [(6, 3, 0, 2), (6, 2, 3, 1), (4, 4, 1, 3), (4, 1, 0, 4)])
def test_matches_reference_float64(form, is_causal, N, K, Ns, top_k):
    with jax.enable_x64(True):
        arrays, logits, top_k = _moh_args(N=N, K=K, Ns=Ns, top_k=top_k, seed=N + Ns)
        arrays, logits = to64(arrays), to64(logits)
        kw = dict(is_causal=is_causal, form=form)
        cotangent = normal(5, (2, 11, 7), jnp.float64)
        given = [x for x in logits if x is not None]

        # End to end from the router logits, so the gradients reaching the router count.
        def run(route, attend):
            def f(q, k, v, w, *given):
                routing = _routing(given if Ns else (given[0], None, None), top_k, route)
                return attend(q, k, v, w, routing, **kw)
            return output_and_vjp(f, cotangent)(*arrays, *given)

        got, g_got = run(route_heads, mixture_of_heads_attention)
        want, g_want = run(reference.route_heads, reference.mixture_of_heads_attention)
        assert got.dtype == jnp.float64
        assert_close(got, want, jnp.float64, "forward")
        for a, b in zip(g_got, g_want, strict=True):
            assert_close(a, b, jnp.float64, "grad")


def test_all_gates_one_is_multi_head_attention():
    # g = 1 for every head turns the weighted sum into MHA's concat(heads) W_O.
    (q, k, v, w), _, _ = _moh_args(N=4, K=2, Ns=0)
    B, T, N, _ = q.shape
    ones = HeadRouting(jnp.ones((B, T, N)), jnp.tile(jnp.arange(N), (B, T, 1)),
                       jnp.full((B, T, N), 1 / N), jnp.zeros(()))
    got = mixture_of_heads_attention(q, k, v, w, ones, is_causal=True)
    heads = reference.dot_product_attention(q, k, v, is_causal=True)
    want = heads.reshape(B, T, -1) @ w.reshape(-1, w.shape[-1])
    assert_close(got, want, jnp.float32, "forward")


@pytest.mark.parametrize("factor", [0.5, 1.0])
def test_dispatch_capacity_drops_like_reference(factor):
    # Skewed routing so some heads get more than their capacity.
    arrays, (routed, shared, mix), top_k = _moh_args(T=16, N=6, K=6, Ns=1, top_k=2, seed=3)
    routed = routed.at[..., 0].add(3.0)
    routing = _routing((routed, shared, mix), top_k)
    kw = dict(is_causal=True, form="dispatch", capacity_factor=factor)
    got = jax.jit(functools.partial(mixture_of_heads_attention, **kw))(*arrays, routing)
    want = reference.mixture_of_heads_attention(*arrays, routing, **kw)
    assert_close(got, want, jnp.float32, "forward")
    full = mixture_of_heads_attention(*arrays, routing, is_causal=True)
    assert normalised_error(got, full) > 1e-3  # something was dropped
    assert capacity(16, 5, 2, factor) == math.ceil(factor * 16 * 2 / 5)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("form", ["dense", "dispatch"])
def test_dtypes_against_reference(dtype, form):
    arrays, logits, top_k = _moh_args(seed=7, dtype=dtype)
    routing = _routing(logits, top_k)
    kw = dict(is_causal=True, form=form)
    cotangent = normal(8, (2, 11, 7), dtype)
    got, g_got = output_and_vjp(
        lambda *a: mixture_of_heads_attention(*a, routing, **kw), cotangent)(*arrays)
    with jax.enable_x64(True):
        r64 = to64(routing)
        want, g_want = output_and_vjp(
            lambda *a: reference.mixture_of_heads_attention(*a, r64, **kw),
            to64(cotangent))(*to64(arrays))
    assert got.dtype == dtype
    assert_close(got, want, dtype, "forward")
    for a, b in zip(g_got, g_want, strict=True):
        assert a.dtype == dtype
        assert_close(a, b, dtype, "grad")


def test_jit_and_vmap():
    arrays, logits, top_k = _moh_args(B=1, seed=9)
    routing = _routing(logits, top_k)

    def f(q, k, v, routing):
        return mixture_of_heads_attention(q, k, v, arrays[3], routing, is_causal=True,
                                          form="dispatch", capacity_factor=1.0)

    batched = [jnp.stack([x, x * 0.5]) for x in arrays[:3]]
    stacked = jax.tree_util.tree_map(lambda x: jnp.stack([x, x]), routing)
    got = jax.jit(jax.vmap(f))(*batched, stacked)
    for i in range(2):
        want = f(*(x[i] for x in batched), routing)
        np.testing.assert_allclose(got[i], want, rtol=1e-5, atol=1e-5)


def test_errors():
    (q, k, v, w), logits, top_k = _moh_args(N=6, K=3, Ns=1)
    routing = _routing(logits, top_k)
    f = mixture_of_heads_attention
    with pytest.raises(ValueError, match="top_k"):
        route_heads(logits[0], top_k=6)
    with pytest.raises(ValueError, match="mix_logits"):
        route_heads(logits[0], top_k=1, shared_logits=logits[1])
    with pytest.raises(ValueError, match="mix_logits"):
        route_heads(logits[0], top_k=1, shared_logits=logits[1], mix_logits=logits[2][..., :1])
    with pytest.raises(TypeError, match="routed_logits"):
        route_heads(logits[0].astype(jnp.int32), top_k=1)
    with pytest.raises(ValueError, match="out_kernel"):
        f(q, k, v, w[:5], routing)
    with pytest.raises(ValueError, match=r"routing\.gates"):
        f(q[:, :5], k, v, w, routing)
    with pytest.raises(ValueError, match="form"):
        f(q, k, v, w, routing, form="sparse")
    with pytest.raises(ValueError, match="capacity_factor"):
        f(q, k, v, w, routing, capacity_factor=1.0)
    with pytest.raises(ValueError, match="capacity_factor"):
        f(q, k.repeat(2, axis=2), v.repeat(2, axis=2), w, routing, form="dispatch",
          capacity_factor=0.0)
    with pytest.raises(ValueError, match="groups"):  # 1 shared head, GQA groups of 2
        f(q, k, v, w, routing, form="dispatch")


# ---- NNX modules ---------------------------------------------------------------------------


def test_qkv_projection_layouts_and_cross_attention():
    proj = QKVProjection(24, 8, head_dim=5, num_kv_heads=2, num_value_heads=4,
                         value_head_dim=3, rngs=nnx.Rngs(0))
    x, ctx = normal(0, (2, 7, 24)), normal(1, (2, 9, 24))
    W, b = proj.qkv_proj.kernel[...], proj.qkv_proj.bias[...]
    q, k, v = proj(x)
    assert (q.shape, k.shape, v.shape) == ((2, 7, 8, 5), (2, 7, 2, 5), (2, 7, 4, 3))
    full = x @ W + b
    np.testing.assert_allclose(q.reshape(2, 7, -1), full[..., :40], atol=1e-5)
    np.testing.assert_allclose(v.reshape(2, 7, -1), full[..., 50:], atol=1e-5)
    q2, k2, v2 = proj(x, ctx)
    np.testing.assert_allclose(q2, q, atol=1e-6)
    np.testing.assert_allclose(k2.reshape(2, 9, -1), (ctx @ W + b)[..., 40:50], atol=1e-5)
    assert v2.shape == (2, 9, 4, 3)


def test_augmented_query_is_a_gated_mlp_on_the_projected_query():
    proj = QKVProjection(16, 4, query_mlp_dim=24, rngs=nnx.Rngs(1))
    x = normal(2, (1, 5, 16))
    gate, up, down = (m.kernel[...] for m in proj.query_mlp)
    q0 = x @ proj.qkv_proj.kernel[...][:, :16] + proj.qkv_proj.bias[...][:16]
    want = (jax.nn.sigmoid(q0 @ gate) * (q0 @ gate) * (q0 @ up)) @ down
    q, _, _ = proj(x)
    np.testing.assert_allclose(q.reshape(1, 5, 16), want, atol=1e-5)


def test_diffqkv_multi_head_attention_equals_its_functional_call():
    mha = MultiHeadAttention(32, 8, num_kv_heads=2, num_value_heads=4, value_head_dim=6,
                             query_mlp_dim=48, rngs=nnx.Rngs(3))
    x = normal(4, (2, 9, 32))
    q, k, v = mha.proj(x)
    assert (k.shape[2], v.shape[2], v.shape[3]) == (2, 4, 6)
    heads = reference.dot_product_attention(q, k, v, is_causal=True)
    want = heads.reshape(2, 9, -1) @ mha.out_proj.kernel[...] + mha.out_proj.bias[...]
    np.testing.assert_allclose(mha(x), want, atol=1e-5)


@pytest.mark.parametrize("form,factor", [("dense", None), ("dispatch", None),
                                         ("dispatch", 1.0)])
def test_moh_module_equals_its_functional_call(form, factor):
    moh = MixtureOfHeadsAttention(24, 6, num_shared=2, top_k=2, num_kv_heads=3, form=form,
                                  capacity_factor=factor, rngs=nnx.Rngs(5))
    x = normal(6, (2, 10, 24))
    q, k, v = moh.proj(x)
    routing = HeadRouting(*reference.route_heads(
        x @ moh.routed_router.kernel[...], top_k=2,
        shared_logits=x @ moh.shared_router.kernel[...],
        mix_logits=x @ moh.mix_router.kernel[...]))
    kernel = moh.out_proj.kernel[...].reshape(6, 4, 24)
    want = reference.mixture_of_heads_attention(q, k, v, kernel, routing, is_causal=True,
                                                capacity_factor=factor)
    got, balance = jax.jit(lambda m, x: m(x))(moh, x)
    np.testing.assert_allclose(got, want + moh.out_proj.bias[...], atol=1e-5)
    np.testing.assert_allclose(balance, routing.load_balance_loss, rtol=1e-5)


def test_moh_module_trains_its_routers():
    # Two shared heads: with one, its softmax is the constant 1 and W_s gets no gradient.
    moh = MixtureOfHeadsAttention(16, 4, num_shared=2, top_k=1, rngs=nnx.Rngs(7))
    x = normal(8, (2, 6, 16))

    def loss(m):
        y, balance = m(x)
        return jnp.mean(y ** 2) + 0.01 * balance

    grads = nnx.grad(loss)(moh)
    for router in ("routed_router", "shared_router", "mix_router"):
        assert float(jnp.abs(getattr(grads, router).kernel[...]).max()) > 0


def test_module_errors():
    with pytest.raises(ValueError, match="num_value_heads"):
        QKVProjection(16, 4, num_value_heads=3, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="num_kv_heads"):
        QKVProjection(16, 4, num_kv_heads=3, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="num_heads"):
        QKVProjection(18, 4, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="num_shared"):
        MixtureOfHeadsAttention(16, 4, num_shared=4, top_k=1, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="top_k"):
        MixtureOfHeadsAttention(16, 4, num_shared=2, top_k=3, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="capacity_factor"):
        MixtureOfHeadsAttention(16, 4, num_shared=2, top_k=1, form="dispatch",
                                capacity_factor=-1.0, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="num_shared"):
        MixtureOfHeadsAttention(16, 4, num_shared=1, top_k=1, num_kv_heads=2, form="dispatch",
                                rngs=nnx.Rngs(0))


# ---- relative attention (P16) --------------------------------------------------------------


def _relative_args(B=2, T=9, S=9, N=3, H=4, Hv=5, R=6, seed=0, dtype=jnp.float32):
    return ((normal(seed, (B, T, N, H), dtype), normal(seed + 1, (B, S, N, H), dtype),
             normal(seed + 2, (B, S, N, Hv), dtype), normal(seed + 3, (R, N, H), dtype),
             normal(seed + 4, (N, H), dtype)),
            dict(position_bias=normal(seed + 5, (N, H), dtype),
                 distance_bias=normal(seed + 6, (R, N), dtype)))


@pytest.mark.parametrize("T,S,R,is_causal,terms", [
    (9, 9, 6, True, ("position_bias",)),          # Transformer-XL / RMHA, R < L
    (9, 9, 12, True, ("distance_bias",)),         # RCMHA's learned table, R > L
    (4, 11, 5, True, ("position_bias", "distance_bias")),  # queries at the end of a memory
    (7, 7, 3, False, ()),
])
def test_relative_attention_matches_reference_float64(T, S, R, is_causal, terms):
    with jax.enable_x64(True):
        arrays, extra = to64(_relative_args(T=T, S=S, R=R, seed=T + R))
        kw = {name: extra[name] for name in terms} | dict(is_causal=is_causal)
        cotangent = normal(3, (2, T, 3, 5), jnp.float64)
        got, g_got = output_and_vjp(functools.partial(relative_attention, **kw),
                                    cotangent)(*arrays)
        want, g_want = output_and_vjp(functools.partial(reference.relative_attention, **kw),
                                      cotangent)(*arrays)
        assert_close(got, want, jnp.float64, "forward")
        for a, b in zip(g_got, g_want, strict=True):
            assert_close(a, b, jnp.float64, "grad")


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_relative_attention_dtypes_and_vmap(dtype):
    arrays, extra = _relative_args(seed=8, dtype=dtype)
    kw = dict(distance_bias=extra["distance_bias"])
    cotangent = normal(9, (2, 9, 3, 5), dtype)
    got, g_got = output_and_vjp(functools.partial(relative_attention, **kw), cotangent)(*arrays)
    with jax.enable_x64(True):
        want, g_want = output_and_vjp(
            functools.partial(reference.relative_attention, **to64(kw)),
            to64(cotangent))(*to64(arrays))
    assert got.dtype == dtype
    assert_close(got, want, dtype, "forward")
    for a, b in zip(g_got, g_want, strict=True):
        assert_close(a, b, dtype, "grad")
    q, k, v, r, u = arrays
    batched = jax.vmap(lambda q, k, v: relative_attention(q[None], k[None], v[None], r, u,
                                                          **kw)[0])(q, k, v)
    assert_close(batched, got, dtype, "forward")


def test_relative_attention_is_xl_logits_softmax():
    # The same scores as jattn.positions.xl_relative_logits, scaled, causal, softmaxed.
    (q, k, v, r, u), extra = _relative_args(seed=4)
    logits = P.xl_relative_logits(q, k, r, u, extra["position_bias"]) * 4 ** -0.5
    allowed = np.tril(np.ones((9, 9), bool))
    probs = jax.nn.softmax(jnp.where(allowed, logits, -jnp.inf), axis=-1)
    want = jnp.einsum("bnts,bsnh->btnh", probs, v)
    got = relative_attention(q, k, v, r, u, position_bias=extra["position_bias"])
    assert_close(got, want, jnp.float32, "forward")


def test_relative_position_terms_depend_on_offsets_only():
    # Three more keys in front and every position moved by three: the old keys' scores are
    # unchanged (distances are), whatever the table.
    (q, _, _, r, _), extra = _relative_args(T=5, S=7, R=6, seed=6)
    base = P.relative_logits(q, 7, r, **extra, query_offset=1)
    moved = P.relative_logits(q, 10, r, **extra, query_offset=4)
    np.testing.assert_allclose(moved[..., 3:], base, atol=1e-6)
    # ... and they do depend on the distance: a different offset changes them.
    assert normalised_error(P.relative_logits(q, 7, r, **extra, query_offset=2), base) > 1e-3


def test_relative_attention_errors():
    (q, k, v, r, u), _ = _relative_args()
    with pytest.raises(ValueError, match="key"):
        relative_attention(q, k[:, :, :1], v[:, :, :1], r, u)
    with pytest.raises(ValueError, match="content_bias"):
        relative_attention(q, k, v, r, u[:2])
    with pytest.raises(ValueError, match="distance_bias"):
        relative_attention(q, k, v, r, u, distance_bias=jnp.ones((2, 3)))
    with pytest.raises(ValueError, match="query_offset"):
        relative_attention(q, k, v, r, u, query_offset=-1)


@pytest.mark.parametrize("variant", ["mha", "mdha", "rmha", "rcmha"])
@pytest.mark.parametrize("shared_conv", [False, True])
def test_conv_relative_module_equals_its_functional_call(variant, shared_conv):
    layer = ConvRelativeAttention(12, 3, variant=variant, shared_conv=shared_conv,
                                  max_distance=5, rngs=nnx.Rngs(1))
    if layer.relative is not None:  # move the zero-initialised position terms off zero
        for name in ("content_bias", "relative_key", "distance_bias", "position_bias"):
            param = getattr(layer, name)
            if param is not None:
                param[...] = normal(len(name), param[...].shape)
    x = normal(2, (2, 8, 12))
    q, k, v = (a.reshape(2, 8, 3, 4) for a in jnp.split(
        x @ layer.proj.qkv_proj.kernel[...] + layer.proj.qkv_proj.bias[...], 3, axis=-1))
    if layer.convs is not None:  # the conv written out: sum over taps of shifted inputs
        convolved = []
        for a, (kernel, bias) in zip((q, k, v), layer.convs, strict=True):
            w = kernel[...] if not shared_conv else jnp.tile(kernel[...], (1, 3))
            b = bias[...] if not shared_conv else jnp.tile(bias[...], 3)
            flat = a.reshape(2, 8, 12)
            width = w.shape[0]
            padded = jnp.pad(flat, ((0, 0), (width - 1, 0), (0, 0)))
            out = b + sum(w[j] * padded[:, j:j + 8] for j in range(width))
            convolved.append(out.reshape(2, 8, 3, 4))
        q, k, v = convolved
    if layer.relative is None:
        heads = reference.dot_product_attention(q, k, v, is_causal=True)
    elif layer.relative == "learned":
        heads = reference.relative_attention(q, k, v, layer.relative_key[...],
                                             layer.content_bias[...],
                                             distance_bias=layer.distance_bias[...])
    else:
        table = P.sinusoidal(jnp.arange(5), 12) @ layer.position_proj.kernel[...]
        heads = reference.relative_attention(q, k, v, table.reshape(5, 3, 4),
                                             layer.content_bias[...],
                                             position_bias=layer.position_bias[...])
    want = heads.reshape(2, 8, 12) @ layer.out_proj.kernel[...] + layer.out_proj.bias[...]
    np.testing.assert_allclose(jax.jit(lambda m, x: m(x))(layer, x), want, atol=2e-5)


def test_conv_relative_module_errors():
    with pytest.raises(ValueError, match="variant"):
        ConvRelativeAttention(12, 3, variant="xl", rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="max_distance"):
        ConvRelativeAttention(12, 3, max_distance=0, rngs=nnx.Rngs(0))


# ---- Wings: LoRRA learners and their router (P31) ------------------------------------------


def _with_random_up(module, seed):
    """Move the zero-initialised low-rank factors off zero so the test sees them."""
    module.up[...] = normal(seed, module.up[...].shape) * 0.3
    return module


def test_lorra_starts_at_zero_and_equals_its_definition():
    learner = LowRankResidualAttention(12, 3, rank=2, rngs=nnx.Rngs(0))
    x, f = normal(1, (2, 5, 12)), normal(2, (2, 7, 12))
    np.testing.assert_array_equal(learner(x, f), jnp.zeros((2, 5, 12)))
    _with_random_up(learner, 3)
    A, Bu = learner.down[...], learner.up[...]
    eye = jnp.eye(12)
    q, k, v = (a @ (eye + A[i] @ Bu[i]) for i, a in enumerate((x, f, f)))
    mask = jnp.asarray(np.random.default_rng(4).random((2, 1, 1, 7)) < 0.7)
    heads = reference.dot_product_attention(*(a.reshape(*a.shape[:2], 3, 4) for a in (q, k, v)),
                                            mask=mask)
    want = heads.reshape(2, 5, 12) @ A[3] @ Bu[3]
    np.testing.assert_allclose(learner(x, f, mask=mask), want, atol=1e-5)


def test_router_reads_the_summed_attention_map():
    router = AttentionShiftRouter(10, 2, rngs=nnx.Rngs(5))
    probs = jax.nn.softmax(normal(6, (2, 3, 4, 6)), axis=-1)
    W, b = np.asarray(router.proj.kernel[...]), np.asarray(router.proj.bias[...])
    logits = np.asarray(probs).sum(1) @ W[:6] + b
    silu = logits / (1 + np.exp(-logits))
    want = np.exp(silu) / np.exp(silu).sum(-1, keepdims=True)
    np.testing.assert_allclose(router(probs), want, rtol=1e-5)
    with pytest.raises(ValueError, match="attention_probs"):
        router(jnp.ones((1, 1, 2, 11)))


def test_wings_mixes_the_learners_by_the_router():
    wings = WingsLearners(12, 3, rank=2, max_length=16, rngs=nnx.Rngs(7))
    _with_random_up(wings.visual, 8)
    _with_random_up(wings.textual, 9)
    h, image, text = normal(10, (2, 5, 12)), normal(11, (2, 8, 12)), normal(12, (2, 6, 12))
    text_mask = jnp.arange(6)[None, :] < jnp.array([[6], [3]])
    probs = jattn.attention_weights(h.reshape(2, 5, 3, 4), h.reshape(2, 5, 3, 4),
                                    is_causal=True)
    w = wings.router(probs)
    want = (h + w[..., :1] * wings.visual(h, image)
            + w[..., 1:] * wings.textual(h, text, mask=text_mask[:, None, None, :]))
    np.testing.assert_allclose(wings(h, probs, image, text, text_mask=text_mask), want,
                               atol=1e-6)
    # The masked text tokens do not matter.
    moved = text.at[1, 3:].add(5.0)
    np.testing.assert_allclose(wings(h, probs, image, moved, text_mask=text_mask),
                               wings(h, probs, image, text, text_mask=text_mask), atol=1e-6)
