"""Cross attention between sets (P01, P06, P13, P14, P15, P34, P36, P58, P60, P71, P77):
label-wise attention, co-attention, latent and multi-level cross attention and the pair
encoding against the dense references (forward and gradients, float32 checked in float64,
bfloat16), the defining properties (permutation equivariance over the query set, padding
invariance, co-attention's shared affinity and its symmetry under swapping the inputs, joint
multi-level = one softmax over the concatenated levels, bi-encoder mask = separate
encodings), jit / vmap, error messages, and the NNX modules against the functional calls."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jattn import reference
from jattn.applications.cross import (
    bi_encoder_score,
    co_attention,
    concept_explanation_loss,
    cross_encoder_score,
    label_attention,
    label_logits,
    latent_cross_attention,
    multi_level_cross_attention,
    pair_inputs,
    pair_mask,
    slot_attention,
)
from jattn.nn.applications.cross import (
    CoAttention,
    LabelAttention,
    LatentCrossAttention,
    MultiLevelCrossAttention,
    PairEncoder,
    PerceiverResampler,
    QueryDecoder,
    QueryDecoderLayer,
    SlotAttention,
    TokenResampler,
)
from tests.conftest import check_against_reference as _check
from tests.conftest import normal


def _mask(seed, shape, keep_first=True):
    m = np.random.default_rng(seed).random(shape) < 0.7
    if keep_first:
        m[..., 0] = True
    return jnp.asarray(m)




# --------------------------------------------------------------------------------------------
# label attention (P77, P15, P58, P01, P71)


@pytest.mark.parametrize("dtype,shared,num_heads,masked", [
    (jnp.float32, False, 2, True), (jnp.bfloat16, True, 1, True)])
def test_label_attention_matches_reference(dtype, shared, num_heads, masked):
    B, L, S, D, Dv = 2, 5, 13, 8, 6
    labels = normal(0, (L, D) if shared else (B, L, D))
    feats, vals = normal(1, (B, S, D)), normal(2, (B, S, Dv))
    mask = _mask(3, (B, S)) if masked else None
    label_mask = jnp.array([True, True, False, True, True]) if masked else None
    options = dict(num_heads=num_heads, mask=mask, label_mask=label_mask,
                   return_weights=True)

    def fn(q, f, v):
        return label_attention(q, f, v, **options)

    def ref(q, f, v):
        return reference.label_attention(q, f, v, **options)

    _check(fn, ref, (labels, feats, vals), dtype)


def test_label_attention_properties():
    B, L, S, D = 2, 6, 9, 8
    labels, feats = normal(0, (L, D)), normal(1, (B, S, D))
    perm = np.random.default_rng(0).permutation(L)
    sperm = np.random.default_rng(1).permutation(S)
    pad = jnp.concatenate([feats, 1e3 * normal(2, (B, 4, D))], axis=1)
    pad_mask = jnp.arange(S + 4)[None].repeat(B, 0) < S
    empty = jnp.zeros((B, S), bool).at[0].set(True)
    f = label_attention

    @jax.jit
    def run(labels, feats):
        pooled, w = f(labels, feats, num_heads=2, return_weights=True)
        return dict(
            pooled=pooled, weights=w,
            permuted_labels=f(labels[perm], feats, num_heads=2),
            padded=f(labels, pad, num_heads=2, mask=pad_mask),
            permuted_features=f(labels, feats[:, sperm], num_heads=2),
            empty=f(labels, feats, mask=empty, label_mask=jnp.arange(L) != 2),
            grad=jax.grad(lambda x: f(labels, x, mask=empty).sum())(feats))

    r = run(labels, feats)
    np.testing.assert_allclose(r["weights"].sum(-1), 1, atol=1e-5)
    # permuting the labels permutes the pooled rows (no interaction between labels)
    np.testing.assert_allclose(r["permuted_labels"], r["pooled"][:, perm], atol=1e-6)
    # padded features appended under the mask change nothing; nor does the features' order
    np.testing.assert_allclose(r["padded"], r["pooled"], atol=1e-5)
    np.testing.assert_allclose(r["permuted_features"], r["pooled"], atol=1e-5)
    # a padded label and a document with no valid token give zero rows, finite gradients
    out, g = r["empty"], r["grad"]
    assert (out[1] == 0).all() and (out[0, 2] == 0).all() and (out[0, 0] != 0).any()
    assert np.isfinite(np.asarray(g)).all() and (g[1] == 0).all()


def test_label_logits():
    pooled, w_per, w_shared = normal(0, (2, 4, 3)), normal(1, (4, 3)), normal(2, (3,))
    bias = normal(3, (4,))
    np.testing.assert_allclose(label_logits(pooled, w_per, bias),
                               reference.label_logits(pooled, w_per, bias), atol=1e-6)
    want = np.einsum("bld,d->bl", np.asarray(pooled), np.asarray(w_shared)) + 0.5
    np.testing.assert_allclose(label_logits(pooled, w_shared, jnp.float32(0.5)), want,
                               atol=1e-6)


# --------------------------------------------------------------------------------------------
# co-attention (P36, P14)


@pytest.mark.parametrize("dtype,rank,masked,values", [
    (jnp.float32, 4, True, True), (jnp.bfloat16, 3, True, False)])
def test_co_attention_matches_reference(dtype, rank, masked, values):
    B, Ta, Tb = 2, 5, 7
    shape = (lambda T: (B, T, 8)) if rank == 3 else (lambda T: (B, T, 2, 4))
    vshape = (lambda T: (B, T, 3)) if rank == 3 else (lambda T: (B, T, 2, 3))
    a, b = normal(0, shape(Ta)), normal(1, shape(Tb))
    va, vb = (normal(2, vshape(Ta)), normal(3, vshape(Tb))) if values else (None, None)
    options = dict(a_mask=_mask(4, (B, Ta)) if masked else None,
                   b_mask=_mask(5, (B, Tb)) if masked else None, return_weights=True)
    args = (a, b) + ((va, vb) if values else ())

    def fn(*x):
        return co_attention(*x, **options)

    def ref(*x):
        return reference.co_attention(*x, **options)

    _check(fn, ref, args, dtype)


def test_co_attention_shares_one_affinity_and_is_symmetric():
    B, Ta, Tb = 1, 4, 6
    a, b = normal(0, (B, Ta, 2, 8)), normal(1, (B, Tb, 2, 8))
    am, bm = _mask(2, (B, Ta)), _mask(3, (B, Tb))
    f = jax.jit(co_attention, static_argnames="return_weights")
    ab, ba, w_ab, w_ba = f(a, b, a_mask=am, b_mask=bm, return_weights=True)
    # swapping the inputs swaps the outputs and the maps
    ba2, ab2, w_ba2, w_ab2 = f(b, a, a_mask=bm, b_mask=am, return_weights=True)
    for x, y in ((ab, ab2), (ba, ba2), (w_ab, w_ab2), (w_ba, w_ba2)):
        np.testing.assert_allclose(x, y, atol=1e-6)
    # one affinity C: log w_ab[i, j] - log w_ba[j, i] = -lse_row(i) + lse_col(j), a sum of a
    # row term and a column term, so its double difference vanishes on the valid block
    ia, ib = np.flatnonzero(am[0]), np.flatnonzero(bm[0])
    d = (np.log(np.asarray(w_ab, np.float64)[0][:, ia][:, :, ib])
         - np.log(np.swapaxes(np.asarray(w_ba, np.float64)[0], 1, 2)[:, ia][:, :, ib]))
    dd = d - d[:, :1, :] - d[:, :, :1] + d[:, :1, :1]
    np.testing.assert_allclose(dd, 0, atol=1e-4)
    # padded tokens get zero output rows
    assert (ab[0, ~np.asarray(am[0])] == 0).all() and (ba[0, ~np.asarray(bm[0])] == 0).all()


# --------------------------------------------------------------------------------------------
# latent cross attention and multi-level cross attention (P06, P60, P13)


@pytest.mark.parametrize("dtype,shared,gqa,in_keys,masked", [
    (jnp.float32, False, True, True, True), (jnp.bfloat16, True, False, False, True)])
def test_latent_cross_attention_matches_reference(dtype, shared, gqa, in_keys, masked):
    B, M, S, N, H = 2, 3, 11, 4, 4
    K = 2 if gqa else N
    z = normal(0, (M, N, H) if shared else (B, M, N, H))
    k, v = normal(1, (B, S, K, H)), normal(2, (B, S, K, 5))
    lk = normal(3, (M, K, H) if shared else (B, M, K, H)) if in_keys else None
    lv = normal(4, (M, K, 5) if shared else (B, M, K, 5)) if in_keys else None
    mask = _mask(5, (B, S)) if masked else None
    args = (z, k, v) + ((lk, lv) if in_keys else ())

    def call(f):
        def run(z, k, v, lk=None, lv=None):
            return f(z, k, v, mask=mask, latent_keys=lk, latent_values=lv)
        return run

    _check(call(latent_cross_attention), call(reference.latent_cross_attention), args, dtype)


def test_latent_cross_attention_properties():
    B, M, S, N, H = 2, 5, 8, 2, 4
    z, k, v = normal(0, (M, N, H)), normal(1, (B, S, N, H)), normal(2, (B, S, N, H))
    lk, lv = normal(3, (M, N, H)), normal(4, (M, N, H))
    f = jax.jit(latent_cross_attention)
    out = f(z, k, v, latent_keys=lk, latent_values=lv)
    perm = np.random.default_rng(0).permutation(M)
    # permuting the latent set (with their own keys) permutes the output: equivariance
    np.testing.assert_allclose(f(z[perm], k, v, latent_keys=lk[perm], latent_values=lv[perm]),
                               out[:, perm], atol=1e-5)
    # padded inputs under the mask change nothing
    kp = jnp.concatenate([k, 50 * normal(5, (B, 3, N, H))], 1)
    vp = jnp.concatenate([v, 50 * normal(6, (B, 3, N, H))], 1)
    mask = jnp.arange(S + 3)[None].repeat(B, 0) < S
    np.testing.assert_allclose(f(z, kp, vp, mask=mask, latent_keys=lk, latent_values=lv), out,
                               atol=1e-5)
    # without latent keys an input with nothing valid gives zeros; with them the latents
    # still see themselves
    none = jnp.zeros((B, S), bool)
    assert (f(z, k, v, mask=none) == 0).all()
    own = f(z, k, v, mask=none, latent_keys=lk, latent_values=lv)
    np.testing.assert_allclose(own, reference.latent_cross_attention(
        z, lk[None].repeat(B, 0), lv[None].repeat(B, 0)), atol=1e-5)


@pytest.mark.parametrize("dtype,combine", [(jnp.float32, "joint"), (jnp.bfloat16, "sum")])
def test_multi_level_matches_reference(dtype, combine):
    B, T, N, H = 2, 3, 4, 4
    q = normal(0, (B, T, N, H))
    sizes, heads = [13, 5, 2], [4, 2, 1]  # lengths and key heads differ per level
    layout = list(enumerate(zip(sizes, heads, strict=True)))
    keys = [normal(10 + i, (B, s, k, H)) for i, (s, k) in layout]
    values = [normal(20 + i, (B, s, k, 6)) for i, (s, k) in layout]
    masks = [_mask(30, (B, 13)), None, jnp.array([[True, False], [False, False]])]

    def fn(q, keys, values):
        return multi_level_cross_attention(q, keys, values, masks=masks, combine=combine)

    def ref(q, keys, values):
        return reference.multi_level_cross_attention(q, keys, values, masks=masks,
                                                     combine=combine)

    _check(fn, ref, (q, keys, values), dtype)


def test_multi_level_joint_equals_concatenated_attention_and_empty_levels():
    import jattn

    B, T, N, H = 1, 4, 2, 4
    q = normal(0, (B, T, N, H))
    keys = [normal(1, (B, 6, N, H)), normal(2, (B, 3, N, H))]
    values = [normal(3, (B, 6, N, H)), normal(4, (B, 3, N, H))]
    live, dead = jnp.ones((B, 6), bool), jnp.zeros((B, 3), bool)

    @jax.jit
    def run(q):
        f = multi_level_cross_attention
        return dict(
            joint=f(q, keys, values, masks=[live, jnp.ones((B, 3), bool)]),
            concat=jattn.dot_product_attention(q, jnp.concatenate(keys, 1),
                                               jnp.concatenate(values, 1)),
            # a fully masked level drops out of both combinations
            joint_dead=f(q, keys, values, masks=[live, dead]),
            sum_dead=f(q, keys, values, masks=[live, dead], combine="sum"),
            one=jattn.dot_product_attention(q, keys[0], values[0]),
            # nothing valid anywhere: zeros and finite gradients
            none=f(q, keys, values, masks=[~live, dead]),
            grad=jax.grad(lambda q: f(q, keys, values, masks=[~live, dead]).sum())(q))

    r = run(q)
    np.testing.assert_allclose(r["joint"], r["concat"], atol=1e-5)
    np.testing.assert_allclose(r["joint_dead"], r["one"], atol=1e-5)
    np.testing.assert_allclose(r["sum_dead"], r["one"], atol=1e-5)
    assert (r["none"] == 0).all() and np.isfinite(np.asarray(r["grad"])).all()


# --------------------------------------------------------------------------------------------
# pair encoding (P34)


def test_pair_inputs_and_mask_by_hand():
    a = jnp.array([[1, 2, 3], [4, 5, 0]])
    b = jnp.array([[6, 0], [7, 8]])
    p = pair_inputs(a, b, a_mask=a != 0, b_mask=b != 0)
    assert p.tokens.tolist() == [[1, 2, 3, 6, 0], [4, 5, 0, 7, 8]]
    assert p.segment_ids.tolist() == [[0, 0, 0, 1, -1], [0, 0, -1, 1, 1]]
    assert p.positions.tolist() == [[0, 1, 2, 3, -1], [0, 1, -1, 2, 3]]
    assert p.segment_positions.tolist() == [[0, 1, 2, 0, -1], [0, 1, -1, 0, 1]]
    for mode in ("cross", "bi"):
        np.testing.assert_array_equal(pair_mask(p.segment_ids, mode=mode),
                                      reference.pair_mask(p.segment_ids, mode=mode))
    bi = np.asarray(pair_mask(p.segment_ids, mode="bi"))[1, 0]
    assert bi[0].tolist() == [True, True, False, False, False]
    assert bi[3].tolist() == [False, False, False, True, True]
    assert not bi[2].any()


def test_pair_scores_match_reference():
    B, L, D = 3, 7, 5
    hidden = normal(0, (B, L, D))
    seg = jnp.array([[0, 0, 0, 1, 1, -1, -1], [-1, 0, 0, 1, 1, 1, 1], [0, 1, 1, 1, 1, 1, -1]])
    empty = jnp.array([[0, 0, 0, -1, -1, -1, -1]] * B)
    w, bias = normal(1, (D,)), jnp.float32(0.3)

    @jax.jit
    def run(hidden):
        got, want = {}, {}
        for pooling in ("first", "mean"):
            got[pooling] = cross_encoder_score(hidden, w, bias, segment_ids=seg,
                                               pooling=pooling)
            want[pooling] = reference.cross_encoder_score(hidden, w, bias, segment_ids=seg,
                                                          pooling=pooling)
        got["bi"], want["bi"] = (bi_encoder_score(hidden, seg),
                                 reference.bi_encoder_score(hidden, seg))
        got["first_real"] = cross_encoder_score(hidden, w, segment_ids=seg)[1]
        want["first_real"] = hidden[1, 1] @ w  # the first REAL token, not position 0
        # an empty sentence: score 0, finite gradient
        got["empty"], want["empty"] = bi_encoder_score(hidden, empty), jnp.zeros(B)
        grad = jax.grad(lambda h: bi_encoder_score(h, empty).sum())(hidden)
        return got, want, grad

    got, want, grad = run(hidden)
    for name in got:
        np.testing.assert_allclose(got[name], want[name], atol=1e-5, err_msg=name)
    assert np.isfinite(np.asarray(grad)).all()


# --------------------------------------------------------------------------------------------
# jit / vmap, errors


def test_vmap_matches_loop():
    X, B, S, D = 2, 2, 6, 4
    labels, feats = normal(0, (X, 5, D)), normal(1, (X, B, S, D))
    a, b = normal(2, (X, B, 4, D)), normal(3, (X, B, 5, D))

    def both(labels, feats, a, b):
        return label_attention(labels, feats), co_attention(a, b)

    got = jax.jit(jax.vmap(both))(labels, feats, a, b)
    one = jax.jit(both)
    for i in range(X):
        want = one(labels[i], feats[i], a[i], b[i])
        for g, w in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want),
                        strict=True):
            np.testing.assert_allclose(g[i], w, atol=1e-6)


F = jnp.zeros((2, 5, 4))
Q4 = jnp.zeros((2, 3, 2, 4))


@pytest.mark.parametrize("call,error,match", [
    (lambda: label_attention(jnp.zeros((3, 5)), F), ValueError, "label_queries"),
    (lambda: label_attention(jnp.zeros((3, 4)), F, num_heads=3), ValueError, "num_heads"),
    (lambda: label_attention(jnp.zeros((3, 4)), F, mask=jnp.ones((2, 4), bool)), ValueError,
     "mask"),
    (lambda: label_attention(jnp.zeros((3, 4)), F, label_mask=jnp.ones(3)), TypeError,
     "label_mask"),
    (lambda: label_attention(jnp.zeros((3, 4), jnp.bfloat16), F), TypeError, "label_queries"),
    (lambda: label_logits(jnp.zeros((2, 3, 4)), jnp.zeros((2, 4))), ValueError, "weight"),
    (lambda: co_attention(F, jnp.zeros((2, 5, 3))), ValueError, "b: expected"),
    (lambda: co_attention(F, Q4), ValueError, "b: expected rank"),
    (lambda: co_attention(F, F, b_mask=jnp.ones((2, 4), bool)), ValueError, "b_mask"),
    (lambda: latent_cross_attention(jnp.zeros((3, 4)), Q4, Q4), ValueError, "latents"),
    (lambda: latent_cross_attention(Q4[0], Q4, Q4, latent_keys=Q4[0]), ValueError,
     "latent_values"),
    (lambda: latent_cross_attention(Q4[0], Q4, Q4, latent_keys=Q4[0, :2],
                                    latent_values=Q4[0, :2]), ValueError, "latent_keys"),
    (lambda: multi_level_cross_attention(Q4, [], []), ValueError, "keys"),
    (lambda: multi_level_cross_attention(Q4, [Q4], [Q4, Q4]), ValueError, "values"),
    (lambda: multi_level_cross_attention(Q4, [Q4], [Q4], combine="max"), ValueError,
     "combine"),
    (lambda: multi_level_cross_attention(Q4, [Q4, Q4[:, :, :, :3]], [Q4, Q4]), ValueError,
     r"keys\[1\]"),
    (lambda: pair_inputs(F, jnp.zeros((2, 5, 3))), ValueError, "b: expected"),
    (lambda: pair_mask(jnp.zeros((2, 3)), mode="bi"), TypeError, "segment_ids"),
    (lambda: pair_mask(jnp.zeros((2, 3), int), mode="joint"), ValueError, "mode"),
    (lambda: cross_encoder_score(F, jnp.zeros(4), pooling="max"), ValueError, "pooling"),
    (lambda: cross_encoder_score(F, jnp.zeros(3)), ValueError, "weight"),
])
def test_bad_input_names_the_argument(call, error, match):
    with pytest.raises(error, match=match):
        call()


# --------------------------------------------------------------------------------------------
# modules


def test_label_attention_module_equals_function():
    B, S, D, L = 2, 7, 8, 4
    x, mask, emb = normal(0, (B, S, D)), _mask(1, (B, S)), normal(2, (B, 3, 6))
    m = LabelAttention(D, num_labels=L, num_heads=2, rngs=nnx.Rngs(0))
    m2 = LabelAttention(D, num_heads=2, d_label=6, rngs=nnx.Rngs(1))

    @nnx.jit
    def run(m, m2):
        logits, pooled = m(x, mask=mask)
        q = m.query_proj(m.labels[...])
        k, v = jnp.split(m.kv_proj(x), 2, axis=-1)
        want = reference.label_attention(q, k, v, num_heads=2, mask=mask)
        want_logits = reference.label_logits(want, m.score_weight[...], m.score_bias[...])
        # open-set: text-derived label embeddings per example and a shared head
        logits2, _ = m2(x, label_embeddings=emb)
        return pooled, want, logits, want_logits, logits2

    pooled, want, logits, want_logits, logits2 = run(m, m2)
    np.testing.assert_allclose(pooled, want, atol=1e-5)
    np.testing.assert_allclose(logits, want_logits, atol=1e-5)
    assert logits2.shape == (B, 3) and m2.score_weight.shape == (D,)
    with pytest.raises(ValueError, match="label_embeddings"):
        m2(x)


def test_co_attention_module_equals_function():
    B, Ta, Tb = 2, 5, 3
    a, b = normal(0, (B, Ta, 12)), normal(1, (B, Tb, 6))
    am = _mask(2, (B, Ta))
    co = CoAttention(12, 6, num_heads=2, head_dim=4, rngs=nnx.Rngs(0))

    @nnx.jit
    def run(co):
        ya, yb = co(a, b, a_mask=am)
        ka, va = (t.reshape(B, Ta, 2, 4) for t in jnp.split(co.a_proj(a), 2, axis=-1))
        kb, vb = (t.reshape(B, Tb, 2, 4) for t in jnp.split(co.b_proj(b), 2, axis=-1))
        ra, rb = reference.co_attention(ka, kb, va, vb, a_mask=am)
        return ya, yb, co.a_out(ra.reshape(B, Ta, 8)), co.b_out(rb.reshape(B, Tb, 8))

    ya, yb, want_a, want_b = run(co)
    np.testing.assert_allclose(ya, want_a, atol=1e-5)
    np.testing.assert_allclose(yb, want_b, atol=1e-5)


@pytest.mark.parametrize("in_keys", [False, True])
def test_latent_module_equals_function(in_keys):
    B, S, D, M = 2, 9, 8, 3
    x, z, mask = normal(0, (B, S, D)), normal(1, (M, D)), _mask(2, (B, S))
    m = LatentCrossAttention(D, num_heads=2, num_kv_heads=1, latents_in_keys=in_keys,
                             rngs=nnx.Rngs(0))

    @nnx.jit
    def run(m):
        q = m.q_proj(z).reshape(M, 2, 4)
        k, v = (t.reshape(B, S, 1, 4) for t in jnp.split(m.kv_proj(x), 2, axis=-1))
        lk, lv = ((t.reshape(M, 1, 4) for t in jnp.split(m.kv_proj(z), 2, axis=-1))
                  if in_keys else (None, None))
        want = reference.latent_cross_attention(q, k, v, mask=mask, latent_keys=lk,
                                                latent_values=lv)
        return m(z, x, context_mask=mask), m.out_proj(want.reshape(B, M, D))

    got, want = run(m)
    np.testing.assert_allclose(got, want, atol=1e-5)
    if in_keys:
        with pytest.raises(ValueError, match="d_context"):
            LatentCrossAttention(D, d_context=4, latents_in_keys=True, rngs=nnx.Rngs(0))


def test_perceiver_resampler_layers_and_routing():
    B, D, M = 2, 8, 3
    r = PerceiverResampler(D, M, num_layers=2, num_heads=2, routing=[1, 0], rngs=nnx.Rngs(0))
    single = PerceiverResampler(D, M, num_heads=2, rngs=nnx.Rngs(1))
    levels = [normal(0, (B, 10, D)), normal(1, (B, 4, D))]
    padded = jnp.concatenate([levels[0], 9 * normal(2, (B, 3, D))], 1)
    mask = jnp.arange(13)[None].repeat(B, 0) < 10

    @nnx.jit
    def run(r, single):
        out = r(levels)
        # the two Flamingo layers by hand: z + attn(norm z, norm x) over [x; z] keys, then
        # the MLP; layer 0 reads level 1 and layer 1 level 0 (the routing)
        z = jnp.broadcast_to(r.latents[...], (B, M, D))
        for i, level in zip((0, 1), (levels[1], levels[0]), strict=True):
            attn, zn = r.attn[i], r.latent_norms[i](z)
            q = attn.q_proj(zn).reshape(B, M, 2, 4)
            k, v = (t.reshape(B, -1, 2, 4) for t in jnp.split(
                attn.kv_proj(r.context_norms[i](level)), 2, axis=-1))
            lk, lv = (t.reshape(B, M, 2, 4) for t in jnp.split(attn.kv_proj(zn), 2, axis=-1))
            y = reference.latent_cross_attention(q, k, v, latent_keys=lk, latent_values=lv)
            z = z + attn.out_proj(y.reshape(B, M, D))
            z = z + r.mlps[i](r.mlp_norms[i](z))
        # padded input tokens under the mask change nothing
        return out, r.norm(z), single(padded, mask=mask), single(levels[0])

    out, want, got_padded, want_padded = run(r, single)
    assert out.shape == (B, M, D)
    np.testing.assert_allclose(out, want, atol=1e-5)
    np.testing.assert_allclose(got_padded, want_padded, atol=1e-5)
    with pytest.raises(ValueError, match="routing"):
        r([levels[0]])


def test_multi_level_module_equals_function():
    B, T, D = 2, 3, 8
    x = normal(0, (B, T, D))
    levels = [normal(1, (B, 10, 4)), normal(2, (B, 2, 12))]
    masks = [_mask(3, (B, 10)), None]
    m = MultiLevelCrossAttention(D, [4, 12], num_heads=2, rngs=nnx.Rngs(0))

    @nnx.jit
    def run(m):
        q = m.q_proj(x).reshape(B, T, 2, 4)
        kv = [jnp.split(p(lv), 2, axis=-1) for p, lv in zip(m.kv_projs, levels, strict=True)]
        keys = [k.reshape(B, -1, 2, 4) for k, _ in kv]
        values = [v.reshape(B, -1, 2, 4) for _, v in kv]
        want = reference.multi_level_cross_attention(q, keys, values, masks=masks)
        return m(x, levels, masks=masks), m.out_proj(want.reshape(B, T, D))

    got, want = run(m)
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_query_decoder_equivariance_padding_and_layer_by_hand():
    B, S, D, M = 2, 7, 8, 4
    ctx, text = normal(0, (B, S, D)), normal(1, (B, 3, D))
    dec = QueryDecoder(D, num_layers=2, num_queries=M, num_heads=2, num_contexts=2,
                       rngs=nnx.Rngs(0))
    layer = QueryDecoderLayer(D, num_heads=2, self_attention=False, rngs=nnx.Rngs(1))
    queries, x = normal(2, (M, D)), normal(4, (B, M, D))
    perm = np.random.default_rng(0).permutation(M)
    padded = jnp.concatenate([ctx, 7 * normal(3, (B, 2, D))], 1)
    mask = jnp.arange(S + 2)[None].repeat(B, 0) < S

    @nnx.jit
    def run(dec, layer):
        all_layers = dec([ctx, text], queries=queries, return_all=True)
        out = all_layers[-1]
        permuted = dec([ctx, text], queries=queries[perm])
        masked = dec([padded, text], queries=queries, context_masks=[mask, None])
        # one layer without self-attention, written out with the dense reference attention
        mha, h = layer.cross[0], layer.cross_norms[0](x)
        kernel, bias = mha.proj.qkv_proj.kernel[...], mha.proj.qkv_proj.bias[...]
        q = (h @ kernel[:, :D] + bias[:D]).reshape(B, M, 2, 4)
        k = (ctx @ kernel[:, D:2 * D] + bias[D:2 * D]).reshape(B, S, 2, 4)
        v = (ctx @ kernel[:, 2 * D:] + bias[2 * D:]).reshape(B, S, 2, 4)
        y = x + mha.out_proj(reference.dot_product_attention(q, k, v).reshape(B, M, D))
        return (out, permuted, masked, len(all_layers), layer(x, ctx),
                y + layer.mlp(layer.mlp_norm(y)))

    out, permuted, masked, num_layers, got, want = run(dec, layer)
    assert out.shape == (B, M, D) and num_layers == 2
    np.testing.assert_allclose(permuted, out[:, perm], atol=1e-5)
    np.testing.assert_allclose(masked, out, atol=1e-5)
    np.testing.assert_allclose(got, want, atol=1e-5)
    with pytest.raises(ValueError, match="contexts"):
        layer(x, [ctx, text])


def test_pair_encoder_bi_is_separate_and_cross_is_joint():
    B, Ta, Tb, D = 2, 4, 3, 8
    enc = PairEncoder(D, num_layers=1, num_heads=2, max_length=16, rngs=nnx.Rngs(0))
    a, b, b2 = normal(0, (B, Ta, D)), normal(1, (B, Tb, D)), normal(2, (B, Tb, D))
    a_pad = jnp.concatenate([a, normal(3, (B, 2, D))], 1)
    a_mask = jnp.arange(Ta + 2)[None].repeat(B, 0) < Ta

    @nnx.jit
    def run(enc):
        h = {mode: [enc.encode(a, bb, mode=mode) for bb in (b, b2)] for mode in ("cross", "bi")}
        h_b_first, _ = enc.encode(b, a, mode="bi")
        scores = {mode: (enc(a, b, mode=mode), enc(a_pad, b, a_mask=a_mask, mode=mode))
                  for mode in ("cross", "bi")}
        return h, h_b_first, scores

    h, h_b_first, scores = run(enc)
    (h_x, seg), (h_x2, _) = h["cross"]
    (h_bi, _), (h_bi2, _) = h["bi"]
    # bi: a's states do not depend on b; cross: they do
    np.testing.assert_allclose(h_bi[:, :Ta], h_bi2[:, :Ta], atol=1e-5)
    assert np.abs(np.asarray(h_x[:, :Ta] - h_x2[:, :Ta])).max() > 1e-3
    # bi: b's states equal b encoded in first place (positions restart per sentence)
    np.testing.assert_allclose(h_bi[:, Ta:], h_b_first[:, :Tb], atol=1e-5)
    # the scores are the heads on those states; padding a under its mask changes nothing
    np.testing.assert_allclose(scores["bi"][0], reference.bi_encoder_score(h_bi, seg),
                               atol=1e-5)
    w, bias = enc.score.kernel[...][:, 0], enc.score.bias[...][0]
    np.testing.assert_allclose(scores["cross"][0], reference.cross_encoder_score(
        h_x, w, bias, segment_ids=seg), atol=1e-5)
    for mode in ("cross", "bi"):
        np.testing.assert_allclose(scores[mode][1], scores[mode][0], atol=1e-5)


def test_token_resampler_keeps_the_distinct_tokens_and_lets_them_read_all():
    """P64 TextMonkey: the kept tokens are the most distinct (a duplicated token loses one
    copy), in position order; the output is LayerNorm(kept + cross attention from the kept
    tokens to every valid token), written out with the layer's own parts."""
    B, S, d = 2, 12, 16
    x = normal(0, (B, S, d))
    x = x.at[:, 7].set(2.0 * x[:, 3])  # token 7 repeats token 3's direction
    mask = jnp.ones((B, S), bool).at[1, 10:].set(False)
    layer = TokenResampler(d, S - 3, num_heads=2, rngs=nnx.Rngs(1))
    out, kept = nnx.jit(lambda m, x, mask: m(x, mask=mask))(layer, x, mask)
    assert out.shape == (B, S - 3, d) and kept.dtype == jnp.int32
    for b in range(B):
        row = kept[b].tolist()
        assert row == sorted(row) and not {3, 7} <= set(row)
    assert not {10, 11} & set(kept[1].tolist())  # invalid tokens are never kept
    queries = jnp.take_along_axis(x, kept[..., None], axis=1)
    want = layer.norm(queries + layer.attn(layer.query_norm(queries), layer.context_norm(x),
                                           context_mask=mask))
    np.testing.assert_allclose(out, want, atol=1e-5)
    # gradients reach the tokens (kept and read) and the attention's weights
    grads = nnx.grad(lambda m, x: m(x)[0].sum(), argnums=(0, 1))(layer, x)
    assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(grads))
    assert float(jnp.abs(grads[1]).sum()) > 0


@pytest.mark.parametrize("shared,masked", [(True, False), (False, True)])
def test_slot_attention_against_reference(shared, masked):
    """P06: slots compete (softmax over the slots), then average what they won; GQA,
    shared or per-example slots, masked inputs; forward and gradients against float64."""
    B, S, M, N, K, H = 2, 9, 3, 4, 2, 8
    z = normal(0, (M, N, H) if shared else (B, M, N, H))
    k, v = normal(1, (B, S, K, H)), normal(2, (B, S, K, 6))
    mask = jnp.arange(S)[None, :] < jnp.array([[S], [5]]) if masked else None
    _, attention = _check(
        lambda z, k, v: slot_attention(z, k, v, mask=mask),
        lambda z, k, v: reference.slot_attention(z, k, v, mask=mask), (z, k, v))
    valid = np.ones((B, S), bool) if mask is None else np.asarray(mask)
    np.testing.assert_allclose(np.asarray(attention).sum(2), np.broadcast_to(
        valid[:, None, :], (B, N, S)).astype(float), atol=1e-6)  # each input splits over slots
    # One slot alone wins every input: its update is the plain mean of the values.
    alone, _ = slot_attention(z[..., :1, :, :], k, v)
    np.testing.assert_allclose(alone[:, 0], jnp.repeat(v, 2, axis=2).mean(1), atol=1e-5)


def test_concept_explanation_loss_against_reference():
    B, N, T, C = 3, 2, 5, 4
    attention = jax.nn.softmax(normal(0, (B, N, T, C)), axis=-1)
    target = jnp.array([[1.0, 0, 1, 0], [0, 0, 0, 0], [0.2, 0.3, 0, 0.5]])
    mask = jnp.arange(T)[None, :] < jnp.array([[5], [2], [3]])
    _check(lambda a, y: concept_explanation_loss(a, y, mask=mask),
           lambda a, y: reference.concept_explanation_loss(a, y, mask=mask), (attention, target))
    # Attention that spends on the annotated concepts exactly what they are worth costs 0.
    wanted = jnp.broadcast_to((target / jnp.maximum(target.sum(1, keepdims=True), 1))[
        :, None, None, :], attention.shape)
    assert float(concept_explanation_loss(wanted, target)) < 1e-12
    with pytest.raises(ValueError, match="target"):
        concept_explanation_loss(attention, target[:, :3])
    with pytest.raises(ValueError, match="non-negative"):
        concept_explanation_loss(attention, target.at[0, 0].set(-1.0))


def test_slot_attention_module_equals_its_rounds_written_out():
    B, S, d, M = 2, 10, 16, 3
    x = normal(3, (B, S, d))
    mask = jnp.arange(S)[None, :] < jnp.array([[S], [6]])
    m = SlotAttention(d, M, num_iterations=2, num_heads=2, rngs=nnx.Rngs(4))
    slots, attention = nnx.jit(lambda m, x, mask: m(x, mask=mask))(m, x, mask)
    k, v = (a.reshape(B, S, 2, d // 2)
            for a in jnp.split(m.kv_proj(m.input_norm(x)), 2, axis=-1))
    z = jnp.broadcast_to(m.slots[...], (B, M, d))
    for _ in range(2):
        q = m.q_proj(m.slot_norm(z)).reshape(B, M, 2, d // 2)
        updates, want_attention = reference.slot_attention(q, k, v, mask=mask)
        z = m.gru(z.reshape(B * M, d), updates.reshape(B * M, d))[0].reshape(B, M, d)
        z = z + m.mlp(m.mlp_norm(z))
    np.testing.assert_allclose(slots, z, atol=2e-5)
    np.testing.assert_allclose(attention, want_attention, atol=2e-6)
    assert np.all(np.asarray(attention)[1, :, :, 6:] == 0)  # masked inputs join no slot
