"""Speed of the MQAR generator on the figure-2 grid, against a row-by-row baseline.

    python -m experiments.benchmarks.mqar_data --preset quick    # 10k rows per length
    python -m experiments.benchmarks.mqar_data --preset full     # 100k rows, as in the paper

The baseline draws each row on its own with numpy's ``Generator.choice(replace=False, p=...)``
(the definition, one row at a time: the shape of the original generator); it is timed on
``baseline_rows`` rows and reported per row. Both run in this process.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from experiments.common.config import parse_config, save_config
from experiments.tasks.mqar import gap_probabilities, layout, mqar

GRID = ((64, 4), (128, 8), (256, 16), (512, 64))  # (L, kv) of Zoology's figure 2


@dataclasses.dataclass(frozen=True)
class Config:
    rows: int = 10_000
    baseline_rows: int = 2_000
    vocab_size: int = 8192
    out: str = "results/mqar_data"


PRESETS = {"quick": Config(), "full": Config(rows=100_000)}


def row_by_row(rng: np.random.Generator, rows: int, vocab_size: int, L: int, kv: int):
    p = gap_probabilities((L - 2 * kv) // 2, 0.01)
    keys = np.stack([rng.choice(np.arange(1, vocab_size // 2), kv, replace=False)
                     for _ in range(rows)])
    values = np.stack([rng.choice(np.arange(vocab_size // 2, vocab_size), kv, replace=False)
                       for _ in range(rows)])
    gaps = np.stack([rng.choice(p.size, kv, replace=False, p=p) for _ in range(rows)])
    return layout(keys, values, gaps, L)


def main(argv=None) -> None:
    config = parse_config(PRESETS, argv, description=__doc__.split("\n")[0])
    out = Path(config.out)
    save_config(config, out)
    lines = [f"rows per length: {config.rows:,}; baseline timed on {config.baseline_rows:,} "
             f"rows; V={config.vocab_size}", "",
             "| L | kv | jattn mqar (s) | rows/s | row-by-row rows/s | speed-up |",
             "|---|---|---|---|---|---|"]
    for L, kv in tqdm(GRID, desc="mqar_data"):
        start = time.perf_counter()
        mqar(vocab_size=config.vocab_size, input_seq_len=L, num_kv_pairs=kv,
             num_examples=config.rows, seed=0)
        ours = time.perf_counter() - start
        start = time.perf_counter()
        row_by_row(np.random.default_rng(0), config.baseline_rows, config.vocab_size, L, kv)
        base = time.perf_counter() - start
        ours_rate, base_rate = config.rows / ours, config.baseline_rows / base
        lines.append(f"| {L} | {kv} | {ours:.2f} | {ours_rate:,.0f} | {base_rate:,.0f} | "
                     f"{ours_rate / base_rate:.0f}x |")
    text = "\n".join(lines) + "\n"
    (out / "summary.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
