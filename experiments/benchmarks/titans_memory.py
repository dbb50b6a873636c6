"""CPU benchmark: Titans neural memory, chunk-parallel vs token-by-token (issue 7).

    python -m experiments.benchmarks.titans_memory --preset quick   # L = 1k, 2k, 4k
    python -m experiments.benchmarks.titans_memory --preset full    # L = 1k .. 16k

Wall time and compiled memory (temporaries + outputs) of
``jattn.memory.titans.neural_memory`` with implementation "sequential" and "chunked" (chunk
1, the same recurrence in the dual form, and the paper's parallel form with chunks of 16 and
64), forward and forward+backward (gradient of a fixed random projection of the output
with respect to every outer parameter and the input). Each program is compiled once ahead of
time and timed after (median of repeated calls, ``block_until_ready``; compilation is never
timed; see ``experiments.benchmarks.measure``). The memory table sets the compiled
footprint beside the size of one memory-weight gradient per token (L x memory size), what a
chunked form that materialised per-token gradients would hold. Writes config.json,
results.jsonl and summary.md under --out.
"""

from __future__ import annotations

import dataclasses
import json
import platform
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
from tqdm import tqdm

from experiments.benchmarks.measure import measure, table_cell
from experiments.common.config import parse_config, save_config
from jattn.memory.titans import init_neural_memory, neural_memory

MODES = ("fwd", "fwd+bwd")
TARGET_LENGTH = 4096
TARGET_SPEEDUP = 10.0


@dataclasses.dataclass(frozen=True)
class Config:
    seq_lens: tuple[int, ...] = (1024, 2048, 4096)
    chunk_sizes: tuple[int, ...] = (1, 16, 64)
    batch: int = 1
    dim: int = 128
    heads: int = 4
    head_dim: int = 32
    memory_depth: int = 2
    max_grad_norm: float | None = 1.0
    repeats: int = 3
    sequential: bool = True  # also time the token-by-token recurrence
    out: str = "results/benchmarks/titans_memory"


PRESETS = {
    "quick": Config(),
    "full": Config(seq_lens=(1024, 2048, 4096, 8192, 16384)),
}


def methods(config: Config) -> list[tuple[str, str, int]]:
    """(name, implementation, chunk_size)."""
    out = [("sequential", "sequential", 1)] if config.sequential else []
    return out + [(f"chunked {c}", "chunked", c) for c in config.chunk_sizes]


def _program(params, implementation: str, chunk_size: int, mode: str, max_grad_norm):
    def forward(p, x):
        return neural_memory(p, x, chunk_size=chunk_size, implementation=implementation,
                             max_grad_norm=max_grad_norm)

    if mode == "fwd":
        return forward

    def loss(p, x, r):
        return jnp.sum(forward(p, x) * r)

    return jax.grad(loss, argnums=(0, 1))


def memory_size(config: Config) -> int:
    """Floats in one set of memory weights (all heads, one batch row)."""
    params = init_neural_memory(jax.random.key(0), dim=config.dim, num_heads=config.heads,
                                head_dim=config.head_dim, memory_depth=config.memory_depth)
    return sum(w.size for w in jax.tree_util.tree_leaves(params.memory))


def run(config: Config, *, progress: bool = True) -> list[dict]:
    out = Path(config.out)
    save_config(config, out)
    params = init_neural_memory(jax.random.key(0), dim=config.dim, num_heads=config.heads,
                                head_dim=config.head_dim, memory_depth=config.memory_depth)
    cases = [(T, mode, m) for T in config.seq_lens for mode in MODES for m in methods(config)]
    rows = []
    with open(out / "results.jsonl", "w") as log:
        for T, mode, (name, impl, chunk) in tqdm(cases, desc="titans_memory", unit="case",
                                                  disable=not progress):
            kx, kr = jax.random.split(jax.random.key(T))
            x = jax.random.normal(kx, (config.batch, T, config.dim), jnp.float32)
            fn = _program(params, impl, chunk, mode, config.max_grad_norm)
            if mode == "fwd":
                args = (params, x)
            else:
                r = jax.random.normal(kr, (config.batch, T, config.heads, config.head_dim))
                args = (params, x, r)
            result = measure(fn, *args, repeats=config.repeats)
            row = {"T": T, "mode": mode, "method": name, **dataclasses.asdict(result)}
            rows.append(row)
            log.write(json.dumps(row) + "\n")
            log.flush()
    (out / "summary.md").write_text(summary_markdown(rows, config))
    return rows


def _index(rows: list[dict]) -> dict:
    return {(r["T"], r["mode"], r["method"]): r for r in rows}


def checks(rows: list[dict], config: Config) -> list[str]:
    """The issue's claims with the numbers behind them (where measured)."""
    idx = _index(rows)
    out = []
    per_token = memory_size(config) * 4 * config.batch
    for mode in MODES:
        seq = idx.get((TARGET_LENGTH, mode, "sequential"))
        for name, _, _ in methods(config):
            ours = idx.get((TARGET_LENGTH, mode, name))
            if name == "sequential" or not (seq and ours and seq["seconds"] and ours["seconds"]):
                continue
            ratio = seq["seconds"] / ours["seconds"]
            if name == "chunked 1":  # the same recurrence: no target, the ratio is reported
                out.append(f"INFO L={TARGET_LENGTH} {mode}: chunked 1 (the exact recurrence in "
                           f"the dual form) is {ratio:.1f}x faster than the token-by-token scan")
                continue
            verdict = "PASS" if ratio >= TARGET_SPEEDUP else "FAIL"
            out.append(f"{verdict} L={TARGET_LENGTH} {mode}: {name} is {ratio:.1f}x faster than "
                       f"sequential (target >= {TARGET_SPEEDUP:g}x)")
    for r in rows:
        if r["mode"] == "fwd+bwd" and r["method"] != "sequential" and r["T"] == max(
                config.seq_lens):
            gradients = per_token * r["T"]
            verdict = "PASS" if r["memory_bytes"] < gradients else "FAIL"
            out.append(f"{verdict} L={r['T']} fwd+bwd: {r['method']} compiled memory "
                       f"{r['memory_bytes'] / 2**20:,.1f} MiB < {gradients / 2**20:,.1f} MiB, "
                       "one memory-weight gradient per token")
    return out


def summary_markdown(rows: list[dict], config: Config) -> str:
    idx = _index(rows)
    names = [m[0] for m in methods(config)]
    cpu = platform.processor() or platform.machine()
    per_token = memory_size(config) * 4 * config.batch
    lines = ["# Titans neural memory: chunked vs sequential", "",
             f"Device: {jax.devices()[0].device_kind} ({cpu}), jax {jax.__version__}; "
             f"B={config.batch}, D={config.dim}, {config.heads} heads of {config.head_dim}, "
             f"memory depth {config.memory_depth}, max_grad_norm={config.max_grad_norm}, "
             "float32. Cells: median wall time / compiled temporaries+outputs. "
             f"One memory (all heads) holds {per_token / 2**10:,.0f} KiB; 'per-token grads' is "
             "L times that.", ""]
    chunked = [n for n in names if n != "sequential"]
    for mode in MODES:
        lines += [f"**{mode}**", "",
                  "| L | " + " | ".join(names) + " | per-token grads | "
                  + " | ".join(f"speed-up {n}" for n in chunked) + " |",
                  "|---|" + "---|" * (len(names) + 1 + len(chunked))]
        for T in config.seq_lens:
            cells = [table_cell(idx.get((T, mode, n)), unit="ms") for n in names]
            seq = idx.get((T, mode, "sequential"))
            ratios = []
            for n in chunked:
                ours = idx.get((T, mode, n))
                ok = seq and ours and seq["seconds"] and ours["seconds"]
                ratios.append(f"{seq['seconds'] / ours['seconds']:.1f}x" if ok else "—")
            lines.append(f"| {T} | " + " | ".join(cells)
                         + f" | {per_token * T / 2**20:,.0f} MiB | " + " | ".join(ratios) + " |")
        lines.append("")
    lines += ["**Checks**", ""] + [f"- {c}" for c in checks(rows, config) or ["none measured"]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    config = parse_config(PRESETS, argv, description=__doc__)
    run(config)
    print((Path(config.out) / "summary.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
