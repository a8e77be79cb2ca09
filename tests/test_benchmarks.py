"""The benchmarks run (a smoke run: this checks that they work and report sane numbers, never how fast
anything is)."""

import math
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
MODELS = ("ResNet-50", "ViT-S/16", "tiny CNN")


def run(script: str) -> str:
    result = subprocess.run(
        [sys.executable, BENCHMARKS / script, "--quick"], capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def table(report: str, header: str) -> tuple[list[str], dict[str, list[str]]]:
    """The columns and the rows (first cell to the other cells) of the markdown table under ``header``."""
    lines = report.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header))
    columns = [cell.strip() for cell in lines[start].strip("|").split("|")][1:]
    rows = {}
    for line in lines[start + 2 :]:  # past the header and its --- line
        if not line.startswith("|"):
            break
        first, *cells = (cell.strip() for cell in line.strip("|").split("|"))
        rows[first] = cells
    return columns, rows


def ratio(cell: str) -> float:
    """A cell such as ``1.23x`` as a number, which must be positive and finite."""
    assert cell.endswith("x"), cell
    value = float(cell.removesuffix("x"))
    assert math.isfinite(value) and value > 0, cell
    return value


@pytest.mark.slow
@pytest.mark.kaggle_stack  # its peers (benchmarks/requirements.txt) are installed with timm, in that tier
def test_ema_update_benchmark_gives_every_method_a_positive_finite_ratio_on_every_model():
    report = run("ema_update.py")
    columns, rows = table(report, "| method |")
    assert [column.split(" (")[0] for column in columns] == list(MODELS)
    assert set(rows) == {
        "floor (one flat lerp_)",
        "ema_kit ModelEMA",
        "timm ModelEmaV3",
        "AveragedModel (multi_avg_fn)",
        "torch-ema (params only)",
        "ema-pytorch EMA (foreach)",
        "plain loop",
        "reference: bare _foreach_lerp_",
        "floor, absolute",
    }
    for name, cells in rows.items():
        assert len(cells) == len(MODELS), name
        if name == "floor, absolute":
            assert all(cell.endswith(" us") and float(cell[:-3].replace(",", "")) > 0 for cell in cells)
        else:
            ratios = [ratio(cell) for cell in cells]
            assert name != "floor (one flat lerp_)" or ratios == [1.0] * len(MODELS)
    columns, rows = table(report, "| ema_kit |")
    assert columns == list(MODELS)
    assert set(rows) == {"ModelEMA, 1 decay", "MultiEMA, 3 decays in one pass", "3 separate ModelEMAs"}
    assert all(len(cells) == len(MODELS) and [ratio(cell) for cell in cells] for cells in rows.values())


@pytest.mark.slow
def test_fit_overhead_benchmark_times_fit_beside_a_hand_written_loop():
    columns, rows = table(run("fit_overhead.py"), "| variant |")
    assert columns == ["seconds per epoch", "ratio to the hand-written loop"]
    assert set(rows) == {
        "hand-written loop",
        "fit (no files, no display)",
        "fit + CSV, checkpoint, plot PNG, text progress",
    }
    for seconds, cell in rows.values():
        assert math.isfinite(float(seconds)) and float(seconds) > 0
        ratio(cell)
    assert rows["hand-written loop"][1] == "1.000x"
