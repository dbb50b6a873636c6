"""Training throughput of the figure-2 MQAR model per mixer, against the original's speed.

    python -m experiments.benchmarks.mqar_throughput --preset quick   # d_model 64, 2 mixers
    python -m experiments.benchmarks.mqar_throughput --preset full    # the issue's grid

One training step = forward, backward and the AdamW update of the trainer
(``experiments.common.trainer.make_train_step``), on one batch of MQAR rows at L=128,
kv=8, V=8192, batch 512, float32: compiled ahead of time, then the median of ``repeats``
timed steps. Three variants run in this process:

* ``ours``: the LM head only at the supervised positions (exact for loss and accuracy), on
  unsharded arrays (one device);
* ``trainer mesh``: the same step as the trainer runs it: the batch sharded over the
  "data" mesh of the host devices the CLI asks for
  (``experiments.common.trainer.use_host_devices``: one per core, unless XLA_FLAGS sets a
  count), the state replicated;
* ``full head``: the head and softmax at every position with -100 ignored, as the original
  computes it; the same model otherwise, unsharded.

The original PyTorch implementation is timed side by side when ``--original-python`` (a
Python with PyTorch, einops, pydantic, torchvision) and ``--original-path`` (a checkout of
HazyResearch/zoology at dbcb60d) are given: right after our step for the same (mixer,
d_model), :mod:`experiments.benchmarks.original_zoology_step` runs in that Python and times
the original's own model and training step (2 threads, ``original_warmup`` steps, then the
median of ``original_repeats``). Without them, the ratio is against the original's speed
from ../shared/notes/zoology.md (same config, a machine like this one, run-to-run spread up
to 1.9x).
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
from pathlib import Path

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec
from tqdm import tqdm

from experiments.benchmarks.measure import measure
from experiments.common.config import parse_config, save_config
from experiments.common.trainer import (
    data_mesh,
    initial_state,
    make_train_step,
    use_host_devices,
)
from experiments.tasks import mqar
from experiments.tasks.labels import IGNORE, label_positions
from experiments.zoology.run import RunConfig, RunSettings, build_model, task_functions

# Seconds per training step of the original (notes/zoology.md), by (mixer, d_model).
ORIGINAL_SECONDS = {("attention", 64): 9.4, ("attention", 128): 14.2,
                    ("base_conv", 64): 7.3, ("base_conv", 128): 13.8}  # BaseConv: fastest run


@dataclasses.dataclass(frozen=True)
class Config:
    mixers: tuple[str, ...] = ("attention", "base_conv", "hyena", "mamba")
    d_models: tuple[int, ...] = (64, 128)
    seq_len: int = 128
    num_kv_pairs: int = 8
    batch_size: int = 512
    vocab_size: int = 8192
    repeats: int = 10
    full_head: bool = True
    original_python: str = ""  # a Python with PyTorch: time the original side by side
    original_path: str = ""  # a HazyResearch/zoology checkout (dbcb60d)
    original_warmup: int = 3
    original_repeats: int = 10
    out: str = "results/mqar_throughput"


PRESETS = {
    "quick": Config(mixers=("attention", "base_conv"), d_models=(64,), repeats=3),
    "full": Config(),
}


def _full_head_loss(model):
    """The original's loss: logits at every position, -100 ignored."""
    from flax import nnx

    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def loss_fn(params, batch, rng):
        logits = nnx.merge(graphdef, params, rest)(batch["inputs"], dropout_rng=rng)
        labels = batch["labels"]
        mask = (labels != IGNORE) * batch["weight"][:, None]
        ce = optax.softmax_cross_entropy_with_integer_labels(
            logits.astype(jnp.float32), jnp.where(labels == IGNORE, 0, labels))
        return (ce * mask).sum(), mask.sum()

    return params, loss_fn


def run(config: Config) -> list[dict]:
    inputs, labels = mqar.mqar(vocab_size=config.vocab_size, input_seq_len=config.seq_len,
                               num_kv_pairs=config.num_kv_pairs,
                               num_examples=config.batch_size, seed=0)
    batch = {"inputs": jnp.asarray(inputs), "labels": jnp.asarray(labels),
             "weight": jnp.ones(config.batch_size)}
    batch |= {k: jnp.asarray(v) for k, v in label_positions(labels).items()}
    tokens = config.batch_size * config.seq_len
    mesh = data_mesh(config.batch_size)
    sharded = jax.device_put(batch, NamedSharding(mesh, PartitionSpec("data")))
    replicated = NamedSharding(mesh, PartitionSpec())
    rows = []
    cases = [(m, d) for m in config.mixers for d in config.d_models]
    for mixer, d in tqdm(cases, desc="mixers"):
        run_config = RunConfig(mixer=mixer, seq_len=config.seq_len,
                               num_kv_pairs=config.num_kv_pairs, d_model=d,
                               learning_rate=1e-3, batch_size=config.batch_size,
                               settings=RunSettings(vocab_size=config.vocab_size))
        model = build_model(run_config)
        variants = {"ours": task_functions(model)[:2]}
        if config.full_head:
            variants["full head"] = _full_head_loss(model)
        row = {"mixer": mixer, "d_model": d, "devices": mesh.devices.size}
        for name, (params, loss_fn) in variants.items():
            tx = optax.adamw(1e-3, weight_decay=0.1)
            step, state = make_train_step(loss_fn, tx, seed=0), initial_state(params, tx)
            runs = {name: (state, batch)}
            if name == "ours":
                runs["trainer mesh"] = (jax.device_put(state, replicated), sharded)
            for label, args in runs.items():
                m = measure(step, *args, repeats=config.repeats, single_run_above_s=60.0)
                row[label] = {"seconds_per_step": m.seconds, "runs": m.runs, "note": m.note,
                              "tokens_per_second": tokens / m.seconds if m.seconds else None,
                              "memory_mib": m.memory_bytes / 2**20}
        # The notes' numbers are for the default shape and vocabulary only.
        notes_shape = all(getattr(config, f) == getattr(Config, f)
                          for f in ("seq_len", "num_kv_pairs", "batch_size", "vocab_size"))
        original = ORIGINAL_SECONDS.get((mixer, d)) if notes_shape else None
        row["original_source"] = "notes"
        if config.original_python and mixer in ORIGINAL_MIXERS:
            original = time_original(config, mixer, d)
            row["original_source"] = "measured"
        row["original_seconds_per_step"] = original
        for key, label in (("speedup_vs_original", "ours"),
                           ("trainer_mesh_speedup_vs_original", "trainer mesh")):
            ours = row[label]["seconds_per_step"]
            row[key] = original / ours if original and ours else None
        rows.append(row)
    return rows


ORIGINAL_MIXERS = ("attention", "base_conv")  # what original_zoology_step builds


def time_original(config: Config, mixer: str, d_model: int) -> float:
    """Median seconds per training step of the original PyTorch model, same config."""
    spec = {"mixer": mixer, "d_model": d_model, "seq_len": config.seq_len,
            "num_kv_pairs": config.num_kv_pairs, "batch_size": config.batch_size,
            "vocab_size": config.vocab_size, "warmup": config.original_warmup,
            "repeats": config.original_repeats}
    script = Path(__file__).with_name("original_zoology_step.py")
    done = subprocess.run([config.original_python, str(script), config.original_path,
                           json.dumps(spec)], capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])["seconds_per_step"]


def _seconds(cell: dict | None) -> str:
    if cell is None:
        return "—"
    if cell["seconds_per_step"] is None:
        return f"not run (needs {cell['memory_mib'] / 1024:.0f} GiB)"
    return f"{cell['seconds_per_step']:.3f}"


def _tokens(cell: dict) -> str:
    return "—" if cell["tokens_per_second"] is None else f"{cell['tokens_per_second']:,.0f}"


def markdown(rows: list[dict], config: Config) -> str:
    devices = rows[0]["devices"] if rows else 1
    lines = [f"MQAR training step, L={config.seq_len}, kv={config.num_kv_pairs}, "
             f"batch {config.batch_size}, V={config.vocab_size}, float32; median of "
             f"{config.repeats} steps after compilation; the trainer's mesh: the batch over "
             f"{devices} host device(s).", "",
             "| mixer | d_model | ours s/step (1 device) | trainer mesh s/step | speed-up | "
             "trainer mesh tokens/s | full head s/step | original s/step | ours (1 device) vs "
             "original | trainer mesh vs original |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        one, mesh = r["ours"]["seconds_per_step"], r["trainer mesh"]["seconds_per_step"]
        lines.append(f"| {r['mixer']} | {r['d_model']} | {_seconds(r['ours'])} | "
                     f"{_seconds(r['trainer mesh'])} | "
                     + (f"{one / mesh:.2f}x | " if one and mesh else "— | ")
                     + f"{_tokens(r['trainer mesh'])} | {_seconds(r.get('full head'))} | "
                     + (f"{r['original_seconds_per_step']:.2f} ({r['original_source']}) | "
                        if r["original_seconds_per_step"] else "— | ")
                     + " | ".join(f"{r[key]:.1f}x" if r[key] else "—" for key in (
                         "speedup_vs_original", "trainer_mesh_speedup_vs_original")) + " |")
    return "\n".join(lines) + "\n"


def write(rows: list[dict], config: Config, out: Path) -> str:
    (out / "results.json").write_text(json.dumps(rows, indent=1))
    table = markdown(rows, config)
    (out / "results.md").write_text(table)
    return table


def main(argv=None) -> None:
    config = parse_config(PRESETS, argv, description=__doc__)
    use_host_devices()  # before JAX starts: the trainer's mesh as the CLIs run it
    out = Path(config.out)
    save_config(config, out)
    print(write(run(config), config, out))


if __name__ == "__main__":
    main()
