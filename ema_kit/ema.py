"""ModelEMA: an exponential moving average of a model's weights, kept in a shadow copy of the model."""

from __future__ import annotations

import contextlib
import copy
import math
import numbers
import operator
import os
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch import nn

from ._fused import FusedUpdate
from ._tensors import Slot, layout_mismatch, saved_slots, unwrap
from .files import save_weights

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
        if not isinstance(steps_per_epoch, int) or isinstance(steps_per_epoch, bool) or steps_per_epoch < 1:
            raise ValueError(
                f"steps_per_epoch must be a positive int to convert epochs to steps, got "
                f"{steps_per_epoch!r} (len(train_loader) is the usual value)."
            )
        steps = epochs * steps_per_epoch
        what = f"epochs={epochs!r} (x steps_per_epoch={steps_per_epoch})"
    else:
        what = f"steps={steps!r}"
    if isinstance(steps, bool) or not isinstance(steps, (int, float)) or not steps > 0 or math.isinf(steps):
        raise ValueError(f"The half-life must be a positive, finite number, got {what}.")
    return 0.5 ** (1.0 / steps)


class ModelEMA:
    """An exponential moving average of a model's weights: ``ema_w = decay * ema_w + (1 - decay) * w``.

    Holds ``module`` (also reachable as ``ema``), a copy of the model in eval mode that never needs
    gradients. Call ``update(model)`` after each optimizer step, then evaluate or save ``ema.module``.

    Args:
        model: the model to average; DDP, DataParallel and ``torch.compile`` wrappers are looked through.
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
            weight's own dtype.
        device: where the shadow lives, e.g. ``"cpu"`` to keep it off the GPU. By default it follows
            the model's device, also when the model is moved later.
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
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        skip_non_finite: bool = False,
    ):
        settings = _check_settings(
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
        self.__dict__.update(settings)
        self.device = _check_device(device)
        self.num_steps = 0  # update() calls so far
        self.num_updates = 0  # averaging updates applied (after update_after_step, every update_every)
        self.num_skipped = 0  # updates skipped for NaN/Inf weights

        live = _plain_module(model, "model")
        lives = [slot.tensor for slot in saved_slots(live)]
        if not any(tensor.is_floating_point() for tensor in lives):
            raise ValueError(f"{type(live).__name__} has no floating-point parameters or buffers to average.")
        plan = self._plan_for(live)
        with torch.no_grad():
            torch._foreach_copy_(plan.shadows, plan.lives)
        # Deep-copy the model with its tensors swapped for the shadows, so no second copy is ever made.
        memo = {
            id(live_tensor): nn.Parameter(shadow, requires_grad=False)
            if isinstance(live_tensor, nn.Parameter)
            else shadow
            for live_tensor, shadow in zip(lives, plan.shadows)
        }
        try:
            self.module = copy.deepcopy(live, memo).eval().requires_grad_(False)
        except Exception as error:
            raise TypeError(
                f"ModelEMA copies the model with copy.deepcopy, which failed for "
                f"{type(live).__name__}: {error}"
            ) from error
        self._adopt(plan, model)

    @property
    def ema(self) -> nn.Module:
        """The EMA model (the same object as ``module``)."""
        return self.module

    @property
    def half_life(self) -> float:
        """Steps after which an update's weight in the EMA has halved (warmup aside)."""
        return 0.0 if self.decay == 0 else math.log(0.5) / math.log(self.decay)

    def current_decay(self) -> float:
        """The decay the next averaging update applies, warmup and ``update_every`` included."""
        decay = self.decay**self.update_every
        if self.warmup:
            decay = min(decay, (1.0 - 1.0 / (self.num_updates + 1)) ** WARMUP_POWER)
        return decay

    def update(self, model: nn.Module) -> None:
        """Fold the model's current weights into the EMA; call it after each optimizer step."""
        self._follow(model)
        weight = self._advance(self._plan.all_finite)
        if weight == 1.0:
            self._plan.copy_()
        elif weight is not None:
            self._plan.lerp_(weight)

    def _follow(self, model: nn.Module) -> None:
        """Rebind to ``model`` when it is another object, or its tensors were moved, cast or replaced."""
        if model is not self._model or self._current_addresses() != self._addresses:
            self._bind(model)

    def _advance(self, all_finite: Callable[[], bool]) -> float | None:
        """Count one ``update`` call; return the blend weight it calls for (1.0: copy), or None (no change).

        The schedule is kept apart from the tensor work so that ``MultiEMA`` can run it for each of its
        EMAs and then blend them all in one pass.
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
                stacklevel=3,
            )
            return None
        if not averaging:
            return 1.0
        weight = 1.0 - self.current_decay()
        self.num_updates += 1
        return weight

    def copy_to(self, model: nn.Module) -> None:
        """Write the EMA weights (and buffers) into ``model`` for good."""
        lives, shadows = self._pair(model)
        with torch.no_grad():
            torch._foreach_copy_(lives, shadows)

    @contextlib.contextmanager
    def applied_to(self, model: nn.Module) -> Iterator[nn.Module]:
        """Run ``model`` with the EMA weights inside the block; its own weights come back bit-exact after.

        No second model is built: the live weights wait in a temporary copy while the block runs.

        Example:
            >>> model = nn.Linear(2, 1)
            >>> ema = ModelEMA(model)
            >>> with ema.applied_to(model):
            ...     ema_output = model(torch.ones(1, 2))
        """
        lives, shadows = self._pair(model)
        with torch.no_grad():
            saved = [live.clone() for live in lives]
        try:
            with torch.no_grad():
                torch._foreach_copy_(lives, shadows)
            yield model
        finally:
            with torch.no_grad():
                torch._foreach_copy_(lives, saved)

    def save(self, path: str | os.PathLike) -> Path:
        """Write the EMA weights as a plain state dict, atomically, on the CPU.

        ``model.load_state_dict(torch.load(path, weights_only=True))`` loads it (strict), keys without
        wrapper prefixes. A name ending in ``.safetensors`` writes safetensors instead (``pip install
        safetensors``); ``ema_kit.files.load_weights(path)`` reads either.
        """
        return save_weights(self.module.state_dict(), path)

    def state_dict(self) -> dict:
        """Everything needed to resume bit-identically: the shadow, the counters and the settings.

        Holds only tensors and plain Python values, so it loads with ``torch.load(weights_only=True)``.
        """
        return {
            "format": _FORMAT,
            "weights": self.module.state_dict(),
            "num_steps": self.num_steps,
            "num_updates": self.num_updates,
            "num_skipped": self.num_skipped,
            "settings": {name: getattr(self, name) for name in _SETTINGS}
            | {"dtype": None if self.dtype is None else str(self.dtype).removeprefix("torch.")},
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore what ``state_dict`` returned. Checks everything before changing anything."""
        self._restore(*self._check_state(state))

    def _check_state(self, state) -> tuple[dict, dict, dict]:
        """The settings, counters and weights of a ``state_dict``, checked against this EMA."""
        if not isinstance(state, dict) or state.get("format") != _FORMAT:
            raise ValueError(
                "Not a ModelEMA state: expected the dict from ModelEMA.state_dict(). For plain weights "
                "(e.g. a file from ModelEMA.save), use ema.module.load_state_dict(weights)."
            )
        try:
            settings = _check_settings(state["settings"])
            counters = {
                name: _check_int(name, state[name], minimum=0)
                for name in ("num_steps", "num_updates", "num_skipped")
            }
            weights = state["weights"]
        except KeyError as error:
            raise ValueError(
                f"The ModelEMA state lacks {error}; was it saved by another ema_kit version?"
            ) from None
        # A state read from a file can hold anything weights_only allows: refuse it here, before any change.
        if isinstance(weights, dict):
            hollow = [k for k, v in weights.items() if not isinstance(v, torch.Tensor) or v.is_meta]
        else:
            hollow = ["weights"]
        if hollow:
            raise ValueError(
                f"The ModelEMA state's {hollow[:3]} are not tensors that hold values; was it saved with "
                "ModelEMA.state_dict()?"
            )
        _check_weights_match(weights, self.module.state_dict())
        return settings, counters, weights

    def _restore(self, settings: dict, counters: dict, weights: dict) -> None:
        self.__dict__.update(settings, **counters)
        self._bind(self._model)  # lay the shadow out for the restored dtype before filling it
        with torch.no_grad():
            for key, tensor in self.module.state_dict().items():
                tensor.copy_(weights[key])

    def __call__(self, *args, **kwargs):
        """Run the EMA model: ``ema(x)`` is ``ema.module(x)``."""
        return self.module(*args, **kwargs)

    def __repr__(self) -> str:
        return (
            f"ModelEMA(decay={self.decay}, half_life={self.half_life:.0f} steps, warmup={self.warmup}, "
            f"num_updates={self.num_updates}, module={type(self.module).__name__})"
        )

    # -- binding the live model's tensors to the shadow's ---------------------------------------------

    def _plan_for(self, live: nn.Module) -> FusedUpdate:
        slots = saved_slots(live)
        lives = [slot.tensor for slot in slots]
        average = [
            t.is_floating_point() and (isinstance(t, nn.Parameter) or self.buffers == "average")
            for t in lives
        ]
        placements = [
            (
                self.device or t.device,
                (self.dtype or torch.promote_types(t.dtype, torch.float32))
                if t.is_floating_point()
                else t.dtype,
            )
            for t in lives
        ]
        return FusedUpdate(lives, average, placements)

    def _adopt(self, plan: FusedUpdate, model: nn.Module) -> None:
        """Make ``plan`` the update path, and note the tensor addresses whose change calls for a rebind.

        Every tensor of the model is watched (it may be moved, cast or replaced at any time); of the
        EMA, which this object owns, one tensor per shadow buffer, enough to see ``ema.module.to(...)``.
        """
        self._plan, self._model = plan, model
        ema_slots = saved_slots(self.module)
        slots = saved_slots(unwrap(model)) + [ema_slots[i] for i in plan.first_of_each_buffer]
        self._holders = [slot.holder for slot in slots]
        self._names = [slot.name for slot in slots]
        self._addresses = self._current_addresses()

    def _current_addresses(self) -> list[int]:
        return list(map(torch.Tensor.data_ptr, map(operator.getitem, self._holders, self._names)))

    def _bind(self, model: nn.Module) -> None:
        live = _plain_module(model, "model")
        ema_slots = saved_slots(self.module)
        _check_slots_match(saved_slots(live), ema_slots)
        plan = self._plan_for(live)
        with torch.no_grad():  # keep the EMA's values; only where they live changes
            torch._foreach_copy_(plan.shadows, [slot.tensor for slot in ema_slots])
        for slot, shadow in zip(ema_slots, plan.shadows):
            slot.tensor.data = shadow
        self._adopt(plan, model)

    def _pair(self, model: nn.Module) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """The model's tensors and the EMA's, matched by key (without rebinding the update path)."""
        live_slots, ema_slots = saved_slots(_plain_module(model, "model")), saved_slots(self.module)
        _check_slots_match(live_slots, ema_slots)
        return [slot.tensor.detach() for slot in live_slots], [slot.tensor for slot in ema_slots]


def _plain_module(model, name: str) -> nn.Module:
    if not isinstance(model, nn.Module):
        raise TypeError(f"{name} must be a torch.nn.Module, got {type(model).__name__}.")
    return unwrap(model)


def _check_slots_match(live: list[Slot], ema: list[Slot]) -> None:
    _check_weights_match({s.key: s.tensor for s in live}, {s.key: s.tensor for s in ema}, what="The model")


def _check_weights_match(given: dict, expected: dict, what: str = "The state") -> None:
    problems = layout_mismatch(given, expected)
    if problems:
        raise ValueError(
            f"{what} does not match the model this EMA was built for ({problems}). "
            "Build a new ModelEMA for a different architecture."
        )


def _check_decay(value) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0.0 <= value < 1.0:
        raise ValueError(
            f"decay must be a number in [0, 1), got {value!r}. Typical values are 0.99 to 0.9999; "
            "decay_from_half_life(steps) gives the decay for a half-life in steps."
        )
    return float(value)


def _check_bool(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r}.")
    return value


def _check_int(name: str, value, *, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}.")
    return int(value)  # numpy integers too


def _check_buffers(value) -> str:
    if value not in ("average", "copy"):
        raise ValueError(f"buffers must be 'average' or 'copy', got {value!r}.")
    return value


def _check_dtype(value) -> torch.dtype | None:
    if isinstance(value, str):  # as stored by state_dict
        value = getattr(torch, value, value)
    if value is not None and not (isinstance(value, torch.dtype) and value.is_floating_point):
        raise TypeError(
            f"dtype must be a floating-point torch.dtype such as torch.float32, or None, got {value!r}."
        )
    return value


def _check_device(value) -> torch.device | None:
    if value is None:
        return None
    try:
        device = torch.device(value)
        torch.empty(0, device=device)  # torch's own words if this machine lacks it (no CUDA, no GPU 3)
    except Exception as error:
        raise ValueError(
            f"device must be a device this machine has, such as 'cpu' or 'cuda', or None to follow the "
            f"model, got {value!r} ({error})."
        ) from None
    if device.type == "meta":
        raise ValueError("device='meta' holds no values to average; give a real device such as 'cpu'.")
    return torch.device("cpu") if device.type == "cpu" else device  # "cpu:0" is where CPU tensors live


_SETTINGS = {
    "decay": _check_decay,
    "warmup": lambda value: _check_bool("warmup", value),
    "update_after_step": lambda value: _check_int("update_after_step", value, minimum=0),
    "update_every": lambda value: _check_int("update_every", value, minimum=1),
    "buffers": _check_buffers,
    "dtype": _check_dtype,
    "skip_non_finite": lambda value: _check_bool("skip_non_finite", value),
}


def _check_settings(settings: dict) -> dict:
    """Every ModelEMA setting, checked; raises on the first bad one, before anything is changed."""
    if not isinstance(settings, dict):  # a state read from a file
        raise ValueError(f"The ModelEMA settings must be a dict, got {type(settings).__name__}.")
    return {name: check(settings[name]) for name, check in _SETTINGS.items()}
