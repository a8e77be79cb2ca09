"""The training log (ema_kit/history.py): column groups, direction of scores, best epoch, CSV."""

import math

import pandas as pd

from ema_kit.history import best_row, lower_is_better, score_columns, write_csv


def test_score_columns_group_every_model_by_quantity():
    log = pd.DataFrame(
        columns=["epoch", "train_loss", "live_loss", "ema0.99_loss", "ema0.999_loss", "live_f1"]
    )
    assert score_columns(log) == {
        "loss": {"live": "live_loss", "ema0.99": "ema0.99_loss", "ema0.999": "ema0.999_loss"},
        "f1": {"live": "live_f1"},
    }


def test_losses_and_errors_are_minimised_other_scores_maximised():
    assert [lower_is_better(c) for c in ("ema_loss", "live_rmse", "ema_error", "ema_auc", "ema_f1")] == [
        True, True, True, False, False,
    ]  # fmt: skip


def test_best_row_skips_nan_and_returns_none_when_nothing_is_finite():
    log = pd.DataFrame({"ema_accuracy": [0.5, math.nan, 0.7, 0.6]})
    assert best_row(log, "ema_accuracy", "max") == 2
    assert best_row(pd.DataFrame({"ema_loss": [math.nan, math.inf]}), "ema_loss", "min") is None


def test_write_csv_round_trips(tmp_path):
    log = pd.DataFrame({"epoch": [1, 2], "live_loss": [0.5, 0.25]})
    pd.testing.assert_frame_equal(pd.read_csv(write_csv(log, tmp_path / "runs" / "history.csv")), log)
