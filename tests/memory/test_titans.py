"""Titans neural memory: chunked vs sequential vs the plain per-token reference (forward and
outer gradients), closed forms of the linear memory, order of operations, state carry, jit,
vmap, finite differences, long-sequence stability, input validation."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jattn import reference
from jattn.memory import titans
from jattn.memory.titans import (
    MemoryInputs,
    MemoryWeights,
    NeuralMemoryState,
    apply_memory,
    chunk_gates,
    init_neural_memory,
    initial_memory_state,
    memory_inputs,
    memory_recurrence,
    neural_memory,
    prepend_persistent,
)
from tests.conftest import normal, normalised_error, to64

D, N, H = 6, 2, 3


def _params(seed=0, **options):
    """Initial parameters, every leaf perturbed so that gates, convolution and the initial
    memory all vary (the linear memory would otherwise start at zero)."""
    options = {"dim": D, "num_heads": N, "head_dim": H, "memory_expansion": 2, **options}
    params = init_neural_memory(jax.random.key(seed), **options)
    leaves, treedef = jax.tree_util.tree_flatten(params)
    rng = np.random.default_rng(seed + 100)
    leaves = [a + 0.3 * jnp.asarray(rng.standard_normal(a.shape), a.dtype) for a in leaves]
    return jax.tree_util.tree_unflatten(treedef, leaves)


def _x(seed, T, B=2, dtype=jnp.float32):
    return normal(seed, (B, T, D), dtype)


def _loss_and_grad(fn, cotangent, jit=True):
    """(params, x) -> (y, state leaves, d<y, cotangent>/d(params, x)), jitted or eager (the
    per-token reference compiles slowly: eager is faster for it)."""
    def run(params, x):
        def scalar(p, x):
            y, *rest = fn(p, x)
            return jnp.sum(y * cotangent), (y, rest)
        (_, (y, rest)), grads = jax.value_and_grad(scalar, (0, 1), has_aux=True)(params, x)
        return y, rest, grads
    return jax.jit(run) if jit else run


def _fast(p, x, **options):
    y, state = neural_memory(p, x, return_state=True, **options)
    return y, jax.tree_util.tree_leaves((state.weights, state.momentum))


def _ref(p, x, **options):
    y, w, m, _ = reference.neural_memory(p, x, **options)
    return y, [*w, *m]


def _assert_all_close(got, want, tol):
    for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want),
                    strict=True):
        assert normalised_error(a, b) < tol


DEEP = {"memory_depth": 2}
DEEP_CW = {"memory_depth": 2, "channelwise_forget": True}
LINEAR_CW = {"memory_depth": 1, "channelwise_forget": True}


def test_chunk_size_one_equals_sequential(monkeypatch):
    """chunk_size = 1 runs the exact recurrence in chunks of EXACT_CHUNK tokens (gradients at
    the previous token's weights, in the dual form); with chunks of 3, T = 7 has two full
    chunks and a partial one. Outputs, final state and outer gradients."""
    monkeypatch.setattr(titans, "EXACT_CHUNK", 3)
    T = 7
    with jax.enable_x64(True):
        p, x = to64((_params(**DEEP), _x(1, T, B=1)))
        cotangent = normal(2, (1, T, N, H), jnp.float64)
        got = _loss_and_grad(functools.partial(_fast, chunk_size=1), cotangent)(p, x)
        want = _loss_and_grad(functools.partial(_fast, chunk_size=1,
                                                implementation="sequential"), cotangent)(p, x)
        _assert_all_close(got, want, 1e-10)


@pytest.mark.parametrize("options,retrieve,max_grad_norm", [
    (DEEP_CW, "after", 0.3), (DEEP, "before", None), (LINEAR_CW, "after", None),
    ({"memory_depth": 3, "conv_size": None}, "after", 0.3)])
def test_chunk_size_one_over_several_exact_chunks(options, retrieve, max_grad_norm):
    """T = 37 at the default EXACT_CHUNK: full exact chunks and a partial last one, each
    memory depth, channel-wise forgetting, both retrieval orders and the clamp, against the
    token-by-token scan (B = 2 rows)."""
    T = 2 * titans.EXACT_CHUNK + 5
    kw = {"retrieve": retrieve, "max_grad_norm": max_grad_norm}
    with jax.enable_x64(True):
        p, x = to64((_params(40, **options), _x(41, T)))
        got = jax.jit(functools.partial(_fast, chunk_size=1, **kw))(p, x)
        want = jax.jit(functools.partial(_fast, chunk_size=1, implementation="sequential",
                                         **kw))(p, x)
        _assert_all_close(got, want, 1e-10)


# Chunked against the reference that freezes the gradient point per chunk; the sequential
# implementation and chunked with chunk 1 (the exact recurrence in the dual form) against the
# token-by-token reference (chunk 1). T = 5 leaves a partial last
# chunk for chunk sizes 2 and 4; 16 > T is one partial chunk. Outer gradients (and a
# finite-difference check of them) in one case: the eager reference's backward pass and the
# compilations are what this file spends its time on.
@pytest.mark.parametrize("implementation,options,chunk_size,retrieve,max_grad_norm", [
    ("sequential", DEEP, 1, "after", None),
    ("chunked", DEEP_CW, 1, "after", 0.3),  # the exact recurrence in the dual form
    ("chunked", DEEP_CW, 2, "after", 0.3),
    ("chunked", DEEP, 4, "before", None),
    ("chunked", LINEAR_CW, 5, "after", 0.3),
    ("chunked", {"memory_depth": 3, "conv_size": None}, 16, "after", None),
])
def test_matches_frozen_gradient_reference(implementation, options, chunk_size, retrieve,
                                           max_grad_norm):
    T = 5
    kw = {"chunk_size": chunk_size, "retrieve": retrieve, "max_grad_norm": max_grad_norm}
    fast = functools.partial(_fast, implementation=implementation, **kw)
    grads = options is DEEP_CW
    with jax.enable_x64(True):
        p, x = to64((_params(**options), _x(3, T, B=1)))
        if grads:
            cotangent = normal(4, (1, T, N, H), jnp.float64)
            run = _loss_and_grad(fast, cotangent)
            got = run(p, x)
            want = _loss_and_grad(functools.partial(_ref, **kw), cotangent, jit=False)(p, x)
            # every trainable part receives gradient through the inner updates
            for name in ("w_lr", "w_momentum", "w_forget", "w_k", "w_v", "conv", "memory"):
                leaves = jax.tree_util.tree_leaves(getattr(got[2][0], name))
                assert all(float(jnp.abs(g).max()) > 0 for g in leaves), name
            # central differences of <y, cotangent> along a random direction of the params
            rng = np.random.default_rng(17)
            direction = jax.tree_util.tree_map(
                lambda a: jnp.asarray(rng.standard_normal(a.shape)), p)
            eps = 1e-6
            ends = [jnp.sum(run(jax.tree_util.tree_map(lambda a, d, s=s: a + s * eps * d, p,
                                                       direction), x)[0] * cotangent)
                    for s in (1, -1)]
            numeric = (ends[0] - ends[1]) / (2 * eps)
            analytic = sum(jnp.vdot(g, d) for g, d in zip(
                jax.tree_util.tree_leaves(got[2][0]), jax.tree_util.tree_leaves(direction),
                strict=True))
            assert abs(numeric - analytic) < 1e-6 * max(1.0, abs(analytic))
        else:
            got, want = jax.jit(fast)(p, x), _ref(p, x, **kw)
        _assert_all_close(got, want, 1e-10)
        if max_grad_norm is not None:  # the clamp is active somewhere, so it was tested
            plain = _ref(p, x, **{**kw, "max_grad_norm": None})[0]
            assert normalised_error(got[0], plain) > 1e-6


def _random_inputs(seed, B, T, C, dtype=jnp.float64):
    rng = np.random.default_rng(seed)
    q, k, v = (jnp.asarray(rng.standard_normal((B, T, N, H)), dtype) for _ in range(3))
    k = k / jnp.linalg.norm(k, axis=-1, keepdims=True)
    theta = jnp.asarray(rng.uniform(0.05, 0.5, (B, T, N)), dtype)
    eta = jnp.asarray(rng.uniform(0.2, 0.9, (B, T, N)), dtype)
    keep = jnp.asarray(rng.uniform(0.7, 1.0, (B, T, N, C)), dtype)
    return MemoryInputs(q, k, v, theta, eta, keep)


def test_linear_memory_closed_form_without_momentum_or_decay():
    """One chunk, eta = 0, alpha = 0: M_i = M_0 - sum_{j <= i} 2 theta_j k_j^T (k_j M_0 - v_j)
    (the loss is |k M - v|^2), so y = q M_0 - (q k^T * causal * 2 theta) (k M_0 - v)."""
    B, T = 2, 9
    with jax.enable_x64(True):
        inputs = _random_inputs(0, B, T, 1)._replace(eta=jnp.zeros((B, T, N)),
                                                     keep=jnp.ones((B, T, N, 1)))
        M0 = normal(1, (B, N, H, H), jnp.float64)
        zero = MemoryWeights((jnp.zeros_like(M0),))
        y, w, m = memory_recurrence(MemoryWeights((M0,)), zero, inputs, chunk_size=T)
        q, k, v, theta = (np.asarray(a) for a in inputs[:4])
        M0 = np.asarray(M0)
        residual = np.einsum("btnh,bnhg->btng", k, M0) - v  # k_j M_0 - v_j
        want_M = M0 - 2 * np.einsum("btn,btnh,btng->bnhg", theta, k, residual)
        causal = np.tril(np.ones((T, T)))
        scores = np.einsum("bind,bjnd->bnij", q, k) * causal * 2 * theta.transpose(0, 2, 1)[
            :, :, None, :]
        want_y = (np.einsum("btnh,bnhg->btng", q, M0)
                  - np.einsum("bnij,bjng->bing", scores, residual))
        np.testing.assert_allclose(w.matrices[0], want_M, atol=1e-12)
        np.testing.assert_allclose(y, want_y, atol=1e-12)
        last = 2 * np.einsum("bn,bnh,bng->bnhg", theta[:, -1], k[:, -1], residual[:, -1])
        np.testing.assert_allclose(m.matrices[0], -last, atol=1e-12)  # eta = 0: S_T
        # Token by token it is the delta rule M_t = M_{t-1} - 2 theta_t k_t^T (k_t M_{t-1} - v_t).
        _, w_seq, _ = memory_recurrence(MemoryWeights((jnp.asarray(M0),)), zero, inputs,
                                        chunk_size=1, implementation="sequential")
        Mt = M0.copy()
        for t in range(T):
            res = np.einsum("bnh,bnhg->bng", k[:, t], Mt) - v[:, t]
            Mt = Mt - 2 * np.einsum("bn,bnh,bng->bnhg", theta[:, t], k[:, t], res)
        np.testing.assert_allclose(w_seq.matrices[0], Mt, atol=1e-12)


def test_linear_memory_closed_form_with_momentum_and_channelwise_decay():
    """One chunk: with u_j = 2 k_j^T (k_j M_0 - v_j), A_{l..i} = prod_{l<m<=i} (1 - alpha_m)
    (per output channel) and E_{j..l} = prod_{j<m<=l} eta_m,
    S_T = E_{0..T} S_0 - sum_j theta_j E_{j..T} u_j and
    M_T = A_{0..T} M_0 + sum_l A_{l..T} S_l. Written with explicit products (no scan)."""
    B, T = 1, 6
    with jax.enable_x64(True):
        inputs = _random_inputs(5, B, T, H)
        M0, S0 = normal(6, (B, N, H, H), jnp.float64), normal(7, (B, N, H, H), jnp.float64)
        y, w, m = memory_recurrence(MemoryWeights((M0,)), MemoryWeights((S0,)), inputs,
                                    chunk_size=T)
        q, k, v, theta, eta, keep = (np.asarray(a) for a in inputs)
        M0, S0 = np.asarray(M0), np.asarray(S0)
        u = 2 * np.einsum("btnh,btng->btnhg", k, np.einsum("btnh,bnhg->btng", k, M0) - v)

        def momentum(i):  # S_i (tokens 1..i, 1-based)
            s = np.prod(eta[:, :i], 1)[..., None, None] * S0
            for j in range(1, i + 1):
                s = s - (theta[:, j - 1] * np.prod(eta[:, j:i], 1))[..., None, None] * u[:, j - 1]
            return s

        def weights(i):
            w = np.prod(keep[:, :i], 1)[:, :, None, :] * M0
            for l_ in range(1, i + 1):
                w = w + np.prod(keep[:, l_:i], 1)[:, :, None, :] * momentum(l_)
            return w

        np.testing.assert_allclose(m.matrices[0], momentum(T), atol=1e-12)
        np.testing.assert_allclose(w.matrices[0], weights(T), atol=1e-12)
        want_y = np.stack([np.einsum("bnh,bnhg->bng", q[:, i - 1], weights(i))
                           for i in range(1, T + 1)], 1)
        np.testing.assert_allclose(y, want_y, atol=1e-12)


@pytest.mark.parametrize("implementation,options", [
    ("chunked", DEEP_CW), ("chunked", {"memory_depth": 1}), ("sequential", DEEP)])
def test_chunk_gates_are_the_first_token_gates_repeated(implementation, options):
    """gate_granularity="chunk" equals per-token gates fed every chunk's first-token gates
    (written out here by index): for "chunked" that is the frozen-gradient recurrence checked
    against the reference above, for "sequential" the token-by-token one with the same
    chunks. T = 7 with chunks of 3: [0, 1, 2], [3, 4, 5], [6]."""
    B, T, c = 2, 7, 3
    with jax.enable_x64(True):
        p = to64(_params(30, **options))
        state = initial_memory_state(p, B)
        momentum = jax.tree_util.tree_map(lambda a: 0.1 * jnp.ones_like(a), state.momentum)
        inputs = _random_inputs(31, B, T, p.config.forget_channels)
        first = np.array([0, 0, 0, 3, 3, 3, 6])
        repeated = inputs._replace(theta=inputs.theta[:, first], eta=inputs.eta[:, first],
                                   keep=inputs.keep[:, first])
        np.testing.assert_array_equal(chunk_gates(inputs, c).keep, repeated.keep)
        run = jax.jit(functools.partial(memory_recurrence, chunk_size=c,
                                        implementation=implementation, max_grad_norm=0.5),
                      static_argnames="gate_granularity")
        got = run(state.weights, momentum, inputs, gate_granularity="chunk")
        _assert_all_close(got, run(state.weights, momentum, repeated), 1e-12)
        assert normalised_error(got[0], run(state.weights, momentum, inputs)[0]) > 1e-3
        assert chunk_gates(inputs, 1) is inputs  # chunk_size = 1: the per-token gates


@pytest.mark.parametrize("implementation", ["chunked", "sequential"])
def test_chunk_gates_are_causal(implementation):
    """With per-chunk gates, changing token 5 (inside the chunk [4, 8)) leaves y_0..y_4
    unchanged, and changing its gates alone changes nothing (the chunk uses token 4's);
    changing token 4's gates changes y_4.. and nothing before."""
    T, c = 8, 4
    with jax.enable_x64(True):
        p, x = to64((_params(23, **DEEP), _x(24, T, B=1)))
        run = jax.jit(functools.partial(neural_memory, chunk_size=c, gate_granularity="chunk",
                                        implementation=implementation))
        y = run(p, x)
        changed = run(p, x.at[:, 5].add(1.0))
        np.testing.assert_allclose(changed[:, :5], y[:, :5], rtol=0, atol=1e-13)
        assert float(jnp.abs(changed[:, 5:] - y[:, 5:]).max(axis=(0, 2, 3)).min()) > 1e-6
        inputs = memory_inputs(p, x)[0]
        state = initial_memory_state(p, 1)
        recur = jax.jit(functools.partial(memory_recurrence, chunk_size=c,
                                          gate_granularity="chunk",
                                          implementation=implementation))
        base = recur(state.weights, state.momentum, inputs)[0]
        for t in (5, 4):
            gates = inputs._replace(theta=inputs.theta.at[:, t].mul(3.0),
                                    eta=inputs.eta.at[:, t].mul(0.5),
                                    keep=inputs.keep.at[:, t].mul(0.5))
            out = recur(state.weights, state.momentum, gates)[0]
            np.testing.assert_allclose(out[:, :t], base[:, :t], rtol=0, atol=1e-13)
            if t == 5:
                np.testing.assert_allclose(out, base, rtol=0, atol=1e-13)
            else:
                assert float(jnp.abs(out[:, 4:] - base[:, 4:]).max(axis=(0, 2, 3)).min()) > 1e-6


def test_order_of_operations():
    """"after" (default): y_t = M_t(q_t), the weights that include token t's write (the state
    a call on x[:t+1] ends with); "before": y_t = M_{t-1}(q_t) (the state after x[:t]; at
    t = 0 the learned initial memory, so y_0 sees x_0 only through q_0)."""
    T, chunk = 6, 3
    p, x = _params(7, **DEEP), _x(8, T, B=1)
    run = functools.partial(neural_memory, chunk_size=chunk)
    after = jax.jit(run)(p, x)
    before = jax.jit(functools.partial(run, retrieve="before"))(p, x)
    q = memory_inputs(p, x)[0].query
    read = jax.jit(apply_memory)
    # The state after 4 tokens (a full chunk and a partial one): the weights "after" reads
    # at t = 3 and "before" reads at t = 4.
    state = jax.jit(functools.partial(run, return_state=True))(p, x[:, :4])[1]
    assert normalised_error(after[:, 3], read(state.weights, q[:, 3:4])[:, 0]) < 1e-5
    assert normalised_error(before[:, 4], read(state.weights, q[:, 4:5])[:, 0]) < 1e-5
    initial = initial_memory_state(p, 1).weights
    assert normalised_error(before[:, 0], read(initial, q[:, :1])[:, 0]) < 1e-5
    assert normalised_error(after[:, 0], before[:, 0]) > 1e-3


def test_state_carried_across_calls():
    """Two calls of 6 tokens (a multiple of the chunk) equal one call of 12."""
    with jax.enable_x64(True):
        p, x = to64((_params(9, **DEEP_CW), _x(10, 12)))
        run = jax.jit(functools.partial(neural_memory, chunk_size=3, return_state=True))
        y, state = run(p, x)
        y1, s1 = run(p, x[:, :6], initial_state=initial_memory_state(p, 2))
        y2, s2 = run(p, x[:, 6:], initial_state=s1)
        assert normalised_error(jnp.concatenate([y1, y2], 1), y) < 1e-12
        _assert_all_close(s2, state, 1e-12)
        assert state.conv.shape == (2, 3, 3 * N * H)



@pytest.mark.parametrize("implementation", ["chunked", "sequential"])
def test_batch_of_several_rows_against_reference(implementation):
    """B = 3 rows and several heads run as one vmap over B x N: outputs and final states
    equal the float64 reference row by row (the reference tests above use B = 1)."""
    with jax.enable_x64(True):
        p, x = to64((_params(25, **DEEP_CW), _x(26, 6, B=3)))
        got = _fast(p, x, chunk_size=2, implementation=implementation)
        # (the sequential form takes every gradient at the previous token's weights)
        want = _ref(p, x, chunk_size=2 if implementation == "chunked" else 1)
        _assert_all_close(got, want, 1e-10)

def test_jit_and_vmap():
    """vmap over parameters and inputs together (an ensemble of memories) equals jit calls."""
    ps = jax.tree_util.tree_map(lambda *a: jnp.stack(a), _params(11, **DEEP_CW),
                                _params(13, **DEEP_CW))
    xs = normal(12, (2, 2, 5, D))
    fn = functools.partial(neural_memory, chunk_size=2)
    batched = jax.jit(jax.vmap(fn))(ps, xs)
    single = jax.jit(fn)
    for i in range(2):
        p = jax.tree_util.tree_map(lambda a, i=i: a[i], ps)
        assert normalised_error(batched[i], single(p, xs[i])) < 1e-4


def test_float32_and_bfloat16_against_float64_reference():
    p, x = _params(18, **DEEP), _x(19, 6, B=1)
    fn = jax.jit(functools.partial(neural_memory, chunk_size=4))
    x16 = x.astype(jnp.bfloat16)
    with jax.enable_x64(True):
        want = _ref(*to64((p, x)), chunk_size=4)[0]
        # bfloat16 input is computed in float32: compare with the same rounded input
        want16 = _ref(*to64((p, x16)), chunk_size=4)[0]
    y32, y16 = fn(p, x), fn(p, x16)
    assert y32.dtype == jnp.float32 and y16.dtype == jnp.bfloat16
    assert normalised_error(y32, want) < 1e-4
    assert normalised_error(y16, want16) < 1e-2


def test_no_nan_at_16k_tokens_float32():
    p = init_neural_memory(jax.random.key(20), dim=4, num_heads=1, head_dim=4,
                           memory_expansion=2, initial_lr=0.5, initial_momentum=0.95,
                           initial_forget=0.001)
    x = 3.0 * normal(21, (1, 16384, 4))
    run = jax.jit(functools.partial(neural_memory, chunk_size=64, return_state=True,
                                    max_grad_norm=1.0))
    y, state = run(p, x)
    assert bool(jnp.isfinite(y).all())
    assert all(bool(jnp.isfinite(a).all()) for a in jax.tree_util.tree_leaves(state))


def test_persistent_tokens():
    p = init_neural_memory(jax.random.key(0), dim=D, num_heads=N, head_dim=H,
                           num_persistent=3)
    x = _x(22, 4)
    out = prepend_persistent(p, x)
    assert out.shape == (2, 7, D)
    np.testing.assert_array_equal(out[1, :3], p.persistent)
    np.testing.assert_array_equal(out[:, 3:], x)


def test_configuration_shapes():
    p = init_neural_memory(jax.random.key(0), dim=D, num_heads=N, head_dim=H, memory_depth=3,
                           memory_expansion=2, channelwise_forget=True, momentum=False,
                           conv_size=None)
    assert [w.shape for w in p.memory.matrices] == [(N, H, 2 * H), (N, 2 * H, 2 * H),
                                                    (N, 2 * H, H)]
    assert p.w_forget.shape == (D, N, 2 * H + 2 * H + 3 * H)
    assert p.w_momentum is None and p.conv is None
    inputs, conv = memory_inputs(p, _x(0, 3))
    assert conv is None and float(jnp.abs(inputs.eta).max()) == 0.0
    np.testing.assert_allclose(jnp.linalg.norm(inputs.key, axis=-1), 1.0, atol=1e-3)


def test_bad_input_raises():
    p, x = _params(0, **DEEP), _x(0, 4)
    with pytest.raises(ValueError, match="x"):
        neural_memory(p, x[..., :4], chunk_size=2)
    with pytest.raises(ValueError, match="x"):
        neural_memory(p, x[0], chunk_size=2)
    with pytest.raises(TypeError, match="x"):
        neural_memory(p, x.astype(jnp.int32), chunk_size=2)
    with pytest.raises(ValueError, match="chunk_size"):
        neural_memory(p, x, chunk_size=0)
    with pytest.raises(ValueError, match="implementation"):
        neural_memory(p, x, chunk_size=2, implementation="parallel")
    with pytest.raises(ValueError, match="retrieve"):
        neural_memory(p, x, chunk_size=2, retrieve="during")
    with pytest.raises(ValueError, match="max_grad_norm"):
        neural_memory(p, x, chunk_size=2, max_grad_norm=0.0)
    with pytest.raises(ValueError, match="gate_granularity"):
        neural_memory(p, x, chunk_size=2, gate_granularity="mean")
    state = initial_memory_state(p, 3)  # batch 3 against x's 2
    with pytest.raises(ValueError, match=r"initial_state\.weights\.matrices\[0\]"):
        neural_memory(p, x, chunk_size=2, initial_state=state)
    state = initial_memory_state(p, 2)
    with pytest.raises(ValueError, match="conv_state"):
        neural_memory(p, x, chunk_size=2, initial_state=state._replace(conv=state.conv[:, :1]))
    with pytest.raises(ValueError, match="initial_state"):
        neural_memory(p, x, chunk_size=2, initial_state=(state.weights, state.momentum))
    for name, value in (("memory_depth", 0), ("dim", -1), ("conv_size", 0),
                        ("initial_forget", 1.5), ("activation", "relu")):
        with pytest.raises(ValueError, match=name):
            init_neural_memory(jax.random.key(0), **{"dim": D, "num_heads": N, "head_dim": H,
                                                     name: value})
    inputs = memory_inputs(p, x)[0]
    state = initial_memory_state(p, 2)
    with pytest.raises(ValueError, match=r"inputs\.keep"):
        memory_recurrence(state.weights, state.momentum,
                          inputs._replace(keep=jnp.ones((2, 4, N, 5))), chunk_size=2)
    with pytest.raises(ValueError, match="momentum"):
        memory_recurrence(state.weights, MemoryWeights(state.momentum.matrices), inputs,
                          chunk_size=2)
    assert isinstance(state, NeuralMemoryState)
