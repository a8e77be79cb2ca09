"""evaluate (ema_kit/training/evaluate.py): scores streamed per batch, whole-set metrics, the default loss."""

import warnings

import numpy as np
import pytest
import torch
from helpers import small_cnn
from torch import nn

from ema_kit import LiveLog, fit
from ema_kit.training.evaluate import accuracy, cross_entropy, evaluate, metric_value, whole_set


def uneven_batches(sizes=(7, 16, 5, 16), classes=10, seed=0):
    """Real-shaped 8x8 images in batches of different sizes, so a plain mean of batch means would be off."""
    generator = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(n, 1, 8, 8, generator=generator), torch.randint(0, classes, (n,), generator=generator))
        for n in sizes
    ]


def all_at_once(model, batches):
    with torch.no_grad():
        outputs = torch.cat([model.eval()(x) for x, _ in batches]).double()
    return outputs, torch.cat([y for _, y in batches])


# -- streaming -------------------------------------------------------------------------------------------


def test_streamed_loss_and_mean_metrics_equal_the_all_at_once_computation_weighted_by_batch_size():
    torch.manual_seed(0)
    model, batches = small_cnn(), uneven_batches()

    def mse(outputs, targets):  # of the probabilities: a mean over rows
        return (outputs.softmax(1) - nn.functional.one_hot(targets, 10)).square().mean(1).mean()

    scores = evaluate(model, batches, metrics={"accuracy": accuracy, "mse": mse})
    outputs, targets = all_at_once(model, batches)
    correct = (outputs.argmax(1) == targets).sum().item()
    assert scores["accuracy"] == pytest.approx(correct / len(targets), rel=1e-15)
    assert scores["loss"] == pytest.approx(nn.functional.cross_entropy(outputs, targets).item(), rel=1e-6)
    assert scores["mse"] == pytest.approx(mse(outputs, targets).item(), rel=1e-6)


@pytest.mark.parametrize(
    "packed",
    [
        lambda labels, aux: (labels, aux),
        lambda labels, aux: [labels, aux],
        lambda labels, aux: {"labels": labels, "aux": aux},
    ],
    ids=["tuple", "list", "dict"],
)
def test_multi_task_targets_weigh_each_batch_by_its_rows_not_by_its_number_of_tasks(packed):
    torch.manual_seed(0)
    model, batches = small_cnn(), uneven_batches(sizes=(32, 32, 1))
    tasks = [(x, packed(y, y.float())) for x, y in batches]

    def labels_of(targets):
        return targets["labels"] if isinstance(targets, dict) else targets[0]

    scores = evaluate(
        model,
        tasks,
        loss_fn=lambda outputs, targets: nn.functional.cross_entropy(outputs, labels_of(targets)),
        metrics={"accuracy": lambda outputs, targets: accuracy(outputs, labels_of(targets))},
    )
    outputs, targets = all_at_once(model, batches)
    correct = (outputs.argmax(1) == targets).double().mean().item()
    assert scores["accuracy"] == pytest.approx(correct, rel=1e-15)
    assert scores["loss"] == pytest.approx(nn.functional.cross_entropy(outputs, targets).item(), rel=1e-6)


def test_with_one_hot_or_soft_targets_accuracy_counts_the_most_likely_class():
    torch.manual_seed(0)
    model, batches = small_cnn(), uneven_batches(sizes=(10, 16, 10))  # a batch as long as the classes
    soft = [(x, 0.9 * nn.functional.one_hot(y, 10).float() + 0.01) for x, y in batches]
    assert evaluate(model, soft)["accuracy"] == evaluate(model, batches)["accuracy"]
    one_hot = [(x, nn.functional.one_hot(y, 10)) for x, y in batches]  # integers
    metrics = {"accuracy": accuracy}
    assert evaluate(model, one_hot, loss_fn=lambda o, t: o.sum(), metrics=metrics)["accuracy"] == (
        evaluate(model, batches)["accuracy"]
    )


def test_accuracy_refuses_one_logit_per_row_naming_what_to_score_instead():
    with pytest.raises(ValueError, match=r"got \(4, 1\)\. For one logit per row, score \(\(outputs > 0\)"):
        accuracy(torch.zeros(4, 1), torch.zeros(4, 1))


@pytest.mark.parametrize("reduction", ["none", "per-image"])
def test_a_loss_fn_that_gives_one_loss_per_row_is_refused_naming_loss_fn_and_the_fix(reduction):
    def loss_fn(outputs, targets):
        losses = nn.functional.cross_entropy(outputs, targets, reduction="none")
        return losses if reduction == "none" else losses.tolist()

    got = "a tensor of shape \\(7,\\)" if reduction == "none" else "a list"
    with pytest.raises(ValueError, match=f"^loss_fn returned {got}: .* reduction='mean'"):
        evaluate(small_cnn(), uneven_batches(), loss_fn=loss_fn)


def test_segmentation_scores_stream_per_pixel_as_over_the_whole_set():
    torch.manual_seed(0)
    model = nn.Conv2d(3, 4, 3, padding=1)
    g = torch.Generator().manual_seed(1)
    images = [torch.randn(n, 3, 16, 16, generator=g) for n in (3, 8, 1)]
    batches = [(x, torch.randint(0, 4, (len(x), 16, 16), generator=g)) for x in images]
    scores = evaluate(model, batches)
    outputs, targets = all_at_once(model, batches)
    pixels = (outputs.argmax(1) == targets).double().mean().item()
    assert scores["accuracy"] == pytest.approx(pixels, rel=1e-15)
    assert scores["loss"] == pytest.approx(nn.functional.cross_entropy(outputs, targets).item(), rel=1e-6)


def test_a_batch_metric_sees_one_batch_and_a_whole_set_metric_all_of_them_once_on_the_cpu():
    seen = {"batch": [], "whole": []}

    def batch_metric(outputs, targets):
        seen["batch"].append((len(outputs), outputs.dtype))
        return 0.0

    def whole_metric(outputs, targets):
        seen["whole"].append((len(outputs), len(targets), outputs.device.type, outputs.dtype))
        return 1.0

    metrics = {"b": batch_metric, "w": whole_set(whole_metric)}
    scores = evaluate(small_cnn(), uneven_batches(), metrics=metrics)
    assert seen["batch"] == [(7, torch.float32), (16, torch.float32), (5, torch.float32), (16, torch.float32)]
    assert seen["whole"] == [(44, 44, "cpu", torch.float32)]
    assert list(scores) == ["loss", "b", "w"] and scores["w"] == 1.0


def test_a_whole_set_metric_scores_the_set_not_the_mean_of_its_batches():
    from sklearn.metrics import roc_auc_score

    torch.manual_seed(0)
    model = nn.Linear(4, 2)
    generator = torch.Generator().manual_seed(0)
    batches = [(torch.randn(6, 4, generator=generator), torch.tensor([0, 1] * 3)) for _ in range(4)]
    auc = lambda outputs, targets: roc_auc_score(targets, outputs[:, 1] - outputs[:, 0])  # noqa: E731
    scores = evaluate(model, batches, metrics={"batches": auc, "whole": whole_set(auc)})
    outputs, targets = all_at_once(model, batches)
    assert scores["whole"] == pytest.approx(auc(outputs, targets), rel=1e-12)
    assert scores["batches"] != pytest.approx(scores["whole"], rel=1e-3)


def test_a_well_known_whole_set_score_given_per_batch_warns_and_names_whole_set():
    with pytest.warns(UserWarning, match=r"metrics\['auc'\] is averaged over batches.*whole_set\(auc\)"):
        evaluate(small_cnn(), uneven_batches(), metrics={"auc": lambda outputs, targets: 0.5})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        evaluate(small_cnn(), uneven_batches(), metrics={"auc": whole_set(lambda outputs, targets: 0.5)})


def test_fit_warns_about_such_a_score_once_not_every_epoch():
    torch.manual_seed(0)
    model = small_cnn()
    loader = uneven_batches()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit(model, loader, loader, epochs=3, optimizer=torch.optim.SGD(model.parameters(), lr=0.01), ema=None,
            metrics={"auc": (lambda outputs, targets: 0.5)},
            callbacks=[LiveLog(progress="off", plot=False)])  # fmt: skip
    assert sum("is averaged over batches" in str(w.message) for w in caught) == 1


def test_whole_set_refuses_what_is_not_a_function():
    with pytest.raises(TypeError, match="whole_set takes a function"):
        whole_set("auc")


def test_a_metric_returning_a_one_element_numpy_array_counts_as_its_number():
    for value in (np.array([0.25]), np.array(0.25), np.float32(0.25), torch.tensor([0.25])):
        assert metric_value("m", value) == 0.25
    scores = evaluate(small_cnn(), uneven_batches(), metrics={"m": lambda outputs, targets: np.array([0.25])})
    assert scores["m"] == 0.25
    with pytest.raises(TypeError, match=r"metric 'm' returned ndarray.*one element"):
        metric_value("m", np.array([0.25, 0.5]))


def test_an_empty_batch_adds_nothing_to_the_scores():
    batches = uneven_batches()
    empty = (torch.zeros(0, 1, 8, 8), torch.zeros(0, dtype=torch.long))
    model = small_cnn()
    assert evaluate(model, [empty, *batches]) == evaluate(model, batches)


def test_the_models_modes_come_back_submodule_by_submodule():
    model = small_cnn().train()
    model[1].eval()  # a frozen BatchNorm in a model that trains
    evaluate(model, uneven_batches())
    assert model.training and not model[1].training and model[4].training


def test_a_batch_of_the_wrong_shape_names_evaluate():
    with pytest.raises(ValueError, match=r"^evaluate expects each batch as \(inputs, targets\), got a Tens"):
        evaluate(small_cnn(), [torch.zeros(2, 1, 8, 8)])


def test_bf16_autocast_scores_metrics_on_float32_outputs():
    seen = []
    scores = evaluate(small_cnn(), uneven_batches(), amp="bf16",
                      metrics={"m": lambda outputs, targets: seen.append(outputs.dtype) or 0.0})  # fmt: skip
    assert set(seen) == {torch.float32} and np.isfinite(scores["loss"])


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_on_the_gpu_batch_metrics_run_there_and_whole_set_metrics_on_the_cpu():
    seen = set()

    def where(name):
        return lambda outputs, targets: seen.add((name, outputs.device.type, targets.device.type)) or 0.0

    evaluate(small_cnn().cuda(), uneven_batches(), metrics={"b": where("b"), "w": whole_set(where("w"))})
    assert seen == {("b", "cuda", "cuda"), ("w", "cpu", "cpu")}


# -- the default loss ------------------------------------------------------------------------------------


def test_float_multi_label_targets_with_the_default_loss_are_refused_with_bce_and_a_metric():
    outputs, targets = torch.randn(4, 3), torch.tensor([[1.0, 0.0, 1.0]] * 4)
    with pytest.raises(ValueError, match=r"multi-label.*BCEWithLogitsLoss\(\).*metrics=\{'label_accuracy'"):
        cross_entropy(outputs, targets)


def test_soft_targets_whose_rows_sum_to_one_are_class_probabilities():
    probabilities = torch.tensor([0.2, 0.3, 0.5])  # one unbatched row too
    assert cross_entropy(torch.randn(3), probabilities).isfinite()
    outputs = torch.randn(4, 3)
    one_hot = nn.functional.one_hot(torch.tensor([0, 1, 2, 1]), 3).float()
    mixed = 0.7 * one_hot + 0.3 * one_hot.flip(0)  # mixup
    smoothed = one_hot * 0.9 + 0.1 / 3  # label smoothing
    for targets in (mixed, smoothed):
        assert torch.equal(cross_entropy(outputs, targets), nn.functional.cross_entropy(outputs, targets))


def test_a_one_output_head_with_float_targets_and_no_loss_fn_is_refused_naming_loss_fn():
    with pytest.raises(ValueError, match=r"one output per row.*loss_fn=torch.nn.BCEWithLogitsLoss\(\)"):
        cross_entropy(torch.randn(4, 1), torch.rand(4, 1))


@pytest.mark.parametrize("case", ["multi-label", "one output"])
def test_fit_refuses_those_targets_at_the_first_batch_before_any_weight_changes(case):
    torch.manual_seed(0)
    classes = 3 if case == "multi-label" else 1
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, classes))
    x = torch.randn(32, 1, 8, 8)
    y = (torch.rand(32, classes) > 0.5).float() if case == "multi-label" else torch.rand(32, 1)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8)
    before = [p.clone() for p in model.parameters()]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="loss_fn="):
        quiet = [LiveLog(progress="off")]
        fit(model, loader, loader, epochs=1, optimizer=optimizer, ema=None, callbacks=quiet)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
