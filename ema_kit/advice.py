"""EMA advice: keep an EMA's reach when the batch size changes, and say when it is too long for the run.

An EMA's decay is tied to the step, so its reach in *data* changes with the batch size. "How to Scale
Your EMA" (Busbridge et al. 2023) shows that scaling the batch size by ``kappa = to / from`` keeps the
training dynamics when the decay ``rho`` becomes ``rho ** kappa``: the half-life in steps divides by
``kappa`` and the half-life in samples (or epochs) stays the same.
"""

from __future__ import annotations

import math

from ._checks import check_bool, check_decay, check_finite_positive, check_int
from .ema import WARMUP_POWER

# Warn when the half-life is over half the run: the weights from before mid-run then hold over half of
# the EMA (0.5 ** (total / 2 / half_life) > 0.5), so it reflects the init and early training more than
# where training ended. Up to that the EMA still leans on the later half of the run.
LONG_HALF_LIFE = 0.5


def scale_decay(decay: float, *, from_batch_size: int, to_batch_size: int) -> float:
    """The decay that keeps an EMA's reach in samples when the batch size changes: ``decay ** kappa``.

    Example:
        >>> scale_decay(0.999, from_batch_size=256, to_batch_size=1024) == 0.999**4
        True
        >>> round(scale_decay(0.9999, from_batch_size=4096, to_batch_size=256), 6)
        0.999994
    """
    decay = check_decay("decay", decay)
    return decay ** _kappa(from_batch_size, to_batch_size)


def scale_half_life(steps: float, *, from_batch_size: int, to_batch_size: int) -> float:
    """A half-life in steps for the new batch size: ``steps / kappa`` (in samples or epochs it stays put).

    Example:
        >>> scale_half_life(693, from_batch_size=256, to_batch_size=512)
        346.5
    """
    return check_finite_positive("steps", steps) / _kappa(from_batch_size, to_batch_size)


def half_life_warning(half_life_steps: float, total_steps: int, *, warmup: bool = True) -> str | None:
    """A warning to show when the EMA's half-life is over half the run (``LONG_HALF_LIFE``), else None.

    ``warmup`` says whether the EMA uses ``ModelEMA``'s warmup (the default there): then the decay set
    is not reached within the run and the EMA is the warmup's average all along; without warmup, the
    EMA mostly holds the init and the early steps.

    Example:
        >>> half_life_warning(693, total_steps=10_000) is None
        True
        >>> message = half_life_warning(6931, total_steps=10_000, warmup=False)
        >>> "hold 61% of the EMA" in message and "ema='1000 steps'" in message
        True
    """
    half_life_steps = check_finite_positive("half_life_steps", half_life_steps)
    total_steps = check_int("total_steps", total_steps, minimum=1)
    warmup = check_bool("warmup", warmup)
    if half_life_steps <= LONG_HALF_LIFE * total_steps:
        return None
    if warmup:
        # ModelEMA's warmup decay (1 - 1/n) ** WARMUP_POWER reaches the decay set at this update.
        reached = math.ceil(1.0 / (1.0 - 0.5 ** (1.0 / half_life_steps / WARMUP_POWER)))
        effect = (
            f"its decay would only apply from update {reached} on, so all run long the EMA is the "
            "warmup's average of roughly the latest 10% of steps, whatever decay is set"
        )
    else:
        early = 0.5 ** (total_steps / 2 / half_life_steps)  # decay ** (total_steps / 2)
        effect = f"the init and the steps before mid-run hold {early:.0%} of the EMA"
    return (
        f"The EMA's half-life ({half_life_steps:.0f} steps) is over half the run ({total_steps} steps): "
        f"{effect}. Give it a shorter half-life, e.g. ema='{max(1, round(total_steps / 10))} steps' "
        "(a tenth of the run), or train longer."
    )


def effective_half_life_epochs(ema, *, steps_per_epoch: int) -> float:
    """The half-life, in epochs, of the decay a ``ModelEMA`` applies now (its warmup included).

    This is the half-life the EMA would have if it kept its current decay: during warmup it is short and
    grows with every update, after warmup it is ``ema.half_life / steps_per_epoch``. Call it at the end of
    an epoch to log how far back the EMA reaches.

    Example:
        >>> import torch
        >>> from ema_kit import ModelEMA
        >>> model = torch.nn.Linear(2, 2)
        >>> ema = ModelEMA(model, decay=0.999)
        >>> for _ in range(100):
        ...     ema.update(model)
        >>> round(effective_half_life_epochs(ema, steps_per_epoch=10), 4)   # (100/101) ** 8 per update
        0.8708
    """
    if not callable(getattr(ema, "current_decay", None)):
        raise TypeError(f"ema must be a ModelEMA (with current_decay()), got {type(ema).__name__}.")
    steps_per_epoch = check_int("steps_per_epoch", steps_per_epoch, minimum=1)
    decay = ema.current_decay()  # per averaging update, which comes every update_every steps
    if decay == 0.0:
        return 0.0
    return getattr(ema, "update_every", 1) * math.log(0.5) / math.log(decay) / steps_per_epoch


def _kappa(from_batch_size, to_batch_size) -> float:
    """How many times larger the new batch is (samples per optimizer step)."""
    from_size = check_int("from_batch_size", from_batch_size, minimum=1)
    return check_int("to_batch_size", to_batch_size, minimum=1) / from_size
