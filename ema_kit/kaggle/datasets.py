"""Stand-in datasets for the notebooks' two Kaggle data layouts: pixels in CSV rows, image files on disk."""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.nn import functional as F
from torch.utils.data import Dataset


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
    when an item is asked for, so the set need not fit in memory. Real sets mix image sizes, and a batch
    needs one: ``size`` resizes every image to ``size`` x ``size`` pixels (bilinear; the aspect ratio is
    not kept).

    Example:
        >>> import tempfile
        >>> from ema_kit.examples.digits import write_image_folder
        >>> folder = write_image_folder(tempfile.mkdtemp(), size=(12, 20))  # sides from 12 to 20 pixels
        >>> dataset = ImageFolderDataset(pd.read_csv(folder / "train.csv"), folder / "train", size=16)
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
        size: int | None = None,  # side every image is resized to; None keeps the files' sizes
        transform: Callable | None = None,
    ):
        _check_frame(frame)
        if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 1):
            raise ValueError(f"size must be a positive int (pixels per side) or None, got {size!r}.")
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
        self.mode, self.size, self.transform = mode, size, transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        from PIL import Image  # imported here: only this layout needs Pillow

        with Image.open(self.paths[index]) as file:
            image = file.convert(self.mode)
        if self.size is not None:
            image = image.resize((self.size, self.size), Image.Resampling.BILINEAR)
        array = torch.from_numpy(np.array(image, dtype=np.uint8))
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


def _check_frame(frame) -> None:
    if not isinstance(frame, pd.DataFrame):
        raise TypeError(f"frame must be a pandas DataFrame (pd.read_csv(...)), got {type(frame).__name__}.")
