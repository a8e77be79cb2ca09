"""``fit``: train a model, score the live model and its EMA every epoch, and keep the log as a DataFrame."""

from __future__ import annotations

import math
import os
import time
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import torch
from torch import nn

from . import checkpoint as checkpoints
from ._tensors import layout_mismatch, unwrap
from .ema import ModelEMA, decay_from_half_life
from .files import atomic_save
from .history import best_row, lower_is_better, write_csv
from .multi import MultiEMA
from .plot import LivePlot
from .progress import Progress

Metric = Callable[[torch.Tensor, torch.Tensor], float]
_PER_BATCH_SCHEDULERS = (torch.optim.lr_scheduler.OneCycleLR, torch.optim.lr_scheduler.CyclicLR)


def accuracy(outputs: torch.Tensor, targets: torch.Tensor) -> float:
    """Share of rows whose highest score is the target class.

    Example:
        >>> accuracy(torch.tensor([[0.1, 0.9], [0.8, 0.2]]), torch.tensor([1, 1]))
        0.5
    """
    return (outputs.argmax(dim=1) == targets).float().mean().item()


@dataclass
class FitState:
    """What ``fit`` hands to callbacks. A callback is any object with some of these methods:

    ``on_fit_start(state)``, ``on_step_end(state)`` (after each optimizer step and EMA update),
    ``on_epoch_end(state)`` (after both models were scored; ``state.row`` holds the new log row) and
    ``on_fit_end(state)``. Setting ``state.stop = True`` ends training after the current epoch.
    """

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
    metrics: Mapping[str, Metric] | None = None,  # default with the default loss: {"accuracy": accuracy}
    ema: float | str | tuple | ModelEMA | MultiEMA | None = 0.999,  # see below
    device: str | torch.device = "auto",  # "auto": CUDA, then MPS, then CPU
    amp: str | bool = "auto",  # "bf16", "fp16" (with a grad scaler), False; "auto": bf16/fp16 on CUDA only
    accumulate: int = 1,  # batches per optimizer step
    clip_grad_norm: float | None = None,
    scheduler=None,  # a torch LR scheduler
    scheduler_step: str = "auto",  # "batch" or "epoch"; "auto": per batch for OneCycleLR and CyclicLR
    callbacks: Iterable = (),
    monitor: str | None = None,  # a log column, or a score ("loss") meaning each EMA's; default: first metric
    patience: int | None = None,  # stop after this many epochs without a better monitor value
    out_dir: str | os.PathLike | None = None,  # history.csv, history.png, model_ema.pth, checkpoint.pt
    resume: bool | str | os.PathLike = False,  # True: continue from out_dir/checkpoint.pt
    plot: bool = True,  # the live plot (in a notebook; and history.png when out_dir is set)
    progress: str = "auto",  # "widget", "text", "off"; "auto": a widget where a notebook can show one
) -> pd.DataFrame:
    """Train ``model`` for ``epochs`` epochs, scoring the live model and its EMA on ``val_loader`` each epoch.

    Returns the log, one row per finished epoch: ``epoch``, ``train_loss``, ``live_loss``, ``ema_loss``,
    ``live_<m>`` and ``ema_<m>`` for each metric, ``lr``, ``seconds``. Batches are ``(inputs, targets)``.
    ``ema`` is a decay (0.999), a half-life (``"2 epochs"``, ``"500 steps"``), a ``ModelEMA``, None, or
    several decays (``(0.99, 0.999)`` or a ``MultiEMA``): then each gets its columns, ``ema0.99_loss``,
    ``ema0.999_loss`` and so on, its own colour in the plot, and the best epoch and decay are picked
    over all of them.
    With ``out_dir`` the log is written after every epoch (``history.csv``, ``history.png``), with the best
    EMA weights (``model_ema.pth``, a plain state dict) and a checkpoint to ``resume`` from; resuming
    gives the same weights and log as one uninterrupted run. The stop button (KeyboardInterrupt) ends
    training cleanly after the last finished epoch. A step whose loss is NaN or Inf changes neither the
    model nor the EMA. Pass your own ``ModelEMA`` to keep a handle on the EMA model afterwards.

    Example:
        >>> from ema_kit.data import digits_loaders
        >>> from ema_kit.demo import SmallCNN
        >>> train_loader, val_loader = digits_loaders()
        >>> model = SmallCNN()
        >>> ema = ModelEMA(model, decay=0.99)
        >>> log = fit(model, train_loader, val_loader, epochs=2, ema=ema, progress="off",
        ...           optimizer=torch.optim.AdamW(model.parameters(), lr=3e-3))
        >>> list(log.columns)
        ['epoch', 'train_loss', 'live_loss', 'ema_loss', 'live_accuracy', 'ema_accuracy', 'lr', 'seconds']
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}.")
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"epochs must be an int >= 1, got {epochs!r}.")
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}.")
    if isinstance(accumulate, bool) or not isinstance(accumulate, int) or accumulate < 1:
        raise ValueError(f"accumulate must be an int >= 1 (batches per optimizer step), got {accumulate!r}.")
    if patience is not None and (isinstance(patience, bool) or not isinstance(patience, int) or patience < 1):
        raise ValueError(f"patience must be None or an int >= 1 (epochs), got {patience!r}.")
    batches = _length(train_loader, "train_loader")
    _length(val_loader, "val_loader")
    if metrics is None:
        metrics = {"accuracy": accuracy} if loss_fn is None else {}
    _check_metrics(metrics)
    loss_fn = loss_fn or nn.functional.cross_entropy
    device = _resolve_device(device)
    model.to(device)
    averager = _resolve_ema(ema, model, steps_per_epoch=math.ceil(batches / accumulate))
    emas = _named_emas(averager)
    columns = _columns(emas, metrics)
    first_score = next(iter(metrics), "loss")  # by default the EMAs' first metric, or their loss
    if monitor is None or monitor == "loss" or monitor in metrics:  # a score: the best over all EMAs
        monitors = [f"{name}_{monitor or first_score}" for name in emas or ["live"]]
    else:
        monitors = [monitor]
    if monitors[0] not in columns:
        raise ValueError(f"monitor={monitor!r} is not a column of the log; choose one of {columns[1:-2]}.")
    mode = "min" if lower_is_better(monitors[0]) else "max"
    scheduler_step = _resolve_scheduler_step(scheduler, scheduler_step)
    amp_dtype = _resolve_amp(amp, device)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    main_process = not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0
    out_dir = None if out_dir is None else Path(out_dir)
    generators = _loader_generators(train_loader)

    state = FitState(unwrap(model), emas, averager, optimizer, epochs, out_dir)
    if resume:
        _resume(state, resume, scheduler, scaler, generators)
    callbacks = list(callbacks)
    live_plot = LivePlot(out_dir and out_dir / "history.png") if plot and main_process else None
    shown = Progress(progress if main_process else "off", epochs=epochs)
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
    )
    _call(callbacks, "on_fit_start", state)
    try:
        while state.epoch < epochs and not state.stop:
            state.epoch += 1
            started = time.perf_counter()
            shown.start_epoch(state.epoch, batches=batches)
            train_loss, lr = trainer.train_epoch(train_loader, state, shown, callbacks)
            row = {"epoch": state.epoch, "train_loss": train_loss}
            for prefix, evaluated in [("live", model)] + [(name, e.module) for name, e in emas.items()]:
                scores = evaluate(evaluated, val_loader, loss_fn=loss_fn, metrics=metrics, amp=amp)
                row |= {f"{prefix}_{name}": value for name, value in scores.items()}
            row |= {"lr": lr, "seconds": time.perf_counter() - started}
            state.row = row = _rank_zero_row(row)
            state.history = pd.DataFrame([*state.history.to_dict("records"), row], columns=columns)
            monitor, best = _best(state.history, monitors, mode)
            if scheduler is not None and scheduler_step == "epoch":
                _step_epoch_scheduler(scheduler, row[monitor])
            best_epoch = None if best is None else int(state.history.at[best, "epoch"])
            if main_process:
                _write_epoch(state, best_epoch, monitor, scheduler, scaler, generators)
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


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: Iterable,
    *,
    loss_fn: Callable | None = None,
    metrics: Mapping[str, Metric] | None = None,
    amp: str | bool = "auto",
) -> dict[str, float]:
    """Score ``model`` in eval mode on every batch of ``loader``: the mean loss and each metric.

    Metrics see all outputs and targets of the set at once (so AUC-style scores are exact), on the CPU.
    With the default loss (cross entropy) the default metrics are ``{"accuracy": accuracy}``. The model's
    train/eval mode is restored afterwards.

    Example:
        >>> from ema_kit.data import digits_loaders
        >>> from ema_kit.demo import SmallCNN
        >>> _, val_loader = digits_loaders()
        >>> sorted(evaluate(SmallCNN(), val_loader))
        ['accuracy', 'loss']
    """
    if metrics is None:
        metrics = {"accuracy": accuracy} if loss_fn is None else {}
    loss_fn = loss_fn or nn.functional.cross_entropy
    device = _model_device(model)
    amp_dtype = _resolve_amp(amp, device)
    was_training = model.training
    model.eval()
    loss_sum, count, outputs, targets = 0.0, 0, [], []
    try:
        for batch in loader:
            inputs, target = _split(batch)
            inputs, target = _to(inputs, device), _to(target, device)
            with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
                output = model(inputs)
                loss = loss_fn(output, target)
            size = _batch_size(target)
            loss_sum += loss.float().item() * size
            count += size
            outputs.append(output.detach().float().cpu())
            targets.append(target.detach().cpu())
    finally:
        model.train(was_training)
    if count == 0:
        raise ValueError("The validation loader yielded no batches; fit and evaluate need at least one.")
    all_outputs, all_targets = torch.cat(outputs), torch.cat(targets)
    return {"loss": loss_sum / count} | {
        name: _number(name, metric(all_outputs, all_targets)) for name, metric in metrics.items()
    }


class _Trainer:
    """One epoch of training: forward, backward, optimizer step, EMA update, progress."""

    def __init__(self, model, optimizer, loss_fn, device, amp_dtype, scaler, accumulate, clip, scheduler):
        self.model, self.optimizer, self.loss_fn, self.device = model, optimizer, loss_fn, device
        self.amp_dtype, self.scaler, self.accumulate, self.clip = amp_dtype, scaler, accumulate, clip
        self.scheduler = scheduler  # stepped per batch; None when stepped per epoch
        self.warned = False

    def train_epoch(self, loader, state: FitState, shown: Progress, callbacks) -> tuple[float, float]:
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        loss_sum, count, pending = 0.0, 0, 0
        lr = self.optimizer.param_groups[0]["lr"]
        total = len(loader)
        if hasattr(getattr(loader, "sampler", None), "set_epoch"):  # DistributedSampler: a new shuffle
            loader.sampler.set_epoch(state.epoch)
        for index, batch in enumerate(loader):
            inputs, targets = _split(batch)
            inputs, targets = _to(inputs, self.device), _to(targets, self.device)
            with torch.autocast(
                self.device.type, dtype=self.amp_dtype or torch.float32, enabled=self.amp_dtype is not None
            ):
                loss = self.loss_fn(self.model(inputs), targets)
            value = loss.float().item()
            size = _batch_size(targets)
            if math.isfinite(value):
                self.scaler.scale(loss / self.accumulate).backward()
                pending += 1
                loss_sum += value * size
                count += size
            else:
                self._warn_non_finite(value, state.step)
            if pending and (pending == self.accumulate or index + 1 == total):
                lr = self.optimizer.param_groups[0]["lr"]
                if self._step():
                    state.step += 1
                    if state.averager is not None:
                        state.averager.update(self.model)
                    if self.scheduler is not None:
                        self.scheduler.step()
                    _call(callbacks, "on_step_end", state)
                pending = 0
            shown.batch(images=size, loss=value)
        if count == 0:
            raise ValueError(
                "No training batch gave a finite loss this epoch (or the loader was empty); the model "
                "and EMA were left unchanged. Lower the learning rate or check the inputs."
            )
        return _all_ranks_mean(loss_sum, count, self.device), lr

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
                f"fit skipped a batch at step {step}: the loss was {value}; neither the model nor the EMA "
                "was updated from it (further skips are not reported). A lower learning rate, gradient "
                "clipping (clip_grad_norm=1.0) or amp='bf16' instead of 'fp16' usually helps.",
                RuntimeWarning,
                stacklevel=4,
            )


def _write_epoch(state: FitState, best_epoch, monitor: str, scheduler, scaler, generators) -> None:
    """Log, best weights and checkpoint of the epoch just finished, each written atomically."""
    if state.out_dir is None:
        return
    write_csv(state.history, state.out_dir / "history.csv")
    if best_epoch == state.epoch:
        best = state.emas.get(monitor.split("_", 1)[0]) or next(iter(state.emas.values()), None)
        if best is not None:  # the EMA the monitor names (the best decay's, with several)
            best.save(state.out_dir / "model_ema.pth")
        else:
            atomic_save(
                {k: v.detach().cpu() for k, v in state.model.state_dict().items()},
                state.out_dir / "model.pth",
            )
    checkpoints.save_checkpoint(
        state.out_dir / "checkpoint.pt",
        model=state.model.state_dict(),
        optimizer=state.optimizer.state_dict(),
        scheduler=None if scheduler is None else scheduler.state_dict(),
        scaler=scaler.state_dict(),
        ema=None if state.averager is None else state.averager.state_dict(),
        ema_names=list(state.emas),
        history=state.history.to_dict(orient="list"),
        epoch=state.epoch,
        step=state.step,
        rng=checkpoints.rng_state(*generators),
    )


def _resume(state: FitState, resume, scheduler, scaler, generators) -> None:
    """Load a checkpoint into the run, after checking that it fits, so a mismatch changes nothing."""
    if resume is True:
        if state.out_dir is None:
            raise ValueError("resume=True continues from out_dir/checkpoint.pt: give out_dir too.")
        resume = state.out_dir / "checkpoint.pt"
    path = Path(resume)
    saved = checkpoints.load_checkpoint(path)
    problems = layout_mismatch(saved["model"], state.model.state_dict())
    if problems:
        raise ValueError(f"{path} was saved from another model ({problems}).")
    if saved["ema_names"] != list(state.emas):
        raise ValueError(
            f"{path} holds EMAs {saved['ema_names']}, but this run tracks {list(state.emas)}: pass the "
            "same ema= as the run that wrote it."
        )
    if (saved["scheduler"] is None) != (scheduler is None):
        raise ValueError(
            f"{path} was saved {'with' if scheduler is None else 'without'} a scheduler; "
            "pass the same scheduler setup as the run that wrote it."
        )
    state.model.load_state_dict(saved["model"])
    state.optimizer.load_state_dict(saved["optimizer"])
    if scheduler is not None:
        scheduler.load_state_dict(saved["scheduler"])
    scaler.load_state_dict(saved["scaler"])
    if state.averager is not None:
        state.averager.load_state_dict(saved["ema"])
    state.history = pd.DataFrame(saved["history"])
    state.epoch, state.step = saved["epoch"], saved["step"]
    checkpoints.set_rng_state(saved["rng"], *generators)


def _resolve_ema(ema, model: nn.Module, *, steps_per_epoch: int) -> ModelEMA | MultiEMA | None:
    if ema is None or isinstance(ema, (ModelEMA, MultiEMA)):
        return ema
    if isinstance(ema, str):
        return ModelEMA(model, decay=_decay_from_text(ema, steps_per_epoch))
    if isinstance(ema, (int, float)) and not isinstance(ema, bool) and 0 <= ema < 1:
        return ModelEMA(model, decay=float(ema))
    if isinstance(ema, (tuple, list)):
        return MultiEMA(model, decays=ema)
    raise ValueError(
        f"ema must be a decay in [0, 1) such as 0.999, a half-life such as '2 epochs' or '500 steps', a "
        f"tuple of decays, a ModelEMA or MultiEMA, or None; got {ema!r}."
    )


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


def _decay_from_text(text: str, steps_per_epoch: int) -> float:
    number, _, unit = text.strip().partition(" ")
    try:
        value = float(number)
    except ValueError:
        value = math.nan
    if unit.strip() in ("epoch", "epochs") and math.isfinite(value):
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
        + ["lr", "seconds"]
    )


def _check_metrics(metrics) -> None:
    if not isinstance(metrics, Mapping):
        raise TypeError(
            f"metrics must be a dict of name -> function(outputs, targets), got {type(metrics).__name__}."
        )
    for name, metric in metrics.items():
        if not isinstance(name, str) or not name or not callable(metric):
            raise TypeError(f"metrics[{name!r}] must map a non-empty name to a function(outputs, targets).")


def _number(name: str, value) -> float:
    try:
        return float(value)
    except (TypeError, ValueError, RuntimeError):
        raise TypeError(
            f"metric {name!r} returned {type(value).__name__} {value!r:.80}; a metric must return one number "
            "(a float, or a tensor with one element)."
        ) from None


def _length(loader, name: str) -> int:
    try:
        length = len(loader)
    except TypeError:
        raise TypeError(f"{name} must have a length (a DataLoader or a list of batches).") from None
    if length == 0:
        raise ValueError(
            f"{name} is empty: it yields no batches (is the dataset empty, or drop_last=True "
            "with fewer samples than batch_size?)."
        )
    return length


def _split(batch) -> tuple:
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        return batch[0], batch[1]
    described = f"a {type(batch).__name__}" + (
        f" of {len(batch)} items" if isinstance(batch, (tuple, list)) else ""
    )
    raise ValueError(
        f"fit expects each batch as (inputs, targets), got {described}. Make the dataset's __getitem__ "
        "return (image, label), or wrap the loader to yield such pairs."
    )


def _to(value, device: torch.device):
    if isinstance(value, torch.Tensor):
        return value.to(device, non_blocking=True)
    if isinstance(value, (tuple, list)):
        return type(value)(_to(v, device) for v in value)
    if isinstance(value, dict):
        return {k: _to(v, device) for k, v in value.items()}
    return value


def _batch_size(targets) -> int:
    return len(targets) if hasattr(targets, "__len__") else 1


def _model_device(model: nn.Module) -> torch.device:
    tensor = next(iter(model.parameters()), None)
    return torch.device("cpu") if tensor is None else tensor.device


def _resolve_device(device) -> torch.device:
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    return torch.device(device)


def _resolve_amp(amp, device: torch.device) -> torch.dtype | None:
    if amp == "auto":
        if device.type != "cuda":
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if amp in (False, None, "off"):
        return None
    if amp in ("bf16", "bfloat16"):
        return torch.bfloat16
    if amp in ("fp16", "float16"):
        return torch.float16
    raise ValueError(f"amp must be 'auto', 'bf16', 'fp16' or False, got {amp!r}.")


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
        if method is not None:
            method(state)
