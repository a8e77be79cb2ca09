"""Progress (ema_kit/training/progress.py): a few text lines per epoch in a log, never one per batch."""

import io
import itertools
import time

import IPython.display
import pandas as pd
import pytest

from ema_kit.training import _env
from ema_kit.training import progress as progress_module
from ema_kit.training.progress import Progress

LOG = pd.DataFrame({"epoch": [1], "train_loss": [0.5], "live_loss": [0.4], "ema_loss": [0.3]})


def run_epoch(progress: Progress, batches: int = 100) -> None:
    progress.start_epoch(1, batches=batches)
    for _ in range(batches):
        progress.batch(images=32)
    progress.end_epoch(LOG)


def test_a_short_epoch_in_a_log_is_one_line():
    stream = io.StringIO()
    run_epoch(Progress("text", epochs=1, stream=stream, train_loss=lambda: 0.5))
    assert stream.getvalue().count("\n") == 1 and "ema_loss 0.3000" in stream.getvalue()


def test_a_long_epoch_in_a_log_also_reports_at_its_quarters(monkeypatch):
    clock = itertools.count(step=60.0)  # as if each batch took a minute
    monkeypatch.setattr(time, "perf_counter", lambda: next(clock))
    stream = io.StringIO()
    run_epoch(Progress("text", epochs=1, stream=stream, train_loss=lambda: 0.5))
    lines = stream.getvalue().splitlines()
    assert [line.split()[2:4] for line in lines[:3]] == [
        ["batch", "25/100"],
        ["batch", "50/100"],
        ["batch", "75/100"],
    ]
    assert len(lines) == 4


def test_a_terminal_gets_one_line_rewritten_in_place():
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    stream = Terminal()
    run_epoch(Progress("text", epochs=1, stream=stream, train_loss=lambda: 0.5))
    assert stream.getvalue().count("\n") == 1 and "\r" in stream.getvalue()


def test_off_prints_nothing_and_a_bad_mode_is_a_clear_error():
    stream = io.StringIO()
    run_epoch(Progress("off", epochs=1, stream=stream))
    assert stream.getvalue() == ""
    with pytest.raises(ValueError, match="progress must be 'auto', 'widget', 'text' or 'off'"):
        Progress("bar", epochs=1)


def test_the_widget_bar_counts_batches_and_stays_shown_when_training_ends(monkeypatch):
    shown = []  # what the notebook would show
    monkeypatch.setattr(IPython.display, "display", lambda obj, **options: shown.append(obj))
    progress = Progress("widget", epochs=2)
    progress.start_epoch(1, batches=3)
    for _ in range(3):
        progress.batch(images=32)
    (box,) = shown
    bar, label = box.children
    assert bar.value == 3 and "epoch 1/2" in label.value and "img/s" in label.value
    progress.start_epoch(2, batches=3)
    assert bar.value == 0 and shown == [box]  # one bar for the whole run
    progress.close()
    assert bar.bar_style == "success"


def test_a_loader_without_length_counts_batches_up(monkeypatch):
    monkeypatch.setattr(progress_module, "_QUIET_SECONDS", 0.0)  # as if the epoch ran for minutes
    stream = io.StringIO()
    progress = Progress("text", epochs=1, stream=stream, train_loss=lambda: 0.5)
    progress.start_epoch(1, batches=None)
    for _ in range(7):
        progress.batch(images=32)
    progress.end_epoch(LOG)
    lines = stream.getvalue().splitlines()
    assert [line.split()[2:4] for line in lines[:3]] == [["batch", "1"], ["batch", "2"], ["batch", "4"]]
    assert len(lines) == 4 and "ema_loss 0.3000" in lines[3]


# -- which front end (ema_kit/_env.py) -------------------------------------------------------------------


@pytest.fixture
def shell(monkeypatch):
    """Make IPython.get_ipython() return the shell a test sets."""
    import IPython

    current = {}
    monkeypatch.setattr(IPython, "get_ipython", lambda: current.get("shell"))
    monkeypatch.delenv("KAGGLE_KERNEL_RUN_TYPE", raising=False)
    return current


def test_a_kernel_shell_subclass_such_as_colabs_is_a_notebook(shell):
    from ipykernel.zmqshell import ZMQInteractiveShell

    class Shell(ZMQInteractiveShell):  # google.colab._shell.Shell subclasses the kernel's shell like this
        pass

    shell["shell"] = object.__new__(Shell)
    assert _env.in_notebook()


def test_a_terminal_ipython_or_plain_python_is_not_a_notebook(shell):
    from IPython.terminal.interactiveshell import TerminalInteractiveShell

    shell["shell"] = object.__new__(TerminalInteractiveShell)
    assert not _env.in_notebook()
    shell["shell"] = None
    assert not _env.in_notebook()


def test_kaggles_save_and_run_all_is_headless_and_its_interactive_session_is_not(monkeypatch):
    monkeypatch.setenv("KAGGLE_KERNEL_RUN_TYPE", "Batch")
    assert _env.headless_notebook()
    monkeypatch.setenv("KAGGLE_KERNEL_RUN_TYPE", "Interactive")
    monkeypatch.setattr(_env, "_parent_command", lambda: "/usr/bin/python -m ipykernel_launcher -f k.json")
    assert not _env.headless_notebook()


@pytest.mark.parametrize(
    "runner", ["jupyter-nbconvert --execute", "papermill in.ipynb out.ipynb", "pytest --nbmake"]
)
def test_a_kernel_started_by_a_notebook_runner_is_headless(monkeypatch, runner):
    monkeypatch.delenv("KAGGLE_KERNEL_RUN_TYPE", raising=False)
    monkeypatch.setattr(_env, "_parent_command", lambda: f"/usr/bin/python /usr/bin/{runner}")
    assert _env.headless_notebook()
