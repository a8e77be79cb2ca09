"""The training log: one row per scoring, live and EMA scores side by side, as a DataFrame.

Columns are ``epoch``, ``train_loss``, then ``<model>_<quantity>`` for each evaluated model (``live``,
``ema``, or ``ema<decay>`` when several decays are tracked) and each quantity (``loss`` and every metric),
then ``lr`` and ``seconds``, then any a callback adds. ``epoch`` counts the epochs trained when the row
was scored: a whole number at an epoch's end, a fraction for a row scored mid-epoch (1.5).
"""

from __future__ import annotations

import math
import numbers
import os
import re
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from ..files import atomic_write_text

# "<model>_<quantity>", where model is "live", "ema" or "ema<decay>" (a decay has no underscore).
_MODEL = r"live|ema[^_]*"
_SCORE = re.compile(rf"^({_MODEL})_(.+)$")


def score_columns(history: pd.DataFrame) -> dict[str, dict[str, str]]:
    """Score columns grouped by quantity, then by model: ``{"loss": {"live": "live_loss", ...}, ...}``.

    Example:
        >>> frame = pd.DataFrame(columns=["epoch", "live_loss", "ema_loss", "live_acc", "ema_acc"])
        >>> score_columns(frame)
        {'loss': {'live': 'live_loss', 'ema': 'ema_loss'}, 'acc': {'live': 'live_acc', 'ema': 'ema_acc'}}
    """
    groups: dict[str, dict[str, str]] = {}
    for column in history.columns:
        match = _SCORE.match(str(column))
        if match:
            groups.setdefault(match.group(2), {})[match.group(1)] = column
    return groups


def score_row(scores: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
    """One row's score columns from each model's scores, by quantity and then by model. A model's name is
    ``live`` or starts with ``ema``, without an underscore; each score is one number (a tensor or array of
    one element counts). Raises before anything is logged.

    Example:
        >>> score_row({"live": {"loss": 0.3, "accuracy": 0.9}, "ema": {"loss": 0.2, "accuracy": 0.95}})
        {'live_loss': 0.3, 'ema_loss': 0.2, 'live_accuracy': 0.9, 'ema_accuracy': 0.95}
    """
    for model in scores:
        if not (isinstance(model, str) and re.fullmatch(_MODEL, model)):
            raise ValueError(
                f"Scores were given for a model named {model!r}: a model's scores go under live=..., or "
                "a name that starts with ema and holds no underscore (ema=..., emaslow=..., or "
                "**{'ema0.999': ...}): its columns are <model>_<quantity>, and ema_slow_loss would read as "
                "model ema, score slow_loss."
            )
    quantities = dict.fromkeys(quantity for values in scores.values() for quantity in values)
    return {
        f"{model}_{quantity}": log_value(f"{model}[{quantity!r}]", values[quantity], score=True)
        for quantity in quantities
        for model, values in scores.items()
        if quantity in values
    }


def log_value(name: str, value, *, score: bool = False):
    """``value`` as one cell of the log: a tensor, or a numpy number or array, of one element as its Python
    number; other values as they are. A score must be a number (None or NA: missing), and becomes a float.

    Example:
        >>> log_value("lr", torch.tensor(0.5)), log_value("ema['acc']", 1, score=True)
        (0.5, 1.0)
    """
    numpy_number = isinstance(value, np.ndarray | np.generic) and value.dtype.kind in "biuf"
    if isinstance(value, torch.Tensor) or numpy_number:
        if (value.numel() if isinstance(value, torch.Tensor) else value.size) != 1:
            raise TypeError(
                f"{name} is a {type(value).__name__} of shape {tuple(value.shape)}; a log cell holds one "
                "value per row (a number, or a tensor or array with one element)."
            )
        value = value.item()  # a 0-d tensor would log as the text "tensor(0.5000)", with its graph
    if not score:
        return value
    if value is None or value is pd.NA:
        return math.nan
    if not isinstance(value, numbers.Number) or isinstance(value, complex):
        raise TypeError(
            f"{name} is {type(value).__name__} {value!r:.60}; a score is one number (a float, or a tensor or "
            "array with one element)."
        )
    return float(value)


def append_row(history: pd.DataFrame, row: Mapping) -> pd.DataFrame:
    """``history`` with ``row`` added; a column new in ``row`` goes last (empty in the rows before it).

    Example:
        >>> log = append_row(pd.DataFrame(), {"epoch": 1, "live_loss": 0.5})
        >>> append_row(log, {"epoch": 2, "live_loss": 0.4, "lb": 0.7}).columns.tolist()
        ['epoch', 'live_loss', 'lb']
    """
    return pd.DataFrame([*history.to_dict("records"), dict(row)])


# Whether lower ("min") or higher ("max") is better, for well-known score names only, matched exactly:
# a name that merely contains "loss" or "err" can mean anything, and a wrong guess silently keeps the
# worst epoch's weights. fit asks for the direction of any other name (mode=, or (metric, "min")).
DIRECTIONS = {
    **dict.fromkeys(
        ("loss", "nll", "logloss", "log_loss", "cross_entropy", "brier", "mae", "mse", "rmse", "msle",
         "rmsle", "mape", "smape", "wape", "error", "error_rate", "err", "wer", "cer", "perplexity",
         "ppl", "hamming_loss"),
        "min",
    ),
    **dict.fromkeys(
        ("accuracy", "acc", "balanced_accuracy", "top1", "top5", "auc", "roc_auc", "pr_auc", "ap", "map",
         "f1", "f1_macro", "f1_micro", "precision", "recall", "r2", "mcc", "kappa", "qwk", "dice", "iou",
         "miou", "bleu", "rouge", "spearman", "pearson"),
        "max",
    ),
}  # fmt: skip


def direction(quantity: str) -> str | None:
    """``"min"`` or ``"max"`` for a well-known score name (``"rmsle"``, ``"accuracy"``), else None.

    Example:
        >>> direction("rmsle"), direction("accuracy"), direction("my_score")
        ('min', 'max', None)
    """
    return DIRECTIONS.get(quantity.lower())


def best_row(history: pd.DataFrame, monitor: str, mode: str) -> int | None:
    """Index label of the best finished epoch on ``monitor`` (``"min"`` or ``"max"``); None if none is finite.

    Example:
        >>> best_row(pd.DataFrame({"ema_loss": [0.5, 0.2, 0.3]}), "ema_loss", "min")
        1
    """
    values = pd.to_numeric(history[monitor], errors="coerce")
    values = values[values.map(math.isfinite)]
    if values.empty:
        return None
    return values.idxmin() if mode == "min" else values.idxmax()


def finished_epochs(history: pd.DataFrame) -> int:
    """The last epoch whose own row (at its end: a whole number) is in the log; 0 for none.

    Example:
        >>> finished_epochs(pd.DataFrame({"epoch": [1, 1.5, 2, 2.5]}))
        2
    """
    if "epoch" not in history:
        return 0
    epochs = history["epoch"].astype(float)
    ends = epochs[epochs.map(math.isfinite) & (epochs == epochs.round())]
    return int(ends.max()) if len(ends) else 0


def write_csv(history: pd.DataFrame, path: str | os.PathLike) -> Path:
    """Write the log to ``path`` atomically, so a kill mid-write leaves the previous epochs' file."""
    return atomic_write_text(history.to_csv(index=False), path)
