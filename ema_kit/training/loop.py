"""``fit``: train a model, score the live model and its EMA every epoch, and keep the log as a DataFrame."""

from __future__ import annotations

import copy
import difflib
import math
import numbers
import os
import time
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn

from .. import _batches
from .._tensors import layout_mismatch, unwrap
from ..advice import effective_half_life_epochs, half_life_warning
from ..bn import recompute_bn
from ..ema import ModelEMA, decay_from_half_life, save_module
from ..files import atomic_save
from ..multi import MultiEMA
from . import checkpoint as checkpoints
from .evaluate import accuracy, check_metrics, cross_entropy, evaluate, resolve_amp, resolve_device
from .history import best_row, direction, write_csv
from .plot import LivePlot
from .progress import Progress
from .switch import SwitchEMA

_PER_BATCH_SCHEDULERS = (torch.optim.lr_scheduler.OneCycleLR, torch.optim.lr_scheduler.CyclicLR)
HOOKS = ("on_fit_start", "on_step_end", "on_epoch_end", "on_fit_end")
_RUN_FILES = ("checkpoint.pt", "history.csv", "history.png", "model_ema.pth", "model.pth")


class Callback:
    """Base class of ``fit`` callbacks: override the hooks you need; each receives the ``FitState``.

    ``on_fit_start`` (before the first epoch, after a resume has loaded), ``on_step_end`` (after each
    optimizer step and EMA update), ``on_epoch_end`` (after both models were scored; ``state.row`` holds
    the new log row) and ``on_fit_end``. Setting ``state.stop = True`` ends training after the current
    epoch. ``fit`` refuses a callback with a method named like a hook that is none (``on_epoch_ends``). A
    callback with ``state_dict()`` and ``load_state_dict()`` has its state kept in ``checkpoint.pt`` and
    restored on resume. Any object with these hooks works; subclassing only spells them for you.

    Example:
        >>> class PrintLR(Callback):
        ...     def on_epoch_end(self, state):
        ...         print(f"epoch {state.epoch}: lr {state.optimizer.param_groups[0]['lr']}")
    """

    def on_fit_start(self, state: FitState) -> None:
        pass

    def on_step_end(self, state: FitState) -> None:
        pass

    def on_epoch_end(self, state: FitState) -> None:
        pass

    def on_fit_end(self, state: FitState) -> None:
        pass


@dataclass
class FitState:
    """What ``fit`` hands to callbacks (see ``Callback``)."""

    model: nn.Module  # the plain model being trained (wrappers looked through)
    emas: dict[str, ModelEMA]  # log prefix ("ema", or "ema<decay>" for several decays) -> its ModelEMA
    averager: ModelEMA | MultiEMA | None  # what fit calls update(model) on after each step
    optimizer: torch.optim.Optimizer
    epochs: int
    out_dir: Path | None
    epoch: int = 0  # the current (1-based) or last finished epoch
    step: int = 0  # optimizer steps so far
    history: pd.DataFrame = field(default_factory=pd.DataFrame)
    row: dict = field(default_factory=dict)
    stop: bool = False


def fit(
    model: nn.Module,
    train_loader: Iterable,
    val_loader: Iterable,
    *,
    epochs: int,
    optimizer: torch.optim.Optimizer,
    loss_fn: Callable | None = None,  # default: cross entropy
    metrics: Mapping | None = None,  # name -> metric or (metric, "min"|"max"); default: {"accuracy": ...}
    ema: float | str | tuple | ModelEMA | MultiEMA | None = 0.999,  # see below
    ema_switch: str | int | None = None,  # "epoch" or n: copy the EMA into the model each epoch/n steps
    recompute_ema_bn: bool = False,  # measure the EMA's BatchNorm statistics afresh before scoring it
    device: str | torch.device = "auto",  # "auto": CUDA, then MPS, then CPU
    amp: str | bool = "auto",  # "bf16", "fp16" (with a grad scaler), False; "auto": bf16/fp16 on CUDA only
    accumulate: int = 1,  # batches per optimizer step
    clip_grad_norm: float | None = None,  # the largest gradient norm, > 0; None: no clipping
    scheduler=None,  # a torch LR scheduler
    scheduler_step: str = "auto",  # "batch" or "epoch"; "auto": per batch for OneCycleLR and CyclicLR
    callbacks: Iterable | None = (),  # Callback objects (None: none)
    monitor: str | None = None,  # a log column, or a score ("loss") meaning each EMA's; default: first metric
    mode: str = "auto",  # "min" or "max": whether lower or higher monitor values are better; "auto": known
    patience: int | None = None,  # stop after this many epochs without a better monitor value
    out_dir: str | os.PathLike | None = None,  # history.csv, history.png, model_ema.pth, checkpoint.pt
    resume: bool | str | os.PathLike = False,  # True: out_dir/checkpoint.pt; "auto": it if it exists; a path
    overwrite: bool = False,  # start over in an out_dir that holds a run (its files are deleted first)
    target_key: str | None = None,  # for dict batches: the entry holding the targets (e.g. "labels")
    output_key: int | str | None = None,  # for tuple or dict outputs: the prediction (0, "logits")
    plot: bool = True,  # the live plot (in a notebook; and history.png when out_dir is set)
    progress: str = "auto",  # "widget", "text", "off"; "auto": a widget where a notebook can show one
) -> pd.DataFrame:
    """Train ``model`` for ``epochs`` epochs, scoring the live model and its EMA on ``val_loader`` each epoch.

    Returns the log, one row per finished epoch: ``epoch``, ``train_loss``, ``live_loss``, ``ema_loss``,
    ``live_<m>`` and ``ema_<m>`` for each metric, ``half_life_epochs_ema`` (how far back the EMA reaches
    now, in epochs, warmup included; not a score), ``lr``, ``seconds``.

    Batches are ``(inputs, targets)`` or dicts with ``target_key``; ``inputs`` a tensor, a tuple
    (``model(*inputs)``) or a dict (``model(**inputs)``); a model returning a tuple or dict names its
    prediction with ``output_key``. A loader without ``len()`` (an ``IterableDataset``) works.

    ``ema`` is a decay (0.999), a half-life (``"2 epochs"``, ``"500 steps"``), a ``ModelEMA``, None, or
    several decays (``(0.99, 0.999)`` or a ``MultiEMA``): then each gets its columns, ``ema0.99_loss``,
    ``ema0.999_loss`` and so on, its own colour in the plot, and the best epoch and decay are picked
    over all of them. The best epoch is the one with the best ``monitor`` value: lower is better for
    losses and errors, higher for scores. Only well-known names (``loss``, ``accuracy``, ``rmse``,
    ``auc``, ... see ``ema_kit.training.history.DIRECTIONS``) are known; say it for any other with
    ``mode=`` or in ``metrics={"lb": (lb_score, "min")}``, or fit refuses to start. When the train loader
    has a length, fit warns at the start if an EMA's half-life is over half the run (``ema_kit.advice``).

    ``ema_switch`` (one EMA only) is Switch EMA (Li et al. 2024): ``"epoch"`` copies the EMA into the
    live model after each epoch was scored, an int n after every n-th optimizer step, with
    ``ema.copy_to(model)``; the optimizer state is kept (see ``ema_kit.training.switch.SwitchEMA``).
    ``recompute_ema_bn=True`` measures each EMA's BatchNorm statistics afresh with one pass over
    ``train_loader`` before it is scored (``ema_kit.bn.recompute_bn``); the saved ``model_ema.pth`` holds
    the statistics that were scored, while the EMA itself keeps averaging its own, and training (the
    shuffle, dropout) is the same as without the option.

    With ``out_dir`` the log is written after every epoch (``history.csv``, ``history.png``), with the best
    EMA weights (``model_ema.pth``, a plain state dict) and a checkpoint to ``resume`` from; resuming
    gives the same weights and log as one uninterrupted run, and checks that the run fits (model,
    optimizer, scheduler, amp, EMA settings, lr) before changing anything. ``resume="auto"`` continues
    when there is a checkpoint and starts fresh when not: leave it on in a notebook that may be rerun. An
    out_dir holding a run is refused without resume or ``overwrite=True``. Every setting is checked
    before training. The stop button (KeyboardInterrupt) ends training cleanly after the last finished
    epoch. A step whose loss is NaN or Inf changes nothing: not the model, its BatchNorm statistics, nor
    the EMA. Pass your own ``ModelEMA`` to keep a handle on the EMA model afterwards.

    Example:
        >>> from ema_kit.examples.digits import digits_loaders
        >>> from ema_kit.examples.demo import SmallCNN
        >>> train_loader, val_loader = digits_loaders()
        >>> model = SmallCNN()
        >>> ema = ModelEMA(model, decay=0.99)
        >>> log = fit(model, train_loader, val_loader, epochs=2, ema=ema, progress="off",
        ...           optimizer=torch.optim.AdamW(model.parameters(), lr=3e-3))
        >>> list(log.columns)  # doctest: +NORMALIZE_WHITESPACE
        ['epoch', 'train_loss', 'live_loss', 'ema_loss', 'live_accuracy', 'ema_accuracy',
         'half_life_epochs_ema', 'lr', 'seconds']
    """
    # Every setting is checked before anything changes: a mistake costs nothing, not an epoch.
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}.")
    epochs = _check_int("epochs", epochs, "an int >= 1")
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}.")
    accumulate = _check_int("accumulate", accumulate, "an int >= 1 (batches per optimizer step)")
    if patience is not None:
        patience = _check_int("patience", patience, "None or an int >= 1 (epochs)")
    if clip_grad_norm is not None:
        clip_grad_norm = _check_positive("clip_grad_norm", clip_grad_norm)
    if mode not in ("auto", "min", "max"):
        raise ValueError(f"mode must be 'auto', 'min' or 'max' (for monitor), got {mode!r}.")
    if not isinstance(overwrite, bool):
        raise TypeError(f"overwrite must be True or False, got {overwrite!r}.")
    if overwrite and resume is not False:
        raise ValueError(
            f"resume={resume!r} continues a run and overwrite=True starts over: pass one of them."
        )
    callbacks = _check_callbacks(callbacks)
    batches = _length(train_loader, "train_loader")
    _length(val_loader, "val_loader")
    if metrics is None:
        metrics = {"accuracy": accuracy} if loss_fn is None else {}
    metrics, directions = check_metrics(metrics)
    loss_fn = loss_fn or cross_entropy
    device = resolve_device(device)
    amp_dtype = resolve_amp(amp, device)
    scheduler_step = _resolve_scheduler_step(scheduler, scheduler_step)
    main_process = not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0
    out_dir = None if out_dir is None else Path(out_dir)
    resume = _resume_path(resume, out_dir)
    if out_dir is not None and main_process:
        _check_out_dir(out_dir, resume, overwrite)
    model.to(device)  # before the EMA copies it; moving trains nothing
    steps_per_epoch = None if batches is None else math.ceil(batches / accumulate)
    averager = _resolve_ema(ema, model, steps_per_epoch=steps_per_epoch)
    emas = _named_emas(averager)
    callbacks += _switch_callback(ema_switch, averager, callbacks)
    if not isinstance(recompute_ema_bn, bool):
        raise TypeError(f"recompute_ema_bn must be True or False, got {recompute_ema_bn!r}.")
    if recompute_ema_bn:
        _check_recompute_bn(averager, model)
    columns = _columns(emas, metrics)
    monitors, mode = _monitors(monitor, mode, emas, metrics, directions, columns)
    plateau = isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau)
    if plateau and scheduler.mode != mode:  # it would lower the lr while the monitor improves
        raise ValueError(
            f"scheduler is ReduceLROnPlateau(mode={scheduler.mode!r}), but fit monitors {monitors[0]} with "
            f"mode={mode!r}; build it with mode={mode!r}, or pass monitor= for the quantity it should watch."
        )
    if out_dir is not None and main_process and overwrite and resume is None:
        for name in _RUN_FILES:  # a kill before the first epoch ends must not leave the old run to resume
            (out_dir / name).unlink(missing_ok=True)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    generators = _loader_generators(train_loader)
    state = FitState(unwrap(model), emas, averager, optimizer, epochs, out_dir)
    stateful = [c for c in callbacks if hasattr(c, "state_dict") and hasattr(c, "load_state_dict")]
    if resume is not None:
        _resume(state, resume, scheduler, scaler, amp_dtype, generators, stateful)
    live_plot = LivePlot(out_dir and out_dir / "history.png") if plot and main_process else None
    shown = Progress(progress if main_process else "off", epochs=epochs)
    if resume is not None and shown.mode != "off":
        done = " (all of them: nothing left to train)" if state.epoch >= epochs else ""
        print(f"Resumed from {resume} after epoch {state.epoch} of {epochs}{done}.")
    if resume is not None and live_plot and len(state.history):  # a rerun notebook shows the run so far
        _, best = _best(state.history, monitors, mode)
        live_plot.update(
            state.history, best_epoch=None if best is None else int(state.history.at[best, "epoch"])
        )
    trainer = _Trainer(
        model,
        optimizer,
        loss_fn,
        device,
        amp_dtype,
        scaler,
        accumulate,
        clip_grad_norm,
        scheduler if scheduler_step == "batch" else None,
        (target_key, output_key),
    )
    saved_parts = {"scheduler": scheduler, "scaler": scaler, "amp": amp_dtype, "callbacks": stateful}
    if steps_per_epoch is not None and main_process:
        _warn_long_half_lives(emas, steps_per_epoch * epochs)
    _call(callbacks, "on_fit_start", state)
    try:
        while state.epoch < epochs and not state.stop:
            state.epoch += 1
            started, steps_before = time.perf_counter(), state.step
            shown.start_epoch(state.epoch, batches=batches)
            train_loss, lr = trainer.train_epoch(train_loader, state, shown, callbacks)
            row = {"epoch": state.epoch, "train_loss": train_loss}
            scored = {name: e.module for name, e in emas.items()}
            if recompute_ema_bn:
                # On a copy: the EMA averages its BatchNorm buffers (buffers="average"), so statistics
                # measured in place would be averaged into it and change the EMA for the rest of the run.
                # The copy is what is scored and, if best, saved as model_ema.pth. The extra pass draws
                # a shuffle (and dropout masks): the random states are put back so training is the same.
                drawn = checkpoints.rng_state(*generators)
                with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=bool(amp_dtype)):
                    for name, module in scored.items():
                        scored[name] = copy.deepcopy(module)
                        recompute_bn(scored[name], train_loader, target_key=target_key)
                checkpoints.set_rng_state(drawn, *generators)
            for prefix, evaluated in [("live", model), *scored.items()]:
                scores = evaluate(evaluated, val_loader, loss_fn=loss_fn, metrics=metrics, amp=amp,
                                  target_key=target_key, output_key=output_key)  # fmt: skip
                row |= {f"{prefix}_{name}": value for name, value in scores.items()}
            per_epoch = steps_per_epoch or max(1, state.step - steps_before)  # no len(): as measured
            row |= {
                f"half_life_epochs_{name}": effective_half_life_epochs(e, steps_per_epoch=per_epoch)
                for name, e in emas.items()
            }
            row |= {"lr": lr, "seconds": time.perf_counter() - started}
            state.row = row = _rank_zero_row(row)
            state.history = pd.DataFrame([*state.history.to_dict("records"), row], columns=columns)
            monitor, best = _best(state.history, monitors, mode)
            if scheduler is not None and scheduler_step == "epoch":
                _step_epoch_scheduler(scheduler, row[monitor])
            best_epoch = None if best is None else int(state.history.at[best, "epoch"])
            if main_process:
                _write_epoch(state, best_epoch, monitor, saved_parts, generators, scored)
                if live_plot:
                    live_plot.update(state.history, best_epoch=best_epoch)
            shown.end_epoch(state.history)
            _call(callbacks, "on_epoch_end", state)
            if patience and best_epoch is not None and state.epoch - best_epoch >= patience:
                if main_process:
                    print(
                        f"Early stop: {monitor} has not improved for {patience} epochs "
                        f"(best {state.history.at[best, monitor]:.4g} at epoch {best_epoch})."
                    )
                state.stop = True
    except KeyboardInterrupt:
        finished = len(state.history)
        if main_process:
            where = f"; {out_dir} holds them and a checkpoint to resume from" if out_dir and finished else ""
            print(
                f"\nStopped by the user during epoch {state.epoch}: kept {finished} finished epochs{where}."
            )
    except Exception as error:
        if out_dir and len(state.history):
            error.add_note(
                f"ema_kit.fit: the {len(state.history)} finished epochs are kept in "
                f"{out_dir / 'history.csv'}, with a checkpoint to resume from."
            )
        raise
    finally:
        shown.close()
    _call(callbacks, "on_fit_end", state)
    return state.history.reset_index(drop=True)


class _Trainer:
    """One epoch of training: forward, backward, optimizer step, EMA update, progress."""

    def __init__(
        self, model, optimizer, loss_fn, device, amp_dtype, scaler, accumulate, clip, scheduler, keys
    ):
        self.model, self.optimizer, self.loss_fn, self.device = model, optimizer, loss_fn, device
        self.amp_dtype, self.scaler, self.accumulate, self.clip = amp_dtype, scaler, accumulate, clip
        self.scheduler = scheduler  # stepped per batch; None when stepped per epoch
        self.target_key, self.output_key = keys
        self.warned = False

    def train_epoch(self, loader, state: FitState, shown: Progress, callbacks) -> tuple[float, float]:
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        loss_sum, count, pending = 0.0, 0, 0
        lr = self.optimizer.param_groups[0]["lr"]
        if hasattr(getattr(loader, "sampler", None), "set_epoch"):  # DistributedSampler: a new shuffle
            loader.sampler.set_epoch(state.epoch)
        # A forward pass in train mode moves BatchNorm statistics; a skipped batch must not, so the
        # buffers (small: statistics and counters) are copied before each forward and put back on a skip.
        buffers = list(self.model.buffers())
        before = [b.clone() for b in buffers]
        for batch in loader:
            inputs, targets = _batches.split(batch, self.target_key)
            inputs = _batches.to_device(inputs, self.device)
            targets = _batches.to_device(targets, self.device)
            if buffers:
                torch._foreach_copy_(before, buffers)
            with torch.autocast(
                self.device.type, dtype=self.amp_dtype or torch.float32, enabled=self.amp_dtype is not None
            ):
                loss = self.loss_fn(_batches.forward(self.model, inputs, self.output_key), targets)
            value = loss.float().item()
            size = _batches.size(targets)
            if math.isfinite(value):
                self.scaler.scale(loss / self.accumulate).backward()
                pending += 1
                loss_sum += value * size
                count += size
            else:
                if buffers:
                    torch._foreach_copy_(buffers, before)
                self._warn_non_finite(value, state.step)
            if pending == self.accumulate:
                lr = self._finish_step(state, callbacks)
                pending = 0
            shown.batch(images=size, loss=value)
        if pending:  # the last batches of the epoch, fewer than accumulate
            lr = self._finish_step(state, callbacks)
        if count == 0:
            raise ValueError(
                "No training batch gave a finite loss this epoch (or the loader was empty); the model "
                "and EMA were left unchanged. Lower the learning rate or check the inputs."
            )
        return _all_ranks_mean(loss_sum, count, self.device), lr

    def _finish_step(self, state: FitState, callbacks) -> float:
        """Optimizer step, EMA update, scheduler step and callbacks; returns the lr the step used."""
        lr = self.optimizer.param_groups[0]["lr"]
        if self._step():
            state.step += 1
            if state.averager is not None:
                state.averager.update(self.model)
            if self.scheduler is not None:
                self.scheduler.step()
            _call(callbacks, "on_step_end", state)
        return lr

    def _step(self) -> bool:
        """Optimizer step; False when the grad scaler skipped it (inf/NaN gradients under fp16)."""
        if self.clip is not None:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self.model.parameters(), self.clip)
        scale = self.scaler.get_scale()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        return not self.scaler.is_enabled() or self.scaler.get_scale() >= scale

    def _warn_non_finite(self, value: float, step: int) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        if not self.warned:
            self.warned = True
            warnings.warn(
                f"fit skipped a batch at step {step}: the loss was {value}; neither the model (BatchNorm "
                "statistics included) nor the EMA was updated from it (further skips are not reported). "
                "A lower learning rate, gradient clipping (clip_grad_norm=1.0) or amp='bf16' instead of "
                "'fp16' usually helps.",
                RuntimeWarning,
                stacklevel=4,
            )


def _write_epoch(state: FitState, best_epoch, monitor: str, parts: dict, generators, scored: dict) -> None:
    """Log, best weights and checkpoint of the epoch just finished, each written atomically.

    ``scored`` maps each EMA's name to the module that was scored (its BatchNorm recomputed, or the EMA's).
    """
    if state.out_dir is None:
        return
    write_csv(state.history, state.out_dir / "history.csv")
    if best_epoch == state.epoch:
        named = monitor.split("_", 1)[0]
        best = named if named in scored else next(iter(scored), None)
        if best is not None:  # the EMA the monitor names (the best decay's, with several)
            save_module(scored[best], state.out_dir / "model_ema.pth")
        else:
            atomic_save(
                {k: v.detach().cpu() for k, v in state.model.state_dict().items()},
                state.out_dir / "model.pth",
            )
    scheduler = parts["scheduler"]
    checkpoints.save_checkpoint(
        state.out_dir / "checkpoint.pt",
        model=state.model.state_dict(),
        optimizer=state.optimizer.state_dict(),
        optimizer_type=type(state.optimizer).__name__,
        scheduler=None if scheduler is None else scheduler.state_dict(),
        scheduler_type=None if scheduler is None else type(scheduler).__name__,
        scaler=parts["scaler"].state_dict(),
        amp=_amp_name(parts["amp"]),
        ema=None if state.averager is None else state.averager.state_dict(),
        ema_names=list(state.emas),
        callbacks=[{"type": type(c).__name__, "state": c.state_dict()} for c in parts["callbacks"]],
        history=state.history.to_dict(orient="list"),
        epoch=state.epoch,
        step=state.step,
        rng=checkpoints.rng_state(*generators),
    )


def _resume_path(resume, out_dir: Path | None) -> Path | None:
    """The checkpoint to continue from, or None for a fresh run."""
    if resume is False:
        return None
    if resume is True or resume == "auto":
        if out_dir is None:
            raise ValueError(f"resume={resume!r} continues from out_dir/checkpoint.pt: give out_dir too.")
        path = out_dir / "checkpoint.pt"
        return None if resume == "auto" and not path.exists() else path
    if isinstance(resume, (str, os.PathLike)):
        return Path(resume)
    raise ValueError(
        f"resume must be False, True (out_dir/checkpoint.pt), 'auto' (continue if it exists, else start "
        f"fresh) or a checkpoint's path, got {resume!r}."
    )


def _check_out_dir(out_dir: Path, resume: Path | None, overwrite: bool) -> None:
    """out_dir must be a writable folder, and not one holding another run that this one would overwrite."""
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"out_dir={str(out_dir)!r} is a file; give a folder (it is created if missing).")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ValueError(
            f"out_dir={str(out_dir)!r} cannot be created ({error}); give another folder."
        ) from None
    if not os.access(out_dir, os.W_OK | os.X_OK):
        raise ValueError(f"out_dir={str(out_dir)!r} is not writable; give a folder this process can write.")
    held = [name for name in _RUN_FILES if (out_dir / name).exists()]
    if resume is None and held and not overwrite:
        raise ValueError(
            f"out_dir={str(out_dir)!r} holds a run ({', '.join(held)}). Pass resume='auto' to continue it, "
            "overwrite=True to start over in it (its files are deleted), or give another out_dir."
        )


def _resume(state: FitState, path: Path, scheduler, scaler, amp_dtype, generators, callbacks) -> None:
    """Load a checkpoint into the run, after checking that all of it fits, so a mismatch changes nothing."""
    saved = checkpoints.load_checkpoint(path)
    missing = {"optimizer_type", "scheduler_type", "amp", "callbacks"} - saved.keys()
    if missing:
        raise ValueError(
            f"{path} was written by an older ema_kit (it lacks {sorted(missing)}); start a new run, or "
            "load its weights into the model: model.load_state_dict(torch.load(path)['model'])."
        )
    problems = layout_mismatch(saved["model"], state.model.state_dict())
    if problems:
        raise ValueError(f"{path} was saved from another model ({problems}).")
    if saved["ema_names"] != list(state.emas):
        raise ValueError(
            f"{path} holds EMAs {saved['ema_names']}, but this run tracks {list(state.emas)}: pass the "
            "same ema= as the run that wrote it."
        )
    for was, now in zip(_ema_settings(saved["ema"]), _ema_settings(state.averager)):
        changed = [
            f"{k}={was[k]!r} in the checkpoint, {k}={now[k]!r} now" for k in was if was[k] != now.get(k)
        ]
        if changed:
            raise ValueError(
                f"{path}: the EMA settings differ ({'; '.join(changed)}). A resume continues the same run: "
                "pass the same ema= as the run that wrote it, or start a new run in another out_dir."
            )
    saved_scheduler = saved["scheduler_type"]
    now_scheduler = None if scheduler is None else type(scheduler).__name__
    if saved_scheduler != now_scheduler:
        raise ValueError(
            f"{path} was saved with scheduler {saved_scheduler}, this run has {now_scheduler}; pass the same "
            "scheduler setup as the run that wrote it."
        )
    _check_same_optimizer(path, saved, state.optimizer, scheduler)  # after the scheduler: it sets the lr
    if saved["amp"] != _amp_name(amp_dtype):
        raise ValueError(
            f"{path} was saved with amp={saved['amp']!r}, this run uses amp={_amp_name(amp_dtype)!r}; pass "
            "the same amp= (and device) as the run that wrote it."
        )
    types = [entry["type"] for entry in saved["callbacks"]]
    now = [type(c).__name__ for c in callbacks]
    if types != now:
        raise ValueError(
            f"{path} holds the state of callbacks {types}, this run has {now} with a state to resume; "
            "pass the same callbacks (and ema_switch=, which adds a SwitchEMA) as the run that wrote it."
        )
    # Everything fits. Callbacks check their own state before changing it, so they go first.
    for callback, entry in zip(callbacks, saved["callbacks"]):
        callback.load_state_dict(entry["state"])
    if state.averager is not None:
        state.averager.load_state_dict(saved["ema"])
    state.model.load_state_dict(saved["model"])
    state.optimizer.load_state_dict(saved["optimizer"])
    if scheduler is not None:
        scheduler.load_state_dict(saved["scheduler"])
    scaler.load_state_dict(saved["scaler"])
    state.history = pd.DataFrame(saved["history"])
    state.epoch, state.step = saved["epoch"], saved["step"]
    checkpoints.set_rng_state(saved["rng"], *generators)


def _check_same_optimizer(path: Path, saved: dict, optimizer: torch.optim.Optimizer, scheduler) -> None:
    """Same optimizer class, parameter groups and learning rate as the checkpoint's."""
    if saved["optimizer_type"] != type(optimizer).__name__:
        raise ValueError(
            f"{path} was saved with optimizer {saved['optimizer_type']}, this run has "
            f"{type(optimizer).__name__}; pass the same optimizer as the run that wrote it."
        )
    groups = saved["optimizer"]["param_groups"]
    if [len(g["params"]) for g in groups] != [len(g["params"]) for g in optimizer.param_groups]:
        raise ValueError(
            f"{path}: the optimizer's parameter groups differ from the checkpoint's; build the optimizer "
            "over the same parameters as the run that wrote it."
        )
    # With a scheduler the current lr is the schedule's; the lr it was built with is "initial_lr".
    key = "initial_lr" if scheduler is not None else "lr"
    for number, (was, now) in enumerate(zip(groups, optimizer.param_groups)):
        if key in was and was[key] != now.get(key):
            raise ValueError(
                f"{path}: param group {number} was trained with lr={was[key]!r}, this run's optimizer has "
                f"lr={now.get(key)!r}. A resume continues the same run: pass the same lr, or start a new "
                "run in another out_dir."
            )


def _ema_settings(ema) -> list[dict]:
    """The settings of each EMA in a ModelEMA or MultiEMA, or in the state dict of one."""
    if ema is None:
        return []
    state = ema if isinstance(ema, dict) else ema.state_dict()
    return [e["settings"] for e in state["emas"]] if "emas" in state else [state["settings"]]


def _amp_name(amp_dtype: torch.dtype | None) -> str:
    return "off" if amp_dtype is None else str(amp_dtype).removeprefix("torch.")


def _resolve_ema(ema, model: nn.Module, *, steps_per_epoch: int | None) -> ModelEMA | MultiEMA | None:
    if ema is None or isinstance(ema, (ModelEMA, MultiEMA)):
        return ema
    if isinstance(ema, str):
        return ModelEMA(model, decay=_decay_from_text(ema, steps_per_epoch))
    if isinstance(ema, numbers.Real) and not isinstance(ema, (bool, np.bool_)) and 0 <= ema < 1:
        return ModelEMA(model, decay=_plain(ema))
    if isinstance(ema, (tuple, list)):
        return MultiEMA(model, decays=tuple(_plain(decay) for decay in ema))
    raise ValueError(
        f"ema must be a decay in [0, 1) such as 0.999, a half-life such as '2 epochs' or '500 steps', a "
        f"tuple of decays, a ModelEMA or MultiEMA, or None; got {ema!r}."
    )


def _switch_callback(ema_switch, averager, callbacks: list) -> list:
    """``[SwitchEMA]`` for ``ema_switch`` (checked against the EMAs fit tracks), or ``[]`` for None."""
    if ema_switch is None:
        return []
    if ema_switch != "epoch" and (
        isinstance(ema_switch, (bool, np.bool_))
        or not isinstance(ema_switch, numbers.Integral)
        or ema_switch < 1
    ):
        raise ValueError(
            f'ema_switch must be None, "epoch" or an int >= 1 (switch every n optimizer steps), '
            f"got {ema_switch!r}."
        )
    if not isinstance(averager, ModelEMA):
        held = "ema=None" if averager is None else f"{len(averager.emas)} decays"
        raise ValueError(
            f"ema_switch={ema_switch!r} copies the EMA into the model, which needs one EMA, but this run has "
            f"{held}; pass ema= one decay or ModelEMA, or to switch to one EMA of several, pass "
            "callbacks=[SwitchEMA(multi.emas[decay])] with ema=multi."
        )
    if any(isinstance(c, SwitchEMA) for c in callbacks):
        raise ValueError(
            "ema_switch= was given and callbacks hold a SwitchEMA too, which would switch twice; drop one."
        )
    return [SwitchEMA(averager, every=ema_switch if ema_switch == "epoch" else int(ema_switch))]


def _check_recompute_bn(averager, model: nn.Module) -> None:
    """recompute_ema_bn=True needs an EMA, and BatchNorm with running statistics to recompute."""
    if averager is None:
        raise ValueError("recompute_ema_bn=True recomputes the EMA's BatchNorm statistics, but ema=None.")
    if not any(
        isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats for m in model.modules()
    ):
        raise ValueError(
            "recompute_ema_bn=True, but the model has no BatchNorm layer with running statistics to "
            "recompute; drop recompute_ema_bn."
        )


def _warn_long_half_lives(emas: dict[str, ModelEMA], total_steps: int) -> None:
    """One warning per EMA whose half-life is over half the run (``advice.half_life_warning``)."""
    for name, ema in emas.items():
        if ema.half_life == 0:  # decay 0: the EMA is the model itself
            continue
        message = half_life_warning(ema.half_life, total_steps, warmup=ema.warmup)
        if message is not None:
            warnings.warn(f"fit: {name}: {message}", UserWarning, stacklevel=3)


def _plain(value):
    """A NumPy number as the Python number it prints as (np.float32(0.99) -> 0.99, as a column name)."""
    if isinstance(value, np.floating):
        return float(str(value))
    if isinstance(value, np.integer):
        return int(value)
    return value


def _named_emas(averager) -> dict[str, ModelEMA]:
    """Log prefixes: ``ema`` for one EMA, ``ema<decay>`` (as written, e.g. ``ema0.999``) for several."""
    if averager is None:
        return {}
    if isinstance(averager, ModelEMA):
        return {"ema": averager}
    return {f"ema{decay!r}": e for decay, e in averager.emas.items()}


def _best(history: pd.DataFrame, monitors: list[str], mode: str) -> tuple[str, int | None]:
    """The monitored column and row of the best epoch, over every candidate column (one per EMA)."""
    candidates = [(m, row) for m in monitors if (row := best_row(history, m, mode)) is not None]
    if not candidates:
        return monitors[0], None
    sign = 1 if mode == "min" else -1
    return min(candidates, key=lambda candidate: sign * history.at[candidate[1], candidate[0]])


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


def _monitors(monitor, mode: str, emas: dict, metrics: dict, directions: dict, columns: list[str]):
    """The log columns the best epoch is picked over (one per EMA for a score), and "min" or "max"."""
    first_score = next(iter(metrics), "loss")  # by default the EMAs' first metric, or their loss
    if monitor is None or monitor == "loss" or monitor in metrics:  # a score: the best over all EMAs
        monitors = [f"{name}_{monitor or first_score}" for name in emas or ["live"]]
    else:
        monitors = [monitor]
    if monitors[0] not in columns:
        raise ValueError(f"monitor={monitor!r} is not a column of the log; choose one of {columns[1:-2]}.")
    quantity = monitors[0].split("_", 1)[1]
    known = directions.get(quantity) or direction(quantity)
    if mode == "auto":
        if known is None:
            raise ValueError(
                f"fit monitors {monitors[0]!r} but cannot tell whether a lower or a higher {quantity} is "
                f"better (it knows well-known names only: loss, accuracy, rmse, auc, ...). Say which with "
                f"mode='min' or mode='max', or give the metric with its direction: "
                f"metrics={{'{quantity}': ({quantity}, 'min')}}."
            )
        return monitors, known
    if known is not None and known != mode and quantity in directions:
        raise ValueError(
            f"mode={mode!r} contradicts metrics[{quantity!r}]'s direction {known!r}; drop mode= or fix "
            "the metric's direction."
        )
    return monitors, mode


def _check_int(name: str, value, expected: str) -> int:
    """A whole number >= 1 (NumPy's too), or a ValueError that says what ``name`` expects."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be {expected}, got {value!r}.")
    return int(value)


def _check_positive(name: str, value) -> float:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real) or not value > 0:
        raise ValueError(f"{name} must be a number > 0 or None, got {value!r}.")
    return float(value)


def _check_callbacks(callbacks) -> list:
    """The callbacks as a list; each must have a hook, and no method that looks like a misspelled one."""
    if callbacks is None:
        return []
    if not isinstance(callbacks, Iterable) or isinstance(callbacks, (str, bytes)):
        raise TypeError(f"callbacks must be a list of Callback objects, got {type(callbacks).__name__}.")
    callbacks = list(callbacks)
    for index, callback in enumerate(callbacks):
        if not any(callable(getattr(callback, hook, None)) for hook in HOOKS):
            raise TypeError(
                f"callbacks[{index}] is a {type(callback).__name__} with none of the hooks "
                f"{', '.join(HOOKS)}: subclass ema_kit.Callback and override the ones you need."
            )
        for name in dir(callback):
            if name.startswith("on_") and name not in HOOKS and callable(getattr(callback, name, None)):
                close = difflib.get_close_matches(name, HOOKS, n=1)
                hint = f"did you mean {close[0]}? " if close else ""
                raise ValueError(
                    f"callbacks[{index}] ({type(callback).__name__}) has {name}, which fit never calls; "
                    f"{hint}The hooks are {', '.join(HOOKS)}."
                )
    return callbacks


def _length(loader, name: str) -> int | None:
    """Batches per epoch; None for a loader without a length (an IterableDataset's)."""
    try:
        length = len(loader)
    except TypeError:
        if not isinstance(loader, Iterable):
            raise TypeError(f"{name} must be an iterable of batches, such as a DataLoader.") from None
        return None
    if length == 0:
        raise ValueError(
            f"{name} is empty: it yields no batches (is the dataset empty, or drop_last=True "
            "with fewer samples than batch_size?)."
        )
    return length


def _resolve_scheduler_step(scheduler, scheduler_step: str) -> str:
    if scheduler_step not in ("auto", "batch", "epoch"):
        raise ValueError(f"scheduler_step must be 'auto', 'batch' or 'epoch', got {scheduler_step!r}.")
    if scheduler_step == "auto":
        return "batch" if isinstance(scheduler, _PER_BATCH_SCHEDULERS) else "epoch"
    return scheduler_step


def _step_epoch_scheduler(scheduler, monitored: float) -> None:
    if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
        scheduler.step(monitored)
    else:
        scheduler.step()


def _loader_generators(loader) -> list:
    """The loader's own random generators, whose state decides the shuffle order on resume."""
    sampler = getattr(loader, "sampler", None)
    return [getattr(loader, "generator", None), getattr(sampler, "generator", None)]


def _all_ranks_mean(total: float, count: int, device: torch.device) -> float:
    """The mean over every process of a distributed run (or this one), so each rank logs the same."""
    if torch.distributed.is_initialized():
        sums = torch.tensor([total, count], dtype=torch.float64, device=device)
        torch.distributed.all_reduce(sums)
        total, count = sums.tolist()
    return total / count


def _rank_zero_row(row: dict) -> dict:
    """Rank 0's log row on every process of a distributed run (BatchNorm statistics, and so the scores,
    differ between ranks), so that all ranks log, stop early and pick the best epoch alike."""
    if not torch.distributed.is_initialized():
        return row
    shared = [row]
    torch.distributed.broadcast_object_list(shared, src=0)
    return shared[0]


def _call(callbacks, hook: str, state: FitState) -> None:
    for callback in callbacks:
        method = getattr(callback, hook, None)
        if method is not None:  # a duck-typed callback may have some hooks only
            method(state)
