"""The training loop and what it shows and writes: ``fit``, ``evaluate``, callbacks, the log and its plot."""

from .evaluate import accuracy, evaluate
from .loop import Callback, FitState, fit
from .plot import plot_history, plot_scan
from .switch import SwitchEMA

__all__ = ["fit", "evaluate", "accuracy", "Callback", "FitState", "SwitchEMA", "plot_history", "plot_scan"]
