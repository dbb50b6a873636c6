"""The Pallas flash kernels (:mod:`pallas_kernels.flash`) as implementations of
:func:`jattn.dot_product_attention`.

* ``"pallas_gpu"``: the Triton kernel; on a machine without a GPU it runs in interpret mode,
  so a kernel can be debugged on a laptop.
* ``"pallas_tpu"``: the Mosaic kernel; TPU interpret mode elsewhere.
* ``"pallas"``: the kernel of this platform (GPU or TPU); NotImplementedError on a CPU. It is
  the first choice of ``implementation=None`` on GPUs and TPUs.

A :class:`jattn.masks.Mask` reaches a kernel in two forms: its block map at the kernel's
tile sizes (EMPTY tiles are skipped, FULL tiles need no mask arithmetic) and the elementwise
pieces the kernels evaluate inside a tile (:func:`kernel_mask`). A ``score_mod`` is
converted (:func:`jattn.core.score_mod.convert`) and evaluated in each tile, its closed-over
arrays passed whole to every program. The kernels have no bias and no dropout, and want as
many value heads as key heads: such calls raise NotImplementedError, and the dispatcher
moves on.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jattn.core import masks as _masks
from jattn.core import score_mod as _score_mod
from jattn.core.masks import Mask
from jattn.core.shapes import Array
from pallas_kernels.flash import gpu as _gpu
from pallas_kernels.flash import tpu as _tpu
from pallas_kernels.flash.common import DTYPES, MAX_HEAD_DIM

_KERNELS = {"gpu": _gpu, "tpu": _tpu}


def _tighter(a: int | None, b: int | None, pick) -> int | None:
    return b if a is None else a if b is None else pick(a, b)


def kernel_mask(mask: Mask | None, B: int, T: int, S: int, block_q: int,
                block_kv: int) -> dict:
    """The kernels' elementwise mask arguments for ``mask`` over a ``[B, *, T, S]`` pattern, for
    tiles of ``block_q`` x ``block_kv``.

    Every conjunct the kernels know natively goes to its argument: bands intersect into one
    ``lo <= kv - q <= hi``, lengths into the shortest, the first segment ids stay ids; masks
    of positions only (neighbourhoods, and ``|`` / ``~`` of such) become the ``static_mask``
    the kernels evaluate in each tile; a block selection whose blocks are whole tiles is
    left to the block map alone (its tiles are EMPTY or FULL); anything else (another
    segment mask, token types, dense arrays, other combinations) is written out into
    ``dense_mask`` [Bm, Nm, T, S].

    >>> m = _masks.causal() & _masks.local_window(3, 0) & _masks.lengths(kv_lengths=[5])
    >>> args = kernel_mask(m, 1, 8, 8, 16, 16)
    >>> args["lo"], args["hi"], args["kv_lengths"].tolist()
    (-3, 0, [5])
    """
    args: dict = {}
    if mask is None:
        return args
    dense, static = [], []
    for leaf in mask.conjuncts():
        if isinstance(leaf, _masks.BlockSelection) and (
                leaf.block_q % block_q == 0 and leaf.block_kv % block_kv == 0):
            continue
        if isinstance(leaf, _masks.Band):
            args["lo"] = _tighter(args.get("lo"), leaf.lo, max)
            args["hi"] = _tighter(args.get("hi"), leaf.hi, min)
        elif isinstance(leaf, _masks.Lengths):
            for name, x in (("q_lengths", leaf.q_lengths), ("kv_lengths", leaf.kv_lengths)):
                if x is not None:
                    x = jnp.broadcast_to(x.astype(jnp.int32), (B,))
                    args[name] = x if name not in args else jnp.minimum(args[name], x)
        elif isinstance(leaf, _masks.Segments) and "q_segment_ids" not in args:
            args["q_segment_ids"] = jnp.broadcast_to(leaf.q_ids.astype(jnp.int32), (B, T))
            args["kv_segment_ids"] = jnp.broadcast_to(leaf.kv_ids.astype(jnp.int32), (B, S))
        elif leaf.is_static:
            static.append(leaf)
        else:
            dense.append(leaf)
    if static:
        args["static_mask"] = _masks.all_of(static)
    if dense:
        array = _masks.all_of(dense).materialize(T, S)
        args["dense_mask"] = jnp.broadcast_to(array, (*array.shape[:2], T, S))
    return args


def _check_supported(query, key, value, bias, dropout) -> None:
    if bias is not None:
        raise NotImplementedError("the Pallas kernels take no bias")
    if dropout is not None:
        raise NotImplementedError("the Pallas kernels have no attention dropout")
    if value.shape[2] != key.shape[2]:
        raise NotImplementedError("the Pallas kernels need as many value heads as key heads")
    if query.dtype.name not in DTYPES:
        raise NotImplementedError(f"the Pallas kernels take {'/'.join(DTYPES)}, "
                                  f"got {query.dtype}")
    if max(query.shape[3], value.shape[3]) > MAX_HEAD_DIM:
        raise NotImplementedError(f"the Pallas kernels take head dims <= {MAX_HEAD_DIM}, "
                                  f"got {query.shape[3]} and {value.shape[3]}")


def flash_implementation(platform: str, query, key, value, bias, mask, *, scale,
                         logits_soft_cap, dropout, score_mod=None, block_sizes=None,
                         interpret=None) -> tuple[Array, Array]:
    """The registry's call of the ``platform`` ("gpu" or "tpu") kernel, at ``block_sizes``
    (default: the kernel's ``default_block_sizes``); ``interpret``: the kernel's argument
    (default: interpret mode off that platform)."""
    _check_supported(query, key, value, bias, dropout)
    mod = {}
    if score_mod is not None:
        fn, args = _score_mod.convert(score_mod, jnp.float32)
        mod = {"score_mod": fn, "score_mod_args": args}
    kernel = _KERNELS[platform]
    B, T, _, H = query.shape
    S = key.shape[1]
    blocks = block_sizes or kernel.default_block_sizes(T, S, H, query.dtype)
    block_map = None if mask is None else mask.block_map(T, S, blocks.block_q,
                                                         blocks.block_kv)
    return kernel.flash_attention(
        query, key, value, scale=scale, logits_soft_cap=logits_soft_cap, block_map=block_map,
        block_sizes=blocks, **mod,
        interpret=jax.default_backend() != platform if interpret is None else interpret,
        **kernel_mask(mask, B, T, S, blocks.block_q, blocks.block_kv))


def pallas_gpu_attention(query, key, value, bias, mask, *, scale, logits_soft_cap, dropout,
                         score_mod=None):
    """The Triton flash kernel (interpret mode off a GPU)."""
    return flash_implementation("gpu", query, key, value, bias, mask, scale=scale,
                  logits_soft_cap=logits_soft_cap, dropout=dropout, score_mod=score_mod)


def pallas_tpu_attention(query, key, value, bias, mask, *, scale, logits_soft_cap, dropout,
                         score_mod=None):
    """The Mosaic flash kernel (TPU interpret mode off a TPU)."""
    return flash_implementation("tpu", query, key, value, bias, mask, scale=scale,
                  logits_soft_cap=logits_soft_cap, dropout=dropout, score_mod=score_mod)


def pallas_attention(query, key, value, bias, mask, *, scale, logits_soft_cap, dropout,
                     score_mod=None):
    """The flash kernel of this platform; NotImplementedError on a CPU."""
    platform = jax.default_backend()
    if platform not in _KERNELS:
        raise NotImplementedError(f"the Pallas kernels need a GPU or TPU, the backend is "
                                  f"{platform} (name pallas_gpu or pallas_tpu to interpret)")
    return flash_implementation(platform, query, key, value, bias, mask, scale=scale,
                  logits_soft_cap=logits_soft_cap, dropout=dropout, score_mod=score_mod)
