"""Lightning attention (P22): chunked causal linear attention as one Pallas kernel.

One program per (batch row, kv head, query head of the group) walks the sequence a chunk of
C tokens at a time, carrying the running state S [F, Hv] in registers/VMEM:

* inside the chunk, the masked quadratic form (phi(Q) phi(K)^T * W) V, with W[i, j] =
  exp(A_i - A_j) for j <= i in the same document (A: cumulative log factors within the chunk);
* across chunks, the state: phi(Q) S scaled by exp(A_i) for the queries of the state's
  document, and S <- exp(A_end) S + (phi(K) * exp(A_end - A))^T V.

The backward kernel walks the chunks in reverse, from the state entering each chunk (saved
by the forward pass when differentiated), carrying the state's cotangent.

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
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels.flash.common import DTypeError

__all__ = ["lightning_attention"]


def _chunk_terms(a, doc, C: int, acc, has_doc: bool):
    """The decay and document terms of one chunk from its log factors ``a`` [C] and the ids
    ``doc`` [C + 1] (the one before the chunk first): (W [C, C], from [C], to [C], carried)
    as in the module docstring (zeros across documents)."""
    i = lax.broadcasted_iota(jnp.int32, (C, C), 0)
    j = lax.broadcasted_iota(jnp.int32, (C, C), 1)
    lower = i >= j
    A = jnp.dot(lower.astype(acc), a[:, None], preferred_element_type=acc)[:, 0]
    A_end = jnp.sum(a)
    same = lower
    from_ok = to_ok = jnp.ones((C,), bool)
    carry_ok = jnp.bool_(True)
    if has_doc:
        rel = doc[1:] - doc[0]  # 0: the state's document (the one before the chunk)
        last = rel[C - 1]
        same = same & (rel[:, None] == rel[None, :])
        from_ok, to_ok, carry_ok = rel == 0, rel == last, last == 0
    weight = jnp.where(same, jnp.exp(jnp.where(same, A[:, None] - A[None, :], 0.0)), 0.0)
    from_state = jnp.where(from_ok, jnp.exp(A), 0.0)
    to_state = jnp.where(to_ok, jnp.exp(A_end - A), 0.0)
    carried = jnp.where(carry_ok, jnp.exp(A_end), 0.0)
    return weight, from_state, to_state, carried


def _forward_kernel(q_ref, k_ref, v_ref, a_ref, doc_ref, s0_ref, out_ref, s_ref, *saved,
                    C: int, n_chunks: int, has_doc: bool):
    acc = s_ref.dtype  # float32, or float64 for float64 inputs

    def chunk(c, state):
        rows = pl.ds(c * C, C)
        q, k, v = q_ref[rows, :], k_ref[rows, :], v_ref[rows, :]  # [C, F], [C, F], [C, Hv]
        weight, from_state, to_state, carried = _chunk_terms(
            a_ref[rows], doc_ref[pl.ds(c * C, C + 1)], C, acc, has_doc)
        if saved:  # the state entering each chunk, for the backward kernel
            saved[0][c] = state
        scores = jnp.dot(q, k.T, preferred_element_type=acc) * weight
        out_ref[rows, :] = (jnp.dot(scores, v, preferred_element_type=acc)
                            + jnp.dot(q, state, preferred_element_type=acc)
                            * from_state[:, None])
        return carried * state + jnp.dot((k * to_state[:, None]).T, v,
                                         preferred_element_type=acc)

    s_ref[...] = lax.fori_loop(0, n_chunks, chunk, s0_ref[...])


def _backward_kernel(q_ref, k_ref, v_ref, a_ref, doc_ref, states_ref, dout_ref, ds_ref,
                     dq_ref, dk_ref, dv_ref, da_ref, ds0_ref, *, C: int, n_chunks: int,
                     has_doc: bool):
    """The chunks in reverse, carrying dS (the cotangent of the state leaving the chunk).
    Per chunk, with P = (q k^T) * W and dP = dout v^T:
    dv = P^T dout + diag(to) k dS, dq = (dP * W) k + diag(from) dout S^T,
    dk = (dP * W)^T q + diag(to) v dS^T, dS_in = carried dS + q^T diag(from) dout, and the
    log factors through A (W_ij = exp(A_i - A_j), from = exp(A), to = exp(A_end - A),
    carried = exp(A_end)): da_m = sum_{i >= m} dA_i + dA_end."""
    acc = ds_ref.dtype
    i = lax.broadcasted_iota(jnp.int32, (C, C), 0)
    j = lax.broadcasted_iota(jnp.int32, (C, C), 1)
    upper = (i <= j).astype(acc)  # da = upper @ dA: the reverse cumulative sum

    def chunk(step, d_state):
        c = n_chunks - 1 - step
        rows = pl.ds(c * C, C)
        q, k, v = q_ref[rows, :], k_ref[rows, :], v_ref[rows, :]
        dout = dout_ref[rows, :]
        state = states_ref[c]
        weight, from_state, to_state, carried = _chunk_terms(
            a_ref[rows], doc_ref[pl.ds(c * C, C + 1)], C, acc, has_doc)
        qk = jnp.dot(q, k.T, preferred_element_type=acc)
        scores = qk * weight
        d_scores = jnp.dot(dout, v.T, preferred_element_type=acc)  # dP
        d_qk = d_scores * weight
        k_ds = jnp.dot(k, d_state, preferred_element_type=acc)  # [C, Hv]
        dv_ref[rows, :] = (jnp.dot(scores.T, dout, preferred_element_type=acc)
                           + k_ds * to_state[:, None])
        dq_ref[rows, :] = (jnp.dot(d_qk, k, preferred_element_type=acc)
                           + jnp.dot(dout, state.T, preferred_element_type=acc)
                           * from_state[:, None])
        dk_ref[rows, :] = (jnp.dot(d_qk.T, q, preferred_element_type=acc)
                           + jnp.dot(v, d_state.T, preferred_element_type=acc)
                           * to_state[:, None])
        # Cotangents of the log factors, through A and A_end.
        g = d_scores * scores  # dW * W
        d_from = jnp.sum(dout * jnp.dot(q, state, preferred_element_type=acc), axis=1)
        d_to = jnp.sum(k_ds * v, axis=1)
        d_A = (g.sum(axis=1) - g.sum(axis=0) + d_from * from_state - d_to * to_state)
        d_end = jnp.sum(d_to * to_state) + carried * jnp.sum(state * d_state)
        da_ref[rows] = jnp.dot(upper, d_A[:, None], preferred_element_type=acc)[:, 0] + d_end
        return carried * d_state + jnp.dot((q * from_state[:, None]).T, dout,
                                           preferred_element_type=acc)

    ds0_ref[...] = lax.fori_loop(0, n_chunks, chunk, ds_ref[...])


class _Shape(NamedTuple):
    B: int
    K: int
    G: int
    F: int
    Hv: int
    C: int
    n_chunks: int
    T: int

    @property
    def Tp(self) -> int:
        return self.n_chunks * self.C


def _specs(sh: _Shape, *layouts: str) -> list[pl.BlockSpec]:
    """Whole-sequence blocks of one (b, h, g) program for each named layout."""
    F, Hv, n, Tp = sh.F, sh.Hv, sh.n_chunks, sh.Tp
    table = {
        "q": ((None, None, None, Tp, F), lambda b, h, g: (b, h, g, 0, 0)),
        "k": ((None, None, Tp, F), lambda b, h, g: (b, h, 0, 0)),
        "v": ((None, None, Tp, Hv), lambda b, h, g: (b, h, 0, 0)),
        "a": ((None, None, None, Tp), lambda b, h, g: (b, h, g, 0)),
        "doc": ((None, Tp + 1), lambda b, h, g: (b, 0)),
        "state": ((None, None, None, F, Hv), lambda b, h, g: (b, h, g, 0, 0)),
        "states": ((None, None, None, n, F, Hv), lambda b, h, g: (b, h, g, 0, 0, 0)),
        "per_head_v": ((None, None, None, Tp, Hv), lambda b, h, g: (b, h, g, 0, 0)),
        "per_head_k": ((None, None, None, Tp, F), lambda b, h, g: (b, h, g, 0, 0)),
    }
    return [pl.BlockSpec(*table[name]) for name in layouts]


def _forward(sh: _Shape, q, k, v, a, doc, s0, has_doc: bool, interpret: bool, save: bool):
    dtype = q.dtype
    B, K, G, F, Hv, C, n, _ = sh
    out_shape = [jax.ShapeDtypeStruct((B, K, G, sh.Tp, Hv), dtype),
                 jax.ShapeDtypeStruct((B, K, G, F, Hv), dtype)]
    outs = ["per_head_v", "state"]
    if save:
        out_shape.append(jax.ShapeDtypeStruct((B, K, G, n, F, Hv), dtype))
        outs.append("states")
    return pl.pallas_call(
        functools.partial(_forward_kernel, C=C, n_chunks=n, has_doc=has_doc),
        grid=(B, K, G), in_specs=_specs(sh, "q", "k", "v", "a", "doc", "state"),
        out_specs=_specs(sh, *outs), out_shape=out_shape, interpret=interpret,
        name="lightning_forward",
    )(q, k, v, a, doc, s0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 7, 8))
def _lightning(sh: _Shape, q, k, v, a, doc, s0, has_doc: bool, interpret: bool):
    out, state = _forward(sh, q, k, v, a, doc, s0, has_doc, interpret, save=False)
    return out, state


def _lightning_fwd(sh, q, k, v, a, doc, s0, has_doc, interpret):
    out, state, states = _forward(sh, q, k, v, a, doc, s0, has_doc, interpret, save=True)
    return (out, state), (q, k, v, a, doc, states)


def _lightning_bwd(sh, has_doc, interpret, residuals, cotangents):
    q, k, v, a, doc, states = residuals
    d_out, d_state = cotangents
    B, K, G, F, Hv, C, n, _ = sh
    dtype = q.dtype
    dq, dk, dv, da, ds0 = pl.pallas_call(
        functools.partial(_backward_kernel, C=C, n_chunks=n, has_doc=has_doc),
        grid=(B, K, G),
        in_specs=_specs(sh, "q", "k", "v", "a", "doc", "states", "per_head_v", "state"),
        out_specs=_specs(sh, "q", "per_head_k", "per_head_v", "a", "state"),
        out_shape=[jax.ShapeDtypeStruct(q.shape, dtype),
                   jax.ShapeDtypeStruct((B, K, G, sh.Tp, F), dtype),
                   jax.ShapeDtypeStruct((B, K, G, sh.Tp, Hv), dtype),
                   jax.ShapeDtypeStruct(a.shape, dtype),
                   jax.ShapeDtypeStruct((B, K, G, F, Hv), dtype)],
        interpret=interpret, name="lightning_backward",
    )(q, k, v, a, doc, states, d_out.astype(dtype), d_state.astype(dtype))
    # The G query heads of a kv head share its keys and values: their shares add up.
    return dq, dk.sum(2), dv.sum(2), da, None, ds0


_lightning.defvjp(_lightning_fwd, _lightning_bwd)


def lightning_attention(q_features, k_features, value, initial_state, log_factor,
                        document=None, *, chunk_size: int = 64, interpret: bool = False):
    """Causal linear attention sums, chunk by chunk, in one kernel; differentiable (a
    backward kernel walks the chunks in reverse from the states the forward saved, one per
    chunk, O(T / C) of them), w.r.t. every floating input.

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
    C = chunk_size
    n_chunks = -(-T // C)
    sh = _Shape(B, K, G, F, value.shape[-1], C, n_chunks, T)
    pad = sh.Tp - T

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
        doc = jnp.zeros((B, sh.Tp + 1), jnp.int32)
    out, state = _lightning(sh, q, k, v, a, doc, initial_state, has_doc, bool(interpret))
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
