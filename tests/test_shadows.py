"""Shadows (ema_kit/_shadows.py): K shadow sets of one live model, against a float64 per-tensor formula."""

import pytest
import torch
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
