"""MultiEMA (ema_kit/multi.py): one EMA per decay, numerics, the one-pass update, resume, errors."""

import copy
import inspect
import warnings

import pytest
import torch
from helpers import ReferenceEMA, max_error, small_cnn, train_steps
from torch import nn
from torch.profiler import ProfilerActivity, profile

from ema_kit import ModelEMA, MultiEMA

DECAYS = (0.5, 0.9, 0.99)


def assert_same(multi: MultiEMA, separate: dict) -> None:
    """Every EMA of ``multi`` equals its separately updated ModelEMA bit for bit, counters included."""
    for decay, ema in multi.emas.items():
        alone = separate[decay]
        assert (ema.num_steps, ema.num_updates, ema.num_skipped) == (
            alone.num_steps,
            alone.num_updates,
            alone.num_skipped,
        )
        expected = alone.module.state_dict()
        for key, value in ema.module.state_dict().items():
            assert torch.equal(value, expected[key]), key


def both(model: nn.Module, multi: MultiEMA, separate: dict):
    """A step that updates ``multi`` and each separate ModelEMA."""
    return lambda: (multi.update(model), *(ema.update(model) for ema in separate.values()))


def with_references(model: nn.Module, multi: MultiEMA):
    """A float64 reference per decay, and a step that updates ``multi`` and every reference."""
    references = {decay: ReferenceEMA(model) for decay in DECAYS}

    def step():
        multi.update(model)
        for decay, reference in references.items():
            reference.update(model, decay)

    return references, step


# -- the formula ---------------------------------------------------------------------------------


def test_each_ema_matches_the_float64_formula_for_its_decay(model):
    multi = MultiEMA(model, DECAYS, warmup=False)
    references, step = with_references(model, multi)

    train_steps(model, 20, step)
    for decay, reference in references.items():
        assert max_error(multi.emas[decay].module.state_dict(), reference.state) < 1e-6


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"warmup": False},
        {"buffers": "copy"},
        {"update_after_step": 3, "update_every": 2},
        {"dtype": torch.float64},
    ],
)
def test_update_is_bit_identical_to_separate_model_emas(model, options):
    multi = MultiEMA(model, DECAYS, **options)
    separate = {decay: ModelEMA(model, decay, **options) for decay in DECAYS}
    train_steps(model, 12, both(model, multi, separate))
    assert_same(multi, separate)


def test_low_precision_model_is_bit_identical_to_separate_model_emas():
    torch.manual_seed(0)
    model = small_cnn().bfloat16()  # float32 shadows of bf16 weights: the mul_/add_ path
    multi = MultiEMA(model, DECAYS)
    separate = {decay: ModelEMA(model, decay) for decay in DECAYS}
    train_steps(model, 8, both(model, multi, separate), lr=0.01)
    assert {t.dtype for t in multi.emas[0.9].module.parameters()} == {torch.float32}
    assert_same(multi, separate)


def test_a_decay_of_zero_beside_others_copies_the_weights(model):
    multi = MultiEMA(model, (0.0, 0.9), warmup=False)
    separate = {decay: ModelEMA(model, decay, warmup=False) for decay in (0.0, 0.9)}
    train_steps(model, 5, both(model, multi, separate))
    assert_same(multi, separate)
    assert max_error(multi.emas[0.0].module.state_dict(), model.state_dict()) == 0.0


# -- one pass -----------------------------------------------------------------------------------------


def count_ops(update) -> dict:
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        update()
    events = prof.events()
    names = [e.name for e in events if e.cpu_parent is None]  # top-level ops only
    allocated = [e.name for e in events if e.cpu_memory_usage and e.cpu_memory_usage > 0]
    return {"ops": sorted(names), "allocated": allocated}


def test_update_checks_and_copies_once_for_any_number_of_decays_and_allocates_nothing(model):
    single = ModelEMA(model, 0.99, warmup=False)
    two, three = MultiEMA(model, DECAYS[:2], warmup=False), MultiEMA(model, DECAYS, warmup=False)
    train_steps(model, 2, lambda: (single.update(model), two.update(model), three.update(model)))
    ops = {k: count_ops(lambda e=e: e.update(model)) for k, e in ((1, single), (2, two), (3, three))}
    # Small tensors are read by one cat each step (_Gather): one for the averaged, one for the integers,
    # which reach the other sets with one copy_ each.
    assert [ops[k]["ops"].count("aten::cat") for k in (1, 2, 3)] == [2, 2, 2]
    assert [ops[k]["ops"].count("aten::copy_") for k in (1, 2, 3)] == [0, 1, 2]
    # Big tensors: one op for every set; small ones: one lerp_ per set.
    assert ops[3]["ops"].count("aten::_foreach_lerp_") == ops[2]["ops"].count("aten::_foreach_lerp_") == 1
    assert ops[3]["ops"].count("aten::lerp_") == ops[2]["ops"].count("aten::lerp_") + 1 == 3
    assert ops[3]["allocated"] == []


# -- the per-decay EMAs are full ModelEMAs ---------------------------------------------------------------


def test_each_ema_saves_evaluates_and_resumes_like_a_model_ema(model, tmp_path):
    multi = MultiEMA(model, DECAYS)
    train_steps(model, 5, lambda: multi.update(model))
    ema = multi.emas[0.9]
    assert not ema.module.training and ema.num_steps == ema.num_updates == 5
    fresh = small_cnn()
    fresh.load_state_dict(torch.load(ema.save(tmp_path / "ema.pth"), weights_only=True))
    assert max_error(fresh.state_dict(), ema.module.state_dict()) == 0.0
    x = torch.randn(2, 1, 8, 8)
    with ema.applied_to(model):
        assert torch.equal(model.eval()(x), ema.module(x))
    alone = ModelEMA(small_cnn(), 0.9)
    alone.load_state_dict(ema.state_dict())
    assert max_error(alone.module.state_dict(), ema.module.state_dict()) == 0.0


def test_an_ema_loaded_on_its_own_is_picked_up_by_the_next_update(model):
    multi = MultiEMA(model, DECAYS, warmup=False)
    separate = {decay: ModelEMA(model, decay, warmup=False) for decay in DECAYS}
    train_steps(model, 3, both(model, multi, separate))
    saved = copy.deepcopy(separate[0.9].state_dict())
    train_steps(model, 2, both(model, multi, separate))
    multi.emas[0.9].load_state_dict(saved)  # e.g. fit resuming each EMA from its checkpoint
    separate[0.9].load_state_dict(saved)
    train_steps(model, 3, both(model, multi, separate), seed=1)
    assert_same(multi, separate)


def test_an_ema_module_moved_by_hand_is_laid_out_again_by_the_next_update(model):
    multi = MultiEMA(model, DECAYS, warmup=False)
    separate = {decay: ModelEMA(model, decay, warmup=False) for decay in DECAYS}
    train_steps(model, 2, both(model, multi, separate))
    multi.emas[0.9].module.double()  # new storage for one EMA only
    separate[0.9].module.double()
    train_steps(model, 3, both(model, multi, separate), seed=1)
    assert {t.dtype for t in multi.emas[0.9].module.parameters()} == {torch.float32}
    assert_same(multi, separate)


def test_model_cast_after_building_is_followed_by_every_ema(model):
    multi = MultiEMA(model, DECAYS, warmup=False)
    references, step = with_references(model, multi)

    train_steps(model, 2, step)
    model.double()
    train_steps(model, 3, step, seed=1)
    for decay, reference in references.items():
        assert {t.dtype for t in multi.emas[decay].module.parameters()} == {torch.float64}
        assert max_error(multi.emas[decay].module.state_dict(), reference.state) < 1e-6


def test_non_finite_weights_skip_every_ema_after_one_check(model):
    multi = MultiEMA(model, DECAYS, skip_non_finite=True)
    train_steps(model, 3, lambda: multi.update(model))
    before = {decay: copy.deepcopy(ema.module.state_dict()) for decay, ema in multi.emas.items()}
    with torch.no_grad():
        model[0].weight[0, 0, 0, 0] = float("nan")
    with pytest.warns(RuntimeWarning, match="skipped an update") as warned:
        multi.update(model)
    assert (warned[0].filename, warned[0].lineno) == (__file__, inspect.currentframe().f_lineno - 1)
    for decay, ema in multi.emas.items():
        assert ema.num_skipped == 1 and ema.num_updates == 3
        assert max_error(ema.module.state_dict(), before[decay]) == 0.0


# -- resume ---------------------------------------------------------------------------------------------


def test_resume_from_state_dict_is_bit_identical(model, tmp_path):
    multi = MultiEMA(model, DECAYS)
    train_steps(model, 4, lambda: multi.update(model))
    torch.save(multi.state_dict(), tmp_path / "multi.pth")
    resumed_model = copy.deepcopy(model)
    resumed = MultiEMA(small_cnn(), DECAYS)
    resumed.load_state_dict(torch.load(tmp_path / "multi.pth", weights_only=True))
    train_steps(model, 6, lambda: multi.update(model), seed=1)
    train_steps(resumed_model, 6, lambda: resumed.update(resumed_model), seed=1)
    assert_same(resumed, multi.emas)


def test_load_state_checks_every_ema_before_changing_any(model):
    multi = MultiEMA(model, DECAYS)
    train_steps(model, 3, lambda: multi.update(model))
    state = copy.deepcopy(multi.state_dict())
    state["emas"][-1]["weights"]["9.weight"] = torch.zeros(5, 64)
    before = copy.deepcopy(multi.state_dict())
    fresh = MultiEMA(small_cnn(), DECAYS)
    fresh_before = copy.deepcopy(fresh.state_dict())
    with pytest.raises(ValueError, match=r"shape mismatch.*9\.weight"):
        fresh.load_state_dict(state)
    assert max_error(fresh.emas[0.5].module.state_dict(), fresh_before["emas"][0]["weights"]) == 0.0
    assert fresh.emas[0.5].num_steps == 0
    assert max_error(multi.emas[0.5].module.state_dict(), before["emas"][0]["weights"]) == 0.0


def test_load_state_of_other_decays_is_a_clear_error(model):
    state = MultiEMA(model, (0.9, 0.99)).state_dict()
    with pytest.raises(ValueError, match=r"decays \(0\.9, 0\.99\).*decays=\(0\.9, 0\.99\)\) to resume"):
        MultiEMA(model, DECAYS).load_state_dict(state)
    with pytest.raises(ValueError, match="Not a MultiEMA state.*emas\\[decay\\]"):
        MultiEMA(model, DECAYS).load_state_dict(ModelEMA(model).state_dict())


# -- errors and repr ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("decays", "error", "message"),
    [
        ((), ValueError, "decays is empty"),
        (0.99, TypeError, r"sequence of decays.*ModelEMA\(model, decay=...\)"),
        ("0.99", TypeError, "sequence of decays"),
        ((0.99, 0.999, 0.99), ValueError, r"repeats \[0\.99\]"),
        ((0.99, 1.0), ValueError, r"decays\[1\] must be a number in \[0, 1\), got 1\.0"),
        ((0.99, float("nan")), ValueError, r"decays\[1\]"),
        ((0.99, "0.999"), TypeError, r"decays\[1\] must be a number"),
        ((True, 0.9), TypeError, r"decays\[0\]"),
    ],
)
def test_bad_decays_are_clear_errors(decays, error, message):
    with pytest.raises(error, match=message):
        MultiEMA(nn.Linear(2, 2), decays)


def test_bad_options_are_model_ema_errors():
    with pytest.raises(ValueError, match="update_every"):
        MultiEMA(nn.Linear(2, 2), DECAYS, update_every=0)
    with pytest.raises(TypeError, match="must be a torch.nn.Module"):
        MultiEMA("model", DECAYS)


def test_repr_names_decays_and_half_lives(model):
    multi = MultiEMA(model, (0.9, 0.99))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        text = repr(multi)
    assert text.startswith("MultiEMA(decays=(0.9, 0.99), half_lives=(7, 69) steps") and "Sequential" in text


def test_numpy_decays_are_numbers(model):
    import numpy as np

    multi = MultiEMA(model, (np.float32(0.5), np.float64(0.9)))
    assert multi.decays == (0.5, 0.9) and all(type(decay) is float for decay in multi.decays)


def test_a_numpy_array_of_decays_gives_one_ema_per_decay_keyed_as_written(model):
    import numpy as np

    multi = MultiEMA(model, np.array([0.9, 0.99], dtype=np.float32))
    assert multi.decays == (0.9, 0.99) and multi.emas[0.99].decay == 0.99


def test_a_float32_decay_is_a_duplicate_of_the_decay_it_prints_as(model):
    import numpy as np

    with pytest.raises(ValueError, match=r"repeats \[0\.99\]"):
        MultiEMA(model, (np.float32(0.99), 0.99))


def test_each_ema_shares_its_schedule_with_the_multi_ema(model):
    multi = MultiEMA(model, (0.9, 0.99), update_after_step=1)
    for _ in range(3):
        multi.update(model)
    assert [(e.num_steps, e.num_updates) for e in multi.emas.values()] == [(3, 2), (3, 2)]
    multi.emas[0.9].update(model)  # one EMA on its own: the others do not move
    assert (multi.emas[0.9].num_steps, multi.emas[0.99].num_steps) == (4, 3)


def test_emas_is_a_read_only_mapping_in_the_order_given(model):
    multi = MultiEMA(model, (0.9, 0.5))
    assert list(multi.emas) == [0.9, 0.5]
    with pytest.raises(TypeError):
        multi.emas[0.99] = ModelEMA(model)
