"""Linear attention: every form against the float64 reference, state carrying, modules."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import normalised_error, to64
from flax import nnx

import jattn
from jattn import linear, reference
from jattn.linear import LinearAttentionState, linear_attention
from jattn.nn import BasedLinearAttention, LinearAttention

FORMS = ["parallel", "recurrent", "chunked"]
# B, T, N, K, H, Hv: GQA (2 query heads per kv head), T = 11 is not a multiple of the chunk.
B, T, N, K, H, HV = 2, 11, 4, 2, 3, 5
CHUNK = 4
DECAY = np.array([0.9, 0.5, 1.0, 0.75])


def _squares(x):
    """A user-supplied feature map: [x, x^2] (size 2H)."""
    return jnp.concatenate([x, x * x], axis=-1)


FEATURE_MAPS = ["identity", "elu+1", "relu", "taylor", _squares]
MODES = {  # name: (is_causal, decay)
    "global": (False, None),
    "causal": (True, None),
    "causal_decay": (True, DECAY),
}
# Every feature map without and with causality (and decay); no decay is the decay-1 path, so
# two maps are enough there. Each case compiles, which is most of this file's time.
CASES = ([(f, m) for f in FEATURE_MAPS for m in ("global", "causal_decay")]
         + [("elu+1", "causal"), ("taylor", "causal")])


def _rand(seed, *shape, dtype=jnp.float32):
    # numpy, not jax.random: each new shape of jax.random.normal costs a ~1 s compile on CPU.
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), dtype)


def _inputs(dtype=jnp.float32, T=T, S=None, seed=0):
    S = T if S is None else S
    return (_rand(seed, B, T, N, H, dtype=dtype), _rand(seed + 1, B, S, K, H, dtype=dtype),
            _rand(seed + 2, B, S, K, HV, dtype=dtype))


def _state(feature_map, dtype=jnp.float32, seed=10):
    """A plausible carried state: the sums over 6 earlier keys (k_sum positive where phi is)."""
    phi = linear.resolve_feature_map(feature_map)
    k, v = _rand(seed, B, 6, N, H, dtype=dtype), _rand(seed + 1, B, 6, N, HV, dtype=dtype)
    pk = phi(k)
    return LinearAttentionState(jnp.einsum("bsnf,bsnv->bnfv", pk, v), pk.sum(1))


# The reference compiled once per option set: eager float64 ops would each compile anew.
_reference_jit = jax.jit(reference.linear_attention, static_argnames=(
    "feature_map", "is_causal", "normalize", "eps", "return_state"))


def _reference(q, k, v, *, decay=None, **kwargs):
    # A numpy decay would be cached as float64 and then fed as float32 (jax.enable_x64).
    decay = None if decay is None else jnp.asarray(decay, q.dtype)
    return _reference_jit(q, k, v, decay=decay, **kwargs)


def _err(got, want):
    return normalised_error(got, want)


@pytest.mark.parametrize("feature_map,mode", CASES, ids=[
    f"{f if isinstance(f, str) else 'callable'}-{m}" for f, m in CASES])
def test_every_form_matches_the_reference(feature_map, mode):
    is_causal, decay = MODES[mode]
    # Identity features give denominators near zero; compare its numerator only.
    normalize = feature_map != "identity"
    with jax.enable_x64(True):
        q, k, v = _inputs(jnp.float64)
        state = _state(feature_map, jnp.float64)
        kwargs = dict(feature_map=feature_map, is_causal=is_causal, decay=decay,
                      normalize=normalize, initial_state=state, return_state=True)
        want, want_state = _reference(q, k, v, **kwargs)
        for form in FORMS:
            got, got_state = linear_attention(q, k, v, form=form, chunk_size=CHUNK, **kwargs)
            assert got.dtype == jnp.float64 and isinstance(got_state, LinearAttentionState)
            assert _err(got, want) < 1e-12, form
            assert _err(got_state.kv, want_state[0]) < 1e-12, form
            assert _err(got_state.k_sum, want_state[1]) < 1e-12, form


def test_float32_defaults_and_unnormalised():
    q, k, v = _inputs()
    with jax.enable_x64(True):
        want = _reference(*to64((q, k, v)))
        want_causal = _reference(*to64((q, k, v)), is_causal=True, normalize=False)
    got = linear_attention(q, k, v)
    assert got.dtype == jnp.float32 and _err(got, want) < 2e-5
    # The default chunk (64) is longer than T: a single, padded-free chunk.
    assert _err(linear_attention(q, k, v, is_causal=True, normalize=False), want_causal) < 2e-5


def test_non_causal_cross_attention_with_other_lengths():
    q, k, v = _inputs(T=7, S=12)
    with jax.enable_x64(True):
        want = _reference(*to64((q, k, v)), feature_map="taylor")
    for form in FORMS:  # one computation for every form
        got = linear_attention(q, k, v, feature_map="taylor", form=form)
        assert got.shape == (B, 7, N, HV)
        assert _err(got, want) < 2e-5


@pytest.mark.parametrize("chunk_size", [1, 3, 64])
def test_chunked_agrees_for_any_chunk_size(chunk_size):
    with jax.enable_x64(True):
        q, k, v = _inputs(jnp.float64)
        kwargs = dict(feature_map="elu+1", is_causal=True, decay=DECAY,
                      initial_state=_state("elu+1", jnp.float64), return_state=True)
        want, want_state = linear_attention(q, k, v, form="parallel", **kwargs)
        got, got_state = linear_attention(q, k, v, form="chunked", chunk_size=chunk_size,
                                          **kwargs)
        assert _err(got, want) < 1e-12
        assert _err(got_state.kv, want_state.kv) < 1e-12
        assert _err(got_state.k_sum, want_state.k_sum) < 1e-12


def test_state_carried_across_calls_equals_one_call():
    with jax.enable_x64(True):
        q, k, v = _inputs(jnp.float64)
        kwargs = dict(feature_map="elu+1", is_causal=True, decay=DECAY, chunk_size=CHUNK,
                      return_state=True)
        whole, whole_state = linear_attention(q, k, v, **kwargs)  # chunked
        first, state = linear_attention(q[:, :5], k[:, :5], v[:, :5], **kwargs)
        second, state = linear_attention(q[:, 5:], k[:, 5:], v[:, 5:], initial_state=state,
                                         **kwargs)
        assert _err(jnp.concatenate([first, second], axis=1), whole) < 1e-12
        assert _err(state.kv, whole_state.kv) < 1e-12
        assert _err(state.k_sum, whole_state.k_sum) < 1e-12
        # Decoding one token with the recurrent form from the state after the first T - 1.
        kwargs["form"] = "recurrent"
        _, state = linear_attention(q[:, :-1], k[:, :-1], v[:, :-1], **kwargs)
        last, _ = linear_attention(q[:, -1:], k[:, -1:], v[:, -1:], initial_state=state,
                                   **kwargs)
        assert _err(last, whole[:, -1:]) < 1e-12


@pytest.mark.parametrize("feature_map,forms", [("taylor", FORMS), ("elu+1", ["chunked"])],
                         ids=["taylor-all-forms", "elu+1-chunked"])
def test_gradients_match_the_reference(feature_map, forms):
    with jax.enable_x64(True):
        q, k, v = _inputs(jnp.float64)
        state = _state(feature_map, jnp.float64)
        ct = _rand(20, B, T, N, HV, dtype=jnp.float64)
        ct_kv = _rand(21, *state.kv.shape, dtype=jnp.float64)

        def loss(fn, q, k, v, decay, kv0, z0, **kw):
            out, (kv, z) = fn(q, k, v, feature_map=feature_map, is_causal=True, decay=decay,
                              initial_state=LinearAttentionState(kv0, z0), return_state=True,
                              **kw)
            return (out * ct).sum() + (kv * ct_kv).sum() + z.sum()

        args = (q, k, v, jnp.asarray(DECAY), state.kv, state.k_sum)
        argnums = tuple(range(6))
        want = jax.jit(jax.grad(functools.partial(loss, reference.linear_attention),
                                argnums))(*args)
        for form in forms:
            got = jax.jit(jax.grad(functools.partial(loss, linear_attention, form=form,
                                                     chunk_size=CHUNK), argnums))(*args)
            for name, g, w in zip(["q", "k", "v", "decay", "kv0", "z0"], got, want,
                                  strict=True):
                assert _err(g, w) < 1e-11, (form, name)


@pytest.mark.parametrize("form", FORMS)
def test_bfloat16_inputs(form):
    q, k, v = _inputs(jnp.bfloat16)
    kwargs = dict(feature_map="taylor", is_causal=True, decay=DECAY, form=form,
                  chunk_size=CHUNK)

    @jax.jit
    def value_and_grad(q):
        out = linear_attention(q, k, v, **kwargs)
        return out, jax.grad(lambda q: linear_attention(q, k, v, **kwargs)
                             .astype(jnp.float32).sum())(q)

    out, g = value_and_grad(q)
    assert out.dtype == jnp.bfloat16 and g.dtype == jnp.bfloat16
    with jax.enable_x64(True):
        kwargs.pop("form"), kwargs.pop("chunk_size")
        want = _reference(*to64((q, k, v)), **kwargs)
    assert _err(out, want) < 3e-2
    assert bool(jnp.isfinite(g.astype(jnp.float32)).all())


def test_jit_and_vmap():
    q, k, v = _inputs()
    qs, ks, vs = (jnp.stack([x, 2 * x, -x]) for x in (q, k, v))
    decay = jnp.asarray(DECAY, jnp.float32)

    @jax.jit
    def batched(qs, ks, vs, decay):  # decay traced: it may be a learned parameter
        fn = functools.partial(linear_attention, feature_map="elu+1", is_causal=True,
                               decay=decay, chunk_size=CHUNK)
        return jax.vmap(fn)(qs, ks, vs)

    got = batched(qs, ks, vs, decay)
    for i in range(3):
        want = linear_attention(qs[i], ks[i], vs[i], feature_map="elu+1", is_causal=True,
                                decay=DECAY, chunk_size=CHUNK)
        assert _err(got[i], want) < 2e-5


@pytest.mark.parametrize("form", FORMS)
def test_causal_output_ignores_the_future(form):
    t = 5
    with jax.enable_x64(True):
        q, k, v = _inputs(jnp.float64)
        q2, k2, v2 = (x.at[:, t + 1:].set(_rand(30 + i, *x[:, t + 1:].shape, dtype=x.dtype))
                      for i, x in enumerate((q, k, v)))
        fn = functools.partial(linear_attention, feature_map="elu+1", is_causal=True,
                               decay=DECAY, form=form, chunk_size=CHUNK)
        y, y2 = fn(q, k, v), fn(q2, k2, v2)
    np.testing.assert_allclose(y[:, :t + 1], y2[:, :t + 1], atol=1e-12)
    assert not np.allclose(y[:, t + 1:], y2[:, t + 1:])


def test_padding_is_nan_free_without_eps():
    # Padded rows have zero features, so 0 / 0 without eps: it must not leak NaN gradients.
    q, k, v = _inputs(T=5)

    @jax.jit
    def grads(q, k, v):
        taylor = functools.partial(linear_attention, feature_map="taylor", is_causal=True,
                                   eps=0.0, form="chunked", chunk_size=CHUNK)
        identity = functools.partial(linear_attention, feature_map="identity",
                                     is_causal=True, normalize=False, chunk_size=CHUNK)
        return [jax.grad(lambda *x, fn=fn: fn(*x).sum(), (0, 1, 2))(q, k, v)
                for fn in (taylor, identity)]

    assert all(bool(jnp.isfinite(g).all()) for g in jax.tree.leaves(grads(q, k, v)))


class _UnhashableRelu:
    __hash__ = None  # a callable that cannot be a static jit argument

    def __call__(self, x):
        return jnp.maximum(x, 0)


def test_unhashable_callable_feature_map():
    q, k, v = _inputs()
    got = linear_attention(q, k, v, feature_map=_UnhashableRelu())
    assert _err(got, linear_attention(q, k, v, feature_map="relu")) < 1e-6


def test_taylor_inner_product():
    x, y = _rand(40, 7, 6), _rand(41, 7, 6)
    px, py = linear.taylor_feature_map(x), linear.taylor_feature_map(y)
    assert px.shape == (7, 1 + 6 + 36) and linear.feature_size("taylor", 8) == 73
    dot = (x * y).sum(-1)
    np.testing.assert_allclose((px * py).sum(-1), 1 + dot / 6 ** 0.5 + dot ** 2 / 12,
                               rtol=1e-5, atol=1e-5)


def _bad_calls():
    q, k, v = _inputs(T=4)
    ok = dict(is_causal=True)
    return [
        ((q[0], k, v), ok, ValueError, "query: expected rank 4"),
        ((q, k[..., :2], v), ok, ValueError, "key: expected"),
        ((q, k, v[:, :3]), ok, ValueError, "value: expected"),
        ((q[:, :, :3], k, v), ok, ValueError, "query heads N=3 must be a multiple"),
        ((q[:, :3], k, v), ok, ValueError, "key: causal linear attention needs S == T"),
        ((q.astype(jnp.int32), k, v), ok, TypeError, "query: expected a floating dtype"),
        ((q, k.astype(jnp.bfloat16), v), ok, TypeError, "query, key, value: expected one"),
        ((q, k, v), dict(feature_map="performer"), ValueError,
         "feature_map: expected one of identity, elu\\+1, relu, taylor"),
        ((q, k, v), dict(feature_map=3), TypeError, "feature_map: expected a name"),
        ((q, k, v), dict(feature_map=lambda x: x.sum(-1)), ValueError, "feature_map: must"),
        ((q, k, v), dict(form="fast"), ValueError, "form: expected one of"),
        ((q, k, v), dict(chunk_size=0), ValueError, "chunk_size: expected a positive int"),
        ((q, k, v), dict(eps=-1.0), ValueError, "eps: expected >= 0"),
        ((q, k, v), dict(decay=DECAY), ValueError, "decay: only defined for causal"),
        ((q, k, v), dict(ok, decay=DECAY[:3]), ValueError, "decay: expected shape \\(4,\\)"),
        ((q, k, v), dict(ok, decay=np.array([0.5, 0.0, 1.0, 0.5])), ValueError,
         "decay: expected values in \\(0, 1\\]"),
        ((q, k, v), dict(ok, decay=np.array([1, 1, 1, 1])), TypeError, "decay: expected a fl"),
        ((q, k, v), dict(ok, initial_state=LinearAttentionState.zeros(B, N, H + 1, HV)),
         ValueError, "initial_state.kv: expected shape"),
        ((q, k, v), dict(ok, initial_state=jnp.zeros((B, N, H, HV))), TypeError,
         "initial_state: expected a LinearAttentionState"),
    ]


@pytest.mark.parametrize("case", range(len(_bad_calls())))
def test_bad_input_names_the_argument(case):
    args, kwargs, error, match = _bad_calls()[case]
    with pytest.raises(error, match=match):
        linear_attention(*args, **kwargs)


def _assert_causal_module(module, d_model, t=5):
    x = _rand(50, B, T, d_model)
    x2 = x.at[:, t + 1:].set(_rand(51, B, T - t - 1, d_model))
    y, y2 = module(x), module(x2)
    np.testing.assert_allclose(y[:, :t + 1], y2[:, :t + 1], atol=1e-5)
    assert not np.allclose(y[:, t + 1:], y2[:, t + 1:])


# One width for every module, so that parameter initialisers compile once per shape.
D_MODEL = 8


def test_linear_attention_module_is_the_functional_call():
    layer = LinearAttention(D_MODEL, num_heads=4, num_kv_heads=2, decay=DECAY,
                            chunk_size=CHUNK, rngs=nnx.Rngs(0))
    x = _rand(52, B, T, D_MODEL)

    def proj(lin, heads):
        return (x @ lin.kernel[...] + lin.bias[...]).reshape(B, T, heads, -1)

    out = linear_attention(proj(layer.q_proj, 4), proj(layer.k_proj, 2), proj(layer.v_proj, 2),
                           feature_map="elu+1", is_causal=True, decay=DECAY, chunk_size=CHUNK)
    want = out.reshape(B, T, D_MODEL) @ layer.out_proj.kernel[...] + layer.out_proj.bias[...]
    np.testing.assert_allclose(layer(x), want, atol=1e-5)
    _assert_causal_module(layer, D_MODEL)
    # Streaming through the module: two calls with the state equal one call.
    y1, state = layer(x[:, :5], return_state=True)
    y2 = layer(x[:, 5:], initial_state=state)
    np.testing.assert_allclose(jnp.concatenate([y1, y2], 1), layer(x), atol=1e-5)


def test_based_module_is_the_functional_call():
    layer = BasedLinearAttention(D_MODEL, feature_dim=4, num_heads=2, chunk_size=CHUNK,
                                 rngs=nnx.Rngs(1))
    assert layer.q_proj.kernel.shape == layer.k_proj.kernel.shape == (D_MODEL, 2 * 4)
    assert layer.v_proj.kernel.shape == layer.out_proj.kernel.shape == (D_MODEL, D_MODEL)
    assert layer.q_proj.bias is None and layer.out_proj.bias is None  # bias=False as in Based
    bound = 1 / D_MODEL ** 0.5  # torch.nn.Linear's default init
    assert float(jnp.abs(layer.v_proj.kernel[...]).max()) <= bound
    x = _rand(53, B, T, D_MODEL)
    q, k, v = ((x @ p.kernel[...]).reshape(B, T, 2, -1)
               for p in (layer.q_proj, layer.k_proj, layer.v_proj))
    out = linear_attention(q, k, v, feature_map="taylor", is_causal=True, eps=1e-12,
                           chunk_size=CHUNK)
    np.testing.assert_allclose(layer(x), out.reshape(B, T, D_MODEL) @ layer.out_proj.kernel,
                               atol=1e-5)
    with jax.enable_x64(True):  # and the reference, the quadratic form of the original
        want = _reference(*to64((q, k, v)), feature_map="taylor", is_causal=True, eps=1e-12)
    assert _err(out, want) < 2e-5
    _assert_causal_module(layer, D_MODEL)
    default = BasedLinearAttention(D_MODEL, rngs=nnx.Rngs(2))
    _, state = default(x, return_state=True)
    assert state.kv.shape == (B, 1, 73, D_MODEL)  # feature_dim 8: 1 + 8 + 64 features


def test_module_arguments_are_checked():
    with pytest.raises(ValueError, match="num_heads"):
        LinearAttention(10, num_heads=3, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="num_kv_heads"):
        BasedLinearAttention(12, num_heads=4, num_kv_heads=3, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="feature_dim"):
        BasedLinearAttention(12, feature_dim=0, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="x: expected rank 3"):
        LinearAttention(8, rngs=nnx.Rngs(0))(jnp.ones((2, 8)))


def test_public_exports():
    assert jattn.linear_attention is linear_attention
    assert jattn.LinearAttentionState is LinearAttentionState
