"""CPU benchmark: the block-sparse softmax path against its own baselines (issue 25).

    python -m experiments.benchmarks.block_sparse --preset quick   # L = 1k, ALiBi at 4k
    python -m experiments.benchmarks.block_sparse --preset full    # L = 4k, ALiBi at 16k

Two questions, each answered in one process (programs compiled ahead of time, median of
repeated calls, compiled temporaries + outputs: ``experiments.benchmarks.measure``):

* neighbourhood attention (causal 1-D, kernel ``kernel``, CAB's batch 4 x 8 heads of 64)
  forward+backward against the chunked softmax with the same sliding window
  (``local_window_size=(kernel - 1, 0)``) and against chunked causal softmax; targets: time
  and memory within 1.5x of the sliding window;
* ALiBi as a ``score_mod`` on the chunked path at ``alibi_length`` (one sequence, 8 heads of
  64) forward+backward, against the same call without a modifier, by compiled memory;
  target: within 1.2x. The materialised bias [N, T, T] it replaces is reported by size.

Writes config.json, results.jsonl and summary.md under ``out``.
"""

from __future__ import annotations

import dataclasses
import platform

import jax
import jax.numpy as jnp

import jattn
from experiments.benchmarks.measure import measure, run_benchmark, table_cell

TARGET_NEIGHBORHOOD = 1.5
TARGET_ALIBI_MEMORY = 1.2


@dataclasses.dataclass(frozen=True)
class Config:
    length: int = 1024
    kernel: int = 127
    alibi_length: int = 4096
    repeats: int = 3
    out: str = "results/benchmarks/block_sparse/quick"


PRESETS = {
    "quick": Config(),
    "full": Config(length=4096, alibi_length=16384, out="results/benchmarks/block_sparse/full"),
}


def _grad(fn):
    return jax.grad(lambda q, k, v: fn(q, k, v).astype(jnp.float32).sum(), argnums=(0, 1, 2))


def alibi(num_heads: int):
    """ALiBi (causal): score - m_h (q - kv) with m_h = 2^(-8 (h + 1) / num_heads)."""
    slopes = 2.0 ** (-8.0 * (jnp.arange(num_heads) + 1) / num_heads)

    def mod(score, batch, head, q_index, kv_index):
        return score - slopes[head] * (q_index - kv_index)

    return mod


def run(config: Config) -> list[dict]:
    rows = []
    q, k, v = (jax.random.normal(key, (4, config.length, 8, 64))
               for key in jax.random.split(jax.random.key(0), 3))
    window = (config.kernel - 1, 0)
    programs = {
        "neighborhood": lambda q, k, v: jattn.neighborhood_attention(
            q, k, v, kernel_size=config.kernel, is_causal=True),
        "sliding window (chunked)": lambda q, k, v: jattn.dot_product_attention(
            q, k, v, is_causal=True, local_window_size=window, implementation="chunked"),
        "causal (chunked)": lambda q, k, v: jattn.dot_product_attention(
            q, k, v, is_causal=True, implementation="chunked"),
    }
    for name, fn in programs.items():
        result = measure(_grad(fn), q, k, v, repeats=config.repeats)
        rows.append({"case": "neighborhood", "program": name, **dataclasses.asdict(result)})
    long = jax.ShapeDtypeStruct((1, config.alibi_length, 8, 64), jnp.float32)
    for name, mod in (("chunked", None), ("chunked + ALiBi score_mod", alibi(8))):
        def fn(q, k, v, mod=mod):
            return jattn.dot_product_attention(q, k, v, is_causal=True, score_mod=mod,
                                               implementation="chunked")
        analysis = jax.jit(_grad(fn)).lower(long, long, long).compile().memory_analysis()
        rows.append({"case": "alibi", "program": name, "seconds": None, "runs": 0,
                     "memory_bytes": int(analysis.temp_size_in_bytes
                                         + analysis.output_size_in_bytes), "note": ""})
    return rows


def summary(config: Config, rows: list[dict]) -> str:
    by = {(r["case"], r["program"]): r for r in rows}
    nb = by[("neighborhood", "neighborhood")]
    sw = by[("neighborhood", "sliding window (chunked)")]
    lines = [f"Causal fwd+bwd, B=4, 8 heads of 64, L={config.length}, kernel {config.kernel}; "
             f"{platform.processor() or platform.machine()}, jax {jax.__version__}.", "",
             "| program | time / compiled memory |", "|---|---|"]
    lines += [f"| {p} | {table_cell(r, unit='ms')} |" for (c, p), r in by.items()
              if c == "neighborhood"]
    lines += ["", f"Neighbourhood over sliding window: time {nb['seconds'] / sw['seconds']:.2f}x, "
              f"memory {nb['memory_bytes'] / sw['memory_bytes']:.2f}x (target <= "
              f"{TARGET_NEIGHBORHOOD}x)."]
    plain = by[("alibi", "chunked")]["memory_bytes"]
    mod = by[("alibi", "chunked + ALiBi score_mod")]["memory_bytes"]
    bias = 8 * config.alibi_length ** 2 * 4
    lines += ["", f"ALiBi at T={config.alibi_length} (1 x 8 heads of 64, causal fwd+bwd), "
              f"compiled memory: {mod / 2**20:,.0f} MiB with the score_mod, "
              f"{plain / 2**20:,.0f} MiB without ({mod / plain:.3f}x, target <= "
              f"{TARGET_ALIBI_MEMORY}x); the materialised [N, T, T] float32 bias alone would "
              f"be {bias / 2**30:,.1f} GiB."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    run_benchmark(PRESETS, run, summary, argv, description=__doc__)


if __name__ == "__main__":
    main()
