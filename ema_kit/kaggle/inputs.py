"""Where a notebook's inputs and outputs live, on Kaggle and elsewhere, and the smoke switch.

Kaggle mounts an attached input in one of two layouts: classic, ``/kaggle/input/<slug>/``, or today's,
``/kaggle/input/competitions/<slug>/``, ``/kaggle/input/datasets/<owner>/<slug>/``,
``/kaggle/input/models/<owner>/<slug>/`` and ``/kaggle/input/notebooks/<owner>/<slug>/`` (an earlier
notebook's output). ``input_dir`` and ``find_file``
find an input in either, by its slug or, when it was mounted under another slug, by the files it holds.
On Kaggle a missing input is an error that names what to attach; only off Kaggle do the notebooks write
stand-in files from the built-in digits (``data/<name>/``) and their outputs to ``runs/<notebook>/``.

``EMA_KIT_SMOKE=1`` asks a notebook for smoke sizes (the tests set it); ``EMA_KIT_KAGGLE_ROOT`` points at
another folder laid out like ``/kaggle`` (the tests use it to run a notebook through the Kaggle paths).
"""


from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterable
from pathlib import Path

SMOKE_VARIABLE = "EMA_KIT_SMOKE"
ROOT_VARIABLE = "EMA_KIT_KAGGLE_ROOT"
# Set by Kaggle in every kernel, "Interactive" or "Batch" (Save & Run All).
RUN_TYPE_VARIABLE = "KAGGLE_KERNEL_RUN_TYPE"
# Today's layout: input/competitions/<slug>/, input/datasets/<owner>/<slug>/, input/notebooks/<owner>/<slug>/,
# input/models/<owner>/<slug>/.
_GROUPS = {"competitions": "{}", "datasets": "*/{}", "notebooks": "*/{}", "models": "*/{}"}
# How deep under input/ a folder holding an input's files may lie: datasets/<owner>/<slug>/<subfolder>.
_SEARCH_DEPTH = 4
# How deep under an input found by its slug: a subfolder of a zip, or a Kaggle Model's files in
# <framework>/<variation>/<version>/ (e.g. pytorch/default/1/).
_NAMED_DEPTH = 3
# Left by input_dir in a local folder that make= wrote, so that later runs still say it holds stand-ins.
_STAND_IN_MARKER = ".ema_kit-stand-in"


def smoke() -> bool:
    """True when ``EMA_KIT_SMOKE`` is set (to anything but ``""`` or ``"0"``): run at smoke sizes.

    A notebook uses it only to shrink sizes (epochs, rows), never to skip a cell, so a test runs the code
    a user runs.

    Example:
        >>> os.environ[SMOKE_VARIABLE] = "1"
        >>> smoke()
        True
        >>> del os.environ[SMOKE_VARIABLE]
    """
    return os.environ.get(SMOKE_VARIABLE, "").strip() not in ("", "0")


def kaggle_root(root: str | os.PathLike | None = None) -> Path:
    """``root`` when given, else the folder ``EMA_KIT_KAGGLE_ROOT`` names, else ``/kaggle``.

    Example:
        >>> kaggle_root("/tmp/fake-kaggle")
        PosixPath('/tmp/fake-kaggle')
    """
    return Path(root if root is not None else os.environ.get(ROOT_VARIABLE) or "/kaggle")


def on_kaggle(*, root: str | os.PathLike | None = None) -> bool:
    """True in a Kaggle kernel: ``<root>/input`` exists, or Kaggle's ``KAGGLE_KERNEL_RUN_TYPE`` is set.

    Either is enough: a kernel with nothing attached may have no ``/kaggle/input`` at all.

    Example:
        >>> import tempfile
        >>> kaggle = Path(tempfile.mkdtemp())
        >>> (kaggle / "input").mkdir()
        >>> on_kaggle(root=kaggle)
        True
    """
    return (kaggle_root(root) / "input").is_dir() or bool(os.environ.get(RUN_TYPE_VARIABLE, "").strip())


def input_dir(
    name: str,
    *,
    files: Iterable[str] = (),
    make: Callable[[Path], object] | None = None,
    local: str | os.PathLike = "data",
    root: str | os.PathLike | None = None,
) -> Path:
    """The folder of the Kaggle input ``name`` (a competition's or dataset's slug), in either mount layout.

    On Kaggle it is ``<root>/input/<name>``, ``.../competitions/<name>``, ``.../datasets/<owner>/<name>``
    or ``.../notebooks/<owner>/<name>``, or, when the input was mounted under another slug, the one
    attached folder holding every one of ``files`` (e.g. ``("train.csv", "sample_submission.csv")``).
    Not found there is an error that names the input to attach and lists what is attached: on Kaggle
    nothing else is ever read in its place (nor where an input attached as ``name`` lacks ``files``, or two
    are attached under that name).

    Off Kaggle (see ``on_kaggle``) it is ``<local>/<name>``; with ``make``, a missing or empty folder is
    first filled by ``make(folder)`` (e.g. ``ema_kit.examples.digits.write_digit_recognizer``, stand-in
    files from the built-in digits), written to a temporary folder renamed when complete, so an
    interrupted run never leaves half the files. It prints which data it chose.

    Example:
        >>> import tempfile
        >>> from ema_kit.examples.digits import write_digit_recognizer
        >>> kaggle = Path(tempfile.mkdtemp())
        >>> write_digit_recognizer(kaggle / "input" / "competitions" / "digit-recognizer").name
        'digit-recognizer'
        >>> folder = input_dir("digit-recognizer", files=["train.csv"], root=kaggle)  # doctest: +ELLIPSIS
        digit-recognizer: the attached Kaggle input .../input/competitions/digit-recognizer
        >>> folder.relative_to(kaggle).as_posix()
        'input/competitions/digit-recognizer'
    """
    files = _names("files", files)
    if on_kaggle(root=root):
        folder = _locate(_slugs("name", [name]), files, kaggle_root(root), named_only=True)
        if folder is None:
            raise FileNotFoundError(_not_attached(name, files, kaggle_root(root)))
        named = name in folder.relative_to(kaggle_root(root) / "input").parts
        how = "" if named else f" (attached under another name; it holds {', '.join(files)})"
        print(f"{name}: the attached Kaggle input {folder}{how}")
        return folder
    folder = Path(local) / name
    if make is not None and not (folder.is_dir() and any(folder.iterdir())):
        partial = folder.with_name(f".{folder.name}.partial")
        if partial.exists():  # left by an interrupted run
            shutil.rmtree(partial)
        make(partial)
        (partial / _STAND_IN_MARKER).write_text(f"written by make={make!r}\n")
        if folder.exists():
            folder.rmdir()  # empty, checked above
        partial.rename(folder)
        print(f"{name}: not on Kaggle, so {folder} was written by make= (stand-in data, not the real files)")
        return folder
    if not folder.is_dir():
        raise FileNotFoundError(
            f"Input {name!r}: not on Kaggle, and {folder} does not exist. Put its files there (e.g. "
            f"`kaggle competitions download -c {name}`, unzipped), pass local= where they are, or pass "
            f"make= to write stand-in files."
        )
    stand_in = (folder / _STAND_IN_MARKER).is_file()
    print(
        f"{name}: the local folder {folder} (not on Kaggle"
        + ("; stand-in data written by make=)" if stand_in else ")")
    )
    return folder


def working_dir(
    name: str, *, local: str | os.PathLike = "runs", root: str | os.PathLike | None = None
) -> Path:
    """Where a notebook writes its outputs: ``<root>/working`` on Kaggle, else ``<local>/<name>``; created.

    Example:
        >>> import tempfile
        >>> kaggle = Path(tempfile.mkdtemp())
        >>> (kaggle / "input").mkdir()
        >>> working_dir("01_quickstart", root=kaggle) == kaggle / "working"
        True
    """
    folder = kaggle_root(root) / "working" if on_kaggle(root=root) else Path(local) / name
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def find_file(
    filename: str,
    *,
    inputs: Iterable[str] = (),
    local: Iterable[str | os.PathLike] = (),
    root: str | os.PathLike | None = None,
) -> Path:
    """``filename`` from an earlier run: e.g. the ``model_ema.pth`` a training notebook wrote.

    On Kaggle that notebook's output (or a dataset or Kaggle Model holding the file, such as pretrained
    weights) is attached as an input: the file is looked for in the inputs named ``inputs`` (slugs, in
    either mount layout, as ``input_dir``; a Kaggle Model's ``<framework>/<variation>/<version>/``
    included), then in the one attached input that holds it, then in ``<root>/working``. Off Kaggle it is
    looked for in the ``local`` folders (e.g. the training notebook's ``runs/`` folder). The error says what
    to attach or run.

    Example:
        >>> import tempfile
        >>> kaggle = Path(tempfile.mkdtemp())
        >>> output = kaggle / "input" / "notebooks" / "someone" / "my-training-run"
        >>> output.mkdir(parents=True)
        >>> _ = (output / "model_ema.pth").write_bytes(b"")
        >>> find_file("model_ema.pth", inputs=["ema-kit-digit-recognizer"], root=kaggle).relative_to(kaggle)
        PosixPath('input/notebooks/someone/my-training-run/model_ema.pth')
    """
    names = _slugs("inputs", inputs)
    if on_kaggle(root=root):
        base = kaggle_root(root)
        folder = _locate(names, [filename], base)
        if folder is not None:
            return folder / filename
        if (base / "working" / filename).is_file():
            return base / "working" / filename
        wanted = " or ".join(repr(name) for name in names) or "the notebook or dataset that holds it"
        raise FileNotFoundError(
            f"{filename} is in no input attached to this Kaggle notebook, nor in {base / 'working'}. Attach "
            f"{wanted} (Add Input: the training notebook's output, or a dataset holding {filename}), then "
            f"run again. {_attached_text(base)}"
        )
    folders = [Path(p) for p in local]
    for folder in folders:
        if (folder / filename).is_file():
            return folder / filename
    searched = "\n  ".join(str(folder / filename) for folder in folders) or "(no local= folders given)"
    raise FileNotFoundError(
        f"{filename} was not found; not on Kaggle, so searched:\n  {searched}\nRun the notebook that "
        f"writes it first (locally it writes its runs/ folder), or pass local= where it is."
    )


def _names(argument: str, values: Iterable[str]) -> list[str]:
    if isinstance(values, (str, bytes)) or not all(isinstance(value, str) for value in values):
        raise TypeError(f"{argument} must be a list of names, e.g. [{values!r}], got {values!r}.")
    return list(values)


def _slugs(argument: str, values: Iterable[str]) -> list[str]:
    """Input names: slugs, the last folder of an input's path, or ``owner/slug`` as kernel-metadata.json
    names datasets (a glob pattern would match any input)."""
    names = _names(argument, values)
    for name in names:
        parts = name.split("/")
        if len(parts) > 2 or not all(parts) or any(c in name for c in "\\*?[]") or {".", ".."} & set(parts):
            raise ValueError(
                f"{argument}: {name!r} is not an input's slug, the last folder of its path under "
                "/kaggle/input (e.g. 'digit-recognizer'), or owner/slug."
            )
    return names


def _locate(names: list[str], files: list[str], root: Path, *, named_only: bool = False) -> Path | None:
    """The attached folder of an input named in ``names`` (holding ``files``), else the one holding ``files``.

    An input found by name may keep its files up to three folders down (a dataset made from a zip, a Kaggle
    Model's ``<framework>/<variation>/<version>/``); two attached under one name, or found by its files
    alone, two holding them, would be a guess: an error. With ``named_only``, an input attached under a
    name asked for but without ``files`` is an error too, not a reason to look elsewhere.
    """
    base = root / "input"
    lacking = []  # inputs attached under a name asked for, without the files
    for name in names:
        owner, _, slug = name.rpartition("/")
        mounts = [base / slug] + [
            p
            for group, pattern in _GROUPS.items()
            for p in sorted((base / group).glob(pattern.format(slug)))
            if not owner or p.parent.name == owner
        ]
        found = []
        mounts = list({m.resolve(): m for m in mounts if m.is_dir()}.values())  # one input at two paths: once
        for mount in mounts:
            holding = [folder for folder in _folders(mount, _NAMED_DEPTH) if _holds(folder, files)]
            found += holding[:1]
            lacking += [] if holding else [mount]
        if len(found) > 1:
            raise FileNotFoundError(
                f"Several attached inputs are named {name!r}: {', '.join(map(str, found))}. Remove all but "
                "the one to use from the notebook's inputs: which one is meant would be a guess."
            )
        if found:
            return found[0]
    if lacking and named_only:
        raise FileNotFoundError(
            f"{', '.join(map(str, lacking))}: attached under the name asked for, but without "
            f"{' + '.join(files)} (within {_NAMED_DEPTH} folders down), and nothing else is read in its "
            f"place. Attach the version that holds them. {_attached_text(root)}"
        )
    if not files:
        return None
    holding = [folder for folder in _folders(base, _SEARCH_DEPTH) if _holds(folder, files)]
    if len(holding) > 1:
        raise FileNotFoundError(
            f"Several attached inputs hold {', '.join(files)}: {', '.join(map(str, holding))}. Name the one "
            f"to use by its slug (the last folder of its path) in place of {names}."
        )
    return holding[0] if holding else None


def _holds(folder: Path, files: list[str]) -> bool:
    return all((folder / name).is_file() for name in files)


def _folders(top: Path, depth: int) -> list[Path]:
    """``top`` and the folders below it, ``depth`` levels at most, shallowest first (sorted per level)."""
    found, level = [], [top] if top.is_dir() else []
    for _ in range(depth + 1):
        found += level
        below = []
        for folder in level:
            # scandir reads each entry's type with the listing: no stat per file in a folder of images.
            with os.scandir(folder) as entries:
                below += sorted(Path(e.path) for e in entries if e.is_dir() and not e.name.startswith("."))
        level = below
    return found


def _attached_text(root: Path) -> str:
    """What is attached under ``<root>/input``, one slug per input, for an error message."""
    base = root / "input"
    if not base.is_dir():
        return f"{base} does not exist: nothing is attached."
    attached = []
    for entry in sorted(base.iterdir()):
        if entry.name in _GROUPS and entry.is_dir():
            attached += sorted(
                p.relative_to(base).as_posix() for p in entry.glob(_GROUPS[entry.name].format("*"))
            )
        else:
            attached.append(entry.name)
    return f"Attached under {base}: {', '.join(attached) or 'nothing'}."


def _not_attached(name: str, files: list[str], root: Path) -> str:
    base = root / "input"
    holding = f", and no attached input holds {' + '.join(files)}" if files else ""
    return (
        f"Input {name!r} is not attached to this Kaggle notebook: it is neither at {base / name} nor at "
        f"{base}/competitions/{name} or {base}/datasets/<owner>/{name}{holding}. Attach it (Add Input, "
        f"search {name!r}) and run again; on Kaggle nothing else is read in its place. {_attached_text(root)}"
    )
