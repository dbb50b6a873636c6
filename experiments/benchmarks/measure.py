"""Timing and memory of a compiled JAX function, compilation excluded.

Each function is compiled ahead of time (``jit(...).lower(...).compile()``); memory is read
from the compiled executable's memory analysis (temporaries + outputs, arguments excluded:
they are the same for every method), so a case that would not fit is reported without running
it. Time is the median of repeated calls of the compiled executable, each waited for with
``block_until_ready``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import statistics
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import jax

from experiments.common.config import parse_config, save_config


@dataclasses.dataclass
class Measurement:
    seconds: float | None  # median wall time of one call; None when not run
    runs: int  # timed calls behind the median
    memory_bytes: int  # compiled temporaries + outputs
    note: str = ""  # why it was not run, if it was not


def available_memory_bytes() -> int:
    """MemAvailable from /proc/meminfo (Linux), else total physical memory."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def measure(fn: Callable, *args, repeats: int = 3, memory_budget: int | None = None,
            single_run_above_s: float = 5.0) -> Measurement:
    """Compile ``fn`` for ``args``, then time it unless its memory exceeds ``memory_budget``.

    The first call is timed too (it is not a compilation); when it takes longer than
    ``single_run_above_s`` it is the only one, otherwise ``repeats`` more calls are timed and
    their median reported.
    """
    compiled = jax.jit(fn).lower(*args).compile()
    analysis = compiled.memory_analysis()
    memory = int(analysis.temp_size_in_bytes + analysis.output_size_in_bytes)
    budget = available_memory_bytes() * 0.8 if memory_budget is None else memory_budget
    if memory > budget:
        return Measurement(None, 0, memory, f"needs {memory / 2**30:.1f} GiB")

    def once() -> float:
        start = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        return time.perf_counter() - start

    first = once()
    if first > single_run_above_s or repeats <= 1:
        return Measurement(first, 1, memory)
    times = [once() for _ in range(repeats)]
    return Measurement(statistics.median(times), len(times), memory)


def table_cell(row: dict | None, *, unit: str = "s") -> str:
    """A results row (a :class:`Measurement` as a dict) as "time / memory" for a markdown
    table: the time in seconds or, with ``unit="ms"``, milliseconds; "—" for no row."""
    if row is None:
        return "—"
    if row["seconds"] is None:
        return f"not run ({row['note']})"
    time = row["seconds"] * (1e3 if unit == "ms" else 1.0)
    shown = f"{time:,.0f}" if time >= 1000 else f"{time:.3g}"  # 1,690 rather than 1.69e+03
    return f"{shown} {unit} / {row['memory_bytes'] / 2**20:,.0f} MiB"


def run_benchmark(presets: Mapping, run: Callable, summary: Callable, argv=None,
                  description: str = "") -> str:
    """The command line of a benchmark whose config has an ``out`` folder: parse the preset
    and flags, save config.json, ``run(config)`` -> rows, write them to results.jsonl and
    ``summary(config, rows)`` to summary.md; print and return the summary."""
    config = parse_config(presets, argv, description=description)
    out = Path(config.out)
    save_config(config, out)
    rows = run(config)
    with open(out / "results.jsonl", "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    text = summary(config, rows)
    (out / "summary.md").write_text(text)
    print(text)
    return text
