"""The training loop and what it shows and writes: ``fit``, ``evaluate``, the callbacks, the live log."""

from .callbacks import Callback, EarlyStopping, FitState, GradientClip, ValidateEvery
from .ema_bn import RecomputeEMABatchNorm
from .evaluate import accuracy, evaluate, whole_set
from .launch import launch
from .livelog import LiveLog
from .loop import fit
from .plot import plot_history, plot_scan
from .status import RunStatus, read_status
from .switch import SwitchEMA
from .watch import watch

__all__ = [
    "fit",
    "evaluate",
    "accuracy",
    "whole_set",
    "LiveLog",
    "launch",
    "watch",
    "RunStatus",
    "read_status",
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
