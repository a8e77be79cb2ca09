"""EMA advice: the rho ** kappa rule, the long half-life warning and the effective half-life, in numbers."""

import math
import warnings

import pytest
import torch

from ema_kit import ModelEMA
from ema_kit.advice import effective_half_life_epochs, half_life_warning, scale_decay, scale_half_life
from ema_kit.ema import decay_from_half_life


def test_scale_decay_raises_the_decay_to_the_batch_size_ratio():
    assert scale_decay(0.999, from_batch_size=256, to_batch_size=1024) == 0.999**4
    assert scale_decay(0.9999, from_batch_size=1024, to_batch_size=256) == 0.9999**0.25
    assert scale_decay(0.99, from_batch_size=64, to_batch_size=64) == 0.99


def test_scaled_decay_keeps_the_half_life_in_samples():
    decay, scaled = 0.999, scale_decay(0.999, from_batch_size=32, to_batch_size=128)
    samples = 32 * math.log(0.5) / math.log(decay)
    assert 128 * math.log(0.5) / math.log(scaled) == pytest.approx(samples, rel=1e-12)


def test_scale_half_life_divides_steps_by_the_batch_size_ratio():
    assert scale_half_life(693, from_batch_size=256, to_batch_size=512) == 346.5
    assert scale_half_life(100, from_batch_size=512, to_batch_size=128) == 400.0
    halved = decay_from_half_life(scale_half_life(693, from_batch_size=1, to_batch_size=2))
    assert halved == pytest.approx(scale_decay(decay_from_half_life(693), from_batch_size=1, to_batch_size=2))


def test_half_life_of_exactly_half_the_run_gives_no_warning_and_one_step_more_does():
    assert half_life_warning(500, 1000) is None
    assert half_life_warning(500.5, 1000) is not None


def test_warning_without_warmup_gives_the_share_of_the_first_half_and_a_tenth_of_the_run():
    message = half_life_warning(1000, 1000, warmup=False)
    assert "(1000 steps) is over half the run (1000 steps)" in message
    assert "hold 71% of the EMA" in message  # 0.5 ** 0.5 = 0.7071
    assert "ema='100 steps'" in message


def test_warning_with_warmup_says_when_the_decay_set_would_apply():
    message = half_life_warning(693, 1000)
    decay = decay_from_half_life(693)
    reached = next(n for n in range(1, 10**5) if (1 - 1 / n) ** 8 >= decay)  # ModelEMA's warmup, update n
    assert reached == 7999
    assert f"from update {reached} on" in message


def test_effective_half_life_follows_the_warmup_then_the_decay():
    ema = ModelEMA(torch.nn.Linear(2, 2), decay=0.99)
    model = torch.nn.Linear(2, 2)
    for _ in range(100):
        ema.update(model)
    expected = math.log(0.5) / math.log((100 / 101) ** 8) / 10  # warmup: 8.7076 steps
    assert effective_half_life_epochs(ema, steps_per_epoch=10) == pytest.approx(expected, rel=1e-12)
    for _ in range(1000):
        ema.update(model)
    assert effective_half_life_epochs(ema, steps_per_epoch=10) == pytest.approx(ema.half_life / 10, rel=1e-12)


def test_effective_half_life_counts_steps_not_updates_with_update_every():
    model = torch.nn.Linear(2, 2)
    ema = ModelEMA(model, decay=0.99, warmup=False, update_every=4)
    assert effective_half_life_epochs(ema, steps_per_epoch=1) == pytest.approx(ema.half_life, rel=1e-12)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: scale_decay(1.0, from_batch_size=1, to_batch_size=2), r"decay must be a number in \[0, 1\)"),
        (lambda: scale_decay(0.9, from_batch_size=0, to_batch_size=2), "from_batch_size must be an int >= 1"),
        (lambda: scale_half_life(-3, from_batch_size=1, to_batch_size=2), "steps must be a positive"),
        (lambda: half_life_warning(10, 0), "total_steps must be an int >= 1"),
        (lambda: effective_half_life_epochs(object(), steps_per_epoch=1), "ema must be a ModelEMA"),
    ],
)
def test_bad_arguments_are_refused_by_name(call, message):
    with pytest.raises((ValueError, TypeError), match=message):
        call()


def fit_digits(ema, *, epochs=1, train_loader=None, **options):
    from ema_kit import LiveLog, fit
    from ema_kit.examples.demo import SmallCNN
    from ema_kit.examples.digits import digits_loaders

    torch.manual_seed(0)
    model = SmallCNN(width=8)
    loader, val_loader = digits_loaders(batch_size=128)  # 11 steps per epoch
    if callable(ema):  # built on the model: a ModelEMA the test keeps
        ema = ema(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    return fit(model, train_loader or loader, val_loader, epochs=epochs, optimizer=optimizer, ema=ema,
               callbacks=[LiveLog(progress="off", plot=False)], **options)  # fmt: skip


def test_fit_warns_once_for_each_ema_whose_half_life_is_over_half_the_run():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit_digits((0.5, 0.999), epochs=2)  # half-lives of 1 and 693 steps, in a run of 22
    messages = [str(w.message) for w in caught if issubclass(w.category, UserWarning)]
    assert len(messages) == 1 and messages[0].startswith("fit: ema0.999: The EMA's half-life (693 steps)")
    assert "over half the run (22 steps)" in messages[0]


def test_a_train_loader_without_len_gets_no_half_life_warning():
    from ema_kit.examples.digits import digits_loaders

    class NoLength:
        def __init__(self, loader):
            self.loader = loader

        def __iter__(self):
            return iter(self.loader)

    loader, _ = digits_loaders(batch_size=128)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        log = fit_digits(0.999, train_loader=NoLength(loader))
    assert not [w for w in caught if "half-life" in str(w.message)]
    # After 11 updates the warmup decay is (1 - 1/12) ** 8, over the 11 steps the epoch was measured to have.
    expected = math.log(0.5) / math.log((11 / 12) ** 8) / 11
    assert log["half_life_epochs_ema"].iloc[0] == pytest.approx(expected, rel=1e-12)


def test_the_log_holds_the_effective_half_life_in_epochs_of_each_ema_and_no_score_reads_it():
    from ema_kit.training.history import score_columns
    from ema_kit.training.plot import plot_history

    emas = []

    def built(model):
        emas.append(ModelEMA(model, decay=0.9))
        return emas[0]

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        log = fit_digits(built, epochs=2, monitor="loss")
    assert log["half_life_epochs_ema"].iloc[-1] == effective_half_life_epochs(emas[0], steps_per_epoch=11)
    assert log["half_life_epochs_ema"].iloc[0] < log["half_life_epochs_ema"].iloc[1]  # warmup: it grows
    assert not any("half_life" in c for group in score_columns(log).values() for c in group.values())
    assert len(plot_history(log).axes) == 2  # loss and accuracy only


def test_the_advice_is_exported_from_the_package():
    import ema_kit

    assert ema_kit.scale_decay is scale_decay and ema_kit.scale_half_life is scale_half_life
    assert ema_kit.half_life_warning is half_life_warning
    assert ema_kit.effective_half_life_epochs is effective_half_life_epochs
