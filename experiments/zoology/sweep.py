"""Sweeps over Zoology's figure-2 grid: run, resume, tabulate, plot.

For every sequence length L (with its number of key-value pairs and batch size), mixer,
d_model and learning rate, :func:`sweep` trains one run in ``out/runs/<name>`` (skipping
finished runs, resuming unfinished ones), then writes ``out/results.jsonl`` (one line per
finished run), ``out/summary.md`` (the best accuracy over learning rates per mixer, L and
d_model, next to the paper's numbers where the notes have them) and
``out/figures/figure2.png`` (the paper's layout: one panel per L, accuracy against d_model,
one line per mixer) and ``out/figures/curves.png`` (test accuracy per epoch of the best run of
each mixer and d_model, one panel per L).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from experiments.common.plots import panels, save
from experiments.common.trainer import is_primary
from experiments.zoology.model import FIGURE2
from experiments.zoology.run import RunConfig, RunSettings, make_data, train_run

# Figure 2 of the paper, read off the plot (notes/zoology.md): (mixer, L, d_model) -> text.
PAPER = {
    **{("attention", L, d): "~1.0" for L in (64, 128, 256, 512) for d in (64, 128, 256, 512)},
    **{(m, 128, 64): "0.18-0.37" for m in ("base_conv", "hyena", "h3")},
    **{(m, 256, 64): "<= 0.15" for m in ("base_conv", "hyena", "h3")},
    **{(m, 512, d): "0.02-0.16" for m in ("base_conv", "hyena", "h3") for d in (64, 128, 256)},
    ("base_conv", 512, 512): "~0.70",
    ("hyena", 512, 512): "~0.18",
    ("h3", 512, 512): "~0.10",
}


@dataclass(frozen=True)
class SweepConfig:
    """A grid of runs. ``num_kv_pairs`` and ``batch_sizes`` give one value per sequence length;
    ``settings`` are shared by every run."""

    set_by_grid: ClassVar[tuple[str, ...]] = ("settings.train.learning_rate",
                                              "settings.train.batch_size")

    mixers: tuple[str, ...]
    seq_lens: tuple[int, ...]
    num_kv_pairs: tuple[int, ...]
    batch_sizes: tuple[int, ...]
    d_models: tuple[int, ...]
    learning_rates: tuple[float, ...]
    out: str
    settings: RunSettings = dataclasses.field(default_factory=RunSettings)

    def runs(self) -> list[RunConfig]:
        unknown = [m for m in self.mixers if m not in FIGURE2]
        if unknown:
            raise ValueError(f"mixers: unknown {unknown}; expected some of {sorted(FIGURE2)}")
        for name in ("num_kv_pairs", "batch_sizes"):
            if len(getattr(self, name)) != len(self.seq_lens):
                raise ValueError(f"{name}: expected one value per sequence length "
                                 f"{self.seq_lens}, got {getattr(self, name)}")
        return [RunConfig(mixer=mixer, seq_len=L, num_kv_pairs=kv, d_model=d,
                          learning_rate=lr, batch_size=batch, settings=self.settings)
                for L, kv, batch in zip(self.seq_lens, self.num_kv_pairs, self.batch_sizes,
                                        strict=True)
                for mixer in self.mixers for d in self.d_models for lr in self.learning_rates]


def sweep(config: SweepConfig) -> list[dict]:
    """Train every run of the grid that has not finished; write the tables and the figure."""
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    if is_primary():
        (out / "sweep_config.json").write_text(json.dumps(dataclasses.asdict(config),
                                                          indent=1))
    runs = config.runs()
    data_cache: dict[int, tuple] = {}
    for i, run in enumerate(runs):
        workdir = out / "runs" / run.name
        if (workdir / "result.json").exists():
            continue
        print(f"[{i + 1}/{len(runs)}] {run.name}", flush=True)
        key = run.seq_len
        if key not in data_cache:
            data_cache.clear()  # one length's data at a time
            data_cache[key] = make_data(run)
        train_run(run, workdir, prepared=data_cache[key])
        write_outputs(out, runs)
    return write_outputs(out, runs)


def collect(out: Path, runs: Sequence[RunConfig]) -> list[dict]:
    """One record per finished run: its config and its result."""
    records = []
    for run in runs:
        path = out / "runs" / run.name / "result.json"
        if path.exists():
            records.append(run.record() | json.loads(path.read_text()))
    return records


def best_over_learning_rates(records: Sequence[dict]) -> dict[tuple[str, int, int], dict]:
    """(mixer, L, d_model) -> the record with the highest final accuracy."""
    best: dict[tuple[str, int, int], dict] = {}
    for r in records:
        key = (r["mixer"], r["seq_len"], r["d_model"])
        if key not in best or r["metrics"]["accuracy"] > best[key]["metrics"]["accuracy"]:
            best[key] = r
    return best


def write_outputs(out: Path, runs: Sequence[RunConfig]) -> list[dict]:
    """results.jsonl, summary.md and the figures of the finished runs (written by process 0
    of a multi-process run)."""
    records = collect(out, runs)
    if not is_primary():
        return records
    (out / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    best = best_over_learning_rates(records)
    (out / "summary.md").write_text(summary_table(best, runs))
    if best:
        plot_figure2(best, out / "figures" / "figure2.png")
        plot_learning_curves(best, out, out / "figures" / "curves.png")
    return records


def summary_table(best: dict[tuple[str, int, int], dict], runs: Sequence[RunConfig]) -> str:
    """Markdown: one row per (mixer, d_model), one column per L; the paper beside ours."""
    mixers = list(dict.fromkeys(r.mixer for r in runs))
    lens = sorted({r.seq_len for r in runs})
    dims = sorted({r.d_model for r in runs})
    lines = ["# MQAR test accuracy (best over learning rates)", "",
             "Each cell: ours (best learning rate, epochs trained) / the paper's figure 2 "
             "where the notes give a value.", "",
             "| mixer | d_model | " + " | ".join(f"L={L}" for L in lens) + " |",
             "|---|---|" + "---|" * len(lens)]
    for mixer in mixers:
        for d in dims:
            cells = []
            for L in lens:
                r = best.get((mixer, L, d))
                ours = "—" if r is None else (f"{r['metrics']['accuracy']:.3f} "
                                              f"(lr {r['learning_rate']:.0e}, {r['epoch']} ep)")
                paper = PAPER.get((mixer, L, d))
                cells.append(ours if paper is None else f"{ours} / {paper}")
            lines.append(f"| {mixer} | {d} | " + " | ".join(cells) + " |")
    done = sum(1 for _ in best)
    lines += ["", f"{done} of {len({(r.mixer, r.seq_len, r.d_model) for r in runs})} "
              "(mixer, L, d_model) points have at least one finished run.", ""]
    return "\n".join(lines)


def _style(ax, L: int, xlabel: str) -> None:
    ax.set_title(f"L = {L}")
    ax.set_xlabel(xlabel)
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)


def plot_figure2(best: dict[tuple[str, int, int], dict], path: Path) -> None:
    """The paper's layout: a panel per L, accuracy against d_model, a line per mixer."""
    lens = sorted({L for _, L, _ in best})
    mixers = list(dict.fromkeys(m for m, _, _ in best))
    fig, axes = panels(len(lens))
    handles = {}
    for ax, L in zip(axes, lens, strict=True):
        for i, mixer in enumerate(mixers):
            points = sorted((d, r["metrics"]["accuracy"]) for (m, length, d), r in best.items()
                            if m == mixer and length == L)
            if points:
                handles[mixer], = ax.plot(*zip(*points, strict=True), marker="o",
                                          color=f"C{i}")
        ax.set_xscale("log", base=2)
        _style(ax, L, "model dimension")
    axes[0].set_ylabel("MQAR accuracy")
    _legend(axes[-1], handles, fontsize=8, loc="lower right")
    save(fig, path)


def _legend(ax, handles: dict, **options) -> None:
    """One legend of every line in the figure (a panel may lack some): same colours."""
    ax.legend(list(handles.values()), list(handles), **options)


def plot_learning_curves(best: dict[tuple[str, int, int], dict], out: Path, path: Path) -> None:
    """Test accuracy after each epoch of the best run per (mixer, d_model); a panel per L."""
    lens = sorted({L for _, L, _ in best})
    colours = {key: f"C{i}" for i, key in enumerate(dict.fromkeys((m, d) for m, _, d in best))}
    fig, axes = panels(len(lens))
    handles = {}
    for ax, L in zip(axes, lens, strict=True):
        for (mixer, length, d), record in best.items():
            if length != L:
                continue
            log = (out / "runs" / record["name"] / "metrics.jsonl").read_text().splitlines()
            epochs = [r for r in map(json.loads, log) if "valid_accuracy" in r]
            handles[f"{mixer} d={d}"], = ax.plot(
                [r["epoch"] + 1 for r in epochs], [r["valid_accuracy"] for r in epochs],
                marker=".", color=colours[mixer, d])
        _style(ax, L, "epoch")
    axes[0].set_ylabel("MQAR test accuracy")
    _legend(axes[-1], handles, fontsize=7, loc="best")
    save(fig, path)
