"""ema_kit: an exponential moving average of PyTorch model weights, for Kaggle and Jupyter.

Three parts, imported one way: the EMA core (this package's modules: torch only), the training loop and
its live log (``ema_kit.training``: pandas and matplotlib), and the Kaggle helpers (``ema_kit.kaggle``).
``import ema_kit`` loads the core; the loop's names (``fit``, ``evaluate``, ...) load when first used.
"""

from .advice import effective_half_life_epochs, half_life_warning, scale_decay, scale_half_life
from .bn import recompute_bn
from .ema import ModelEMA, decay_from_half_life
from .files import load_weights
from .multi import MultiEMA
from .posthoc import PostHocEMA, scan

# The training loop's names, served from ema_kit.training on first use (PEP 562): the core stays torch-only.
_TRAINING = (
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
)

__all__ = [
    "ModelEMA",
    "MultiEMA",
    "PostHocEMA",
    "scan",
    "decay_from_half_life",
    "scale_decay",
    "scale_half_life",
    "half_life_warning",
    "effective_half_life_epochs",
    "recompute_bn",
    "load_weights",
    *_TRAINING,
]
__version__ = "0.1.0"


def __getattr__(name: str):
    if name in _TRAINING:
        from . import training

        return getattr(training, name)
    raise AttributeError(f"module 'ema_kit' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
