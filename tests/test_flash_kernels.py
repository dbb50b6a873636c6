"""The Pallas flash kernels at their own interface, in interpret mode on CPU.

Both backends take the same arguments (pallas_kernels.flash.common describes the mask pieces)
and are checked against jattn.reference.dot_product_attention given the equivalent dense
mask: output, log-sum-exp, and the gradients of both.
"""

from __future__ import annotations

import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import assert_close, normal, output_and_vjp
from jattn import reference
from pallas_kernels.flash.common import EMPTY, FULL, PARTIAL, BlockSizes, cdiv, schedule

BACKENDS = ["gpu", "tpu"]
# Small tiles so that short sequences span several tiles and none is a whole number of them.
BLOCKS = {"gpu": BlockSizes(16, 16), "tpu": BlockSizes(16, 16)}


def kernel(backend):
    module = importlib.import_module(f"pallas_kernels.flash.{backend}")
    return module.flash_attention


def dense_mask(spec: dict, B: int, T: int, S: int) -> np.ndarray:
    """The mask ``spec`` describes, written out: bool [B, 1 | N, T, S]."""
    i = np.arange(T)[:, None]
    j = np.arange(S)[None, :]
    ok = np.ones((B, 1, T, S), bool)
    if spec.get("lo") is not None:
        ok &= j - i >= spec["lo"]
    if spec.get("hi") is not None:
        ok &= j - i <= spec["hi"]
    if spec.get("q_segment_ids") is not None:
        q, kv = np.asarray(spec["q_segment_ids"]), np.asarray(spec["kv_segment_ids"])
        ok &= q[:, None, :, None] == kv[:, None, None, :]
    if spec.get("q_lengths") is not None:
        ok &= i < np.asarray(spec["q_lengths"])[:, None, None, None]
    if spec.get("kv_lengths") is not None:
        ok &= j < np.asarray(spec["kv_lengths"])[:, None, None, None]
    if spec.get("dense_mask") is not None:
        ok = ok & np.asarray(spec["dense_mask"])
    return ok


def block_map_of(allowed: np.ndarray, bq: int, bk: int) -> np.ndarray:
    """Exact tile kinds of a dense mask [Bm, Nm, T, S] (padding counts as neither)."""
    Bm, Nm, T, S = allowed.shape
    nq, nk = cdiv(T, bq), cdiv(S, bk)
    kinds = np.zeros((Bm, Nm, nq, nk), np.int8)
    for a in range(nq):
        for c in range(nk):
            tile = allowed[:, :, a * bq:(a + 1) * bq, c * bk:(c + 1) * bk]
            kinds[:, :, a, c] = np.where(tile.all((2, 3)), FULL,
                                         np.where(tile.any((2, 3)), PARTIAL, EMPTY))
    return kinds


def check_against_reference(backend, *, B=2, T=37, S=37, N=4, K=2, H=32, Hv=None,
                            dtype=jnp.float32, scale=None, logits_soft_cap=None, spec=None,
                            with_block_map=True, seed=0):
    spec = dict(spec or {})
    Hv = H if Hv is None else Hv
    q = normal(seed, (B, T, N, H), dtype)
    k = normal(seed + 1, (B, S, K, H), dtype)
    v = normal(seed + 2, (B, S, K, Hv), dtype)
    allowed = dense_mask(spec, B, T, S)
    blocks = BLOCKS[backend]
    if with_block_map:
        spec["block_map"] = jnp.asarray(block_map_of(allowed, blocks.block_q, blocks.block_kv))
    spec = {name: (jnp.asarray(x) if isinstance(x, np.ndarray) else x)
            for name, x in spec.items()}
    cotangent = (normal(seed + 3, (B, T, N, Hv), dtype), normal(seed + 4, (B, N, T)))

    flash = kernel(backend)
    got = output_and_vjp(lambda q, k, v: flash(
        q, k, v, scale=scale, logits_soft_cap=logits_soft_cap, block_sizes=blocks,
        interpret=True, **spec), cotangent)(q, k, v)

    def ref(q, k, v):
        out, lse = reference.dot_product_attention(
            q, k, v, mask=jnp.asarray(allowed), scale=scale, logits_soft_cap=logits_soft_cap,
            return_lse=True)
        # Empty rows have lse = -inf in the reference; only their (zero) output is compared.
        return out, jnp.where(jnp.isfinite(lse), lse, 0)

    with jax.enable_x64(True):
        want = output_and_vjp(ref, jax.tree.map(lambda x: x.astype(jnp.float64), cotangent))(
            *(x.astype(jnp.float64) for x in (q, k, v)))

    (out, lse), grads = got
    (want_out, want_lse), want_grads = want
    assert out.dtype == dtype and out.shape == (B, T, N, Hv)
    assert lse.dtype == jnp.float32 and lse.shape == (B, N, T)
    assert_close(out, want_out, dtype, "forward")
    rows = np.isfinite(np.asarray(want_lse)) & allowed.any(-1)
    assert_close(np.where(rows, lse, 0), want_lse, dtype, "forward")
    for name, g, w in zip("qkv", grads, want_grads, strict=True):
        assert g.dtype == dtype, name
        assert_close(g, w, dtype, "grad")


@pytest.fixture(params=BACKENDS)
def backend(request):
    return request.param


def test_schedule_lists_the_nonempty_tiles_of_each_row():
    block_map = np.random.default_rng(0).integers(0, 3, (2, 3, 4, 5)).astype(np.int8)
    s = schedule(jnp.asarray(block_map))
    for idx in np.ndindex(block_map.shape[:3]):
        row = block_map[idx]
        cols = np.flatnonzero(row != EMPTY)
        count = int(s.count[idx])
        assert count == len(cols)
        np.testing.assert_array_equal(s.index[idx][:count], cols)
        np.testing.assert_array_equal(s.kind[idx][:count], row[cols])
        assert (np.asarray(s.kind[idx][count:]) == EMPTY).all()
        assert (np.asarray(s.index[idx][count:]) == (cols[-1] if count else 0)).all()


@pytest.mark.parametrize("case", [
    dict(),
    dict(spec=dict(hi=0)),
    dict(spec=dict(lo=-5, hi=3)),
    dict(T=20, S=45, spec=dict(q_lengths=np.array([20, 7]), kv_lengths=np.array([45, 18]))),
    dict(spec=dict(q_segment_ids=np.repeat([[0, 1, 2], [0, 0, 1]], [10, 20, 7], axis=1),
                   kv_segment_ids=np.repeat([[0, 1, 2], [0, 0, 1]], [10, 20, 7], axis=1))),
    dict(spec=dict(hi=0, dense_mask=np.random.default_rng(5).random((2, 4, 37, 37)) < 0.3)),
    dict(logits_soft_cap=3.0, scale=0.4, spec=dict(hi=0)),
    dict(N=3, K=1, H=40, Hv=24),
    dict(spec=dict(hi=0), with_block_map=False),
], ids=["full", "causal", "window", "cross-lengths", "segments", "dense", "softcap", "mqa-dims",
        "no-block-map"])
def test_matches_reference_float32(backend, case):
    check_against_reference(backend, **case)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_matches_reference_half(backend, dtype):
    check_against_reference(backend, dtype=dtype, spec=dict(hi=0))


def test_empty_tiles_are_never_visited(backend):
    """Keys and values in tiles the block map calls EMPTY are NaN: visiting one would poison
    the output or the gradients."""
    B, T, S, N, H = 1, 40, 48, 2, 32
    blocks = BLOCKS[backend]
    kv_len = S - blocks.block_kv  # the last key tile holds only masked keys
    q = normal(0, (B, T, N, H))
    k = normal(1, (B, S, N, H)).at[:, kv_len:].set(jnp.nan)
    v = normal(2, (B, S, N, H)).at[:, kv_len:].set(jnp.nan)
    allowed = dense_mask(dict(kv_lengths=np.array([kv_len])), B, T, S)
    block_map = block_map_of(allowed, blocks.block_q, blocks.block_kv)
    assert (block_map[..., -1] == EMPTY).all()
    flash = kernel(backend)

    def loss(q, k, v):
        out, lse = flash(q, k, v, kv_lengths=jnp.array([kv_len]),
                         block_map=jnp.asarray(block_map), block_sizes=blocks, interpret=True)
        return (out ** 2).sum() + lse.sum()

    value, grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))(q, k, v)
    assert np.isfinite(value)
    assert np.isfinite(grads[0]).all()
    assert np.isfinite(grads[1][:, :kv_len]).all() and np.isfinite(grads[2][:, :kv_len]).all()
