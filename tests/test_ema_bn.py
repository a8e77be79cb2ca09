"""RecomputeEMABatchNorm (ema_kit/training/ema_bn.py): the EMA scored with statistics of its own weights."""

import copy

import pytest
import torch
from helpers import small_cnn
from torch import nn
from torch.optim.swa_utils import update_bn

from ema_kit import LiveLog, ModelEMA, RecomputeEMABatchNorm, evaluate, fit
from ema_kit.examples.demo import SmallCNN
from ema_kit.examples.digits import digits_loaders


def fit_digits(model, ema, out_dir=None, epochs=1, refresh=True):
    train_loader, val_loader = digits_loaders(batch_size=128)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    callbacks = [LiveLog(progress="off", plot=False)] + ([RecomputeEMABatchNorm()] if refresh else [])
    log = fit(model, train_loader, val_loader, epochs=epochs, optimizer=optimizer, ema=ema, out_dir=out_dir,
              callbacks=callbacks)  # fmt: skip
    return log, train_loader, val_loader


def test_the_ema_is_scored_and_saved_with_recomputed_statistics_and_itself_left_alone(tmp_path):
    runs = []
    for recompute in (False, True):
        torch.manual_seed(0)
        model = SmallCNN(width=8)
        ema = ModelEMA(model, decay=0.9)
        log, _, val_loader = fit_digits(
            model, ema, out_dir=tmp_path / str(recompute), epochs=2, refresh=recompute
        )
        runs.append((model, ema, log))
    (plain_model, plain, plain_log), (model, ema, log) = runs
    # Training and the EMA itself are the plain run's: the statistics were measured on a copy, and the
    # extra pass's shuffle and dropout did not change the next epoch's.
    for a, b in zip([*plain.module.state_dict().values(), *plain_model.state_dict().values()],
                    [*ema.module.state_dict().values(), *model.state_dict().values()]):  # fmt: skip
        assert torch.equal(a, b)
    expected = copy.deepcopy(ema.module)
    replay, _ = digits_loaders(batch_size=128)  # the same shuffles: the two epochs', then the last pass's
    list(replay), list(replay)
    update_bn(replay, expected)
    saved = torch.load(tmp_path / "True" / "model_ema.pth", weights_only=True)
    for key, value in expected.state_dict().items():
        torch.testing.assert_close(saved[key], value, rtol=1e-6, atol=1e-6, msg=key)
    assert not torch.equal(saved["1.running_mean"], plain.module.state_dict()["1.running_mean"])
    assert log["ema_loss"].iloc[-1] == pytest.approx(evaluate(expected, val_loader)["loss"], rel=1e-6)
    assert log["live_loss"].equals(plain_log["live_loss"])


def test_it_is_refused_before_training_without_an_ema_or_without_batchnorm():
    model = small_cnn()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match="RecomputeEMABatchNorm recomputes.*ema=None"):
        fit_digits(model, None)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with pytest.raises(ValueError, match="no BatchNorm layer with running statistics"):
        fit_digits(nn.Sequential(nn.Flatten(), nn.Linear(64, 10)), 0.9)
