"""Fusion by attention (P05, P08, P10, P11, P18, P55): fast paths against the dense
references (forward and gradients in float32 against float64, bfloat16 forward), the
defining properties (CLS fusion independent of the order of the patches, the global-local
selection at the rollout peaks, an all-masked external set equal to plain attention,
IDM-VTON's concatenated self-attention, region pooling blind to pixels outside every mask),
jit and vmap, error messages, and the NNX modules against the functional calls."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jattn
from jattn import reference
from jattn.applications.fusion import (
    appended_kv_attention,
    attribute_conditioned_attention,
    cls_cross_attention,
    cross_frame_attention,
    global_local_cross_attention,
    pairwise_cross_attention,
    region_pooling,
)
from jattn.nn.applications.fusion import (
    CrossFrameAttention,
    CrossViTFusion,
    FairIdentityAttention,
    GlobalLocalCrossAttention,
    PairwiseCrossAttention,
    ReferenceAttention,
    RegionTokens,
)
from tests.conftest import attention_maps, normal
from tests.conftest import check_against_reference as _check


def _qkv(B=2, T=5, S=7, N=4, K=2, H=8, Hv=6, seed=0):
    return (normal(seed, (B, T, N, H)), normal(seed + 1, (B, S, K, H)),
            normal(seed + 2, (B, S, K, Hv)))


# jitted forms for the property tests: one compilation instead of many eager dispatches
_appended = jax.jit(appended_kv_attention, static_argnames="is_causal")
_attention = jax.jit(jattn.dot_product_attention, static_argnames="is_causal")
_frames = jax.jit(cross_frame_attention, static_argnames="frames")


def _mask(seed, shape, p=0.7):
    return jnp.asarray(np.random.default_rng(seed).random(shape) < p)


# --------------------------------------------------------------------------------------------
# P05 CrossViT


@pytest.mark.parametrize("with_cls,with_mask", [(True, True), (False, False)])
def test_cls_cross_attention_matches_reference(with_cls, with_mask):
    B, S, N, K, H, Hv = 2, 9, 4, 2, 8, 6
    q, pk, pv = normal(0, (B, N, H)), normal(1, (B, S, K, H)), normal(2, (B, S, K, Hv))
    ck, cv = normal(3, (B, K, H)), normal(4, (B, K, Hv))
    pm = _mask(5, (B, S)) if with_mask else None

    def run(impl):
        if with_cls:
            return lambda q, ck, cv, pk, pv: impl(q, ck, cv, pk, pv, patch_mask=pm)
        return lambda q, ck, cv, pk, pv: impl(q, None, None, pk, pv, patch_mask=pm)
    args = (q, ck, cv, pk, pv)
    out = _check(run(cls_cross_attention), run(reference.cls_cross_attention), args)
    assert out.shape == (B, N, Hv)
    if with_cls:
        _check(run(cls_cross_attention), run(reference.cls_cross_attention), args,
               jnp.bfloat16, grad=False)


def test_cls_fusion_independent_of_patch_order():
    B, S = 2, 11
    q, ck, cv = normal(0, (B, 2, 4)), normal(1, (B, 2, 4)), normal(2, (B, 2, 3))
    pk, pv, pm = normal(3, (B, S, 2, 4)), normal(4, (B, S, 2, 3)), _mask(5, (B, S))
    perm = np.random.default_rng(6).permutation(S)
    f = jax.jit(cls_cross_attention)
    a = f(q, ck, cv, pk, pv, patch_mask=pm)
    b = f(q, ck, cv, pk[:, perm], pv[:, perm], patch_mask=pm[:, perm])
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_cls_cross_attention_is_one_query_row():
    """Linear in the tokens: the only attention is one [1, S + 1] row per head."""
    B, S = 1, 64
    args = (normal(0, (B, 2, 4)), normal(1, (B, 2, 4)), normal(2, (B, 2, 4)),
            normal(3, (B, S, 2, 4)), normal(4, (B, S, 2, 4)))
    text = str(jax.make_jaxpr(cls_cross_attention)(*args))
    assert f"{S + 1},{S + 1}" not in text.replace(" ", "") and f"{S},{S}" not in text


# --------------------------------------------------------------------------------------------
# P18 DCAL


@pytest.mark.parametrize("top_r,with_mask", [(3, True), (6, False)])
def test_global_local_matches_reference(top_r, with_mask):
    q, k, v = _qkv(T=6, S=6)
    scores = normal(7, (2, 6))
    m = _mask(8, (2, 6)) if with_mask else None
    fn = functools.partial(global_local_cross_attention, top_r=top_r, kv_mask=m)
    ref = functools.partial(reference.global_local_cross_attention, top_r=top_r, kv_mask=m)
    out = _check(lambda q, k, v: fn(q, k, v, scores)[0],
                 lambda q, k, v: ref(q, k, v, scores)[0], (q, k, v), grad=top_r < 6)
    _, idx = jax.jit(fn)(q, k, v, scores)
    np.testing.assert_array_equal(idx, jax.jit(ref)(q, k, v, scores)[1])
    assert out.shape == (2, top_r, 4, 6)
    if top_r == 6:  # every query: plain attention, rows in score order
        full = _attention(q, k, v)
        np.testing.assert_allclose(out, jnp.take_along_axis(full, idx[:, :, None, None], 1),
                                   rtol=1e-5, atol=1e-6)


def test_global_local_selects_the_rollout_peaks():
    maps = attention_maps(T=8)
    rollout = jattn.attention_rollout(maps)
    scores = rollout[:, 0].at[:, 0].set(-jnp.inf)
    q, k, v = _qkv(T=8, S=8)
    _, idx = jax.jit(global_local_cross_attention, static_argnames="top_r")(q, k, v, scores,
                                                                           top_r=3)
    want = np.argsort(-np.asarray(scores), axis=1, kind="stable")[:, :3]
    np.testing.assert_array_equal(idx, want)
    assert not np.any(np.asarray(idx) == 0)


# --------------------------------------------------------------------------------------------
# P08, P10, P18: appended keys and values


@pytest.mark.parametrize("is_causal,T,with_masks", [(True, 5, True), (True, 7, False),
                                                    (False, 3, True)])
def test_appended_kv_matches_reference(is_causal, T, with_masks):
    q, k, v = _qkv(T=T, S=5)
    ek, ev = normal(10, (2, 4, 2, 8)), normal(11, (2, 4, 2, 6))
    mask = _mask(12, (2, 1, T, 5)) if with_masks else None
    em = _mask(13, (2, 4)) if with_masks else None
    options = dict(mask=mask, extra_mask=em, is_causal=is_causal)
    fn = functools.partial(appended_kv_attention, **options)
    ref = functools.partial(reference.appended_kv_attention, **options)
    _check(fn, ref, (q, k, v, ek, ev))
    if T == 5:
        _check(fn, ref, (q, k, v, ek, ev), jnp.bfloat16, grad=False)


def test_appended_kv_with_all_external_masked_is_plain_attention():
    q, k, v = _qkv()
    ek, ev = normal(10, (2, 3, 2, 8)), normal(11, (2, 3, 2, 6))
    for causal in (False, True):
        got = _appended(q, k, v, ek, ev, extra_mask=jnp.zeros((2, 3), bool), is_causal=causal)
        want = _attention(q, k, v, is_causal=causal)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_appended_kv_accepts_a_mask_object():
    q, k, v = _qkv(T=5, S=5)
    ek, ev = normal(10, (2, 3, 2, 8)), normal(11, (2, 3, 2, 6))
    a = _appended(q, k, v, ek, ev, mask=jattn.masks.local_window(1, 1))
    b = _appended(q, k, v, ek, ev, mask=jattn.masks.local_window(1, 1).materialize(5, 5))
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_reference_attention_is_concatenated_self_attention():
    """IDM-VTON: self-attention over [person; garment] tokens, the person's rows kept."""
    d, B, T, E = 8, 2, 5, 4
    x, ref_tokens = normal(0, (B, T, d)), normal(1, (B, E, d))
    wq, wk, wv = (normal(s, (d, 2, 4)) for s in (2, 3, 4))

    def heads(z, w):
        return jnp.einsum("btd,dnh->btnh", z, w)
    both = jnp.concatenate([x, ref_tokens], axis=1)
    full = _attention(heads(both, wq), heads(both, wk), heads(both, wv))
    got = _appended(heads(x, wq), heads(x, wk), heads(x, wv), heads(ref_tokens, wk),
                    heads(ref_tokens, wv))
    np.testing.assert_allclose(got, full[:, :T], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("with_mask", [True])
def test_pairwise_cross_attention_matches_reference(with_mask):
    q, k, v = _qkv(B=3, T=5, S=5)
    partner = np.array([2, 0, 1])  # numpy: the reference loops over it in Python
    m = _mask(9, (3, 5)) if with_mask else None
    fn = functools.partial(pairwise_cross_attention, partner=partner, kv_mask=m)
    ref = functools.partial(reference.pairwise_cross_attention, partner=partner, kv_mask=m)
    _check(fn, ref, (q, k, v))


def test_pairwise_with_itself_is_self_attention():
    q, k, v = _qkv(T=5, S=5)
    got = jax.jit(pairwise_cross_attention)(q, k, v, jnp.arange(2))
    np.testing.assert_allclose(got, _attention(q, k, v), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("frames,extra,extra_frames", [
    (("first", "previous"), False, "first"), (("first", "previous"), True, "first"),
    (("self", "first"), True, "all")])
def test_cross_frame_attention_matches_reference(frames, extra, extra_frames):
    B, F, L = 2, 4, 3
    q, k, v = normal(0, (B, F, L, 4, 8)), normal(1, (B, F, L, 2, 8)), normal(2, (B, F, L, 2, 6))
    options = dict(frames=frames, extra_frames=extra_frames)
    args = (q, k, v)
    if extra:
        options["extra_mask"] = jnp.array([[True, False, True], [True, True, True]])
        args += (normal(3, (B, 3, 2, 8)), normal(4, (B, 3, 2, 6)))

    def call(impl):
        def run(q, k, v, *ext):
            if ext:
                return impl(q, k, v, extra_key=ext[0], extra_value=ext[1], **options)
            return impl(q, k, v, **options)
        return run
    out = _check(call(cross_frame_attention), call(reference.cross_frame_attention), args,
                 grad=extra_frames == "first")
    assert out.shape == (B, F, L, 4, 6)


def test_cross_frame_self_is_per_frame_attention():
    q, k, v = normal(0, (1, 3, 4, 2, 8)), normal(1, (1, 3, 4, 2, 8)), normal(2, (1, 3, 4, 2, 8))
    got = _frames(q, k, v, frames=("self",))
    want = jax.vmap(_attention, in_axes=1, out_axes=1)(q, k, v)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------------------------
# P11 FairDomain


@pytest.mark.parametrize("is_causal,with_key,T", [(True, True, 5), (False, False, 3)])
def test_attribute_conditioned_matches_reference(is_causal, with_key, T):
    q, k, v = _qkv(T=T, S=5)
    aq, ak = normal(20, (2, 4, 8)), normal(21, (2, 2, 8))

    def call(impl):
        def run(q, k, v, aq, ak):
            return impl(q, k, v, aq, ak if with_key else None, is_causal=is_causal,
                        mask=_mask(22, (2, 1, 1, 5)))
        return run
    _check(call(attribute_conditioned_attention), call(reference.attribute_conditioned_attention),
           (q, k, v, aq, ak))


def test_zero_attribute_is_plain_attention():
    q, k, v = _qkv()
    got = jax.jit(attribute_conditioned_attention)(q, k, v, jnp.zeros((2, 4, 8)),
                                                   jnp.zeros((2, 2, 8)))
    np.testing.assert_allclose(got, _attention(q, k, v), rtol=1e-6)


# --------------------------------------------------------------------------------------------
# P55 region tokens


def _region_masks(seed, shape, soft=False):
    rng = np.random.default_rng(seed)
    m = rng.random(shape) < 0.4
    if not soft:  # an empty region (not differentiable in the masks: bool masks only)
        m[:, -1] = False
    return jnp.asarray(m * rng.random(shape) if soft else m,
                       jnp.float32 if soft else jnp.bool_)


@pytest.mark.parametrize("soft", [False, True])
def test_region_pooling_matches_reference(soft):
    features = normal(0, (2, 3, 4, 5))
    masks = _region_masks(1, (2, 3, 6, 8), soft)
    (tokens, valid), _ = _check(region_pooling, reference.region_pooling, (features, masks)), 0
    np.testing.assert_array_equal(valid, reference.region_pooling(features, masks)[1])
    if not soft:
        assert not np.asarray(valid)[:, -1].any()
        np.testing.assert_array_equal(tokens[:, -1], 0)
    flat, flat_valid = region_pooling(features.reshape(2, 12, 5),
                                      jnp.asarray(masks, jnp.float32)[:, :, ::2, ::2]
                                      .reshape(2, 3, 12))
    assert flat.shape == (2, 3, 5) and flat_valid.shape == (2, 3)


def test_region_pooling_ignores_features_outside_every_mask():
    features = normal(0, (2, 3, 4, 5))
    masks = _region_masks(1, (2, 3, 6, 8))
    covered = np.asarray(masks).reshape(2, 3, 3, 2, 4, 2).any((1, 3, 5))  # [B, h, w]
    changed = jnp.where(covered[..., None], features, 1e3 * normal(2, features.shape))
    a, _ = jax.jit(region_pooling)(features, masks)
    b, _ = jax.jit(region_pooling)(changed, masks)
    np.testing.assert_allclose(a, b, rtol=1e-6)


def test_region_pooling_of_a_whole_cell_is_that_feature():
    features = normal(0, (1, 2, 2, 3))
    masks = jnp.zeros((1, 1, 4, 4), bool).at[0, 0, 2:, :2].set(True)
    tokens, _ = region_pooling(features, masks)
    np.testing.assert_allclose(tokens[0, 0], features[0, 1, 0], rtol=1e-6)


# --------------------------------------------------------------------------------------------
# jit, vmap


def test_vmap_and_jit():
    q, k, v = _qkv()
    ek, ev = normal(10, (2, 3, 2, 8)), normal(11, (2, 3, 2, 6))
    batched = [jnp.stack([x, 2 * x]) for x in (q, k, v, ek, ev)]
    f = jax.jit(jax.vmap(functools.partial(appended_kv_attention, is_causal=True)))
    got = f(*batched)
    for i in range(2):
        want = _appended(*(x[i] for x in batched), is_causal=True)
        np.testing.assert_allclose(got[i], want, rtol=1e-5, atol=1e-6)
    f = jax.jit(jax.vmap(functools.partial(global_local_cross_attention, top_r=2)))
    out, idx = f(*batched[:3], jnp.stack([normal(1, (2, 5)), normal(2, (2, 5))]))
    assert out.shape == (2, 2, 2, 4, 6) and idx.shape == (2, 2, 2)


# --------------------------------------------------------------------------------------------
# errors


def test_errors_name_the_argument():
    q, k, v = _qkv()
    ek, ev = normal(10, (2, 3, 2, 8)), normal(11, (2, 3, 2, 6))
    with pytest.raises(ValueError, match="extra_key"):
        appended_kv_attention(q, k, v, ek[:1], ev)
    with pytest.raises(ValueError, match="extra_value"):
        appended_kv_attention(q, k, v, ek, ev[..., :2])
    with pytest.raises(ValueError, match="extra_mask"):
        appended_kv_attention(q, k, v, ek, ev, extra_mask=jnp.ones((2, 4), bool))
    with pytest.raises(TypeError, match="extra_mask"):
        appended_kv_attention(q, k, v, ek, ev, extra_mask=jnp.ones((2, 3)))
    with pytest.raises(ValueError, match="mask"):
        appended_kv_attention(q, k, v, ek, ev, mask=jnp.ones((2, 1, 5, 6), bool))
    with pytest.raises(TypeError, match="extra_key"):
        appended_kv_attention(q, k, v, ek.astype(jnp.bfloat16), ev)
    with pytest.raises(TypeError, match="cls_value"):
        cls_cross_attention(q[:, 0], k[:, 0], v[:, 0].astype(jnp.bfloat16), k, v)
    with pytest.raises(ValueError, match="top_r"):
        global_local_cross_attention(q, k, v, normal(1, (2, 5)), top_r=6)
    with pytest.raises(ValueError, match="top_r"):
        global_local_cross_attention(q, k, v, normal(1, (2, 5)), top_r=0)
    with pytest.raises(ValueError, match="scores"):
        global_local_cross_attention(q, k, v, normal(1, (2, 4)), top_r=2)
    with pytest.raises(ValueError, match="partner"):
        pairwise_cross_attention(q, k, v, jnp.array([0, 2]))
    with pytest.raises(TypeError, match="partner"):
        pairwise_cross_attention(q, k, v, jnp.array([0.0, 1.0]))
    with pytest.raises(ValueError, match="cls_key, cls_value"):
        cls_cross_attention(q[:, 0], k[:, 0], None, k, v)
    with pytest.raises(ValueError, match="cls_query"):
        cls_cross_attention(q[:, 0, :3], None, None, k, v)
    with pytest.raises(ValueError, match="patch_mask"):
        cls_cross_attention(q[:, 0], None, None, k, v, patch_mask=jnp.ones((2, 3), bool))
    x5 = normal(0, (1, 3, 2, 2, 4))
    with pytest.raises(ValueError, match="frames"):
        cross_frame_attention(x5, x5, x5, frames=("first", "first"))
    with pytest.raises(ValueError, match="frames"):
        cross_frame_attention(x5, x5, x5, frames=("next",))
    with pytest.raises(ValueError, match="extra_frames"):
        cross_frame_attention(x5, x5, x5, extra_frames="last")
    with pytest.raises(ValueError, match="extra_key, extra_value"):
        cross_frame_attention(x5, x5, x5, extra_key=normal(0, (1, 2, 2, 4)))
    with pytest.raises(ValueError, match="attribute_query"):
        attribute_conditioned_attention(q, k, v, normal(0, (2, 2, 8)))
    with pytest.raises(ValueError, match="masks"):
        region_pooling(normal(0, (1, 3, 3, 2)), jnp.ones((1, 2, 4, 4), bool))
    with pytest.raises(TypeError, match="masks"):
        region_pooling(normal(0, (1, 2, 2, 2)), jnp.ones((1, 2, 4, 4), jnp.int32))
    with pytest.raises(ValueError, match="masks"):
        region_pooling(normal(0, (2, 2, 2, 2)), jnp.ones((1, 2, 4, 4), bool))


# --------------------------------------------------------------------------------------------
# modules


def _merge(x):
    return x.reshape(*x.shape[:-2], -1)


def _build(cls, *args, seed=0, **options):
    """The module with random values in every parameter (zero-initialised tables included),
    built abstractly: no initialiser runs (eager initialisation compiles op by op)."""
    abstract = nnx.eval_shape(lambda: cls(*args, rngs=nnx.Rngs(0), **options))
    graph, params, rest = nnx.split(abstract, nnx.Param, ...)
    leaves, treedef = jax.tree_util.tree_flatten(params)
    leaves = [0.5 * normal(seed + i, x.shape, x.dtype) for i, x in enumerate(leaves)]
    return nnx.merge(graph, jax.tree_util.tree_unflatten(treedef, leaves), rest)


def _run(fn, module, *args):
    """fn(module, *args) compiled once (eager module calls compile op by op)."""
    return nnx.jit(fn)(module, *args)


def test_crossvit_module_equals_functional():
    fuse = _build(CrossViTFusion, (8, 12), (2, 3))
    xa, xb = normal(1, (2, 6, 8)), normal(2, (2, 4, 12))
    mb = jnp.array([[True, True, True, False], [True] * 4])
    perm = np.array([0, 3, 1, 2])  # the other branch's patches in another order

    def both(fuse, xa, xb, mb):
        got_a, got_b = fuse(xa, xb, mask_b=mb)
        br = fuse.a_reads_b
        cls = br.project(jax.nn.gelu(br.project_norm(xa[:, :1])))
        seq = br.norm(jnp.concatenate([cls, xb[:, 1:]], axis=1))
        q, k, v = br.proj(seq[:, :1], seq)
        fused = cls_cross_attention(q[:, 0], k[:, 0], v[:, 0], k[:, 1:], v[:, 1:],
                                    patch_mask=mb[:, 1:])
        y = cls + br.out_proj(_merge(fused))[:, None]
        want = br.revert(jax.nn.gelu(br.revert_norm(y)))
        again_a, _ = fuse(xa, xb[:, perm], mask_b=mb[:, perm])
        return got_a, got_b, want, again_a
    got_a, got_b, want, again_a = _run(both, fuse, xa, xb, mb)
    np.testing.assert_allclose(got_a[:, :1], want, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(got_a[:, 1:], xa[:, 1:])
    np.testing.assert_array_equal(got_b[:, 1:], xb[:, 1:])
    np.testing.assert_allclose(again_a, got_a, rtol=1e-5, atol=1e-5)


def test_glca_module_equals_functional():
    glca = _build(GlobalLocalCrossAttention, 8, 2, top_r=2)
    x, maps = normal(1, (2, 6, 8)), attention_maps(T=6)

    def both(glca, x, maps):
        q, k, v = glca.proj(x)
        scores = jattn.attention_rollout(maps)[:, 0].at[:, 0].set(-jnp.inf)
        want, want_idx = global_local_cross_attention(q, k, v, scores, top_r=2)
        return glca(x, maps), (glca.out_proj(_merge(want)), want_idx)
    (out, idx), (want, want_idx) = _run(both, glca, x, maps)
    np.testing.assert_array_equal(idx, want_idx)
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5)


def test_pwca_module_equals_functional_and_inference_is_self_attention():
    pwca = _build(PairwiseCrossAttention, 8, 2)
    x, partner = normal(1, (3, 5, 8)), jnp.array([1, 2, 0])

    def both(pwca, x, partner):
        q, k, v = pwca.proj(x)
        return (pwca(x, partner=partner), pwca(x),
                pwca.out_proj(_merge(pairwise_cross_attention(q, k, v, partner))),
                pwca.out_proj(_merge(jattn.dot_product_attention(q, k, v))))
    train, infer, want_train, want_infer = _run(both, pwca, x, partner)
    np.testing.assert_allclose(train, want_train, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(infer, want_infer, rtol=1e-5, atol=1e-5)


def test_reference_module_equals_functional():
    attn = _build(ReferenceAttention, 8, 2, is_causal=True)
    x, r, rm = normal(1, (2, 5, 8)), normal(2, (2, 3, 8)), _mask(3, (2, 3))

    def both(attn, x, r, rm):
        q, k, v = attn.proj(x)
        _, rk, rv = attn.proj(r)
        want = attn.out_proj(_merge(appended_kv_attention(q, k, v, rk, rv, extra_mask=rm,
                                                          is_causal=True)))
        return attn(x, r, reference_mask=rm), want
    got, want = _run(both, attn, x, r, rm)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("separate", [False, True])
def test_cross_frame_module_equals_functional(separate):
    attn = _build(CrossFrameAttention, 8, 2, separate_prompt_kv=separate)
    x, p = normal(1, (1, 3, 4, 8)), normal(2, (1, 5, 8))

    def both(attn, x, p):
        q, k, v = attn.proj(x)
        _, pk, pv = (attn.prompt_proj if separate else attn.proj)(p)
        want = attn.out_proj(_merge(cross_frame_attention(q, k, v, extra_key=pk,
                                                          extra_value=pv)))
        return attn(x, prompt=p), want
    got, want = _run(both, attn, x, p)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_fair_identity_module_equals_functional():
    fia = _build(FairIdentityAttention, 8, 2, num_attributes=3)
    x, attr = normal(1, (2, 5, 8)), jnp.array([2, 0])

    def both(fia, x, attr):
        # the offsets are the attribute embedding through the query/key projections
        e = fia.attribute_embedding[...][attr][:, None]
        q, k, v = fia.proj(x)
        q_shift, k_shift, _ = fia.proj(x + e)
        a_q, a_k = fia.offsets(attr)
        want = x + fia.out_proj(_merge(attribute_conditioned_attention(q, k, v, a_q, a_k)))
        return (q + a_q[:, None], q_shift, k + a_k[:, None], k_shift, fia(x, attr), want)
    q_a, q_b, k_a, k_b, got, want = _run(both, fia, x, attr)
    np.testing.assert_allclose(q_a, q_b, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(k_a, k_b, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_region_tokens_module_equals_functional():
    layer = _build(RegionTokens, 5, 8)
    features, masks = normal(1, (2, 3, 4, 5)), _region_masks(2, (2, 3, 6, 8))

    def both(layer, features, masks):
        pooled, valid = region_pooling(features, masks)
        return (layer(features, masks), layer.proj(pooled) + layer.region_type[...],
                layer.proj(features.reshape(2, 12, 5)), valid)
    (tokens, mask), regions, patches, valid = _run(both, layer, features, masks)
    np.testing.assert_allclose(tokens[:, 12:], regions, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(tokens[:, :12], patches, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(mask, np.concatenate([np.ones((2, 12), bool), valid], 1))


def test_unsupported_patterns_say_why():
    q, k, v = _qkv()
    with pytest.raises(NotImplementedError, match="causal"):
        cls_cross_attention(q[:, 0], None, None, k, v, is_causal=True)
    with pytest.raises(NotImplementedError, match="causal"):
        global_local_cross_attention(q, k, v, normal(1, (2, 5)), top_r=2, is_causal=True)
    with pytest.raises(NotImplementedError, match="causal"):
        pairwise_cross_attention(q, k, v, jnp.arange(2), is_causal=True)
