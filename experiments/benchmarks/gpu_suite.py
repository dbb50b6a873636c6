"""The GPU run of the flash kernels: their tests compiled for the GPU, then the benchmark.

    python -m experiments.benchmarks.gpu_suite --out DIR            # everything
    python -m experiments.benchmarks.gpu_suite --out DIR --quick    # T = 2k, 8k at H = 128
    python -m experiments.benchmarks.gpu_suite --out DIR --dry-run  # CPU, interpret mode, tiny
    ... --skip-tests --seq-lens 4096,8192 --head-dims 128            # a slice of the grid

1. Tests: tests/kernels/test_flash.py (GPU backend), tests/kernels/test_gpu.py and the
   "pallas_gpu" cases of tests/core/test_attention.py, in a pytest subprocess with this module
   loaded as a plugin (``-p experiments.benchmarks.gpu_suite``): it makes the GPU kernel
   ignore the tests' ``interpret=True`` (``force_native_gpu_kernels``), so they run
   compiled by Triton. Pass/fail counts come from pytest's JUnit XML.
2. Benchmark (FlashAttention-3's setup): bfloat16, batch * seq = 16k tokens, heads * head dim
   = 2048, T = S in {1k, 2k, 4k, 8k, 16k}, H in {64, 128, 256}, causal and not; forward,
   backward (the pullback alone, its residuals computed beforehand) and forward + backward.
   TFLOP/s from 4 B N T S H per forward (halved for causal; backward 2.5x, forward + backward
   3.5x the forward). Methods, all in this process: "pallas" (jattn's kernel,
   ``implementation="pallas_gpu"``), jax.nn.dot_product_attention "xla" and "cudnn", and JAX's
   Pallas Triton kernel ``jax.experimental.pallas.ops.gpu.attention.mha`` where it is
   importable and accepts the shape. Masked cases at H = 128: a causal sliding window of 512
   keys and a causal mask over 4 packed documents (the same for every batch row), against
   cuDNN and XLA given the explicit [1, 1, T, S] boolean mask (and cuDNN's native left
   window); their TFLOP/s count only the allowed (query, key) pairs.
   Every function is compiled ahead of time (compilation never timed), called ``warmup``
   times, then timed as the median of ``repeats`` samples, each a burst of calls waited for
   with ``block_until_ready`` (bursts hide the dispatch cost of sub-millisecond calls). A case
   whose compiled memory exceeds the device's, or that fails, is recorded with the reason.
3. Targets (H = 128, T = 8k): forward causal >= 0.8x cuDNN and >= 1.3x the Pallas mha;
   masked cases >= 2x cuDNN with the explicit mask.

Writes ``results.json`` (rewritten after every case, so a run cut short keeps what it
measured) and ``summary.md`` (date, device, tests, tables, targets) under ``--out``.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import statistics
import subprocess
import sys
import time
import warnings
import xml.etree.ElementTree as ET
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

import jattn

MODES = ("fwd", "bwd", "fwd+bwd")
FLOP_FACTOR = {"fwd": 1.0, "bwd": 2.5, "fwd+bwd": 3.5}
OURS = "pallas"
TUNED = "pallas_tuned"  # with --autotune: our kernel at the block sizes autotune picks
DENSE_METHODS = (OURS, "xla", "cudnn", "pallas_mha")
MASKED_METHODS = (OURS, "cudnn+mask", "xla+mask", "cudnn_window")
MASKS = ("window", "documents")
PLUGIN = "experiments.benchmarks.gpu_suite"  # this module, as a pytest plugin


@dataclasses.dataclass(frozen=True)
class Config:
    tokens: int = 16384  # batch * sequence length
    width: int = 2048  # heads * head dim
    seq_lens: tuple[int, ...] = (1024, 2048, 4096, 8192, 16384)
    head_dims: tuple[int, ...] = (64, 128, 256)
    is_causal: tuple[bool, ...] = (False, True)
    masked_head_dim: int = 128
    masked_seq_lens: tuple[int, ...] = (1024, 2048, 4096, 8192, 16384)
    window: int = 512  # keys a query sees in the sliding-window case, itself included
    documents: int = 4
    dtype: str = "bfloat16"
    warmup: int = 2
    repeats: int = 5
    min_sample_s: float = 0.02  # a timed burst lasts at least this long
    target_seq_len: int = 8192
    target_head_dim: int = 128
    interpret: bool = False  # the dry run: kernels in interpret mode on any backend
    tests: tuple[str, ...] = (
        "tests/kernels/test_flash.py::-k::not tpu",
        "tests/kernels/test_gpu.py",
        "tests/core/test_attention.py::-k::pallas_gpu",
        "tests/core/test_block_selection.py::-k::gpu",  # in-tile masks from the block map
        "tests/efficient/test_neighborhood.py::-k::pallas_gpu",  # static in-tile masks
        "tests/efficient/test_linear_gated.py::-k::kernel or gradients",  # Lightning kernels
        "tests/core/test_score_mod.py::-k::pallas_gpu",  # score_mod inside the kernels
        "tests/efficient/test_local.py::-k::pallas_gpu",  # windows and halos as masks
    )  # "path" or "path::-k::expression"


PRESETS = {
    "full": Config(),
    "quick": Config(seq_lens=(2048, 8192), head_dims=(128,), masked_seq_lens=(8192,),
                    warmup=1, repeats=3),
    "dry-run": Config(tokens=64, width=64, seq_lens=(64,), head_dims=(32,), masked_head_dim=32,
                      masked_seq_lens=(64,), window=16, warmup=1, repeats=1, min_sample_s=0.0,
                      is_causal=(True,), target_seq_len=64, target_head_dim=32, interpret=True,
                      tests=("tests/kernels/test_gpu.py::-k::default_block_sizes",)),
}


# ----------------------------------------------------------------------------- running tests


def force_native_gpu_kernels() -> None:
    """Make ``pallas_kernels.flash.gpu`` compile its kernels for the GPU even when called with
    ``interpret=True`` (as the CPU tests do), for the rest of this process
    (:func:`pallas_kernels.flash.gpu.force_compiled`).

    Raises:
        RuntimeError: JAX's backend is not a GPU.
    """
    if jax.default_backend() != "gpu":
        raise RuntimeError(f"force_native_gpu_kernels: needs a GPU, the JAX backend is "
                           f"{jax.default_backend()!r}")
    from pallas_kernels.flash import gpu

    gpu.force_compiled()


def pytest_configure(config) -> None:
    """Pytest hook, active with ``-p experiments.benchmarks.gpu_suite``: the GPU kernel tests
    run compiled for the GPU (a usage error anywhere else)."""
    import pytest

    try:
        force_native_gpu_kernels()
    except RuntimeError as error:
        raise pytest.UsageError(str(error)) from None


def junit_counts(path: Path) -> dict[str, Any]:
    """Counts of a JUnit XML report: tests, passed, failed, errors, skipped, and the ids of
    the tests that failed or errored."""
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    counts = {"tests": 0, "passed": 0, "failed": 0, "errors": 0, "skipped": 0, "failures": []}
    for suite in suites:
        for case in suite.iter("testcase"):
            counts["tests"] += 1
            kinds = {child.tag for child in case}
            name = f"{case.get('classname')}::{case.get('name')}"
            if "failure" in kinds:
                counts["failed"] += 1
                counts["failures"].append(name)
            elif "error" in kinds:
                counts["errors"] += 1
                counts["failures"].append(name)
            elif "skipped" in kinds:
                counts["skipped"] += 1
            else:
                counts["passed"] += 1
    return counts


def run_tests(selections: tuple[str, ...], out: Path, *, native: bool) -> list[dict]:
    """Run each selection ("path" or "path::-k::expression") in its own pytest subprocess;
    with ``native`` the GPU kernel runs compiled (see ``force_native_gpu_kernels``)."""
    results = []
    for i, selection in enumerate(tqdm(selections, desc="kernel tests", unit="file")):
        path, _, expression = selection.partition("::-k::")
        report = out / f"tests_{i}.xml"
        command = [sys.executable, "-m", "pytest", "-q", "-p", "no:xdist", "-p",
                   "no:cacheprovider", f"--junitxml={report}", path]
        if expression:
            command += ["-k", expression]
        if native:
            command += ["-p", PLUGIN]
        # This process may already hold most of the GPU's memory (XLA preallocates 75%).
        env = {**os.environ, "XLA_PYTHON_CLIENT_PREALLOCATE": "false"}
        start = time.perf_counter()
        done = subprocess.run(command, capture_output=True, text=True, env=env)
        row = {"selection": selection, "returncode": done.returncode,
               "seconds": round(time.perf_counter() - start, 1),
               "interpret": not native}
        if report.exists():
            row.update(junit_counts(report))
        else:
            row["note"] = (done.stdout + done.stderr).strip()[-2000:]
        results.append(row)
    return results


# ----------------------------------------------------------------------------- methods


def _pallas_mha():
    """JAX's Pallas Triton mha, or the reason it is unavailable."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from jax.experimental.pallas.ops.gpu import attention
        return attention.mha, attention.BlockSizes
    except (ImportError, AttributeError) as error:
        return f"jax.experimental.pallas.ops.gpu.attention.mha unavailable: {error}"


def dense_method(name: str, is_causal: bool, cfg: Config) -> Callable | str:
    """(q, k, v) -> out for a dense case, or a string saying why it cannot run here."""
    on_gpu = jax.default_backend() == "gpu"
    if name == OURS:
        return lambda q, k, v: jattn.dot_product_attention(
            q, k, v, is_causal=is_causal, implementation="pallas_gpu")
    if name == "xla":
        return lambda q, k, v: jax.nn.dot_product_attention(
            q, k, v, is_causal=is_causal, implementation="xla")
    if name == "cudnn":
        if not on_gpu:
            return "needs a GPU"
        return lambda q, k, v: jax.nn.dot_product_attention(
            q, k, v, is_causal=is_causal, implementation="cudnn")
    if name == "pallas_mha":
        found = _pallas_mha()
        if isinstance(found, str):
            return found
        if not (on_gpu or cfg.interpret):
            return "needs a GPU"
        mha, blocks_cls = found

        def mha_call(q, k, v):
            T = q.shape[1]
            if T % min(128, T):
                raise NotImplementedError(f"mha: T={T} is not a multiple of its block")
            block = min(128, T)
            blocks = blocks_cls(block_q=block, block_k=block, block_q_dkv=min(32, T),
                                block_kv_dkv=min(32, T), block_q_dq=min(32, T),
                                block_kv_dq=min(32, T))
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return mha(q, k, v, None, sm_scale=1 / math.sqrt(q.shape[-1]), causal=is_causal,
                           block_sizes=blocks, interpret=cfg.interpret)
        return mha_call
    raise ValueError(f"method: unknown {name!r}")


def tuned_method(q, k, v, is_causal: bool, cfg: Config) -> tuple[Callable | str, str]:
    """Our kernel (through jattn, block map included) at the block sizes that
    ``pallas_kernels.flash.autotune`` picks for the forward among ``candidates_for("gpu")``;
    the note names them."""
    from jattn import masks
    from jattn.core.kernels import flash_implementation
    from pallas_kernels.flash import autotune

    mask = masks.causal() if is_causal else None

    def at(blocks):
        return lambda q, k, v: flash_implementation(
            "gpu", q, k, v, None, mask, scale=None, logits_soft_cap=None, dropout=None,
            block_sizes=blocks)[0]

    compiled = {}

    def run(blocks):
        if blocks not in compiled:
            compiled[blocks] = jax.jit(at(blocks))
        return compiled[blocks](q, k, v)

    _, T, _, H = q.shape
    candidates = autotune.candidates_for("gpu", T, k.shape[1], H, q.dtype)
    key = ("dense", q.shape, k.shape, q.dtype.name, is_causal)
    try:
        blocks = autotune.autotune(run, candidates, key=key, warmup=cfg.warmup,
                                   iters=max(1, cfg.repeats))
    except RuntimeError as error:
        return str(error)[:300], ""
    finally:
        compiled.clear()
    failed = [t for t in autotune.trials(key) if t.error]
    note = (f"blocks {blocks.block_q}x{blocks.block_kv}, warps {blocks.num_warps} "
            f"({len(candidates) - len(failed)}/{len(candidates)} candidates ran)")
    return at(blocks), note


def document_ids(T: int, documents: int) -> np.ndarray:
    """int32 [T]: ``documents`` packed documents of unequal lengths (in proportion 1:2:3:2...,
    cycling), the last one absorbing the rounding."""
    weights = np.array([(1, 2, 3, 2)[i % 4] for i in range(documents)], float)
    bounds = np.round(np.cumsum(weights) / weights.sum() * T).astype(int)
    return np.searchsorted(bounds, np.arange(T), side="right").astype(np.int32)


def masked_allowed_pairs(mask: str, T: int, cfg: Config) -> int:
    """Number of (query, key) pairs the masked case allows (for its FLOP count)."""
    t = np.arange(T)
    if mask == "window":
        return int(np.minimum(t + 1, cfg.window).sum())
    lengths = np.bincount(document_ids(T, cfg.documents))
    return int((lengths * (lengths + 1) // 2).sum())


def explicit_mask(mask: str, T: int, cfg: Config) -> np.ndarray:
    """bool [1, 1, T, T]: the masked case written out, for the baselines."""
    i, j = np.arange(T)[:, None], np.arange(T)[None, :]
    allowed = j <= i
    if mask == "window":
        allowed &= j > i - cfg.window
    else:
        ids = document_ids(T, cfg.documents)
        allowed &= ids[:, None] == ids[None, :]
    return allowed[None, None]


def masked_method(name: str, mask: str, T: int, B: int, cfg: Config) -> Callable | str:
    """(q, k, v) -> out for a masked case, or why it cannot run here."""
    on_gpu = jax.default_backend() == "gpu"
    if name == OURS:
        if mask == "window":
            return lambda q, k, v: jattn.dot_product_attention(
                q, k, v, is_causal=True, local_window_size=(cfg.window - 1, 0),
                implementation="pallas_gpu")
        ids = jnp.broadcast_to(jnp.asarray(document_ids(T, cfg.documents)), (B, T))
        return lambda q, k, v: jattn.dot_product_attention(
            q, k, v, is_causal=True, query_segment_ids=ids, implementation="pallas_gpu")
    if name in ("cudnn+mask", "xla+mask"):
        if name == "cudnn+mask" and not on_gpu:
            return "needs a GPU"
        dense = jnp.asarray(explicit_mask(mask, T, cfg))
        impl = name.split("+")[0]
        return lambda q, k, v: jax.nn.dot_product_attention(q, k, v, mask=dense,
                                                            implementation=impl)
    if name == "cudnn_window":
        if mask != "window":
            return "cuDNN has no native document mask"
        if not on_gpu:
            return "needs a GPU"
        return lambda q, k, v: jax.nn.dot_product_attention(
            q, k, v, is_causal=True, local_window_size=(cfg.window - 1, 0),
            implementation="cudnn")
    raise ValueError(f"method: unknown {name!r}")


# ----------------------------------------------------------------------------- timing


def _device_memory_bytes() -> int | None:
    try:
        stats = jax.devices()[0].memory_stats() or {}
    except Exception:
        return None
    return stats.get("bytes_limit")


def time_compiled(compiled: Callable, args: tuple, cfg: Config) -> float:
    """Median seconds per call of an already compiled function, after ``cfg.warmup`` calls."""
    for _ in range(cfg.warmup):
        jax.block_until_ready(compiled(*args))
    start = time.perf_counter()
    jax.block_until_ready(compiled(*args))
    once = max(time.perf_counter() - start, 1e-7)
    burst = max(1, min(1000, int(cfg.min_sample_s / once)))
    samples = []
    for _ in range(cfg.repeats):
        start = time.perf_counter()
        for _ in range(burst):
            result = compiled(*args)
        jax.block_until_ready(result)
        samples.append((time.perf_counter() - start) / burst)
    return statistics.median(samples)


def _compile(fn: Callable, args: tuple, memory_limit: int | None):
    compiled = jax.jit(fn).lower(*args).compile()
    if memory_limit is not None:
        analysis = compiled.memory_analysis()
        if analysis is not None:
            need = analysis.temp_size_in_bytes + analysis.output_size_in_bytes
            have = memory_limit - sum(x.nbytes for x in jax.tree.leaves(args))
            if need > have:
                raise MemoryError(f"needs {need / 2**30:.1f} GiB, {have / 2**30:.1f} GiB free")
    return compiled


def measure_modes(attention: Callable, q, k, v, do, cfg: Config) -> dict[str, dict]:
    """Seconds (or why not) per mode for ``attention(q, k, v) -> out``."""
    limit = _device_memory_bytes()

    def forward_backward(q, k, v, do):
        out, pullback = jax.vjp(attention, q, k, v)
        return out, pullback(do)  # the output too: no forward work is dead code

    results = {}
    for mode in MODES:
        try:
            if mode == "fwd":
                args = (q, k, v)
                compiled = _compile(attention, args, limit)
            elif mode == "fwd+bwd":
                args = (q, k, v, do)
                compiled = _compile(forward_backward, args, limit)
            else:
                pullback = jax.jit(lambda q, k, v: jax.vjp(attention, q, k, v)[1])(q, k, v)
                args = (pullback, do)
                compiled = _compile(lambda pullback, do: pullback(do), args, limit)
            results[mode] = {"seconds": time_compiled(compiled, args, cfg)}
        except Exception as error:
            lines = str(error).strip().splitlines() or [""]
            results[mode] = {"seconds": None,
                             "note": f"{type(error).__name__}: {lines[0][:200]}"}
        finally:
            compiled = args = pullback = None
    return results


# ----------------------------------------------------------------------------- the grid


def dense_cases(cfg: Config) -> list[dict]:
    cases = []
    for H in cfg.head_dims:
        for T in cfg.seq_lens:
            for causal in cfg.is_causal:
                if cfg.tokens % T or cfg.width % H:
                    continue
                cases.append(dict(kind="dense", mask="causal" if causal else "none", T=T, S=T,
                                  H=H, B=cfg.tokens // T, N=cfg.width // H, causal=causal))
    return cases


def masked_cases(cfg: Config) -> list[dict]:
    H = cfg.masked_head_dim
    return [dict(kind="masked", mask=mask, T=T, S=T, H=H, B=cfg.tokens // T,
                 N=cfg.width // H, causal=True)
            for T in cfg.masked_seq_lens for mask in MASKS
            if cfg.tokens % T == 0 and cfg.width % H == 0]


def forward_flops(case: dict, cfg: Config) -> float:
    """FLOPs of one forward: 4 B N T S H (halved for causal); masked: 4 B N H * pairs."""
    B, N, T, S, H = (case[x] for x in "BNTSH")
    if case["kind"] == "masked":
        return 4.0 * B * N * H * masked_allowed_pairs(case["mask"], T, cfg)
    return 4.0 * B * N * T * S * H / (2 if case["causal"] else 1)


def run_case(case: dict, cfg: Config, methods: tuple[str, ...]) -> list[dict]:
    """Every method and mode of one case, as result rows."""
    dtype = jnp.dtype(cfg.dtype)
    B, N, T, S, H = (case[x] for x in "BNTSH")
    keys = jax.random.split(jax.random.key(T * 1000 + H), 4)
    q = jax.random.normal(keys[0], (B, T, N, H), dtype)
    k = jax.random.normal(keys[1], (B, S, N, H), dtype)
    v = jax.random.normal(keys[2], (B, S, N, H), dtype)
    do = jax.random.normal(keys[3], (B, T, N, H), dtype)
    flops = forward_flops(case, cfg)
    rows = []
    for name in methods:
        note = ""
        if name == TUNED:
            attention, note = tuned_method(q, k, v, case["causal"], cfg)
        elif case["kind"] == "dense":
            attention = dense_method(name, case["causal"], cfg)
        else:
            attention = masked_method(name, case["mask"], T, B, cfg)
        if isinstance(attention, str):
            measured = {mode: {"seconds": None, "note": attention} for mode in MODES}
        else:
            measured = measure_modes(attention, q, k, v, do, cfg)
        for mode in MODES:
            seconds = measured[mode]["seconds"]
            work = flops * FLOP_FACTOR[mode]
            rows.append({**case, "method": name, "mode": mode, "flops": work,
                         "seconds": seconds,
                         "tflops": None if seconds is None else work / seconds / 1e12,
                         "note": measured[mode].get("note", note)})
    return rows


# ----------------------------------------------------------------------------- targets


def _find(rows, **where) -> dict | None:
    for row in rows:
        if all(row.get(k) == v for k, v in where.items()):
            return row
    return None


def check_targets(rows: list[dict], cfg: Config) -> list[dict]:
    """The issue's targets at (T, H) = (target_seq_len, target_head_dim): name, measured
    ratio (ours over the baseline, in speed), the bar, and pass / fail / not measured."""
    T, H = cfg.target_seq_len, cfg.target_head_dim
    specs = [("forward causal vs cuDNN", dict(kind="dense", mask="causal", mode="fwd"),
              "cudnn", 0.8),
             ("forward causal vs JAX Pallas mha", dict(kind="dense", mask="causal",
                                                       mode="fwd"), "pallas_mha", 1.3)]
    for mask in MASKS:
        for mode in ("fwd", "fwd+bwd"):
            specs.append((f"{mask} {mode} vs cuDNN + explicit mask",
                          dict(kind="masked", mask=mask, mode=mode), "cudnn+mask", 2.0))
    targets = []
    for name, where, baseline, bar in specs:
        ours = _find(rows, T=T, H=H, method=OURS, **where)
        base = _find(rows, T=T, H=H, method=baseline, **where)
        ratio = None
        if ours and base and ours["seconds"] and base["seconds"]:
            ratio = base["seconds"] / ours["seconds"]
        status = "not measured" if ratio is None else ("pass" if ratio >= bar else "fail")
        if cfg.interpret and ratio is not None:
            status += " (dry run: meaningless)"
        targets.append({"target": name, "T": T, "H": H, "baseline": baseline, "bar": bar,
                        "ratio": ratio, "status": status})
    return targets


# ----------------------------------------------------------------------------- reports


def device_description() -> str:
    device = jax.devices()[0]
    return f"{device.device_kind} ({device.platform}, {jax.device_count()} device(s))"


def _cell(row: dict | None) -> str:
    if row is None:
        return "—"
    if row["seconds"] is None:
        return f"n/a ({row['note'][:60]})" if row["note"] else "n/a"
    return f"{row['tflops']:.1f}" if row["tflops"] >= 1 else f"{row['tflops']:.3g}"


def _speedup(ours: dict | None, base: dict | None) -> str:
    if ours and base and ours["seconds"] and base["seconds"]:
        return f"{base['seconds'] / ours['seconds']:.2f}x"
    return "—"


def summary_markdown(report: dict) -> str:
    """The report as markdown: header, tests, one TFLOP/s table per mode, masked, targets."""
    rows = report["benchmark"]
    lines = [f"# Flash attention on {report['device']}", "",
             f"Date: {report['date']}. JAX {report['jax']}. Preset: {report['preset']}. "
             f"dtype {report['config']['dtype']}, batch * seq = {report['config']['tokens']}, "
             f"heads * dim = {report['config']['width']}. TFLOP/s: 4 B N T S H per forward, "
             f"halved for causal; backward 2.5x; masked cases count allowed pairs only.", ""]
    if report["config"]["interpret"]:
        lines += ["**Dry run: kernels in interpret mode on "
                  f"{jax.default_backend()}; the numbers mean nothing.**", ""]
    lines += ["## Kernel tests", "", "| selection | passed | failed | errors | skipped | s |",
              "|---|---|---|---|---|---|"]
    for t in report["tests"]:
        lines.append(f"| `{t['selection']}` | {t.get('passed', '—')} | {t.get('failed', '—')} "
                     f"| {t.get('errors', '—')} | {t.get('skipped', '—')} | {t['seconds']} |")
    if not report["tests"]:
        lines.append("| (not run) | | | | | |")
    dense = [r for r in rows if r["kind"] == "dense"]
    shapes = list(dict.fromkeys((r["H"], r["T"], r["mask"]) for r in dense))
    methods = DENSE_METHODS + ((TUNED,) if any(r["method"] == TUNED for r in dense) else ())
    for mode in MODES:
        lines += ["", f"## Dense, {mode}, TFLOP/s", "",
                  "| H | T | B x N | mask | " + " | ".join(methods)
                  + " | pallas / cudnn | pallas / pallas_mha |",
                  "|---|---|---|---|" + "---|" * (len(methods) + 2)]
        for H, T, mask in shapes:
            found = {m: _find(dense, H=H, T=T, mask=mask, mode=mode, method=m)
                     for m in methods}
            cells = [_cell(found[m]) for m in methods]
            cells += [_speedup(found[OURS], found[m]) for m in ("cudnn", "pallas_mha")]
            first = _find(dense, H=H, T=T, mask=mask)
            lines.append(f"| {H} | {T} | {first['B']} x {first['N']} | {mask} | "
                         + " | ".join(cells) + " |")
    masked = [r for r in rows if r["kind"] == "masked"]
    if masked:
        lines += ["", "## Masked (causal), TFLOP/s over allowed pairs", "",
                  "| mask | T | H | mode | " + " | ".join(MASKED_METHODS)
                  + " | pallas / cudnn+mask |", "|---|---|---|---|" + "---|" * (
                      len(MASKED_METHODS) + 1)]
        for mask, T, H in dict.fromkeys((r["mask"], r["T"], r["H"]) for r in masked):
            for mode in MODES:
                found = {m: _find(masked, mask=mask, T=T, mode=mode, method=m)
                         for m in MASKED_METHODS}
                speedup = _speedup(found[OURS], found["cudnn+mask"])
                lines.append(f"| {mask} | {T} | {H} | {mode} | "
                             + " | ".join(_cell(found[m]) for m in MASKED_METHODS)
                             + f" | {speedup} |")
    lines += ["", "## Targets", "", "| target | T | H | ratio | bar | status |",
              "|---|---|---|---|---|---|"]
    for t in report["targets"]:
        ratio = "—" if t["ratio"] is None else f"{t['ratio']:.2f}x"
        lines.append(f"| {t['target']} | {t['T']} | {t['H']} | {ratio} | >= {t['bar']}x | "
                     f"{t['status']} |")
    return "\n".join(lines) + "\n"


def write_report(out: Path, report: dict) -> None:
    (out / "results.json").write_text(json.dumps(report, indent=1) + "\n")
    (out / "summary.md").write_text(summary_markdown(report))


# ----------------------------------------------------------------------------- the run


def run_suite(cfg: Config, out: Path, *, preset: str, tests: bool = True,
              tune: bool = False) -> dict:
    """Tests, benchmark, targets; the report is rewritten under ``out`` after every case.
    With ``tune``, the dense cases also time our kernel at autotuned block sizes."""
    out.mkdir(parents=True, exist_ok=True)
    report = {"date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
              "device": device_description(), "jax": jax.__version__, "preset": preset,
              "config": dataclasses.asdict(cfg), "tests": [], "benchmark": [], "targets": []}
    if tests:
        report["tests"] = run_tests(cfg.tests, out, native=not cfg.interpret)
    write_report(out, report)
    dense_methods = DENSE_METHODS + ((TUNED,) if tune else ())
    grid = [(case, dense_methods) for case in dense_cases(cfg)]
    grid += [(case, MASKED_METHODS) for case in masked_cases(cfg)]
    progress = tqdm(grid, desc="benchmark", unit="case")
    for case, methods in progress:
        progress.set_postfix_str(f"{case['mask']} T={case['T']} H={case['H']}")
        report["benchmark"] += run_case(case, cfg, methods)
        report["targets"] = check_targets(report["benchmark"], cfg)
        write_report(out, report)
    return report


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(",") if x)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="results directory")
    parser.add_argument("--quick", action="store_true", help="a few shapes only")
    parser.add_argument("--dry-run", action="store_true",
                        help="tiny shapes, kernels in interpret mode: runs on a CPU")
    parser.add_argument("--skip-tests", action="store_true", help="benchmark only")
    parser.add_argument("--autotune", action="store_true",
                        help=f"also time our kernel at autotuned block sizes ({TUNED!r})")
    parser.add_argument("--seq-lens", type=_ints, help="override T (dense and masked), e.g. 8192")
    parser.add_argument("--head-dims", type=_ints, help="override H (dense), e.g. 64,128")
    args = parser.parse_args(argv)
    preset = "dry-run" if args.dry_run else "quick" if args.quick else "full"
    cfg = PRESETS[preset]
    if args.seq_lens:
        cfg = dataclasses.replace(cfg, seq_lens=args.seq_lens, masked_seq_lens=args.seq_lens)
    if args.head_dims:
        cfg = dataclasses.replace(cfg, head_dims=args.head_dims)
    if not args.dry_run:
        try:
            backend = jax.default_backend()
        except RuntimeError as error:
            backend = f"unavailable ({error})"
        if backend != "gpu":
            print(f"gpu_suite: no GPU here (JAX backend: {backend}). Run it on a machine with "
                  "an NVIDIA GPU and jax[cuda], or pass --dry-run for a tiny CPU rehearsal in "
                  "interpret mode.", file=sys.stderr)
            return 2
    report = run_suite(cfg, args.out, preset=preset, tests=not args.skip_tests,
                       tune=args.autotune)
    failed = sum(t.get("failed", 0) + t.get("errors", 0) for t in report["tests"])
    print(f"gpu_suite: wrote {args.out / 'results.json'} and {args.out / 'summary.md'}; "
          f"{failed} test failure(s); targets: "
          + ", ".join(f"{t['target']}: {t['status']}" for t in report["targets"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
