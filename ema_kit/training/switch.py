"""Switch EMA (Li et al. 2024, "Switch EMA: a free lunch for better flatness and sharpness").

Every epoch (or every N optimizer steps) the live model takes the EMA's weights and trains on from there.
The EMA pulls the live model into the flat region it averages over, and the live model keeps exploring
with its optimizer (the paper keeps the optimizer state across a switch, and so do we).
"""

from __future__ import annotations

import numbers

import numpy as np

from ..ema import ModelEMA
from .callbacks import Callback, FitState


class SwitchEMA(Callback):
    """A ``fit`` callback that copies the EMA's weights (and buffers) into the live model, for good.

    Args:
        ema: the ``ModelEMA`` to switch to; None (the default): fit's EMA, which must then be one
            (with several decays, pass one of them, ``SwitchEMA(multi.emas[0.999])``).
        every: ``"epoch"`` switches after each epoch was scored and logged, so the log's ``live_*``
            columns show where the live model got to in the epoch since the last switch; an int ``n``
            switches after every n-th optimizer step (just after the EMA's update).

    ``fit(..., callbacks=[SwitchEMA()])`` switches to fit's EMA after every epoch. A switch is
    ``ema.copy_to(model)``: call that yourself to switch in your own loop.

    The optimizer state (momentum, Adam's moments) is kept: the weights are overwritten in place, so the
    optimizer goes on with the same parameter tensors and its statistics, as in the paper. After ``fit``
    the live model holds the EMA's weights of the last switch. The checkpoint of an epoch is written
    after its switch, so a resumed run matches an uninterrupted one. ``every`` is kept in the
    checkpoint, and a resume with another ``every`` is refused.

    Example:
        >>> import torch
        >>> from ema_kit import LiveLog, fit
        >>> from ema_kit.examples.digits import digits_loaders
        >>> from ema_kit.examples.demo import SmallCNN
        >>> train_loader, val_loader = digits_loaders(batch_size=256)
        >>> model = SmallCNN(width=8)
        >>> switch = SwitchEMA(every="epoch")
        >>> log = fit(model, train_loader, val_loader, epochs=2, ema=0.99,
        ...           optimizer=torch.optim.SGD(model.parameters(), lr=0.05),
        ...           callbacks=[switch, LiveLog(progress="off", plot=False)])
        >>> switch.switches
        2
    """

    def __init__(self, ema: ModelEMA | None = None, *, every: str | int = "epoch"):
        if ema is not None and not isinstance(ema, ModelEMA):
            raise TypeError(
                f"ema must be the ModelEMA that fit updates, or None for fit's own, got "
                f"{type(ema).__name__}; with several decays pass one of them, e.g. multi.emas[0.999]."
            )
        if every != "epoch" and (
            isinstance(every, (bool, np.bool_)) or not isinstance(every, numbers.Integral) or every < 1
        ):
            raise ValueError(f'every must be "epoch" or an int >= 1 (optimizer steps), got {every!r}.')
        self.ema = ema
        self.every = every if every == "epoch" else int(every)
        self.switches = 0  # switches done in this process
        self._target: ModelEMA | None = None  # the EMA this run switches to

    def on_fit_start(self, state: FitState) -> None:
        if self.ema is None and not isinstance(state.ema, ModelEMA):
            held = "ema=None" if state.ema is None else f"{len(state.emas)} decays"
            raise ValueError(
                f"SwitchEMA() copies fit's EMA into the model, which needs one EMA, but this run has "
                f"{held}; pass fit ema= one decay or a ModelEMA, or to switch to one EMA of several, "
                "SwitchEMA(multi.emas[decay]) with fit(ema=multi)."
            )
        self._target = self.ema or state.ema
        if not any(ema is self._target for ema in state.emas.values()):
            raise ValueError(
                "SwitchEMA's ema is not one fit updates, so switching would reset the model to stale "
                "weights; pass the same ModelEMA to fit(ema=...) and to SwitchEMA, or none to SwitchEMA."
            )

    def on_step_end(self, state: FitState) -> None:
        if self.every != "epoch" and state.step % self.every == 0:
            self._switch(state)

    def on_epoch_end(self, state: FitState) -> None:
        if self.every == "epoch":
            self._switch(state)

    def state_dict(self) -> dict:
        """``every``, so that fit's checkpoint records the switch and a resume can check it."""
        return {"every": self.every}

    def load_state_dict(self, state: dict) -> None:
        """Check that the checkpoint's run switched as this one does (nothing else is restored)."""
        if state.get("every") != self.every:
            raise ValueError(
                f"The checkpoint's run switched with every={state.get('every')!r}, this run with "
                f"every={self.every!r}; pass the same SwitchEMA(every=...) as the run that wrote it."
            )

    def _switch(self, state: FitState) -> None:
        self._target.copy_to(state.model)
        self.switches += 1

    def __repr__(self) -> str:
        return f"SwitchEMA(every={self.every!r}, switches={self.switches})"
