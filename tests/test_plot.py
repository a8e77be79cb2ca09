"""The live-vs-EMA plot (ema_kit/plot.py): panels, colours, best epoch, headless PNG, one notebook output."""

import json

import nbformat
import pandas as pd
import pytest
from nbclient import NotebookClient

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
