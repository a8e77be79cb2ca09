"""The files of ``fit(out_dir=...)`` and resuming from them: all a run needs to continue bit-identically.

``Checkpoint`` is the callback that writes them after every epoch (the best weights, ``checkpoint.pt``)
and loads ``checkpoint.pt`` on a resume. The checkpoint holds only tensors and plain Python values
(random-number states included), so it loads with ``torch.load(..., weights_only=True)``: opening a
checkpoint never runs code.

Of a model sharded by FSDP2, the model's, the optimizer's and the EMA's states are gathered whole to rank 0
for the one file (torch's ``get_model_state_dict`` / ``get_optimizer_state_dict``, and ``_sharded.gathered``),
and a resume loads them into every rank's shards: the same file, checks and guarantees as without sharding.
"""

from __future__ import annotations

import math
import os
import random
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from .._sharded import gathered, is_sharded, reshard
from .._tensors import layout_mismatch
from ..ema import ModelEMA, save_module
from ..files import atomic_save, load_weights
from .callbacks import Callback, FitState, is_main_process, state_key, stateful

FORMAT = "ema_kit.training.checkpoint/1"
RUN_FILES = ("checkpoint.pt", "history.csv", "history.png", "model_ema.pth", "model.pth")


def rng_state(*generators: torch.Generator | None) -> dict:
    """The state of every random-number generator a training run draws from, as plain values.

    Python's ``random``, NumPy's global generator, torch's CPU and CUDA generators, and any given
    ``torch.Generator`` (a DataLoader's or sampler's own).

    Example:
        >>> state = rng_state()
        >>> first = torch.rand(1)
        >>> set_rng_state(state)
        >>> torch.equal(torch.rand(1), first)
        True
    """
    kind, keys, position, has_gauss, cached = np.random.get_state()
    return {
        "python": _to_lists(random.getstate()),
        "numpy": {
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "position": int(position),
            "has_gauss": int(has_gauss),
            "cached": float(cached),
            "kind": kind,
        },
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "generators": [None if g is None else g.get_state() for g in generators],
    }


def set_rng_state(state: dict, *generators: torch.Generator | None) -> None:
    """Restore what ``rng_state`` returned (pass the same generators, in the same order)."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    numpy = state["numpy"]
    np.random.set_state(
        (
            numpy["kind"],
            numpy["keys"].numpy().astype(np.uint32),
            numpy["position"],
            numpy["has_gauss"],
            numpy["cached"],
        )
    )
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    for generator, saved in zip(generators, state["generators"]):
        if generator is not None and saved is not None:
            generator.set_state(saved)


def save_checkpoint(path: str | os.PathLike, **parts) -> Path:
    """Write a checkpoint atomically: ``parts`` are state dicts and plain values, stored under their names.

    NumPy numbers in them (an optimizer built with ``lr=np.float32(0.01)`` keeps it in its state) are
    stored as the Python numbers they equal, which ``weights_only`` loading accepts.

    Example:
        >>> import tempfile
        >>> model = torch.nn.Linear(2, 1)
        >>> path = save_checkpoint(tempfile.mkdtemp() + "/checkpoint.pt", model=model.state_dict(), epoch=3)
        >>> load_checkpoint(path)["epoch"]
        3
    """
    return atomic_save({"format": FORMAT, **_without_numpy(parts)}, path)


def load_checkpoint(path: str | os.PathLike) -> dict:
    """Read a checkpoint written by ``save_checkpoint``, refusing anything that is not one."""
    checkpoint = load_weights(path)
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != FORMAT:
        raise ValueError(
            f"{path} is not an ema_kit checkpoint (fit writes them as checkpoint.pt in out_dir). "
            "To start from plain weights instead, load them into the model and call fit without resume."
        )
    return checkpoint


def loader_generators(loader) -> list:
    """The loader's own random generators (its, its sampler's, and its batch sampler's sampler's), whose
    state decides its shuffle order."""
    sampler = getattr(loader, "sampler", None)
    batched = getattr(getattr(loader, "batch_sampler", None), "sampler", None)
    return [getattr(holder, "generator", None) for holder in (loader, sampler, batched)]


def _without_numpy(value):
    """``value`` with every NumPy scalar in its dicts, lists and tuples, at any depth, a Python number."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, dict):
        return {key: _without_numpy(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_without_numpy(item) for item in value)
    return value


def _to_lists(value):
    return [_to_lists(v) for v in value] if isinstance(value, tuple) else value


class Checkpoint(Callback):
    """The files of ``fit(out_dir=..., resume=...)``, which builds this callback and runs it last.

    After every row that is the best so far: ``model_ema.pth`` (the EMA the monitor picked, as scored;
    ``model.pth``, the live weights, without an EMA); after every epoch ``checkpoint.pt``, everything a
    resume needs. Each is written atomically. ``history.csv`` and ``history.png`` are ``LiveLog``'s.

    ``resume``: ``False`` starts a run (an ``out_dir`` that holds one is refused), ``True`` continues the
    run in ``out_dir/checkpoint.pt``, ``"auto"`` continues it if there is one and starts fresh if not,
    ``"overwrite"`` deletes the run there and starts over, and a path continues from that checkpoint. A
    resume checks that the run fits (model, batch size and steps per epoch, EMA settings, optimizer,
    scheduler, amp, the callbacks' saved states) before it changes anything. The folder is checked
    when the callback is built and created only when training starts, so a refused run leaves none.

    Example:
        >>> import tempfile
        >>> files = Checkpoint(tempfile.mkdtemp() + "/run", resume="auto")
        >>> files.path is None  # nothing to continue: a fresh run
        True
    """

    def __init__(self, out_dir: str | os.PathLike | None, *, resume: bool | str | os.PathLike = False):
        self.out_dir = None if out_dir is None else Path(out_dir)
        self.overwrite = resume == "overwrite"
        self.path = _resume_path(resume, self.out_dir)  # the checkpoint to continue from, or None
        if self.out_dir is not None and is_main_process():
            _check_out_dir(self.out_dir, resumed=self.path is not None, overwrite=self.overwrite)

    def load(self, state: FitState) -> None:
        """Continue the run of ``self.path`` in ``state``: every part is checked before any is loaded."""
        if self.path is None:
            return
        path, saved = self.path, load_checkpoint(self.path)
        parts = {"optimizer_type", "scheduler_type", "amp", "callbacks", "steps_per_epoch", "sharded"}
        missing = parts - saved.keys()
        if missing:
            raise ValueError(
                f"{path} was written by an older ema_kit (it lacks {sorted(missing)}); start a new run, or "
                "load its weights into the model: model.load_state_dict(torch.load(path)['model'])."
            )
        problems = layout_mismatch(saved["model"], state.model.state_dict())
        if problems:
            raise ValueError(f"{path} was saved from another model ({problems}).")
        _check_same_shape(path, saved, _run_shape(state))  # before the EMA: a half-life in epochs follows it
        if saved["emas"] != list(state.emas):
            raise ValueError(
                f"{path} holds EMAs {saved['emas']}, but this run tracks {list(state.emas)}: pass the "
                "same ema= as the run that wrote it."
            )
        for was, now in zip(_ema_settings(saved["ema"]), _ema_settings(state.ema)):
            changed = [
                f"{k}={was[k]!r} in the checkpoint, {k}={now[k]!r} now" for k in was if was[k] != now.get(k)
            ]
            if changed:
                raise ValueError(
                    f"{path}: the EMA settings differ ({'; '.join(changed)}). A resume continues the same "
                    "run: pass the same ema= as the run that wrote it, or start a new run in another out_dir."
                )
        now_scheduler = None if state.scheduler is None else type(state.scheduler).__name__
        if saved["scheduler_type"] != now_scheduler:
            raise ValueError(
                f"{path} was saved with scheduler {saved['scheduler_type']}, this run has {now_scheduler}; "
                "pass the same scheduler setup as the run that wrote it."
            )
        _check_same_optimizer(path, saved, state.optimizer, state.scheduler)
        if state.scheduler is not None:
            _check_same_plan(path, saved["scheduler"], state.scheduler.state_dict())
        if saved["epoch"] > state.epochs:
            raise ValueError(
                f"{path} is a run trained for {saved['epoch']} epochs, more than this run's epochs="
                f"{state.epochs}: a resume continues the same run, and cannot undo epochs. Pass epochs="
                f"{saved['epoch']} or more, or start a new run in another out_dir."
            )
        if saved["amp"] != _amp_name(state.amp):
            raise ValueError(
                f"{path} was saved with amp={saved['amp']!r}, this run uses amp={_amp_name(state.amp)!r}; "
                "pass the same amp= (and device) as the run that wrote it."
            )
        callbacks = {state_key(c): c for c in state.callbacks if stateful(c)}
        if sorted(saved["callbacks"]) != sorted(callbacks):
            raise ValueError(
                f"{path} holds the state of callbacks {sorted(saved['callbacks'])}, this run has "
                f"{sorted(callbacks)} with a state to resume; pass the same callbacks as the run that "
                "wrote it (a callback's state is kept under its state_key)."
            )
        was, now = saved["sharded"], is_sharded(state.model)
        if was != now:
            how = {True: "sharded by FSDP2", False: "not sharded"}
            raise ValueError(
                f"{path} was written by a run whose model was {how[was]}, and this run's is {how[now]}: "
                "their optimizer states are laid out differently. Resume the run as it was trained."
            )
        # Everything fits. Callbacks check their own state before changing it, so they go first.
        for key, callback in callbacks.items():
            callback.load_state_dict(saved["callbacks"][key])
        if state.ema is not None:
            state.ema.load_state_dict(saved["ema"])
        _load_model_and_optimizer(state.model, state.optimizer, saved["model"], saved["optimizer"])
        if state.scheduler is not None:
            state.scheduler.load_state_dict(saved["scheduler"])
        state.scaler.load_state_dict(saved["scaler"])
        state.history = pd.DataFrame(saved["history"])
        state.epoch, state.step = saved["epoch"], saved["step"]
        state.resumed_from = path
        set_rng_state(saved["rng"], *loader_generators(state.train_loader))

    def on_fit_start(self, state: FitState) -> None:
        """Create the folder, now that every check has passed (fit runs this callback last)."""
        if self.out_dir is None or not is_main_process():
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        if self.overwrite:  # a kill before the first epoch ends must not leave the old run to resume
            for name in RUN_FILES:
                (self.out_dir / name).unlink(missing_ok=True)

    def on_row_added(self, state: FitState) -> None:
        """The best weights, when the row just added (an epoch's, or one within an epoch) is the best."""
        sharded = is_sharded(state.model)  # then every rank gathers its shards to rank 0, which writes
        if self.out_dir is None or state.best_epoch != state.row["epoch"]:
            return
        if not (sharded or is_main_process()):
            return
        named = state.monitor.split("_", 1)[0]
        best = named if named in state.scored else next(iter(state.scored), None)
        scored = None if best is None else state.scored[best]  # the EMA the monitor names (the best decay's)
        if isinstance(scored, ModelEMA):  # a sharded EMA: every rank takes part
            scored.save(self.out_dir / "model_ema.pth")
        elif scored is not None:
            if is_main_process():
                save_module(scored, self.out_dir / "model_ema.pth")
        else:
            live = _model_state(state.model)
            if is_main_process():
                atomic_save({k: v.detach().cpu() for k, v in live.items()}, self.out_dir / "model.pth")

    def on_epoch_end(self, state: FitState) -> None:
        """The checkpoint, at epochs' ends only: a resume starts an epoch from its first batch."""
        sharded = is_sharded(state.model)  # then every rank gathers its shards to rank 0, which writes
        if self.out_dir is None or not (sharded or is_main_process()):
            return
        model, optimizer = _model_state(state.model), _optimizer_state(state.model, state.optimizer)
        ema = None if state.ema is None else state.ema.state_dict()
        if sharded:
            ema = gathered(ema)
        if not is_main_process():
            return
        scheduler = state.scheduler
        save_checkpoint(
            self.out_dir / "checkpoint.pt",
            model=model,
            optimizer=optimizer,
            optimizer_type=type(state.optimizer).__name__,
            scheduler=None if scheduler is None else scheduler.state_dict(),
            scheduler_type=None if scheduler is None else type(scheduler).__name__,
            scaler=state.scaler.state_dict(),
            amp=_amp_name(state.amp),
            ema=ema,
            emas=list(state.emas),
            sharded=sharded,
            callbacks={state_key(c): c.state_dict() for c in state.callbacks if stateful(c)},
            history=state.history.to_dict(orient="list"),
            epoch=state.epoch,
            step=state.step,
            rng=rng_state(*loader_generators(state.train_loader)),
            **_run_shape(state),
        )


def _model_state(model: torch.nn.Module) -> dict:
    """The model's state dict; of a sharded model, gathered whole to rank 0's CPU (every rank calls)."""
    if not is_sharded(model):
        return model.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    reshard(model)
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def _optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """The optimizer's state dict; of a sharded model's, gathered whole to rank 0's CPU, keyed by the
    parameters' names (every rank calls)."""
    if not is_sharded(model):
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    reshard(model)
    whole = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_optimizer_state_dict(model, optimizer, options=whole)


def _load_model_and_optimizer(model: torch.nn.Module, optimizer, weights: dict, optimizer_state) -> None:
    """Load a checkpoint's model and optimizer states; into a sharded model, each rank keeps its part."""
    if not is_sharded(model):
        model.load_state_dict(weights)
        optimizer.load_state_dict(optimizer_state)
        return
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    reshard(model)
    whole = StateDictOptions(full_state_dict=True)
    set_model_state_dict(model, weights, options=whole)
    set_optimizer_state_dict(model, optimizer, optimizer_state, options=whole)


def _resume_path(resume, out_dir: Path | None) -> Path | None:
    """The checkpoint to continue from, or None for a fresh run."""
    if resume is False:
        return None
    if resume is True or resume in ("auto", "overwrite"):
        if out_dir is None:
            raise ValueError(f"resume={resume!r} is about the run in out_dir: give out_dir too.")
        path = out_dir / "checkpoint.pt"
        return path if resume is True or (resume == "auto" and path.exists()) else None
    if isinstance(resume, (str, os.PathLike)):
        return Path(resume)
    raise TypeError(
        f"resume must be False, True (out_dir/checkpoint.pt), 'auto' (continue if it exists, else start "
        f"fresh), 'overwrite' (delete the run in out_dir and start over) or a checkpoint's path, got "
        f"{resume!r}."
    )


def _check_out_dir(out_dir: Path, *, resumed: bool, overwrite: bool) -> None:
    """out_dir must be a folder this process can create or write, not holding a run this one would overwrite.

    Nothing is created here: a run refused for another reason leaves no folder behind.
    """
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"out_dir={str(out_dir)!r} is a file; give a folder (it is created if missing).")
    existing = out_dir
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise ValueError(
            f"out_dir={str(out_dir)!r} cannot be created ({str(existing)!r} is a file); give another folder."
        )
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(
            f"out_dir={str(out_dir)!r} is not writable ({str(existing)!r} is not); give a folder this "
            "process can write."
        )
    held = [name for name in RUN_FILES if (out_dir / name).exists()]
    if not resumed and held and not overwrite:
        raise ValueError(
            f"out_dir={str(out_dir)!r} holds a run ({', '.join(held)}). Pass resume='auto' to continue it, "
            "resume='overwrite' to start over in it (its files are deleted), or give another out_dir."
        )


def _run_shape(state: FitState) -> dict:
    """The batch size and optimizer steps per epoch (None where the loader does not tell)."""
    try:
        batches = len(state.train_loader)
    except TypeError:
        batches = None
    return {
        "batch_size": getattr(state.train_loader, "batch_size", None),
        "steps_per_epoch": None if batches is None else math.ceil(batches / state.accumulate),
    }


def _check_same_shape(path: Path, saved: dict, now: dict) -> None:
    if (saved["batch_size"], saved["steps_per_epoch"]) != (now["batch_size"], now["steps_per_epoch"]):
        raise ValueError(
            f"{path} was written by a run with batch_size {saved['batch_size']} and "
            f"{saved['steps_per_epoch']} optimizer steps per epoch; this run has batch_size "
            f"{now['batch_size']} and {now['steps_per_epoch']} steps per epoch. A resume continues the same "
            "run (its shuffle, schedule and EMA half-life are counted in these steps): pass the same loader "
            "and accumulate=, or start a new run in another out_dir."
        )


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


# A learning-rate scheduler's plan, by the names torch's schedulers keep it under in their state dicts: the
# length of the run (OneCycleLR's total_steps, CosineAnnealingLR's T_max, ...) and the shape of the curve.
_PLAN = (
    "total_steps", "T_max", "T_0", "T_mult", "total_iters", "step_size", "milestones", "gamma", "eta_min",
    "start_factor", "end_factor",
)  # fmt: skip


def _check_same_plan(path: Path, saved: dict, now: dict) -> None:
    """The same schedule as the checkpoint's: a resume with another number of epochs changes OneCycleLR's
    total_steps, which would fail at its end (or shift a cosine's curve) rather than now."""
    changed = [f"{key}={saved[key]!r} in the checkpoint, {now[key]!r} now" for key in _PLAN
               if key in saved and key in now and saved[key] != now[key]]  # fmt: skip
    if changed:
        raise ValueError(
            f"{path}: the scheduler plans another schedule ({'; '.join(changed)}): built for another number "
            "of epochs or steps? A resume continues the same run: build the scheduler as the run that wrote "
            "it did, or start a new run in another out_dir."
        )


def _ema_settings(ema) -> list[dict]:
    """The settings of each EMA in a ModelEMA or MultiEMA, or in the state dict of one."""
    if ema is None:
        return []
    state = ema if isinstance(ema, dict) else ema.state_dict()
    return [e["settings"] for e in state["emas"]] if "emas" in state else [state["settings"]]


def _amp_name(amp: torch.dtype | None) -> str:
    return "off" if amp is None else str(amp).removeprefix("torch.")
