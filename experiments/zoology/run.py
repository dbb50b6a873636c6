"""One MQAR training run and the sweep over Zoology's figure-2 grid.

A run trains the figure-2 language model (:mod:`experiments.zoology.model`) on MQAR data
(:mod:`experiments.tasks.mqar`) with the shared trainer and reports the test accuracy: the
mean over test rows of the fraction of supervised positions whose argmax is the right value.
A sweep runs every (mixer, L, d_model, learning rate) of its grid, skipping finished runs and
resuming unfinished ones, then writes results.jsonl, summary.md and the figure.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from flax import nnx

from experiments.common.lm import task_functions as lm_task_functions
from experiments.common.trainer import (
    TrainConfig,
    TrainResult,
    fit,
    is_primary,
    make_mesh,
    sequence_parallel,
)
from experiments.tasks import mqar
from experiments.tasks.labels import label_positions
from experiments.zoology.model import LanguageModel


@dataclass(frozen=True)
class RunSettings:
    """What every run of a sweep shares: the data, the model around the mixer, and training
    (each run's grid point sets its learning rate and batch size)."""

    vocab_size: int = 8192
    num_train: int = 100_000
    num_test: int = 3_000
    num_layers: int = 2
    faithful: bool = True
    train: TrainConfig = dataclasses.field(default_factory=lambda: TrainConfig(max_epochs=64))


@dataclass(frozen=True)
class RunConfig:
    """One point of the grid, and the settings it shares with the others."""

    mixer: str
    seq_len: int
    num_kv_pairs: int
    d_model: int
    learning_rate: float
    batch_size: int
    settings: RunSettings = dataclasses.field(default_factory=RunSettings)

    @property
    def name(self) -> str:
        return (f"{self.mixer}-L{self.seq_len}-kv{self.num_kv_pairs}-d{self.d_model}"
                f"-lr{self.learning_rate:.2e}")

    @property
    def train(self) -> TrainConfig:
        """The trainer's settings of this run."""
        return dataclasses.replace(self.settings.train, learning_rate=self.learning_rate,
                                   batch_size=self.batch_size)

    @property
    def seed(self) -> int:
        """The run's seed: data, initialisation and the order of the batches."""
        return self.settings.train.seed

    def record(self) -> dict:
        """The run as one flat dict (its name, the grid point, every setting), for
        results.jsonl and the tables."""
        point = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                 if f.name != "settings"}
        shared = {f.name: getattr(self.settings, f.name)
                  for f in dataclasses.fields(self.settings) if f.name != "train"}
        return {"name": self.name} | point | shared | dataclasses.asdict(self.train)

    @classmethod
    def from_dict(cls, fields: dict) -> RunConfig:
        """The inverse of ``dataclasses.asdict`` (what config.json holds)."""
        settings = dict(fields.get("settings", {}))
        if "train" in settings:
            settings["train"] = TrainConfig(**settings["train"])
        return cls(**{**fields, "settings": RunSettings(**settings)})


def make_data(config: RunConfig) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Train and test rows (disjoint seed streams, checked for shared rows)."""
    settings = config.settings
    spec = {"vocab_size": settings.vocab_size, "input_seq_len": config.seq_len,
            "num_kv_pairs": config.num_kv_pairs}
    (x_train, y_train), (x_test, y_test) = mqar.train_test(
        [spec | {"num_examples": settings.num_train}],
        [spec | {"num_examples": settings.num_test}], seq_len=config.seq_len, seed=config.seed)
    return ({"inputs": x_train} | label_positions(y_train),
            {"inputs": x_test} | label_positions(y_test))


def build_model(config: RunConfig, mesh=None) -> LanguageModel:
    """The run's model; on a ``mesh`` with a "seq" axis its attention runs context-parallel
    over it (:func:`jattn.parallel.context_parallel`; dropout masks then drawn per device)."""
    settings = config.settings
    return LanguageModel(vocab_size=settings.vocab_size, d_model=config.d_model,
                         num_layers=settings.num_layers, max_len=config.seq_len,
                         mixer=config.mixer, faithful=settings.faithful,
                         attention_implementation=sequence_parallel(mesh),
                         rngs=nnx.Rngs(config.seed))


def _logits(model, batch, rng):
    return model(batch["inputs"], targets_at=batch["positions"], dropout_rng=rng)


def task_functions(model: nnx.Module):
    """(params, loss_fn, eval_fn) for the trainer (:func:`experiments.common.lm.task_functions`
    with the Zoology model's dropout)."""
    return lm_task_functions(model, _logits)


def train_run(config: RunConfig, workdir: Path, *, prepared=None,
              stop_after_steps: int | None = None) -> tuple[nnx.State, TrainResult | None]:
    """Train one run in ``workdir`` (resuming it); ``prepared`` = make_data(config) if known.

    Returns the trained parameters and the result (None if stopped by ``stop_after_steps``).
    """
    workdir.mkdir(parents=True, exist_ok=True)
    if is_primary():
        (workdir / "config.json").write_text(json.dumps(dataclasses.asdict(config), indent=1))
    train, test = prepared if prepared is not None else make_data(config)
    mesh = make_mesh(config.train.mesh, config.batch_size,
                     config.train.eval_batch_size or config.batch_size)
    params, loss_fn, eval_fn = task_functions(build_model(config, mesh))
    return fit(params, loss_fn=loss_fn, eval_fn=eval_fn, train=train, valid=test,
               config=config.train, workdir=workdir, mesh=mesh,
               stop_after_steps=stop_after_steps)

