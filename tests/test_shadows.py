"""Shadows (ema_kit/_shadows.py): K shadow sets of one live model, against a float64 per-tensor formula."""

import copy
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import count_plans
from torch import nn

from ema_kit._shadows import Shadows


def mixed_model() -> nn.Module:
    """Parameters and buffers covering every list: dtypes, sizes, layouts, integers, a copied float buffer."""
    g = torch.Generator().manual_seed(0)
    model = nn.Module()
    tensors = {
        "big": torch.randn(50_000, generator=g),
        "small": torch.randn(7, generator=g),
        "empty": torch.randn(0, generator=g),
        "scalar": torch.randn((), generator=g),
        "bf16": torch.randn(500, generator=g).bfloat16(),
        "fp16": torch.randn(300, generator=g).half(),
        "fp64": torch.randn(40, generator=g).double(),
        "channels_last": torch.randn(8, 4, 3, 3, generator=g).to(memory_format=torch.channels_last),
        "gaps": torch.randn(30, 20, generator=g)[:, ::2],  # not dense
    }
    for name, tensor in tensors.items():
        model.register_parameter(name, nn.Parameter(tensor))
    model.register_buffer("stat", torch.randn(16, generator=g))
    model.register_buffer("count", torch.tensor(5))
    model.register_buffer("index", torch.arange(6).view(2, 3))
    return model


def perturb(model: nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for tensor in list(model.parameters()) + list(model.buffers()):
            if tensor.is_floating_point():
                tensor.add_(torch.randn(tensor.shape, generator=g).to(tensor.dtype))
            else:
                tensor.add_(1)


@pytest.mark.parametrize("dtype", [None, torch.float64])
@pytest.mark.parametrize("average_buffers", [True, False])
def test_blend_of_each_set_matches_the_float64_formula_on_every_list(dtype, average_buffers):
    model = mixed_model()
    shadows = Shadows(model, 3, average_buffers=average_buffers, dtype=dtype, device=None)
    params = {name for name, _ in model.named_parameters()}
    expected = [
        {
            k: v.to(torch.float64, copy=True) if v.is_floating_point() else v.clone()
            for k, v in model.state_dict().items()
        }
        for _ in range(3)
    ]
    for step, weights in enumerate([(0.3, 0.01, 0.5), (0.3, 0.01, 0.5), (0.2, None, 1.0), (0.1, 0.1, 0.1)]):
        perturb(model, step)
        shadows.follow(model)
        shadows.blend(list(weights))
        for k, weight in enumerate(weights):
            if weight is None:
                continue
            for key, live in model.state_dict().items():
                if live.is_floating_point() and (key in params or average_buffers):
                    expected[k][key] = expected[k][key] + weight * (live.double() - expected[k][key])
                else:
                    expected[k][key] = live.clone()
    for k, module in enumerate(shadows.modules):
        for key, shadow in module.state_dict().items():
            want = expected[k][key]
            assert torch.allclose(shadow.double(), want.double(), atol=1e-6), (k, key)


def test_shadows_keep_the_memory_layout_of_dense_live_tensors():
    model = mixed_model()
    shadow = Shadows(model, 1, average_buffers=True, dtype=None, device=None).modules[0]
    assert shadow.channels_last.stride() == model.channels_last.stride()
    assert shadow.gaps.is_contiguous()  # a strided view with gaps gets a dense shadow


def test_copy_makes_exact_copies_even_over_nan():
    model = mixed_model()
    shadows = Shadows(model, 2, average_buffers=True, dtype=None, device=None)
    for module in shadows.modules:
        for tensor in module.state_dict().values():
            tensor.fill_(float("nan") if tensor.is_floating_point() else 0)
    perturb(model, 0)
    shadows.follow(model)
    shadows.copy()
    for module in shadows.modules:
        for key, value in module.state_dict().items():
            assert torch.equal(value, model.state_dict()[key].to(value.dtype)), key


def test_all_finite_sees_nan_and_inf_in_any_averaged_tensor():
    model = mixed_model()
    shadows = Shadows(model, 1, average_buffers=True, dtype=None, device=None)
    assert shadows.all_finite()
    with torch.no_grad():
        model.bf16[3] = float("inf")
    assert not shadows.all_finite()
    with torch.no_grad():
        model.bf16[3] = 0
        model.stat[0] = float("nan")
    assert not shadows.all_finite()


def test_a_stage_copies_its_live_tensors_into_one_buffer_each_fill():
    from ema_kit._shadows import _Stage

    lives = [torch.randn(3, 4), torch.randn(5), torch.randn(2, 2, 2)]
    stage = _Stage(lives, torch.device("cpu"))  # pinned, non-blocking copies only from a CUDA model
    assert len({view.untyped_storage().data_ptr() for view in stage.views}) == 1
    for _ in range(2):
        for live in lives:
            live.add_(1.0)
        stage.fill()
        assert all(torch.equal(view, live) for view, live in zip(stage.views, lives))


def test_small_shadows_replaced_by_hand_are_gathered_again_and_still_averaged():
    model = mixed_model()
    shadows = Shadows(model, 1, average_buffers=True, dtype=None, device=None)
    module = shadows.modules[0]
    small = {"small", "scalar", "stat"}  # float32, dense, under SMALL elements: views into one flat tensor
    assert len({getattr(module, name).untyped_storage().data_ptr() for name in small}) == 1
    module.load_state_dict({k: v.clone() for k, v in module.state_dict().items()}, assign=True)
    expected = {name: getattr(module, name).double() for name in small}
    perturb(model, 0)
    shadows.follow(model)
    shadows.blend([0.25])
    for name in small:
        want = expected[name] + 0.25 * (getattr(model, name).double() - expected[name])
        assert torch.allclose(getattr(module, name).double(), want, atol=1e-6), name
    assert len({getattr(module, name).untyped_storage().data_ptr() for name in small}) == 1


# -- following the model: the check reads the model alone -------------------------------------------------


def test_importing_ema_kit_installs_no_global_registration_hook():
    # A fresh process: torch keeps these hooks process-wide, and a hook there would make anything that builds
    # a module (a loss per step) look like a change to every EMA's model.
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]); import helpers\n"  # the ema_kit under test
        "import ema_kit, ema_kit.training, ema_kit.kaggle, ema_kit.examples\n"
        "from torch.nn.modules import module\n"
        "kinds = ('module', 'parameter', 'buffer')\n"
        "print([len(getattr(module, f'_global_{kind}_registration_hooks')) for kind in kinds])"
    )
    tests = str(Path(__file__).resolve().parent)
    result = subprocess.run([sys.executable, "-c", code, tests], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[0, 0, 0]"


def elsewhere(how: str, averaged) -> None:
    """What a training step does beside the model: each of these fires torch's registration hooks."""
    if how == "loss module built":
        nn.CrossEntropyLoss()(torch.randn(4, 3), torch.tensor([0, 1, 2, 0]))
    elif how == "layer built":
        nn.Linear(4, 4)
    elif how == "AveragedModel updated":
        averaged.update_parameters(averaged.module)  # assigns its n_averaged buffer
    else:
        averaged.register_buffer("scratch", torch.zeros(2))  # a buffer assigned, as some forwards do


@pytest.mark.parametrize(
    "how", ["loss module built", "layer built", "AveragedModel updated", "buffer assigned in another module"]
)
@pytest.mark.parametrize("count", [1, 3])
def test_modules_built_or_changed_elsewhere_between_two_updates_make_no_replan(monkeypatch, how, count):
    calls = count_plans(monkeypatch)
    averaged = torch.optim.swa_utils.AveragedModel(nn.Linear(3, 3))
    model = mixed_model()
    shadows = Shadows(model, count, average_buffers=True, dtype=None, device=None)
    for step in range(3):
        elsewhere(how, averaged)
        perturb(model, step)
        shadows.follow(model)
        shadows.blend([0.5] * count)
    assert len(calls) == 1  # when it was built


def layered() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 4)), nn.Sequential(), nn.Identity(), nn.Linear(4, 2)
    )


def test_a_layer_put_straight_into_modules_is_averaged_not_the_detached_one(monkeypatch):
    model = layered()
    built_earlier = nn.Linear(4, 2)  # the same shape, so only the objects tell the two apart
    shadows = Shadows(model, 1, average_buffers=True, dtype=torch.float64, device=None)
    calls = count_plans(monkeypatch)
    expected = {key: value.double() for key, value in model.state_dict().items()}
    model._modules["3"] = built_earlier  # fires no hook
    for step in range(3):
        perturb(model, step)
        shadows.follow(model)
        shadows.blend([0.25])
        for key, live in model.state_dict().items():
            expected[key] = expected[key] + 0.25 * (live.double() - expected[key])
    assert len(calls) == 1
    for key, shadow in shadows.modules[0].state_dict().items():
        assert torch.allclose(shadow, expected[key], atol=1e-12), key


def test_tensors_put_straight_into_their_dicts_are_followed():
    model = layered()
    model[3].register_buffer("scale", torch.zeros(2))
    shadows = Shadows(model, 1, average_buffers=True, dtype=None, device=None)
    model[3]._parameters["weight"] = nn.Parameter(torch.full((2, 4), 3.0))  # no hook fires for either
    model[3]._buffers["scale"] = torch.full((2,), 5.0)
    shadows.follow(model)
    shadows.copy()
    assert torch.equal(shadows.modules[0][3].weight, model[3].weight)
    assert torch.equal(shadows.modules[0][3].scale, model[3].scale)


class SameConfig(nn.Linear):
    """A module class whose ``==`` compares configurations, so that two of them may compare equal."""

    def __eq__(self, other):
        return isinstance(other, nn.Linear) and self.weight.shape == other.weight.shape

    __hash__ = nn.Module.__hash__


@pytest.mark.parametrize(
    "how",
    [
        "a one-element parameter replaced by an equal one",
        "a weight replaced by an equal one",
        "a child replaced by one whose == says equal",
    ],
)
def test_replacements_that_compare_equal_are_followed(monkeypatch, how):
    model = layered()
    model[3].scale = nn.Parameter(torch.tensor(1.0))
    model[2] = SameConfig(4, 4)
    shadows = Shadows(model, 1, average_buffers=True, dtype=None, device=None)
    calls = count_plans(monkeypatch)
    if how == "a one-element parameter replaced by an equal one":
        model[3].scale = nn.Parameter(torch.tensor(1.0))  # == gives tensor(True)
        replaced = model[3].scale
    elif how == "a weight replaced by an equal one":
        model[3].weight = nn.Parameter(model[3].weight.detach().clone())
        replaced = model[3].weight
    else:
        model._modules["2"] = SameConfig(4, 4)
        replaced = model[2].weight
    shadows.follow(model)
    assert len(calls) == 1  # seen at once, while the values are still equal
    with torch.no_grad():
        replaced.fill_(3.0)  # only the new tensor trains on
    shadows.follow(model)
    shadows.copy()
    assert torch.equal(dict(shadows.modules[0].named_parameters())[name_of(model, replaced)], replaced)


def name_of(model: nn.Module, tensor: torch.Tensor) -> str:
    return next(name for name, parameter in model.named_parameters() if parameter is tensor)


class Truthy(torch.Tensor):
    """A tensor whose truth is always True, so that ``==`` of it with any tensor reads as equal."""

    def __bool__(self):
        return True


class Logged(torch.Tensor):
    """A tensor that records every torch function called on it."""

    calls: list = []

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        cls.calls.append(func)
        return super().__torch_function__(func, types, args, kwargs or {})


def test_a_replaced_tensor_is_never_compared_by_value():
    model = layered()
    model[3].register_buffer("stat", torch.zeros(2))
    shadows = Shadows(model, 1, average_buffers=True, dtype=None, device=None)
    model[3].stat = torch.full((2,), 7.0).as_subclass(Truthy)  # its == with the old one would read as equal
    shadows.follow(model)
    shadows.copy()
    assert torch.equal(shadows.modules[0][3].stat, torch.full((2,), 7.0))
    Logged.calls.clear()
    model[3].stat = torch.zeros(2, 1).as_subclass(Logged)  # == with the old (2,) would broadcast to 2 x 2
    with pytest.raises(ValueError, match=r"shape mismatch \['3.stat: \(2, 1\) vs \(2,\)'\]"):
        shadows.follow(model)
    assert torch.Tensor.__eq__ not in Logged.calls


def test_a_non_persistent_buffer_reassigned_every_step_makes_no_replan(monkeypatch):
    model = layered()
    model[3].register_buffer("cache", torch.zeros(3), persistent=False)
    shadows = Shadows(model, 1, average_buffers=True, dtype=None, device=None)
    calls = count_plans(monkeypatch)
    for step in range(3):
        model[3].cache = torch.full((3,), float(step))  # as a forward that caches does
        perturb(model, step)
        shadows.follow(model)
        shadows.blend([0.5])
    assert calls == []


def rearrange(model: nn.Module, how: str) -> None:
    """Changes to the module tree made through ``_modules``, which fire no hook."""
    if how == "the last child renamed":
        model._modules["head"] = model._modules.pop("3")  # the same objects in the same order: only names
    elif how == "a child moved to its sibling":
        model[1]._modules["0"] = model[0]._modules.pop("1")  # the children in the same order, other parents
    elif how == "a leaf given a child":
        model[3]._modules["extra"] = nn.Linear(1, 1)
    elif how == "a child deleted":
        del model._modules["3"]
    elif how == "a parameter registered anew":
        model[0][1].scale = nn.Parameter(torch.ones(4))
    elif how == "a buffer registered anew":
        model[2].register_buffer("mask", torch.ones(4))
    else:
        model._modules["3"] = nn.Linear(4, 3)


@pytest.mark.parametrize(
    "how",
    [
        "the last child renamed",
        "a child moved to its sibling",
        "a leaf given a child",
        "a child deleted",
        "a parameter registered anew",
        "a buffer registered anew",
        "a child of another shape",
    ],
)
def test_module_tree_changed_through_modules_is_a_clear_error_before_any_change(how):
    model = layered()
    shadows = Shadows(model, 2, average_buffers=True, dtype=None, device=None)
    before = [copy.deepcopy(module.state_dict()) for module in shadows.modules]
    rearrange(model, how)
    with pytest.raises(ValueError, match="does not match the model this EMA was built for.*undo the change"):
        shadows.follow(model)
    for module, state in zip(shadows.modules, before):
        assert all(torch.equal(value, state[key]) for key, value in module.state_dict().items())


def tied() -> nn.Module:
    """A model whose state dict holds more than its tensors: a tied weight, a missing bias, no statistics."""
    model = nn.Module()
    model.enc, model.dec = nn.Linear(4, 4, bias=False), nn.Linear(4, 4)
    model.norm = nn.BatchNorm1d(4, track_running_stats=False)
    model.dec.weight = model.enc.weight
    return model


def operate(model: nn.Module, how: str) -> None:
    """Surgery that keeps every module's count of tensors, or the tensors' addresses."""
    weight = model.enc.weight
    if how == "a bias set where there was none":
        model.enc.bias = nn.Parameter(torch.zeros(4))
    elif how == "running statistics switched on":
        model.norm.running_mean = torch.zeros(4)
    elif how == "tied weights untied":
        model.dec.weight = nn.Parameter(weight.detach().clone())
    elif how == "weights tied anew":
        model.norm.weight = model.dec.bias
    elif how == "a module shared under a second name":
        model.again = model.dec
    elif how == "a weight sliced through .data":
        weight.data = weight.data[:2]  # the same address, another shape
    elif how == "a weight reshaped through .data":
        weight.data = weight.data.view(2, 8)
    else:
        weight.requires_grad_(False).resize_(2, 4)


@pytest.mark.parametrize(
    ("how", "problem"),
    [
        ("a bias set where there was none", r"unexpected \['enc.bias'\]"),
        ("running statistics switched on", r"unexpected \['norm.running_mean'\]"),
        ("tied weights untied", "tied differently: the model's dec.weight is its own tensor, the EMA"),
        ("weights tied anew", "tied differently: the model's norm.weight is the same tensor as dec.bias"),
        ("a module shared under a second name", r"unexpected \['again.weight', 'again.bias'\]"),
        ("a weight sliced through .data", r"shape mismatch \['enc.weight: \(2, 4\) vs \(4, 4\)'\]"),
        ("a weight reshaped through .data", r"shape mismatch \['enc.weight: \(2, 8\) vs \(4, 4\)'\]"),
        ("a weight resized in place", r"shape mismatch \['enc.weight: \(2, 4\) vs \(4, 4\)'\]"),
    ],
)
def test_surgery_on_the_state_dict_of_the_same_tensors_is_a_clear_error_before_any_change(how, problem):
    model = tied()
    shadows = Shadows(model, 1, average_buffers=True, dtype=None, device=None)
    before = copy.deepcopy(shadows.modules[0].state_dict())
    operate(model, how)
    with pytest.raises(ValueError, match=f"built for \\({problem}.*\\). An EMA averages one fixed set"):
        shadows.follow(model)
    assert all(torch.equal(value, before[key]) for key, value in shadows.modules[0].state_dict().items())
