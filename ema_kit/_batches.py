"""The batch and output contract shared by ``fit``, ``evaluate`` and prediction: what to call the model
with, which part of a batch is the target, and which part of the model's output is the prediction.

A batch is ``(inputs, targets)``, or a dict holding the targets under ``target_key`` (HuggingFace
style: every other entry is an input). ``inputs`` is a tensor (``model(x)``), a tuple or list
(``model(*inputs)``) or a dict (``model(**inputs)``). A model may return a tensor, or a tuple or dict
from which ``output_key`` (an index or a key) picks the prediction that the loss and metrics see.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn


def split(batch, target_key: str | None) -> tuple:
    """``(inputs, targets)`` of one batch.

    Example:
        >>> split({"pixels": 1, "labels": 2}, "labels")
        ({'pixels': 1}, 2)
    """
    if isinstance(batch, Mapping):
        if target_key is None or target_key not in batch:
            example = "labels" if "labels" in batch else list(batch)[-1]
            given = "" if target_key is None else f"target_key={target_key!r} is not one of them; "
            raise ValueError(
                f"A batch is a dict with keys {list(batch)}: {given}say which entry is the target, e.g. "
                f"target_key={example!r} (fit and evaluate take it; the other entries become the model's "
                "keyword inputs)."
            )
        return {k: v for k, v in batch.items() if k != target_key}, batch[target_key]
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        return batch[0], batch[1]
    described = f"a {type(batch).__name__}" + (
        f" of {len(batch)} items" if isinstance(batch, (tuple, list)) else ""
    )
    raise ValueError(
        f"fit expects each batch as (inputs, targets), got {described}. Make the dataset's __getitem__ "
        "return (image, label), a dict with a target_key, or wrap the loader to yield such pairs."
    )


def forward(model: nn.Module, inputs, output_key: int | str | None):
    """The model's prediction for ``inputs``: ``model(x)``, ``model(*inputs)`` or ``model(**inputs)``.

    Example:
        >>> forward(lambda a, b: (a + b, None), (torch.ones(1), torch.ones(1)), 0)
        tensor([2.])
    """
    return pick(call(model, inputs), output_key)


def call(model: nn.Module, inputs):
    """The model's whole output for ``inputs``, spread as ``forward`` spreads them (nothing picked).

    Example:
        >>> call(lambda a, b: (a + b, None), (torch.ones(1), torch.ones(1)))
        (tensor([2.]), None)
    """
    if isinstance(inputs, Mapping):
        return model(**inputs)
    if isinstance(inputs, (tuple, list)):
        return model(*inputs)
    return model(inputs)


def pick(output, output_key: int | str | None):
    """The prediction in a model's ``output``: the tensor itself, or ``output[output_key]``."""
    if output_key is None:
        if isinstance(output, torch.Tensor):
            return output
        if isinstance(output, Mapping):
            raise ValueError(
                f"The model returned a dict with keys {list(output)}: say which entry is the prediction "
                f"for the loss and metrics with output_key={next(iter(output))!r} (or the right key)."
            )
        raise ValueError(
            f"The model returned a {type(output).__name__}, not a tensor: say which part is the prediction "
            "for the loss and metrics with output_key=0 (an index for a tuple, a key for a dict)."
        )
    if isinstance(output, torch.Tensor):  # indexing it would silently take the first row
        raise ValueError(
            f"output_key={output_key!r} was given, but the model returned a tensor: drop output_key."
        )
    try:
        return output[output_key]
    except (KeyError, IndexError, TypeError):
        held = f"keys {list(output)}" if isinstance(output, Mapping) else f"a {type(output).__name__}"
        raise ValueError(f"output_key={output_key!r} is not in the model's output ({held}).") from None


def to_device(value, device: torch.device):
    """``value`` with every tensor in it (nested in tuples, lists and dicts) moved to ``device``."""
    if isinstance(value, torch.Tensor):
        return value.to(device, non_blocking=True)
    if isinstance(value, (tuple, list)):
        return type(value)(to_device(v, device) for v in value)
    if isinstance(value, Mapping):
        return {k: to_device(v, device) for k, v in value.items()}
    return value


def size(targets) -> int:
    """Rows in a batch, counted on its targets."""
    return len(targets) if hasattr(targets, "__len__") else 1
