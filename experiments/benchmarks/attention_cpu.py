"""CPU benchmark: materialised ("xla") vs chunked softmax attention, with baselines.

    python -m experiments.benchmarks.attention_cpu --preset quick   # T = 1k, 2k (~1 min)
    python -m experiments.benchmarks.attention_cpu --preset full    # T = 1k .. 32k (~20 min)
    python -m experiments.benchmarks.attention_cpu --preset small   # B = 8, T = 128 .. 1k

Forward and forward+backward wall time and compiled memory (temporaries + outputs) of
jattn "xla", jattn "chunked", jax.nn.dot_product_attention (xla) and, when installed
(``pip install -e .[bench]``), tokamax.dot_product_attention(implementation="xla_chunked"),
causal and non-causal, B=1, N=8, H=64, float32. Every method runs in the same process;
ratios are against jax.nn. Writes config.json, results.jsonl, summary.md and
figures/attention_cpu.png under --out.
"""

from __future__ import annotations

import dataclasses
import json
import platform
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
from tqdm import tqdm

import jattn
from experiments.benchmarks.measure import measure, table_cell
from experiments.common.config import parse_config, save_config

BASELINE = "jax.nn xla"
MODES = ("fwd", "fwd+bwd")


@dataclasses.dataclass(frozen=True)
class Config:
    seq_lens: tuple[int, ...] = (1024, 2048)
    batch: int = 1
    heads: int = 8
    head_dim: int = 64
    repeats: int = 3
    methods: tuple[str, ...] = ("jattn chunked", "jattn xla", "jax.nn xla", "tokamax xla_chunked")
    out: str = "results/attention_cpu"


PRESETS = {
    "quick": Config(),
    "full": Config(seq_lens=(1024, 2048, 4096, 8192, 16384, 32768)),
    # Where "xla" and "chunked" cross over: what implementation=None should pick.
    "small": Config(seq_lens=(128, 256, 512, 1024), batch=8,
                    methods=("jattn chunked", "jattn xla", "jax.nn xla"), repeats=7),
}


def attention_methods() -> dict[str, Callable]:
    """name -> f(q, k, v, is_causal) -> output."""
    methods = {
        "jattn chunked": lambda q, k, v, c: jattn.dot_product_attention(
            q, k, v, is_causal=c, implementation="chunked"),
        "jattn xla": lambda q, k, v, c: jattn.dot_product_attention(
            q, k, v, is_causal=c, implementation="xla"),
        BASELINE: lambda q, k, v, c: jax.nn.dot_product_attention(
            q, k, v, is_causal=c, implementation="xla"),
    }
    try:
        import tokamax
    except ImportError:
        print("tokamax not installed (pip install -e .[bench]); skipping its baseline")
    else:
        from absl import flags

        # tokamax reads absl flags from sys.argv on first use and rejects ours.
        flags.FLAGS.mark_as_parsed()
        methods["tokamax xla_chunked"] = lambda q, k, v, c: tokamax.dot_product_attention(
            q, k, v, is_causal=c, implementation="xla_chunked")
    return methods


def _program(method: Callable, is_causal: bool, mode: str) -> Callable:
    def forward(q, k, v):
        return method(q, k, v, is_causal)

    if mode == "fwd":
        return forward
    return jax.grad(lambda q, k, v: forward(q, k, v).sum(), argnums=(0, 1, 2))


def run(config: Config) -> list[dict]:
    out = Path(config.out)
    save_config(config, out)
    available = attention_methods()
    names = [m for m in config.methods if m in available]
    cases = [(T, causal, mode, name) for T in config.seq_lens for causal in (False, True)
             for mode in MODES for name in names]
    rows = []
    with open(out / "results.jsonl", "w") as log:
        for T, causal, mode, name in tqdm(cases, desc="attention_cpu", unit="case"):
            shape = (config.batch, T, config.heads, config.head_dim)
            keys = jax.random.split(jax.random.key(T), 3)
            q, k, v = (jax.random.normal(key, shape, jnp.float32) for key in keys)
            result = measure(_program(available[name], causal, mode), q, k, v,
                             repeats=config.repeats)
            row = {"T": T, "causal": causal, "mode": mode, "method": name,
                   **dataclasses.asdict(result)}
            rows.append(row)
            log.write(json.dumps(row) + "\n")
            log.flush()
    return rows


def _index(rows: list[dict]) -> dict:
    return {(r["T"], r["causal"], r["mode"], r["method"]): r for r in rows}


def summary_markdown(rows: list[dict], config: Config) -> str:
    idx = _index(rows)
    names = list(dict.fromkeys(r["method"] for r in rows))
    cpu = platform.processor() or platform.machine()
    lines = [f"Device: {jax.devices()[0].device_kind} ({cpu}, {jax.device_count()} JAX "
             f"device), jax {jax.__version__}; B={config.batch}, "
             f"N={config.heads}, H={config.head_dim}, float32. Cells: median wall time / compiled "
             f"temporaries+outputs. Ratios: jattn chunked over {BASELINE}.", ""]
    for mode in MODES:
        lines += [f"**{mode}**", "",
                  "| T | causal | " + " | ".join(names) + " | time ratio | memory ratio |",
                  "|---|---|" + "---|" * (len(names) + 2)]
        for T in config.seq_lens:
            for causal in (False, True):
                cells = [table_cell(idx.get((T, causal, mode, n))) for n in names]
                ours, base = idx.get((T, causal, mode, "jattn chunked")), idx.get(
                    (T, causal, mode, BASELINE))
                t_ratio = m_ratio = "—"
                if ours and base and ours["seconds"] and base["seconds"]:
                    t_ratio = f"{ours['seconds'] / base['seconds']:.2f}"
                if ours and base:
                    m_ratio = f"{ours['memory_bytes'] / base['memory_bytes']:.3f}"
                lines.append(f"| {T} | {'yes' if causal else 'no'} | " + " | ".join(cells)
                             + f" | {t_ratio} | {m_ratio} |")
        lines.append("")
    claims = checks(rows) or ["none: the issue's claims are about T = 8k and 32k"]
    lines += ["**Checks**", ""] + [f"- {c}" for c in claims]
    return "\n".join(lines) + "\n"


def checks(rows: list[dict]) -> list[str]:
    """The issue's claims, each stated with the numbers behind it (only where measured)."""
    idx = _index(rows)
    out = []

    def get(T, is_causal, mode, method):
        return idx.get((T, is_causal, mode, method))

    def verdict(ok: bool) -> str:
        return "PASS" if ok else "FAIL"

    longest = 32768
    for mode in MODES:
        ours = get(longest, False, mode, "jattn chunked")
        for other in ("jattn xla", BASELINE):
            theirs = get(longest, False, mode, other)
            if ours and theirs and ours["seconds"] is not None:
                if theirs["seconds"] is None:
                    out.append(f"{verdict(True)} T={longest} {mode}: chunked ran in "
                               f"{ours['seconds']:.3g} s; {other} cannot ({theirs['note']})")
                else:
                    ratio = theirs["memory_bytes"] / ours["memory_bytes"]
                    out.append(f"{verdict(ratio >= 8)} T={longest} {mode}: {other} uses "
                               f"{ratio:.1f}x chunked's memory (want >= 8x)")
    T = 8192
    for mode in MODES:
        ours = get(T, False, mode, "jattn chunked")
        if not ours:
            continue
        for other, limit in (("jattn xla", 0.25), (BASELINE, 0.25), ("tokamax xla_chunked", 1.0)):
            theirs = get(T, False, mode, other)
            if theirs:
                ratio = ours["memory_bytes"] / theirs["memory_bytes"]
                out.append(f"{verdict(ratio <= limit)} T={T} {mode}: chunked memory is "
                           f"{ratio:.3f}x {other}'s (want <= {limit})")
        causal = get(T, True, mode, "jattn chunked")
        if causal and ours["seconds"] and causal["seconds"]:
            ratio = causal["seconds"] / ours["seconds"]
            out.append(f"{verdict(ratio <= 0.6)} T={T} {mode}: causal chunked takes {ratio:.2f}x "
                       f"non-causal chunked's time (want <= 0.6)")
        tok = get(T, True, mode, "tokamax xla_chunked")
        if causal and tok and causal["seconds"] and tok["seconds"]:
            ratio = causal["seconds"] / tok["seconds"]
            out.append(f"{verdict(ratio <= 0.5)} T={T} {mode}: causal chunked takes {ratio:.2f}x "
                       f"tokamax's causal time (want <= 0.5)")
    return out


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(2, 2, figsize=(11, 8), constrained_layout=True)
    names = list(dict.fromkeys(r["method"] for r in rows))
    colors = dict(zip(names, plt.rcParams["axes.prop_cycle"].by_key()["color"], strict=False))
    for i, mode in enumerate(MODES):
        for j, (field, scale, label) in enumerate((("seconds", 1, "time (s)"),
                                                   ("memory_bytes", 2**20, "memory (MiB)"))):
            ax = axes[i, j]
            for name in names:
                for causal, style in ((False, "-"), (True, "--")):
                    pts = sorted((r["T"], r[field] / scale) for r in rows
                                 if r["method"] == name and r["causal"] == causal
                                 and r["mode"] == mode and r["seconds"] is not None)
                    if pts:
                        ax.plot(*zip(*pts, strict=True), style, marker="o", color=colors[name],
                                label=f"{name}{' causal' if causal else ''}")
            ax.set(xscale="log", yscale="log", xlabel="sequence length T", ylabel=label,
                   title=f"{mode}: {label.split(' ')[0]}")
            ax.grid(True, which="both", alpha=0.3)
    axes[0, 0].legend(fontsize=7)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> None:
    config = parse_config(PRESETS, argv, description=__doc__.split("\n")[0])
    rows = run(config)
    out = Path(config.out)
    plot(rows, out / "figures" / "attention_cpu.png")
    text = summary_markdown(rows, config)
    (out / "summary.md").write_text(text)
    print(text)
    print(f"wrote {out / 'summary.md'} and {out / 'figures' / 'attention_cpu.png'}")


if __name__ == "__main__":
    main()
