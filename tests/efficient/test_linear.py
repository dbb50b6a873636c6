"""Linear attention: every form against the float64 reference, state carrying, modules."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jattn
from jattn import reference
from jattn.efficient import linear
from jattn.efficient.linear import LinearAttentionState, linear_attention
from jattn.nn import BasedLinearAttention, LinearAttention
from tests.conftest import normalised_error, to64

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
        ((q[:, :3], k, v), ok, NotImplementedError,
         "key: causal linear attention needs S == T"),
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


# ---- Parametric feature maps: FAVOR+ (Performer) and cosFormer -------------------------------

FAVOR_RNG = jax.random.key(7)
NUM_FEATURES = 8  # H = 3: blocks of 3 orthogonal rows, the last one cut
PREFIX = 6  # tokens before the call, for the carried state
MAX_LENGTH = 20  # cosFormer's M, >= PREFIX + T


@functools.partial(jax.jit, static_argnames=("is_causal", "normalize", "eps", "return_state"))
def _favor_reference(q, k, v, w, decay, initial_state, **kwargs):
    phi = functools.partial(reference.favor_features, projection=w)
    return reference.linear_attention(q, k, v, feature_map=phi, decay=decay,
                                      initial_state=initial_state, **kwargs)


_cos_reference = jax.jit(reference.cosformer_attention, static_argnames=(
    "max_length", "is_causal", "normalize", "eps"))


def _cos_state(k, v, decay, max_length, is_causal):
    """The state after keys at positions 0..L-1 (k [B, L, K, H], v [B, L, K, Hv]) from the
    definition: sum_s gamma^(L-1-s) [relu(k_s) cos(pi s / 2M), relu(k_s) sin(pi s / 2M)] v_s,
    repeated over the query heads of each kv head."""
    L = k.shape[1]
    angle = np.pi / 2 * np.arange(L) / max_length
    r = np.maximum(np.asarray(k, np.float64), 0)
    feats = np.concatenate([r * np.cos(angle)[None, :, None, None],
                            r * np.sin(angle)[None, :, None, None]], -1)  # [B, L, K, 2H]
    feats = np.repeat(feats, N // K, axis=2)
    gamma = np.ones(N) if decay is None or not is_causal else np.asarray(decay)
    w = gamma[None, :] ** (L - 1 - np.arange(L))[:, None]  # [L, N]
    kv = np.einsum("bsnf,sn,bsnv->bnfv", feats, w, np.repeat(np.asarray(v), N // K, axis=2))
    return LinearAttentionState(jnp.asarray(kv), jnp.asarray(np.einsum("bsnf,sn->bnf", feats,
                                                                       w)))


PARAMETRIC_CASES = [("favor+", m) for m in MODES] + [("favor+-unnormalised", "causal_decay")] + [
    ("cosformer", m) for m in MODES]


@pytest.mark.parametrize("feature_map,mode", PARAMETRIC_CASES,
                         ids=[f"{f}-{m}" for f, m in PARAMETRIC_CASES])
def test_parametric_maps_every_form_matches_the_reference(feature_map, mode):
    is_causal, decay = MODES[mode]
    with jax.enable_x64(True):
        q, k, v = _inputs(jnp.float64)
        decay = None if decay is None else jnp.asarray(decay)
        if feature_map.startswith("favor+"):
            normalize = feature_map == "favor+"
            w = linear.favor_projection(FAVOR_RNG, NUM_FEATURES, H, jnp.float64)
            kp, vp = _rand(10, B, PREFIX, N, H, dtype=jnp.float64), _rand(
                11, B, PREFIX, N, HV, dtype=jnp.float64)
            pk = reference.favor_features(kp, w)
            state = LinearAttentionState(jnp.einsum("bsnf,bsnv->bnfv", pk, vp), pk.sum(1))
            # eps = 0: the plain definition (eps > 0 acts on the stabilised scale).
            want, want_state = _favor_reference(q, k, v, w, decay, state, is_causal=is_causal,
                                                normalize=normalize, eps=0.0,
                                                return_state=True)
            kwargs = dict(feature_map="favor+", rng=FAVOR_RNG, num_features=NUM_FEATURES,
                          normalize=normalize, eps=0.0)
        else:
            kp, vp = _rand(10, B, PREFIX, K, H, dtype=jnp.float64), _rand(
                11, B, PREFIX, K, HV, dtype=jnp.float64)
            state = _cos_state(kp, vp, decay, MAX_LENGTH, is_causal)
            k_all, v_all = jnp.concatenate([kp, k], 1), jnp.concatenate([vp, v], 1)
            want = _cos_reference(q, k_all, v_all, query_positions=PREFIX + jnp.arange(T),
                                  key_positions=jnp.arange(PREFIX + T), max_length=MAX_LENGTH,
                                  is_causal=is_causal, decay=decay)
            want_state = _cos_state(k_all, v_all, decay, MAX_LENGTH, is_causal)
            kwargs = dict(feature_map="cosformer", max_length=MAX_LENGTH, offset=PREFIX)
        for form in FORMS:
            got, got_state = linear_attention(q, k, v, form=form, chunk_size=CHUNK,
                                              is_causal=is_causal, decay=decay,
                                              initial_state=state, return_state=True, **kwargs)
            assert got.dtype == jnp.float64
            assert _err(got, want) < 1e-12, form
            assert _err(got_state.kv, want_state[0]) < 1e-12, form
            assert _err(got_state.k_sum, want_state[1]) < 1e-12, form


def test_cosformer_cross_attention_and_default_length():
    q, k, v = _inputs(T=7, S=12)
    with jax.enable_x64(True):  # M defaults to max(T, S) = 12
        want = _cos_reference(*to64((q, k, v)), query_positions=jnp.arange(7),
                              key_positions=jnp.arange(12), max_length=12)
    assert _err(linear_attention(q, k, v, feature_map="cosformer"), want) < 2e-5
    # The cos weight really is there: plain relu features give another answer.
    assert _err(linear_attention(q, k, v, feature_map="relu"), want) > 1e-3


@pytest.mark.parametrize("feature_map", ["favor+", "cosformer"])
def test_parametric_maps_gradients_match_the_reference(feature_map):
    with jax.enable_x64(True):
        q, k, v = _inputs(jnp.float64)
        ct = _rand(20, B, T, N, HV, dtype=jnp.float64)
        if feature_map == "favor+":
            w = linear.favor_projection(FAVOR_RNG, NUM_FEATURES, H, jnp.float64)

            def want_fn(q, k, v, decay):
                return _favor_reference(q, k, v, w, decay, None, is_causal=True,
                                        normalize=True, eps=0.0, return_state=False)
            kwargs = dict(feature_map="favor+", rng=FAVOR_RNG, num_features=NUM_FEATURES,
                          eps=0.0)
        else:
            def want_fn(q, k, v, decay):
                return reference.cosformer_attention(
                    q, k, v, query_positions=3 + jnp.arange(T), key_positions=3 + jnp.arange(T),
                    max_length=MAX_LENGTH, is_causal=True, decay=decay)
            kwargs = dict(feature_map="cosformer", max_length=MAX_LENGTH, offset=3)

        def loss(fn, *args):
            return (fn(*args) * ct).sum()

        args = (q, k, v, jnp.asarray(DECAY))
        want = jax.jit(jax.grad(functools.partial(loss, want_fn), (0, 1, 2, 3)))(*args)
        for form in ["chunked"]:  # the forward test checks that every form agrees
            def got_fn(q, k, v, decay, form=form):
                return linear_attention(q, k, v, is_causal=True, decay=decay, form=form,
                                        chunk_size=CHUNK, **kwargs)
            got = jax.jit(jax.grad(functools.partial(loss, got_fn), (0, 1, 2, 3)))(*args)
            for name, g, wnt in zip("qkvd", got, want, strict=True):
                assert _err(g, wnt) < 1e-11, (form, name)


@pytest.mark.parametrize("feature_map", ["favor+", "cosformer"])
def test_parametric_maps_bfloat16(feature_map):
    q, k, v = _inputs(jnp.bfloat16)
    extra = (dict(rng=FAVOR_RNG, num_features=NUM_FEATURES, eps=0.0) if feature_map == "favor+"
             else {})
    out = linear_attention(q, k, v, feature_map=feature_map, is_causal=True, decay=DECAY,
                           chunk_size=CHUNK, **extra)
    assert out.dtype == jnp.bfloat16
    with jax.enable_x64(True):
        q64, k64, v64 = to64((q, k, v))
        decay = jnp.asarray(DECAY)
        if feature_map == "favor+":  # the float32 features the computation draws
            w = linear.favor_projection(FAVOR_RNG, NUM_FEATURES, H).astype(jnp.float64)
            want = _favor_reference(q64, k64, v64, w, decay, None, is_causal=True,
                                    normalize=True, eps=0.0, return_state=False)
        else:
            want = _cos_reference(q64, k64, v64, query_positions=jnp.arange(T),
                                  key_positions=jnp.arange(T), max_length=T, is_causal=True,
                                  decay=decay)
    assert _err(out, want) < 3e-2


def test_favor_is_unbiased_and_its_error_shrinks_with_m():
    h = 4
    x = _rand(60, 2, h) * 0.7
    q, k = x[0], x[1]
    target = float(jnp.exp(q @ k / h ** 0.5))
    keys = jax.random.split(jax.random.key(1), 2000)

    @jax.jit
    def products(keys):  # per key, the 32 products phi_f(q) phi_f(k) times 32
        def one(key):
            w = linear.favor_projection(key, 32, h)
            return linear.favor_features(q, w) * linear.favor_features(k, w) * 32
        return jax.vmap(one)(keys)

    # The first m rows of a projection are a projection with m rows (same blocks): one draw
    # gives the estimates of every m.
    prods = np.asarray(products(keys), np.float64)
    errors = {}
    for m in (2, 8, 32):
        est = prods[:, :m].mean(-1)  # one estimate of exp(q.k / sqrt(h)) per key
        assert (est > 0).all()  # positive features: never a negative attention weight
        # Unbiased: the mean over 2000 draws is within 4 standard errors of the target.
        assert abs(est.mean() - target) < 4 * est.std() / np.sqrt(len(est)), m
        errors[m] = np.sqrt(np.mean((est - target) ** 2)) / target
    # The relative error of one draw shrinks like 1 / sqrt(m): 4x the features, half the error.
    assert errors[8] < 0.7 * errors[2] and errors[32] < 0.7 * errors[8], errors


def test_favor_rows_are_orthogonal_blocks_with_chi_norms():
    h, m = 4, 10
    w = np.asarray(linear.favor_projection(jax.random.key(3), m, h), np.float64)
    assert w.shape == (m, h)
    for start in range(0, m, h):  # within a block: orthogonal rows
        block = w[start:start + h]
        gram = block @ block.T
        np.testing.assert_allclose(gram - np.diag(np.diag(gram)), 0, atol=1e-5)
    assert abs(w[0] @ w[h]) > 1e-3  # rows of different blocks are independent, not orthogonal
    # Norms are chi(h): |w|^2 has mean h and variance 2h (not unit rows).
    many = np.asarray(linear.favor_projection(jax.random.key(4), 4000, h), np.float64)
    sq = (many ** 2).sum(-1)
    assert abs(sq.mean() - h) < 0.2 and abs(sq.var() - 2 * h) < 1.0
    assert linear.default_num_features(64) == 267 and linear.feature_size("favor+", 3) == 4


def test_favor_stabilised_for_large_queries_and_eps_convention():
    q, k, v = _inputs()
    big = q * 10  # plain float32 features of many of these queries underflow to 0
    w32 = linear.favor_projection(FAVOR_RNG, NUM_FEATURES, H)
    assert float((reference.favor_features(big, w32).max(-1) == 0).mean()) > 0.2
    got = {eps: linear_attention(big, k, v, feature_map="favor+", rng=FAVOR_RNG,
                                 num_features=NUM_FEATURES, is_causal=True, chunk_size=CHUNK,
                                 eps=eps) for eps in (0.0, 1e-6)}
    with jax.enable_x64(True):
        big64, k64, v64 = to64((big, k, v))
        want = _favor_reference(big64, k64, v64, w32.astype(jnp.float64), None, None,
                                is_causal=True, normalize=True, eps=0.0, return_state=False)
        assert _err(got[0.0], want) < 1e-4
        assert _err(got[1e-6], want) < 1e-3  # the default eps does not swamp these queries
        # eps acts on each query's stabilised scale: num / (den + eps c_q), with
        # c_q = exp(max_f (W q')_f - |q'|^2 / 2) (non-causal).
        eps = 0.05
        q64 = to64(q)
        got = linear_attention(q64, k64, v64, feature_map="favor+", rng=FAVOR_RNG,
                               num_features=NUM_FEATURES, eps=eps)
        w = linear.favor_projection(FAVOR_RNG, NUM_FEATURES, H, jnp.float64)
        pq = reference.favor_features(q64, w)
        pk = reference.favor_features(jnp.repeat(k64, N // K, 2), w)
        qs = q64 / H ** 0.25
        c = jnp.exp((qs @ w.T).max(-1) - 0.5 * (qs ** 2).sum(-1))
        scores = jnp.einsum("btnf,bsnf->bnts", pq, pk)
        num = jnp.einsum("bnts,bsnv->btnv", scores, jnp.repeat(v64, N // K, 2))
        den = jnp.einsum("bnts->btn", scores)
        assert _err(got, num / (den + eps * c)[..., None]) < 1e-12
        assert _err(got, num / (den + eps)[..., None]) > 1e-4  # not the plain eps


@pytest.mark.parametrize("feature_map", ["favor+", "cosformer"])
def test_parametric_maps_state_carried_across_calls(feature_map):
    extra = (dict(rng=FAVOR_RNG, num_features=NUM_FEATURES) if feature_map == "favor+"
             else dict(max_length=T))
    with jax.enable_x64(True):
        q, k, v = _inputs(jnp.float64)
        kwargs = dict(feature_map=feature_map, is_causal=True, decay=DECAY, chunk_size=CHUNK,
                      return_state=True, **extra)
        whole, whole_state = linear_attention(q, k, v, **kwargs)
        first, state = linear_attention(q[:, :5], k[:, :5], v[:, :5], **kwargs)
        second, state = linear_attention(q[:, 5:], k[:, 5:], v[:, 5:], initial_state=state,
                                         offset=5, **kwargs)
        assert _err(jnp.concatenate([first, second], axis=1), whole) < 1e-12
        assert _err(state.kv, whole_state.kv) < 1e-12

    # Decoding token by token under jit, the position (offset) traced.
    kwargs.update(form="recurrent")
    q, k, v = _inputs()
    whole = linear_attention(q, k, v, **kwargs)[0]

    @jax.jit
    def decode(state, t):
        pick = functools.partial(lax_slice, t=t)
        return linear_attention(pick(q), pick(k), pick(v), initial_state=state, offset=t,
                                **kwargs)

    state = LinearAttentionState.zeros(B, N, linear.feature_size(
        feature_map, H, num_features=extra.get("num_features")), HV)
    outs = []
    for t in range(T):
        out, state = decode(state, jnp.asarray(t))
        outs.append(out)
    assert _err(jnp.concatenate(outs, 1), whole) < 2e-5


def lax_slice(x, t):
    return jax.lax.dynamic_slice_in_dim(x, t, 1, axis=1)


def test_favor_under_jit_and_vmap_with_a_traced_key():
    q, k, v = _inputs()
    qs, ks, vs = (jnp.stack([x, 2 * x, -x]) for x in (q, k, v))

    @jax.jit
    def batched(qs, ks, vs, key):
        fn = functools.partial(linear_attention, feature_map="favor+", rng=key, is_causal=True,
                               chunk_size=CHUNK)
        return jax.vmap(fn)(qs, ks, vs)

    got = batched(qs, ks, vs, FAVOR_RNG)
    for i in range(3):
        want = linear_attention(qs[i], ks[i], vs[i], feature_map="favor+", rng=FAVOR_RNG,
                                is_causal=True, chunk_size=CHUNK)
        assert _err(got[i], want) < 2e-5
    other = linear_attention(q, k, v, feature_map="favor+", rng=jax.random.key(8),
                             is_causal=True, chunk_size=CHUNK)
    assert _err(other, got[0]) > 1e-4  # another key, other features


def _bad_parametric_calls():
    q, k, v = _inputs(T=4)
    state = LinearAttentionState.zeros(B, N, 2 * H, HV)
    return [
        (dict(feature_map="favor+"), ValueError, "rng: feature_map='favor\\+'"),
        (dict(feature_map="favor+", rng=FAVOR_RNG, num_features=0), ValueError,
         "num_features: expected a positive int"),
        (dict(num_features=8), ValueError, "num_features: only used by"),
        (dict(max_length=8), ValueError, "max_length: only used by"),
        (dict(feature_map="cosformer", max_length=3), ValueError, "max_length: positions"),
        (dict(feature_map="cosformer", max_length=0), ValueError, "max_length: expected"),
        (dict(feature_map="cosformer", offset=2), ValueError, "max_length: cosformer with"),
        (dict(feature_map="cosformer", initial_state=state), ValueError,
         "max_length: cosformer with"),
        (dict(feature_map="cosformer", max_length=8, offset=-1), ValueError,
         "offset: expected >= 0"),
        (dict(feature_map="cosformer", max_length=8, offset=1.5), ValueError,
         "offset: expected an integer"),
        (dict(feature_map="cosformer", max_length=8, offset=5), ValueError,
         "max_length: positions up to offset"),
    ], (q, k, v)


@pytest.mark.parametrize("case", range(len(_bad_parametric_calls()[0])))
def test_parametric_maps_bad_input(case):
    cases, args = _bad_parametric_calls()
    kwargs, error, match = cases[case]
    with pytest.raises(error, match=match):
        linear_attention(*args, **kwargs)
    with pytest.raises(ValueError, match="favor_features or cosformer_features"):
        linear.resolve_feature_map("favor+")


def test_parametric_modules_are_the_functional_call():
    x = _rand(54, B, T, D_MODEL)
    layer = LinearAttention(D_MODEL, num_heads=4, num_kv_heads=2, feature_map="favor+",
                            num_features=6, chunk_size=CHUNK, rngs=nnx.Rngs(3))
    # The key is fixed state, not a trained parameter.
    assert "feature_rng" not in nnx.state(layer, nnx.Param)
    assert isinstance(layer.feature_rng, jattn.nn.RandomFeatureRng)

    def project(layer, lin, heads):
        return (x @ lin.kernel[...] + lin.bias[...]).reshape(B, T, heads, -1)

    def functional(layer, **kwargs):
        out = linear_attention(project(layer, layer.q_proj, 4), project(layer, layer.k_proj, 2),
                               project(layer, layer.v_proj, 2), is_causal=True,
                               chunk_size=CHUNK, **kwargs)
        return out.reshape(B, T, D_MODEL) @ layer.out_proj.kernel[...] + layer.out_proj.bias[...]

    want = functional(layer, feature_map="favor+", rng=layer.feature_rng[...], num_features=6)
    np.testing.assert_allclose(layer(x), want, atol=1e-5)
    np.testing.assert_allclose(layer(x), layer(x), atol=0)  # same features every call
    redrawn = functional(layer, feature_map="favor+", rng=jax.random.key(9), num_features=6)
    np.testing.assert_allclose(layer(x, rng=jax.random.key(9)), redrawn, atol=1e-5)

    cos = LinearAttention(D_MODEL, num_heads=4, num_kv_heads=2, feature_map="cosformer",
                          max_length=T, chunk_size=CHUNK, rngs=nnx.Rngs(4))
    np.testing.assert_allclose(cos(x), functional(cos, feature_map="cosformer", max_length=T),
                               atol=1e-5)
    y1, state = cos(x[:, :5], return_state=True)
    y2 = cos(x[:, 5:], initial_state=state, offset=5)
    np.testing.assert_allclose(jnp.concatenate([y1, y2], 1), cos(x), atol=1e-5)
    with pytest.raises(ValueError, match="num_features"):
        LinearAttention(D_MODEL, num_features=4, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="max_length"):
        LinearAttention(D_MODEL, feature_map="favor+", max_length=4, rngs=nnx.Rngs(0))
