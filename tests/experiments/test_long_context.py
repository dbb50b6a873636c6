"""The long-context passkey experiment (issue 26): its CLI and outputs on a one-device ring,
the ring's evaluation equal to the one-device model's, and its input checks."""

from __future__ import annotations

import dataclasses
import json

import pytest

from experiments.long_context import run
from experiments.long_context.__main__ import main


@pytest.mark.slow
def test_cli_smoke_writes_outputs_and_the_ring_agrees_with_one_device(tmp_path):
    out = tmp_path / "long"
    assert main(["--preset", "quick", "--devices", "1", "--train-len", "32",
                 "--eval-lens", "32,64", "--num-train", "64", "--num-eval", "4",
                 "--eval-batch", "2", "--batch-size", "8", "--max-epochs", "1",
                 "--eval-batch-size", "4", "--progress", "false", "--out", str(out)]) == 0
    for name in ("config.json", "results.json", "summary.md", "figures/long_context.png",
                 "run/metrics.jsonl"):
        assert (out / name).stat().st_size > 0, name
    result = json.loads((out / "results.json").read_text())
    assert [row["length"] for row in result["eval"]] == [32, 64]
    for row in result["eval"]:
        assert 0 <= row["accuracy"] <= 1 and row["forward_seconds"] > 0
        assert row["forward_memory_bytes"] > 0
    # The first evaluation length is the training length and the same rows (seed stream 2):
    # the ring's model and the plain one-device model get the same accuracy.
    assert result["eval"][0]["accuracy"] == result["train_len_accuracy_one_device"]
    step = result["train_step"]
    assert step["length"] == 64 and step["train_step_seconds"] > 0
    assert result["materialised_logits_bytes"] == 2 * 2 * 64 ** 2 * 4  # B, N, T, T float32
    assert "| 64 |" in (out / "summary.md").read_text()
    # A finished run is read back, not redone.
    assert run.run_long_context(dataclasses.replace(
        run.PRESETS["quick"], devices=1, train_len=32, eval_lens=(32, 64),
        eval_batch=2, num_eval=4, out=str(out))) == result


@pytest.mark.parametrize("change, message", [
    (dict(devices=2), "devices: 2 wanted"),
    (dict(devices=1, eval_lens=(256, 101)), "eval_lens: 101"),
    (dict(devices=1, num_eval=5, eval_batch=2), "num_eval: 5"),
])
def test_bad_settings_are_rejected(change, message):
    with pytest.raises(ValueError, match=message):
        run.check(dataclasses.replace(run.PRESETS["quick"], **change))
