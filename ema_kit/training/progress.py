"""What the user watches while training runs: per-batch progress, and the live-vs-EMA table as it grows.

With a Jupyter front end watching: an ipywidgets bar with the running loss and images/s, and the table
updated in place. When the cell that shows the bar ends (the run finished, stopped or raised), the bar
becomes a plain line of text, its last state: a saved notebook reopened without its kernel cannot show a
widget ("Error displaying widget"), but shows that line. Anywhere else (Kaggle's "Save & Run All",
nbconvert, a terminal, CI): text, one line per row (a terminal also gets a self-overwriting line during
the epoch, and an epoch that runs long reports at its quarters), never one line per batch.
"""

from __future__ import annotations

import math
import numbers
import sys
import time
from collections.abc import Callable

import pandas as pd

from . import _env

_REFRESH_SECONDS = 0.2  # redraw the bar at most this often: drawing is not free
_QUIET_SECONDS = 30.0  # a log line mid-epoch only when the epoch has run this long
_TABLE_ROWS = 30  # the notebook table shows the latest rows; the whole log is fit's return value


def format_value(column: str, value) -> str:
    """A log value as the table, the bar and the text lines show it: 4 decimals (``0.9833``, ``1.0000``,
    as Keras prints), a value under 0.001 in scientific notation (``5.123e-04``), ``epoch`` as ``3`` or
    ``1.5``, ``seconds`` to a tenth. So a column's decimals line up, and the bar's ``train_loss`` is the
    table's. The log itself (fit's return value, ``history.csv``) keeps full precision.

    Example:
        >>> format_value("ema_loss", 0.051234), format_value("lr", 3e-4), format_value("epoch", 2.0)
        ('0.0512', '3.000e-04', '2')
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return str(value)
    if column == "epoch":
        return f"{round(float(value), 4):g}"
    if column == "seconds":
        return f"{value:.1f}"
    if isinstance(value, numbers.Integral):
        return str(value)
    return f"{value:.4f}" if value == 0 or not abs(value) < 1e-3 else f"{value:.3e}"


class _Table:
    """The latest rows of the log as a notebook shows them: rounded by ``format_value``, no index column."""

    def __init__(self, history: pd.DataFrame):
        rows = history.tail(_TABLE_ROWS)
        self.frame = pd.DataFrame({c: [format_value(c, v) for v in rows[c].tolist()] for c in rows.columns})

    def _repr_html_(self) -> str:
        return self.frame.to_html(index=False)

    def __repr__(self) -> str:
        return self.frame.to_string(index=False)


class Progress:
    """Progress of the current epoch, and the table of the log (``LiveLog`` drives it, for fit and any loop).

    ``mode`` is ``"widget"``, ``"text"``, ``"auto"`` (a widget where a front end can show one) or
    ``"off"``. ``train_loss`` returns the epoch's mean training loss so far; it is called only when the
    bar is drawn, so the loss is read (from the GPU, perhaps) only then, and bar and log show one number.

    Example:
        >>> progress = Progress("text", epochs=2, train_loss=lambda: 0.5)
        >>> progress.start_epoch(1, batches=3)
        >>> for _ in range(3):
        ...     progress.batch(images=32)
        >>> log = pd.DataFrame({"epoch": [1], "train_loss": [0.5], "live_loss": [0.4], "ema_loss": [0.45]})
        >>> progress.show_row(log)  # doctest: +ELLIPSIS
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
        self._bar = self._bar_shown = self._table = None
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

    def show_row(self, history: pd.DataFrame) -> None:
        """Show the table with the row just added (``history``'s last)."""
        if self.mode == "off":
            return
        if self._tty:
            print("\r\033[K", end="", file=self.stream)
        if self._notebook:
            if self._table is None:  # a new table under this cell; the next cell that adds rows shows its own
                _env.after_cell(self._forget_table)
            self._table = _env.display(_Table(history), self._table)
            if self.mode == "text":  # headless: also leave a line in the run's log
                print(f"{self._prefix()}  {self._status(time.perf_counter())}", file=self.stream, flush=True)
            return
        row = history.iloc[-1]
        scores = "  ".join(
            f"{name} {format_value(name, row[name])}"
            for name in history.columns
            if name not in ("epoch", "lr", "seconds") and name in row
        )
        now = time.perf_counter()
        print(f"{self._prefix(row['epoch'])}  {scores}{self._speed(now)}", file=self.stream, flush=True)

    def close(self) -> None:
        """End of the run, or of the notebook cell that shows the bar: the bar becomes its last line.

        What the user sees live and what a saved notebook keeps are the same plain text, in the bar's place.
        """
        if self._bar is None:
            return
        from IPython.display import Pretty

        if self._progress.value != self.done:  # batches counted since the bar was last drawn
            self._draw(time.perf_counter())
        bar, self._bar = self._bar, None
        _env.display(Pretty(self._label.value), self._bar_shown)
        bar.close()  # after it is replaced: a closed widget still shown reads as an error

    def _forget_table(self) -> None:
        self._table = None

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
        shown = "" if math.isnan(loss) else f"  train_loss {format_value('train_loss', loss)}"
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
            self._bar_shown = _env.display(self._bar)
            _env.after_cell(self.close)  # however the cell ends, a line of text is left, not a widget
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
