"""benchmarks/gpu_check.py: harmless on a CPU-only machine, and every stage works in its CPU dry run.

These check that the script runs, never how fast anything is; its GPU figures come from a GPU machine.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"


def run_check(*arguments: str, tmp_path: Path) -> subprocess.CompletedProcess:
    # TMPDIR: the script's scratch folder (notebook data, runs/, the test report) lands under tmp_path.
    env = os.environ | {"PYTHONPATH": str(ROOT), "TMPDIR": str(tmp_path)}
    return subprocess.run(
        [sys.executable, SCRIPT, *arguments],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
        cwd=tmp_path,
    )


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present: the script would run")
def test_without_a_cuda_device_it_says_nothing_ran_writes_nothing_and_exits_0(tmp_path):
    results = ROOT / "benchmarks" / "RESULTS_gpu.md"
    before = results.read_bytes() if results.exists() else None
    result = run_check(tmp_path=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "No CUDA device here: nothing ran and nothing was written" in result.stdout
    assert (results.read_bytes() if results.exists() else None) == before
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_cpu_dry_run_runs_the_test_tier_the_notebook_and_the_benchmark_and_writes_the_report(tmp_path):
    report = tmp_path / "report.md"
    result = run_check("--cpu-dry-run", "--out", str(report), tmp_path=tmp_path)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    text = report.read_text()
    assert text.startswith("# GPU check (CPU dry run")
    assert "- CUDA test tier: passed: 1 passed, 0 failed, 0 errors, 0 skipped" in text
    assert "- notebook 02 (dry run: smoke size): passed in" in text
    notebook = text.split("## notebook 02", 1)[1].split("\n## ", 1)[0]
    assert any(line.startswith("| ") and "_loss" in line for line in notebook.splitlines())  # its last epoch
    for row in (
        "| floor (one flat lerp_) | 1.00x | 1.00x |",
        "| ema_kit ModelEMA |",
        "| reference: bare _foreach_lerp_ |",
    ):
        assert row in text
    assert "| ema_kit ModelEMA, achieved |" in text and "GB/s" in text
    assert "FAILED" not in text and "NOT RUN" not in text
    assert list(tmp_path.glob("gpu_check-*")) == []  # its scratch folder is gone
