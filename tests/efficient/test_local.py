"""Local attention (jattn.efficient.local): Swin (shifted) windows and HaloNet halo blocks against
the dense loop-built references, an independent construction of Swin's shift mask, modules."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jattn
from jattn import masks, reference
from jattn.efficient.local import halo_attention, relative_position_index, window_attention
from jattn.nn.efficient.local import HaloAttention, SkipWindowAttention, WindowAttention
from tests.conftest import (
    EMPTY,
    FULL,
    PARTIAL,
    as_implementation,
    assert_close,
    check_against_reference,
    normal,
    normalised_error,
    output_and_vjp,
    to64,
)


def _qkv(spatial, dtype=jnp.float32, B=2, N=4, K=2, H=8, Hv=6, seed=0):
    return (normal(seed, (B, *spatial, N, H), dtype),
            normal(seed + 1, (B, *spatial, K, H), dtype),
            normal(seed + 2, (B, *spatial, K, Hv), dtype))


def _table(window, N=4, seed=7, dtype=jnp.float32):
    return normal(seed, (N, math.prod(2 * w - 1 for w in window)), dtype)



def _window_fn(impl, window, shift):
    return lambda q, k, v, t: impl(q, k, v, window_size=window, shift=shift,
                                   relative_position_bias=t)


def _halo_fn(impl, block, halo, is_causal):
    return lambda q, k, v: impl(q, k, v, block_size=block, halo_size=halo, is_causal=is_causal)


# (spatial, window, shift): 1-D and 2-D, shifted and not, sizes not a multiple of the window,
# per-axis windows and shifts. With padding, the shift mask only matters when the padding is
# shorter than window - shift (else the wrapped positions only meet padded keys): these are.
WINDOW_CASES = [
    ((10,), (4,), (0,)),
    ((11,), (4,), (2,)),
    ((8, 11), (3, 4), (1, 2)),
]


@pytest.mark.parametrize("spatial,window,shift", WINDOW_CASES)
def test_window_matches_dense_reference_float64(spatial, window, shift):
    with jax.enable_x64(True):
        q, k, v = to64(_qkv(spatial))
        table = to64(_table(window))
        cotangent = normal(5, (*q.shape[:-1], v.shape[-1]), jnp.float64)
        got, g_got = output_and_vjp(_window_fn(window_attention, window, shift),
                                     cotangent)(q, k, v, table)
        want, g_want = output_and_vjp(_window_fn(reference.window_attention, window, shift),
                                       cotangent)(q, k, v, table)
        assert normalised_error(got, want) < 1e-12
        for a, w in zip(g_got, g_want, strict=True):
            assert normalised_error(a, w) < 1e-11


# (spatial, block, halo, causal): halos smaller and larger than the block, no halo, a halo
# past both borders, sizes not a multiple of the block.
HALO_CASES = [
    ((11,), 4, 2, False),
    ((10,), 3, 5, True),
    ((6, 5), (2, 3), (3, 1), False),
]


@pytest.mark.parametrize("spatial,block,halo,is_causal", HALO_CASES)
def test_halo_matches_dense_reference_float64(spatial, block, halo, is_causal):
    with jax.enable_x64(True):
        q, k, v = to64(_qkv(spatial))
        cotangent = normal(5, (*q.shape[:-1], v.shape[-1]), jnp.float64)
        got, g_got = output_and_vjp(_halo_fn(halo_attention, block, halo, is_causal),
                                     cotangent)(q, k, v)
        want, g_want = output_and_vjp(_halo_fn(reference.halo_attention, block, halo, is_causal),
                                       cotangent)(q, k, v)
        assert normalised_error(got, want) < 1e-12
        for a, w in zip(g_got, g_want, strict=True):
            assert normalised_error(a, w) < 1e-11


@pytest.mark.parametrize("which", ["window", "halo"])
def test_float32_and_bfloat16_match_float64_reference(which):
    # bfloat16-representable data, so that both dtypes share one float64 reference.
    q, k, v = _qkv((8, 11), jnp.bfloat16)
    table = _table((3, 4), dtype=jnp.bfloat16)
    cotangent = normal(5, (2, 8, 11, 4, 6), jnp.bfloat16)
    if which == "window":
        args = (q, k, v, table)
        fast = _window_fn(window_attention, (3, 4), (1, 2))
        ref = _window_fn(reference.window_attention, (3, 4), (1, 2))
    else:
        args = (q, k, v)
        fast = _halo_fn(halo_attention, (3, 4), (1, 2), False)
        ref = _halo_fn(reference.halo_attention, (3, 4), (1, 2), False)
    with jax.enable_x64(True):
        want, g_want = output_and_vjp(ref, to64(cotangent))(*to64(args))
        want, g_want = np.asarray(want), [np.asarray(g) for g in g_want]
    for dtype in (jnp.float32, jnp.bfloat16):
        cast = [x.astype(dtype) for x in args]
        got, g_got = output_and_vjp(fast, cotangent.astype(dtype))(*cast)
        assert got.dtype == dtype
        assert_close(got, want, dtype, "forward")
        for a, w in zip(g_got, g_want, strict=True):
            assert a.dtype == dtype
            assert_close(a, w, dtype, "grad")


def test_causal_halo_does_not_see_the_future():
    q, k, v = _qkv((13,))
    fn = jax.jit(_halo_fn(halo_attention, 4, 3, True))
    y = fn(q, k, v)
    t = 6
    later = normal(8, (2, 13 - t - 1, 2, 8))
    y2 = fn(q, k.at[:, t + 1:].set(later), v.at[:, t + 1:].set(later[..., :6]))
    np.testing.assert_allclose(y[:, :t + 1], y2[:, :t + 1], atol=1e-6)
    assert not np.allclose(y[:, t + 1:], y2[:, t + 1:])


# --- the sets of attended positions, by brute force --------------------------------------

def _attended(fn, spatial):
    """The set of (query, key) flat position pairs fn attends: with equal logits and one-hot
    values, output row p is uniform over the keys p attends."""
    L = math.prod(spatial)
    zeros = jnp.zeros((1, *spatial, 1, 4))
    onehot = jnp.eye(L).reshape(1, *spatial, 1, L)
    out = np.asarray(fn(zeros, zeros, onehot)).reshape(L, L)
    rows, cols = np.nonzero(out > 1e-9)
    for p in range(L):  # uniform over its set
        np.testing.assert_allclose(out[p][out[p] > 1e-9], 1 / (out[p] > 1e-9).sum(), rtol=1e-5)
    return set(zip(rows.tolist(), cols.tolist(), strict=True))


def _swin_pairs(spatial, window, shift):
    """Swin's construction, done literally: pad, np.roll the grid of position ids by -shift,
    label the regions with Swin's slices and a counter, partition into windows, and pair the
    real positions of a window that carry the same label."""
    padded = tuple(-(-n // w) * w for n, w in zip(spatial, window, strict=True))
    ids = np.full(padded, -1)
    ids[tuple(slice(0, n) for n in spatial)] = np.arange(math.prod(spatial)).reshape(spatial)
    ids = np.roll(ids, tuple(-s for s in shift), axis=tuple(range(len(spatial))))
    labels = np.zeros(padded, int)
    if any(shift):
        regions = [(slice(0, -w), slice(-w, -s), slice(-s, None)) if s else (slice(None),)
                   for w, s in zip(window, shift, strict=True)]
        count = 0
        for where in np.ndindex(*(len(r) for r in regions)):
            labels[tuple(regions[a][i] for a, i in enumerate(where))] = count
            count += 1
    pairs = set()
    for start in np.ndindex(*(p // w for p, w in zip(padded, window, strict=True))):
        box = tuple(slice(i * w, (i + 1) * w) for i, w in zip(start, window, strict=True))
        win_ids, win_labels = ids[box].ravel(), labels[box].ravel()
        for a, la in zip(win_ids, win_labels, strict=True):
            for b, lb in zip(win_ids, win_labels, strict=True):
                if a >= 0 and b >= 0 and la == lb:
                    pairs.add((int(a), int(b)))
    return pairs


@pytest.mark.parametrize("spatial,window,shift", [
    ((11,), (4,), (2,)), ((10,), (4,), (1,)), ((8, 8), (4, 4), (2, 2)),
    ((8, 11), (3, 4), (1, 2)), ((5, 7), (5, 3), (2, 1)),
])
def test_shift_mask_matches_swin_construction(spatial, window, shift):
    want = _swin_pairs(spatial, window, shift)
    fast = _attended(jax.jit(functools.partial(window_attention, window_size=window,
                                               shift=shift)), spatial)
    assert fast == want
    dense = _attended(jax.jit(functools.partial(reference.window_attention,
                                                window_size=window, shift=shift)), spatial)
    assert dense == want
    assert _mask_pairs(masks.block_window(spatial, window, shift=shift), spatial) == want
    if any(shift):  # the shift changes which positions meet
        assert want != _swin_pairs(spatial, window, (0,) * len(spatial))


@pytest.mark.parametrize("spatial,block,halo,is_causal", [
    ((11,), (4,), (2,), True), ((9,), (2,), (3,), True), ((7, 9), (3, 4), (1, 2), False),
    ((5, 5), (2, 2), (0, 1), False),
])
def test_halo_neighbourhoods_by_brute_force(spatial, block, halo, is_causal):
    # The neighbourhood of a block: the union of the boxes of keys at most h away from it,
    # clipped at the borders.
    coords = list(np.ndindex(*spatial))
    flat = {c: i for i, c in enumerate(coords)}
    want = set()
    for c in coords:
        start = [x // b * b for x, b in zip(c, block, strict=True)]
        ranges = [range(max(0, s - h), min(n, s + b + h))
                  for s, b, h, n in zip(start, block, halo, spatial, strict=True)]
        for key in np.ndindex(*(len(r) for r in ranges)):
            kc = tuple(r[i] for r, i in zip(ranges, key, strict=True))
            if not is_causal or flat[kc] <= flat[c]:
                want.add((flat[c], flat[kc]))
    got = _attended(jax.jit(functools.partial(halo_attention, block_size=block,
                                              halo_size=halo, is_causal=is_causal)), spatial)
    assert got == want
    mask = masks.block_window(spatial, block, halo=halo)
    assert _mask_pairs(mask & masks.causal() if is_causal else mask, spatial) == want


def _mask_pairs(mask, spatial):
    L = math.prod(spatial)
    rows, cols = np.nonzero(np.asarray(mask.materialize(L, L))[0, 0])
    return set(zip(rows.tolist(), cols.tolist(), strict=True))


# --- the mask form (masks.block_window) on the other implementations ----------------------

MASK_IMPLEMENTATIONS = ["xla", "chunked_small_blocks", "pallas_gpu_small_blocks",
                        "pallas_tpu_small_blocks"]


@pytest.mark.parametrize("implementation", MASK_IMPLEMENTATIONS)
def test_window_on_the_block_window_mask(implementation):
    """Shifted 2-D windows with a padded axis and Swin's bias table (as a score_mod): the
    dense reference, forward and gradients (the table's included)."""
    fn = functools.partial(window_attention, implementation=as_implementation(implementation))
    check_against_reference(_window_fn(fn, (3, 4), (1, 2)),
                            _window_fn(reference.window_attention, (3, 4), (1, 2)),
                            (*_qkv((8, 11), B=1), _table((3, 4))))


@pytest.mark.parametrize("implementation", MASK_IMPLEMENTATIONS)
@pytest.mark.parametrize("spatial,block,halo,is_causal", [HALO_CASES[1], HALO_CASES[2]])
def test_halo_on_the_block_window_mask(implementation, spatial, block, halo, is_causal):
    fn = functools.partial(halo_attention, implementation=as_implementation(implementation))
    check_against_reference(_halo_fn(fn, block, halo, is_causal),
                            _halo_fn(reference.halo_attention, block, halo, is_causal),
                            _qkv(spatial, B=1))


def test_block_window_block_map_is_exact():
    """Every tile the block map calls EMPTY or FULL is so in the dense pattern, and every
    other tile is mixed (the map is exact, not only sound)."""
    mask = masks.block_window((9, 13), (3, 4), halo=(1, 2), shift=(0, 2))
    L, bq, bk = 9 * 13, 16, 8
    dense = np.asarray(mask.materialize(L, L))[0, 0]
    kinds = np.asarray(mask.block_map(L, L, bq, bk))[0, 0]
    for i in range(kinds.shape[0]):
        for j in range(kinds.shape[1]):
            tile = dense[i * bq:(i + 1) * bq, j * bk:(j + 1) * bk]
            want = FULL if tile.all() else EMPTY if not tile.any() else PARTIAL
            assert kinds[i, j] == want, (i, j)
    assert (kinds == EMPTY).any() and (kinds == PARTIAL).any()


# --- special cases that must reduce to known attention ------------------------------------

def test_whole_grid_window_is_full_attention():
    q, k, v = _qkv((5, 6))
    flat = [x.reshape(2, 30, *x.shape[-2:]) for x in (q, k, v)]
    dense = jattn.dot_product_attention(*flat, scale=0.3).reshape(2, 5, 6, 4, 6)
    got = jax.jit(functools.partial(window_attention, window_size=(5, 6), scale=0.3))(q, k, v)
    np.testing.assert_allclose(got, dense, atol=1e-5)


@pytest.mark.parametrize("is_causal", [False, True])
def test_halo_covering_the_sequence_is_full_attention(is_causal):
    q, k, v = _qkv((11,))
    dense = jattn.dot_product_attention(q, k, v, is_causal=is_causal, scale=0.3)
    got = jax.jit(functools.partial(halo_attention, block_size=3, halo_size=10,
                                    is_causal=is_causal, scale=0.3))(q, k, v)
    np.testing.assert_allclose(got, dense, atol=1e-5)


def test_halo_zero_equals_unshifted_windows():
    q, k, v = _qkv((7, 9))
    a = jax.jit(_halo_fn(halo_attention, (3, 4), 0, False))(q, k, v)
    b = jax.jit(functools.partial(window_attention, window_size=(3, 4)))(q, k, v)
    np.testing.assert_allclose(a, b, atol=1e-6)


def test_relative_position_index_is_swin_layout():
    wh, ww = 3, 4
    index = relative_position_index((wh, ww))
    coords = list(np.ndindex(wh, ww))
    for i, (yi, xi) in enumerate(coords):
        for j, (yj, xj) in enumerate(coords):
            assert index[i, j] == (yi - yj + wh - 1) * (2 * ww - 1) + (xi - xj + ww - 1)
    assert index.max() == (2 * wh - 1) * (2 * ww - 1) - 1


def test_bias_is_added_to_the_window_logits():
    # One window, one head, no shift: the table entries land on the logits of their pairs.
    q, k, v = _qkv((4,), N=1, K=1)
    table = normal(3, (1, 7))
    bias = table[0][relative_position_index((4,))]
    want = jax.jit(jattn.dot_product_attention)(q, k, v, bias=bias[None, None])
    got = jax.jit(functools.partial(window_attention, window_size=4))(
        q, k, v, relative_position_bias=table)
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_jit_and_vmap():  # gradients: the float64 / low-precision tests above
    q, k, v = _qkv((7, 9))
    table = _table((3, 4))
    for fn, args in ((_window_fn(window_attention, (3, 4), (1, 2)), (q, k, v, table)),
                     (_halo_fn(halo_attention, (3, 4), 1, False), (q, k, v))):
        expected = jax.jit(fn)(*args)
        axes = (0, 0, 0, None)[:len(args)]
        batched = jax.jit(jax.vmap(lambda *a, f=fn: f(*(x[None] for x in a[:3]), *a[3:])[0],
                                   in_axes=axes))(*args)
        np.testing.assert_allclose(batched, expected, atol=1e-6)


# --- errors -------------------------------------------------------------------------------

@pytest.mark.parametrize("change,name,error", [
    ({"window_size": 0}, "window_size", ValueError),
    ({"window_size": (3,)}, "window_size", ValueError),
    ({"window_size": 8}, "window_size", ValueError),
    ({"window_size": 2.5}, "window_size", ValueError),
    ({"shift": 3}, "shift", ValueError),
    ({"shift": -1}, "shift", ValueError),
    ({"relative_position_bias": jnp.ones((4, 24))}, "relative_position_bias", ValueError),
    ({"relative_position_bias": jnp.ones((4, 25), jnp.int32)}, "relative_position_bias",
     TypeError),
    ({"key": jnp.ones((2, 7, 6, 2, 7))}, "key", ValueError),
    ({"value": jnp.ones((2, 7, 5, 2, 6))}, "value", ValueError),
    ({"key": jnp.ones((2, 7, 6, 3, 8)), "value": jnp.ones((2, 7, 6, 3, 6))}, "query, key",
     ValueError),
    ({"query": jnp.ones((2, 7, 6, 5, 4, 8))}, "query", ValueError),
    ({"query": jnp.ones((2, 7, 6, 4, 8), jnp.int32)}, "query", TypeError),
    ({"query": jnp.ones((2, 7, 6, 4, 8), jnp.bfloat16)}, "query, key, value", TypeError),
])
def test_window_bad_input(change, name, error):
    q, k, v = _qkv((7, 6))
    args = {"query": q, "key": k, "value": v, "window_size": 3, "shift": 1} | change
    with pytest.raises(error, match=rf"^{name}:"):
        window_attention(**args)


@pytest.mark.parametrize("change,name,error", [
    ({"block_size": 0}, "block_size", ValueError),
    ({"block_size": 12}, "block_size", ValueError),
    ({"block_size": (2, 2)}, "block_size", ValueError),
    ({"halo_size": -1}, "halo_size", ValueError),
    ({"key": jnp.ones((2, 11, 2, 7))}, "key", ValueError),
    ({"key": jnp.ones((2, 11, 3, 8)), "value": jnp.ones((2, 11, 3, 6))}, "query, key",
     ValueError),
    ({"query": jnp.ones((2, 11, 4, 8), jnp.float16)}, "query, key, value", TypeError),
])
def test_halo_bad_input(change, name, error):
    q, k, v = _qkv((11,))
    args = {"query": q, "key": k, "value": v, "block_size": 4, "halo_size": 1} | change
    with pytest.raises(error, match=rf"^{name}:"):
        halo_attention(**args)


def test_unsupported_patterns_raise_not_implemented():
    q, k, v = _qkv((8, 8))
    with pytest.raises(NotImplementedError, match="is_causal"):
        window_attention(q, k, v, window_size=4, is_causal=True)
    with pytest.raises(NotImplementedError, match="cross attention"):  # key grid differs
        window_attention(q, k[:, :4], v[:, :4], window_size=4)
    with pytest.raises(NotImplementedError, match="is_causal"):  # 2-D causal halo
        halo_attention(q, k, v, block_size=4, halo_size=1, is_causal=True)
    q1, k1, v1 = _qkv((12,))
    with pytest.raises(NotImplementedError, match="cross attention"):
        halo_attention(q1, k1[:, :8], v1[:, :8], block_size=4, halo_size=1, is_causal=True)


# --- modules --------------------------------------------------------------------------------

def _projected(module, x, heads):
    qkv = x @ module.qkv_proj.kernel[...] + module.qkv_proj.bias[...]
    qkv = qkv.reshape(*x.shape[:-1], 3, heads, -1)
    return qkv[..., 0, :, :], qkv[..., 1, :, :], qkv[..., 2, :, :]


def test_window_module_equals_functional_call():
    module = WindowAttention(8, num_heads=2, window_size=(3, 4), shift=(1, 2),
                             rngs=nnx.Rngs(0))
    table = module.relative_position_bias[...]
    assert table.shape == (2, 5 * 7)
    assert 0 < float(jnp.abs(table).max()) <= 0.04  # truncated at 2 std of 0.02
    x = normal(1, (2, 7, 9, 8))
    y = jax.jit(functools.partial(reference.window_attention, window_size=(3, 4),
                                  shift=(1, 2)))(*_projected(module, x, 2),
                                                 relative_position_bias=table)
    want = y.reshape(x.shape) @ module.out_proj.kernel[...] + module.out_proj.bias[...]
    np.testing.assert_allclose(nnx.jit(lambda m, x: m(x))(module, x), want, atol=1e-5)
    with pytest.raises(ValueError, match=r"^x:"):
        module(jnp.ones((2, 9, 8)))
    with pytest.raises(ValueError, match=r"^num_heads:"):
        WindowAttention(8, num_heads=3, window_size=4, rngs=nnx.Rngs(0))


def test_window_module_zero_init_and_no_bias_1d():
    module = WindowAttention(8, num_heads=2, window_size=4, shift=2, spatial_dims=1,
                             relative_position_bias=False, zero_init_output=True,
                             rngs=nnx.Rngs(0))
    assert module.relative_position_bias is None
    x = normal(1, (2, 10, 8))
    np.testing.assert_array_equal(nnx.jit(lambda m, x: m(x))(module, x), jnp.zeros_like(x))


def test_halo_module_equals_functional_call():
    module = HaloAttention(8, num_heads=2, block_size=4, halo_size=2, is_causal=True,
                           rngs=nnx.Rngs(0))
    x = normal(1, (2, 11, 8))
    y = jax.jit(functools.partial(reference.halo_attention, block_size=4, halo_size=2,
                                  is_causal=True))(*_projected(module, x, 2))
    want = y.reshape(x.shape) @ module.out_proj.kernel[...] + module.out_proj.bias[...]
    np.testing.assert_allclose(nnx.jit(lambda m, x: m(x))(module, x), want, atol=1e-5)


@pytest.mark.parametrize("shift", [0, 2])
def test_skip_window_attention_against_dense_windows(shift):
    """P09: decoder tokens read the skip features of their (shifted) window; the pair set
    is the block_window mask's, checked against Swin's construction above; forward and
    gradients of the whole layer against the float64 dense reference."""
    B, L, d = 2, 8, 16
    layer = SkipWindowAttention(d, num_heads=2, window_size=4, shift=shift, rngs=nnx.Rngs(0))
    decoder, skip = normal(1, (B, L, L, d)), normal(2, (B, L, L, d))
    allowed = masks.block_window((L, L), 4, shift=shift).materialize(L * L, L * L)

    def dense(decoder, skip):
        heads = (B, L * L, 2, d // 2)
        q = layer.q_proj(layer.decoder_norm(decoder)).reshape(heads)
        k, v = (a.reshape(heads) for a in jnp.split(layer.kv_proj(layer.skip_norm(skip)), 2, -1))
        read = reference.dot_product_attention(q, k, v, mask=allowed)
        read = layer.out_proj(read.reshape(decoder.shape))
        return layer.fuse(jnp.concatenate([decoder, read], axis=-1))

    check_against_reference(lambda a, b: layer(a, b), dense, (decoder, skip))
    with pytest.raises(ValueError, match="skip"):
        layer(decoder, skip[:, :4])
    with pytest.raises(ValueError, match="decoder"):
        layer(decoder[..., :8], skip)
