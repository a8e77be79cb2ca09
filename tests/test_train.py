"""fit and evaluate (ema_kit/train.py): the log, files on disk, resume, interrupts, AMP, bad input."""

import math
import warnings

import pandas as pd
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from ema_kit import ModelEMA, evaluate, fit
from ema_kit.demo import SmallCNN

COLUMNS = ["epoch", "train_loss", "live_loss", "ema_loss", "live_accuracy", "ema_accuracy", "lr", "seconds"]


def loaders(n_train=192, n_val=96, batch_size=32, seed=0):
    """Real digits, a small slice, with a seeded shuffle."""
    from ema_kit.data import digits

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


def quiet_fit(model, train, val, **options):
    options = {"progress": "off", "plot": False} | options
    return fit(model, train, val, **options)


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
    metrics = {"top2": lambda out, y: (out.topk(2, dim=1).indices == y[:, None]).any(1).float().mean()}
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


def test_stop_button_keeps_finished_epochs_in_memory_and_on_disk(tmp_path, capsys):
    model, optimizer, train, val = setup()

    class StopButton:
        def on_step_end(self, state):
            if state.epoch == 3:
                raise KeyboardInterrupt

    log = quiet_fit(
        model, train, val, epochs=5, optimizer=optimizer, out_dir=tmp_path, callbacks=[StopButton()]
    )
    assert log["epoch"].tolist() == [1, 2]
    assert len(pd.read_csv(tmp_path / "history.csv")) == 2
    out = capsys.readouterr().out
    assert "Stopped by the user during epoch 3: kept 2 finished epochs" in out and "Traceback" not in out


def test_an_error_mid_epoch_says_where_the_finished_epochs_are(tmp_path):
    model, optimizer, train, val = setup()
    calls = []

    def flaky(outputs, targets):
        calls.append(1)
        if len(calls) > 2:  # the live and EMA scores of epoch 1 succeed
            raise RuntimeError("metric server unreachable")
        return 0.5

    with pytest.raises(RuntimeError, match="unreachable") as caught:
        quiet_fit(model, train, val, epochs=3, optimizer=optimizer, metrics={"m": flaky}, out_dir=tmp_path)
    assert any("1 finished epochs are kept" in note for note in caught.value.__notes__)
    assert len(pd.read_csv(tmp_path / "history.csv")) == 1


def test_non_finite_loss_skips_the_step_for_model_and_ema_and_warns_once():
    model, optimizer, train, val = setup()
    ema = ModelEMA(model, decay=0.9)
    calls = []

    def sometimes_nan(outputs, targets):
        calls.append(1)
        loss = nn.functional.cross_entropy(outputs, targets)
        return loss * math.nan if len(calls) in (2, 4) and model.training else loss

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


def test_early_stopping_ends_after_patience_epochs_without_improvement():
    model, optimizer, train, val = setup(lr=0.0)  # nothing changes, so nothing improves after epoch 1
    log = quiet_fit(model, train, val, epochs=10, optimizer=optimizer, monitor="live_loss", patience=2)
    assert log["epoch"].tolist() == [1, 2, 3]


def test_gradient_clipping_bounds_the_step():
    model, optimizer, train, val = setup(lr=1.0)
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    before = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
    quiet_fit(model, train, val, epochs=1, optimizer=optimizer, ema=None, clip_grad_norm=1e-3)
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
    fit(model, train, val, epochs=3, optimizer=optimizer, progress="text", plot=False)
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
        ({"metrics": {"bad": lambda out, y: "high"}}, TypeError, "metric 'bad' returned str"),
        ({"metrics": {"bad": lambda out, y: out}}, TypeError, "must return one number"),
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
    scores = evaluate(model, val, metrics={"n": lambda out, y: len(y)})
    assert model.training and scores["n"] == 96


def test_monitor_given_as_a_score_picks_the_best_decay_by_it(tmp_path):
    model, optimizer, train, val = setup()
    log = quiet_fit(model, train, val, epochs=2, optimizer=optimizer, ema=(0.5, 0.9), monitor="loss",
                    out_dir=tmp_path)  # fmt: skip
    best_column = log[["ema0.5_loss", "ema0.9_loss"]].min().idxmin()
    best = SmallCNN(width=8)
    best.load_state_dict(torch.load(tmp_path / "model_ema.pth", weights_only=True))
    assert evaluate(best, val)["loss"] == pytest.approx(log[best_column].min(), rel=1e-6)
