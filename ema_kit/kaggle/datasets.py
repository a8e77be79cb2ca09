"""Images stored as rows of pixels in a CSV (the Digit Recognizer's layout), as a torch dataset.

torchvision reads image files and folders, and its ``transforms.v2`` augment tensors; it has no dataset for
images held as CSV rows, which two notebooks read (training and inference)."""

from __future__ import annotations

import math
from collections.abc import Callable

import pandas as pd
import torch
from torch.utils.data import Dataset


class PixelCSVDataset(Dataset):
    """Images stored one per row as ``pixel0..pixelN`` columns (0..255), Kaggle's Digit Recognizer layout.

    Items are ``(image, label)`` with ``image`` a float tensor ``(1, side, side)`` in [0, 1], or the image
    alone when ``label=None`` (the test set). ``transform`` maps each image, e.g. torchvision's
    ``v2.Compose([v2.RGB(), v2.RandomAffine(degrees=10), v2.Normalize(mean, std)])``. The pixels stay in
    memory as uint8, a quarter of the memory of floats.

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
        self.images = values.reshape(len(frame), 1, side, side)
        self.labels = None if label is None else torch.tensor(frame[label].to_numpy(dtype="int64"))
        self.transform = transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int):
        image = self.images[index].float() / 255.0
        if self.transform is not None:
            image = self.transform(image)
        return image if self.labels is None else (image, self.labels[index])


def _check_frame(frame) -> None:
    if not isinstance(frame, pd.DataFrame):
        raise TypeError(f"frame must be a pandas DataFrame (pd.read_csv(...)), got {type(frame).__name__}.")
