"""What the notebooks share: where data and outputs live, the two common Kaggle data layouts as datasets,
flip-TTA prediction, and a submission checked against the sample submission before it is written.

On Kaggle, competition and dataset files are mounted under ``/kaggle/input/<name>/`` and a kernel writes
its output to ``/kaggle/working/``; elsewhere the same code reads ``data/<name>/`` and writes
``runs/<notebook>/`` under the current folder. ``EMA_KIT_SMOKE=1`` asks a notebook for smoke sizes (the
tests set it); ``EMA_KIT_KAGGLE_ROOT`` points at another folder laid out like ``/kaggle`` (the tests use it
to run a notebook through the Kaggle paths).
"""

from __future__ import annotations

import math
import os
import shutil
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import Dataset

from .files import atomic_write_text
from .train import _model_device, _resolve_amp

SMOKE_VARIABLE = "EMA_KIT_SMOKE"
ROOT_VARIABLE = "EMA_KIT_KAGGLE_ROOT"


def smoke() -> bool:
    """True when ``EMA_KIT_SMOKE`` is set (to anything but ``""`` or ``"0"``): run at smoke sizes.

    A notebook uses it only to shrink sizes (epochs, rows), never to skip a cell, so a test runs the code
    a user runs.

    Example:
        >>> os.environ[SMOKE_VARIABLE] = "1"
        >>> smoke()
        True
        >>> del os.environ[SMOKE_VARIABLE]
    """
    return os.environ.get(SMOKE_VARIABLE, "").strip() not in ("", "0")


def kaggle_root() -> Path:
    """``/kaggle``, or the folder ``EMA_KIT_KAGGLE_ROOT`` names.

    Example:
        >>> kaggle_root() == Path(os.environ.get(ROOT_VARIABLE) or "/kaggle")
        True
    """
    return Path(os.environ.get(ROOT_VARIABLE) or "/kaggle")


def input_dir(
    name: str, *, make: Callable[[Path], object] | None = None, local: str | os.PathLike = "data"
) -> Path:
    """The folder holding input ``name``: ``/kaggle/input/<name>`` when it exists, else ``<local>/<name>``.

    With ``make``, a missing or empty local folder is first filled by ``make(folder)`` (e.g.
    ``ema_kit.data.write_digit_recognizer``); it writes into a temporary folder that is renamed when
    complete, so an interrupted run never leaves half the files.

    Example:
        >>> import tempfile
        >>> from ema_kit.data import write_digit_recognizer
        >>> folder = input_dir("digit-recognizer", make=write_digit_recognizer, local=tempfile.mkdtemp())
        >>> sorted(p.name for p in folder.iterdir())
        ['sample_submission.csv', 'test.csv', 'train.csv']
    """
    on_kaggle = kaggle_root() / "input" / name
    if on_kaggle.is_dir():
        return on_kaggle
    folder = Path(local) / name
    if make is not None and not (folder.is_dir() and any(folder.iterdir())):
        partial = folder.with_name(f".{folder.name}.partial")
        if partial.exists():  # left by an interrupted run
            shutil.rmtree(partial)
        make(partial)
        if folder.exists():
            folder.rmdir()  # empty, checked above
        partial.rename(folder)
    if not folder.is_dir():
        raise FileNotFoundError(
            f"Input {name!r} is neither at {on_kaggle} (attach it to the Kaggle notebook) nor at {folder} "
            f"(put the files there, or pass make= to write them)."
        )
    return folder


def working_dir(name: str, *, local: str | os.PathLike = "runs") -> Path:
    """Where a notebook writes its outputs: ``/kaggle/working`` on Kaggle, else ``<local>/<name>``; created.

    Example:
        >>> import tempfile
        >>> local = Path(tempfile.mkdtemp())
        >>> working_dir("01_quickstart", local=local) == (kaggle_root() / "working" if kaggle_root().exists()
        ...                                               else local / "01_quickstart")
        True
    """
    on_kaggle = kaggle_root() / "working"
    folder = on_kaggle if on_kaggle.is_dir() else Path(local) / name
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def find_file(
    filename: str, *, inputs: Iterable[str] = (), local: Iterable[str | os.PathLike] = ()
) -> Path:
    """The first ``filename`` in ``/kaggle/input/<each of inputs>``, ``/kaggle/working``, then ``local``.

    For weights trained in another notebook: on Kaggle its output is attached as an input; here it is in
    that notebook's ``runs/`` folder. The error lists every place searched and how to fill one.

    Example:
        >>> import tempfile
        >>> folder = Path(tempfile.mkdtemp())
        >>> _ = (folder / "model_ema.pth").write_bytes(b"")
        >>> find_file("model_ema.pth", inputs=["no-such-dataset"], local=[folder]) == folder / "model_ema.pth"
        True
    """
    root = kaggle_root()
    folders = [root / "input" / name for name in inputs] + [root / "working"] + [Path(p) for p in local]
    for folder in folders:
        if (folder / filename).is_file():
            return folder / filename
    searched = "\n  ".join(str(folder / filename) for folder in folders)
    raise FileNotFoundError(
        f"{filename} was not found; searched:\n  {searched}\nRun the notebook that trains it first (locally "
        f"it writes its runs/ folder), or attach its output or a dataset holding {filename} on Kaggle."
    )


class PixelCSVDataset(Dataset):
    """Images stored one per row as ``pixel0..pixelN`` columns (0..255), Kaggle's Digit Recognizer layout.

    Items are ``(image, label)`` with ``image`` a float tensor ``(1, side, side)`` in [0, 1], or the image
    alone when ``label=None`` (the test set). ``transform`` (e.g. ``RandomAffine()``) maps each image.

    Example:
        >>> frame = pd.DataFrame([[7] + [255] * 4], columns=["label", "pixel0", "pixel1", "pixel2", "pixel3"])
        >>> image, label = PixelCSVDataset(frame)[0]
        >>> tuple(image.shape), image.max().item(), label.item()
        ((1, 2, 2), 1.0, 7)
    """

    def __init__(
        self, frame: pd.DataFrame, *, label: str | None = "label", transform: Callable | None = None
    ):
        _check_frame(frame)
        if label is not None and label not in frame.columns:
            raise ValueError(
                f"label={label!r} is not a column of the frame (columns start {list(frame.columns[:3])}); "
                "for a test set without labels pass label=None."
            )
        pixels = [c for c in frame.columns if str(c).startswith("pixel")]
        side = math.isqrt(len(pixels))
        if not pixels or side * side != len(pixels):
            raise ValueError(
                f"The frame has {len(pixels)} pixel<i> columns; a square image needs a square number of them "
                "(784 for 28x28)."
            )
        values = torch.from_numpy(frame[pixels].to_numpy(dtype="uint8", copy=True))
        self.images = values.reshape(len(frame), 1, side, side)  # uint8: a quarter of the memory of floats
        self.labels = None if label is None else torch.tensor(frame[label].to_numpy(dtype="int64"))
        self.transform = transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int):
        image = self.images[index].float() / 255.0
        if self.transform is not None:
            image = self.transform(image)
        return image if self.labels is None else (image, self.labels[index])


class ImageFolderDataset(Dataset):
    """Image files on disk named by a CSV's id column (``folder/<id><suffix>``), read with PIL.

    Items are ``(image, label)`` with ``image`` a float tensor ``(channels, height, width)`` in [0, 1]
    (``mode`` "RGB" gives 3 channels, "L" one), or the image alone when ``label=None``. Files are read
    when an item is asked for, so the set need not fit in memory.

    Example:
        >>> import tempfile
        >>> from ema_kit.data import write_image_folder
        >>> folder = write_image_folder(tempfile.mkdtemp(), size=16)
        >>> dataset = ImageFolderDataset(pd.read_csv(folder / "train.csv"), folder / "train")
        >>> image, label = dataset[0]
        >>> tuple(image.shape), label.dtype
        ((3, 16, 16), torch.int64)
    """

    def __init__(
        self,
        frame: pd.DataFrame,
        folder: str | os.PathLike,
        *,
        id_column: str = "id",
        label: str | None = "label",
        suffix: str = ".png",  # appended to each id to name its file; "" when ids already carry one
        mode: str = "RGB",  # PIL mode every image is converted to
        transform: Callable | None = None,
    ):
        _check_frame(frame)
        for argument, column in (("id_column", id_column), ("label", label)):
            if column is not None and column not in frame.columns:
                raise ValueError(
                    f"{argument}={column!r} is not a column of the frame {list(frame.columns)}"
                    + ("; for a test set without labels pass label=None." if argument == "label" else ".")
                )
        self.folder = Path(folder)
        self.paths = [self.folder / f"{image_id}{suffix}" for image_id in frame[id_column]]
        missing = [p for p in self.paths[:1000] if not p.is_file()]  # a cheap check of the naming scheme
        if missing:
            raise FileNotFoundError(
                f"{len(missing)} of the first {min(len(self.paths), 1000)} images are missing, e.g. "
                f"{missing[0]}; check folder and suffix={suffix!r}."
            )
        self.labels = None if label is None else torch.tensor(frame[label].to_numpy(dtype="int64"))
        self.mode, self.transform = mode, transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        from PIL import Image  # imported here: only this layout needs Pillow

        with Image.open(self.paths[index]) as file:
            array = torch.from_numpy(np.array(file.convert(self.mode), dtype=np.uint8))
        image = (array.unsqueeze(0) if array.ndim == 2 else array.permute(2, 0, 1)).float() / 255.0
        if self.transform is not None:
            image = self.transform(image)
        return image if self.labels is None else (image, self.labels[index])


class RandomAffine:
    """Augmentation for one image tensor ``(C, H, W)``: a random rotation, shift and zoom, in plain torch.

    Draws from torch's global generator, so ``torch.manual_seed`` makes a run repeatable. Areas shifted
    in are zero (black), as the background of the digits.

    Example:
        >>> image = torch.zeros(1, 28, 28)
        >>> RandomAffine(degrees=10, translate=0.1, scale=0.1)(image).shape
        torch.Size([1, 28, 28])
    """

    def __init__(self, degrees: float = 10.0, translate: float = 0.1, scale: float = 0.1):
        limits = [("degrees", degrees, 180), ("translate", translate, 1), ("scale", scale, 1)]
        for name, value, limit in limits:
            if not 0 <= value < limit:
                raise ValueError(f"{name} must be in [0, {limit}), got {value!r}.")
        self.degrees, self.translate, self.scale = degrees, translate, scale

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        def uniform(limit: float) -> float:
            return (torch.rand(()).item() * 2 - 1) * limit

        angle = math.radians(uniform(self.degrees))
        zoom = 1 + uniform(self.scale)
        # affine_grid maps output to input coordinates in [-1, 1], so a shift of t image widths is 2t.
        shift_x, shift_y = 2 * uniform(self.translate), 2 * uniform(self.translate)
        cos, sin = math.cos(angle) / zoom, math.sin(angle) / zoom
        theta = torch.tensor([[[cos, -sin, shift_x], [sin, cos, shift_y]]], dtype=image.dtype)
        grid = F.affine_grid(theta, [1, *image.shape], align_corners=False)
        return F.grid_sample(image[None], grid, align_corners=False)[0]


@torch.no_grad()
def predict(
    model: nn.Module, loader: Iterable, *, tta: bool = False, amp: str | bool = "auto"
) -> torch.Tensor:
    """Class probabilities (softmax) of ``model`` for every item of ``loader``, in order, on the CPU.

    Batches are images or ``(images, ...)``; they go to the model's device, under autocast on CUDA with
    ``amp="auto"``. ``tta=True`` averages the probabilities of each image and its mirror image (flipped left
    to right): it helps where a mirrored picture shows the same class (photos), not for digits or text.
    The model's train/eval mode is restored afterwards.

    Example:
        >>> model = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
        >>> probabilities = predict(model, [torch.zeros(5, 1, 2, 2)], tta=True)
        >>> tuple(probabilities.shape), torch.allclose(probabilities.sum(1), torch.ones(5))
        ((5, 3), True)
    """
    device = _model_device(model)
    amp_dtype = _resolve_amp(amp, device)
    was_training = model.training
    model.eval()
    outputs = []
    try:
        for batch in loader:
            images = batch[0] if isinstance(batch, (tuple, list)) else batch
            images = images.to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
                probabilities = model(images).float().softmax(dim=1)
                if tta:
                    mirrored = model(images.flip(-1)).float().softmax(dim=1)
                    probabilities = (probabilities + mirrored) / 2
            outputs.append(probabilities.cpu())
    finally:
        model.train(was_training)
    if not outputs:
        raise ValueError("The loader yielded no batches: there is nothing to predict.")
    return torch.cat(outputs)


def write_submission(
    frame: pd.DataFrame, sample: str | os.PathLike, path: str | os.PathLike = "submission.csv"
) -> Path:
    """Write ``frame`` as a submission CSV after checking it against the competition's sample submission.

    The columns must be the sample's, in its order, with the same number of rows, the same ids (its first
    column) and no missing values; a wrong submission is an error here rather than a failed scoring on
    Kaggle. The file is written atomically (a temporary file, then a rename). Returns ``path``.

    Example:
        >>> import tempfile
        >>> folder = Path(tempfile.mkdtemp())
        >>> pd.DataFrame({"ImageId": [1, 2], "Label": 0}).to_csv(folder / "sample.csv", index=False)
        >>> path = write_submission(pd.DataFrame({"ImageId": [1, 2], "Label": [3, 8]}), folder / "sample.csv",
        ...                         folder / "submission.csv")
        >>> path.read_text().splitlines()
        ['ImageId,Label', '1,3', '2,8']
    """
    if not isinstance(frame, pd.DataFrame):
        raise TypeError(f"frame must be a pandas DataFrame, got {type(frame).__name__}.")
    expected = pd.read_csv(sample)
    if list(frame.columns) != list(expected.columns):
        raise ValueError(
            f"The submission's columns {list(frame.columns)} differ from the sample submission's "
            f"{list(expected.columns)} ({sample}); name and order them as the sample does."
        )
    if len(frame) != len(expected):
        raise ValueError(
            f"The submission has {len(frame)} rows but the sample submission has {len(expected)}: predict "
            "every row of the test set, once."
        )
    ids = expected.columns[0]
    missing = set(expected[ids].astype(str)) - set(frame[ids].astype(str))
    if missing or frame[ids].duplicated().any():
        raise ValueError(
            f"The submission's {ids} column must hold the sample's ids, each once; "
            f"{len(missing)} are missing (e.g. {sorted(missing)[:3]}) or some appear twice."
        )
    empty = [c for c in frame.columns if frame[c].isna().any()]
    if empty:
        raise ValueError(f"The submission has missing values in column(s) {empty}; fill every cell.")
    return atomic_write_text(frame.to_csv(index=False), path)


def _check_frame(frame) -> None:
    if not isinstance(frame, pd.DataFrame):
        raise TypeError(f"frame must be a pandas DataFrame (pd.read_csv(...)), got {type(frame).__name__}.")
