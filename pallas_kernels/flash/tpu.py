"""Flash attention for TPU: Pallas with the Mosaic lowering, fused forward and backward.

Three ``pallas_call`` kernels share one tile schedule (``common.schedule`` of the block map):

* forward, grid (B, N, nq, nk): query tile (b, n, i) walks the non-empty kv tiles of its
  block-map row, keeping the running max / sum / accumulator in VMEM scratch;
* dK/dV, grid (B, K, nk, G * nq): kv tile (b, k, j) walks the non-empty query tiles of its
  block-map column for each of the G query heads of its group, accumulating dK and dV in
  float32 scratch (no atomics, no copy of K/V per query head);
* dQ, grid (B, N, nq, nk): like the forward.

The kv axis (forward, dQ) and the (head, query tile) axis (dK/dV) are innermost and
"arbitrary"; the other axes are "parallel". The schedule is a scalar-prefetch operand: the
K/V (or Q/dO) index_map reads the tile index from it, and schedule entries past a row's
count repeat the last tile, so the pipeline issues no new DMA for them and the kernel body is
skipped with ``pl.when``. EMPTY tiles are thus never read; FULL tiles run without mask
arithmetic; PARTIAL tiles (the padded last kv tile among them) are masked elementwise.

Layout inside: [B, heads, length, head_dim] with the length padded to whole blocks and the
head dims padded with zeros to a multiple of 128 (the TPU lane width). Per-row statistics
that the kernels need on sublanes (log-sum-exp, delta, query segment ids) are stored
replicated over 128 lanes, as in the JAX TPU flash/splash kernels; the dK/dV kernel works
in the transposed tile (kv rows, query columns) and reads them as lane rows instead.
float16 inputs run in float32 (TPUs have no float16 matmul); outputs keep the input dtype.

Real-TPU block sizes: each of ``block_q`` and ``block_kv`` lands on the lane axis in one of
the kernels, so each must be a multiple of 128, or cover its whole (padded) length in a
single block and then be a multiple of 8 (16 for 16-bit inputs, 32 with a ``dense_mask``,
whose int8 tiles are 32 rows high). These are checked only when ``interpret=False``; in
interpret mode any block size works (the tests use 16 x 16).

This module imports jax only.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.flash import common
from pallas_kernels.flash.common import FULL, PARTIAL, BlockSizes, cdiv, schedule

LANES = 128
_NT = (((1,), (1,)), ((), ()))  # a @ b.T
_NEG_INF = float("-inf")

__all__ = ["default_block_sizes", "flash_attention"]


def _round_up(x: int, m: int) -> int:
    return cdiv(x, m) * m


def default_block_sizes(T: int, S: int, H: int, dtype) -> BlockSizes:
    """Default TPU tiles: 512 x 512 (256 query rows for float32 with H > 128, to stay well
    inside the default scoped VMEM), capped by the lengths: a length shorter than the block
    gets one block of that length rounded up to a multiple of 32 (valid on a real TPU for
    every dtype and for dense masks), otherwise a multiple of 128.

    >>> default_block_sizes(4096, 4096, 128, jnp.bfloat16)
    BlockSizes(block_q=512, block_kv=512)
    >>> default_block_sizes(37, 300, 64, jnp.float32)
    BlockSizes(block_q=64, block_kv=384)
    """
    bq = 256 if (jnp.dtype(dtype).itemsize >= 4 and H > 128) else 512
    bk = 512

    def cap(block: int, length: int) -> int:
        if length <= LANES:
            return _round_up(length, 32)
        return min(block, _round_up(length, LANES))

    return BlockSizes(cap(bq, T), cap(bk, S))


def _check_tpu_blocks(bq: int, bk: int, Tp: int, Sp: int, dtype, dense: bool) -> None:
    sub = 32 if dense else (16 if jnp.dtype(dtype).itemsize == 2 else 8)
    for name, block, padded in (("block_q", bq, Tp), ("block_kv", bk, Sp)):
        if block % LANES == 0:
            continue
        if block == padded and block % sub == 0:
            continue
        raise ValueError(
            f"block_sizes.{name}: on a TPU expected a multiple of {LANES}, or one block "
            f"covering the whole padded length that is a multiple of {sub}; got {block} "
            f"(padded length {padded}); use interpret=True for other sizes")


def _forced_interpret() -> bool:
    """Whether ``pltpu.force_tpu_interpret_mode()`` is active (then pallas_call interprets
    whatever ``interpret`` says, and the real-TPU block rules do not apply)."""
    try:
        from jax._src import config as jax_config

        return jax_config.pallas_tpu_interpret_mode_context_manager.value is not None
    except (ImportError, AttributeError):  # a JAX without the option: cannot tell
        return False


def _check_interpret(interpret) -> bool | str:
    if interpret in (False, True, "tpu", "hlo"):
        return "tpu" if interpret is True else interpret
    raise ValueError(f"interpret: expected False, True, 'tpu' or 'hlo', got {interpret!r}")


@dataclasses.dataclass(frozen=True)
class _Config:
    """Static description of one call (hashable: the custom_vjp's non-diff argument)."""

    B: int
    N: int
    K: int
    T: int
    S: int
    Hp: int
    Hvp: int
    bq: int
    bk: int
    nq: int
    nk: int
    map_b: bool  # the block map has a batch axis of size B (else 1)
    map_n: bool  # ... a head axis of size N (else 1)
    dense_b: bool
    dense_n: bool
    scale: float
    cap: float | None
    lo: int | None
    hi: int | None
    segments: bool
    q_len: bool
    kv_len: bool
    dense: bool
    static: object  # the static mask (an object with allows(q_pos, kv_pos)) or None
    mod: object  # the vectorised score_mod (common.modified_scores) or None
    mod_shapes: tuple  # shapes of its array arguments
    mod_floating: tuple  # indices of the floating ones (they get cotangents)
    exact: bool  # float32 matmuls at full precision
    interpret: bool | str  # False, True / "tpu" or "hlo" (see flash_attention)

    @property
    def G(self) -> int:
        return self.N // self.K

    @property
    def Tp(self) -> int:
        return self.nq * self.bq

    @property
    def Sp(self) -> int:
        return self.nk * self.bk

    @property
    def map_heads(self) -> int:
        return self.N if self.map_n else 1

    def map_row(self, b, n, r, rows: int):
        """Flat row index into a schedule of shape [Bm, Nm, rows, ...]."""
        bm = b if self.map_b else 0
        nm = n if self.map_n else 0
        return (bm * self.map_heads + nm) * rows + r

    def dense_index(self, b, n):
        return (b if self.dense_b else 0, n if self.dense_n else 0)

    @property
    def precision(self):
        return lax.Precision.HIGHEST if self.exact else None

    @property
    def pallas_interpret(self):
        if self.interpret == "hlo":
            return True  # Pallas's generic interpreter
        return pltpu.InterpretParams() if self.interpret else False


# --------------------------------------------------------------------------- in-kernel helpers


def _div(x, d: int):
    """x // d for a non-negative int32 scalar (truncating division: jnp's floor division
    lowers through ``sign``, which Mosaic lowers per chip generation)."""
    return x if d == 1 else lax.div(x, jnp.int32(d))


def _rem(x, d: int):
    return jnp.int32(0) if d == 1 else lax.rem(x, jnp.int32(d))


def _tile_of(packed):
    """The tile index of a packed schedule entry (tile * 4 + kind)."""
    return lax.shift_right_logical(packed, jnp.int32(2))


def _kind_of(packed):
    return lax.bitwise_and(packed, jnp.int32(3))


def _lanes(x: jax.Array, n: int) -> jax.Array:
    """A lane-replicated [rows, 128] statistic, shaped to combine with [rows, n]."""
    if n == LANES:
        return x
    if n % LANES == 0:
        return jnp.tile(x, (1, n // LANES))
    return x[:, :1]


def _dispatch(*, active, kind, step) -> None:
    """Run ``step(masked)`` for a visited tile: unmasked for a FULL tile, masked otherwise
    (the padded last key tile is never FULL: ``common.mark_padded_keys``)."""
    full = kind == FULL
    pl.when(active & full)(lambda: step(False))
    pl.when(active & jnp.logical_not(full))(lambda: step(True))


class _Refs:
    """Unpacks a kernel's refs: scalar prefetch (tiles, count, [q_len], [kv_len]), then
    the named inputs, the outputs and the scratch."""

    def __init__(self, cfg: _Config, refs, inputs: list[str], outputs: list[str],
                 scratch: list[str]):
        refs = list(refs)
        self.tiles, self.count = refs[:2]
        del refs[:2]
        self.q_len = refs.pop(0) if cfg.q_len else None
        self.kv_len = refs.pop(0) if cfg.kv_len else None
        names = inputs + outputs + scratch
        if len(names) != len(refs):
            raise RuntimeError(f"internal: {len(refs)} refs for {names}")
        for name, ref in zip(names, refs, strict=True):
            setattr(self, name, ref)

    def lengths(self, b):
        return (None if self.q_len is None else self.q_len[b],
                None if self.kv_len is None else self.kv_len[b])


def _mask_inputs(cfg: _Config) -> list[str]:
    names = []
    if cfg.segments:
        names += ["q_seg", "kv_seg"]
    if cfg.dense:
        names += ["dense"]
    return names


def _tile_mask(cfg, r, b, q_tile, kv_tile, shape, transposed):
    """Mask of the current tile (shape [bq, bk], or [bk, bq] when ``transposed``)."""
    q_axis, kv_axis = (1, 0) if transposed else (0, 1)
    q_pos = q_tile * cfg.bq + lax.broadcasted_iota(jnp.int32, shape, q_axis)
    kv_pos = kv_tile * cfg.bk + lax.broadcasted_iota(jnp.int32, shape, kv_axis)
    q_len, kv_len = r.lengths(b)
    q_seg = kv_seg = dense = None
    if cfg.segments:
        if transposed:  # q ids as a lane row [1, bq], kv ids lane-replicated [bk, 128]
            q_seg, kv_seg = r.q_seg[...], r.kv_seg[...][:, :1]
        else:  # q ids lane-replicated [bq, 128], kv ids as a lane row [1, bk]
            q_seg, kv_seg = r.q_seg[...][:, :1], r.kv_seg[...]
    if cfg.dense:
        dense = r.dense[...].astype(jnp.int32)  # compared as int32 (Mosaic)
    return common.tile_allowed(q_pos, kv_pos, kv_limit=cfg.S, lo=cfg.lo, hi=cfg.hi,
                               q_segment_ids=q_seg, kv_segment_ids=kv_seg, q_length=q_len,
                               kv_length=kv_len, dense=dense, static=cfg.static)


def _logits(cfg: _Config, a, b, mod=None, pullback: bool = False):
    """scale * a @ b.T in float32, modified by the score_mod (``mod``: the tile's (indices,
    args), see :func:`_mod`), soft-capped; also tanh(.) for the backward (or None) and, with
    ``pullback``, the score_mod's ``back`` (None without one)."""
    s = lax.dot_general(a, b, _NT, preferred_element_type=jnp.float32,
                        precision=cfg.precision) * cfg.scale
    back = None
    if cfg.mod is not None:
        s = common.modified_scores(cfg.mod, s, *mod, pullback=pullback)
        if pullback:
            s, back = s
    if cfg.cap is None:
        return s, None, back
    t = jnp.tanh(s / cfg.cap)
    return cfg.cap * t, t, back


def _mod(cfg: _Config, r, b, head, q_tile, kv_tile, shape, transposed):
    """The score_mod's (indices, args) for the current tile (as ``_tile_mask``), or None.
    Padded rows and columns read the last real index."""
    if cfg.mod is None:
        return None
    q_axis, kv_axis = (1, 0) if transposed else (0, 1)
    q_pos = q_tile * cfg.bq + lax.broadcasted_iota(jnp.int32, shape, q_axis)
    kv_pos = kv_tile * cfg.bk + lax.broadcasted_iota(jnp.int32, shape, kv_axis)
    one = (1, 1)
    indices = (jnp.broadcast_to(b, one), jnp.broadcast_to(head, one),
               jnp.minimum(q_pos, cfg.T - 1), jnp.minimum(kv_pos, cfg.S - 1))
    args = tuple(getattr(r, f"mod{i}")[...].reshape(arg_shape)
                 for i, arg_shape in enumerate(cfg.mod_shapes))
    return indices, args


def _mod_inputs(cfg: _Config) -> list[str]:
    return [f"mod{i}" for i in range(len(cfg.mod_shapes))]


def _mod_specs(mod_args) -> list:
    """Whole-array specs of the score_mod's arguments (stored at least 1-d)."""
    return [pl.BlockSpec(jnp.shape(a), common.leading_index_map(0, jnp.ndim(a)))
            for a in mod_args]


# --------------------------------------------------------------------------------- kernels


def _forward_kernel(cfg: _Config, *refs):
    r = _Refs(cfg, refs, ["q", "k", "v", *_mask_inputs(cfg), *_mod_inputs(cfg)],
              ["o", "lse"], ["m", "l", "acc"])
    b, n, i, j = (pl.program_id(a) for a in range(4))
    row = cfg.map_row(b, n, i, cfg.nq)
    entry = row * cfg.nk + j
    packed = r.tiles[entry]
    kv_tile = _tile_of(packed)

    @pl.when(j == 0)
    def _init():
        r.m[...] = jnp.full(r.m.shape, _NEG_INF, jnp.float32)
        r.l[...] = jnp.zeros(r.l.shape, jnp.float32)
        r.acc[...] = jnp.zeros(r.acc.shape, jnp.float32)

    def step(masked):
        shape = (cfg.bq, cfg.bk)
        s, _, _ = _logits(cfg, r.q[...], r.k[...], _mod(cfg, r, b, n, i, kv_tile, shape, False))
        if masked:
            ok = _tile_mask(cfg, r, b, i, kv_tile, s.shape, False)
            s = jnp.where(ok, s, _NEG_INF)
        m_prev = r.m[...]
        m_next = jnp.maximum(m_prev, s.max(axis=1, keepdims=True))
        # A row with nothing allowed yet keeps m = -inf; subtract 0 there, not -inf.
        m_safe = jnp.where(m_next == _NEG_INF, 0.0, m_next)
        p = jnp.exp(s - _lanes(m_safe, cfg.bk))
        alpha = jnp.exp(m_prev - m_safe)
        r.l[...] = alpha * r.l[...] + p.sum(axis=1, keepdims=True)
        r.m[...] = m_next
        v = r.v[...]
        pv = lax.dot(p.astype(v.dtype), v, preferred_element_type=jnp.float32,
                     precision=cfg.precision)
        r.acc[...] = r.acc[...] * _lanes(alpha, cfg.Hvp) + pv

    _dispatch(active=j < r.count[row], kind=_kind_of(packed), step=step)

    @pl.when(j == cfg.nk - 1)
    def _finish():
        l = r.l[...]
        empty = l == 0.0
        l_safe = jnp.where(empty, 1.0, l)
        inv = jnp.where(empty, 0.0, 1.0 / l_safe)
        r.o[...] = (r.acc[...] * _lanes(inv, cfg.Hvp)).astype(r.o.dtype)
        r.lse[...] = jnp.where(empty, _NEG_INF, r.m[...] + jnp.log(l_safe))


def _dq_kernel(cfg: _Config, *refs):
    r = _Refs(cfg, refs, ["q", "k", "v", "do", "lse", "delta", *_mask_inputs(cfg),
                          *_mod_inputs(cfg)], ["dq"], ["acc"])
    b, n, i, j = (pl.program_id(a) for a in range(4))
    row = cfg.map_row(b, n, i, cfg.nq)
    entry = row * cfg.nk + j
    packed = r.tiles[entry]
    kv_tile = _tile_of(packed)

    @pl.when(j == 0)
    def _init():
        r.acc[...] = jnp.zeros(r.acc.shape, jnp.float32)

    def step(masked):
        k = r.k[...]
        s, t, back = _logits(cfg, r.q[...], k,
                             _mod(cfg, r, b, n, i, kv_tile, (cfg.bq, cfg.bk), False),
                             pullback=True)
        if masked:
            ok = _tile_mask(cfg, r, b, i, kv_tile, s.shape, False)
            s = jnp.where(ok, s, _NEG_INF)
        p = jnp.exp(s - _lanes(r.lse[...], cfg.bk))
        dp = lax.dot_general(r.do[...], r.v[...], _NT, preferred_element_type=jnp.float32,
                             precision=cfg.precision)
        ds = p * (dp - _lanes(r.delta[...], cfg.bk))
        if t is not None:
            ds = ds * (1.0 - t * t)
        if back is not None:
            ds, _ = back(ds)
        r.acc[...] += lax.dot(ds.astype(k.dtype), k, preferred_element_type=jnp.float32,
                              precision=cfg.precision)

    _dispatch(active=j < r.count[row], kind=_kind_of(packed), step=step)

    @pl.when(j == cfg.nk - 1)
    def _finish():
        r.dq[...] = (r.acc[...] * cfg.scale).astype(r.dq.dtype)


def _dkv_kernel(cfg: _Config, *refs):
    d_mod = [f"dmod{i}" for i in cfg.mod_floating]
    r = _Refs(cfg, refs, ["q", "k", "v", "do", "lse", "delta", *_mask_inputs(cfg),
                          *_mod_inputs(cfg)], ["dk", "dv", *d_mod], ["dk_acc", "dv_acc"])
    b, kh, j, t_step = (pl.program_id(a) for a in range(4))
    n = kh * cfg.G + _div(t_step, cfg.nq)
    u = _rem(t_step, cfg.nq)
    row = cfg.map_row(b, n, j, cfg.nk)
    entry = row * cfg.nq + u
    packed = r.tiles[entry]
    q_tile = _tile_of(packed)

    @pl.when(t_step == 0)
    def _init():
        r.dk_acc[...] = jnp.zeros(r.dk_acc.shape, jnp.float32)
        r.dv_acc[...] = jnp.zeros(r.dv_acc.shape, jnp.float32)
        for name in d_mod:  # this kv tile's share of the argument's cotangent
            ref = getattr(r, name)
            ref[...] = jnp.zeros(ref.shape, jnp.float32)

    def step(masked):
        # Transposed tile: kv rows, query columns; lse and delta are lane rows [1, bq].
        q = r.q[...]
        s, t, back = _logits(cfg, r.k[...], q,
                             _mod(cfg, r, b, n, q_tile, j, (cfg.bk, cfg.bq), True),
                             pullback=True)
        if masked:
            ok = _tile_mask(cfg, r, b, q_tile, j, s.shape, True)
            s = jnp.where(ok, s, _NEG_INF)
        p = jnp.exp(s - r.lse[...])
        do = r.do[...]
        r.dv_acc[...] += lax.dot(p.astype(do.dtype), do, preferred_element_type=jnp.float32,
                                 precision=cfg.precision)
        dp = lax.dot_general(r.v[...], do, _NT, preferred_element_type=jnp.float32,
                             precision=cfg.precision)
        ds = p * (dp - r.delta[...])
        if t is not None:
            ds = ds * (1.0 - t * t)
        if back is not None:
            ds, d_args = back(ds)
            for i in cfg.mod_floating:
                ref = getattr(r, f"dmod{i}")
                ref[...] += d_args[i].reshape(ref.shape).astype(jnp.float32)
        r.dk_acc[...] += lax.dot(ds.astype(q.dtype), q, preferred_element_type=jnp.float32,
                                 precision=cfg.precision)

    _dispatch(active=u < r.count[row], kind=_kind_of(packed), step=step)

    @pl.when(t_step == cfg.G * cfg.nq - 1)
    def _finish():
        r.dk[...] = (r.dk_acc[...] * cfg.scale).astype(r.dk.dtype)
        r.dv[...] = r.dv_acc[...].astype(r.dv.dtype)


# ------------------------------------------------------------------------------ pallas_calls


def _prefetch(cfg: _Config, sched, aux) -> list[jax.Array]:
    ops = [sched["tiles"], sched["count"]]
    if cfg.q_len:
        ops.append(aux["q_len"])
    if cfg.kv_len:
        ops.append(aux["kv_len"])
    return ops


def _compiler_params():
    return pltpu.CompilerParams(
        dimension_semantics=("parallel", "parallel", "parallel", "arbitrary"))


def _row_kv_tile(cfg: _Config, b, n, i, j, tiles):
    """Forward / dQ grid (b, n, i, j): the kv tile of the j-th schedule entry of row i."""
    return _tile_of(tiles[cfg.map_row(b, n, i, cfg.nq) * cfg.nk + j])


def _row_specs(cfg: _Config, aux) -> tuple:
    """(q-tile specs, K/V specs, mask specs and operands) of the forward and dQ grids."""

    def q_map(b, n, i, j, *_):
        return (b, n, i, 0)

    def kv_map(b, n, i, j, tiles, *_):
        return (b, _div(n, cfg.G), _row_kv_tile(cfg, b, n, i, j, tiles), 0)

    specs, ops = [], []
    if cfg.segments:
        specs.append(pl.BlockSpec((None, cfg.bq, LANES), lambda b, n, i, j, *_: (b, i, 0)))
        specs.append(pl.BlockSpec(
            (None, 1, cfg.bk), lambda b, n, i, j, tiles, *_: (
                b, 0, _row_kv_tile(cfg, b, n, i, j, tiles))))
        ops += [aux["q_seg_col"], aux["kv_seg_row"]]
    if cfg.dense:
        specs.append(pl.BlockSpec(
            (None, None, cfg.bq, cfg.bk), lambda b, n, i, j, tiles, *_: (
                *cfg.dense_index(b, n), i, _row_kv_tile(cfg, b, n, i, j, tiles))))
        ops.append(aux["dense"])
    return q_map, kv_map, specs, ops


def _forward_call(cfg: _Config, q, k, v, aux, mod_args):
    sched = aux["fwd"]
    q_map, kv_map, mask_specs, mask_ops = _row_specs(cfg, aux)
    in_specs = [
        pl.BlockSpec((None, None, cfg.bq, cfg.Hp), q_map),
        pl.BlockSpec((None, None, cfg.bk, cfg.Hp), kv_map),
        pl.BlockSpec((None, None, cfg.bk, cfg.Hvp), kv_map),
        *mask_specs, *_mod_specs(mod_args),
    ]
    out_specs = [
        pl.BlockSpec((None, None, cfg.bq, cfg.Hvp), q_map),
        pl.BlockSpec((None, None, cfg.bq, LANES), q_map),
    ]
    prefetch = _prefetch(cfg, sched, aux)
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=len(prefetch), grid=(cfg.B, cfg.N, cfg.nq, cfg.nk),
        in_specs=in_specs, out_specs=out_specs,
        scratch_shapes=[pltpu.VMEM((cfg.bq, LANES), jnp.float32),
                        pltpu.VMEM((cfg.bq, LANES), jnp.float32),
                        pltpu.VMEM((cfg.bq, cfg.Hvp), jnp.float32)])
    return pl.pallas_call(
        functools.partial(_forward_kernel, cfg), grid_spec=grid_spec,
        out_shape=[jax.ShapeDtypeStruct((cfg.B, cfg.N, cfg.Tp, cfg.Hvp), q.dtype),
                   jax.ShapeDtypeStruct((cfg.B, cfg.N, cfg.Tp, LANES), jnp.float32)],
        compiler_params=_compiler_params(), interpret=cfg.pallas_interpret,
        name="flash_attention_forward",
    )(*prefetch, q, k, v, *mask_ops, *mod_args)


def _dq_call(cfg: _Config, q, k, v, do, lse_col, delta_col, aux, mod_args):
    sched = aux["fwd"]
    q_map, kv_map, mask_specs, mask_ops = _row_specs(cfg, aux)
    in_specs = [
        pl.BlockSpec((None, None, cfg.bq, cfg.Hp), q_map),
        pl.BlockSpec((None, None, cfg.bk, cfg.Hp), kv_map),
        pl.BlockSpec((None, None, cfg.bk, cfg.Hvp), kv_map),
        pl.BlockSpec((None, None, cfg.bq, cfg.Hvp), q_map),
        pl.BlockSpec((None, None, cfg.bq, LANES), q_map),
        pl.BlockSpec((None, None, cfg.bq, LANES), q_map),
        *mask_specs, *_mod_specs(mod_args),
    ]
    prefetch = _prefetch(cfg, sched, aux)
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=len(prefetch), grid=(cfg.B, cfg.N, cfg.nq, cfg.nk),
        in_specs=in_specs,
        out_specs=pl.BlockSpec((None, None, cfg.bq, cfg.Hp), q_map),
        scratch_shapes=[pltpu.VMEM((cfg.bq, cfg.Hp), jnp.float32)])
    return pl.pallas_call(
        functools.partial(_dq_kernel, cfg), grid_spec=grid_spec,
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        compiler_params=_compiler_params(), interpret=cfg.pallas_interpret,
        name="flash_attention_dq",
    )(*prefetch, q, k, v, do, lse_col, delta_col, *mask_ops, *mod_args)


def _dkv_call(cfg: _Config, q, k, v, do, lse_row, delta_row, aux, mod_args):
    """dK, dV and, per kv tile, its share of the cotangent of each floating score_mod
    argument (float32 [B, K, nk, *shape]; summed by the caller)."""
    sched = aux["bwd"]

    def head(kh, t):
        return kh * cfg.G + _div(t, cfg.nq)

    def q_tile(b, kh, j, t, tiles):
        return _tile_of(
            tiles[cfg.map_row(b, head(kh, t), j, cfg.nk) * cfg.nq + _rem(t, cfg.nq)])

    def q_map(b, kh, j, t, tiles, *_):
        return (b, head(kh, t), q_tile(b, kh, j, t, tiles), 0)

    def row_map(b, kh, j, t, tiles, *_):
        return (b, head(kh, t), 0, q_tile(b, kh, j, t, tiles))

    def kv_map(b, kh, j, t, *_):
        return (b, kh, j, 0)

    in_specs = [
        pl.BlockSpec((None, None, cfg.bq, cfg.Hp), q_map),
        pl.BlockSpec((None, None, cfg.bk, cfg.Hp), kv_map),
        pl.BlockSpec((None, None, cfg.bk, cfg.Hvp), kv_map),
        pl.BlockSpec((None, None, cfg.bq, cfg.Hvp), q_map),
        pl.BlockSpec((None, None, 1, cfg.bq), row_map),
        pl.BlockSpec((None, None, 1, cfg.bq), row_map),
    ]
    mask_ops = []
    if cfg.segments:
        in_specs.append(pl.BlockSpec(
            (None, 1, cfg.bq), lambda b, kh, j, t, tiles, *_: (
                b, 0, q_tile(b, kh, j, t, tiles))))
        in_specs.append(pl.BlockSpec((None, cfg.bk, LANES), lambda b, kh, j, t, *_: (b, j, 0)))
        mask_ops += [aux["q_seg_row"], aux["kv_seg_col"]]
    if cfg.dense:
        in_specs.append(pl.BlockSpec(
            (None, None, cfg.bk, cfg.bq), lambda b, kh, j, t, tiles, *_: (
                *cfg.dense_index(b, head(kh, t)), j, q_tile(b, kh, j, t, tiles))))
        mask_ops.append(aux["dense_t"])
    in_specs += _mod_specs(mod_args)
    out_specs = [pl.BlockSpec((None, None, cfg.bk, cfg.Hp), kv_map),
                 pl.BlockSpec((None, None, cfg.bk, cfg.Hvp), kv_map)]
    out_shape = [jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)]
    for i in cfg.mod_floating:
        shape = jnp.shape(mod_args[i])
        out_specs.append(pl.BlockSpec((None, None, None, *shape),
                                      common.leading_index_map(3, len(shape))))
        out_shape.append(jax.ShapeDtypeStruct((cfg.B, cfg.K, cfg.nk, *shape), jnp.float32))
    prefetch = _prefetch(cfg, sched, aux)
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=len(prefetch), grid=(cfg.B, cfg.K, cfg.nk, cfg.G * cfg.nq),
        in_specs=in_specs, out_specs=out_specs,
        scratch_shapes=[pltpu.VMEM((cfg.bk, cfg.Hp), jnp.float32),
                        pltpu.VMEM((cfg.bk, cfg.Hvp), jnp.float32)])
    dk, dv, *shares = pl.pallas_call(
        functools.partial(_dkv_kernel, cfg), grid_spec=grid_spec, out_shape=out_shape,
        compiler_params=_compiler_params(), interpret=cfg.pallas_interpret,
        name="flash_attention_dkv",
    )(*prefetch, q, k, v, do, lse_row, delta_row, *mask_ops, *mod_args)
    by_index = dict(zip(cfg.mod_floating, shares, strict=True))
    return dk, dv, tuple(
        by_index[i].sum((0, 1, 2)).astype(a.dtype) if i in by_index else None
        for i, a in enumerate(mod_args))


# ------------------------------------------------------------------------------ custom_vjp


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _attention(cfg: _Config, q, k, v, aux, mod_args):
    out, lse = _forward_call(cfg, q, k, v, aux, mod_args)
    return out, lse[..., 0]


def _attention_fwd(cfg: _Config, q, k, v, aux, mod_args):
    out, lse = _forward_call(cfg, q, k, v, aux, mod_args)
    return (out, lse[..., 0]), (q, k, v, aux, mod_args, out, lse)


def _attention_bwd(cfg: _Config, residuals, cotangents):
    q, k, v, aux, mod_args, out, lse = residuals
    d_out, d_lse = cotangents
    d_out = d_out.astype(out.dtype)
    # delta_i = rowsum(dO_i * O_i) - dlse_i: the lse cotangent folds into the softmax one.
    delta = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)
    delta = delta - d_lse.astype(jnp.float32)
    # Rows with nothing allowed have lse = -inf and every logit masked: exp(-inf - 0) = 0.
    lse_col = jnp.where(jnp.isfinite(lse), lse, 0.0)
    lse_row = lse_col[..., 0][:, :, None, :]
    delta_col = jnp.broadcast_to(delta[..., None], lse.shape)
    delta_row = delta[:, :, None, :]
    dq = _dq_call(cfg, q, k, v, d_out, lse_col, delta_col, aux, mod_args)
    dk, dv, d_args = _dkv_call(cfg, q, k, v, d_out, lse_row, delta_row, aux, mod_args)
    return dq, dk, dv, None, d_args


_attention.defvjp(_attention_fwd, _attention_bwd)


# ------------------------------------------------------------------------------ entry point


def _flat_schedule(block_map: jax.Array) -> dict[str, jax.Array]:
    s = schedule(block_map)
    # One int32 per entry, tile * 4 + kind, to spare SMEM (the scalar-prefetch memory).
    tiles = s.index.astype(jnp.int32) * 4 + s.kind.astype(jnp.int32)
    return {"tiles": tiles.reshape(-1),
            "count": s.count.reshape(-1).astype(jnp.int32)}


def _pad_to(x: jax.Array, shape: tuple[int, ...], value=0) -> jax.Array:
    pads = [(0, want - have) for have, want in zip(x.shape, shape, strict=True)]
    return jnp.pad(x, pads, constant_values=value) if any(p for _, p in pads) else x


def flash_attention(
    query: jax.Array,
    key: jax.Array,
    value: jax.Array,
    *,
    scale: float | None = None,
    lo: int | None = None,
    hi: int | None = None,
    q_segment_ids: jax.Array | None = None,
    kv_segment_ids: jax.Array | None = None,
    q_lengths: jax.Array | None = None,
    kv_lengths: jax.Array | None = None,
    dense_mask: jax.Array | None = None,
    static_mask=None,
    block_map: jax.Array | None = None,
    logits_soft_cap: float | None = None,
    score_mod=None,
    score_mod_args=(),
    block_sizes: BlockSizes | None = None,
    interpret: bool | str = False,
) -> tuple[jax.Array, jax.Array]:
    """Block-sparse flash attention on TPU (Pallas Mosaic), with its log-sum-exp.

    ``out[b, t, n] = sum_s softmax_s(l[b, n, t, s]) value[b, s, n // G]`` with logits
    ``l = scale * q.k`` (or ``cap * tanh(scale * q.k / cap)`` with ``logits_soft_cap``) over
    the allowed keys (-inf elsewhere), ``G = N // K``, and ``lse[b, n, t] = log sum_s
    exp(l[b, n, t, s])``. A key s is allowed for query t when every given piece allows it:
    ``lo <= s - t <= hi``, ``q_segment_ids[b, t] == kv_segment_ids[b, s]``,
    ``t < q_lengths[b]``, ``s < kv_lengths[b]``, ``dense_mask[b, n, t, s]``. The block map
    says which (block_q x block_kv) tiles are EMPTY (never visited), FULL (no mask
    arithmetic) or PARTIAL; it is a promise about the mask, not checked. Differentiable
    w.r.t. query, key and value (custom_vjp: a dK/dV kernel and a dQ kernel, no atomics),
    including through ``lse``. Works under jit and vmap.

    Args:
        query: [B, T, N, H], float32, bfloat16 or float16; H in 32..256 (any H works; it is
            zero-padded to a multiple of 128 inside).
        key: [B, S, K, H], same dtype; N % K == 0 (GQA/MQA without copying K/V).
        value: [B, S, K, Hv], same dtype; Hv may differ from H.
        scale: logit scale; default 1 / sqrt(H).
        lo, hi: static band ``lo <= kv - q <= hi`` (Python ints or None; causal: hi=0).
        q_segment_ids, kv_segment_ids: int32 [B, T] and [B, S], both or neither.
        q_lengths, kv_lengths: int32 [B] valid lengths.
        dense_mask: bool [Bm, Nm, T, S], Bm in {1, B}, Nm in {1, N}.
        static_mask: None or a hashable object whose ``allows(q_pos, kv_pos)`` gives the
            pattern elementwise on broadcastable int32 positions, evaluated in each tile.
        block_map: int8 [Bm, Nm, ceil(T / block_q), ceil(S / block_kv)] of EMPTY / PARTIAL /
            FULL (``pallas_kernels.flash.common``); None: every tile PARTIAL.
        logits_soft_cap: None or a positive float.
        score_mod: None or a hashable vectorised modifier of the logits, applied before the
            soft cap: ``score_mod(score, batch, head, q_index, kv_index, *score_mod_args)``
            on a tile's float32 logits and int32 index arrays of the same rank
            (``common.modified_scores``; ``jattn`` builds one from a scalar function).
            Differentiated inside the kernels; gradients reach the floating arguments.
        score_mod_args: the arrays ``score_mod`` reads (whole, in every program).
        block_sizes: ``BlockSizes``; default ``default_block_sizes(T, S, H, dtype)``. On a
            real TPU each block must be a multiple of 128 or one block covering its padded
            length (see the module docstring); any size in interpret mode.
        interpret: False (compile for the TPU); True or "tpu": TPU interpret mode on any
            backend (``pltpu.InterpretParams()``: TPU memory spaces and DMAs simulated, the
            faithful check); "hlo": Pallas's generic interpreter (the kernel discharged
            into plain JAX ops, about 3x faster on CPU; the shared test suites use it).

    Returns:
        ``(out, lse)``: out [B, T, N, Hv] in the input dtype (zeros for a query with nothing
        allowed), lse [B, N, T] float32 (-inf for such a query; its gradients are zero).

    Raises:
        ValueError: mismatched shapes or dtypes (naming the argument), N % K != 0, a block
            map or dense mask of the wrong shape, a bad soft cap, or block sizes a TPU
            cannot tile (only when not interpreting).

    >>> import numpy as np
    >>> from pallas_kernels.flash.common import BlockSizes
    >>> rng = np.random.default_rng(0)
    >>> q = jnp.asarray(rng.standard_normal((1, 10, 2, 32)), jnp.float32)
    >>> k = jnp.asarray(rng.standard_normal((1, 10, 1, 32)), jnp.float32)
    >>> out, lse = flash_attention(q, k, k, hi=0, block_sizes=BlockSizes(8, 8),
    ...                            interpret=True)
    >>> out.shape, lse.shape
    ((1, 10, 2, 32), (1, 2, 10))
    >>> logits = jnp.einsum("tnh,sh->nts", q[0], k[0, :, 0]) / np.sqrt(32)
    >>> logits = jnp.where(jnp.tril(jnp.ones((10, 10), bool)), logits, -jnp.inf)
    >>> want = jnp.einsum("nts,sh->tnh", jax.nn.softmax(logits), k[0, :, 0])
    >>> bool(jnp.allclose(out[0], want, atol=1e-5))
    True
    >>> bool(jnp.allclose(lse[0], jax.nn.logsumexp(logits, axis=-1), atol=1e-5))
    True

    References:
        Tri Dao, "FlashAttention-2: Faster Attention with Better Parallelism and Work
        Partitioning" (2023): the forward/backward algorithm (online softmax, dK/dV and dQ
        passes).
    """
    dims = common.check_inputs(
        query, key, value, lo=lo, hi=hi, q_segment_ids=q_segment_ids,
        kv_segment_ids=kv_segment_ids, q_lengths=q_lengths, kv_lengths=kv_lengths,
        dense_mask=dense_mask, logits_soft_cap=logits_soft_cap)
    B, T, N, H, S, K, Hv, dtype = dims
    bs = default_block_sizes(T, S, H, dtype) if block_sizes is None else block_sizes
    if not isinstance(bs, BlockSizes):
        raise ValueError(f"block_sizes: expected BlockSizes, got {bs!r}")
    bs.check_shared_tiles()
    bq, bk = bs.block_q, bs.block_kv
    nq, nk = cdiv(T, bq), cdiv(S, bk)
    Tp, Sp = nq * bq, nk * bk
    if not (interpret or _forced_interpret()):
        _check_tpu_blocks(bq, bk, Tp, Sp, dtype, dense_mask is not None)
    block_map = common.check_block_map(block_map, dims, bs)
    if block_map is None:
        block_map = jnp.full((1, 1, nq, nk), PARTIAL, jnp.int8)

    compute = jnp.float32 if dtype == jnp.float16 else dtype
    Hp, Hvp = _round_up(H, LANES), _round_up(Hv, LANES)
    cfg = _Config(
        B=B, N=N, K=K, T=T, S=S, Hp=Hp, Hvp=Hvp, bq=bq, bk=bk, nq=nq, nk=nk,
        map_b=block_map.shape[0] > 1, map_n=block_map.shape[1] > 1,
        dense_b=dense_mask is not None and dense_mask.shape[0] > 1,
        dense_n=dense_mask is not None and dense_mask.shape[1] > 1,
        scale=float(1.0 / math.sqrt(H) if scale is None else scale),
        cap=None if logits_soft_cap is None else float(logits_soft_cap), lo=lo, hi=hi,
        segments=q_segment_ids is not None, q_len=q_lengths is not None,
        kv_len=kv_lengths is not None, dense=dense_mask is not None, static=static_mask,
        mod=score_mod, mod_shapes=tuple(jnp.shape(a) for a in score_mod_args),
        mod_floating=tuple(common.floating_args(score_mod_args)),
        exact=compute == jnp.float32, interpret=_check_interpret(interpret))

    aux: dict[str, object] = {
        "fwd": _flat_schedule(block_map),
        "bwd": _flat_schedule(jnp.swapaxes(block_map, -1, -2)),
    }
    if q_lengths is not None:
        aux["q_len"] = jnp.asarray(q_lengths, jnp.int32)
    if kv_lengths is not None:
        aux["kv_len"] = jnp.asarray(kv_lengths, jnp.int32)
    if q_segment_ids is not None:
        q_seg = _pad_to(jnp.asarray(q_segment_ids, jnp.int32), (B, Tp))
        kv_seg = _pad_to(jnp.asarray(kv_segment_ids, jnp.int32), (B, Sp))
        aux["q_seg_col"] = jnp.broadcast_to(q_seg[:, :, None], (B, Tp, LANES))
        aux["q_seg_row"] = q_seg[:, None, :]
        aux["kv_seg_col"] = jnp.broadcast_to(kv_seg[:, :, None], (B, Sp, LANES))
        aux["kv_seg_row"] = kv_seg[:, None, :]
    if dense_mask is not None:
        dense = _pad_to(dense_mask.astype(jnp.int8), (*dense_mask.shape[:2], Tp, Sp))
        aux["dense"] = dense
        aux["dense_t"] = jnp.swapaxes(dense, -1, -2)

    def to_kernel(x, length, heads, dim):
        x = jnp.swapaxes(x, 1, 2).astype(compute)
        return _pad_to(x, (B, heads, length, dim))

    q = to_kernel(query, Tp, N, Hp)
    k = to_kernel(key, Sp, K, Hp)
    v = to_kernel(value, Sp, K, Hvp)
    mod_args = tuple(jnp.atleast_1d(a) for a in score_mod_args)
    out, lse = _attention(cfg, q, k, v, aux, mod_args)
    out = jnp.swapaxes(out[:, :, :T, :Hv], 1, 2).astype(dtype)
    return out, lse[:, :, :T]
