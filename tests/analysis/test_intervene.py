"""jattn.analysis.intervene (Capture, Edit, Edits, Intervention, attend, select) and its use
in jattn.nn.MultiHeadAttention and jattn.nn.TransformerLM, against forwards written out here
in NumPy float64: softmax attention with each edit applied where the module docstring says,
and the language model block by block from its own parameters."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jattn import masks
from jattn.analysis import Capture, Edit, Edits, Intervention, attend, select
from jattn.nn.attention import MultiHeadAttention
from jattn.nn.transformer import TransformerLM
from tests.conftest import as_implementation, normal

# attend's shapes: GQA (N=4 query heads over K=2 key/value heads)
B, T, N, K, H, HV = 2, 11, 4, 2, 8, 6
# the language model's
V, D, L, NH, TL = 20, 16, 2, 4, 8


# --------------------------------------------------------------------------------------------
# NumPy references


def f64(x):
    return np.asarray(x, np.float64)


def causal(T=T, S=None):
    S = T if S is None else S
    return np.tril(np.ones((T, S), bool))[None, None]  # [1, 1, T, S]


def np_attention(q, k, v, *, allowed, bias=None, scale=None):
    """(weights [B, N, T, S], output [B, T, N, Hv]) of softmax attention in float64; query
    head n reads key/value head n // (N / K); rows with nothing allowed are 0."""
    q, k, v = f64(q), f64(k), f64(v)
    g = q.shape[2] // k.shape[2]
    k, v = np.repeat(k, g, axis=2), np.repeat(v, g, axis=2)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    logits = np.einsum("btnh,bsnh->bnts", q, k) * scale
    if bias is not None:
        logits = logits + f64(bias)
    allowed = np.broadcast_to(allowed, logits.shape)
    logits = np.where(allowed, logits, -np.inf)
    top = logits.max(-1, keepdims=True)
    e = np.where(allowed, np.exp(logits - np.where(np.isfinite(top), top, 0)), 0.0)
    total = e.sum(-1, keepdims=True)
    w = e / np.where(total > 0, total, 1)
    return w, np.einsum("bnts,bsnh->btnh", w, v)


def np_layernorm(x, norm):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + norm.epsilon) * f64(norm.scale[...]) + f64(norm.bias[...])


def np_linear(x, linear):
    y = x @ f64(linear.kernel[...])
    return y if linear.bias is None else y + f64(linear.bias[...])


def np_gelu(x):  # jax.nn.gelu's default (tanh) form
    return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)))


def np_lm(model, tokens, *, gates=None, attention=None):
    """The language model written out (learned positions, pre-LayerNorm blocks, causal
    attention, GELU MLP, tied head): (logits, per-layer records, final stream). ``gates``
    {layer: [N]} multiplies that layer's head outputs; ``attention`` {layer: array}
    replaces that layer's whole attention branch (what it adds to the stream)."""
    gates, attention = gates or {}, attention or {}
    tokens = np.asarray(tokens)
    Bt, Tt = tokens.shape
    table = f64(model.embed.tokens.embedding[...])
    x = table[tokens] + f64(model.embed.learned.table[...])[:Tt]
    records = []
    for i, block in enumerate(model.blocks):
        mha = block.mixer
        nh, hd = mha.proj.num_heads, mha.proj.head_dim
        qkv = np_linear(np_layernorm(x, block.mixer_norm), mha.proj.qkv_proj)
        q, k, v = (a.reshape(Bt, Tt, nh, hd) for a in np.split(qkv, 3, axis=-1))
        w, heads = np_attention(q, k, v, allowed=causal(Tt))
        if i in gates:
            heads = heads * f64(gates[i])[None, None, :, None]
        attn = np_linear(heads.reshape(Bt, Tt, nh * hd), mha.out_proj)
        if i in attention:
            attn = np.broadcast_to(f64(attention[i]), x.shape)
        h = x + attn
        mlp = np_linear(np_gelu(np_linear(np_layernorm(h, block.mlp_norm), block.mlp.up)),
                        block.mlp.down)
        records.append(dict(residual=x, attention=attn, mlp=mlp, weights=w, heads=heads,
                            query=q, key=k, value=v))
        x = h + mlp
    return np_layernorm(x, model.final_norm) @ table.T, records, x


def close(got, want, tol=2e-5):
    np.testing.assert_allclose(f64(got), f64(want), rtol=tol, atol=tol)


# --------------------------------------------------------------------------------------------
# Fixtures


def qkv(seed=0, E=None):
    lead = () if E is None else (E,)
    return (normal(seed, (*lead, B, T, N, H)), normal(seed + 1, (*lead, B, T, K, H)),
            normal(seed + 2, (*lead, B, T, K, HV)))


def make_lm(**options):
    return TransformerLM(V, D, L, num_heads=NH, max_length=TL, rngs=nnx.Rngs(0), **options)


@pytest.fixture(scope="module")
def lm():
    return make_lm()


TOKENS = jnp.asarray(np.random.default_rng(5).integers(0, V, (B, TL)), jnp.int32)


# --------------------------------------------------------------------------------------------
# attend: edits against the written-out attention


def test_heads_patch_logit_bias_and_gate():
    """Head 1's output at position 3 replaced by given values (an Edit with a select()
    where), a per-head, per-key logit bias added to the logits, and a gate: the NumPy
    attention with the bias in its logits, that one entry replaced, then gated."""
    q, k, v = qkv()
    values = normal(10, (HV,))
    logit_bias = normal(11, (N, 1, T))
    gate = jnp.array([1.0, 0.5, 0.0, 2.0])
    where = select((1, T, N, 1), a1=[3], a2=[1])
    assert float(where.sum()) == 1.0 and where[0, 3, 1, 0] == 1.0
    iv = Intervention(Edits(gate=gate, logit_bias=logit_bias,
                            heads=Edit(values=values, where=where)),
                      Capture(("weights", "heads")))
    out, cap = attend(q, k, v, is_causal=True, intervention=iv)
    w, want = np_attention(q, k, v, allowed=causal(), bias=logit_bias)
    want[:, 3, 1] = f64(values)
    want = want * f64(gate)[None, None, :, None]
    close(out, want)
    close(cap["heads"], want)
    close(cap["weights"], w)
    # The bias changed the weights: not the plain softmax
    assert np.abs(f64(cap["weights"]) - np_attention(q, k, v, allowed=causal())[0]).max() > 1e-2


def test_query_zero_makes_a_head_uniform():
    """Query-zero ablation of head 2 (Edit(values=0, where=select(...))): its logits are 0,
    so its weights are uniform over the allowed keys (1 / (i + 1) causally) and its output
    the running mean of the values; the other heads are unchanged."""
    q, k, v = qkv(1)
    iv = Intervention(Edits(query=Edit(values=0.0, where=select((1, 1, N, 1), a2=[2]))),
                      Capture(("weights", "query"), heads=[2, 0]))
    out, cap = attend(q, k, v, is_causal=True, intervention=iv)
    uniform = causal()[0, 0] / np.arange(1, T + 1)[:, None]
    close(cap["weights"][:, 0], np.broadcast_to(uniform, (B, T, T)), 1e-6)
    assert not np.asarray(cap["query"][:, :, 0]).any()
    np.testing.assert_array_equal(cap["query"][:, :, 1], q[:, :, 0])
    mean = np.cumsum(f64(v[:, :, 1]), axis=1) / np.arange(1, T + 1)[None, :, None]
    close(out[:, :, 2], mean)
    w, want = np_attention(q, k, v, allowed=causal())
    close(cap["weights"][:, 1], w[:, 0])
    close(out[:, :, [0, 1, 3]], want[:, :, [0, 1, 3]])


def np_sinks(w, v, *, allowed, sinks, scale):
    """P50's calibration in NumPy: in each row the sink keys' weights times the head's scale,
    the freed mass shared by the other allowed keys in proportion to their weights; a row
    with no other allowed key is left alone. Returns (weights, output)."""
    mass = (w * sinks).sum(-1, keepdims=True)  # [B, N, T, 1]
    others = np.broadcast_to(allowed & ~sinks, w.shape).any(-1, keepdims=True)
    s = np.where(others, f64(scale)[None, :, None, None], 1.0)
    factor = np.where(others, (1 - s * mass) / np.where(others, 1 - mass, 1), 1.0)
    w = np.where(sinks, w * s, w * factor)
    g = w.shape[1] // v.shape[2]
    return w, np.einsum("bnts,bsnh->btnh", w, np.repeat(f64(v), g, axis=2))


@pytest.mark.parametrize("form", ["is_causal", "mask_object", "bool_mask"])
def test_sink_calibration(form):
    """Edits.sinks (keys 0 and 1) with sink_scale [0.4, 1, 0, 1.5], causal (given as
    is_causal, a Mask object or a boolean array): output and captured weights equal the
    NumPy calibration; the head with scale 1 equals plain attention; rows 0 and 1 (nothing
    but sinks to attend to) are unchanged."""
    q, k, v = qkv(2)
    scale = jnp.array([0.4, 1.0, 0.0, 1.5])
    sinks = np.zeros(T, bool)
    sinks[:2] = True
    mask = {"is_causal": {"is_causal": True}, "mask_object": {"mask": masks.causal()},
            "bool_mask": {"mask": jnp.asarray(causal())}}[form]
    iv = Intervention(Edits(sinks=jnp.asarray(sinks), sink_scale=scale),
                      Capture("weights", heads=[0, 1, 2, 3]))
    out, cap = attend(q, k, v, intervention=iv, **mask)
    w0, plain = np_attention(q, k, v, allowed=causal())
    w, want = np_sinks(w0, v, allowed=causal(), sinks=sinks, scale=scale)
    close(out, want)
    close(cap["weights"], w)
    close(out[:, :, 1], plain[:, :, 1])  # scale 1: unchanged
    close(out[:, :2], plain[:, :2])  # rows with only sinks: unchanged
    np.testing.assert_allclose(f64(cap["weights"]).sum(-1), 1.0, atol=1e-5)  # still sums to 1
    # head 0 at row 6: sink weights * 0.4 (an independent spot check of the formula)
    close(cap["weights"][:, 0, 6, :2], 0.4 * w0[:, 0, 6, :2])
    assert not np.asarray(cap["weights"][:, 2, 2:, :2]).any()  # scale 0: sinks removed
    # captured at some heads and rows only: the same entries
    _, part = attend(q, k, v, intervention=Intervention(
        iv.edits, Capture(("weights", "heads"), heads=[3, 0], query_positions=[10, 1, 5])),
        **mask)
    close(part["weights"], w[:, [3, 0]][:, :, [10, 1, 5]])
    close(part["heads"], want[:, [10, 1, 5]][:, :, [3, 0]])


def test_sink_calibration_with_a_strong_sink():
    """A real attention sink: key 0 gets +13 on its logit (bias), so in many rows the other
    keys hold < 1e-5 of the mass. sink_scale [0.5, 1, 0, 0.9]: by the definition the sink's
    weight is scaled and the freed mass goes to the other keys in proportion, which the
    NumPy reference (float64) does; float32 separate passes over sinks and non-sinks would
    get it to ~1e-6 (they do: attend takes one pass over each)."""
    q, k, v = qkv(0)
    bias = np.zeros((1, 1, 1, T))
    bias[..., 0] = 13.0
    sinks = np.arange(T) < 1
    scale = jnp.array([0.5, 1.0, 0.0, 0.9])
    iv = Intervention(Edits(sinks=jnp.asarray(sinks), sink_scale=scale), Capture("weights"))
    out, cap = attend(q, k, v, jnp.asarray(bias, jnp.float32), is_causal=True,
                      intervention=iv)
    w0, _ = np_attention(q, k, v, allowed=causal(), bias=bias)
    w, want = np_sinks(w0, v, allowed=causal(), sinks=sinks, scale=scale)
    assert 1 - (w0 * sinks).sum(-1)[:, :, 1:].max() < 1e-6  # rows with other keys < 1e-6
    close(cap["weights"], w, 1e-4)
    close(out, want, 1e-4)


def test_captures_of_attend():
    """Captured "weights" (heads [3, 1], rows [0, 4, 10]) equal the dense softmax there;
    "heads" is [B, P, Nh, Hv] at those heads and rows; "query" likewise; "key" and "value"
    whole; no edits: the output is plain attention."""
    q, k, v = qkv(3)
    heads, rows = [3, 1], [0, 4, 10]
    iv = Intervention(capture=Capture(("weights", "heads", "query", "key", "value"),
                                      heads=heads, query_positions=rows))
    out, cap = attend(q, k, v, is_causal=True, intervention=iv)
    w, want = np_attention(q, k, v, allowed=causal())
    close(out, want)
    assert cap["weights"].shape == (B, 2, 3, T)
    close(cap["weights"], w[:, heads][:, :, rows])
    assert cap["heads"].shape == (B, 3, 2, HV)
    close(cap["heads"], want[:, rows][:, :, heads])
    np.testing.assert_array_equal(cap["query"], np.asarray(q)[:, rows][:, :, heads])
    np.testing.assert_array_equal(cap["key"], k)
    np.testing.assert_array_equal(cap["value"], v)


def test_gate_gradient_is_attribution_patching():
    """d metric / d gate at 1 = sum over (head output x d metric / d head output): the head
    outputs and the metric's derivative (metric = sum c * tanh(out)) written out in NumPy;
    gate [N] sums over the batch, gate [B, N] does not."""
    q, k, v = qkv(4)
    c = normal(12, (B, T, N, HV))

    def metric(gate):
        out, _ = attend(q, k, v, is_causal=True, intervention=Intervention(Edits(gate=gate)))
        return (c * jnp.tanh(out)).sum()

    _, heads = np_attention(q, k, v, allowed=causal())
    d = f64(c) * (1 - np.tanh(heads) ** 2)
    per_example = (heads * d).sum(axis=(1, 3))  # [B, N]
    close(jax.grad(metric)(jnp.ones(N)), per_example.sum(0), 1e-4)
    close(jax.jit(jax.grad(metric))(jnp.ones((B, N))), per_example, 1e-4)


def test_attend_under_jit_and_vmap():
    """attend under jax.jit (the Intervention an argument) and jax.vmap (over an extra
    leading axis of q, k, v; and over the gate values) equals the eager call per slice."""
    E = 3
    q, k, v = qkv(5, E=E)
    capture = Capture(("weights", "heads"), heads=[1], query_positions=[2, 9])
    iv = Intervention(Edits(gate=jnp.array([1.0, 0.0, 0.5, 1.0]), logit_bias=normal(13, (N, 1, T))),
                      capture)

    def run(q, k, v, iv):
        return attend(q, k, v, is_causal=True, intervention=iv)

    jitted = jax.jit(run)
    stacked = jax.jit(jax.vmap(run, in_axes=(0, 0, 0, None)))(q, k, v, iv)
    for e in range(E):
        eager = run(q[e], k[e], v[e], iv)
        for got in (jitted(q[e], k[e], v[e], iv),
                    jax.tree_util.tree_map(lambda x, e=e: x[e], stacked)):
            jax.tree_util.tree_map(lambda a, b: close(a, b, 1e-6), got, eager)
    gates = normal(14, (E, N))
    by_gate = jax.vmap(lambda g: run(q[0], k[0], v[0], Intervention(Edits(gate=g)))[0])(gates)
    _, plain = np_attention(q[0], k[0], v[0], allowed=causal())
    for e in range(E):
        close(by_gate[e], plain * f64(gates[e])[None, None, :, None])


def test_recompiles_only_when_the_spec_changes():
    """A jitted function of the Intervention traces once for two gate values (array leaves)
    and again for a different Capture (static)."""
    traces = []

    @jax.jit
    def run(q, k, v, iv):
        traces.append(iv.capture)
        return attend(q, k, v, is_causal=True, intervention=iv)

    q, k, v = qkv(6)
    _, plain = np_attention(q, k, v, allowed=causal())
    for gate in ([1.0, 0.0, 1.0, 1.0], [0.5, 2.0, 0.0, 1.0]):
        out, cap = run(q, k, v, Intervention(Edits(gate=jnp.array(gate)), Capture("weights")))
        close(out, plain * np.array(gate)[None, None, :, None])
    assert len(traces) == 1
    out, cap = run(q, k, v, Intervention(Edits(gate=jnp.ones(N)), Capture("heads")))
    assert len(traces) == 2 and set(cap) == {"heads"}
    run(q, k, v, Intervention(Edits(gate=jnp.zeros(N)), Capture("heads")))
    assert len(traces) == 2


# --------------------------------------------------------------------------------------------
# MultiHeadAttention, every chunked flavour


@pytest.mark.parametrize("implementation", ["xla", "chunked", "chunked_small_blocks"])
def test_multihead_attention_with_intervention(implementation):
    """MultiHeadAttention(implementation=...) with a gate, a heads patch and captures, at T=19
    (several tiles of the small-block chunked path): the projections, patched attention and
    output projection written out from the module's parameters."""
    Tm = 19
    mha = MultiHeadAttention(D, NH, implementation=as_implementation(implementation),
                             rngs=nnx.Rngs(1))
    x = normal(15, (B, Tm, D))
    gate = jnp.array([1.0, 0.0, 0.5, 1.5])
    values = normal(16, (D // NH,))
    iv = Intervention(Edits(gate=gate, heads=Edit(values=values,
                                                  where=select((1, Tm, NH, 1), a1=[17], a2=[3]))),
                      Capture(("weights", "heads"), heads=[3, 1], query_positions=[17, 0, 9]))
    y, cap = mha(x, intervention=iv)
    qkv_ = np_linear(f64(x), mha.proj.qkv_proj)
    q, k, v = (a.reshape(B, Tm, NH, D // NH) for a in np.split(qkv_, 3, axis=-1))
    w, heads = np_attention(q, k, v, allowed=causal(Tm))
    heads[:, 17, 3] = f64(values)
    heads = heads * f64(gate)[None, None, :, None]
    close(y, np_linear(heads.reshape(B, Tm, D), mha.out_proj))
    close(cap["weights"], w[:, [3, 1]][:, :, [17, 0, 9]])
    close(cap["heads"], heads[:, [17, 0, 9]][:, :, [3, 1]])
    close(mha(x), mha(x, intervention=Intervention(Edits(gate=jnp.ones(NH))))[0], 1e-6)


# --------------------------------------------------------------------------------------------
# TransformerLM


def test_lm_hand_forward_and_zero_gate(lm):
    """The written-out forward equals the model. A zero gate on every head of layer 1
    removes that layer's heads but NOT the out_proj bias: the head outputs are zeroed
    before the output projection, so the attention branch becomes out_proj(0) = its bias,
    at every position. The reference is therefore the forward whose layer-1 attention
    branch is exactly that bias (and it differs from dropping the branch altogether)."""
    close(lm(TOKENS), np_lm(lm, TOKENS)[0])
    bias = f64(lm.blocks[1].mixer.out_proj.bias[...])
    assert np.abs(bias).max() > 1e-3
    iv = Intervention(edits={1: Edits(gate=jnp.zeros(NH))},
                      capture=Capture(("attention", "heads"), layers=[1]))
    logits, cap = lm(TOKENS, intervention=iv)
    want, _, _ = np_lm(lm, TOKENS, attention={1: bias})
    close(logits, want)
    close(logits, np_lm(lm, TOKENS, gates={1: np.zeros(NH)})[0])
    close(cap[1]["attention"], np.broadcast_to(bias, (B, TL, D)))
    assert not np.asarray(cap[1]["heads"]).any()
    assert set(cap) == {1}
    removed = np_lm(lm, TOKENS, attention={1: np.zeros(D)})[0]
    assert np.abs(removed - want).max() > 1e-4
    # layer 0: a zero gate there changes layer 1's input too
    logits0, _ = lm(TOKENS, intervention=Intervention(edits={0: Edits(gate=jnp.zeros(NH))}))
    close(logits0, np_lm(lm, TOKENS, gates={0: np.zeros(NH)})[0])


def test_lm_identity_edits(lm):
    """A gate of ones, and Edits holding the run's own captured query/key/value/heads (layer
    0) and residual (layer 1), leave the logits as they are."""
    plain = lm(TOKENS)
    ones = {i: Edits(gate=jnp.ones(NH)) for i in range(L)}
    close(lm(TOKENS, intervention=Intervention(edits=ones))[0], plain, 1e-6)
    _, cap = lm(TOKENS, intervention=Intervention(
        capture=Capture(("query", "key", "value", "heads", "residual"))))
    edits = {0: Edits(query=Edit(values=cap[0]["query"]), key=Edit(values=cap[0]["key"]),
                      value=Edit(values=cap[0]["value"]), heads=Edit(values=cap[0]["heads"])),
             1: Edits(residual=Edit(values=cap[1]["residual"]))}
    close(lm(TOKENS, intervention=Intervention(edits=edits))[0], plain, 1e-6)
    # a residual delta is not the identity (not a constant vector: LayerNorm removes those)
    shifted, _ = lm(TOKENS, intervention=Intervention(
        edits={1: Edits(residual=Edit(delta=normal(17, (D,))))}))
    assert np.abs(np.asarray(shifted) - np.asarray(plain)).max() > 1e-3


def test_lm_captures(lm):
    """Captures at heads [2, 0] and rows [1, 7]: "weights" and "heads" equal the written-out
    forward's; "residual", "attention", "mlp" too, and residual[l + 1] = residual[l] +
    attention[l] + mlp[l] (no dropout); layer L holds the final stream; ``layers`` limits
    which layers appear."""
    heads, rows = [2, 0], [1, 7]
    capture = Capture(("weights", "heads", "residual", "attention", "mlp"), heads=heads,
                      query_positions=rows)
    logits, cap = lm(TOKENS, intervention=Intervention(capture=capture))
    want, records, final = np_lm(lm, TOKENS)
    close(logits, want)
    assert set(cap) == {0, 1, 2} and set(cap[2]) == {"residual"}
    for i, r in enumerate(records):
        assert cap[i]["heads"].shape == (B, 2, 2, D // NH)
        close(cap[i]["weights"], r["weights"][:, heads][:, :, rows])
        close(cap[i]["heads"], r["heads"][:, rows][:, :, heads])
        for name in ("residual", "attention", "mlp"):
            close(cap[i][name], r[name][:, rows])
        close(cap[i + 1]["residual"],
              f64(cap[i]["residual"]) + f64(cap[i]["attention"]) + f64(cap[i]["mlp"]), 1e-5)
    close(cap[L]["residual"], final[:, rows])
    _, some = lm(TOKENS, intervention=Intervention(capture=Capture("residual", layers=[1, 2])))
    assert set(some) == {1, 2}


def test_lm_gate_gradient_is_attribution_patching(lm):
    """In the model: d metric / d gate (layer 0, at 1) = sum over (captured head output x
    d metric / d head output), the latter the gradient with respect to a zero ``delta``
    on the heads (applied before the gate, so at gate 1 it is the head output's gradient).
    Metric: log-probability of token 3 at the last position."""

    def metric(gate, delta):
        iv = Intervention(edits={0: Edits(gate=gate, heads=Edit(delta=delta))},
                          capture=Capture("heads", layers=[0]))
        logits, cap = lm(TOKENS, intervention=iv)
        return jax.nn.log_softmax(logits[:, -1])[:, 3].sum(), cap[0]["heads"]

    grads, heads = jax.jit(jax.grad(metric, argnums=(0, 1), has_aux=True))(
        jnp.ones(NH), jnp.zeros((B, TL, NH, D // NH)))
    d_gate, d_heads = grads
    close(d_gate, (f64(heads) * f64(d_heads)).sum(axis=(0, 1, 3)), 1e-5)
    assert np.abs(f64(d_gate)).max() > 1e-3
    close(heads, np_lm(lm, TOKENS)[1][0]["heads"])


def test_lm_jit_and_chunked():
    """nnx.jit of the model with the Intervention as an argument traces once for two gate
    values and again for another Capture, and matches the eager call; models built with
    implementation="chunked" and the small-block chunked path give the same logits and
    captures."""
    traces = []

    @nnx.jit
    def run(model, tokens, iv):
        traces.append(iv.capture)
        return model(tokens, intervention=iv)

    models = {name: make_lm(mixer_options={"implementation": as_implementation(name)})
              for name in ("xla", "chunked", "chunked_small_blocks")}
    capture = Capture(("weights", "heads", "residual"), heads=[1], query_positions=[6])
    results = {}
    for gate in ([1.0, 0.0, 1.0, 0.5], [0.0, 1.0, 2.0, 1.0]):
        iv = Intervention(edits={0: Edits(gate=jnp.array(gate))}, capture=capture)
        eager = models["xla"](TOKENS, intervention=iv)
        jitted = run(models["xla"], TOKENS, iv)
        jax.tree_util.tree_map(lambda a, b: close(a, b, 1e-6), jitted, eager)
        close(eager[0], np_lm(models["xla"], TOKENS, gates={0: np.array(gate)})[0])
        results[tuple(gate)] = eager
    assert len(traces) == 1
    run(models["xla"], TOKENS, Intervention(edits={0: Edits(gate=jnp.ones(NH))},
                                            capture=Capture("weights")))
    assert len(traces) == 2
    for name in ("chunked", "chunked_small_blocks"):
        for gate, want in results.items():
            iv = Intervention(edits={0: Edits(gate=jnp.array(gate))}, capture=capture)
            got = models[name](TOKENS, intervention=iv)
            jax.tree_util.tree_map(lambda a, b: close(a, b, 1e-5), got, want)


# --------------------------------------------------------------------------------------------
# Errors


def test_attend_errors():
    q, k, v = qkv()

    def call(**iv):
        return attend(q, k, v, is_causal=True, intervention=Intervention(**iv))

    with pytest.raises(ValueError, match=r"capture\.heads"):
        call(capture=Capture("weights", heads=[0, N]))
    with pytest.raises(ValueError, match=r"capture\.query_positions"):
        call(capture=Capture("heads", query_positions=[T]))
    with pytest.raises(ValueError, match=r"capture\.layers"):
        call(capture=Capture("heads", layers=[0]))
    with pytest.raises(ValueError, match=r"edits\.gate"):
        call(edits=Edits(gate=jnp.ones(N + 1)))
    with pytest.raises(ValueError, match=r"edits\.sinks"):
        call(edits=Edits(sinks=jnp.ones(T, bool)))
    with pytest.raises(ValueError, match="return_lse"):
        attend(q, k, v, return_lse=True)
    with pytest.raises(ValueError, match="tensors"):
        Capture(("weights", "logits"))
    with pytest.raises(ValueError, match="heads"):
        Capture(heads=[1, 1])


def test_lm_errors(lm):
    def call(model=lm, **iv):
        return model(TOKENS, intervention=Intervention(**iv))

    with pytest.raises(ValueError, match=r"capture\.heads"):
        call(capture=Capture("weights", heads=[NH]))
    with pytest.raises(ValueError, match=r"capture\.query_positions"):
        call(capture=Capture("weights", query_positions=[TL]))
    with pytest.raises(ValueError, match=r"capture\.query_positions"):
        call(capture=Capture("residual", query_positions=[0, TL]))
    with pytest.raises(ValueError, match=r"intervention: edits for layers \[2\]"):
        call(edits={2: Edits(gate=jnp.ones(NH))})
    with pytest.raises(ValueError, match=r"capture\.layers"):
        call(capture=Capture("residual", layers=[L + 1]))
    with pytest.raises(ValueError, match="intervention"):
        call(edits=Edits(gate=jnp.ones(NH)))  # a model's edits are {layer: Edits}
    hybrid = make_lm(mixer=["attention", "linear"])
    with pytest.raises(ValueError, match="intervention: this layer's mixer"):
        call(hybrid, edits={1: Edits(gate=jnp.ones(NH))})
    with pytest.raises(ValueError, match="intervention: this layer's mixer"):
        call(hybrid, capture=Capture("weights", layers=[1]))
    # block tensors and attention edits of layer 0 are fine on the hybrid
    (logits, cap) = call(hybrid, edits={0: Edits(gate=jnp.ones(NH))},
                         capture=Capture(("residual", "mlp")))
    assert set(cap) == {0, 1, 2}
    close(logits, hybrid(TOKENS), 1e-6)
