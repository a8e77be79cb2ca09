"""Writing files so that a kill mid-write never breaks them, and loading weights without running code."""

from __future__ import annotations

import glob
import os
import pickle
import tempfile
import time
import zipfile
import zlib
from pathlib import Path
from typing import Any

import torch

from ._tensors import cpu_state

# A temporary file untouched for this long was left by a writer that was killed mid-write (SIGKILL, out
# of memory, power loss); the next write to the same path deletes it. A live writer keeps touching its own.
STALE_TEMP_S = 3600


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


def atomic_write_bytes(data: bytes, path: str | os.PathLike) -> Path:
    """Write ``data`` to ``path`` through a temporary file and a rename (see ``atomic_save``)."""
    return _atomic_write(path, lambda f: f.write(data))


def _atomic_write(path, write) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp's 0600 would hide the file from other users
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _remove_stale_temps(path)
    return path


def _remove_stale_temps(path: Path) -> None:
    # Hidden files the user never sees, each up to a whole checkpoint: left alone, every kill mid-write
    # on a reused folder would keep one for good.
    for tmp in path.parent.glob(glob.escape(f".{path.name}.") + "*.tmp"):
        try:
            if time.time() - tmp.stat().st_mtime > STALE_TEMP_S:
                tmp.unlink()
        except FileNotFoundError:  # another writer cleaned it first
            pass


def save_weights(weights: dict[str, torch.Tensor], path: str | os.PathLike) -> Path:
    """Write a state dict to ``path`` atomically, on the CPU: safetensors if the name ends with
    ``.safetensors``, else ``torch.save``. ``load_weights`` reads both back.

    A ``.safetensors`` file holds one contiguous copy per key (safetensors refuses tensors that share
    memory, as tied weights do), so ``model.load_state_dict(safetensors.torch.load_file(path))`` loads
    it strict, and so does any framework that reads safetensors. The format has no checksums, so a
    CRC-32 of the tensors goes in its metadata, for ``load_weights`` to check. It needs
    ``pip install safetensors``.

    Example:
        >>> import tempfile, torch
        >>> path = save_weights({"w": torch.ones(2)}, tempfile.mkdtemp() + "/w.safetensors")
        >>> load_weights(path)
        {'w': tensor([1., 1.])}
    """
    not_tensors = [key for key, value in weights.items() if not isinstance(value, torch.Tensor)]
    if not_tensors:
        raise TypeError(
            f"save_weights writes a state dict (names to tensors), but {not_tensors[:3]} hold "
            f"{type(weights[not_tensors[0]]).__name__}; use atomic_save for other objects."
        )
    if not is_safetensors(path):
        return atomic_save(cpu_state(weights), path)
    safetensors_torch = _import_safetensors(path)
    copies = {
        key: value.detach().to("cpu", memory_format=torch.contiguous_format, copy=True)
        for key, value in weights.items()
    }
    data = safetensors_torch.save(copies, metadata={"format": "pt", _CRC_KEY: _crc32(copies)})
    return _atomic_write(path, lambda f: f.write(data))


_CRC_KEY = "ema_kit.crc32"


def is_safetensors(path: str | os.PathLike) -> bool:
    """Whether ``path`` names a safetensors file: its name ends with ``.safetensors``, in any case."""
    return Path(path).suffix.lower() == ".safetensors"


def _crc32(tensors: dict[str, torch.Tensor]) -> str:
    """A CRC-32 of the names, dtypes, shapes and bytes of contiguous CPU tensors."""
    crc = 0
    for key in sorted(tensors):
        tensor = tensors[key]
        crc = zlib.crc32(f"{key}:{tensor.dtype}:{tuple(tensor.shape)}".encode(), crc)
        crc = zlib.crc32(tensor.reshape(-1).view(torch.uint8).numpy(), crc)
    return f"{crc:08x}"


def _import_safetensors(path):
    try:
        import safetensors.torch
    except ImportError:
        raise ImportError(
            f"{Path(path).name}: .safetensors files need the safetensors package: pip install safetensors "
            "(or pip install ema_kit[safetensors]). Any other file name is written with torch.save."
        ) from None
    return safetensors.torch


def load_weights(path: str | os.PathLike) -> Any:
    """``torch.load(path, weights_only=True)`` onto the CPU, with errors that name the file.

    Only tensors and plain Python containers load; a file that carries pickled code is refused. The
    CRC-32 checksums that ``torch.save`` writes are checked first (``torch.load`` skips them), so a file
    with flipped bits is an error rather than wrong weights; this reads the file twice. A name ending in
    ``.safetensors`` is read with safetensors (a format that holds no code, and no checksums).

    Example:
        >>> import tempfile, torch
        >>> path = atomic_save({"w": torch.zeros(1)}, tempfile.mkdtemp() + "/w.pth")
        >>> load_weights(path)
        {'w': tensor([0.])}
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"No weights file at {path}.")
    if is_safetensors(path):
        safetensors_torch = _import_safetensors(path)
        try:
            with safetensors_torch.safe_open(path, framework="pt", device="cpu") as f:
                metadata = f.metadata() or {}
                crc = metadata.get(_CRC_KEY)
                weights = {key: f.get_tensor(key) for key in f.keys()}
        except Exception as error:
            raise ValueError(
                f"{path} is not a readable safetensors file (truncated or corrupted?): {error}"
            ) from error
        # A flipped bit in the key's own name would otherwise pass the file off as one without a checksum.
        damaged_key = crc is None and any(
            len(key) == len(_CRC_KEY) and sum(x != y for x, y in zip(key, _CRC_KEY)) == 1 for key in metadata
        )
        if damaged_key or (crc is not None and crc != _crc32(weights)):  # others' files carry no checksum
            raise ValueError(f"{path} is corrupted: its tensors no longer match the CRC-32 saved with them.")
        return weights
    try:
        _check_checksums(path)
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise ValueError(
            f"{path} holds more than tensors (pickled Python objects that could run code), so ema_kit "
            f"refuses to load it. Load only files you trust; re-save plain weights with "
            f"torch.save(model.state_dict(), path). Details: {error}"
        ) from None
    except MemoryError:
        raise
    except Exception as error:  # whatever a damaged file makes zipfile or torch trip over
        raise ValueError(
            f"{path} is not a readable PyTorch file (truncated or corrupted?): {error}"
        ) from error


def _check_checksums(path: Path) -> None:
    if not zipfile.is_zipfile(path):
        return  # torch.load says why; the legacy (pre-1.6) format has no checksums
    with zipfile.ZipFile(path) as archive:
        for record in archive.infolist():
            if record.CRC == 0:  # not computed: torch.serialization.set_crc32_options(False)
                continue
            with archive.open(record) as f:
                while f.read(1 << 24):  # zipfile compares the CRC-32 at the end of the record
                    pass


def _umask() -> int:
    mask = os.umask(0)  # the only way to read it is to set it
    os.umask(mask)
    return mask
