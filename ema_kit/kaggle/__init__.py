"""Kaggle helpers: finding inputs in either mount layout, the smoke switch, timm models with offline
weights, K-fold training, prediction and submissions."""

from .datasets import PixelCSVDataset
from .folds import Fold, FoldEnd, fit_folds, fold_models, plot_folds, stratified_folds
from .inputs import find_file, input_dir, kaggle_root, on_kaggle, smoke, working_dir
from .models import timm_model
from .submission import predict, write_submission

__all__ = [
    "input_dir",
    "working_dir",
    "find_file",
    "kaggle_root",
    "on_kaggle",
    "smoke",
    "timm_model",
    "predict",
    "write_submission",
    "PixelCSVDataset",
    "stratified_folds",
    "fit_folds",
    "Fold",
    "FoldEnd",
    "fold_models",
    "plot_folds",
]
