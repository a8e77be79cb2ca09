"""The Kaggle build (kaggle/build.py): the wheel, the paste file, and the dataset and kernel metadata."""

import doctest
import importlib.util
import json
import os
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("kaggle_build", REPO / "kaggle" / "build.py")
build = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(build)

NOTEBOOKS = [
    "01_quickstart",
    "02_kaggle_digit_recognizer",
    "03_image_folder_classification",
    "04_inference_submission",
    "05_choose_ema_after_training",
    "06_ema_extras",
    "07_all_gpus",
]
# Kaggle's license names, from kaggle-api's docs/datasets_metadata.md.
KAGGLE_LICENSES = {
    "CC0-1.0", "CC-BY-SA-3.0", "CC-BY-SA-4.0", "CC-BY-NC-SA-4.0", "GPL-2.0", "ODbL-1.0", "DbCL-1.0",
    "copyright-authors", "other", "unknown", "CC-BY-4.0", "CC-BY-NC-4.0", "PDDL", "CC-BY-3.0",
    "CC-BY-3.0-IGO", "US-Government-Works", "CC-BY-NC-SA-3.0-IGO", "CDLA-Permissive-1.0",
    "CDLA-Sharing-1.0", "CC-BY-ND-4.0", "CC-BY-NC-ND-4.0", "ODC-BY-1.0", "LGPL-3.0", "AGPL-3.0",
    "FDL-1.3", "EU-ODP-Legal-Notice", "apache-2.0", "GPL-3.0",
}  # fmt: skip

# A stand-in package: a subpackage, relative imports, a __main__.
STAND_IN = {
    "ema_kit/__init__.py": 'from .first import who\n\n__version__ = "9.9.9"\n',
    "ema_kit/first.py": "from .inner.deep import shout\n\n\ndef who():\n    return shout('first')\n",
    "ema_kit/inner/__init__.py": "",
    "ema_kit/inner/deep.py": "def shout(name):\n    return name.upper()\n",
    "ema_kit/__main__.py": "import sys\n\nfrom . import who\n\nprint('main', who(), sys.argv[1:])\n",
}


def write_package(root: Path, files: dict) -> Path:
    for path, text in files.items():
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_text(text)
    return root / "ema_kit"


def no_ema_kit_env() -> dict:
    """The environment without PYTHONPATH, which may point at a checkout's ema_kit (-S does not drop it)."""
    return {name: value for name, value in os.environ.items() if name != "PYTHONPATH"}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """``python kaggle/build.py --user kaggle-tester``, writing into a temporary folder."""
    root = tmp_path_factory.mktemp("kaggle")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(build, "PASTE_FILE", root / "ema_kit_paste.py")
        patch.setattr(build, "DATASET_METADATA", root / "dataset-metadata.json")
        patch.setattr(build, "KERNELS", root / "kernels")
        patch.setattr(build, "DATASET", root / "dataset")
        assert build.main(["--user", "kaggle-tester"]) == 0
    return root


# -- the build ----------------------------------------------------------------------------------


def test_committed_files_equal_a_fresh_build():
    stale = [
        str(path.relative_to(REPO))
        for path, text in build.generated_files(build.committed_user()).items()
        if not path.is_file() or path.read_text(encoding="utf-8") != text
    ]
    assert not stale, f"out of date: {stale}; run `python kaggle/build.py` and commit the result"


def test_read_package_depends_only_on_the_sources(tmp_path):
    forward = build.read_package(write_package(tmp_path / "a", STAND_IN))
    backward = build.read_package(write_package(tmp_path / "b", dict(reversed(STAND_IN.items()))))
    assert list(forward.items()) == list(backward.items()) == sorted(forward.items())


@pytest.mark.parametrize(
    "files, complaint",
    [
        ({"ema_kit/table.csv": "a,b\n"}, "table.csv is not a Python module"),
        ({"ema_kit/data/load.py": "X = 1\n"}, "data/ has no __init__.py"),
        (
            {"ema_kit/paths.py": "from pathlib import Path\nHERE = Path(__file__)\n"},
            "paths.py:2 reads __file__",
        ),
        ({"ema_kit/res.py": "from importlib import resources\n"}, "res.py:1 reads package resources"),
        ({"ema_kit/bad.py": "def (:\n"}, "bad.py does not parse"),
        ({"ema_kit/my-module.py": "X = 1\n"}, "must be a Python identifier"),
    ],
)
def test_build_fails_loudly_on_what_the_wheel_cannot_carry(tmp_path, files, complaint):
    package = write_package(tmp_path, {**STAND_IN, **files})
    with pytest.raises(build.BuildError, match=complaint.replace("(", r"\(")):
        build.read_package(package)


def test_build_refuses_a_username_that_is_not_one():
    with pytest.raises(build.BuildError, match=r"--user must be a Kaggle username .*got 'me/you'"):
        build.check_user("me/you")


def test_build_docstring_examples_run():
    result = doctest.testmod(build)
    assert result.attempted > 0 and result.failed == 0


def test_check_reports_a_stale_file_and_passes_on_a_fresh_build(built, capsys):
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(build, "PASTE_FILE", built / "ema_kit_paste.py")
        patch.setattr(build, "DATASET_METADATA", built / "dataset-metadata.json")
        patch.setattr(build, "KERNELS", built / "kernels")
        assert build.main(["--check"]) == 0
        paste = built / "ema_kit_paste.py"
        fresh = paste.read_text()
        paste.write_text(fresh.replace("class ModelEMA", "class EditedByHand"))
        try:
            assert build.main(["--check"]) == 1
        finally:
            paste.write_text(fresh)
    printed = capsys.readouterr().out
    assert f"out of date: {paste}" in printed and "Run `python kaggle/build.py`" in printed


# -- the dataset ---------------------------------------------------------------------------------


def test_dataset_folder_holds_the_wheel_the_paste_file_and_its_metadata(built):
    version = build.package_version()
    names = sorted(path.name for path in (built / "dataset").iterdir())
    assert names == sorted(
        [f"ema_kit-{version}-py3-none-any.whl", "ema_kit_paste.py", "dataset-metadata.json"]
    )
    assert (built / "dataset" / "ema_kit_paste.py").read_text() == (built / "ema_kit_paste.py").read_text()
    assert (built / "dataset" / "dataset-metadata.json").read_text() == (
        built / "dataset-metadata.json"
    ).read_text()


def test_wheel_carries_the_package_sources(built):
    with zipfile.ZipFile(next((built / "dataset").glob("*.whl"))) as wheel:
        in_wheel = {
            name: wheel.read(name).decode() for name in wheel.namelist() if name.startswith("ema_kit/")
        }
    assert in_wheel == build.read_package()


def test_wheel_build_is_reproducible(built, tmp_path):
    again = build.build_wheel(build.read_package(), tmp_path)
    assert again.read_bytes() == next((built / "dataset").glob("*.whl")).read_bytes()


def venv_like_kaggle(tmp_path: Path) -> tuple[Path, str]:
    """A virtual environment with every package installed here but ema_kit; its python and site folder."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", venv], check=True)
    venv_python = venv / "bin" / "python"
    site = subprocess.check_output(
        [venv_python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"], text=True
    ).strip()
    # Like Kaggle's image, the environment has torch and the other dependencies already: ours, seen
    # through a .pth file, all but ema_kit's own (editable) install.
    preinstalled = tmp_path / "preinstalled"
    preinstalled.mkdir()
    for entry in Path(sysconfig.get_path("purelib")).iterdir():
        if not entry.name.lower().startswith(("ema_kit", "__editable__")):
            (preinstalled / entry.name).symlink_to(entry)
    Path(site, "preinstalled.pth").write_text(f"{preinstalled}\n")
    return venv_python, site


@pytest.mark.slow
def test_wheel_imported_as_a_zip_trains_without_ema_kit_installed(built, tmp_path):
    venv_python, _ = venv_like_kaggle(tmp_path)
    wheel = next((built / "dataset").glob("*.whl"))
    code = (
        f"import sys\nsys.path.insert(0, {str(wheel)!r})\n"  # what the notebooks' first cell does
        "import ema_kit\nfrom ema_kit import LiveLog, fit\n"
        "from ema_kit.examples.demo import SmallCNN\nfrom ema_kit.examples.digits import digits_loaders\n"
        "import torch\ntrain_loader, val_loader = digits_loaders(batch_size=128)\nmodel = SmallCNN(width=8)\n"
        "log = fit(model, train_loader, val_loader, epochs=1, ema=0.9, callbacks=[LiveLog(progress='off')],\n"
        "          optimizer=torch.optim.SGD(model.parameters(), lr=0.05))\n"
        "print(ema_kit.__file__, len(log))\n"
    )
    result = subprocess.run(
        [venv_python, "-c", code],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        env=no_ema_kit_env(),
    )
    assert result.stdout.split() == [f"{wheel}/ema_kit/__init__.py", "1"], result.stderr


@pytest.mark.slow
def test_wheel_installs_offline_into_a_fresh_environment(built, tmp_path):
    venv_python, site = venv_like_kaggle(tmp_path)
    offline = {**os.environ, "HTTP_PROXY": "http://127.0.0.1:9", "HTTPS_PROXY": "http://127.0.0.1:9"}
    install = subprocess.run(
        [sys.executable, "-m", "pip", "--python", venv_python, "install", "--no-index", "--no-cache-dir"]
        + ["--disable-pip-version-check", "--find-links", built / "dataset", "ema_kit"],
        capture_output=True,
        text=True,
        env=offline,
        timeout=120,
    )
    assert install.returncode == 0, install.stdout + install.stderr
    imported = subprocess.run(
        [
            venv_python,
            "-c",
            "import ema_kit; print(ema_kit.__version__, ema_kit.ModelEMA.__module__, ema_kit.__file__)",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        env=no_ema_kit_env(),
    )
    assert imported.stdout.split() == [
        build.package_version(),
        "ema_kit.ema",
        f"{site}/ema_kit/__init__.py",
    ], imported.stderr


def test_dataset_metadata_has_what_kaggle_datasets_create_requires(built):
    metadata = json.loads((REPO / "kaggle" / "dataset-metadata.json").read_text())
    owner, slug = metadata["id"].split("/")
    assert owner and 6 <= len(slug) <= 50 and slug == build.DATASET_SLUG
    assert 6 <= len(metadata["title"]) <= 50 and 20 <= len(metadata["subtitle"]) <= 80
    # MIT (pyproject.toml's, LICENSE's) is not among Kaggle's names: "other", named in the description.
    assert [license["name"] for license in metadata["licenses"]] == ["other"]
    assert {license["name"] for license in metadata["licenses"]} <= KAGGLE_LICENSES
    assert "License: MIT" in metadata["description"]
    assert "/kaggle/input/ema-kit/" in metadata["description"]
    assert f"/kaggle/input/datasets/{owner}/ema-kit/" in metadata["description"]
    for resource in json.loads((built / "dataset" / "dataset-metadata.json").read_text())["resources"]:
        assert (built / "dataset" / resource["path"]).is_file(), resource


# -- the kernels ---------------------------------------------------------------------------------


def kernel_metadata() -> dict[str, dict]:
    folders = sorted(path for path in (REPO / "kaggle" / "kernels").iterdir() if path.is_dir())
    return {folder.name: json.loads((folder / "kernel-metadata.json").read_text()) for folder in folders}


def test_there_is_kernel_metadata_for_each_notebook_and_no_other():
    assert list(kernel_metadata()) == NOTEBOOKS


def test_kernel_metadata_has_what_kaggle_kernels_push_requires():
    owner = json.loads((REPO / "kaggle" / "dataset-metadata.json").read_text())["id"].split("/")[0]
    ids = set()
    for notebook, metadata in kernel_metadata().items():
        user, slug = metadata["id"].split("/")
        assert user == owner and len(slug) >= 5 and slug == build.slugify(metadata["title"]), metadata["id"]
        ids.add(metadata["id"])
        code_file = (REPO / "kaggle" / "kernels" / notebook / metadata["code_file"]).resolve()
        assert code_file == REPO / "notebooks" / f"{notebook}.ipynb"  # the CLI joins it to the folder
        assert metadata["language"] == "python" and metadata["kernel_type"] == "notebook"
        assert metadata["enable_tpu"] is False and metadata["enable_internet"] is False
        assert metadata["dataset_sources"] == [f"{owner}/{build.DATASET_SLUG}"]
    assert {source for m in kernel_metadata().values() for source in m["kernel_sources"]} <= ids


def test_kernels_attach_their_competition_and_turn_the_gpu_on_only_to_train_on_it():
    attached = {
        notebook: (metadata["competition_sources"], metadata["kernel_sources"], metadata["enable_gpu"])
        for notebook, metadata in kernel_metadata().items()
    }
    owner = json.loads((REPO / "kaggle" / "dataset-metadata.json").read_text())["id"].split("/")[0]
    assert attached == {
        "01_quickstart": ([], [], False),
        "02_kaggle_digit_recognizer": (["digit-recognizer"], [], True),
        "03_image_folder_classification": (["aptos2019-blindness-detection"], [], True),
        "04_inference_submission": (["digit-recognizer"], [f"{owner}/ema-kit-digit-recognizer"], False),
        "05_choose_ema_after_training": ([], [], False),
        "06_ema_extras": ([], [], False),
        "07_all_gpus": ([], [], True),
    }


def test_each_notebook_reads_the_competition_its_kernel_attaches():
    for notebook, metadata in kernel_metadata().items():
        code = (REPO / "notebooks" / f"{notebook}.ipynb").read_text()
        for competition in metadata["competition_sources"]:
            assert f'COMPETITION = \\"{competition}\\"' in code, (notebook, competition)


def test_license_file_is_the_license_pyproject_names():
    assert 'license = "MIT"' in (REPO / "pyproject.toml").read_text()
    assert (REPO / "LICENSE").read_text().startswith("MIT License\n")


def test_kernel_notebooks_exist_and_are_notebooks():
    for name in NOTEBOOKS:  # kaggle kernels push fails for a missing one
        path = REPO / "notebooks" / f"{name}.ipynb"
        assert path.is_file(), f"{path} is missing but kaggle/build.py's NOTEBOOKS lists it"
        assert "cells" in json.loads(path.read_text()), name
