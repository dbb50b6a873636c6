"""NNX Titans modules: each equals its wiring written out (explicit projections, dense masks,
the reference attention, the functional memory), causality, MAC's order of operations,
jit/vmap/grad, training inside a TransformerLM, option errors."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jattn import reference
from jattn.memory.titans import (
    apply_memory,
    init_neural_memory,
    initial_memory_state,
    memory_inputs,
    neural_memory,
)
from jattn.nn.titans import (
    MACState,
    NeuralMemory,
    TitansLMM,
    TitansMAC,
    TitansMAG,
    TitansMAL,
)
from jattn.nn.transformer import MIXERS, TransformerLM

B, T, D, N = 2, 7, 8, 2  # T = 7: not a multiple of the chunk (2) nor of the segment (3)
NP, W, C, CHUNK = 2, 3, 3, 2
# Option sets (compilation dominates the time): the deep memory in the chunked form, the
# linear memory in the chunked form, and the cheapest (linear, token by token).
DEEP = dict(chunk_size=CHUNK, memory_depth=2, memory_expansion=2)
LINEAR = dict(chunk_size=CHUNK, memory_depth=1)
FAST = dict(chunk_size=CHUNK, memory_depth=1, implementation="sequential")


def _x(seed, shape=(B, T, D)):
    return jax.random.normal(jax.random.key(seed), shape)


def _close(got, want, tol=2e-5):
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=tol, atol=tol)


# --- the wiring written out ---------------------------------------------------------------


def _rms(a, scale):
    return a / jnp.sqrt(jnp.mean(a * a, -1, keepdims=True) + 1e-6) * scale[...]


def _linear(lin, a):
    return a @ lin.kernel[...] + lin.bias[...]


def _memory_head(mem, y, x):
    """W_o(RMSNorm(y) * sigmoid(x W_g))."""
    gate = jax.nn.sigmoid(_linear(mem.gate, x)).reshape(y.shape)
    return _linear(mem.out_proj, (_rms(y, mem.norm.scale) * gate).reshape(*x.shape[:-1], -1))


def _memory(mem, x, **kw):
    out = neural_memory(mem.params, x, chunk_size=CHUNK, implementation=mem.implementation,
                        **kw)
    y, state = out if kw.get("return_state") else (out, None)
    return (_memory_head(mem, y, x), state) if state is not None else _memory_head(mem, y, x)


def _attend(attn, xq, xkv, allowed):
    """Explicit q/k/v projections, the dense reference attention, the output projection."""
    kernel, bias = attn.proj.qkv_proj.kernel[...], attn.proj.qkv_proj.bias[...]
    heads = lambda a: a.reshape(*a.shape[:-1], N, D // N)  # noqa: E731
    q = heads(xq @ kernel[:, :D] + bias[:D])
    k = heads(xkv @ kernel[:, D:2 * D] + bias[D:2 * D])
    v = heads(xkv @ kernel[:, 2 * D:] + bias[2 * D:])
    out = reference.dot_product_attention(q, k, v, mask=jnp.asarray(allowed)[None, None])
    return _linear(attn.out_proj, out.reshape(*xq.shape[:-1], -1))


def _gate(gate, y, m):
    return _rms(y, gate.norm_y.scale) * jax.nn.sigmoid(_rms(m, gate.norm_m.scale))


def _persistent(mem, x):
    p = mem.persistent[...]
    return jnp.concatenate([jnp.broadcast_to(p, (x.shape[0], *p.shape)), x], 1)


def _window_mask(length, window, num_persistent=0):
    i, j = np.arange(length)[:, None], np.arange(length)[None, :]
    return ((j <= i) & (i - j < window)) | (j < num_persistent)


def _mac_segment(mac, state, read_state, xs, qs, allowed):
    """Retrieve from ``read_state``, attend, write into ``state``, gate."""
    mem = mac.memory
    h = _memory_head(mem, apply_memory(read_state.weights, qs), xs)
    y = _attend(mac.attention, xs, jnp.concatenate([_persistent(mem, h), xs], 1), allowed)
    if mac.residual:
        y = xs + y
    z, new_state = _memory(mem, y, initial_state=state, return_state=True)
    return new_state, _gate(mac.gate, y, z)


def _mac_reference(mac, x, order="before", retrieved="causal"):
    """MAC segment by segment with numpy masks; ``order="after"`` is the wrong order (the
    retrieval reads the memory after the segment's write), to show the test can tell."""
    mem = mac.memory
    query = memory_inputs(mem.params, x)[0].query
    state, outs = initial_memory_state(mem.params, x.shape[0]), []
    for s in range(0, x.shape[1], C):
        xs, qs = x[:, s:s + C], query[:, s:s + C]
        c = xs.shape[1]
        k = np.arange(NP + 2 * c)[None, :]
        i = np.arange(c)[:, None]
        own = (k >= NP + c) & (k - NP - c <= i)  # the segment's tokens j <= i
        if retrieved == "causal":
            allowed = (k < NP) | ((k < NP + c) & (k - NP <= i)) | own
        else:
            allowed = (k < NP + c) | (k - NP - c <= i)
        new_state, out = _mac_segment(mac, state, state, xs, qs, allowed)
        if order == "after":
            out = _mac_segment(mac, state, new_state, xs, qs, allowed)[1]
        state = new_state
        outs.append(out)
    return jnp.concatenate(outs, 1), state


# --- modules equal their wiring -----------------------------------------------------------


def test_neural_memory_holds_the_functional_parameters_and_equals_the_call():
    options = dict(memory_depth=1, momentum=False, channelwise_forget=True, conv_size=None,
                   num_persistent=3, max_lr=0.5, initial_lr=0.1)
    mem = NeuralMemory(D, N, chunk_size=CHUNK, max_grad_norm=1.0, rngs=nnx.Rngs(0), **options)
    want = init_neural_memory(nnx.Rngs(0).params(), dim=D, num_heads=N, head_dim=D // N,
                              **options)
    got = mem.params
    assert got.config == want.config and got.w_momentum is None and got.conv is None
    jax.tree_util.tree_map(np.testing.assert_array_equal, got, want)
    x = _x(1)
    y = neural_memory(want, x, chunk_size=CHUNK, max_grad_norm=1.0)
    _close(mem(x), _memory_head(mem, y, x))
    out, state = mem(x, return_state=True)
    _, want_state = neural_memory(want, x, chunk_size=CHUNK, max_grad_norm=1.0,
                                  return_state=True)
    jax.tree_util.tree_map(_close, state, want_state)
    assert out.shape == (B, T, D)
    # retrieve / implementation pass through
    seq = NeuralMemory(D, N, chunk_size=CHUNK, implementation="sequential", retrieve="before",
                       memory_depth=1, rngs=nnx.Rngs(0))
    y = neural_memory(seq.params, x, chunk_size=CHUNK, implementation="sequential",
                      retrieve="before")
    _close(seq(x), _memory_head(seq, y, x))
    # gate_granularity passes through
    per_chunk = NeuralMemory(D, N, chunk_size=CHUNK, gate_granularity="chunk", memory_depth=1,
                             rngs=nnx.Rngs(0))
    y = neural_memory(per_chunk.params, x, chunk_size=CHUNK, gate_granularity="chunk")
    _close(per_chunk(x), _memory_head(per_chunk, y, x))
    per_token = NeuralMemory(D, N, chunk_size=CHUNK, memory_depth=1, rngs=nnx.Rngs(0))
    assert np.abs(np.asarray(per_chunk(x) - per_token(x))).max() > 1e-4


def test_lmm_equals_memory_on_persistent_and_input():
    lmm = TitansLMM(D, N, num_persistent=NP, rngs=nnx.Rngs(1), **DEEP)
    x = _x(2)
    xt = _persistent(lmm.memory, x)
    _close(lmm(x), _memory(lmm.memory, xt)[:, NP:])


def test_mag_equals_gated_window_attention_and_memory():
    mag = TitansMAG(D, N, window=W, num_persistent=NP, rngs=nnx.Rngs(2), **FAST)
    x = _x(3)
    xt = _persistent(mag.memory, x)
    y = _attend(mag.attention, xt, xt, _window_mask(NP + T, W, NP))
    _close(mag(x), _gate(mag.gate, y, _memory(mag.memory, xt))[:, NP:])
    np.testing.assert_array_equal(mag.attention_mask().materialize(NP + T, NP + T)[0, 0],
                                  _window_mask(NP + T, W, NP))


def test_mal_equals_memory_then_window_attention():
    mal = TitansMAL(D, N, window=W, num_persistent=NP, rngs=nnx.Rngs(3), **FAST)
    x = _x(4)
    y = _memory(mal.memory, _persistent(mal.memory, x))
    _close(mal(x), _attend(mal.attention, y, y, _window_mask(NP + T, W))[:, NP:])


@pytest.mark.parametrize("retrieved,residual", [("causal", True), ("prefix", True),
                                               ("causal", False)])
def test_mac_equals_segmentwise_retrieve_attend_update_gate(retrieved, residual):
    mac = TitansMAC(D, N, segment_size=C, retrieved=retrieved, residual=residual,
                    num_persistent=NP, rngs=nnx.Rngs(4), **FAST)
    x = _x(5)  # segments of 3, 3, 1: the scan and the short last segment
    out, state = mac(x, return_state=True)
    want, want_state = _mac_reference(mac, x, retrieved=retrieved)
    _close(out, want)
    jax.tree_util.tree_map(_close, state.memory, want_state)
    _close(state.query_conv, memory_inputs(mac.memory.params, x)[1])
    if retrieved == "prefix":
        # every retrieved token visible: h_4 (read with x_4's query) reaches output 3, a leak
        x2 = x.at[:, 4:].set(_x(11)[:, 4:])
        assert np.abs(np.asarray(mac(x2)[:, 3] - out[:, 3])).max() > 1e-5


def test_mac_with_a_silent_attention_is_the_gated_memory_of_its_input():
    # With the residual, what the memory writes is the block's input plus the attention:
    # silence the attention and MAC is the MAG gate over the memory of x, one call for the
    # whole sequence (the state carried across segments changes nothing).
    mac = TitansMAC(D, N, segment_size=C, num_persistent=NP, rngs=nnx.Rngs(6), **FAST)
    for p in (mac.attention.out_proj.kernel, mac.attention.out_proj.bias):
        p[...] = jnp.zeros_like(p[...])
    x = _x(12)
    _close(mac(x), _gate(mac.gate, x, _memory(mac.memory, x)))


def test_mac_retrieves_before_it_writes_and_carries_the_state():
    mac = TitansMAC(D, N, segment_size=C, num_persistent=NP, rngs=nnx.Rngs(5), **FAST)
    x = _x(6, (B, 2 * C, D))
    out, state = mac(x, return_state=True)
    # Segment 2 read the memory left by segment 1 (its final state as initial_state) ...
    first, state1 = mac(x[:, :C], return_state=True)
    second, state2 = mac(x[:, C:], initial_state=state1, return_state=True)
    _close(out, jnp.concatenate([first, second], 1))
    jax.tree_util.tree_map(_close, state, state2)
    # ... and state1 is the memory after writing segment 1's attention outputs: not M_0.
    m0 = initial_memory_state(mac.memory.params, B)
    assert not np.allclose(state1.memory.weights.matrices[0], m0.weights.matrices[0])
    # The wrong order (retrieve from the memory after this segment's write) differs (the
    # right order equals the module: the test above).
    wrong, _ = _mac_reference(mac, x, order="after")
    assert np.abs(np.asarray(out - wrong)).max() > 1e-3


def test_mac_attend_is_retrieve_then_attend_and_rejects_bad_input():
    """``attend`` (steps 1-2 of a segment, what the memory writes) against the written-out
    retrieval and masked attention of one segment."""
    mac = TitansMAC(D, N, segment_size=C, num_persistent=NP, rngs=nnx.Rngs(4), **FAST)
    x = _x(16)[:, :C]
    state = initial_memory_state(mac.memory.params, B)
    query = memory_inputs(mac.memory.params, x)[0].query
    h = _memory_head(mac.memory, apply_memory(state.weights, query), x)
    k, i = np.arange(NP + 2 * C)[None, :], np.arange(C)[:, None]
    allowed = (k < NP) | ((k < NP + C) & (k - NP <= i)) | ((k >= NP + C) & (k - NP - C <= i))
    want = _attend(mac.attention, x, jnp.concatenate([_persistent(mac.memory, h), x], 1),
                   allowed)
    _close(mac.attend(state, x, query), want)
    with pytest.raises(ValueError, match="NeuralMemoryState"):
        mac.attend(MACState(state, None), x, query)
    with pytest.raises(ValueError, match="x"):
        mac.attend(state, x[0], query)
    with pytest.raises(ValueError, match="x"):
        mac.attend(state, x[:1], query)
    with pytest.raises(ValueError, match="query"):
        mac.attend(state, x, query[:, :-1])


# --- causality ------------------------------------------------------------------------------


MODULES = {
    "lmm": lambda o: TitansLMM(D, N, num_persistent=NP, rngs=nnx.Rngs(6), **o),
    "mag": lambda o: TitansMAG(D, N, window=W, num_persistent=NP, rngs=nnx.Rngs(7), **o),
    "mal": lambda o: TitansMAL(D, N, window=W, num_persistent=NP, rngs=nnx.Rngs(8), **o),
    "mac": lambda o: TitansMAC(D, N, segment_size=C, num_persistent=NP, rngs=nnx.Rngs(9),
                               **o),
}


@pytest.mark.parametrize("name", sorted(MODULES))
def test_changing_future_tokens_leaves_past_outputs(name):
    module = MODULES[name](LINEAR if name == "mac" else FAST)  # MAC: chunks inside segments
    x = _x(10)
    cut = 4  # inside MAC's second segment
    x2 = x.at[:, cut:].set(_x(11)[:, cut:])
    a, b = module(x), module(x2)
    _close(a[:, :cut], b[:, :cut], 1e-6)
    assert np.abs(np.asarray(a[:, cut:] - b[:, cut:])).max() > 1e-4


# --- decoding -------------------------------------------------------------------------------


@pytest.mark.parametrize("prompt", [1, C, 2 * C - 1])  # within, one, nearly two segments
def test_mac_decoding_equals_the_full_forward(prompt):
    mac = MODULES["mac"](dict(FAST, memory_depth=2, memory_expansion=2))
    x = _x(13)
    y, state = mac.prefill(x[:, :prompt])
    pieces = [y]
    step = nnx.jit(lambda m, a, s: m.step(a, s))
    for t in range(prompt, T - 2):  # single tokens, then a block of 2
        y, state = step(mac, x[:, t:t + 1], state)
        pieces.append(y)
    y, state = step(mac, x[:, T - 2:], state)
    _close(jnp.concatenate([*pieces, y], 1), mac(x), 1e-4)
    assert int(state.count) == T % C


def test_mac_decoding_rejects_bad_input():
    mac = MODULES["mac"](FAST)
    with pytest.raises(ValueError, match="at least one token"):
        mac.prefill(_x(14)[:, :0])
    _, state = mac.prefill(_x(14)[:, :2])
    with pytest.raises(ValueError, match="x"):
        mac.step(_x(15, (B, 1, D + 1)), state)
    with pytest.raises(ValueError, match="x"):
        mac.step(_x(15, (B + 1, 1, D)), state)
    with pytest.raises(ValueError, match="MACDecodeState"):
        mac.step(_x(15, (B, 1, D)), state.start)


# --- transformations ------------------------------------------------------------------------


def test_jit_and_vmap_through_mac_and_input_dtype_kept():
    mac = MODULES["mac"](FAST)
    x = _x(12)
    graphdef, state = nnx.split(mac)
    apply = lambda s, a: nnx.merge(graphdef, s)(a[None])[0]  # noqa: E731
    _close(jax.jit(jax.vmap(apply, (None, 0)))(state, x), mac(x))
    half = mac(x.astype(jnp.bfloat16))
    assert half.dtype == jnp.bfloat16 and np.isfinite(np.asarray(half, np.float32)).all()


# --- inside a TransformerLM -----------------------------------------------------------------


@pytest.mark.parametrize("name", ["titans_lmm", "titans_mag", "titans_mal", "titans_mac"])
def test_transformer_lm_with_each_mixer_learns_a_copy_task(name):
    V, half = 8, 5  # inputs of 2 half = 10 tokens: two MAC segments of 5
    options = dict(FAST, max_grad_norm=1.0)
    options.update({"titans_mag": dict(window=4, num_persistent=2),
                    "titans_mal": dict(window=4, num_persistent=2),
                    "titans_mac": dict(segment_size=5, num_persistent=2)}.get(name, {}))
    lm = TransformerLM(V, 16, 1, mixer=name, num_heads=2, max_length=16,
                       mixer_options=options, rngs=nnx.Rngs(0))
    assert type(lm.blocks[0].mixer).__name__ == "Titans" + name.split("_")[1].upper()
    symbols = jax.random.randint(jax.random.key(1), (16, half), 2, V)
    tokens = jnp.concatenate([symbols, jnp.ones((16, 1), jnp.int32), symbols], 1)

    def loss_fn(model):
        logp = jax.nn.log_softmax(model(tokens[:, :-1])[:, half:])
        return -jnp.mean(jnp.take_along_axis(logp, tokens[:, half + 1:, None], -1))

    optimizer = nnx.Optimizer(lm, optax.adam(3e-2), wrt=nnx.Param)

    @nnx.jit
    def step(model, optimizer):
        loss, grads = nnx.value_and_grad(loss_fn)(model)
        optimizer.update(model, grads)
        return loss, grads

    loss, grads = step(lm, optimizer)
    # outer gradients reach the gates, the projections and the initial memory through the
    # inner updates (and the persistent tokens where they are read)
    memory = grads["blocks"][0]["mixer"]["memory"]
    assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree_util.tree_leaves(grads))
    for g in (memory["w_lr"], memory["w_q"], memory["w_k"], memory["memory_matrices"][0],
              *([memory["persistent"]] if name != "titans_lmm" else [])):
        assert np.abs(np.asarray(g[...])).max() > 0
    losses = [float(loss)] + [float(step(lm, optimizer)[0]) for _ in range(29)]
    assert np.isfinite(losses).all()
    assert losses[-1] < 0.5 * losses[0], losses  # log 6 = 1.79 is chance on the copied half


# --- errors ---------------------------------------------------------------------------------


def test_bad_options_raise_naming_the_argument():
    rngs = nnx.Rngs(0)
    for kwargs, name in ((dict(chunk_size=0), "chunk_size"),
                         (dict(implementation="fast"), "implementation"),
                         (dict(retrieve="during"), "retrieve"),
                         (dict(max_grad_norm=0.0), "max_grad_norm"),
                         (dict(gate_granularity="segment"), "gate_granularity"),
                         (dict(memory_depth=0), "memory_depth"),
                         (dict(initial_lr=2.0), "initial_lr")):
        with pytest.raises(ValueError, match=name):
            NeuralMemory(D, N, rngs=rngs, **kwargs)
    with pytest.raises(ValueError, match="num_heads"):
        NeuralMemory(D, 3, rngs=rngs)
    with pytest.raises(ValueError, match="window"):
        TitansMAG(D, N, window=0, rngs=rngs)
    with pytest.raises(ValueError, match="window"):
        TitansMAL(D, N, window=-1, rngs=rngs)
    with pytest.raises(ValueError, match="segment_size"):
        TitansMAC(D, N, segment_size=0, rngs=rngs)
    with pytest.raises(ValueError, match="retrieved"):
        TitansMAC(D, N, retrieved="all", rngs=rngs)
    with pytest.raises(ValueError, match="retrieve"):
        TitansMAC(D, N, retrieve="after", rngs=rngs)
    with pytest.raises(ValueError, match="num_persistent"):
        TitansMAG(D, N, num_persistent=-1, rngs=rngs)
    with pytest.raises(ValueError, match="mixer"):
        MIXERS["titans_mag"](D, num_heads=N, is_causal=False, max_length=8, rngs=rngs)
    with pytest.raises(ValueError, match="x"):
        TitansLMM(D, N, rngs=rngs)(jnp.ones((1, 3, D + 1)))
