"""Writing files so that a kill mid-write never breaks them, and loading weights without running code."""

from __future__ import annotations

import os
import pickle
import tempfile
from pathlib import Path
from typing import Any

import torch


def atomic_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save(obj, path)`` through a temporary file and a rename.

    A process killed mid-save leaves the previous file (or none) at ``path``, never a truncated one.

    Example:
        >>> import tempfile, torch
        >>> path = atomic_save({"w": torch.ones(2)}, tempfile.mkdtemp() + "/w.pth")
        >>> torch.load(path, weights_only=True)["w"]
        tensor([1., 1.])
    """
    return _atomic_write(path, lambda f: torch.save(obj, f))


def atomic_write_text(text: str, path: str | os.PathLike) -> Path:
    """Write ``text`` to ``path`` through a temporary file and a rename (see ``atomic_save``)."""
    return _atomic_write(path, lambda f: f.write(text.encode()))


def _atomic_write(path, write) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load_weights(path: str | os.PathLike) -> Any:
    """``torch.load(path, weights_only=True)`` onto the CPU, with errors that name the file.

    Only tensors and plain Python containers load; a file that carries pickled code is refused.

    Example:
        >>> import tempfile, torch
        >>> path = atomic_save({"w": torch.zeros(1)}, tempfile.mkdtemp() + "/w.pth")
        >>> load_weights(path)
        {'w': tensor([0.])}
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"No weights file at {path}.")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise ValueError(
            f"{path} holds more than tensors (pickled Python objects that could run code), so ema_kit "
            f"refuses to load it. Load only files you trust; re-save plain weights with "
            f"torch.save(model.state_dict(), path). Details: {error}"
        ) from None
    except (RuntimeError, EOFError, OSError) as error:
        raise ValueError(
            f"{path} is not a readable PyTorch file (truncated or corrupted?): {error}"
        ) from None
