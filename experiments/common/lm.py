"""Training a language model with the shared trainer: the loss and evaluation functions
:func:`experiments.common.trainer.fit` takes, for two kinds of rows.

* Supervised positions (:func:`task_functions`): ``inputs`` [R, T] and the label positions of
  :func:`experiments.tasks.labels.label_positions` (positions, targets, target_mask); a model
  computes its logits at the supervised positions only. :func:`evaluate` gives the accuracy.
* Next-token prediction (:func:`next_token_functions`): ``tokens`` [R, L + 1], inputs
  ``tokens[:, :-1]`` and targets ``tokens[:, 1:]``, the rows of
  :mod:`experiments.common.decomposition`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jattn import masks

# logits(model, batch, rng) -> [B, P, vocab] at batch["positions"]; rng is None in evaluation
Logits = Callable[[nnx.Module, dict, Any], jax.Array]


def logits_at_positions(model, batch, rng) -> jax.Array:
    """A :class:`jattn.nn.TransformerLM`'s logits at the supervised positions (no dropout)."""
    del rng
    return model(batch["inputs"], logits_at=batch["positions"])


def task_functions(model: nnx.Module, logits: Logits = logits_at_positions):
    """(params, loss_fn, eval_fn) for :func:`experiments.common.trainer.fit`, over the
    model's nnx.Param state: cross-entropy and per-row accuracy at the supervised
    positions."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def run(params, batch, rng):
        return logits(nnx.merge(graphdef, params, rest), batch, rng)

    def loss_fn(params, batch, rng):
        ce = optax.softmax_cross_entropy_with_integer_labels(
            run(params, batch, rng).astype(jnp.float32), batch["targets"])
        weight = batch["target_mask"] * batch["weight"][:, None]
        return (ce * weight).sum(), weight.sum()

    def eval_fn(params, batch):
        correct = jnp.argmax(run(params, batch, None), -1) == batch["targets"]
        mask = batch["target_mask"]
        return {"accuracy": (correct * mask).sum(1) / jnp.maximum(mask.sum(1), 1.0)}

    return params, loss_fn, eval_fn


def next_token_functions(model: nnx.Module):
    """(params, loss_fn, eval_fn) for the trainer on next-token rows, over a
    :class:`jattn.nn.TransformerLM`'s nnx.Param state.

    A batch holds ``tokens`` int [B, L + 1] and optionally ``target_mask`` [B, L] (the targets
    to train on; default all) and ``segment_ids`` int [B, L] (packed documents: every
    attention layer sees only the input's own document, :func:`jattn.masks.segments`, on top
    of the causal mask). The loss is the summed cross-entropy over the trained targets (the
    trainer divides by their number); the evaluation gives per row ``loss_sum`` and
    ``targets``, so the token-weighted mean loss over a set of rows is the ratio of their
    means.
    """
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def row_losses(params, batch):
        tokens = batch["tokens"]
        mask = masks.segments(batch["segment_ids"]) if "segment_ids" in batch else None
        logits = nnx.merge(graphdef, params, rest)(tokens[:, :-1], mask=mask)
        ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32),
                                                             tokens[:, 1:])
        trained = batch.get("target_mask", jnp.ones(ce.shape, jnp.float32))
        return (ce * trained).sum(1), trained.sum(1)

    def loss_fn(params, batch, rng):
        del rng  # no dropout
        loss, count = row_losses(params, batch)
        return (loss * batch["weight"]).sum(), (count * batch["weight"]).sum()

    def eval_fn(params, batch):
        loss, count = row_losses(params, batch)
        return {"loss_sum": loss, "targets": count}

    return params, loss_fn, eval_fn


def evaluate(eval_fn, params, rows: dict[str, np.ndarray], batch_size: int) -> float:
    """Mean per-row accuracy over ``rows`` (one compiled shape: a short last batch is
    padded and its padding ignored)."""
    step = jax.jit(eval_fn)
    n = len(rows["inputs"])
    total = 0.0
    for start in range(0, n, batch_size):
        idx = np.arange(start, start + batch_size) % n
        real = min(batch_size, n - start)
        acc = np.asarray(step(params, {k: v[idx] for k, v in rows.items()})["accuracy"])
        total += float(acc[:real].sum())
    return total / n
