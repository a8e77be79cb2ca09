"""MultiEMA: several EMAs of one model, one per decay, updated together in one pass."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from types import MappingProxyType

import torch  # noqa: F401  (the doctest uses it)
from torch import nn

from . import _checks
from .ema import ModelEMA, Schedule, check_settings, checked_load, member, new_shadows

_FORMAT = "ema_kit.MultiEMA/1"


class MultiEMA:
    """One EMA per decay, to answer "which decay?" in a single training run.

    ``emas`` maps each decay to a full ``ModelEMA`` (its ``.module``, ``save``, ``applied_to``,
    ``copy_to`` and ``state_dict`` all work). ``update(model)`` runs each one's schedule (warmup,
    ``update_after_step``, ``update_every``) exactly as ``ModelEMA.update`` would, then blends all K
    shadows in one pass that reads each live tensor once; K shadows cost K shadows' memory, and less
    than K separate updates (``benchmarks/ema_update.py`` measures it). ``dtype="bfloat16-stochastic"``
    works as for ``ModelEMA``: the K shadows draw their rounding noise from one generator. Of a model
    sharded by FSDP2, each rank keeps K sets of its own shards, as ``ModelEMA`` keeps one.

    Update through the MultiEMA: calling ``emas[d].update(model)`` as well would average twice.

    Args:
        model: the model to average (DDP, DataParallel and ``torch.compile`` wrappers are looked through).
        decays: distinct decays in [0, 1), e.g. ``(0.99, 0.999, 0.9999)``; ``emas`` keeps
            their order. ``decay_from_half_life`` converts half-lives.
        **options: the keyword options of ``ModelEMA`` (``warmup``, ``update_after_step``,
            ``update_every``, ``buffers``, ``dtype``, ``device``, ``skip_non_finite``), shared by all.

    ``decays`` may be a list, a tuple or a 1-d numpy array; numpy numbers count as the decimals they print
    as (``np.float32(0.99)`` is ``0.99``, the key in ``emas``).

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
        unknown = sorted(set(options) - set(_OPTIONS))
        if unknown:
            raise TypeError(f"MultiEMA got unknown options {unknown}; it takes ModelEMA's: {list(_OPTIONS)}.")
        options = _OPTIONS | options
        settings = check_settings({"decay": decays[0]} | options)
        self._shadows = new_shadows(model, len(decays), settings, options["device"])
        self._schedules = [Schedule(settings | {"decay": decay}) for decay in decays]
        self._emas = {
            decay: member(self._shadows, index, schedule)
            for index, (decay, schedule) in enumerate(zip(decays, self._schedules))
        }

    @property
    def emas(self) -> Mapping[float, ModelEMA]:
        """decay -> its ``ModelEMA``, in the order given (read-only)."""
        return MappingProxyType(self._emas)

    @property
    def decays(self) -> tuple[float, ...]:
        return tuple(self._emas)

    @property
    def half_lives(self) -> tuple[float, ...]:
        """Each EMA's half-life in steps (warmup aside)."""
        return tuple(ema.half_life for ema in self._emas.values())

    def update(self, model: nn.Module) -> None:
        """Fold the model's current weights into every EMA; call it after each optimizer step."""
        self._shadows.follow(model)
        finite: list[bool] = []

        def all_finite() -> bool:  # checked at most once per step, however many EMAs ask
            if not finite:
                finite.append(self._shadows.all_finite())
            return finite[0]

        weights = []
        for schedule in self._schedules:  # not a comprehension, a frame of its own before Python 3.12: a
            weights.append(schedule.advance(all_finite))  # skip's warning names the line that called update
        self._shadows.blend(weights)

    def state_dict(self) -> dict:
        """Every EMA's ``state_dict``, in order; loads with ``torch.load(..., weights_only=True)``."""
        return {"format": _FORMAT, "emas": [ema.state_dict() for ema in self._emas.values()]}

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
        loads = [checked_load(ema, ema_state) for ema, ema_state in zip(self._emas.values(), emas)]
        for load in loads:
            load()

    def __repr__(self) -> str:
        lead = next(iter(self._emas.values()))
        half_lives = ", ".join(f"{h:.0f}" for h in self.half_lives)
        return (
            f"MultiEMA(decays={self.decays}, half_lives=({half_lives}) steps, warmup={lead.warmup}, "
            f"num_updates={lead.num_updates}, module={self._shadows.name})"
        )


_OPTIONS = ModelEMA.__init__.__kwdefaults__  # ModelEMA's keyword options and their defaults


def _check_decays(decays) -> tuple[float, ...]:
    try:
        decays = _checks.check_sequence("decays", decays, "(0.99, 0.999, 0.9999)")
    except TypeError:
        raise TypeError(
            f"decays must be a sequence of decays such as (0.99, 0.999, 0.9999), got {decays!r}. For a "
            "single decay, use ModelEMA(model, decay=...)."
        ) from None
    checked = tuple(_checks.check_decay(f"decays[{i}]", decay) for i, decay in enumerate(decays))
    return _checks.check_distinct("decays", checked)
