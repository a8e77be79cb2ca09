"""The training log: one row per finished epoch, live and EMA scores side by side, as a DataFrame.

Columns are ``epoch``, ``train_loss``, then ``<model>_<quantity>`` for each evaluated model (``live``,
``ema``, or ``ema<decay>`` when several decays are tracked) and each quantity (``loss`` and every metric),
then ``lr`` and ``seconds``.
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path

import pandas as pd

from .files import atomic_write_text

# "<model>_<quantity>", where model is "live", "ema" or "ema<decay>" (a decay has no underscore).
_SCORE = re.compile(r"^(live|ema[^_]*)_(.+)$")


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


def lower_is_better(column: str) -> bool:
    """Whether smaller values of ``column`` are better: losses and errors are, other scores are not.

    Example:
        >>> lower_is_better("ema_loss"), lower_is_better("ema_accuracy"), lower_is_better("live_mae")
        (True, False, True)
    """
    quantity = column.rsplit("_", 1)[-1].lower()
    return any(word in quantity for word in ("loss", "err", "mae", "mse", "rmse", "logloss"))


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


def write_csv(history: pd.DataFrame, path: str | os.PathLike) -> Path:
    """Write the log to ``path`` atomically, so a kill mid-write leaves the previous epochs' file."""
    return atomic_write_text(history.to_csv(index=False), path)
