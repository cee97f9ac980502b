"""cce-gpu-check: it refuses a machine without CUDA with one line and status 2, and its dry run
(the same pipeline on the CPU at tiny shapes: the GPU tests under the interpreter, cce-bench with
the templates interpreted, the determinism stage) writes a complete report. Kept short for CI:
one GPU test and two benchmark implementations (one materialized, one through the templates);
a stage the budget cannot fit is recorded as skipped."""

from __future__ import annotations

import json

import pytest
import torch

from cce_inductor.tools import gpu_check


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA GPU is present: nothing to refuse")
def test_refuses_a_machine_without_cuda(tmp_path, capsys):
    assert gpu_check.main(["--out", str(tmp_path / "report")]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "needs a CUDA GPU" in error[0], error
    assert not (tmp_path / "report").exists()


def test_dry_run_writes_the_report(tmp_path, monkeypatch):
    monkeypatch.setattr(gpu_check, "BENCH_IMPLEMENTATIONS",
                        ("torch eager", 'cce-inductor backend="cce"'))
    out = tmp_path / "report"
    status = gpu_check.main(["--out", str(out), "--dry-run", "--preset", "gemma2-2b",
                             "--tests-k", "test_eager_call_runs_the_templates"])
    results = json.loads((out / "results.json").read_text())
    stages = {stage["name"]: stage for stage in results["stages"]}
    assert list(stages) == ["gpu tests", "bench gemma2-2b", "determinism"]
    assert status == 0, {name: (stage["status"], stage.get("reason"), stage.get("tail"))
                         for name, stage in stages.items()}
    assert stages["gpu tests"]["counts"] == {"passed": 1, "failed": 0, "errors": 0, "skipped": 0}
    rows = stages["bench gemma2-2b"]["bench"]["results"]
    assert {(row["implementation"], row["mode"]) for row in rows} == {
        (name, mode) for name in ("torch eager", 'cce-inductor backend="cce"')
        for mode in ("loss", "loss+grad")}
    templated = [row for row in rows if row["implementation"].startswith("cce-inductor")
                 and row["mode"] == "loss+grad"]
    assert templated[0]["filter_tiles"][1] > 0  # counted by the (interpreted) templates
    for mode in ("deterministic", "default"):
        determinism = stages["determinism"][mode]
        assert determinism["atomics_free"] and all(determinism["equal"].values()), mode
    report = (out / "report.md").read_text()
    for heading in ("## Time budget", "## GPU tests", "## cce-bench gemma2-2b",
                    "## Deterministic mode", "## Not exercised by a dry run"):
        assert heading in report, heading
    assert "1 passed, 0 failed, 0 errors, 0 skipped of 1 selected" in report
    assert 'cce-inductor backend="cce"' in report
    assert results["environment"]["packages"]["cce-inductor"] != "not installed"
    for log in ("gpu-tests.log", "bench-gemma2-2b.log"):
        assert (out / log).stat().st_size > 0


def test_stages_that_do_not_fit_are_skipped_with_the_reason(tmp_path):
    out = tmp_path / "report"
    assert gpu_check.main(["--out", str(out), "--dry-run", "--budget", "40"]) == 1
    stages = json.loads((out / "results.json").read_text())["stages"]
    assert [stage["status"] for stage in stages] == ["skipped"] * 4
    assert all("less than the 20 s a stage needs" in stage["reason"] for stage in stages)
    assert "skipped" in (out / "report.md").read_text()
