"""One MQAR training run and the sweep over Zoology's figure-2 grid.

A run trains the figure-2 language model (:mod:`experiments.zoology.model`) on MQAR data
(:mod:`experiments.zoology.data`) with the shared trainer and reports the test accuracy: the
mean over test rows of the fraction of supervised positions whose argmax is the right value.
A sweep runs every (mixer, L, d_model, learning rate) of its grid, skipping finished runs and
resuming unfinished ones, then writes results.jsonl, summary.md and the figure.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from experiments.common.trainer import TrainConfig, TrainResult, fit
from experiments.zoology import data
from experiments.zoology.model import LanguageModel


@dataclass(frozen=True)
class RunConfig:
    """One point of the grid."""

    mixer: str
    seq_len: int
    num_kv_pairs: int
    d_model: int
    learning_rate: float
    batch_size: int
    vocab_size: int = 8192
    num_train: int = 100_000
    num_test: int = 3_000
    n_layers: int = 2
    max_epochs: int = 64
    faithful: bool = True
    seed: int = 0
    checkpoint_every: int = 200
    progress: bool = True

    @property
    def name(self) -> str:
        return (f"{self.mixer}-L{self.seq_len}-kv{self.num_kv_pairs}-d{self.d_model}"
                f"-lr{self.learning_rate:.2e}")


def label_positions(labels: np.ndarray) -> dict[str, np.ndarray]:
    """The supervised positions of each row, padded to the row with the most.

    Returns:
        positions [R, P] int32 (0 where padded), targets [R, P] int32, target_mask [R, P].
    """
    supervised = labels != data.IGNORE
    width = int(supervised.sum(1).max())
    # A stable sort puts each row's supervised positions first, in order.
    order = np.argsort(~supervised, axis=1, kind="stable")[:, :width].astype(np.int32)
    mask = np.take_along_axis(supervised, order, axis=1)
    targets = np.where(mask, np.take_along_axis(labels, order, axis=1), 0).astype(np.int32)
    return {"positions": np.where(mask, order, 0), "targets": targets,
            "target_mask": mask.astype(np.float32)}


def make_data(config: RunConfig) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Train and test rows (disjoint seed streams, checked for shared rows)."""
    spec = {"vocab_size": config.vocab_size, "input_seq_len": config.seq_len,
            "num_kv_pairs": config.num_kv_pairs}
    (x_train, y_train), (x_test, y_test) = data.train_test(
        [spec | {"num_examples": config.num_train}], [spec | {"num_examples": config.num_test}],
        seq_len=config.seq_len, seed=config.seed)
    return ({"inputs": x_train} | label_positions(y_train),
            {"inputs": x_test} | label_positions(y_test))


def build_model(config: RunConfig) -> LanguageModel:
    return LanguageModel(vocab_size=config.vocab_size, d_model=config.d_model,
                         n_layers=config.n_layers, max_len=config.seq_len, mixer=config.mixer,
                         faithful=config.faithful, rngs=nnx.Rngs(config.seed))


def task_functions(model: nnx.Module):
    """(params, loss_fn, eval_fn) for the trainer, over the model's nnx.Param state."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def logits(params, batch, rng):
        return nnx.merge(graphdef, params, rest)(batch["inputs"], targets_at=batch["positions"],
                                                 dropout_rng=rng)

    def loss_fn(params, batch, rng):
        ce = optax.softmax_cross_entropy_with_integer_labels(
            logits(params, batch, rng).astype(jnp.float32), batch["targets"])
        weight = batch["target_mask"] * batch["weight"][:, None]
        return (ce * weight).sum(), weight.sum()

    def eval_fn(params, batch):
        correct = jnp.argmax(logits(params, batch, None), -1) == batch["targets"]
        mask = batch["target_mask"]
        return {"accuracy": (correct * mask).sum(1) / jnp.maximum(mask.sum(1), 1.0)}

    return params, loss_fn, eval_fn


def train_run(config: RunConfig, workdir: Path, *, prepared=None,
              stop_after_steps: int | None = None) -> tuple[nnx.State, TrainResult | None]:
    """Train one run in ``workdir`` (resuming it); ``prepared`` = make_data(config) if known.

    Returns the trained parameters and the result (None if stopped by ``stop_after_steps``).
    """
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "config.json").write_text(json.dumps(dataclasses.asdict(config), indent=1))
    train, test = prepared if prepared is not None else make_data(config)
    params, loss_fn, eval_fn = task_functions(build_model(config))
    train_config = TrainConfig(
        learning_rate=config.learning_rate, batch_size=config.batch_size,
        max_epochs=config.max_epochs, checkpoint_every=config.checkpoint_every,
        seed=config.seed, progress=config.progress)
    return fit(params, loss_fn=loss_fn, eval_fn=eval_fn, train=train, valid=test,
               config=train_config, workdir=workdir, stop_after_steps=stop_after_steps)

