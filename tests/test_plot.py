"""The live-vs-EMA plot (ema_kit/training/plot.py): panels, colours, best epoch, ticks and labels a reader can
read at any run length, the legend beside the curves, headless PNG, one notebook output."""

import json

import nbformat
import numpy as np
import pandas as pd
import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg
from nbclient import NotebookClient

from ema_kit.training import _env
from ema_kit.training.plot import EMA_COLORS, LIVE_COLOR, LivePlot, plot_history

LOG = pd.DataFrame({
    "epoch": [1, 2, 3], "train_loss": [1.0, 0.5, 0.3], "live_loss": [0.9, 0.6, 0.5],
    "ema_loss": [0.95, 0.5, 0.4], "live_accuracy": [0.5, 0.7, 0.75], "ema_accuracy": [0.45, 0.72, 0.8],
    "lr": [0.1] * 3, "seconds": [1.0] * 3,
})  # fmt: skip


def test_one_panel_per_quantity_with_live_and_ema_in_fixed_colours():
    fig = plot_history(LOG, best_epoch=3)
    assert [ax.get_title() for ax in fig.axes] == ["loss", "accuracy"]
    lines = {line.get_label(): line for line in fig.axes[1].get_lines()}
    assert lines["live"].get_color() == LIVE_COLOR and lines["ema"].get_color() == EMA_COLORS[0]
    assert list(lines["ema"].get_ydata()) == [0.45, 0.72, 0.8]
    assert "best (epoch 3)" in lines and "train" in {line.get_label() for line in fig.axes[0].get_lines()}


def test_each_decay_gets_its_own_colour():
    log = LOG.rename(columns={"ema_loss": "ema0.9_loss", "ema_accuracy": "ema0.9_accuracy"})
    log["ema0.99_loss"], log["ema0.99_accuracy"] = 0.3, 0.9
    colours = {line.get_label(): line.get_color() for line in plot_history(log).axes[0].get_lines()}
    assert colours["ema0.9"] == EMA_COLORS[0] and colours["ema0.99"] == EMA_COLORS[1]


def _log(epochs, *, start=1.5, end=0.05) -> pd.DataFrame:
    """A log whose losses fall geometrically from ``start`` to ``end`` over the rows at ``epochs``."""
    epochs = np.asarray(epochs, dtype=float)
    loss = start * (end / start) ** np.linspace(0, 1, len(epochs))
    return pd.DataFrame({
        "epoch": epochs, "train_loss": loss, "live_loss": loss * 1.1, "ema_loss": loss * 0.9,
        "live_accuracy": 1 - loss / 3, "ema_accuracy": 1 - loss / 3.2,
    })  # fmt: skip


def _drawn(figure):
    """The figure laid out and drawn (as a PNG would be), and the renderer that drew it."""
    canvas = FigureCanvasAgg(figure)
    canvas.draw()
    return canvas.get_renderer()


def _shown_ticks(axis) -> list[float]:
    low, high = sorted(axis.get_view_interval())
    return [t for t in axis.get_ticklocs() if low <= t <= high]


def _shown_labels(axis) -> list:
    """The tick labels a reader sees on ``axis``: non-empty, at ticks within the view."""
    low, high = sorted(axis.get_view_interval())
    position = 0 if axis.axis_name == "x" else 1
    return [
        label
        for label in axis.get_ticklabels(which="both")
        if label.get_text() and low <= label.get_position()[position] <= high
    ]


@pytest.mark.parametrize("epochs", [1, 2, 3, 20])
def test_whole_epochs_get_whole_number_ticks_from_the_first_epoch_on(epochs):
    figure = plot_history(_log(range(1, epochs + 1)), best_epoch=epochs)
    _drawn(figure)
    for ax in figure.axes:
        ticks = _shown_ticks(ax.xaxis)
        assert ticks and all(t == int(t) and 1 <= t <= epochs for t in ticks), ticks
    assert _shown_ticks(figure.axes[0].xaxis) == (
        [1.0] if epochs == 1 else _shown_ticks(figure.axes[0].xaxis)
    )


@pytest.mark.parametrize("epochs", [np.arange(1, 5) / 4, np.arange(1, 11) / 4])
def test_rows_within_epochs_get_ticks_at_simple_fractions(epochs):
    figure = plot_history(_log(epochs))
    _drawn(figure)
    ticks = _shown_ticks(figure.axes[0].xaxis)
    assert len(ticks) >= 3 and all((4 * t) == int(4 * t) for t in ticks), ticks  # quarters, halves, wholes
    assert [label.get_text() for label in _shown_labels(figure.axes[0].xaxis)] == [f"{t:g}" for t in ticks]


IN_EPOCH_3 = pd.DataFrame({"epoch": [2.25, 2.5, 2.75], "train_loss": [0.45, 0.4, 0.38]})


def test_the_loss_within_an_epoch_continues_the_train_curve_with_whole_ticks_up_to_the_epochs_end():
    figure = plot_history(LOG.head(2), in_epoch=IN_EPOCH_3)
    _drawn(figure)
    loss = figure.axes[0]
    train = next(line for line in loss.get_lines() if line.get_label() == "train")
    assert list(train.get_xdata()) == [1, 2, 2.25, 2.5, 2.75]
    assert list(train.get_ydata()) == [1.0, 0.5, 0.45, 0.4, 0.38]
    live = next(line for line in loss.get_lines() if line.get_label() == "live")
    assert list(live.get_xdata()) == [1, 2]  # the scores stay at the rows
    for ax in figure.axes:
        assert _shown_ticks(ax.xaxis) == [1, 2, 3]  # whole epochs, the one in progress drawn to its end


def test_before_the_first_row_the_loss_panel_draws_the_training_loss_alone():
    in_epoch_1 = pd.DataFrame({"epoch": [0.25, 0.5], "train_loss": [2.0, 1.6]})
    figure = plot_history(pd.DataFrame(), in_epoch=in_epoch_1)
    _drawn(figure)
    (loss,) = figure.axes
    assert loss.get_title() == "loss" and [line.get_label() for line in loss.get_lines()] == ["train"]
    assert _shown_ticks(loss.xaxis) == [0, 1]


def test_a_live_plot_shows_the_loss_within_an_epoch_but_writes_only_rows_to_its_file(tmp_path, monkeypatch):
    shown = []
    monkeypatch.setattr(_env, "display", lambda obj, handle=None: shown.append(obj) or "handle")
    monkeypatch.setattr(_env, "after_cell", lambda callback: None)
    plot = LivePlot(tmp_path / "history.png", show=True)
    plot.update(LOG.head(2))
    written = (tmp_path / "history.png").read_bytes()
    plot.update(LOG.head(2), in_epoch=IN_EPOCH_3)
    assert len(shown) == 2 and shown[0].data != shown[1].data
    assert (tmp_path / "history.png").read_bytes() == written
    LivePlot(tmp_path / "quiet.png", show=False).update(LOG.head(2), in_epoch=IN_EPOCH_3)  # nobody sees it
    assert not (tmp_path / "quiet.png").exists()


def test_the_train_loss_of_a_single_epoch_is_drawn():
    figure = plot_history(_log([1]))
    train = next(line for line in figure.axes[0].get_lines() if line.get_label() == "train")
    assert list(train.get_xdata()) == [1.0] and train.get_marker() not in (None, "", "None", " ")


@pytest.mark.parametrize(
    "start, end, epochs",
    [(1.62, 1.36, 1), (0.3, 0.15, 8), (0.23, 0.16, 3), (0.151, 0.149, 5), (1.5, 0.05, 20), (50.0, 1e-4, 30)],
    ids=["one-epoch", "within-a-decade", "a-third-of-a-decade", "a-sliver", "two-decades", "six-decades"],
)
def test_log_scale_losses_get_several_plain_labels_that_do_not_overlap(start, end, epochs):
    figure = plot_history(_log(range(1, epochs + 1), start=start, end=end))
    renderer = _drawn(figure)
    ax = figure.axes[0]
    labels = _shown_labels(ax.yaxis)
    texts = [label.get_text() for label in labels]
    assert ax.get_yscale() == "log" and 3 <= len(labels) <= 8, texts
    assert all(float(text) > 0 for text in texts), texts  # 0.2, not 2x10^-1 (mathtext) or 1.25x10^-1
    boxes = [label.get_window_extent(renderer) for label in labels]
    assert not any(a.overlaps(b) for i, a in enumerate(boxes) for b in boxes[i + 1 :]), texts


def test_the_legend_sits_beside_the_panels_not_over_a_curve():
    log = _log(range(1, 11))
    log.loc[6:, "live_loss"] = [0.5, 1.0, 2.0, 4.0]  # overfitting: the live curve climbs into the top corner
    log.loc[6:, "live_accuracy"] = [0.5, 0.3, 0.2, 0.1]  # and falls into the bottom one
    figure = plot_history(log, best_epoch=6)
    renderer = _drawn(figure)
    legends = [*figure.legends, *(ax.get_legend() for ax in figure.axes if ax.get_legend())]
    assert len(legends) == 1
    box = legends[0].get_window_extent(renderer)
    assert not any(box.overlaps(ax.get_window_extent(renderer)) for ax in figure.axes)
    assert box.x1 <= figure.bbox.x1  # and it is not cut off
    assert [text.get_text() for text in legends[0].get_texts()] == ["train", "live", "ema", "best (epoch 6)"]


def test_a_series_scored_less_often_is_drawn_through_the_rows_it_has():
    log = _log(np.arange(1, 9) / 2)  # the training loss every half epoch, the scores every whole one
    log.loc[log["epoch"] % 1 != 0, ["live_loss", "ema_loss", "live_accuracy", "ema_accuracy"]] = np.nan
    figure = plot_history(log)
    lines = {line.get_label(): line for line in figure.axes[0].get_lines()}
    assert (
        list(lines["ema"].get_xdata()) == [1.0, 2.0, 3.0, 4.0]
        and not np.isnan(lines["ema"].get_ydata()).any()
    )
    assert len(lines["train"].get_xdata()) == 8 and figure.axes[0].get_yscale() == "log"


def test_a_log_without_scores_is_a_clear_error():
    with pytest.raises(ValueError, match="no score columns"):
        plot_history(pd.DataFrame({"epoch": [1], "loss": [0.5]}))


def test_headless_live_plot_writes_the_png_and_reuses_one_figure(tmp_path, capsys):
    plot = LivePlot(tmp_path / "history.png")
    figure = plot.figure
    for epochs in range(1, 4):
        plot.update(LOG.head(epochs), best_epoch=1)
    assert plot.figure is figure and (tmp_path / "history.png").read_bytes()[:4] == b"\x89PNG"
    assert capsys.readouterr().out == ""  # shows nothing outside a notebook


@pytest.mark.slow
def test_in_a_notebook_fit_leaves_one_plot_and_one_table_updated_in_place(tmp_path):
    code = """
import torch
from ema_kit import fit
from ema_kit.examples.digits import digits_loaders
from ema_kit.examples.demo import SmallCNN
torch.manual_seed(0)
train_loader, val_loader = digits_loaders(batch_size=128)
model = SmallCNN(width=8)
log = fit(model, train_loader, val_loader, epochs=3, optimizer=torch.optim.SGD(model.parameters(), lr=0.1))
"""
    notebook = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(code)])
    NotebookClient(
        notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": tmp_path}}
    ).execute()
    outputs = notebook.cells[0].outputs
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    tables = [o for o in outputs if "text/html" in o.get("data", {})]
    assert len(images) == 1 and len(tables) == 1, json.dumps(outputs, default=str)[:2000]
    assert "ema_accuracy" in tables[0]["data"]["text/html"] and "<td>3</td>" in tables[0]["data"]["text/html"]
    assert not any("application/vnd.jupyter.widget-view+json" in o.get("data", {}) for o in outputs)


def test_a_figure_shows_itself_as_png_without_pyplot():
    assert plot_history(LOG)._repr_png_()[:4] == b"\x89PNG"
