"""Built-in data: scikit-learn's handwritten digits, as tensors, loaders and Kaggle-style files.

scikit-learn ships 1,797 real 8x8 scans of handwritten digits, so the demo, the tests and the notebooks
train on real images with no download. The writers lay them out the way two common Kaggle competitions
do, so a notebook reads them through the same code it uses on Kaggle.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset


def digits(size: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """The digits as float images in [0, 1], shape ``(1797, 1, size, size)``, and int64 labels.

    ``size`` other than 8 resizes with bilinear interpolation (28 gives MNIST-sized images).

    Example:
        >>> images, labels = digits()
        >>> tuple(images.shape), labels[:5].tolist()
        ((1797, 1, 8, 8), [0, 1, 2, 3, 4])
    """
    from sklearn.datasets import load_digits  # imported here: only the built-in data needs scikit-learn

    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"size must be a positive int (pixels per side), got {size!r}.")
    data = load_digits()
    images = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0  # pixels are 0..16
    if size != 8:
        images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False).clamp(0, 1)
    return images, torch.tensor(data.target, dtype=torch.int64)


def digits_loaders(
    batch_size: int = 64, *, val_fraction: float = 0.25, size: int = 8, seed: int = 0
) -> tuple[DataLoader, DataLoader]:
    """Train and validation loaders over the digits, split at random once with ``seed``.

    The training loader shuffles with its own generator (seeded), so runs are repeatable.

    Example:
        >>> train_loader, val_loader = digits_loaders(batch_size=32)
        >>> len(train_loader.dataset), len(val_loader.dataset)
        (1348, 449)
    """
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be between 0 and 1, got {val_fraction!r}.")
    images, labels = digits(size)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    n_val = round(len(labels) * val_fraction)
    val, train = order[:n_val], order[n_val:]
    return (
        DataLoader(
            TensorDataset(images[train], labels[train]),
            batch_size=batch_size,
            shuffle=True,
            generator=torch.Generator().manual_seed(seed),
        ),
        DataLoader(TensorDataset(images[val], labels[val]), batch_size=256),
    )


def write_digit_recognizer(folder: str | os.PathLike, *, test_fraction: float = 0.3, seed: int = 0) -> Path:
    """Write the digits as Kaggle's Digit Recognizer files: 28x28 pixels, 0..255, one image per row.

    ``train.csv`` (``label,pixel0..pixel783``), ``test.csv`` (pixels only) and ``sample_submission.csv``
    (``ImageId,Label``, ImageId from 1), exactly the competition's layout. Returns the folder.

    Example:
        >>> import tempfile
        >>> folder = write_digit_recognizer(tempfile.mkdtemp())
        >>> sorted(p.name for p in folder.iterdir())
        ['sample_submission.csv', 'test.csv', 'train.csv']
    """
    images, labels = digits(28)
    pixels = (images.reshape(len(images), -1) * 255).round().to(torch.uint8).numpy()
    order = np.random.default_rng(seed).permutation(len(labels))
    n_test = round(len(labels) * test_fraction)
    test, train = order[:n_test], order[n_test:]
    columns = [f"pixel{i}" for i in range(pixels.shape[1])]
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    train_frame = pd.DataFrame(pixels[train], columns=columns)
    train_frame.insert(0, "label", labels.numpy()[train])
    train_frame.to_csv(folder / "train.csv", index=False)
    pd.DataFrame(pixels[test], columns=columns).to_csv(folder / "test.csv", index=False)
    pd.DataFrame({"ImageId": np.arange(1, n_test + 1), "Label": 0}).to_csv(
        folder / "sample_submission.csv", index=False
    )
    return folder


def write_image_folder(
    folder: str | os.PathLike,
    *,
    size: int | tuple[int, int] = 32,
    classes: int = 10,
    columns: tuple[str, str] = ("id", "label"),
    folders: tuple[str, str] = ("train", "test"),
    test_fraction: float = 0.3,
    seed: int = 0,
) -> Path:
    """Write the digits as PNG files plus CSVs, the other common Kaggle layout.

    ``<train>/<id>.png`` with ``train.csv`` (``id,label``), ``<test>/<id>.png`` with
    ``sample_submission.csv`` (``id,label``), named by ``folders`` and ``columns``, so the stand-in has
    the layout of the competition a notebook targets. Images are RGB, ``size`` pixels a side, or, with
    ``size=(low, high)``, each of a side drawn from ``low..high``: mixed sizes, as in real sets. Only the
    digits ``0..classes-1`` are kept, for a stand-in with the competition's number of classes.
    Returns the folder.

    Example:
        >>> import tempfile
        >>> folder = write_image_folder(tempfile.mkdtemp(), size=16)
        >>> sorted(p.name for p in folder.iterdir())
        ['sample_submission.csv', 'test', 'train', 'train.csv']
    """
    from PIL import Image  # imported here: only the image-folder layout needs Pillow

    low, high = (size, size) if isinstance(size, int) and not isinstance(size, bool) else tuple(size)
    if not (isinstance(low, int) and isinstance(high, int) and 1 <= low <= high):
        raise ValueError(f"size must be a positive int or a (low, high) pair with low <= high, got {size!r}.")
    if not (isinstance(classes, int) and 2 <= classes <= 10):
        raise ValueError(f"classes must be an int from 2 to 10 (the digits 0..classes-1), got {classes!r}.")
    images, labels = digits(high)
    rng = np.random.default_rng(seed)
    kept = np.flatnonzero(labels.numpy() < classes)
    order = kept[rng.permutation(len(kept))]
    n_test = round(len(order) * test_fraction)
    folder = Path(folder)
    id_column, label_column = columns
    for split, indices in ((folders[1], order[:n_test]), (folders[0], order[n_test:])):
        (folder / split).mkdir(parents=True, exist_ok=True)
        ids = [f"{split}_{i:04d}" for i in indices]
        for image_id, index in zip(ids, indices):
            side = int(rng.integers(low, high + 1))
            image = (
                F.interpolate(images[index : index + 1], size=(side, side), mode="bilinear")
                if side != high
                else images[index : index + 1]
            )
            pixels = (image[0, 0].clamp(0, 1) * 255).round().to(torch.uint8).numpy()
            Image.fromarray(pixels).convert("RGB").save(folder / split / f"{image_id}.png")
        is_train = split == folders[0]
        frame = pd.DataFrame({id_column: ids, label_column: labels.numpy()[indices] if is_train else 0})
        frame.to_csv(folder / ("train.csv" if is_train else "sample_submission.csv"), index=False)
    return folder
