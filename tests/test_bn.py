"""recompute_bn: the same statistics as swa_utils.update_bn, for every batch shape, with modes restored."""

import copy
import operator

import pytest
import torch
from helpers import small_cnn
from torch import nn
from torch.optim.swa_utils import update_bn

from ema_kit.bn import recompute_bn


def batches(count: int = 6, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    return [
        (
            torch.randn(8, 1, 8, 8, generator=generator) * 2 + 1,
            torch.randint(0, 10, (8,), generator=generator),
        )
        for _ in range(count)
    ]


def stats(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict().items() if "running" in k or "num_batches" in k}


def assert_same_stats(model: nn.Module, reference: nn.Module) -> None:
    ours, theirs = stats(model), stats(reference)
    assert ours.keys() == theirs.keys() and ours
    for key in theirs:
        torch.testing.assert_close(ours[key], theirs[key], rtol=0, atol=0, msg=key)


def trained_cnn() -> nn.Module:
    torch.manual_seed(0)
    model = small_cnn()
    model.train()
    for x, _ in batches(3, seed=1):  # running stats far from the reset values, so a reset must show
        model(x)
    return model


def test_statistics_match_update_bn_on_input_target_pairs():
    model, reference = trained_cnn(), trained_cnn()
    assert recompute_bn(model, batches()) == 6
    update_bn(batches(), reference)
    assert_same_stats(model, reference)


class FrozenNorms(nn.Sequential):
    """A model whose train() keeps its BatchNorm in eval mode, as fine-tuning code often does."""

    def train(self, mode: bool = True):
        super().train(mode)
        for module in self.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.eval()
        return self


def test_a_model_whose_train_keeps_batchnorm_frozen_has_its_statistics_measured_not_reset():
    model, reference = trained_cnn(), trained_cnn()
    frozen = FrozenNorms(*model).train()  # its BatchNorm in eval mode
    assert recompute_bn(frozen, batches()) == 6
    update_bn(batches(), reference)  # BatchNorm in train mode
    assert_same_stats(frozen, reference)
    assert not any(m.training for m in frozen.modules() if isinstance(m, nn.BatchNorm2d))


def test_a_bfloat16_model_averages_its_statistics_in_float32_over_a_long_pass_and_keeps_its_tensors():
    model = trained_cnn().to(torch.bfloat16)
    reference = copy.deepcopy(model).double()
    long_pass = batches(400)
    tensors = list(model.state_dict(keep_vars=True).values())
    recompute_bn(model, [(x.bfloat16(), y) for x, y in long_pass])
    update_bn([(x.double(), y) for x, y in long_pass], reference)
    for key, value in stats(reference).items():
        if value.is_floating_point():
            error = ((stats(model)[key].double() - value).abs() / value.abs().clamp_min(0.1)).max().item()
            assert error < 0.03, key  # a bfloat16 average drifted to 0.1-0.4 over such a pass
    assert all(map(operator.is_, model.state_dict(keep_vars=True).values(), tensors))
    assert {t.dtype for t in model.state_dict().values() if t.is_floating_point()} == {torch.bfloat16}


def test_dict_batches_with_target_key_give_the_same_statistics_as_pairs():
    reference = trained_cnn()
    update_bn(batches(), reference)
    model = trained_cnn()
    recompute_bn(model, [{"input": x, "labels": y} for x, y in batches()], target_key="labels")
    assert_same_stats(model, reference)


def test_a_bare_tensor_batch_is_refused_by_recompute_bns_name():
    with pytest.raises(ValueError, match=r"^recompute_bn expects each batch as \(inputs, targets\), got a"):
        recompute_bn(trained_cnn(), [x for x, _ in batches()])


def test_recompute_bn_runs_under_the_callers_autocast():
    seen = []
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    model[0].register_forward_hook(lambda module, inputs, output: seen.append(output.dtype))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        recompute_bn(model, [(torch.randn(8, 3), torch.zeros(8))])
    assert seen == [torch.bfloat16]  # as fit(amp="bf16", callbacks=[RecomputeEMABatchNorm()]) runs it


class TwoInputs(nn.Module):
    """A model called as model(a, b) or model(a=..., b=...), returning a tuple (which is not read)."""

    def __init__(self):
        super().__init__()
        self.cnn = small_cnn()

    def forward(self, a, b):
        return self.cnn(a + b), None


def test_tuple_inputs_are_spread_as_arguments_and_dict_inputs_as_keywords():
    torch.manual_seed(0)
    model = TwoInputs()
    reference = copy.deepcopy(model)
    update_bn([a + b for (a, b), _ in [((x, x * 0.5), y) for x, y in batches()]], reference.cnn)
    for loader in (
        [((x, x * 0.5), y) for x, y in batches()],
        [({"a": x, "b": x * 0.5}, y) for x, y in batches()],
    ):
        fresh = copy.deepcopy(model)
        recompute_bn(fresh, loader)
        assert_same_stats(fresh, reference)


def test_every_submodule_mode_and_momentum_come_back_as_they_were():
    model = trained_cnn().eval()
    model[4].train()  # a mixed-mode model: one BatchNorm in train mode, the rest in eval
    model[1].momentum = 0.3
    modes = [m.training for m in model.modules()]
    recompute_bn(model, batches())
    assert [m.training for m in model.modules()] == modes
    assert (model[1].momentum, model[4].momentum) == (0.3, 0.1)


def test_a_model_without_batchnorm_is_left_alone_and_the_loader_is_not_read():
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10), nn.LayerNorm(10))
    before = copy.deepcopy(model.state_dict())

    def loader():
        raise AssertionError("the loader was read")
        yield

    assert recompute_bn(model, loader()) == 0
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_a_failing_pass_puts_the_old_statistics_and_modes_back():
    model = trained_cnn().eval()
    before = {k: v.clone() for k, v in stats(model).items()}

    def loader():
        yield batches(1)[0]
        raise RuntimeError("disk gone")

    with pytest.raises(RuntimeError, match="disk gone"):
        recompute_bn(model, loader())
    assert all(torch.equal(before[k], v) for k, v in stats(model).items())
    assert not model.training and model[1].momentum == 0.1


def test_an_empty_loader_is_refused_and_changes_nothing():
    model = trained_cnn()
    before = {k: v.clone() for k, v in stats(model).items()}
    with pytest.raises(ValueError, match="empty loader"):
        recompute_bn(model, [])
    assert all(torch.equal(before[k], v) for k, v in stats(model).items())


def test_a_batch_of_three_items_is_refused_with_the_shapes_that_work():
    with pytest.raises(ValueError, match=r"\(inputs, targets\), got a tuple of 3 items"):
        recompute_bn(trained_cnn(), [(torch.zeros(2, 1, 8, 8), torch.zeros(2), torch.zeros(2))])


def test_model_ema_recompute_bn_recomputes_its_module_in_place():
    from ema_kit import ModelEMA

    model = trained_cnn()
    ema, reference = ModelEMA(model), trained_cnn()
    update_bn(batches(), reference)
    assert ema.recompute_bn(batches()) == 6
    assert_same_stats(ema.module, reference)
