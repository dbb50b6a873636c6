"""Per-device memory of context-parallel attention, from the compiled programs (issue 26).

    python -m experiments.benchmarks.context_parallel --preset quick   # 8 x 2k against 1 x 2k
    python -m experiments.benchmarks.context_parallel --preset full    # 8 x 8k = 64k tokens

The claim to check: with the sequence sharded over D devices, each device needs about what
one device needs for T / D tokens. Causal attention forward+backward (gradients w.r.t.
query, key and value; 8 heads of 64, batch 1, float32) is compiled, not run, for

* 1 device at ``per_device`` tokens: chunked softmax attention (the baseline), and the
  ring on a one-device mesh;
* 2, 4 and ``devices`` simulated host devices at ``per_device`` tokens each, for the ring
  (zig-zag) and the all-to-all strategy (O(T / D) memory: the same per device);

and the compiled memory of one device's program (temporaries + outputs: the arguments are
the same shards in every case) is reported, with the [N, T, T] float32 logits that
materialised attention would need at the long length. The per-device chunk pairs of the
ring (``jattn.parallel.ring_work``) are listed for both layouts.

The simulated devices are set with ``XLA_FLAGS=--xla_force_host_platform_device_count``
before JAX starts (unless XLA_FLAGS is set already). Writes config.json, results.jsonl and
summary.md under ``out``.
"""

from __future__ import annotations

import os

if "XLA_FLAGS" not in os.environ:  # before JAX starts: the simulated devices
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import jattn
from experiments.benchmarks.measure import run_benchmark
from jattn.parallel import context_parallel_attention, ring_work

HEADS, HEAD_DIM = 8, 64


@dataclasses.dataclass(frozen=True)
class Config:
    devices: int = 8
    per_device: int = 2048
    out: str = "results/benchmarks/context_parallel/quick"


PRESETS = {
    "quick": Config(),
    "full": Config(per_device=8192, out="results/benchmarks/context_parallel/full"),
}


def compiled_memory(devices: int, length: int, strategy: str | None) -> int:
    """Temporaries + outputs of one device's compiled forward+backward program; strategy
    None: plain chunked attention on one device."""
    mesh = Mesh(np.asarray(jax.devices()[:devices]), ("seq",))
    shape = jax.ShapeDtypeStruct((1, length, HEADS, HEAD_DIM), jnp.float32,
                                 sharding=NamedSharding(mesh, P(None, "seq")))

    def loss(q, k, v):
        if strategy is None:
            return jattn.dot_product_attention(q, k, v, is_causal=True,
                                               implementation="chunked").sum()
        out = context_parallel_attention(q, k, v, mesh=mesh, strategy=strategy,
                                         is_causal=True, implementation="chunked")
        return out.sum()

    grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
    analysis = grad.lower(shape, shape, shape).compile().memory_analysis()
    return int(analysis.temp_size_in_bytes + analysis.output_size_in_bytes)


def run(config: Config) -> list[dict]:
    if jax.device_count() < config.devices:
        raise SystemExit(f"{config.devices} devices wanted, JAX sees {jax.device_count()}: "
                         f"start with XLA_FLAGS=--xla_force_host_platform_device_count="
                         f"{config.devices}")
    long = config.devices * config.per_device
    rows = [{"strategy": "chunked softmax (one device)", "devices": 1,
             "length": config.per_device,
             "memory_bytes": compiled_memory(1, config.per_device, None)},
            {"strategy": "ring (one device)", "devices": 1, "length": config.per_device,
             "memory_bytes": compiled_memory(1, config.per_device, "ring")}]
    counts = [d for d in (2, 4) if d < config.devices] + [config.devices]
    for strategy in ("ring", "all_to_all"):
        for devices in counts:  # the same tokens per device on more devices
            length = devices * config.per_device
            rows.append({"strategy": strategy, "devices": devices, "length": length,
                         "memory_bytes": compiled_memory(devices, length, strategy)})
    rows.append({"strategy": "materialised logits [N, T, T] (size only)", "devices": 1,
                 "length": long, "memory_bytes": HEADS * long * long * 4})
    for balanced in (False, True):
        work = ring_work(config.devices, load_balance=balanced)
        rows.append({"layout": "zig-zag" if balanced else "natural",
                     "full_pairs": work[:, 0].tolist(), "diagonal_pairs": work[:, 1].tolist()})
    return rows


def summary(config: Config, rows: list[dict]) -> str:
    base = rows[0]["memory_bytes"]
    lines = [
        f"# Context-parallel attention: compiled memory per device ({jax.__version__}, "
        f"{jax.devices()[0].platform}, {config.devices} devices)",
        "",
        f"Causal forward+backward, batch 1, {HEADS} heads of {HEAD_DIM}, float32; "
        "temporaries + outputs of one device's program.",
        "",
        "| strategy | devices | tokens | per-device memory | vs one device at T / D |",
        "|---|---:|---:|---:|---:|",
    ]
    for row in rows:
        if "strategy" not in row:
            continue
        mib = row["memory_bytes"] / 2**20
        lines.append(f"| {row['strategy']} | {row['devices']} | {row['length']:,} | "
                     f"{mib:,.0f} MiB | {row['memory_bytes'] / base:.2f}x |")
    lines += ["", "Chunk pairs per device over one causal ring (full, diagonal):", ""]
    for row in rows:
        if "layout" in row:
            pairs = ", ".join(f"({f}, {d})" for f, d in zip(row["full_pairs"],
                                                             row["diagonal_pairs"],
                                                             strict=True))
            lines.append(f"- {row['layout']}: {pairs}")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    run_benchmark(PRESETS, run, summary, argv, description=__doc__)

if __name__ == "__main__":
    main()
