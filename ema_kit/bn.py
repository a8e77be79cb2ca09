"""``recompute_bn``: BatchNorm running statistics that belong to the weights they sit in (e.g. the EMA's).

An EMA model's BatchNorm statistics are an average of the live model's statistics, each measured on
features of *other* weights. One pass over training data with the averaged weights measures them afresh,
as ``torch.optim.swa_utils.update_bn`` does for SWA. Whether that helps an EMA is an empirical question:
timm's experience is that it can hurt; ``benchmarks/RESULTS_extras.md`` says what we measure on the demo.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from . import _batches


@torch.no_grad()
def recompute_bn(
    module: nn.Module,
    loader: Iterable,
    *,
    device: str | torch.device | None = None,
    target_key: str | None = None,
) -> int:
    """Reset every BatchNorm's running statistics and measure them over one pass of ``loader``.

    Each BatchNorm layer gets the plain average over all batches (``momentum=None``), in train mode,
    without gradients; afterwards every submodule's train/eval mode and every momentum are as before.
    A model without BatchNorm (with running statistics) is left alone and the loader is not read.
    If the pass fails or the loader is empty, the old statistics are put back before the error.

    Batches are read as ``fit`` reads them (``ema_kit._batches``): ``(inputs, targets)`` pairs, or dicts
    holding the targets under ``target_key``; the targets are not used. Inputs may be a tensor
    (``module(x)``), a tuple or list (``module(*inputs)``), or a dict (``module(**inputs)``); the
    module's output is not read, so it may be a tensor, a tuple or a dict.

    Args:
        module: the model whose statistics to recompute, e.g. ``ema.module`` (changed in place).
        loader: batches of training data; one pass over it. Its augmentations should be the training ones.
        device: where to move the inputs; by default the device of the module's first tensor.
        target_key: for dict batches, the entry holding the targets (as for ``fit``); left out of the inputs.

    Returns:
        The number of batches seen (0 when there was no BatchNorm to refresh).

    Example:
        >>> model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)).eval()
        >>> loader = [(torch.randn(8, 3), torch.zeros(8)) for _ in range(5)]
        >>> recompute_bn(model, loader)
        5
        >>> model.training, model[1].momentum
        (False, 0.1)
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be a torch.nn.Module, got {type(module).__name__}.")
    norms = [m for m in module.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]
    if not norms:
        return 0
    saved_stats = [{name: buffer.clone() for name, buffer in m.named_buffers(recurse=False)} for m in norms]
    momenta = [m.momentum for m in norms]
    try:
        for norm in norms:
            norm.reset_running_stats()
            norm.momentum = None  # a cumulative average over the pass, every batch weighted alike

        def measure(inputs, _) -> None:
            for norm in norms:  # also where the model's own train() keeps BatchNorm frozen (fine-tuning)
                norm.training = True
            _batches.call(module, inputs)

        with _in_float32(norms):
            batches = _batches.each_batch(
                module,
                loader,
                measure,
                train=True,
                device=None if device is None else torch.device(device),
                target_key=target_key,
                caller="recompute_bn",
            )
        if batches == 0:
            raise ValueError("recompute_bn got an empty loader; pass the training loader (one pass is read).")
    except BaseException:
        for norm, stats in zip(norms, saved_stats):
            for name, buffer in norm.named_buffers(recurse=False):
                buffer.copy_(stats[name])
        raise
    finally:
        for norm, momentum in zip(norms, momenta):
            norm.momentum = momentum
    return batches


@contextlib.contextmanager
def _in_float32(norms: list[_BatchNorm]) -> Iterator[None]:
    """BatchNorm layers held in bfloat16 or float16 (a bf16 EMA) measured in float32 and rounded once at
    the end: an average over hundreds of batches kept in bfloat16 drifts, its small steps rounded away. The
    layers keep their tensor objects (an EMA's shadows); BatchNorm takes low-precision inputs beside them."""
    swapped = []  # (holder, name, the layer's own tensor)
    for norm in norms:
        for holder in (norm._parameters, norm._buffers):
            for name, tensor in holder.items():
                if tensor is not None and tensor.dtype in (torch.bfloat16, torch.float16):
                    wide = tensor.detach().float()
                    if isinstance(tensor, nn.Parameter):
                        wide = nn.Parameter(wide, tensor.requires_grad)
                    holder[name] = wide
                    swapped.append((holder, name, tensor))
    try:
        yield
    finally:
        for holder, name, tensor in swapped:
            tensor.copy_(holder[name])  # the statistics rounded once; the weights, unchanged, exactly
            holder[name] = tensor
