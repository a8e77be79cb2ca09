"""The live-vs-EMA plot: one panel per quantity (loss, each metric), redrawn in place as rows are added."""

from __future__ import annotations

import io
import math
import os
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, Locator, MaxNLocator, NullLocator

from ..files import atomic_write_bytes
from . import _env
from .history import direction, score_columns

LIVE_COLOR = "tab:blue"
EMA_COLORS = ("tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown", "tab:pink")
TRAIN_COLOR = "0.6"
_PANEL_INCHES = (4.2, 3.4)  # width, height of one panel
_MARKER_ROWS = 40  # a series with fewer points gets a marker on each: one point must show, too


class NotebookFigure(Figure):
    """A matplotlib figure that Jupyter shows as a PNG when it is a cell's value, with or without pyplot."""

    def _repr_png_(self) -> bytes:
        png = io.BytesIO()
        self.savefig(png, format="png", dpi=90)
        return png.getvalue()


class _LogTicks(Locator):
    """Ticks for a log axis at round values, as many as fit: 1-10-100 over many decades, 1-2-5 over a
    few, finer steps within one decade (matplotlib's own leaves a loss that stays within a decade with
    one label, or with crowded 1.25x10^-1 style labels). Label them with ``_plain_number``.

    Example:
        >>> _LogTicks().tick_values(0.12, 0.33).tolist()  # a loss within one decade
        [0.12, 0.15, 0.2, 0.25, 0.3]
        >>> _LogTicks().tick_values(0.04, 1.6).tolist()  # two decades
        [0.05, 0.1, 0.2, 0.5, 1.0]
    """

    MANTISSAS = ((1,), (1, 2, 5), (1, 1.5, 2, 3, 5, 7), (1, 1.2, 1.5, 2, 2.5, 3, 4, 5, 6, 7, 8, 9))

    def __init__(self, fewest: int = 4, most: int = 8):
        self.fewest, self.most = fewest, most

    def __call__(self):
        return self.tick_values(*self.axis.get_view_interval())

    def tick_values(self, vmin: float, vmax: float) -> np.ndarray:
        vmin, vmax = sorted((vmin, vmax))
        if not 0 < vmin < vmax or not np.isfinite(vmax):
            return MaxNLocator(self.most).tick_values(vmin, vmax)
        decades = range(math.floor(math.log10(vmin)), math.ceil(math.log10(vmax)) + 1)
        for mantissas in self.MANTISSAS:
            # round() keeps 0.3 from printing as 0.30000000000000004
            ticks = [round(m * 10.0**d, 12 - d) for d in decades for m in mantissas]
            ticks = np.array([t for t in ticks if vmin <= t <= vmax])
            if len(ticks) >= self.fewest:
                return ticks[:: math.ceil(len(ticks) / self.most)]  # many decades: every n-th power
        # a sliver of a decade: evenly spaced round values, as on a linear axis
        return MaxNLocator(4, min_n_ticks=3, steps=[1, 2, 5, 10]).tick_values(vmin, vmax)


def _plain_number(value: float, _position=None) -> str:
    """A tick label without mathtext: ``0.05``, ``1``, ``2.5``, ``1e-05``."""
    return f"{value:g}"


def plot_history(
    history: pd.DataFrame,
    *,
    best_epoch: float | None = None,
    figure: Figure | None = None,
    in_epoch: pd.DataFrame | None = None,
) -> Figure:
    """Draw a training log (``fit``'s DataFrame, or ``pd.read_csv("history.csv")``) as live vs EMA curves.

    One panel per quantity; the live model in blue, each EMA in its own fixed colour, the training loss in
    grey; ``best_epoch`` is marked with a dotted line. One legend for all panels, beside them, so it never
    hides a curve. Whole epochs get whole-number ticks; rows at fractions of an epoch (scored within
    epochs) get ticks at simple fractions. A series with missing rows (scored less often than another) is
    drawn through the rows it has. ``in_epoch`` (columns ``epoch``, ``train_loss``) continues the training
    loss into the epoch in progress, whose end the x axis then reaches (a log of no rows yet draws the
    loss panel alone). The figure is not registered with pyplot, so it never piles up or shows by itself:
    Jupyter shows it when it is a cell's value; ``fig.savefig`` saves it.

    Example:
        >>> log = pd.DataFrame({"epoch": [1, 2], "train_loss": [1.0, 0.6], "live_loss": [0.9, 0.7],
        ...                     "ema_loss": [0.95, 0.65]})
        >>> fig = plot_history(log, best_epoch=2)
        >>> [ax.get_title() for ax in fig.axes]
        ['loss']
    """
    groups = _panels(history, in_epoch)
    if not groups:
        raise ValueError(
            "The history has no score columns (live_<metric>, ema_<metric>) and no train_loss: pass a "
            "training log (a LiveLog's history, fit's DataFrame, or the history.csv either wrote). Columns "
            f"given: {list(history.columns)}."
        )
    if figure is None:
        figure = NotebookFigure()
    figure.clear()
    epochs = history["epoch"] if "epoch" in history else pd.Series(range(1, len(history) + 1))
    epochs = epochs.astype(float).reset_index(drop=True)
    whole_epochs = bool((epochs == epochs.round()).all())  # the rows' epochs; in_epoch's are not rows
    if in_epoch is not None:  # the training loss so far this epoch, drawn on from the last row
        train = pd.concat([history.get("train_loss", pd.Series(math.nan, index=history.index)),
                           in_epoch["train_loss"]], ignore_index=True)  # fmt: skip
        train_epochs = pd.concat([epochs, in_epoch["epoch"].astype(float)], ignore_index=True)
        epoch_end = math.ceil(train_epochs.max())
    else:
        train, train_epochs, epoch_end = history.get("train_loss"), epochs, None
    legend_inches = _legend_inches(["train", *(model for columns in groups.values() for model in columns)])
    panel_width, height = _PANEL_INCHES
    width = panel_width * len(groups) + legend_inches
    figure.set_size_inches(width, height)
    # Fixed margins, no layout engine: fit pays the drawing time after every epoch.
    panels_right = 1 - legend_inches / width
    figure.subplots_adjust(left=0.6 / width, right=panels_right, bottom=0.15, top=0.9, wspace=0.3)
    for ax, (quantity, columns) in zip(figure.subplots(1, len(groups), squeeze=False)[0], groups.items()):
        series = []  # (label, epochs, values, style)
        if quantity == "loss" and train is not None:
            series.append(("train", train_epochs, train, {"color": TRAIN_COLOR, "linestyle": "--"}))
        emas = iter(EMA_COLORS)
        for model, column in columns.items():
            color = LIVE_COLOR if model == "live" else next(emas, None)
            series.append((model, epochs, history[column], {"color": color}))
        drawn = []
        for label, at, values, style in series:
            values = values.astype(float).reset_index(drop=True)
            present = values.notna()
            marker = "." if present.sum() < _MARKER_ROWS else None
            ax.plot(at[present], values[present], marker=marker, label=label, **style)
            drawn.append(values[present])
        if best_epoch is not None:
            ax.axvline(
                best_epoch, color="0.3", linestyle=":", linewidth=1, label=f"best (epoch {best_epoch:g})"
            )
        values = pd.concat(drawn)
        if direction(quantity) == "min" and len(values) and (values > 0).all():
            ax.set_yscale("log")  # losses fall by orders of magnitude; late epochs would look flat
            ax.yaxis.set_major_locator(_LogTicks())
            ax.yaxis.set_major_formatter(FuncFormatter(_plain_number))
            ax.yaxis.set_minor_locator(NullLocator())  # the grid at labelled ticks only: readable, and faster
        ax.set_title(quantity)
        ax.set_xlabel("epoch")
        if whole_epochs:  # no epoch 2.5, and one tick at 1 (not 0.945 ... 1.050) after the first epoch
            ax.xaxis.set_major_locator(MaxNLocator("auto", integer=True, min_n_ticks=1, steps=[1, 2, 5, 10]))
        else:  # rows within epochs: quarters, halves, whole epochs
            ax.xaxis.set_major_locator(MaxNLocator("auto", steps=[1, 2.5, 5, 10]))
        ax.xaxis.set_major_formatter(FuncFormatter(_plain_number))
        if epoch_end is not None:  # the epoch in progress is drawn whole: its curve grows to the right edge
            left = min(ax.get_xlim()[0], epoch_end - 1)
            ax.set_xlim(left, epoch_end + 0.05 * (epoch_end - left))
        ax.grid(alpha=0.3)
    handles = {}
    for ax in figure.axes:  # each label once: live, ema and best appear in every panel
        for handle, label in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(label, handle)
    figure.legend(
        handles.values(),
        handles.keys(),
        loc="upper left",
        bbox_to_anchor=(panels_right + 0.1 / width, 0.9),
        fontsize="small",
        frameon=False,
    )
    return figure


def _panels(history: pd.DataFrame, in_epoch: pd.DataFrame | None) -> dict[str, dict[str, str]]:
    """The quantities to draw, each with its models' score columns; a training loss alone (within the first
    epoch, or a log without scores) is drawn in a loss panel of its own."""
    groups = score_columns(history)
    if in_epoch is not None or "train_loss" in history:
        groups = {"loss": {}} | groups
    return groups


def _legend_inches(labels: list[str]) -> float:
    """Room for the legend beside the panels: the line sample and the longest label, in small text.

    Sized for at least "best (epoch 100)", so the figure keeps its width while a run goes on.
    """
    return 0.5 + 0.065 * max(len("best (epoch 100)"), *map(len, labels))


class LivePlot:
    """``plot_history`` redrawn after every row: in place in a notebook, and as a PNG file if given a path.

    In Jupyter the plot is one output that each ``update`` replaces, so an executed and saved notebook
    holds one final image; elsewhere (a script, CI) nothing is shown and only the file is written. One
    figure is reused for the whole run. A row added by a later cell shows the plot under that cell.

    Example:
        >>> import tempfile
        >>> plot = LivePlot(tempfile.mkdtemp() + "/history.png")
        >>> plot.update(pd.DataFrame({"epoch": [1], "live_loss": [0.9], "ema_loss": [0.95]}), best_epoch=1)
        >>> plot.path.exists()
        True
    """

    def __init__(self, path: str | os.PathLike | None = None, *, show: bool | None = None):
        self.path = None if path is None else Path(path)
        self.show = _env.in_notebook() if show is None else show
        self.figure = NotebookFigure()
        self._handle = None

    def update(
        self, history: pd.DataFrame, *, best_epoch: float | None = None, in_epoch: pd.DataFrame | None = None
    ) -> None:
        """Draw ``history`` (and ``in_epoch``: see ``plot_history``; shown only, the file is the log's)."""
        if not (self.show or (self.path and in_epoch is None)) or not _panels(history, in_epoch):
            return  # nothing would show or keep the figure, or nothing to draw yet (a row of lr alone)
        plot_history(history, best_epoch=best_epoch, figure=self.figure, in_epoch=in_epoch)
        png = io.BytesIO()
        self.figure.savefig(png, format="png", dpi=90)
        if self.path is not None and in_epoch is None:
            atomic_write_bytes(png.getvalue(), self.path)
        if self.show:
            from IPython.display import Image

            if self._handle is None:
                _env.after_cell(self._forget_handle)
            self._handle = _env.display(Image(data=png.getvalue(), format="png"), self._handle)

    def _forget_handle(self) -> None:
        self._handle = None


def plot_scan(table: pd.DataFrame, metric: str, mode: str = "min") -> Figure:
    """Plot ``metric`` against the EMA length from a ``scan`` table, with the best length marked.

    ``mode`` says which is best: ``"min"`` (a loss) or ``"max"`` (an accuracy). Returns a matplotlib
    Figure (shown by Jupyter when it is the cell's value; ``figure.savefig(path)`` writes it).

    Example:
        >>> table = pd.DataFrame({"sigma_rel": [0.05, 0.1], "half_life": [50.0, 100.0], "loss": [0.3, 0.2]})
        >>> figure = plot_scan(table, "loss", mode="min")
    """
    if not isinstance(table, pd.DataFrame) or not {"sigma_rel", "half_life"} <= set(table.columns):
        raise ValueError(
            "plot_scan takes the DataFrame that scan(...) returns (columns sigma_rel, half_life, metrics)."
        )
    metrics = [c for c in table.columns if c not in ("sigma_rel", "half_life")]
    if metric not in metrics:
        raise ValueError(f"metric must be one of the scanned metrics {metrics}, got {metric!r}.")
    if mode not in ("min", "max"):
        raise ValueError(f"mode must be 'min' (lower is better) or 'max' (higher is better), got {mode!r}.")
    if table[metric].isna().all():
        raise ValueError(f"The scan holds no value of {metric!r} to plot.")
    table = table.sort_values("sigma_rel")
    best = table.loc[table[metric].idxmin() if mode == "min" else table[metric].idxmax()]
    figure = NotebookFigure(figsize=(6.4, 4.0), layout="constrained")
    axes = figure.add_subplot()
    axes.plot(table["sigma_rel"], table[metric], "o-", color="C0", label=metric)
    axes.axvline(best["sigma_rel"], color="C1", linestyle="--", linewidth=1)
    axes.plot(
        [best["sigma_rel"]],
        [best[metric]],
        "*",
        color="C1",
        markersize=14,
        label=(
            f"chosen: sigma_rel {best['sigma_rel']:.3g} (half-life {best['half_life']:,.3g} steps), "
            f"{metric} {best[metric]:.4g}"
        ),
    )
    axes.set_xscale("log")
    plain = FuncFormatter(lambda value, _: f"{value:g}")  # 0.04, not 4 x 10^-2
    axes.xaxis.set_major_formatter(plain)
    axes.xaxis.set_minor_formatter(plain)
    axes.set_xlabel("EMA length, sigma_rel (log scale)")
    axes.set_ylabel(metric)
    better = "lower" if mode == "min" else "higher"
    axes.set_title(f"Post-hoc EMA: {metric} by EMA length ({better} is better)")
    axes.legend(loc="best", fontsize="small")
    return figure
