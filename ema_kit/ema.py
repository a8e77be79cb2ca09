"""ModelEMA: an exponential moving average of a model's weights, kept in a shadow copy of the model."""

from __future__ import annotations

import contextlib
import math
import os
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch import nn

from . import _checks
from ._lowp import STOCHASTIC_BF16, check_noise_state
from ._shadows import Shadows
from ._sharded import rank, reshard
from ._tensors import check_layout, cpu_state
from .bn import recompute_bn
from .files import atomic_save, is_safetensors, save_weights

# Warmup caps the decay at (1 - 1/n) ** 8 for the n-th update: a power-function EMA (Karras et al.
# 2024, gamma = 7) that averages over the latest ~10% of the updates so far (sigma_rel = 0.10). Measured on
# the digits demo, this keeps the early EMA as good as or better than the live model, where an EMA that
# only drops the init (Adam-style bias correction) still averages in the fast-moving first steps and
# stays near chance for several epochs.
WARMUP_POWER = 8
_FORMAT = "ema_kit.ModelEMA/1"


def decay_from_half_life(
    steps: float | None = None, *, epochs: float | None = None, steps_per_epoch: int | None = None
) -> float:
    """The decay whose EMA gives half its weight to the last ``steps`` updates.

    Give the half-life in steps, or in epochs with the number of steps per epoch.

    Example:
        >>> round(decay_from_half_life(693), 4)
        0.999
        >>> decay_from_half_life(epochs=0.5, steps_per_epoch=200) == decay_from_half_life(100)
        True
    """
    if (steps is None) == (epochs is None):
        raise ValueError(
            "Give the half-life either in steps (steps=...) or in epochs (epochs=..., "
            "steps_per_epoch=...), not both or neither."
        )
    if epochs is not None:
        if steps_per_epoch is None:
            raise ValueError("epochs=... needs steps_per_epoch=... (len(train_loader) is the usual value).")
        per_epoch = _checks.check_int("steps_per_epoch", steps_per_epoch, minimum=1)
        steps = _checks.check_real("epochs", epochs) * per_epoch
        what = f"epochs={epochs!r} (x steps_per_epoch={per_epoch})"
    else:
        steps = _checks.check_real("steps", steps)
        what = f"steps={steps!r}"
    if not steps > 0 or math.isinf(steps):
        raise ValueError(f"The half-life must be a positive, finite number, got {what}.")
    decay = 0.5 ** (1.0 / steps)
    if decay == 1.0:
        raise ValueError(
            f"The half-life {what} is so long that its decay rounds to 1.0 in float64, an EMA that never "
            "moves; give a half-life below about 1e15 steps."
        )
    return decay


class Schedule:
    """When one EMA blends and by how much: its decay, warmup and the rest, and its updates counted so far.

    Kept apart from the tensors: ``ModelEMA`` runs one over its shadow, ``MultiEMA`` one per decay over its
    shared shadows, which it then blends in one pass. ``settings`` are those ``check_settings`` returns.

    Example:
        >>> settings = check_settings(ModelEMA.__init__.__kwdefaults__ | {"decay": 0.5, "warmup": False})
        >>> schedule = Schedule(settings)
        >>> schedule.advance(lambda: True), schedule.num_updates   # the blend weight 1 - decay, and the count
        (0.5, 1)
    """

    def __init__(self, settings: dict):
        self.load(settings, {"num_steps": 0, "num_updates": 0, "num_skipped": 0})

    def load(self, settings: dict, counters: dict) -> None:
        self.decay, self.warmup = settings["decay"], settings["warmup"]
        self.update_after_step, self.update_every = settings["update_after_step"], settings["update_every"]
        self.skip_non_finite = settings["skip_non_finite"]
        self.num_steps = counters["num_steps"]  # update() calls so far
        self.num_updates = counters["num_updates"]  # averaging updates (after update_after_step, every k-th)
        self.num_skipped = counters["num_skipped"]  # updates skipped for NaN/Inf weights

    def counters(self) -> dict:
        return {"num_steps": self.num_steps, "num_updates": self.num_updates, "num_skipped": self.num_skipped}

    @property
    def half_life(self) -> float:
        return 0.0 if self.decay == 0 else math.log(0.5) / math.log(self.decay)

    def current_decay(self) -> float:
        decay = self.decay**self.update_every
        if self.warmup:
            decay = min(decay, (1.0 - 1.0 / (self.num_updates + 1)) ** WARMUP_POWER)
        return decay

    def advance(self, all_finite: Callable[[], bool]) -> float | None:
        """Count one ``update`` call; return the blend weight it calls for (1.0: copy), or None (no change).

        ``all_finite()`` says whether the live weights are free of NaN and Inf; asked only when needed.
        """
        self.num_steps += 1
        averaging = self.num_steps > self.update_after_step
        if averaging and (self.num_steps - self.update_after_step) % self.update_every:
            return None
        if self.skip_non_finite and not all_finite():
            self.num_skipped += 1
            warnings.warn(
                "ModelEMA skipped an update: the model's weights hold NaN or Inf; the EMA keeps its "
                "last finite weights (ema.num_skipped counts the skips).",
                RuntimeWarning,
                stacklevel=3,  # the line that called update: advance < update < it
            )
            return None
        if not averaging:
            return 1.0
        weight = 1.0 - self.current_decay()
        self.num_updates += 1
        return weight


def _from_schedule(name: str, doc: str) -> property:
    return property(lambda self: getattr(self._schedule, name), doc=doc)


class ModelEMA:
    """An exponential moving average of a model's weights: ``ema_w = decay * ema_w + (1 - decay) * w``.

    Holds ``module``, a copy of the model in eval mode that never needs gradients. Call ``update(model)``
    after each optimizer step, then evaluate or save ``ema.module``.

    A model sharded by FSDP2 (``torch.distributed.fsdp.fully_shard``) is not copied: build the EMA on every
    rank, and each keeps the EMA of its own shards (``sharded``), updated with no communication (but for
    one all-reduce of a flag with ``skip_non_finite``, so that every rank skips the same updates). It has no
    ``module``: evaluate with ``applied_to(model)``; ``save`` gathers the whole weights to rank 0 (every
    rank calls it), ``state_dict()`` holds this rank's shards as DTensors (docs/distributed.md).

    Args:
        model: the model to average; DDP, DataParallel and ``torch.compile`` wrappers are looked through,
            and a model sharded by FSDP2 is averaged shard by shard. FSDP1 and DeepSpeed are refused.
        decay: weight kept by the EMA per update, in [0, 1). ``decay_from_half_life`` converts "how far
            back it averages" into a decay.
        warmup: cap the decay at ``(1 - 1/n) ** 8`` for the n-th update, so early on the EMA averages the
            latest ~10% of updates instead of lingering near the random init or the first, fast-moving
            steps. ``decay`` applies from update ``8 / (1 - decay)`` on (8,000 for 0.999). ``False``
            applies ``decay`` exactly from the first update.
        update_after_step: for this many first ``update`` calls, copy the weights instead of averaging.
        update_every: average on every k-th call only, with ``decay ** k``, so the half-life in steps
            stays the same and the per-step cost drops k-fold.
        buffers: ``"average"`` floating-point buffers (BatchNorm running stats) like weights, or
            ``"copy"`` them from the model at each update. Integer buffers (``num_batches_tracked``)
            are always copied.
        dtype: the shadow's floating-point dtype. By default float32 for bf16/fp16 weights, because
            ``(1 - decay) * (w - ema_w)`` is below their resolution and rounds away; otherwise the
            weight's own dtype. ``"bfloat16-stochastic"``: a bfloat16 shadow (half a float32 one's memory)
            that still moves: each update is blended in float32 and rounded up or down at random
            (``ema_kit._lowp``), so steps far below bfloat16's resolution move it on average, where a plain
            ``torch.bfloat16`` shadow at decay 0.999 stalls. Slower per update (benchmarks/lowp_shadow.py);
            its noise has a generator of its own, whose state ``state_dict()`` keeps for a bit-exact resume.
        device: where the shadow lives, e.g. ``"cpu"`` to keep it off the GPU (each update then copies
            the weights into one pinned buffer with non-blocking copies, and averages on the CPU). By
            default it follows the model's device, also when the model is moved later.
        skip_non_finite: check the live weights before each update (one GPU sync); if they hold NaN or
            Inf, skip the update with a warning and keep the last good EMA.

    Example:
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 2))
        >>> ema = ModelEMA(model, decay=0.99)
        >>> optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> for _ in range(5):
        ...     loss = model(torch.randn(16, 4)).square().mean()
        ...     optimizer.zero_grad(); loss.backward(); optimizer.step()
        ...     ema.update(model)
        >>> prediction = ema.module(torch.randn(3, 4))    # evaluate the EMA model
        >>> with ema.applied_to(model):                   # or run the live model with EMA weights
        ...     prediction = model.eval()(torch.randn(3, 4))
        >>> ema.num_updates
        5
    """

    def __init__(
        self,
        model: nn.Module,
        decay: float = 0.999,
        *,
        warmup: bool = True,
        update_after_step: int = 0,
        update_every: int = 1,
        buffers: str = "average",
        dtype: torch.dtype | str | None = None,
        device: torch.device | str | None = None,
        skip_non_finite: bool = False,
    ):
        settings = check_settings(
            dict(
                decay=decay,
                warmup=warmup,
                update_after_step=update_after_step,
                update_every=update_every,
                buffers=buffers,
                dtype=dtype,
                skip_non_finite=skip_non_finite,
            )
        )
        self._attach(new_shadows(model, 1, settings, device), 0, Schedule(settings))

    def _attach(self, shadows: Shadows, index: int, schedule: Schedule) -> None:
        self._shadows, self._index, self._schedule = shadows, index, schedule

    @property
    def module(self) -> nn.Module:
        """The EMA model: a copy of the model holding the EMA weights, in eval mode, without gradients."""
        if self._shadows.sharded:
            raise AttributeError(
                "This ModelEMA averages a sharded (FSDP2) model and has no module of its own: each rank "
                "holds only its shards of the EMA weights. Run the sharded model with them, "
                "`with ema.applied_to(model): ...`, and save them whole with ema.save(path) (gathered to "
                "rank 0; call it on every rank)."
            )
        return self._shadows.modules[self._index]

    @property
    def sharded(self) -> bool:
        """Whether the EMA averages a model sharded by FSDP2, holding this rank's shards (no ``module``)."""
        return self._shadows.sharded

    # The schedule's settings and counters (a MultiEMA's EMA shares its schedule with the MultiEMA).
    decay = _from_schedule("decay", "Weight kept by the EMA per update (see the class docstring).")
    warmup = _from_schedule("warmup", "Whether the decay is capped early on (see the class docstring).")
    update_after_step = _from_schedule("update_after_step", "First update calls that copy the weights.")
    update_every = _from_schedule("update_every", "Average on every k-th update call only.")
    skip_non_finite = _from_schedule("skip_non_finite", "Whether updates from NaN/Inf weights are skipped.")
    num_steps = _from_schedule("num_steps", "update() calls so far.")
    num_updates = _from_schedule("num_updates", "Averaging updates applied (after update_after_step).")
    num_skipped = _from_schedule("num_skipped", "Updates skipped for NaN/Inf weights.")
    half_life = _from_schedule("half_life", "Steps after which an update's weight in the EMA has halved.")

    @property
    def buffers(self) -> str:
        """``"average"`` or ``"copy"``: what happens to floating-point buffers (see the class docstring)."""
        return "average" if self._shadows.average_buffers else "copy"

    @property
    def dtype(self) -> torch.dtype | str | None:
        """The shadow's dtype as given: a torch dtype, ``"bfloat16-stochastic"``, or None (the default)."""
        return STOCHASTIC_BF16 if self._shadows.stochastic else self._shadows.dtype

    @property
    def device(self) -> torch.device | None:
        """Where the shadow lives, or None when it follows the model."""
        return self._shadows.device

    def current_decay(self) -> float:
        """The decay the next averaging update applies, warmup and ``update_every`` included."""
        return self._schedule.current_decay()

    def update(self, model: nn.Module) -> None:
        """Fold the model's current weights into the EMA; call it after each optimizer step.

        Follows the model when its tensors were moved, cast or replaced, or a submodule was swapped for
        one of the same shape; a model whose layout no longer matches is a ValueError, before any change.
        """
        self._shadows.follow(model)
        weights: list[float | None] = [None] * self._shadows.count
        weights[self._index] = self._schedule.advance(self._shadows.all_finite)
        self._shadows.blend(weights)

    def copy_to(self, model: nn.Module) -> None:
        """Write the EMA weights (and buffers) into ``model`` for good (the ``SwitchEMA`` callback does)."""
        lives, shadows = self._shadows.pair(model, self._index)
        with torch.no_grad():
            torch._foreach_copy_(lives, shadows)

    def recompute_bn(self, loader, **options) -> int:
        """The EMA's BatchNorm statistics measured afresh: ``ema_kit.recompute_bn(ema.module, loader, ...)``.

        In place: call it after training (later updates average on from these statistics), or give ``fit``
        the ``RecomputeEMABatchNorm`` callback, which measures them on a copy each epoch.
        """
        return recompute_bn(self.module, loader, **options)

    @contextlib.contextmanager
    def applied_to(self, model: nn.Module) -> Iterator[nn.Module]:
        """Run ``model`` with the EMA weights inside the block; its own weights come back bit-exact after.

        No second model is built: the live weights wait in a temporary copy while the block runs. For a
        sharded model every rank enters the block (its forward passes gather the EMA's shards).

        Example:
            >>> model = nn.Linear(2, 1)
            >>> ema = ModelEMA(model)
            >>> with ema.applied_to(model):
            ...     ema_output = model(torch.ones(1, 2))
        """
        lives, shadows = self._shadows.pair(model, self._index)
        with torch.no_grad():
            saved = [live.clone() for live in lives]
        try:
            with torch.no_grad():
                torch._foreach_copy_(lives, shadows)
            yield model
        finally:
            with torch.no_grad():
                torch._foreach_copy_(lives, saved)
            reshard(model)  # FSDP2 may keep weights it gathered from the EMA's shards: let it gather anew

    def save(self, path: str | os.PathLike) -> Path:
        """Write the EMA weights as a plain state dict, atomically, on the CPU.

        ``model.load_state_dict(torch.load(path, weights_only=True))`` loads it (strict), keys without
        wrapper prefixes. A name ending in ``.safetensors`` writes safetensors instead (``pip install
        safetensors``); ``ema_kit.files.load_weights(path)`` reads either. Modules' extra state
        (``get_extra_state``) goes into ``.pth`` files only: safetensors holds tensors alone.

        Of a sharded model, every rank must call it: the weights are gathered to rank 0, one tensor at a
        time, and rank 0 writes them (the same plain state dict); it returns on every rank once the file is
        written, or raises there if writing failed.
        """
        if not self.sharded:
            return save_module(self.module, path)
        weights = self._shadows.gathered(self._index)
        failure = None
        if rank() == 0:
            try:
                save_weights(weights, path)
            except Exception as error:
                failure = f"{type(error).__name__}: {error}"
                raise
            finally:
                _share_failure(failure)
        else:
            _share_failure(None)
        return Path(path)

    def state_dict(self) -> dict:
        """Everything needed to resume bit-identically: the shadow, the counters and the settings.

        Holds only tensors and plain Python values, so it loads with ``torch.load(weights_only=True)``. Of a
        sharded model, the weights are DTensors viewing this rank's shards, as ``model.state_dict()`` holds
        the model's: save them with ``torch.distributed.checkpoint`` or one file per rank; ``load_state_dict``
        also takes whole weights (a gathered state), each rank keeping its part.
        """
        return {
            "format": _FORMAT,
            "weights": self._shadows.state(self._index),
            **self._schedule.counters(),
            "settings": {name: getattr(self, name) for name in _SETTINGS}
            | {"dtype": None if self.dtype is None else str(self.dtype).removeprefix("torch.")},
            "generator": self._shadows.noise_state(),
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore what ``state_dict`` returned. Checks everything before changing anything."""
        checked_load(self, state)()

    def __call__(self, *args, **kwargs):
        """Run the EMA model: ``ema(x)`` is ``ema.module(x)``."""
        return self.module(*args, **kwargs)

    def __repr__(self) -> str:
        return (
            f"ModelEMA(decay={self.decay}, half_life={self.half_life:.0f} steps, warmup={self.warmup}, "
            f"num_updates={self.num_updates}, module={self._shadows.name})"
        )


# -- What MultiEMA shares with ModelEMA: one Shadows for all its EMAs, a Schedule and a ModelEMA for each. --


def new_shadows(model: nn.Module, count: int, settings: dict, device) -> Shadows:
    """``count`` shadow sets of ``model``, laid out as the checked ``settings`` say, on ``device``."""
    return Shadows(
        model,
        count,
        average_buffers=settings["buffers"] == "average",
        dtype=settings["dtype"],
        device=_checks.check_device("device", device),
        allow_sharded=True,
    )


def member(shadows: Shadows, index: int, schedule: Schedule) -> ModelEMA:
    """The ModelEMA of set ``index`` of ``shadows``, run by ``schedule``; both stay shared with the caller,
    which updates all sets at once (``MultiEMA``)."""
    ema = ModelEMA.__new__(ModelEMA)
    ema._attach(shadows, index, schedule)
    return ema


def checked_load(ema: ModelEMA, state) -> Callable[[], None]:
    """Check a ``ModelEMA.state_dict()`` against ``ema`` and return the function that loads it into ``ema``.

    Nothing changes until that function runs: ``MultiEMA`` checks every EMA's state, then loads them all.
    """
    if not isinstance(state, dict) or state.get("format") != _FORMAT:
        raise ValueError(
            "Not a ModelEMA state: expected the dict from ModelEMA.state_dict(). For plain weights "
            "(e.g. a file from ModelEMA.save), use ema.module.load_state_dict(weights)."
        )
    try:
        settings = check_settings(_current_settings(state["settings"]))
        counters = {
            name: _checks.check_int(name, state[name], minimum=0)
            for name in ("num_steps", "num_updates", "num_skipped")
        }
        weights = state["weights"]
    except KeyError as error:
        raise ValueError(
            f"The ModelEMA state lacks {error}; was it saved by another ema_kit version?"
        ) from None
    shadows = ema._shadows
    expected = shadows.state(ema._index)
    # A state read from a file can hold anything weights_only allows: refuse it here, before any change.
    if isinstance(weights, dict):
        hollow = [
            key
            for key, value in weights.items()
            if isinstance(expected.get(key), torch.Tensor)
            and (not isinstance(value, torch.Tensor) or value.is_meta or value.layout != torch.strided)
        ]
    else:
        hollow = ["weights"]
    if hollow:
        raise ValueError(
            f"The ModelEMA state's {hollow[:3]} are not dense tensors that hold values; was it saved "
            "with ModelEMA.state_dict()?"
        )
    check_layout(
        weights,
        expected,
        "The state does not match the model this EMA was built for",
        "Build a new ModelEMA for a different architecture.",
    )
    stochastic = settings["dtype"] == STOCHASTIC_BF16
    if shadows.sharded:
        shadows.check_state(weights)
        if stochastic:
            raise ValueError(
                f"The state holds dtype={STOCHASTIC_BF16!r} shadows, which an EMA of a sharded model does "
                "not support; load it into an EMA of the unsharded model."
            )
    noise = state.get("generator") if stochastic else None
    if stochastic:
        check_noise_state(noise)
    layout = {"buffers": settings["buffers"], "dtype": settings["dtype"]}
    if shadows.count > 1 and layout != {"buffers": ema.buffers, "dtype": ema.dtype}:
        raise ValueError(
            f"This EMA shares buffers={ema.buffers!r} and dtype={ema.dtype} with the other EMAs of "
            f"its MultiEMA, but the state holds buffers={settings['buffers']!r} and "
            f"dtype={settings['dtype']}; build the MultiEMA with the state's settings to load it."
        )

    def load() -> None:
        ema._schedule.load(settings, counters)
        if layout != {"buffers": ema.buffers, "dtype": ema.dtype}:
            shadows.relayout(average_buffers=settings["buffers"] == "average", dtype=settings["dtype"])
        shadows.load_state(ema._index, weights)
        shadows.load_noise_state(noise)

    return load


def _share_failure(failure: str | None) -> None:
    """Rank 0's word on its write, to every rank: the others raise too rather than go on without the file."""
    if not torch.distributed.is_initialized():
        return
    shared = [failure]
    torch.distributed.broadcast_object_list(shared, src=0)
    if shared[0] is not None and rank() != 0:
        raise RuntimeError(f"ModelEMA.save: rank 0 could not write the EMA weights ({shared[0]}).")


def save_module(module: nn.Module, path: str | os.PathLike) -> Path:
    """Write ``module``'s state dict atomically on the CPU, extra state included (see ``ModelEMA.save``)."""
    weights = module.state_dict()
    extra = [key for key, value in weights.items() if not isinstance(value, torch.Tensor)]
    if not extra:
        return save_weights(weights, path)
    if is_safetensors(path):
        raise ValueError(
            f"{Path(path).name}: the model's {extra[:3]} are extra state (get_extra_state), not "
            "tensors, which safetensors cannot hold; save to a .pth name instead."
        )
    return atomic_save(cpu_state(weights), path)


_SETTINGS = {
    "decay": lambda value: _checks.check_decay("decay", value),
    "warmup": lambda value: _checks.check_bool("warmup", value),
    "update_after_step": lambda value: _checks.check_int("update_after_step", value, minimum=0),
    "update_every": lambda value: _checks.check_int("update_every", value, minimum=1),
    "buffers": lambda value: _checks.check_choice("buffers", value, ("average", "copy")),
    "dtype": lambda value: _checks.check_dtype("dtype", value, also=(STOCHASTIC_BF16,)),
    "skip_non_finite": lambda value: _checks.check_bool("skip_non_finite", value),
}


def check_settings(settings: dict) -> dict:
    """Every ModelEMA setting, checked; raises on the first bad one, before anything is changed."""
    if not isinstance(settings, dict):  # a state read from a file
        raise ValueError(f"The ModelEMA settings must be a dict, got {type(settings).__name__}.")
    return {name: check(settings[name]) for name, check in _SETTINGS.items()}


def _current_settings(saved) -> dict:
    """A state's settings in today's terms: states written before the stochastic shadow was a dtype said it
    with rounding= and seed= settings (the seed lives on in the saved generator state)."""
    if not isinstance(saved, dict):
        return saved
    saved = dict(saved)
    if saved.pop("rounding", "nearest") == "stochastic":
        saved["dtype"] = STOCHASTIC_BF16
    saved.pop("seed", None)
    return saved
