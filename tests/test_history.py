"""The training log (ema_kit/history.py): column groups, direction of scores, best epoch, CSV."""

import math

import pandas as pd
import pytest

from ema_kit.training.history import best_row, direction, score_columns, write_csv


def test_score_columns_group_every_model_by_quantity():
    log = pd.DataFrame(
        columns=["epoch", "train_loss", "live_loss", "ema0.99_loss", "ema0.999_loss", "live_f1"]
    )
    assert score_columns(log) == {
        "loss": {"live": "live_loss", "ema0.99": "ema0.99_loss", "ema0.999": "ema0.999_loss"},
        "f1": {"live": "live_f1"},
    }


@pytest.mark.parametrize(
    "name",
    ["loss", "rmse", "rmsle", "mae", "mape", "smape", "wer", "cer", "nll", "brier", "error_rate", "logloss"],
)
def test_well_known_losses_and_errors_are_minimised(name):
    assert direction(name) == "min"


@pytest.mark.parametrize("name", ["accuracy", "auc", "roc_auc", "f1", "map", "r2", "qwk", "dice", "iou"])
def test_well_known_scores_are_maximised(name):
    assert direction(name) == "max"


@pytest.mark.parametrize("name", ["top2", "lossy_score", "my_error_count", "ema_loss", ""])
def test_a_name_not_in_the_table_has_no_direction_rather_than_a_guess(name):
    assert direction(name) is None


def test_best_row_skips_nan_and_returns_none_when_nothing_is_finite():
    log = pd.DataFrame({"ema_accuracy": [0.5, math.nan, 0.7, 0.6]})
    assert best_row(log, "ema_accuracy", "max") == 2
    assert best_row(pd.DataFrame({"ema_loss": [math.nan, math.inf]}), "ema_loss", "min") is None


def test_write_csv_round_trips(tmp_path):
    log = pd.DataFrame({"epoch": [1, 2], "live_loss": [0.5, 0.25]})
    pd.testing.assert_frame_equal(pd.read_csv(write_csv(log, tmp_path / "runs" / "history.csv")), log)
