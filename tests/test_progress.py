"""Progress (ema_kit/progress.py): a few text lines per epoch in a log, never one per batch."""

import io
import itertools
import time

import IPython.display
import pandas as pd
import pytest

from ema_kit.progress import Progress

LOG = pd.DataFrame({"epoch": [1], "train_loss": [0.5], "live_loss": [0.4], "ema_loss": [0.3]})


def run_epoch(progress: Progress, batches: int = 100) -> None:
    progress.start_epoch(1, batches=batches)
    for _ in range(batches):
        progress.batch(images=32, loss=0.5)
    progress.end_epoch(LOG)


def test_a_short_epoch_in_a_log_is_one_line():
    stream = io.StringIO()
    run_epoch(Progress("text", epochs=1, stream=stream))
    assert stream.getvalue().count("\n") == 1 and "ema_loss 0.3000" in stream.getvalue()


def test_a_long_epoch_in_a_log_also_reports_at_its_quarters(monkeypatch):
    clock = itertools.count(step=60.0)  # as if each batch took a minute
    monkeypatch.setattr(time, "perf_counter", lambda: next(clock))
    stream = io.StringIO()
    run_epoch(Progress("text", epochs=1, stream=stream))
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
    run_epoch(Progress("text", epochs=1, stream=stream))
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
        progress.batch(images=32, loss=0.5)
    (box,) = shown
    bar, label = box.children
    assert bar.value == 3 and "epoch 1/2" in label.value and "img/s" in label.value
    progress.start_epoch(2, batches=3)
    assert bar.value == 0 and shown == [box]  # one bar for the whole run
    progress.close()
    assert bar.bar_style == "success"
