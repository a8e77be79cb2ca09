"""The batch and output contract shared by ``fit``, ``evaluate``, prediction and ``recompute_bn``: what to
call the model with, which part of a batch is the target, and which part of the model's output is the
prediction; and ``each_batch``, the one loop that runs a model over a loader without training it.

A batch is ``(inputs, targets)``, or a dict holding the targets under ``target_key`` (HuggingFace
style: every other entry is an input). ``inputs`` is a tensor (``model(x)``), a tuple or list
(``model(*inputs)``) or a dict (``model(**inputs)``). A model may return a tensor, or a tuple or dict
from which ``output_key`` (an index or a key) picks the prediction that the loss and metrics see.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Mapping

import numpy as np
import torch
from torch import nn

from ._tensors import model_device


def each_batch(
    model: nn.Module,
    loader: Iterable,
    step: Callable,
    *,
    train: bool = False,
    autocast: torch.dtype | bool | None = None,
    device: torch.device | None = None,
    target_key: str | None = None,
    targets: bool = True,
    caller: str = "evaluate",
) -> int:
    """Call ``step(inputs, targets)`` for each batch of ``loader``, moved to the model's device, with the
    model in eval mode and without gradients; return the number of batches.

    The one loop of ``evaluate``, ``kaggle.predict`` and ``recompute_bn``: ``step`` calls the model
    (``forward`` or ``call``) and keeps what it needs. Every submodule's train/eval mode is put back
    afterwards, also when ``step`` or the loader raises.

    Args:
        train: run in train mode instead (``recompute_bn``: BatchNorm layers measure their statistics).
        autocast: the dtype to run ``step`` under autocast in, on the device's type; False: autocast off;
            None: as the caller has it.
        device: where the batches go; by default the device of the model's first tensor.
        target_key: for dict batches, the entry holding the targets (see ``split``).
        targets: False for batches that may hold inputs only (prediction): ``step`` gets ``inputs_of``
            the batch and None.
        caller: the function named by the error for a batch of the wrong shape.

    Example:
        >>> model = nn.Linear(3, 2)
        >>> sizes = []
        >>> each_batch(model, [(torch.ones(4, 3), torch.zeros(4))], lambda x, y: sizes.append(len(model(x))))
        1
        >>> sizes, model.training
        ([4], True)
    """
    device = device or model_device(model)
    modes = [(module, module.training) for module in model.modules()]
    batches = 0
    try:
        model.train(train)
        with torch.no_grad():
            for batch in loader:
                if targets:
                    inputs, target = split(batch, target_key, caller)
                else:
                    inputs, target = inputs_of(batch, target_key), None
                inputs, target = to_device(inputs, device), to_device(target, device)
                with _autocast(device, autocast):
                    step(inputs, target)
                batches += 1
    finally:
        for module, training in modes:
            module.training = training
    return batches


def _autocast(device: torch.device, dtype: torch.dtype | bool | None):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not False)


def split(batch, target_key: str | None, caller: str = "fit") -> tuple:
    """``(inputs, targets)`` of one batch; ``caller`` is the function a wrong batch's error names.

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
                f"target_key={example!r} ({caller} takes it; the other entries become the model's "
                "keyword inputs)."
            )
        return {k: v for k, v in batch.items() if k != target_key}, batch[target_key]
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        return batch[0], batch[1]
    described = f"a {type(batch).__name__}" + (
        f" of {len(batch)} items" if isinstance(batch, (tuple, list)) else ""
    )
    raise ValueError(
        f"{caller} expects each batch as (inputs, targets), got {described}. Make the dataset's __getitem__ "
        "return (image, label), a dict with a target_key, or wrap the loader to yield such pairs."
    )


def inputs_of(batch, target_key: str | None):
    """The inputs of a batch that may hold no targets: a dict's entries other than ``target_key``, a tuple's
    or list's first item, or the batch itself.

    Example:
        >>> inputs_of({"pixels": 1, "labels": 2}, "labels"), inputs_of((1, 2, 3), None), inputs_of(1, None)
        ({'pixels': 1}, 1, 1)
    """
    if isinstance(batch, Mapping):
        return {key: value for key, value in batch.items() if key != target_key}
    return batch[0] if isinstance(batch, (tuple, list)) else batch


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
        try:
            return model(**inputs)
        except TypeError as error:
            if "unexpected keyword argument" in str(error):  # e.g. a timm model given image=...
                error.add_note(
                    f"ema_kit: a dict batch's entries other than the target ({list(inputs)}) go to the model "
                    "as keyword arguments, model(**inputs). For a model that takes one tensor, make the "
                    "dataset return (image, label) pairs instead."
                )
            raise
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


def batches_per_epoch(loader) -> int | None:
    """How many batches ``loader`` yields per epoch; None when it has no ``len()`` (an IterableDataset's)."""
    try:
        return len(loader)
    except TypeError:
        return None


def rows(inputs, targets=None) -> int:
    """Rows in a batch of ``inputs`` and ``targets`` (or in one batch given whole as ``inputs``).

    Counted on the targets when they are a tensor (or a dict holding one), else on the inputs (images, token
    ids); else on the targets' (or the whole batch's) fields: the length of its tensors when they agree
    (``(labels, boxes)`` as the default collate makes them, beside a list of file names), and otherwise its
    items: a list of per-image dicts or tensors (detection), or of strings.

    Example:
        >>> rows(torch.zeros(8, 3), (torch.zeros(8), torch.zeros(8, 4)))
        8
        >>> images = [torch.zeros(3, 9, 9), torch.zeros(3, 5, 5)]  # detection: a list per batch
        >>> rows(images, [{"boxes": torch.zeros(1, 4)}, {"boxes": torch.zeros(0, 4)}])
        2
        >>> rows(["a cat", "a dog"]), rows({"id": ["a", "b", "c"], "image": torch.zeros(3, 5)})
        (2, 3)
    """
    for value in (targets, inputs):
        if isinstance(value, Mapping):  # fields by name: the first tensor's
            value = next((v for v in value.values() if _length(v) is not None), None)
        if _length(value) is not None:
            return _length(value)
    value = inputs if targets is None else targets
    if not isinstance(value, (tuple, list)):
        return 1
    lengths = {_length(item) for item in value} - {None}
    return lengths.pop() if len(lengths) == 1 else len(value)


def _length(value) -> int | None:
    """The length of a tensor or numpy array of at least one dimension, else None."""
    if isinstance(value, (torch.Tensor, np.ndarray)) and value.ndim:
        return len(value)
    return None
