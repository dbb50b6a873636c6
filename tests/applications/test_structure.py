"""Structure-aware scores (P12, P14, P29): graph attention with an edge-type bias,
relation-aware attention, box-relative attention and box pair features against the dense
references (forward and gradients in float32 against float64, bfloat16 forward), their
properties (a complete graph without types is plain attention, an isolated node gives zeros
and finite gradients, a bias constant over the keys changes nothing, box features invariant
to translating and scaling the scene), jit and vmap, error messages, and the NNX modules
against the functional calls."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jattn
from jattn import reference
from jattn.applications.structure import (
    box_pair_features,
    box_relative_attention,
    edge_type_bias,
    graph_attention,
    relation_aware_attention,
    relation_bias,
)
from jattn.nn.applications.structure import (
    BoxRelativeAttention,
    GraphAttention,
    RelationAwareAttention,
)
from tests.conftest import check_against_reference, normal

_attention = jax.jit(jattn.dot_product_attention, static_argnames="is_causal")


def _qkv(B=2, T=6, S=6, N=4, K=2, H=8, Hv=6, seed=0):
    return (normal(seed, (B, T, N, H)), normal(seed + 1, (B, S, K, H)),
            normal(seed + 2, (B, S, K, Hv)))


def _bool(seed, shape, p=0.4):
    return jnp.asarray(np.random.default_rng(seed).random(shape) < p)


def _ints(seed, shape, high):
    return jnp.asarray(np.random.default_rng(seed).integers(0, high, shape), jnp.int32)


def _boxes(seed, shape):
    rng = np.random.default_rng(seed)
    xy = rng.uniform(0, 10, (*shape, 2))
    wh = rng.uniform(0.5, 3, (*shape, 2))
    return jnp.asarray(np.concatenate([xy, xy + wh], -1), jnp.float32)


# --------------------------------------------------------------------------------------------
# P12 graph attention


def test_edge_type_bias_by_hand():
    types = jnp.array([[[0, 2], [1, 0]]])
    table = jnp.array([[0.0, 1.0], [2.0, 3.0], [4.0, 5.0]])
    bias = edge_type_bias(types, table)
    assert bias.shape == (1, 2, 2, 2)
    np.testing.assert_array_equal(bias[0, 0], [[0.0, 4.0], [2.0, 0.0]])
    np.testing.assert_array_equal(bias[0, 1], [[1.0, 5.0], [3.0, 1.0]])


@pytest.mark.parametrize("batched,is_causal,self_loops,T", [(True, False, True, 6),
                                                             (False, True, True, 6),
                                                             (True, False, False, 4)])
def test_graph_attention_matches_reference(batched, is_causal, self_loops, T):
    S = 6
    q, k, v = _qkv(T=T, S=S)
    adj = _bool(3, (2, T, S) if batched else (T, S))
    types = _ints(4, adj.shape, 3)
    options = dict(edge_types=types, self_loops=self_loops, is_causal=is_causal)
    fn = functools.partial(graph_attention, adjacency=adj, **options)
    ref = functools.partial(reference.graph_attention, adjacency=adj, **options)

    def call(impl):
        return lambda q, k, v, table: impl(q, k, v, edge_type_table=table)
    table = normal(5, (3, 4))
    out = check_against_reference(call(fn), call(ref), (q, k, v, table))
    assert out.shape == (2, T, 4, 6)
    if batched and self_loops:
        check_against_reference(call(fn), call(ref), (q, k, v, table), jnp.bfloat16, grad=False)


def test_complete_graph_without_types_is_plain_attention():
    q, k, v = _qkv()
    got = jax.jit(graph_attention)(q, k, v, jnp.ones((6, 6), bool))
    np.testing.assert_allclose(got, _attention(q, k, v), rtol=1e-5, atol=1e-6)


def test_isolated_node_gives_zeros_and_finite_gradients():
    q, k, v = _qkv()
    adj = jnp.ones((6, 6), bool).at[2].set(False)

    def loss(q, k, v):
        return graph_attention(q, k, v, adj, self_loops=False).sum()
    out = jax.jit(functools.partial(graph_attention, self_loops=False))(q, k, v, adj)
    np.testing.assert_array_equal(out[:, 2], 0)
    for g in jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v):
        assert np.isfinite(np.asarray(g)).all()


# --------------------------------------------------------------------------------------------
# P14 relation-aware attention


@pytest.mark.parametrize("is_causal,T,with_mask", [(False, 6, True), (True, 4, False)])
def test_relation_aware_matches_reference(is_causal, T, with_mask):
    q, k, v = _qkv(T=T, S=6)
    pairwise = normal(6, (2, T, 6, 5))
    mask = _bool(7, (2, 1, T, 6), 0.8) if with_mask else None

    def call(impl):
        def run(q, k, v, pairwise, weight, bias):
            return impl(q, k, v, pairwise, weight, bias, mask=mask, is_causal=is_causal)
        return run
    args = (q, k, v, pairwise, normal(8, (5, 4)), normal(9, (4,)))
    fn, ref = call(relation_aware_attention), call(reference.relation_aware_attention)
    check_against_reference(fn, ref, args)
    if with_mask:
        check_against_reference(fn, ref, args, jnp.bfloat16, grad=False)


def test_bias_constant_over_keys_changes_nothing():
    q, k, v = _qkv()
    pairwise = jnp.broadcast_to(normal(6, (2, 6, 1, 3)), (2, 6, 6, 3))
    got = jax.jit(relation_aware_attention)(q, k, v, pairwise, normal(8, (3, 4)),
                                            normal(9, (4,)))
    np.testing.assert_allclose(got, _attention(q, k, v), rtol=1e-5, atol=1e-5)


def test_relation_bias_is_the_projection():
    pairwise, weight, bias = normal(0, (1, 2, 3, 4)), normal(1, (4, 2)), normal(2, (2,))
    got = relation_bias(pairwise, weight, bias)
    want = np.einsum("btsf,fn->bnts", pairwise, weight) + np.asarray(bias)[:, None, None]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------------------------
# P29 box-relative attention


@pytest.mark.parametrize("kind,embed_dim", [("signed", None), ("log_abs", None),
                                            ("signed", 16)])
def test_box_pair_features_match_reference(kind, embed_dim):
    qb, kb = _boxes(0, (2, 3)), _boxes(1, (2, 4))
    fn = functools.partial(box_pair_features, kind=kind, embed_dim=embed_dim)
    ref = functools.partial(reference.box_pair_features, kind=kind, embed_dim=embed_dim)
    # The sinusoids of 100 * feature reach ~1000 rad, where float32 keeps ~1e-4 absolute:
    # the embedded features are checked in float64.
    dtype = jnp.float32 if embed_dim is None else jnp.float64
    out = check_against_reference(fn, ref, (qb, kb), dtype)
    assert out.shape == (2, 3, 4, 4 if embed_dim is None else embed_dim)


@pytest.mark.parametrize("kind", ["signed", "log_abs"])
def test_box_features_invariant_to_translation_and_scale(kind):
    qb, kb = _boxes(0, (1, 3)), _boxes(1, (1, 4))
    f = jax.jit(functools.partial(box_pair_features, kind=kind))
    base = f(qb, kb)
    shift = jnp.array([3.0, -2.0, 3.0, -2.0])
    np.testing.assert_allclose(f(qb + shift, kb + shift), base, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(f(2.5 * qb, 2.5 * kb), base, rtol=1e-4, atol=1e-4)
    centre = jnp.concatenate([(qb[..., :2] + qb[..., 2:]) / 2, qb[..., 2:] - qb[..., :2]], -1)
    k_centre = jnp.concatenate([(kb[..., :2] + kb[..., 2:]) / 2, kb[..., 2:] - kb[..., :2]], -1)
    np.testing.assert_allclose(box_pair_features(centre, k_centre, box_format="cxcywh",
                                                 kind=kind), base, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("is_causal,T,embed_dim", [(False, 5, None), (True, 4, 8)])
def test_box_relative_attention_matches_reference(is_causal, T, embed_dim):
    q, k, v = _qkv(T=T, S=5)
    qb, kb = _boxes(0, (2, T)), _boxes(1, (2, 5))

    def call(impl):
        def run(q, k, v, qb, kb, weight, bias):
            return impl(q, k, v, qb, kb, weight, bias, embed_dim=embed_dim,
                        is_causal=is_causal)
        return run
    weight = 0.3 * normal(8, (4 if embed_dim is None else embed_dim, 4))
    check_against_reference(call(box_relative_attention), call(reference.box_relative_attention),
           (q, k, v, qb, kb, weight, normal(9, (4,))),
           jnp.float32 if embed_dim is None else jnp.float64)


# --------------------------------------------------------------------------------------------
# jit, vmap


def test_vmap():
    q, k, v = _qkv()
    adj = _bool(3, (2, 6, 6))
    batched = [jnp.stack([x, -x]) for x in (q, k, v)]
    got = jax.jit(jax.vmap(graph_attention, in_axes=(0, 0, 0, None)))(*batched, adj)
    f = jax.jit(graph_attention)
    for i in range(2):
        np.testing.assert_allclose(got[i], f(*(x[i] for x in batched), adj), rtol=1e-5,
                                   atol=1e-6)


# --------------------------------------------------------------------------------------------
# errors


def test_errors_name_the_argument():
    q, k, v = _qkv()
    with pytest.raises(TypeError, match="adjacency"):
        graph_attention(q, k, v, jnp.ones((6, 6)))
    with pytest.raises(ValueError, match="adjacency"):
        graph_attention(q, k, v, jnp.ones((5, 6), bool))
    with pytest.raises(ValueError, match="self_loops"):
        graph_attention(q[:, :4], k, v, jnp.ones((4, 6), bool))
    with pytest.raises(ValueError, match="edge_types, edge_type_table"):
        graph_attention(q, k, v, jnp.ones((6, 6), bool), edge_types=jnp.zeros((6, 6), int))
    with pytest.raises(ValueError, match="edge_types"):
        graph_attention(q, k, v, jnp.ones((6, 6), bool), edge_types=jnp.full((6, 6), 3),
                        edge_type_table=jnp.zeros((3, 4)))
    with pytest.raises(TypeError, match="edge_types"):
        edge_type_bias(jnp.zeros((6, 6)), jnp.zeros((3, 4)))
    with pytest.raises(ValueError, match="pairwise"):
        relation_aware_attention(q, k, v, jnp.ones((2, 6, 5, 3)), jnp.ones((3, 4)))
    with pytest.raises(ValueError, match="weight"):
        relation_aware_attention(q, k, v, jnp.ones((2, 6, 6, 3)), jnp.ones((3, 2)))
    with pytest.raises(ValueError, match="weight"):
        relation_bias(jnp.ones((2, 6, 6, 3)), jnp.ones((4, 4)))
    with pytest.raises(ValueError, match="bias"):
        relation_bias(jnp.ones((2, 6, 6, 3)), jnp.ones((3, 4)), jnp.ones((3,)))
    boxes = _boxes(0, (2, 6))
    with pytest.raises(ValueError, match="box_format"):
        box_pair_features(boxes, boxes, box_format="xywh")
    with pytest.raises(ValueError, match="kind"):
        box_pair_features(boxes, boxes, kind="abs")
    with pytest.raises(ValueError, match="embed_dim"):
        box_pair_features(boxes, boxes, embed_dim=12)
    with pytest.raises(ValueError, match="query_boxes"):
        box_pair_features(boxes[..., :3], boxes)
    with pytest.raises(ValueError, match="key_boxes"):
        box_relative_attention(q, k, v, boxes, boxes[:, :5], jnp.ones((4, 4)))


# --------------------------------------------------------------------------------------------
# modules


def _merge(x):
    return x.reshape(*x.shape[:-2], -1)


def _build(cls, *args, seed=0, **options):
    """The module with random values in every parameter (the zero-initialised bias tables
    included), built abstractly: no initialiser runs."""
    abstract = nnx.eval_shape(lambda: cls(*args, rngs=nnx.Rngs(0), **options))
    graph, params, rest = nnx.split(abstract, nnx.Param, ...)
    leaves, treedef = jax.tree_util.tree_flatten(params)
    leaves = [0.5 * normal(seed + i, x.shape, x.dtype) for i, x in enumerate(leaves)]
    return nnx.merge(graph, jax.tree_util.tree_unflatten(treedef, leaves), rest)


def test_graph_module_equals_functional():
    layer = _build(GraphAttention, 8, 2, num_edge_types=3, is_causal=True)
    x, adj, types = normal(1, (2, 5, 8)), _bool(2, (2, 5, 5)), _ints(3, (2, 5, 5), 3)

    def both(layer, x, adj, types):
        q, k, v = layer.proj(x)
        want = graph_attention(q, k, v, adj, edge_types=types,
                               edge_type_table=layer.edge_type_table[...], is_causal=True)
        return layer(x, adj, edge_types=types), layer.out_proj(_merge(want))
    got, want = nnx.jit(both)(layer, x, adj, types)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="edge_types"):
        layer(x, adj)


def test_relation_module_equals_functional():
    layer = _build(RelationAwareAttention, 8, 2, pairwise_dim=3)
    x, ctx = normal(1, (2, 4, 8)), normal(2, (2, 5, 8))
    pairwise, cm = normal(3, (2, 4, 5, 3)), _bool(4, (2, 5), 0.8)

    def both(layer, x, ctx, pairwise, cm):
        q, k, v = layer.proj(x, ctx)
        want = relation_aware_attention(q, k, v, pairwise, layer.bias.relation_weight[...],
                                        layer.bias.relation_bias[...],
                                        mask=cm[:, None, None, :])
        return layer(x, pairwise, context=ctx, context_mask=cm), layer.out_proj(_merge(want))
    got, want = nnx.jit(both)(layer, x, ctx, pairwise, cm)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_box_module_equals_functional():
    layer = _build(BoxRelativeAttention, 8, 2, kind="log_abs", embed_dim=8)
    x, boxes = normal(1, (2, 4, 8)), _boxes(2, (2, 4))

    def both(layer, x, boxes):
        q, k, v = layer.proj(x)
        want = box_relative_attention(q, k, v, boxes, boxes, layer.bias.relation_weight[...],
                                      layer.bias.relation_bias[...], kind="log_abs",
                                      embed_dim=8)
        return layer(x, boxes), layer.out_proj(_merge(want))
    got, want = nnx.jit(both)(layer, x, boxes)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
