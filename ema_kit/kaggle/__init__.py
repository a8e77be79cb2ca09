"""Kaggle helpers: finding inputs in either mount layout, the smoke switch, prediction and submissions."""

from .datasets import ImageFolderDataset, PixelCSVDataset, RandomAffine
from .inputs import find_file, input_dir, kaggle_root, on_kaggle, smoke, working_dir
from .submission import predict, write_submission

__all__ = [
    "input_dir",
    "working_dir",
    "find_file",
    "kaggle_root",
    "on_kaggle",
    "smoke",
    "predict",
    "write_submission",
    "PixelCSVDataset",
    "ImageFolderDataset",
    "RandomAffine",
]
