"""ModelEMA with torch.compile (ema_kit/ema.py): a compiled model averaged and saved, the EMA compiled.

Inductor on the CPU, as in CI; ``fullgraph=True`` makes a graph break an error instead of a silent
fall back to eager, so these tests run compiled code.
"""

import copy

import pytest
import torch
from helpers import ReferenceEMA, max_error, small_cnn, train_steps

from ema_kit import ModelEMA
from ema_kit.files import load_weights


@pytest.mark.slow
def test_compiled_model_is_averaged_like_the_plain_one_and_saved_with_plain_keys(model, tmp_path):
    compiled = torch.compile(model, fullgraph=True)
    ema, reference = ModelEMA(compiled, decay=0.9, warmup=False), ReferenceEMA(model)
    train_steps(compiled, 3, lambda: (ema.update(compiled), reference.update(model, 0.9)))
    assert max_error(ema.module.state_dict(), reference.state) < 1e-6
    assert list(compiled.state_dict())[0].startswith("_orig_mod.")  # what a naive export would write

    for suffix in (".pth", ".safetensors"):
        weights = load_weights(ema.save(tmp_path / f"model_ema{suffix}"))
        assert sorted(weights) == sorted(model.state_dict())  # no "_orig_mod." prefix
        small_cnn().load_state_dict(weights, strict=True)
    assert list(ema.state_dict()["weights"]) == list(model.state_dict())


@pytest.mark.slow
def test_compiled_ema_module_evaluates_like_eager_and_sees_every_later_update(model):
    ema = ModelEMA(model, decay=0.9)
    train_steps(model, 2, lambda: ema.update(model))
    compiled_ema = torch.compile(ema.module, fullgraph=True)
    x = torch.randn(16, 1, 8, 8)

    def assert_compiled_matches_eager():
        with torch.no_grad():
            x_in = x.to(ema.module[0].weight.dtype)
            expected = ema.module(x_in)
            torch.testing.assert_close(compiled_ema(x_in), expected, rtol=1e-5, atol=1e-5)
            return expected

    before = assert_compiled_matches_eager()
    train_steps(model, 2, lambda: ema.update(model), seed=1)  # updated in place
    assert not torch.allclose(assert_compiled_matches_eager(), before)
    other, shadow = copy.deepcopy(model).double(), ema.module[0].weight.data_ptr()
    train_steps(other, 2, lambda: ema.update(other), seed=2)  # another model object, in float64: the
    assert ema.module[0].weight.data_ptr() != shadow  # EMA's tensors are laid out again, in new memory
    assert ema.module[0].weight.dtype == torch.float64
    assert_compiled_matches_eager()
