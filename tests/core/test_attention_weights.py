"""jattn.attention_weights with selections (heads, query rows, key columns), the forward's
log-sum-exp and every masking option, against a dense softmax written out here in NumPy
float64 (forward) and in plain jnp float64 (gradients); jit, vmap, errors.

The weights rebuilt from an implementation's own lse check that implementation's lse too:
exp(logit - lse) sums to 1 over a row only if lse is the row's log-sum-exp.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jattn
from jattn import masks
from tests.conftest import (
    IMPLEMENTATIONS,
    as_implementation,
    assert_close,
    normal,
    output_and_vjp,
    to64,
)

B, T, S, N, K, H = 2, 37, 29, 4, 2, 8
HEADS = [3, 0]
ROWS = [0, 5, 17, 36]
COLUMNS = [28, 0, 4, 20, 13]


# --------------------------------------------------------------------------------------------
# The references, from the definition


def np_allowed(*, T=T, S=S, is_causal=False, window=None, query_seq_lengths=None,
               key_value_seq_lengths=None, query_segment_ids=None, kv_segment_ids=None,
               mask=None, bias_shape=None, **_):
    """bool [B, 1 | N, T, S]: query i may see key j."""
    i, j = np.arange(T)[:, None], np.arange(S)[None, :]
    ok = np.ones((B, 1, T, S), bool)
    if is_causal:
        ok &= j <= i
    if window is not None:
        left, right = window
        ok &= (j >= i - left) & (j <= i + right)
    if query_seq_lengths is not None:
        ok &= i < np.asarray(query_seq_lengths)[:, None, None, None]
    if key_value_seq_lengths is not None:
        ok &= j < np.asarray(key_value_seq_lengths)[:, None, None, None]
    if query_segment_ids is not None:
        q_ids, kv_ids = np.asarray(query_segment_ids), np.asarray(kv_segment_ids)
        ok = ok & (q_ids[:, None, :, None] == kv_ids[:, None, None, :])
    if mask is not None:
        ok = ok & np.asarray(mask)
    return ok


def np_weights(q, k, *, allowed, bias=None, scale=None, cap=None):
    """Dense softmax [B, N, T, S] in float64: softmax_S(cap(scale q k^T + bias)) over the
    allowed keys, zero rows where nothing is allowed. Query head n reads key head
    n // (N / K)."""
    q, k = np.asarray(q, np.float64), np.asarray(k, np.float64)
    n_heads, n_kv = q.shape[-2], k.shape[-2]
    k = np.repeat(k, n_heads // n_kv, axis=-2)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    logits = np.einsum("btnh,bsnh->bnts", q, k) * scale
    if bias is not None:
        logits = logits + np.asarray(bias, np.float64)
    if cap is not None:
        logits = cap * np.tanh(logits / cap)
    allowed = np.broadcast_to(allowed, logits.shape)
    logits = np.where(allowed, logits, -np.inf)
    top = logits.max(-1, keepdims=True)
    top = np.where(np.isfinite(top), top, 0.0)
    e = np.where(allowed, np.exp(logits - top), 0.0)
    total = e.sum(-1, keepdims=True)
    return e / np.where(total > 0, total, 1.0)


def jnp_weights(q, k, *, allowed, bias=None, scale=None, cap=None):
    """The same dense softmax in plain jnp (differentiable; float64 under x64). Masked
    logits never reach exp, so rows with nothing allowed have zero weights and zero
    gradients."""
    n_heads, n_kv = q.shape[-2], k.shape[-2]
    k = jnp.repeat(k, n_heads // n_kv, axis=-2)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    logits = jnp.einsum("btnh,bsnh->bnts", q, k) * scale
    if bias is not None:
        logits = logits + bias
    if cap is not None:
        logits = cap * jnp.tanh(logits / cap)
    allowed = jnp.broadcast_to(jnp.asarray(allowed), logits.shape)
    safe = jnp.where(allowed, logits, 0.0)
    top = jax.lax.stop_gradient(jnp.max(jnp.where(allowed, logits, -1e30), -1, keepdims=True))
    e = jnp.where(allowed, jnp.exp(safe - top), 0.0)
    total = e.sum(-1, keepdims=True)
    return e / jnp.where(total > 0, total, 1.0)


def select(w, heads=None, rows=None, columns=None):
    """w [..., N, T, S] at the selected heads, rows and columns."""
    if heads is not None:
        w = w[..., np.asarray(heads), :, :]
    if rows is not None:
        w = w[..., np.asarray(rows), :]
    if columns is not None:
        w = w[..., np.asarray(columns)]
    return w


# --------------------------------------------------------------------------------------------
# The cases: keyword arguments of both functions, and their NumPy reading


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    options: dict  # keywords of dot_product_attention and attention_weights
    reading: dict  # keywords of np_allowed and np_weights
    columns: tuple[int, ...] | None = None


_rng = np.random.default_rng(7)
_ids_q = np.sort(_rng.integers(0, 3, (B, T)), -1).astype(np.int32)
_ids_kv = np.sort(_rng.integers(0, 3, (B, S)), -1).astype(np.int32)
_ids_kv[1] = 5  # batch 1: no key shares a segment with any query: every row empty
_dense = _rng.random((B, 1, T, S)) < 0.7
_dense[0, 0, 9] = False  # a row with nothing allowed
_bias = _rng.standard_normal((1, N, T, S))

CASES = {
    # Causal + a window (right side beyond the causal edge), GQA, a soft cap, and batch 0
    # with no keys at all (every row of it empty): every implementation, Pallas included.
    "causal_window_cap_empty_batch": Case(
        "causal_window_cap_empty_batch",
        dict(is_causal=True, local_window_size=(6, 3), logits_soft_cap=1.5,
             key_value_seq_lengths=jnp.array([0, 23], jnp.int32)),
        dict(is_causal=True, window=(6, 3), cap=1.5, key_value_seq_lengths=[0, 23]),
        columns=tuple(COLUMNS)),
    # A bias (the Pallas kernels take none: skipped there), a boolean mask with an empty row,
    # segment ids (batch 1 all empty), query lengths.
    "bias_dense_segments": Case(
        "bias_dense_segments",
        dict(bias=jnp.asarray(_bias, jnp.float32), mask=jnp.asarray(_dense),
             query_segment_ids=jnp.asarray(_ids_q), kv_segment_ids=jnp.asarray(_ids_kv),
             query_seq_lengths=jnp.array([30, 37], jnp.int32), scale=0.6),
        dict(bias=_bias, mask=_dense, query_segment_ids=_ids_q, kv_segment_ids=_ids_kv,
             query_seq_lengths=[30, 37], scale=0.6)),
    # A jattn.masks.Mask object (a two-sided band), bias and cap together.
    "mask_object_bias_cap": Case(
        "mask_object_bias_cap",
        dict(mask=masks.local_window(4, 2), bias=jnp.asarray(_bias, jnp.float32),
             logits_soft_cap=2.0),
        dict(window=(4, 2), bias=_bias, cap=2.0),
        columns=(3, 3, 7)),
}


def reference(case: Case, q, k):
    """np_weights of the case, dense [B, N, T, S]."""
    r = dict(case.reading)
    allowed = np_allowed(**r)
    return np_weights(q, k, allowed=allowed, bias=r.get("bias"), scale=r.get("scale"),
                      cap=r.get("cap"))


def split(options: dict):
    """(bias, mask, the other keywords) of a case's options."""
    options = dict(options)
    return options.pop("bias", None), options.pop("mask", None), options


def inputs(dtype=jnp.float32, seed=0):
    return (normal(seed, (B, T, N, H), dtype), normal(seed + 1, (B, S, K, H), dtype),
            normal(seed + 2, (B, S, K, H), dtype))


def lse_and_weights(implementation, case: Case, q, k, v, *, heads=HEADS, rows=ROWS,
                    columns=None):
    """jit: the implementation's lse, and the weights rebuilt from it at the selection."""
    bias, mask, options = split(case.options)

    @jax.jit
    def run(q, k, v, bias):
        _, lse = jattn.dot_product_attention(q, k, v, bias, mask, return_lse=True,
                                             implementation=implementation, **options)
        return lse, jattn.attention_weights(q, k, bias, mask, lse=lse, heads=heads,
                                            query_positions=rows, key_positions=columns,
                                            **options)

    return run(q, k, v, bias)


def assert_weights(got, want, rtol=1e-5, atol=1e-6):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape, (got.shape, want.shape)
    np.testing.assert_array_equal(got[want == 0], 0.0)  # masked keys, empty rows: exact 0
    np.testing.assert_allclose(got, want, rtol=rtol, atol=atol)


# --------------------------------------------------------------------------------------------
# Forward


@pytest.mark.parametrize("case", ["causal_window_cap_empty_batch", "bias_dense_segments"])
@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_weights_from_each_implementations_lse(implementation, case):
    """exp(logit - lse) with the implementation's own float32 lse, at heads [3, 0], four
    rows and (first case) five key columns, equals the float64 dense softmax."""
    case = CASES[case]
    q, k, v = inputs()
    try:
        lse, got = lse_and_weights(as_implementation(implementation), case, q, k, v,
                                   columns=case.columns)
    except NotImplementedError as e:
        pytest.skip(f"{implementation}: {e}")
    want = reference(case, q, k)
    assert got.dtype == jnp.float32
    assert_weights(got, select(want, HEADS, ROWS, case.columns))
    assert lse.shape == (B, N, T)
    empty = ~np_allowed(**case.reading).any(-1)  # [B, 1, T]
    assert empty[0, 0].all() if case.name.startswith("causal") else empty[1, 0].all()
    assert np.all(np.asarray(lse)[np.broadcast_to(empty, lse.shape)] == -np.inf)
    # All rows and keys from the lse: each nonempty row sums to 1, empty rows are 0.
    full = lse_and_weights(as_implementation(implementation), case, q, k, v, heads=None,
                           rows=None)[1]
    np.testing.assert_allclose(np.asarray(full).sum(-1),
                               np.broadcast_to(~empty, (B, N, T)).astype(float), atol=2e-6)


def test_float64_with_x64():
    """float64 inputs under x64: float64 weights from the float64 lse of "xla" and
    "chunked", to 1e-12 of the NumPy softmax."""
    case = CASES["mask_object_bias_cap"]
    with jax.enable_x64(True):
        q, k, v = inputs(jnp.float64)
        opts = dict(case.options, bias=jnp.asarray(case.reading["bias"], jnp.float64))
        case64 = dataclasses.replace(case, options=opts)
        want = select(reference(case, q, k), HEADS, ROWS, case.columns)
        for implementation in ("xla", "chunked"):
            lse, got = lse_and_weights(implementation, case64, q, k, v, columns=case.columns)
            assert lse.dtype == jnp.float64 and got.dtype == jnp.float64
            assert_weights(got, want, rtol=1e-12, atol=1e-14)
        bias, mask, options = split(opts)
        got = jattn.attention_weights(q, k, bias, mask, heads=HEADS, query_positions=ROWS,
                                      **options)
        assert got.dtype == jnp.float64
        assert_weights(got, select(reference(case, q, k), HEADS, ROWS), rtol=1e-12,
                       atol=1e-14)


@pytest.mark.parametrize("case", list(CASES))
def test_without_lse_selection_equals_full_map(case):
    """No lse: each selected row normalised here over all its keys; the selection (with
    key_positions: normalised first, then the columns taken) equals the same entries of
    the full map, and both equal the NumPy softmax."""
    case = CASES[case]
    q, k, _ = inputs()
    bias, mask, options = split(case.options)
    columns = COLUMNS if case.columns is None else case.columns

    @jax.jit
    def run(q, k, bias):
        full = jattn.attention_weights(q, k, bias, mask, **options)
        part = jattn.attention_weights(q, k, bias, mask, heads=HEADS, query_positions=ROWS,
                                       key_positions=columns, **options)
        rows = jattn.attention_weights(q, k, bias, mask, heads=HEADS, query_positions=ROWS,
                                       **options)
        return full, part, rows

    full, part, rows = run(q, k, bias)
    want = reference(case, q, k)
    assert full.shape == (B, N, T, S)
    assert_weights(full, want)
    # The same numbers up to float32 rounding (XLA fuses the three differently).
    assert_weights(part, select(np.asarray(full), HEADS, ROWS, columns), rtol=1e-6, atol=1e-7)
    assert_weights(rows, select(np.asarray(full), HEADS, ROWS), rtol=1e-6, atol=1e-7)
    assert part.shape == (B, len(HEADS), len(ROWS), len(columns))


# --------------------------------------------------------------------------------------------
# Gradients


@pytest.mark.parametrize("implementation,case", [
    ("xla", "causal_window_cap_empty_batch"), ("xla", "bias_dense_segments"),
    ("chunked", "causal_window_cap_empty_batch"), ("chunked", "bias_dense_segments"),
    ("chunked_small_blocks", "causal_window_cap_empty_batch")])
def test_gradients_through_lse(implementation, case):
    """d/dq, d/dk of a random projection of the selected weights, the lse computed by
    dot_product_attention inside the differentiated function (so the gradient also flows
    through the forward's backward pass), against the plain-jnp float64 dense softmax;
    rows with nothing allowed give exactly zero (finite) gradients."""
    case = CASES[case]
    q, k, v = inputs(seed=3)
    bias, mask, options = split(case.options)
    columns = case.columns
    r = case.reading
    allowed = np_allowed(**r)

    def fn(q, k):
        _, lse = jattn.dot_product_attention(
            q, k, v, bias, mask, return_lse=True,
            implementation=as_implementation(implementation), **options)
        return jattn.attention_weights(q, k, bias, mask, lse=lse, heads=HEADS,
                                       query_positions=ROWS, key_positions=columns, **options)

    def ref(q, k):
        w = jnp_weights(q, k, allowed=allowed, bias=None if bias is None else r["bias"],
                        scale=r.get("scale"), cap=r.get("cap"))
        return select(w, HEADS, ROWS, columns)

    cot = normal(11, (B, len(HEADS), len(ROWS), S if columns is None else len(columns)))
    got, (dq, dk) = output_and_vjp(fn, cot)(q, k)
    with jax.enable_x64(True):
        want, (want_dq, want_dk) = output_and_vjp(ref, to64(cot))(*to64((q, k)))
    assert np.isfinite(dq).all() and np.isfinite(dk).all()
    assert_close(got, want, jnp.float32, "forward")
    assert_close(dq, want_dq, jnp.float32, "grad")
    assert_close(dk, want_dk, jnp.float32, "grad")
    # The empty batch/rows: exactly zero gradients.
    empty_batch = 0 if case.name.startswith("causal") else 1
    assert not np.asarray(dq[empty_batch]).any() and not np.asarray(dk[empty_batch]).any()
    assert np.asarray(dq[1 - empty_batch]).any()


# --------------------------------------------------------------------------------------------
# jit, vmap, traced positions


def test_jit_vmap_and_traced_positions():
    """Under jax.vmap over an extra leading axis (and as a second batch axis), and with the
    positions traced under jit, the weights are those of each slice."""
    E = 3
    case = CASES["causal_window_cap_empty_batch"]
    _, _, options = split(case.options)
    options.pop("key_value_seq_lengths")  # per-example data; the vmapped slices share none
    q = normal(20, (E, B, T, N, H))
    k = normal(21, (E, B, S, K, H))
    v = normal(22, (E, B, S, K, H))

    def one(q, k, v, rows, columns):
        _, lse = jattn.dot_product_attention(q, k, v, return_lse=True, **options)
        return jattn.attention_weights(q, k, lse=lse, heads=HEADS, query_positions=rows,
                                       key_positions=columns, **options)

    rows, columns = jnp.asarray(ROWS), jnp.asarray(COLUMNS)
    stacked = jax.jit(jax.vmap(one, in_axes=(0, 0, 0, None, None)))(q, k, v, rows, columns)
    batched = jax.jit(one)(q, k, v, rows, columns)  # [E, B] as two batch axes
    assert stacked.shape == batched.shape == (E, B, len(HEADS), len(ROWS), len(COLUMNS))
    allowed = np_allowed(is_causal=True, window=(6, 3))
    for e in range(E):
        want = select(np_weights(q[e], k[e], allowed=allowed, cap=1.5), HEADS, ROWS, COLUMNS)
        assert_weights(stacked[e], want)
        assert_weights(batched[e], want)


# --------------------------------------------------------------------------------------------
# Errors


@pytest.mark.parametrize("name,value,match", [
    ("heads", [1, 4], "heads"),
    ("query_positions", [0, T], "query_positions"),
    ("key_positions", [-1], "key_positions"),
    ("query_positions", [[0, 1]], "query_positions"),
    ("lse", np.zeros((B, N, T + 1), np.float32), "lse"),
    ("lse", np.zeros((B, T, N), np.float32), "lse"),
], ids=["heads_N", "row_T", "column_negative", "rows_2d", "lse_long", "lse_transposed"])
def test_bad_input_names_the_argument(name, value, match):
    q, k, _ = inputs()
    kwargs = {name: jnp.asarray(value)}
    with pytest.raises(ValueError, match=match):
        jattn.attention_weights(q, k, is_causal=True, **kwargs)


def test_lse_without_positions_wrong_batch():
    q, k, _ = inputs()
    with pytest.raises(ValueError, match="lse"):
        jattn.attention_weights(q, k, lse=jnp.zeros((1, N, T)), heads=[0])

