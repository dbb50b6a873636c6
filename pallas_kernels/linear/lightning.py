"""Lightning attention (P22): chunked causal linear attention as one Pallas kernel.

One program per (batch row, kv head, query head of the group) walks the sequence a chunk of
C tokens at a time, carrying the running state S [F, Hv] in registers/VMEM:

* inside the chunk, the masked quadratic form (phi(Q) phi(K)^T * W) V, with W[i, j] =
  exp(A_i - A_j) for j <= i in the same document (A: cumulative log factors within the chunk);
* across chunks, the state: phi(Q) S scaled by exp(A_i) for the queries of the state's
  document, and S <- exp(A_end) S + (phi(K) * exp(A_end - A))^T V.

A per-position log factor ``a`` <= 0 covers both a constant per-head decay (log gamma at
every position) and a data-dependent one (gated linear attention, Mamba-2); document ids
reset the state where they change (packed variable-length batches). Cumulative sums are a
product with a lower-triangular matrix of ones, so nothing but matmuls, exponentials and
selects runs in the kernel.

The inputs are features (the caller applies the feature map) and values; a normaliser is a
column of ones appended to the values. Lengths that are not a multiple of C are padded here
with zero features and log factor 0 (padding leaves the state unchanged). With
``interpret=True`` the kernel runs on any backend, the CPU included; the GPU (Triton) and
TPU (Mosaic) lowerings have not been run on hardware yet.

This module imports jax only.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels.flash.common import DTypeError

__all__ = ["lightning_attention"]


def _kernel(q_ref, k_ref, v_ref, a_ref, doc_ref, s0_ref, out_ref, s_ref, *, C: int,
            n_chunks: int, has_doc: bool):
    acc = s_ref.dtype  # float32, or float64 for float64 inputs
    i = lax.broadcasted_iota(jnp.int32, (C, C), 0)
    j = lax.broadcasted_iota(jnp.int32, (C, C), 1)
    lower = i >= j
    ones_lower = lower.astype(acc)

    def chunk(c, state):
        start = c * C
        rows = pl.ds(start, C)
        q, k, v = q_ref[rows, :], k_ref[rows, :], v_ref[rows, :]  # [C, F], [C, F], [C, Hv]
        a = a_ref[rows]  # [C]
        A = jnp.dot(ones_lower, a[:, None], preferred_element_type=acc)[:, 0]
        A_end = jnp.sum(a)
        same = lower
        from_ok = jnp.ones((C,), bool)
        to_ok = jnp.ones((C,), bool)
        carry_ok = jnp.bool_(True)
        if has_doc:
            doc = doc_ref[pl.ds(start + 1, C)] - doc_ref[start]  # 0: the state's document
            last = doc[C - 1]
            same = same & (doc[:, None] == doc[None, :])
            from_ok, to_ok, carry_ok = doc == 0, doc == last, last == 0
        weight = jnp.where(same, jnp.exp(jnp.where(same, A[:, None] - A[None, :], 0.0)), 0.0)
        scores = jnp.dot(q, k.T, preferred_element_type=acc) * weight
        from_state = jnp.where(from_ok, jnp.exp(A), 0.0)
        out = (jnp.dot(scores, v, preferred_element_type=acc)
               + jnp.dot(q, state, preferred_element_type=acc) * from_state[:, None])
        out_ref[rows, :] = out
        to_state = jnp.where(to_ok, jnp.exp(A_end - A), 0.0)
        carried = jnp.where(carry_ok, jnp.exp(A_end), 0.0)
        return carried * state + jnp.dot((k * to_state[:, None]).T, v,
                                         preferred_element_type=acc)

    s_ref[...] = lax.fori_loop(0, n_chunks, chunk, s0_ref[...])


def lightning_attention(q_features, k_features, value, initial_state, log_factor,
                        document=None, *, chunk_size: int = 64, interpret: bool = False):
    """Causal linear attention sums, chunk by chunk, in one kernel.

    Args:
        q_features: phi(q) [B, T, K, G, F] (query head n = (n // G, n % G)).
        k_features: phi(k) [B, T, K, F].
        value: [B, T, K, Hv] (append a column of ones to get the normaliser as its last
            output column).
        initial_state: [B, K, G, F, Hv]: sum of phi(k) v^T of the keys before position 0.
        log_factor: [B, T, K, G], values <= 0: the state is multiplied by exp(log_factor[t])
            before key t enters.
        document: None or int32 [B, T], non-decreasing: the state is reset where it
            increases (the initial state reaches the queries up to the first increase).
        chunk_size: C, the tokens per step.
        interpret: run in Pallas interpret mode (any backend).

    Every input in one floating dtype, the compute dtype (float32, or float64).

    Returns:
        (sums [B, T, K, G, Hv]: sum_s w_ts (phi(q_t) . phi(k_s)) v_s plus the state's part,
        final state [B, K, G, F, Hv]), in that dtype.

    Raises:
        ValueError: shapes that disagree (naming the argument), a chunk size that is not a
            positive int.
        DTypeError: inputs not of one floating dtype, a non-integer ``document``.
    """
    _check(q_features, k_features, value, initial_state, log_factor, document, chunk_size)
    B, T, K, G, F = q_features.shape
    dtype = q_features.dtype
    Hv = value.shape[-1]
    C = chunk_size
    n_chunks = -(-T // C)
    pad = n_chunks * C - T
    Tp = T + pad

    def padded(x):
        return jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))

    q = jnp.moveaxis(padded(q_features), 1, 3)  # [B, K, G, Tp, F]
    k = jnp.moveaxis(padded(k_features), 1, 2)  # [B, K, Tp, F]
    v = jnp.moveaxis(padded(value), 1, 2)  # [B, K, Tp, Hv]
    a = jnp.moveaxis(padded(log_factor), 1, 3)  # [B, K, G, Tp]
    has_doc = document is not None
    if has_doc:  # a leading copy of the first id: doc[start] precedes each chunk
        doc = jnp.pad(document.astype(jnp.int32), [(0, 0), (1, pad)], mode="edge")
    else:
        doc = jnp.zeros((B, Tp + 1), jnp.int32)
    kernel = functools.partial(_kernel, C=C, n_chunks=n_chunks, has_doc=has_doc)
    out, state = pl.pallas_call(
        kernel,
        grid=(B, K, G),
        in_specs=[
            pl.BlockSpec((None, None, None, Tp, F), lambda b, h, g: (b, h, g, 0, 0)),
            pl.BlockSpec((None, None, Tp, F), lambda b, h, g: (b, h, 0, 0)),
            pl.BlockSpec((None, None, Tp, Hv), lambda b, h, g: (b, h, 0, 0)),
            pl.BlockSpec((None, None, None, Tp), lambda b, h, g: (b, h, g, 0)),
            pl.BlockSpec((None, Tp + 1), lambda b, h, g: (b, 0)),
            pl.BlockSpec((None, None, None, F, Hv), lambda b, h, g: (b, h, g, 0, 0)),
        ],
        out_specs=[
            pl.BlockSpec((None, None, None, Tp, Hv), lambda b, h, g: (b, h, g, 0, 0)),
            pl.BlockSpec((None, None, None, F, Hv), lambda b, h, g: (b, h, g, 0, 0)),
        ],
        out_shape=[jax.ShapeDtypeStruct((B, K, G, Tp, Hv), dtype),
                   jax.ShapeDtypeStruct((B, K, G, F, Hv), dtype)],
        interpret=interpret,
    )(q, k, v, a, doc, initial_state)
    return jnp.moveaxis(out, 3, 1)[:, :T], state


def _check(q, k, v, s0, a, doc, chunk_size) -> None:
    if jnp.ndim(q) != 5:
        raise ValueError(f"q_features: expected [B, T, K, G, F], got shape {jnp.shape(q)}")
    B, T, K, G, F = q.shape
    Hv = jnp.shape(v)[-1] if jnp.ndim(v) == 4 else None
    expected = {"k_features": (k, (B, T, K, F)), "value": (v, (B, T, K, Hv)),
                "initial_state": (s0, (B, K, G, F, Hv)), "log_factor": (a, (B, T, K, G))}
    for name, (x, shape) in expected.items():
        if tuple(jnp.shape(x)) != shape:
            raise ValueError(f"{name}: expected shape {shape} (from q_features {q.shape} and "
                             f"value's last axis), got {tuple(jnp.shape(x))}")
        if not jnp.issubdtype(x.dtype, jnp.floating) or x.dtype != q.dtype:
            raise DTypeError(f"{name}: expected q_features' floating dtype {q.dtype}, got "
                             f"{x.dtype}")
    if not jnp.issubdtype(q.dtype, jnp.floating):
        raise DTypeError(f"q_features: expected a floating dtype, got {q.dtype}")
    if doc is not None:
        if tuple(jnp.shape(doc)) != (B, T):
            raise ValueError(f"document: expected shape {(B, T)}, got {tuple(jnp.shape(doc))}")
        if not jnp.issubdtype(doc.dtype, jnp.integer):
            raise DTypeError(f"document: expected an integer dtype, got {doc.dtype}")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size: expected a positive int, got {chunk_size!r}")
