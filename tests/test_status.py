"""status.json (ema_kit/training/status.py): fit's heartbeat in out_dir, read by watch in another process."""

import contextlib
import itertools
import os
import socket
from types import SimpleNamespace

import pytest
import torch
from helpers import small_cnn
from torch.utils.data import DataLoader, TensorDataset

from ema_kit import Callback, LiveLog, fit
from ema_kit.training import RunStatus, read_status
from ema_kit.training import status as status_module


def _loaders(rows: int = 64) -> tuple[DataLoader, DataLoader]:
    generator = torch.Generator().manual_seed(0)
    images, labels = torch.randn(rows, 1, 8, 8, generator=generator), torch.arange(rows) % 10
    data = TensorDataset(images, labels)
    return DataLoader(data, batch_size=16), DataLoader(data, batch_size=32)


def _fit(out_dir, callbacks=(), epochs=3) -> None:
    torch.manual_seed(0)
    model = small_cnn()
    train_loader, val_loader = _loaders()
    quiet = LiveLog(progress="off", plot=False)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    fit(model, train_loader, val_loader, epochs=epochs, optimizer=optimizer, ema=0.5, out_dir=out_dir,
        callbacks=[quiet, *callbacks])  # fmt: skip


class ReadStatus(Callback):
    """Keeps what status.json says at each epoch's start and at the batch ``at`` of epoch 2."""

    def __init__(self, folder, at: int = -1):
        self.folder, self.at, self.seen = folder, at, {}

    def on_epoch_start(self, state) -> None:
        self.seen[f"start {state.epoch}"] = read_status(self.folder)
        self.batch = 0

    def on_batch_end(self, state) -> None:
        self.batch += 1
        if state.epoch == 2 and self.batch == self.at:
            self.seen["mid 2"] = read_status(self.folder)


class Fail(Callback):
    def __init__(self, error: BaseException):
        self.error = error

    def on_batch_end(self, state) -> None:
        if state.epoch == 2:
            raise self.error


def test_a_finished_run_says_so_with_its_process_host_and_epochs(tmp_path):
    _fit(tmp_path / "run")
    status = read_status(tmp_path / "run")
    assert status["state"] == "finished" and status["pid"] == os.getpid()
    assert status["host"] == socket.gethostname() and status["time"] >= status["started"]
    assert (status["epoch"], status["epochs"], status["saved_epoch"]) == (3, 3, 3)
    assert (status["batch"], status["batches"], status["rows"]) == (4, 4, 64)


def test_while_training_it_says_running_with_the_epoch_and_the_last_one_saved(tmp_path):
    reader = ReadStatus(tmp_path / "run")
    _fit(tmp_path / "run", [reader])
    assert reader.seen["start 1"]["state"] == "running" and reader.seen["start 1"]["saved_epoch"] == 0
    # fit runs RunStatus after every other callback: at epoch 2's start it still says epoch 1 is done.
    second = reader.seen["start 2"]
    assert (second["state"], second["epoch"], second["saved_epoch"], second["batch"]) == ("running", 1, 1, 4)


def test_within_an_epoch_the_heartbeat_counts_batches_every_few_seconds(tmp_path, monkeypatch):
    reader = ReadStatus(tmp_path / "run", at=3)
    clock = itertools.count(start=1000.0, step=60.0)  # a minute per reading: every batch is a heartbeat
    monkeypatch.setattr(status_module, "time", SimpleNamespace(time=lambda: next(clock)))
    _fit(tmp_path / "run", [reader])
    mid = reader.seen["mid 2"]
    # read in batch 3, before RunStatus counts it
    assert (mid["epoch"], mid["batch"], mid["rows"], mid["saved_epoch"]) == (2, 2, 32, 1)


def test_a_run_that_raises_is_marked_failed_with_its_error_and_the_epoch_saved(tmp_path):
    with pytest.raises(ValueError, match="a broken batch"):
        _fit(tmp_path / "run", [Fail(ValueError("a broken batch"))])
    status = read_status(tmp_path / "run")
    assert status["state"] == "failed" and status["error"] == "ValueError: a broken batch"
    assert status["saved_epoch"] == 1


def test_a_run_stopped_by_the_user_is_marked_stopped(tmp_path):
    with contextlib.suppress(KeyboardInterrupt):
        _fit(tmp_path / "run", [Fail(KeyboardInterrupt())])
    status = read_status(tmp_path / "run")
    assert status["state"] == "stopped" and status["saved_epoch"] == 1


def test_a_resumed_run_starts_with_its_checkpoint_saved(tmp_path):
    _fit(tmp_path / "run", epochs=1)
    reader = ReadStatus(tmp_path / "run")
    torch.manual_seed(0)
    model = small_cnn()
    train_loader, val_loader = _loaders()
    fit(model, train_loader, val_loader, epochs=2, optimizer=torch.optim.SGD(model.parameters(), lr=0.01),
        ema=0.5, out_dir=tmp_path / "run", resume=True,
        callbacks=[LiveLog(progress="off", plot=False), reader])  # fmt: skip
    assert reader.seen["start 2"]["saved_epoch"] == 1
    assert read_status(tmp_path / "run")["state"] == "finished"


def test_without_out_dir_nothing_is_written(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _fit(None, epochs=1)
    assert list(tmp_path.iterdir()) == []


def test_a_folder_without_a_run_has_no_status(tmp_path):
    assert read_status(tmp_path) is None
    RunStatus(tmp_path / "new").failed(RuntimeError("x"))
    assert read_status(tmp_path / "new")["state"] == "failed"
