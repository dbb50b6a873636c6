"""Experiment plumbing: presets from the command line, the measurement helper, the CPU
benchmark end to end on a tiny configuration."""

from __future__ import annotations

import dataclasses
import json

import jax.numpy as jnp
import numpy as np
import pytest

from experiments.benchmarks import attention_cpu, attention_weights
from experiments.benchmarks.measure import measure, table_cell
from experiments.common.config import parse_config


@dataclasses.dataclass(frozen=True)
class _Config:
    lens: tuple[int, ...] = (1, 2)
    rate: float = 0.5
    flag: bool = False
    name: str = "a"


def test_parse_config_overrides_preset_fields():
    presets = {"small": _Config(), "big": _Config(lens=(8,), name="b")}
    assert parse_config(presets, []) == _Config()
    got = parse_config(presets, ["--preset", "big", "--lens", "3,4", "--flag", "true",
                                 "--rate", "0.25"])
    assert got == _Config(lens=(3, 4), rate=0.25, flag=True, name="b")
    with pytest.raises(SystemExit):
        parse_config(presets, ["--flag", "maybe"])


def test_measure_reports_memory_without_running_what_does_not_fit():
    x = jnp.ones((256, 256))
    result = measure(lambda a: a @ a, x, memory_budget=1)
    assert result.seconds is None and result.runs == 0 and "GiB" in result.note
    assert result.memory_bytes >= 256 * 256 * 4
    ran = measure(lambda a: a @ a, x, repeats=2)
    assert ran.seconds > 0 and ran.runs == 2



def test_table_cell_formats():
    row = {"seconds": 1.6934, "memory_bytes": 3 * 2**30, "note": ""}
    assert table_cell(row, unit="ms") == "1,693 ms / 3,072 MiB"
    assert table_cell({**row, "seconds": 0.0366}, unit="ms") == "36.6 ms / 3,072 MiB"
    assert table_cell({**row, "seconds": None, "note": "too big"}) == "not run (too big)"
    assert table_cell(None) == "—"


def test_attention_benchmark_smoke(tmp_path):
    out = tmp_path / "bench"
    attention_cpu.main(["--seq-lens", "64", "--heads", "2", "--head-dim", "8", "--repeats", "1",
                        "--methods", "jattn chunked,jax.nn xla", "--out", str(out)])
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert len(rows) == 2 * 2 * 2  # causal x mode x method
    assert all(r["seconds"] > 0 and r["memory_bytes"] > 0 for r in rows)
    summary = (out / "summary.md").read_text()
    assert "| 64 | yes |" in summary and "jattn chunked" in summary
    assert (out / "figures" / "attention_cpu.png").stat().st_size > 10_000
    assert json.loads((out / "config.json").read_text())["seq_lens"] == [64]


def test_mqar_data_benchmark_smoke(tmp_path):
    from experiments.benchmarks import mqar_data

    mqar_data.main(["--rows", "50", "--baseline-rows", "5", "--out", str(tmp_path)])
    summary = (tmp_path / "summary.md").read_text()
    assert summary.count("\n| ") == 1 + len(mqar_data.GRID)  # header + one row per length


def test_mqar_throughput_benchmark_smoke(tmp_path):
    from experiments.benchmarks import mqar_throughput

    mqar_throughput.main(["--mixers", "attention", "--d-models", "16", "--seq-len", "16",
                          "--num-kv-pairs", "2", "--batch-size", "8", "--vocab-size", "64",
                          "--repeats", "1", "--out", str(tmp_path)])
    (row,) = json.loads((tmp_path / "results.json").read_text())
    assert row["ours"]["seconds_per_step"] > 0 and row["full head"]["seconds_per_step"] > 0
    assert row["trainer mesh"]["seconds_per_step"] > 0 and row["devices"] >= 1
    assert row["ours"]["tokens_per_second"] == pytest.approx(
        8 * 16 / row["ours"]["seconds_per_step"])
    assert row["original_seconds_per_step"] is None  # the notes' numbers are for L=128 only
    assert "| attention | 16 |" in (tmp_path / "results.md").read_text()


def test_cab_efficiency_length_solves_the_fitted_curves():
    from experiments.benchmarks import cab

    L = np.array([256.0, 512, 1024, 2048])
    vanilla = cab.fit(L, 2e-6 * L**2 + 1e-3 * L + 0.5, 2)
    linear = cab.fit(L, 3e-3 * L + 0.1, 1)
    assert vanilla.r2 == pytest.approx(1.0) and linear.r2 == pytest.approx(1.0)
    # 2e-6 L^2 - 2e-3 L + 0.4 = 0  ->  L = (2e-3 + sqrt(4e-6 - 3.2e-6)) / 4e-6
    want = (2e-3 + np.sqrt(4e-6 - 4 * 2e-6 * 0.4)) / 4e-6
    assert cab.efficiency_length(vanilla, linear) == pytest.approx(want, rel=1e-6)
    constant = cab.fit(L, np.full(4, 5.0), 1)  # 1e-9 L^2 = 5 at L = sqrt(5e9)
    assert cab.efficiency_length(cab.fit(L, 1e-9 * L**2, 2), constant) == pytest.approx(
        np.sqrt(5e9), rel=1e-6)
    quadratic = cab.fit(L, 1e-3 * L**2 + 1.0, 2)
    assert cab.efficiency_length(quadratic, cab.fit(L, 0.5 + 0 * L, 1)) == 0.0  # always cheaper
    concave = cab.fit(L, -1e-6 * L**2 + L + 1.0, 2)  # a noisy vanilla fit can bend down
    assert cab.efficiency_length(concave, cab.fit(L, 2 * L + 10.0, 1)) == np.inf  # never


@pytest.mark.slow
def test_cab_benchmark_smoke(tmp_path):
    from experiments.benchmarks import cab

    # One pattern (three lengths are the fewest the quadratic fit takes): every method of it.
    cab.main(["--seq-lens", "16,32,64", "--patterns", "causal self", "--batch", "1",
              "--heads", "2", "--head-dim", "8", "--repeats", "1", "--out", str(tmp_path)])
    rows = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert {r["method"] for r in rows} == {
        name for name, method in cab.methods().items() if "causal self" in method.patterns}
    assert all(r["seconds"] > 0 for r in rows)
    summary = (tmp_path / "summary.md").read_text()
    assert "Efficiency length" in summary and "| causal self | fwd | linear elu+1 |" in summary
    assert (tmp_path / "figures" / "cab_causal_self.png").stat().st_size > 0


def test_attention_weights_benchmark_smoke(tmp_path):
    out = tmp_path / "weights"
    attention_weights.main(["--seq-len", "64", "--heads", "2", "--head-dim", "8", "--rows", "4",
                            "--repeats", "1", "--out", str(out)])
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert [r["program"] for r in rows] == ["forward", "forward + rows", "rows from lse",
                                            "dense weights"]
    assert all(r["seconds"] > 0 and r["memory_bytes"] > 0 for r in rows)
    assert "target" in (out / "summary.md").read_text()


def test_block_sparse_benchmark_smoke(tmp_path):
    from experiments.benchmarks import block_sparse

    out = tmp_path / "block_sparse"
    block_sparse.main(["--length", "64", "--kernel", "7", "--alibi-length", "64",
                       "--repeats", "1", "--out", str(out)])
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert [(r["case"], r["program"]) for r in rows] == [
        ("neighborhood", "neighborhood"), ("neighborhood", "sliding window (chunked)"),
        ("neighborhood", "causal (chunked)"), ("alibi", "chunked"),
        ("alibi", "chunked + ALiBi score_mod")]
    assert all(r["memory_bytes"] > 0 for r in rows)
    assert "target" in (out / "summary.md").read_text()
