"""ema_kit: an exponential moving average of PyTorch model weights, for Kaggle and Jupyter."""

from .advice import effective_half_life_epochs, half_life_warning, scale_decay, scale_half_life
from .bn import recompute_bn
from .ema import ModelEMA, decay_from_half_life
from .files import load_weights
from .multi import MultiEMA
from .plot import plot_history, plot_scan
from .posthoc import PostHocEMA, scan
from .switch import SwitchEMA
from .train import Callback, FitState, accuracy, evaluate, fit

__all__ = [
    "ModelEMA",
    "MultiEMA",
    "PostHocEMA",
    "scan",
    "plot_scan",
    "decay_from_half_life",
    "scale_decay",
    "scale_half_life",
    "half_life_warning",
    "effective_half_life_epochs",
    "SwitchEMA",
    "recompute_bn",
    "fit",
    "evaluate",
    "accuracy",
    "FitState",
    "Callback",
    "plot_history",
    "load_weights",
]
__version__ = "0.1.0"
