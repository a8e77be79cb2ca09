"""ema_kit.kaggle (paths, datasets, augmentation, prediction, submissions) and ema_kit.models."""

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from ema_kit import kaggle
from ema_kit.data import write_digit_recognizer, write_image_folder
from ema_kit.kaggle import (
    ImageFolderDataset,
    PixelCSVDataset,
    RandomAffine,
    find_file,
    input_dir,
    predict,
    smoke,
    working_dir,
    write_submission,
)
from ema_kit.models import ResNet


@pytest.fixture
def no_kaggle(tmp_path, monkeypatch):
    monkeypatch.setenv(kaggle.ROOT_VARIABLE, str(tmp_path / "absent"))


@pytest.fixture
def fake_kaggle(tmp_path, monkeypatch):
    root = tmp_path / "kaggle"
    (root / "working").mkdir(parents=True)
    monkeypatch.setenv(kaggle.ROOT_VARIABLE, str(root))
    return root


@pytest.mark.parametrize(("value", "expected"), [(None, False), ("", False), ("0", False), ("1", True)])
def test_smoke_reads_the_environment_switch(monkeypatch, value, expected):
    monkeypatch.delenv(kaggle.SMOKE_VARIABLE, raising=False)
    if value is not None:
        monkeypatch.setenv(kaggle.SMOKE_VARIABLE, value)
    assert smoke() is expected


def test_input_dir_prefers_the_kaggle_input(fake_kaggle, tmp_path):
    (fake_kaggle / "input" / "digit-recognizer").mkdir(parents=True)
    made = []
    folder = input_dir("digit-recognizer", make=made.append, local=tmp_path)
    assert folder == fake_kaggle / "input" / "digit-recognizer"
    assert made == []


def test_input_dir_makes_local_files_once(no_kaggle, tmp_path):
    calls = []

    def make(folder):
        calls.append(folder)
        write_digit_recognizer(folder)

    first = input_dir("digit-recognizer", make=make, local=tmp_path)
    second = input_dir("digit-recognizer", make=make, local=tmp_path)
    assert first == second == tmp_path / "digit-recognizer" and len(calls) == 1
    assert not list(tmp_path.glob(".*partial"))


def test_input_dir_interrupted_make_leaves_no_folder(no_kaggle, tmp_path):
    def make(folder):
        folder.mkdir()
        (folder / "train.csv").write_text("half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        input_dir("digit-recognizer", make=make, local=tmp_path)
    assert not (tmp_path / "digit-recognizer").exists()
    folder = input_dir("digit-recognizer", make=write_digit_recognizer, local=tmp_path)
    assert (folder / "test.csv").is_file()


def test_input_dir_without_files_or_make_names_both_places(no_kaggle, tmp_path):
    with pytest.raises(FileNotFoundError, match="attach it to the Kaggle notebook"):
        input_dir("missing", local=tmp_path)


def test_working_dir_is_kaggle_working_there_and_a_run_folder_elsewhere(tmp_path, monkeypatch):
    monkeypatch.setenv(kaggle.ROOT_VARIABLE, str(tmp_path / "absent"))
    assert working_dir("02", local=tmp_path / "runs") == tmp_path / "runs" / "02"
    assert (tmp_path / "runs" / "02").is_dir()
    (tmp_path / "kaggle" / "working").mkdir(parents=True)
    monkeypatch.setenv(kaggle.ROOT_VARIABLE, str(tmp_path / "kaggle"))
    assert working_dir("02", local=tmp_path / "runs") == tmp_path / "kaggle" / "working"


def test_find_file_searches_inputs_then_working_then_local(fake_kaggle, tmp_path):
    local = tmp_path / "run"
    local.mkdir()
    (local / "model_ema.pth").write_bytes(b"local")
    assert find_file("model_ema.pth", inputs=["weights"], local=[local]) == local / "model_ema.pth"
    (fake_kaggle / "working" / "model_ema.pth").write_bytes(b"working")
    assert find_file("model_ema.pth", inputs=["weights"], local=[local]).read_bytes() == b"working"
    (fake_kaggle / "input" / "weights").mkdir(parents=True)
    (fake_kaggle / "input" / "weights" / "model_ema.pth").write_bytes(b"input")
    assert find_file("model_ema.pth", inputs=["weights"], local=[local]).read_bytes() == b"input"


def test_find_file_missing_lists_every_place_searched(fake_kaggle, tmp_path):
    with pytest.raises(FileNotFoundError, match="searched") as error:
        find_file("model_ema.pth", inputs=["weights"], local=[tmp_path / "run"])
    message = str(error.value)
    assert str(fake_kaggle / "input" / "weights") in message and str(tmp_path / "run") in message


def test_pixel_csv_dataset_reads_the_digit_recognizer_files(tmp_path):
    folder = write_digit_recognizer(tmp_path)
    frame = pd.read_csv(folder / "train.csv")
    image, label = PixelCSVDataset(frame)[3]
    assert image.shape == (1, 28, 28) and image.dtype == torch.float32
    expected = torch.tensor(frame.iloc[3, 1:].to_numpy(dtype="float32")).reshape(1, 28, 28) / 255
    torch.testing.assert_close(image, expected, rtol=0, atol=0)
    assert label.item() == frame.loc[3, "label"]
    test_image = PixelCSVDataset(pd.read_csv(folder / "test.csv"), label=None)[0]
    assert isinstance(test_image, torch.Tensor) and test_image.shape == (1, 28, 28)


def test_pixel_csv_dataset_missing_label_column_suggests_label_none():
    frame = pd.DataFrame([[0] * 4], columns=[f"pixel{i}" for i in range(4)])
    with pytest.raises(ValueError, match="label=None"):
        PixelCSVDataset(frame)


def test_pixel_csv_dataset_refuses_non_square_pixel_columns():
    frame = pd.DataFrame([[1, 0, 0, 0]], columns=["label", "pixel0", "pixel1", "pixel2"])
    with pytest.raises(ValueError, match="square"):
        PixelCSVDataset(frame)


def test_image_folder_dataset_reads_pngs_in_csv_order(tmp_path):
    from PIL import Image

    folder = write_image_folder(tmp_path, size=12)
    frame = pd.read_csv(folder / "train.csv")
    image, label = ImageFolderDataset(frame, folder / "train")[5]
    with Image.open(folder / "train" / f"{frame.loc[5, 'id']}.png") as file:
        expected = torch.tensor(np.array(file.convert("L")), dtype=torch.float32) / 255
    assert image.shape == (3, 12, 12)
    torch.testing.assert_close(image[0], expected, rtol=0, atol=0)
    assert label.item() == frame.loc[5, "label"]
    sample = pd.read_csv(folder / "sample_submission.csv")
    gray = ImageFolderDataset(sample, folder / "test", label=None, mode="L")
    assert gray[0].shape == (1, 12, 12)


def test_image_folder_dataset_missing_files_name_the_suffix(tmp_path):
    folder = write_image_folder(tmp_path, size=8)
    with pytest.raises(FileNotFoundError, match="suffix='.jpg'"):
        ImageFolderDataset(pd.read_csv(folder / "train.csv"), folder / "train", suffix=".jpg")


def test_random_affine_with_no_range_is_the_identity():
    image = torch.rand(3, 16, 16)
    torch.testing.assert_close(RandomAffine(degrees=0, translate=0, scale=0)(image), image, rtol=0, atol=1e-6)


def test_random_affine_moves_pixels_and_is_seeded():
    image = torch.zeros(1, 28, 28)
    image[0, 10:18, 10:18] = 1
    augment = RandomAffine(degrees=15, translate=0.1, scale=0.1)
    torch.manual_seed(1)
    first = augment(image)
    torch.manual_seed(1)
    assert torch.equal(augment(image), first) and not torch.allclose(first, image)


def test_random_affine_refuses_out_of_range_settings():
    with pytest.raises(ValueError, match="translate"):
        RandomAffine(translate=1.5)


def test_predict_returns_softmax_in_loader_order_and_restores_mode():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 4)).train()
    images = torch.randn(10, 1, 4, 4)
    loader = DataLoader(images, batch_size=3)
    probabilities = predict(model, loader)
    torch.testing.assert_close(probabilities, model(images).softmax(dim=1).detach())
    assert model.training


def test_predict_flip_tta_averages_the_mirror_image():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 4))
    images = torch.randn(6, 1, 4, 4)
    labels = torch.zeros(6, dtype=torch.int64)
    expected = (model(images).softmax(1) + model(images.flip(-1)).softmax(1)).detach() / 2
    torch.testing.assert_close(predict(model, DataLoader(list(zip(images, labels)), batch_size=4), tta=True),
                               expected)


def test_predict_empty_loader_is_an_error():
    with pytest.raises(ValueError, match="no batches"):
        predict(nn.Linear(2, 2), [])


def _sample(tmp_path):
    path = tmp_path / "sample_submission.csv"
    pd.DataFrame({"ImageId": [1, 2, 3], "Label": 0}).to_csv(path, index=False)
    return path


def test_write_submission_writes_what_matches_the_sample(tmp_path):
    frame = pd.DataFrame({"ImageId": [3, 1, 2], "Label": [4, 5, 6]})
    path = write_submission(frame, _sample(tmp_path), tmp_path / "submission.csv")
    pd.testing.assert_frame_equal(pd.read_csv(path), frame)


@pytest.mark.parametrize(
    ("frame", "match"),
    [
        (pd.DataFrame({"Label": [1, 2, 3], "ImageId": [1, 2, 3]}), "columns"),
        (pd.DataFrame({"ImageId": [1, 2], "Label": [1, 2]}), "2 rows but"),
        (pd.DataFrame({"ImageId": [1, 2, 2], "Label": [1, 2, 3]}), "each once"),
        (pd.DataFrame({"ImageId": [1, 2, 4], "Label": [1, 2, 3]}), "missing"),
        (pd.DataFrame({"ImageId": [1, 2, 3], "Label": [1, None, 3]}), "missing values"),
    ],
)
def test_write_submission_refuses_a_mismatch_and_keeps_the_old_file(tmp_path, frame, match):
    target = tmp_path / "submission.csv"
    target.write_text("previous")
    with pytest.raises(ValueError, match=match):
        write_submission(frame, _sample(tmp_path), target)
    assert target.read_text() == "previous"


def test_resnet_trains_on_digits_in_a_few_steps():
    from ema_kit.data import digits

    torch.manual_seed(0)
    images, labels = digits(16)
    model = ResNet(10, in_channels=1, width=8, stem_stride=2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for step in range(30):
        batch = slice(step * 32 % 1600, step * 32 % 1600 + 32)
        loss = nn.functional.cross_entropy(model(images[batch]), labels[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert sum(losses[-5:]) / 5 < 0.6 * sum(losses[:5]) / 5


def test_resnet_blocks_start_as_the_identity():
    model = ResNet(in_channels=3, width=8, blocks=(2, 1))
    block = model.stages[1]  # the second block of the first stage: no projection
    x = torch.rand(1, 8, 6, 6)
    torch.testing.assert_close(block(x), x)  # relu(0 + x) == x for x >= 0


@pytest.mark.parametrize(("argument", "value"), [("width", 0), ("stem_stride", True), ("blocks", ())])
def test_resnet_refuses_bad_settings(argument, value):
    with pytest.raises(ValueError, match=argument):
        ResNet(**{argument: value})
