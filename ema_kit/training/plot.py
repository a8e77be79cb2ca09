"""The live-vs-EMA plot: one panel per quantity (loss, each metric), redrawn in place as epochs finish."""

from __future__ import annotations

import io
import os
from pathlib import Path

import pandas as pd
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator

from ..files import atomic_write_bytes
from . import _env
from .history import direction, score_columns

LIVE_COLOR = "tab:blue"
EMA_COLORS = ("tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown", "tab:pink")
TRAIN_COLOR = "0.6"


class NotebookFigure(Figure):
    """A matplotlib figure that Jupyter shows as a PNG when it is a cell's value, with or without pyplot."""

    def _repr_png_(self) -> bytes:
        png = io.BytesIO()
        self.savefig(png, format="png", dpi=90)
        return png.getvalue()


def plot_history(
    history: pd.DataFrame, *, best_epoch: int | None = None, figure: Figure | None = None
) -> Figure:
    """Draw a training log (``fit``'s DataFrame, or ``pd.read_csv("history.csv")``) as live vs EMA curves.

    One panel per quantity; the live model in blue, each EMA in its own fixed colour, the training loss in
    grey; ``best_epoch`` is marked with a dotted line. The figure is not registered with pyplot, so it
    never piles up or shows by itself: Jupyter shows it when it is a cell's value; ``fig.savefig`` saves it.

    Example:
        >>> log = pd.DataFrame({"epoch": [1, 2], "train_loss": [1.0, 0.6], "live_loss": [0.9, 0.7],
        ...                     "ema_loss": [0.95, 0.65]})
        >>> fig = plot_history(log, best_epoch=2)
        >>> [ax.get_title() for ax in fig.axes]
        ['loss']
    """
    groups = score_columns(history)
    if not groups:
        raise ValueError(
            "The history has no score columns (live_<metric>, ema_<metric>); pass fit's DataFrame or the "
            f"history.csv it wrote. Columns given: {list(history.columns)}."
        )
    if figure is None:
        figure = NotebookFigure()
    figure.clear()
    figure.set_size_inches(4.2 * len(groups), 3.4)
    # Fixed margins and legend corners: a layout engine and loc="best" would triple the drawing time,
    # which fit pays after every epoch.
    figure.subplots_adjust(
        left=0.5 / (4.2 * len(groups)) + 0.04, right=0.98, bottom=0.15, top=0.9, wspace=0.28
    )
    epochs = history["epoch"] if "epoch" in history else pd.Series(range(1, len(history) + 1))
    for ax, (quantity, columns) in zip(figure.subplots(1, len(groups), squeeze=False)[0], groups.items()):
        if quantity == "loss" and "train_loss" in history:
            ax.plot(epochs, history["train_loss"], color=TRAIN_COLOR, linestyle="--", label="train")
        emas = iter(EMA_COLORS)
        for model, column in columns.items():
            color = LIVE_COLOR if model == "live" else next(emas, None)
            ax.plot(
                epochs, history[column], color=color, marker="." if len(history) < 40 else None, label=model
            )
        if best_epoch is not None:
            ax.axvline(
                best_epoch, color="0.3", linestyle=":", linewidth=1, label=f"best (epoch {best_epoch})"
            )
        falling = direction(quantity) == "min"
        if falling and (history[list(columns.values())].to_numpy(dtype=float) > 0).all():
            ax.set_yscale("log")  # losses fall by orders of magnitude; late epochs would look flat
            ax.yaxis.set_minor_locator(LogLocator(subs=(2.0, 5.0)))  # fewer ticks: a third faster to draw
        ax.set_title(quantity)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # no epoch 2.5
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small", loc="upper right" if falling else "lower right")  # the empty corner
    return figure


class LivePlot:
    """``plot_history`` redrawn after every epoch: in place in a notebook, and as a PNG file if given a path.

    In Jupyter the plot is one output that each ``update`` replaces, so an executed and saved notebook
    holds one final image; elsewhere (a script, CI) nothing is shown and only the file is written. One
    figure is reused for the whole run.

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

    def update(self, history: pd.DataFrame, *, best_epoch: int | None = None) -> None:
        plot_history(history, best_epoch=best_epoch, figure=self.figure)
        if not (self.path or self.show):
            return
        png = io.BytesIO()
        self.figure.savefig(png, format="png", dpi=90)
        if self.path is not None:
            atomic_write_bytes(png.getvalue(), self.path)
        if self.show:
            from IPython.display import Image

            self._handle = _env.display(Image(data=png.getvalue(), format="png"), self._handle)


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
