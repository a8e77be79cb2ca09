"""The training loop and what it shows and writes: ``fit``, ``evaluate``, the callbacks, the live log."""

from .callbacks import Callback, EarlyStopping, FitState, GradientClip, ValidateEvery
from .ema_bn import RecomputeEMABatchNorm
from .evaluate import accuracy, evaluate, whole_set
from .livelog import LiveLog
from .loop import fit
from .plot import plot_history, plot_scan
from .switch import SwitchEMA

__all__ = [
    "fit",
    "evaluate",
    "accuracy",
    "whole_set",
    "LiveLog",
    "Callback",
    "FitState",
    "EarlyStopping",
    "GradientClip",
    "ValidateEvery",
    "SwitchEMA",
    "RecomputeEMABatchNorm",
    "plot_history",
    "plot_scan",
]
