"""The shared softmax-attention suite: every implementation against the float64 reference.

Each case is a full call of ``jattn.dot_product_attention``; forward and gradients (w.r.t.
query, key, value, bias, through the output and the log-sum-exp) are compared with
``jattn.reference`` run in float64.
"""

from __future__ import annotations

import dataclasses
import functools
import zlib
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jattn
from jattn import masks, reference
from tests.conftest import (
    IMPLEMENTATIONS,
    KERNELS,
    as_implementation,
    assert_close,
    normalised_error,
    to64,
)


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    T: int = 37
    S: int = 37
    N: int = 4
    K: int = 2
    H: int = 8
    Hv: int = 8
    B: int = 2
    bias: tuple[int, ...] | None = None  # shape of the bias, if any
    options: Callable[[Case, np.random.RandomState], dict] = lambda c, r: {}
    jax_nn: bool = True  # only options jax.nn.dot_product_attention also has
    bias_neg_inf: bool = False  # some bias entries, and all of row 3, are -inf


def _packed_ids(rng, B, length, pieces):
    """Sorted segment ids, ``pieces`` documents per row."""
    cuts = np.sort(rng.choice(np.arange(1, length), pieces - 1, replace=False))
    return np.stack([np.searchsorted(cuts, np.arange(length), side="right")] * B).astype(np.int32)


def _visual(rng, B, T):
    """Rows with a text prefix, an image block, then text."""
    out = np.zeros((B, T), bool)
    for b in range(B):
        start = rng.randint(0, T // 3)
        out[b, start:start + T // 2] = True
    return jnp.asarray(out)


CASES = [
    Case("plain"),
    Case("causal", options=lambda c, r: {"is_causal": True}),
    Case("cross", S=45),
    Case("cross_causal_more_keys", S=53, options=lambda c, r: {"is_causal": True}),
    Case("cross_causal_fewer_keys", S=21, options=lambda c, r: {"is_causal": True}),
    Case("mha", K=4, options=lambda c, r: {"is_causal": True}),
    Case("mqa", K=1),
    Case("value_head_dim", Hv=5, jax_nn=False),
    Case("window_int", options=lambda c, r: {"local_window_size": 4}),
    Case("window_left", options=lambda c, r: {"local_window_size": (6, 0)}),
    Case("window_cross", S=45, options=lambda c, r: {"local_window_size": (2, 9)}),
    Case("window_causal", options=lambda c, r: {"local_window_size": (5, 5), "is_causal": True}),
    Case("lengths", S=45, options=lambda c, r: {
        "query_seq_lengths": jnp.array([37, 20], jnp.int32),
        "key_value_seq_lengths": jnp.array([30, 45], jnp.int32)}),
    Case("lengths_empty_rows", options=lambda c, r: {
        "key_value_seq_lengths": jnp.array([0, 15], jnp.int32), "is_causal": True}),
    Case("segment_ids", jax_nn=False, options=lambda c, r: {
        "query_segment_ids": _packed_ids(r, c.B, c.T, 4)}),
    Case("segment_ids_cross", S=45, jax_nn=False, options=lambda c, r: {
        "query_segment_ids": _packed_ids(r, c.B, c.T, 3),
        "kv_segment_ids": _packed_ids(r, c.B, c.S, 3)}),
    Case("mask_TS", options=lambda c, r: {"mask": r.rand(c.T, c.S) < 0.6}),
    Case("mask_BNTS", options=lambda c, r: {"mask": r.rand(c.B, c.N, c.T, c.S) < 0.6}),
    Case("mask_B1TS", S=45, options=lambda c, r: {"mask": r.rand(c.B, 1, c.T, c.S) < 0.5}),
    Case("mask_1N1S", options=lambda c, r: {"mask": r.rand(1, c.N, 1, c.S) < 0.5}),
    Case("mask_empty_rows", options=lambda c, r: {
        "mask": np.concatenate([np.zeros((5, c.S), bool), r.rand(c.T - 5, c.S) < 0.5])}),
    Case("causal_offset", S=53, jax_nn=False,
         options=lambda c, r: {"mask": masks.causal(c.S - c.T)}),
    Case("prefix_lm", jax_nn=False, options=lambda c, r: {"mask": masks.prefix_lm([5, 20])}),
    Case("composite_visual", jax_nn=False,
         options=lambda c, r: {"mask": masks.composite_visual(_visual(r, c.B, c.T))}),
    Case("mixed_visual", jax_nn=False,
         options=lambda c, r: {"mask": masks.mixed_visual(_visual(r, c.B, c.T))}),
    Case("modality_mutual", jax_nn=False,
         options=lambda c, r: {"mask": masks.modality_mutual(_visual(r, c.B, c.T))}),
    Case("adjacency", jax_nn=False,
         options=lambda c, r: {"mask": masks.adjacency(r.rand(c.B, c.T, c.T) < 0.2)}),
    Case("mask_algebra", jax_nn=False, options=lambda c, r: {
        "mask": (masks.local_window(9, 9) & ~masks.causal(-3))
        | masks.segments(_packed_ids(r, c.B, c.T, 3))}),
    Case("soft_cap", jax_nn=False,
         options=lambda c, r: {"logits_soft_cap": 1.5, "is_causal": True}),
    Case("bias_full", bias=(2, 4, 37, 37)),
    Case("bias_broadcast", S=45, bias=(1, 4, 1, 45), options=lambda c, r: {"is_causal": True}),
    Case("bias_TS", bias=(37, 37), options=lambda c, r: {"local_window_size": 7}),
    Case("bias_neg_inf", bias=(2, 1, 37, 37), bias_neg_inf=True, jax_nn=False),
    Case("scale", options=lambda c, r: {"scale": 0.9}),
    Case("everything", S=45, Hv=6, bias=(1, 4, 37, 45), jax_nn=False, options=lambda c, r: {
        "is_causal": True, "local_window_size": (20, 3),
        "key_value_seq_lengths": jnp.array([45, 30], jnp.int32),
        "query_segment_ids": _packed_ids(r, c.B, c.T, 2),
        "kv_segment_ids": _packed_ids(r, c.B, c.S, 2),
        "logits_soft_cap": 2.0, "scale": 0.5}),
]
CASE_IDS = [c.name for c in CASES]
# The Pallas kernels run in interpret mode, which is slow on a CPU: they take the cases that
# exercise a distinct path of theirs (no bias: they raise NotImplementedError for it).
KERNEL_CASES = {
    "plain", "causal", "cross_causal_more_keys", "cross_causal_fewer_keys", "mqa",
    "value_head_dim", "window_cross", "window_causal", "lengths", "lengths_empty_rows",
    "segment_ids_cross", "mask_BNTS", "mask_1N1S", "causal_offset", "prefix_lm",
    "mask_algebra", "soft_cap", "scale"}
KERNEL_BF16_CASES = {"causal", "value_head_dim", "segment_ids_cross", "soft_cap"}
# TPU interpret mode simulates the chip and is slower still: half the cases, each path once.
TPU_CASES = {"causal", "cross_causal_fewer_keys", "mqa", "value_head_dim", "lengths_empty_rows",
             "segment_ids_cross", "mask_algebra", "soft_cap", "mask_1N1S"}
# At its default tiles the chunked path covers a short sequence with one tile per axis, no
# padding: one pass through its code, which "chunked_small_blocks" then runs over every case
# with many tiles, padding and both tile kinds. These cases take each input kind once there.
ONE_TILE_CASES = {"plain", "causal", "cross_causal_fewer_keys", "value_head_dim",
                  "lengths_empty_rows", "segment_ids_cross", "mask_algebra", "soft_cap",
                  "bias_full", "bias_neg_inf", "everything"}


def implementation_cases(cases, kernel_cases=KERNEL_CASES):
    """(implementation, case) pairs: every case for "xla" and the chunked path at small
    tiles, :data:`ONE_TILE_CASES` at its default tiles, the ``kernel_cases`` for the kernels
    (fewer for the TPU kernel)."""
    def runs(impl, name):
        if impl == "chunked":
            return name in ONE_TILE_CASES
        if impl not in KERNELS:
            return True
        return name in kernel_cases and (KERNELS[impl] != "tpu" or name in TPU_CASES)
    return [pytest.param(impl, c, id=f"{impl}-{c.name}") for impl in IMPLEMENTATIONS
            for c in cases if runs(impl, c.name)]


def make_inputs(case: Case, dtype=jnp.float32):
    rng = np.random.RandomState(zlib.crc32(case.name.encode()))
    q = rng.randn(case.B, case.T, case.N, case.H)
    k = rng.randn(case.B, case.S, case.K, case.H)
    v = rng.randn(case.B, case.S, case.K, case.Hv)
    bias = None if case.bias is None else rng.randn(*case.bias)
    if case.bias_neg_inf:
        bias[rng.rand(*case.bias) < 0.3] = -np.inf
        bias[..., 3, :] = -np.inf
    arrays = [jnp.asarray(x, dtype) if x is not None else None for x in (q, k, v, bias)]
    cotangents = (jnp.asarray(rng.randn(case.B, case.T, case.N, case.Hv), jnp.float32),
                  jnp.asarray(rng.randn(case.B, case.N, case.T), jnp.float32))
    return arrays, case.options(case, rng), cotangents


def _loss(fn, options, cotangents):
    """<out, c_out> + <lse, c_lse> over finite lse, so both outputs carry gradient."""
    c_out, c_lse = cotangents

    def loss(q, k, v, bias):
        out, lse = fn(q, k, v, bias, return_lse=True, **options)
        lse = jnp.where(jnp.isfinite(lse), lse, 0)
        return (out.astype(c_out.dtype) * c_out).sum() + (lse.astype(c_lse.dtype) * c_lse).sum()

    return loss


def reference_outputs(case: Case, arrays, options, cotangents):
    """Forward (out, lse) and grads w.r.t. (q, k, v, bias) from the float64 reference."""
    with jax.enable_x64(True):
        arrays64, cot64 = to64(arrays), to64(cotangents)
        out, lse = reference.dot_product_attention(*arrays64, return_lse=True, **options)
        argnums = (0, 1, 2, 3) if arrays[3] is not None else (0, 1, 2)
        grads = jax.grad(_loss(reference.dot_product_attention, options, cot64),
                         argnums=argnums)(*arrays64)
        return np.asarray(out), np.asarray(lse), [np.asarray(g) for g in grads]


@functools.cache
def case_reference(case: Case, dtype=jnp.float32):
    """(inputs, options, cotangents) of ``case`` and their float64 reference outputs,
    computed once per case and dtype for every implementation that is checked on them."""
    arrays, options, cot = make_inputs(case, dtype)
    return (arrays, options, cot), reference_outputs(case, arrays, options, cot)


def run_implementation(implementation, case, arrays, options, cotangents):
    def fn(*args, **kw):
        return jattn.dot_product_attention(*args, implementation=as_implementation(implementation),
                                           **kw)

    out, lse = jax.jit(lambda *a: fn(*a, return_lse=True, **options))(*arrays)
    argnums = (0, 1, 2, 3) if arrays[3] is not None else (0, 1, 2)
    grads = jax.jit(jax.grad(_loss(fn, options, cotangents), argnums=argnums))(*arrays)
    return out, lse, grads


@pytest.mark.parametrize("implementation,case", implementation_cases(CASES))
def test_matches_float64_reference(implementation, case):
    (arrays, options, cot), (want_out, want_lse, want_grads) = case_reference(case)
    out, lse, grads = run_implementation(implementation, case, arrays, options, cot)
    assert out.dtype == jnp.float32 and out.shape == want_out.shape
    assert lse.dtype == jnp.float32 and lse.shape == (case.B, case.N, case.T)
    assert_close(out, want_out, jnp.float32, "forward")
    assert_close(lse, want_lse, jnp.float32, "forward")
    for got, want in zip(grads, want_grads, strict=True):
        assert_close(got, want, jnp.float32, "grad")


@pytest.mark.parametrize("implementation,case", implementation_cases(
    [c for c in CASES if c.name in (
        "causal", "cross", "mqa", "value_head_dim", "segment_ids_cross", "bias_broadcast",
        "soft_cap", "everything", "lengths_empty_rows")], KERNEL_BF16_CASES))
def test_bfloat16(implementation, case):
    """bf16 in, bf16 out, float32 statistics: compare with float64 on the same bf16 inputs."""
    (arrays, options, cot), (want_out, want_lse, want_grads) = case_reference(
        case, jnp.bfloat16)
    out, lse, grads = run_implementation(implementation, case, arrays, options, cot)
    assert out.dtype == jnp.bfloat16 and lse.dtype == jnp.float32
    assert_close(out, want_out, jnp.bfloat16, "forward")
    assert_close(lse, want_lse, jnp.bfloat16, "forward")
    for got, want in zip(grads, want_grads, strict=True):
        assert got.dtype == jnp.bfloat16
        assert_close(got, want, jnp.bfloat16, "grad")


def test_empty_rows_are_zero_with_zero_gradient(implementation):
    case = next(c for c in CASES if c.name == "mask_empty_rows")
    arrays, options, cot = make_inputs(case)
    out, lse, (dq, dk, dv) = run_implementation(implementation, case, arrays, options, cot)
    assert np.all(np.asarray(out)[:, :5] == 0)
    assert np.all(np.asarray(lse)[:, :, :5] == -np.inf)
    assert np.all(np.asarray(dq)[:, :5] == 0)
    assert all(np.isfinite(np.asarray(g)).all() for g in (out, dq, dk, dv))


# jax.nn's semantics are checked on "xla"; every other implementation equals the same
# reference as "xla" does (test_matches_float64_reference), so it inherits them.
@pytest.mark.parametrize("implementation,case", [
    pytest.param("xla", c, id=f"xla-{c.name}") for c in CASES if c.jax_nn])
def test_parity_with_jax_nn(implementation, case):
    """Any call valid for jax.nn gives jax.nn's result (rows with something to attend to)."""
    arrays, options, _ = make_inputs(case)
    q, k, v, bias = arrays
    if bias is not None:
        bias = bias.reshape((1,) * (4 - bias.ndim) + bias.shape)
    nn_options = dict(options)
    if "mask" in nn_options:
        mask = jnp.asarray(nn_options["mask"])
        nn_options["mask"] = mask.reshape((1,) * (4 - mask.ndim) + mask.shape)
    want = jax.nn.dot_product_attention(q, k, v, bias, implementation="xla", **nn_options)
    got, lse = jattn.dot_product_attention(q, k, v, bias, return_lse=True,
                                           implementation=as_implementation(implementation),
                                           **options)
    has_keys = np.isfinite(np.asarray(lse)).transpose(0, 2, 1)[..., None]  # [B, T, N, 1]
    err = normalised_error(np.where(has_keys, got, 0), np.where(has_keys, want, 0))
    assert err <= 2e-5


@pytest.mark.parametrize("kernel", KERNELS)
def test_kernels_raise_not_implemented_for_what_they_lack(kernel):
    """A bias, dropout, DiffQKV value heads, float64 or a head dim over 256: the dispatcher
    moves on (here to "xla")."""
    (q, k, v, bias), _, _ = make_inputs(next(c for c in CASES if c.name == "bias_full"))
    calls = [dict(bias=bias), dict(dropout_rate=0.1, dropout_rng=jax.random.key(0)),
             dict(value=v[:, :, :1])]
    for extra in calls:
        args = dict(query=q, key=k, value=v) | extra
        with pytest.raises(NotImplementedError, match=kernel):
            jattn.dot_product_attention(**args, implementation=as_implementation(kernel))
        jattn.dot_product_attention(**args, implementation=[as_implementation(kernel), "xla"])
    wide = jnp.ones((1, 4, 1, 264))
    with pytest.raises(NotImplementedError, match="head dims"):
        jattn.dot_product_attention(wide, wide, wide, implementation=as_implementation(kernel))
    with jax.enable_x64(True), pytest.raises(NotImplementedError, match="float64"):
        q64 = jnp.ones((1, 4, 1, 8), jnp.float64)
        jattn.dot_product_attention(q64, q64, q64, implementation=as_implementation(kernel))


def test_pallas_picks_the_platform_kernel():
    q = jnp.ones((1, 4, 1, 8))
    if jax.default_backend() not in ("gpu", "tpu"):
        with pytest.raises(NotImplementedError, match="GPU or TPU"):
            jattn.dot_product_attention(q, q, q, implementation="pallas")
    for name in ("pallas_gpu", "pallas_tpu"):  # registered, default tiles, interpret off-device
        out = jattn.dot_product_attention(q, q, q, is_causal=True, implementation=name)
        np.testing.assert_allclose(out, q, atol=1e-6)


def test_return_residual_as_in_jax_nn(implementation):
    case = next(c for c in CASES if c.name == "causal")
    (q, k, v, _), options, _ = make_inputs(case)
    out, residual = jattn.dot_product_attention(
        q, k, v, return_residual=True, implementation=as_implementation(implementation),
        **options)
    want_out, want_residual = jax.nn.dot_product_attention(q, k, v, return_residual=True,
                                                           **options)
    assert residual.shape == want_residual.shape == (case.B, case.T, case.N)
    np.testing.assert_allclose(out, want_out, atol=2e-5)
    np.testing.assert_allclose(residual, want_residual, atol=2e-5)
    with pytest.raises(ValueError, match="return_lse"):
        jattn.dot_product_attention(q, k, v, return_residual=True, return_lse=True)


def test_batch_free_inputs(implementation):
    case = next(c for c in CASES if c.name == "everything")
    if implementation in KERNELS:  # the kernels take no bias
        case = dataclasses.replace(case, bias=None)
    arrays, options, _ = make_inputs(case)
    batched = jattn.dot_product_attention(
        *arrays, implementation=as_implementation(implementation), return_lse=True, **options)
    q, k, v, bias = arrays
    per_example = {name: (jnp.asarray(x)[1] if name.endswith(("ids", "lengths")) else x)
                   for name, x in options.items()}
    out, lse = jattn.dot_product_attention(q[1], k[1], v[1], None if bias is None else bias[0],
                                           implementation=as_implementation(implementation),
                                           return_lse=True, **per_example)
    assert out.shape == (case.T, case.N, case.Hv) and lse.shape == (case.N, case.T)
    np.testing.assert_allclose(out, batched[0][1], atol=1e-6)
    np.testing.assert_allclose(lse, batched[1][1], atol=1e-6)


@pytest.mark.parametrize("implementation", ["xla", "chunked"])
def test_several_leading_batch_axes(implementation):
    """query [2, 3, T, N, H] as flax and tokamax accept it: every per-example argument has
    the same two batch axes, and the result is the [6, ...] call's, reshaped."""
    rng = np.random.default_rng(3)
    T, S, N, K, H = 9, 11, 4, 2, 8
    q = jnp.asarray(rng.standard_normal((2, 3, T, N, H)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((2, 3, S, K, H)), jnp.float32)
    v = jnp.asarray(rng.standard_normal((2, 3, S, K, H)), jnp.float32)
    bias = jnp.asarray(rng.standard_normal((3, N, 1, S)), jnp.float32)  # broadcast over axis 0
    mask = jnp.asarray(rng.random((2, 3, 1, T, S)) < 0.8)
    kv_lengths = jnp.asarray(rng.integers(1, S + 1, (2, 3)))
    q_ids = jnp.asarray(np.sort(rng.integers(0, 2, (2, 3, T)), -1))
    kv_ids = jnp.asarray(np.sort(rng.integers(0, 2, (2, 3, S)), -1))
    out, lse = jattn.dot_product_attention(
        q, k, v, bias, mask, key_value_seq_lengths=kv_lengths, query_segment_ids=q_ids,
        kv_segment_ids=kv_ids, implementation=as_implementation(implementation), return_lse=True)
    assert out.shape == (2, 3, T, N, H) and lse.shape == (2, 3, N, T)

    def flat(x, tail):  # [2, 3, *rest] -> [6, *rest]
        return x.reshape(6, *x.shape[x.ndim - tail:])

    with jax.enable_x64(True):
        want, want_lse = reference.dot_product_attention(
            *(flat(x, 3).astype(jnp.float64) for x in (q, k, v)),
            jnp.broadcast_to(bias, (2, 3, N, 1, S)).reshape(6, N, 1, S).astype(jnp.float64),
            flat(mask, 3), key_value_seq_lengths=kv_lengths.reshape(6),
            query_segment_ids=flat(q_ids, 1), kv_segment_ids=flat(kv_ids, 1), return_lse=True)
    assert_close(out.reshape(want.shape), want, jnp.float32, "forward")
    finite = np.isfinite(np.asarray(want_lse))
    np.testing.assert_allclose(np.asarray(lse).reshape(want_lse.shape)[finite],
                               np.asarray(want_lse)[finite], rtol=1e-5)
    weights = jattn.attention_weights(q, k, bias, mask)
    assert weights.shape == (2, 3, N, T, S)
    with pytest.raises(ValueError, match="key"):
        jattn.dot_product_attention(q, k[:1], v)
    with pytest.raises(ValueError, match="key_value_seq_lengths"):
        jattn.dot_product_attention(q, k, v, key_value_seq_lengths=kv_lengths.reshape(6))


def test_vmap_and_remat(implementation):
    case = next(c for c in CASES if c.name == "segment_ids")
    arrays, options, _ = make_inputs(case)
    q, k, v, _ = arrays
    ids = jnp.asarray(options["query_segment_ids"])

    def one(q, k, v, ids):
        return jattn.dot_product_attention(q, k, v, query_segment_ids=ids, is_causal=True,
                                           implementation=as_implementation(implementation))

    stacked = jax.vmap(one)(q, k, v, ids)  # vmap over the batch of batch-free calls
    want = one(q, k, v, ids)
    np.testing.assert_allclose(stacked, want, atol=1e-6)

    if KERNELS.get(implementation) == "tpu" and jax.default_backend() != "tpu":
        return  # TPU interpret mode runs callbacks, which jax.checkpoint cannot replay

    def loss(q):
        return jax.checkpoint(one)(q, k, v, ids).sum()

    np.testing.assert_allclose(jax.grad(loss)(q), jax.grad(lambda q: one(q, k, v, ids).sum())(q),
                               atol=1e-6)


def test_auto_implementation_works_on_cpu():
    q = jnp.ones((1, 8, 2, 4))
    out = jattn.dot_product_attention(q, q, q, is_causal=True)
    np.testing.assert_allclose(out, jnp.ones((1, 8, 2, 4)), atol=1e-6)
    assert {"xla", "chunked", "cudnn", "pallas"} <= set(jattn.implementations())


def test_implementation_list_falls_through():
    q = jnp.ones((1, 8, 2, 8), jnp.float32)
    # cudnn refuses float32 (and non-GPU backends); the list moves on to chunked.
    out = jattn.dot_product_attention(q, q, q, implementation=["cudnn", "chunked"])
    np.testing.assert_allclose(out, q, atol=1e-6)
    with pytest.raises(NotImplementedError, match="cudnn"):
        jattn.dot_product_attention(q, q, q, implementation="cudnn")


@pytest.mark.parametrize("K,Kv,T", [(2, 4, 37), (4, 1, 37), (1, 8, 37), (2, 8, 300)])
def test_separate_value_heads(K, Kv, T):
    """DiffQKV (P68): value heads Kv != key heads K; query head n reads key head n // (N / K)
    and value head n // (N / Kv). The reference repeats K and V separately. T=300 is past one
    chunked tile: the auto choice moves on from chunked to xla."""
    rng = np.random.RandomState(K * 10 + Kv)
    q, k, v = (jnp.asarray(rng.randn(2, T, h, 8), jnp.float32) for h in (8, K, Kv))
    cot = (jnp.asarray(rng.randn(2, T, 8, 8), jnp.float32),
           jnp.asarray(rng.randn(2, 8, T), jnp.float32))
    case = Case("diffqkv", T=T, S=T, N=8, K=K)
    options = {"is_causal": True}
    want_out, want_lse, want_grads = reference_outputs(case, [q, k, v, None], options, cot)
    # Independent check of the head mapping itself: one query head at a time.
    n = 5
    one = reference.dot_product_attention(q[:, :, n:n + 1], k[:, :, n // (8 // K)][:, :, None],
                                          v[:, :, n // (8 // Kv)][:, :, None], is_causal=True)
    assert_close(want_out[:, :, n:n + 1], one, jnp.float32, "forward")
    for implementation in ("xla", None):
        out, lse, grads = run_implementation(implementation, case, [q, k, v, None], options,
                                             cot)
        assert out.shape == (2, T, 8, 8)
        assert_close(out, want_out, jnp.float32, "forward")
        assert_close(lse, want_lse, jnp.float32, "forward")
        for got, want in zip(grads, want_grads, strict=True):
            assert_close(got, want, jnp.float32, "grad")
    with pytest.raises(NotImplementedError, match="value heads"):
        jattn.dot_product_attention(q, k, v, implementation="chunked")
    with pytest.raises(ValueError, match="value heads Kv=3"):
        jattn.dot_product_attention(q, k, v[:, :, :1].repeat(3, axis=2))


@pytest.mark.parametrize("options", [{}, {"is_causal": True},
                                     {"mask": masks.local_window(3, 0), "scale": 0.7}])
def test_attention_weights_are_the_softmax_of_the_reference(options):
    # Values = one-hot key positions: the reference's output is then its probability map.
    rng = np.random.RandomState(0)
    q = jnp.asarray(rng.randn(2, 9, 4, 8), jnp.float32)
    k = jnp.asarray(rng.randn(2, 11, 2, 8), jnp.float32)
    bias = jnp.asarray(rng.randn(1, 4, 9, 11), jnp.float32)
    one_hot = jnp.broadcast_to(jnp.eye(11)[None, :, None, :], (2, 11, 2, 11))
    opts = dict(options)
    if "mask" in opts:
        opts["mask"] = opts["mask"].materialize(9, 11)[0, 0]
    want = reference.dot_product_attention(q, k, one_hot, bias, **opts)  # [B, T, N, S]
    got = jattn.attention_weights(q, k, bias, **options)
    assert_close(got, jnp.moveaxis(want, 2, 1), jnp.float32, "forward")


def test_cudnn_rejects_masks_it_cannot_express():
    from jattn.core.attention import _cudnn_mask_options

    assert _cudnn_mask_options(masks.causal() & masks.local_window(4, 0)) == (True, (4, 0),
                                                                               None, None)
    with pytest.raises(NotImplementedError, match="Segments"):
        _cudnn_mask_options(masks.causal() & masks.segments(jnp.zeros((1, 4), jnp.int32)))
    with pytest.raises(NotImplementedError, match="Or"):
        _cudnn_mask_options(masks.prefix_lm(2))


@pytest.mark.gpu
@pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU")
def test_cudnn_matches_reference_on_gpu():
    case = next(c for c in CASES if c.name == "lengths")
    arrays, options, cot = make_inputs(case, jnp.bfloat16)
    options = {**options, "is_causal": True}
    want_out, _, _ = reference_outputs(case, arrays, options, cot)
    got = jattn.dot_product_attention(*arrays[:3], implementation="cudnn", **options)
    assert_close(got, want_out, jnp.bfloat16, "forward")


# --------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------

Q = jnp.zeros((2, 8, 4, 16))
KV = jnp.zeros((2, 10, 2, 16))

BAD_INPUTS = [
    ("query_rank", dict(query=jnp.zeros((8, 16))), ValueError, "query"),
    ("key_rank", dict(key=jnp.zeros((10, 2, 16))), ValueError, "key"),
    ("integer_query", dict(query=jnp.zeros((2, 8, 4, 16), jnp.int32)), TypeError, "query"),
    ("dtype_mismatch", dict(key=KV.astype(jnp.bfloat16)), TypeError, "key"),
    ("heads_do_not_divide", dict(key=jnp.zeros((2, 10, 3, 16)), value=jnp.zeros((2, 10, 3, 16))),
     ValueError, "heads"),
    ("head_dim", dict(key=jnp.zeros((2, 10, 2, 8))), ValueError, "key"),
    ("batch", dict(key=jnp.zeros((3, 10, 2, 16)), value=jnp.zeros((3, 10, 2, 16))),
     ValueError, "key"),
    ("value_length", dict(value=jnp.zeros((2, 9, 2, 16))), ValueError, "value"),
    ("bias_shape", dict(bias=jnp.zeros((2, 4, 8, 9))), ValueError, "bias"),
    ("bias_integer", dict(bias=jnp.zeros((8, 10), jnp.int32)), TypeError, "bias"),
    ("mask_dtype", dict(mask=jnp.zeros((8, 10), jnp.float32)), TypeError, "mask"),
    ("mask_shape", dict(mask=jnp.zeros((3, 1, 8, 10), bool)), ValueError, "mask"),
    ("mask_object_length", dict(mask=masks.segments(jnp.zeros((2, 7), jnp.int32))),
     ValueError, "mask"),
    ("q_lengths_range", dict(query_seq_lengths=jnp.array([9, 1])), ValueError,
     "query_seq_lengths"),
    ("kv_lengths_negative", dict(key_value_seq_lengths=jnp.array([-1, 1])), ValueError,
     "key_value_seq_lengths"),
    ("lengths_shape", dict(key_value_seq_lengths=jnp.array([1, 2, 3])), ValueError,
     "key_value_seq_lengths"),
    ("lengths_float", dict(query_seq_lengths=jnp.array([1.0, 2.0])), TypeError,
     "query_seq_lengths"),
    ("segment_shape", dict(query_segment_ids=jnp.zeros((2, 7), jnp.int32),
                           kv_segment_ids=jnp.zeros((2, 10), jnp.int32)), ValueError,
     "query_segment_ids"),
    ("segment_dtype", dict(query_segment_ids=jnp.zeros((2, 8)),
                           kv_segment_ids=jnp.zeros((2, 10), jnp.int32)), TypeError,
     "query_segment_ids"),
    ("segment_one_sided_cross", dict(query_segment_ids=jnp.zeros((2, 8), jnp.int32)),
     ValueError, "segment_ids"),
    ("window_negative", dict(local_window_size=(-1, 2)), ValueError, "local_window_size"),
    ("window_form", dict(local_window_size=(1, 2, 3)), ValueError, "local_window_size"),
    ("soft_cap", dict(logits_soft_cap=0.0), ValueError, "logits_soft_cap"),
    ("implementation", dict(implementation="nope"), ValueError, "implementation"),
    ("dropout_rate", dict(dropout_rate=1.0, dropout_rng=jax.random.key(0)), ValueError,
     "dropout_rate"),
    ("dropout_rng", dict(dropout_rate=0.1), ValueError, "dropout_rng"),
]


@pytest.mark.parametrize("name,changes,error,argument", BAD_INPUTS,
                         ids=[b[0] for b in BAD_INPUTS])
def test_bad_input(name, changes, error, argument):
    call = {"query": Q, "key": KV, "value": KV} | changes
    with pytest.raises(error, match=argument):
        jattn.dot_product_attention(**call)


# --------------------------------------------------------------------------------------------
# Attention dropout
# --------------------------------------------------------------------------------------------


def test_dropout_equals_masked_probabilities():
    """out = (keep * softmax / (1 - p)) v for the Bernoulli keep-mask the key draws."""
    q, k, v = (jax.random.normal(jax.random.key(i), (2, 6, 3, 4)) for i in range(3))
    rng, rate = jax.random.key(7), 0.25
    got = jattn.dot_product_attention(q, k, v, is_causal=True, dropout_rate=rate,
                                      dropout_rng=rng, implementation="xla")
    keep = np.asarray(jax.random.bernoulli(rng, 1 - rate, (2, 3, 6, 6)))
    qn, kn, vn = (np.asarray(x, np.float64) for x in (q, k, v))
    logits = np.einsum("btnh,bsnh->bnts", qn, kn) / 2.0
    logits = np.where(np.tril(np.ones((6, 6), bool)), logits, -np.inf)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    want = np.einsum("bnts,bsnh->btnh", probs * keep / (1 - rate), vn)
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert 0 < (~keep).mean() < 0.5  # the draw really dropped something


def test_dropout_is_unbiased_and_needs_a_capable_implementation():
    q, k, v = (jax.random.normal(jax.random.key(i), (1, 8, 1, 4)) for i in range(3))
    plain = jattn.dot_product_attention(q, k, v)
    draws = jax.vmap(lambda r: jattn.dot_product_attention(
        q, k, v, dropout_rate=0.5, dropout_rng=r))(jax.random.split(jax.random.key(1), 4000))
    np.testing.assert_allclose(draws.mean(0), plain, atol=0.08)
    with pytest.raises(NotImplementedError, match="dropout"):
        jattn.dot_product_attention(q, k, v, dropout_rate=0.5, dropout_rng=jax.random.key(0),
                                    implementation="chunked")
