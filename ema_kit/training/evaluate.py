"""Scoring a model on a validation set: the mean loss and each metric, read as ``fit`` reads batches."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

import torch
from torch import nn

from .. import _batches
from .._tensors import model_device

Metric = Callable[[torch.Tensor, torch.Tensor], float]


def accuracy(outputs: torch.Tensor, targets: torch.Tensor) -> float:
    """Share of rows whose highest score is the target class.

    Example:
        >>> accuracy(torch.tensor([[0.1, 0.9], [0.8, 0.2]]), torch.tensor([1, 1]))
        0.5
    """
    return (outputs.argmax(dim=1) == targets).float().mean().item()


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: Iterable,
    *,
    loss_fn: Callable | None = None,
    metrics: Mapping | None = None,
    amp: str | bool = "auto",
    target_key: str | None = None,
    output_key: int | str | None = None,
) -> dict[str, float]:
    """Score ``model`` in eval mode on every batch of ``loader``: the mean loss and each metric.

    Metrics see all outputs and targets of the set at once (so AUC-style scores are exact), on the CPU.
    With the default loss (cross entropy) the default metrics are ``{"accuracy": accuracy}``. Batches
    and outputs are read as ``fit`` reads them (``target_key``, ``output_key``). The model's
    train/eval mode is restored afterwards.

    Example:
        >>> from ema_kit.examples.digits import digits_loaders
        >>> from ema_kit.examples.demo import SmallCNN
        >>> _, val_loader = digits_loaders()
        >>> sorted(evaluate(SmallCNN(), val_loader))
        ['accuracy', 'loss']
    """
    if metrics is None:
        metrics = {"accuracy": accuracy} if loss_fn is None else {}
    metrics, _ = check_metrics(metrics)
    loss_fn = loss_fn or cross_entropy
    device = model_device(model)
    amp_dtype = resolve_amp(amp, device)
    was_training = model.training
    model.eval()
    loss_sum, count, outputs, targets = 0.0, 0, [], []
    try:
        for batch in loader:
            inputs, target = _batches.split(batch, target_key)
            inputs, target = _batches.to_device(inputs, device), _batches.to_device(target, device)
            with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
                output = _batches.forward(model, inputs, output_key)
                loss = loss_fn(output, target)
            size = _batches.size(target)
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
        name: metric_value(name, metric(all_outputs, all_targets)) for name, metric in metrics.items()
    }


def check_metrics(metrics) -> tuple[dict[str, Metric], dict[str, str]]:
    """The metric functions, and the directions given beside them (``{"rmsle": (rmsle, "min")}``)."""
    if not isinstance(metrics, Mapping):
        raise TypeError(
            f"metrics must be a dict of name -> function(outputs, targets), got {type(metrics).__name__}."
        )
    functions, directions = {}, {}
    for name, metric in metrics.items():
        if isinstance(metric, tuple) and len(metric) == 2 and metric[1] in ("min", "max"):
            metric, directions[name] = metric
        if not isinstance(name, str) or not name or not callable(metric):
            raise TypeError(
                f"metrics[{name!r}] must map a non-empty name to a function(outputs, targets), or to "
                "(function, 'min') / (function, 'max') saying whether lower or higher is better."
            )
        functions[name] = metric
    return functions, directions


def metric_value(name: str, value) -> float:
    try:
        return float(value)
    except (TypeError, ValueError, RuntimeError):
        raise TypeError(
            f"metric {name!r} returned {type(value).__name__} {value!r:.80}; a metric must return one number "
            "(a float, or a tensor with one element)."
        ) from None


def cross_entropy(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The default loss, with a clear word for a regression target, which cross entropy cannot take."""
    if targets.is_floating_point() and targets.shape != outputs.shape:
        raise ValueError(
            f"The targets are {targets.dtype} of shape {tuple(targets.shape)}, a regression target, but the "
            "default loss is cross entropy over class indices. Pass loss_fn=torch.nn.functional.mse_loss "
            "(or another regression loss) and metrics= that fit the task; or give integer class labels."
        )
    return nn.functional.cross_entropy(outputs, targets)


def resolve_device(device) -> torch.device:
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        resolved = torch.device(device)
        torch.empty(0, device=resolved)  # torch's own words if this machine lacks it (no CUDA, no GPU 3)
    except (RuntimeError, AssertionError, TypeError) as error:
        raise ValueError(
            f"device={device!r} is not available on this machine ({error}); pass device='auto' (CUDA, "
            "then MPS, then the CPU) or device='cpu'."
        ) from None
    return resolved


def resolve_amp(amp, device: torch.device) -> torch.dtype | None:
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
