"""MultiEMA: several EMAs of one model, one per decay, updated together in one fused pass."""

from __future__ import annotations

import operator
from collections.abc import Sequence

import torch
from torch import nn

from ._fused import MultiUpdate
from ._tensors import saved_slots, unwrap
from .ema import ModelEMA

_FORMAT = "ema_kit.MultiEMA/1"


class MultiEMA:
    """One EMA per decay, to answer "which decay?" in a single training run.

    ``emas`` maps each decay to a full ``ModelEMA`` (its ``.module``, ``save``, ``applied_to``,
    ``copy_to`` and ``state_dict`` all work). ``update(model)`` runs each one's schedule (warmup,
    ``update_after_step``, ``update_every``) exactly as ``ModelEMA.update`` would, then blends all K
    shadows in one pass that reads each live tensor once; K shadows cost K shadows' memory, and less
    than K separate updates (``benchmarks/ema_update.py`` measures it).

    Update through the MultiEMA: calling ``emas[d].update(model)`` as well would average twice.

    Args:
        model: the model to average (DDP, DataParallel and ``torch.compile`` wrappers are looked through).
        decays: distinct decays in [0, 1), e.g. ``(0.99, 0.999, 0.9999)``; ``emas`` keeps
            their order. ``decay_from_half_life`` converts half-lives.
        **options: the keyword options of ``ModelEMA`` (``warmup``, ``update_after_step``,
            ``update_every``, ``buffers``, ``dtype``, ``device``, ``skip_non_finite``), shared by all.

    Example:
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 2))
        >>> emas = MultiEMA(model, decays=(0.9, 0.99))
        >>> optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> for _ in range(5):
        ...     loss = model(torch.randn(16, 4)).square().mean()
        ...     optimizer.zero_grad(); loss.backward(); optimizer.step()
        ...     emas.update(model)
        >>> for decay, ema in emas.emas.items():
        ...     prediction = ema.module(torch.randn(3, 4))  # evaluate each EMA
        >>> emas.emas[0.99].num_updates
        5
    """

    def __init__(self, model: nn.Module, decays: Sequence[float] = (0.99, 0.999, 0.9999), **options):
        decays = _check_decays(decays)
        self.emas: dict[float, ModelEMA] = {decay: ModelEMA(model, decay, **options) for decay in decays}
        self._shared = SharedPass(list(self.emas.values()))

    @property
    def decays(self) -> tuple[float, ...]:
        return tuple(self.emas)

    @property
    def half_lives(self) -> tuple[float, ...]:
        """Each EMA's half-life in steps (warmup aside)."""
        return tuple(ema.half_life for ema in self.emas.values())

    def update(self, model: nn.Module) -> None:
        """Fold the model's current weights into every EMA; call it after each optimizer step."""
        self._shared.follow(model)
        finite: list[bool] = []

        def all_finite() -> bool:  # checked at most once per step, however many EMAs ask
            if not finite:
                finite.append(self._shared.plan.all_finite())
            return finite[0]

        self._shared.step([ema._advance(all_finite) for ema in self.emas.values()])

    def state_dict(self) -> dict:
        """Every EMA's ``state_dict``, in order; loads with ``torch.load(..., weights_only=True)``."""
        return {"format": _FORMAT, "emas": [ema.state_dict() for ema in self.emas.values()]}

    def load_state_dict(self, state: dict) -> None:
        """Restore what ``state_dict`` returned, bit-identically. Checks every EMA before changing any."""
        emas = state.get("emas") if isinstance(state, dict) and state.get("format") == _FORMAT else None
        if not isinstance(emas, list) or not all(isinstance(ema_state, dict) for ema_state in emas):
            raise ValueError(
                "Not a MultiEMA state: expected the dict from MultiEMA.state_dict(). A single ModelEMA's "
                "state loads into its own EMA: multi.emas[decay].load_state_dict(state)."
            )
        saved = tuple((ema_state.get("settings") or {}).get("decay") for ema_state in emas)
        if saved != self.decays:
            raise ValueError(
                f"The state holds EMAs for decays {saved}, but this MultiEMA tracks {self.decays}. Build "
                f"MultiEMA(model, decays={saved}) to resume it."
            )
        checked = [ema._check_state(ema_state) for ema, ema_state in zip(self.emas.values(), emas)]
        for ema, (settings, counters, weights) in zip(self.emas.values(), checked):
            ema._restore(settings, counters, weights)

    def __repr__(self) -> str:
        lead = next(iter(self.emas.values()))
        half_lives = ", ".join(f"{h:.0f}" for h in self.half_lives)
        return (
            f"MultiEMA(decays={self.decays}, half_lives=({half_lives}) steps, warmup={lead.warmup}, "
            f"num_updates={lead.num_updates}, module={type(lead.module).__name__})"
        )


class SharedPass:
    """Internal: ModelEMA objects over one live model, blended together by one ``MultiUpdate``.

    ``step(weights)`` takes one entry per EMA: a blend weight, 1.0 to copy the weights, or None to leave
    that EMA as it is. Shared by ``MultiEMA`` and ``PostHocEMA`` (whose profiles change weight each step).
    """

    def __init__(self, emas: list[ModelEMA]):
        self.emas = emas
        self._adopt(emas[0]._model)

    def follow(self, model: nn.Module) -> None:
        """Rebind every EMA to ``model`` when needed (see ``ModelEMA.update``), and the shared pass too.

        One scan of the tensor addresses covers all the EMAs, instead of one scan each.
        """
        if (
            model is self._model
            and all(ema._plan is plan for ema, plan in zip(self.emas, self.plan.plans))
            and self._current_addresses() == self._addresses
        ):
            return
        for ema in self.emas:  # another model object, tensors moved or replaced, or an EMA loaded on its own
            ema._follow(model)
        self._adopt(model)

    def _adopt(self, model: nn.Module) -> None:
        """Build the pass over the EMAs' plans; watch the model's tensors and one per EMA shadow buffer."""
        self.plan = MultiUpdate([ema._plan for ema in self.emas])
        self._model = model
        slots = saved_slots(unwrap(model)) + [
            saved_slots(ema.module)[i] for ema in self.emas for i in ema._plan.first_of_each_buffer
        ]
        self._holders = [slot.holder for slot in slots]
        self._names = [slot.name for slot in slots]
        self._addresses = self._current_addresses()

    def _current_addresses(self) -> list[int]:
        return list(map(torch.Tensor.data_ptr, map(operator.getitem, self._holders, self._names)))

    def step(self, weights: list[float | None]) -> None:
        if all(weight is not None and 0.0 < weight < 1.0 for weight in weights):
            self.plan.lerp_(weights)
        elif all(weight == 1.0 for weight in weights):
            self.plan.copy_()
        else:  # the EMAs' schedules differ this step (an EMA with decay 0, or updated on its own)
            for ema, weight in zip(self.emas, weights):
                if weight == 1.0:
                    ema._plan.copy_()
                elif weight is not None:
                    ema._plan.lerp_(weight)


def _check_decays(decays) -> tuple[float, ...]:
    if isinstance(decays, (int, float, str, bytes)) or not isinstance(decays, Sequence):
        raise TypeError(
            f"decays must be a sequence of decays such as (0.99, 0.999, 0.9999), got {decays!r}. For a "
            "single decay, use ModelEMA(model, decay=...)."
        )
    if not decays:
        raise ValueError("decays is empty: give at least one decay, e.g. decays=(0.99, 0.999, 0.9999).")
    checked = []
    for index, decay in enumerate(decays):
        if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not 0.0 <= decay < 1.0:
            raise ValueError(
                f"decays[{index}] must be a number in [0, 1), got {decay!r}. Typical values are 0.99 to "
                "0.9999; decay_from_half_life(steps) gives the decay for a half-life in steps."
            )
        checked.append(float(decay))
    repeated = sorted({decay for decay in checked if checked.count(decay) > 1})
    if repeated:
        raise ValueError(f"decays {tuple(decays)!r} repeats {repeated}: give each decay once.")
    return tuple(checked)
