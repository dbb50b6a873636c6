"""Passkey retrieval at 64k tokens with ring attention over simulated devices (issue 26).

A small language model is trained on the passkey task (:func:`experiments.tasks.passkey`)
at ``train_len`` tokens on the trainer's data mesh, then evaluated, unchanged, at every
length of ``eval_lens`` with its attention run context-parallel: the sequence is sharded
over ``devices`` devices on a "seq" mesh axis and every attention layer is the causal,
zig-zag balanced ring of :func:`jattn.parallel.context_parallel`. On a CPU the devices are
host devices (``--xla_force_host_platform_device_count``), so this shows what the ring
computes and how much memory each device needs, not multi-chip speed.

Model: ``layers`` x [short causal convolution (kernel 3) -> global causal softmax attention]
and no position embedding: the convolution tells the token after the marker that it follows
the marker, attention finds it by content, and nothing depends on absolute position, so the
model runs at any length.

For each evaluation length it records the accuracy over ``num_eval`` fresh rows, the mean
time of one evaluation forward (compiled beforehand; rows of ``eval_batch`` at a time) and
the compiled per-device memory of that forward (temporaries + outputs, from XLA's memory
analysis). At the longest length it also compiles one training step (forward + backward,
batch 1) on the ring and times it, and compiles, without running, the same forward with
materialised attention (``implementation="xla"``) on one device, to show what the ring
avoids. Writes config.json, the training run (checkpoints, metrics.jsonl), results.json,
summary.md and figures/long_context.png under ``out``; a finished run is not retrained.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from tqdm import tqdm

from experiments.common.config import save_config
from experiments.common.lm import evaluate, task_functions
from experiments.common.plots import panels, save
from experiments.common.trainer import TrainConfig, fit, is_primary
from experiments.tasks.labels import label_positions
from experiments.tasks.passkey import passkey, passkey_vocab
from jattn.nn.transformer import TransformerLM
from jattn.parallel import context_parallel

TRAIN = TrainConfig(learning_rate=3e-3, batch_size=32, max_epochs=2, eval_batch_size=32,
                    early_stop_metric=None, checkpoint_every=100)


@dataclasses.dataclass(frozen=True)
class LongContextConfig:
    """Long-context passkey settings (every field is a command-line flag)."""

    devices: int = 8  # the "seq" axis of the evaluation mesh
    train_len: int = 256
    eval_lens: tuple[int, ...] = (256, 4096, 16384, 65536)
    d_model: int = 64
    num_heads: int = 2
    layers: int = 1  # [conv, attention] pairs
    num_values: int = 16  # candidate passkeys (chance 1 / num_values)
    num_noise: int = 32  # noise vocabulary
    num_train: int = 8192
    num_eval: int = 64  # fresh rows per evaluation length
    eval_batch: int = 4  # rows per evaluation forward
    train: TrainConfig = TRAIN  # its seed also draws the data and the initialisation
    out: str = "results/long_context/full"


PRESETS = {
    # about 3 min on 2 CPU cores
    "quick": LongContextConfig(eval_lens=(256, 2048, 8192), num_train=4096, num_eval=32,
                               out="results/long_context/quick"),
    "full": LongContextConfig(),
}


def build_model(config: LongContextConfig, implementation=None) -> TransformerLM:
    """layers x [ShortConv(3) -> causal attention], no position embedding, tied head."""
    attention = {"implementation": implementation}
    return TransformerLM(passkey_vocab(config.num_values, config.num_noise), config.d_model,
                         2 * config.layers, mixer=["base_conv", "attention"] * config.layers,
                         mixer_options=[{"kernel_size": 3}, attention] * config.layers,
                         num_heads=config.num_heads, max_length=max(config.eval_lens),
                         positions=None, rngs=nnx.Rngs(config.train.seed))


def make_rows(config: LongContextConfig, seq_len: int, num_examples: int,
              stream: int) -> dict[str, np.ndarray]:
    """Passkey rows at ``seq_len`` from seed stream ``stream`` (0: train, 1: validation,
    2 + i: the i-th evaluation length), as the trainer's dict."""
    seed = np.random.SeedSequence([config.train.seed, stream])
    x, y = passkey(seq_len=seq_len, num_examples=num_examples, num_values=config.num_values,
                   num_noise=config.num_noise, seed=seed)
    return {"inputs": x} | label_positions(y)


def check(config: LongContextConfig) -> None:
    """ValueError for lengths the ring cannot split or too few devices."""
    if jax.device_count() < config.devices:
        raise ValueError(f"devices: {config.devices} wanted, JAX sees {jax.device_count()} "
                         f"(start with XLA_FLAGS=--xla_force_host_platform_device_count="
                         f"{config.devices})")
    for length in config.eval_lens:  # the causal ring cuts the sequence into 2D chunks
        if length % (2 * config.devices):
            raise ValueError(f"eval_lens: {length} is not a multiple of 2 x devices = "
                             f"{2 * config.devices}")
    if config.num_eval % config.eval_batch:
        raise ValueError(f"num_eval: {config.num_eval} is not a multiple of eval_batch = "
                         f"{config.eval_batch}")


def _memory(compiled) -> int:
    """Temporaries + outputs of one device's compiled program, in bytes."""
    analysis = compiled.memory_analysis()
    return int(analysis.temp_size_in_bytes + analysis.output_size_in_bytes)


def evaluate_ring(config: LongContextConfig, params, mesh: Mesh, length: int,
                  stream: int) -> dict:
    """Accuracy, seconds per forward and per-device memory at ``length`` on the ring."""
    _, _, eval_fn = task_functions(build_model(config, context_parallel(mesh, "seq")))
    rows = make_rows(config, length, config.num_eval, stream)
    shardings = {k: NamedSharding(mesh, P(None, "seq") if k == "inputs" else P())
                 for k in rows}
    step = jax.jit(eval_fn, in_shardings=(NamedSharding(mesh, P()), shardings))
    batch_shape = {k: jax.ShapeDtypeStruct((config.eval_batch, *v.shape[1:]), v.dtype)
                   for k, v in rows.items()}
    compiled = step.lower(params, batch_shape).compile()
    correct, seconds = 0.0, []
    starts = range(0, config.num_eval, config.eval_batch)
    for start in tqdm(starts, desc=f"eval L={length}", leave=False,
                      disable=not config.train.progress):
        batch = jax.device_put({k: v[start:start + config.eval_batch]
                                for k, v in rows.items()}, shardings)
        begin = time.perf_counter()
        accuracy = np.asarray(compiled(params, batch)["accuracy"])
        seconds.append(time.perf_counter() - begin)
        correct += float(accuracy.sum())
    return {"length": length, "accuracy": correct / config.num_eval,
            "forward_seconds": float(np.median(seconds)),
            "forward_memory_bytes": _memory(compiled)}


def ring_train_step(config: LongContextConfig, params, mesh: Mesh, length: int) -> dict:
    """One training step's gradient (batch 1) at ``length`` on the ring: per-device
    compiled memory and the time of one call after compiling."""
    loss_fn = task_functions(build_model(config, context_parallel(mesh, "seq")))[1]
    rows = make_rows(config, length, 1, 1_000)
    shardings = {k: NamedSharding(mesh, P(None, "seq") if k == "inputs" else P())
                 for k in rows}
    batch = jax.device_put(rows | {"weight": np.ones(1, np.float32)},
                           shardings | {"weight": NamedSharding(mesh, P())})

    def grads(params, batch):
        return jax.grad(lambda p: loss_fn(p, batch, None)[0])(params)

    compiled = jax.jit(grads).lower(params, batch).compile()
    begin = time.perf_counter()
    jax.block_until_ready(compiled(params, batch))
    return {"length": length, "train_step_seconds": time.perf_counter() - begin,
            "train_step_memory_bytes": _memory(compiled)}


def materialised_memory(config: LongContextConfig, params, length: int) -> int:
    """Per-device memory of the evaluation forward with materialised attention on one
    device (compiled, never run)."""
    _, _, eval_fn = task_functions(build_model(config, "xla"))
    rows = make_rows(config, length, config.eval_batch, 1_001)
    shapes = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in rows.items()}
    return _memory(jax.jit(eval_fn).lower(params, shapes).compile())


def run_long_context(config: LongContextConfig) -> dict:
    """Train at ``train_len`` (or reuse the finished run), evaluate on the ring at every
    length, measure the longest; returns what results.json holds."""
    check(config)
    out = Path(config.out)
    save_config(config, out)
    done = out / "results.json"
    if done.exists():
        return json.loads(done.read_text())
    params, loss_fn, eval_fn = task_functions(build_model(config))
    params, trained = fit(params, loss_fn=loss_fn, eval_fn=eval_fn,
                          train=make_rows(config, config.train_len, config.num_train, 0),
                          valid=make_rows(config, config.train_len, config.num_eval, 1),
                          config=config.train, workdir=out / "run")
    mesh = Mesh(np.asarray(jax.devices()[:config.devices]), ("seq",))
    longest = max(config.eval_lens)
    result = {
        "devices": config.devices, "platform": jax.devices()[0].platform,
        "jax": jax.__version__, "train_steps": trained.step,
        "train_seconds": trained.seconds,
        "train_len_accuracy_one_device": evaluate(
            eval_fn, params, make_rows(config, config.train_len, config.num_eval, 2),
            config.eval_batch),
        "eval": [evaluate_ring(config, params, mesh, length, 2 + i)
                 for i, length in enumerate(config.eval_lens)],
        "train_step": ring_train_step(config, params, mesh, longest),
        "materialised_forward_memory_bytes": materialised_memory(config, params, longest),
        "materialised_logits_bytes": (config.eval_batch * config.num_heads * longest ** 2
                                      * 4 * config.layers),
    }
    if is_primary():
        done.write_text(json.dumps(result, indent=1))
        (out / "summary.md").write_text(summary(config, result))
        plot(config, result, out / "figures" / "long_context.png")
    return result


def _mib(n: int) -> str:
    return f"{n / 2**20:,.1f} MiB"


def summary(config: LongContextConfig, result: dict) -> str:
    chance = 1 / config.num_values
    longest = max(config.eval_lens)
    step = result["train_step"]
    lines = [
        f"# Passkey at long context on the ring ({result['devices']} {result['platform']} "
        f"devices, JAX {result['jax']})",
        "",
        f"Trained at {config.train_len} tokens ({result['train_steps']} steps, "
        f"{result['train_seconds']:.0f} s); {config.layers} x [conv(3), causal attention], "
        f"d_model {config.d_model}, {config.num_heads} heads, no position embedding. "
        f"Accuracy over {config.num_eval} fresh rows per length (chance {chance:.3g}); "
        f"forward of {config.eval_batch} rows, per-device compiled memory (temporaries + "
        f"outputs).",
        "",
        "| tokens | accuracy | forward time | per-device memory |",
        "|---:|---:|---:|---:|",
    ]
    for row in result["eval"]:
        lines.append(f"| {row['length']:,} | {row['accuracy']:.3f} | "
                     f"{row['forward_seconds']:.2f} s | {_mib(row['forward_memory_bytes'])} |")
    lines += [
        "",
        f"At {config.train_len} tokens on one device, without the ring: accuracy "
        f"{result['train_len_accuracy_one_device']:.3f}.",
        "",
        f"At {longest:,} tokens: one training step (batch 1, forward + backward) on the ring "
        f"took {step['train_step_seconds']:.1f} s with {_mib(step['train_step_memory_bytes'])} "
        f"per device. The same forward with materialised attention on one device compiles to "
        f"{_mib(result['materialised_forward_memory_bytes'])} "
        f"(its [B, N, T, T] float32 logits alone: {_mib(result['materialised_logits_bytes'])}).",
    ]
    return "\n".join(lines) + "\n"


def plot(config: LongContextConfig, result: dict, path: Path) -> None:
    fig, (acc, mem) = panels(2, width=4.0, height=3.2, sharey=False)
    lens = [row["length"] for row in result["eval"]]
    acc.plot(lens, [row["accuracy"] for row in result["eval"]], "o-", label="ring")
    acc.axhline(1 / config.num_values, color="grey", lw=0.8, ls=":", label="chance")
    acc.axvline(config.train_len, color="grey", lw=0.8)
    acc.set_ylim(-0.02, 1.02)
    acc.set_ylabel("passkey accuracy")
    acc.legend(fontsize=8, loc="center right")
    mem.plot(lens, [row["forward_memory_bytes"] / 2**20 for row in result["eval"]], "o-",
             label=f"ring, per device ({config.devices})")
    mem.plot([max(lens)], [result["materialised_forward_memory_bytes"] / 2**20], "s",
             color="C3", label="materialised, one device")
    mem.set_yscale("log")
    mem.set_ylabel("forward memory (MiB)")
    mem.legend(fontsize=8)
    for ax in (acc, mem):
        ax.set_xscale("log", base=2)
        ax.set_xlabel(f"tokens (trained at {config.train_len})")
    save(fig, path)
