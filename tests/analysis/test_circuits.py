"""Circuit tools (P25, P32) against the model written out in NumPy (tests/analysis/
lm_by_hand.py): ablations, activation patching over heads and positions, attribution
patching, path patching, direct logit attribution, circuit overlap, errors."""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jattn.nn
from jattn.analysis import Capture, Intervention, attend, circuits
from jattn.nn.analysis import head_outputs_in_stream, logit_attribution
from tests.analysis import lm_by_hand
from tests.conftest import normal

L, N, T, V = 3, 4, 8, 20
CLEAN = jnp.array([[1, 5, 2, 7, 3, 9, 4, 5]])
CORRUPT = jnp.array([[1, 6, 2, 8, 3, 9, 4, 6]])
ALL = Capture(("heads", "residual", "attention", "mlp"))


@pytest.fixture(scope="module")
def lm():
    return jattn.nn.TransformerLM(V, 16, L, num_heads=N, max_length=16, rngs=nnx.Rngs(3))


def metric(logits):
    return logits[0, -1, 5] - logits[0, -1, 6]


def runs(lm):
    clean = lambda iv: lm(CLEAN, intervention=iv)  # noqa: E731
    corrupt = lambda iv: lm(CORRUPT, intervention=iv)  # noqa: E731
    return clean, corrupt, clean(Intervention(capture=ALL))[1], corrupt(Intervention(
        capture=ALL))[1]


def test_activation_patching_matches_the_model_written_out(lm):
    clean, corrupt, clean_cap, _ = runs(lm)
    got = circuits.activation_patching(corrupt, clean_cap, metric, layers=[0, 2], num_heads=N)
    _, rec = lm_by_hand.forward(lm, CLEAN)
    for row, layer in enumerate([0, 2]):
        for h in range(N):
            def edit(i, name, x, layer=layer, h=h):
                if (i, name) == (layer, "heads"):
                    x = x.copy()
                    x[:, :, h] = rec[layer]["heads"][:, :, h]
                return x
            want = metric(lm_by_hand.forward(lm, CORRUPT, edit)[0])
            np.testing.assert_allclose(got[row, h], want, rtol=1e-4, atol=1e-5)
    positions = circuits.activation_patching(corrupt, clean_cap, metric, layers=[1],
                                             over="positions")
    for t in range(T):
        def edit(i, name, x, t=t):
            if (i, name) == (1, "residual"):
                x = x.copy()
                x[:, t] = rec[1]["residual"][:, t]
            return x
        want = metric(lm_by_hand.forward(lm, CORRUPT, edit)[0])
        np.testing.assert_allclose(positions[0, t], want, rtol=1e-4, atol=1e-5)
    # patching a run with its own values changes nothing
    same = circuits.activation_patching(clean, clean_cap, metric, layers=[1], num_heads=N)
    np.testing.assert_allclose(same, np.full((1, N), metric(lm(CLEAN))), rtol=1e-5)


def test_ablations(lm):
    clean, _, _, corrupt_cap = runs(lm)
    for kind in circuits.ABLATIONS:
        edits = circuits.head_ablation({1: [0, 3]}, N, kind=kind, reference={1: corrupt_cap[1]})
        got = metric(clean(Intervention(edits=edits))[0])

        def edit(i, name, x, kind=kind):
            if i != 1:
                return x
            x = x.copy()
            if kind == "zero" and name == "heads":
                x[:, :, [0, 3]] = 0
            if kind == "mean" and name == "heads":
                x[:, :, [0, 3]] = np.asarray(corrupt_cap[1]["heads"]).mean(0)[:, [0, 3]]
            if kind == "query" and name == "query":
                x[:, :, [0, 3]] = 0
            return x
        want = metric(lm_by_hand.forward(lm, CLEAN, edit)[0])
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5, err_msg=kind)
    # query-zero: a uniform causal average of the values
    q = normal(0, (1, 6, 2, 4))
    k, v = normal(1, (1, 6, 2, 4)), normal(2, (1, 6, 2, 4))
    edits = circuits.head_ablation({0: [1]}, 2, kind="query")[0]
    out, _ = attend(q, k, v, is_causal=True, intervention=Intervention(edits))
    want = np.cumsum(np.asarray(v)[0, :, 1], 0) / np.arange(1, 7)[:, None]
    np.testing.assert_allclose(out[0, :, 1], want, rtol=1e-5, atol=1e-6)


def test_gate_attribution_is_the_gradient_of_the_gates(lm):
    clean, *_ = runs(lm)
    got = circuits.gate_attribution(clean, metric, layers=[0, 2], num_heads=N)
    # central differences of the hand-written model in float64
    for row, layer in enumerate([0, 2]):
        for h in range(N):
            values = []
            for eps in (1e-4, -1e-4):
                def edit(i, name, x, layer=layer, h=h, eps=eps):
                    if (i, name) == (layer, "heads"):
                        x = x.copy()
                        x[:, :, h] *= 1 + eps
                    return x
                values.append(metric(lm_by_hand.forward(lm, CLEAN, edit)[0]))
            np.testing.assert_allclose(got[row, h], (values[0] - values[1]) / 2e-4,
                                       rtol=2e-3, atol=1e-4)


def test_path_patching_follows_only_the_direct_path(lm):
    clean, _, clean_cap, corrupt_cap = runs(lm)
    _, rec_clean = lm_by_hand.forward(lm, CLEAN)
    _, rec_corrupt = lm_by_hand.forward(lm, CORRUPT)
    sender, receiver = (0, 2), (2, 1)
    for tensor in ("query", "key", "value"):
        got = circuits.path_patching(clean, clean_cap, corrupt_cap, metric, sender=sender,
                                     receiver=receiver, tensor=tensor, num_heads=N)

        # the receiver's input: the clean stream plus the sender head's change projected by
        # its slice of W_O, nothing else
        def first(i, name, x):
            if (i, name) == (0, "heads"):
                x = x.copy()
                x[:, :, 2] = rec_corrupt[0]["heads"][:, :, 2]
            if (name in ("attention", "mlp") and i == 1) or (i, name) == (0, "mlp"):
                x = rec_clean[i][name]
            return x
        _, rec = lm_by_hand.forward(lm, CLEAN, first)

        def second(i, name, x, rec=rec, tensor=tensor):
            if (i, name) == (2, tensor):
                x = x.copy()
                x[:, :, 1] = rec[2][tensor][:, :, 1]
            return x
        want = metric(lm_by_hand.forward(lm, CLEAN, second)[0])
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5, err_msg=tensor)
        # ... and that input is the clean stream plus the projected change of the sender
        delta = np.asarray(head_outputs_in_stream(
            lm.blocks[0].mixer, jnp.asarray(rec_corrupt[0]["heads"] - rec_clean[0]["heads"],
                                            jnp.float32)))[:, :, 2]
        np.testing.assert_allclose(rec[2]["residual"], rec_clean[2]["residual"] + delta,
                                   rtol=1e-4, atol=1e-5)


def test_direct_logit_attribution_against_numpy():
    rng = np.random.default_rng(0)
    comps = rng.normal(size=(2, 3, 5, 8))  # [B, P, C, d]
    final = comps.sum(-2) + rng.normal(size=(2, 3, 8))
    unembed, g = rng.normal(size=(8, 11)), rng.normal(size=8)
    for norm in ("layernorm", "rmsnorm"):
        got = circuits.direct_logit_attribution(comps, final, unembed, norm=norm,
                                                norm_scale=g, epsilon=1e-5)
        if norm == "layernorm":
            sigma = np.sqrt(final.var(-1) + 1e-5)
            centred = comps - comps.mean(-1, keepdims=True)
        else:
            sigma = np.sqrt((final ** 2).mean(-1) + 1e-5)
            centred = comps
        want = np.einsum("bpcd,d,dv->bpcv", centred / sigma[..., None, None], g, unembed)
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_logit_attribution_of_the_model_sums_to_its_logits(lm):
    got = logit_attribution(lm, CLEAN, positions=[3, 7])
    total = (got["heads"].sum((2, 3)) + got["layers"].sum((2, 3)) + got["embedding"]
             + got["bias"])
    logits, rec = lm_by_hand.forward(lm, CLEAN)
    np.testing.assert_allclose(got["logits"], logits[:, [3, 7]], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(total, logits[:, [3, 7]], rtol=1e-4, atol=1e-4)
    # one head's entry: its output through its slice of W_O and the frozen final norm
    final = rec[L]["residual"][:, [3, 7]]
    sigma = np.sqrt(final.var(-1) + lm.final_norm.epsilon)
    W = np.asarray(lm.blocks[1].mixer.out_proj.kernel[...], np.float64).reshape(N, 4, 16)
    c = rec[1]["heads"][:, [3, 7], 2] @ W[2]
    c = (c - c.mean(-1, keepdims=True)) / sigma[..., None] * np.asarray(lm.final_norm.scale[...])
    want = c @ np.asarray(lm.embed.tokens.embedding[...], np.float64).T
    np.testing.assert_allclose(got["heads"][:, :, 1, 2], want, rtol=1e-4, atol=1e-5)


def test_circuit_overlap_brute_force():
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(3, 4)), rng.normal(size=(3, 4))
    for k in (1, 3, 12):
        def top(s, k=k):
            pairs = sorted(itertools.product(range(3), range(4)), key=lambda p: -abs(s[p]))
            return set(pairs[:k])
        assert circuits.top_heads(a, k) == top(a)
        assert circuits.circuit_overlap(a, b, k) == len(top(a) & top(b)) / k
    assert circuits.circuit_overlap(a, a, 5) == 1.0


def test_tools_run_under_jit(lm):
    graph, state = nnx.split(lm)

    @jax.jit
    def attribution(state):
        model = nnx.merge(graph, state)
        return circuits.gate_attribution(lambda iv: model(CLEAN, intervention=iv), metric,
                                         layers=[1], num_heads=N)
    np.testing.assert_allclose(attribution(state), circuits.gate_attribution(
        runs(lm)[0], metric, layers=[1], num_heads=N), rtol=1e-5, atol=1e-6)


def test_errors(lm):
    clean, _, clean_cap, corrupt_cap = runs(lm)
    with pytest.raises(ValueError, match="kind"):
        circuits.head_ablation({0: [1]}, N, kind="resample")
    with pytest.raises(ValueError, match=r"heads\[0\]"):
        circuits.head_ablation({0: [4]}, N)
    with pytest.raises(ValueError, match="reference"):
        circuits.head_ablation({0: [1]}, N, kind="mean")
    with pytest.raises(ValueError, match="source"):
        circuits.activation_patching(clean, {}, metric, layers=[0], num_heads=N)
    with pytest.raises(ValueError, match="over"):
        circuits.activation_patching(clean, clean_cap, metric, layers=[0], over="layers")
    with pytest.raises(ValueError, match="receiver"):
        circuits.path_patching(clean, clean_cap, corrupt_cap, metric, sender=(1, 0),
                               receiver=(1, 2), num_heads=N)
    with pytest.raises(ValueError, match="receiver"):
        circuits.path_patching(clean, clean_cap, corrupt_cap, metric, sender=(0, 0),
                               receiver=(1, 7), num_heads=N)
    with pytest.raises(ValueError, match="tensor"):
        circuits.path_patching(clean, clean_cap, corrupt_cap, metric, sender=(0, 0),
                               receiver=(1, 1), tensor="heads", num_heads=N)
    with pytest.raises(ValueError, match="k"):
        circuits.circuit_overlap(np.ones((2, 2)), np.ones((2, 2)), 5)
    with pytest.raises(ValueError, match="norm"):
        circuits.direct_logit_attribution(np.ones((1, 2)), np.ones(2), np.ones((2, 3)),
                                          norm="batchnorm")
