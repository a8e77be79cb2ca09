"""watch (ema_kit/training/watch.py): a run folder written by another process, shown live until it ends."""

import importlib
import json
import subprocess
import sys
import threading
import time

import pandas as pd
import pytest
import torch
from helpers import small_cnn
from torch.utils.data import DataLoader, TensorDataset

from ema_kit import LiveLog, fit, watch
from ema_kit.training import read_status
from ema_kit.training.launch import Job

watch_module = importlib.import_module("ema_kit.training.watch")  # the module, not the function


def _fit(out_dir, epochs: int = 2) -> pd.DataFrame:
    torch.manual_seed(0)
    model = small_cnn()
    generator = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(64, 1, 8, 8, generator=generator), torch.arange(64) % 10)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    quiet = LiveLog(progress="off", plot=False)
    return fit(model, DataLoader(data, batch_size=16), DataLoader(data, batch_size=32), epochs=epochs,
               optimizer=optimizer, ema=0.5, out_dir=out_dir, callbacks=[quiet])  # fmt: skip


def _edit_status(folder, **fields) -> None:
    path = folder / "status.json"
    path.write_text(json.dumps(json.loads(path.read_text()) | fields))


def _dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()  # reaped: the pid names no process now
    return process.pid


def test_a_finished_run_is_drawn_at_once_and_its_table_is_history_csv(tmp_path, capsys):
    _fit(tmp_path / "run")
    shown = watch(tmp_path / "run", progress="off", plot=False)
    pd.testing.assert_frame_equal(shown, pd.read_csv(tmp_path / "run" / "history.csv"))
    assert capsys.readouterr().out == f"The run in {tmp_path / 'run'} finished: 2 of 2 epochs.\n"


def test_a_run_being_written_is_followed_row_by_row_until_it_finishes(tmp_path, monkeypatch):
    states = []  # the run's state when each row was shown

    class Recording(LiveLog):
        def add(self, row=None, /, **columns):
            states.append(read_status(tmp_path / "run")["state"])
            super().add(row, **columns)

    monkeypatch.setattr(watch_module, "LiveLog", Recording)
    training = threading.Thread(target=_fit, args=(tmp_path / "run", 4))
    training.start()
    try:
        shown = watch(tmp_path / "run", every=0.01, progress="off", plot=False)
    finally:
        training.join()
    pd.testing.assert_frame_equal(shown, pd.read_csv(tmp_path / "run" / "history.csv"))
    assert len(states) == 4 and states[0] == "running"


def test_a_run_whose_process_is_gone_is_reported_with_the_last_epoch_saved(tmp_path):
    _fit(tmp_path / "run")
    _edit_status(tmp_path / "run", state="running", pid=_dead_pid(), epochs=5)
    with pytest.raises(
        RuntimeError, match=r"stopped without finishing: its process \(\d+ on .*\) is gone"
    ) as error:
        watch(tmp_path / "run", progress="off", plot=False)
    assert f"The last epoch saved is 2 of 5 ({tmp_path / 'run' / 'checkpoint.pt'})" in str(error.value)
    assert "resume=True" in str(error.value)


def test_a_run_that_finishes_and_exits_between_reading_its_status_and_its_process_is_not_taken_for_dead(
    tmp_path, monkeypatch, capsys
):
    _fit(tmp_path / "run")  # finished: 2 of 2
    finished = read_status(tmp_path / "run")
    reads = iter([finished | {"state": "running", "pid": _dead_pid()}])  # then the file: finished
    monkeypatch.setattr(watch_module, "read_status", lambda folder: next(reads, finished))
    shown = watch(tmp_path / "run", progress="off", plot=False)
    assert len(shown) == 2 and "finished: 2 of 2 epochs" in capsys.readouterr().out


def test_a_run_on_another_machine_without_a_heartbeat_is_reported(tmp_path):
    _fit(tmp_path / "run")
    _edit_status(tmp_path / "run", state="running", host="another-kernel", time=time.time() - 60)
    with pytest.raises(RuntimeError, match="no heartbeat from process .* on another-kernel for 6. s"):
        watch(tmp_path / "run", stale_after=30, progress="off", plot=False)


def test_a_failed_run_raises_with_its_error(tmp_path):
    _fit(tmp_path / "run")
    _edit_status(tmp_path / "run", state="failed", error="ValueError: a broken batch", epochs=3)
    with pytest.raises(
        RuntimeError, match="fit raised ValueError: a broken batch. The last epoch saved is 2 of 3"
    ):
        watch(tmp_path / "run", progress="off", plot=False)


def test_a_run_stopped_by_its_user_returns_its_log_and_says_how_to_continue(tmp_path, capsys):
    _fit(tmp_path / "run")
    _edit_status(tmp_path / "run", state="stopped", epochs=3)
    assert len(watch(tmp_path / "run", progress="off", plot=False)) == 2
    assert (
        "stopped by its user after epoch 2 of 3; fit(..., resume=True) continues it"
        in capsys.readouterr().out
    )


def test_a_job_that_ends_before_fit_starts_is_reported_with_its_output(tmp_path):
    log = tmp_path / "run" / "launch.log"
    log.parent.mkdir()
    with open(log, "w") as output:
        command = [sys.executable, "-c", "import sys; print('ModuleNotFoundError: no ema_kit'); sys.exit(3)"]
        job = Job(subprocess.Popen(command, stdout=output), command, log, processes=1)
    with pytest.raises(RuntimeError, match=r"torchrun ended \(exit status 3\) before fit started") as error:
        watch(tmp_path / "run", job=job, every=0.01, progress="off", plot=False)
    assert "No epoch was saved" in str(error.value)
    assert "The processes' error: ModuleNotFoundError: no ema_kit" in str(error.value)


def test_an_earlier_runs_status_is_not_taken_for_the_jobs(tmp_path):
    _fit(tmp_path / "run")  # finished; then a job that reuses the folder dies at once
    log = tmp_path / "run" / "launch.log"
    with open(log, "w") as output:
        job = Job(subprocess.Popen([sys.executable, "-c", "raise SystemExit(1)"], stdout=output), [], log, 1)
    with pytest.raises(RuntimeError, match="before fit started"):
        watch(tmp_path / "run", job=job, every=0.01, progress="off", plot=False)


def test_a_log_without_status_json_is_followed_until_it_is_quiet_for_stale_after(tmp_path, capsys):
    log = LiveLog(out_dir=tmp_path, progress="off", plot=False)  # a loop of one's own: no status.json
    log.add(live={"loss": 0.5}, ema={"loss": 0.4})
    shown = watch(tmp_path, every=0.01, stale_after=0.2, progress="off", plot=False)
    pd.testing.assert_frame_equal(shown, pd.read_csv(tmp_path / "history.csv"))
    assert "has no status.json (a LiveLog's log, not fit's?)" in capsys.readouterr().out


def test_a_folder_where_no_run_starts_is_reported_after_stale_after(tmp_path):
    with pytest.raises(RuntimeError, match="no run started in .* within 0.05 s"):
        watch(tmp_path, every=0.01, stale_after=0.05, progress="off", plot=False)


@pytest.mark.parametrize("every", [0, -1, float("nan")])
def test_every_must_be_a_positive_number_of_seconds(tmp_path, every):
    with pytest.raises(ValueError, match="every"):
        watch(tmp_path, every=every)
