"""SwitchEMA: the live model takes the EMA's weights every epoch or every n steps, optimizer state kept."""

import pytest
import torch

from ema_kit import LiveLog, ModelEMA, MultiEMA, fit
from ema_kit.examples.demo import SmallCNN
from ema_kit.examples.digits import digits_loaders
from ema_kit.training.switch import SwitchEMA


def setup(seed: int = 0):
    torch.manual_seed(seed)
    model = SmallCNN(width=8)
    ema = ModelEMA(model, decay=0.9, warmup=False)  # with warmup the first update is a copy
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    return model, ema, optimizer


def run(model, ema, optimizer, callbacks, *, epochs=2, **options):
    train_loader, val_loader = digits_loaders(batch_size=128)
    return fit(
        model,
        train_loader,
        val_loader,
        epochs=epochs,
        optimizer=optimizer,
        ema=ema,
        callbacks=[LiveLog(progress="off", plot=False), *callbacks],
        **options,
    )


def same_weights(model, ema) -> bool:
    return all(
        torch.equal(a, b) for a, b in zip(model.state_dict().values(), ema.module.state_dict().values())
    )


def same_state(model, other) -> bool:
    return all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), other.state_dict().values()))


class Watch:
    """Records, after each step and epoch, whether the live model holds the EMA's weights."""

    def __init__(self, ema):
        self.ema, self.steps, self.epochs = ema, [], []

    def on_step_end(self, state):
        self.steps.append(same_weights(state.model, self.ema))

    def on_epoch_end(self, state):
        self.epochs.append(same_weights(state.model, self.ema))


def test_every_epoch_the_live_model_ends_each_epoch_with_the_ema_weights():
    model, ema, optimizer = setup()
    switch, watch = SwitchEMA(ema), Watch(ema)
    run(model, ema, optimizer, [switch, watch])  # the watch runs after the switch
    assert watch.epochs == [True, True] and switch.switches == 2
    assert not any(watch.steps)  # no switch inside an epoch (11 steps each)


def test_every_n_steps_switches_after_each_nth_step_only():
    model, ema, optimizer = setup()
    switch, watch = SwitchEMA(ema, every=4), Watch(ema)
    run(model, ema, optimizer, [switch, watch])
    assert watch.steps == [(step % 4 == 0) for step in range(1, 23)]
    assert switch.switches == 5


def test_the_optimizer_keeps_its_momentum_across_a_switch():
    model, ema, optimizer = setup()
    momenta = []

    class Before:
        def on_epoch_end(self, state):
            momenta.append([optimizer.state[p]["momentum_buffer"].clone() for p in model.parameters()])

    run(model, ema, optimizer, [Before(), SwitchEMA(ema)], epochs=1)
    after = [optimizer.state[p]["momentum_buffer"] for p in model.parameters()]
    assert all(torch.equal(a, b) for a, b in zip(momenta[0], after))
    assert list(optimizer.state) == list(model.parameters())  # the same parameter tensors, not new ones


def test_a_resumed_run_ends_with_the_weights_of_an_uninterrupted_one(tmp_path):
    model, ema, optimizer = setup()
    straight = run(model, ema, optimizer, [SwitchEMA(ema)], epochs=2, out_dir=tmp_path / "straight")
    first = setup()
    run(*first, [SwitchEMA(first[1])], epochs=1, out_dir=tmp_path / "resumed")
    second = setup(seed=1)  # other initial weights: everything must come from the checkpoint
    resumed = run(*second, [SwitchEMA(second[1])], epochs=2, out_dir=tmp_path / "resumed", resume=True)
    assert all(
        torch.equal(a, b) for a, b in zip(model.state_dict().values(), second[0].state_dict().values())
    )
    assert straight.drop(columns="seconds").equals(resumed.drop(columns="seconds"))


def test_an_ema_that_fit_does_not_update_is_refused_before_training():
    model, ema, optimizer = setup()
    other = ModelEMA(model)
    with pytest.raises(ValueError, match=r"pass the same ModelEMA to fit\(ema=...\)"):
        run(model, ema, optimizer, [SwitchEMA(other)])


@pytest.mark.parametrize(
    ("every", "error"), [(0, ValueError), ("step", ValueError), (True, ValueError), (1.5, ValueError)]
)
def test_bad_every_is_refused_by_name(every, error):
    with pytest.raises(error, match="every must be"):
        SwitchEMA(setup()[1], every=every)


def test_something_else_than_a_model_ema_is_refused():
    with pytest.raises(TypeError, match="ema must be the ModelEMA"):
        SwitchEMA(0.999)


def test_one_ema_of_a_multi_ema_can_be_switched_to():
    torch.manual_seed(0)
    model = SmallCNN(width=8)
    multi = MultiEMA(model, decays=(0.9, 0.99), warmup=False)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    watch = Watch(multi.emas[0.9])
    run(model, multi, optimizer, [SwitchEMA(multi.emas[0.9]), watch], epochs=1)
    assert watch.epochs == [True]


def test_without_an_ema_it_switches_to_fits_own_as_with_that_ema():
    model, ema, optimizer = setup()
    by_ema = run(model, ema, optimizer, [SwitchEMA(ema)])
    other = setup()
    by_default = run(*other, [SwitchEMA()])
    assert same_state(model, other[0])
    assert by_ema.drop(columns="seconds").equals(by_default.drop(columns="seconds"))
    assert same_weights(other[0], other[1])  # the last epoch ended with a switch


def test_every_n_steps_without_an_ema_runs_as_with_that_ema():
    model, ema, optimizer = setup()
    run(model, ema, optimizer, [SwitchEMA(ema, every=4)])
    other = setup()
    run(*other, [SwitchEMA(every=4)])
    assert same_state(model, other[0])
    unswitched = setup()
    run(*unswitched, [])
    assert not torch.equal(unswitched[0].state_dict()["0.weight"], other[0].state_dict()["0.weight"])


def test_a_run_switched_every_n_steps_resumes_to_the_weights_of_an_uninterrupted_one(tmp_path):
    model, ema, optimizer = setup()
    straight = run(model, ema, optimizer, [SwitchEMA(every=4)], out_dir=tmp_path / "straight")
    run(*setup(), [SwitchEMA(every=4)], epochs=1, out_dir=tmp_path / "resumed")
    second = setup(seed=1)
    resumed = run(*second, [SwitchEMA(every=4)], out_dir=tmp_path / "resumed", resume=True)
    assert same_state(model, second[0])
    assert straight.drop(columns="seconds").equals(resumed.drop(columns="seconds"))


@pytest.mark.parametrize(
    ("resumed", "message"), [(None, r"\['SwitchEMA'\].*\[\]"), (2, r"every='epoch'.*every=2")]
)
def test_resuming_a_switched_run_with_another_switch_is_refused(tmp_path, resumed, message):
    run(*setup(), [SwitchEMA()], epochs=1, out_dir=tmp_path)
    callbacks = [] if resumed is None else [SwitchEMA(every=resumed)]
    with pytest.raises(ValueError, match=message):
        run(*setup(), callbacks, out_dir=tmp_path, resume=True)


@pytest.mark.parametrize(("ema", "message"), [(None, "ema=None"), ((0.9, 0.99), "2 decays")])
def test_without_an_ema_and_without_exactly_one_in_fit_it_is_refused_before_training(ema, message):
    model, _, optimizer = setup()
    before = [p.clone() for p in model.parameters()]
    with pytest.raises(ValueError, match=rf"SwitchEMA\(\) copies fit's EMA.*{message}"):
        run(model, ema, optimizer, [SwitchEMA()])
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_two_switches_in_one_run_are_refused_by_their_state_key():
    model, ema, optimizer = setup()
    with pytest.raises(ValueError, match="both keep their state under 'SwitchEMA'.*state_key"):
        run(model, ema, optimizer, [SwitchEMA(ema), SwitchEMA()])
