"""Built-in data (ema_kit/examples/digits.py): the real digits as tensors, loaders and Kaggle-style files."""

from collections import Counter

import pandas as pd
import pytest
import torch
from PIL import Image

from ema_kit.examples.digits import digits, digits_loaders, write_digit_recognizer, write_image_folder


def test_digits_are_real_images_in_unit_range_and_resize():
    images, labels = digits(28)
    assert images.shape == (1797, 1, 28, 28) and 0 <= images.min() and images.max() <= 1
    assert sorted(labels.unique().tolist()) == list(range(10))


def test_loaders_split_without_overlap_and_shuffle_repeatably():
    first = [y for _, y in digits_loaders(seed=1)[0]]
    again = [y for _, y in digits_loaders(seed=1)[0]]
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    train, val = digits_loaders()
    assert len(val.dataset) == round(1797 * 0.25)

    def count(images, labels) -> Counter:  # an image with its label, as many times as the data holds it
        return Counter(zip(labels.tolist(), (image.numpy().tobytes() for image in images)))

    # Each of the 1,797 examples in exactly one of the two: none in both, none left out.
    assert count(*train.dataset.tensors) + count(*val.dataset.tensors) == count(*digits())


def test_digit_recognizer_files_have_the_competition_layout(tmp_path):
    folder = write_digit_recognizer(tmp_path)
    train, test = pd.read_csv(folder / "train.csv"), pd.read_csv(folder / "test.csv")
    sample = pd.read_csv(folder / "sample_submission.csv")
    assert list(train.columns) == ["label"] + [f"pixel{i}" for i in range(784)]
    assert list(test.columns) == [f"pixel{i}" for i in range(784)]
    assert list(sample.columns) == ["ImageId", "Label"] and sample["ImageId"].tolist()[:2] == [1, 2]
    assert len(sample) == len(test) and len(train) + len(test) == 1797
    assert train.iloc[:, 1:].to_numpy().max() == 255


def test_image_folder_has_pngs_for_every_row(tmp_path):
    folder = write_image_folder(tmp_path, size=16)
    train = pd.read_csv(folder / "train.csv")
    assert list(train.columns) == ["id", "label"]
    image = Image.open(folder / "train" / f"{train['id'][0]}.png")
    assert image.size == (16, 16) and image.mode == "RGB"
    assert len(list((folder / "test").iterdir())) == len(pd.read_csv(folder / "sample_submission.csv"))


def test_bad_sizes_are_clear_errors():
    with pytest.raises(ValueError, match="size must be a positive int"):
        digits(0)
    with pytest.raises(ValueError, match="val_fraction must be between 0 and 1"):
        digits_loaders(val_fraction=1.5)
