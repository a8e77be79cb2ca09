"""Where a model keeps its tensors: unwrapping wrappers, and the slots that hold each saved tensor."""

from __future__ import annotations

import sys
from collections.abc import Mapping
from typing import NamedTuple

import torch
from torch import nn


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module inside DDP, DataParallel and ``torch.compile`` wrappers (any nesting).

    The EMA and the weights it exports use the plain module's keys, so a state dict saved from a
    wrapped model loads into an unwrapped one: no ``module.`` or ``_orig_mod.`` prefixes.
    """
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif _is_compiled(model):
            model = model._orig_mod
        else:
            return model


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (or buffer); the CPU for a model without tensors.

    Example:
        >>> model_device(nn.Linear(2, 1))
        device(type='cpu')
    """
    tensor = next(iter(model.parameters()), None)
    if tensor is None:
        tensor = next(iter(model.buffers()), None)
    return torch.device("cpu") if tensor is None else tensor.device


def _is_compiled(model: nn.Module) -> bool:
    # No compiled module can exist before dynamo is imported, so don't import it here (it is slow).
    eval_frame = sys.modules.get("torch._dynamo.eval_frame")
    return eval_frame is not None and isinstance(model, eval_frame.OptimizedModule)


class Slot(NamedTuple):
    """One saved tensor of a module: its state-dict key, and the dict entry that holds it."""

    key: str
    holder: dict  # the owning module's ``_parameters`` or ``_buffers``
    name: str

    @property
    def tensor(self) -> torch.Tensor:
        return self.holder[self.name]


def saved_entries(module: nn.Module) -> list[tuple[dict, str]]:
    """(holder dict, name) of each parameter and persistent buffer of ``module`` itself, ``None`` ones too."""
    return [
        (holder, name)
        for holder, skip in ((module._parameters, ()), (module._buffers, module._non_persistent_buffers_set))
        for name in holder
        if name not in skip
    ]


def saved_slots(module: nn.Module) -> list[Slot]:
    """Every parameter and persistent buffer of ``module``, in state-dict order, each tensor once.

    A tensor shared by two modules (tied weights) is listed once, under its first key, so that it
    is averaged once per step rather than twice.
    """
    slots, seen = [], set()
    for prefix, mod in module.named_modules():
        dot = prefix + "." if prefix else ""
        for holder, name in saved_entries(mod):
            tensor = holder[name]
            if tensor is None or id(tensor) in seen:
                continue
            if isinstance(tensor, nn.parameter.UninitializedTensorMixin):
                raise ValueError(
                    f"{dot}{name} is not initialized yet (a lazy module): run one forward pass "
                    "through the model before building the EMA."
                )
            seen.add(id(tensor))
            slots.append(Slot(dot + name, holder, name))
    return slots


def layout_mismatch(given: dict, expected: dict) -> str | None:
    """What keeps state dict ``given`` from loading into a model whose state dict is ``expected``, or None.

    Names the first few missing, unexpected and mis-shaped keys, for an error message.

    Example:
        >>> layout_mismatch({"w": torch.zeros(2)}, {"w": torch.zeros(3), "b": torch.zeros(1)})
        "missing ['b']; shape mismatch ['w: (2,) vs (3,)']"
    """
    missing = [key for key in expected if key not in given]
    unexpected = [key for key in given if key not in expected]
    shapes = [
        f"{key}: {_shape(given[key])} vs {_shape(expected[key])}"
        for key in expected
        if key in given and _shape(given[key]) != _shape(expected[key])
    ]
    problems = [
        f"{label} {items[:3]}{' ...' if len(items) > 3 else ''}"
        for label, items in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", shapes))
        if items
    ]
    return "; ".join(problems) or None


def check_layout(given, expected: Mapping, mismatch: str, fix: str = "") -> None:
    """Raise ValueError ``"{mismatch} ({problems}). {fix}"`` when state dict ``given`` cannot load into a
    model whose state dict is ``expected`` (``given`` not being a dict at all is such a problem).

    The one wording of "this state is for another model": ``mismatch`` names what differs from what,
    ``fix`` what to do about it.

    Example:
        >>> check_layout({"w": torch.zeros(2)}, {"w": torch.zeros(3)}, "The file is for another model")
        Traceback (most recent call last):
        ...
        ValueError: The file is for another model (shape mismatch ['w: (2,) vs (3,)']).
    """
    if isinstance(given, Mapping):
        if list(given) == list(expected) and list(map(_shape, given.values())) == list(
            map(_shape, expected.values())
        ):  # the usual case, checked without building the names of the problems
            return
        problems = layout_mismatch(given, expected)
    else:
        problems = f"it holds a {type(given).__name__}, not a state dict"
    if problems:
        raise ValueError(f"{mismatch} ({problems}). {fix}".rstrip())


def cpu_state(weights: Mapping) -> dict:
    """A state dict with every tensor detached and on the CPU, for writing to a file or keeping aside.

    Modules' extra state (``get_extra_state``, any object) is kept as it is. A CPU tensor is not copied.

    Example:
        >>> cpu_state(nn.Linear(2, 1).state_dict())["weight"].device
        device(type='cpu')
    """
    return {k: v.detach().cpu() if isinstance(v, torch.Tensor) else v for k, v in weights.items()}


def _shape(value) -> tuple | str:
    # Extra state (``get_extra_state``) may be any object: it matches any other non-tensor.
    return tuple(value.shape) if isinstance(value, torch.Tensor) else "not a tensor"
