"""benchmarks/gpu_check.py: harmless on a CPU-only machine, and every stage works in its CPU dry run.

These check that the script runs, never how fast anything is; its GPU figures come from a GPU machine.
"""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

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


def load_script(monkeypatch):
    """benchmarks/gpu_check.py as a module, with its neighbour models.py, both gone from sys.modules after."""
    for name in ("models", "gpu_check"):
        spec = importlib.util.spec_from_file_location(name, SCRIPT.parent / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        monkeypatch.setitem(sys.modules, name, module)  # gpu_check imports models; dataclasses look here
        spec.loader.exec_module(module)
    return module


def test_peak_bandwidth_is_the_memory_clock_times_two_times_the_bus_width(monkeypatch):
    gpu_check = load_script(monkeypatch)
    # An H100 SXM reports a 2619 MHz memory clock (in kHz) and a 5120-bit bus: NVIDIA states 3.35 TB/s.
    h100 = SimpleNamespace(memory_clock_rate=2_619_000, memory_bus_width=5120)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: h100)
    assert gpu_check.peak_bandwidth(torch.device("cuda")) == pytest.approx(3.352e12, rel=1e-3)
    unknown = SimpleNamespace(memory_clock_rate=0, memory_bus_width=5120)  # a driver that leaves it out
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: unknown)
    assert gpu_check.peak_bandwidth(torch.device("cuda")) is None
    assert gpu_check.peak_bandwidth(torch.device("cpu")) is None


def test_a_module_that_skips_itself_at_collection_is_named_apart_not_counted_as_a_skipped_case(
    monkeypatch, tmp_path
):
    gpu_check = load_script(monkeypatch)
    (tmp_path / "test_cases.py").write_text(
        "import pytest\n\n"
        "def test_runs():\n    pass\n\n"
        "@pytest.mark.skip(reason='a case that did not run')\ndef test_skipped():\n    pass\n"
    )
    (tmp_path / "test_needs_a_browser.py").write_text(
        "import pytest\n\npytest.skip('no browser here', allow_module_level=True)\n"
    )
    junit = tmp_path / "junit.xml"
    subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--doctest-modules", "--rootdir",
         str(tmp_path), f"--junitxml={junit}", str(tmp_path)],
        cwd=tmp_path, capture_output=True, timeout=120, check=True,
    )  # fmt: skip
    counts, modules = gpu_check.junit_counts(junit)
    assert counts == {"tests": 2, "failures": 0, "errors": 0, "skipped": 1}  # the skipped case still counts
    assert modules == {"test_needs_a_browser": "no browser here"}


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
@pytest.mark.kaggle_stack  # notebook 02 trains a timm model
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
    assert "![notebook02_history.png](report_notebook02_history.png)" in notebook
    assert (tmp_path / "report_notebook02_history.png").read_bytes().startswith(b"\x89PNG")  # fit's curves
    for row in (
        "| floor (one flat lerp_) | 1.00x | 1.00x |",
        "| ema_kit ModelEMA |",
        "| reference: bare _foreach_lerp_ |",
    ):
        assert row in text
    assert "| ema_kit ModelEMA, achieved |" in text and "GB/s" in text
    assert "FAILED" not in text and "NOT RUN" not in text
    assert list(tmp_path.glob("gpu_check-*")) == []  # its scratch folder is gone
