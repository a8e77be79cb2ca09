"""Build what ema_kit needs on Kaggle: the dataset (wheel + paste file) and the notebooks' kernel metadata.

    python kaggle/build.py               # rebuild everything; the Kaggle username stays as it is
    python kaggle/build.py --user NAME   # the same, publishing under the Kaggle account NAME
    python kaggle/build.py --check       # only compare: exit 1 if a committed file is out of date

Committed, and regenerated here (never edit them by hand):
    kaggle/ema_kit_paste.py                        ModelEMA, evaluate and LiveLog as one cell (paste.py)
    kaggle/dataset-metadata.json                   the Kaggle dataset, <user>/ema-kit
    kaggle/kernels/<notebook>/kernel-metadata.json one per notebook (table NOTEBOOKS below)
Not committed (.gitignore): kaggle/dataset/, the folder to upload with ``kaggle datasets create -p
kaggle/dataset``: the wheel, ema_kit_paste.py and dataset-metadata.json. A kernel imports the wheel as
it is (a zip on ``sys.path``), so the dataset needs no copy of the package in any other form.

The username lives in the committed kaggle/dataset-metadata.json (a placeholder until someone passes
``--user``); later builds keep it. The build reads ema_kit/ as text and never imports it, so it needs no
torch; the wheel is built offline from the same files by pip and setuptools.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # paste.py, beside this file
from paste import PasteError, paste_file  # noqa: E402

KAGGLE = Path(__file__).resolve().parent
REPO = KAGGLE.parent
PACKAGE = REPO / "ema_kit"
PASTE_FILE = KAGGLE / "ema_kit_paste.py"
DATASET_METADATA = KAGGLE / "dataset-metadata.json"
KERNELS = KAGGLE / "kernels"
DATASET = KAGGLE / "dataset"

PLACEHOLDER_USER = "your-kaggle-username"
# Mounted in kernels at /kaggle/input/ema-kit/ (classic) or /kaggle/input/datasets/<user>/ema-kit/ (today).
DATASET_SLUG = "ema-kit"
LICENSE = "MIT"  # pyproject.toml's license, and LICENSE's
DIGITS = "digit-recognizer"
APTOS = "aptos2019-blindness-detection"  # retina photos of mixed sizes: what 03 trains on
# The notebooks in the order a reader takes them: (notebook in notebooks/, kernel title, competitions,
# notebooks whose output it reads, GPU). The kernel's slug is its title's (Kaggle derives one from the
# other). The GPU is on where a notebook trains on a competition's data; the built-in digits and
# inference train in seconds to minutes on Kaggle's CPUs, and a GPU session is a quota that runs out.
NOTEBOOKS = [
    ("01_quickstart", "EMA Kit Quickstart", [], [], False),
    ("02_kaggle_digit_recognizer", "EMA Kit Digit Recognizer", [DIGITS], [], True),
    ("03_image_folder_classification", "EMA Kit Image Folder Classification", [APTOS], [], True),
    (
        "04_inference_submission",
        "EMA Kit Inference Submission",
        [DIGITS],
        ["02_kaggle_digit_recognizer"],
        False,
    ),
    ("05_choose_ema_after_training", "EMA Kit Choose EMA After Training", [], [], False),
    ("06_ema_extras", "EMA Kit EMA Extras", [], [], False),
    ("07_all_gpus", "EMA Kit All GPUs", [], [], True),  # push --accelerator NvidiaTeslaT4: "GPU T4 x2"
]
# Skipped in ema_kit/, as are dotfiles (editor swap files, .DS_Store); anything else that is not a module
# stops the build, since the wheel would not carry it.
IGNORED = {"__pycache__", "py.typed"}
# 1980-01-01, the earliest date a zip can hold: with it, the same sources give a byte-identical wheel.
SOURCE_DATE_EPOCH = "315532800"


class BuildError(Exception):
    """The sources hold something the build cannot carry to Kaggle; the message says what and the fix."""


def read_package(package_dir: Path = PACKAGE) -> dict[str, str]:
    """The package's modules, ``{"ema_kit/ema.py": source, ...}``, sorted by path; refuses what won't bundle.

    Example:
        >>> sorted(read_package())[0]
        'ema_kit/__init__.py'
    """
    package_dir = Path(package_dir)
    if not (package_dir / "__init__.py").is_file():
        raise BuildError(f"{package_dir} is not a package: it has no __init__.py.")
    sources = {}
    for path in sorted(package_dir.rglob("*")):
        relative = path.relative_to(package_dir.parent)
        if any(part in IGNORED or part.startswith(".") for part in relative.parts):
            continue
        if path.is_dir():
            if not (path / "__init__.py").is_file():
                raise BuildError(
                    f"{relative}/ has no __init__.py: the wheel carries regular packages only. "
                    f"Add an empty {relative}/__init__.py."
                )
        elif path.suffix != ".py":
            raise BuildError(
                f"{relative} is not a Python module: the wheel ships no package data. Keep data out of "
                f"ema_kit/, or teach kaggle/build.py to carry it."
            )
        elif not all(part.isidentifier() for part in relative.with_suffix("").parts):
            raise BuildError(f"{relative}: a module name must be a Python identifier to be importable.")
        else:
            source = path.read_text(encoding="utf-8")
            _check_module(relative.as_posix(), source)
            sources[relative.as_posix()] = source
    return sources


def _check_module(path: str, source: str) -> None:
    try:
        tree = ast.parse(source, path)
    except SyntaxError as error:
        raise BuildError(f"{path} does not parse: {error}") from error
    for node in ast.walk(tree):
        if isinstance(node, ast.Name) and node.id == "__file__":
            raise BuildError(
                f"{path}:{node.lineno} reads __file__: imported from the wheel as a zip (on Kaggle), no "
                f"module has a file on disk, so nothing can be read next to it. Ship such data as literals."
            )
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            names = [node.module or ""] + [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        if any(name == "importlib.resources" or name.split(".")[0] == "pkg_resources" for name in names):
            raise BuildError(
                f"{path}:{node.lineno} reads package resources, which the wheel does not carry."
            )


def package_version(package_dir: Path = PACKAGE) -> str:
    """``__version__`` from the package's ``__init__.py``, checked against pyproject.toml's version."""
    init = Path(package_dir) / "__init__.py"
    for node in ast.parse(init.read_text(encoding="utf-8")).body:
        if isinstance(node, ast.Assign) and [getattr(t, "id", None) for t in node.targets] == ["__version__"]:
            version = ast.literal_eval(node.value)
            break
    else:
        raise BuildError(f"{init} sets no __version__ = '...': the wheel's name needs it.")
    pyproject = Path(package_dir).parent / "pyproject.toml"
    if pyproject.is_file():
        match = re.search(r'^version\s*=\s*"([^"]+)"', pyproject.read_text(encoding="utf-8"), re.MULTILINE)
        if match and match.group(1) != version:
            raise BuildError(
                f"{init} says __version__ = {version!r} but {pyproject} says version = {match.group(1)!r}: "
                f"the wheel and the package would disagree. Make them equal."
            )
    return version


def slugify(title: str) -> str:
    """The URL slug Kaggle derives from a title.

    Example:
        >>> slugify("EMA Kit Quickstart")
        'ema-kit-quickstart'
    """
    return re.sub(r"[^a-z0-9]+", "-", title.lower()).strip("-")


def dataset_metadata(user: str, version: str) -> dict:
    """dataset-metadata.json for ``kaggle datasets create`` (fields as kaggle-api's datasets_metadata.md)."""
    return {
        "title": "ema_kit: EMA of PyTorch model weights",
        "subtitle": "ModelEMA and fit() for kernels without internet: a wheel and a paste file",
        "description": (
            "ema_kit keeps an exponential moving average (EMA) of a PyTorch model's weights "
            "(`ema_kit.ModelEMA`) and trains with it (`ema_kit.fit`). This dataset makes it usable in a "
            "kernel with the internet off. Attach it: it is mounted at `/kaggle/input/ema-kit/` or, in "
            f"today's layout, `/kaggle/input/datasets/{user}/ema-kit/` (call that folder `DIR`). Then "
            "either\n\n"
            "* import its wheel as it is (a zip): "
            f"`import sys; sys.path.insert(0, 'DIR/{wheel_name(version)}')`,"
            "\n* or install it: `!pip install --no-index --find-links DIR ema_kit`,\n\n"
            "then `from ema_kit import ModelEMA`. The example notebooks' first cell finds the wheel in "
            "either layout. `ema_kit_paste.py` is `ModelEMA`, `evaluate` and the live log `LiveLog` as "
            "one cell to paste, cut from the same sources. torch, numpy, pandas and matplotlib come from "
            "the Kaggle image (and torchvision and timm, which the example notebooks 02-04 use). "
            f"License: {LICENSE} (the LICENSE file of the ema_kit repository)."
        ),
        "id": f"{user}/{DATASET_SLUG}",
        # Kaggle's documented license names (kaggle-cli docs/datasets_metadata.md) have no MIT; "other"
        # means "specified in the description", which names it.
        "licenses": [{"name": "other"}],
        "resources": [
            {"path": wheel_name(version), "description": "ema_kit, to pip install offline (--no-index)."},
            {
                "path": PASTE_FILE.name,
                "description": "ModelEMA, evaluate and LiveLog to paste into one notebook cell.",
            },
        ],
    }


def paste(sources: dict[str, str], version: str) -> str:
    """The text of ema_kit_paste.py (kaggle/paste.py), with its errors as the build's."""
    try:
        return paste_file(sources, version)
    except PasteError as error:
        raise BuildError(f"ema_kit_paste.py: {error}") from error


def wheel_name(version: str) -> str:
    return f"ema_kit-{version}-py3-none-any.whl"


def kernel_metadata(user: str) -> dict[str, dict]:
    """kernel-metadata.json for each notebook, for ``kaggle kernels push -p kaggle/kernels/<notebook>``.

    The GPU on where the notebook needs one (table NOTEBOOKS), internet off, the ema_kit dataset and the
    notebook's competition attached; ``code_file`` is relative to the metadata's folder. The fields are
    those ``kaggle kernels init`` writes.
    """
    ids = {notebook: f"{user}/{slugify(title)}" for notebook, title, *_ in NOTEBOOKS}
    return {
        notebook: {
            "id": ids[notebook],
            "title": title,
            "code_file": f"../../../notebooks/{notebook}.ipynb",
            "language": "python",
            "kernel_type": "notebook",
            "is_private": True,
            "enable_gpu": gpu,
            "enable_tpu": False,
            "enable_internet": False,
            "dataset_sources": [f"{user}/{DATASET_SLUG}"],
            "competition_sources": competitions,
            "kernel_sources": [ids[source] for source in sources],
            "model_sources": [],
        }
        for notebook, title, competitions, sources, gpu in NOTEBOOKS
    }


def committed_user() -> str:
    """The Kaggle username in the committed dataset-metadata.json, or the placeholder."""
    if DATASET_METADATA.is_file():
        return json.loads(DATASET_METADATA.read_text(encoding="utf-8"))["id"].split("/")[0]
    return PLACEHOLDER_USER


def check_user(user: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_-]*", user or ""):
        raise BuildError(
            f"--user must be a Kaggle username (letters, digits, '-' or '_'), got {user!r}: it becomes "
            f"the owner in ids like {PLACEHOLDER_USER}/{DATASET_SLUG}."
        )
    return user


def generated_files(user: str, package_dir: Path = PACKAGE) -> dict[Path, str]:
    """Every committed file the build writes, ``{path: text}``: the paste file and the metadata."""
    user = check_user(user)
    version = package_version(package_dir)
    files = {
        PASTE_FILE: paste(read_package(package_dir), version),
        DATASET_METADATA: _json(dataset_metadata(user, version)),
    }
    for notebook, metadata in kernel_metadata(user).items():
        files[KERNELS / notebook / "kernel-metadata.json"] = _json(metadata)
    return files


def _json(data: dict) -> str:
    return json.dumps(data, indent=2, ensure_ascii=False) + "\n"


def build_wheel(sources: dict[str, str], out_dir: Path) -> Path:
    """Build the ema_kit wheel from ``sources`` (as read_package gives them) into ``out_dir``, offline.

    The wheel is built from a copy holding just these modules, pyproject.toml, README.md and LICENSE, so it
    carries exactly the package's modules, whatever else lies in the checkout.
    """
    out_dir = Path(out_dir)
    with tempfile.TemporaryDirectory(prefix="ema_kit-wheel-") as tmp:
        project = Path(tmp) / "project"
        for name in ("pyproject.toml", "README.md", "LICENSE"):
            (project / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(REPO / name, project / name)
        for path, source in sources.items():
            (project / path).parent.mkdir(parents=True, exist_ok=True)
            (project / path).write_text(source, encoding="utf-8")
        wheels = Path(tmp) / "wheels"
        command = [sys.executable, "-m", "pip", "wheel", str(project), "--no-deps", "--no-build-isolation"]
        command += ["--no-index", "--quiet", "--wheel-dir", str(wheels)]
        result = subprocess.run(
            command,
            capture_output=True,
            text=True,
            env={**os.environ, "SOURCE_DATE_EPOCH": SOURCE_DATE_EPOCH},
        )
        built = sorted(wheels.glob("*.whl")) if result.returncode == 0 else []
        if len(built) != 1:
            raise BuildError(
                f"pip wheel failed ({' '.join(command)}):\n{result.stdout}{result.stderr}\n"
                "It builds offline with this environment's setuptools, which must read pyproject.toml "
                "(its license = 'MIT' needs setuptools >= 77): pip install -U setuptools."
            )
        out_dir.mkdir(parents=True, exist_ok=True)
        return Path(shutil.copy2(built[0], out_dir / built[0].name))


def build_dataset(out_dir: Path, user: str, package_dir: Path = PACKAGE) -> Path:
    """Write the dataset folder: the wheel, ema_kit_paste.py and dataset-metadata.json; returns it.

    The folder is replaced as a whole, and only once everything in it has been built.
    """
    out_dir = Path(out_dir)
    version = package_version(package_dir)
    sources = read_package(package_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}-", dir=out_dir.parent))
    try:
        wheel = build_wheel(sources, staging)
        if wheel.name != wheel_name(version):
            raise BuildError(f"pip built {wheel.name}, expected {wheel_name(version)}.")
        (staging / PASTE_FILE.name).write_text(paste(sources, version), encoding="utf-8")
        (staging / DATASET_METADATA.name).write_text(
            _json(dataset_metadata(check_user(user), version)), encoding="utf-8"
        )
        if out_dir.exists():
            shutil.rmtree(out_dir)
        staging.rename(out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out_dir


def _write(path: Path, text: str) -> None:
    """Write ``text`` only when it differs, through a rename (a reader never sees half a file)."""
    if path.is_file() and path.read_text(encoding="utf-8") == text:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _show(path: Path) -> str:
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--user", help=f"Kaggle username (default: the committed one, else {PLACEHOLDER_USER})"
    )
    parser.add_argument("--check", action="store_true", help="compare only; exit 1 if a file is out of date")
    args = parser.parse_args(argv)
    try:
        user = check_user(args.user) if args.user is not None else committed_user()
        files = generated_files(user)
        if args.check:
            stale = [
                path
                for path, text in files.items()
                if not path.is_file() or path.read_text(encoding="utf-8") != text
            ]
            for path in stale:
                print(f"out of date: {_show(path)}")
            if stale:
                print("Run `python kaggle/build.py` and commit the result (never edit them by hand).")
            return 1 if stale else 0
        for path, text in files.items():
            _write(path, text)
        dataset = build_dataset(DATASET, user)
    except BuildError as error:
        print(f"kaggle/build.py: {error}", file=sys.stderr)
        return 1
    print(f"wrote {_show(PASTE_FILE)}, the kernels' and dataset's metadata, and {_show(dataset)}/:")
    for path in sorted(dataset.iterdir()):
        print(f"    {path.name}  ({path.stat().st_size:,} bytes)")
    if user == PLACEHOLDER_USER:
        print(f"Kaggle username: still the placeholder {user!r}; pass --user NAME before publishing.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
