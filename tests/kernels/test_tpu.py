"""TPU flash kernel specifics, in TPU interpret mode on CPU: real-TPU tile sizes and wide
head dims, per-head block maps with GQA, that FULL tiles skip the mask and EMPTY tiles are
never read, empty rows, vmap, block-size rules and argument errors. The shared
tests/kernels/test_flash.py covers the mask pieces against the reference."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jattn import reference
from pallas_kernels.flash import tpu
from pallas_kernels.flash.common import EMPTY, FULL, PARTIAL, BlockSizes
from pallas_kernels.flash.tpu import default_block_sizes, flash_attention
from tests.conftest import (
    assert_close,
    block_map_of,
    check_kernel_against_reference,
    dense_mask,
    normal,
)


def test_real_tpu_tile_sizes_and_wide_heads():
    """Blocks a TPU accepts (128 x 256), H = 256 and Hv = 200 (not a power of two): the
    lane-tiling paths of the statistics, two query tiles and one padded kv tile."""
    B, T, S, N, K, H, Hv = 1, 150, 200, 2, 1, 256, 200
    blocks = BlockSizes(128, 256)
    q, k, v = normal(0, (B, T, N, H)), normal(1, (B, S, K, H)), normal(2, (B, S, K, Hv))
    spec = dict(lo=-120, hi=0)
    allowed = dense_mask(spec, B, T, S)
    block_map = jnp.asarray(block_map_of(allowed, 128, 256))
    cotangent = normal(3, (B, T, N, Hv))

    def loss(fn, *args):
        out = fn(*args)
        return (out * cotangent).sum(), out

    def flash(q, k, v):
        return flash_attention(q, k, v, block_map=block_map, block_sizes=blocks,
                               interpret=True, **spec)[0]

    def ref(q, k, v):
        return reference.dot_product_attention(q, k, v, mask=jnp.asarray(allowed))

    grad = jax.value_and_grad(loss, argnums=(1, 2, 3), has_aux=True)
    (_, out), grads = jax.jit(grad, static_argnums=0)(flash, q, k, v)
    with jax.enable_x64(True):
        (_, want), want_grads = grad(ref, *(x.astype(jnp.float64) for x in (q, k, v)))
    assert_close(out, want, jnp.float32, "forward")
    for g, w in zip(grads, want_grads, strict=True):
        assert_close(g, w, jnp.float32, "grad")


def test_gqa_with_per_head_block_map():
    """Four query heads share one kv head; each head has its own dense mask and block map
    (some tiles EMPTY for one head and not another), accumulated in one dK/dV kernel."""
    rng = np.random.default_rng(7)
    dense = rng.random((1, 4, 37, 37)) < np.array([0.05, 0.3, 0.6, 1.0])[:, None, None]
    dense[:, 0, :16] = False  # head 0: its first query tile is EMPTY everywhere
    check_kernel_against_reference("tpu", B=1, N=4, K=1, H=64, spec=dict(dense_mask=dense))


def test_full_tiles_skip_the_mask():
    """A tile the block map calls FULL is computed without mask arithmetic: marking a
    partly masked tile FULL gives attention over the whole tile (the block map is a
    promise, not checked), while PARTIAL masks it."""
    B, T, S, N, H = 1, 16, 32, 1, 32
    blocks = BlockSizes(16, 16)
    q, k, v = normal(0, (B, T, N, H)), normal(1, (B, S, N, H)), normal(2, (B, S, N, H))
    causal = {"hi": 0}
    lying = jnp.array([[[[FULL, EMPTY]]]], jnp.int8)
    honest = jnp.array([[[[PARTIAL, EMPTY]]]], jnp.int8)
    got_full, _ = flash_attention(q, k, v, block_map=lying, block_sizes=blocks,
                                  interpret=True, **causal)
    got_partial, _ = flash_attention(q, k, v, block_map=honest, block_sizes=blocks,
                                     interpret=True, **causal)
    first = jnp.arange(S) < 16
    whole_tile = reference.dot_product_attention(q, k, v, mask=first[None, None, None, :])
    causal_mask = jnp.tril(jnp.ones((T, S), bool))
    masked = reference.dot_product_attention(q, k, v, mask=causal_mask[None, None])
    assert_close(got_full, whole_tile, jnp.float32, "forward")
    assert_close(got_partial, masked, jnp.float32, "forward")


def test_only_the_one_nonempty_tile_is_read():
    """Every kv tile but one is EMPTY for every query tile but one, and holds NaN: output,
    lse and gradients stay finite, rows without keys give zeros and zero gradients."""
    B, T, S, N, H = 1, 48, 64, 2, 32
    blocks = BlockSizes(16, 16)
    allowed = np.zeros((1, 1, T, S), bool)
    allowed[..., 16:32, 32:48] = True  # query tile 1 x kv tile 2, FULL
    block_map = block_map_of(allowed, 16, 16)
    assert (block_map != EMPTY).sum() == 1
    q = normal(0, (B, T, N, H))
    k = normal(1, (B, S, N, H)).at[:, :32].set(jnp.nan).at[:, 48:].set(jnp.nan)
    v = normal(2, (B, S, N, H)).at[:, :32].set(jnp.nan).at[:, 48:].set(jnp.nan)

    def loss(q, k, v):
        out, lse = flash_attention(q, k, v, dense_mask=jnp.asarray(allowed),
                                   block_map=jnp.asarray(block_map), block_sizes=blocks,
                                   interpret=True)
        finite_lse = jnp.where(jnp.isfinite(lse), lse, 0)
        return (out ** 2).sum() + finite_lse.sum(), (out, lse)

    (_, (out, lse)), (dq, dk, dv) = jax.jit(
        jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)
    rows = np.zeros(T, bool)
    rows[16:32] = True
    assert np.isfinite(out).all() and (np.asarray(out)[:, ~rows] == 0).all()
    assert np.isfinite(lse[..., rows]).all() and np.isneginf(lse[..., ~rows]).all()
    assert np.isfinite(dq).all() and (np.asarray(dq)[:, ~rows] == 0).all()
    assert np.isfinite(dk[:, 32:48]).all() and np.isfinite(dv[:, 32:48]).all()
    want = reference.dot_product_attention(q[:, rows], k[:, 32:48], v[:, 32:48])
    assert_close(out[:, rows], want, jnp.float32, "forward")


def test_empty_rows_have_zero_output_and_gradients():
    B, T, N, H = 2, 20, 2, 32
    q, k, v = normal(0, (B, T, N, H)), normal(1, (B, T, N, H)), normal(2, (B, T, N, H))
    lengths = jnp.array([0, 9])

    def loss(q, k, v, cap):
        out, lse = flash_attention(q, k, v, hi=0, q_lengths=lengths, kv_lengths=lengths,
                                   logits_soft_cap=cap, block_sizes=BlockSizes(8, 8),
                                   interpret=True)
        return (out ** 2).sum() + jnp.where(jnp.isfinite(lse), lse, 0).sum(), (out, lse)

    # With a soft cap: its derivative multiplies ds, which must stay 0 (not NaN) there.
    (_, (out, lse)), grads = jax.jit(
        jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True), static_argnums=3)(
        q, k, v, 2.0)
    assert (np.asarray(out[0]) == 0).all() and np.isneginf(lse[0]).all()
    assert (np.asarray(out[1, 9:]) == 0).all() and np.isneginf(lse[1, :, 9:]).all()
    for g in grads:
        assert np.isfinite(g).all()
        assert (np.asarray(g[0]) == 0).all() and (np.asarray(g[1, 9:]) == 0).all()


def test_vmap_matches_the_reference():
    """vmap over an extra axis (lengths and segment ids batched too), forward and
    gradients, against the reference on the batch axis that folds it in."""
    V, B, T, N, K, H = 2, 2, 20, 2, 1, 32
    q, k, v = normal(0, (V, B, T, N, H)), normal(1, (V, B, T, K, H)), normal(2, (V, B, T, K, H))
    lengths = np.array([[20, 7], [13, 1]])
    segments = np.repeat([[[0, 1], [0, 0]], [[1, 1], [0, 2]]], [12, 8], axis=-1)
    cotangent = normal(3, (V, B, T, N, H))
    fold = lambda x: x.reshape(V * B, *x.shape[2:])  # noqa: E731

    def flash(q, k, v, lengths, segments):
        return flash_attention(q, k, v, hi=0, kv_lengths=lengths, q_segment_ids=segments,
                               kv_segment_ids=segments, block_sizes=BlockSizes(8, 8),
                               interpret=True)[0]

    def ref(q, k, v, lengths, segments):
        allowed = dense_mask(dict(hi=0, kv_lengths=lengths, q_segment_ids=segments,
                                  kv_segment_ids=segments), V * B, T, T)
        return reference.dot_product_attention(q, k, v, mask=jnp.asarray(allowed))

    def grads(fn, q, k, v, ct, *mask):
        out, pullback = jax.vjp(lambda q, k, v: fn(q, k, v, *mask), q, k, v)
        return out, pullback(ct)

    got = jax.jit(jax.vmap(functools.partial(grads, flash)))(
        q, k, v, cotangent, jnp.asarray(lengths), jnp.asarray(segments))
    with jax.enable_x64(True):
        want = grads(ref, *(fold(x).astype(jnp.float64) for x in (q, k, v, cotangent)),
                     fold(lengths), fold(segments))
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        assert_close(fold(g), w, jnp.float32, "grad")


def test_default_block_sizes_are_valid_on_a_tpu():
    for T, S, H, dtype in [(1, 1, 32, jnp.float32), (37, 300, 64, jnp.bfloat16),
                           (4096, 8192, 256, jnp.float32), (129, 1000, 128, jnp.float16)]:
        bs = default_block_sizes(T, S, H, dtype)
        nq, nk = -(-T // bs.block_q), -(-S // bs.block_kv)
        tpu._check_tpu_blocks(bs.block_q, bs.block_kv, nq * bs.block_q, nk * bs.block_kv,
                              dtype, dense=True)
        assert bs.block_q <= 512 and bs.block_kv <= 512


def test_tpu_block_rules_are_checked_when_not_interpreting():
    q = jnp.zeros((1, 300, 2, 64))
    with pytest.raises(ValueError, match="block_q"):
        flash_attention(q, q, q, block_sizes=BlockSizes(16, 128))
    with pytest.raises(ValueError, match="block_kv"):
        flash_attention(q, q, q, block_sizes=BlockSizes(128, 100))


@pytest.mark.parametrize("kwargs, match", [
    (dict(key=jnp.zeros((2, 8, 2, 32))), "key"),
    (dict(key=jnp.zeros((1, 8, 2, 16))), "key"),
    (dict(value=jnp.zeros((1, 9, 2, 32))), "value"),
    (dict(key=jnp.zeros((1, 8, 3, 32)), value=jnp.zeros((1, 8, 3, 32))), "multiple of kv"),
    (dict(query=jnp.zeros((1, 8, 4))), "query"),
    (dict(value=jnp.zeros((1, 8, 2, 32), jnp.bfloat16)), "value"),
    (dict(block_map=jnp.ones((1, 1, 2, 2), jnp.int8)), "block_map"),
    (dict(block_map=jnp.ones((3, 1, 1, 1), jnp.int8)), "block_map"),
    (dict(dense_mask=jnp.ones((1, 3, 8, 8), bool)), "dense_mask"),
    (dict(dense_mask=jnp.ones((1, 1, 8, 9), bool)), "dense_mask"),
    (dict(q_segment_ids=jnp.zeros((1, 8), jnp.int32)), "segment_ids"),
    (dict(q_segment_ids=jnp.zeros((1, 7), jnp.int32),
          kv_segment_ids=jnp.zeros((1, 8), jnp.int32)), "q_segment_ids"),
    (dict(kv_lengths=jnp.zeros((2,), jnp.int32)), "kv_lengths"),
    (dict(logits_soft_cap=-1.0), "logits_soft_cap"),
    (dict(hi=0.5), "hi"),
], ids=lambda x: x if isinstance(x, str) else None)
def test_bad_arguments_name_themselves(kwargs, match):
    args = dict(query=jnp.zeros((1, 8, 4, 32)), key=jnp.zeros((1, 8, 2, 32)),
                value=jnp.zeros((1, 8, 2, 32)))
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        flash_attention(args.pop("query"), args.pop("key"), args.pop("value"),
                        block_sizes=BlockSizes(8, 8), interpret=True, **args)


def test_force_tpu_interpret_mode_runs_interpret_false_calls():
    """Under ``pltpu.force_tpu_interpret_mode()`` a call with interpret=False runs in TPU
    interpret mode, and the real-TPU block rules are not applied."""
    from jax.experimental.pallas import tpu as pltpu

    q, k = normal(0, (1, 10, 2, 32)), normal(1, (1, 10, 1, 32))
    with pltpu.force_tpu_interpret_mode():
        out, lse = flash_attention(q, k, k, hi=0, block_sizes=BlockSizes(8, 8))
    want, want_lse = reference.dot_product_attention(
        q, k, k, mask=jnp.tril(jnp.ones((10, 10), bool))[None, None], return_lse=True)
    assert_close(out, want, jnp.float32, "forward")
    assert_close(lse, want_lse, jnp.float32, "forward")


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_lowers_to_mosaic(monkeypatch, dtype):
    """The three kernels lower to Mosaic (jaxpr -> Mosaic MLIR, the Python half of the TPU
    compile) with real-TPU block sizes and every mask piece. The layout passes and the
    final compile run in libtpu and cannot be checked without a TPU."""
    tpu_info = pytest.importorskip("jax._src.pallas.mosaic.tpu_info")
    if not hasattr(tpu_info, "registry"):
        pytest.skip("this JAX has no TPU info registry to stand in for the chip")
    # Lowering asks the current device for its TPU generation: let the CPU stand for a v5e.
    monkeypatch.setitem(tpu_info.registry, jax.devices()[0].device_kind,
                        lambda: tpu_info.get_tpu_info_for_chip(tpu_info.ChipVersion.TPU_V5E, 1))
    B, T, S, N, K = 2, 300, 260, 4, 2
    shape = jax.ShapeDtypeStruct
    args = (shape((B, T, N, 64), dtype), shape((B, S, K, 64), dtype),
            shape((B, S, K, 96), dtype), shape((B, T), jnp.int32), shape((B, S), jnp.int32),
            shape((B,), jnp.int32), shape((B,), jnp.int32), shape((1, N, T, S), jnp.bool_),
            shape((B, 1, 3, 3), jnp.int8))

    def loss(q, k, v, q_ids, kv_ids, q_len, kv_len, dense, block_map):
        out, lse = flash_attention(
            q, k, v, lo=-100, hi=0, q_segment_ids=q_ids, kv_segment_ids=kv_ids,
            q_lengths=q_len, kv_lengths=kv_len, dense_mask=dense, block_map=block_map,
            logits_soft_cap=30.0, block_sizes=BlockSizes(128, 128))
        return (out.astype(jnp.float32) ** 2).sum() + lse.sum()

    lowered = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).trace(*args).lower(
        lowering_platforms=("tpu",))
    assert lowered.as_text().count("tpu_custom_call") == 3
