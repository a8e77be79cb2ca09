"""``fit``: train a model, score the live model and its EMA every epoch, and keep the log as a DataFrame.

The loop's essentials live here (forward, loss, backward, optimizer step, EMA update, scoring, the best
epoch); what it shows and writes, and every optional feature, is a callback (``callbacks.py``).
"""

from __future__ import annotations

import math
import numbers
import os
import time
import warnings
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn

from .. import _batches, _checks
from .._tensors import unwrap
from ..advice import effective_half_life_epochs, half_life_warning
from ..ema import ModelEMA, decay_from_half_life
from ..multi import MultiEMA
from . import _env
from .callbacks import CallbackList, FitState, check_callbacks, is_main_process
from .checkpoint import Checkpoint, loader_generators, rng_state, set_rng_state
from .evaluate import accuracy, check_metrics, cross_entropy, evaluate, resolve_amp, resolve_device
from .history import append_row, best_row, direction, finished_epochs, score_row
from .livelog import LiveLog
from .progress import format_value
from .status import RunStatus

# Schedulers stepped after every optimizer step by default; any other after every epoch.
_PER_STEP_SCHEDULERS = (torch.optim.lr_scheduler.OneCycleLR, torch.optim.lr_scheduler.CyclicLR)
_NON_FINITE_SKIPPED = (
    "fit skipped {what} at step {step}: the loss was {loss}; neither the model (BatchNorm statistics "
    "included) nor the EMA was updated from it (further skips are not reported). A lower learning rate, "
    "gradient clipping (callbacks=[GradientClip(1.0)]) or amp='bf16' instead of 'fp16' usually helps."
)
_ONE_ROW_SKIPPED = (
    "fit skipped a training batch of one row: BatchNorm in train mode normalises a batch by its own "
    "statistics, which one sample does not give (torch raises for BatchNorm1d). Pass drop_last=True to "
    "the training DataLoader (further skips are not reported)."
)


def fit(
    model: nn.Module,
    train_loader: Iterable,
    val_loader: Iterable,
    *,
    epochs: int,
    optimizer: torch.optim.Optimizer,
    scheduler=None,  # a torch LR scheduler, or (scheduler, "step" | "epoch") to say when it steps
    loss_fn: Callable | None = None,  # default: cross entropy
    metrics: Mapping | None = None,  # name -> metric or (metric, "min"|"max"); default: {"accuracy": ...}
    ema: float | str | tuple | ModelEMA | MultiEMA | None = 0.999,  # see below
    monitor: str | tuple | None = None,  # the best epoch's column or score, or (it, "min"|"max")
    callbacks: Iterable | None = (),  # Callback objects (None: none)
    out_dir: str | os.PathLike | None = None,  # history.csv, history.png, model_ema.pth, checkpoint.pt
    resume: bool | str | os.PathLike = False,  # True, "auto", "overwrite" or a checkpoint's path; see below
    device: str | torch.device = "auto",  # "auto": CUDA, then MPS, then CPU
    amp: str | bool = "auto",  # "bf16", "fp16" (with a grad scaler), False; "auto": bf16/fp16 on CUDA only
    accumulate: int = 1,  # batches per optimizer step
    target_key: str | None = None,  # for dict batches: the entry holding the targets (e.g. "labels")
    output_key: int | str | None = None,  # for tuple or dict outputs: the prediction (0, "logits")
) -> pd.DataFrame:
    """Train ``model`` for ``epochs`` epochs, scoring the live model and its EMA on ``val_loader`` each epoch.

    Returns the log, one row per finished epoch: ``epoch``, ``train_loss``, ``live_loss``, ``ema_loss``,
    ``live_<m>`` and ``ema_<m>`` for each metric, ``half_life_epochs_ema`` (how far back the EMA reaches
    now, in epochs, warmup included; not a score), ``lr``, ``seconds``, then any column a callback adds.
    A ``LiveLog`` shows it as it grows (the table, the live plot, a progress bar); pass your own in
    ``callbacks`` to set its options (``LiveLog(progress="off", plot=False)`` for a quiet run). For long
    epochs, ``callbacks=[ValidateEvery(steps=500)]`` also scores within epochs: rows at fractions of an
    epoch (1.5), ``train_loss`` then the mean since the row before.

    Batches are ``(inputs, targets)`` or dicts with ``target_key``; ``inputs`` a tensor, a tuple
    (``model(*inputs)``) or a dict (``model(**inputs)``); a model returning a tuple or dict names its
    prediction with ``output_key``. A loader without ``len()`` (an ``IterableDataset``) works.

    ``ema`` is a decay (0.999), a half-life (``"2 epochs"``, ``"500 steps"``), a ``ModelEMA``, None, or
    several decays (``(0.99, 0.999)`` or a ``MultiEMA``): then each gets its columns, ``ema0.99_loss``,
    ``ema0.999_loss`` and so on, its own colour in the plot, and the best epoch and decay are picked over
    all of them. The best epoch is the one with the best ``monitor`` value: a column, or a score
    (``"loss"``, a metric's name) meaning each EMA's; by default the first metric. Lower is better for
    losses and errors, higher for scores, but only well-known names (``loss``, ``accuracy``, ``rmse``,
    ``auc``, ... ``ema_kit.training.history.DIRECTIONS``) are known: say it for any other with
    ``monitor=("ema_lb", "min")`` or ``metrics={"lb": (lb_score, "min")}``, or fit refuses to start.

    Before training, fit checks every setting and runs one validation batch through the model, each
    EMA, the loss and every metric (a sanity pass; if it fails, the whole validation set, since a metric
    such as AUC may need more than one batch), so a mistake costs seconds, not an epoch, and changes
    nothing: no weight, no file, no folder. A step whose loss is NaN or Inf changes nothing (see below); a
    training batch of one row with BatchNorm in the model is refused up front when the loader tells
    (pass ``drop_last=True``) and skipped with a warning otherwise.

    With ``out_dir`` the log is written after every epoch (``history.csv``, ``history.png``), with the best
    EMA weights (``model_ema.pth``, a plain state dict) and a checkpoint (``checkpoint.pt``) to ``resume``
    from: ``True`` continues it; ``"auto"`` continues when there is one and starts fresh when not (leave
    it on in a notebook that may be rerun); ``"overwrite"`` deletes the run in ``out_dir`` and starts
    over; an ``out_dir`` holding a run is refused otherwise. Resuming gives the same weights and log as
    one uninterrupted run, and checks that the run fits (model, batch size, EMA settings, optimizer,
    scheduler, amp, callbacks) before changing anything. Pass your own ``ModelEMA`` to keep a handle on
    the EMA model afterwards. When the train loader has a length, fit warns at the start if an EMA's
    half-life is over half the run (``ema_kit.advice``). ``out_dir/status.json`` is the run's heartbeat
    (``RunStatus``): ``watch(out_dir)`` shows the run from another process (a ``torchrun`` job, another
    kernel); under DDP every process runs fit and process 0 alone writes (docs/distributed.md).

    The stop button (Jupyter's interrupt, Ctrl-C: KeyboardInterrupt) keeps every finished row: a row, its
    table and plot, the best weights and the epoch's checkpoint are one unit that the stop lands before or
    after, never inside (a second press stops at once). Then ``on_fit_end`` runs and the KeyboardInterrupt
    is raised again, its message saying what was kept ("Stopped by the user during epoch 3 of 10: kept 2
    finished epochs (the last kept: epoch 2); runs/exp1 holds them, with a checkpoint of epoch 2 to resume
    from"). Raised, not returned: a user who pressed stop expects the notebook to stop, so Run All stops
    at this cell and a script ends, instead of going on to the next cells with a short run. The log so far
    is in ``history.csv`` and in your ``LiveLog``'s ``history`` (pass one in ``callbacks`` to keep a
    handle on it); ``resume="auto"`` goes on from the checkpoint.

    ``accumulate=n`` steps the optimizer once every n batches, each group's gradients the mean of its
    batches' (the last, shorter group of an epoch too). Each optimizer step reads one value from the
    device (one host sync): the group's loss, with, under fp16, whether the grad scaler found Inf/NaN
    gradients. If the loss is NaN or Inf (or under fp16 a gradient is), the whole group is skipped: no
    optimizer step, BatchNorm statistics put back as they were before the group, no EMA update, no
    scheduler step, no ``on_step_end``; a non-finite loss is left out of ``train_loss`` and warned
    about once. ``scheduler`` steps per optimizer step for ``OneCycleLR`` and ``CyclicLR``, per epoch for
    any other; ``(scheduler, "step")`` or ``(scheduler, "epoch")`` says which.

    Example:
        >>> from ema_kit.examples.digits import digits_loaders
        >>> from ema_kit.examples.demo import SmallCNN
        >>> train_loader, val_loader = digits_loaders()
        >>> model = SmallCNN()
        >>> ema = ModelEMA(model, decay=0.99)
        >>> log = fit(model, train_loader, val_loader, epochs=2, ema=ema,
        ...           optimizer=torch.optim.AdamW(model.parameters(), lr=3e-3),
        ...           callbacks=[LiveLog(progress="off")])
        >>> list(log.columns)  # doctest: +NORMALIZE_WHITESPACE
        ['epoch', 'train_loss', 'live_loss', 'ema_loss', 'live_accuracy', 'ema_accuracy',
         'half_life_epochs_ema', 'lr', 'seconds']
    """
    # Every setting is checked before anything changes: a mistake costs nothing, not an epoch.
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}.")
    epochs = _checks.check_int("epochs", epochs, minimum=1)
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}.")
    _check_optimizer_trains(optimizer, model)
    accumulate = _checks.check_int("accumulate", accumulate, minimum=1)
    scheduler, scheduler_every = _split_scheduler(scheduler)
    callbacks = check_callbacks(callbacks)
    batches = _length(train_loader, "train_loader")
    _length(val_loader, "val_loader")
    _check_last_batch(train_loader, model)
    if metrics is None:
        metrics = {"accuracy": accuracy} if loss_fn is None else {}
    metrics, directions = check_metrics(metrics)
    loss_fn = loss_fn or cross_entropy
    device = resolve_device(device)
    amp_dtype = resolve_amp(amp, device)
    if out_dir is not None and not isinstance(out_dir, (str, os.PathLike)):
        raise TypeError(f"out_dir must be a folder's path (a str or Path) or None, got {out_dir!r}.")
    out_dir = None if out_dir is None else Path(out_dir)
    files = None if out_dir is None and resume is False else Checkpoint(out_dir, resume=resume)
    model.to(device)  # before the EMA copies it; moving trains nothing
    steps_per_epoch = None if batches is None else math.ceil(batches / accumulate)
    ema = _build_ema(ema, model, steps_per_epoch=steps_per_epoch)
    emas = _named_emas(ema)
    columns = _columns(emas, metrics)
    adds_columns = CallbackList(callbacks).has("on_validation_end")
    monitors, mode = _monitors(monitor, emas, metrics, directions, columns, adds_columns)
    if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau) and scheduler.mode != mode:
        raise ValueError(  # it would lower the lr while the monitor improves
            f"scheduler is ReduceLROnPlateau(mode={scheduler.mode!r}), but fit monitors {monitors[0]} with "
            f"mode={mode!r}; build it with mode={mode!r}, or pass monitor= for the quantity it should watch."
        )
    live_log = _live_log(callbacks, out_dir)
    status = RunStatus(out_dir) if out_dir is not None and is_main_process() else None  # status.json
    callbacks = ([] if live_log in callbacks else [live_log]) + callbacks + [c for c in (files, status) if c]
    hooks = CallbackList(callbacks)  # the live log first, the files last: they see every change of the epoch
    # evaluate's options, for the sanity pass and then every validation
    scoring = dict(loss_fn=loss_fn, metrics=metrics, amp=amp, target_key=target_key, output_key=output_key)
    _sanity_pass(model, emas, val_loader, scoring)

    state = FitState(
        model=unwrap(model),
        ema=ema,
        emas=emas,
        optimizer=optimizer,
        scheduler=scheduler,
        scaler=torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16),
        train_loader=train_loader,
        val_loader=val_loader,
        epochs=epochs,
        accumulate=accumulate,
        device=device,
        amp=amp_dtype,
        target_key=target_key,
        output_key=output_key,
        out_dir=out_dir,
        callbacks=callbacks,
    )
    if files is not None:
        files.load(state)  # a resume: everything checked before anything is loaded
    if steps_per_epoch is not None and is_main_process():
        _warn_long_half_lives(emas, steps_per_epoch * epochs)
    per_step, per_epoch = (scheduler, None) if scheduler_every == "step" else (None, scheduler)
    score = _Scoring(model, val_loader, scoring, monitors, mode, steps_per_epoch, per_epoch, hooks)
    trainer = _Trainer(model, loss_fn, per_step, hooks, batches, score)
    hooks.call("on_fit_start", state)
    try:
        while state.epoch < epochs and not state.stop:
            state.epoch += 1
            hooks.call("on_epoch_start", state)
            trainer.train_epoch(state)
            score(state, trainer, epoch=state.epoch)
    except KeyboardInterrupt:
        hooks.call("on_fit_end", state)  # the bar's last line, a last post-hoc snapshot
        if not is_main_process():
            raise
        raise KeyboardInterrupt(_stopped(state, out_dir)) from None  # what was kept, not where it stopped
    except Exception as error:
        if status is not None:
            status.failed(error)
        if out_dir and len(state.history):
            error.add_note(f"ema_kit.fit: {_kept(state.history, out_dir)}")
        raise
    hooks.call("on_fit_end", state)
    return state.history.reset_index(drop=True)


def _stopped(state: FitState, out_dir: Path | None) -> str:
    """What the stop button kept, in words."""
    finished = finished_epochs(state.history)
    when = "after" if finished == state.epoch else "during"
    said = f"Stopped by the user {when} epoch {state.epoch} of {state.epochs}: "
    if not len(state.history):
        parts = "model, optimizer" + (", scheduler" if state.scheduler is not None else "")
        trained = (
            f" The {parts} and any ModelEMA you passed have taken {state.step} steps: build them afresh "
            "(rerun their cells) before running fit again, or it trains on from where they are."
            if state.step
            else ""
        )
        return said + "no epoch finished, nothing kept." + trained
    return said + _kept(state.history, out_dir)


def _kept(history: pd.DataFrame, out_dir: Path | None) -> str:
    """What is kept, in words: "kept 2 finished epochs (the last kept: epoch 2); runs/x holds them, with a
    checkpoint of epoch 2 to resume from"."""
    finished = finished_epochs(history)
    within = int((history["epoch"].astype(float) > finished).sum())  # rows of the epoch cut short
    kept = "kept " + _count(finished, "finished epoch")
    if within:
        kept += f" and {_count(within, 'row')} scored within epoch {finished + 1}"
    kept += f" (the last kept: epoch {format_value('epoch', history['epoch'].iloc[-1])})"
    if out_dir is None:
        return kept + " in the log (out_dir= would write them, with a checkpoint to resume from)."
    resume = f"a checkpoint of epoch {finished} to resume from" if finished else "no checkpoint yet"
    return kept + f"; {out_dir} holds them, with {resume}."


def _count(number: int, thing: str) -> str:
    return f"{number} {thing}{'' if number == 1 else 's'}"


def _epoch_number(value) -> int | float:
    """An epoch as a log shows it: 3 at an epoch's end, 2.5 within an epoch."""
    return int(value) if float(value).is_integer() else float(value)


class _Scoring:
    """Scores the live model and each EMA into a log row, at each epoch's end and within epochs when a
    callback asks (``state.validate``). The row, the best epoch and what the callbacks show and write
    for it (``on_row_added``; at an epoch's end ``on_epoch_end`` too) are one unit for the stop button."""

    def __init__(self, model, val_loader, scoring, monitors, mode, steps_per_epoch, scheduler, hooks):
        self.model, self.val_loader, self.scoring = model, val_loader, scoring
        self.monitors, self.mode = monitors, mode
        self.steps_per_epoch = steps_per_epoch
        self.scheduler = scheduler  # stepped per epoch; None when stepped per step
        self.hooks = hooks

    def __call__(self, state: FitState, trainer: _Trainer, *, epoch: float) -> None:
        state.scored = _scored(state.emas)
        # Each pass over val_loader draws from the random generators (its iterator's seed, a random subset
        # or crop): every model is scored from the same state, and training goes on from its own, whatever
        # the validation and its callbacks drew. Else how many EMAs were scored, or none, would change the
        # live model's scores and the dropout and shuffles of the training after.
        generators = loader_generators(self.val_loader)
        training = rng_state(*generators)
        try:
            self.hooks.call("on_validation_start", state)
            scoring = rng_state(*generators)
            scores = {}
            for prefix, scored in [("live", self.model), *state.scored.items()]:
                set_rng_state(scoring, *generators)
                scores[prefix] = _score(scored, self.model, self.val_loader, self.scoring)
            per_epoch = self.steps_per_epoch or max(1, state.step - trainer.first_step)  # no len(): measured
            state.row = {
                "epoch": epoch,
                "train_loss": trainer.take_train_loss(state),
                **score_row(scores),
                **{
                    f"half_life_epochs_{name}": effective_half_life_epochs(e, steps_per_epoch=per_epoch)
                    for name, e in state.emas.items()
                },
                "lr": trainer.lr,
                "seconds": time.perf_counter() - trainer.row_started,
            }
            self.hooks.call("on_validation_end", state)
        finally:
            set_rng_state(training, *generators)
        state.row = _rank_zero_row(state.row)
        with _env.finish_before_stopping():
            state.history = append_row(state.history, state.row)
            if self.monitors[0] not in state.history:  # a column a callback was to add in on_validation_end
                raise ValueError(
                    f"monitor={self.monitors[0]!r} is not a column of the log after the callbacks' "
                    f"on_validation_end; the row holds {list(state.row)}."
                )
            state.monitor, best = _best(state.history, self.monitors, self.mode)
            state.best_epoch = None if best is None else _epoch_number(state.history.at[best, "epoch"])
            self.hooks.call("on_row_added", state)
            if epoch == state.epoch:  # the epoch's end
                if self.scheduler is not None:
                    _step_epoch_scheduler(self.scheduler, state.row[state.monitor])
                self.hooks.call("on_epoch_end", state)
        trainer.row_started = time.perf_counter()


class _Trainer:
    """One epoch of training: forward, loss, backward, and per group of batches an optimizer step; within
    it, a row scored where a callback asks for one (``state.validate``)."""

    def __init__(
        self, model: nn.Module, loss_fn: Callable, scheduler, hooks: CallbackList, batches, score: _Scoring
    ):
        self.model, self.loss_fn, self.hooks = model, loss_fn, hooks
        self.scheduler = scheduler  # stepped per optimizer step; None when stepped per epoch
        self.batches = batches  # per epoch; None for a loader without a length
        self.score = score
        self.batchnorm = _batchnorm_trains(model)
        self.warned: set[str] = set()
        self.lr = math.nan  # the last step's
        self.first_step = 0  # the epoch's
        self.row_started = time.perf_counter()

    def take_train_loss(self, state: FitState) -> float:
        """The mean training loss per row (over every process) since the last row; the next row's starts."""
        loss = _all_ranks_mean(self.loss_sum, self.rows, state.device)
        self.loss_sum, self.rows, state.train_loss = 0.0, 0, math.nan
        return loss

    def train_epoch(self, state: FitState) -> None:
        """Train one epoch; ``on_step_end`` and the other hooks may ask for a row within it."""
        self.model.train()
        state.optimizer.zero_grad(set_to_none=True)
        if hasattr(getattr(state.train_loader, "sampler", None), "set_epoch"):  # DistributedSampler
            state.train_loader.sampler.set_epoch(state.epoch)
        # A forward pass in train mode moves BatchNorm statistics; a skipped group must not, so the buffers
        # (small: statistics and counters) are copied at each group's start and put back on a skip.
        self.buffers = list(self.model.buffers())
        self.before = [b.clone() for b in self.buffers]
        self.loss_sum, self.rows = 0.0, 0  # since the last row, of the steps taken: read once per step
        self.finite_rows = 0  # this epoch's
        self.first_step, self.row_started = state.step, time.perf_counter()
        state.train_loss, self.lr = math.nan, state.optimizer.param_groups[0]["lr"]
        group_loss, group_rows, pending = None, 0, 0
        for index, batch in enumerate(state.train_loader):
            inputs, targets = _batches.split(batch, state.target_key)
            state.rows = rows = _batches.rows(inputs, targets)
            if rows == 1 and self.batchnorm:
                self._warn_once("one row", 4, _ONE_ROW_SKIPPED)
                continue
            if pending == 0 and self.buffers:
                torch._foreach_copy_(self.before, self.buffers)
            state.inputs = _batches.to_device(inputs, state.device)
            state.targets = _batches.to_device(targets, state.device)
            self.hooks.call("on_batch_start", state)
            with torch.autocast(state.device.type, dtype=state.amp or torch.float32, enabled=bool(state.amp)):
                state.outputs = _batches.forward(self.model, state.inputs, state.output_key)
                state.loss = self.loss_fn(state.outputs, state.targets)
            self.hooks.call("on_before_backward", state)
            state.scaler.scale(state.loss / state.accumulate).backward()
            self.hooks.call("on_after_backward", state)
            # Kept on the device: read once, when the group steps.
            loss = state.loss.detach().float() * rows
            group_loss = loss if group_loss is None else group_loss + loss
            group_rows, pending = group_rows + rows, pending + 1
            if pending == state.accumulate:
                self._step(state, group_loss, group_rows, pending)
                group_loss, group_rows, pending = None, 0, 0
            self.hooks.call("on_batch_end", state)
            if state.validate and not pending:  # asked for a row, and no group half-accumulated
                state.validate = False
                if self.batches is None:
                    raise ValueError(
                        "A callback asked for a row within the epoch (state.validate), but train_loader has "
                        "no len(), so where the row sits in the epoch is unknown; give its dataset a "
                        "__len__, or score at epochs' ends only."
                    )
                if index + 1 < self.batches:  # at the last batch, the epoch's own row scores it
                    self.score(state, self, epoch=state.epoch - 1 + (index + 1) / self.batches)
        if pending:  # the last batches of the epoch, fewer than accumulate
            self._step(state, group_loss, group_rows, pending)
        state.validate = False
        if self.finite_rows == 0:
            raise ValueError(
                "No training batch gave a finite loss this epoch (or the loader was empty); the model "
                "and EMA were left unchanged. Lower the learning rate or check the inputs."
            )

    def _step(self, state: FitState, group_loss: torch.Tensor, rows: int, batches: int) -> None:
        """The optimizer step of a group of ``batches`` batches, or its skip."""
        self.lr = state.optimizer.param_groups[0]["lr"]
        if batches < state.accumulate:  # a shorter last group: the mean of its own batches
            grads = [p.grad for p in self.model.parameters() if p.grad is not None]
            if grads:
                torch._foreach_mul_(grads, state.accumulate / batches)
        scaler = state.scaler
        if scaler.is_enabled():
            scaler.unscale_(state.optimizer)  # records whether a gradient is Inf/NaN; no sync
        self.hooks.call("on_before_step", state)
        # The step's one host sync: the group's loss and, under fp16, the scaler's Inf/NaN finding, read
        # together (scaler.step would read its finding again, so fit steps the optimizer itself).
        if scaler.is_enabled():
            # GradScaler keeps its finding in private state; read here, it costs no extra sync.
            found = sum(
                f.to(group_loss.device) for f in scaler._found_inf_per_device(state.optimizer).values()
            )
            loss, overflow = torch.stack([group_loss, found.float()]).tolist()
        else:
            loss, overflow = group_loss.item(), 0.0
        finite = math.isfinite(loss)
        if finite:
            self.loss_sum, self.rows = self.loss_sum + loss, self.rows + rows
            self.finite_rows += rows
            state.train_loss = self.loss_sum / self.rows
        if finite and not overflow:
            state.optimizer.step()
        scaler.update()  # under fp16: a lower scale after an overflow; a no-op otherwise
        state.optimizer.zero_grad(set_to_none=True)
        if not (finite and not overflow):
            if self.buffers:
                torch._foreach_copy_(self.buffers, self.before)
            if not finite:
                self._warn_once(
                    "non-finite",
                    5,
                    _NON_FINITE_SKIPPED.format(
                        what="a batch" if batches == 1 else f"a group of {batches} batches (accumulate)",
                        step=state.step,
                        loss=loss / rows,
                    ),
                )
            return
        state.step += 1
        if state.ema is not None:
            state.ema.update(self.model)
        if self.scheduler is not None:
            self.scheduler.step()
        self.hooks.call("on_step_end", state)

    def _warn_once(self, kind: str, stacklevel: int, message: str) -> None:
        """Warn about the first skip of a kind; ``stacklevel`` points at the call of fit."""
        if kind not in self.warned:
            self.warned.add(kind)
            warnings.warn(message, RuntimeWarning, stacklevel=stacklevel + 1)


def _score(scored: nn.Module | ModelEMA, model: nn.Module, val_loader: Iterable, scoring: dict) -> dict:
    """A module's scores; a sharded EMA has no module of its own: the sharded model runs with its weights."""
    if isinstance(scored, ModelEMA):
        with scored.applied_to(model):
            return evaluate(model, val_loader, **scoring)
    return evaluate(scored, val_loader, **scoring)


def _scored(emas: dict[str, ModelEMA]) -> dict[str, nn.Module | ModelEMA]:
    """What scores each EMA: its module, or of a sharded model the EMA itself (see ``_score``)."""
    return {name: e if e.sharded else e.module for name, e in emas.items()}


def _score_first_batch(scored, model: nn.Module, first, val_loader: Iterable, scoring: dict) -> None:
    """Score one batch; if that fails, the whole set (a metric may need more than one batch), whose error
    is the one that counts."""
    try:
        _score(scored, model, [first], scoring)
    except Exception:
        _score(scored, model, val_loader, scoring)


def _sanity_pass(model: nn.Module, emas: dict[str, ModelEMA], val_loader: Iterable, scoring: dict) -> None:
    """One validation batch through the live model and each EMA, the loss and every metric, before any
    weight changes.

    A metric may need more than one batch (AUC with a single class in the batch): if the one batch
    fails, the whole set is scored and only its error counts. The random states the pass draws from
    (a loader's shuffle, its workers' seeds) are put back, so training is the same as without it.
    """
    generators = loader_generators(val_loader)
    drawn = rng_state(*generators)
    try:
        first = next(iter(val_loader), None)
        if first is None:
            raise ValueError(
                "val_loader yielded no batches; fit scores the live and EMA model on it after every epoch, "
                "so it needs at least one (is its dataset empty, or its iterator exhausted?)."
            )
        for name, scored in [("live", model), *_scored(emas).items()]:
            try:
                _score_first_batch(scored, model, first, val_loader, scoring)
            except Exception as error:
                if name != "live":
                    dtypes = {t.dtype for t in emas[name].state_dict()["weights"].values()}
                    error.add_note(
                        f"ema_kit.fit: scoring the EMA model {name!r} failed (its weights: "
                        f"{', '.join(sorted(map(str, dtypes)))}); a bfloat16 EMA scores under amp='bf16'."
                    )
                raise
    except Exception as error:
        error.add_note(
            "ema_kit.fit: raised in the sanity pass before training (a validation batch through the live "
            "model, each EMA, loss_fn and every metric); nothing was changed or written."
        )
        raise
    finally:
        set_rng_state(drawn, *generators)


def _check_optimizer_trains(optimizer: torch.optim.Optimizer, model: nn.Module) -> None:
    """The optimizer must hold some of the model's parameters (not those of a model built before it)."""
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    if held and not any(id(p) in held for p in model.parameters()):
        raise ValueError(
            f"optimizer holds none of the model's parameters: it was built over another model (in a "
            f"notebook: the model cell rerun, the optimizer cell not). Build it over this one, e.g. "
            f"optimizer = torch.optim.{type(optimizer).__name__}(model.parameters(), ...)."
        )


def _batchnorm_trains(model: nn.Module) -> bool:
    """Whether a BatchNorm layer of the model normalises by batch statistics in train mode (a model may
    keep its BatchNorm frozen in eval mode through its own ``train``); every module's mode is put back."""
    modes = [(module, module.training) for module in model.modules()]
    model.train()
    found = any(isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training for m in model.modules())
    for module, mode in modes:
        module.training = mode
    return found


def _check_last_batch(loader, model: nn.Module) -> None:
    """Refuse a training loader whose batches (or last batch) hold one row when the model has BatchNorm."""
    if not _batchnorm_trains(model):
        return
    sampler = getattr(loader, "batch_sampler", None)
    if not isinstance(sampler, torch.utils.data.BatchSampler) or sampler.drop_last:
        return
    try:
        rows = len(sampler.sampler)
    except TypeError:
        return
    last = rows % sampler.batch_size or sampler.batch_size
    if last == 1:
        raise ValueError(
            f"train_loader's last batch holds one row ({rows} rows in batches of {sampler.batch_size}), "
            "and BatchNorm in train mode cannot normalise a single sample reliably (torch raises for "
            "BatchNorm1d, mid-epoch). Pass drop_last=True to the training DataLoader, or another batch_size."
        )


def _split_scheduler(scheduler) -> tuple[object | None, str]:
    """The scheduler, and "step" or "epoch": when it steps (given, or known from its class)."""
    if isinstance(scheduler, tuple):
        if len(scheduler) != 2 or scheduler[1] not in ("step", "epoch"):
            raise ValueError(
                f"scheduler=(scheduler, every) takes every='step' (after each optimizer step) or 'epoch', "
                f"got {scheduler!r}."
            )
        return scheduler
    if scheduler is None:
        return None, "epoch"
    return scheduler, "step" if isinstance(scheduler, _PER_STEP_SCHEDULERS) else "epoch"


def _step_epoch_scheduler(scheduler, monitored: float) -> None:
    if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
        scheduler.step(monitored)
    else:
        scheduler.step()


def _live_log(callbacks: list, out_dir) -> LiveLog:
    """The run's one LiveLog: the one in callbacks, or a new one."""
    logs = [c for c in callbacks if isinstance(c, LiveLog)]
    if len(logs) > 1:
        raise ValueError(f"callbacks hold {len(logs)} LiveLog objects; fit shows one log: pass one.")
    if any(isinstance(c, Checkpoint) for c in callbacks):
        raise ValueError(
            "fit writes its checkpoint itself: pass out_dir= and resume= instead of a Checkpoint."
        )
    live_log = logs[0] if logs else LiveLog()
    if live_log.out_dir is not None and out_dir is not None and live_log.out_dir != out_dir:
        raise ValueError(
            f"LiveLog(out_dir={str(live_log.out_dir)!r}) and fit(out_dir={str(out_dir)!r}) name two folders "
            "for one run: give out_dir once (fit's writes the log there too)."
        )
    return live_log


def _build_ema(ema, model: nn.Module, *, steps_per_epoch: int | None) -> ModelEMA | MultiEMA | None:
    """What fit updates after each step, from fit's ``ema`` argument."""
    if ema is None or isinstance(ema, (ModelEMA, MultiEMA)):
        return ema
    if isinstance(ema, str):
        return ModelEMA(model, decay=_decay_from_text(ema, steps_per_epoch))
    if isinstance(ema, numbers.Real) and not isinstance(ema, (bool, np.bool_)) and 0 <= ema < 1:
        return ModelEMA(model, decay=_number_as_printed(ema))
    if isinstance(ema, (tuple, list)):
        return MultiEMA(model, decays=tuple(_number_as_printed(decay) for decay in ema))
    raise ValueError(
        f"ema must be a decay in [0, 1) such as 0.999, a half-life such as '2 epochs' or '500 steps', a "
        f"tuple of decays, a ModelEMA or MultiEMA, or None; got {ema!r}."
    )


def _number_as_printed(value):
    """A NumPy number as the Python number it prints as (np.float32(0.99) -> 0.99): it names a column."""
    if isinstance(value, np.floating):
        return float(str(value))
    if isinstance(value, np.integer):
        return int(value)
    return value


def _named_emas(ema) -> dict[str, ModelEMA]:
    """Log prefixes: ``ema`` for one EMA, ``ema<decay>`` (as written, e.g. ``ema0.999``) for several."""
    if ema is None:
        return {}
    if isinstance(ema, ModelEMA):
        return {"ema": ema}
    return {f"ema{decay!r}": e for decay, e in ema.emas.items()}


def _decay_from_text(text: str, steps_per_epoch: int | None) -> float:
    number, _, unit = text.strip().partition(" ")
    try:
        value = float(number)
    except ValueError:
        value = math.nan
    if unit.strip() in ("epoch", "epochs") and math.isfinite(value):
        if steps_per_epoch is None:
            raise ValueError(
                f"ema={text!r} needs the steps per epoch, but train_loader has no len(): give the "
                "half-life in steps, e.g. ema='500 steps'."
            )
        return decay_from_half_life(epochs=value, steps_per_epoch=steps_per_epoch)
    if unit.strip() in ("step", "steps") and math.isfinite(value):
        return decay_from_half_life(value)
    raise ValueError(
        f"ema={text!r}: write a half-life as '<number> epochs' or '<number> steps', e.g. '2 epochs'."
    )


def _warn_long_half_lives(emas: dict[str, ModelEMA], total_steps: int) -> None:
    """One warning per EMA whose half-life is over half the run (``advice.half_life_warning``)."""
    for name, ema in emas.items():
        if ema.half_life == 0:  # decay 0: the EMA is the model itself
            continue
        message = half_life_warning(ema.half_life, total_steps, warmup=ema.warmup)
        if message is not None:
            warnings.warn(f"fit: {name}: {message}", UserWarning, stacklevel=3)


def _columns(emas: dict, metrics: Mapping) -> list[str]:
    prefixes = ["live", *emas]
    return (
        ["epoch", "train_loss"]
        + [f"{p}_loss" for p in prefixes]
        + [f"{p}_{m}" for m in metrics for p in prefixes]
        # Not "<model>_<quantity>" (history.score_columns): a reach, not a score to plot or pick by.
        + [f"half_life_epochs_{name}" for name in emas]
        + ["lr", "seconds"]
    )


def _monitors(monitor, emas: dict, metrics: dict, directions: dict, columns: list[str], adds_columns: bool):
    """The log columns the best epoch is picked over (one per EMA for a score), and "min" or "max"."""
    name, mode = monitor if isinstance(monitor, tuple) and len(monitor) == 2 else (monitor, None)
    if not (name is None or isinstance(name, str)) or mode not in (None, "min", "max"):
        raise ValueError(
            f"monitor must be a column or score name, or (name, 'min') / (name, 'max') saying whether "
            f"lower or higher is better, got {monitor!r}."
        )
    first_score = next(iter(metrics), "loss")  # by default the EMAs' first metric, or their loss
    if name is None or name == "loss" or name in metrics:  # a score: the best over all EMAs
        monitors = [f"{prefix}_{name or first_score}" for prefix in emas or ["live"]]
    else:
        monitors = [name]
    if monitors[0] not in columns and not adds_columns:
        raise ValueError(
            f"monitor={name!r} is not a column of the log; choose one of {columns[1:-2]} (or add it to the "
            "row in a callback's on_validation_end)."
        )
    quantity = monitors[0].split("_", 1)[-1]
    known = directions.get(quantity) or direction(quantity)
    if mode is None:
        if known is None:
            raise ValueError(
                f"fit monitors {monitors[0]!r} but cannot tell whether a lower or a higher {quantity} is "
                f"better (it knows well-known names only: loss, accuracy, rmse, auc, ...). Say which: "
                f"monitor=({monitors[0]!r}, 'min') if lower is better (a loss, an error), or "
                f"monitor=({monitors[0]!r}, 'max') if higher is better (a score, an accuracy); or give the "
                f"metric its direction: metrics={{{quantity!r}: ({quantity}, 'min')}} or ({quantity}, 'max')."
            )
        return monitors, known
    if known is not None and known != mode:
        why = "the direction given in metrics=" if quantity in directions else "a well-known name"
        raise ValueError(
            f"monitor={monitor!r} says {'lower' if mode == 'min' else 'higher'} is better, but {quantity!r} "
            f"is {'lower' if known == 'min' else 'higher'}-is-better ({why}); drop the direction, or fix it."
        )
    return monitors, mode


def _best(history: pd.DataFrame, monitors: list[str], mode: str) -> tuple[str, int | None]:
    """The monitored column and row of the best epoch, over every candidate column (one per EMA)."""
    candidates = [(m, row) for m in monitors if (row := best_row(history, m, mode)) is not None]
    if not candidates:
        return monitors[0], None
    sign = 1 if mode == "min" else -1
    return min(candidates, key=lambda candidate: sign * history.at[candidate[1], candidate[0]])


def _length(loader, name: str) -> int | None:
    """Batches per epoch; None for a loader without a length (an IterableDataset's)."""
    length = _batches.batches_per_epoch(loader)
    if length is None:
        if not isinstance(loader, Iterable):
            raise TypeError(f"{name} must be an iterable of batches, such as a DataLoader.")
        return None
    if length == 0:
        raise ValueError(
            f"{name} is empty: it yields no batches (is the dataset empty, or drop_last=True "
            "with fewer samples than batch_size?)."
        )
    return length


def _all_ranks_mean(total: float, count: int, device: torch.device) -> float:
    """The mean over every process of a distributed run (or this one), so each rank logs the same."""
    if torch.distributed.is_initialized():
        sums = torch.tensor([total, count], dtype=torch.float64, device=device)
        torch.distributed.all_reduce(sums)
        total, count = sums.tolist()
    return total / count if count else math.nan  # every step since the last row skipped (non-finite)


def _rank_zero_row(row: dict) -> dict:
    """Rank 0's log row on every process of a distributed run (BatchNorm statistics, and so the scores,
    differ between ranks), so that all ranks log, stop early and pick the best epoch alike."""
    if not torch.distributed.is_initialized():
        return row
    shared = [row]
    torch.distributed.broadcast_object_list(shared, src=0)
    return shared[0]
