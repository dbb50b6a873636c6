"""Context-parallel softmax attention: the sequence is sharded along one mesh axis.

Two strategies, both exact (equal to single-device attention up to float32 rounding):

* ``"ring"`` (Ring Attention): every device keeps its query shard; the key/value shards
  travel round the ring (``lax.ppermute``), one hop per step, and each device merges its
  partial results through the float32 log-sum-exp. The local step is
  :func:`jattn.dot_product_attention` (by default what it picks for the chunk shapes;
  ``implementation="pallas"`` on a GPU or TPU). The backward pass is a second ring (a
  ``custom_vjp``): the key/value shards travel again with their dK/dV accumulators, which
  arrive back at their owners after a full turn, so no device ever holds more than two
  shards of K/V. Causal load balancing: with ``load_balance`` the sequence is cut into 2D
  chunks and device d holds chunks d and 2D - 1 - d (zig-zag), so that every device computes
  the same number of chunk pairs (:func:`ring_work`). A ``score_mod`` sees global positions
  and batch rows (each chunk pair's are offset); gradients reach the arrays it reads (summed
  over the devices).
* ``"all_to_all"`` (DeepSpeed-Ulysses): one ``lax.all_to_all`` turns the sequence-sharded
  Q/K/V into head-sharded ones over the whole sequence, attention runs locally on N / D
  heads, and a second all-to-all turns the output back. Everything
  ``dot_product_attention`` takes works inside (masks, ``score_mod``), since each device
  sees whole sequences; it needs heads divisible by the device count.

Per device, the ring holds O(T / D) of everything: its query, output and statistics shards
and two K/V shards (the resident one and the travelling one). The all-to-all strategy holds
Q/K/V of all T positions for N / D heads.

References:
    Hao Liu, Matei Zaharia, Pieter Abbeel, "Ring Attention with Blockwise Transformers for
    Near-Infinite Context", 2023 (arXiv:2310.01889). Sam Ade Jacobs et al., "DeepSpeed
    Ulysses: System Optimizations for Enabling Training of Extreme Long Sequence Transformer
    Models", 2023 (arXiv:2309.14509). Zig-zag balancing as in Brandon et al., "Striped
    Attention", 2023 (arXiv:2311.09431) and later ring implementations.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from jattn.core import masks
from jattn.core import score_mod as _score_mod
from jattn.core.attention import dot_product_attention
from jattn.core.shapes import Array

__all__ = ["STRATEGIES", "context_parallel", "context_parallel_attention", "ring_work",
           "zigzag_order"]

#: The ``strategy`` values of :func:`context_parallel_attention`.
STRATEGIES = ("ring", "all_to_all", "auto")

_FULL, _DIAGONAL, _SKIP = 0, 1, 2  # what a (query chunk, key chunk) pair computes


def zigzag_order(T: int, devices: int) -> np.ndarray:
    """The permutation of positions 0..T-1 that puts chunks d and 2D - 1 - d (of 2D equal
    chunks) on device d: ``x[:, zigzag_order(T, D)]`` sharded evenly over D devices is the
    zig-zag layout. T must be a multiple of 2D. (``context_parallel_attention`` moves
    natural-order shards into this layout and back with two ``ppermute`` calls each way.)

    >>> zigzag_order(8, 2).tolist()
    [0, 1, 6, 7, 2, 3, 4, 5]
    """
    chunks = 2 * devices
    if T % chunks:
        raise ValueError(f"zigzag_order: T={T} must be a multiple of 2 x devices = {chunks}")
    size = T // chunks
    order = [c for d in range(devices) for c in (d, chunks - 1 - d)]
    return (np.asarray(order)[:, None] * size + np.arange(size)[None, :]).reshape(-1)


def _chunks_of(device, devices: int, balanced: bool):
    """Global chunk indices held by ``device`` (traced or not): (d,) in natural order, or
    (d, 2D - 1 - d) in zig-zag order."""
    return (device,) if not balanced else (device, 2 * devices - 1 - device)


def ring_work(devices: int, *, is_causal: bool = True, load_balance: bool = True
              ) -> np.ndarray:
    """Chunk pairs each device computes over a whole ring, int [D, 2]: (full pairs,
    diagonal pairs). A full pair costs a chunk of queries against a chunk of keys; a
    diagonal pair (a causal chunk against itself) half of that.

    >>> ring_work(4, load_balance=False).tolist()  # natural order: device 3 does 4x device 0
    [[0, 1], [1, 1], [2, 1], [3, 1]]
    >>> ring_work(4).tolist()  # zig-zag: all equal
    [[7, 2], [7, 2], [7, 2], [7, 2]]
    """
    work = np.zeros((devices, 2), int)
    for d in range(devices):
        mine = _chunks_of(d, devices, load_balance)
        for s in range(devices):
            for qc in mine:
                for kc in _chunks_of(s, devices, load_balance):
                    case = _case(qc, kc, is_causal, np)
                    if case != _SKIP:
                        work[d, case] += 1
    return work


def _case(q_chunk, kv_chunk, is_causal: bool, xp=jnp):
    if not is_causal:
        return _FULL
    return xp.where(kv_chunk < q_chunk, _FULL, xp.where(kv_chunk == q_chunk, _DIAGONAL,
                                                         _SKIP))


@dataclasses.dataclass(frozen=True)
class _Ring:
    """The static part of a ring call (hashable: the custom_vjp's non-diff argument)."""

    axis: str
    devices: int
    is_causal: bool
    balanced: bool
    segments: bool
    scale: float | None
    cap: float | None
    implementation: str | None
    dropout_rate: float
    batch_axis: str | None
    mod: object = None  # a converted score_mod (jattn.core.score_mod.Converted) or None

    def attend(self, q, k, v, q_seg, kv_seg, rng, mod_args, q_chunks, kv_chunks):
        """Partial attention of the local query chunks against one K/V shard: (out float32
        [B, Tl, N, Hv], lse [B, N, Tl]); chunk pairs that see nothing give lse = -inf.
        Dropout of a (query chunk, key chunk) pair draws from ``rng`` folded with both chunk
        indices (and the batch shard): the same mask in the forward and backward rings."""
        nq, nk = len(q_chunks), len(kv_chunks)
        qs = jnp.split(q, nq, axis=1)
        ks, vs = jnp.split(k, nk, axis=1), jnp.split(v, nk, axis=1)
        q_segs = jnp.split(q_seg, nq, axis=1) if self.segments else [None] * nq
        kv_segs = jnp.split(kv_seg, nk, axis=1) if self.segments else [None] * nk
        outs, lses = [], []
        for qa, qi, qsa in zip(qs, q_chunks, q_segs, strict=True):
            acc = None
            for kb, vb, kj, ksb in zip(ks, vs, kv_chunks, kv_segs, strict=True):
                key = None
                if self.dropout_rate:
                    key = jax.random.fold_in(jax.random.fold_in(rng, qi), kj)
                    if self.batch_axis is not None:
                        key = jax.random.fold_in(key, lax.axis_index(self.batch_axis))
                mod = self._global_mod(mod_args, qi * qa.shape[1], kj * kb.shape[1],
                                       qa.shape[0])
                part = self._pair(qa, kb, vb, qsa, ksb, key, mod,
                                  _case(qi, kj, self.is_causal))
                acc = part if acc is None else _merge(*acc, *part)
            outs.append(acc[0])
            lses.append(acc[1])
        return jnp.concatenate(outs, axis=1), jnp.concatenate(lses, axis=2)

    def _global_mod(self, mod_args, q0, kv0, rows):
        """The score_mod of one chunk pair, at global positions (and batch rows)."""
        if self.mod is None:
            return None
        row0 = 0 if self.batch_axis is None else lax.axis_index(self.batch_axis) * rows

        def mod(score, b, h, i, j):
            return self.mod.fn(score, b + row0, h, i + q0, j + kv0, *mod_args)

        return mod

    def _pair(self, q, k, v, q_seg, kv_seg, key, mod, case):
        seg = masks.segments(q_seg, kv_seg) if self.segments else None

        def run(mask):
            # Dropout scales each kept probability of the pair by 1 / (1 - rate); its lse is
            # that of the logits, so the merge still normalises over every key.
            out, lse = dot_product_attention(
                q, k, v, mask=mask, scale=self.scale, logits_soft_cap=self.cap,
                dropout_rate=self.dropout_rate, dropout_rng=key, score_mod=mod,
                return_lse=True, implementation=self.implementation)
            return out.astype(jnp.float32), lse

        def skip():
            B, T, N, _ = q.shape
            return (jnp.zeros((B, T, N, v.shape[-1]), jnp.float32),
                    jnp.full((B, N, T), -jnp.inf, jnp.float32))

        if not self.is_causal:
            return run(seg)
        diagonal = masks.all_of([masks.causal(), seg])
        return lax.switch(case, [lambda: run(seg), lambda: run(diagonal), skip])


def _merge(out_a, lse_a, out_b, lse_b):
    """Two partial results over disjoint keys merged through their log-sum-exps (rows that
    see nothing on either side stay at lse = -inf, with zero gradients, not NaN)."""
    top = jnp.maximum(lse_a, lse_b)
    top = jnp.where(jnp.isneginf(top), 0.0, top)
    total = jnp.exp(lse_a - top) + jnp.exp(lse_b - top)
    seen = total > 0
    lse = jnp.where(seen, top + jnp.log(jnp.where(seen, total, 1.0)), -jnp.inf)
    safe = jnp.where(seen, lse, 0.0)

    def weight(l):  # [B, N, T] -> [B, T, N, 1]
        return jnp.moveaxis(jnp.exp(l - safe), 1, 2)[..., None]

    return out_a * weight(lse_a) + out_b * weight(lse_b), lse


def _rotate(x, ring: _Ring):
    """Send to the next device of the ring, receive from the previous one."""
    D = ring.devices
    return lax.ppermute(x, ring.axis, [(i, (i + 1) % D) for i in range(D)])


def _chunk_ids(device, ring: _Ring):
    return _chunks_of(device, ring.devices, ring.balanced)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _ring_attention(ring: _Ring, q, k, v, q_seg, kv_seg, rng, mod_args):
    return _ring_forward(ring, q, k, v, q_seg, kv_seg, rng, mod_args)


def _ring_forward(ring: _Ring, q, k, v, q_seg, kv_seg, rng, mod_args):
    me = lax.axis_index(ring.axis)
    mine = _chunk_ids(me, ring)

    def step(s, carry):  # receive the previous device's shard, attend to it
        out, lse, k, v, kv_seg = carry
        k, v, kv_seg = _rotate((k, v, kv_seg), ring)
        part = ring.attend(q, k, v, q_seg, kv_seg, rng, mod_args, mine,
                           _chunk_ids((me - s) % ring.devices, ring))
        return (*_merge(out, lse, *part), k, v, kv_seg)

    out, lse = ring.attend(q, k, v, q_seg, kv_seg, rng, mod_args, mine, mine)  # resident
    out, lse, *_ = lax.fori_loop(1, ring.devices, step, (out, lse, k, v, kv_seg))
    return out.astype(q.dtype), lse


def _ring_fwd(ring: _Ring, q, k, v, q_seg, kv_seg, rng, mod_args):
    out, lse = _ring_forward(ring, q, k, v, q_seg, kv_seg, rng, mod_args)
    return (out, lse), (q, k, v, q_seg, kv_seg, rng, mod_args, out, lse)


def _ring_bwd(ring: _Ring, residuals, cotangents):
    """The second ring: each step differentiates the local pair's partial result, whose
    share of the merged output is w = exp(lse_part - lse): d out_part = w d out and
    d lse_part = w (d out . out_part - d out . out + d lse) per query row."""
    q, k, v, q_seg, kv_seg, rng, mod_args, out, lse = residuals
    d_out, d_lse = cotangents
    me = lax.axis_index(ring.axis)
    mine = _chunk_ids(me, ring)
    d_out = d_out.astype(jnp.float32)
    safe = jnp.where(jnp.isneginf(lse), 0.0, lse)
    row_dot = jnp.einsum("btnh,btnh->bnt", d_out, out.astype(jnp.float32))

    floating = [i for i, a in enumerate(mod_args)
                if jnp.issubdtype(jnp.result_type(a), jnp.inexact)]

    def with_floats(floats):
        args = list(mod_args)
        for i, a in zip(floating, floats, strict=True):
            args[i] = a
        return tuple(args)

    def step(s, carry):
        dq, k, v, kv_seg, dk, dv, d_floats = carry
        chunks = _chunk_ids((me - s) % ring.devices, ring)
        (o, l), pullback = jax.vjp(
            lambda q, k, v, floats: ring.attend(q, k, v, q_seg, kv_seg, rng,
                                                with_floats(floats), mine, chunks),
            q, k, v, tuple(mod_args[i] for i in floating))
        w = jnp.where(jnp.isneginf(l), 0.0, jnp.exp(l - safe))  # [B, N, T]
        d_o = d_out * jnp.moveaxis(w, 1, 2)[..., None]
        d_l = w * (jnp.einsum("btnh,btnh->bnt", d_out, o) - row_dot + d_lse)
        dq_s, dk_s, dv_s, df_s = pullback((d_o, d_l))
        # The K/V shard moves on with its accumulated gradients; after D hops all return home.
        k, v, kv_seg, dk, dv = _rotate((k, v, kv_seg, dk + dk_s, dv + dv_s), ring)
        return (dq + dq_s, k, v, kv_seg, dk, dv,
                tuple(a + b for a, b in zip(d_floats, df_s, strict=True)))

    zeros = functools.partial(jnp.zeros_like, dtype=jnp.float32)
    init = (zeros(q), k, v, kv_seg, zeros(k), zeros(v),
            tuple(jnp.zeros_like(mod_args[i]) for i in floating))
    dq, _, _, _, dk, dv, d_floats = lax.fori_loop(0, ring.devices, step, init)
    # Each device returns its share of the modifier's arrays' cotangent; shard_map's
    # transpose sums the shares of its replicated inputs over the devices.
    by_index = dict(zip(floating, d_floats, strict=True))
    d_mod = tuple(by_index.get(i) for i in range(len(mod_args)))
    return (dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None, None, None,
            d_mod)


_ring_attention.defvjp(_ring_fwd, _ring_bwd)


def context_parallel_attention(query: Array, key: Array, value: Array, *, mesh: Mesh,
                               axis_name: str = "seq", strategy: str = "auto",
                               batch_axis: str | None = None, is_causal: bool = False,
                               query_segment_ids: Array | None = None,
                               kv_segment_ids: Array | None = None,
                               scale: float | None = None,
                               logits_soft_cap: float | None = None,
                               dropout_rate: float = 0.0, dropout_rng=None,
                               load_balance: bool = True, return_lse: bool = False,
                               implementation: str | None = None, **kwargs):
    """Softmax attention with the sequence sharded over the mesh axis ``axis_name``.

    The arguments and result are global arrays in the natural layout (query [B, T, N, H],
    key/value [B, S, K, H|Hv], output [B, T, N, Hv]); under ``jit`` pass them sharded along
    T over ``axis_name`` (and B over ``batch_axis``) to avoid a reshard; the result comes
    back sharded the same way. With the causal ring and ``load_balance`` the shards are
    moved into the zig-zag layout (:func:`zigzag_order`) and back inside, two ``ppermute``
    calls each way.

    Args:
        query, key, value: as in :func:`jattn.dot_product_attention` (with a batch axis).
        mesh: the device mesh; ``axis_name`` one of its axes, of D devices.
        strategy: "ring", "all_to_all" or "auto": all-to-all when N and K are multiples of
            D or ``kwargs`` asks for what only it takes, else the ring.
        batch_axis: an optional mesh axis to shard the batch over (data parallelism).
        is_causal: causal self-attention (T == S).
        query_segment_ids, kv_segment_ids: int [B, T] and [B, S] (kv defaults to query's).
        scale, logits_soft_cap, dropout_rate, dropout_rng: as in
            :func:`jattn.dot_product_attention`. Dropout masks are drawn per device (ring:
            per pair of chunks), so they differ from a one-device call's.
        load_balance: causal ring only: the zig-zag layout (equal work per device).
        return_lse: also return the log-sum-exp [B, N, T] (float32).
        implementation: the local step's (None: what :func:`jattn.dot_product_attention`
            picks for the chunk shapes, "xla" with dropout).
        **kwargs: any other :func:`jattn.dot_product_attention` option. ``score_mod``
            works with both strategies, at global positions; the others (a ``mask``,
            ``bias``, windows...) with the all-to-all only, where each device sees whole
            sequences ("auto" then picks it).

    Returns:
        out [B, T, N, Hv] (and lse [B, N, T] with ``return_lse``).

    Raises:
        ValueError: an axis the mesh lacks; T or S not a multiple of D (of 2D for a
            balanced ring): pad the sequence (masking the padding with segment ids or
            lengths) to use context parallelism; is_causal with T != S; all-to-all with
            head counts not divisible by D; a ring asked for options only all-to-all has.

    >>> import jax, numpy as np
    >>> from jax.sharding import Mesh
    >>> mesh = Mesh(np.asarray(jax.devices()[:1]), ("seq",))
    >>> x = jax.random.normal(jax.random.key(0), (1, 8, 2, 4))
    >>> out = context_parallel_attention(x, x, x, mesh=mesh, is_causal=True, strategy="ring")
    >>> bool(jnp.allclose(out, dot_product_attention(x, x, x, is_causal=True), atol=1e-6))
    True
    """
    if axis_name not in mesh.axis_names:
        raise ValueError(f"axis_name: {axis_name!r} is not an axis of the mesh "
                         f"{dict(mesh.shape)}")
    if batch_axis is not None and batch_axis not in mesh.axis_names:
        raise ValueError(f"batch_axis: {batch_axis!r} is not an axis of the mesh "
                         f"{dict(mesh.shape)}")
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy: expected one of {STRATEGIES}, got {strategy!r}")
    for name, x in (("query", query), ("key", key), ("value", value)):
        if jnp.ndim(x) != 4:
            raise ValueError(f"{name}: expected [B, T|S, N|K, H], got shape {jnp.shape(x)}")
    D = mesh.shape[axis_name]
    B, T, N, _ = query.shape
    S, K = key.shape[1], key.shape[2]
    if is_causal and T != S:
        raise ValueError(f"is_causal: context-parallel causal attention is self-attention, "
                         f"T == S, got T={T}, S={S}")
    if query_segment_ids is not None and kv_segment_ids is None:
        kv_segment_ids = query_segment_ids
    for name, ids_, letter, length in (("query_segment_ids", query_segment_ids, "T", T),
                                       ("kv_segment_ids", kv_segment_ids, "S", S)):
        if ids_ is not None and tuple(jnp.shape(ids_)) != (B, length):
            raise ValueError(f"{name}: expected [B, {letter}] = {(B, length)}, got "
                             f"{tuple(jnp.shape(ids_))}")
    heads_split = N % D == 0 and K % D == 0
    score_mod = kwargs.pop("score_mod", None)
    if strategy == "auto":
        strategy = "all_to_all" if heads_split or kwargs else "ring"
    if strategy == "ring" and kwargs:
        raise ValueError(f"{sorted(kwargs)}: the ring takes is_causal, segment ids, scale, "
                         f"logits_soft_cap, dropout and score_mod; use "
                         f"strategy='all_to_all' for other options")
    balanced = strategy == "ring" and load_balance and is_causal
    multiple = 2 * D if balanced else D
    for name, length in (("T", T), ("S", S)):
        if length % multiple:
            raise ValueError(
                f"query, key: {name}={length} must be a multiple of {multiple} (the "
                f"{'2 x ' if balanced else ''}{D} devices of axis {axis_name!r}); pad the "
                f"sequence and mask the padding (segment ids or lengths)")
    if strategy == "all_to_all" and not heads_split:
        raise ValueError(f"strategy='all_to_all': query heads N={N} and kv heads K={K} must "
                         f"be multiples of the {D} devices of axis {axis_name!r}")

    if dropout_rate and dropout_rng is None:
        raise ValueError(f"dropout_rng: a key is required with dropout_rate={dropout_rate}")
    rng = jax.random.key(0) if dropout_rng is None else dropout_rng
    seq = P(batch_axis, axis_name)
    segments = query_segment_ids is not None
    ids = (jnp.asarray(query_segment_ids, jnp.int32),
           jnp.asarray(kv_segment_ids, jnp.int32)) if segments else (
        jnp.zeros((B, T), jnp.int32), jnp.zeros((B, S), jnp.int32))

    mod, mod_args = None, ()
    if score_mod is not None:  # its arrays enter shard_map as replicated inputs
        mod, mod_args = _score_mod.convert(score_mod, jnp.float32)
    if strategy == "all_to_all":
        body = functools.partial(
            _all_to_all, axis=axis_name, batch_axis=batch_axis, mod=mod, segments=segments,
            is_causal=is_causal, scale=scale, logits_soft_cap=logits_soft_cap,
            dropout_rate=dropout_rate, implementation=implementation, kwargs=kwargs)
    else:
        ring = _Ring(axis=axis_name, devices=D, is_causal=is_causal, balanced=balanced,
                     segments=segments, scale=scale,
                     cap=None if logits_soft_cap is None else float(logits_soft_cap),
                     implementation=implementation, dropout_rate=float(dropout_rate),
                     batch_axis=batch_axis, mod=mod)
        body = functools.partial(_ring_attention, ring)
    if balanced:
        body = functools.partial(_zigzag, body, axis=axis_name, devices=D)
    out, lse = jax.shard_map(
        body, mesh=mesh, in_specs=(seq, seq, seq, seq, seq, P(), P()),
        out_specs=(seq, P(batch_axis, None, axis_name)), check_vma=False,
    )(query, key, value, *ids, rng, mod_args)
    return (out, lse) if return_lse else out


def context_parallel(mesh: Mesh, axis_name: str = "seq", *, batch_axis: str | None = None,
                     strategy: str = "auto", load_balance: bool = True,
                     implementation: str | None = None):
    """:func:`context_parallel_attention` as an implementation of
    :func:`jattn.dot_product_attention`: pass it as ``implementation=`` (to the function,
    or to ``jattn.nn.MultiHeadAttention`` and the models built on it) and every call runs
    sharded over ``axis_name``. The call's mask must be what the strategy takes: causal and
    segment ids (and, all-to-all, windows); no bias (NotImplementedError). Attention
    dropout works, with masks drawn per device.

    >>> import jax, numpy as np, jattn
    >>> from jax.sharding import Mesh
    >>> impl = context_parallel(Mesh(np.asarray(jax.devices()[:1]), ("seq",)))
    >>> x = jax.random.normal(jax.random.key(0), (1, 8, 2, 4))
    >>> out = jattn.dot_product_attention(x, x, x, is_causal=True, implementation=impl)
    >>> bool(jnp.allclose(out, jattn.dot_product_attention(x, x, x, is_causal=True),
    ...                   atol=1e-6))
    True
    """
    def context_parallel_implementation(query, key, value, bias, mask, *, scale,
                                        logits_soft_cap, dropout, score_mod=None):
        if bias is not None:
            raise NotImplementedError("context parallelism takes no bias")
        options = _native_options(mask, query.shape[0])
        if score_mod is not None:
            options["score_mod"] = score_mod
        if dropout is not None:
            options.update(dropout_rate=dropout.rate, dropout_rng=dropout.rng)
        return context_parallel_attention(
            query, key, value, mesh=mesh, axis_name=axis_name, strategy=strategy,
            batch_axis=batch_axis, scale=scale, logits_soft_cap=logits_soft_cap,
            load_balance=load_balance, return_lse=True, implementation=implementation,
            **options)

    return context_parallel_implementation


def _native_options(mask, batch: int) -> dict:
    """The keyword arguments of :func:`context_parallel_attention` for a normalised Mask
    (bands and segment ids); NotImplementedError for anything else."""
    options: dict = {}
    if mask is None:
        return options
    lo = hi = None
    for leaf in mask.conjuncts():
        if isinstance(leaf, masks.Band):
            lo = leaf.lo if lo is None else max(lo, leaf.lo) if leaf.lo is not None else lo
            hi = leaf.hi if hi is None else min(hi, leaf.hi) if leaf.hi is not None else hi
        elif isinstance(leaf, masks.Segments) and "query_segment_ids" not in options:
            options["query_segment_ids"] = jnp.broadcast_to(leaf.q_ids, (batch,
                                                                          leaf.q_ids.shape[1]))
            options["kv_segment_ids"] = jnp.broadcast_to(leaf.kv_ids, (batch,
                                                                        leaf.kv_ids.shape[1]))
        else:
            raise NotImplementedError(f"context parallelism takes causal, window and segment "
                                      f"masks, got {type(leaf).__name__}")
    if hi == 0:
        options["is_causal"] = True
    elif hi is not None:
        raise NotImplementedError(f"context parallelism: a band up to kv - q <= {hi}; only "
                                  f"causal (0) or none")
    if lo is not None:
        if hi != 0:
            raise NotImplementedError("context parallelism: windows only with causal masks")
        options["local_window_size"] = (-lo, 0)
    return options


def _zigzag_permutations(devices: int) -> tuple[list, list]:
    """Where the first and the second natural chunk of each device go: device d holds
    chunks 2d and 2d + 1 in natural order, and chunk c belongs to device c (c < D) or
    2D - 1 - c in the zig-zag layout. Both maps are permutations of the devices."""
    def owner(c):
        return c if c < devices else 2 * devices - 1 - c

    return ([(d, owner(2 * d)) for d in range(devices)],
            [(d, owner(2 * d + 1)) for d in range(devices)])


def _zigzag(body, q, k, v, q_seg, kv_seg, rng, mod_args, *, axis: str, devices: int):
    """``body`` run on the zig-zag layout of natural-order shards: two ``ppermute``s in,
    two out, everything stays sharded. A device d receives chunk d and chunk 2D - 1 - d,
    one of them even (from the first permutation), one odd; d's parity says which comes
    first."""
    first, second = _zigzag_permutations(devices)
    even = lax.axis_index(axis) % 2 == 0

    def to_zigzag(x, seq=1):
        a, b = jnp.split(x, 2, axis=seq)
        a, b = lax.ppermute(a, axis, first), lax.ppermute(b, axis, second)
        return jnp.concatenate([jnp.where(even, a, b), jnp.where(even, b, a)], axis=seq)

    def from_zigzag(x, seq):
        mine, theirs = jnp.split(x, 2, axis=seq)
        a, b = jnp.where(even, mine, theirs), jnp.where(even, theirs, mine)
        back = [[(j, i) for i, j in perm] for perm in (first, second)]
        return jnp.concatenate([lax.ppermute(a, axis, back[0]),
                                lax.ppermute(b, axis, back[1])], axis=seq)

    out, lse = body(*(to_zigzag(x) for x in (q, k, v, q_seg, kv_seg)), rng, mod_args)
    return from_zigzag(out, 1), from_zigzag(lse, 2)


def _all_to_all(q, k, v, q_seg, kv_seg, rng, mod_args, *, axis, batch_axis, mod, segments,
                is_causal, scale, logits_soft_cap, dropout_rate, implementation, kwargs):
    """Ulysses: sequence shards -> head shards over the whole sequence, attention, back. A
    score_mod sees the global batch row and head (the local ones are offset)."""
    def to_heads(x):  # [B, T / D, heads, H] -> [B, T, heads / D, H]
        return lax.all_to_all(x, axis, split_axis=2, concat_axis=1, tiled=True)

    if mod is not None:
        heads = q.shape[2] // lax.axis_size(axis)
        head0 = lax.axis_index(axis) * heads
        row0 = 0 if batch_axis is None else lax.axis_index(batch_axis) * q.shape[0]

        def shifted(score, b, h, i, j):
            return mod.fn(score, b + row0, h + head0, i, j, *mod_args)

        kwargs = {**kwargs, "score_mod": shifted}

    if segments:
        kwargs = {**kwargs, "query_segment_ids": lax.all_gather(q_seg, axis, axis=1,
                                                                tiled=True),
                  "kv_segment_ids": lax.all_gather(kv_seg, axis, axis=1, tiled=True)}
    if dropout_rate:  # each device holds other heads (and maybe other rows)
        rng = jax.random.fold_in(rng, lax.axis_index(axis))
        if batch_axis is not None:
            rng = jax.random.fold_in(rng, lax.axis_index(batch_axis))
        kwargs = {**kwargs, "dropout_rate": dropout_rate, "dropout_rng": rng}
    out, lse = dot_product_attention(
        to_heads(q), to_heads(k), to_heads(v), is_causal=is_causal, scale=scale,
        logits_soft_cap=logits_soft_cap, return_lse=True, implementation=implementation,
        **kwargs)
    out = lax.all_to_all(out, axis, split_axis=1, concat_axis=2, tiled=True)
    lse = lax.all_to_all(lse, axis, split_axis=2, concat_axis=1, tiled=True)
    return out, lse
