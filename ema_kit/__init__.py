"""ema_kit: an exponential moving average of PyTorch model weights, for Kaggle and Jupyter."""

from .ema import ModelEMA, decay_from_half_life
from .multi import MultiEMA

__all__ = ["ModelEMA", "MultiEMA", "decay_from_half_life"]
__version__ = "0.1.0"
