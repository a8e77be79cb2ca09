"""The notebooks, run with nbmake at smoke sizes: in order on local folders, and through Kaggle's layout.

``EMA_KIT_SMOKE=1`` only shrinks epochs and rows, so these run the code a user runs. The notebooks are
copied to a temporary folder first, so their data and runs/ folders land there, not in the checkout.
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from ema_kit.data import write_digit_recognizer

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"


def _nbmake(notebooks: list[Path], cwd: Path, **env: str) -> None:
    """Run the notebooks with nbmake, in the order given, in one pytest process; fail with its output."""
    command = [sys.executable, "-m", "pytest", "--nbmake", "--nbmake-timeout=600", "-q",
               "-p", "no:cacheprovider", "--rootdir", str(cwd), *map(str, notebooks)]
    result = subprocess.run(command, cwd=cwd, env=os.environ | {"EMA_KIT_SMOKE": "1"} | env,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]


def _copy(names: list[str], folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    return [Path(shutil.copy(NOTEBOOKS / f"{name}.ipynb", folder)) for name in names]


@pytest.mark.slow
def test_every_notebook_runs_in_order_at_smoke_size(tmp_path):
    names = sorted(path.stem for path in NOTEBOOKS.glob("*.ipynb"))
    assert names[:4] == ["01_quickstart", "02_kaggle_digit_recognizer", "03_image_folder_classification",
                         "04_inference_submission"]
    _nbmake(_copy(names, tmp_path), tmp_path, EMA_KIT_KAGGLE_ROOT=str(tmp_path / "no-kaggle-here"))
    for run in ("01_quickstart", "02_kaggle_digit_recognizer", "03_image_folder_classification"):
        assert (tmp_path / "runs" / run / "model_ema.pth").is_file()
    submission = pd.read_csv(tmp_path / "runs" / "04_inference_submission" / "submission.csv")
    sample = pd.read_csv(tmp_path / "data" / "digit-recognizer" / "sample_submission.csv")
    assert list(submission.columns) == ["ImageId", "Label"] and len(submission) == len(sample)


@pytest.mark.slow
def test_kaggle_layout_trains_then_submits_from_the_saved_ema_weights(tmp_path):
    kaggle = tmp_path / "kaggle"
    competition = write_digit_recognizer(kaggle / "input" / "digit-recognizer")
    (kaggle / "working").mkdir()
    training, inference = _copy(["02_kaggle_digit_recognizer"], tmp_path / "a") + _copy(
        ["04_inference_submission"], tmp_path / "b"
    )
    _nbmake([training], tmp_path / "a", EMA_KIT_KAGGLE_ROOT=str(kaggle))
    # Kaggle mounts a notebook's output as an input of the notebooks that attach it, under its slug.
    shutil.move(kaggle / "working", kaggle / "input" / "ema-kit-digit-recognizer")
    (kaggle / "working").mkdir()
    _nbmake([inference], tmp_path / "b", EMA_KIT_KAGGLE_ROOT=str(kaggle))

    submission = pd.read_csv(kaggle / "working" / "submission.csv")
    sample = pd.read_csv(competition / "sample_submission.csv")
    assert list(submission.columns) == list(sample.columns)
    assert submission["ImageId"].tolist() == sample["ImageId"].tolist()
    assert submission["Label"].between(0, 9).all()
    assert not (tmp_path / "a" / "data").exists() and not (tmp_path / "b" / "runs").exists()
