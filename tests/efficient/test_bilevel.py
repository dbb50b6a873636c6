"""Bi-level routing attention (BiFormer): fast path vs the dense masked reference (forward
and gradients, 1-D, 2-D, cross, causal), full routing == plain attention, causality by
perturbation, dtypes, jit/vmap, errors, the NNX module."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jattn import reference
from jattn.efficient.bilevel import bilevel_routing_attention
from jattn.nn.efficient.bilevel import BiLevelRoutingAttention
from tests.conftest import assert_close, normal, normalised_error, output_and_vjp, to64


def _qkv(spatial, spatial_k=None, dtype=jnp.float32, B=2, N=4, K=2, H=8, Hv=6, seed=0):
    spatial_k = spatial if spatial_k is None else spatial_k
    return (normal(seed, (B, *spatial, N, H), dtype),
            normal(seed + 1, (B, *spatial_k, K, H), dtype),
            normal(seed + 2, (B, *spatial_k, K, Hv), dtype))


# (spatial, spatial_k, region_size, top_k, is_causal): lengths not multiples of the region,
# rectangular regions, cross attention with another key grid, causal sequences.
CASES = [
    ((11,), None, 3, 2, False),
    ((12,), None, 4, 1, False),
    ((5, 7), None, (2, 3), 3, False),
    ((5, 7), (4, 9), 2, 4, False),
    ((11,), None, 3, 2, True),
    ((13,), None, 4, 3, True),
    ((10,), None, 2, 1, True),
]


@pytest.mark.parametrize("spatial,spatial_k,region,top_k,is_causal", CASES)
def test_matches_reference_float64(spatial, spatial_k, region, top_k, is_causal):
    kw = dict(region_size=region, top_k=top_k, is_causal=is_causal)
    with jax.enable_x64(True):
        args = to64(_qkv(spatial, spatial_k))
        out_shape = (*args[0].shape[:-1], args[2].shape[-1])
        cotangent = normal(9, out_shape, jnp.float64)
        got, g_got = output_and_vjp(functools.partial(bilevel_routing_attention, **kw),
                                     cotangent)(*args)
        want, g_want = output_and_vjp(functools.partial(reference.bilevel_routing_attention,
                                                         **kw), cotangent)(*args)
        assert got.dtype == jnp.float64
        assert_close(got, want, jnp.float64, "forward")
        for a, b in zip(g_got, g_want, strict=True):
            assert_close(a, b, jnp.float64, "grad")
        # The routing really drops regions: not plain attention unless top_k covers them all.
        flat = [x.reshape(x.shape[0], -1, *x.shape[-2:]) for x in args]
        plain = reference.dot_product_attention(*flat, is_causal=is_causal).reshape(want.shape)
        n_regions = int(np.prod([-(-s // r) for s, r in zip(
            spatial_k or spatial, np.broadcast_to(region, len(spatial)), strict=True)]))
        if top_k < n_regions:
            assert normalised_error(want, plain) > 1e-3


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("case", [CASES[0], CASES[2], CASES[4]])
def test_dtypes_against_reference(dtype, case):
    spatial, spatial_k, region, top_k, causal = case
    kw = dict(region_size=region, top_k=top_k, is_causal=causal)
    args = _qkv(spatial, spatial_k, dtype=dtype, seed=3)
    cotangent = normal(7, (*args[0].shape[:-1], args[2].shape[-1]), dtype)
    got, g_got = output_and_vjp(functools.partial(bilevel_routing_attention, **kw),
                                 cotangent)(*args)
    with jax.enable_x64(True):
        want, g_want = output_and_vjp(functools.partial(reference.bilevel_routing_attention,
                                                         **kw), to64(cotangent))(*to64(args))
    assert got.dtype == dtype
    assert_close(got, want, dtype, "forward")
    for a, b in zip(g_got, g_want, strict=True):
        assert a.dtype == dtype
        assert_close(a, b, dtype, "grad")


@pytest.mark.parametrize("spatial,region,is_causal", [((11,), 3, False), ((5, 7), (2, 3), False),
                                                   ((11,), 3, True), ((9,), 4, True)])
def test_all_regions_is_plain_attention(spatial, region, is_causal):
    args = _qkv(spatial, seed=5)
    regions = int(np.prod([-(-s // r) for s, r in zip(
        spatial, np.broadcast_to(region, len(spatial)), strict=True)]))
    got = bilevel_routing_attention(*args, region_size=region, top_k=regions, is_causal=is_causal)
    flat = [x.reshape(x.shape[0], -1, *x.shape[-2:]) for x in args]
    want = reference.dot_product_attention(*flat, is_causal=is_causal).reshape(got.shape)
    assert_close(got, want, jnp.float32, "forward")


@pytest.mark.parametrize("L,region,top_k", [(13, 3, 2), (16, 4, 2), (12, 2, 3)])
def test_causal_leaks_nothing(L, region, top_k):
    q, k, v = _qkv((L,), seed=11)
    f = jax.jit(functools.partial(bilevel_routing_attention, region_size=region, top_k=top_k,
                                  is_causal=True))
    base = f(q, k, v)
    for t in range(L - 1):
        # Change every query, key and value after t (including later tokens of t's region,
        # which the plain region mean would see).
        later = (jnp.arange(L) > t)[None, :, None, None]
        bumped = [jnp.where(later, x + 3.0 * normal(20 + t, x.shape), x) for x in (q, k, v)]
        out = f(*bumped)
        # Equal up to rounding: later queries' routes change which tiles a query tile
        # visits and in what order (a masked tile adds exact zeros), not what row t sees.
        np.testing.assert_allclose(out[:, :t + 1], base[:, :t + 1], rtol=0, atol=2e-6)
        assert not np.allclose(out[:, t + 1:], base[:, t + 1:])


def test_rows_with_padding_regions_are_finite():
    # A 1 x 1 last region (spatial 5 x 5, region 2): its mean is over one real token.
    args = _qkv((5, 5), seed=2)
    f = functools.partial(bilevel_routing_attention, region_size=2, top_k=1)
    out, grads = jax.jit(jax.value_and_grad(lambda *a: f(*a).sum(), argnums=(0, 1, 2)))(*args)
    assert np.isfinite(np.asarray(out)).all()
    assert all(np.isfinite(np.asarray(g)).all() for g in grads)


@pytest.mark.parametrize("is_causal", [False, True])
def test_jit_and_vmap(is_causal):
    q, k, v = (x.reshape(2, 1, *x.shape[1:]) for x in _qkv((10,), seed=4))
    f = functools.partial(bilevel_routing_attention, region_size=3, top_k=2, is_causal=is_causal)
    one = jax.jit(f)
    looped = jnp.stack([one(q[i], k[i], v[i]) for i in range(2)])
    np.testing.assert_allclose(jax.jit(jax.vmap(f))(q, k, v), looped, rtol=1e-5, atol=1e-6)


def test_errors():
    q, k, v = _qkv((8,))
    f = bilevel_routing_attention
    with pytest.raises(ValueError, match="query"):
        f(q[0], k[0], v[0], region_size=2, top_k=1)
    with pytest.raises(ValueError, match="value"):
        f(q, k, v[:, :5], region_size=2, top_k=1)
    with pytest.raises(ValueError, match="key"):
        f(q, k[..., :4], v, region_size=2, top_k=1)
    with pytest.raises(ValueError, match="heads"):
        f(q[:, :, :3], k, v, region_size=2, top_k=1)
    with pytest.raises(TypeError, match="dtype"):
        f(q.astype(jnp.bfloat16), k, v, region_size=2, top_k=1)
    with pytest.raises(ValueError, match="region_size"):
        f(q, k, v, region_size=0, top_k=1)
    with pytest.raises(ValueError, match="region_size"):
        f(q, k, v, region_size=(2, 2), top_k=1)
    with pytest.raises(ValueError, match="top_k"):
        f(q, k, v, region_size=2, top_k=5)
    with pytest.raises(ValueError, match="top_k"):
        f(q, k, v, region_size=2, top_k=0)
    with pytest.raises(TypeError, match="top_k"):
        f(q, k, v, region_size=2, top_k=1.5)
    with pytest.raises(TypeError, match="is_causal"):
        f(q, k, v, region_size=2, top_k=1, is_causal=1)
    q2, k2, v2 = _qkv((4, 4))
    with pytest.raises(NotImplementedError, match="is_causal"):
        f(q2, k2, v2, region_size=2, top_k=1, is_causal=True)
    qc, kc, vc = _qkv((8,), (6,))
    with pytest.raises(NotImplementedError, match="cross"):
        f(qc, kc, vc, region_size=2, top_k=1, is_causal=True)


@pytest.mark.parametrize("lepe", [None, 3])
def test_module_equals_function_2d(lepe):
    layer = BiLevelRoutingAttention(16, num_heads=4, num_kv_heads=2, region_size=(2, 3),
                                    top_k=2, lepe_kernel_size=lepe, rngs=nnx.Rngs(0))
    x = normal(1, (2, 5, 7, 16))
    q, k, v = layer._split(layer.qkv_proj(x))
    inner = bilevel_routing_attention(q, k, v, region_size=(2, 3), top_k=2).reshape(x.shape)
    if lepe:
        vmap_ = v.reshape(2, 5, 7, -1)
        kernel = layer.lepe.kernel[...]  # [3, 3, 1, 16]: out channel o reads v channel o // 2
        padded = jnp.pad(vmap_, ((0, 0), (1, 1), (1, 1), (0, 0)))
        conv = sum(padded[:, i:i + 5, j:j + 7, jnp.arange(16) // 2] * kernel[i, j, 0]
                   for i in range(3) for j in range(3)) + layer.lepe.bias[...]
        inner = inner + conv
    want = layer.out_proj(inner)
    np.testing.assert_allclose(layer(x), want, rtol=1e-5, atol=1e-5)


def test_module_causal_sequence_with_lepe_is_causal():
    layer = BiLevelRoutingAttention(8, num_heads=2, region_size=3, top_k=2, is_causal=True,
                                    lepe_kernel_size=3, spatial_axes=1, rngs=nnx.Rngs(1))
    x = normal(2, (1, 10, 8))
    base = layer(x)
    bumped = x.at[:, 6:].add(normal(3, (1, 4, 8)))
    np.testing.assert_array_equal(np.asarray(layer(bumped)[:, :6]), np.asarray(base[:, :6]))
    with pytest.raises(ValueError, match="spatial_axes"):
        BiLevelRoutingAttention(8, region_size=3, top_k=2, is_causal=True, rngs=nnx.Rngs(0))
