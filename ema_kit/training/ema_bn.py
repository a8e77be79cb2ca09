"""``RecomputeEMABatchNorm``: each EMA scored with BatchNorm statistics measured for its own weights."""

from __future__ import annotations

import copy

import torch
from torch import nn

from ..bn import recompute_bn
from .callbacks import Callback, FitState
from .checkpoint import loader_generators, rng_state, set_rng_state


class RecomputeEMABatchNorm(Callback):
    """Score each EMA with BatchNorm statistics measured afresh for its weights (``ema_kit.recompute_bn``).

    Before each validation, one pass over the training loader (train mode, no gradients, under fit's
    amp) measures the statistics on a copy of each EMA model; the copy is what is scored and, if best,
    saved as ``model_ema.pth``. The EMA itself goes on averaging its own statistics (measured in place,
    they would be averaged into it), and training is the same as without this callback: the random
    states the extra pass draws from (its shuffle, dropout) are put back.

    Example:
        >>> refresh = RecomputeEMABatchNorm()  # fit(..., callbacks=[refresh])
    """

    def on_fit_start(self, state: FitState) -> None:
        if not state.emas:
            raise ValueError("RecomputeEMABatchNorm recomputes the EMA's BatchNorm statistics, but ema=None.")
        if any(ema.sharded for ema in state.emas.values()):
            raise ValueError(
                "RecomputeEMABatchNorm measures statistics on a copy of each EMA model, which a sharded "
                "(FSDP2) EMA does not have; drop the callback."
            )
        if not any(
            isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats
            for m in state.model.modules()
        ):
            raise ValueError(
                "RecomputeEMABatchNorm: the model has no BatchNorm layer with running statistics to "
                "recompute; drop the callback."
            )

    def on_validation_start(self, state: FitState) -> None:
        generators = loader_generators(state.train_loader)
        drawn = rng_state(*generators)
        dtype = state.amp or torch.float32
        with torch.autocast(state.device.type, dtype=dtype, enabled=state.amp is not None):
            for name, module in state.scored.items():
                state.scored[name] = copy.deepcopy(module)
                recompute_bn(state.scored[name], state.train_loader, target_key=state.target_key)
        set_rng_state(drawn, *generators)
