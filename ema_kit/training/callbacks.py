"""The callback API of ``fit``: the hooks, what they see (``FitState``), and the small built-in callbacks.

``fit`` keeps the loop (forward, loss, backward, optimizer step, EMA update, scoring); everything else is
a callback on the hooks below, the built-in ones (``LiveLog``, ``SwitchEMA``, ``EarlyStopping``,
``GradientClip``, ``RecomputeEMABatchNorm``, ``ValidateEvery``, and ``Checkpoint``, the files of
``out_dir``) as much as yours.

One epoch, hook by hook::

    on_fit_start                    after the checks, the sanity pass and a resume
      on_epoch_start
        on_batch_start              state.inputs, state.targets on the device: replace them (mixup)
        on_before_backward          state.outputs, state.loss: replace the loss (a regulariser)
        on_after_backward           this batch's gradients are in
        on_before_step              the group's gradients, complete and unscaled: clip them
        on_step_end                 after the optimizer step and the EMA update (not after a skipped step)
        on_batch_end                every batch; set state.validate to score a row now (below)
      on_validation_start           state.scored: the EMA modules about to be scored (replace one)
      on_validation_end             state.row: the scores; add columns here (a leaderboard score)
      on_row_added                  the row is in state.history, state.best_epoch is chosen
      on_epoch_end                  after on_row_added of the epoch's own row
    on_fit_end                      after the last epoch, or the stop button

With ``accumulate=n`` the two step hooks run once per n batches; the last, shorter group of an epoch
steps after its last ``on_batch_end``. A row within an epoch (``state.validate``, e.g. ``ValidateEvery``)
runs ``on_validation_start`` to ``on_row_added`` after that ``on_batch_end``, its ``epoch`` a fraction
(1.5). The stop button lands before a row is added or after its ``on_row_added`` (and at an epoch's end
its ``on_epoch_end``), never in between.
"""

from __future__ import annotations

import difflib
import math
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import torch
from torch import nn

from .. import _checks
from ..ema import ModelEMA
from ..multi import MultiEMA

HOOKS = (
    "on_fit_start",
    "on_epoch_start",
    "on_batch_start",
    "on_before_backward",
    "on_after_backward",
    "on_before_step",
    "on_step_end",
    "on_batch_end",
    "on_validation_start",
    "on_validation_end",
    "on_row_added",
    "on_epoch_end",
    "on_fit_end",
)


@dataclass
class FitState:
    """What ``fit`` runs with and where it is; every hook receives it, and may change what is marked so.

    Example:
        >>> class PrintLR(Callback):
        ...     def on_epoch_end(self, state: FitState) -> None:
        ...         print(f"epoch {state.epoch}: lr {state.optimizer.param_groups[0]['lr']}")
    """

    model: nn.Module  # the plain model being trained (DDP and torch.compile wrappers looked through)
    ema: ModelEMA | MultiEMA | None  # what fit updates after each optimizer step (fit's ema=)
    emas: dict[str, ModelEMA]  # log prefix ("ema", or "ema0.999" with several decays) -> each EMA
    optimizer: torch.optim.Optimizer
    scheduler: object | None  # the LR scheduler, or None
    scaler: torch.amp.GradScaler  # enabled under amp="fp16" only
    train_loader: Iterable
    val_loader: Iterable
    epochs: int
    accumulate: int  # batches per optimizer step
    device: torch.device
    amp: torch.dtype | None  # the autocast dtype, or None
    target_key: str | None
    output_key: int | str | None
    out_dir: Path | None
    callbacks: list  # every callback of the run, in the order the hooks call them
    epoch: int = 0  # the current (1-based) or last finished epoch
    step: int = 0  # optimizer steps taken so far
    stop: bool = False  # set True to end training after this epoch
    validate: bool = False  # set True in a batch hook to score a row now, within the epoch
    history: pd.DataFrame = field(default_factory=pd.DataFrame)  # one row per scoring, each epoch's end
    resumed_from: Path | None = None  # the checkpoint this run continued, if any
    # Per batch (on_batch_start .. on_batch_end).
    inputs: object = None  # on the device; replaceable in on_batch_start
    targets: object = None  # on the device; replaceable in on_batch_start
    rows: int = 0  # the batch's rows (ema_kit._batches.rows), which weigh its loss
    outputs: object = None  # the prediction the loss sees
    loss: torch.Tensor | None = None  # this batch's loss; replaceable in on_before_backward
    train_loss: float = float("nan")  # the mean training loss per sample since the last row (steps taken)
    # Per validation (on_validation_start .. on_epoch_end).
    # EMA name -> the module scored for it; a sharded EMA (FSDP2) is itself, scored through applied_to
    scored: dict[str, nn.Module | ModelEMA] = field(default_factory=dict)
    row: dict = field(default_factory=dict)  # the log row being built; add columns in on_validation_end
    monitor: str | None = None  # the column the best epoch is picked by (the best decay's, with several)
    best_epoch: float | None = None  # the best row's epoch: 3, or 2.5 for a row within an epoch


class Callback:
    """Base class of ``fit`` callbacks: override the hooks you need; each receives the ``FitState``.

    The hooks and what each sees are listed in ``ema_kit.training.callbacks``. Setting
    ``state.stop = True`` ends training after the current epoch. A callback with ``state_dict()`` and
    ``load_state_dict()`` has its state kept in ``checkpoint.pt`` under its ``state_key`` (its class
    name unless set; two such callbacks need two keys) and restored on a resume, before
    ``on_fit_start``. Any object with some of these hooks works; other ``on_*`` methods (a callback
    written for another framework) are left alone, and one that looks like a misspelled hook
    (``on_epoch_ends``) gets a warning naming the hook.

    Example:
        >>> import torch
        >>> class Mixup(Callback):
        ...     def on_batch_start(self, state):
        ...         order = torch.randperm(len(state.targets))
        ...         onehot = torch.nn.functional.one_hot(state.targets, 10).float()
        ...         state.inputs = 0.8 * state.inputs + 0.2 * state.inputs[order]
        ...         state.targets = 0.8 * onehot + 0.2 * onehot[order]  # soft targets: cross entropy works
    """

    @property
    def state_key(self) -> str:
        return type(self).__qualname__

    def on_fit_start(self, state: FitState) -> None:
        pass

    def on_epoch_start(self, state: FitState) -> None:
        pass

    def on_batch_start(self, state: FitState) -> None:
        pass

    def on_before_backward(self, state: FitState) -> None:
        pass

    def on_after_backward(self, state: FitState) -> None:
        pass

    def on_before_step(self, state: FitState) -> None:
        pass

    def on_step_end(self, state: FitState) -> None:
        pass

    def on_batch_end(self, state: FitState) -> None:
        pass

    def on_validation_start(self, state: FitState) -> None:
        pass

    def on_validation_end(self, state: FitState) -> None:
        pass

    def on_row_added(self, state: FitState) -> None:
        pass

    def on_epoch_end(self, state: FitState) -> None:
        pass

    def on_fit_end(self, state: FitState) -> None:
        pass


def check_callbacks(callbacks) -> list:
    """The callbacks as a list: each an object with at least one hook, each saved state under its own key."""
    if callbacks is None:
        return []
    if not isinstance(callbacks, Iterable) or isinstance(callbacks, (str, bytes)):
        raise TypeError(f"callbacks must be a list of Callback objects, got {type(callbacks).__name__}.")
    callbacks = list(callbacks)
    for index, callback in enumerate(callbacks):
        if isinstance(callback, type):
            raise TypeError(
                f"callbacks[{index}] is the class {callback.__name__}, not an object: pass "
                f"{callback.__name__}() (with its arguments)."
            )
        others = [n for n in dir(callback) if n.startswith("on_") and callable(getattr(callback, n, None))]
        if not any(callable(getattr(callback, hook, None)) for hook in HOOKS):
            if not others:
                raise TypeError(
                    f"callbacks[{index}] is a {type(callback).__name__} with none of the hooks "
                    f"{', '.join(HOOKS)}: subclass ema_kit.Callback and override the ones you need."
                )
            warnings.warn(  # a callback of another framework: not refused, but nothing of it will run
                f"callbacks[{index}] ({type(callback).__name__}) has none of fit's hooks "
                f"({', '.join(HOOKS)}); fit calls nothing on it.",
                UserWarning,
                stacklevel=3,
            )
        for name in dir(callback):
            if name.startswith("on_") and name not in HOOKS and callable(getattr(callback, name, None)):
                # Only a near miss: a callback of another framework may have on_* methods of its own.
                close = difflib.get_close_matches(name, HOOKS, n=1, cutoff=0.85)
                if close:
                    warnings.warn(
                        f"callbacks[{index}] ({type(callback).__name__}) has {name}, which fit never "
                        f"calls; did you mean {close[0]}?",
                        UserWarning,
                        stacklevel=3,
                    )
    keys: dict[str, int] = {}
    for index, callback in enumerate(callbacks):
        if stateful(callback):
            key = state_key(callback)
            if key in keys:
                raise ValueError(
                    f"callbacks[{keys[key]}] and callbacks[{index}] both keep their state under {key!r} in "
                    "checkpoint.pt; give one of them another state_key (an attribute)."
                )
            keys[key] = index
    return callbacks


def stateful(callback) -> bool:
    """Whether fit keeps the callback's state in its checkpoint."""
    return callable(getattr(callback, "state_dict", None)) and callable(
        getattr(callback, "load_state_dict", None)
    )


def state_key(callback) -> str:
    """The name a callback's state is saved under: its ``state_key``, else its class name."""
    key = getattr(callback, "state_key", None)
    return key if isinstance(key, str) and key else type(callback).__qualname__


class CallbackList:
    """Calls a hook on every callback that has it, in order; looked up once, so a hook nobody has is free."""

    def __init__(self, callbacks: list):
        self.callbacks = callbacks
        self._methods = {hook: [getattr(c, hook) for c in callbacks if _overrides(c, hook)] for hook in HOOKS}

    def has(self, hook: str) -> bool:
        return bool(self._methods[hook])

    def call(self, hook: str, state: FitState) -> None:
        for method in self._methods[hook]:
            method(state)


def _overrides(callback, hook: str) -> bool:
    """Whether the callback has the hook as its own (not ``Callback``'s no-op)."""
    method = getattr(callback, hook, None)
    return callable(method) and getattr(method, "__func__", None) is not getattr(Callback, hook)


def is_main_process() -> bool:
    """True outside a distributed run and on its rank 0: the one process that shows and writes."""
    return not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0


class EarlyStopping(Callback):
    """Stop when ``fit``'s monitor has not improved for ``patience`` epochs (fit's best epoch decides).

    The monitor and its direction are ``fit``'s ``monitor=``, the same that pick the saved weights.

    Example:
        >>> stop = EarlyStopping(patience=3)  # fit(..., callbacks=[stop])
    """

    def __init__(self, patience: int):
        self.patience = _checks.check_int("patience", patience, minimum=1)

    def on_epoch_end(self, state: FitState) -> None:
        if state.best_epoch is None or state.epoch - state.best_epoch < self.patience:
            return
        state.stop = True
        if is_main_process():
            best = state.history.loc[state.history["epoch"] == state.best_epoch, state.monitor].iloc[0]
            print(
                f"Early stop: {state.monitor} has not improved for {self.patience} epochs "
                f"(best {best:.4g} at epoch {state.best_epoch})."
            )


class GradientClip(Callback):
    """Clip the gradients' global norm to ``max_norm`` before each optimizer step.

    Under ``amp="fp16"`` the gradients it sees are already unscaled, so ``max_norm`` is in the units of
    the weights' own gradients. A step whose gradients are not finite is skipped by ``fit`` anyway.

    Example:
        >>> clip = GradientClip(1.0)  # fit(..., callbacks=[clip])
    """

    def __init__(self, max_norm: float):
        self.max_norm = _checks.check_finite_positive("max_norm", max_norm)

    def on_before_step(self, state: FitState) -> None:
        nn.utils.clip_grad_norm_(state.model.parameters(), self.max_norm)


class ValidateEvery(Callback):
    """Score the live model and each EMA within epochs too: every ``steps`` optimizer steps of an epoch,
    or every ``epochs`` (a fraction: ``0.25`` scores at the first step past each quarter), as Lightning's
    ``val_check_interval`` does. For long epochs: the live-vs-EMA curves move before an epoch ends.

    Each score is a row at a fraction of an epoch (``epoch`` 1.5), shown, written and weighed for the
    best epoch like an epoch's own row (whose EMA weights ``model_ema.pth`` then holds, if best); its
    ``train_loss`` is the mean since the row before. ``checkpoint.pt`` is written at epochs' ends only:
    a resume continues from the last finished epoch and scores its rows again, alike. The count starts
    anew each epoch, and the epoch's last step is scored by the epoch's row. Needs a ``train_loader``
    with a length, to place the rows.

    Example:
        >>> every_500 = ValidateEvery(steps=500)  # fit(..., callbacks=[every_500])
        >>> at_quarters = ValidateEvery(epochs=0.25)
    """

    def __init__(self, *, steps: int | None = None, epochs: float | None = None):
        if (steps is None) == (epochs is None):
            raise TypeError(
                "ValidateEvery takes one of steps= (optimizer steps, e.g. 500) or epochs= (a fraction of "
                f"an epoch, e.g. 0.25); got steps={steps!r}, epochs={epochs!r}."
            )
        self.steps = None if steps is None else _checks.check_int("steps", steps, minimum=1)
        self.epochs = None if epochs is None else _checks.check_finite_positive("epochs", epochs)
        if self.epochs is not None and self.epochs >= 1:
            raise ValueError(f"epochs must be a fraction of an epoch below 1 (e.g. 0.25), got {epochs!r}.")
        self._every = self.steps
        self._first_step = 0

    def on_fit_start(self, state: FitState) -> None:
        try:
            batches = len(state.train_loader)
        except TypeError:
            raise ValueError(
                "ValidateEvery needs a train_loader with a length, to place each row within its epoch; "
                "this one has no len() (an IterableDataset without __len__): give it one."
            ) from None
        if self.epochs is not None:  # in steps, a fraction: 0.25 of 22 steps scores after steps 6, 11, 17
            self._every = self.epochs * -(-batches // state.accumulate)

    def on_epoch_start(self, state: FitState) -> None:
        self._first_step = state.step

    def on_step_end(self, state: FitState) -> None:
        done = state.step - self._first_step
        marks = math.floor(done / self._every + 1e-9)  # (1e-9: 0.3 * 10 steps is 3.0000000000000004)
        if marks > math.floor((done - 1) / self._every + 1e-9):  # this step passed a mark
            state.validate = True
