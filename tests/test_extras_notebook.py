"""Notebook 06 (EMA extras) runs headless with nbmake at smoke size, writing only under its runs/ folder."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "06_ema_extras.ipynb"


@pytest.mark.slow
def test_extras_notebook_runs_at_smoke_size_and_writes_its_figures_under_runs(tmp_path):
    notebook = Path(shutil.copy(NOTEBOOK, tmp_path))
    command = [
        sys.executable,
        "-m",
        "pytest",
        "--nbmake",
        "--nbmake-timeout=600",
        "-q",
        "-p",
        "no:cacheprovider",
        "--rootdir",
        str(tmp_path),
        str(notebook),
    ]
    env = os.environ | {"EMA_KIT_SMOKE": "1", "EMA_KIT_KAGGLE_ROOT": str(tmp_path / "no-kaggle-here")}
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
    written = sorted(p.name for p in (tmp_path / "runs" / "06_ema_extras").iterdir())
    assert written == ["bn_refresh.png", "half_life.png", "lowp_shadow.png", "switch_ema.png"]
    made = sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith("."))  # not pytest's caches
    assert made == ["06_ema_extras.ipynb", "runs"]
