"""A resumable, data-parallel training loop shared by the experiments.

What it guarantees:

* **Exact resume.** Everything a step depends on is either in the checkpoint (parameters,
  optimizer state, step, the running epoch loss) or a pure function of (seed, step): the
  batch (the epoch's shuffle of fixed arrays, or a :class:`BatchSource`'s batch of that
  step) and the dropout key. A run interrupted at any point and restarted from
  its last checkpoint therefore computes the same steps again and ends bit for bit where an
  uninterrupted run ends (on one device; XLA's CPU reductions are deterministic).
* **Checkpoints** with orbax every ``checkpoint_every`` steps and at the end; killing a run
  loses at most the steps since the last one. A finished run writes ``result.json`` and is
  not trained again.
* **Data parallel** over every local device: the batch is sharded over a mesh axis "data",
  parameters are replicated, gradients are reduced by XLA. The same code runs on one CPU,
  simulated CPU devices, a GPU or a TPU slice; multi-host runs call
  :func:`initialize_distributed` first and each process feeds its slice of the batch.
* **Batches** are rows of fixed arrays, shuffled every epoch (:class:`ShuffledRows`), or
  whatever a :class:`BatchSource` gives for each step, e.g. batches whose [rows, length]
  changes from step to step (variable sequence length training,
  :class:`experiments.common.decomposition.CurriculumBatches`); jit compiles the step once
  per distinct shape.
* **Logs**: ``metrics.jsonl`` (one record per ``log_every`` steps and one per epoch, with the
  validation metrics), a tqdm progress bar.

Recipe (Zoology's): AdamW with decoupled weight decay on all parameters, default betas; the
learning rate follows a cosine from its peak to 0 over ``max_epochs``, changed once per
epoch; no warm-up, no clipping; early stop once a validation metric exceeds a threshold.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from tqdm import tqdm

from jattn.parallel import context_parallel

Batch = Mapping[str, Any]
# loss_fn(params, batch, rng) -> (sum of the loss over the batch's items, number of items).
# The batch carries "weight" [B]: 1 for real rows, 0 for the padding of a last short batch;
# a loss_fn must give padded rows neither loss nor count.
LossFn = Callable[[Any, Batch, jax.Array], tuple[jax.Array, jax.Array]]
# eval_fn(params, batch) -> {name: per-row values [B]}; the trainer averages over real rows.
EvalFn = Callable[[Any, Batch], Mapping[str, jax.Array]]


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation and bookkeeping settings of one run. An experiment nests it in its own
    config rather than copying its fields; a sweep leaves ``learning_rate`` and ``batch_size``
    None and each run of its grid sets them (:func:`fit` needs the learning rate, and the
    batch size to batch fixed arrays; with a :class:`BatchSource`, the source sets the
    batches and ``eval_batch_size`` the evaluation's)."""

    learning_rate: float | None = None
    batch_size: int | None = None
    max_epochs: int = 1
    weight_decay: float = 0.1
    early_stop_metric: str | None = "accuracy"
    early_stop_threshold: float = 0.99
    eval_batch_size: int | None = None  # default: batch_size
    checkpoint_every: int = 200  # steps
    log_every: int = 50  # steps
    seed: int = 0
    progress: bool = True
    mesh: str | None = None  # "data=2,seq=4": axes and sizes (make_mesh); None: data only


@dataclass(frozen=True)
class TrainResult:
    """What a finished run reports (also written to result.json)."""

    step: int
    epoch: int
    stopped_early: bool
    metrics: dict[str, float]  # the last validation metrics
    train_loss: float  # mean loss of the last epoch
    seconds: float  # wall time of this process's training (not of earlier, resumed parts)


def initialize_distributed() -> None:
    """``jax.distributed.initialize()`` when launched as one of several processes.

    Detects SLURM with more than one task, multi-host TPU slices, and a launch by hand:
    JAX_COORDINATOR_ADDRESS (host:port of process 0) with JAX_NUM_PROCESSES and
    JAX_PROCESS_ID. CPU processes exchange collectives through gloo. On a single process it
    does nothing. Call it before anything else touches JAX.
    """
    multi = ("JAX_COORDINATOR_ADDRESS" in os.environ
             or int(os.environ.get("SLURM_NTASKS", "1")) > 1
             or "," in os.environ.get("TPU_WORKER_HOSTNAMES", ""))
    if not multi or jax.distributed.is_initialized():
        return
    if jax.config.jax_cpu_collectives_implementation in (None, "", "none"):
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    by_hand = {}
    if "JAX_NUM_PROCESSES" in os.environ:
        by_hand = {"num_processes": int(os.environ["JAX_NUM_PROCESSES"]),
                   "process_id": int(os.environ["JAX_PROCESS_ID"])}
    jax.distributed.initialize(**by_hand)


MAX_HOST_DEVICES = 8
"""The most host devices :func:`use_host_devices` asks for (per-device batch shards get
small and per-device overhead grows past a few per core)."""


def use_host_devices(count: int | None = None) -> int | None:
    """Split this CPU into ``count`` host devices (default: the cores this process may use,
    at most :data:`MAX_HOST_DEVICES`) so the trainer's data mesh runs batch shards in
    parallel: XLA:CPU runs a batched matmul on one thread, so one device leaves cores idle.

    Sets ``--xla_force_host_platform_device_count`` in XLA_FLAGS, which JAX reads when it
    starts its backends; call it before anything runs on JAX. It does nothing (and returns
    None) when XLA_FLAGS already sets a device count (the user's choice), when launched as
    one of several processes, when JAX has started, or for one core. It affects the CPU
    backend only: on a GPU or TPU the mesh holds the accelerators as before.
    """
    flags = os.environ.get("XLA_FLAGS", "")
    several = any(name in os.environ for name in ("JAX_COORDINATOR_ADDRESS",
                                                  "SLURM_NTASKS", "TPU_WORKER_HOSTNAMES"))
    if "xla_force_host_platform_device_count" in flags or several or _backends_started():
        return None
    if count is None:
        count = min(len(os.sched_getaffinity(0)), MAX_HOST_DEVICES)
    if count <= 1:
        return None
    os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={count}".strip()
    return count


def _backends_started() -> bool:
    try:
        from jax._src import xla_bridge

        return xla_bridge.backends_are_initialized()
    except (ImportError, AttributeError):  # a JAX without it: assume started, change nothing
        return True


def is_primary() -> bool:
    """True in process 0, the one that writes logs and results (every process writes its
    share of a checkpoint)."""
    return jax.process_index() == 0


def data_mesh(*batch_sizes: int) -> Mesh:
    """A one-axis mesh "data" over every device of every process; on one process, over the
    most devices that divide every batch size given (a batch of 12 on 8 host devices runs
    on 6 of them)."""
    devices = jax.devices()
    if jax.process_count() == 1 and batch_sizes:
        count = max(n for n in range(1, len(devices) + 1)
                    if all(b % n == 0 for b in batch_sizes))
        devices = devices[:count]
    return Mesh(np.asarray(devices), ("data",))


def make_mesh(spec: str | None, *batch_sizes: int) -> Mesh:
    """The mesh of a ``TrainConfig.mesh`` spec: "data=2,seq=4" puts the devices on a
    (data, seq) grid (the batch is sharded over "data"; models given the mesh shard their
    attention over "seq", :func:`jattn.parallel.context_parallel`). The sizes must multiply
    to the device count; None is :func:`data_mesh` (for ``batch_sizes``).

    >>> make_mesh(None).axis_names
    ('data',)
    """
    if spec is None:
        return data_mesh(*batch_sizes)
    try:
        axes = {name.strip(): int(size) for name, size in
                (part.split("=") for part in spec.split(","))}
    except ValueError:
        raise ValueError(f"mesh: expected 'axis=size,...' such as 'data=2,seq=4', got "
                         f"{spec!r}") from None
    if "data" not in axes:
        raise ValueError(f"mesh: needs a 'data' axis, got {spec!r}")
    if math.prod(axes.values()) != jax.device_count():
        raise ValueError(f"mesh: {spec!r} has {math.prod(axes.values())} devices, JAX sees "
                         f"{jax.device_count()}")
    devices = np.asarray(jax.devices()).reshape(tuple(axes.values()))
    return Mesh(devices, tuple(axes))


def sequence_parallel(mesh: Mesh | None):
    """The attention implementation for models on ``mesh``: context parallelism over its
    "seq" axis (batch over "data"), or None (the default) without one."""
    if mesh is None or mesh.shape.get("seq", 1) == 1:
        return None
    return context_parallel(mesh, "seq", batch_axis="data")


def cosine_per_epoch(peak: float, steps_per_epoch: int, max_epochs: int) -> optax.Schedule:
    """lr(step) = peak * (1 + cos(pi * epoch / max_epochs)) / 2, epoch = step // steps_per_epoch
    (PyTorch's CosineAnnealingLR stepped once per epoch)."""

    def schedule(step):
        epoch = step // steps_per_epoch
        return peak * 0.5 * (1.0 + jnp.cos(jnp.pi * epoch / max_epochs))

    return schedule


def _num_rows(data: Mapping[str, np.ndarray], name: str) -> int:
    sizes = {k: len(v) for k, v in data.items()}
    if len(set(sizes.values())) != 1 or not sizes:
        raise ValueError(f"{name}: expected arrays with one common number of rows, got {sizes}")
    return next(iter(sizes.values()))


class BatchSource(Protocol):
    """What :func:`fit` trains on when the batches are not shuffled rows of fixed arrays, e.g.
    when their shape changes from step to step.

    ``source(step)`` is the global batch of that step: host arrays with one common number of
    rows, optionally with "weight" [rows] (default: all 1; see :data:`LossFn`). It must be a
    pure function of the step (and of what the source was built from), so a resumed run
    computes the same batches. ``steps_per_epoch`` sets the epochs (the learning rate,
    evaluation and the end follow them); ``batch_sizes`` holds every number of rows a batch
    can have (the default mesh divides them all).
    """

    steps_per_epoch: int
    batch_sizes: tuple[int, ...]

    def __call__(self, step: int) -> Mapping[str, np.ndarray]: ...


def _rows(data: Mapping[str, np.ndarray], indices: np.ndarray, batch_size: int) -> dict:
    """The rows ``indices`` of ``data`` as a batch of ``batch_size`` rows: a short batch is
    padded (with row 0, weight 0) to keep one compiled shape."""
    real = len(indices)
    padded = np.concatenate([indices, np.zeros(batch_size - real, indices.dtype)])
    weight = (np.arange(batch_size) < real).astype(np.float32)
    return {k: np.asarray(v)[padded] for k, v in data.items()} | {"weight": weight}


class ShuffledRows:
    """The batch source of fixed arrays: each epoch a fresh permutation of the rows (from
    ``np.random.default_rng([seed, epoch])``) cut into batches of ``batch_size``, the last
    one padded (:func:`_rows`)."""

    def __init__(self, data: Mapping[str, np.ndarray], batch_size: int, seed: int):
        self.data, self.batch_size, self.seed = data, batch_size, seed
        self.num_rows = _num_rows(data, "train")
        self.steps_per_epoch = math.ceil(self.num_rows / batch_size)
        self.batch_sizes = (batch_size,)
        self._epoch, self._order = -1, None

    def __call__(self, step: int) -> dict:
        epoch, position = divmod(step, self.steps_per_epoch)
        if epoch != self._epoch:
            self._epoch = epoch
            self._order = np.random.default_rng([self.seed, epoch]).permutation(self.num_rows)
        size = self.batch_size
        return _rows(self.data, self._order[position * size:(position + 1) * size], size)


class _Feeder:
    """A host batch -> a global batch sharded over "data" (each process gives its slice)."""

    def __init__(self, mesh: Mesh):
        self.sharding = NamedSharding(mesh, PartitionSpec("data"))
        self.devices = mesh.shape["data"]

    def check(self, name: str, batch_size: int) -> None:
        if batch_size % self.devices:
            raise ValueError(f"{name}: must be a multiple of the {self.devices} devices of "
                             f"the mesh's data axis, got {batch_size}")

    def __call__(self, host: Mapping[str, np.ndarray]) -> dict:
        size = _num_rows(host, "batch")
        self.check("batch", size)
        host = {"weight": np.ones(size, np.float32), **host}
        per_process = size // jax.process_count()
        rows = slice(jax.process_index() * per_process, (jax.process_index() + 1) * per_process)
        return {k: jax.make_array_from_process_local_data(self.sharding, np.asarray(v)[rows])
                for k, v in host.items()}


class _Log:
    """metrics.jsonl, cut back to ``step`` on resume so a resumed log reads as one run."""

    def __init__(self, path: Path, resume_step: int):
        self.path = path if is_primary() else None  # other processes log nothing
        if self.path is None:
            return
        kept = []
        if path.exists():
            kept = [line for line in path.read_text().splitlines()
                    if line and json.loads(line)["step"] <= resume_step]
        path.write_text("".join(line + "\n" for line in kept))

    def write(self, record: dict) -> None:
        if self.path is not None:
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")


def fit(params, *, loss_fn: LossFn, eval_fn: EvalFn,
        train: Mapping[str, np.ndarray] | BatchSource, valid: Mapping[str, np.ndarray],
        config: TrainConfig, workdir: str | os.PathLike,
        mesh: Mesh | None = None, stop_after_steps: int | None = None
        ) -> tuple[Any, TrainResult | None]:
    """Train ``params`` (any pytree, e.g. an ``nnx.State``), resuming from ``workdir``.

    Args:
        params: initial parameters (ignored when ``workdir`` holds a checkpoint).
        loss_fn, eval_fn: see :data:`LossFn` and :data:`EvalFn`.
        train: a dict of host arrays with one row per example (batched by
            :class:`ShuffledRows`), or a :class:`BatchSource`.
        valid: a dict of host arrays with one row per example.
        config: a :class:`TrainConfig`.
        workdir: checkpoints/, metrics.jsonl and result.json go here.
        mesh: a mesh with a "data" axis; default ``make_mesh(config.mesh)``.
        stop_after_steps: return (without saving) once this global step is reached, as if the
            process had been killed there; for tests of resumption.

    Returns:
        (params, result); result is None when stopped by ``stop_after_steps``.
    """
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    _num_rows(valid, "valid")
    arrays = isinstance(train, Mapping)
    for name in ("learning_rate", "batch_size") if arrays else ("learning_rate",):
        if getattr(config, name) is None:
            raise ValueError(f"config.{name}: needed to train, got None")
    eval_batch_size = config.eval_batch_size or config.batch_size
    if eval_batch_size is None:
        raise ValueError("config.eval_batch_size: needed to evaluate (a batch source sets no "
                         "batch_size), got None")
    source = ShuffledRows(train, config.batch_size, config.seed) if arrays else train
    steps_per_epoch = source.steps_per_epoch
    if steps_per_epoch < 1:
        raise ValueError(f"train: expected at least one step per epoch, got {steps_per_epoch}")
    mesh = mesh or make_mesh(config.mesh, *source.batch_sizes, eval_batch_size)
    total_steps = steps_per_epoch * config.max_epochs
    feed = _Feeder(mesh)
    for size in source.batch_sizes:
        feed.check("batch_size", size)
    feed.check("eval_batch_size", eval_batch_size)
    replicated = NamedSharding(mesh, PartitionSpec())

    schedule = cosine_per_epoch(config.learning_rate, steps_per_epoch, config.max_epochs)
    tx = optax.adamw(schedule, weight_decay=config.weight_decay)
    state = initial_state(params, tx)
    manager = ocp.CheckpointManager(
        (workdir / "checkpoints").absolute(),
        options=ocp.CheckpointManagerOptions(max_to_keep=2, create=True))
    if manager.latest_step() is not None:
        abstract = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated), state)
        state = manager.restore(manager.latest_step(), args=ocp.args.StandardRestore(abstract))
        print(f"{workdir}: resuming at step {int(state['step'])}", file=sys.stderr)
    state = jax.device_put(state, replicated)
    step = int(state["step"])
    result_path = workdir / "result.json"
    if result_path.exists():
        manager.close()
        return state["params"], TrainResult(**json.loads(result_path.read_text()))
    if is_primary():
        (workdir / "train_config.json").write_text(json.dumps(asdict(config), indent=1))
    log = _Log(workdir / "metrics.jsonl", step)

    train_step = jax.jit(make_train_step(loss_fn, tx, config.seed))

    @jax.jit
    def eval_step(params, batch):
        values = eval_fn(params, batch)
        return {k: (v * batch["weight"]).sum() for k, v in values.items()}

    def evaluate(params) -> dict[str, float]:
        n = _num_rows(valid, "valid")
        sums: dict[str, float] = {}
        for start in range(0, n, eval_batch_size):
            idx = np.arange(start, min(start + eval_batch_size, n))
            for k, v in eval_step(params, feed(_rows(valid, idx, eval_batch_size))).items():
                sums[k] = sums.get(k, 0.0) + float(v)
        return {k: v / n for k, v in sums.items()}

    def save(state, *, force: bool = False) -> None:
        manager.save(int(state["step"]), args=ocp.args.StandardSave(state), force=force)

    started = time.perf_counter()
    bar = tqdm(total=total_steps, initial=step, disable=not (config.progress and is_primary()),
               unit="step",
               dynamic_ncols=True, desc=workdir.name)
    result = None
    # A host copy: syncing on the device state each step would stall the asynchronous
    # dispatch of the next step.
    done = bool(state["done"])
    while step < total_steps and not done:
        epoch = step // steps_per_epoch
        before = (float(state["loss_sum"]), float(state["loss_count"])) \
            if (step + 1) % config.log_every == 0 else None
        state = train_step(state, feed(source(step)))
        step += 1
        bar.update(1)
        if before is not None:
            loss = ((float(state["loss_sum"]) - before[0])
                    / max(float(state["loss_count"]) - before[1], 1.0))
            bar.set_postfix(loss=f"{loss:.4f}")
            log.write({"step": step, "epoch": epoch, "train_loss": loss,
                       "lr": float(schedule(step - 1)), "time": time.time()})
        if step == stop_after_steps:
            bar.close()
            manager.wait_until_finished()
            manager.close()
            return state["params"], None
        if step % steps_per_epoch == 0:
            metrics = evaluate(state["params"])
            train_loss = float(state["loss_sum"]) / max(float(state["loss_count"]), 1.0)
            log.write({"step": step, "epoch": epoch, "train_loss_epoch": train_loss,
                       **{f"valid_{k}": v for k, v in metrics.items()},
                       "time": time.time()})
            bar.set_postfix({"loss": f"{train_loss:.4f}",
                             **{k: f"{v:.3f}" for k, v in metrics.items()}})
            stop = (config.early_stop_metric is not None
                    and metrics.get(config.early_stop_metric, -math.inf)
                    > config.early_stop_threshold)
            done = stop or step == total_steps
            # Replicated over the mesh like the rest of the state (a multi-process
            # checkpoint takes global arrays only).
            state = {**state, **jax.device_put(
                {"loss_sum": np.float32(0), "loss_count": np.float32(0),
                 "done": np.bool_(done)}, replicated)}
            if done:
                result = TrainResult(step=step, epoch=epoch + 1, stopped_early=stop,
                                     metrics=metrics, train_loss=train_loss,
                                     seconds=time.perf_counter() - started)
                save(state, force=True)
                break
        if step % config.checkpoint_every == 0:
            save(state)
    bar.close()
    if result is None:  # resumed from the final checkpoint of a run killed before the end
        metrics = evaluate(state["params"])
        result = TrainResult(step=step, epoch=math.ceil(step / steps_per_epoch),
                             stopped_early=step < total_steps, metrics=metrics,
                             train_loss=math.nan, seconds=0.0)
    manager.wait_until_finished()
    manager.close()
    if is_primary():
        result_path.write_text(json.dumps(asdict(result), indent=1))
    return state["params"], result


def make_train_step(loss_fn: LossFn, tx: optax.GradientTransformation, seed: int):
    """state -> state after one optimizer step on ``batch`` (not jitted).

    ``state`` holds params, opt_state, step, the epoch's loss sum/count and ``done``; the
    dropout key is ``fold_in(key(seed), step)``, so it needs no saving.
    """

    def train_step(state, batch):
        rng = jax.random.fold_in(jax.random.key(seed), state["step"])
        grad_fn = jax.value_and_grad(lambda p: _mean_loss(loss_fn(p, batch, rng)), has_aux=True)
        (_, (loss_sum, count)), grads = grad_fn(state["params"])
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        return {"params": optax.apply_updates(state["params"], updates), "opt_state": opt_state,
                "step": state["step"] + 1, "loss_sum": state["loss_sum"] + loss_sum,
                "loss_count": state["loss_count"] + count, "done": state["done"]}

    return train_step


def initial_state(params, tx: optax.GradientTransformation) -> dict:
    """The training state before the first step."""
    # "done" marks the final checkpoint, so a run killed before result.json still ends.
    return {"params": params, "opt_state": tx.init(params), "step": jnp.int32(0),
            "loss_sum": jnp.float32(0), "loss_count": jnp.float32(0), "done": jnp.bool_(False)}


def _mean_loss(sum_and_count):
    loss_sum, count = sum_and_count
    return loss_sum / jnp.maximum(count, 1.0), (loss_sum, count)
