"""Predicting a test set (with optional flip TTA) and writing a submission checked against the sample."""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn

from .. import _batches
from .._tensors import model_device
from ..files import atomic_write_text
from ..training.evaluate import resolve_amp


@torch.no_grad()  # no graph: a test set's activations are not kept for a backward pass
def predict(
    model: nn.Module,
    loader: Iterable,
    *,
    tta: bool = False,
    amp: str | bool = "auto",
    target_key: str | None = None,
    output_key: int | str | None = None,
) -> torch.Tensor:
    """Class probabilities (softmax) of ``model`` for every item of ``loader``, in order, on the CPU.

    Batches are what ``fit`` takes, with or without targets: images, ``(inputs, ...)`` (the first item is
    the input, a tensor, tuple or dict as in ``fit``), or a dict whose entries other than ``target_key``
    are the model's keyword inputs; ``output_key`` picks the prediction from a tuple or dict output. They go
    to the model's device, under autocast on CUDA with ``amp="auto"``. ``tta=True`` averages the
    probabilities of each image and its mirror image (flipped left to right): it helps where a mirrored
    picture shows the same class (photos), not for digits or text. The model's train/eval mode is restored.

    Example:
        >>> model = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
        >>> probabilities = predict(model, [torch.zeros(5, 1, 2, 2)], tta=True)
        >>> tuple(probabilities.shape), torch.allclose(probabilities.sum(1), torch.ones(5))
        ((5, 3), True)
    """
    device = model_device(model)
    amp_dtype = resolve_amp(amp, device)
    was_training = model.training
    model.eval()
    outputs = []
    try:
        for batch in loader:
            if isinstance(batch, Mapping):
                inputs = {key: value for key, value in batch.items() if key != target_key}
            else:
                inputs = batch[0] if isinstance(batch, (tuple, list)) else batch
            if tta and not isinstance(inputs, torch.Tensor):
                raise ValueError(
                    f"tta=True mirrors image tensors, but this loader's inputs are a {type(inputs).__name__}:"
                    " predict without tta, or yield images."
                )
            inputs = _batches.to_device(inputs, device)
            with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
                probabilities = _batches.forward(model, inputs, output_key).float().softmax(dim=1)
                if tta:
                    mirrored = _batches.forward(model, inputs.flip(-1), output_key).float().softmax(dim=1)
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
    # As the sample writes it: an id "0001" keeps its zeros, and an id "NA" is an id, not a missing value.
    expected = pd.read_csv(sample, dtype=str, keep_default_na=False)
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
    missing = set(expected[ids].str.strip()) - set(frame[ids].astype(str).str.strip())
    if missing or frame[ids].duplicated().any():
        raise ValueError(
            f"The submission's {ids} column must hold the sample's ids as it writes them, each once; "
            f"{len(missing)} are missing (e.g. {sorted(missing)[:3]}) or some appear twice. Take them from "
            f"the sample read as text, pd.read_csv(sample, dtype={{{ids!r}: str}}, keep_default_na=False), "
            "so that ids such as 0001 keep their zeros."
        )
    empty = [c for c in frame.columns if frame[c].isna().any()]
    if empty:  # an empty string is an answer (no object: an empty EncodedPixels or PredictionString)
        raise ValueError(f"The submission has missing values in column(s) {empty}; fill every cell.")
    numbers = frame.select_dtypes("number")
    infinite = [c for c in numbers.columns if not np.isfinite(numbers[c].to_numpy(dtype=float)).all()]
    if infinite:
        raise ValueError(f"The submission has Inf in column(s) {infinite}; every value must be finite.")
    return atomic_write_text(frame.to_csv(index=False), path)
