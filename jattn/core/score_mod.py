"""Score modifiers: a function of one attention logit and its coordinates, applied per tile.

A ``score_mod`` is written for scalars, as FlexAttention's is::

    def alibi(score, batch, head, q_index, kv_index):
        return score + slopes[head] * (kv_index - q_index)

and every implementation applies it elementwise to the logits it forms (``"xla"`` to its
[B, N, T, S] scores, ``"chunked"`` and the Pallas kernels to one tile at a time), so a
position bias never exists as a [T, S] array. ``score`` is the float32 (float64 for float64
input) value ``scale * q . k + bias``; ``batch``, ``head`` (the query head), ``q_index`` and
``kv_index`` are int32. Arrays the function closes over (``slopes`` above, a learned
relative-position table) are its parameters: gradients reach them through every
implementation.

Inside a ``custom_vjp`` (the chunked path's, the kernels') the closed-over arrays must be
explicit arguments: :func:`convert` hoists them all from the function's jaxpr, and
:func:`apply` evaluates the converted function on a tile by nested ``vmap`` over the tile's
axes (an axis of size 1 in an index array is not mapped, so no index is broadcast to the
tile's size).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from jax.extend import core as jax_core

from jattn.core.shapes import Array

ScoreModFn = Callable[[Array, Array, Array, Array, Array], Array]
"""(score, batch, head, q_index, kv_index) -> score, written for scalars."""


@dataclasses.dataclass(frozen=True, eq=False)
class Converted:
    """A score_mod with its traced closed-over arrays hoisted: ``fn(score, batch, head,
    q_index, kv_index, *consts)`` for scalars. Hashable by identity (a custom_vjp's static
    argument).

    Calling it applies ``fn`` elementwise to a tile (:func:`apply`): ``converted(score,
    batch, head, q_index, kv_index, *consts)`` with index arrays of the score's rank, the
    vectorised form that ``pallas_kernels.flash.common.modified_scores`` and the kernels
    take."""

    fn: Callable

    def __call__(self, score: Array, batch, head, q_index, kv_index, *consts) -> Array:
        return apply(self.fn, score, (batch, head, q_index, kv_index), consts)


def check(score_mod) -> None:
    """Raise TypeError unless ``score_mod`` is None or callable."""
    if score_mod is not None and not callable(score_mod):
        raise TypeError(f"score_mod: expected a function (score, batch, head, q_index, "
                        f"kv_index) -> score, got {type(score_mod).__name__}")


def convert(score_mod: ScoreModFn, dtype) -> tuple[Converted, tuple[Array, ...]]:
    """Hoist every array ``score_mod`` closes over (for a score of ``dtype``): traced ones
    (parameters to differentiate) and concrete ones (index tables) alike, since a Pallas
    kernel may capture no constant.

    Raises:
        TypeError: the function does not map a scalar score to one scalar of that dtype.
    """
    index = jnp.int32(0)
    example = (jnp.zeros((), dtype), index, index, index, index)
    out = jax.eval_shape(score_mod, *example)
    if not (hasattr(out, "shape") and out.shape == () and jnp.issubdtype(out.dtype,
                                                                          jnp.floating)):
        raise TypeError(f"score_mod: must return one floating scalar for scalar inputs "
                        f"(score, batch, head, q_index, kv_index), got {out}")
    closed = jax.make_jaxpr(score_mod)(*example)
    jaxpr = closed.jaxpr

    def fn(*args):  # (score, batch, head, q_index, kv_index, *consts)
        xs, consts = args[:len(example)], args[len(example):]
        return jax_core.jaxpr_as_fun(jax_core.ClosedJaxpr(jaxpr, list(consts)))(*xs)[0]

    return Converted(fn), tuple(jnp.asarray(c) for c in closed.consts)


def apply(fn: Callable, score: Array, indices: Sequence[Array], consts=()) -> Array:
    """``fn(score, *indices, *consts)`` elementwise over ``score``'s shape.

    ``indices`` (batch, head, q_index, kv_index) are int arrays of ``score``'s rank that
    broadcast to it. The result has ``score``'s shape and dtype.
    """
    args = [score, *(jnp.asarray(i, jnp.int32) for i in indices)]
    if any(a.ndim != score.ndim for a in args):
        raise ValueError(f"score_mod: indices must have the score's rank {score.ndim}, got "
                         f"{[a.shape for a in args]}")

    def mapped(*xs):
        if not xs[0].ndim:
            return fn(*xs, *consts).astype(score.dtype)
        axes = [0 if x.shape[0] > 1 else None for x in xs]
        inner = [x if a == 0 else x[0] for x, a in zip(xs, axes, strict=True)]
        if all(a is None for a in axes):
            return mapped(*inner)[None]
        return jax.vmap(mapped, in_axes=axes)(*inner)

    return mapped(*args)
