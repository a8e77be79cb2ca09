"""The benchmarks run (a smoke run: this checks that they work, never how fast anything is)."""

import subprocess
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def test_ema_update_benchmark_measures_every_method_on_every_model():
    result = subprocess.run(
        [sys.executable, BENCHMARKS / "ema_update.py", "--quick"], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    for method in (
        "ema_kit ModelEMA",
        "timm ModelEmaV3",
        "AveragedModel",
        "torch-ema",
        "ema-pytorch",
        "plain loop",
        "reference: bare _foreach_lerp_",
    ):
        assert f"| {method}" in result.stdout
    assert "ResNet-50" in result.stdout and "ViT-S/16" in result.stdout and "tiny CNN" in result.stdout


def test_fit_overhead_benchmark_times_fit_beside_a_hand_written_loop():
    result = subprocess.run(
        [sys.executable, BENCHMARKS / "fit_overhead.py", "--quick"],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stderr
    for variant in ("| hand-written loop |", "| fit (no files, no display) |", "| fit + CSV, checkpoint"):
        assert variant in result.stdout
