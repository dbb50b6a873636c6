"""Flash attention for NVIDIA GPUs: Pallas kernels with the Triton lowering.

Three kernels, no atomics:

* forward, grid (B, N, ceil(T / bq)): one query tile of one head walks the non-empty key tiles
  of its row of the block map (``common.schedule``) with an online softmax; writes the output
  and the log-sum-exp.
* dK/dV, grid (B, K, ceil(S / bk)): one key tile of one kv head walks, for every query head of
  its group, the non-empty query tiles of its column of the block map.
* dQ, grid (B, N, ceil(T / bq)): like the forward.

(Each grid launches tile axis first, see ``_grid``.)

GQA/MQA happens inside the kernels (kv head ``n // (N // K)`` serves query head ``n``); K and V
are never repeated. Lengths that are not a multiple of the tile and head dims that are not a
power of two are padded here, at the kernels' boundary (Triton wants power-of-two blocks).
With ``interpret=True`` the same kernels run on any backend, the CPU included.

This module imports jax only.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.flash import common
from pallas_kernels.flash.common import FULL, BlockSizes, cdiv

__all__ = ["BlockSizes", "default_block_sizes", "flash_attention"]

_LOG2E = math.log2(math.e)
_LN2 = math.log(2.0)
_MIN_BLOCK = 16  # Triton's tl.dot wants every dimension >= 16


_compiled_only = False  # see force_compiled()


def force_compiled(enabled: bool = True) -> None:
    """From now on in this process, compile the kernels for the GPU even when a caller asks
    for ``interpret=True``: the GPU suite runs the CPU tests (which interpret) this way, so
    the same tests check the compiled kernels on hardware. ``enabled=False`` restores the
    callers' choice."""
    global _compiled_only
    _compiled_only = bool(enabled)


def _next_power_of_2(x: int) -> int:
    return 1 << max(0, x - 1).bit_length()


def default_block_sizes(T: int, S: int, H: int, dtype: Any = jnp.bfloat16) -> BlockSizes:
    """Tile sizes for a call with T queries, S keys and head dim H.

    128 x 64 for H <= 128 and 64 x 64 above (64 x 64 and 32 x 32 for float32, whose tiles
    take twice the shared memory), shrunk to the next power of two of T (resp. S) for short
    sequences, never below 16.

    >>> default_block_sizes(4096, 4096, 128, jnp.bfloat16)
    BlockSizes(block_q=128, block_kv=64)
    >>> default_block_sizes(20, 5, 64, jnp.float32)
    BlockSizes(block_q=32, block_kv=16)
    """
    wide = jnp.dtype(dtype).itemsize > 2
    if H <= 128:
        block_q, block_kv = (64, 64) if wide else (128, 64)
    else:
        block_q, block_kv = (32, 32) if wide else (64, 64)
    block_q = min(block_q, max(_MIN_BLOCK, _next_power_of_2(T)))
    block_kv = min(block_kv, max(_MIN_BLOCK, _next_power_of_2(S)))
    return BlockSizes(block_q, block_kv)


def _check_block_sizes(block_sizes: BlockSizes) -> None:
    if not isinstance(block_sizes, BlockSizes):
        raise ValueError(f"block_sizes: expected a common.BlockSizes, got {block_sizes!r}")
    for name in ("block_q", "block_kv"):
        size = getattr(block_sizes, name)
        if size < _MIN_BLOCK or size & (size - 1):
            raise ValueError(
                f"block_sizes: {name} must be a power of two >= {_MIN_BLOCK} (Triton tiles and "
                f"tl.dot), got {size}")
    block_sizes.check_shared_tiles()


@dataclasses.dataclass(frozen=True)
class _Config:
    """Everything static about one call (hashable: the custom_vjp's non-diff argument)."""

    B: int
    T: int  # real lengths
    S: int
    N: int
    K: int
    H: int  # padded head dims
    Hv: int
    block_q: int
    block_kv: int
    scale: float
    lo: int | None
    hi: int | None
    cap: float | None
    segments: bool
    q_lengths: bool
    kv_lengths: bool
    dense: tuple[int, int] | None  # (Bm, Nm) of the dense mask
    static: Any  # the static mask (an object with allows(q_pos, kv_pos)) or None
    mod: Any  # the vectorised score_mod (common.modified_scores) or None
    mod_shapes: tuple[tuple[int, ...], ...]  # shapes of its array arguments
    block_map: tuple[int, int] | None  # (Bm, Nm) of the block map
    num_warps: int | None
    num_stages: int | None
    interpret: bool

    @property
    def G(self) -> int:
        return self.N // self.K

    @property
    def nq(self) -> int:
        return cdiv(self.T, self.block_q)

    @property
    def nk(self) -> int:
        return cdiv(self.S, self.block_kv)

    @property
    def Tp(self) -> int:
        return self.nq * self.block_q

    @property
    def Sp(self) -> int:
        return self.nk * self.block_kv

    def compiler_params(self, backward: bool):
        warps = self.num_warps
        if warps is None:
            warps = 4 if max(self.H, self.Hv) <= 64 else 8
        stages = self.num_stages
        if stages is None:
            stages = 2 if backward or max(self.H, self.Hv) > 64 else 3
        return plgpu.CompilerParams(num_warps=warps, num_stages=stages)


class _Masks(NamedTuple):
    """The mask pieces as the kernels read them (None where absent)."""

    q_segment_ids: jax.Array | None  # int32 [B, Tp]
    kv_segment_ids: jax.Array | None  # int32 [B, Sp]
    q_lengths: jax.Array | None  # int32 [B]
    kv_lengths: jax.Array | None  # int32 [B]
    dense: jax.Array | None  # int8 [Bm, Nm, Tp, Sp]
    rows: jax.Array | None  # int32 [Bm, Nm, nq, 1 + nk]: count, then col * 4 + kind
    cols: jax.Array | None  # int32 [Bm, Nm, nk, 1 + nq]: the same for the transposed map


def _packed_schedule(block_map: jax.Array) -> jax.Array:
    """common.schedule packed for scalar reads: [..., 0] = count, [..., 1 + j] = 4 * index_j +
    kind_j (one load per visited tile)."""
    s = common.schedule(block_map)
    code = s.index * 4 + s.kind.astype(jnp.int32)
    return jnp.concatenate([s.count[..., None], code], axis=-1).astype(jnp.int32)


# ----------------------------------------------------------------------------- kernel helpers


def _dot(a, b, *, contract: tuple[int, int], precision):
    """a @ b contracting a's axis contract[0] with b's axis contract[1], float32 result."""
    return lax.dot_general(a, b, (((contract[0],), (contract[1],)), ((), ())),
                           precision=precision, preferred_element_type=jnp.float32)


def _precision(dtype):
    # float32 inputs: IEEE products (Triton would otherwise use TF32).
    return lax.Precision.HIGHEST if dtype == jnp.float32 else None


def _logits(q, k, cfg: _Config, mod=None, pullback: bool = False):
    """Logits of a tile in base-2 units, [bq, bk] float32; tanh of the soft cap (or None);
    with ``pullback``, the score_mod's ``back`` (``common.modified_scores``; None without).

    Base 2: ``s2 = log2(e) * logits`` so that ``exp(logits - m) = exp2(s2 - m2)``. ``mod`` is
    the tile's (indices, args) for ``cfg.mod``.
    """
    qk = _dot(q, k, contract=(1, 1), precision=_precision(q.dtype))
    back = None
    if cfg.mod is None:
        if cfg.cap is None:
            return qk * (cfg.scale * _LOG2E), None, None
        t = jnp.tanh(qk * (cfg.scale / cfg.cap))
        return t * (cfg.cap * _LOG2E), t, None
    s = common.modified_scores(cfg.mod, qk * cfg.scale, *mod, pullback=pullback)
    if pullback:
        s, back = s
    if cfg.cap is None:
        return s * _LOG2E, None, back
    t = jnp.tanh(s / cfg.cap)
    return t * (cfg.cap * _LOG2E), t, back


def _mod_args(r, cfg: _Config) -> tuple:
    """The score_mod's array arguments, read whole (stored at least 1-d)."""
    return tuple(r[f"mod{i}"][...].reshape(shape) for i, shape in enumerate(cfg.mod_shapes))


def _mod_indices(cfg: _Config, b, head, q_pos, kv_pos):
    """The score_mod's (batch, head, q_index, kv_index) of a [bq, bk] tile (rows: q_pos,
    columns: kv_pos); padded rows and columns read the last real index."""
    one = (1, 1)
    return (jnp.broadcast_to(b, one), jnp.broadcast_to(head, one),
            jnp.minimum(q_pos, cfg.T - 1)[:, None], jnp.minimum(kv_pos, cfg.S - 1)[None, :])


def _mod_of(cfg: _Config, r, b, head, q_pos):
    """``mod(col)``: the (indices, args) of query tile ``q_pos`` against key tile ``col``,
    for ``_logits`` (None without a score_mod)."""
    if cfg.mod is None:
        return lambda col: None
    args = _mod_args(r, cfg)
    return lambda col: (_mod_indices(cfg, b, head, q_pos,
                                     col * cfg.block_kv + lax.iota(jnp.int32, cfg.block_kv)),
                        args)


def _walk(schedule: Callable[[Any], jax.Array] | None, num: int, step, carry):
    """Call ``step(tile, is_full, carry)`` for each non-empty tile of a schedule row.

    ``schedule(i)`` reads entry i of the packed row; None means "every tile PARTIAL" and walks
    all ``num`` tiles with ``is_full=None`` (mask always applied).
    """
    if schedule is None:
        return lax.fori_loop(0, num, lambda j, c: step(j, None, c), carry)
    count = schedule(0)

    def body(j, c):
        code = schedule(j + 1)
        return step(lax.div(code, 4), lax.rem(code, 4) == FULL, c)

    return lax.fori_loop(0, count, body, carry)


def _masked(s, is_full, mask_fn):
    """``s`` with disallowed entries at -inf; FULL tiles skip the mask arithmetic."""
    def apply(s):
        return jnp.where(mask_fn(), s, -jnp.inf)
    if is_full is None:
        return apply(s)
    return lax.cond(is_full, lambda s: s, apply, s)


def _unpack(names, refs) -> dict[str, Any]:
    assert len(names) == len(refs), (names, len(refs))
    return dict(zip(names, refs, strict=True))


def _scalar_or_none(r, name, b):
    return r[name][b] if name in r else None


def _query_tile_mask(r, cfg: _Config, b, i) -> Callable[[Any], jax.Array]:
    """``mask(col)``: the elementwise mask [bq, bk] of query tile ``i`` against key tile
    ``col``, for the kernels that walk a query tile's row (forward, dQ)."""
    bq, bk = cfg.block_q, cfg.block_kv
    q_pos = i * bq + lax.iota(jnp.int32, bq)
    q_seg = r["q_seg"][...] if cfg.segments else None
    q_len = _scalar_or_none(r, "q_len", b)
    kv_len = _scalar_or_none(r, "kv_len", b)

    def mask(col):
        start = col * bk
        return common.tile_allowed(
            q_pos, start + lax.iota(jnp.int32, bk), kv_limit=cfg.S, lo=cfg.lo, hi=cfg.hi,
            q_segment_ids=q_seg,
            kv_segment_ids=r["kv_seg"][pl.ds(start, bk)] if cfg.segments else None,
            q_length=q_len, kv_length=kv_len,
            dense=r["dense"][:, pl.ds(start, bk)] != 0 if cfg.dense else None,
            static=cfg.static)

    return mask


# Logical grids are (B, N, ceil(T / bq)) for the forward and dQ kernels and (B, K, ceil(S / bk))
# for dK/dV; they launch tile-first, as (tiles, B, heads), because Triton maps the first grid
# axis to CUDA's x, the fastest-varying one: consecutive programs then share one head's K/V
# (forward, dQ) or Q/dO (dK/dV), which stay in L2.


def _grid(batch: int, heads: int, tiles: int) -> tuple[int, int, int]:
    return tiles, batch, heads


def _ids() -> tuple[Any, Any, Any]:
    """(batch, head, tile) program ids of the logical grid."""
    return pl.program_id(1), pl.program_id(2), pl.program_id(0)


def _spec(block_shape, index_map) -> pl.BlockSpec:
    """A BlockSpec over the launch grid, its index map written for the logical grid."""
    return pl.BlockSpec(block_shape, lambda t, b, h: index_map(b, h, t))


# ----------------------------------------------------------------------------- forward kernel


def _forward_kernel(*refs, cfg: _Config, names: tuple[str, ...]):
    r = _unpack(names, refs)
    b, n, i = _ids()
    bq, bk = cfg.block_q, cfg.block_kv
    q = r["q"][...]
    mask = _query_tile_mask(r, cfg, b, i)
    mod = _mod_of(cfg, r, b, n, i * bq + lax.iota(jnp.int32, bq))

    def step(col, is_full, carry):
        acc, m, l = carry
        start = col * bk
        k = r["k"][pl.ds(start, bk), :]
        v = r["v"][pl.ds(start, bk), :]
        s, _, _ = _logits(q, k, cfg, mod(col))
        s = _masked(s, is_full, lambda: mask(col))
        m_new = jnp.maximum(m, s.max(axis=-1))
        # A row with nothing allowed so far keeps m = -inf: subtract 0 instead (no inf - inf).
        m_use = jnp.where(m_new == -jnp.inf, 0.0, m_new)
        alpha = jnp.exp2(m - m_use)
        p = jnp.exp2(s - m_use[:, None])
        l = alpha * l + p.sum(axis=-1)
        pv = _dot(p.astype(v.dtype), v, contract=(1, 0), precision=_precision(v.dtype))
        return alpha[:, None] * acc + pv, m_new, l

    init = (jnp.zeros((bq, cfg.Hv), jnp.float32), jnp.full((bq,), -jnp.inf, jnp.float32),
            jnp.zeros((bq,), jnp.float32))
    rows = r.get("rows")
    acc, m, l = _walk(None if rows is None else (lambda j: rows[j]), cfg.nk, step, init)
    empty = l == 0.0
    l_safe = jnp.where(empty, 1.0, l)
    r["o"][...] = (acc / l_safe[:, None]).astype(r["o"].dtype)
    r["lse"][...] = jnp.where(empty, -jnp.inf, (m + jnp.log2(l_safe)) * _LN2)


# ----------------------------------------------------------------------------- backward kernels


def _dq_kernel(*refs, cfg: _Config, names: tuple[str, ...]):
    r = _unpack(names, refs)
    b, n, i = _ids()
    bq, bk = cfg.block_q, cfg.block_kv
    q = r["q"][...]
    do = r["do"][...]
    lse2 = r["lse"][...]  # base 2, +inf for rows with nothing allowed
    delta = r["delta"][...]
    mask = _query_tile_mask(r, cfg, b, i)
    mod = _mod_of(cfg, r, b, n, i * bq + lax.iota(jnp.int32, bq))

    def step(col, is_full, dq):
        start = col * bk
        k = r["k"][pl.ds(start, bk), :]
        v = r["v"][pl.ds(start, bk), :]
        s, t, back = _logits(q, k, cfg, mod(col), pullback=True)
        s = _masked(s, is_full, lambda: mask(col))
        p = jnp.exp2(s - lse2[:, None])
        dp = _dot(do, v, contract=(1, 1), precision=_precision(do.dtype))
        ds = p * (dp - delta[:, None])
        if t is not None:
            ds = ds * (1.0 - t * t)
        if back is not None:
            ds, _ = back(ds)
        return dq + _dot(ds.astype(k.dtype), k, contract=(1, 0), precision=_precision(k.dtype))

    rows = r.get("rows")
    dq = _walk(None if rows is None else (lambda j: rows[j]), cfg.nk, step,
               jnp.zeros((bq, cfg.H), jnp.float32))
    r["dq"][...] = (dq * cfg.scale).astype(r["dq"].dtype)


def _dkv_kernel(*refs, cfg: _Config, names: tuple[str, ...]):
    r = _unpack(names, refs)
    b, h, c = _ids()
    bq, bk = cfg.block_q, cfg.block_kv
    k = r["k"][...]
    v = r["v"][...]
    kv_pos = c * bk + lax.iota(jnp.int32, bk)
    args = _mod_args(r, cfg)
    kv_seg = r["kv_seg"][...] if cfg.segments else None
    q_len = _scalar_or_none(r, "q_len", b)
    kv_len = _scalar_or_none(r, "kv_len", b)
    dense_per_head = cfg.dense is not None and cfg.dense[1] != 1
    map_per_head = cfg.block_map is not None and cfg.block_map[1] != 1

    def head(g, carry):
        def mask(row):
            start = row * bq
            dense = None
            if cfg.dense:
                tile = (r["dense"][g, pl.ds(start, bq), :] if dense_per_head
                        else r["dense"][pl.ds(start, bq), :])
                dense = tile != 0
            return common.tile_allowed(
                start + lax.iota(jnp.int32, bq), kv_pos, kv_limit=cfg.S, lo=cfg.lo, hi=cfg.hi,
                q_segment_ids=r["q_seg"][pl.ds(start, bq)] if cfg.segments else None,
                kv_segment_ids=kv_seg, q_length=q_len, kv_length=kv_len, dense=dense,
                static=cfg.static)

        def step(row, is_full, carry):
            dk, dv, d_args = carry
            rows = pl.ds(row * bq, bq)
            q = r["q"][rows, g, :]
            do = r["do"][rows, g, :]
            lse2 = r["lse"][g, rows]
            delta = r["delta"][g, rows]
            mod = None if cfg.mod is None else (
                _mod_indices(cfg, b, h * cfg.G + g, row * bq + lax.iota(jnp.int32, bq),
                             kv_pos), args)
            s, t, back = _logits(q, k, cfg, mod, pullback=True)
            s = _masked(s, is_full, lambda: mask(row))
            p = jnp.exp2(s - lse2[:, None])
            dv = dv + _dot(p.astype(do.dtype), do, contract=(0, 0),
                           precision=_precision(do.dtype))
            dp = _dot(do, v, contract=(1, 1), precision=_precision(do.dtype))
            ds = p * (dp - delta[:, None])
            if t is not None:
                ds = ds * (1.0 - t * t)
            if back is not None:
                ds, d = back(ds)
                d_args = jax.tree.map(jnp.add, d_args, d)
            dk = dk + _dot(ds.astype(q.dtype), q, contract=(0, 0), precision=_precision(q.dtype))
            return dk, dv, d_args

        cols = r.get("cols")
        if cols is None:
            schedule = None
        elif map_per_head:
            def schedule(j):
                return cols[g, j]
        else:
            def schedule(j):
                return cols[j]
        return _walk(schedule, cfg.nq, step, carry)

    init = (jnp.zeros((bk, cfg.H), jnp.float32), jnp.zeros((bk, cfg.Hv), jnp.float32),
            common.zero_cotangents(args))
    dk, dv, d_args = lax.fori_loop(0, cfg.G, head, init)
    r["dk"][...] = (dk * cfg.scale).astype(r["dk"].dtype)
    r["dv"][...] = dv.astype(r["dv"].dtype)
    for i, d in enumerate(d_args):
        if d is not None:  # this program's share of the argument's cotangent
            r[f"dmod{i}"][...] = d.reshape(r[f"dmod{i}"].shape).astype(jnp.float32)


# ----------------------------------------------------------------------------- pallas calls




def _mask_operands(cfg: _Config, masks: _Masks, *, by_kv: bool):
    """(names, in_specs, arrays) of the mask pieces for a grid (B, N, nq) or (B, K, nk)."""
    bq, bk, G = cfg.block_q, cfg.block_kv, cfg.G
    names, specs, arrays = [], [], []

    def add(name, spec, array):
        names.append(name)
        specs.append(spec)
        arrays.append(array)

    if cfg.segments:
        if by_kv:
            add("q_seg", _spec((None, cfg.Tp), lambda b, h, c: (b, 0)),
                masks.q_segment_ids)
            add("kv_seg", _spec((None, bk), lambda b, h, c: (b, c)), masks.kv_segment_ids)
        else:
            add("q_seg", _spec((None, bq), lambda b, n, i: (b, i)), masks.q_segment_ids)
            add("kv_seg", _spec((None, cfg.Sp), lambda b, n, i: (b, 0)),
                masks.kv_segment_ids)
    if cfg.q_lengths:
        add("q_len", _spec((cfg.B,), lambda *_: (0,)), masks.q_lengths)
    if cfg.kv_lengths:
        add("kv_len", _spec((cfg.B,), lambda *_: (0,)), masks.kv_lengths)
    if cfg.dense is not None:
        Bm, Nm = cfg.dense
        if by_kv:
            if Nm == 1:
                spec = _spec((None, None, cfg.Tp, bk),
                                    lambda b, h, c: (b if Bm > 1 else 0, 0, 0, c))
            else:
                spec = _spec((None, G, cfg.Tp, bk),
                                    lambda b, h, c: (b if Bm > 1 else 0, h, 0, c))
        else:
            spec = _spec((None, None, bq, cfg.Sp),
                                lambda b, n, i: (b if Bm > 1 else 0, n if Nm > 1 else 0, i, 0))
        add("dense", spec, masks.dense)
    if cfg.block_map is not None:
        Bm, Nm = cfg.block_map
        if by_kv:
            width = 1 + cfg.nq
            if Nm == 1:
                spec = _spec((None, None, None, width),
                                    lambda b, h, c: (b if Bm > 1 else 0, 0, c, 0))
            else:
                spec = _spec((None, G, None, width),
                                    lambda b, h, c: (b if Bm > 1 else 0, h, c, 0))
            add("cols", spec, masks.cols)
        else:
            spec = _spec((None, None, None, 1 + cfg.nk),
                                lambda b, n, i: (b if Bm > 1 else 0, n if Nm > 1 else 0, i, 0))
            add("rows", spec, masks.rows)
    return names, specs, arrays


def _mod_inputs(mod_args) -> dict:
    """The score_mod's arguments as whole-array inputs ({name: (array, spec)}), at least
    1-d."""
    inputs = {}
    for i, a in enumerate(mod_args):
        a = jnp.atleast_1d(a)
        inputs[f"mod{i}"] = (a, _spec(a.shape, common.leading_index_map(0, a.ndim)))
    return inputs


def _call(cfg: _Config, kernel, name: str, *, grid, inputs: dict, outputs: tuple[str, ...],
          out_specs, out_shape, masks: _Masks, mod_args: tuple, by_kv: bool, backward: bool):
    """``pallas_call`` of ``kernel`` on the named ``inputs`` ({name: (array, spec)}), the
    mask operands and the score_mod's arguments, writing the named ``outputs``."""
    m_names, m_specs, m_arrays = _mask_operands(cfg, masks, by_kv=by_kv)
    inputs = inputs | _mod_inputs(mod_args)
    names = (*inputs, *m_names, *outputs)
    return pl.pallas_call(
        functools.partial(kernel, cfg=cfg, names=names),
        grid=grid,
        in_specs=[spec for _, spec in inputs.values()] + m_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        compiler_params=cfg.compiler_params(backward=backward),
        interpret=cfg.interpret,
        name=name,
    )(*(array for array, _ in inputs.values()), *m_arrays)


def _query_tile_inputs(cfg: _Config, q, k, v) -> dict:
    """q, k, v as the forward and dQ kernels read them: one query tile, every key."""
    bq, G = cfg.block_q, cfg.G
    return {
        "q": (q, _spec((None, bq, None, cfg.H), lambda b, n, i: (b, i, n, 0))),
        "k": (k, _spec((None, cfg.Sp, None, cfg.H), lambda b, n, i: (b, 0, n // G, 0))),
        "v": (v, _spec((None, cfg.Sp, None, cfg.Hv), lambda b, n, i: (b, 0, n // G, 0))),
    }


def _forward_call(cfg: _Config, q, k, v, masks: _Masks, mod_args: tuple):
    bq = cfg.block_q
    return _call(
        cfg, _forward_kernel, "flash_forward", grid=_grid(cfg.B, cfg.N, cfg.nq),
        inputs=_query_tile_inputs(cfg, q, k, v), outputs=("o", "lse"),
        out_specs=[_spec((None, bq, None, cfg.Hv), lambda b, n, i: (b, i, n, 0)),
                   _spec((None, None, bq), lambda b, n, i: (b, n, i))],
        out_shape=[jax.ShapeDtypeStruct((cfg.B, cfg.Tp, cfg.N, cfg.Hv), q.dtype),
                   jax.ShapeDtypeStruct((cfg.B, cfg.N, cfg.Tp), jnp.float32)],
        masks=masks, mod_args=mod_args, by_kv=False, backward=False)


def _dq_call(cfg: _Config, q, k, v, do, lse2, delta, masks: _Masks, mod_args: tuple):
    bq = cfg.block_q
    row = _spec((None, None, bq), lambda b, n, i: (b, n, i))
    inputs = _query_tile_inputs(cfg, q, k, v) | {
        "do": (do, _spec((None, bq, None, cfg.Hv), lambda b, n, i: (b, i, n, 0))),
        "lse": (lse2, row), "delta": (delta, row)}
    return _call(
        cfg, _dq_kernel, "flash_backward_dq", grid=_grid(cfg.B, cfg.N, cfg.nq), inputs=inputs,
        outputs=("dq",), out_specs=_spec((None, bq, None, cfg.H), lambda b, n, i: (b, i, n, 0)),
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype), masks=masks, mod_args=mod_args,
        by_kv=False, backward=True)


def _dkv_call(cfg: _Config, q, k, v, do, lse2, delta, masks: _Masks, mod_args: tuple):
    """dK, dV and, per program, its share of the cotangent of each floating score_mod
    argument (float32 [B, K, nk, *shape], summed by the caller; None for the others)."""
    bk, G = cfg.block_kv, cfg.G
    k_spec = _spec((None, bk, None, cfg.H), lambda b, h, c: (b, c, h, 0))
    v_spec = _spec((None, bk, None, cfg.Hv), lambda b, h, c: (b, c, h, 0))
    rows = _spec((None, G, cfg.Tp), lambda b, h, c: (b, h, 0))
    inputs = {
        "q": (q, _spec((None, cfg.Tp, G, cfg.H), lambda b, h, c: (b, 0, h, 0))),
        "k": (k, k_spec), "v": (v, v_spec),
        "do": (do, _spec((None, cfg.Tp, G, cfg.Hv), lambda b, h, c: (b, 0, h, 0))),
        "lse": (lse2, rows), "delta": (delta, rows)}
    outputs, out_specs = ["dk", "dv"], [k_spec, v_spec]
    out_shape = [jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)]
    for i in common.floating_args(mod_args):
        shape = jnp.atleast_1d(mod_args[i]).shape
        outputs.append(f"dmod{i}")
        out_specs.append(_spec((None, None, None, *shape),
                               common.leading_index_map(3, len(shape))))
        out_shape.append(jax.ShapeDtypeStruct((cfg.B, cfg.K, cfg.nk, *shape), jnp.float32))
    dk, dv, *shares = _call(
        cfg, _dkv_kernel, "flash_backward_dkv", grid=_grid(cfg.B, cfg.K, cfg.nk),
        inputs=inputs, outputs=tuple(outputs), out_specs=out_specs, out_shape=out_shape,
        masks=masks, mod_args=mod_args, by_kv=True, backward=True)
    shares = iter(shares)
    d_args = tuple(
        next(shares).sum((0, 1, 2)).reshape(jnp.shape(a)).astype(jnp.result_type(a))
        if i in common.floating_args(mod_args) else None for i, a in enumerate(mod_args))
    return dk, dv, d_args


# ----------------------------------------------------------------------------- custom_vjp


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _flash(cfg: _Config, q, k, v, masks: _Masks, mod_args: tuple):
    return _forward_call(cfg, q, k, v, masks, mod_args)


def _flash_fwd(cfg: _Config, q, k, v, masks: _Masks, mod_args: tuple):
    out, lse = _forward_call(cfg, q, k, v, masks, mod_args)
    return (out, lse), (q, k, v, masks, mod_args, out, lse)


def _flash_bwd(cfg: _Config, residuals, cotangents):
    q, k, v, masks, mod_args, out, lse = residuals
    do, dlse = cotangents
    do = do.astype(q.dtype)
    # delta_i = rowsum(dO_i * O_i) - dlse_i; padded rows have dO = 0 and dlse = 0.
    delta = jnp.einsum("btnh,btnh->bnt", do.astype(jnp.float32), out.astype(jnp.float32),
                       precision=lax.Precision.HIGHEST) - dlse.astype(jnp.float32)
    # Base-2 log-sum-exp; rows with nothing allowed get +inf so that exp2(s - lse) = 0.
    lse2 = jnp.where(jnp.isneginf(lse), jnp.inf, lse * _LOG2E)
    dq = _dq_call(cfg, q, k, v, do, lse2, delta, masks, mod_args)
    dk, dv, d_args = _dkv_call(cfg, q, k, v, do, lse2, delta, masks, mod_args)
    return dq, dk, dv, jax.tree.map(lambda _: None, masks), d_args


_flash.defvjp(_flash_fwd, _flash_bwd)


# ----------------------------------------------------------------------------- entry point


def _pad_axis(x, axis: int, size: int, value=0):
    if x.shape[axis] == size:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, size - x.shape[axis])
    return jnp.pad(x, widths, constant_values=value)


def flash_attention(query, key, value, *, scale: float | None = None, lo: int | None = None,
                    hi: int | None = None, q_segment_ids=None, kv_segment_ids=None,
                    q_lengths=None, kv_lengths=None, dense_mask=None, static_mask=None,
                    block_map=None, logits_soft_cap: float | None = None, score_mod=None,
                    score_mod_args=(), block_sizes: BlockSizes | None = None,
                    interpret: bool = False):
    r"""Fused softmax attention on NVIDIA GPUs (Pallas, Triton lowering), with its log-sum-exp.

    .. math::

        \ell_{tns} = c \tanh\!\Big(\frac{\sigma\, q_{tn} \cdot k_{s,g(n)}}{c}\Big)
        \ (\text{or } \sigma\, q_{tn} \cdot k_{s,g(n)} \text{ without a cap } c),\qquad
        \mathrm{lse}_{nt} = \log \sum_{s \in A(t)} e^{\ell_{tns}},\qquad
        o_{tn} = \sum_{s \in A(t)} e^{\ell_{tns} - \mathrm{lse}_{nt}}\, v_{s,g(n)}

    with :math:`g(n) = \lfloor n / (N/K) \rfloor` (GQA/MQA) and :math:`A(t)` the keys that every
    given mask piece allows (band ``lo <= s - t <= hi``, equal segment ids, ``t < q_length``,
    ``s < kv_length``, the dense mask). A row with nothing allowed gets output 0 and
    ``lse = -inf``; its gradients are 0. Differentiable w.r.t. query, key and value (including
    through ``lse``) with a dK/dV kernel and a dQ kernel (FlashAttention-2 backward, no
    atomics). Statistics and accumulators in float32.

    Args:
        query: [B, T, N, H] float32, bfloat16 or float16; H in 1..256 (padded to a power of
            two >= 16 internally).
        key: [B, S, K, H], same dtype; N % K == 0.
        value: [B, S, K, Hv], same dtype; Hv in 1..256.
        scale: logits scale; default 1 / sqrt(H).
        lo, hi: static band ``lo <= kv - q <= hi`` (Python ints or None; causal is hi=0).
        q_segment_ids, kv_segment_ids: int [B, T] and [B, S], both or neither.
        q_lengths, kv_lengths: int [B]: valid queries / keys per batch row.
        dense_mask: bool [Bm, Nm, T, S], Bm in {1, B}, Nm in {1, N}.
        static_mask: None or a hashable object whose ``allows(q_pos, kv_pos)`` gives the
            pattern elementwise on broadcastable int32 positions, evaluated in each tile.
        block_map: int8 [Bm, Nm, ceil(T / block_q), ceil(S / block_kv)] of
            ``common.EMPTY / PARTIAL / FULL`` (a promise: EMPTY tiles are skipped, FULL tiles
            are not masked); None treats every tile as PARTIAL.
        logits_soft_cap: None or a positive float c.
        score_mod: None or a hashable vectorised modifier of the logits, applied before the
            soft cap: ``score_mod(score, batch, head, q_index, kv_index, *score_mod_args)``
            on a tile's float32 logits and int32 index arrays of the same rank
            (``common.modified_scores``; ``jattn`` builds one from a scalar function).
            Differentiated inside the kernels; gradients reach the floating arguments.
        score_mod_args: the arrays ``score_mod`` reads (whole, in every program).
        block_sizes: ``common.BlockSizes``; block_q and block_kv powers of two >= 16; default
            ``default_block_sizes(T, S, H, dtype)``.
        interpret: run the kernels in the Pallas interpreter (any backend, e.g. CPU); ignored
            after ``force_compiled``.

    Returns:
        (out [B, T, N, Hv] in the input dtype, lse [B, N, T] float32).

    Raises:
        ValueError: naming the argument, for bad shapes or dtypes (mismatched B/S/H,
            N % K != 0, a block map of the wrong shape, a dense mask that does not broadcast,
            bad block sizes, a non-positive soft cap).

    >>> import numpy as np
    >>> q = jnp.asarray(np.random.default_rng(0).standard_normal((1, 20, 2, 32)), jnp.float32)
    >>> out, lse = flash_attention(q, q, q, hi=0, interpret=True)
    >>> out.shape, lse.shape
    ((1, 20, 2, 32), (1, 2, 20))
    >>> bool(jnp.allclose(out[0, 0], q[0, 0], atol=1e-6))  # the first query sees itself only
    True

    References:
        Tri Dao, "FlashAttention-2: Faster Attention with Better Parallelism and Work
        Partitioning", 2023 (arXiv:2307.08691).
    """
    B, T, N, H, S, K, Hv, dtype = common.check_inputs(
        query, key, value, lo=lo, hi=hi, q_segment_ids=q_segment_ids,
        kv_segment_ids=kv_segment_ids, q_lengths=q_lengths, kv_lengths=kv_lengths,
        dense_mask=dense_mask, logits_soft_cap=logits_soft_cap)
    logits_soft_cap = None if logits_soft_cap is None else float(logits_soft_cap)
    scale = 1.0 / math.sqrt(H) if scale is None else float(scale)
    if block_sizes is None:
        block_sizes = default_block_sizes(T, S, H, dtype)
    _check_block_sizes(block_sizes)
    bq, bk = block_sizes.block_q, block_sizes.block_kv
    nq, nk = cdiv(T, bq), cdiv(S, bk)
    Tp, Sp = nq * bq, nk * bk

    q_seg = kv_seg = None
    if q_segment_ids is not None:
        q_seg = _pad_axis(jnp.asarray(q_segment_ids, jnp.int32), 1, Tp)
        kv_seg = _pad_axis(jnp.asarray(kv_segment_ids, jnp.int32), 1, Sp)
    q_len = None if q_lengths is None else jnp.asarray(q_lengths, jnp.int32)
    kv_len = None if kv_lengths is None else jnp.asarray(kv_lengths, jnp.int32)
    dense = dense_shape = None
    if dense_mask is not None:
        dense_shape = tuple(dense_mask.shape[:2])
        dense = _pad_axis(_pad_axis(jnp.asarray(dense_mask).astype(jnp.int8), 2, Tp), 3, Sp)
    rows = cols = map_shape = None
    kinds = common.check_block_map(block_map, common.KernelDims(B, T, N, H, S, K, Hv, dtype),
                                   block_sizes)
    if kinds is not None:
        map_shape = tuple(kinds.shape[:2])
        rows = _packed_schedule(kinds)
        cols = _packed_schedule(kinds.swapaxes(-1, -2))

    Hp = max(_MIN_BLOCK, _next_power_of_2(H))
    Hvp = max(_MIN_BLOCK, _next_power_of_2(Hv))
    cfg = _Config(
        B=B, T=T, S=S, N=N, K=K, H=Hp, Hv=Hvp, block_q=bq, block_kv=bk, scale=scale, lo=lo,
        hi=hi, cap=logits_soft_cap, segments=q_seg is not None, q_lengths=q_len is not None,
        kv_lengths=kv_len is not None, dense=dense_shape, static=static_mask,
        mod=score_mod, mod_shapes=tuple(jnp.shape(a) for a in score_mod_args),
        block_map=map_shape,
        num_warps=block_sizes.num_warps, num_stages=block_sizes.num_stages,
        interpret=bool(interpret) and not _compiled_only)
    q = _pad_axis(_pad_axis(query, 1, Tp), 3, Hp)
    k = _pad_axis(_pad_axis(key, 1, Sp), 3, Hp)
    v = _pad_axis(_pad_axis(value, 1, Sp), 3, Hvp)
    masks = _Masks(q_seg, kv_seg, q_len, kv_len, dense, rows, cols)
    out, lse = _flash(cfg, q, k, v, masks, tuple(score_mod_args))
    return out[:, :T, :, :Hv], lse[:, :, :T]
