"""ModelEMA (ema_kit/ema.py): numerics, warmup, buffers, precision, wrappers, swap, resume, files, errors."""

import copy
import inspect
import math
import os
import warnings

import pytest
import torch
import torch.distributed as dist
from helpers import ReferenceEMA, count_plans, max_error, small_cnn, train_steps
from torch import nn
from torch.profiler import ProfilerActivity, profile

from ema_kit import ModelEMA, decay_from_half_life
from ema_kit.ema import WARMUP_POWER

# -- the formula ---------------------------------------------------------------------------------


def test_update_matches_float64_formula_without_warmup(model):
    ema, reference = ModelEMA(model, decay=0.9, warmup=False), ReferenceEMA(model)
    train_steps(model, 30, lambda: (ema.update(model), reference.update(model, 0.9)))
    assert max_error(ema.module.state_dict(), reference.state) < 1e-6
    assert ema.num_updates == ema.num_steps == 30


def test_warmup_follows_the_power_schedule_then_the_decay(model):
    ema, reference = ModelEMA(model, decay=0.5), ReferenceEMA(model)
    decays, errors = [], []

    def step():
        decays.append(min(0.5, (1 - 1 / (len(decays) + 1)) ** WARMUP_POWER))
        ema.update(model)
        reference.update(model, decays[-1])
        errors.append(max_error(ema.module.state_dict(), reference.state))

    train_steps(model, 25, step)
    assert decays[0] == 0.0  # the first update takes the live weights, dropping the random init
    assert decays[-1] == 0.5  # warmup has ended: the configured decay applies
    assert max(errors) < 1e-6


def test_warmup_keeps_early_ema_close_to_training_instead_of_the_init(model):
    init = copy.deepcopy(model.state_dict())
    warm, cold = ModelEMA(model, decay=0.999), ModelEMA(model, decay=0.999, warmup=False)
    train_steps(model, 50, lambda: (warm.update(model), cold.update(model)))
    live, warm_w, cold_w = (dict(m.named_parameters()) for m in (model, warm.module, cold.module))
    init = {key: init[key] for key in live}
    assert max_error(warm_w, live) < max_error(cold_w, live) / 3
    assert max_error(cold_w, init) < max_error(warm_w, init) / 3


def test_update_after_step_copies_the_weights_until_then(model):
    ema = ModelEMA(model, decay=0.9, warmup=False, update_after_step=5)
    reference = ReferenceEMA(model)
    train_steps(model, 5, lambda: ema.update(model))
    assert max_error(ema.module.state_dict(), model.state_dict()) == 0.0
    assert ema.num_updates == 0
    reference.update(model, 0.0)
    train_steps(model, 10, lambda: (ema.update(model), reference.update(model, 0.9)), seed=1)
    assert ema.num_updates == 10
    assert max_error(ema.module.state_dict(), reference.state) < 1e-6


def test_update_every_uses_decay_to_the_power_k_and_keeps_the_half_life(model):
    ema = ModelEMA(model, decay=0.9, warmup=False, update_every=3)
    reference, calls = ReferenceEMA(model), []

    def step():
        calls.append(1)
        ema.update(model)
        if len(calls) % 3 == 0:
            reference.update(model, 0.9**3)

    train_steps(model, 12, step)
    assert ema.num_steps == 12 and ema.num_updates == 4
    assert max_error(ema.module.state_dict(), reference.state) < 1e-6
    assert ema.half_life == pytest.approx(math.log(0.5) / math.log(0.9))


def test_decay_from_half_life_halves_the_weight_after_that_many_steps():
    assert decay_from_half_life(100) ** 100 == pytest.approx(0.5)
    assert decay_from_half_life(epochs=2, steps_per_epoch=50) == decay_from_half_life(100)
    assert ModelEMA(nn.Linear(2, 2), decay=decay_from_half_life(250)).half_life == pytest.approx(250)


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"steps": 0},
        {"steps": -5},
        {"steps": float("nan")},
        {"steps": float("inf")},
        {"steps": 10, "epochs": 1, "steps_per_epoch": 5},
        {"epochs": 1},
        {"epochs": 1, "steps_per_epoch": 0},
        {"steps": 1e300},  # its decay rounds to 1.0: an EMA that never moves
    ],
)
def test_decay_from_half_life_rejects_bad_values(kwargs):
    with pytest.raises(ValueError, match="half-life|steps_per_epoch"):
        decay_from_half_life(**kwargs)


@pytest.mark.parametrize("kwargs", [{"steps": "100"}, {"steps": True}, {"epochs": 1, "steps_per_epoch": 2.5}])
def test_decay_from_half_life_rejects_bad_types(kwargs):
    with pytest.raises(TypeError, match="steps|steps_per_epoch"):
        decay_from_half_life(**kwargs)


# -- buffers ---------------------------------------------------------------------------------------


def test_buffers_are_averaged_by_default_and_counters_copied(model):
    ema, reference = ModelEMA(model, decay=0.8, warmup=False), ReferenceEMA(model)
    train_steps(model, 10, lambda: (ema.update(model), reference.update(model, 0.8)))
    state = ema.module.state_dict()
    assert max_error(state, reference.state) < 1e-6
    assert state["1.num_batches_tracked"].item() == 10 and state["1.num_batches_tracked"].dtype == torch.int64
    assert not torch.equal(state["1.running_mean"], model.state_dict()["1.running_mean"])


def test_buffers_copy_mode_copies_running_stats(model):
    ema, reference = ModelEMA(model, decay=0.8, warmup=False, buffers="copy"), ReferenceEMA(model)
    train_steps(model, 10, lambda: (ema.update(model), reference.update(model, 0.8, buffers="copy")))
    state = ema.module.state_dict()
    assert max_error(state, reference.state) < 1e-6
    assert torch.equal(state["4.running_var"], model.state_dict()["4.running_var"])


def test_tied_weights_are_averaged_once_per_step():
    torch.manual_seed(0)
    embed, head = nn.Embedding(20, 8), nn.Linear(8, 20, bias=False)
    head.weight = embed.weight
    model = nn.Sequential(embed, nn.Flatten(), head)
    ema, reference = ModelEMA(model, decay=0.5, warmup=False), ReferenceEMA(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    for _ in range(5):
        model(torch.randint(0, 20, (4, 1))).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
        ema.update(model)
        reference.update(model, 0.5)
    assert max_error(ema.module.state_dict(), reference.state) < 1e-6
    assert ema.module[0].weight is ema.module[2].weight


# -- low precision -------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_model_keeps_a_float32_shadow_that_tracks_float64(dtype):
    torch.manual_seed(0)
    model = small_cnn().to(dtype)
    ema, reference = ModelEMA(model, decay=0.999, warmup=False), ReferenceEMA(model)
    naive = copy.deepcopy(model)  # what a copied 15-line EMA does: average in the model's own dtype

    def step():
        ema.update(model)
        reference.update(model, 0.999)
        with torch.no_grad():
            for n, p in zip(naive.parameters(), model.parameters()):
                n.mul_(0.999).add_(p, alpha=0.001)

    train_steps(model, 100, step, lr=0.01)
    assert {t.dtype for t in ema.module.parameters()} == {torch.float32}
    ours = max_error(ema.module.state_dict(), reference.state)
    theirs = max_error(
        dict(naive.named_parameters()), {k: reference.state[k] for k, _ in naive.named_parameters()}
    )
    assert ours < 1e-5
    assert theirs > 30 * ours  # the naive EMA's updates round away


def test_dtype_option_sets_the_shadow_precision(model):
    ema = ModelEMA(model, dtype=torch.float64)
    assert {t.dtype for t in ema.module.parameters()} == {torch.float64}
    train_steps(model, 3, lambda: ema.update(model))
    assert ema.module.state_dict()["1.num_batches_tracked"].dtype == torch.int64


def test_shadow_is_one_copy_of_the_weights_and_nothing_is_allocated_per_step(model):
    ema = ModelEMA(model, warmup=False)
    shadow, live = ema.module.state_dict(), model.state_dict()
    assert {t.untyped_storage().data_ptr() for t in shadow.values()}.isdisjoint(
        t.untyped_storage().data_ptr() for t in live.values()
    )
    # Each storage once: small shadows are views into one flat tensor.
    assert sum(
        {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in shadow.values()}.values()
    ) == sum(t.untyped_storage().nbytes() for t in live.values())
    train_steps(model, 1)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        for _ in range(3):
            ema.update(model)
    allocations = [e.name for e in prof.events() if e.cpu_memory_usage and e.cpu_memory_usage > 0]
    assert allocations == []


def test_ema_module_is_eval_mode_and_never_tracks_gradients(model):
    ema = ModelEMA(model)
    assert not ema.module.training
    assert not any(p.requires_grad for p in ema.module.parameters())
    train_steps(model, 2, lambda: ema.update(model))
    assert all(p.grad_fn is None and not p.requires_grad for p in ema.module.parameters())
    assert torch.equal(ema(torch.ones(2, 1, 8, 8)), ema.module(torch.ones(2, 1, 8, 8)))


# -- wrappers and moved models -----------------------------------------------------------------------


def test_dataparallel_and_compiled_wrappers_are_looked_through(model, tmp_path):
    compiled = torch.compile(nn.DataParallel(model))
    ema = ModelEMA(compiled, decay=0.9, warmup=False)
    reference = ReferenceEMA(model)
    train_steps(model, 5, lambda: (ema.update(compiled), reference.update(model, 0.9)))
    assert max_error(ema.module.state_dict(), reference.state) < 1e-6
    assert list(ema.module.state_dict()) == list(model.state_dict())
    fresh = small_cnn()
    fresh.load_state_dict(torch.load(ema.save(tmp_path / "ema.pth"), weights_only=True), strict=True)


@pytest.fixture
def process_group(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_ddp_wrapper_is_looked_through(model, process_group):
    ddp = nn.parallel.DistributedDataParallel(model)
    ema, reference = ModelEMA(ddp, decay=0.9, warmup=False), ReferenceEMA(model)
    train_steps(ddp, 4, lambda: (ema.update(ddp), reference.update(model, 0.9)))
    assert max_error(ema.module.state_dict(), reference.state) < 1e-6
    assert not any(key.startswith("module.") for key in ema.state_dict()["weights"])


def test_model_cast_to_double_after_building_is_followed(model):
    ema, reference = ModelEMA(model, decay=0.9, warmup=False), ReferenceEMA(model)
    train_steps(model, 3, lambda: (ema.update(model), reference.update(model, 0.9)))
    model.double()
    train_steps(model, 3, lambda: (ema.update(model), reference.update(model, 0.9)), seed=1)
    assert {t.dtype for t in ema.module.parameters()} == {torch.float64}
    assert max_error(ema.module.state_dict(), reference.state) < 1e-6


def test_model_tensors_replaced_after_building_are_followed(model):
    ema, reference = ModelEMA(model, decay=0.9, warmup=False), ReferenceEMA(model)
    train_steps(model, 2, lambda: (ema.update(model), reference.update(model, 0.9)))
    model.to(memory_format=torch.channels_last)  # new parameter storage, new strides
    model.load_state_dict(copy.deepcopy(model.state_dict()), assign=True)  # new parameter objects
    model[7].weight.data = model[7].weight.data.clone()  # .data swapped by hand
    model[1].running_var.data = model[1].running_var.data.clone()  # a buffer the update reads as itself
    model[4].running_mean = model[4].running_mean.clone()  # a buffer object replaced
    train_steps(model, 3, lambda: (ema.update(model), reference.update(model, 0.9)), seed=1)
    assert max_error(ema.module.state_dict(), reference.state) < 1e-6
    assert ema.module[0].weight.is_contiguous(memory_format=torch.channels_last)


def test_ema_module_moved_by_hand_is_laid_out_again(model):
    ema, reference = ModelEMA(model, decay=0.9, warmup=False), ReferenceEMA(model)
    ema.module.half()  # the EMA follows the model's dtype rule again at the next update
    reference.state = {
        k: v.half().double() if v.is_floating_point() else v for k, v in reference.state.items()
    }
    train_steps(model, 3, lambda: (ema.update(model), reference.update(model, 0.9)))
    assert {t.dtype for t in ema.module.parameters()} == {torch.float32}
    assert max_error(ema.module.state_dict(), reference.state) < 1e-6


def test_another_model_object_of_the_same_architecture_is_accepted(model):
    ema = ModelEMA(model, decay=0.9, warmup=False)
    other = small_cnn()
    reference = ReferenceEMA(model)
    ema.update(other)
    reference.update(other, 0.9)
    assert max_error(ema.module.state_dict(), reference.state) < 1e-6


def test_model_of_another_shape_is_a_clear_error_and_the_ema_is_kept(model):
    ema = ModelEMA(model)
    before = copy.deepcopy(ema.state_dict())
    with pytest.raises(
        ValueError, match=r"shape mismatch.*9\.weight: \(5, 64\) vs \(10, 64\).*build a new EMA"
    ):
        ema.update(small_cnn(num_classes=5))
    with pytest.raises(ValueError, match="missing"):
        ema.update(nn.Linear(3, 3))
    assert all(torch.equal(v, before["weights"][k]) for k, v in ema.state_dict()["weights"].items())
    assert ema.num_steps == 0
    ema.update(model)  # still bound to the right model afterwards
    assert ema.num_steps == 1


def test_device_option_places_the_shadow(model):
    ema = ModelEMA(model, device="cpu")
    assert ema.device == torch.device("cpu")
    assert {t.device for t in ema.module.state_dict().values()} == {torch.device("cpu")}


# -- evaluating with EMA weights ----------------------------------------------------------------------


def test_applied_to_swaps_ema_weights_in_and_restores_live_ones_exactly(model):
    ema = ModelEMA(model, decay=0.9)
    train_steps(model, 5, lambda: ema.update(model))
    live = copy.deepcopy(model.state_dict())
    x = torch.randn(4, 1, 8, 8)
    expected = ema.module(x)
    with ema.applied_to(model) as swapped:
        assert swapped is model
        assert max_error(model.state_dict(), ema.module.state_dict()) == 0
        assert torch.equal(model.eval()(x), expected)
    assert all(torch.equal(v, live[k]) for k, v in model.state_dict().items())


def test_applied_to_restores_live_weights_when_the_block_raises(model):
    ema = ModelEMA(model)
    train_steps(model, 3, lambda: ema.update(model))
    live = copy.deepcopy(model.state_dict())
    with pytest.raises(RuntimeError, match="boom"), ema.applied_to(model):
        raise RuntimeError("boom")
    assert all(torch.equal(v, live[k]) for k, v in model.state_dict().items())


def test_applied_to_a_bf16_model_casts_in_and_restores_bit_exact():
    torch.manual_seed(0)
    model = small_cnn().bfloat16()
    ema = ModelEMA(model, decay=0.99)
    train_steps(model, 5, lambda: ema.update(model))
    live = copy.deepcopy(model.state_dict())
    with ema.applied_to(model):
        assert model[0].weight.dtype == torch.bfloat16
        assert torch.equal(model[0].weight, ema.module[0].weight.bfloat16())
    assert all(torch.equal(v, live[k]) for k, v in model.state_dict().items())


def test_copy_to_writes_ema_weights_for_good(model):
    ema = ModelEMA(model)
    train_steps(model, 3, lambda: ema.update(model))
    target = small_cnn()
    ema.copy_to(torch.compile(target))
    assert max_error(target.state_dict(), ema.module.state_dict()) == 0


# -- resume and files ------------------------------------------------------------------------------


def test_resume_from_state_dict_is_bit_identical(tmp_path):
    settings = dict(decay=0.95, update_after_step=2, update_every=2)

    torch.manual_seed(0)
    model = small_cnn()
    straight = ModelEMA(model, **settings)
    train_steps(model, 10, lambda: straight.update(model), seed=1)
    train_steps(model, 10, lambda: straight.update(model), seed=2)

    torch.manual_seed(0)
    model = small_cnn()
    first = ModelEMA(model, **settings)
    train_steps(model, 10, lambda: first.update(model), seed=1)
    torch.save({"model": model.state_dict(), "ema": first.state_dict()}, tmp_path / "ckpt.pth")

    checkpoint = torch.load(tmp_path / "ckpt.pth", weights_only=True)
    resumed_model = small_cnn()
    resumed_model.load_state_dict(checkpoint["model"])
    resumed = ModelEMA(resumed_model, decay=0.5)  # settings come back from the state
    resumed.load_state_dict(checkpoint["ema"])
    train_steps(resumed_model, 10, lambda: resumed.update(resumed_model), seed=2)

    assert resumed.decay == 0.95 and resumed.update_every == 2
    assert (resumed.num_steps, resumed.num_updates) == (straight.num_steps, straight.num_updates) == (20, 9)
    for key, value in straight.module.state_dict().items():
        assert torch.equal(resumed.module.state_dict()[key], value), key


def test_load_state_dict_restores_the_shadow_dtype():
    model = small_cnn()
    saved = ModelEMA(model, dtype=torch.float64)
    saved.update(model)
    ema = ModelEMA(model)
    ema.load_state_dict(saved.state_dict())
    assert ema.dtype == torch.float64 and ema.module[0].weight.dtype == torch.float64
    assert torch.equal(ema.module[0].weight, saved.module[0].weight)


@pytest.mark.parametrize("corrupt", ["plain weights", "other shapes", "bad decay", "missing counter"])
def test_load_state_dict_rejects_bad_state_and_keeps_the_ema(model, corrupt):
    ema = ModelEMA(model)
    train_steps(model, 2, lambda: ema.update(model))
    before = copy.deepcopy(ema.state_dict())
    state = copy.deepcopy(before)
    if corrupt == "plain weights":
        state = state["weights"]
    elif corrupt == "other shapes":
        state["weights"] = ModelEMA(small_cnn(num_classes=3)).state_dict()["weights"]
    elif corrupt == "bad decay":
        state["settings"]["decay"] = 1.5
    else:
        del state["num_updates"]
    with pytest.raises(ValueError, match="ModelEMA state|does not match|decay must be|lacks"):
        ema.load_state_dict(state)
    after = ema.state_dict()
    assert after["settings"] == before["settings"] and after["num_updates"] == before["num_updates"]
    assert all(torch.equal(v, before["weights"][k]) for k, v in after["weights"].items())


def test_save_writes_plain_weights_that_load_strict(model, tmp_path):
    ema = ModelEMA(model)
    train_steps(model, 3, lambda: ema.update(model))
    path = ema.save(tmp_path / "sub" / "model_ema.pth")
    fresh = small_cnn()
    fresh.load_state_dict(torch.load(path, weights_only=True), strict=True)
    assert max_error(fresh.state_dict(), ema.module.state_dict()) == 0


def test_save_is_atomic_when_interrupted(model, tmp_path, monkeypatch):
    ema = ModelEMA(model)
    path = ema.save(tmp_path / "model_ema.pth")
    good = path.read_bytes()
    train_steps(model, 2, lambda: ema.update(model))

    def dies_midway(obj, f):
        f.write(b"half a file")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", dies_midway)
    with pytest.raises(KeyboardInterrupt):
        ema.save(path)
    assert path.read_bytes() == good
    assert os.listdir(tmp_path) == ["model_ema.pth"]  # no temporary file left behind


# -- non-finite weights ------------------------------------------------------------------------------


def test_skip_non_finite_keeps_the_last_good_ema(model):
    ema = ModelEMA(model, decay=0.9, skip_non_finite=True)
    train_steps(model, 3, lambda: ema.update(model))
    good = copy.deepcopy(ema.module.state_dict())
    with torch.no_grad():
        model[7].weight[0, 0] = float("nan")
    with pytest.warns(RuntimeWarning, match="NaN or Inf") as warned:
        ema.update(model)
    assert (warned[0].filename, warned[0].lineno) == (__file__, inspect.currentframe().f_lineno - 1)
    assert ema.num_skipped == 1 and ema.num_updates == 3
    assert all(torch.equal(v, good[k]) for k, v in ema.module.state_dict().items())
    with torch.no_grad():
        model[7].weight[0, 0] = 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ema.update(model)
    assert ema.num_updates == 4


def test_non_finite_weights_propagate_when_not_skipping(model):
    ema = ModelEMA(model, decay=0.9)
    with torch.no_grad():
        model[7].weight[0, 0] = float("inf")
    ema.update(model)
    assert not torch.isfinite(ema.module[7].weight).all()


# -- bad input -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("decay", [1.0, 1.5, -0.1, float("nan")])
def test_bad_decay_value_names_the_argument_and_the_fix(model, decay):
    with pytest.raises(ValueError, match=r"decay must be a number in \[0, 1\).*decay_from_half_life"):
        ModelEMA(model, decay=decay)


@pytest.mark.parametrize("decay", [True, "0.999", None])
def test_decay_of_another_type_is_a_type_error(model, decay):
    with pytest.raises(TypeError, match=r"decay must be a number.*decay_from_half_life"):
        ModelEMA(model, decay=decay)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"update_every": 0}, ValueError, "update_every must be an int >= 1"),
        ({"update_after_step": -1}, ValueError, "update_after_step must be an int >= 0"),
        ({"update_every": 2.5}, TypeError, "update_every must be an int"),
        ({"buffers": "mean"}, ValueError, r"buffers must be one of \('average', 'copy'\)"),
        ({"buffers": None}, TypeError, "buffers must be one of"),
        ({"device": 1.5}, TypeError, "device must be"),
        ({"device": "cuda:99"}, ValueError, "device must be a device this machine has"),
        ({"dtype": torch.int64}, TypeError, "dtype must be a floating-point"),
        ({"warmup": "yes"}, TypeError, "warmup must be True or False"),
        ({"skip_non_finite": 1}, TypeError, "skip_non_finite must be True or False"),
    ],
)
def test_bad_options_name_the_argument(model, kwargs, error, match):
    with pytest.raises(error, match=match):
        ModelEMA(model, **kwargs)


def test_model_that_is_not_a_module_is_a_type_error(model):
    with pytest.raises(TypeError, match="model must be a torch.nn.Module, got OrderedDict"):
        ModelEMA(model.state_dict())
    ema = ModelEMA(model)
    with pytest.raises(TypeError, match="model must be a torch.nn.Module, got list"):
        ema.update(list(model.parameters()))


def test_model_without_floating_point_weights_is_rejected():
    counter = nn.Module()
    counter.register_buffer("count", torch.zeros(1, dtype=torch.int64))
    with pytest.raises(ValueError, match="no floating-point parameters or buffers"):
        ModelEMA(counter)
    with pytest.raises(ValueError, match="no floating-point"):
        ModelEMA(nn.ReLU())


def test_lazy_module_must_run_once_first():
    with pytest.raises(ValueError, match="lazy module.*forward pass"):
        ModelEMA(nn.Sequential(nn.LazyLinear(4)))


def test_numpy_numbers_and_cpu_0_are_accepted(model):
    import numpy as np

    ema = ModelEMA(model, decay=np.float32(0.5), update_every=np.int64(2), device="cpu:0", warmup=False)
    assert isinstance(ema.update_every, int) and isinstance(ema.decay, float)
    assert ema.device == torch.device("cpu")  # where CPU tensors live: the shadow sits beside the model
    assert {t.device for t in ema.module.state_dict().values()} == {torch.device("cpu")}


# -- the model changed after building ------------------------------------------------------------------


def test_submodule_replaced_by_one_of_the_same_shape_is_followed(model):
    ema, reference = ModelEMA(model, decay=0.9, warmup=False), ReferenceEMA(model)
    train_steps(model, 2, lambda: (ema.update(model), reference.update(model, 0.9)))
    model[7] = nn.Linear(16 * 4 * 4, 64)  # a fresh layer: the EMA must average it, not the detached one
    train_steps(model, 3, lambda: (ema.update(model), reference.update(model, 0.9)), seed=1)
    assert max_error(ema.module.state_dict(), reference.state) < 1e-6


def test_submodule_put_straight_into_modules_is_followed(model):
    ema, reference = ModelEMA(model, decay=0.9, warmup=False), ReferenceEMA(model)
    built_earlier = nn.Linear(16 * 4 * 4, 64)  # the same shape as model[7]
    train_steps(model, 2, lambda: (ema.update(model), reference.update(model, 0.9)))
    model._modules["7"] = built_earlier  # fires none of torch's hooks: only the module tree tells
    train_steps(model, 3, lambda: (ema.update(model), reference.update(model, 0.9)), seed=1)
    assert max_error(ema.module.state_dict(), reference.state) < 1e-6


def test_fit_building_its_loss_module_each_step_plans_the_ema_once(model, monkeypatch):
    from ema_kit import LiveLog, fit

    plans = count_plans(monkeypatch)
    data = [(torch.randn(8, 1, 8, 8), torch.randint(0, 10, (8,))) for _ in range(5)]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    fit(model, data, data, epochs=2, optimizer=optimizer, ema=0.9,
        callbacks=[LiveLog(progress="off", plot=False)],
        loss_fn=lambda outputs, targets: nn.CrossEntropyLoss()(outputs, targets))  # fmt: skip
    assert len(plans) == 1  # when fit built the EMA: 10 steps, each building a loss module, and no re-plan


def change(model: nn.Module, how: str) -> None:
    if how == "another shape":
        model[9] = nn.Linear(64, 5)
    elif how == "appended":
        model.append(nn.Linear(10, 3))
    elif how == "deleted":
        del model[9]
    elif how == "parameter deleted":
        del model[7].bias
    elif how == "buffer shrunk in place":
        model[1].running_mean.resize_(4)
    else:
        model[1].running_var.resize_(4096)  # grown in place: new memory


@pytest.mark.parametrize(
    "how",
    [
        "another shape",
        "appended",
        "deleted",
        "parameter deleted",
        "buffer shrunk in place",
        "buffer grown in place",
    ],
)
def test_layout_changed_after_building_is_a_clear_error_at_the_next_update(model, how):
    ema = ModelEMA(model)
    train_steps(model, 2, lambda: ema.update(model))
    before = copy.deepcopy(ema.state_dict())
    change(model, how)
    with pytest.raises(ValueError, match="does not match the model this EMA was built for.*undo the change"):
        ema.update(model)
    after = ema.state_dict()
    assert after["num_steps"] == before["num_steps"] == 2
    assert all(torch.equal(v, before["weights"][k]) for k, v in after["weights"].items())


def test_a_module_without_weights_appended_is_followed(model):
    ema, reference = ModelEMA(model, decay=0.9, warmup=False), ReferenceEMA(model)
    model.append(nn.Identity())  # the averaged tensors are the same
    train_steps(model, 3, lambda: (ema.update(model), reference.update(model, 0.9)))
    assert max_error(ema.module.state_dict(), reference.state) < 1e-6


# -- what an EMA holds --------------------------------------------------------------------------------


class Scaled(nn.Module):
    """A layer with extra state (a dict), as quantization observers and some norms keep."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(4, 2)
        self.config = {"scale": 2.0, "calls": 0}

    def forward(self, x):
        self.config["calls"] += 1
        return self.linear(x) * self.config["scale"]

    def get_extra_state(self):
        return dict(self.config)

    def set_extra_state(self, state):
        self.config = dict(state)


def test_extra_state_is_copied_saved_and_resumed(tmp_path):
    torch.manual_seed(0)
    model = Scaled()
    ema = ModelEMA(model, decay=0.5, warmup=False)
    model(torch.ones(1, 4))
    model.config["scale"] = 3.0
    ema.update(model)
    assert ema.module.config == {"scale": 3.0, "calls": 1}  # copied, not averaged
    torch.save(ema.state_dict(), tmp_path / "ema.pth")
    resumed = ModelEMA(Scaled(), decay=0.9)
    resumed.load_state_dict(torch.load(tmp_path / "ema.pth", weights_only=True))
    assert resumed.module.config == ema.module.config and resumed.num_steps == 1
    assert torch.equal(resumed.module.linear.weight, ema.module.linear.weight)
    fresh = Scaled()
    fresh.load_state_dict(torch.load(ema.save(tmp_path / "model_ema.pth"), weights_only=True))
    assert fresh.config == ema.module.config
    with pytest.raises(ValueError, match=r"extra state.*safetensors.*\.pth"):
        ema.save(tmp_path / "model_ema.safetensors")


def test_fit_with_out_dir_saves_a_model_with_extra_state(tmp_path):
    from ema_kit import LiveLog, fit

    torch.manual_seed(0)
    model = Scaled()
    data = [(torch.randn(8, 4), torch.randint(0, 2, (8,))) for _ in range(3)]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    fit(model, data, data, epochs=2, optimizer=optimizer, ema=0.9, out_dir=tmp_path,
        callbacks=[LiveLog(progress="off")])  # fmt: skip
    weights = torch.load(tmp_path / "model_ema.pth", weights_only=True)
    assert weights["_extra_state"]["calls"] == model.config["calls"]


def test_complex_parameters_are_averaged_like_complex128():
    torch.manual_seed(0)
    model = nn.Module()
    model.weight = nn.Parameter(torch.randn(3, 4, dtype=torch.complex64))
    ema = ModelEMA(model, decay=0.8, warmup=False)
    reference = model.weight.detach().to(torch.complex128, copy=True)
    for _ in range(5):
        with torch.no_grad():
            model.weight.add_(torch.randn(3, 4, dtype=torch.complex64))
        ema.update(model)
        reference = 0.8 * reference + 0.2 * model.weight.detach().to(torch.complex128)
    assert ema.module.weight.dtype == torch.complex64
    assert (ema.module.weight.to(torch.complex128) - reference).abs().max() < 1e-5
    assert not torch.equal(ema.module.weight, model.weight)  # averaged, not copied


def test_model_on_meta_is_refused_at_construction():
    with torch.device("meta"):
        model = nn.Linear(2, 2)
    with pytest.raises(ValueError, match=r"weight is on the meta device.*to_empty"):
        ModelEMA(model)


def test_sparse_tensor_is_a_clear_error():
    model = nn.Linear(2, 2)
    model.register_buffer("mask", torch.eye(2).to_sparse())
    with pytest.raises(ValueError, match="mask is a torch.sparse_coo tensor.*dense"):
        ModelEMA(model)


def test_load_state_with_a_sparse_tensor_fails_before_changing_anything(model):
    ema = ModelEMA(model, decay=0.9)
    train_steps(model, 2, lambda: ema.update(model))
    state = copy.deepcopy(ema.state_dict())
    state["weights"]["0.weight"] = state["weights"]["0.weight"].to_sparse()
    state["settings"]["decay"], state["num_steps"] = 0.5, 99
    with pytest.raises(ValueError, match=r"\['0\.weight'\] are not dense tensors"):
        ema.load_state_dict(state)
    assert ema.decay == 0.9 and ema.num_steps == 2


def test_buffer_cast_without_its_module_s_parameters_is_followed(model):
    model[1].running_mean = model[1].running_mean.double()
    ema, reference = ModelEMA(model, decay=0.9, warmup=False), ReferenceEMA(model)
    model.float()  # puts a new running_mean object in the buffer dict, leaves every parameter as it was
    train_steps(model, 3, lambda: (ema.update(model), reference.update(model, 0.9)))
    assert ema.module[1].running_mean.dtype == torch.float32
    assert max_error(ema.module.state_dict(), reference.state) < 1e-6


class Drifting(nn.Module):
    """One weight vector that drifts 0.1% per step, each element its own way (bfloat16-exact at the start)."""

    def __init__(self, size: int = 4096):
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.start = torch.randn(size, dtype=torch.float64, generator=generator).bfloat16().double()
        self.drift = torch.randn(size, dtype=torch.float64, generator=generator) * 1e-3
        self.weight = nn.Parameter(self.start.float())

    def step(self, n: int) -> None:
        with torch.no_grad():
            self.weight.copy_(self.start + self.drift * n)


def test_stochastic_bf16_shadow_tracks_the_float64_ema_where_nearest_bf16_stalls():
    model = Drifting()
    options = {"decay": 0.999, "warmup": False}
    nearest = ModelEMA(model, **options, dtype=torch.bfloat16)
    stochastic = ModelEMA(model, **options, dtype="bfloat16-stochastic")
    exact = model.start.clone()
    for n in range(1, 1001):  # 1000 updates: the exact EMA has moved far enough for the jitter to be small
        model.step(n)
        exact.lerp_(model.weight.double(), 0.001)
        nearest.update(model)
        stochastic.update(model)
    travel = (exact - model.start).norm()
    assert stochastic.module.weight.dtype == torch.bfloat16 and stochastic.dtype == "bfloat16-stochastic"
    assert (stochastic.module.weight.double() - exact).norm() < 0.1 * travel
    assert (nearest.module.weight.double() - exact).norm() > 0.5 * travel


def stochastic_run(ema, model: Drifting, steps: range) -> None:
    for n in steps:
        model.step(n)
        ema.update(model)


def test_a_stochastic_ema_resumes_bit_exact_from_its_saved_state(tmp_path):
    model = Drifting(512)
    options = {"decay": 0.99, "dtype": "bfloat16-stochastic"}
    straight = ModelEMA(model, **options)
    stochastic_run(straight, model, range(1, 11))
    torch.save(straight.state_dict(), tmp_path / "ema.pt")
    stochastic_run(straight, model, range(11, 21))
    resumed = ModelEMA(Drifting(512), **options)
    resumed.load_state_dict(torch.load(tmp_path / "ema.pt", weights_only=True))
    stochastic_run(resumed, model, range(11, 21))
    assert torch.equal(resumed.module.weight, straight.module.weight)


def test_the_rounding_noise_is_the_same_in_every_run_and_the_global_generator_is_not_drawn_from():
    finals = []
    for _ in range(2):
        model = Drifting(512)
        ema = ModelEMA(model, decay=0.99, dtype="bfloat16-stochastic")
        torch.manual_seed(123)
        stochastic_run(ema, model, range(1, 11))
        drawn = torch.rand(1)
        torch.manual_seed(123)
        assert torch.equal(drawn, torch.rand(1))
        finals.append(ema.module.weight.clone())
    assert torch.equal(finals[0], finals[1])


@pytest.mark.parametrize(
    ("dtype", "error", "message"),
    [
        ("bfloat16-stoch", TypeError, r"dtype must be a floating-point torch.dtype .*'bfloat16-stochastic'"),
        (torch.int8, TypeError, r"dtype must be .*'bfloat16-stochastic', or None, got torch.int8"),
    ],
)
def test_a_wrong_shadow_dtype_names_the_stochastic_one_too(dtype, error, message):
    with pytest.raises(error, match=message):
        ModelEMA(nn.Linear(2, 2), dtype=dtype)


def test_a_channels_last_model_is_refused_stochastic_shadows_naming_the_dtype_that_works():
    model = nn.Sequential(nn.Conv2d(3, 4, 3)).to(memory_format=torch.channels_last)
    with pytest.raises(ValueError, match=r"stochastic' blends contiguous .* use dtype=torch.bfloat16"):
        ModelEMA(model, dtype="bfloat16-stochastic")
    shadow = ModelEMA(model, dtype=torch.bfloat16).module[0].weight
    assert shadow.is_contiguous(memory_format=torch.channels_last)


def test_a_stochastic_state_without_its_generator_state_is_refused_before_any_change():
    model = Drifting(64)
    ema = ModelEMA(model, dtype="bfloat16-stochastic")
    state = ema.state_dict() | {"generator": None}
    before = ema.module.weight.clone()
    with pytest.raises(ValueError, match="no generator state"):
        ModelEMA(model, dtype="bfloat16-stochastic").load_state_dict(state)
    assert torch.equal(ema.module.weight, before)


def test_a_state_saved_with_rounding_and_seed_settings_resumes_as_the_stochastic_dtype():
    model = Drifting(512)
    straight = ModelEMA(model, decay=0.99, dtype="bfloat16-stochastic")
    stochastic_run(straight, model, range(1, 11))
    state = straight.state_dict()  # as ModelEMA(..., dtype=torch.bfloat16, rounding="stochastic") wrote it
    state["settings"] = state["settings"] | {"dtype": "bfloat16", "rounding": "stochastic", "seed": 0}
    resumed = ModelEMA(Drifting(512), decay=0.99)
    resumed.load_state_dict(state)
    stochastic_run(straight, model, range(11, 21))
    stochastic_run(resumed, model, range(11, 21))
    assert resumed.dtype == "bfloat16-stochastic"
    assert torch.equal(resumed.module.weight, straight.module.weight)


def test_a_multi_ema_of_stochastic_bf16_shadows_tracks_each_float64_ema_and_resumes_bit_exact(tmp_path):
    from ema_kit import MultiEMA

    model = Drifting()
    decays = (0.99, 0.999)
    multi = MultiEMA(model, decays=decays, warmup=False, dtype="bfloat16-stochastic")
    exact = {decay: model.start.clone() for decay in decays}
    for n in range(1, 1001):  # as for one EMA above: far enough for the jitter to be small
        model.step(n)
        for decay in decays:
            exact[decay].lerp_(model.weight.double(), 1 - decay)
        multi.update(model)
        if n == 500:
            torch.save(multi.state_dict(), tmp_path / "multi.pt")
    for decay, ema in multi.emas.items():
        travel = (exact[decay] - model.start).norm()
        assert ema.module.weight.dtype == torch.bfloat16
        assert (ema.module.weight.double() - exact[decay]).norm() < 0.1 * travel
    resumed = MultiEMA(Drifting(), decays=decays, warmup=False, dtype="bfloat16-stochastic")
    resumed.load_state_dict(torch.load(tmp_path / "multi.pt", weights_only=True))
    stochastic_run(resumed, model, range(501, 1001))
    for decay in decays:
        assert torch.equal(resumed.emas[decay].module.weight, multi.emas[decay].module.weight)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_a_stochastic_ema_takes_its_noise_along_to_the_gpu_and_resumes_there_bit_exact(tmp_path):
    finals = []
    for _ in range(2):  # the same stream each time, though it changed device
        model = Drifting(512)
        ema = ModelEMA(model, decay=0.99, dtype="bfloat16-stochastic")
        stochastic_run(ema, model, range(1, 6))
        model.cuda()
        stochastic_run(ema, model, range(6, 11))
        assert ema.module.weight.device.type == "cuda"
        finals.append(ema.module.weight.cpu())
    assert torch.equal(finals[0], finals[1])
    torch.save(ema.state_dict(), tmp_path / "ema.pt")
    resumed = ModelEMA(Drifting(512).cuda(), decay=0.99, dtype="bfloat16-stochastic")
    resumed.load_state_dict(torch.load(tmp_path / "ema.pt", weights_only=True))
    stochastic_run(ema, model, range(11, 21))
    stochastic_run(resumed, model, range(11, 21))
    assert torch.equal(resumed.module.weight, ema.module.weight)


def test_fit_resumes_a_stochastic_bf16_ema_bit_exact(tmp_path):
    from ema_kit import LiveLog, fit
    from ema_kit.examples.demo import SmallCNN
    from ema_kit.examples.digits import digits_loaders

    def run(epochs, out_dir, seed=0, **options):
        torch.manual_seed(seed)
        model = SmallCNN(width=8)
        ema = ModelEMA(model, decay=0.9, dtype="bfloat16-stochastic")
        train_loader, val_loader = digits_loaders(batch_size=128)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
        fit(
            model,
            train_loader,
            val_loader,
            epochs=epochs,
            optimizer=optimizer,
            ema=ema,
            out_dir=out_dir,
            amp="bf16",
            callbacks=[LiveLog(progress="off", plot=False)],
            **options,
        )  # fmt: skip; bf16: the EMA model's inputs
        return ema

    straight = run(2, tmp_path / "straight")
    run(1, tmp_path / "resumed")
    resumed = run(2, tmp_path / "resumed", seed=1, resume=True)
    for a, b in zip(straight.module.state_dict().values(), resumed.module.state_dict().values()):
        assert torch.equal(a, b)
    assert straight.module[0].weight.dtype == torch.bfloat16


def test_fit_refuses_to_resume_a_nearest_bf16_run_with_the_stochastic_dtype(tmp_path):
    from ema_kit import LiveLog, fit
    from ema_kit.examples.demo import SmallCNN
    from ema_kit.examples.digits import digits_loaders

    for dtype, resume in ((torch.bfloat16, False), ("bfloat16-stochastic", True)):
        model = SmallCNN(width=8)
        ema = ModelEMA(model, decay=0.9, dtype=dtype)
        train_loader, val_loader = digits_loaders(batch_size=128)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
        options = {"epochs": 1, "optimizer": optimizer, "ema": ema, "out_dir": tmp_path, "resume": resume}
        options |= {"amp": "bf16", "callbacks": [LiveLog(progress="off", plot=False)]}
        if resume:
            changed = "dtype='bfloat16' in the checkpoint, dtype='bfloat16-stochastic' now"
            with pytest.raises(ValueError, match=changed):
                fit(model, train_loader, val_loader, **options)
        else:
            fit(model, train_loader, val_loader, **options)


def test_the_stochastic_dtype_refuses_a_channels_last_model_by_name():
    model = nn.Sequential(nn.Conv2d(3, 8, 3)).to(memory_format=torch.channels_last)
    with pytest.raises(ValueError, match=r"contiguous shadows only, but 0.weight has strides"):
        ModelEMA(model, dtype="bfloat16-stochastic")
