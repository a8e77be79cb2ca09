"""The demo main job (``python -m ema_kit demo``): real digits, files written, the EMA earns its keep."""

import inspect
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from matplotlib.image import imread

from ema_kit.examples import demo
from ema_kit.examples.demo import SmallCNN
from ema_kit.training.history import best_row
from ema_kit.training.plot import LivePlot

REPO = Path(__file__).resolve().parents[1]
# The README's picture and the log it was drawn from: the demo's own run, committed.
DEMO_LOG = REPO / "docs" / "demo_history.csv"
DEMO_PNG = REPO / "docs" / "demo_history.png"
REFRESH = (
    "docs/demo_history.csv and .png are the demo's own run and no longer match it; refresh both with "
    "`OMP_NUM_THREADS=1 python -m ema_kit demo --out runs/demo && "
    "cp runs/demo/history.csv docs/demo_history.csv && cp runs/demo/history.png docs/demo_history.png`"
)
TIMING = ["seconds"]  # wall-clock time, different in every run


def drawn(history: pd.DataFrame, path: Path) -> np.ndarray:
    """The pixels of the history.png that the demo's LiveLog writes for this log, best epoch marked."""
    best = history.loc[best_row(history, "ema_accuracy", "max"), "epoch"]  # the demo monitors accuracy
    LivePlot(path).update(history, best_epoch=int(best))
    return imread(path)


def test_readme_picture_is_what_the_plot_code_draws_from_the_committed_demo_log(tmp_path):
    history = pd.read_csv(DEMO_LOG)
    assert len(history) == inspect.signature(demo.run).parameters["epochs"].default, REFRESH
    assert np.array_equal(drawn(history, tmp_path / "history.png"), imread(DEMO_PNG)), REFRESH


@pytest.mark.slow
def test_demo_command_writes_the_run_the_readme_shows_and_the_ema_is_smoother_and_at_least_as_good(tmp_path):
    out = tmp_path / "demo"
    result = subprocess.run(
        [sys.executable, "-m", "ema_kit", "demo", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stderr
    assert "20 epochs in" in result.stdout
    log = pd.read_csv(out / "history.csv")
    assert len(log) == 20
    assert (out / "history.png").stat().st_size > 10_000
    SmallCNN().load_state_dict(torch.load(out / "model_ema.pth", weights_only=True), strict=True)
    assert torch.load(out / "checkpoint.pt", weights_only=True)["epoch"] == 20
    # What an EMA is for: a smoother validation curve, and at the end at least as good as the live model.
    wiggle = log[["live_loss", "ema_loss"]].iloc[5:].diff().abs().sum()
    assert wiggle["ema_loss"] < wiggle["live_loss"]
    end = log.iloc[-5:].mean()  # the last five epochs: one epoch's live score is a draw of the noise
    assert end["ema_loss"] <= end["live_loss"] and end["ema_accuracy"] >= end["live_accuracy"]
    # The README's picture was drawn from this very run: seeded, on one thread (as every test runs), the
    # demo repeats itself to the bit on a given CPU and torch.
    committed = pd.read_csv(DEMO_LOG)
    try:
        pd.testing.assert_frame_equal(log.drop(columns=TIMING), committed.drop(columns=TIMING), rtol=1e-9)
    except AssertionError as error:
        raise AssertionError(f"{REFRESH}\n{error}") from None


def test_unknown_command_prints_usage():
    result = subprocess.run([sys.executable, "-m", "ema_kit", "train"], capture_output=True, text=True)
    assert result.returncode != 0 and "python -m ema_kit {demo}" in result.stderr


def test_demo_resume_continues_the_run_in_its_folder(tmp_path, capsys):
    from ema_kit.examples import demo

    demo.main(["--epochs", "1", "--out", str(tmp_path)])
    demo.main(["--epochs", "2", "--out", str(tmp_path), "--resume"])
    assert pd.read_csv(tmp_path / "history.csv")["epoch"].tolist() == [1, 2]
    assert "2 epochs in" in capsys.readouterr().out


def test_ctrl_c_during_the_first_epoch_exits_cleanly(tmp_path, monkeypatch, capsys):
    from ema_kit.examples import demo
    from ema_kit.training import loop as train

    def interrupted(self, *args):
        raise KeyboardInterrupt

    monkeypatch.setattr(train._Trainer, "train_epoch", interrupted)
    with pytest.raises(SystemExit) as stopped:
        demo.main(["--epochs", "2", "--out", str(tmp_path)])
    assert stopped.value.code == 130
    out = capsys.readouterr().out
    assert "Stopped by the user during epoch 1 of 2: no epoch finished, nothing kept." in out
    assert "Traceback" not in out
