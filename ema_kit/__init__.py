"""ema_kit: an exponential moving average of PyTorch model weights, for Kaggle and Jupyter."""

from .ema import ModelEMA, decay_from_half_life
from .files import load_weights
from .multi import MultiEMA
from .plot import plot_history, plot_scan
from .posthoc import PostHocEMA, scan
from .train import Callback, FitState, accuracy, evaluate, fit

__all__ = [
    "ModelEMA",
    "MultiEMA",
    "PostHocEMA",
    "scan",
    "plot_scan",
    "decay_from_half_life",
    "fit",
    "evaluate",
    "accuracy",
    "FitState",
    "Callback",
    "plot_history",
    "load_weights",
]
__version__ = "0.1.0"
