"""The Kaggle build (kaggle/build.py): the single file, the wheel, and the dataset and kernel metadata."""

import ast
import doctest
import importlib.util
import json
import os
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path
from textwrap import dedent, indent

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
CORE_TESTS = ["tests/test_ema.py", "tests/test_shadows.py"]
# Kaggle's license names, from kaggle-api's docs/datasets_metadata.md.
KAGGLE_LICENSES = {
    "CC0-1.0", "CC-BY-SA-3.0", "CC-BY-SA-4.0", "CC-BY-NC-SA-4.0", "GPL-2.0", "ODbL-1.0", "DbCL-1.0",
    "copyright-authors", "other", "unknown", "CC-BY-4.0", "CC-BY-NC-4.0", "PDDL", "CC-BY-3.0",
    "CC-BY-3.0-IGO", "US-Government-Works", "CC-BY-NC-SA-3.0-IGO", "CDLA-Permissive-1.0",
    "CDLA-Sharing-1.0", "CC-BY-ND-4.0", "CC-BY-NC-ND-4.0", "ODC-BY-1.0", "LGPL-3.0", "AGPL-3.0",
    "FDL-1.3", "EU-ODP-Legal-Notice", "apache-2.0", "GPL-3.0",
}  # fmt: skip

# A stand-in package with what a flat concatenation would break: relative imports across a subpackage,
# private names that are equal in two modules, and a __main__.
STAND_IN = {
    "ema_kit/__init__.py": dedent(
        """\
        from .first import who as first_who
        from .second import who as second_who

        __version__ = "9.9.9"
        """
    ),
    "ema_kit/first.py": '_NAME = "first"\n\n\ndef who():\n    return _NAME\n',
    "ema_kit/second.py": dedent(
        """\
        from .inner.deep import shout

        _NAME = "second"


        def who():
            return shout(_NAME)
        """
    ),
    "ema_kit/inner/__init__.py": "",
    "ema_kit/inner/deep.py": dedent(
        """\
        from .. import first


        def shout(name):
            return name.upper() + "/" + first._NAME


        def fail():
            raise ValueError("raised from deep")
        """
    ),
    "ema_kit/__main__.py": (
        "import sys\n\nfrom . import first_who\n\nprint('main', first_who(), sys.argv[1:])\n"
    ),
}
# What running a notebook cell that holds the file does (a cell runs as __main__, without __file__).
PASTE = (
    "cell = {'__name__': '__main__'}\n"
    "exec(compile(open('ema_kit_single.py').read(), '<cell>', 'exec'), cell)\n"
)


def write_package(root: Path, files: dict) -> Path:
    for path, text in files.items():
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_text(text)
    return root / "ema_kit"


def bundle(tmp_path: Path, files: dict = STAND_IN) -> Path:
    """Build ema_kit_single.py for the package ``files`` into ``tmp_path``."""
    package = write_package(tmp_path / "src", files)
    path = tmp_path / "ema_kit_single.py"
    path.write_text(build.single_file(build.read_package(package), build.package_version(package)))
    return path


def no_ema_kit_env() -> dict:
    """The environment without PYTHONPATH, which may point at a checkout's ema_kit (-S does not drop it)."""
    return {name: value for name, value in os.environ.items() if name != "PYTHONPATH"}


def python(tmp_path: Path, code: str, *args: str) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter in ``tmp_path``, without site-packages: no ema_kit installed."""
    return subprocess.run(
        [sys.executable, "-S", "-c", code, *args],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        env=no_ema_kit_env(),
    )


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """``python kaggle/build.py --user kaggle-tester``, writing into a temporary folder."""
    root = tmp_path_factory.mktemp("kaggle")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(build, "SINGLE_FILE", root / "ema_kit_single.py")
        patch.setattr(build, "DATASET_METADATA", root / "dataset-metadata.json")
        patch.setattr(build, "KERNELS", root / "kernels")
        patch.setattr(build, "DATASET", root / "dataset")
        assert build.main(["--user", "kaggle-tester"]) == 0
    return root


# -- the single file ----------------------------------------------------------------------------


def test_committed_files_equal_a_fresh_build():
    files = build.generated_files(build.committed_user())
    stale = [
        str(path.relative_to(REPO))
        for path, text in files.items()
        if not path.is_file() or path.read_text() != text
    ]
    assert not stale, (
        f"{stale} differ from a fresh build of ema_kit/: run `python kaggle/build.py` and commit them."
    )


@pytest.mark.slow
def test_core_tests_pass_against_the_single_file(tmp_path):
    single = tmp_path / "ema_kit_single.py"
    single.write_text(build.single_file(build.read_package(), build.package_version()))
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *CORE_TESTS],
        cwd=REPO,
        env={**os.environ, "EMA_KIT_SINGLE": str(single)},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-5000:] + result.stderr[-2000:]
    # tests/conftest.py reports where ema_kit came from: proof that the tests ran against this file.
    assert f"ema_kit under test: ema_kit {build.package_version()} (single file {single}, " in result.stdout
    assert " passed" in result.stdout.splitlines()[-1]


def test_single_file_keeps_relative_imports_and_equal_private_names_apart(tmp_path):
    bundle(tmp_path)
    result = python(
        tmp_path, "import ema_kit_single, ema_kit\nprint(ema_kit.first_who(), ema_kit.second_who())"
    )
    assert result.stdout.split() == ["first", "SECOND/first"], result.stderr


def test_running_the_single_file_runs_the_package_main(tmp_path):
    bundle(tmp_path)
    result = subprocess.run(
        [sys.executable, "-S", "ema_kit_single.py", "demo", "--fast"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env=no_ema_kit_env(),
    )
    assert result.stdout == "main first ['demo', '--fast']\n", result.stderr


def test_pasting_into_a_cell_installs_the_package_and_a_second_paste_changes_nothing(tmp_path):
    bundle(tmp_path)
    code = (
        "import sys\n"
        + PASTE
        + (
            "import ema_kit\nfirst, finders = sys.modules['ema_kit'], list(sys.meta_path)\n"
            + PASTE
            + "print(sys.modules['ema_kit'] is first, sys.meta_path == finders, ema_kit.second_who())\n"
            "print(sorted(name for name in cell if not name.startswith('__')))\n"
        )
    )
    result = python(tmp_path, code)
    assert result.stdout.splitlines() == ["True True SECOND/first", "[]"], (
        result.stderr
    )  # no names left behind


def test_single_file_warns_that_it_shadows_an_installed_ema_kit(tmp_path):
    bundle(tmp_path)
    installed = write_package(tmp_path / "site", {"ema_kit/__init__.py": '__version__ = "0.0.1"\n'})
    code = (
        f"import sys, warnings\nsys.path.append({str(tmp_path / 'site')!r})\n"
        "with warnings.catch_warnings(record=True) as caught:\n    warnings.simplefilter('always')\n"
        "    import ema_kit_single\n"
        "import ema_kit\nprint(ema_kit.__version__, ema_kit.__file__)\nprint(caught[0].message)\n"
    )
    imported, warning = python(tmp_path, code).stdout.splitlines()
    version, origin = imported.split()
    assert version == "9.9.9" and origin.endswith("ema_kit_single.py/ema_kit/__init__.py")
    assert "now loads ema_kit 9.9.9" in warning and f"not the installed ema_kit at {installed}" in warning


def test_single_file_refuses_to_replace_an_ema_kit_already_imported(tmp_path):
    bundle(tmp_path)
    installed = write_package(tmp_path / "site", {"ema_kit/__init__.py": '__version__ = "0.0.1"\n'})
    code = (
        f"import sys\nsys.path.append({str(tmp_path / 'site')!r})\nimport ema_kit\n"
        f"try:\n{indent(PASTE, '    ')}except ImportError as error:\n    print(error)\n"
        "bundles = [f for f in sys.meta_path if hasattr(f, 'ema_kit_bundle')]\n"
        "print(sys.modules['ema_kit'].__version__, bundles)\n"
    )
    error, state = python(tmp_path, code).stdout.splitlines()
    assert f"already imported in this process (from {installed / '__init__.py'})" in error
    assert "Restart the kernel" in error
    assert state == "0.0.1 []"


def test_tracebacks_and_inspect_show_the_bundled_source(tmp_path):
    bundle(tmp_path)
    code = (
        "import inspect, traceback, ema_kit_single\nfrom ema_kit.inner import deep\n"
        "print(inspect.getsource(deep.shout).splitlines()[0])\n"
        "try:\n    deep.fail()\nexcept ValueError:\n    traceback.print_exc(file=sys.stdout)\n"
    )
    output = python(tmp_path, "import sys\n" + code).stdout
    assert output.startswith("def shout(name):\n")
    assert (
        'ema_kit_single.py/ema_kit/inner/deep.py", line 9, in fail\n    raise ValueError("raised from deep")'
        in output
    )


def test_a_failed_import_leaves_no_half_imported_package(tmp_path):
    bundle(tmp_path, {**STAND_IN, "ema_kit/first.py": "raise RuntimeError('first is broken')\n"})
    code = (
        f"import sys\ntry:\n{indent(PASTE, '    ')}except RuntimeError as error:\n    print(error)\n"
        "print([name for name in sys.modules if name.startswith('ema_kit')],"
        " [f for f in sys.meta_path if hasattr(f, 'ema_kit_bundle')])\n"
    )
    assert python(tmp_path, code).stdout.splitlines() == ["first is broken", "[] []"]


def test_single_file_depends_only_on_the_sources(tmp_path):
    forward = bundle(tmp_path / "a").read_text()
    backward = bundle(
        tmp_path / "b", dict(reversed(STAND_IN.items()))
    ).read_text()  # files made in another order
    assert forward == backward
    assert str(tmp_path) not in forward


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
        ({"ema_kit/quotes.py": "X = '''a'''\n"}, "quotes.py contains '''"),
        ({"ema_kit/bad.py": "def (:\n"}, "bad.py does not parse"),
        ({"ema_kit/my-module.py": "X = 1\n"}, "must be a Python identifier"),
    ],
)
def test_build_fails_loudly_on_what_the_single_file_cannot_carry(tmp_path, files, complaint):
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
        for name, path in [
            ("SINGLE_FILE", "ema_kit_single.py"),
            ("DATASET_METADATA", "dataset-metadata.json"),
        ]:
            patch.setattr(build, name, built / path)
        patch.setattr(build, "KERNELS", built / "kernels")
        assert build.main(["--check"]) == 0
        single = built / "ema_kit_single.py"
        fresh = single.read_text()
        single.write_text(fresh.replace("def _install_ema_kit", "def _edited_by_hand"))
        try:
            assert build.main(["--check"]) == 1
        finally:
            single.write_text(fresh)
    assert f"out of date: {single}" in capsys.readouterr().out


# -- the dataset ---------------------------------------------------------------------------------


def test_dataset_folder_holds_the_wheel_the_single_file_and_its_metadata(built):
    version = build.package_version()
    names = sorted(path.name for path in (built / "dataset").iterdir())
    assert names == sorted(
        [f"ema_kit-{version}-py3-none-any.whl", "ema_kit_single.py", "dataset-metadata.json"]
    )
    assert (built / "dataset" / "ema_kit_single.py").read_text() == (built / "ema_kit_single.py").read_text()
    assert (built / "dataset" / "dataset-metadata.json").read_text() == (
        built / "dataset-metadata.json"
    ).read_text()


def test_wheel_and_single_file_carry_the_same_sources(built):
    with zipfile.ZipFile(next((built / "dataset").glob("*.whl"))) as wheel:
        in_wheel = {
            name: wheel.read(name).decode() for name in wheel.namelist() if name.startswith("ema_kit/")
        }
    tree = ast.parse((built / "ema_kit_single.py").read_text())
    in_single = {
        node.targets[0].slice.value: node.value.value
        for node in tree.body
        if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Subscript)
    }
    assert in_wheel == in_single == build.read_package()


def test_wheel_build_is_reproducible(built, tmp_path):
    again = build.build_wheel(build.read_package(), tmp_path)
    assert again.read_bytes() == next((built / "dataset").glob("*.whl")).read_bytes()


@pytest.mark.slow
def test_wheel_installs_offline_into_a_fresh_environment(built, tmp_path):
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
