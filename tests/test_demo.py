"""The demo main job (``python -m ema_kit demo``): real digits, files written, the EMA earns its keep."""

import subprocess
import sys

import pandas as pd
import pytest
import torch

from ema_kit.examples.demo import SmallCNN


@pytest.mark.slow
def test_demo_command_writes_the_run_and_the_ema_is_smoother_and_at_least_as_good(tmp_path):
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
