"""Pick the fastest block sizes for a flash-kernel call on this device, once per (device, key).

:func:`autotune` times each candidate :class:`BlockSizes` with a caller-given ``run`` (the
first calls, which compile, are the warm-up and are not timed; every call is waited for with
``block_until_ready``), skips candidates that fail (a tile that does not fit in shared memory
or VMEM, a shape the kernel rejects) and remembers the winner in a module-level cache keyed by
the device kind and the caller's ``key``. :func:`candidates_for` proposes a few sensible
candidates per backend; :func:`tune_flash_attention` ties both to the kernels.

>>> import jax.numpy as jnp
>>> candidates_for("gpu", 4096, 4096, 128, jnp.bfloat16)[0]
BlockSizes(block_q=128, block_kv=64)

This module imports jax only.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from collections.abc import Callable, Hashable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from pallas_kernels.flash.common import BlockSizes, cdiv

__all__ = ["Trial", "autotune", "candidates_for", "clear_cache", "trials",
           "tune_flash_attention"]


@dataclasses.dataclass(frozen=True)
class Trial:
    """One candidate's outcome: its median time in seconds, or why it could not run."""

    block_sizes: BlockSizes
    seconds: float | None
    error: str | None = None


# (device kind, key) -> the chosen block sizes / every candidate's outcome.
_CACHE: dict[tuple[str, Hashable], BlockSizes] = {}
_TRIALS: dict[tuple[str, Hashable], tuple[Trial, ...]] = {}


def device_kind() -> str:
    """The kind of the default device, e.g. "NVIDIA H100 80GB HBM3", "TPU v5 lite", "cpu"."""
    return jax.devices()[0].device_kind


def clear_cache() -> None:
    """Forget every choice (and its trials)."""
    _CACHE.clear()
    _TRIALS.clear()


def trials(key: Hashable) -> tuple[Trial, ...]:
    """The outcomes behind the cached choice for ``key`` on this device (empty if none)."""
    return _TRIALS.get((device_kind(), key), ())


def _describe(error: BaseException) -> str:
    first = str(error).strip().splitlines()
    return f"{type(error).__name__}: {first[0][:300] if first else ''}"


def autotune(run: Callable[[BlockSizes], Any], candidates: Sequence[BlockSizes], *,
             key: Hashable, warmup: int = 1, iters: int = 3,
             timer: Callable[[], float] = time.perf_counter) -> BlockSizes:
    """The candidate for which ``run`` is fastest on this device, cached per (device, key).

    Args:
        run: calls the kernel with the given block sizes and returns its result (any pytree
            of arrays; it is waited for with ``jax.block_until_ready``). Typically a jitted
            function, so the first call compiles.
        candidates: the block sizes to try, in order of preference (ties go to the first;
            duplicates are tried once).
        key: what the choice depends on besides the device (shapes, dtype, mask kind, ...).
            A second call with the same key on the same device kind returns the cached
            choice without calling ``run``.
        warmup: untimed calls per candidate before timing (they include the compilation).
        iters: timed calls per candidate; the median counts.
        timer: a clock in seconds.

    Returns:
        The chosen ``BlockSizes``; :func:`trials` gives every candidate's time or error.

    Raises:
        ValueError: no candidates, a candidate that is not a BlockSizes, warmup < 0 or
            iters < 1.
        RuntimeError: every candidate failed (the message lists each one's error).
    """
    cache_key = (device_kind(), key)
    if cache_key in _CACHE:
        return _CACHE[cache_key]
    candidates = list(dict.fromkeys(candidates))
    if not candidates:
        raise ValueError("candidates: expected at least one BlockSizes, got none")
    for c in candidates:
        if not isinstance(c, BlockSizes):
            raise ValueError(f"candidates: expected BlockSizes, got {c!r}")
    if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
        raise ValueError(f"warmup: expected an int >= 0, got {warmup!r}")
    if isinstance(iters, bool) or not isinstance(iters, int) or iters < 1:
        raise ValueError(f"iters: expected an int >= 1, got {iters!r}")

    outcomes = []
    for blocks in candidates:
        try:
            for _ in range(warmup):
                jax.block_until_ready(run(blocks))
            times = []
            for _ in range(iters):
                start = timer()
                jax.block_until_ready(run(blocks))
                times.append(timer() - start)
        except Exception as error:  # any failure disqualifies the candidate
            outcomes.append(Trial(blocks, None, _describe(error)))
        else:
            outcomes.append(Trial(blocks, statistics.median(times)))
    _TRIALS[cache_key] = tuple(outcomes)
    ran = [t for t in outcomes if t.seconds is not None]
    if not ran:
        reasons = "; ".join(f"{t.block_sizes}: {t.error}" for t in outcomes)
        raise RuntimeError(f"autotune: every candidate failed for key {key!r} on "
                           f"{cache_key[0]}: {reasons}")
    best = min(ran, key=lambda t: t.seconds).block_sizes  # min keeps the first of equals
    _CACHE[cache_key] = best
    return best


def _next_power_of_2(x: int) -> int:
    return 1 << max(0, x - 1).bit_length()


def candidates_for(backend: str, T: int, S: int, H: int, dtype: Any = jnp.bfloat16
                   ) -> list[BlockSizes]:
    """A few block sizes worth trying for T queries, S keys, head dim H, the kernel's default
    first.

    GPU (Triton): powers of two in 32..128 with 4 or 8 warps, smaller for float32 and for
    H > 128 (shared memory), capped at the next power of two of the length (>= 16). TPU
    (Mosaic): multiples of 128 in 128..1024, capped at the length rounded up to 128 (a length
    <= 128 gets one block rounded up to 32).

    >>> candidates_for("tpu", 100, 100, 64, jnp.bfloat16)
    [BlockSizes(block_q=128, block_kv=128)]

    Raises:
        ValueError: an unknown backend or a non-positive size.
    """
    for name, size in (("T", T), ("S", S), ("H", H)):
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ValueError(f"{name}: expected a positive int, got {size!r}")
    wide = jnp.dtype(dtype).itemsize > 2
    if backend == "gpu":
        from pallas_kernels.flash import gpu

        if H <= 64:
            sizes = [(128, 128, 4), (128, 64, 4), (64, 64, 4), (64, 128, 4), (128, 32, 4)]
        elif H <= 128:
            sizes = [(128, 64, 8), (128, 128, 8), (64, 64, 4), (64, 128, 8), (128, 32, 4)]
        else:
            sizes = [(64, 64, 8), (64, 32, 4), (32, 64, 4), (128, 32, 8), (32, 32, 4)]
        if wide:
            sizes = [(max(16, q // 2), max(16, k // 2), w) for q, k, w in sizes]

        def cap(block: int, length: int) -> int:
            return min(block, max(16, _next_power_of_2(length)))

        found = [gpu.default_block_sizes(T, S, H, dtype)]
        found += [BlockSizes(cap(q, T), cap(k, S), num_warps=w) for q, k, w in sizes]
    elif backend == "tpu":
        from pallas_kernels.flash import tpu

        small = wide and H > 128
        sizes = [(256, 512), (512, 1024), (256, 256), (128, 512)] if small else \
            [(512, 1024), (1024, 512), (256, 512), (512, 256), (256, 256)]

        def cap(block: int, length: int) -> int:
            if length <= 128:
                return cdiv(length, 32) * 32
            return min(block, cdiv(length, 128) * 128)

        found = [tpu.default_block_sizes(T, S, H, dtype)]
        found += [BlockSizes(cap(q, T), cap(k, S)) for q, k in sizes]
    else:
        raise ValueError(f"backend: expected 'gpu' or 'tpu', got {backend!r}")
    return list(dict.fromkeys(found))


def tune_flash_attention(query: jax.Array, key: jax.Array, value: jax.Array, *,
                         backend: str | None = None, candidates: Sequence[BlockSizes] | None
                         = None, backward: bool = False, interpret: bool = False,
                         warmup: int = 1, iters: int = 3, tag: Hashable = None,
                         **kernel_args: Any) -> BlockSizes:
    """Autotune the block sizes of ``pallas_kernels.flash.<backend>.flash_attention`` for
    these inputs (their shapes and dtype form the cache key, with ``tag``, the mask options'
    names and ``backward``).

    Args:
        query, key, value: as for the kernel ([B, T, N, H], [B, S, K, H], [B, S, K, Hv]).
        backend: "gpu" or "tpu"; default the JAX backend.
        candidates: default :func:`candidates_for`.
        backward: time forward + backward (gradients of the output) instead of the forward.
        interpret: run the kernels in interpret mode (for debugging on a CPU).
        warmup, iters: as for :func:`autotune`.
        tag: anything else the choice should depend on (e.g. a mask's description).
        **kernel_args: passed to the kernel (lo, hi, segment ids, lengths, soft cap, ...);
            not ``block_map`` or ``block_sizes`` (a block map depends on the block sizes).

    Returns:
        The chosen ``BlockSizes``.

    >>> q = jnp.ones((1, 32, 1, 16), jnp.float32)
    >>> blocks = tune_flash_attention(q, q, q, backend="gpu", hi=0, interpret=True, iters=1,
    ...                               candidates=[BlockSizes(16, 16), BlockSizes(32, 16)])
    >>> blocks in (BlockSizes(16, 16), BlockSizes(32, 16))
    True
    """
    backend = jax.default_backend() if backend is None else backend
    if backend not in ("gpu", "tpu"):
        raise ValueError(f"backend: expected 'gpu' or 'tpu', got {backend!r} (pass "
                         "backend='gpu' with interpret=True to tune in interpret mode)")
    for name in ("block_map", "block_sizes"):
        if name in kernel_args:
            raise ValueError(f"{name}: not accepted here (it depends on the block sizes)")
    if backend == "gpu":
        from pallas_kernels.flash.gpu import flash_attention
    else:
        from pallas_kernels.flash.tpu import flash_attention
    _, T, _, H = query.shape
    S = key.shape[1]
    if candidates is None:
        candidates = candidates_for(backend, T, S, H, query.dtype)

    compiled: dict[BlockSizes, Callable] = {}

    def run(blocks: BlockSizes):
        # One jitted function per candidate: the warm-up compiles it, the timed calls reuse it.
        if blocks not in compiled:
            def forward(q, k, v):
                return flash_attention(q, k, v, block_sizes=blocks, interpret=interpret,
                                       **kernel_args)[0]

            def loss(q, k, v):
                return forward(q, k, v).astype(jnp.float32).sum()

            compiled[blocks] = jax.jit(
                jax.grad(loss, argnums=(0, 1, 2)) if backward else forward)
        return compiled[blocks](query, key, value)

    cache_key = ("flash_attention", backend, query.shape, key.shape, value.shape,
                 jnp.dtype(query.dtype).name, tuple(sorted(kernel_args)), backward, interpret,
                 tag)
    return autotune(run, candidates, key=cache_key, warmup=warmup, iters=iters)

