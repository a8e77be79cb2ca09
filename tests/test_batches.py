"""The batch contract and the one loop over a loader (ema_kit/_batches.py)."""

import numpy as np
import pytest
import torch
from torch import nn

from ema_kit import evaluate
from ema_kit._batches import each_batch, rows


def pairs(count=3, size=4):
    return [(torch.ones(size, 3) * i, torch.zeros(size)) for i in range(count)]


def test_each_batch_calls_the_step_per_batch_without_gradients_and_counts_the_batches():
    model = nn.Linear(3, 2)
    seen = []

    def step(inputs, targets):
        seen.append((model(inputs).requires_grad, len(targets), model.training))

    count = each_batch(model, pairs(), step)
    assert count == 3 and seen == [(False, 4, False)] * 3


def test_each_batch_restores_every_submodules_mode_also_when_the_step_raises():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)).train()
    model[1].eval()

    def fail(inputs, targets):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        each_batch(model, pairs(), fail)
    assert model.training and model[0].training and not model[1].training


def test_train_mode_runs_the_model_in_train_mode():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)).eval()
    modes = []
    each_batch(model, pairs(), lambda x, y: modes.append(model[1].training), train=True)
    assert modes == [True] * 3 and not model.training


@pytest.mark.parametrize(("autocast", "outer", "expected"), [
    (torch.bfloat16, False, torch.bfloat16),
    (False, True, torch.float32),  # off means off, whatever the caller set
    (None, True, torch.bfloat16),  # None leaves the caller's autocast as it is
    (None, False, torch.float32),
])  # fmt: skip
def test_autocast_is_on_off_or_as_the_caller_has_it(autocast, outer, expected):
    model = nn.Linear(3, 2)
    dtypes = []
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=outer):
        each_batch(model, pairs(1), lambda x, y: dtypes.append(model(x).dtype), autocast=autocast)
    assert dtypes == [expected]


def test_batches_without_targets_give_the_step_their_inputs():
    model = nn.Linear(3, 2)
    seen = []
    batches = [torch.ones(2, 3), (torch.ones(5, 3),), {"x": torch.ones(1, 3), "id": torch.zeros(1)}]
    each_batch(model, batches, lambda x, y: seen.append((type(x).__name__, y)), targets=False,
               target_key="id")  # fmt: skip
    assert seen == [("Tensor", None), ("Tensor", None), ("dict", None)]


def test_a_batch_of_the_wrong_shape_names_the_caller():
    with pytest.raises(ValueError, match=r"^predict expects each batch as \(inputs, targets\), got a Tensor"):
        each_batch(nn.Linear(3, 2), [torch.ones(2, 3)], lambda x, y: None, caller="predict")
    with pytest.raises(ValueError, match=r"target_key='labels' \(recompute_bn takes it"):
        each_batch(nn.Linear(3, 2), [{"x": torch.ones(2, 3), "labels": 1}], lambda x, y: None,
                   caller="recompute_bn")  # fmt: skip


def test_a_dict_batch_for_a_model_without_those_keywords_keeps_torchs_error_and_says_why():
    batches = [{"image": torch.ones(4, 3), "label": torch.zeros(4)}]
    with pytest.raises(TypeError, match="unexpected keyword argument 'image'") as raised:
        evaluate(nn.Linear(3, 2), batches, target_key="label", loss_fn=lambda outputs, targets: outputs.sum())
    (note,) = raised.value.__notes__
    assert "model(**inputs)" in note and "(image, label) pairs" in note


IMAGES = [torch.zeros(3, 9, 9), torch.zeros(3, 5, 5)]  # a detection batch: a list of images, any size


@pytest.mark.parametrize(
    ("inputs", "targets", "count"),
    [
        (torch.ones(8, 3), torch.zeros(8), 8),
        (torch.ones(8, 3), (torch.zeros(8), torch.zeros(8, 4)), 8),  # multi-task targets: rows, not tasks
        (torch.ones(8, 3), [torch.zeros(3, 4), torch.zeros(5, 4)], 8),  # per-image tensors: the images count
        ({"input_ids": torch.ones(5, 7), "mask": torch.ones(5, 7)}, torch.zeros(5), 5),
        (IMAGES, [{"boxes": torch.zeros(1, 4)}, {"boxes": torch.zeros(1, 4)}], 2),  # 1 box each: 2 images
        (IMAGES, [{"boxes": torch.zeros(0, 4)}, {"boxes": torch.zeros(3, 4)}], 2),
        (IMAGES, [torch.zeros(1, 4), torch.zeros(3, 4)], 2),  # ragged per-image tensors
        (IMAGES, (torch.zeros(2), torch.zeros(2, 4)), 2),  # fields of one batch
        (["a cat", "a dog", "a cow"], torch.zeros(3), 3),  # raw text, labels
        (["a cat", "a dog", "a cow"], None, 3),  # raw text alone
        (IMAGES, [[1, 2, 3], [4, 5]], 2),  # token lists (CTC)
        (IMAGES, np.zeros(2), 2),  # numpy targets from a custom collate
        (torch.tensor(2.0), torch.tensor(1.0), 1),
        (torch.zeros(0, 3), torch.zeros(0), 0),
        ({"image": torch.zeros(6, 3), "label": torch.zeros(6)}, None, 6),  # a dict batch, whole
        ((torch.zeros(6, 3), torch.zeros(6), torch.ones(6)), None, 6),  # (inputs, targets, weights), whole
        ((torch.zeros(4, 3), torch.zeros(4), ["a.png", "b.png", "c.png", "d.png"]), None, 4),  # file names
        ({"id": ["a", "b", "c", "d"], "image": torch.zeros(4, 3)}, None, 4),  # a dict batch, a list first
        (torch.zeros(7, 4, 16), torch.zeros(4), 4),  # sequence-first inputs (T, B, ...): counted on targets
        ((torch.zeros(4, 3), torch.zeros(4, 2)), (torch.zeros(4), ["w", "x", "y", "z"]), 4),  # two inputs
    ],
)
def test_rows_counts_the_rows_of_a_batch(inputs, targets, count):
    assert rows(inputs, targets) == count
