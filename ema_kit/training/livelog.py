"""``LiveLog``: the live-vs-EMA log as a DataFrame, its plot redrawn in place, a progress bar, and its files.

The headline view of ema_kit, for ``fit`` (which runs one) and for a training loop of your own alike.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

import pandas as pd
import torch

from .. import _checks
from .._batches import batches_per_epoch, rows
from . import _env
from .callbacks import Callback, FitState, is_main_process
from .history import append_row, log_value, score_row, write_csv
from .plot import LivePlot
from .progress import Progress

# Within an epoch the training loss moves on the live plot (a notebook with a front end watching) at most
# every _PREVIEW_SECONDS, and less often when a redraw (a PNG of the figure, ~0.1-0.3 s) would take more
# than _PREVIEW_SHARE of the training time.
_PREVIEW_SECONDS = 5.0
_PREVIEW_SHARE = 0.03


class LiveLog(Callback):
    """The log of a training run, one row per scoring, with the live and each EMA model side by side.

    It keeps ``history`` (a pandas DataFrame), redraws the live plot in place, shows a progress bar (an
    ipywidgets bar where a notebook front end shows one, text otherwise) and the table, and with
    ``out_dir`` writes ``history.csv`` and ``history.png`` after every row. Within a long epoch the plot's
    training loss moves every few seconds, up to the batch just counted. When the notebook cell ends, the
    bar becomes a plain line (a saved notebook shows that, not a dead widget). ``fit`` runs one (pass your
    own in ``callbacks=`` to set its options); in a loop of your own, three calls give the same view:

    - ``track(train_loader)``: the loader's batches, one epoch, counted on the progress bar;
    - ``add_loss(loss)`` (optional): a training batch's loss, for the bar and the row's ``train_loss``,
      the mean per sample since the last row, as ``fit``'s (a tensor is read only when the bar is drawn,
      so the loop gains no GPU sync per step);
    - ``add(live=scores, ema=scores, **columns)``: a row. Each dict of scores (``evaluate``'s) becomes
      ``<name>_<quantity>`` columns; other values are columns as they are. ``epoch`` defaults to the
      epochs tracked, and within a tracked epoch to the fraction done (called in the loop body of batch 6
      of 11 of epoch 2: ``1.5455``; a loader without a length needs ``epoch=``), so scoring inside long
      epochs is an ``if`` in the loop; ``seconds`` since the last row.

    The stop button (KeyboardInterrupt) is not caught: it stops your loop, and a notebook's Run All, where
    it lands. A row is one unit for it: it lands before the row or after its table, plot and files, never
    between, so what the log shows is what ``history.csv`` holds.

    Args:
        out_dir: the folder for ``history.csv`` and ``history.png`` (in ``fit``: fit's ``out_dir``).
        progress: ``"widget"``, ``"text"``, ``"off"``; ``"auto"``: a widget where a notebook can show one.
        plot: the live plot, in a notebook, and as ``history.png`` in ``out_dir``.
        epochs: the number of epochs, shown as "epoch 3/10"; the bar is marked finished with the row of
            the last (in ``fit``: fit's ``epochs``).

    Example:
        >>> import torch
        >>> from ema_kit import ModelEMA, evaluate
        >>> from ema_kit.examples.digits import digits_loaders
        >>> from ema_kit.examples.demo import SmallCNN
        >>> train_loader, val_loader = digits_loaders(batch_size=256)
        >>> model = SmallCNN(width=8)
        >>> ema = ModelEMA(model, decay=0.9)
        >>> optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
        >>> live_log = LiveLog(progress="off")
        >>> for epoch in (1, 2):  # (a new model trains in train mode; evaluate leaves it so)
        ...     for images, labels in live_log.track(train_loader):
        ...         loss = torch.nn.functional.cross_entropy(model(images), labels)
        ...         optimizer.zero_grad()
        ...         loss.backward()
        ...         optimizer.step()
        ...         ema.update(model)
        ...         live_log.add_loss(loss)
        ...     scores = {"live": evaluate(model, val_loader), "ema": evaluate(ema.module, val_loader)}
        ...     live_log.add(epoch=epoch, **scores)
        >>> live_log.history.columns.tolist()  # doctest: +NORMALIZE_WHITESPACE
        ['epoch', 'train_loss', 'live_loss', 'ema_loss', 'live_accuracy', 'ema_accuracy', 'seconds']
    """

    def __init__(
        self,
        *,
        out_dir: str | os.PathLike | None = None,
        progress: str = "auto",
        plot: bool = True,
        epochs: int | None = None,
    ):
        self.out_dir = None if out_dir is None else Path(out_dir)
        self.plot = _checks.check_bool("plot", plot)
        self.epochs = None if epochs is None else _checks.check_int("epochs", epochs, minimum=1)
        self._progress_mode = progress
        self.progress = Progress(progress, epochs=self.epochs, train_loss=lambda: self.train_loss)
        self.history = pd.DataFrame()
        self.best_epoch: int | None = None  # marked in the plot (fit sets it)
        self._live_plot: LivePlot | None = None
        self._state: FitState | None = None  # fit's, while fit runs this log
        self._epoch = 0  # epochs tracked
        self._tracking: object | None = None  # the track() call running now
        self._batch: int | None = None  # the batch of the tracked epoch being trained (1-based), if any
        self._rows = 1  # rows of the batch being trained, which weigh its loss
        self._loss_sum: torch.Tensor | float = 0.0
        self._loss_rows = 0
        self._started = time.perf_counter()
        self._in_epoch: list[tuple[float, float]] = []  # (epoch, train_loss) drawn since the last row
        self._drawn = self._started  # when the plot was last drawn, and how long that took
        self._draw_seconds = 0.0
        self._watched: bool | None = None  # a notebook front end shows the plot live (asked once)

    # -- a loop of your own ---------------------------------------------------------------------------------

    def track(self, loader: Iterable) -> Iterator:
        """Yield ``loader``'s batches as one epoch, each counted on the progress bar when the loop is done
        with it."""
        self._epoch += 1
        self._tracking = tracking = object()
        self._start_epoch(self._epoch, batches_per_epoch(loader))
        try:
            for self._batch, batch in enumerate(loader, start=1):
                pair = isinstance(batch, (tuple, list)) and len(batch) == 2 and not isinstance(batch[0], str)
                self._rows = rows(*batch) if pair else rows(batch)  # (inputs, targets), or one whole
                yield batch
                self._batch_done(self._rows)
        finally:
            if self._tracking is tracking:  # a stopped loop held by a name may close in a later epoch
                self._batch = None

    def add_loss(self, loss: torch.Tensor | float) -> None:
        """Count one training batch's (mean) loss, weighted by the rows of the batch being tracked."""
        if isinstance(loss, torch.Tensor):
            loss = loss.detach().float()  # summed on its device; read only when the bar or a row needs it
        self._loss_sum = self._loss_sum + loss * self._rows
        self._loss_rows += self._rows

    def _epoch_now(self) -> float:
        """Where a row added now sits: the epochs tracked, less what is left of the tracked epoch."""
        batches = self.progress.batches
        if self._batch is None or (batches is not None and self._batch >= batches):  # between epochs, an end
            return self._epoch or len(self.history) + 1
        if not batches:
            raise ValueError(
                f"add() was called within epoch {self._epoch} of a loader without len(), so where the row "
                "sits in the epoch is unknown; pass epoch= (e.g. epoch=1.5), or add the row after the loop."
            )
        return self._epoch - 1 + self._batch / batches

    @property
    def train_loss(self) -> float:
        """The mean training loss per row since the last row was added (NaN before any loss)."""
        if self._state is not None:
            return self._state.train_loss
        return float(self._loss_sum) / self._loss_rows if self._loss_rows else math.nan

    def add(self, row: Mapping | None = None, /, **columns) -> None:
        """Add a row to ``history``, then show and write it (the table, the plot, the files).

        Each model's scores come as a dict under its name, ``live`` or one that starts with ``ema`` (``ema``,
        ``emaslow``, ``ema0.999``: no underscore, as the columns are ``<model>_<quantity>``); any other
        keyword is a column of its own (``lr=...``). Tensors and numpy values of one element are logged as
        numbers. A row that cannot be logged is refused before anything is written.

        Example:
            >>> log = LiveLog(progress="off")
            >>> log.add(live={"loss": 0.5}, ema={"loss": 0.4}, lr=0.1)
            >>> log.history.to_dict("records")[0]["ema_loss"]
            0.4
        """
        columns = {**(row or {}), **columns}
        scores = {name: value for name, value in columns.items() if isinstance(value, Mapping)}
        others = {name: log_value(name, value) for name, value in columns.items() if name not in scores}
        new = {"epoch": others.pop("epoch") if "epoch" in others else self._epoch_now()}
        if "train_loss" in others or self._loss_rows:
            new["train_loss"] = others.pop("train_loss", self.train_loss)
        new |= score_row(scores) | others
        new.setdefault("seconds", time.perf_counter() - self._started)
        with _env.finish_before_stopping():  # the row, its table, plot and files: all or none
            self.history = append_row(self.history, new)
            self._show()  # the bar's last line still shows the loss of the row
            self._loss_sum, self._loss_rows, self._started = 0.0, 0, time.perf_counter()
            if self.epochs is not None and new["epoch"] >= self.epochs:  # the last row: the bar is done
                self.progress.close()

    # -- as fit's callback ----------------------------------------------------------------------------------

    def on_fit_start(self, state: FitState) -> None:
        self._state, self.epochs = state, state.epochs
        self.out_dir = self.out_dir or state.out_dir
        shows = is_main_process()  # one process shows and writes
        mode = self._progress_mode if shows else "off"
        # A new bar, table and plot for this run (a notebook shows them under the cell that runs it).
        self.progress = Progress(mode, epochs=state.epochs, train_loss=lambda: self.train_loss)
        self._live_plot, self._in_epoch = None, []
        if not shows:
            self.plot, self.out_dir = False, None
        self.history, self.best_epoch = state.history, state.best_epoch
        if state.resumed_from is not None:
            if self.progress.mode != "off":
                done = " (all of them: nothing left to train)" if state.epoch >= state.epochs else ""
                print(f"Resumed from {state.resumed_from} after epoch {state.epoch} of {state.epochs}{done}.")
            if len(self.history):  # a rerun notebook shows the run so far
                self._draw()

    def on_epoch_start(self, state: FitState) -> None:
        self._start_epoch(state.epoch, batches_per_epoch(state.train_loader))

    def on_batch_end(self, state: FitState) -> None:
        self._batch_done(state.rows)

    def on_row_added(self, state: FitState) -> None:
        self.history, self.best_epoch = state.history, state.best_epoch
        self._show()  # fit holds the stop button off until the row's files are written too

    def on_fit_end(self, state: FitState) -> None:
        self.progress.close()
        self._state = None

    # -- showing --------------------------------------------------------------------------------------------

    def _start_epoch(self, epoch: int, batches: int | None) -> None:
        self._epoch = epoch
        self._started = self._drawn = time.perf_counter()
        self.progress.start_epoch(epoch, batches=batches)

    def _batch_done(self, rows: int) -> None:
        """Count a finished training batch; every few seconds, draw the training loss so far on the plot."""
        self.progress.batch(images=rows)
        if self._watched is None:
            self._watched = _env.watched()
        if not (self.plot and self._watched and self.progress.batches):  # seen live, the epoch's length known
            return
        if time.perf_counter() - self._drawn < max(_PREVIEW_SECONDS, self._draw_seconds / _PREVIEW_SHARE):
            return
        loss = self.train_loss
        if math.isfinite(loss):
            self._in_epoch.append((self._epoch - 1 + self.progress.done / self.progress.batches, loss))
            self._draw(pd.DataFrame(self._in_epoch, columns=["epoch", "train_loss"]))

    def _show(self) -> None:
        if self.out_dir is not None:
            write_csv(self.history, self.out_dir / "history.csv")
        self._in_epoch = []  # the row's train_loss is where they were leading
        self._draw()
        self.progress.show_row(self.history)

    def _draw(self, in_epoch: pd.DataFrame | None = None) -> None:
        if not self.plot:
            return
        if self._live_plot is None:
            self._live_plot = LivePlot(None if self.out_dir is None else self.out_dir / "history.png")
        started = time.perf_counter()
        self._live_plot.update(self.history, best_epoch=self.best_epoch, in_epoch=in_epoch)
        self._drawn = time.perf_counter()
        self._draw_seconds = self._drawn - started
