"""experiments.benchmarks.gpu_suite: the --dry-run pipeline on CPU (tests, benchmark, targets,
JSON + markdown), the no-GPU message, and the pieces (FLOPs, masks, JUnit counts, the native
pallas_call switch)."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest

from experiments.benchmarks import gpu_suite as gs


def test_dry_run_writes_json_and_markdown(tmp_path, capsys):
    assert gs.main(["--out", str(tmp_path), "--dry-run"]) == 0
    report = json.loads((tmp_path / "results.json").read_text())
    assert {"date", "device", "jax", "preset", "config", "tests", "benchmark",
            "targets"} <= set(report)
    assert report["preset"] == "dry-run" and report["config"]["interpret"]
    (tests,) = report["tests"]
    assert tests["passed"] == tests["tests"] >= 1 and tests["failed"] == tests["errors"] == 0

    rows = report["benchmark"]
    cfg = gs.PRESETS["dry-run"]
    dense = [r for r in rows if r["kind"] == "dense"]
    masked = [r for r in rows if r["kind"] == "masked"]
    assert len(dense) == len(gs.dense_cases(cfg)) * len(gs.DENSE_METHODS) * len(gs.MODES)
    assert len(masked) == len(gs.masked_cases(cfg)) * len(gs.MASKED_METHODS) * len(gs.MODES)
    for row in rows:
        assert {"T", "S", "H", "B", "N", "causal", "mask", "method", "mode", "flops",
                "seconds", "tflops", "note"} <= set(row)
        assert row["B"] * row["T"] == cfg.tokens
        if row["seconds"] is None:
            assert row["note"]  # a reason for every missing number
        else:
            assert row["seconds"] > 0
            np.testing.assert_allclose(row["tflops"], row["flops"] / row["seconds"] / 1e12)
    measured = {(r["method"], r["kind"]) for r in rows if r["seconds"] is not None}
    assert {("pallas", "dense"), ("xla", "dense"), ("pallas", "masked"),
            ("xla+mask", "masked")} <= measured
    if jax.default_backend() != "gpu":
        assert all(r["seconds"] is None and r["note"] == "needs a GPU"
                   for r in rows if r["method"] in ("cudnn", "cudnn+mask"))
    names = [t["target"] for t in report["targets"]]
    assert names[:2] == ["forward causal vs cuDNN", "forward causal vs JAX Pallas mha"]
    assert len(names) == 6
    assert report["targets"][0]["status"] == "not measured"  # no cuDNN on a CPU

    summary = (tmp_path / "summary.md").read_text()
    assert report["date"] in summary and report["device"] in summary
    for heading in ("## Kernel tests", "## Dense, fwd, TFLOP/s", "## Dense, bwd, TFLOP/s",
                    "## Dense, fwd+bwd, TFLOP/s", "## Masked", "## Targets", "Dry run"):
        assert heading in summary
    assert "wrote" in capsys.readouterr().out


def test_without_a_gpu_it_says_so(tmp_path, capsys):
    if jax.default_backend() == "gpu":
        pytest.skip("this machine has a GPU")
    assert gs.main(["--out", str(tmp_path / "x")]) == 2
    assert "no GPU" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_shapes_and_flops():
    cfg = gs.PRESETS["full"]
    cases = gs.dense_cases(cfg)
    assert len(cases) == 5 * 3 * 2
    for case in cases:
        assert case["B"] * case["T"] == 16384 and case["N"] * case["H"] == 2048
    case = dict(kind="dense", B=2, N=16, T=8192, S=8192, H=128, causal=True)
    assert gs.forward_flops(case, cfg) == 4 * 2 * 16 * 8192 * 8192 * 128 / 2
    assert gs.FLOP_FACTOR == {"fwd": 1.0, "bwd": 2.5, "fwd+bwd": 3.5}
    quick = gs.PRESETS["quick"]
    assert quick.target_seq_len in quick.seq_lens and quick.target_head_dim in quick.head_dims


@pytest.mark.parametrize("mask", gs.MASKS)
def test_masked_cases_count_what_the_explicit_mask_allows(mask):
    cfg = gs.Config(window=5)
    allowed = gs.explicit_mask(mask, 40, cfg)
    assert allowed.shape == (1, 1, 40, 40)
    assert gs.masked_allowed_pairs(mask, 40, cfg) == allowed.sum()
    assert not np.triu(allowed[0, 0], 1).any()  # causal
    ids = gs.document_ids(40, 4)
    assert sorted(set(ids.tolist())) == [0, 1, 2, 3] and (np.diff(ids) >= 0).all()
    if mask == "window":
        assert allowed[0, 0].sum(1).max() == 5


def test_junit_counts(tmp_path):
    (tmp_path / "r.xml").write_text(
        '<testsuites><testsuite name="pytest" tests="4">'
        '<testcase classname="t" name="a"/>'
        '<testcase classname="t" name="b"><failure message="x"/></testcase>'
        '<testcase classname="t" name="c"><skipped/></testcase>'
        '<testcase classname="t" name="d"><error message="y"/></testcase>'
        '</testsuite></testsuites>')
    counts = gs.junit_counts(tmp_path / "r.xml")
    assert counts == {"tests": 4, "passed": 1, "failed": 1, "errors": 1, "skipped": 1,
                      "failures": ["t::b", "t::d"]}


def test_native_kernels_need_a_gpu():
    if jax.default_backend() != "gpu":
        with pytest.raises(RuntimeError, match="needs a GPU"):
            gs.force_native_gpu_kernels()


def test_targets_compare_speed_ratios():
    cfg = gs.Config()
    base = dict(kind="dense", mask="causal", mode="fwd", T=8192, H=128)
    rows = [dict(base, method="pallas", seconds=1.0), dict(base, method="cudnn", seconds=0.9),
            dict(base, method="pallas_mha", seconds=1.2)]
    targets = {t["target"]: t for t in gs.check_targets(rows, cfg)}
    assert targets["forward causal vs cuDNN"]["status"] == "pass"  # 0.9x >= 0.8x
    assert targets["forward causal vs JAX Pallas mha"]["status"] == "fail"  # 1.2x < 1.3x
    assert targets["window fwd vs cuDNN + explicit mask"]["status"] == "not measured"


def test_the_kernel_switch_turns_interpret_off(monkeypatch):
    """After ``force_compiled()`` the GPU kernel asks Pallas for compiled kernels whatever the
    caller passes (recorded here, as a CPU cannot compile them); off again, it interprets."""
    from pallas_kernels.flash import gpu

    seen = []
    real = gpu.pl.pallas_call

    def recording(*args, **kwargs):
        seen.append((kwargs["name"], kwargs["interpret"]))
        return real(*args, **(kwargs | {"interpret": True}))

    monkeypatch.setattr(gpu.pl, "pallas_call", recording)
    q = jax.numpy.ones((1, 20, 1, 16))
    try:
        gpu.force_compiled()
        out, _ = gpu.flash_attention(q, q, q, hi=0, interpret=True)
    finally:
        gpu.force_compiled(False)
    gpu.flash_attention(q, q, q, hi=0, interpret=True)
    assert out.shape == q.shape
    assert seen == [("flash_forward", False), ("flash_forward", True)]
