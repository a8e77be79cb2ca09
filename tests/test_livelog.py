"""LiveLog (ema_kit/training/livelog.py): the live-vs-EMA log for fit and for a loop of your own."""

import io
import math
import os
import signal
import time

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from ema_kit import Callback, LiveLog, ModelEMA, evaluate, fit
from ema_kit.examples.demo import SmallCNN
from ema_kit.examples.digits import digits_loaders
from ema_kit.training import _env, livelog
from ema_kit.training.plot import LivePlot, plot_history
from ema_kit.training.progress import Progress


def hand_written(live_log: LiveLog, epochs: int = 2):
    """The loop of the README and notebook 01, with the live log's three calls."""
    torch.manual_seed(0)
    train_loader, val_loader = digits_loaders(batch_size=256)
    model = SmallCNN(width=8)
    ema = ModelEMA(model, decay=0.9)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    losses = []
    for _ in range(epochs):
        model.train()
        for images, labels in live_log.track(train_loader):
            loss = nn.functional.cross_entropy(model(images), labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            ema.update(model)
            live_log.add_loss(loss)
            losses.append((loss.item(), len(labels)))
        live_log.add(live=evaluate(model, val_loader), ema=evaluate(ema.module, val_loader))
    return model, ema, val_loader, losses


def test_a_hand_written_loop_gets_the_log_and_files_fit_writes(tmp_path):
    live_log = LiveLog(out_dir=tmp_path, progress="off")
    model, ema, val_loader, _ = hand_written(live_log)
    log = live_log.history
    assert log.columns.tolist() == [
        "epoch", "train_loss", "live_loss", "ema_loss", "live_accuracy", "ema_accuracy", "seconds"
    ]  # fmt: skip
    assert log["epoch"].tolist() == [1, 2]
    assert log["ema_loss"].iloc[-1] == pytest.approx(evaluate(ema.module, val_loader)["loss"])
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "history.csv"), log, check_dtype=False)
    assert (tmp_path / "history.png").read_bytes()[:4] == b"\x89PNG"


def test_the_train_loss_is_the_mean_per_row_of_the_losses_added():
    live_log = LiveLog(progress="off", plot=False)
    *_, losses = hand_written(live_log, epochs=1)
    expected = sum(loss * rows for loss, rows in losses) / sum(rows for _, rows in losses)
    assert live_log.history["train_loss"].iloc[0] == pytest.approx(expected, rel=1e-6)


def test_text_progress_gives_one_line_per_row_as_fit_does():
    stream = io.StringIO()
    live_log = LiveLog(plot=False, epochs=2)
    live_log.progress = Progress("text", epochs=2, stream=stream, train_loss=lambda: live_log.train_loss)
    hand_written(live_log)
    lines = stream.getvalue().splitlines()
    assert [line.split()[:2] for line in lines] == [["epoch", "1/2"], ["epoch", "2/2"]]
    assert all("ema_accuracy" in line and "img/s" in line for line in lines)


def test_a_loss_tensor_is_not_read_until_the_bar_or_a_row_needs_it(monkeypatch):
    live_log = LiveLog(progress="off", plot=False)
    reads = []
    original = torch.Tensor.__float__
    monkeypatch.setattr(torch.Tensor, "__float__", lambda self: reads.append(1) or original(self))
    monkeypatch.setattr(torch.Tensor, "item", lambda self: reads.append(1) or 0.0)
    for _ in live_log.track([(torch.zeros(4, 2), torch.zeros(4))] * 3):
        live_log.add_loss(torch.tensor(0.5))
    assert reads == []
    live_log.add(live={"loss": 0.4})
    assert len(reads) == 1 and live_log.history["train_loss"].iloc[0] == 0.5


def test_a_row_can_sit_mid_epoch_and_shows_as_a_fraction():
    stream = io.StringIO()
    live_log = LiveLog(plot=True, epochs=3)
    live_log.progress = Progress("text", epochs=3, stream=stream)
    live_log.add(epoch=0.5, live={"loss": 0.9}, ema={"loss": 0.95})
    live_log.add(epoch=1, live={"loss": 0.7}, ema={"loss": 0.8})
    assert live_log.history["epoch"].tolist() == [0.5, 1.0]
    assert stream.getvalue().split()[:2] == ["epoch", "0.5/3"]


def test_fit_bar_and_log_show_one_train_loss():
    torch.manual_seed(0)
    train_loader, val_loader = digits_loaders(batch_size=100)  # a last batch of another size
    model = SmallCNN(width=8)
    shown = []

    class Bar(Callback):
        def on_validation_start(self, state):
            shown.append(live_log.train_loss)  # what the bar shows at the epoch's end

    live_log = LiveLog(progress="off", plot=False)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    log = fit(model, train_loader, val_loader, epochs=2, optimizer=optimizer, callbacks=[live_log, Bar()])
    assert shown == log["train_loss"].tolist()


def test_fit_shows_the_log_it_returns():
    torch.manual_seed(0)
    train_loader, val_loader = digits_loaders(batch_size=256)
    model = SmallCNN(width=8)
    live_log = LiveLog(progress="off", plot=False)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    log = fit(model, train_loader, val_loader, epochs=2, optimizer=optimizer, callbacks=[live_log])
    pd.testing.assert_frame_equal(live_log.history, log)


def test_fit_refuses_two_live_logs_or_two_folders(tmp_path):
    torch.manual_seed(0)
    train_loader, val_loader = digits_loaders(batch_size=256)
    model = SmallCNN(width=8)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    with pytest.raises(ValueError, match="2 LiveLog objects"):
        fit(model, train_loader, val_loader, epochs=1, optimizer=optimizer, callbacks=[LiveLog(), LiveLog()])
    with pytest.raises(ValueError, match="two folders"):
        fit(model, train_loader, val_loader, epochs=1, optimizer=optimizer, out_dir=tmp_path / "a",
            callbacks=[LiveLog(out_dir=tmp_path / "b")])  # fmt: skip
    assert not (tmp_path / "a").exists()


@pytest.mark.parametrize(
    "options, error, message",
    [
        ({"progress": "bar"}, ValueError, "progress must be 'auto', 'widget', 'text' or 'off'"),
        ({"progress": 1}, TypeError, "progress must be 'auto', 'widget', 'text' or 'off'"),
        ({"plot": "yes"}, TypeError, "plot must be True or False"),
        ({"epochs": 0}, ValueError, "epochs must be an int >= 1"),
    ],
)
def test_bad_options_are_refused_by_name(options, error, message):
    with pytest.raises(error, match=message):
        LiveLog(**options)


def test_a_row_without_a_loss_given_has_no_train_loss_column():
    live_log = LiveLog(progress="off", plot=False)
    live_log.add(live={"loss": 0.5, "accuracy": 0.9})
    assert live_log.history.columns.tolist() == ["epoch", "live_loss", "live_accuracy", "seconds"]
    assert math.isnan(live_log.train_loss)


def test_scores_and_columns_given_as_tensors_or_numpy_values_are_logged_as_numbers(tmp_path):
    live_log = LiveLog(out_dir=tmp_path, progress="off")
    live_log.add(live={"loss": torch.tensor(0.5)}, ema={"loss": np.float32(0.25)}, lr=torch.tensor([0.1]))
    row = live_log.history.iloc[0]
    assert (row["live_loss"], row["ema_loss"]) == (0.5, 0.25) and row["lr"] == pytest.approx(0.1)
    assert all(live_log.history[column].dtype.kind == "f" for column in ("live_loss", "ema_loss", "lr"))
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "history.csv"), live_log.history)


@pytest.mark.parametrize(
    ("row", "error", "message"),
    [
        ({"ema_fast": {"loss": 0.4}}, ValueError, r"model named 'ema_fast'.*no underscore.*emaslow"),
        ({"student": {"loss": 0.4}}, ValueError, r"model named 'student': .* live="),
        (
            {"live": {"loss": torch.tensor([0.4, 0.5])}},
            TypeError,
            r"live\['loss'\] is a Tensor of shape \(2,\)",
        ),
        ({"live": {"loss": "low"}}, TypeError, r"live\['loss'\] is str 'low'; a score is one number"),
        ({"live": {"loss": 0.4}, "lr": np.array([0.1, 0.2])}, TypeError, r"lr is a ndarray of shape \(2,\)"),
    ],
)
def test_a_row_that_cannot_be_logged_is_refused_before_anything_is_written(tmp_path, row, error, message):
    live_log = LiveLog(out_dir=tmp_path, progress="off")
    live_log.add(live={"loss": 0.5}, ema={"loss": 0.6})
    before = (tmp_path / "history.csv").read_bytes()
    with pytest.raises(error, match=message):
        live_log.add(row)
    assert len(live_log.history) == 1 and (tmp_path / "history.csv").read_bytes() == before


def test_rows_without_scores_log_and_plot_the_training_loss_alone(tmp_path):
    live_log = LiveLog(out_dir=tmp_path, progress="off")
    live_log.add(epoch=0, lr=0.1)  # nothing to draw yet: no plot, no error
    assert not (tmp_path / "history.png").exists()
    live_log.add(epoch=1, train_loss=0.9, lr=0.1)
    live_log.add(epoch=2, train_loss=0.7, lr=0.05)
    assert live_log.history["train_loss"].tolist()[1:] == [0.9, 0.7]
    figure = plot_history(live_log.history)
    assert [ax.get_title() for ax in figure.axes] == ["loss"]
    assert (tmp_path / "history.png").read_bytes()[:4] == b"\x89PNG"


def test_a_loop_stopped_midway_and_run_again_counts_on_and_the_stopped_loops_late_close_changes_nothing():
    loader = [(torch.zeros(2, 1), torch.zeros(2)) for _ in range(4)]
    live_log = LiveLog(progress="off", plot=False)
    stopped = live_log.track(loader)  # held by a name, it stays open after the stop button
    with pytest.raises(KeyboardInterrupt):
        for batch_index, _ in enumerate(stopped):
            if batch_index == 2:
                raise KeyboardInterrupt
    for batch_index, _ in enumerate(live_log.track(loader), start=1):
        if batch_index == 2:
            stopped.close()  # in the middle of this epoch
            live_log.add(live={"loss": 0.5})
    assert live_log.history["epoch"].tolist() == [1.5]


def test_epochs_capped_by_a_break_with_a_row_every_other_epoch_count_every_epoch_and_loss():
    live_log = LiveLog(progress="off", plot=False)
    for epoch in range(1, 5):
        for step, _ in enumerate(live_log.track(iter(lambda: torch.zeros(2, 1), None))):  # endless
            if step == 3:
                break
            live_log.add_loss(float(epoch))
        if epoch % 2 == 0:
            live_log.add(live={"loss": 0.5})
    assert live_log.history["epoch"].tolist() == [2, 4]
    assert live_log.history["train_loss"].tolist() == [1.5, 3.5]


def test_the_progress_shown_with_a_row_has_that_rows_train_loss():
    seen = []

    class Recorded(Progress):
        def show_row(self, history):
            seen.append(self.train_loss())

    live_log = LiveLog(plot=False)
    live_log.progress = Recorded("off", epochs=None, train_loss=lambda: live_log.train_loss)
    for _ in live_log.track([(torch.zeros(2, 1), torch.zeros(2))] * 2):
        live_log.add_loss(torch.tensor(0.25))
    live_log.add(live={"loss": 0.5})
    assert seen == [0.25] == live_log.history["train_loss"].tolist()


def test_with_epochs_given_the_bar_is_marked_finished_with_the_last_row():
    closed = []

    class Recorded(Progress):
        def close(self):
            closed.append(self.epoch)

    live_log = LiveLog(plot=False, epochs=2)
    live_log.progress = Recorded("off", epochs=2)
    for epoch in (1, 2):
        for _ in live_log.track([(torch.zeros(2, 1), torch.zeros(2))]):
            pass
        live_log.add(epoch=epoch, live={"loss": 0.5})
        assert closed == ([] if epoch == 1 else [2])


# -- what a user watches: the row as one unit, the loss within long epochs ---------------------------------


def test_in_a_loop_of_your_own_the_stop_button_while_a_row_is_drawn_lands_after_it(tmp_path, monkeypatch):
    live_log = LiveLog(out_dir=tmp_path, progress="off")
    original = LivePlot.update

    def pressed_while_drawing(self, history, **options):
        os.kill(os.getpid(), signal.SIGINT)  # the stop button, while the plot is drawn
        original(self, history, **options)

    monkeypatch.setattr(LivePlot, "update", pressed_while_drawing)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)  # a notebook's, whatever ran before
    try:
        with pytest.raises(KeyboardInterrupt):
            hand_written(live_log)
    finally:
        signal.signal(signal.SIGINT, previous)
    assert len(live_log.history) == 1 and len(pd.read_csv(tmp_path / "history.csv")) == 1
    assert live_log._loss_rows == 0  # the row took its loss: a rerun of the loop starts a new one


class Clock:
    """``time.perf_counter`` for a test: it moves when told to."""

    def __init__(self, monkeypatch):
        self.now = 0.0
        monkeypatch.setattr(time, "perf_counter", lambda: self.now)

    def wait(self, seconds: float) -> None:
        self.now += seconds


def within_epoch_draws(monkeypatch) -> list:
    """As in a notebook watched live. Returns the draws: (rows of the log, the points within the epoch)."""
    draws = []
    monkeypatch.setattr(_env, "watched", lambda: True)
    monkeypatch.setattr(
        LivePlot,
        "update",
        lambda self, history, best_epoch=None, in_epoch=None: draws.append(
            (len(history), None if in_epoch is None else in_epoch.values.tolist())
        ),
    )
    return draws


def test_within_a_long_epoch_the_plot_draws_the_training_loss_so_far_at_fractions_of_the_epoch(monkeypatch):
    draws, clock = within_epoch_draws(monkeypatch), Clock(monkeypatch)
    live_log = LiveLog(progress="off")
    losses = [1.0, 0.5, 0.3, 0.2]
    for epoch in (1, 2):
        for _, loss in zip(live_log.track([(torch.zeros(2, 1), torch.zeros(2))] * 4), losses):
            clock.wait(livelog._PREVIEW_SECONDS)  # each batch takes that long: each is drawn
            live_log.add_loss(loss / epoch)
        live_log.add(live={"loss": 0.4 / epoch})
    first_epoch = [[0.25, 1.0], [0.5, 0.75], [0.75, 0.6]]  # the running mean, up to the batch just counted
    assert draws[:3] == [(0, first_epoch[:1]), (0, first_epoch[:2]), (0, first_epoch)]
    assert draws[3] == (0, [*first_epoch, [1.0, 0.5]])  # the last batch's point is the row's train_loss
    assert draws[4] == (1, None)  # the row: the points within the epoch are done with
    assert draws[5] == (1, [[1.25, 0.5]])


def test_the_loss_within_an_epoch_is_drawn_every_few_seconds_at_most(monkeypatch):
    draws, clock = within_epoch_draws(monkeypatch), Clock(monkeypatch)
    live_log = LiveLog(progress="off")
    for _ in live_log.track([(torch.zeros(2, 1), torch.zeros(2))] * 100):
        clock.wait(livelog._PREVIEW_SECONDS / 10)
        live_log.add_loss(0.5)
    assert len(draws) == 10


def test_drawing_the_loss_within_an_epoch_takes_a_small_share_of_the_training_time(monkeypatch):
    draws, clock = within_epoch_draws(monkeypatch), Clock(monkeypatch)
    drawn = LivePlot.update
    monkeypatch.setattr(LivePlot, "update", lambda *args, **kwargs: clock.wait(1.0) or drawn(*args, **kwargs))
    live_log = LiveLog(progress="off")
    for _ in live_log.track([(torch.zeros(2, 1), torch.zeros(2))] * 1000):
        clock.wait(0.1)  # a big figure: 1 s to draw, 10 batches' time
        live_log.add_loss(0.5)
    assert len(draws) / clock.now <= livelog._PREVIEW_SHARE


def test_fit_draws_the_training_loss_within_epochs_as_a_hand_written_loop_does(monkeypatch):
    draws, clock = within_epoch_draws(monkeypatch), Clock(monkeypatch)
    torch.manual_seed(0)
    train_loader, val_loader = digits_loaders(batch_size=256)  # 6 batches an epoch

    class SlowBatches(Callback):
        def on_batch_start(self, state):
            clock.wait(livelog._PREVIEW_SECONDS)

    model = SmallCNN(width=8)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    log = fit(model, train_loader, val_loader, epochs=2, optimizer=optimizer,
              callbacks=[LiveLog(progress="off"), SlowBatches()])  # fmt: skip
    points = [draw for rows, draw in draws if draw]
    assert [len(p) for p in points] == [1, 2, 3, 4, 5, 6] * 2
    assert [x for x, _ in points[5]] == pytest.approx([1 / 6, 2 / 6, 3 / 6, 4 / 6, 5 / 6, 1])
    assert points[5][-1][1] == pytest.approx(log["train_loss"].iloc[0])  # ends at the row's train_loss
    assert [rows for rows, draw in draws if draw is None] == [1, 2]


def test_the_loss_within_an_epoch_is_not_drawn_where_nobody_watches_live(monkeypatch):
    draws, clock = within_epoch_draws(monkeypatch), Clock(monkeypatch)
    monkeypatch.setattr(_env, "watched", lambda: False)  # a script, CI, Kaggle's Save & Run All
    live_log = LiveLog(progress="off")
    for _ in live_log.track([(torch.zeros(2, 1), torch.zeros(2))] * 4):
        clock.wait(livelog._PREVIEW_SECONDS)
        live_log.add_loss(0.5)
    live_log.add(live={"loss": 0.4})
    assert draws == [(1, None)]


def test_a_log_read_back_from_history_csv_shows_what_fit_showed(tmp_path, monkeypatch):
    torch.manual_seed(0)
    train_loader, val_loader = digits_loaders(batch_size=256)
    model = SmallCNN(width=8)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    log = fit(model, train_loader, val_loader, epochs=2, optimizer=optimizer, out_dir=tmp_path / "run",
              callbacks=[LiveLog(progress="off")])  # fmt: skip
    watcher = LiveLog(progress="off", out_dir=tmp_path / "watched")
    for row in pd.read_csv(tmp_path / "run" / "history.csv").to_dict("records"):
        watcher.add(row)
    pd.testing.assert_frame_equal(watcher.history, log, check_dtype=False)
    written = [(tmp_path / folder / "history.csv").read_text() for folder in ("run", "watched")]
    assert written[0] == written[1]


def test_a_row_added_within_a_tracked_epoch_sits_at_the_fraction_of_the_epoch_done():
    live_log = LiveLog(progress="off", plot=False)
    batches = [(torch.zeros(2, 1), torch.zeros(2))] * 4
    for _ in range(2):
        for batch, _ in enumerate(live_log.track(batches), start=1):
            live_log.add_loss(float(batch))
            if batch == 2:  # scored inside the loop body of batch 2 of 4: half the epoch is done
                live_log.add(live={"loss": 0.5})
        live_log.add(live={"loss": 0.4})
    live_log.add(live={"loss": 0.3})  # after the loop: the epochs tracked
    assert live_log.history["epoch"].tolist() == [0.5, 1, 1.5, 2, 2]
    assert live_log.history["train_loss"].tolist()[:2] == [1.5, 3.5]  # each row's loss since the row before


def test_a_row_added_within_an_epoch_of_unknown_length_needs_its_epoch():
    live_log = LiveLog(progress="off", plot=False)
    batches = iter([(torch.zeros(2, 1), torch.zeros(2))] * 4)  # no len(): where is the middle?
    for batch, _ in enumerate(live_log.track(batches), start=1):
        if batch == 2:
            with pytest.raises(ValueError, match=r"loader without len\(\).*pass epoch="):
                live_log.add(live={"loss": 0.5})
            live_log.add(epoch=0.5, live={"loss": 0.5})
    live_log.add(live={"loss": 0.4})
    assert live_log.history["epoch"].tolist() == [0.5, 1]
