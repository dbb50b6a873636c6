"""Dataset decomposition against concat-and-chunk and padding: training throughput and
held-out loss at equal tokens (P75).

    python -m experiments.benchmarks.dataset_decomposition                   # a few minutes
    python -m experiments.benchmarks.dataset_decomposition --preset quick    # a smoke, ~30 s

Data: documents of 33 to ``max_length`` + 1 tokens (32 to 2048 next-token targets,
log-uniform), each from one of ``num_chains`` random sparse Markov chains
(``experiments.tasks.markov_documents``): predicting well takes inferring the document's
chain from its context, and ``experiments.tasks.markov_documents.bayes_loss`` is the best
loss possible. The same training corpus feeds three data methods:

* **dd**: dataset decomposition into buckets of 2**i targets, ``min_bucket`` to
  ``max_length`` (``experiments.common.decomposition.decompose``), batches of
  ``tokens_per_step`` tokens from one bucket at a time in the order of the ``curriculum``
  with ``num_cycles`` cycles in its pass
  (``experiments.common.decomposition.CurriculumBatches``);
* **concat-chunk** (the reference of the ratios): the documents shuffled, back to back, cut
  into rows of ``max_length`` with document masks (segment ids,
  :func:`jattn.masks.segments`), ``tokens_per_step / max_length`` rows a step;
* **padding**: one document per row padded to ``max_length``, padding out of the loss;
  ``tokens_per_step / mean targets per document`` rows a step (rounded to the devices), so
  that a step trains on as many real tokens as the others on average (and costs about
  ``max_length / mean`` times more).

Each trains the same model from the same initialisation (:class:`jattn.nn.TransformerLM`,
causal softmax attention, sinusoidal positions) with the shared trainer for the same number
of steps: one pass of dd over its buckets (all its curriculum's cycles), about one pass over
the corpus for the others (at the defaults none of them sees a document twice). Every step
trains on about ``tokens_per_step`` tokens (trained next-token targets; padding and targets
across documents excluded): exactly that for dd, a little less for concat-chunk (document
starts), that on average for padding. The trainer's epochs are ``max_epochs`` equal shares
of those steps (``Steps``), so every method changes its learning rate and evaluates at
the same steps, after the same number of tokens. The evaluation is the same for all: the
held-out documents whole from their first token, padded to ``max_length``, loss per target.

Throughput: the trainer logs every step (``log_every`` 1); a step's time is the wall time
between two logged steps (building the batch, feeding it, the compiled step). Left out: the
first step of each batch shape (compilation; dd has one shape per bucket) and the first step
of each epoch (it waits for the evaluation). tokens/s = trained tokens of the timed steps /
their time. On a shared CPU these times move with the load; compare ratios from one run.

Writes config.json, runs/<method>/ (the trainer's logs; cleared at the start, every call
trains from scratch), results.json, results.md and figures/dataset_decomposition.png under
``out``, and prints the table.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
from pathlib import Path

import jax
import numpy as np
from flax import nnx

from experiments.common.config import parse_config, save_config
from experiments.common.decomposition import (
    CurriculumBatches,
    Documents,
    concat_and_chunk,
    decompose,
    pad_documents,
)
from experiments.common.lm import next_token_functions
from experiments.common.plots import panels, save
from experiments.common.trainer import (
    BatchSource,
    ShuffledRows,
    TrainConfig,
    data_mesh,
    fit,
    use_host_devices,
)
from experiments.tasks.markov_documents import (
    bayes_loss,
    log_uniform_lengths,
    markov_chains,
    sample_documents,
)
from jattn.nn.transformer import TransformerLM

METHODS = ("concat-chunk", "dd", "padding")  # the reference first
# max_epochs: evaluations (and learning rate changes), evenly spaced over the run.
TRAIN = TrainConfig(learning_rate=3e-3, max_epochs=4, eval_batch_size=8,
                    early_stop_metric=None, checkpoint_every=1_000_000, log_every=1)


@dataclasses.dataclass(frozen=True)
class Config:
    """Benchmark settings (every field is a command-line flag)."""

    num_documents: int = 1200  # training corpus: sets the steps (one pass of dd)
    num_valid: int = 48  # held-out documents
    min_length: int = 32  # targets per document (a document has one token more)
    max_length: int = 2048  # the longest document, bucket and row
    # Chosen so that a small model learns within the run: the mixture's bigram statistics
    # alone give 2.2 nats, the best possible (inferring the chain from the context) 1.3.
    vocab_size: int = 32
    num_chains: int = 4
    concentration: float = 0.05  # Dirichlet of the transition rows: small = sparse
    d_model: int = 64
    num_layers: int = 2
    num_heads: int = 2
    tokens_per_step: int = 4096
    min_bucket: int = 16  # dd's shortest bucket (shorter remainders are dropped)
    curriculum: str = "grow_p2"
    num_cycles: int = 8  # curriculum cycles in dd's pass
    train: TrainConfig = TRAIN  # its seed also draws the data and the initialisation
    out: str = "results/dataset_decomposition"


PRESETS = {
    "default": Config(),
    "quick": Config(num_documents=96, num_valid=16, max_length=512, d_model=32,
                    tokens_per_step=1024, num_cycles=2,
                    train=dataclasses.replace(TRAIN, max_epochs=2),
                    out="results/dataset_decomposition/quick"),
}


def make_corpus(config: Config) -> tuple[np.ndarray, Documents, Documents]:
    """(chains, training documents, held-out documents), from seed streams of the seed."""
    seed = config.train.seed
    chains = markov_chains(vocab_size=config.vocab_size, num_chains=config.num_chains,
                           concentration=config.concentration, seed=[seed, 0])
    corpora = []
    for stream, count in ((1, config.num_documents), (2, config.num_valid)):
        lengths = 1 + log_uniform_lengths(num_documents=count, min_length=config.min_length,
                                          max_length=config.max_length, seed=[seed, stream])
        tokens, _ = sample_documents(chains, lengths, seed=[seed, stream, 1])
        corpora.append(Documents(tokens, lengths))
    return chains, *corpora


def sources(config: Config, train: Documents, devices: int) -> dict[str, BatchSource]:
    """The three methods' batch sources over the same training documents."""
    seed = config.train.seed
    decomposition = decompose(train, min_length=config.min_bucket,
                              max_length=config.max_length)
    mean_targets = train.num_targets / len(train)
    pad_rows = max(devices, devices * round(config.tokens_per_step / mean_targets / devices))
    return {  # dd first: it checks tokens_per_step against max_length
        "dd": CurriculumBatches(decomposition, tokens_per_step=config.tokens_per_step,
                                curriculum=config.curriculum, num_cycles=config.num_cycles,
                                seed=seed),
        "concat-chunk": ShuffledRows(
            concat_and_chunk(train, length=config.max_length, seed=seed),
            config.tokens_per_step // config.max_length, seed),
        "padding": ShuffledRows(pad_documents(train, length=config.max_length), pad_rows,
                                seed),
    }


@dataclasses.dataclass(frozen=True)
class Steps:
    """A batch source read in epochs of ``steps_per_epoch`` steps, whatever its own passes
    over the data: methods whose passes differ in steps evaluate at the same steps."""

    source: BatchSource
    steps_per_epoch: int

    @property
    def batch_sizes(self) -> tuple[int, ...]:
        return self.source.batch_sizes

    def __call__(self, step: int) -> dict:
        return self.source(step)


def build_model(config: Config) -> TransformerLM:
    return TransformerLM(config.vocab_size, config.d_model, config.num_layers,
                         num_heads=config.num_heads, max_length=config.max_length,
                         positions="sinusoidal", rngs=nnx.Rngs(config.train.seed))


def step_tokens(source: BatchSource, steps: int) -> tuple[np.ndarray, list[tuple]]:
    """Trained targets and batch shape of each of the first ``steps`` steps."""
    tokens, shapes = np.zeros(steps), []
    for step in range(steps):
        batch = source(step)
        rows = batch["tokens"]
        trained = batch.get("target_mask", np.ones((len(rows), rows.shape[1] - 1)))
        weight = batch.get("weight", np.ones(len(rows)))
        tokens[step] = (trained * weight[:, None]).sum()
        shapes.append(rows.shape)
    return tokens, shapes


def summarise(records: list[dict], tokens: np.ndarray, shapes: list[tuple],
              steps_per_epoch: int) -> dict:
    """Throughput and the held-out losses of one run, from its metrics.jsonl."""
    times = {r["step"]: r["time"] for r in records if "train_loss" in r}
    seen, timed_steps, timed_tokens, timed_seconds = set(), 0, 0.0, 0.0
    for step, shape in enumerate(shapes):  # the log's step s is the end of this step s - 1
        new_shape, after_eval = shape not in seen, step % steps_per_epoch == 0
        seen.add(shape)
        if not (new_shape or after_eval):
            timed_steps += 1
            timed_tokens += tokens[step]
            timed_seconds += times[step + 1] - times[step]
    cumulative = np.cumsum(tokens)
    evals = [{"epoch": r["epoch"] + 1, "step": r["step"],
              "tokens": float(cumulative[r["step"] - 1]),
              "loss": r["valid_loss_sum"] / r["valid_targets"]}
             for r in records if "valid_loss_sum" in r]
    return {"steps": len(shapes), "shapes": len(seen), "tokens": float(cumulative[-1]),
            "timed_steps": timed_steps,
            "tokens_per_second": timed_tokens / timed_seconds if timed_steps else math.nan,
            "evaluations": evals}


def run(config: Config) -> dict:
    out = Path(config.out)
    shutil.rmtree(out / "runs", ignore_errors=True)
    chains, train, valid = make_corpus(config)
    devices = data_mesh().devices.size
    batch_sources = sources(config, train, devices)
    held_out = pad_documents(valid, length=config.max_length)
    dd = batch_sources["dd"]
    result = {
        "platform": jax.devices()[0].platform, "devices": devices, "jax": jax.__version__,
        "train_documents": len(train), "train_targets": train.num_targets,
        "valid_targets": valid.num_targets,
        "bayes_loss": bayes_loss(chains, valid.tokens, valid.lengths),
        "uniform_loss": float(np.log(config.vocab_size)),
        "dd_buckets": {str(b.length): len(b.tokens) for b in dd.decomposition.buckets},
        "dd_dropped_targets": dd.decomposition.dropped_targets,
        "methods": {},
    }
    interval = dd.steps_per_epoch // config.train.max_epochs
    if interval < 1:
        raise ValueError(f"num_documents: dd's pass of {dd.steps_per_epoch} steps is shorter "
                         f"than max_epochs={config.train.max_epochs} evaluations")
    params, loss_fn, eval_fn = next_token_functions(build_model(config))  # one initialisation
    for method in METHODS:
        source = Steps(batch_sources[method], interval)
        tokens, shapes = step_tokens(source, interval * config.train.max_epochs)
        workdir = out / "runs" / method
        fit(params, loss_fn=loss_fn, eval_fn=eval_fn, train=source, valid=held_out,
            config=config.train, workdir=workdir)
        records = [json.loads(line) for line in
                   (workdir / "metrics.jsonl").read_text().splitlines()]
        result["methods"][method] = summarise(records, tokens, shapes, interval)
    reference = result["methods"]["concat-chunk"]
    for row in result["methods"].values():
        row["speedup"] = row["tokens_per_second"] / reference["tokens_per_second"]
        row["loss_ratio"] = row["evaluations"][-1]["loss"] / reference["evaluations"][-1]["loss"]
    return result


def markdown(result: dict, config: Config) -> str:
    methods = result["methods"]
    epochs = len(methods["concat-chunk"]["evaluations"])
    lines = [
        f"Dataset decomposition (P75) on {result['devices']} {result['platform']} device(s), "
        f"JAX {result['jax']}: {result['train_documents']} training documents "
        f"({result['train_targets']:,} targets, {config.min_length}-{config.max_length} per "
        f"document, log-uniform), {config.tokens_per_step} tokens a step; TransformerLM "
        f"d_model {config.d_model}, {config.num_layers} layers, {config.num_heads} heads; dd: "
        f"buckets {config.min_bucket}-{config.max_length}, {config.curriculum}, "
        f"{config.num_cycles} cycle(s) in its pass. Held-out loss in nats per target "
        f"({result['valid_targets']:,} targets; best possible {result['bayes_loss']:.3f}, "
        f"uniform {result['uniform_loss']:.3f}) after each of {epochs} equal shares of the "
        f"steps.",
        "",
        "| method | steps | shapes | trained tokens | tokens/s | tokens/s vs concat-chunk | "
        + " | ".join(f"loss at {e + 1}/{epochs}" for e in range(epochs))
        + " | final loss vs concat-chunk |",
        "|---|---:|---:|---:|---:|---:|" + "---:|" * epochs + "---:|",
    ]
    for name, row in methods.items():
        lines.append(f"| {name} | {row['steps']} | {row['shapes']} | {row['tokens']:,.0f} | "
                     f"{row['tokens_per_second']:,.0f} | {row['speedup']:.2f}x | "
                     + " | ".join(f"{e['loss']:.3f}" for e in row["evaluations"])
                     + f" | {row['loss_ratio']:.3f} |")
    dropped = result["dd_dropped_targets"] / result["train_targets"]
    buckets = ", ".join(f"{k}: {v}" for k, v in result["dd_buckets"].items())
    lines += ["", f"dd rows per bucket ({buckets}); {dropped:.1%} of the targets dropped "
              f"(remainders below {config.min_bucket})."]
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    fig, (ax,) = panels(1, width=4.5, height=3.2)
    for name, row in result["methods"].items():
        evals = row["evaluations"]
        ax.plot([e["tokens"] for e in evals], [e["loss"] for e in evals], "o-", label=name)
    ax.axhline(result["bayes_loss"], color="grey", lw=0.8, ls=":", label="best possible")
    ax.set_xlabel("trained tokens")
    ax.set_ylabel("held-out loss (nats / target)")
    ax.legend(fontsize=8)
    save(fig, path)


def main(argv: list[str] | None = None) -> dict:
    config = parse_config(PRESETS, argv, description=__doc__)
    use_host_devices()  # before JAX starts: the trainer's data mesh over the cores
    out = Path(config.out)
    save_config(config, out)
    result = run(config)
    (out / "results.json").write_text(json.dumps(result, indent=1))
    table = markdown(result, config)
    (out / "results.md").write_text(table)
    plot(result, out / "figures" / "dataset_decomposition.png")
    print(table)
    return result


if __name__ == "__main__":
    main()
