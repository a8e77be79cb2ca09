"""ModelEMA (ema_kit/ema.py) over generated arguments and models: it works, or it says what is wrong.

Every argument is drawn either from values that must work or from values that must be refused. With
only good values, ModelEMA must build, follow the float64 formula update after update, and save
weights that load back in both formats; with any bad value, it must raise a ValueError or TypeError
that names a bad argument, never an error from deep inside torch.
"""

import copy
import math
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from ema_kit import ModelEMA
from ema_kit.files import load_weights

FLOATS = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
# Generated layers may have zero-size weights (nn.Linear(0, 3)), which torch's initializers warn about.
pytestmark = pytest.mark.filterwarnings("ignore:Initializing zero-element tensors:UserWarning")

# -- arguments: (values that must work, values that must be refused) -------------------------------------

# Devices this machine lacks: no machine has a GPU 99, and CUDA or MPS only where they are missing.
MISSING_DEVICES = ["cuda:99"] + ([] if torch.cuda.is_available() else ["cuda", 0])
MISSING_DEVICES += [] if torch.backends.mps.is_available() else ["mps"]
ARGUMENTS = {
    "decay": (
        st.floats(0.0, 1.0, exclude_max=True) | st.just(0) | st.builds(np.float64, st.floats(0.0, 0.999)),
        st.floats(allow_nan=True, allow_infinity=True).filter(lambda x: not 0 <= x < 1)
        | st.sampled_from([True, False, None, "0.999", 1, -1, torch.tensor(0.9), [0.9]]),
    ),
    "warmup": (st.booleans(), st.sampled_from([0, 1, None, "yes", 1.0])),
    "update_after_step": (
        st.integers(0, 3),
        st.integers(max_value=-1) | st.sampled_from([True, 1.0, 2.5, None, "3", float("nan")]),
    ),
    "update_every": (
        st.integers(1, 3),
        st.integers(max_value=0) | st.sampled_from([True, 2.0, None, "2", float("inf")]),
    ),
    "buffers": (
        st.sampled_from(["average", "copy"]),
        st.sampled_from(["mean", "Average", "", None, 1, True]),
    ),
    "dtype": (
        st.sampled_from([None, *FLOATS, "float32", "float64"]),
        st.sampled_from([torch.int64, torch.bool, torch.complex64, "int64", "nope", "Tensor", 3, float]),
    ),
    "device": (
        st.sampled_from([None, "cpu", torch.device("cpu")]),
        st.sampled_from(["meta", "nope", "cpu:-1", 1.5, -1, [], *MISSING_DEVICES]),
    ),
    "skip_non_finite": (st.booleans(), st.sampled_from([0, 1, None, "no"])),
}


@st.composite
def arguments(draw, all_good: bool = False) -> tuple[dict, set]:
    """Keyword arguments for ModelEMA, and the names of those drawn from the bad values."""
    kwargs, bad = {}, set()
    for name, (good_values, bad_values) in ARGUMENTS.items():
        if not all_good and draw(st.integers(0, 4)) == 0:  # each argument bad one time in five
            kwargs[name] = draw(bad_values)
            bad.add(name)
        elif draw(st.booleans()):  # or left to its default
            kwargs[name] = draw(good_values)
    return kwargs, bad


# -- models ----------------------------------------------------------------------------------------------


LAYERS = ["linear", "conv", "batchnorm1d", "batchnorm2d", "embedding", "layernorm", "tied", "relu", "empty"]
HELD = ["scalar", "transposed", "strided", "frozen", "counter", "flag", "cache"]  # what Holder holds


class Holder(nn.Module):
    """Tensors that no standard layer has: a scalar, a strided view, a frozen one, odd buffers."""

    def __init__(self, kind: str, size: int, dtype: torch.dtype):
        super().__init__()
        if kind == "scalar":
            self.scale = nn.Parameter(torch.randn((), dtype=dtype))
        elif kind == "transposed":
            self.weight = nn.Parameter(torch.randn(size + 1, size, dtype=dtype).t())
        elif kind == "strided":  # not one dense block of memory
            self.weight = nn.Parameter(torch.randn(size + 1, 2 * size, dtype=dtype)[:, ::2])
        elif kind == "frozen":
            self.weight = nn.Parameter(torch.randn(size, dtype=dtype), requires_grad=False)
        elif kind == "counter":  # an integer buffer only
            self.register_buffer("count", torch.zeros(size, dtype=torch.int64))
        elif kind == "flag":
            self.register_buffer("flag", torch.zeros(size, dtype=torch.bool))
        else:  # a buffer that is not saved
            self.register_buffer("cache", torch.randn(size, dtype=dtype), persistent=False)


@st.composite
def layers(draw) -> nn.Module:
    dtype, n, m = draw(st.sampled_from(FLOATS)), draw(st.integers(0, 4)), draw(st.integers(1, 4))
    kind = draw(st.sampled_from(LAYERS + HELD))
    if kind == "linear":
        layer = nn.Linear(n, m, bias=draw(st.booleans()))
    elif kind == "conv":
        layer = nn.Conv2d(m, n + 1, draw(st.integers(1, 3)), bias=draw(st.booleans()))
        if draw(st.booleans()):
            layer.to(memory_format=torch.channels_last)
    elif kind in ("batchnorm1d", "batchnorm2d"):
        norm = nn.BatchNorm1d if kind == "batchnorm1d" else nn.BatchNorm2d
        layer = norm(m, affine=draw(st.booleans()), track_running_stats=draw(st.booleans()))
    elif kind == "embedding":
        layer = nn.Embedding(m, n)
    elif kind == "layernorm":
        layer = nn.LayerNorm(m, elementwise_affine=draw(st.booleans()))
    elif kind == "tied":  # a language-model head that shares the embedding's weight
        embed, head = nn.Embedding(m, n), nn.Linear(n, m, bias=False)
        head.weight = embed.weight
        layer = nn.Sequential(embed, head)
    elif kind == "relu":
        layer = nn.ReLU()
    elif kind == "empty":
        layer = nn.Sequential()
    else:
        return Holder(kind, m, dtype)
    return layer.to(dtype)


@st.composite
def models(draw) -> nn.Module:
    torch.manual_seed(draw(st.integers(0, 2**16)))
    return nn.Sequential(*draw(st.lists(layers(), max_size=4)))


def has_floats(model: nn.Module) -> bool:
    return any(t.is_floating_point() for t in model.state_dict().values())


# -- the reference -------------------------------------------------------------------------------------------


def unique_tensors(model: nn.Module) -> list[torch.Tensor]:
    seen = {}
    for tensor in [*model.parameters(), *model.buffers()]:
        seen.setdefault(id(tensor), tensor)
    return list(seen.values())


def perturb(model: nn.Module, generator: torch.Generator) -> None:
    """New live values, as training would make them (each shared tensor changed once)."""
    with torch.no_grad():
        for tensor in unique_tensors(model):
            if tensor.is_floating_point():
                tensor.add_(torch.randn(tensor.shape, generator=generator).to(tensor.dtype), alpha=0.5)
            elif tensor.dtype != torch.bool:
                tensor.add_(torch.randint(0, 3, tensor.shape, generator=generator))


class Reference:
    """The EMA schedule and formula in float64, key by key, from ModelEMA's documented settings."""

    def __init__(self, model: nn.Module, kwargs: dict):
        self.settings = dict(decay=0.999, update_after_step=0, update_every=1, buffers="average") | kwargs
        self.steps = 0
        self.state = {k: v.detach().to(torch.float64, copy=True) for k, v in self.live(model).items()}

    @staticmethod
    def live(model):
        return {k: v if v.is_floating_point() else v.detach().clone() for k, v in model.state_dict().items()}

    def update(self, model: nn.Module, decay: float) -> None:
        """One ``update`` call; ``decay`` is the one ModelEMA reports it will apply."""
        self.steps += 1
        after, every = self.settings["update_after_step"], self.settings["update_every"]
        if self.steps > after and (self.steps - after) % every:
            return  # not this step's turn
        if self.steps <= after:
            decay = 0.0  # copies until update_after_step
        parameters = {k for k, v in model.state_dict(keep_vars=True).items() if isinstance(v, nn.Parameter)}
        for key, value in self.live(model).items():
            averaged = key in parameters or self.settings["buffers"] == "average"
            if value.is_floating_point() and averaged:
                self.state[key] = decay * self.state[key] + (1 - decay) * value.detach().double()
            else:
                dtype = torch.float64 if value.is_floating_point() else value.dtype
                self.state[key] = value.detach().to(dtype, copy=True)  # never the live tensor itself


def assert_follows(ema: ModelEMA, reference: Reference, updates: int) -> None:
    state = ema.module.state_dict()
    assert state.keys() == reference.state.keys()
    for key, expected in reference.state.items():
        actual = state[key]
        if not actual.is_floating_point():
            assert torch.equal(actual, expected), key
            continue
        if actual.numel():  # rounding to the shadow's dtype, at most once per update and the copy
            tolerance = 4 * (updates + 1) * torch.finfo(actual.dtype).eps * (1 + expected.abs().max().item())
            error = (actual.double() - expected).abs().max().item()
            assert error <= tolerance, (key, actual.dtype, error, tolerance)


# -- the properties -----------------------------------------------------------------------------------------


def small_model() -> nn.Module:
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))


@settings(max_examples=200, deadline=None)
@given(drawn=arguments())
def test_every_argument_works_or_is_refused_by_name(drawn):
    kwargs, bad = drawn
    model = small_model()
    if not bad:
        ModelEMA(model, **kwargs).update(model)
        return
    with pytest.raises((ValueError, TypeError)) as error:
        ModelEMA(model, **kwargs)
    assert any(name in str(error.value) for name in bad), (bad, str(error.value))


@pytest.mark.parametrize("model", [None, "model", {}, [nn.Linear(2, 2)], torch.ones(2), nn.Linear])
def test_a_model_that_is_not_a_module_is_a_type_error_naming_it(model):
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        ModelEMA(model)
    ema = ModelEMA(small_model())
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        ema.update(model)
    assert ema.num_steps == 0


@settings(max_examples=150, deadline=None)
@given(model=models(), drawn=arguments(all_good=True), seed=st.integers(0, 2**16), updates=st.integers(1, 6))
def test_any_model_follows_the_float64_formula_and_saves_in_both_formats(model, drawn, seed, updates):
    kwargs, _ = drawn
    if not has_floats(model):
        with pytest.raises(ValueError, match="no floating-point parameters or buffers"):
            ModelEMA(model, **kwargs)
        return
    ema, reference = ModelEMA(model, **kwargs), Reference(model, kwargs)
    if not kwargs.get("warmup", True):
        assert ema.current_decay() == reference.settings["decay"] ** reference.settings["update_every"]
    generator = torch.Generator().manual_seed(seed)
    for _ in range(updates):
        perturb(model, generator)
        decay = ema.current_decay()
        assert 0 <= decay < 1 and not math.isnan(decay)
        ema.update(model)
        reference.update(model, decay)
    assert_follows(ema, reference, updates)

    with tempfile.TemporaryDirectory() as folder:
        for suffix in (".pth", ".safetensors"):
            weights = load_weights(ema.save(Path(folder) / f"ema{suffix}"))
            assert weights.keys() == ema.module.state_dict().keys()
            for key, value in ema.module.state_dict().items():
                assert torch.equal(weights[key], value), key
            ema.module.load_state_dict(weights, strict=True)


@settings(max_examples=100, deadline=None)
@given(model=models(), other=models())
def test_updating_from_a_model_of_another_shape_is_refused_and_keeps_the_ema(model, other):
    if not has_floats(model):
        return
    ema = ModelEMA(model)
    before = {key: value.clone() for key, value in ema.module.state_dict().items()}
    try:
        ema.update(other)
    except ValueError as error:
        assert "does not match the model this EMA was built for" in str(error)
        assert ema.num_steps == 0
        assert all(torch.equal(value, before[key]) for key, value in ema.module.state_dict().items())
    else:  # the same keys and shapes (two empty stacks, say): then it is a model the EMA can follow
        assert ema.num_steps == 1


def assert_same_state(state: dict, expected: dict) -> None:
    assert {k: v for k, v in state.items() if k != "weights"} == {
        k: v for k, v in expected.items() if k != "weights"
    }
    assert state["weights"].keys() == expected["weights"].keys()
    assert all(torch.equal(value, expected["weights"][key]) for key, value in state["weights"].items())


JUNK = [None, 2, "x", [], {}, 1.5, True, float("nan"), ["a"], torch.ones(2), torch.ones(4, 3).long()]
JUNK += [torch.ones(4, 3, device="meta")]  # what a file saved from a model built on "meta" holds


@settings(max_examples=150, deadline=None)
@given(junk=st.sampled_from(JUNK), data=st.data())
def test_a_damaged_state_loads_or_is_refused_before_anything_changes(junk, data):
    model = small_model()
    ema = ModelEMA(model, decay=0.9, update_every=2)
    for _ in range(3):
        perturb(model, torch.Generator().manual_seed(0))
        ema.update(model)
    before = ema.state_dict()
    state = copy.deepcopy(before)
    where = data.draw(st.sampled_from([*state, "a setting", "a weight"]), label="where")
    if where in ("a setting", "a weight"):
        part = state["settings" if where == "a setting" else "weights"]
        part[data.draw(st.sampled_from(sorted(part)), label="key")] = junk
    else:
        state[where] = junk
    try:
        ema.load_state_dict(state)
    except (ValueError, TypeError):
        assert_same_state(ema.state_dict(), before)
