"""Scoring a model on a validation set: the mean loss and each metric, read as ``fit`` reads batches.

It streams: the loss and each metric are computed per batch and averaged over the set (weighted by batch
size), so no output is kept beyond its batch, whatever its size (segmentation masks, token logits). A
metric that is not a mean over rows (AUC, QWK, F1, RMSE) says so with ``whole_set``: only then are the
outputs and targets kept, on the CPU, and it sees all of them at once.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from .. import _batches
from .._tensors import model_device

Metric = Callable[[torch.Tensor, torch.Tensor], float]

# Well-known scores that are not a mean over rows: averaging their per-batch values gives another number.
_NOT_MEANS = (
    "auc", "roc_auc", "pr_auc", "ap", "map", "f1", "f1_macro", "f1_micro", "precision", "recall", "mcc",
    "kappa", "qwk", "r2", "rmse", "rmsle", "spearman", "pearson", "balanced_accuracy",
)  # fmt: skip


def accuracy(outputs: torch.Tensor, targets: torch.Tensor) -> float:
    """Share of rows (or pixels, for outputs shaped ``(N, C, H, W)``) whose highest score is the target class:
    the class index, or for class probabilities (one-hot, mixup, label smoothing) the most likely class.

    A mean over rows, so ``evaluate`` averages it over batches exactly.

    Example:
        >>> accuracy(torch.tensor([[0.1, 0.9], [0.8, 0.2]]), torch.tensor([1, 1]))
        0.5
        >>> accuracy(torch.tensor([[0.1, 0.9], [0.8, 0.2]]), torch.tensor([[0.2, 0.8], [0.3, 0.7]]))
        0.5
    """
    if outputs.ndim < 2 or outputs.shape[1] < 2:
        raise ValueError(
            f"accuracy takes a score per class, outputs of shape (N, C, ...) with C >= 2, got "
            f"{tuple(outputs.shape)}. For one logit per row, score ((outputs > 0) == (targets > 0.5))"
            ".float().mean() instead."
        )
    if targets.shape == outputs.shape:  # one-hot, or class probabilities
        targets = targets.argmax(dim=1)
    return (outputs.argmax(dim=1) == targets).sum().item() / targets.numel()


@dataclass(frozen=True)
class WholeSet:
    """A metric scored on all outputs and targets of the set at once (see ``whole_set``)."""

    metric: Metric

    def __call__(self, outputs: torch.Tensor, targets: torch.Tensor):
        return self.metric(outputs, targets)


def whole_set(metric: Metric) -> WholeSet:
    """Mark ``metric`` as one that needs every output of the set at once, as AUC, QWK, F1 or RMSE do.

    ``evaluate`` (and ``fit``) average other metrics over batches, weighted by batch size, which is exact
    for means over rows (accuracy, MSE, MAE) and keeps nothing in memory. For a metric marked here the
    outputs (as float32) and targets of the whole set are kept on the CPU, and it is called once with all
    of them. It goes with a direction too: ``(whole_set(auc), "max")``.

    Example:
        >>> from sklearn.metrics import roc_auc_score
        >>> auc = whole_set(lambda outputs, targets: roc_auc_score(targets, outputs[:, 1] - outputs[:, 0]))
        >>> model = nn.Linear(4, 2)
        >>> loader = [(torch.randn(8, 4), torch.arange(8) % 2) for _ in range(3)]
        >>> sorted(evaluate(model, loader, metrics={"accuracy": accuracy, "auc": (auc, "max")}))
        ['accuracy', 'auc', 'loss']
    """
    if not callable(metric):
        raise TypeError(f"whole_set takes a function(outputs, targets) -> number, got {metric!r}.")
    return WholeSet(metric)


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

    The loss and each metric are computed per batch, on the model's device with the outputs as float32,
    and averaged over the set weighted by batch size: exact for means over rows, such as the default
    ``{"accuracy": accuracy}`` (with the default loss, cross entropy), MSE or MAE, and nothing is kept
    beyond a batch. A metric marked with ``whole_set`` (AUC, QWK, F1, RMSE) is called once with all outputs
    and targets of the set, kept on the CPU for it. Batches and outputs are read as ``fit`` reads them
    (``target_key``, ``output_key``); they run under autocast on CUDA with ``amp="auto"``. Every
    submodule's train/eval mode is restored afterwards.

    Example:
        >>> from ema_kit.examples.digits import digits_loaders
        >>> from ema_kit.examples.demo import SmallCNN
        >>> _, val_loader = digits_loaders()
        >>> sorted(evaluate(SmallCNN(), val_loader))
        ['accuracy', 'loss']
    """
    if metrics is None:
        metrics = {"accuracy": accuracy} if loss_fn is None else {}
    if not isinstance(metrics, Metrics):  # fit checks them once, not every epoch
        metrics, _ = check_metrics(metrics)
    loss_fn = loss_fn or cross_entropy
    device = model_device(model)
    per_batch = {name: metric for name, metric in metrics.items() if not isinstance(metric, WholeSet)}
    sums = dict.fromkeys(["loss", *per_batch], 0.0)
    rows, kept_outputs, kept_targets = [0], [], []

    def score(inputs, targets) -> None:
        count = _batches.rows(inputs, targets)
        if count == 0:  # adds nothing to a mean; its loss and metrics would be NaN or 0/0
            return
        output = _batches.forward(model, inputs, output_key)
        loss = loss_fn(output, targets)
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            tensor = isinstance(loss, torch.Tensor)
            got = f"a tensor of shape {tuple(loss.shape)}" if tensor else f"a {type(loss).__name__}"
            raise ValueError(
                f"loss_fn returned {got}: evaluate and fit need the batch's mean loss as a one-element "
                "tensor. Use reduction='mean' (the default of torch's losses), or return loss.mean()."
            )
        with torch.autocast(device.type, enabled=False):  # metrics in float32, as after the loop
            output = output.detach().float()
            sums["loss"] += loss.float().item() * count
            for name, metric in per_batch.items():
                sums[name] += metric_value(name, metric(output, targets)) * count
        rows[0] += count
        if len(per_batch) < len(metrics):
            kept_outputs.append(output.cpu())
            kept_targets.append(targets.detach().cpu())

    _batches.each_batch(
        model,
        loader,
        score,
        autocast=resolve_amp(amp, device) or False,
        target_key=target_key,
        caller="evaluate",
    )
    if rows[0] == 0:
        raise ValueError("The validation loader yielded no batches; fit and evaluate need at least one.")
    scores = {name: total / rows[0] for name, total in sums.items()}
    if kept_outputs:
        outputs, targets = torch.cat(kept_outputs), torch.cat(kept_targets)
        scores |= {
            name: metric_value(name, metric(outputs, targets))
            for name, metric in metrics.items()
            if name not in per_batch
        }
    return {name: scores[name] for name in ("loss", *metrics)}


class Metrics(dict):
    """Metric functions by name, as ``check_metrics`` returns them: checked, and warned about."""


def check_metrics(metrics) -> tuple[Metrics, dict[str, str]]:
    """The metric functions, and the directions given beside them (``{"rmsle": (rmsle, "min")}``).

    Warns about a well-known score that is not a mean over rows (``"auc"``, ``"rmse"``, ...) given
    without ``whole_set``: its per-batch average is another number.
    """
    if not isinstance(metrics, Mapping):
        raise TypeError(
            f"metrics must be a dict of name -> function(outputs, targets), got {type(metrics).__name__}."
        )
    functions, directions = Metrics(), {}
    for name, metric in metrics.items():
        if isinstance(metric, tuple) and len(metric) == 2 and metric[1] in ("min", "max"):
            metric, directions[name] = metric
        if not isinstance(name, str) or not name or not callable(metric):
            raise TypeError(
                f"metrics[{name!r}] must map a non-empty name to a function(outputs, targets), or to "
                "(function, 'min') / (function, 'max') saying whether lower or higher is better."
            )
        if name.lower() in _NOT_MEANS and not isinstance(metric, WholeSet):
            warnings.warn(
                f"metrics[{name!r}] is averaged over batches, but {name} is not a mean over rows: its "
                f"batches' average is another number. Score it on the whole set with "
                f"metrics={{{name!r}: whole_set({name})}} (ema_kit.training.evaluate.whole_set).",
                UserWarning,
                stacklevel=3,
            )
        functions[name] = metric
    return functions, directions


def metric_value(name: str, value) -> float:
    """A metric's result as a float: a number, or a tensor or numpy array with one element."""
    if isinstance(value, np.ndarray) and value.size == 1:  # float() takes 0-d arrays only; tensors any
        value = value.item()
    try:
        return float(value)
    except (TypeError, ValueError, RuntimeError):
        raise TypeError(
            f"metric {name!r} returned {type(value).__name__} {value!r:.80}; a metric must return one number "
            "(a float, or a tensor or array with one element)."
        ) from None


def cross_entropy(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The default loss: cross entropy over class indices, or over class probabilities (soft labels: mixup,
    label smoothing). Refuses, with the loss to pass instead, the targets it would silently get wrong.

    Example:
        >>> round(cross_entropy(torch.tensor([[2.0, 0.0]]), torch.tensor([0])).item(), 4)
        0.1269
        >>> cross_entropy(torch.zeros(2, 1), torch.ones(2, 1))
        Traceback (most recent call last):
        ...
        ValueError: The model gives one output per row ...
    """
    if outputs.ndim >= 2 and outputs.shape[1] == 1:
        raise ValueError(
            f"The model gives one output per row (outputs of shape {tuple(outputs.shape)}), and cross "
            "entropy over one class is 0 whatever the targets: the default loss cannot train it. Pass "
            "loss_fn=torch.nn.BCEWithLogitsLoss() for a binary target (float 0/1 targets of the outputs' "
            "shape), or loss_fn=torch.nn.functional.mse_loss for a regression target, with metrics= that "
            "fit the task."
        )
    if targets.is_floating_point() and targets.shape != outputs.shape:
        raise ValueError(
            f"The targets are {targets.dtype} of shape {tuple(targets.shape)}, a regression target, but the "
            "default loss is cross entropy over class indices. Pass loss_fn=torch.nn.functional.mse_loss "
            "(or another regression loss) and metrics= that fit the task; or give integer class labels."
        )
    if targets.is_floating_point():
        classes = 1 if targets.ndim > 1 else 0  # torch's rule: a 1-d input is one row of class scores
        sums = targets.float().sum(dim=classes)
        wrong = ((sums - 1).abs() > 1e-3) | (targets < 0).any(dim=classes)
        if wrong.any():
            raise ValueError(
                f"The targets are float, of the outputs' shape {tuple(targets.shape)}, but not class "
                "probabilities (non-negative, each row summing to 1; one sums to "
                f"{sums[wrong][0].item():.3g}): multi-label targets, which the default cross entropy would "
                "train toward the wrong thing. "
                "Pass loss_fn=torch.nn.BCEWithLogitsLoss() and a multi-label metric, e.g. "
                "metrics={'label_accuracy': lambda outputs, targets: ((outputs > 0) == (targets > 0.5))"
                ".float().mean()}, or an AUC marked whole_set(...). Soft labels (mixup, label smoothing) "
                "are fine: their rows sum to 1."
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
