"""CPU benchmark: exact attention weights of a few rows from the forward's log-sum-exp
(issue 24).

    python -m experiments.benchmarks.attention_weights --preset quick   # T = S = 4k
    python -m experiments.benchmarks.attention_weights --preset full    # T = S = 32k

Causal self-attention, one sequence of ``heads`` heads of ``head_dim``, float32. Programs,
each compiled once ahead of time and timed after (median of repeated calls; compilation is
never timed: ``experiments.benchmarks.measure``):

* ``forward``: the plain chunked forward, ``dot_product_attention(implementation="chunked")``;
* ``forward + rows``: the same forward returning its lse, and the weights of ``rows`` query
  rows of every head from it (``attention_weights(..., lse=lse, query_positions=...)``);
* ``rows from lse``: the rows' weights alone, given q, k and the lse;
* ``dense weights``: every head's [T, S] map (``attention_weights`` without selection);
  reported by compiled memory only when it does not fit.

The targets: the rows cost under 1% of the dense weights' memory, and ``forward + rows``
at most 1.2x the plain forward's time. Writes config.json, results.jsonl and summary.md under
``out``.
"""

from __future__ import annotations

import dataclasses
import platform
import sys

import jax
import jax.numpy as jnp

import jattn
from experiments.benchmarks.measure import measure, run_benchmark, table_cell

TARGET_MEMORY = 0.01
TARGET_TIME = 1.2


@dataclasses.dataclass(frozen=True)
class Config:
    seq_len: int = 4096
    heads: int = 8
    head_dim: int = 64
    rows: int = 16  # query rows of every head (spread evenly, the last row included)
    repeats: int = 3
    out: str = "results/benchmarks/attention_weights"


PRESETS = {"quick": Config(), "full": Config(seq_len=32768, repeats=1,
                                              out="results/benchmarks/attention_weights_full")}


def programs(config: Config):
    T = config.seq_len
    rows = tuple(int(r) for r in jnp.linspace(0, T - 1, config.rows).round())

    def forward(q, k, v):
        return jattn.dot_product_attention(q, k, v, is_causal=True, implementation="chunked")

    def forward_and_rows(q, k, v):
        out, lse = jattn.dot_product_attention(q, k, v, is_causal=True, return_lse=True,
                                               implementation="chunked")
        return out, jattn.attention_weights(q, k, is_causal=True, lse=lse,
                                            query_positions=rows)

    def rows_from_lse(q, k, lse):
        return jattn.attention_weights(q, k, is_causal=True, lse=lse, query_positions=rows)

    def dense(q, k):
        return jattn.attention_weights(q, k, is_causal=True)

    return {"forward": (forward, "qkv"), "forward + rows": (forward_and_rows, "qkv"),
            "rows from lse": (rows_from_lse, "qkl"), "dense weights": (dense, "qk")}


def run(config: Config) -> list[dict]:
    T, N, H = config.seq_len, config.heads, config.head_dim
    keys = jax.random.split(jax.random.key(0), 3)
    q, k, v = (jax.random.normal(key, (1, T, N, H), jnp.float32) for key in keys)
    lse = jattn.dot_product_attention(q, k, v, is_causal=True, return_lse=True,
                                      implementation="chunked")[1]
    inputs = {"q": q, "k": k, "v": v, "l": lse}
    rows = []
    for name, (fn, args) in programs(config).items():
        result = measure(fn, *(inputs[a] for a in args), repeats=config.repeats)
        rows.append({"program": name, "seq_len": T} | dataclasses.asdict(result))
        print(f"{name}: {table_cell(rows[-1], unit='ms')}", file=sys.stderr)
    return rows


def summary(config: Config, rows: list[dict]) -> str:
    by = {r["program"]: r for r in rows}
    T, N = config.seq_len, config.heads
    dense_bytes = N * T * T * 4
    rows_bytes = N * config.rows * T * 4
    lines = [f"T = S = {T}, {N} heads of {config.head_dim}, causal, float32, batch 1; "
             f"{config.rows} rows of every head. {platform.processor() or platform.machine()}, "
             f"{jax.device_count()} device(s), jax {jax.__version__}.", "",
             "| program | time / compiled memory (temporaries + outputs) |", "|---|---|"]
    lines += [f"| {name} | {table_cell(by[name], unit='ms')} |" for name in by]
    memory = by["rows from lse"]["memory_bytes"] / by["dense weights"]["memory_bytes"]
    lines += ["", f"Rows' weights: {rows_bytes / 2**20:,.1f} MiB against "
              f"{dense_bytes / 2**20:,.0f} MiB dense ({rows_bytes / dense_bytes:.3%}); "
              f"compiled memory of 'rows from lse' over 'dense weights': {memory:.3%} "
              f"(target < {TARGET_MEMORY:.0%})."]
    if by["forward"]["seconds"] and by["forward + rows"]["seconds"]:
        ratio = by["forward + rows"]["seconds"] / by["forward"]["seconds"]
        lines.append(f"Time of 'forward + rows' over 'forward': {ratio:.3f}x "
                     f"(target <= {TARGET_TIME}x).")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    run_benchmark(PRESETS, run, summary, argv, description=__doc__)


if __name__ == "__main__":
    main()
