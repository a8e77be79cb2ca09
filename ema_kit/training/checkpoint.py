"""Resume checkpoints: everything a training run needs to continue bit-identically, in one safe file.

The file holds only tensors and plain Python values (random-number states included), so it loads with
``torch.load(..., weights_only=True)``: opening a checkpoint never runs code.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import torch

from ..files import atomic_save, load_weights

FORMAT = "ema_kit.training.checkpoint/1"


def rng_state(*generators: torch.Generator | None) -> dict:
    """The state of every random-number generator a training run draws from, as plain values.

    Python's ``random``, NumPy's global generator, torch's CPU and CUDA generators, and any given
    ``torch.Generator`` (a DataLoader's or sampler's own).

    Example:
        >>> state = rng_state()
        >>> first = torch.rand(1)
        >>> set_rng_state(state)
        >>> torch.equal(torch.rand(1), first)
        True
    """
    kind, keys, position, has_gauss, cached = np.random.get_state()
    return {
        "python": _to_lists(random.getstate()),
        "numpy": {
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "position": int(position),
            "has_gauss": int(has_gauss),
            "cached": float(cached),
            "kind": kind,
        },
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "generators": [None if g is None else g.get_state() for g in generators],
    }


def set_rng_state(state: dict, *generators: torch.Generator | None) -> None:
    """Restore what ``rng_state`` returned (pass the same generators, in the same order)."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    numpy = state["numpy"]
    np.random.set_state(
        (
            numpy["kind"],
            numpy["keys"].numpy().astype(np.uint32),
            numpy["position"],
            numpy["has_gauss"],
            numpy["cached"],
        )
    )
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    for generator, saved in zip(generators, state["generators"]):
        if generator is not None and saved is not None:
            generator.set_state(saved)


def save_checkpoint(path: str | os.PathLike, **parts) -> Path:
    """Write a checkpoint atomically: ``parts`` are state dicts and plain values, stored under their names.

    NumPy numbers in them (an optimizer built with ``lr=np.float32(0.01)`` keeps it in its state) are
    stored as the Python numbers they equal, which ``weights_only`` loading accepts.

    Example:
        >>> import tempfile
        >>> model = torch.nn.Linear(2, 1)
        >>> path = save_checkpoint(tempfile.mkdtemp() + "/checkpoint.pt", model=model.state_dict(), epoch=3)
        >>> load_checkpoint(path)["epoch"]
        3
    """
    return atomic_save({"format": FORMAT, **_plain(parts)}, path)


def load_checkpoint(path: str | os.PathLike) -> dict:
    """Read a checkpoint written by ``save_checkpoint``, refusing anything that is not one."""
    checkpoint = load_weights(path)
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != FORMAT:
        raise ValueError(
            f"{path} is not an ema_kit checkpoint (fit writes them as checkpoint.pt in out_dir). "
            "To start from plain weights instead, load them into the model and call fit without resume."
        )
    return checkpoint


def _plain(value):
    """``value`` with every NumPy scalar in its dicts, lists and tuples turned into a Python number."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_plain(item) for item in value)
    return value


def _to_lists(value):
    return [_to_lists(v) for v in value] if isinstance(value, tuple) else value
