"""Trained recall with length generalisation (issue 7, experiment 2).

Small language models are trained on a recall task at one length (256 tokens) and evaluated,
unchanged, on longer sequences (512 .. 2048): the paper's question of whether a test-time
memory keeps recalling beyond the span its attention can see (Titans Table 2, S-NIAH; Table
5, the ablations).

Tasks:

* ``passkey`` (needle in noise, one needle): ``L - 1`` random noise tokens with a marker
  ``MARK`` followed by a passkey (one of ``num_values`` tokens) at a uniform random position;
  the last token is ``QUERY`` and the model must predict the passkey there. Chance is
  1 / ``num_values``. Evaluated at each length with the needle anywhere in the sequence, so
  at 2048 most needles sit farther from the query than any training example could.
* ``mqar``: Zoology's multi-query associative recall (:func:`experiments.tasks.mqar.mqar`)
  with ``num_kv_pairs`` pairs at the start and the queries spread over the rest; every
  query position is supervised. At longer lengths the gaps between a pair and its query grow.
  With ``mqar_noise`` (the default) the positions between the queries hold random tokens
  (never the row's keys or values) instead of the filler token 0.

Models: ``layers`` x [short causal convolution (Zoology's BaseConv, kernel 3) -> mixer], no
position embedding (the convolution gives local order; nothing is tied to absolute
positions, so every model can run at any length). Mixers (see :data:`MODELS`): sliding-window
attention (``window`` tokens), linear attention (elu + 1), the Titans LMM, MAC, MAG and MAL
(:mod:`jattn.nn.titans`; attention windows and MAC segments of ``window`` tokens; MAC
writing its residual stream, and MAC writing the attention output alone at theta ~ 0.01 and
0.03, and without momentum), the Table 5 ablations (linear memory L_M = 1, no momentum, no
forgetting) of the LMM and, on the passkey only, of MAC, and the LMM
trained with the paper's chunk-parallel form (chunks of 16) instead of token by token
(``chunk_size`` 1, the default here: the deep memory learns the passkey only at 1).

Each run is trained with the shared resumable trainer (:func:`experiments.common.trainer.fit`)
and then evaluated at every length of ``eval_lens`` on fresh rows; finished runs are skipped.
Writes runs/<task>-<model>/ (checkpoints, metrics.jsonl, result.json, eval.json),
results.jsonl, summary.md and figures/recall.png under ``out``.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path

import jax
import numpy as np
from flax import nnx
from tqdm import tqdm

from experiments.common.config import save_config
from experiments.common.lm import evaluate, task_functions
from experiments.common.plots import panels, save
from experiments.common.trainer import TrainConfig, fit
from experiments.tasks import mqar
from experiments.tasks.labels import label_positions
from experiments.tasks.passkey import passkey, passkey_vocab
from jattn.nn.transformer import TransformerLM

TASKS = ("passkey", "mqar")


# ----------------------------------------------------------------------------------------------
# Models


TRAIN = TrainConfig(learning_rate=3e-3, batch_size=32, max_epochs=4, eval_batch_size=16,
                    early_stop_metric=None, checkpoint_every=100)


@dataclasses.dataclass(frozen=True)
class RecallConfig:
    """Trained-recall settings (every field is a command-line flag)."""

    tasks: tuple[str, ...] = TASKS
    models: tuple[str, ...] = ("swa", "linear", "lmm", "mac", "mac_linear", "mac_no_momentum",
                               "mac_no_forget", "mac_attention_output",
                               "mac_attention_output_theta03",
                               "mac_attention_output_no_momentum", "mag", "mal", "lmm_linear",
                               "lmm_no_momentum", "lmm_no_forget", "lmm_chunk16")
    train_len: int = 256
    eval_lens: tuple[int, ...] = (256, 512, 1024, 2048)
    d_model: int = 64
    num_heads: int = 2
    layers: int = 1  # [conv, mixer] pairs
    window: int = 32  # attention window (SWA, MAG, MAL) and MAC segment
    chunk_size: int = 1  # memory chunk (the deep memory learns the passkey only at 1)
    initial_lr: float = 0.1  # memory gates at initialisation: theta,
    initial_forget: float = 0.001  # alpha
    num_persistent: int = 4
    num_values: int = 16  # passkey: candidate passkeys (chance 1 / num_values)
    num_noise: int = 32  # passkey: noise vocabulary
    num_kv_pairs: int = 8  # mqar
    mqar_vocab: int = 4096  # mqar: must exceed the longest eval length
    # mqar: random tokens between the queries, not Zoology's zero filler (a long run of
    # one token makes the clamped deep memory's outer gradient explode: docs/titans.md)
    mqar_noise: bool = True
    num_train: int = 4096  # training rows (steps = num_train / batch_size * max_epochs)
    num_eval: int = 256  # rows per eval length (in batches of train.eval_batch_size)
    train: TrainConfig = TRAIN  # its seed also draws the data and the initialisation
    out: str = "results/titans/recall"


PRESETS = {
    # about 8 min on 2 CPU cores; the docs' table adds --models ...,linear,lmm_chunk16
    "quick": RecallConfig(tasks=("passkey",), models=("swa", "lmm_linear", "lmm"),
                          num_eval=128, train=dataclasses.replace(TRAIN, max_epochs=2)),
    "full": RecallConfig(num_train=8192, num_eval=256,
                         train=dataclasses.replace(TRAIN, max_epochs=2),
                         out="results/titans/recall_full"),
}


# Memory rates of MAC writing the attention output alone (residual=False): at the others'
# theta ~ 0.1 its outer gradient grows with every segment.
MAC_INITIAL_LR = 0.01
# The largest tried that keeps that MAC's outer gradient bounded at initialisation with
# momentum (norm 30-36 at 64..256 tokens; 0.05: 160 at 128, 6.7e7 at 256).
MAC_FASTER_LR = 0.03


@dataclasses.dataclass(frozen=True)
class Model:
    """A recall model's mixer: a name of :data:`jattn.nn.MIXERS` and its options."""

    description: str
    mixer: str
    options: Callable[[RecallConfig], dict] = lambda config: {}
    tasks: tuple[str, ...] = TASKS  # the tasks it runs on


def _titans(mixer: str, **fixed) -> Callable[[RecallConfig], dict]:
    def options(config: RecallConfig) -> dict:
        chosen = dict(chunk_size=config.chunk_size, num_persistent=config.num_persistent,
                      initial_lr=config.initial_lr, initial_forget=config.initial_forget,
                      max_grad_norm=1.0) | fixed
        if mixer == "titans_mac":
            chosen["segment_size"] = config.window
        elif mixer != "titans_lmm":
            chosen["window"] = config.window
        return chosen
    return options


def _titans_model(description: str, mixer: str, tasks: tuple[str, ...] = TASKS,
                  **fixed) -> Model:
    return Model(description, mixer, _titans(mixer, **fixed), tasks)


MODELS: dict[str, Model] = {
    "swa": Model("sliding-window attention", "attention", lambda c: dict(window=c.window)),
    "linear": Model("linear attention (elu+1)", "linear", lambda c: dict(feature_map="elu+1")),
    "lmm": _titans_model("Titans LMM (deep memory L_M = 2)", "titans_lmm"),
    # MAC as jattn.nn.TitansMAC builds it: the memory writes the residual stream x + Attn;
    # its outer gradient stays at 47-49 at theta ~ 0.1 with momentum (init, 32-256 tokens).
    "mac": _titans_model("Titans MAC", "titans_mac"),
    # The Table 5 ablations for MAC, on the passkey only (every memory model but the linear
    # LMM stays at chance on MQAR at this budget).
    "mac_linear": _titans_model("MAC, linear memory (L_M = 1)", "titans_mac",
                                tasks=("passkey",), memory_depth=1),
    "mac_no_momentum": _titans_model("MAC without momentum", "titans_mac", tasks=("passkey",),
                                     momentum=False),
    "mac_no_forget": _titans_model("MAC without forgetting", "titans_mac", tasks=("passkey",),
                                   forget=False),
    # MAC writing the attention output alone. At theta ~ 0.1 its outer gradient grows with
    # every segment (norm 1.3e5 at 64 tokens, 6e18 at 256; it trained to NaN), at 0.01 it
    # stays at 50-68; it stayed at chance on the passkey in 512 steps (its outer gradients
    # and Adam's second moments stayed small: it learned slowly, it did not blow up).
    "mac_attention_output": _titans_model("MAC writing the attention output, theta ~ 0.01",
                                          "titans_mac", residual=False,
                                          initial_lr=MAC_INITIAL_LR),
    "mac_attention_output_theta03": _titans_model(
        "MAC writing the attention output, theta ~ 0.03", "titans_mac", residual=False,
        initial_lr=MAC_FASTER_LR),
    # Without momentum its outer gradient stays bounded at theta ~ 0.1, the LMM's rate.
    "mac_attention_output_no_momentum": _titans_model(
        "MAC writing the attention output, no momentum, theta ~ 0.1", "titans_mac",
        residual=False, momentum=False),
    "mag": _titans_model("Titans MAG", "titans_mag"),
    "mal": _titans_model("Titans MAL", "titans_mal"),
    "lmm_linear": _titans_model("LMM, linear memory (L_M = 1)", "titans_lmm", memory_depth=1),
    "lmm_no_momentum": _titans_model("LMM without momentum", "titans_lmm", momentum=False),
    "lmm_no_forget": _titans_model("LMM without forgetting", "titans_lmm", forget=False),
    "lmm_chunk16": _titans_model("LMM, chunks of 16 (paper's parallel training)", "titans_lmm",
                                 chunk_size=16),
}


def vocab_size(config: RecallConfig, task: str) -> int:
    if task == "passkey":
        return passkey_vocab(config.num_values, config.num_noise)
    return config.mqar_vocab


def build_model(config: RecallConfig, task: str, model: str) -> TransformerLM:
    """layers x [BaseConv(kernel 3) -> mixer], no position embedding, tied output head."""
    spec = MODELS[model]
    return TransformerLM(vocab_size(config, task), config.d_model, 2 * config.layers,
                         mixer=["base_conv", spec.mixer] * config.layers,
                         mixer_options=[{"kernel_size": 3}, spec.options(config)] * config.layers,
                         num_heads=config.num_heads,
                         max_length=max((*config.eval_lens, config.train_len)),
                         positions=None, rngs=nnx.Rngs(config.train.seed))


def make_rows(config: RecallConfig, task: str, seq_len: int, num_examples: int,
              stream: int) -> dict[str, np.ndarray]:
    """Rows of ``task`` at ``seq_len`` from seed stream ``stream`` (0: train, 1 + i: eval at
    the i-th length), as the trainer's dict (inputs, positions, targets, target_mask)."""
    seed = np.random.SeedSequence([config.train.seed, TASKS.index(task), stream])
    if task == "passkey":
        x, y = passkey(seq_len=seq_len, num_examples=num_examples,
                       num_values=config.num_values, num_noise=config.num_noise, seed=seed)
    elif task == "mqar":
        x, y = mqar.mqar(vocab_size=config.mqar_vocab, input_seq_len=seq_len,
                         num_kv_pairs=config.num_kv_pairs, num_examples=num_examples,
                         random_non_queries=config.mqar_noise, seed=seed)
    else:
        raise ValueError(f"task: expected one of {TASKS}, got {task!r}")
    return {"inputs": x} | label_positions(y)


def run_one(config: RecallConfig, task: str, model: str, workdir: Path) -> dict:
    """Train (or resume) one (task, model) run at ``train_len``, then evaluate it at every
    length of ``eval_lens``; returns the row written to eval.json."""
    done = workdir / "eval.json"
    if done.exists():
        return json.loads(done.read_text())
    workdir.mkdir(parents=True, exist_ok=True)
    lm = build_model(config, task, model)
    params, loss_fn, eval_fn = task_functions(lm)
    train = make_rows(config, task, config.train_len, config.num_train, 0)
    valid = make_rows(config, task, config.train_len, config.num_eval, 1)
    params, result = fit(params, loss_fn=loss_fn, eval_fn=eval_fn, train=train, valid=valid,
                         config=config.train, workdir=workdir)
    accuracy = {}
    for i, length in enumerate(config.eval_lens):
        rows = make_rows(config, task, length, config.num_eval, 2 + i)
        accuracy[str(length)] = evaluate(eval_fn, params, rows, config.train.eval_batch_size)
    row = {"task": task, "model": model, "accuracy": accuracy, "train_steps": result.step,
           "train_loss": result.train_loss, "train_seconds": result.seconds,
           "parameters": int(sum(np.size(p) for p in jax.tree_util.tree_leaves(params)))}
    done.write_text(json.dumps(row, indent=1))
    return row


# ----------------------------------------------------------------------------------------------
# Sweep, table, figure

# Titans (arXiv 2501.00663): Table 2, S-NIAH accuracy (%) at 16K; Table 5, perplexity /
# long-context accuracy of the ablations (760M parameters).
PAPER_TABLE2 = {"lmm": 80.2, "mac": 97.4}
PAPER_TABLE5 = {"lmm": (27.01, 92.68), "lmm_linear": (28.49, 85.34),
                "lmm_no_momentum": (28.98, 87.12), "lmm_no_forget": (29.04, 85.60),
                "mac": (26.67, 97.95)}


def chance(config: RecallConfig, task: str) -> float:
    """Accuracy of guessing: 1 / num_values (passkey) or 1 / the values' range (mqar)."""
    if task == "passkey":
        return 1.0 / config.num_values
    return 1.0 / (config.mqar_vocab // 2)


def summary(config: RecallConfig, rows: list[dict]) -> str:
    lens = [str(n) for n in config.eval_lens]
    lines = [f"Train length {config.train_len}; d_model {config.d_model}, {config.layers} x "
             f"[conv, mixer], window/segment {config.window}, memory chunk "
             f"{config.chunk_size}; {config.num_train} training rows x {config.train.max_epochs} "
             f"epochs; accuracy over {config.num_eval} fresh rows per length."]
    for task in config.tasks:
        lines += ["", f"### {task} (chance {chance(config, task):.3g})", "",
                  "| model | " + " | ".join(f"L={n}" for n in lens) + " | paper |",
                  "|---|" + "---|" * (len(lens) + 1)]
        for row in rows:
            if row["task"] != task:
                continue
            name = row["model"]
            paper = []
            if task == "passkey" and name in PAPER_TABLE2:
                paper.append(f"T2 S-NIAH 16K: {PAPER_TABLE2[name]}")
            if name in PAPER_TABLE5:
                paper.append("T5 ppl / long-ctx: {} / {}".format(*PAPER_TABLE5[name]))
            cells = [f"{row['accuracy'][n]:.3f}" for n in lens]
            lines.append(f"| {MODELS[name].description} | " + " | ".join(cells) + " | "
                         + "; ".join(paper) + " |")
    return "\n".join(lines) + "\n"


def plot(config: RecallConfig, rows: list[dict], path: Path) -> None:
    from matplotlib import colormaps

    # One colour and marker per model in every panel (tab20's dark shades first, then its
    # light ones); markers shrink down the list so curves on top of each other stay visible.
    colours = colormaps["tab20"].colors
    fig, axes = panels(len(config.tasks), width=4.2, height=3.4)
    for ax, task in zip(axes, config.tasks, strict=True):
        for row in rows:
            if row["task"] != task:
                continue
            i = config.models.index(row["model"])
            lens = [int(n) for n in row["accuracy"]]
            style = "--" if row["model"].startswith("lmm_") else "-"
            ax.plot(lens, list(row["accuracy"].values()), style, label=row["model"],
                    color=colours[2 * i % 20 + 2 * i // 20], marker="osD^vP"[i % 6],
                    ms=max(8 - 0.4 * i, 3))
        ax.axhline(chance(config, task), color="grey", lw=0.8, ls=":", label="chance")
        ax.axvline(config.train_len, color="grey", lw=0.8)
        ax.set_xscale("log", base=2)
        ax.set_xticks(config.eval_lens, [str(n) for n in config.eval_lens])
        ax.set_xlabel(f"evaluation length (trained at {config.train_len})")
        ax.set_title(task)
        ax.set_ylim(-0.02, 1.02)
    axes[0].set_ylabel("accuracy")
    # One legend for every panel's models (some run on one task only), in the config's order.
    labelled = {}
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            labelled.setdefault(label, handle)
    order = [m for m in (*config.models, "chance") if m in labelled]
    axes[-1].legend([labelled[m] for m in order], order, fontsize=7, loc="center left",
                    bbox_to_anchor=(1.02, 0.5))
    save(fig, path)


def runs(config: RecallConfig) -> list[tuple[str, str]]:
    """The (task, model) pairs of the config that run: each model on its tasks."""
    return [(t, m) for t in config.tasks for m in config.models if t in MODELS[m].tasks]


def run_recall(config: RecallConfig) -> list[dict]:
    """Every (task, model) of the config: train, evaluate, then the table and figure."""
    for task in config.tasks:
        if task not in TASKS:
            raise ValueError(f"tasks: expected names from {TASKS}, got {task!r}")
    for model in config.models:
        if model not in MODELS:
            raise ValueError(f"models: expected names from {sorted(MODELS)}, got {model!r}")
    out = Path(config.out)
    save_config(config, out)
    rows = []
    for task, model in tqdm(runs(config), desc="recall runs",
                            disable=not config.train.progress):
        rows.append(run_one(config, task, model, out / "runs" / f"{task}-{model}"))
    with open(out / "results.jsonl", "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    (out / "summary.md").write_text(summary(config, rows))
    plot(config, rows, out / "figures" / "recall.png")
    return rows

