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


def section(report: str, title: str) -> str:
    """The part of a markdown report under ``## title``, up to the next section."""
    return report.split(f"\n## {title}", 1)[1].split("\n## ", 1)[0]


@pytest.mark.slow
@pytest.mark.kaggle_stack  # its peers (benchmarks/requirements.txt) are installed with timm, in that tier
def test_ema_update_benchmark_gives_every_method_a_ratio_in_each_condition_and_states_the_targets():
    report = run("ema_update.py")
    conditions = ["alone", "beside a step's side effects", "inside a training step"]
    methods = {
        "reference: bare _foreach_lerp_",
        "ema_kit ModelEMA",
        "timm ModelEmaV3",
        "AveragedModel (multi_avg_fn)",
        "torch-ema (params only)",
        "ema-pytorch EMA (foreach)",
        "plain loop",
        "ema_kit ModelEMA without the gather (A/B)",
    }
    for model in MODELS:
        columns, rows = table(section(report, model), "| method |")
        assert columns == conditions
        step = [name for name in rows if name.startswith("training step (batch ")]
        share = "ema_kit's share of a step with its update"
        assert set(rows) == methods | {"reference, absolute", share, *step}
        assert len(step) == 1 and rows[step[0]][-1].endswith(" ms")
        for name in methods:
            ratios = [ratio(cell) for cell in rows[name]]
            assert len(ratios) == len(conditions)
            assert not name.startswith("reference") or ratios == [1.0] * len(conditions)
        assert all(cell.endswith(" us") for cell in rows["reference, absolute"])
        assert rows[share][-1].endswith("%")
    # One row per model and condition, each saying whether its target was met.
    targets = [line.strip("|").split("|") for line in section(report, "Targets").splitlines()]
    targets = [[cell.strip() for cell in cells] for cells in targets if cells[0].strip() in MODELS]
    assert [cells[:2] for cells in targets] == [[model, c] for model in MODELS for c in conditions]
    assert all(cells[-1] in ("met", "MISSED") for cells in targets)
    columns, rows = table(report, "| ema_kit |")
    assert columns == list(MODELS)
    assert set(rows) == {
        "ModelEMA, 1 decay",
        "MultiEMA, 3 decays in one pass",
        "the same without the gather (A/B)",
        "3 separate ModelEMAs",
    }
    assert all(len(cells) == len(MODELS) and [ratio(cell) for cell in cells] for cells in rows.values())
    columns, rows = table(section(report, "Following a changed model"), "| |")
    assert columns == list(MODELS)
    assert all(float(cell) > 0 for cell in rows["first update after a change, in plain updates"])
    assert all(cell.endswith(" us") for cell in rows["first update after a change, absolute"])


@pytest.mark.slow
def test_fit_overhead_benchmark_times_fit_beside_a_hand_written_loop():
    columns, rows = table(run("fit_overhead.py"), "| variant |")
    assert columns == ["seconds per epoch", "ratio to the hand-written loop", "start, once per run (s)"]
    assert set(rows) == {
        "hand-written loop",
        "fit (no files, no display)",
        "fit + CSV, checkpoint, plot PNG, text progress",
    }
    for seconds, cell, start in rows.values():
        assert math.isfinite(float(seconds)) and float(seconds) > 0
        ratio(cell)
        assert math.isfinite(float(start)) and float(start) >= 0
    assert rows["hand-written loop"][1:] == ["1.000x", "0.000"]
    assert float(rows["fit (no files, no display)"][2]) > 0  # the sanity pass runs before the first epoch


@pytest.mark.slow
def test_evaluate_memory_benchmark_measures_each_way_of_scoring_with_the_same_scores():
    report = run("evaluate_memory.py")
    columns, rows = table(report, "| scoring |")
    assert columns[:2] == ["peak memory above the start", "vs forward passes only"]
    assert list(rows) == [
        "forward passes only (reference)",
        "all outputs kept, then scored (evaluate before streaming)",
        "evaluate, streamed",
        "evaluate, accuracy marked whole_set",
    ]
    assert all(cells[0].endswith(" MiB") and ratio(cells[1]) for cells in rows.values())
    assert len({tuple(cells[3:]) for name, cells in rows.items() if not name.startswith("forward")}) == 1


@pytest.mark.slow
def test_sharded_memory_benchmark_measures_each_rank_and_finds_no_collective_in_update():
    columns, rows = table(run("sharded_memory.py"), "| processes |")
    assert columns[:5] == [
        "rank",
        "EMA: resident memory added",
        "vs unsharded",
        "EMA: tensors held",
        "vs unsharded",
    ]
    assert list(rows) == ["1 (unsharded, reference)", "2"]  # one row per key: the last rank's is kept
    assert rows["1 (unsharded, reference)"][4] == "1.000x"
    assert 0.45 < ratio(rows["2"][4]) < 0.55  # the tiny CNN: its shards are half of each tensor
    ratio(rows["2"][2])  # resident memory: noisy at this size, but measured
    assert all(cells[-1] == "none" for cells in rows.values())


@pytest.mark.slow
def test_folds_benchmark_scores_each_fold_and_each_ensemble_on_held_out_rows():
    columns, rows = table(run("folds_digits.py"), "| model |")
    assert columns == ["seed 0: accuracy / loss", "accuracy", "loss"]
    assert [name[:3] for name in rows] == ["(a)", "(a)", "(a)", "(b)", "(c)", "(d)", "OOF", "OOF"]
    for cells in rows.values():
        accuracy, loss = (float(value) for value in cells[0].split(" / "))
        assert 0 <= accuracy <= 1 and math.isfinite(loss) and loss > 0
        assert (float(cells[1]), float(cells[2])) == (accuracy, loss)  # one seed: its mean is itself
