"""K-fold training (ema_kit/kaggle/folds.py): the split, one fit per fold, skips and resumes, OOF, loading."""

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, SubsetRandomSampler, TensorDataset

from ema_kit.examples.digits import digits
from ema_kit.files import load_weights, save_weights
from ema_kit.kaggle import fit_folds, fold_models, plot_folds, predict, stratified_folds
from ema_kit.training import Callback, LiveLog, fit

ROWS = 240  # of the digits: each fold trains in a fraction of a second


@pytest.fixture(scope="module")
def data():
    images, labels = digits()
    return images[:ROWS], labels[:ROWS]


def _trainer(
    data,
    *,
    epochs=2,
    calls=None,
    shuffle_val=False,
    val_rows=None,
    out_dir=None,
    extra=(),
    val_loader_of=None,
):
    """A train_fold over the digits: a linear model, fit into fold.out_dir with resume="auto"."""
    images, labels = data

    def train_fold(fold):
        if calls is not None:
            calls.append(fold.index)
        model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
        train = TensorDataset(images[fold.train], labels[fold.train])
        val_index = fold.val if val_rows is None else fold.val[:val_rows]
        val_loader = DataLoader(TensorDataset(images[val_index], labels[val_index]), batch_size=64,
                                shuffle=shuffle_val)  # fmt: skip
        if val_loader_of is not None:
            val_loader = val_loader_of(TensorDataset(images, labels), fold)
        quiet = LiveLog(progress="off", plot=False)
        fit(model, DataLoader(train, batch_size=32, shuffle=True), val_loader, epochs=epochs, ema=0.8,
            optimizer=torch.optim.Adam(model.parameters(), lr=1e-2), out_dir=out_dir or fold.out_dir,
            resume="auto", callbacks=[quiet, fold.callback, *extra])  # fmt: skip
        return model, val_loader

    return train_fold


# -- the split --------------------------------------------------------------------------------------


def test_stratified_folds_spread_every_class_evenly_over_the_folds(data):
    _, labels = data
    folds = stratified_folds(labels, k=4, seed=0)
    counts = pd.crosstab(labels.numpy(), folds)
    assert sorted(set(folds.tolist())) == [0, 1, 2, 3]
    assert (counts.max(axis=1) - counts.min(axis=1)).max() <= 1


def test_stratified_folds_are_the_same_for_the_same_seed_and_differ_for_another(data):
    _, labels = data
    assert np.array_equal(stratified_folds(labels, seed=3), stratified_folds(labels, seed=3))
    assert not np.array_equal(stratified_folds(labels, seed=3), stratified_folds(labels, seed=4))


@pytest.mark.parametrize("k, complaint", [(1, "at least 2"), (True, "at least 2"), (4, "one class has 3")])
def test_stratified_folds_refuse_too_few_folds_or_too_few_rows_of_a_class(k, complaint):
    with pytest.raises(ValueError, match=complaint):
        stratified_folds([0, 0, 0, 0, 1, 1, 1], k=k)


# -- training the folds -----------------------------------------------------------------------------


def test_fit_folds_trains_each_fold_in_its_folder_and_predicts_every_row_once_out_of_fold(data, tmp_path):
    table = fit_folds(_trainer(data), data[1], out_dir=tmp_path, k=3)
    assert table.index.tolist() == ["0", "1", "2", "oof"] and table.loc["oof", "rows"] == ROWS
    oof = pd.read_csv(tmp_path / "oof.csv")
    assert oof["row"].tolist() == list(range(ROWS))
    assert oof["target"].tolist() == data[1].tolist()
    assert np.array_equal(oof["fold"], stratified_folds(data[1], k=3))
    for model in ("live", "ema"):
        assert np.allclose(oof.filter(regex=rf"^{model}_\d+$").sum(axis=1), 1, atol=1e-5)
    for i in range(3):
        assert {"model_ema.pth", "checkpoint.pt", "history.csv", "oof.csv"} <= {
            p.name for p in (tmp_path / f"fold_{i}").iterdir()}  # fmt: skip
    assert pd.read_csv(tmp_path / "folds.csv", index_col="fold").shape == (4, 5)
    assert (tmp_path / "folds.png").stat().st_size > 0


def test_oof_predictions_are_the_final_live_model_and_the_saved_ema_of_each_fold(data, tmp_path):
    models = {}

    def keep(fold):
        model, loader = _trainer(data)(fold)
        models[fold.index] = model
        return model, loader

    fit_folds(keep, data[1], out_dir=tmp_path, k=3)
    oof = pd.read_csv(tmp_path / "oof.csv")
    images = data[0]
    for i, model in models.items():
        rows = oof[oof["fold"] == i]
        live = predict(model, [images[torch.tensor(rows["row"].to_numpy())]])
        ema = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
        ema.load_state_dict(load_weights(tmp_path / f"fold_{i}" / "model_ema.pth"))
        expected = predict(ema, [images[torch.tensor(rows["row"].to_numpy())]])
        for name, predicted in (("live", live), ("ema", expected)):
            saved = torch.tensor(rows.filter(regex=rf"^{name}_\d+$").to_numpy(), dtype=torch.float32)
            assert torch.allclose(predicted, saved, atol=1e-6)


def test_the_table_scores_the_oof_probabilities_of_each_fold_and_of_all_rows(data, tmp_path):
    table = fit_folds(_trainer(data), data[1], out_dir=tmp_path, k=3)
    oof = pd.read_csv(tmp_path / "oof.csv")
    for model in ("live", "ema"):
        probabilities = oof.filter(regex=rf"^{model}_\d+$").to_numpy()
        right = probabilities.argmax(axis=1) == oof["target"].to_numpy()
        loss = -np.log(probabilities[np.arange(ROWS), oof["target"]]).mean()
        assert table.loc["oof", f"{model}_accuracy"] == pytest.approx(right.mean())
        assert table.loc["oof", f"{model}_loss"] == pytest.approx(loss, rel=1e-5)
        assert table.loc["1", f"{model}_accuracy"] == pytest.approx(right[oof["fold"] == 1].mean())


def test_fit_folds_scores_the_metrics_it_is_given_on_the_whole_fold(data, tmp_path):
    seen = []

    def rows(outputs, targets):
        seen.append(len(targets))
        return float(len(targets))

    table = fit_folds(_trainer(data), data[1], out_dir=tmp_path, k=3, metrics={"rows_seen": (rows, "max")})
    assert table.loc["oof", "ema_rows_seen"] == ROWS and sorted(set(seen)) == [80, ROWS]


def test_a_rerun_skips_the_finished_folds_and_gives_the_same_table(data, tmp_path):
    first = fit_folds(_trainer(data), data[1], out_dir=tmp_path, k=3)
    calls = []
    again = fit_folds(_trainer(data, calls=calls), data[1], out_dir=tmp_path, k=3)
    assert calls == [] and again.equals(first)


def test_a_rerun_trains_only_the_folds_without_their_oof_file(data, tmp_path):
    fit_folds(_trainer(data), data[1], out_dir=tmp_path, k=3)
    before = pd.read_csv(tmp_path / "oof.csv")
    (tmp_path / "fold_1" / "oof.csv").unlink()  # as if killed after fit, before the predictions
    calls = []
    fit_folds(_trainer(data, calls=calls), data[1], out_dir=tmp_path, k=3)
    assert calls == [1] and pd.read_csv(tmp_path / "oof.csv").equals(before)


@pytest.mark.parametrize("change", [{"k": 4}, {"seed": 1}])
def test_a_rerun_with_another_split_is_refused_before_any_fold_trains(data, tmp_path, change):
    fit_folds(_trainer(data), data[1], out_dir=tmp_path, k=3)
    calls = []
    with pytest.raises(ValueError, match="another split"):
        fit_folds(_trainer(data, calls=calls), data[1], out_dir=tmp_path, **({"k": 3} | change))
    assert calls == []


def test_a_shuffled_val_loader_is_refused_naming_the_fold(data, tmp_path):
    with pytest.raises(ValueError, match="fold 0: the val_loader shuffles"):
        fit_folds(_trainer(data, shuffle_val=True), data[1], out_dir=tmp_path, k=3)


def test_a_val_loader_sampling_the_whole_set_at_random_is_refused_and_in_fold_order_scores(data, tmp_path):
    def at_random(whole, fold):
        return DataLoader(whole, batch_size=64, sampler=SubsetRandomSampler(fold.val))

    with pytest.raises(ValueError, match="fold 0: the val_loader shuffles, or reads .* SubsetRandomSampler"):
        fit_folds(_trainer(data, val_loader_of=at_random), data[1], out_dir=tmp_path / "random", k=3)

    def in_order(whole, fold):
        return DataLoader(whole, batch_size=64, sampler=fold.val)

    def in_order_batches(whole, fold):  # batches of indices as numpy arrays
        return DataLoader(whole, batch_sampler=np.array_split(fold.val, 3))

    table = fit_folds(_trainer(data, val_loader_of=in_order), data[1], out_dir=tmp_path / "ordered", k=3)
    batched = fit_folds(_trainer(data, val_loader_of=in_order_batches), data[1], out_dir=tmp_path / "b", k=3)
    pd.testing.assert_frame_equal(table, batched)
    usual = fit_folds(_trainer(data), data[1], out_dir=tmp_path / "usual", k=3)
    pd.testing.assert_frame_equal(table, usual)


def test_labels_that_are_not_class_indices_are_refused_before_any_fold_trains(data, tmp_path):
    calls = []
    names = np.array(["cat", "dog"])[data[1].numpy() % 2]
    said = r"labels must hold one class index per row.*factorize\(.*sort=True\)"
    with pytest.raises(TypeError, match=said):
        fit_folds(_trainer(data, calls=calls), names, out_dir=tmp_path, k=3)
    with pytest.raises(TypeError, match=r"labels must hold one class index per row.*got float64"):
        fit_folds(_trainer(data, calls=calls), data[1].numpy() + 0.5, out_dir=tmp_path, k=3)
    assert calls == []
    as_floats = fit_folds(_trainer(data), data[1].double(), out_dir=tmp_path / "floats", k=3)  # 0.0, 1.0, ...
    as_ints = fit_folds(_trainer(data), data[1], out_dir=tmp_path / "ints", k=3)
    pd.testing.assert_frame_equal(as_floats, as_ints)


def test_a_val_loader_over_other_rows_than_the_fold_is_refused(data, tmp_path):
    with pytest.raises(ValueError, match="gave 10 rows, but the fold holds 80"):
        fit_folds(_trainer(data, val_rows=10), data[1], out_dir=tmp_path, k=3)


def test_a_fit_that_wrote_elsewhere_is_an_error_saying_to_pass_fold_out_dir(data, tmp_path):
    with pytest.raises(ValueError, match="fold 0: fit wrote to .*elsewhere.*pass out_dir=fold.out_dir"):
        fit_folds(_trainer(data, out_dir=tmp_path / "elsewhere"), data[1], out_dir=tmp_path / "run", k=3)


def test_a_fit_without_the_folds_callback_is_an_error_saying_to_pass_it(data, tmp_path):
    images, labels = data

    def train_fold(fold):
        model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
        loader = DataLoader(TensorDataset(images[fold.val], labels[fold.val]), batch_size=16)
        fit(model, loader, loader, epochs=1, ema=0.5, optimizer=torch.optim.Adam(model.parameters()),
            out_dir=fold.out_dir, callbacks=[LiveLog(progress="off", plot=False)])  # fmt: skip
        return model, loader

    with pytest.raises(ValueError, match=r"callbacks=\[fold.callback\]"):
        fit_folds(train_fold, labels, out_dir=tmp_path, k=3)
    assert not (tmp_path / "fold_0" / "oof.csv").exists()


def test_dict_batches_and_outputs_are_read_as_the_folds_fit_read_them(data, tmp_path):
    images, labels = data

    class Named(nn.Module):  # takes dict batches' "pixels", returns {"logits": ...}
        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(64, 10)

        def forward(self, pixels):
            return {"logits": self.linear(pixels.flatten(1))}

    def batches(rows, **options):
        items = [{"pixels": images[i], "labels": labels[i]} for i in rows]
        return DataLoader(items, batch_size=32, **options)

    def train_fold(fold):
        model, val_loader = Named(), batches(fold.val)
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
        fit(model, batches(fold.train, shuffle=True), val_loader, epochs=2, ema=0.8, target_key="labels",
            output_key="logits", optimizer=optimizer, out_dir=fold.out_dir, resume="auto",
            callbacks=[LiveLog(progress="off", plot=False), fold.callback])  # fmt: skip
        return model, val_loader

    table = fit_folds(train_fold, labels, out_dir=tmp_path, k=3)
    assert table.loc["oof", "rows"] == ROWS and table.loc["oof", "ema_accuracy"] > 0.5


def test_the_stop_button_in_a_fold_stops_the_folds_and_leaves_the_fold_unfinished(data, tmp_path):
    class StopButton(Callback):  # as Jupyter's stop button: a KeyboardInterrupt mid-epoch 2 of fold 1
        def on_step_end(self, state):
            if fold_now[0] == 1 and state.epoch == 2:
                raise KeyboardInterrupt

    fold_now, calls = [None], []
    train = _trainer(data, epochs=3, calls=calls, extra=[StopButton()])

    def train_fold(fold):
        fold_now[0] = fold.index
        return train(fold)

    with pytest.raises(KeyboardInterrupt, match=r"during epoch 2 of 3: kept 1 finished epoch"):
        fit_folds(train_fold, data[1], out_dir=tmp_path, k=3)
    assert calls == [0, 1] and not (tmp_path / "fold_1" / "oof.csv").exists()
    calls.clear()
    fold_now[0] = None  # the rerun: nobody presses stop
    fit_folds(lambda fold: train(fold), data[1], out_dir=tmp_path, k=3)
    assert calls == [1, 2]
    assert len(pd.read_csv(tmp_path / "fold_1" / "history.csv")) == 3


def test_train_fold_must_return_the_model_and_the_val_loader(data, tmp_path):
    with pytest.raises(TypeError, match=r"must return \(model, val_loader\)"):
        fit_folds(lambda fold: None, data[1], out_dir=tmp_path, k=3)


def test_plot_folds_draws_one_figure_with_the_scores_and_the_curves(data, tmp_path):
    fit_folds(_trainer(data), data[1], out_dir=tmp_path, k=3)
    figure = plot_folds(tmp_path)
    bars, curves = figure.axes
    assert [t.get_text() for t in bars.get_xticklabels()] == ["fold 0", "fold 1", "fold 2", "OOF"]
    assert len(curves.get_lines()) == 6  # live and EMA of each fold


def test_plot_folds_keeps_an_accuracy_axis_within_0_and_1(tmp_path):
    # Scores up to 1.0: the margin that shows their differences must not draw an accuracy of 1.005.
    scores = {"live_loss": [0.05, 0.04, 0.045], "ema_loss": [0.03, 0.04, 0.035],
              "live_accuracy": [0.99, 0.997, 0.9935], "ema_accuracy": [1.0, 0.997, 0.9985]}  # fmt: skip
    pd.DataFrame({"fold": ["0", "1", "oof"], "rows": [50, 50, 100], **scores}).to_csv(
        tmp_path / "folds.csv", index=False
    )
    for fold in "01":
        (tmp_path / f"fold_{fold}").mkdir()
        history = {"epoch": [1, 2], **{column: [0.9, 0.99] for column in scores}}
        pd.DataFrame(history).to_csv(tmp_path / f"fold_{fold}" / "history.csv", index=False)
    bars, _ = plot_folds(tmp_path).axes
    assert bars.get_ylim() == pytest.approx((0.985, 1.0))


# -- loading the folds back -------------------------------------------------------------------------


def _linear():
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 10))


def test_fold_models_loads_each_folds_saved_ema(data, tmp_path):
    fit_folds(_trainer(data), data[1], out_dir=tmp_path, k=3)
    models = fold_models(tmp_path, _linear)
    for i, model in enumerate(models):
        saved = load_weights(tmp_path / f"fold_{i}" / "model_ema.pth")
        assert all(torch.equal(value, saved[name]) for name, value in model.state_dict().items())


@pytest.mark.parametrize("remove, complaint", [
    ("fold_2/model_ema.pth", "fold 2 of 3 is missing or unfinished"),
    ("fold_1/oof.csv", "fold 1 of 3 is missing or unfinished .* has no oof.csv"),
    ("fold_0", "fold 0 of 3 is missing"),
])  # fmt: skip
def test_fold_models_names_a_missing_or_unfinished_fold(data, tmp_path, remove, complaint):
    fit_folds(_trainer(data), data[1], out_dir=tmp_path, k=3)
    gone = tmp_path / remove
    if gone.is_dir():
        for path in gone.iterdir():
            path.unlink()
        gone.rmdir()
    else:
        gone.unlink()
    with pytest.raises(FileNotFoundError, match=complaint):
        fold_models(tmp_path, _linear)


def test_fold_models_names_a_fold_whose_weights_do_not_fit_the_model(data, tmp_path):
    fit_folds(_trainer(data), data[1], out_dir=tmp_path, k=3)
    five_classes = nn.Sequential(nn.Flatten(), nn.Linear(64, 5))
    save_weights(five_classes.state_dict(), tmp_path / "fold_1" / "model_ema.pth")
    with pytest.raises(ValueError, match="fold 1 of 3: .*model_ema.pth does not fit the model"):
        fold_models(tmp_path, _linear)


def test_fold_models_refuses_a_fold_folder_of_another_run(data, tmp_path):
    fit_folds(_trainer(data), data[1], out_dir=tmp_path, k=3)
    (tmp_path / "fold_3").mkdir()
    with pytest.raises(ValueError, match="holds fold_3, but its folds.json says k=3"):
        fold_models(tmp_path, _linear)


def test_fold_models_refuses_a_folder_that_is_no_fit_folds_run(tmp_path):
    with pytest.raises(FileNotFoundError, match="is not the output of fit_folds"):
        fold_models(tmp_path, _linear)


# -- a kill in the middle of fold 3, and a rerun -----------------------------------------------------

_SCRIPT = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    import torch
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset
    from ema_kit.examples.digits import digits
    from ema_kit.kaggle import fit_folds
    from ema_kit.training import Callback, LiveLog, fit

    torch.set_num_threads(1)
    out_dir, pause = Path(sys.argv[1]), sys.argv[2] == "pause"
    images, labels = digits()
    images, labels = images[:ROWS], labels[:ROWS]

    class PauseInFold3(Callback):  # stands still mid-epoch 2 of fold 3, for the test to kill it there
        def on_step_end(self, state):
            if state.epoch == 2 and state.step == 18:
                (out_dir / "in-fold-3").write_text("")
                time.sleep(600)

    def train_fold(fold):
        model = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                              nn.Flatten(), nn.Dropout(0.2), nn.Linear(8 * 64, 10))
        train = DataLoader(TensorDataset(images[fold.train], labels[fold.train]), batch_size=16, shuffle=True)
        val = DataLoader(TensorDataset(images[fold.val], labels[fold.val]), batch_size=64)
        callbacks = [LiveLog(progress="off", plot=False), fold.callback]
        if pause and fold.index == 3:
            callbacks.append(PauseInFold3())
        fit(model, train, val, epochs=3, ema=0.9, optimizer=torch.optim.AdamW(model.parameters(), lr=3e-3),
            out_dir=fold.out_dir, resume="auto", callbacks=callbacks)
        return model, val

    fit_folds(train_fold, labels, out_dir=out_dir, k=4, seed=7)
    """
).replace("ROWS", str(ROWS))


def _run_folds(out_dir: Path, mode: str) -> subprocess.Popen:
    out_dir.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen([sys.executable, "-c", _SCRIPT, str(out_dir), mode],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip


def _weights(out_dir: Path) -> dict:
    return {(i, name): value for i in range(4) for name, value in
            load_weights(out_dir / f"fold_{i}" / "model_ema.pth").items()}  # fmt: skip


@pytest.mark.slow
def test_a_kill_in_the_middle_of_fold_3_then_a_rerun_gives_the_weights_of_an_uninterrupted_run(tmp_path):
    whole = _run_folds(tmp_path / "whole", "run")
    killed = _run_folds(tmp_path / "killed", "pause")
    marker = tmp_path / "killed" / "in-fold-3"
    deadline = time.monotonic() + 240
    while not marker.exists():
        assert killed.poll() is None, killed.communicate()[0]
        assert time.monotonic() < deadline, "fold 3 never reached epoch 2"
        time.sleep(0.1)
    os.kill(killed.pid, signal.SIGKILL)
    killed.wait()
    assert killed.returncode == -signal.SIGKILL
    assert not (tmp_path / "killed" / "fold_3" / "oof.csv").exists()
    assert len(pd.read_csv(tmp_path / "killed" / "fold_3" / "history.csv")) == 1  # killed in epoch 2
    rerun = _run_folds(tmp_path / "killed", "run")
    output = rerun.communicate(timeout=240)[0]
    assert rerun.returncode == 0, output
    assert "fold 2 of 4: finished earlier, skipped" in output and "fold 3 of 4: training" in output
    assert whole.wait(timeout=240) == 0, whole.communicate()[0]

    uninterrupted, resumed = _weights(tmp_path / "whole"), _weights(tmp_path / "killed")
    assert uninterrupted.keys() == resumed.keys()
    assert all(torch.equal(uninterrupted[key], resumed[key]) for key in uninterrupted)
    for name in ("oof.csv", "folds.csv"):
        assert (tmp_path / "whole" / name).read_text() == (tmp_path / "killed" / name).read_text()
