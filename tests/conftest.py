"""Shared helpers: float64 ground truth, tolerance tables, comparison."""

from __future__ import annotations

import functools
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jattn
from jattn import reference
from jattn.core.chunked import BlockSizes
from jattn.mixers.h3 import DiagonalSSM, ShiftSSM
from pallas_kernels.flash import gpu as flash_gpu
from pallas_kernels.flash import tpu as flash_tpu
from pallas_kernels.flash.common import EMPTY, FULL, PARTIAL
from pallas_kernels.flash.common import BlockSizes as FlashBlockSizes

REPO = Path(__file__).resolve().parent.parent  # the repository's root


def pytest_collection_modifyitems(items):
    """Tests marked slow (subprocesses, presets, notebooks: 10-60 s each) run first, so that
    under pytest-xdist none of them starts last and keeps one worker busy alone at the end."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)

# Small tiles so that T=37, S=45 span several query and key blocks, none of them a multiple
# of the block: the padding, tile skipping and FULL/PARTIAL paths all run; the backward pass
# tiles differently from the forward pass.
SMALL_BLOCKS = BlockSizes(block_q=16, block_kv=8, block_q_bwd=8, block_kv_bwd=16)


def _named(name: str, fn: functools.partial) -> functools.partial:
    fn.__name__ = name  # what the dispatcher's messages call it
    return fn


# The implementations the shared suite runs, by test id: the registry's names, and callables
# (an implementation need not be registered) for the chunked path and the Pallas kernels in
# interpret mode at tiles small enough that the suite's shapes span several (the kernels
# share tiles between the forward and backward passes). The TPU kernel runs in Pallas's
# generic interpreter here (3x faster); tests/kernels/ check it in TPU interpret mode.
KERNELS = {"pallas_gpu_small_blocks": "gpu", "pallas_tpu_small_blocks": "tpu"}
_INTERPRET = {"gpu": None, "tpu": "hlo" if jax.default_backend() != "tpu" else None}
IMPLEMENTATIONS = {
    "xla": "xla",
    "chunked": "chunked",
    "chunked_small_blocks": _named("chunked_small_blocks", functools.partial(
        jattn.chunked_attention, block_sizes=SMALL_BLOCKS)),
    **{name: _named(name, functools.partial(
        jattn.kernels.flash_implementation, platform, interpret=_INTERPRET[platform],
        block_sizes=FlashBlockSizes(block_q=16, block_kv=16)))
       for name, platform in KERNELS.items()},
}


def as_implementation(name):
    """The ``implementation=`` argument for a test id of :data:`IMPLEMENTATIONS` (other names
    and None pass through)."""
    return IMPLEMENTATIONS.get(name, name)


# Normalised max error, max|got - want| / max(1, max|want|), per dtype and quantity.
TOLERANCE = {
    "float32": {"forward": 2e-5, "grad": 1e-4},
    "bfloat16": {"forward": 2e-2, "grad": 6e-2},
    "float16": {"forward": 4e-3, "grad": 1e-2},
    "float64": {"forward": 1e-12, "grad": 1e-11},
}


def normalised_error(got, want) -> float:
    got = np.asarray(got, np.float64)
    want = np.asarray(want, np.float64)
    assert got.shape == want.shape, (got.shape, want.shape)
    assert np.isfinite(got[np.isfinite(want)]).all(), "non-finite values where want is finite"
    finite = np.isfinite(want)
    np.testing.assert_array_equal(got[~finite], want[~finite])
    if not finite.any():
        return 0.0
    return float(np.abs(got[finite] - want[finite]).max() / max(1.0, np.abs(want[finite]).max()))


def assert_close(got, want, dtype, quantity: str) -> None:
    err = normalised_error(got, want)
    tol = TOLERANCE[jnp.dtype(dtype).name][quantity]
    assert err <= tol, f"{quantity} error {err:.3g} > {tol:g} ({jnp.dtype(dtype).name})"


def to64(tree):
    """Floating leaves to float64 (call inside jax.enable_x64)."""
    return jax.tree_util.tree_map(
        lambda x: jnp.asarray(x, jnp.float64)
        if hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.floating) else x, tree)


@pytest.fixture(params=IMPLEMENTATIONS)
def implementation(request):
    return request.param


def output_and_vjp(fn, cotangent):
    """jit(args -> (fn(*args), its vjp applied to ``cotangent``)): one compilation instead
    of many eager dispatches."""
    @jax.jit
    def run(*args):
        out, pullback = jax.vjp(fn, *args)
        return out, pullback(cotangent)
    return run


def normal(seed, shape, dtype=jnp.float32):
    """Standard normal test data from NumPy (no PRNG kernels to compile), in ``dtype``."""
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), dtype)


def qkv(dtype=jnp.float32, B=2, T=11, S=11, N=4, K=2, H=8, Hv=6, seed=0):
    """Standard normal query [B, T, N, H], key [B, S, K, H] and value [B, S, K, Hv]."""
    return (normal(seed, (B, T, N, H), dtype), normal(seed + 1, (B, S, K, H), dtype),
            normal(seed + 2, (B, S, K, Hv), dtype))


def cast_floating(tree, dtype):
    """Every floating leaf of ``tree`` in ``dtype`` (integer and boolean leaves unchanged)."""
    return jax.tree_util.tree_map(
        lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)


def _leaves_of(fn):
    """fn with its output flattened to a tuple of leaves."""
    return lambda *args: tuple(jax.tree_util.tree_leaves(fn(*args)))


def check_against_reference(fn, ref, args, dtype=jnp.float32, *, cotangent=None, grad=True,
                            seed=99):
    """fn(*args) in ``dtype`` against ref(*args) in float64: every output and (``grad``) the
    vjp of ``cotangent`` (default: a random normal per floating output; it is cast to each
    output's dtype, and integer outputs get float0), i.e. the gradient of a random projection
    of the outputs. Gradients must be finite. Forward-only checks compile a third as much.
    ``dtype`` float64 runs both sides with x64 enabled. Returns fn's outputs."""
    if jnp.dtype(dtype) == jnp.float64 and not jax.config.jax_enable_x64:
        with jax.enable_x64(True):
            return check_against_reference(fn, ref, args, dtype, cotangent=cotangent,
                                           grad=grad, seed=seed)
    args = cast_floating(args, dtype)

    def compare(got, want, quantity):
        for a, w in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want),
                        strict=True):
            if a.dtype == jax.dtypes.float0:
                continue
            if quantity == "grad":
                assert np.isfinite(np.asarray(a, np.float64)).all()
            assert_close(a, w, dtype, quantity)

    if not grad:
        got = jax.jit(fn)(*args)
        with jax.enable_x64(True):
            compare(got, jax.jit(ref)(*to64(args)), "forward")
        return got
    # Outputs as tuples of leaves: fn and ref may return different pytree types (a library
    # NamedTuple and the reference's own) with the same leaves in the same order.
    treedef = jax.tree_util.tree_structure(jax.eval_shape(fn, *args))
    fn, ref = _leaves_of(fn), _leaves_of(ref)
    leaves = jax.eval_shape(fn, *args)
    given = None if cotangent is None else jax.tree_util.tree_leaves(cotangent)
    cot = []
    for i, s in enumerate(leaves):
        if not jnp.issubdtype(s.dtype, jnp.floating):
            cot.append(np.zeros(s.shape, jax.dtypes.float0))
        elif given is None:
            cot.append(normal(seed + i, s.shape, s.dtype))
        else:
            cot.append(jnp.asarray(given[i]).astype(s.dtype))
    cot = tuple(cot)
    got, g_got = output_and_vjp(fn, cot)(*args)
    with jax.enable_x64(True):
        want, g_want = output_and_vjp(ref, to64(cot))(*to64(args))
    compare(got, want, "forward")
    compare(g_got, g_want, "grad")
    return treedef.unflatten(got)


def attention_maps(L=3, B=2, N=2, T=6, seed=0, is_causal=False):
    """L layers of softmax attention maps [L, B, N, T, T] (lower-triangular when causal)."""
    logits = normal(seed, (L, B, N, T, T))
    if is_causal:
        logits = jnp.where(jnp.tril(jnp.ones((T, T), bool)), logits, -jnp.inf)
    return jax.nn.softmax(logits, axis=-1)


# --------------------------------------------------------------------------------------------
# The Pallas kernels at their own interface (tests/kernels), in interpret mode.

# Small tiles so that short sequences span several tiles and none is a whole number of them.
KERNEL_BLOCKS = FlashBlockSizes(block_q=16, block_kv=16)


def flash_kernel(backend: str):
    """``flash_attention`` of pallas_kernels.flash.gpu or .tpu."""
    return {"gpu": flash_gpu, "tpu": flash_tpu}[backend].flash_attention


def dense_mask(spec: dict, B: int, T: int, S: int) -> np.ndarray:
    """The mask a kernel's mask arguments ``spec`` describe, written out: bool [B, 1|N, T, S]."""
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
    nq, nk = -(-T // bq), -(-S // bk)
    kinds = np.zeros((Bm, Nm, nq, nk), np.int8)
    for a in range(nq):
        for c in range(nk):
            tile = allowed[:, :, a * bq:(a + 1) * bq, c * bk:(c + 1) * bk]
            kinds[:, :, a, c] = np.where(tile.all((2, 3)), FULL,
                                         np.where(tile.any((2, 3)), PARTIAL, EMPTY))
    return kinds


def check_kernel_against_reference(backend, *, B=2, T=37, S=37, N=4, K=2, H=32, Hv=None,
                                   dtype=jnp.float32, scale=None, logits_soft_cap=None,
                                   spec=None, with_block_map=True, seed=0, interpret=True):
    """The ``backend`` kernel with mask arguments ``spec`` (and the exact block map) against
    the reference given the same mask written out: output, log-sum-exp (of the rows that
    attend to something) and the gradients of both. ``interpret``: the kernel's argument
    (the TPU kernel: True is TPU interpret mode, "hlo" the generic interpreter)."""
    spec = dict(spec or {})
    Hv = H if Hv is None else Hv
    q = normal(seed, (B, T, N, H), dtype)
    k = normal(seed + 1, (B, S, K, H), dtype)
    v = normal(seed + 2, (B, S, K, Hv), dtype)
    allowed = dense_mask(spec, B, T, S)
    if with_block_map:
        spec["block_map"] = jnp.asarray(
            block_map_of(allowed, KERNEL_BLOCKS.block_q, KERNEL_BLOCKS.block_kv))
    spec = {name: (jnp.asarray(x) if isinstance(x, np.ndarray) else x)
            for name, x in spec.items()}
    rows = allowed.any(-1)
    flash = flash_kernel(backend)

    def kernel(q, k, v):
        out, lse = flash(q, k, v, scale=scale, logits_soft_cap=logits_soft_cap,
                         block_sizes=KERNEL_BLOCKS, interpret=interpret, **spec)
        return out, jnp.where(rows, lse, 0)

    def ref(q, k, v):
        out, lse = reference.dot_product_attention(
            q, k, v, mask=jnp.asarray(allowed), scale=scale, logits_soft_cap=logits_soft_cap,
            return_lse=True)
        # Empty rows have lse = -inf in the reference; only their (zero) output is compared.
        return out, jnp.where(jnp.isfinite(lse), lse, 0)

    out, lse = check_against_reference(kernel, ref, (q, k, v), dtype, seed=seed + 3)
    assert out.dtype == dtype and out.shape == (B, T, N, Hv)
    assert lse.dtype == jnp.float32 and lse.shape == (B, N, T)


# --------------------------------------------------------------------------------------------
# Inputs of the attention-free mixers (tests/mixers)


def h3_inputs(dtype=jnp.float32, b=2, L=13, N=3, P=2, M=5, Z=4, seed=0):
    """q, k, v [b, L, N, P], a general shift SSM and a stable diagonal SSM for H3."""
    qkv = tuple(normal(seed + i, (b, L, N, P), dtype) for i in range(3))
    shift = ShiftSSM(normal(seed + 3, (N, P, M), dtype),  # a general B, not e_1
                     normal(seed + 4, (N, P, M), dtype), normal(seed + 5, (N, P), dtype))
    rng = np.random.default_rng(seed)
    diag = DiagonalSSM(
        jnp.asarray(rng.uniform(math.log(1e-3), math.log(0.5), (N,)), dtype),
        math.log(0.5) + 0.3 * normal(seed + 7, (N, Z), dtype),
        (math.pi * jnp.arange(Z) + 0.1 * normal(seed + 8, (N, Z))).astype(dtype),
        normal(seed + 9, (N, Z, 2), dtype), normal(seed + 10, (N, Z, 2), dtype),
        normal(seed + 11, (N,), dtype))
    return qkv, shift, diag


def scan_inputs(dtype, b=2, L=37, d=5, n=4, seed=0):
    """u, delta, A, B, C, D of a selective scan over [b, L, d] with state size n."""
    k = jax.random.split(jax.random.key(seed), 6)
    return (jax.random.normal(k[0], (b, L, d), dtype),
            jax.nn.softplus(jax.random.normal(k[1], (b, L, d), dtype)),
            -jnp.exp(jax.random.normal(k[2], (d, n), dtype)),
            jax.random.normal(k[3], (b, L, n), dtype),
            jax.random.normal(k[4], (b, L, n), dtype),
            jax.random.normal(k[5], (d,), dtype))
