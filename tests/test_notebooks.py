"""The notebooks, executed at smoke sizes: in order on local folders, and as Kaggle runs them.

``EMA_KIT_SMOKE=1`` only shrinks epochs, rows and image sizes, so these run the code a user runs. The
notebooks are copied to a temporary folder first, so their data and runs/ folders land there, not in the
checkout. The Kaggle runs execute in a kernel that cannot import an installed ema_kit (a virtual
environment that sees every package here but ema_kit), as "Save & Run All" does, against a temporary
folder laid out like ``/kaggle``: ema_kit comes from the attached ema-kit dataset, as on Kaggle. A test
that runs a notebook with other settings (another timm model, pretrained weights) sets them as papermill
does: a cell after the one tagged "parameters".

Notebooks 02-04 build on torchvision and timm, as a Kaggle kernel has them: their tests are marked
kaggle_stack (the Kaggle-stack tier runs them; the light tier skips them).
"""

import importlib.util
import io
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import nbformat
import pandas as pd
import pytest
import torch
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

from ema_kit.examples.digits import write_digit_recognizer, write_image_folder

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = REPO / "notebooks"
_spec = importlib.util.spec_from_file_location("kaggle_build", REPO / "kaggle" / "build.py")
build = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(build)

# Smaller than the built-in stand-in's 539 test rows: a notebook that fell back to those fails the check.
TEST_ROWS = 180
KAGGLE_NOTEBOOKS = ["02_kaggle_digit_recognizer", "03_image_folder_classification", "04_inference_submission"]


def _without_kaggle(env: dict) -> dict:
    return {name: value for name, value in env.items() if not name.startswith("KAGGLE_")}


def _nbmake(notebooks: list[Path], cwd: Path, **env: str) -> None:
    """Run the notebooks with nbmake, in the order given, in one pytest process; fail with its output."""
    command = [sys.executable, "-m", "pytest", "--nbmake", "--nbmake-timeout=600", "-q",
               "-p", "no:cacheprovider", "--rootdir", str(cwd), *map(str, notebooks)]  # fmt: skip
    result = subprocess.run(command, cwd=cwd, env=_without_kaggle(os.environ) | {"EMA_KIT_SMOKE": "1"} | env,
                            capture_output=True, text=True)  # fmt: skip
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]


def _copy(names: list[str], folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    return [Path(shutil.copy(NOTEBOOKS / f"{name}.ipynb", folder)) for name in names]


def _first_code_cell(name: str) -> str:
    notebook = json.loads((NOTEBOOKS / f"{name}.ipynb").read_text())
    return "".join(next(cell for cell in notebook["cells"] if cell["cell_type"] == "code")["source"])


def _with_parameters(notebook: nbformat.NotebookNode, **values) -> nbformat.NotebookNode:
    """Papermill's way: a cell setting ``values`` right after the one cell tagged "parameters"."""
    tagged = [i for i, cell in enumerate(notebook.cells) if "parameters" in cell.metadata.get("tags", [])]
    assert len(tagged) == 1, f"one cell tagged 'parameters' expected, found {len(tagged)}"
    source = "\n".join(f"{name} = {value!r}" for name, value in values.items())
    cell = nbformat.v4.new_code_cell(source, metadata={"tags": ["injected-parameters"]})
    notebook.cells.insert(tagged[0] + 1, cell)
    return notebook


# -- the first cell: ema_kit from the attached dataset, wherever it is mounted --------------------


def _stand_in_wheel(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "ema_kit-9.9.9-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as wheel:
        wheel.writestr("ema_kit/__init__.py", '__version__ = "9.9.9"\n')
    return path


def _run_first_cell(tmp_path: Path) -> subprocess.CompletedProcess:
    """The notebooks' first cell, then ``import ema_kit``, in an interpreter without site-packages."""
    code = _first_code_cell("01_quickstart") + "\nimport ema_kit\nprint(ema_kit.__version__)\n"
    env = {name: value for name, value in os.environ.items() if name != "PYTHONPATH"}
    env["EMA_KIT_KAGGLE_ROOT"] = str(tmp_path / "kaggle")
    command = [sys.executable, "-S", "-c", code]
    return subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=60, env=env)


def test_every_notebook_starts_with_the_same_cell_that_finds_the_ema_kit_dataset():
    names = sorted(path.stem for path in NOTEBOOKS.glob("*.ipynb"))
    cells = {name: _first_code_cell(name) for name in names}
    assert len(names) == 7 and len(set(cells.values())) == 1, cells
    assert "kaggle_input.glob" in cells[names[0]]


@pytest.mark.parametrize(
    "mount",
    [
        "ema-kit",
        "datasets/someone/ema-kit",
        "datasets/someone/my-copy-of-ema-kit",
    ],
)
def test_first_cell_imports_ema_kit_from_the_dataset_wheel_in_either_layout(tmp_path, mount):
    found = _stand_in_wheel(tmp_path / "kaggle" / "input" / mount)
    result = _run_first_cell(tmp_path)
    assert result.stdout.splitlines() == [f"ema_kit from {found}", "9.9.9"], result.stderr


def test_docs_kaggle_page_shows_the_first_cell_as_it_is():
    code = [line for line in _first_code_cell("01_quickstart").splitlines() if line and line[0] != "#"]
    page = (REPO / "docs" / "kaggle.md").read_text(encoding="utf-8").splitlines()
    assert [line for line in code if line not in page] == []


def test_first_cell_does_nothing_where_no_dataset_is_attached(tmp_path):
    (tmp_path / "kaggle" / "input" / "competitions" / "digit-recognizer").mkdir(parents=True)
    result = _run_first_cell(tmp_path)
    assert result.stdout == "" and "No module named 'ema_kit'" in result.stderr


def test_the_kaggle_notebooks_have_one_parameters_cell_for_every_knob():
    for name in KAGGLE_NOTEBOOKS:
        notebook = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
        tagged = [cell for cell in notebook.cells if "parameters" in cell.metadata.get("tags", [])]
        assert len(tagged) == 1, name
        knobs = [line.split(" = ")[0] for line in tagged[0].source.splitlines() if " = " in line]
        assert all(knob.isupper() for knob in knobs), (name, knobs)  # plain settings, nothing computed


# -- off Kaggle: every notebook, in order, on built-in stand-in data ------------------------------


@pytest.mark.slow
def test_the_torch_only_notebooks_run_in_order_at_smoke_size(tmp_path):
    names = sorted(path.stem for path in NOTEBOOKS.glob("*.ipynb") if path.stem not in KAGGLE_NOTEBOOKS)
    assert names == ["01_quickstart", "05_choose_ema_after_training", "06_ema_extras", "07_all_gpus"]
    _nbmake(_copy(names, tmp_path), tmp_path, EMA_KIT_KAGGLE_ROOT=str(tmp_path / "no-kaggle-here"))
    assert (tmp_path / "runs" / "01_quickstart" / "model_ema.pth").is_file()
    figures = sorted(path.name for path in (tmp_path / "runs" / "06_ema_extras").iterdir())
    assert figures == ["bn_refresh.png", "half_life.png", "lowp_shadow.png", "switch_ema.png"]
    assert (
        "EMA weights identical on all 1 processes: True"
        in (tmp_path / "runs" / "07_all_gpus" / "launch.log").read_text()
    )


class _RecordingClient(NotebookClient):
    """Keeps every image a cell displays or updates in place (the saved notebook keeps only the last)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.images: list[tuple[int, str, str]] = []  # (cell index, message type, PNG in base64)

    def process_message(self, msg, cell, cell_index):
        png = msg["content"].get("data", {}).get("image/png")
        if png and msg["msg_type"] in ("display_data", "update_display_data"):
            self.images.append((cell_index, msg["msg_type"], png))
        return super().process_message(msg, cell, cell_index)


@pytest.mark.slow
def test_notebook_07_trains_on_two_processes_while_the_next_cell_watches_live(tmp_path):
    notebook = _with_parameters(nbformat.read(NOTEBOOKS / "07_all_gpus.ipynb", as_version=4), PROCESSES=2)
    notebook.cells.append(nbformat.v4.new_code_cell("print(history.to_json())"))  # the table watch returned
    env = _without_kaggle(os.environ) | {"EMA_KIT_SMOKE": "1", "EMA_KIT_KAGGLE_ROOT": str(tmp_path / "none")}
    client = _RecordingClient(
        notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": tmp_path}}
    )
    client.execute(env=env)
    watching = next(i for i, cell in enumerate(notebook.cells) if cell.source.startswith("history = watch("))
    outputs = notebook.cells[watching].outputs
    run = tmp_path / "runs" / "07_all_gpus"
    logged = pd.read_csv(run / "history.csv")
    # One image in the saved notebook, redrawn in place with every epoch: three different pictures.
    assert sum("image/png" in output.get("data", {}) for output in outputs) == 1
    shown = [png for index, kind, png in client.images if index == watching]
    assert len(shown) == len(logged) == 3 and len(set(shown)) == 3
    assert [kind for index, kind, _ in client.images if index == watching][1:] == ["update_display_data"] * 2
    table = pd.read_json(io.StringIO(notebook.cells[-1].outputs[0]["text"]))
    pd.testing.assert_frame_equal(table, logged)
    said = "".join(output.get("text", "") for cell in notebook.cells for output in cell.get("outputs", []))
    assert "Started torchrun with 2 processes (on the CPU, over gloo)" in said
    assert "EMA weights identical on all 2 processes: True" in said
    assert f"The run in {Path('runs') / '07_all_gpus'} finished: 3 of 3 epochs." in said
    ema = torch.load(run / "model_ema.pth", weights_only=True)
    assert all(torch.isfinite(value.float()).all() for value in ema.values())


@pytest.mark.slow
@pytest.mark.kaggle_stack
def test_the_kaggle_notebooks_run_in_order_at_smoke_size(tmp_path):
    _nbmake(_copy(KAGGLE_NOTEBOOKS, tmp_path), tmp_path, EMA_KIT_KAGGLE_ROOT=str(tmp_path / "no-kaggle-here"))
    runs = tmp_path / "runs"
    for run in KAGGLE_NOTEBOOKS[:2]:  # K=2 folds at smoke size
        assert json.loads((runs / run / "folds.json").read_text())["k"] == 2
        assert all((runs / run / f"fold_{i}" / "model_ema.pth").is_file() for i in range(2))
        assert pd.read_csv(runs / run / "folds.csv")["fold"].tolist() == ["0", "1", "oof"]
    assert json.loads((runs / KAGGLE_NOTEBOOKS[0] / "model.json").read_text()) == {
        "name": "resnet18", "num_classes": 10, "img_size": 28}  # fmt: skip
    submission = pd.read_csv(runs / "04_inference_submission" / "submission.csv")
    assert submission.equals(pd.read_csv(runs / "02_kaggle_digit_recognizer" / "submission.csv"))
    sample = pd.read_csv(tmp_path / "data" / "digit-recognizer" / "sample_submission.csv")
    assert list(submission.columns) == ["ImageId", "Label"] and len(submission) == len(sample)
    images = pd.read_csv(runs / "03_image_folder_classification" / "submission.csv")
    assert list(images.columns) == ["id_code", "diagnosis"] and images["diagnosis"].between(0, 4).all()
    log = pd.read_csv(runs / "03_image_folder_classification" / "fold_1" / "history.csv")
    assert {"live_qwk", "ema_qwk"} <= set(log.columns) and log["ema_qwk"].between(-1, 1).all()
    table = pd.read_csv(runs / "03_image_folder_classification" / "folds.csv", index_col="fold")
    assert table.loc["oof", "rows"] == 300 and table["ema_qwk"].between(-1, 1).all()
    oof = pd.read_csv(runs / "03_image_folder_classification" / "oof.csv")
    assert oof["row"].tolist() == list(range(300))


# -- on Kaggle: "Save & Run All" in a kernel without ema_kit installed -----------------------------


@pytest.fixture(scope="module")
def kernel_without_ema_kit(tmp_path_factory):
    """A Jupyter kernel spec whose Python sees every package installed here except ema_kit.

    Returns the JUPYTER_PATH that holds it; it is named ``python3``, the notebooks' own kernel name.
    """
    root = tmp_path_factory.mktemp("kernel")
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", root / "venv"], check=True)
    venv_python = root / "venv" / "bin" / "python"
    site = subprocess.check_output(
        [venv_python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"], text=True
    ).strip()
    preinstalled = root / "preinstalled"
    preinstalled.mkdir()
    for entry in Path(sysconfig.get_path("purelib")).iterdir():
        if not entry.name.lower().startswith(("ema_kit", "__editable__")):
            (preinstalled / entry.name).symlink_to(entry)
    Path(site, "preinstalled.pth").write_text(f"{preinstalled}\n")
    env = {name: value for name, value in os.environ.items() if name != "PYTHONPATH"}
    probe = subprocess.run(
        [venv_python, "-c", "import ema_kit"], cwd=root, env=env, capture_output=True, text=True
    )
    assert "No module named 'ema_kit'" in probe.stderr, "the kernel's Python must not find ema_kit"
    spec = root / "jupyter" / "kernels" / "python3"
    spec.mkdir(parents=True)
    argv = [str(venv_python), "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    (spec / "kernel.json").write_text(
        json.dumps({"argv": argv, "display_name": "Python 3", "language": "python"})
    )
    return root / "jupyter"


def _run_on_kaggle(
    name: str, kaggle: Path, cwd: Path, jupyter_path: Path, monkeypatch, **parameters
) -> nbformat.NotebookNode:
    """Execute notebook ``name`` as Kaggle's "Save & Run All" does, with ``kaggle`` as /kaggle."""
    notebook = _with_parameters(nbformat.read(_copy([name], cwd)[0], as_version=4), **parameters)
    with monkeypatch.context() as patch:  # the kernel inherits this environment
        patch.delenv("PYTHONPATH", raising=False)
        patch.setenv("EMA_KIT_SMOKE", "1")
        patch.setenv("EMA_KIT_KAGGLE_ROOT", str(kaggle))
        patch.setenv("KAGGLE_KERNEL_RUN_TYPE", "Batch")
        patch.setenv("JUPYTER_PATH", str(jupyter_path))  # where the kernel spec "python3" is found first
        NotebookClient(
            notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(cwd)}}
        ).execute()
    return notebook


def _competition(folder: Path) -> Path:
    """The Digit Recognizer's files, with a test set of TEST_ROWS rows."""
    write_digit_recognizer(folder)
    pd.read_csv(folder / "test.csv").head(TEST_ROWS).to_csv(folder / "test.csv", index=False)
    sample = pd.read_csv(folder / "sample_submission.csv").head(TEST_ROWS)
    sample.to_csv(folder / "sample_submission.csv", index=False)
    return folder


def _printed(notebook: nbformat.NotebookNode, index: int | None = None) -> str:
    """What cell ``index`` printed, or every cell when None."""
    cells = notebook.cells if index is None else [notebook.cells[index]]
    return "".join(output.get("text", "") for cell in cells for output in cell.get("outputs", []))


def _ema_kit_dataset(kaggle: Path, mount: str) -> Path:
    """The ema-kit dataset attached at ``input/<mount>``, as kaggle/build.py writes it; returns its wheel."""
    dataset = kaggle / "input" / mount
    dataset.mkdir(parents=True)
    (dataset / build.PASTE_FILE.name).write_text(build.paste(build.read_package(), build.package_version()))
    return build.build_wheel(build.read_package(), dataset)


@pytest.mark.slow
@pytest.mark.kaggle_stack
@pytest.mark.parametrize(
    "layout",
    [
        # classic: every input under its slug
        {"competition": "digit-recognizer", "ema_kit": "ema-kit",
         "output": "ema-kit-digit-recognizer"},
        # today's: competitions/, datasets/<owner>/, notebooks/<owner>/,
        # and 02's output is attached under a slug other than the one 04 names (found by model_ema.pth)
        {"competition": "competitions/digit-recognizer", "ema_kit": "datasets/tester/ema-kit",
         "output": "notebooks/tester/my-digits-run"},
    ],
    ids=["classic", "current"],
)  # fmt: skip
def test_on_kaggle_02_trains_and_04_submits_from_the_attached_inputs(
    tmp_path, kernel_without_ema_kit, monkeypatch, layout
):
    kaggle = tmp_path / "kaggle"
    competition = _competition(kaggle / "input" / layout["competition"])
    shipped = _ema_kit_dataset(kaggle, layout["ema_kit"])
    (kaggle / "working").mkdir()

    training = _run_on_kaggle(
        "02_kaggle_digit_recognizer", kaggle, tmp_path / "a", kernel_without_ema_kit, monkeypatch
    )
    assert _printed(training, 1) == f"ema_kit from {shipped}\n"
    assert f"digit-recognizer: the attached Kaggle input {competition}" in _printed(training)
    trained = pd.read_csv(kaggle / "working" / "submission.csv")
    assert len(trained) == TEST_ROWS
    # Kaggle mounts a notebook's output as an input of the notebooks that attach it.
    shutil.move(kaggle / "working", kaggle / "input" / layout["output"])
    (kaggle / "working").mkdir()
    inference = _run_on_kaggle(
        "04_inference_submission", kaggle, tmp_path / "b", kernel_without_ema_kit, monkeypatch
    )
    output = kaggle / "input" / layout["output"]
    assert f"Loaded the EMA weights of 2 folds from {output}:" in _printed(inference)

    submission = pd.read_csv(kaggle / "working" / "submission.csv")
    sample = pd.read_csv(competition / "sample_submission.csv")
    assert list(submission.columns) == list(sample.columns) == ["ImageId", "Label"]
    assert submission["ImageId"].tolist() == sample["ImageId"].tolist() == list(range(1, TEST_ROWS + 1))
    assert submission["Label"].between(0, 9).all()
    assert submission.equals(trained)  # the same saved EMA weights, the same test.csv
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "kaggle"]
    assert [p.name for p in (tmp_path / "a").iterdir()] == ["02_kaggle_digit_recognizer.ipynb"]  # no data/


@pytest.mark.slow
@pytest.mark.kaggle_stack
@pytest.mark.parametrize(
    "notebook, competition",
    [("02_kaggle_digit_recognizer", "digit-recognizer"),
     ("03_image_folder_classification", "aptos2019-blindness-detection")],
)  # fmt: skip
def test_on_kaggle_without_the_competition_attached_a_notebook_stops_naming_it_and_writes_nothing(
    tmp_path, kernel_without_ema_kit, monkeypatch, notebook, competition
):
    kaggle = tmp_path / "kaggle"
    _ema_kit_dataset(kaggle, "datasets/tester/ema-kit")
    (kaggle / "working").mkdir()
    with pytest.raises(CellExecutionError) as error:
        _run_on_kaggle(notebook, kaggle, tmp_path / "a", kernel_without_ema_kit, monkeypatch)
    message = error.value.evalue
    assert error.value.ename == "FileNotFoundError"
    assert message.startswith(f"Input {competition!r} is not attached to this Kaggle notebook")
    assert "Attached under" in message and "datasets/tester/ema-kit" in message
    assert list((kaggle / "working").iterdir()) == []
    assert [p.name for p in (tmp_path / "a").iterdir()] == [f"{notebook}.ipynb"]  # no stand-in data


def _aptos(folder: Path) -> Path:
    """APTOS 2019's layout (train_images/, test_images/, id_code and diagnosis), from the digits 0-4."""
    return write_image_folder(folder, size=(20, 40), classes=5, columns=("id_code", "diagnosis"),
                              folders=("train_images", "test_images"))  # fmt: skip


@pytest.mark.slow
@pytest.mark.kaggle_stack
@pytest.mark.parametrize(
    "layout",
    [
        # classic: a CNN, its weights a file in a dataset mounted under its slug
        {"competition": "aptos2019-blindness-detection", "ema_kit": "ema-kit", "model": "resnet18",
         "slug": "timm-resnet18", "weights": "timm-resnet18", "file": "resnet18.pth"},
        # today's: a ViT, its weights a Kaggle Model's file in <framework>/<variation>/<version>/
        {"competition": "competitions/aptos2019-blindness-detection", "ema_kit": "datasets/tester/ema-kit",
         "model": "vit_tiny_patch16_224", "slug": "vit-tiny",
         "weights": "models/tester/vit-tiny/pytorch/default/1", "file": "model.safetensors"},
    ],
    ids=["classic-cnn", "current-vit"],
)  # fmt: skip
def test_on_kaggle_03_trains_a_timm_cnn_or_vit_from_attached_pretrained_weights(
    tmp_path, kernel_without_ema_kit, monkeypatch, layout
):
    import timm
    from safetensors.torch import save_file

    kaggle = tmp_path / "kaggle"
    _aptos(kaggle / "input" / layout["competition"])
    _ema_kit_dataset(kaggle, layout["ema_kit"])
    weights = kaggle / "input" / layout["weights"] / layout["file"]
    weights.parent.mkdir(parents=True)
    state = timm.create_model(layout["model"]).state_dict()  # as timm publishes it: ImageNet's 1000 classes
    if weights.suffix == ".pth":
        torch.save(state, weights)
    else:
        save_file({key: value.contiguous() for key, value in state.items()}, weights)
    (kaggle / "working").mkdir()

    parameters = {"MODEL": layout["model"], "PRETRAINED": (layout["slug"], layout["file"])}
    notebook = _run_on_kaggle("03_image_folder_classification", kaggle, tmp_path / "a",
                              kernel_without_ema_kit, monkeypatch, **parameters)  # fmt: skip
    assert f"pretrained weights: {weights}\n" in _printed(notebook)
    output = kaggle / "working"
    spec = json.loads((output / "model.json").read_text())
    assert spec == {"name": layout["model"], "num_classes": 5, "img_size": 32}
    log = pd.read_csv(output / "fold_0" / "history.csv")
    assert len(log) == 2 and {"live_qwk", "ema_qwk", "live_accuracy", "ema_accuracy"} <= set(log.columns)
    submission = pd.read_csv(output / "submission.csv")
    assert list(submission.columns) == ["id_code", "diagnosis"]
    assert submission["diagnosis"].between(0, 4).all()


@pytest.mark.slow
@pytest.mark.kaggle_stack
def test_on_kaggle_without_the_pretrained_weights_attached_03_stops_naming_them_and_writes_nothing(
    tmp_path, kernel_without_ema_kit, monkeypatch
):
    kaggle = tmp_path / "kaggle"
    _aptos(kaggle / "input" / "competitions" / "aptos2019-blindness-detection")
    _ema_kit_dataset(kaggle, "datasets/tester/ema-kit")
    (kaggle / "working").mkdir()
    with pytest.raises(CellExecutionError) as error:
        _run_on_kaggle("03_image_folder_classification", kaggle, tmp_path / "a", kernel_without_ema_kit,
                       monkeypatch, PRETRAINED=("timm-resnet18", "model.safetensors"))  # fmt: skip
    assert error.value.ename == "FileNotFoundError"
    assert error.value.evalue.startswith("model.safetensors is in no input attached to this Kaggle notebook")
    assert "Attach 'timm-resnet18'" in error.value.evalue
    assert list((kaggle / "working").iterdir()) == []


def _trained_folds(folder: Path, k: int, spec: dict) -> Path:
    """A finished fit_folds run of ``k`` folds as 02 writes it, its weights those of a fresh model."""
    from ema_kit.files import save_weights
    from ema_kit.kaggle import timm_model

    folder.mkdir(parents=True)
    (folder / "model.json").write_text(json.dumps(spec))
    (folder / "folds.json").write_text(json.dumps({"k": k, "seed": 0, "folds": [0, 1] * 5}))
    for i in range(k):
        save_weights(timm_model(**spec).state_dict(), folder / f"fold_{i}" / "model_ema.pth")
        (folder / f"fold_{i}" / "oof.csv").write_text("row\n")
    return folder


@pytest.mark.slow
@pytest.mark.kaggle_stack
@pytest.mark.parametrize(
    "spoil, error, message",
    [
        ("missing", "FileNotFoundError", "fold 1 of 2 is missing or unfinished"),
        ("unfinished", "FileNotFoundError", "fold 1 of 2 is missing or unfinished"),
        ("mismatched", "ValueError", "fold 1 of 2: "),
    ],
)  # fmt: skip
def test_on_kaggle_04_stops_on_a_missing_unfinished_or_mismatched_fold_naming_it_and_writes_nothing(
    tmp_path, kernel_without_ema_kit, monkeypatch, spoil, error, message
):
    from ema_kit.files import save_weights
    from ema_kit.kaggle import timm_model

    kaggle = tmp_path / "kaggle"
    _competition(kaggle / "input" / "competitions" / "digit-recognizer")
    _ema_kit_dataset(kaggle, "datasets/tester/ema-kit")
    spec = {"name": "resnet18", "num_classes": 10, "img_size": 28}
    run = _trained_folds(kaggle / "input" / "notebooks" / "tester" / "my-digits-run", 2, spec)
    if spoil == "missing":
        (run / "fold_1" / "model_ema.pth").unlink()
    elif spoil == "unfinished":
        (run / "fold_1" / "oof.csv").unlink()
    else:  # trained for another class count
        save_weights(timm_model(**spec | {"num_classes": 5}).state_dict(), run / "fold_1" / "model_ema.pth")
    (kaggle / "working").mkdir()
    with pytest.raises(CellExecutionError) as raised:
        _run_on_kaggle("04_inference_submission", kaggle, tmp_path / "a", kernel_without_ema_kit, monkeypatch)
    assert raised.value.ename == error and raised.value.evalue.startswith(message), raised.value.evalue
    assert list((kaggle / "working").iterdir()) == []
