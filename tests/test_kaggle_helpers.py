"""ema_kit.kaggle: paths in either mount layout, the pixel-CSV dataset, timm models with offline weights,
prediction and submissions. The timm tests need the Kaggle stack (marked kaggle_stack)."""

import re

import pandas as pd
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from ema_kit import kaggle
from ema_kit.examples.digits import write_digit_recognizer
from ema_kit.kaggle import (
    PixelCSVDataset,
    find_file,
    input_dir,
    inputs,
    predict,
    smoke,
    timm_model,
    working_dir,
    write_submission,
)


@pytest.fixture
def no_kaggle(tmp_path, monkeypatch):
    monkeypatch.setenv(inputs.ROOT_VARIABLE, str(tmp_path / "absent"))
    monkeypatch.delenv(inputs.RUN_TYPE_VARIABLE, raising=False)


@pytest.fixture
def fake_kaggle(tmp_path, monkeypatch):
    """An empty Kaggle root: input/ (nothing attached) and working/, run as "Save & Run All"."""
    root = tmp_path / "kaggle"
    (root / "input").mkdir(parents=True)
    (root / "working").mkdir()
    monkeypatch.setenv(inputs.ROOT_VARIABLE, str(root))
    monkeypatch.setenv(inputs.RUN_TYPE_VARIABLE, "Batch")
    return root


def attach(root, mount, files=("train.csv", "sample_submission.csv")):
    folder = root / "input" / mount
    folder.mkdir(parents=True)
    for name in files:
        (folder / name).write_text(mount)
    return folder


@pytest.mark.parametrize(("value", "expected"), [(None, False), ("", False), ("0", False), ("1", True)])
def test_smoke_reads_the_environment_switch(monkeypatch, value, expected):
    monkeypatch.delenv(inputs.SMOKE_VARIABLE, raising=False)
    if value is not None:
        monkeypatch.setenv(inputs.SMOKE_VARIABLE, value)
    assert smoke() is expected


def test_on_kaggle_when_its_input_folder_exists_or_kaggle_sets_the_run_type(tmp_path, monkeypatch):
    monkeypatch.delenv(inputs.RUN_TYPE_VARIABLE, raising=False)
    assert not kaggle.on_kaggle(root=tmp_path)
    monkeypatch.setenv(inputs.RUN_TYPE_VARIABLE, "Interactive")
    assert kaggle.on_kaggle(root=tmp_path)
    monkeypatch.delenv(inputs.RUN_TYPE_VARIABLE)
    (tmp_path / "input").mkdir()
    assert kaggle.on_kaggle(root=tmp_path)


def test_kaggle_root_argument_beats_the_environment_variable(tmp_path, monkeypatch):
    monkeypatch.setenv(inputs.ROOT_VARIABLE, str(tmp_path / "from-env"))
    assert kaggle.kaggle_root() == tmp_path / "from-env"
    assert kaggle.kaggle_root(tmp_path / "given") == tmp_path / "given"


@pytest.mark.parametrize(
    "mount",
    [
        "digit-recognizer",
        "competitions/digit-recognizer",
        "datasets/someone/digit-recognizer",
        "notebooks/someone/digit-recognizer",
    ],
)
def test_input_dir_finds_an_input_by_its_slug_in_either_layout(fake_kaggle, mount):
    folder = attach(fake_kaggle, mount)
    attach(fake_kaggle, "datasets/someone/a-copy")  # by its files alone, the input would be ambiguous
    assert input_dir("digit-recognizer") == folder
    assert input_dir("digit-recognizer", files=["train.csv"]) == folder


def test_input_dir_finds_an_input_mounted_under_another_slug_by_its_files(fake_kaggle):
    attach(fake_kaggle, "datasets/someone/ema-kit", files=["ema_kit-0.1.0-py3-none-any.whl"])
    folder = attach(fake_kaggle, "datasets/someone/my-digits-copy")
    assert input_dir("digit-recognizer", files=["train.csv", "sample_submission.csv"]) == folder


def test_input_dir_finds_the_files_one_folder_down_in_a_named_input(fake_kaggle):
    (fake_kaggle / "input" / "datasets" / "someone" / "digit-recognizer" / "README.md").parent.mkdir(
        parents=True
    )
    folder = attach(fake_kaggle, "datasets/someone/digit-recognizer/csv")
    assert input_dir("digit-recognizer", files=["train.csv"]) == folder


def test_input_dir_refuses_to_guess_between_two_inputs_holding_the_files(fake_kaggle):
    attach(fake_kaggle, "datasets/someone/copy-a")
    attach(fake_kaggle, "datasets/other/copy-b")
    with pytest.raises(
        FileNotFoundError, match=r"Several attached inputs hold train.csv: .*other/copy-b, .*someone/copy-a"
    ):
        input_dir("digit-recognizer", files=["train.csv"])


def test_input_dir_refuses_a_named_input_without_the_files_rather_than_read_another_holding_them(
    fake_kaggle, capsys
):
    named = attach(fake_kaggle, "competitions/digit-recognizer", files=["train.csv"])
    attach(fake_kaggle, "datasets/bob/mnist-as-csv")  # holds train.csv and sample_submission.csv
    with pytest.raises(FileNotFoundError, match=f"{named}: attached under the name asked for, but without "):
        input_dir("digit-recognizer", files=["train.csv", "sample_submission.csv"])
    named.rename(named.with_name("elsewhere"))  # now not attached under that name: found by its files
    folder = input_dir("digit-recognizer", files=["train.csv", "sample_submission.csv"])
    assert (
        folder.name == "mnist-as-csv" and "(attached under another name; it holds" in capsys.readouterr().out
    )


def test_input_dir_refuses_to_guess_between_two_inputs_attached_under_one_name(fake_kaggle):
    attach(fake_kaggle, "datasets/alice/ema-kit", files=["ema_kit-0.1.0-py3-none-any.whl"])
    attach(fake_kaggle, "datasets/zed/ema-kit", files=["ema_kit-0.1.0-py3-none-any.whl"])
    with pytest.raises(FileNotFoundError, match=r"Several attached inputs are named 'ema-kit': .*alice.*zed"):
        input_dir("ema-kit")


@pytest.mark.parametrize("name", ["", "*", "data-v[12]", "datasets/someone/x", ".."])
def test_an_input_name_that_is_no_slug_is_refused_not_matched_as_a_pattern(fake_kaggle, name):
    attach(fake_kaggle, "datasets/someone/data-v1")
    with pytest.raises(ValueError, match=f"name: {re.escape(repr(name))} is not an input's slug"):
        input_dir(name, files=["train.csv"])


def test_an_input_is_found_by_owner_and_slug_and_once_where_it_is_mounted_at_two_paths(fake_kaggle):
    mine = attach(fake_kaggle, "datasets/me/digits")
    attach(fake_kaggle, "datasets/someone/digits")
    assert input_dir("me/digits", files=["train.csv"]) == mine
    with pytest.raises(FileNotFoundError, match="Several attached inputs are named 'digits'"):
        input_dir("digits", files=["train.csv"])
    competition = attach(fake_kaggle, "competitions/digit-recognizer")
    (fake_kaggle / "input" / "digit-recognizer").symlink_to(competition)  # the classic path, too
    assert input_dir("digit-recognizer", files=["train.csv"]).resolve() == competition


def test_input_dir_on_kaggle_never_falls_back_and_names_what_to_attach(fake_kaggle, tmp_path):
    attach(fake_kaggle, "datasets/someone/ema-kit", files=["ema_kit-0.1.0-py3-none-any.whl"])
    attach(fake_kaggle, "competitions/titanic")
    made = []
    with pytest.raises(FileNotFoundError) as error:
        input_dir("digit-recognizer", files=["train.csv", "test.csv"], make=made.append, local=tmp_path / "d")
    message = str(error.value)
    assert "Input 'digit-recognizer' is not attached" in message and "search 'digit-recognizer'" in message
    assert "Attached under" in message and "competitions/titanic, datasets/someone/ema-kit." in message
    assert made == [] and not (tmp_path / "d").exists()


def test_input_dir_on_kaggle_without_an_input_folder_says_nothing_is_attached(tmp_path, monkeypatch):
    monkeypatch.setenv(inputs.RUN_TYPE_VARIABLE, "Batch")
    with pytest.raises(FileNotFoundError, match="input does not exist: nothing is attached"):
        input_dir("digit-recognizer", make=write_digit_recognizer, local=tmp_path, root=tmp_path / "kaggle")
    assert not (tmp_path / "digit-recognizer").exists()


def test_input_dir_makes_local_files_once_and_says_they_are_stand_ins(no_kaggle, tmp_path, capsys):
    calls = []

    def make(folder):
        calls.append(folder)
        write_digit_recognizer(folder)

    first = input_dir("digit-recognizer", make=make, local=tmp_path)
    second = input_dir("digit-recognizer", make=make, local=tmp_path)
    assert first == second == tmp_path / "digit-recognizer" and len(calls) == 1
    assert not list(tmp_path.glob(".*partial"))
    printed = capsys.readouterr().out.splitlines()
    assert "stand-in data, not the real files" in printed[0]
    assert printed[1].endswith("(not on Kaggle; stand-in data written by make=)")
    (first / inputs._STAND_IN_MARKER).unlink()  # as if the user had put the competition's files there
    input_dir("digit-recognizer", make=make, local=tmp_path)
    assert capsys.readouterr().out.endswith("(not on Kaggle)\n") and len(calls) == 1


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


def test_input_dir_off_kaggle_without_files_or_make_says_how_to_get_them(no_kaggle, tmp_path):
    with pytest.raises(FileNotFoundError, match="kaggle competitions download -c missing"):
        input_dir("missing", local=tmp_path)


def test_input_dir_refuses_a_single_string_for_files(fake_kaggle):
    with pytest.raises(TypeError, match="files must be a list of names"):
        input_dir("digit-recognizer", files="train.csv")


def test_working_dir_is_kaggle_working_there_and_a_run_folder_elsewhere(tmp_path, no_kaggle, monkeypatch):
    assert working_dir("02", local=tmp_path / "runs") == tmp_path / "runs" / "02"
    assert (tmp_path / "runs" / "02").is_dir()
    monkeypatch.setenv(inputs.RUN_TYPE_VARIABLE, "Batch")
    assert (
        working_dir("02", local=tmp_path / "runs", root=tmp_path / "kaggle")
        == tmp_path / "kaggle" / "working"
    )


def test_find_file_on_kaggle_reads_the_named_input_then_any_holding_it_then_working(fake_kaggle):
    (fake_kaggle / "working" / "model_ema.pth").write_bytes(b"working")
    assert find_file("model_ema.pth", inputs=["weights"]).read_bytes() == b"working"
    other = attach(fake_kaggle, "notebooks/someone/renamed-run", files=["model_ema.pth"])
    assert find_file("model_ema.pth", inputs=["weights"]) == other / "model_ema.pth"
    named = attach(fake_kaggle, "weights", files=["model_ema.pth"])
    assert find_file("model_ema.pth", inputs=["weights"]) == named / "model_ema.pth"


def test_find_file_on_kaggle_never_reads_a_local_run(fake_kaggle, tmp_path):
    attach(fake_kaggle, "datasets/someone/ema-kit", files=["ema_kit-0.1.0-py3-none-any.whl"])
    local = tmp_path / "run"
    local.mkdir()
    (local / "model_ema.pth").write_bytes(b"local")
    with pytest.raises(FileNotFoundError) as error:
        find_file("model_ema.pth", inputs=["weights"], local=[local])
    message = str(error.value)
    assert (
        "Attach 'weights'" in message
        and "Attached under" in message
        and "datasets/someone/ema-kit" in message
    )


@pytest.mark.parametrize(
    "mount",
    [
        "timm-resnet18/pytorch/default/1",  # a Kaggle Model: <slug>/<framework>/<variation>/<version>
        "models/someone/timm-resnet18/pytorch/default/1",  # today's: models/<owner>/<slug>/...
        "datasets/someone/timm-resnet18",  # the weights uploaded as a dataset
    ],
)
def test_find_file_reads_pretrained_weights_from_a_model_or_dataset_in_either_layout(fake_kaggle, mount):
    folder = attach(fake_kaggle, mount, files=["model.safetensors"])
    attach(fake_kaggle, "datasets/someone/other-weights", files=["model.safetensors"])  # by the file: a guess
    assert find_file("model.safetensors", inputs=["timm-resnet18"]) == folder / "model.safetensors"


def test_find_file_on_kaggle_names_pretrained_weights_that_are_not_attached(fake_kaggle):
    attach(fake_kaggle, "competitions/aptos2019-blindness-detection")
    with pytest.raises(FileNotFoundError) as error:
        find_file("model.safetensors", inputs=["timm-resnet18"])
    assert "model.safetensors is in no input attached" in str(error.value)
    assert "Attach 'timm-resnet18'" in str(error.value)


def test_find_file_off_kaggle_searches_the_local_folders_in_order(no_kaggle, tmp_path):
    first, second = tmp_path / "a", tmp_path / "b"
    second.mkdir()
    (second / "model_ema.pth").write_bytes(b"b")
    assert find_file("model_ema.pth", inputs=["weights"], local=[first, second]) == second / "model_ema.pth"
    with pytest.raises(FileNotFoundError, match="searched") as error:
        find_file("missing.pth", local=[first, second])
    assert str(first / "missing.pth") in str(error.value) and str(second / "missing.pth") in str(error.value)


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


@pytest.mark.kaggle_stack
def test_pixel_csv_dataset_feeds_torchvision_transforms(tmp_path):
    from torchvision.transforms import v2

    frame = pd.read_csv(write_digit_recognizer(tmp_path) / "train.csv", nrows=8)
    to_model = v2.Compose([v2.RGB(), v2.Resize(32), v2.Normalize([0.5] * 3, [0.25] * 3)])
    images, labels = next(iter(DataLoader(PixelCSVDataset(frame, transform=to_model), batch_size=8)))
    assert images.shape == (8, 3, 32, 32) and labels.tolist() == frame["label"].tolist()
    plain = PixelCSVDataset(frame)[0][0]
    resized = nn.functional.interpolate(plain[None], size=32, mode="bilinear", antialias=True)[0]
    torch.testing.assert_close(images[0], ((resized - 0.5) / 0.25).expand(3, -1, -1), atol=1e-5, rtol=0)


# -- timm models, pretrained weights read from a file (the Kaggle stack) ---------------------------------


def _timm_weights(path, name, **options):
    """A weights file as timm's pages publish them (ImageNet's 1000 classes), from a random init."""
    import timm
    from safetensors.torch import save_file

    state = timm.create_model(name, **options).state_dict()
    save_file({key: value.contiguous() for key, value in state.items()}, path)
    return state


@pytest.mark.kaggle_stack
@pytest.mark.parametrize(("name", "fixed"), [("resnet18", False), ("convnext_atto", False),
                                             ("vit_tiny_patch16_224", True)])  # fmt: skip
def test_timm_model_builds_any_architecture_by_name_for_the_image_size(name, fixed):
    model = timm_model(name, num_classes=5, img_size=48)
    assert model(torch.zeros(2, 3, 48, 48)).shape == (2, 5)
    if fixed:  # a ViT is built for the size it is given: patch grid and position embeddings
        assert model.patch_embed.img_size == (48, 48) and model.pos_embed.shape[1] == 1 + 3 * 3
    else:  # a CNN takes any size
        assert model(torch.zeros(1, 3, 64, 64)).shape == (1, 5)


@pytest.mark.kaggle_stack
def test_timm_model_reads_every_weight_but_the_classifier_from_the_file_and_adapts_the_first_layer(tmp_path):
    state = _timm_weights(tmp_path / "model.safetensors", "resnet18")
    model = timm_model("resnet18", num_classes=7, in_chans=1, pretrained=tmp_path / "model.safetensors")
    loaded = model.state_dict()
    assert loaded["fc.weight"].shape == (7, 512)  # a new classifier for 7 classes
    torch.testing.assert_close(loaded["conv1.weight"], state["conv1.weight"].sum(1, keepdim=True))  # gray
    same = [key for key in loaded if not key.startswith(("fc.", "conv1."))]
    assert len(same) > 100 and all(torch.equal(loaded[key], state[key]) for key in same)


@pytest.mark.kaggle_stack
def test_timm_model_resizes_a_vits_position_embeddings_to_the_image_size(tmp_path):
    state = _timm_weights(tmp_path / "vit.safetensors", "vit_tiny_patch16_224")  # 224 pixels: 14 x 14 patches
    path = tmp_path / "vit.safetensors"
    model = timm_model("vit_tiny_patch16_224", num_classes=5, img_size=32, pretrained=path)
    assert state["pos_embed"].shape == (1, 1 + 14 * 14, 192) and model.pos_embed.shape == (1, 1 + 2 * 2, 192)
    assert torch.equal(model.blocks[3].attn.qkv.weight, state["blocks.3.attn.qkv.weight"])
    assert model(torch.zeros(1, 3, 32, 32)).shape == (1, 5)


@pytest.mark.kaggle_stack
def test_timm_model_from_a_file_is_timms_model_and_draws_as_many_random_numbers(tmp_path):
    import timm

    _timm_weights(tmp_path / "model.safetensors", "resnet18")
    torch.manual_seed(3)
    ours = timm_model("resnet18", num_classes=4, pretrained=tmp_path / "model.safetensors")
    after_ours = torch.rand(3)
    torch.manual_seed(3)
    overlay = dict(file=str(tmp_path / "model.safetensors"), custom_load=False)
    timms = timm.create_model("resnet18", num_classes=4, pretrained=True, pretrained_cfg_overlay=overlay)
    assert torch.equal(torch.rand(3), after_ours)  # the check's second build drew from a fork
    assert all(torch.equal(a, b) for a, b in zip(ours.state_dict().values(), timms.state_dict().values()))


@pytest.mark.kaggle_stack
@pytest.mark.parametrize("file", ["another architecture", "other names"])
def test_timm_model_refuses_a_file_that_leaves_weights_at_random_and_names_them(tmp_path, file):
    from safetensors.torch import save_file

    path = tmp_path / "model.safetensors"
    state = _timm_weights(path, "resnet18")
    if file == "other names":  # e.g. saved from a wrapper module: backbone.conv1.weight, ...
        save_file({f"backbone.{key}": value.contiguous() for key, value in state.items()}, path)
        name, left = "resnet18", "conv1.weight"
    else:  # resnet34 has the blocks resnet18 lacks
        name, left = "resnet34", "layer1.2.conv1.weight"
    expected = rf"left \d+ of {name}'s weights at their random start \(e.g. {left}"
    with pytest.raises(ValueError, match=expected):
        timm_model(name, num_classes=3, pretrained=path)


@pytest.mark.kaggle_stack
def test_timm_model_missing_weights_file_is_an_error_not_a_random_init(tmp_path):
    with pytest.raises(FileNotFoundError, match="is not a file: pass the weights file's path"):
        timm_model("resnet18", num_classes=3, pretrained=tmp_path / "model.safetensors")


@pytest.mark.kaggle_stack
@pytest.mark.parametrize("value", [True, False])
def test_timm_model_refuses_timms_pretrained_flag_which_would_download(value):
    with pytest.raises(TypeError, match=rf"the path of a weights file, or None .*got {value}"):
        timm_model("resnet18", num_classes=3, pretrained=value)


def test_predict_returns_softmax_in_loader_order_and_restores_mode():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 4)).train()
    images = torch.randn(10, 1, 4, 4)
    loader = DataLoader(images, batch_size=3)
    probabilities = predict(model, loader)
    torch.testing.assert_close(probabilities, model(images).softmax(dim=1).detach())
    assert model.training


def test_predict_builds_no_graph():
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
    assert not predict(model, [torch.zeros(5, 1, 2, 2)]).requires_grad


def test_predict_flip_tta_averages_the_mirror_image():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 4))
    images = torch.randn(6, 1, 4, 4)
    labels = torch.zeros(6, dtype=torch.int64)
    expected = (model(images).softmax(1) + model(images.flip(-1)).softmax(1)).detach() / 2
    torch.testing.assert_close(
        predict(model, DataLoader(list(zip(images, labels)), batch_size=4), tta=True), expected
    )


class TwoHeads(nn.Module):
    """A model with keyword inputs that returns a dict, as HuggingFace-style models do."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(4, 3)

    def forward(self, pixels, scale):
        return {"logits": self.linear(pixels) * scale, "features": pixels}


def test_predict_takes_the_batches_and_outputs_fit_takes():
    torch.manual_seed(0)
    model = TwoHeads()
    pixels = torch.randn(5, 4)
    expected = model(pixels, 2.0)["logits"].softmax(1).detach()
    dict_batches = [{"pixels": pixels, "scale": 2.0, "labels": torch.zeros(5)}]
    predicted = predict(model, dict_batches, target_key="labels", output_key="logits")
    torch.testing.assert_close(predicted, expected)
    tuple_inputs = [((pixels, 2.0), torch.zeros(5))]
    torch.testing.assert_close(predict(model, tuple_inputs, output_key="logits"), expected)
    with pytest.raises(ValueError, match="output_key"):
        predict(model, tuple_inputs)
    with pytest.raises(ValueError, match="tta=True mirrors image tensors"):
        predict(model, tuple_inputs, output_key="logits", tta=True)


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
        (
            pd.DataFrame({"ImageId": [1, 2, 3], "Label": [0.5, float("inf"), 0.1]}),
            r"Inf in column\(s\) \['Label'\]",
        ),
    ],
)
def test_write_submission_refuses_a_mismatch_and_keeps_the_old_file(tmp_path, frame, match):
    target = tmp_path / "submission.csv"
    target.write_text("previous")
    with pytest.raises(ValueError, match=match):
        write_submission(frame, _sample(tmp_path), target)
    assert target.read_text() == "previous"


def test_write_submission_compares_ids_as_the_sample_writes_them(tmp_path):
    sample = tmp_path / "sample_submission.csv"
    sample.write_text("id,target\n0001,0\n0002,0\nNA,0\n")  # zero-padded ids, and an id "NA"
    read = pd.read_csv(sample)  # pandas' guess: 1, 2, NaN
    with pytest.raises(ValueError, match=r"3 are missing .*dtype=\{'id': str\}, keep_default_na=False"):
        write_submission(read.assign(target=0.5), sample, tmp_path / "submission.csv")
    as_text = pd.read_csv(sample, dtype={"id": str}, keep_default_na=False)
    path = write_submission(as_text.assign(target=0.5), sample, tmp_path / "submission.csv")
    assert path.read_text().splitlines() == ["id,target", "0001,0.5", "0002,0.5", "NA,0.5"]


def test_write_submission_takes_an_empty_answer_as_an_answer(tmp_path):
    sample = tmp_path / "sample_submission.csv"
    sample.write_text("ImageId,EncodedPixels\na,1 2\nb,1 2\n")
    frame = pd.DataFrame({"ImageId": ["a", "b"], "EncodedPixels": ["3 4", ""]})  # b: no object
    path = write_submission(frame, sample, tmp_path / "submission.csv")
    assert path.read_text().splitlines() == ["ImageId,EncodedPixels", "a,3 4", "b,"]
