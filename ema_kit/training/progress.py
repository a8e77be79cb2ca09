"""What the user watches while training runs: per-batch progress, and the live-vs-EMA table as it grows.

With a Jupyter front end watching: an ipywidgets bar with the running loss and images/s, and the table
as a DataFrame updated in place. Anywhere else (Kaggle's "Save & Run All", nbconvert, a terminal, CI):
text, one line per finished epoch (a terminal also gets a self-overwriting line during the epoch, and
an epoch that runs long reports at its quarters), never one line per batch.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable

import pandas as pd

from . import _env

_REFRESH_SECONDS = 0.2  # redraw the bar at most this often: drawing is not free
_QUIET_SECONDS = 30.0  # a log line mid-epoch only when the epoch has run this long
_TABLE_ROWS = 30  # the notebook table shows the latest epochs; the whole log is fit's return value


class Progress:
    """Progress of the current epoch, and the per-epoch table (``LiveLog`` drives it, for fit and any loop).

    ``mode`` is ``"widget"``, ``"text"``, ``"auto"`` (a widget where a front end can show one) or
    ``"off"``. ``train_loss`` returns the epoch's mean training loss so far; it is called only when the
    bar is drawn, so the loss is read (from the GPU, perhaps) only then, and bar and log show one number.

    Example:
        >>> progress = Progress("text", epochs=2, train_loss=lambda: 0.5)
        >>> progress.start_epoch(1, batches=3)
        >>> for _ in range(3):
        ...     progress.batch(images=32)
        >>> log = pd.DataFrame({"epoch": [1], "train_loss": [0.5], "live_loss": [0.4], "ema_loss": [0.45]})
        >>> progress.end_epoch(log)  # doctest: +ELLIPSIS
        epoch 1/2  train_loss 0.5000  live_loss 0.4000  ema_loss 0.4500  ... img/s  ... s
    """

    def __init__(
        self,
        mode: str = "auto",
        *,
        epochs: int | None,
        stream=None,
        train_loss: Callable[[], float] | None = None,
    ):
        if not isinstance(mode, str) or mode not in ("auto", "widget", "text", "off"):
            error = ValueError if isinstance(mode, str) else TypeError
            raise error(f"progress must be 'auto', 'widget', 'text' or 'off', got {mode!r}.")
        if mode == "auto":
            mode = "widget" if _env.widgets_available() else "text"
        self.mode, self.epochs = mode, epochs
        self.stream = stream or sys.stdout
        self.train_loss = train_loss or (lambda: math.nan)
        self._tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self._notebook = _env.in_notebook() and stream is None
        self._bar = self._table = None
        self.epoch, self.batches = 0, None
        self.done = self.images = 0
        self.started = self._drawn = time.perf_counter()
        self._next_quarter = 1

    def start_epoch(self, epoch: int, *, batches: int | None) -> None:
        """A new epoch of ``batches`` batches (None for a loader without a length: the count goes up)."""
        self.epoch, self.batches = epoch, batches
        self.done = self.images = 0
        self.started = self._drawn = time.perf_counter()
        self._next_quarter = 1
        if self.mode == "widget":
            self._start_bar()

    def batch(self, *, images: int) -> None:
        """Count one finished training batch of ``images`` rows."""
        self.done += 1
        self.images += images
        now = time.perf_counter()
        if self.mode == "widget" or (self.mode == "text" and self._tty):
            if now - self._drawn >= _REFRESH_SECONDS or self.done == self.batches:
                self._drawn = now
                self._draw(now)
        elif self.mode == "text" and self._at_milestone():
            if now - self.started >= _QUIET_SECONDS and self.done != self.batches:
                print(f"{self._prefix()}  {self._status(now)}", file=self.stream, flush=True)

    def end_epoch(self, history: pd.DataFrame) -> None:
        """Show the table with the row just added (``history``'s last)."""
        if self.mode == "off":
            return
        if self._tty:
            print("\r\033[K", end="", file=self.stream)
        if self._notebook:
            self._table = _env.display(history.tail(_TABLE_ROWS), self._table)
            if self.mode == "text":  # headless: also leave a line in the run's log
                print(f"{self._prefix()}  {self._status(time.perf_counter())}", file=self.stream, flush=True)
            return
        row = history.iloc[-1]
        scores = "  ".join(
            f"{name} {_format(row[name])}"
            for name in history.columns
            if name not in ("epoch", "lr", "seconds") and name in row
        )
        now = time.perf_counter()
        print(f"{self._prefix(row['epoch'])}  {scores}{self._speed(now)}", file=self.stream, flush=True)

    def close(self) -> None:
        """End of training: the bar stays in the notebook, showing the last epoch, marked finished."""
        if self._bar is not None:
            self._progress.bar_style = "success"  # not closed: a closed widget shows as an error
            self._bar = None

    def _at_milestone(self) -> bool:
        """Whether a long epoch reports now: at its quarters, or at batch 1, 2, 4, 8, ... when the count is
        unknown (a loader without a length), so the log stays a few lines per epoch either way."""
        if self.batches is None:
            reached = self.done == self._next_quarter
            self._next_quarter *= 2 if reached else 1
            return reached
        reached = self.done >= self._next_quarter * self.batches / 4
        self._next_quarter += reached
        return reached

    def _prefix(self, epoch=None) -> str:
        epoch = self.epoch if epoch is None else f"{float(epoch):g}"  # a row may sit mid-epoch: 1.5
        return f"epoch {epoch}" + ("" if self.epochs is None else f"/{self.epochs}")

    def _status(self, now: float) -> str:
        of = "" if self.batches is None else f"/{self.batches}"  # a loader without a length counts up
        loss = self.train_loss()
        shown = "" if math.isnan(loss) else f"  train_loss {loss:.4f}"
        return f"batch {self.done}{of}{shown}{self._speed(now)}"

    def _speed(self, now: float) -> str:
        """Images per second and seconds of the epoch so far ("" before any batch was counted)."""
        if not self.images:
            return ""
        rate = self.images / max(now - self.started, 1e-9)
        return f"  {rate:,.0f} img/s  {now - self.started:.1f} s"

    def _start_bar(self) -> None:
        import ipywidgets

        if self._bar is None:
            self._progress = ipywidgets.IntProgress(min=0, max=max(self.batches or 1, 1))
            self._label = ipywidgets.HTML()
            self._bar = ipywidgets.HBox([self._progress, self._label])
            _env.display(self._bar)
        self._progress.max = max(self.batches or 1, 1)
        self._progress.value = 0
        self._label.value = self._prefix()

    def _draw(self, now: float) -> None:
        if self.mode == "widget":
            self._progress.max = max(self._progress.max, self.done)  # an unknown length: the bar fills
            self._progress.value = self.done
            self._label.value = f"{self._prefix()}  {self._status(now)}"
        else:
            print(f"\r\033[K{self._prefix()}  {self._status(now)}", end="", file=self.stream, flush=True)


def _format(value) -> str:
    if isinstance(value, float) and not value.is_integer():
        return f"{value:.4f}" if abs(value) >= 1e-3 else f"{value:.2e}"
    return str(value)
