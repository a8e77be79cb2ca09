"""Progress (ema_kit/training/progress.py): a few text lines per epoch in a log, never one per batch."""

import io
import itertools
import os
import re
import signal
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
    progress.show_row(LOG)


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


@pytest.fixture
def notebook(monkeypatch):
    """What a notebook would show (``shown``: each object in order, its handle's updates in place) and
    the callbacks to run when the cell ends (``cell_end``)."""
    outputs = {"shown": [], "cell_end": []}

    def display(obj, handle=None):
        if handle is None:
            outputs["shown"].append(obj)
            return len(outputs["shown"]) - 1
        outputs["shown"][handle] = obj
        return handle

    monkeypatch.setattr(_env, "display", display)
    monkeypatch.setattr(_env, "after_cell", outputs["cell_end"].append)
    return outputs


def test_the_widget_bar_counts_batches_and_becomes_its_last_line_when_training_ends(notebook):
    progress = Progress("widget", epochs=2, train_loss=lambda: 0.123456)
    progress.start_epoch(1, batches=3)
    for _ in range(3):
        progress.batch(images=32)
    (box,) = notebook["shown"]
    bar, label = box.children
    assert bar.value == 3 and "epoch 1/2" in label.value and "img/s" in label.value
    progress.start_epoch(2, batches=3)
    assert bar.value == 0 and notebook["shown"] == [box]  # one bar for the whole run
    progress.batch(images=32)
    progress.close()
    (line,) = notebook["shown"]  # in the bar's place: its last state, as plain text
    assert isinstance(line, IPython.display.Pretty) and line.data == label.value
    assert line.data.startswith("epoch 2/2  batch 1/3  train_loss 0.1235  ") and line.data.endswith(" s")
    assert box.comm is None  # the widget is closed once nothing shows it


def test_a_cell_that_ends_however_it_ends_leaves_the_bars_last_line_not_a_widget(notebook):
    progress = Progress("widget", epochs=None)
    progress.start_epoch(1, batches=10)
    progress.batch(images=32)  # then the cell is stopped, or raises
    for callback in notebook["cell_end"]:
        callback()
    (line,) = notebook["shown"]
    assert isinstance(line, IPython.display.Pretty) and line.data.startswith("epoch 1  batch 1/10")
    progress.start_epoch(2, batches=10)  # a later cell that goes on gets a bar of its own
    assert len(notebook["shown"]) == 2


def test_the_table_shows_four_decimals_without_an_index_and_the_log_keeps_full_precision(notebook):
    log = pd.DataFrame({"epoch": [1, 1.5], "train_loss": [0.123456789, 0.0001234567],
                        "ema_accuracy": [0.98765, 1.0], "lr": [3e-4, 1e-5],
                        "seconds": [12.345, 0.5]})  # fmt: skip
    progress = Progress("text", epochs=2, stream=io.StringIO())
    progress._notebook = True
    progress.show_row(log)
    (table,) = notebook["shown"]
    html = table._repr_html_()
    assert "<th></th>" not in html and "<th>0</th>" not in html  # no index column
    cells = [[td.strip() for td in re.findall(r"<td>(.*?)</td>", row)] for row in html.split("<tr")[2:]]
    assert cells == [
        ["1", "0.1235", "0.9877", "3.000e-04", "12.3"],
        ["1.5", "1.235e-04", "1.0000", "1.000e-05", "0.5"],  # a column's decimals line up: 1.0000, not 1
    ]
    assert repr(table).splitlines()[0].split() == ["epoch", "train_loss", "ema_accuracy", "lr", "seconds"]
    assert log["train_loss"].iloc[0] == 0.123456789


def test_a_loader_without_length_counts_batches_up(monkeypatch):
    monkeypatch.setattr(progress_module, "_QUIET_SECONDS", 0.0)  # as if the epoch ran for minutes
    stream = io.StringIO()
    progress = Progress("text", epochs=1, stream=stream, train_loss=lambda: 0.5)
    progress.start_epoch(1, batches=None)
    for _ in range(7):
        progress.batch(images=32)
    progress.show_row(LOG)
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


def test_after_cell_runs_its_callback_once_when_the_cell_ends(shell):
    from IPython.core.events import EventManager, available_events

    class Shell:
        events = EventManager(None, available_events)

    shell["shell"] = Shell()
    calls = []
    _env.after_cell(lambda: calls.append("ended"))
    Shell.events.trigger("post_run_cell", None)
    Shell.events.trigger("post_run_cell", None)
    assert calls == ["ended"]


def test_the_stop_button_inside_a_block_that_must_finish_is_raised_when_it_ends():
    done = []
    with pytest.raises(KeyboardInterrupt):
        with _env.finish_before_stopping():
            os.kill(os.getpid(), signal.SIGINT)  # the stop button, Ctrl-C
            done.append("the block went on")
    assert done == ["the block went on"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_the_stop_button_pressed_twice_inside_a_block_stops_at_once():
    done = []
    with pytest.raises(KeyboardInterrupt):
        with _env.finish_before_stopping():
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)
            done.append("the block went on")
    assert done == [] and signal.getsignal(signal.SIGINT) is signal.default_int_handler
