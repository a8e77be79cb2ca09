"""Argument checks shared by ModelEMA, MultiEMA and PostHocEMA, with one rule for every option.

``TypeError`` when the value has the wrong type, ``ValueError`` when it has the right type but a wrong
value; the message names the argument, the value, and what would work. numpy scalars are numbers
(``np.float32(0.999)``, ``np.int64(2)``), read as the decimal they print as (``np.float32(0.99)`` is
0.99, not 0.9900000095...); a 1-d numpy array is a sequence; ``True``/``False`` are not numbers.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from ._tensors import unwrap

DECAY_HINT = (
    "Typical values are 0.99 to 0.9999; decay_from_half_life(steps) gives the decay for a half-life in steps."
)


def check_real(name: str, value, *, hint: str = "") -> float:
    """``value`` as a float, or a TypeError when it is not a real number (bools are not).

    Example:
        >>> check_real("decay", np.float32(0.99))
        0.99
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {value!r} ({type(value).__name__}). {hint}".rstrip())
    if isinstance(value, np.floating):  # the number the user wrote: float32's 0.99 is 0.99, as it prints
        return float(str(value))
    return float(value)


def check_decay(name: str, value) -> float:
    """A decay: a number in [0, 1).

    Example:
        >>> import numpy as np
        >>> check_decay("decay", np.float32(0.5))
        0.5
    """
    decay = check_real(name, value, hint=DECAY_HINT)
    if not 0.0 <= decay < 1.0:
        raise ValueError(f"{name} must be a number in [0, 1), got {value!r}. {DECAY_HINT}")
    return decay


def check_int(name: str, value, *, minimum: int) -> int:
    """An int (numpy integers too) of at least ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int >= {minimum}, got {value!r} ({type(value).__name__}).")
    if value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}.")
    return int(value)


def check_bool(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r}.")
    return value


def check_choice(name: str, value, choices: tuple[str, ...]) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{name} must be one of {choices}, got {value!r} ({type(value).__name__}).")
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}.")
    return value


def check_dtype(name: str, value, *, also: tuple[str, ...] = ()) -> torch.dtype | str | None:
    """A floating-point torch.dtype, or None; a dtype's name (``"float32"``, as ``state_dict`` stores it);
    or one of the names in ``also`` (e.g. ``"bfloat16-stochastic"``), returned as it is."""
    if value in also:
        return value
    if isinstance(value, str):
        value = getattr(torch, value, value)
    if value is not None and not (isinstance(value, torch.dtype) and value.is_floating_point):
        others = "".join(f", {option!r}" for option in also)
        raise TypeError(
            f"{name} must be a floating-point torch.dtype such as torch.float32{others}, or None, got "
            f"{value!r}."
        )
    return value


def check_device(name: str, value) -> torch.device | None:
    """A device this machine has, or None (follow the model)."""
    if value is None:
        return None
    if not isinstance(value, (str, int, torch.device)) or isinstance(value, bool):
        raise TypeError(f"{name} must be a torch.device, a string such as 'cpu', or None, got {value!r}.")
    try:
        device = torch.device(value)
        torch.empty(0, device=device)  # torch's own words if this machine lacks it (no CUDA, no GPU 3)
    except Exception as error:
        raise ValueError(
            f"{name} must be a device this machine has, such as 'cpu' or 'cuda', or None to follow the "
            f"model, got {value!r} ({error})."
        ) from None
    if device.type == "meta":
        raise ValueError(f"{name}='meta' holds no values to average; give a real device such as 'cpu'.")
    return torch.device("cpu") if device.type == "cpu" else device  # "cpu:0" is where CPU tensors live


def check_module(name: str, value) -> nn.Module:
    """The plain module inside ``value`` (DDP, DataParallel, ``torch.compile`` wrappers looked through)."""
    if not isinstance(value, nn.Module):
        raise TypeError(f"{name} must be a torch.nn.Module, got {type(value).__name__}.")
    return unwrap(value)


def check_sequence(name: str, value, example: str) -> list:
    """A non-empty sequence as a list: a list, a tuple or a 1-d numpy array (not a string or one number).

    Example:
        >>> check_sequence("decays", np.array([0.9, 0.99]), "(0.9, 0.99)")
        [np.float64(0.9), np.float64(0.99)]
    """
    if isinstance(value, np.ndarray) and value.ndim == 1:
        value = list(value)
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise TypeError(f"{name} must be a sequence such as {example}, got {value!r}.")
    if not len(value):
        raise ValueError(f"{name} is empty: give at least one value, e.g. {name}={example}.")
    return list(value)


def check_distinct(name: str, values: tuple[float, ...]) -> tuple[float, ...]:
    repeated = sorted({value for value in values if values.count(value) > 1})
    if repeated:
        raise ValueError(f"{name} {values!r} repeats {repeated}: give each once.")
    return values


def check_finite_positive(name: str, value) -> float:
    number = check_real(name, value)
    if not number > 0 or math.isinf(number):
        raise ValueError(f"{name} must be a positive, finite number, got {value!r}.")
    return number
