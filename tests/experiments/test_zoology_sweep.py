"""The sweep CLI: runs a grid, writes results/summary/figure, skips finished runs."""

from __future__ import annotations

import json

import pytest

from experiments.zoology import __main__ as cli
from experiments.zoology import sweep as sweep_module
from experiments.zoology.presets import PRESETS
from experiments.zoology.sweep import SweepConfig, best_over_learning_rates, summary_table

TINY = ["--mixers", "attention,base_conv", "--seq-lens", "16", "--num-kv-pairs", "2",
        "--batch-sizes", "32", "--d-models", "16", "--learning-rates", "3e-3,1e-3",
        "--vocab-size", "64", "--num-train", "128", "--num-test", "32", "--max-epochs", "1",
        "--progress", "false"]


def test_cli_runs_the_grid_then_skips_finished_runs(tmp_path, monkeypatch, capsys):
    out = tmp_path / "sweep"
    cli.main(["--preset", "quick", *TINY, "--out", str(out)])
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert sorted((r["mixer"], r["learning_rate"]) for r in records) == [
        ("attention", 1e-3), ("attention", 3e-3), ("base_conv", 1e-3), ("base_conv", 3e-3)]
    assert all(0.0 <= r["metrics"]["accuracy"] <= 1.0 and r["epoch"] == 1 for r in records)
    assert (out / "figures" / "figure2.png").stat().st_size > 1000
    assert (out / "figures" / "curves.png").stat().st_size > 1000
    assert "| attention | 16 |" in (out / "summary.md").read_text()
    assert "summary" not in capsys.readouterr().err

    def no_training(*args, **kwargs):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr(sweep_module, "train_run", no_training)
    cli.main(["--preset", "quick", *TINY, "--out", str(out)])


def test_best_over_learning_rates_and_the_table():
    def record(lr, acc):
        return {"mixer": "attention", "seq_len": 64, "d_model": 64, "learning_rate": lr,
                "epoch": 3, "metrics": {"accuracy": acc}}

    best = best_over_learning_rates([record(1e-3, 0.4), record(1e-2, 0.9), record(1e-4, 0.1)])
    assert best[("attention", 64, 64)]["learning_rate"] == 1e-2
    table = summary_table(best, SweepConfig(**{**PRESETS["quick"].__dict__,
                                               "seq_lens": (64,), "d_models": (64,)}).runs())
    assert "0.900 (lr 1e-02, 3 ep) / ~1.0" in table


def test_grid_lists_must_match_the_lengths_and_mixers_exist():
    config = SweepConfig(**{**PRESETS["paper"].__dict__, "batch_sizes": (512,)})
    with pytest.raises(ValueError, match="batch_sizes"):
        config.runs()
    with pytest.raises(ValueError, match="mixers: unknown"):
        SweepConfig(**{**PRESETS["paper"].__dict__, "mixers": ("retnet",)}).runs()


def test_paper_preset_is_the_figure_2_grid():
    runs = PRESETS["paper"].runs()
    assert len(runs) == 7 * 4 * 4 * 4
    assert {(r.seq_len, r.num_kv_pairs, r.batch_size) for r in runs} == {
        (64, 4, 512), (128, 8, 512), (256, 16, 256), (512, 64, 128)}
    assert all(r.settings.vocab_size == 8192 and r.settings.num_train == 100_000
               and r.settings.num_test == 3_000 and r.train.max_epochs == 64 for r in runs)


def test_cli_help_lists_every_mixer():
    from experiments.zoology.model import FIGURE2

    assert [m for m in FIGURE2 if m not in cli.__doc__] == []
