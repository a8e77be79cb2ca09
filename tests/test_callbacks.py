"""The callback API (ema_kit/training/callbacks.py): hooks in order, checks, the built-in callbacks."""

import numpy as np
import pytest
import torch

from ema_kit import Callback, EarlyStopping, GradientClip, LiveLog, ValidateEvery, fit
from ema_kit.training.callbacks import HOOKS, CallbackList, check_callbacks


def batches(count: int, seed: int = 0) -> list:
    generator = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(8, 1, 8, 8, generator=generator), torch.randint(0, 10, (8,), generator=generator))
        for _ in range(count)
    ]


def small_fit(callbacks, train_batches=3, **options):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    options = {"epochs": 1, "ema": 0.5} | options
    callbacks = [LiveLog(progress="off", plot=False), *callbacks]
    train = batches(train_batches)
    return fit(model, train, batches(1, seed=1), optimizer=optimizer, callbacks=callbacks, **options)


class Recorder(Callback):
    def __init__(self):
        self.calls = []
        for hook in HOOKS:  # every hook, recorded by name
            setattr(self, hook, lambda state, hook=hook: self.calls.append(hook))


def test_every_hook_runs_in_the_documented_order():
    recorder = Recorder()
    small_fit([recorder], accumulate=2)  # 3 batches: a group of 2, then one of 1 after the last batch
    batch = ["on_batch_start", "on_before_backward", "on_after_backward"]
    step = ["on_before_step", "on_step_end"]
    assert recorder.calls == [
        "on_fit_start",
        "on_epoch_start",
        *batch, "on_batch_end",
        *batch, *step, "on_batch_end",
        *batch, "on_batch_end", *step,
        "on_validation_start",
        "on_validation_end",
        "on_row_added",
        "on_epoch_end",
        "on_fit_end",
    ]  # fmt: skip


def test_a_row_within_an_epoch_runs_the_validation_hooks_after_that_batch_and_no_epoch_end():
    recorder = Recorder()

    class AfterSecondBatch(Callback):
        def on_batch_end(self, state):
            state.validate = state.validate or len(recorder.calls) == 13  # after batch 2's on_batch_end

    small_fit([AfterSecondBatch(), recorder])
    batch = ["on_batch_start", "on_before_backward", "on_after_backward", "on_before_step", "on_step_end",
             "on_batch_end"]  # fmt: skip
    row = ["on_validation_start", "on_validation_end", "on_row_added"]
    assert recorder.calls == [
        "on_fit_start", "on_epoch_start", *batch, *batch, *row, *batch, *row, "on_epoch_end", "on_fit_end"
    ]  # fmt: skip


def test_only_the_hooks_a_callback_overrides_are_called():
    class OnlyEpochs(Callback):
        def on_epoch_end(self, state):
            pass

    hooks = CallbackList([OnlyEpochs()])
    assert [hook for hook in HOOKS if hooks.has(hook)] == ["on_epoch_end"]


def test_a_callback_of_another_framework_alone_is_accepted_with_a_warning_that_nothing_runs():
    class LightningStyle:
        def on_train_epoch_end(self, trainer, module):
            raise AssertionError("called")

    with pytest.warns(UserWarning, match=r"callbacks\[1\] \(LightningStyle\) has none of fit's hooks"):
        assert len(small_fit([LightningStyle()])) == 1


def test_a_class_instead_of_an_object_is_refused_naming_the_call():
    with pytest.raises(TypeError, match=r"callbacks\[0\] is the class EarlyStopping.*EarlyStopping\(\)"):
        check_callbacks([EarlyStopping])


def test_a_state_key_defaults_to_the_class_name():
    class Stateful(Callback):
        def state_dict(self):
            return {}

        def load_state_dict(self, state):
            pass

    assert Stateful().state_key == "test_a_state_key_defaults_to_the_class_name.<locals>.Stateful"
    with pytest.raises(ValueError, match=r"callbacks\[0\] and callbacks\[1\] both keep their state"):
        check_callbacks([Stateful(), Stateful()])


def test_early_stopping_stops_after_patience_epochs_without_a_better_monitor(capsys):
    scores = iter([0.0, 0.5, 0.7, 0.6, 0.65, 0.9])  # the sanity pass's, then best at epoch 2

    def score(outputs, targets):
        return next(scores)

    log = small_fit([EarlyStopping(patience=2)], epochs=5, ema=None, metrics={"score": (score, "max")})
    assert log["epoch"].tolist() == [1, 2, 3, 4]
    assert (
        "Early stop: live_score has not improved for 2 epochs (best 0.7 at epoch 2)"
        in capsys.readouterr().out
    )


def test_gradient_clip_bounds_each_step():
    seen = []

    class Norms(Callback):  # after the clip (it runs first, being earlier in the list)
        def on_before_step(self, state):
            seen.append(torch.cat([p.grad.flatten() for p in state.model.parameters()]).norm().item())

    small_fit([GradientClip(1e-3), Norms()])
    assert len(seen) == 3 and max(seen) <= 1e-3 * 1.0001


@pytest.mark.parametrize(
    "build, error, message",
    [
        (lambda: EarlyStopping(0), ValueError, "patience must be an int >= 1"),
        (lambda: EarlyStopping("3"), TypeError, "patience must be an int >= 1"),
        (lambda: EarlyStopping(np.int64(2)), None, None),
        (lambda: GradientClip(0), ValueError, "max_norm must be a positive, finite number"),
        (lambda: GradientClip(-1.0), ValueError, "max_norm must be a positive, finite number"),
        (lambda: GradientClip("1"), TypeError, "max_norm must be a number"),
        (lambda: ValidateEvery(), TypeError, "ValidateEvery takes one of steps= .* or epochs="),
        (lambda: ValidateEvery(steps=5, epochs=0.5), TypeError, "one of steps="),
        (lambda: ValidateEvery(steps=0), ValueError, "steps must be an int >= 1"),
        (lambda: ValidateEvery(steps=2.5), TypeError, "steps must be an int >= 1"),
        (lambda: ValidateEvery(epochs=1.0), ValueError, "a fraction of an epoch below 1"),
        (lambda: ValidateEvery(epochs=0), ValueError, "epochs must be a positive, finite number"),
    ],
)
def test_bad_settings_of_the_built_in_callbacks_are_refused_by_name(build, error, message):
    if error is None:
        build()
        return
    with pytest.raises(error, match=message):
        build()


@pytest.mark.parametrize(
    "every, expected",
    [
        ({"steps": 2}, [0.4, 0.8, 1, 1.4, 1.8, 2]),  # counted anew each epoch (5 steps an epoch)
        ({"steps": 5}, [1, 2]),  # the epoch's last step: scored by the epoch's own row
        ({"epochs": 0.5}, [0.6, 1, 1.6, 2]),  # round(2.5) steps: every 2
    ],
)
def test_validate_every_scores_rows_at_fractions_of_each_epoch(every, expected):
    log = small_fit([ValidateEvery(**every)], epochs=2, train_batches=5)
    assert log["epoch"].tolist() == pytest.approx(expected)
    assert log["ema_loss"].notna().all() and log["train_loss"].notna().all()


def test_validate_every_counts_optimizer_steps_under_accumulation():
    log = small_fit([ValidateEvery(steps=1)], epochs=1, train_batches=5, accumulate=2)
    assert log["epoch"].tolist() == pytest.approx([0.4, 0.8, 1])  # steps end at batches 2, 4 and 5


def test_validate_every_refuses_a_loader_without_a_length_before_training():
    class Stream:
        def __iter__(self):
            return iter(batches(3))

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))
    before = [p.clone() for p in model.parameters()]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="ValidateEvery needs a train_loader with a length"):
        fit(model, Stream(), batches(1, seed=1), epochs=1, optimizer=optimizer,
            callbacks=[LiveLog(progress="off", plot=False), ValidateEvery(steps=1)])  # fmt: skip
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
