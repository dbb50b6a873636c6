"""Neighbourhood attention (NATTEN semantics): brute-force border/dilation/causal/stride sets,
exact block maps, the block-sparse path vs the dense masked reference (forward and gradients,
every implementation), dtypes, jit/vmap, errors, module."""

from __future__ import annotations

import functools
import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jattn
from jattn import masks, reference
from jattn.efficient.neighborhood import neighborhood_attention
from jattn.nn.efficient.neighborhood import NeighborhoodAttention
from pallas_kernels.flash.common import EMPTY, FULL, PARTIAL
from tests.conftest import (
    as_implementation,
    assert_close,
    normal,
    normalised_error,
    output_and_vjp,
    to64,
)


def _qkv(spatial, dtype=jnp.float32, B=2, N=4, K=2, H=8, Hv=6, E=0, seed=0):
    q = normal(seed, (B, *spatial, N, H), dtype)
    k = normal(seed + 1, (B, *spatial, K, H), dtype)
    v = normal(seed + 2, (B, *spatial, K, Hv), dtype)
    if not E:
        return q, k, v, None, None
    return q, k, v, normal(seed + 3, (B, E, K, H), dtype), normal(seed + 4, (B, E, K, Hv),
                                                                      dtype)


def _per_axis(x, n):
    return tuple(x) if isinstance(x, tuple) else (x,) * n


# --- The definition, written a third way: nearest group members, not a clipped window. ---

def _brute_axis(length, k, d, is_causal, p):
    """Positions along one axis that p attends: its dilation group's k members nearest to it
    (ties to the earlier one), or, causal, the k latest members up to p."""
    group = [q for q in range(length) if q % d == p % d]
    if is_causal:
        return set([q for q in group if q <= p][-k:])
    return set(sorted(group, key=lambda q: (abs(q - p), q))[:k])


def _brute_sets(spatial, kernel_size, dilation, is_causal):
    """{query position (tuple): set of key positions (tuples)} by brute force."""
    n = len(spatial)
    ks, ds, cs = (_per_axis(x, n) for x in (kernel_size, dilation, is_causal))
    return {p: set(itertools.product(*(_brute_axis(spatial[a], ks[a], ds[a], cs[a], p[a])
                                       for a in range(n))))
            for p in itertools.product(*(range(s) for s in spatial))}


def _flat(spatial, pos):
    return int(np.ravel_multi_index(pos, spatial))


def _mask_rows(spatial, kernel_size, dilation, is_causal, stride=1):
    """The mask's pattern [L, L] through its NumPy evaluation (the code of evaluate())."""
    mask = masks.neighborhood(spatial, kernel_size, dilation, is_causal, stride)
    pos = np.arange(math.prod(spatial))
    return mask.allows(pos[:, None], pos[None, :], xp=np)


# Every 1-D configuration up to length 13 (lengths not divisible by the dilation, even and
# odd kernels, kernels that fill their shortest group).
def test_mask_exhaustive_1d():
    checked = 0
    for length in range(1, 14):
        for d in range(1, length + 1):
            for k in range(1, length // d + 1):
                for causal in (False, True):
                    rows = _mask_rows((length,), k, d, causal)
                    want = _brute_sets((length,), k, d, causal)
                    for p in range(length):
                        assert {(j,) for j in np.flatnonzero(rows[p])} == want[(p,)], (
                            length, k, d, causal, p)
                        if not causal:
                            assert rows[p].sum() == k
                    checked += 1
    assert checked > 300


@pytest.mark.parametrize("spatial,kernel_size,dilation,is_causal", [
    ((7, 9), 3, 1, False),
    ((7, 9), (3, 5), (2, 1), False),
    ((8, 11), (2, 4), (3, 2), False),          # even kernels, 8 and 11 not multiples
    ((7, 9), (3, 3), (2, 3), (True, False)),
    ((6, 5), 2, (2, 1), True),
    ((4, 5, 6), (3, 2, 3), (1, 2, 2), (False, False, True)),
])
def test_mask_brute_force_nd(spatial, kernel_size, dilation, is_causal):
    rows = _mask_rows(spatial, kernel_size, dilation, is_causal)
    want = _brute_sets(spatial, kernel_size, dilation, is_causal)
    any_causal = any(_per_axis(is_causal, len(spatial)))
    for p, keys in want.items():
        row = _flat(spatial, p)
        assert set(np.flatnonzero(rows[row]).tolist()) == {_flat(spatial, q) for q in keys}, p
        if not any_causal:
            assert rows[row].sum() == math.prod(_per_axis(kernel_size, len(spatial)))


STRIDED = [  # spatial, kernel_size, dilation, is_causal, stride
    ((13,), 5, 1, False, 2),
    ((13,), 4, 1, True, 3),
    ((14,), 3, 2, False, 3),
    ((7, 9), (3, 5), (1, 1), (False, True), (2, 4)),
    ((4, 5, 6), 2, (1, 2, 1), False, (2, 1, 2)),
]


@pytest.mark.parametrize("spatial,kernel_size,dilation,is_causal,stride", STRIDED)
def test_strided_mask_equals_the_reference(spatial, kernel_size, dilation, is_causal, stride):
    """The mask (vectorised windows) against the reference (position by position); both
    read NATTEN's strided windows the same way, written independently."""
    got = _mask_rows(spatial, kernel_size, dilation, is_causal, stride)
    want = reference.neighborhood_mask(spatial, kernel_size, dilation, is_causal, stride)
    np.testing.assert_array_equal(got, want)


def test_stride_equal_to_kernel_is_blocked_attention():
    """NATTEN: stride == kernel_size gives non-overlapping windows, i.e. blocked (window)
    attention; checked against blocks written out directly."""
    got = _mask_rows((12,), 4, 1, False, 4)
    blocks = np.arange(12) // 4
    np.testing.assert_array_equal(got, blocks[:, None] == blocks[None, :])
    got = _mask_rows((6, 8), (3, 4), 1, False, (3, 4))
    rows, cols = np.unravel_index(np.arange(48), (6, 8))
    tile = (rows // 3) * 2 + cols // 4
    np.testing.assert_array_equal(got, tile[:, None] == tile[None, :])


@pytest.mark.parametrize("spatial,kernel_size,dilation,is_causal,stride,T_block,S_block", [
    ((100,), 7, 1, False, 1, 16, 8),
    ((100,), 9, 3, True, 1, 8, 16),
    ((9, 11), (3, 5), (2, 1), (True, False), (1, 2), 16, 16),
    ((4, 5, 6), 3, 1, False, 1, 32, 8),
])
def test_block_map_is_exact(spatial, kernel_size, dilation, is_causal, stride, T_block,
                            S_block):
    """Every tile kind equals what the dense reference pattern says of that tile, with
    extra keys past the grid (allowed with global_keys, else never)."""
    L = math.prod(spatial)
    S = L + 5
    global_keys = len(spatial) == 2  # one case with the extra keys allowed
    mask = masks.neighborhood(spatial, kernel_size, dilation, is_causal, stride, global_keys)
    kinds = np.asarray(mask.block_map(L, S, T_block, S_block))[0, 0]
    dense = np.zeros((L, S), bool)
    dense[:, :L] = reference.neighborhood_mask(spatial, kernel_size, dilation, is_causal,
                                               stride)
    dense[:, L:] = global_keys
    for i in range(kinds.shape[0]):
        for j in range(kinds.shape[1]):
            tile = dense[i * T_block:(i + 1) * T_block, j * S_block:(j + 1) * S_block]
            want = FULL if tile.all() else PARTIAL if tile.any() else EMPTY
            assert kinds[i, j] == want, (i, j)
    assert (kinds == EMPTY).any()  # the map does skip: the check has teeth


@pytest.mark.parametrize("spatial,kernel_size,dilation,is_causal", [
    ((11,), 3, 1, False),
    ((11,), 4, 2, False),
    ((13,), 3, 3, True),
    ((6, 7), (3, 2), (2, 3), False),
    ((5, 7), 3, (1, 2), (False, True)),
])
def test_attended_sets_brute_force(spatial, kernel_size, dilation, is_causal):
    """Probe the function itself: zero queries make every allowed score equal, and one-hot
    values read the softmax weights back, so out[p] = 1/|N(p)| on exactly N(p)."""
    L = math.prod(spatial)
    q = jnp.zeros((1, *spatial, 1, 4))
    k = normal(0, (1, *spatial, 1, 4))
    v = jnp.eye(L).reshape(1, *spatial, 1, L)
    options = {"kernel_size": kernel_size, "dilation": dilation, "is_causal": is_causal}
    got = np.asarray(jax.jit(functools.partial(neighborhood_attention, **options))(q, k, v))
    got = got.reshape(L, L)
    mask = reference.neighborhood_mask(spatial, **options)
    for p, keys in _brute_sets(spatial, kernel_size, dilation, is_causal).items():
        want = np.zeros(L, bool)
        want[[_flat(spatial, key) for key in keys]] = True
        row = _flat(spatial, p)
        np.testing.assert_array_equal(got[row] > 0, want, err_msg=str(p))
        np.testing.assert_allclose(got[row][want], 1 / want.sum(), rtol=1e-6)
        np.testing.assert_array_equal(mask[row], want, err_msg=str(p))
        if not any(_per_axis(is_causal, len(spatial))):
            assert want.sum() == math.prod(_per_axis(kernel_size, len(spatial)))


def test_border_window_shifts_inward():
    """Length 7, kernel 3: position 0 sees 0, 1, 2 (not a zero-padded -1) and 6 sees 4, 5, 6;
    with dilation 2 the odd group (1, 3, 5) is shorter than the even one (0, 2, 4, 6)."""
    mask = reference.neighborhood_mask((7,), 3)
    assert list(np.flatnonzero(mask[0])) == [0, 1, 2]
    assert list(np.flatnonzero(mask[3])) == [2, 3, 4]
    assert list(np.flatnonzero(mask[6])) == [4, 5, 6]
    mask = reference.neighborhood_mask((7,), 3, 2)
    assert list(np.flatnonzero(mask[0])) == [0, 2, 4]
    assert list(np.flatnonzero(mask[5])) == [1, 3, 5]
    assert list(np.flatnonzero(mask[6])) == [2, 4, 6]
    causal = reference.neighborhood_mask((7,), 3, 2, True)
    assert list(np.flatnonzero(causal[0])) == [0]
    assert list(np.flatnonzero(causal[5])) == [1, 3, 5]


# --- Fast path vs the dense reference. ---

CASES = [  # spatial, kernel_size, dilation, is_causal, heads (N, K), extra E
    ((13,), 3, 1, False, (4, 2), 0),
    ((13,), 4, 3, False, (4, 4), 2),   # even kernel, 13 not a multiple of 3
    ((13,), 5, 2, True, (4, 1), 0),
    ((7, 9), (3, 5), (2, 1), False, (2, 2), 0),
    ((6, 7), 3, (1, 2), (True, False), (4, 2), 3),
    ((5, 6), 2, 2, True, (2, 1), 1),
]



def _fns(spatial, kernel_size, dilation, is_causal, E, implementation="chunked"):
    options = {"kernel_size": kernel_size, "dilation": dilation, "is_causal": is_causal}
    fast_options = {**options, "implementation": as_implementation(implementation)}
    if E:
        def fast(q, k, v, ek, ev):
            return neighborhood_attention(q, k, v, extra_key=ek, extra_value=ev,
                                          **fast_options)

        def ref(q, k, v, ek, ev):
            return reference.neighborhood_attention(q, k, v, extra_key=ek, extra_value=ev,
                                                    **options)
    else:
        def fast(q, k, v):
            return neighborhood_attention(q, k, v, **fast_options)

        def ref(q, k, v):
            return reference.neighborhood_attention(q, k, v, **options)
    return fast, ref


@pytest.mark.parametrize("spatial,kernel_size,dilation,is_causal,heads,E,implementation", [
    (*case, "chunked_small_blocks") for case in CASES] + [(*CASES[4], "xla")])
def test_matches_dense_reference_float64(spatial, kernel_size, dilation, is_causal, heads, E,
                                         implementation):
    with jax.enable_x64(True):
        N, K = heads
        args = to64(_qkv(spatial, N=N, K=K, E=E))[:5 if E else 3]
        cotangent = normal(9, (*args[0].shape[:-1], args[2].shape[-1]), jnp.float64)
        fast, ref = _fns(spatial, kernel_size, dilation, is_causal, E, implementation)
        got, g_got = output_and_vjp(fast, cotangent)(*args)
        want, g_want = output_and_vjp(ref, cotangent)(*args)
        assert got.dtype == jnp.float64
        assert normalised_error(got, want) < 1e-12
        for a, w in zip(g_got, g_want, strict=True):
            assert normalised_error(a, w) < 1e-11


@pytest.mark.parametrize("case,dtype,implementation", [
    (case, dtype, "chunked") for case in (CASES[2], CASES[4])
    for dtype in (jnp.float32, jnp.bfloat16)] + [
    (CASES[4], jnp.float32, "pallas_gpu_small_blocks"),
    (CASES[2], jnp.bfloat16, "pallas_tpu_small_blocks")])
def test_low_precision_matches_float64_reference(case, dtype, implementation):
    spatial, kernel_size, dilation, is_causal, (N, K), E = case
    args = _qkv(spatial, dtype, N=N, K=K, E=E)[:5 if E else 3]
    fast, ref = _fns(spatial, kernel_size, dilation, is_causal, E, implementation)
    cotangent = normal(9, (*args[0].shape[:-1], args[2].shape[-1]), dtype)
    got, g_got = output_and_vjp(fast, cotangent)(*args)
    assert got.dtype == dtype and all(g.dtype == dtype for g in g_got)
    with jax.enable_x64(True):
        want, g_want = output_and_vjp(ref, to64(cotangent))(*to64(args))
    assert_close(got, want, dtype, "forward")
    for a, w in zip(g_got, g_want, strict=True):
        assert_close(a, w, dtype, "grad")


def test_full_kernel_is_dense_attention_with_extra_keys():
    """kernel_size = length, no dilation: every query sees every key, so the result is plain
    softmax attention over the positions followed by the extra keys."""
    q, k, v, ek, ev = _qkv((4, 5), E=3)
    got = neighborhood_attention(q, k, v, kernel_size=(4, 5), extra_key=ek, extra_value=ev)
    flat = lambda x: x.reshape(x.shape[0], 20, *x.shape[-2:])  # noqa: E731
    want = jattn.dot_product_attention(flat(q), jnp.concatenate([flat(k), ek], 1),
                                       jnp.concatenate([flat(v), ev], 1))
    np.testing.assert_allclose(got.reshape(want.shape), want, atol=2e-6)


def test_causal_1d_is_causal_sliding_window():
    q, k, v, _, _ = _qkv((12,))
    got = neighborhood_attention(q, k, v, kernel_size=4, is_causal=True)
    want = jattn.dot_product_attention(q, k, v, is_causal=True, local_window_size=(3, 0))
    np.testing.assert_allclose(got, want, atol=2e-6)


def test_scale():
    q, k, v, _, _ = _qkv((9,))
    got = neighborhood_attention(q, k, v, kernel_size=3, scale=0.7)
    want = reference.neighborhood_attention(q, k, v, kernel_size=3, scale=0.7)
    assert normalised_error(got, want) < 2e-6
    assert normalised_error(got, neighborhood_attention(q, k, v, kernel_size=3)) > 1e-3


def test_vmap_matches_loop():
    q, k, v, ek, ev = _qkv((5, 6), B=1, E=2)
    stack = lambda x: jnp.stack([x, 2 * x, -x])  # noqa: E731
    fn = functools.partial(neighborhood_attention, kernel_size=3, dilation=(1, 2),
                           is_causal=(True, False))
    got = jax.jit(jax.vmap(lambda *a: fn(*a[:3], extra_key=a[3], extra_value=a[4])))(
        *map(stack, (q, k, v, ek, ev)))
    for i, c in enumerate((1, 2, -1)):
        want = fn(c * q, c * k, c * v, extra_key=c * ek, extra_value=c * ev)
        np.testing.assert_allclose(got[i], want, atol=2e-6)


def test_kernels_evaluate_the_window_in_the_tile():
    """The Pallas kernels get the neighbourhood as a static in-tile mask, not as a dense
    [L, L] array (the low-precision test above checks their results)."""
    from jattn.core.kernels import kernel_mask

    mask = masks.neighborhood((7, 9), 3, (2, 1), (True, False), global_keys=True)
    args = kernel_mask(mask, 1, 63, 66, 16, 16)
    assert "dense_mask" not in args and args["static_mask"].is_static


def test_no_dense_matrix():
    """No buffer of the compiled forward and backward passes is as large as the L x L score
    matrix (the dense reference, compiled the same way, has one)."""
    L = 256
    q, _, _, _, _ = _qkv((L,), B=1, N=1, K=1, H=4, Hv=4)

    def compiled(fn, **options):
        loss = lambda q: fn(q, 2 * q, -q, kernel_size=5, **options).sum()  # noqa: E731
        return jax.jit(jax.value_and_grad(loss)).lower(q).compile().as_text()

    tiles = as_implementation("chunked_small_blocks")  # tiles much smaller than L
    assert f"{L},{L}]" not in compiled(neighborhood_attention, implementation=tiles)
    assert f"{L},{L}]" in compiled(reference.neighborhood_attention)


# --- Errors. ---

def test_errors():
    q, k, v, ek, ev = _qkv((8,), E=2)
    f = neighborhood_attention
    with pytest.raises(ValueError, match="kernel_size"):
        f(q, k, v, kernel_size=5, dilation=2)  # groups of 4
    with pytest.raises(ValueError, match="kernel_size"):
        f(q, k, v, kernel_size=9)
    q7, k7, v7, _, _ = _qkv((7,))
    with pytest.raises(ValueError, match=r"kernel_size, dilation.*length 7"):
        f(q7, k7, v7, kernel_size=4, dilation=2)  # odd group holds 3
    f(q7, k7, v7, kernel_size=3, dilation=2)
    with pytest.raises(ValueError, match="kernel_size"):
        f(q, k, v, kernel_size=0)
    with pytest.raises(ValueError, match="kernel_size"):
        f(q, k, v, kernel_size=(3, 3))
    with pytest.raises(ValueError, match="dilation"):
        f(q, k, v, kernel_size=3, dilation=0)
    with pytest.raises(TypeError, match="is_causal"):
        f(q, k, v, kernel_size=3, is_causal=1)
    with pytest.raises(ValueError, match="query"):
        f(q[:, 0], k[:, 0], v[:, 0], kernel_size=1)
    with pytest.raises(ValueError, match="key"):
        f(q, k[..., :4], v, kernel_size=3)
    with pytest.raises(ValueError, match="value"):
        f(q, k, v[:, :, :1], kernel_size=3)
    with pytest.raises(ValueError, match="heads"):
        f(q[..., :3, :], k, v, kernel_size=3)
    with pytest.raises(TypeError, match="dtype"):
        f(q.astype(jnp.bfloat16), k, v, kernel_size=3)
    with pytest.raises(ValueError, match="extra_key, extra_value"):
        f(q, k, v, kernel_size=3, extra_key=ek)
    with pytest.raises(ValueError, match="extra_key"):
        f(q, k, v, kernel_size=3, extra_key=ek[..., :4], extra_value=ev)
    with pytest.raises(ValueError, match="extra_value"):
        f(q, k, v, kernel_size=3, extra_key=ek, extra_value=ev[:, :1])
    with pytest.raises(NotImplementedError, match="cross"):
        f(q, k[:, :6], v[:, :6], kernel_size=3)
    with pytest.raises(ValueError, match="key"):
        f(q, k[:, :, None], v[:, :, None], kernel_size=3)


# --- Module. ---

@pytest.mark.parametrize("spatial,options,E", [
    ((9,), {"kernel_size": 3, "is_causal": True, "num_kv_heads": 1}, 0),
    ((5, 6), {"kernel_size": (3, 2), "dilation": (1, 2)}, 2),
])
def test_module_equals_functional_call(spatial, options, E):
    d_model, heads = 16, 4
    layer = NeighborhoodAttention(d_model, heads, rngs=nnx.Rngs(0), **options)
    x = normal(1, (2, *spatial, d_model))
    extra = normal(2, (2, E, d_model)) if E else None
    got = layer(x, extra)
    K = options.get("num_kv_heads", heads)
    h = d_model // heads

    def split(y):
        y = y.reshape(*y.shape[:-1], heads + 2 * K, h)
        return y[..., :heads, :], y[..., heads:heads + K, :], y[..., heads + K:, :]

    q, k, v = split(x @ layer.qkv_proj.kernel[...] + layer.qkv_proj.bias[...])
    fn_options = {key: val for key, val in options.items() if key != "num_kv_heads"}
    if E:
        _, ek, ev = split(extra @ layer.qkv_proj.kernel[...] + layer.qkv_proj.bias[...])
        fn_options.update(extra_key=ek, extra_value=ev)
    y = neighborhood_attention(q, k, v, **fn_options).reshape(x.shape)
    want = y @ layer.out_proj.kernel[...] + layer.out_proj.bias[...]
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert got.shape == x.shape


def test_module_errors():
    with pytest.raises(ValueError, match="num_heads"):
        NeighborhoodAttention(10, 3, kernel_size=3, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="num_kv_heads"):
        NeighborhoodAttention(12, 4, kernel_size=3, num_kv_heads=3, rngs=nnx.Rngs(0))
