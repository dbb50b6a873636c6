"""The shared trainer: exact resume (fixed arrays, and batches whose shape changes from step
to step), simulated multi-device data parallelism, SIGKILL."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

from experiments.common.decomposition import (
    CurriculumBatches,
    Documents,
    decompose,
    pad_documents,
)
from experiments.common.lm import next_token_functions
from experiments.common.trainer import TrainConfig, cosine_per_epoch, fit
from experiments.zoology.run import RunConfig, RunSettings, train_run
from jattn.nn.transformer import TransformerLM
from tests.conftest import REPO

# 256 rows / batch 32 = 8 steps per epoch; attention so that dropout keys matter.
TINY = RunConfig(mixer="attention", seq_len=16, num_kv_pairs=2, d_model=16,
                 learning_rate=3e-3, batch_size=32, settings=RunSettings(
                     vocab_size=64, num_train=256, num_test=64,
                     train=TrainConfig(max_epochs=3, checkpoint_every=5, progress=False)))


def _with_training(config: RunConfig, **changes) -> RunConfig:
    settings = config.settings
    return dataclasses.replace(config, settings=dataclasses.replace(
        settings, train=dataclasses.replace(settings.train, **changes)))

# Trains a RunConfig given as JSON in argv[1] in the directory argv[2]; saves the parameters.
SCRIPT = """
import json, sys
from pathlib import Path
import jax, numpy as np
from experiments.zoology.run import RunConfig, train_run
params, _ = train_run(RunConfig.from_dict(json.loads(sys.argv[1])), Path(sys.argv[2]))
np.savez(Path(sys.argv[2]) / "params.npz", *jax.tree.leaves(params))
print("devices", jax.device_count())
"""


def _leaves(params):
    return [np.asarray(x) for x in jax.tree.leaves(params)]


def _log_without_times(workdir: Path) -> list[dict]:
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "time"} for r in records]


def _compile_cache(workdir: Path) -> dict[str, str]:
    """Environment for a persistent compilation cache beside ``workdir``: a restarted or
    repeated subprocess reuses the compiled programs of the one before (test time only)."""
    return {"JAX_COMPILATION_CACHE_DIR": str(workdir.parent / "xla_cache"),
            "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
            "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}


def _run_script(config: RunConfig, workdir: Path, devices: int = 1, **popen):
    env = dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu",
               XLA_FLAGS=f"{os.environ.get('XLA_FLAGS', '')} "
               f"--xla_force_host_platform_device_count={devices}", **_compile_cache(workdir))
    args = [sys.executable, "-c", SCRIPT, json.dumps(dataclasses.asdict(config)), str(workdir)]
    return subprocess.Popen(args, env=env, cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **popen)


def _saved(workdir: Path) -> list[np.ndarray]:
    with np.load(workdir / "params.npz") as f:
        return [f[k] for k in sorted(f.files, key=lambda k: int(k.split("_")[1]))]


def _checkpoint_steps(workdir: Path) -> list[int]:
    """Steps of the completed checkpoints (orbax renames a finished temporary directory)."""
    directory = workdir / "checkpoints"
    return [int(p.name) for p in directory.iterdir() if p.name.isdigit()] \
        if directory.exists() else []


def test_cosine_schedule_changes_once_per_epoch():
    schedule = cosine_per_epoch(1.0, steps_per_epoch=10, max_epochs=4)
    got = [float(schedule(s)) for s in (0, 9, 10, 19, 20, 30, 39)]
    want = [1.0, 1.0, (1 + np.cos(np.pi / 4)) / 2, (1 + np.cos(np.pi / 4)) / 2, 0.5,
            (1 + np.cos(3 * np.pi / 4)) / 2, (1 + np.cos(3 * np.pi / 4)) / 2]
    np.testing.assert_allclose(got, want, rtol=1e-6)


def _zoology_run(workdir: Path, stop: int | None = None):
    return train_run(TINY, workdir, stop_after_steps=stop)


def _variable_length_run(workdir: Path, stop: int | None = None):
    """A next-token LM on dataset decomposition batches of 32 tokens: documents of 4 and 8
    targets give 4 batches of each length an epoch (8 steps, 2 shapes) in the order of the
    grow_p2 curriculum, 2 cycles an epoch."""
    rng = np.random.default_rng(0)
    lengths = np.repeat([5, 9], [32, 16])
    train = Documents(rng.integers(0, 32, lengths.sum()).astype(np.int32), lengths)
    valid = Documents(rng.integers(0, 32, 20).astype(np.int32), np.array([4, 16]))
    source = CurriculumBatches(decompose(train, min_length=4, max_length=8),
                               tokens_per_step=32, num_cycles=2, seed=0)
    model = TransformerLM(32, 16, 1, num_heads=2, max_length=16, rngs=nnx.Rngs(0))
    params, loss_fn, eval_fn = next_token_functions(model)
    config = TrainConfig(learning_rate=3e-3, max_epochs=3, eval_batch_size=2,
                         early_stop_metric=None, checkpoint_every=5, progress=False)
    return fit(params, loss_fn=loss_fn, eval_fn=eval_fn, train=source,
               valid=pad_documents(valid, length=15), config=config, workdir=workdir,
               stop_after_steps=stop)


@pytest.mark.parametrize("train", [_zoology_run, _variable_length_run],
                         ids=["fixed_arrays", "variable_shapes"])
def test_resumed_run_equals_uninterrupted_bit_for_bit(tmp_path, train):
    full_params, full = train(tmp_path / "full")
    assert full is not None and full.step == 24 and full.epoch == 3
    for stop in (13, 16):  # mid-epoch, just after a checkpoint... and at an epoch boundary
        part = tmp_path / f"stopped{stop}"
        _, result = train(part, stop)
        assert result is None
        resumed_params, resumed = train(part)
        for a, b in zip(_leaves(full_params), _leaves(resumed_params), strict=True):
            np.testing.assert_array_equal(a, b)
        assert resumed.metrics == full.metrics and resumed.train_loss == full.train_loss
        assert _log_without_times(part) == _log_without_times(tmp_path / "full")
    # A finished run is not trained again: same result, read back.
    again_params, again = train(tmp_path / "full")
    assert again.metrics == full.metrics
    for a, b in zip(_leaves(full_params), _leaves(again_params), strict=True):
        np.testing.assert_array_equal(a, b)


def test_eight_simulated_devices_match_one(tmp_path):
    config = _with_training(TINY, max_epochs=2)
    runs = {n: _run_script(config, tmp_path / f"dev{n}", devices=n) for n in (1, 8)}
    for n, proc in runs.items():
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-3000:]
        assert f"devices {n}" in out
    for a, b in zip(_saved(tmp_path / "dev1"), _saved(tmp_path / "dev8"), strict=True):
        np.testing.assert_allclose(a, b, atol=2e-5, rtol=2e-4)


@pytest.mark.slow
def test_sigkill_loses_at_most_the_steps_since_the_last_checkpoint(tmp_path):
    # 320 steps, a checkpoint every 20.
    config = _with_training(TINY, max_epochs=40, checkpoint_every=20)
    workdir = tmp_path / "killed"
    proc = _run_script(config, workdir)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        if _checkpoint_steps(workdir) and max(_checkpoint_steps(workdir)) >= 40:
            break
        time.sleep(0.05)
    else:
        proc.kill()
        pytest.fail("no checkpoint appeared")
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    assert not (workdir / "result.json").exists()  # killed mid-way, not finished
    last = max(_checkpoint_steps(workdir))
    assert 40 <= last < 320
    restart = _run_script(config, workdir)
    _, err = restart.communicate(timeout=300)
    assert restart.returncode == 0, err[-3000:]
    assert f"resuming at step {last}" in err
    # The restarted run picked up from the last checkpoint and ended where an uninterrupted
    # run ends.
    reference = _run_script(config, tmp_path / "reference")
    _, err = reference.communicate(timeout=300)
    assert reference.returncode == 0, err[-3000:]
    for a, b in zip(_saved(workdir), _saved(tmp_path / "reference"), strict=True):
        np.testing.assert_array_equal(a, b)
    assert _log_without_times(workdir) == _log_without_times(tmp_path / "reference")


# One of several processes (jax.distributed over 127.0.0.1, CPU collectives through gloo):
# argv = config JSON, workdir, and optionally a step at which this process kills itself.
PROCESS_SCRIPT = """
import json, os, signal, sys
from pathlib import Path
from experiments.common.trainer import initialize_distributed
initialize_distributed()
import jax
from experiments.zoology.run import RunConfig, train_run
stop = int(sys.argv[3]) if len(sys.argv) > 3 else None
_, result = train_run(RunConfig.from_dict(json.loads(sys.argv[1])), Path(sys.argv[2]),
                      stop_after_steps=stop)
if result is None:  # killed at `stop`, before anything else is saved
    os.kill(os.getpid(), signal.SIGKILL)
print("processes", jax.process_count(), "devices", jax.device_count(), flush=True)
"""


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_processes(config: RunConfig, workdir: Path, kill_at: dict[int, int] | None = None):
    port = _free_port()
    procs = []
    for rank in range(2):
        env = dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu",
                   JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2",
                   JAX_PROCESS_ID=str(rank), **_compile_cache(workdir))
        env.pop("XLA_FLAGS", None)  # one CPU device per process
        args = [sys.executable, "-c", PROCESS_SCRIPT, json.dumps(dataclasses.asdict(config)),
                str(workdir)]
        if kill_at and rank in kill_at:
            args.append(str(kill_at[rank]))
        procs.append(subprocess.Popen(args, env=env, cwd=REPO, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    return procs


@pytest.mark.slow
def test_two_processes_train_like_one_and_resume_after_one_is_killed(tmp_path):
    """Two processes on this machine (one CPU device each, jax.distributed + gloo) train as
    one process does; process 1 killed at step 9, then both restarted, resume from the last
    checkpoint (step 5; orbax, multi-process save) and end with the same log as one
    process."""
    config = _with_training(TINY, log_every=1, max_epochs=2)
    workdir = tmp_path / "two"
    first, second = _run_processes(config, workdir, kill_at={1: 9})
    _, err = second.communicate(timeout=300)
    assert second.returncode == -signal.SIGKILL, err[-3000:]
    first.kill()  # left waiting for its peer in the next step's collective
    first.communicate()
    assert not (workdir / "result.json").exists()
    last = max(_checkpoint_steps(workdir))
    assert last == 5, _checkpoint_steps(workdir)
    restarted = _run_processes(config, workdir)
    for proc in restarted:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-3000:]
        assert "processes 2 devices 2" in out
        assert f"resuming at step {last}" in err
    _, reference = train_run(config, tmp_path / "one")  # this process, one device
    two = json.loads((workdir / "result.json").read_text())
    assert two["step"] == reference.step == 16
    np.testing.assert_allclose(two["train_loss"], reference.train_loss, rtol=1e-5)
    got, want = _log_without_times(workdir), _log_without_times(tmp_path / "one")
    assert [r["step"] for r in got] == [r["step"] for r in want]
    for a, b in zip(got, want, strict=True):
        for key in a.keys() - {"step", "epoch", "lr"}:
            np.testing.assert_allclose(a[key], b[key], rtol=1e-5, atol=1e-6, err_msg=key)


HOST_DEVICES = """
from experiments.common.trainer import data_mesh, use_host_devices
count = use_host_devices(3)
import jax
print(count, jax.device_count(), data_mesh(12).devices.size, data_mesh(16, 12).devices.size)
"""


@pytest.mark.parametrize("flags,want", [("", "3 3 3 2"),
                                        ("--xla_force_host_platform_device_count=8",
                                         "None 8 6 4")])
def test_host_devices_unless_xla_flags_choose_and_meshes_that_divide_the_batch(flags, want):
    """use_host_devices splits the CPU before JAX starts, unless XLA_FLAGS already sets a
    count; data_mesh takes the most devices that divide every batch size."""
    env = dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu", XLA_FLAGS=flags)
    done = subprocess.run([sys.executable, "-c", HOST_DEVICES], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split("\n")[-2] == want


def test_host_devices_do_nothing_once_jax_has_started():
    from experiments.common.trainer import use_host_devices

    jax.devices()
    assert use_host_devices(4) is None
