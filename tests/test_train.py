"""fit (ema_kit/training/loop.py): the log, files on disk, resume, interrupts, AMP, the step, bad input."""

import copy
import math
import os
import signal
import sys
import warnings

import pandas as pd
import pytest
import torch
from torch import nn
from torch.optim.lr_scheduler import OneCycleLR
from torch.utils.data import BatchSampler, DataLoader, RandomSampler, TensorDataset

from ema_kit import Callback, EarlyStopping, GradientClip, LiveLog, ModelEMA, ValidateEvery, evaluate, fit
from ema_kit.examples.demo import SmallCNN
from ema_kit.training import loop
from ema_kit.training.evaluate import whole_set
from ema_kit.training.plot import LivePlot
from ema_kit.training.progress import Progress

COLUMNS = [
    "epoch", "train_loss", "live_loss", "ema_loss", "live_accuracy", "ema_accuracy", "half_life_epochs_ema",
    "lr", "seconds",
]  # fmt: skip


def loaders(n_train=192, n_val=96, batch_size=32, seed=0):
    """Real digits, a small slice, with a seeded shuffle."""
    from ema_kit.examples.digits import digits

    images, labels = digits()
    train = TensorDataset(images[:n_train], labels[:n_train])
    val = TensorDataset(images[n_train : n_train + n_val], labels[n_train : n_train + n_val])
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(train, batch_size, shuffle=True, generator=generator), DataLoader(val, 64)


def setup(seed=0, lr=0.05, **loader_options):
    torch.manual_seed(seed)
    model = SmallCNN(width=8)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    return model, optimizer, *loaders(seed=seed, **loader_options)


def quiet_fit(model, train, val, *, plot=False, callbacks=(), **options):
    """fit without the progress display (and without the plot unless asked)."""
    return fit(model, train, val, callbacks=[LiveLog(progress="off", plot=plot), *callbacks], **options)


def test_fit_returns_one_row_per_epoch_with_live_and_ema_columns():
    model, optimizer, train, val = setup()
    log = quiet_fit(model, train, val, epochs=3, optimizer=optimizer, ema=0.9)
    assert list(log.columns) == COLUMNS
    assert log["epoch"].tolist() == [1, 2, 3]
    assert log.drop(columns="lr").map(math.isfinite).all().all()
    assert log["live_loss"].iloc[-1] < log["live_loss"].iloc[0]  # it really trained


def test_ema_columns_are_scores_of_the_ema_model():
    model, optimizer, train, val = setup()
    ema = ModelEMA(model, decay=0.9)
    log = quiet_fit(model, train, val, epochs=2, optimizer=optimizer, ema=ema)
    scores = evaluate(ema.module, val)
    assert log["ema_loss"].iloc[-1] == pytest.approx(scores["loss"], rel=1e-6)
    assert log["ema_accuracy"].iloc[-1] == scores["accuracy"]
    assert ema.num_updates == 2 * len(train)


def test_without_ema_only_live_columns_and_custom_metrics():
    model, optimizer, train, val = setup()
    metrics = {
        "top2": (lambda out, y: (out.topk(2, dim=1).indices == y[:, None]).any(1).float().mean(), "max")
    }
    log = quiet_fit(model, train, val, epochs=1, optimizer=optimizer, ema=None, metrics=metrics)
    assert list(log.columns) == ["epoch", "train_loss", "live_loss", "live_top2", "lr", "seconds"]


def test_ema_given_as_half_life_in_epochs():
    model, optimizer, train, val = setup()
    seen = {}
    callback = type("C", (), {"on_fit_start": lambda self, state: seen.update(state.emas)})()
    quiet_fit(model, train, val, epochs=1, optimizer=optimizer, ema="0.5 epochs", callbacks=[callback])
    assert seen["ema"].half_life == pytest.approx(0.5 * len(train))


def test_out_dir_streams_history_after_every_epoch_and_keeps_best_ema_weights(tmp_path):
    model, optimizer, train, val = setup()
    rows_on_disk = []

    class ReadBack:
        def on_epoch_end(self, state):
            rows_on_disk.append(len(pd.read_csv(tmp_path / "history.csv")))

    log = quiet_fit(
        model,
        train,
        val,
        epochs=3,
        optimizer=optimizer,
        ema=0.9,
        out_dir=tmp_path,
        plot=True,
        callbacks=[ReadBack()],
    )
    assert rows_on_disk == [1, 2, 3]
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "history.csv"), log, check_dtype=False)
    assert (tmp_path / "history.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    best = SmallCNN(width=8)
    best.load_state_dict(torch.load(tmp_path / "model_ema.pth", weights_only=True), strict=True)
    best_epoch_loss = log["ema_accuracy"].max()
    assert evaluate(best, val)["accuracy"] == best_epoch_loss


def test_resume_gives_bit_identical_weights_and_log(tmp_path):
    def run(epochs, resume=False):
        model, optimizer, train, val = setup(seed=1)
        scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=0.1, total_steps=4 * len(train))
        ema = ModelEMA(model, decay=0.9)
        log = quiet_fit(
            model,
            train,
            val,
            epochs=epochs,
            optimizer=optimizer,
            ema=ema,
            scheduler=scheduler,
            out_dir=tmp_path / ("split" if epochs != 4 else "whole"),
            resume=resume,
        )
        return model, ema, log

    model, ema, log = run(4)
    run(2)
    resumed_model, resumed_ema, resumed_log = run(4, resume=True)
    for a, b in [(model, resumed_model), (ema.module, resumed_ema.module)]:
        for (key, x), y in zip(a.state_dict().items(), b.state_dict().values()):
            assert torch.equal(x, y), key
    pd.testing.assert_frame_equal(log.drop(columns="seconds"), resumed_log.drop(columns="seconds"))


def test_resume_from_another_model_is_refused_and_changes_nothing(tmp_path):
    model, optimizer, train, val = setup()
    quiet_fit(model, train, val, epochs=1, optimizer=optimizer, ema=0.9, out_dir=tmp_path)
    other = SmallCNN(width=16)
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(ValueError, match="another model"):
        quiet_fit(
            other,
            train,
            val,
            epochs=2,
            optimizer=torch.optim.SGD(other.parameters(), lr=0.1),
            ema=0.9,
            out_dir=tmp_path,
            resume=True,
        )
    assert all(torch.equal(before[k], v) for k, v in other.state_dict().items())
    assert len(pd.read_csv(tmp_path / "history.csv")) == 1


def test_the_stop_button_keeps_the_finished_epochs_then_stops_the_caller_with_what_was_kept(tmp_path):
    model, optimizer, train, val = setup()

    class StopButton:
        def on_step_end(self, state):
            if state.epoch == 3:
                raise KeyboardInterrupt

    live_log = LiveLog(progress="off", plot=False)
    with pytest.raises(KeyboardInterrupt) as stopped:  # a notebook's Run All ends here, a script exits
        fit(model, train, val, epochs=5, optimizer=optimizer, out_dir=tmp_path,
            callbacks=[live_log, StopButton()])  # fmt: skip
    assert str(stopped.value) == (
        "Stopped by the user during epoch 3 of 5: kept 2 finished epochs (the last kept: epoch 2); "
        f"{tmp_path} holds them, with a checkpoint of epoch 2 to resume from."
    )
    assert stopped.value.__suppress_context__  # the message, not fit's insides, is what the user reads
    assert live_log.history["epoch"].tolist() == [1, 2]
    assert len(pd.read_csv(tmp_path / "history.csv")) == 2
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=True)["epoch"] == 2


def press_stop_during(monkeypatch, owner, name: str, when) -> None:
    """Send this process a real SIGINT (the stop button, Ctrl-C) inside ``owner.name`` when ``when()``."""
    original = getattr(owner, name)

    def pressed(*args, **kwargs):
        if when():
            os.kill(os.getpid(), signal.SIGINT)
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, name, pressed)


def test_the_stop_button_while_an_epoch_is_shown_lands_after_its_plot_table_and_files(tmp_path, monkeypatch):
    model, optimizer, train, val = setup()
    tables = []
    live_log = LiveLog(progress="off")
    press_stop_during(monkeypatch, LivePlot, "update", lambda: len(live_log.history) == 2)  # epoch 2's plot
    press_stop_during(monkeypatch, Progress, "show_row", lambda: tables.append(len(live_log.history)))
    said = r"after epoch 2 of 4: kept 2 finished epochs \(the last kept: epoch 2\);"
    with pytest.raises(KeyboardInterrupt, match=said):
        fit(model, train, val, epochs=4, optimizer=optimizer, out_dir=tmp_path, callbacks=[live_log])
    assert tables == [1, 2]  # the table showed epoch 2: the plot, the table and the message agree
    assert len(pd.read_csv(tmp_path / "history.csv")) == 2
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=True)["epoch"] == 2  # so does the checkpoint


def test_the_stop_button_while_an_epoch_is_scored_keeps_the_epoch_before(tmp_path, monkeypatch):
    model, optimizer, train, val = setup()
    live_log = LiveLog(progress="off", plot=False)
    calls = []
    press_stop_during(monkeypatch, loop, "evaluate", lambda: calls.append(1) or len(calls) == 5)
    said = r"during epoch 2 of 3: kept 1 finished epoch \(the last kept: epoch 1\);"
    with pytest.raises(KeyboardInterrupt, match=said):
        fit(model, train, val, epochs=3, optimizer=optimizer, out_dir=tmp_path, callbacks=[live_log])
    assert len(live_log.history) == len(pd.read_csv(tmp_path / "history.csv")) == 1


def test_a_second_press_of_the_stop_button_stops_at_once_even_inside_an_epochs_end(monkeypatch):
    model, optimizer, train, val = setup()
    live_log = LiveLog(progress="off", plot=False)

    class Hangs:
        def on_epoch_end(self, state):  # a callback that would never end: pressed once, it would not stop
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)
            raise AssertionError("not stopped")

    said = r"after epoch 1 of 2: kept 1 finished epoch \(the last kept: epoch 1\) in the log"
    with pytest.raises(KeyboardInterrupt, match=said):
        fit(model, train, val, epochs=2, optimizer=optimizer, callbacks=[live_log, Hangs()])


def test_the_stop_button_before_any_epoch_finished_says_nothing_was_kept_and_to_rebuild_what_trained():
    model, optimizer, train, val = setup()

    class StopButton:
        def on_step_end(self, state):
            if state.step == 3:
                raise KeyboardInterrupt

    said = r"during epoch 1 of 2: no epoch finished, nothing kept. .* have taken 3 steps: build them afresh"
    with pytest.raises(KeyboardInterrupt, match=said):
        quiet_fit(model, train, val, epochs=2, optimizer=optimizer, callbacks=[StopButton()])


def test_an_error_mid_epoch_says_where_the_finished_epochs_are(tmp_path):
    model, optimizer, train, val = setup()
    calls = []

    def flaky(outputs, targets):
        calls.append(1)
        if len(calls) > 4:  # the sanity pass's live and EMA batch, then epoch 1's live and EMA scores
            raise RuntimeError("metric server unreachable")
        return 0.5

    with pytest.raises(RuntimeError, match="unreachable") as caught:
        quiet_fit(model, train, val, epochs=3, optimizer=optimizer, metrics={"m": (whole_set(flaky), "max")},
                  out_dir=tmp_path)  # fmt: skip
    said = f"kept 1 finished epoch (the last kept: epoch 1); {tmp_path} holds them"
    assert any(said in note for note in caught.value.__notes__)
    assert len(pd.read_csv(tmp_path / "history.csv")) == 1


def test_non_finite_loss_skips_the_step_for_model_and_ema_and_warns_once():
    model, optimizer, train, val = setup()
    ema = ModelEMA(model, decay=0.9)
    calls = []

    def sometimes_nan(outputs, targets):
        calls.append(1)
        loss = nn.functional.cross_entropy(outputs, targets)
        return loss * math.nan if len(calls) in (3, 5) and model.training else loss  # 1-2: the sanity pass

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        log = quiet_fit(model, train, val, epochs=1, optimizer=optimizer, ema=ema, loss_fn=sometimes_nan)
    assert len([w for w in caught if "loss was nan" in str(w.message)]) == 1
    assert ema.num_updates == len(train) - 2
    assert all(torch.isfinite(v).all() for v in ema.module.state_dict().values())
    assert math.isfinite(log["train_loss"].iloc[0])


def test_accumulation_steps_once_per_group_of_batches():
    model, optimizer, train, val = setup()  # 6 batches per epoch
    ema = ModelEMA(model, decay=0.9)
    quiet_fit(model, train, val, epochs=2, optimizer=optimizer, ema=ema, accumulate=4)
    assert ema.num_updates == 2 * 2  # 4 + the leftover 2 batches, per epoch


def test_schedulers_step_per_batch_or_per_epoch():
    model, optimizer, train, val = setup()
    per_epoch = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    log = quiet_fit(model, train, val, epochs=3, optimizer=optimizer, scheduler=per_epoch)
    assert log["lr"].tolist() == [0.05, 0.025, 0.0125]
    model, optimizer, train, val = setup()
    per_batch = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=0.1, total_steps=2 * len(train))
    quiet_fit(model, train, val, epochs=2, optimizer=optimizer, scheduler=per_batch)
    assert per_batch.last_epoch == 2 * len(train)


def test_gradient_clipping_bounds_the_step():
    model, optimizer, train, val = setup(lr=1.0)
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    before = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
    quiet_fit(model, train, val, epochs=1, optimizer=optimizer, ema=None, callbacks=[GradientClip(1e-3)])
    after = torch.cat([p.detach().flatten() for p in model.parameters()])
    assert (after - before).norm() <= len(train) * 1e-3 * 1.0001


def test_bf16_autocast_on_cpu_trains_and_keeps_a_float32_ema():
    model, optimizer, train, val = setup()
    ema = ModelEMA(model, decay=0.9)
    log = quiet_fit(model, train, val, epochs=2, optimizer=optimizer, ema=ema, amp="bf16")
    assert log[["train_loss", "live_loss", "ema_loss"]].map(math.isfinite).all().all()
    assert log["live_loss"].iloc[-1] < log["live_loss"].iloc[0]
    assert all(p.dtype == torch.float32 for p in ema.module.parameters())


def test_text_progress_prints_one_line_per_epoch(capsys):
    model, optimizer, train, val = setup()
    fit(model, train, val, epochs=3, optimizer=optimizer, callbacks=[LiveLog(progress="text", plot=False)])
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split()[:2] for line in lines] == [["epoch", "1/3"], ["epoch", "2/3"], ["epoch", "3/3"]]
    assert all("live_loss" in line and "ema_accuracy" in line and "img/s" in line for line in lines)


@pytest.mark.parametrize(
    "change, error, message",
    [
        ({"epochs": 0}, ValueError, "epochs must be an int >= 1"),
        ({"train": []}, ValueError, "train_loader is empty"),
        ({"val": []}, ValueError, "val_loader is empty"),
        ({"monitor": "ema_f1"}, ValueError, "monitor='ema_f1' is not a column"),
        ({"metrics": {"bad": (lambda out, y: "high", "max")}}, TypeError, "metric 'bad' returned str"),
        ({"metrics": {"bad": (lambda out, y: out, "max")}}, TypeError, "must return one number"),
        ({"ema": 5}, ValueError, "'500 steps'"),
        ({"ema": "2 weeks"}, ValueError, "'<number> epochs'"),
        ({"amp": "int8"}, ValueError, "amp must be"),
        ({"accumulate": 0}, ValueError, "accumulate must be an int >= 1"),
        ({"optimizer": "adam"}, TypeError, "optimizer must be a torch.optim.Optimizer"),
        ({"resume": True}, ValueError, "give out_dir too"),
    ],
)
def test_bad_input_gets_a_clear_error(change, error, message):
    model, optimizer, train, val = setup()
    options = {"epochs": 1, "optimizer": optimizer, "train": train, "val": val} | change
    train, val = options.pop("train"), options.pop("val")
    with pytest.raises(error, match=message.replace("(", r"\(").replace("[", r"\[")):
        quiet_fit(model, train, val, **options)


def test_a_batch_that_is_not_an_input_target_pair_is_a_clear_error():
    model, optimizer, _, val = setup()
    triples = [(torch.zeros(4, 1, 8, 8), torch.zeros(4, dtype=torch.long), torch.zeros(4))]
    with pytest.raises(
        ValueError, match=r"expects each batch as \(inputs, targets\), got a tuple of 3 items"
    ):
        quiet_fit(model, triples, val, epochs=1, optimizer=optimizer)


def test_resume_without_a_checkpoint_names_the_missing_file(tmp_path):
    model, optimizer, train, val = setup()
    with pytest.raises(FileNotFoundError, match="checkpoint.pt"):
        quiet_fit(model, train, val, epochs=1, optimizer=optimizer, out_dir=tmp_path, resume=True)


def test_evaluate_restores_train_mode_and_scores_the_whole_set():
    model, _, _, val = setup()
    model.train()
    scores = evaluate(model, val, metrics={"n": whole_set(lambda out, y: len(y))})
    assert model.training and scores["n"] == 96


def test_monitor_given_as_a_score_picks_the_best_decay_by_it(tmp_path):
    model, optimizer, train, val = setup()
    log = quiet_fit(model, train, val, epochs=2, optimizer=optimizer, ema=(0.5, 0.9), monitor="loss",
                    out_dir=tmp_path)  # fmt: skip
    best_column = log[["ema0.5_loss", "ema0.9_loss"]].min().idxmin()
    best = SmallCNN(width=8)
    best.load_state_dict(torch.load(tmp_path / "model_ema.pth", weights_only=True))
    assert evaluate(best, val)["loss"] == pytest.approx(log[best_column].min(), rel=1e-6)


# -- issue 15: the right best weights, real batch shapes, NaN-safe BatchNorm, resume left on -------------


def falling(values):
    """A metric that returns ``values`` in turn, one per call (fit calls a whole-set metric once per model
    per epoch, after once in its sanity pass before training)."""
    calls = iter([0.0, *values])
    return whole_set(lambda outputs, targets: next(calls))


def test_an_unknown_metric_name_to_monitor_is_an_error_that_names_what_to_pass():
    model, optimizer, train, val = setup()
    both = r"monitor=\('ema_lb', 'min'\) if lower is better.*monitor=\('ema_lb', 'max'\) if higher.*metrics="
    with pytest.raises(ValueError, match=both):
        quiet_fit(model, train, val, epochs=1, optimizer=optimizer, metrics={"lb": lambda out, y: 0.5})
    assert all(p.grad is None for p in model.parameters())  # refused before any training


@pytest.mark.parametrize("given", ["by its well-known name", "with its direction"])
def test_a_lower_is_better_metric_keeps_improving_and_saves_its_lowest_epoch(tmp_path, given):
    model, optimizer, train, val = setup()
    scores = falling([0.8, 0.5, 0.3])
    metrics = {"rmsle": scores} if given == "by its well-known name" else {"lb": (scores, "min")}
    log = quiet_fit(model, train, val, epochs=3, optimizer=optimizer, ema=None, out_dir=tmp_path,
                    metrics=metrics, callbacks=[EarlyStopping(patience=1)])  # fmt: skip
    assert log["epoch"].tolist() == [1, 2, 3]  # taken as higher-is-better it stopped after epoch 2
    saved = torch.load(tmp_path / "model.pth", weights_only=True)
    assert all(torch.equal(saved[k], v) for k, v in model.state_dict().items())  # epoch 3 is the best


def test_a_direction_beside_monitor_gives_the_direction_of_an_unknown_metric():
    model, optimizer, train, val = setup()
    log = quiet_fit(model, train, val, epochs=3, optimizer=optimizer, ema=None, callbacks=[EarlyStopping(1)],
                    metrics={"lb": falling([0.8, 0.5, 0.3])}, monitor=("live_lb", "min"))  # fmt: skip
    assert len(log) == 3


def test_mode_that_contradicts_the_metric_direction_is_an_error():
    model, optimizer, train, val = setup()
    with pytest.raises(ValueError, match=r"monitor=\('lb', 'max'\) says higher is better.*lower-is-better"):
        quiet_fit(model, train, val, epochs=1, optimizer=optimizer, monitor=("lb", "max"),
                  metrics={"lb": (lambda out, y: 0.5, "min")})  # fmt: skip


def test_early_stopping_ends_after_patience_epochs_without_improvement():
    model, optimizer, train, val = setup()
    score = falling([0.5, 0.7, 0.6, 0.65, 0.9])  # best at epoch 2; epochs 3 and 4 do not beat it
    log = quiet_fit(model, train, val, epochs=5, optimizer=optimizer, ema=None, callbacks=[EarlyStopping(2)],
                    metrics={"accuracy": score})  # fmt: skip
    assert log["epoch"].tolist() == [1, 2, 3, 4]


def test_training_with_lr_zero_changes_no_weight_and_no_statistic():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))  # no BatchNorm: only the optimizer could change it
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    train, val = loaders()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    log = quiet_fit(model, train, val, epochs=2, optimizer=optimizer, ema=0.9)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert log["live_loss"].nunique() == 1 and log["ema_loss"].nunique() == 1


def bn_model():
    from conftest import small_cnn

    torch.manual_seed(0)
    return small_cnn()  # BatchNorm, no dropout: a skipped batch must leave no trace at all


def test_a_skipped_nan_batch_leaves_batchnorm_statistics_and_the_ema_untouched():
    images, labels = next(iter(loaders()[0]))
    first, second = (images[:16], labels[:16]), (images[16:], labels[16:])
    poisoned = (torch.full_like(images[:16], math.nan), labels[:16])
    _, val = loaders()
    runs = []
    for batches in ([first, poisoned, second], [first, second]):
        model = bn_model()
        ema = ModelEMA(model, decay=0.9)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
            log = quiet_fit(model, batches, val, epochs=2, optimizer=optimizer, ema=ema)
        runs.append((model, ema, log))
    (model, ema, log), (clean_model, clean_ema, clean_log) = runs
    assert log[["live_loss", "ema_loss"]].map(math.isfinite).all().all()
    for a, b in [(model, clean_model), (ema.module, clean_ema.module)]:
        for (key, x), y in zip(a.state_dict().items(), b.state_dict().values()):
            assert torch.equal(x, y), key  # running_mean/var and num_batches_tracked included
    same = ["seconds", "half_life_epochs_ema"]  # the half-life in epochs counts the poisoned batch's step
    pd.testing.assert_frame_equal(log.drop(columns=same), clean_log.drop(columns=same))


class TwoInputs(nn.Module):
    """A model called as model(image, scale), returning (logits, features)."""

    def __init__(self):
        super().__init__()
        self.net = SmallCNN(width=8)

    def forward(self, image, scale):
        logits = self.net(image * scale)
        return logits, logits.detach()


class HuggingFaceLike(nn.Module):
    """A model called with keyword inputs that returns a dict, as HuggingFace models do."""

    def __init__(self):
        super().__init__()
        self.net = SmallCNN(width=8)

    def forward(self, pixel_values):
        return {"logits": self.net(pixel_values), "hidden": pixel_values.mean()}


def reshaped(loader, shape):
    return [shape(x, y) for x, y in loader]


def test_inputs_as_a_tuple_are_spread_and_a_tuple_output_picked_by_output_key():
    torch.manual_seed(0)
    model = TwoInputs()
    train, val = (reshaped(loader, lambda x, y: ((x, torch.ones(())), y)) for loader in loaders())
    log = quiet_fit(model, train, val, epochs=2, optimizer=torch.optim.SGD(model.parameters(), lr=0.05),
                    output_key=0)  # fmt: skip
    assert log["live_loss"].iloc[-1] < log["live_loss"].iloc[0]
    scores = evaluate(model, val, output_key=0)
    assert scores["loss"] == pytest.approx(log["live_loss"].iloc[-1], rel=1e-6)


def test_dict_batches_with_a_target_key_and_a_dict_output_train_and_evaluate():
    torch.manual_seed(0)
    model = HuggingFaceLike()
    train, val = (reshaped(loader, lambda x, y: {"pixel_values": x, "labels": y}) for loader in loaders())
    log = quiet_fit(model, train, val, epochs=2, optimizer=torch.optim.SGD(model.parameters(), lr=0.05),
                    target_key="labels", output_key="logits")  # fmt: skip
    assert log["live_loss"].iloc[-1] < log["live_loss"].iloc[0]
    assert (
        evaluate(model, val, target_key="labels", output_key="logits")["accuracy"]
        == log["live_accuracy"].iloc[-1]
    )


def test_inputs_as_a_dict_are_passed_as_keywords():
    torch.manual_seed(0)
    model = HuggingFaceLike()
    train, val = (reshaped(loader, lambda x, y: ({"pixel_values": x}, y)) for loader in loaders())
    log = quiet_fit(model, train, val, epochs=1, optimizer=torch.optim.SGD(model.parameters(), lr=0.05),
                    output_key="logits")  # fmt: skip
    assert math.isfinite(log["live_loss"].iloc[0])


def test_a_dict_output_without_output_key_is_an_error_before_an_epoch_is_spent():
    torch.manual_seed(0)
    model = HuggingFaceLike()
    train, val = (reshaped(loader, lambda x, y: ({"pixel_values": x}, y)) for loader in loaders())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    with pytest.raises(
        ValueError, match=r"returned a dict with keys \['logits', 'hidden'\].*output_key='logits'"
    ):
        quiet_fit(model, train, val, epochs=1, optimizer=optimizer)
    with pytest.raises(ValueError, match="output_key="):
        evaluate(model, val)


def test_a_dict_batch_without_target_key_is_an_error_naming_its_keys():
    model, optimizer, train, val = setup()
    batches = reshaped(train, lambda x, y: {"pixel_values": x, "labels": y})
    with pytest.raises(ValueError, match=r"\['pixel_values', 'labels'\].*target_key='labels'"):
        quiet_fit(model, batches, val, epochs=1, optimizer=optimizer)


def test_an_iterable_loader_without_len_trains(capsys):
    from torch.utils.data import IterableDataset

    class Stream(IterableDataset):
        def __iter__(self):
            from ema_kit.examples.digits import digits

            images, labels = digits()
            return iter(zip(images[:192], labels[:192]))

    model, optimizer, _, val = setup()
    ema = ModelEMA(model, decay=0.9)
    log = fit(model, DataLoader(Stream(), batch_size=32), val, epochs=2, optimizer=optimizer, ema=ema,
              callbacks=[LiveLog(progress="text", plot=False)])  # fmt: skip
    assert len(log) == 2 and ema.num_updates == 2 * 6
    assert "epoch 2/2" in capsys.readouterr().out


def test_a_regression_target_with_the_default_loss_is_an_error_suggesting_loss_fn():
    model, optimizer, train, val = setup()
    batches = reshaped(train, lambda x, y: (x, y.float()))
    with pytest.raises(ValueError, match=r"loss_fn="):
        quiet_fit(model, batches, val, epochs=1, optimizer=optimizer)


def run_into(tmp_path, epochs, seed=1, make_optimizer=None, scheduler=None, ema=0.9, **options):
    model, optimizer, train, val = setup(seed=seed)
    if make_optimizer is not None:
        optimizer = make_optimizer(model)
    if scheduler is not None:
        scheduler = scheduler(optimizer, len(train))
    log = quiet_fit(model, train, val, epochs=epochs, optimizer=optimizer, ema=ema, scheduler=scheduler,
                    out_dir=tmp_path, **options)  # fmt: skip
    return model, log


def test_resume_auto_starts_fresh_then_continues_like_one_run(tmp_path):
    model, log = run_into(tmp_path / "whole", 3)
    run_into(tmp_path / "split", 2, resume="auto")  # nothing there yet: a fresh run
    resumed, resumed_log = run_into(tmp_path / "split", 3, resume="auto")
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), resumed.state_dict().values()))
    pd.testing.assert_frame_equal(log.drop(columns="seconds"), resumed_log.drop(columns="seconds"))
    rerun, rerun_log = run_into(tmp_path / "split", 3, resume="auto")  # finished: the notebook run again
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), rerun.state_dict().values()))
    pd.testing.assert_frame_equal(rerun_log, resumed_log)


def test_a_resume_with_a_one_cycle_built_for_more_epochs_is_refused_before_training(tmp_path):
    def one_cycle(epochs):
        return lambda optimizer, steps: OneCycleLR(optimizer, 0.1, total_steps=epochs * steps)

    run_into(tmp_path, 1, scheduler=one_cycle(1), resume="auto")
    with pytest.raises(ValueError, match=r"another schedule \(total_steps=6 in the checkpoint, 12 now\)"):
        run_into(tmp_path, 2, scheduler=one_cycle(2), resume="auto")
    assert pd.read_csv(tmp_path / "history.csv")["epoch"].tolist() == [1]


def test_a_resume_with_fewer_epochs_than_trained_is_refused(tmp_path):
    run_into(tmp_path, 2)
    said = r"trained for 2 epochs, more than this run's epochs=1.*epochs=2 or more"
    with pytest.raises(ValueError, match=said):
        run_into(tmp_path, 1, resume="auto")


def test_a_rerun_into_a_finished_run_folder_is_refused_unless_overwrite(tmp_path):
    run_into(tmp_path, 1)
    with pytest.raises(ValueError, match=r"holds a run.*resume='auto'.*resume='overwrite'"):
        run_into(tmp_path, 1)
    _, log = run_into(tmp_path, 1, resume="overwrite")
    assert len(pd.read_csv(tmp_path / "history.csv")) == len(log) == 1


@pytest.mark.parametrize(
    "change, message",
    [
        ({"make_optimizer": lambda m: torch.optim.Adam(m.parameters(), lr=0.05)}, "SGD.*Adam"),
        (
            {"scheduler": lambda o, n: torch.optim.lr_scheduler.OneCycleLR(o, max_lr=0.1, total_steps=9 * n)},
            "StepLR.*OneCycleLR",
        ),
        ({"amp": "bf16"}, "amp"),
        ({"ema": 0.5}, r"decay.*0\.9.*0\.5"),
        (
            {"make_optimizer": lambda m: torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9)},
            r"lr.*0\.05.*0\.01",
        ),
        (
            {"scheduler": lambda o, n: torch.optim.lr_scheduler.StepLR(o, step_size=2)},
            r"another schedule \(step_size=1 in the checkpoint, 2 now\)",
        ),
    ],
)
def test_a_resume_that_does_not_fit_is_refused_before_anything_changes(tmp_path, change, message):
    step_lr = lambda o, n: torch.optim.lr_scheduler.StepLR(o, step_size=1)  # noqa: E731
    run_into(tmp_path, 1, scheduler=step_lr)
    options = {"scheduler": step_lr} | change
    model, optimizer, train, val = setup(seed=1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    if "make_optimizer" in options:
        optimizer = options.pop("make_optimizer")(model)
    scheduler = options.pop("scheduler")(optimizer, len(train))
    with pytest.raises(ValueError, match=message):
        quiet_fit(model, train, val, epochs=2, optimizer=optimizer, scheduler=scheduler, out_dir=tmp_path,
                  resume=True, **({"ema": 0.9} | options))  # fmt: skip
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_posthoc_ema_as_a_callback_resumes_to_the_snapshots_of_one_run(tmp_path):
    from ema_kit import PostHocEMA

    def run(folder, epochs, resume=False):
        model, optimizer, train, val = setup(seed=1)
        posthoc = PostHocEMA(model, snapshot_every=5)  # 6 steps per epoch: epoch 2 ends off the grid
        quiet_fit(model, train, val, epochs=epochs, optimizer=optimizer, callbacks=[posthoc],
                  out_dir=folder, resume=resume)  # fmt: skip
        return posthoc

    whole = run(tmp_path / "whole", 4)
    run(tmp_path / "split", 2)
    resumed = run(tmp_path / "split", 4, resume=True)
    assert resumed.num_steps == whole.num_steps and resumed.snapshots == whole.snapshots
    assert sorted(p.name for p in (tmp_path / "split" / "posthoc").iterdir()) == sorted(
        p.name for p in (tmp_path / "whole" / "posthoc").iterdir()
    )
    for key, value in whole.synthesize(0.07).items():
        assert torch.equal(value, resumed.synthesize(0.07)[key]), key


@pytest.mark.parametrize(
    "change, error, message",
    [
        ({"callbacks": [object()]}, TypeError, r"callbacks\[1\].*object.*ema_kit.Callback"),
        ({"monitor": ("ema_accuracy", "lower")}, ValueError, r"monitor must be .*\(name, 'min'\)"),
        ({"resume": 3}, TypeError, "resume must be"),
        ({"resume": "overwrite"}, ValueError, "give out_dir too"),
    ],
)
def test_bad_settings_are_refused_before_training(change, error, message):
    model, optimizer, train, val = setup()
    with pytest.raises(error, match=message):
        quiet_fit(model, train, val, epochs=1, optimizer=optimizer, **change)
    assert all(p.grad is None for p in model.parameters())


def test_a_plateau_scheduler_watching_the_other_direction_is_refused():
    model, optimizer, train, val = setup()
    plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="min")  # the monitor is accuracy
    with pytest.raises(ValueError, match=r"ReduceLROnPlateau\(mode='min'\).*ema_accuracy with mode='max'"):
        quiet_fit(model, train, val, epochs=1, optimizer=optimizer, scheduler=plateau)
    log = quiet_fit(model, train, val, epochs=1, optimizer=optimizer, scheduler=plateau, monitor="loss")
    assert len(log) == 1


def test_an_out_dir_that_is_a_file_is_refused_before_training(tmp_path):
    model, optimizer, train, val = setup()
    (tmp_path / "run").write_text("not a folder")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="out_dir=.*is a file"):
        quiet_fit(model, train, val, epochs=1, optimizer=optimizer, out_dir=tmp_path / "run")
    with pytest.raises(ValueError, match="out_dir=.*cannot be created"):
        quiet_fit(model, train, val, epochs=1, optimizer=optimizer, out_dir=tmp_path / "run" / "sub")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.skipif(torch.cuda.is_available(), reason="tests the message on a machine without CUDA")
def test_cuda_on_a_machine_without_it_is_a_clear_error():
    model, optimizer, train, val = setup()
    with pytest.raises(ValueError, match=r"device='cuda'.*device='auto'"):
        quiet_fit(model, train, val, epochs=1, optimizer=optimizer, device="cuda")


def test_callbacks_none_means_no_callbacks():
    model, optimizer, train, val = setup()
    assert len(fit(model, train, val, epochs=1, optimizer=optimizer, callbacks=None)) == 1


def test_fit_and_model_ema_refuse_a_number_given_as_text_alike():
    model, optimizer, train, val = setup()
    with pytest.raises(TypeError, match=r"epochs must be an int >= 1, got '3' \(str\)"):
        quiet_fit(model, train, val, epochs="3", optimizer=optimizer)
    with pytest.raises(TypeError, match=r"update_every must be an int >= 1, got '3' \(str\)"):
        ModelEMA(model, update_every="3")


def test_numpy_scalars_are_taken_wherever_a_number_is():
    import numpy as np

    model, optimizer, train, val = setup()
    callbacks = [GradientClip(np.float32(1.0)), EarlyStopping(np.int64(2))]
    log = quiet_fit(model, train, val, epochs=np.int64(1), optimizer=optimizer, ema=np.float32(0.9),
                    accumulate=np.int64(1), callbacks=callbacks)  # fmt: skip
    assert len(log) == 1
    log = quiet_fit(model, train, val, epochs=1, optimizer=optimizer, ema=(np.float32(0.5), np.float64(0.9)))
    assert "ema0.5_loss" in log and "ema0.9_loss" in log


def test_an_optimizer_built_with_numpy_numbers_resumes(tmp_path):
    import numpy as np

    def numpy_sgd(model):
        return torch.optim.SGD(model.parameters(), lr=np.float32(0.05), momentum=np.float64(0.9))

    run_into(tmp_path, 1, make_optimizer=numpy_sgd)
    _, log = run_into(tmp_path, 2, make_optimizer=numpy_sgd, resume=True)
    assert log["epoch"].tolist() == [1, 2]


def test_a_misspelled_hook_gets_a_warning_naming_the_hook():
    class Typo(Callback):
        def on_epoch_ends(self, state):
            pass

    class DuckTypo:
        def on_step_end(self, state):
            pass

        def on_fit_stat(self, state):
            pass

    model, optimizer, train, val = setup()
    with pytest.warns(UserWarning, match=r"on_epoch_ends.*did you mean on_epoch_end"):
        quiet_fit(model, train, val, epochs=1, optimizer=optimizer, callbacks=[Typo()])
    with pytest.warns(UserWarning, match=r"on_fit_stat.*did you mean on_fit_start"):
        quiet_fit(model, train, val, epochs=1, optimizer=optimizer, callbacks=[DuckTypo()])


def test_a_callback_subclass_overrides_only_the_hooks_it_needs():
    class CountSteps(Callback):
        steps = 0

        def on_step_end(self, state):
            self.steps += 1

    model, optimizer, train, val = setup()
    counter = CountSteps()
    quiet_fit(model, train, val, epochs=1, optimizer=optimizer, callbacks=[counter])
    assert counter.steps == len(train)


def test_output_key_on_a_model_that_returns_a_tensor_is_an_error_not_its_first_row():
    model, _, _, val = setup()
    with pytest.raises(ValueError, match="returned a tensor: drop output_key"):
        evaluate(model, val, output_key=0)
    with pytest.raises(
        ValueError, match=r"output_key='scores' is not in the model's output \(keys \['logits'"
    ):
        evaluate(HuggingFaceLike(), reshaped(val, lambda x, y: ({"pixel_values": x}, y)), output_key="scores")


def test_a_rerun_of_a_finished_run_with_resume_auto_draws_its_plot_again(tmp_path):
    run_into(tmp_path, 1, plot=True)
    (tmp_path / "history.png").unlink()
    run_into(tmp_path, 1, resume="auto", plot=True)  # nothing left to train: only the plot is drawn
    assert (tmp_path / "history.png").read_bytes()[:4] == b"\x89PNG"


# -- issue 21: caught before any weight changes ----------------------------------------------------------


def unchanged(model, before) -> bool:
    return all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_a_raising_metric_fails_in_the_sanity_pass_before_any_weight_changes(tmp_path):
    model, optimizer, train, val = setup()
    before = {k: v.clone() for k, v in model.state_dict().items()}

    def broken(outputs, targets):
        raise RuntimeError("metric bug")

    with pytest.raises(RuntimeError, match="metric bug") as caught:
        quiet_fit(model, train, val, epochs=2, optimizer=optimizer, metrics={"m": (broken, "max")},
                  out_dir=tmp_path / "run")  # fmt: skip
    assert any("sanity pass before training" in note for note in caught.value.__notes__)
    assert unchanged(model, before) and not (tmp_path / "run").exists()


def test_an_ema_that_cannot_be_scored_fails_in_the_sanity_pass_before_any_weight_changes(tmp_path):
    model, optimizer, train, val = setup()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ema = ModelEMA(model, dtype="bfloat16-stochastic")  # bf16 weights, float32 batches, no autocast
    with pytest.raises(RuntimeError) as caught:
        quiet_fit(model, train, val, epochs=1, optimizer=optimizer, ema=ema, out_dir=tmp_path / "run")
    notes = caught.value.__notes__
    assert any("scoring the EMA model 'ema' failed" in note and "amp='bf16'" in note for note in notes)
    assert unchanged(model, before) and ema.num_updates == 0 and not (tmp_path / "run").exists()


def test_a_model_with_too_few_outputs_fails_before_any_weight_changes():
    torch.manual_seed(0)
    model = SmallCNN(num_classes=5, width=8)  # the digits have 10 classes
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    train, val = loaders()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises((IndexError, RuntimeError, ValueError)) as caught:
        quiet_fit(model, train, val, epochs=1, optimizer=optimizer)
    assert any("sanity pass" in note for note in caught.value.__notes__)
    assert unchanged(model, before)


def test_an_empty_iterable_validation_loader_is_refused_before_training():
    from torch.utils.data import IterableDataset

    class Nothing(IterableDataset):
        def __iter__(self):
            return iter(())

    model, optimizer, train, _ = setup()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="val_loader yielded no batches"):
        quiet_fit(model, train, DataLoader(Nothing(), batch_size=8), epochs=1, optimizer=optimizer)
    assert unchanged(model, before)


def test_a_metric_that_needs_more_than_one_batch_passes_the_sanity_pass_on_the_whole_set():
    model, optimizer, train, val = setup()

    @whole_set
    def needs_two_classes(outputs, targets):  # as roc_auc_score: undefined with one class present
        if targets.unique().numel() < 2:
            raise ValueError("Only one class present in y_true.")
        return 0.5

    sorted_val = DataLoader(TensorDataset(*loaders()[1].dataset[:]), batch_size=64)
    first_images, first_labels = next(iter(sorted_val))
    one_class = [
        (
            first_images[:8][first_labels[:8] == first_labels[0]],
            first_labels[:8][first_labels[:8] == first_labels[0]],
        )
    ]
    log = quiet_fit(model, train, one_class + list(sorted_val), epochs=1, optimizer=optimizer,
                    metrics={"score": (needs_two_classes, "max")})  # fmt: skip
    assert len(log) == 1


def batchnorm1d_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 10))


def test_a_last_training_batch_of_one_row_with_batchnorm_is_refused_up_front_naming_drop_last():
    from ema_kit.examples.digits import digits

    images, labels = digits()
    train = DataLoader(TensorDataset(images[:193], labels[:193]), batch_size=32)  # 6 x 32 + 1
    model = batchnorm1d_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(
        ValueError, match=r"last batch holds one row \(193 rows in batches of 32\).*drop_last=True"
    ):
        quiet_fit(model, train, loaders()[1], epochs=1, optimizer=torch.optim.SGD(model.parameters(), lr=0.1))
    assert unchanged(model, before)
    model = batchnorm1d_model()  # with drop_last=True it trains
    train = DataLoader(TensorDataset(images[:193], labels[:193]), batch_size=32, drop_last=True)
    assert (
        len(
            quiet_fit(
                model, train, loaders()[1], epochs=1, optimizer=torch.optim.SGD(model.parameters(), lr=0.1)
            )
        )
        == 1
    )


def test_a_batch_of_one_row_from_a_loader_that_cannot_tell_is_skipped_with_a_warning():
    batches = list(loaders()[0])
    batches.append((batches[0][0][:1], batches[0][1][:1]))  # a list of batches: no batch_size to read
    model = batchnorm1d_model()
    ema = ModelEMA(model, decay=0.9)
    with pytest.warns(RuntimeWarning, match="skipped a training batch of one row.*drop_last=True"):
        quiet_fit(model, batches, loaders()[1], epochs=1, ema=ema,
                  optimizer=torch.optim.SGD(model.parameters(), lr=0.1))  # fmt: skip
    assert ema.num_updates == len(batches) - 1


def test_an_optimizer_over_another_models_parameters_is_refused_by_name():
    model, _, train, val = setup()
    stale = torch.optim.SGD(SmallCNN(width=8).parameters(), lr=0.05)  # the model cell rerun, not this one
    with pytest.raises(
        ValueError, match=r"optimizer holds none of the model's parameters.*torch\.optim\.SGD\(model"
    ):
        quiet_fit(model, train, val, epochs=1, optimizer=stale)


@pytest.mark.parametrize(
    "monitor, known", [(("ema_rmse", "max"), "lower"), (("ema_accuracy", "min"), "higher")]
)
def test_a_direction_that_contradicts_a_well_known_name_is_refused(monitor, known):
    model, optimizer, train, val = setup()
    metrics = {"rmse": lambda out, y: 1.0, "accuracy": accuracy_metric}
    with pytest.raises(ValueError, match=rf"is {known}-is-better \(a well-known name\)"):
        quiet_fit(model, train, val, epochs=1, optimizer=optimizer, metrics=metrics, monitor=monitor)


def accuracy_metric(outputs, targets):
    return (outputs.argmax(1) == targets).float().mean()


@pytest.mark.parametrize(
    "change",
    [
        {"monitor": "ema_acuracy"},
        {"monitor": "ema_lb"},
        {"metrics": {"lb": lambda out, y: 0.5}},
        {"ema": "2 weeks"},
    ],
    ids=["typo", "unknown column", "unknown direction", "bad ema"],
)
def test_a_refused_run_leaves_no_out_dir_behind(tmp_path, change):
    model, optimizer, train, val = setup()
    with pytest.raises(ValueError):
        quiet_fit(model, train, val, epochs=1, optimizer=optimizer, out_dir=tmp_path / "run", **change)
    assert not (tmp_path / "run").exists()


def test_the_last_shorter_accumulation_group_averages_its_own_batches():
    _, _, train, val = setup()
    model = bn_model()  # no dropout: a second forward of a batch gives the same loss
    batches = list(train)[:4]  # accumulate=3: a group of 3, then a group of 1
    captured = []

    class Grads(Callback):
        def on_before_step(self, state):
            grads = [p.grad.clone() for p in state.model.parameters()]
            reference = copy.deepcopy(state.model)  # the weights the group's batches saw
            images, labels = batches[3]
            nn.functional.cross_entropy(reference(images), labels).backward()
            captured.append((grads, [p.grad for p in reference.parameters()]))

    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    quiet_fit(model, batches, val, epochs=1, optimizer=optimizer, accumulate=3, ema=None, callbacks=[Grads()])
    grads, alone = captured[1]
    for g, r in zip(grads, alone):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-6)  # not a third of it


def test_a_non_finite_loss_skips_its_whole_accumulation_group_and_nothing_else():
    images, labels = next(iter(loaders(batch_size=64)[0]))
    parts = [(images[i : i + 16], labels[i : i + 16]) for i in range(0, 64, 16)]
    poisoned = (torch.full_like(parts[2][0], math.nan), parts[2][1])
    _, val = loaders()
    runs = []
    for batches in ([parts[0], parts[1], poisoned, parts[3]], [parts[0], parts[1]]):
        model = bn_model()
        ema = ModelEMA(model, decay=0.9)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
            log = quiet_fit(model, batches, val, epochs=1, optimizer=optimizer, ema=ema, accumulate=2)
        runs.append((model, ema, log))
    (model, ema, log), (clean_model, clean_ema, clean_log) = runs
    assert ema.num_updates == clean_ema.num_updates == 1
    for a, b in [(model, clean_model), (ema.module, clean_ema.module)]:
        for (key, x), y in zip(a.state_dict().items(), b.state_dict().values()):
            assert torch.equal(x, y), key  # BatchNorm statistics of the skipped group put back
    assert log["train_loss"].iloc[0] == pytest.approx(clean_log["train_loss"].iloc[0])


def test_resuming_with_another_batch_size_is_refused_naming_it_not_the_ema_decay(tmp_path):
    run_into(tmp_path, 1, ema="0.5 epochs")  # a half-life in epochs: its decay follows the steps per epoch
    model = SmallCNN(width=8)
    train, val = loaders(batch_size=64, seed=1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(
        ValueError, match=r"batch_size 32 and 6 optimizer steps.*batch_size 64 and 3 steps"
    ) as caught:
        quiet_fit(model, train, val, epochs=2, ema="0.5 epochs", out_dir=tmp_path, resume=True,
                  optimizer=torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9))  # fmt: skip
    assert "decay" not in str(caught.value) and unchanged(model, before)


# -- issue 21: hooks that can express what competitors do ------------------------------------------------


class Mixup(Callback):
    """Mixup as a callback: mixed inputs, soft targets (probabilities summing to 1)."""

    def __init__(self):
        self.target_sums = []

    def on_batch_start(self, state):
        order = torch.randperm(len(state.targets))
        onehot = nn.functional.one_hot(state.targets, 10).float()
        state.inputs = 0.7 * state.inputs + 0.3 * state.inputs[order]
        state.targets = 0.7 * onehot + 0.3 * onehot[order]
        self.target_sums.append(state.targets.sum(1))


def test_a_mixup_callback_trains_with_soft_targets_and_the_default_loss():
    model, optimizer, train, val = setup()
    mixup = Mixup()
    log = quiet_fit(model, train, val, epochs=3, optimizer=optimizer, callbacks=[mixup])
    assert len(mixup.target_sums) == 3 * len(train)
    assert all(torch.allclose(sums, torch.ones_like(sums)) for sums in mixup.target_sums)
    assert log["live_loss"].iloc[-1] < log["live_loss"].iloc[0]  # it learned, scored on plain labels


def test_a_per_batch_logger_sees_every_batch_with_its_loss_and_outputs():
    model, optimizer, train, val = setup()
    rows = []

    class PerBatch(Callback):
        def on_batch_end(self, state):
            rows.append((state.epoch, state.step, state.loss.item(), tuple(state.outputs.shape)))

    quiet_fit(model, train, val, epochs=2, optimizer=optimizer, callbacks=[PerBatch()])
    assert len(rows) == 2 * len(train)
    assert [step for _, step, _, _ in rows] == list(range(1, 2 * len(train) + 1))
    assert all(math.isfinite(loss) and shape[1] == 10 for _, _, loss, shape in rows)


def test_a_loss_replaced_before_backward_is_the_one_trained_and_logged():
    model, optimizer, train, val = setup()

    class Doubled(Callback):
        def on_before_backward(self, state):
            state.loss = state.loss * 0.0  # no gradient: the weights stay

    before = {
        k: v.clone() for k, v in model.state_dict().items() if "running" not in k and "num_batches" not in k
    }
    log = quiet_fit(model, train, val, epochs=1, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                    ema=None, callbacks=[Doubled()])  # fmt: skip
    assert all(torch.equal(before[k], model.state_dict()[k]) for k in before)
    assert log["train_loss"].iloc[0] == 0.0


def test_a_callback_written_for_another_framework_is_not_refused():
    class KerasStyle:
        def on_train_batch_begin(self, batch, logs=None):  # never called by fit
            raise AssertionError("called")

        def on_epoch_end(self, state):
            self.seen = state.epoch

    model, optimizer, train, val = setup()
    callback = KerasStyle()
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # not even a warning: no hook is named like it
        warnings.filterwarnings("ignore", "fit: ema")
        quiet_fit(model, train, val, epochs=1, optimizer=optimizer, callbacks=[callback])
    assert callback.seen == 1


def test_a_column_added_in_on_validation_end_reaches_the_log_the_plot_and_the_best_epoch(tmp_path):
    model, optimizer, train, val = setup()
    board = iter([0.2, 0.9, 0.4])  # the "leaderboard": best at epoch 2

    class Leaderboard(Callback):
        def on_validation_end(self, state):
            state.row["ema_lb"] = next(board)
            self.ema = copy.deepcopy(state.emas["ema"].module.state_dict()) if state.epoch == 2 else None
            if state.epoch == 2:
                self.best = {k: v.clone() for k, v in state.emas["ema"].module.state_dict().items()}

    leaderboard = Leaderboard()
    log = quiet_fit(model, train, val, epochs=3, optimizer=optimizer, ema=0.9, monitor=("ema_lb", "max"),
                    out_dir=tmp_path, plot=True, callbacks=[leaderboard])  # fmt: skip
    assert log["ema_lb"].tolist() == [0.2, 0.9, 0.4]
    assert pd.read_csv(tmp_path / "history.csv")["ema_lb"].tolist() == [0.2, 0.9, 0.4]
    saved = torch.load(tmp_path / "model_ema.pth", weights_only=True)
    assert all(torch.equal(saved[k], v) for k, v in leaderboard.best.items())  # epoch 2's EMA
    from ema_kit.training.plot import plot_history

    assert "lb" in [ax.get_title() for ax in plot_history(log).axes]


def test_monitoring_a_column_no_callback_added_is_an_error_after_the_first_validation():
    model, optimizer, train, val = setup()

    class Nothing(Callback):
        def on_validation_end(self, state):
            pass

    with pytest.raises(ValueError, match=r"monitor='ema_lb' is not a column of the log after the callbacks"):
        quiet_fit(
            model, train, val, epochs=1, optimizer=optimizer, monitor=("ema_lb", "max"), callbacks=[Nothing()]
        )


class Counter(Callback):
    """A stateful callback: counts epochs, its state kept under the key it is given."""

    def __init__(self, key):
        self.key, self.epochs = key, 0

    @property
    def state_key(self):
        return self.key

    def on_epoch_end(self, state):
        self.epochs += 1

    def state_dict(self):
        return {"epochs": self.epochs}

    def load_state_dict(self, state):
        self.epochs = state["epochs"]


def test_each_callback_state_is_kept_under_its_own_key_and_resumed_whatever_the_order(tmp_path):
    run_into(tmp_path, 2, callbacks=[Counter("a"), Counter("b")])
    b, a = Counter("b"), Counter("a")
    run_into(tmp_path, 3, resume=True, callbacks=[b, a])
    assert (a.epochs, b.epochs) == (3, 3)
    with pytest.raises(ValueError, match="both keep their state under 'a'"):
        run_into(tmp_path / "other", 1, callbacks=[Counter("a"), Counter("a")])


# -- issue 20: at most one host sync per optimizer step --------------------------------------------------


@pytest.mark.parametrize("accumulate", [1, 4])  # 6 batches: 6 steps, or a group of 4 and one of 2
@pytest.mark.parametrize("amp", [False, "bf16", "fp16"])
def test_the_training_step_reads_the_device_once_per_optimizer_step(monkeypatch, amp, accumulate):
    model, optimizer, train, val = setup()
    reads = []
    window = {"open": False}

    def counting(name):
        original = getattr(torch.Tensor, name)

        def read(self, *args, **kwargs):
            loader = "torch/utils/data" in sys._getframe(1).f_code.co_filename  # the sampler's, on the CPU
            if window["open"] and not loader:
                reads.append(name)
            return original(self, *args, **kwargs)

        return read

    for name in ("item", "tolist", "__bool__", "__float__", "__int__", "__index__", "numpy", "cpu"):
        monkeypatch.setattr(torch.Tensor, name, counting(name))

    class Window(Callback):  # from the epoch's start to its validation: the training steps
        steps = 0

        def on_epoch_start(self, state):
            window["open"] = True

        def on_step_end(self, state):
            self.steps += 1

        def on_validation_start(self, state):
            window["open"] = False

    counter = Window()
    quiet_fit(model, train, val, epochs=1, optimizer=optimizer, amp=amp, accumulate=accumulate, ema=0.9,
              device="cpu", callbacks=[counter])  # fmt: skip
    groups = math.ceil(len(train) / accumulate)
    assert counter.steps == groups
    assert len(reads) == groups, reads


# -- rows within epochs (ValidateEvery) ------------------------------------------------------------------


def test_a_row_within_an_epoch_is_written_at_once_with_the_train_loss_since_the_row_before(tmp_path):
    model, optimizer, train, val = setup()  # 6 batches an epoch
    losses, rows_on_disk = [], []

    class Recorder(Callback):
        def on_batch_end(self, state):
            losses.append((state.loss.item() * len(state.targets), len(state.targets)))

        def on_row_added(self, state):
            rows_on_disk.append(len(pd.read_csv(tmp_path / "history.csv")))

    log = quiet_fit(model, train, val, epochs=2, optimizer=optimizer, out_dir=tmp_path,
                    callbacks=[ValidateEvery(epochs=0.5), Recorder()])  # fmt: skip
    assert log["epoch"].tolist() == [0.5, 1, 1.5, 2] and rows_on_disk == [1, 2, 3, 4]
    for row, batches in zip(log["train_loss"], [losses[:3], losses[3:6], losses[6:9], losses[9:]]):
        assert row == pytest.approx(sum(s for s, _ in batches) / sum(n for _, n in batches))
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "history.csv"), log, check_dtype=False)


def test_a_row_within_an_epoch_can_be_the_best_and_its_ema_weights_are_kept(tmp_path):
    model, optimizer, train, val = setup()
    kept = {}

    class Leaderboard(Callback):
        def on_validation_end(self, state):
            state.row["lb"] = 1.0 if state.row["epoch"] == 1.5 else 0.5

        def on_row_added(self, state):
            if state.row["epoch"] == 1.5:
                kept.update({k: v.clone() for k, v in state.scored["ema"].state_dict().items()})

    log = quiet_fit(model, train, val, epochs=3, optimizer=optimizer, out_dir=tmp_path, monitor=("lb", "max"),
                    callbacks=[ValidateEvery(epochs=0.5), Leaderboard()])  # fmt: skip
    assert len(log) == 6
    saved = torch.load(tmp_path / "model_ema.pth", weights_only=True)
    assert all(torch.equal(saved[k], v) for k, v in kept.items())
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=True)["epoch"] == 3


def test_a_resume_with_rows_within_epochs_gives_the_log_and_weights_of_one_run(tmp_path):
    model, log = run_into(tmp_path / "whole", 3, callbacks=[ValidateEvery(steps=2)])
    run_into(tmp_path / "split", 2, callbacks=[ValidateEvery(steps=2)])
    resumed, resumed_log = run_into(tmp_path / "split", 3, resume=True, callbacks=[ValidateEvery(steps=2)])
    assert log["epoch"].tolist() == [e + f for e in range(3) for f in (1 / 3, 2 / 3, 1)]
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), resumed.state_dict().values()))
    pd.testing.assert_frame_equal(log.drop(columns="seconds"), resumed_log.drop(columns="seconds"))


def test_the_stop_button_after_a_row_within_an_epoch_says_so(tmp_path):
    model, optimizer, train, val = setup()

    class StopButton:
        def on_step_end(self, state):
            if state.epoch == 2 and len(state.history) == 3:
                raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt) as stopped:
        quiet_fit(model, train, val, epochs=3, optimizer=optimizer, out_dir=tmp_path,
                  callbacks=[ValidateEvery(epochs=0.5), StopButton()])  # fmt: skip
    assert str(stopped.value) == (
        "Stopped by the user during epoch 2 of 3: kept 1 finished epoch and 1 row scored within epoch 2 "
        f"(the last kept: epoch 1.5); {tmp_path} holds them, with a checkpoint of epoch 1 to resume from."
    )


def test_how_many_emas_are_scored_does_not_change_how_the_live_model_trains():
    def trained(ema):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(16, 32), nn.Dropout(0.5), nn.Linear(32, 3))  # draws from torch's RNG
        generator = torch.Generator().manual_seed(1)
        data = TensorDataset(torch.randn(96, 16, generator=generator), torch.arange(96) % 3)
        train = DataLoader(data, batch_size=16, shuffle=True, generator=torch.Generator().manual_seed(2))
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        quiet_fit(model, train, DataLoader(data, batch_size=32), epochs=3, optimizer=optimizer, ema=ema)
        return list(model.parameters())

    alone = trained(None)
    for ema in (0.9, (0.9, 0.99, 0.999)):
        assert all(torch.equal(a, b) for a, b in zip(alone, trained(ema)))


def test_every_model_is_scored_on_the_same_random_draws_of_a_random_validation_subset():
    model, optimizer, train, val = setup(seed=1)
    subset = RandomSampler(val.dataset, replacement=True, num_samples=8)  # a new random subset each pass
    random_val = DataLoader(val.dataset, batch_size=8, sampler=subset)
    ema = ModelEMA(model, decay=0.9, update_after_step=10**6)  # copies the live weights: the same model
    log = quiet_fit(model, train, random_val, epochs=2, optimizer=optimizer, ema=ema)
    assert log["live_loss"].tolist() == log["ema_loss"].tolist()


def test_a_resume_is_bit_identical_with_a_batch_sampler_that_shuffles_with_its_own_generator(tmp_path):
    def run(epochs, folder):
        model, optimizer, train, val = setup(seed=1)
        sampler = RandomSampler(train.dataset, generator=torch.Generator().manual_seed(3))
        train = DataLoader(train.dataset, batch_sampler=BatchSampler(sampler, 16, drop_last=False))
        log = quiet_fit(model, train, val, epochs=epochs, optimizer=optimizer, out_dir=tmp_path / folder,
                        resume="auto")  # fmt: skip
        return log, model

    log, model = run(3, "whole")
    run(2, "split")
    resumed_log, resumed = run(3, "split")
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), resumed.state_dict().values()))
    pd.testing.assert_frame_equal(log.drop(columns="seconds"), resumed_log.drop(columns="seconds"))
