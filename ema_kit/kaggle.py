"""What the notebooks share: where inputs and outputs live, the two common Kaggle data layouts as datasets,
flip-TTA prediction, and a submission checked against the sample submission before it is written.

Kaggle mounts an attached input in one of two layouts: classic, ``/kaggle/input/<slug>/``, or today's,
``/kaggle/input/competitions/<slug>/``, ``/kaggle/input/datasets/<owner>/<slug>/`` and
``/kaggle/input/notebooks/<owner>/<slug>/`` (an earlier notebook's output). ``input_dir`` and ``find_file``
find an input in either, by its slug or, when it was mounted under another slug, by the files it holds.
On Kaggle a missing input is an error that names what to attach; only off Kaggle do the notebooks write
stand-in files from the built-in digits (``data/<name>/``) and their outputs to ``runs/<notebook>/``.

``EMA_KIT_SMOKE=1`` asks a notebook for smoke sizes (the tests set it); ``EMA_KIT_KAGGLE_ROOT`` points at
another folder laid out like ``/kaggle`` (the tests use it to run a notebook through the Kaggle paths).
"""

from __future__ import annotations

import math
import os
import shutil
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import Dataset

from . import _batches
from .files import atomic_write_text
from .train import _model_device, _resolve_amp

SMOKE_VARIABLE = "EMA_KIT_SMOKE"
ROOT_VARIABLE = "EMA_KIT_KAGGLE_ROOT"
# Set by Kaggle in every kernel, "Interactive" or "Batch" (Save & Run All).
RUN_TYPE_VARIABLE = "KAGGLE_KERNEL_RUN_TYPE"
# Today's layout: input/competitions/<slug>/, input/datasets/<owner>/<slug>/, input/notebooks/<owner>/<slug>/.
_GROUPS = {"competitions": "{}", "datasets": "*/{}", "notebooks": "*/{}", "models": "*/{}"}
# How deep under input/ a folder holding an input's files may lie: datasets/<owner>/<slug>/<subfolder>.
_SEARCH_DEPTH = 4
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
    nothing else is ever read in its place.

    Off Kaggle (see ``on_kaggle``) it is ``<local>/<name>``; with ``make``, a missing or empty folder is
    first filled by ``make(folder)`` (e.g. ``ema_kit.data.write_digit_recognizer``, stand-in files from
    the built-in digits), written to a temporary folder renamed when complete, so an interrupted run never
    leaves half the files. It prints which data it chose.

    Example:
        >>> import tempfile
        >>> from ema_kit.data import write_digit_recognizer
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
        folder = _locate([name], files, kaggle_root(root))
        if folder is None:
            raise FileNotFoundError(_not_attached(name, files, kaggle_root(root)))
        print(f"{name}: the attached Kaggle input {folder}")
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

    On Kaggle that notebook's output (or a dataset holding the file) is attached as an input: the file is
    looked for in the inputs named ``inputs`` (slugs, in either mount layout, as ``input_dir``), then in
    the one attached input that holds it, then in ``<root>/working``. Off Kaggle it is looked for in the
    ``local`` folders (e.g. the training notebook's ``runs/`` folder). The error says what to attach or run.

    Example:
        >>> import tempfile
        >>> kaggle = Path(tempfile.mkdtemp())
        >>> output = kaggle / "input" / "notebooks" / "someone" / "my-training-run"
        >>> output.mkdir(parents=True)
        >>> _ = (output / "model_ema.pth").write_bytes(b"")
        >>> find_file("model_ema.pth", inputs=["ema-kit-digit-recognizer"], root=kaggle).relative_to(kaggle)
        PosixPath('input/notebooks/someone/my-training-run/model_ema.pth')
    """
    names = _names("inputs", inputs)
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


def _locate(names: list[str], files: list[str], root: Path) -> Path | None:
    """The attached folder of an input named in ``names`` (holding ``files``), else the one holding ``files``.

    An input found by name may keep its files one or two folders down (a dataset made from a zip); found
    by its files alone, it must be the only attached folder that holds them: two would be a guess.
    """
    base = root / "input"
    for name in names:
        mounts = [base / name] + [
            p for group, pattern in _GROUPS.items() for p in sorted((base / group).glob(pattern.format(name)))
        ]
        for mount in (m for m in mounts if m.is_dir()):
            if not files:
                return mount
            holding = [folder for folder in _folders(mount, 2) if _holds(folder, files)]
            if holding:
                return holding[0]
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


class PixelCSVDataset(Dataset):
    """Images stored one per row as ``pixel0..pixelN`` columns (0..255), Kaggle's Digit Recognizer layout.

    Items are ``(image, label)`` with ``image`` a float tensor ``(1, side, side)`` in [0, 1], or the image
    alone when ``label=None`` (the test set). ``transform`` (e.g. ``RandomAffine()``) maps each image.

    Example:
        >>> frame = pd.DataFrame([[7] + [255] * 4], columns=["label", "pixel0", "pixel1", "pixel2", "pixel3"])
        >>> image, label = PixelCSVDataset(frame)[0]
        >>> tuple(image.shape), image.max().item(), label.item()
        ((1, 2, 2), 1.0, 7)
    """

    def __init__(
        self, frame: pd.DataFrame, *, label: str | None = "label", transform: Callable | None = None
    ):
        _check_frame(frame)
        if label is not None and label not in frame.columns:
            raise ValueError(
                f"label={label!r} is not a column of the frame (columns start {list(frame.columns[:3])}); "
                "for a test set without labels pass label=None."
            )
        pixels = [c for c in frame.columns if str(c).startswith("pixel")]
        side = math.isqrt(len(pixels))
        if not pixels or side * side != len(pixels):
            raise ValueError(
                f"The frame has {len(pixels)} pixel<i> columns; a square image needs a square number of them "
                "(784 for 28x28)."
            )
        values = torch.from_numpy(frame[pixels].to_numpy(dtype="uint8", copy=True))
        self.images = values.reshape(len(frame), 1, side, side)  # uint8: a quarter of the memory of floats
        self.labels = None if label is None else torch.tensor(frame[label].to_numpy(dtype="int64"))
        self.transform = transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int):
        image = self.images[index].float() / 255.0
        if self.transform is not None:
            image = self.transform(image)
        return image if self.labels is None else (image, self.labels[index])


class ImageFolderDataset(Dataset):
    """Image files on disk named by a CSV's id column (``folder/<id><suffix>``), read with PIL.

    Items are ``(image, label)`` with ``image`` a float tensor ``(channels, height, width)`` in [0, 1]
    (``mode`` "RGB" gives 3 channels, "L" one), or the image alone when ``label=None``. Files are read
    when an item is asked for, so the set need not fit in memory. Real sets mix image sizes, and a batch
    needs one: ``size`` resizes every image to ``size`` x ``size`` pixels (bilinear; the aspect ratio is
    not kept).

    Example:
        >>> import tempfile
        >>> from ema_kit.data import write_image_folder
        >>> folder = write_image_folder(tempfile.mkdtemp(), size=(12, 20))  # sides from 12 to 20 pixels
        >>> dataset = ImageFolderDataset(pd.read_csv(folder / "train.csv"), folder / "train", size=16)
        >>> image, label = dataset[0]
        >>> tuple(image.shape), label.dtype
        ((3, 16, 16), torch.int64)
    """

    def __init__(
        self,
        frame: pd.DataFrame,
        folder: str | os.PathLike,
        *,
        id_column: str = "id",
        label: str | None = "label",
        suffix: str = ".png",  # appended to each id to name its file; "" when ids already carry one
        mode: str = "RGB",  # PIL mode every image is converted to
        size: int | None = None,  # side every image is resized to; None keeps the files' sizes
        transform: Callable | None = None,
    ):
        _check_frame(frame)
        if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 1):
            raise ValueError(f"size must be a positive int (pixels per side) or None, got {size!r}.")
        for argument, column in (("id_column", id_column), ("label", label)):
            if column is not None and column not in frame.columns:
                raise ValueError(
                    f"{argument}={column!r} is not a column of the frame {list(frame.columns)}"
                    + ("; for a test set without labels pass label=None." if argument == "label" else ".")
                )
        self.folder = Path(folder)
        self.paths = [self.folder / f"{image_id}{suffix}" for image_id in frame[id_column]]
        missing = [p for p in self.paths[:1000] if not p.is_file()]  # a cheap check of the naming scheme
        if missing:
            raise FileNotFoundError(
                f"{len(missing)} of the first {min(len(self.paths), 1000)} images are missing, e.g. "
                f"{missing[0]}; check folder and suffix={suffix!r}."
            )
        self.labels = None if label is None else torch.tensor(frame[label].to_numpy(dtype="int64"))
        self.mode, self.size, self.transform = mode, size, transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        from PIL import Image  # imported here: only this layout needs Pillow

        with Image.open(self.paths[index]) as file:
            image = file.convert(self.mode)
        if self.size is not None:
            image = image.resize((self.size, self.size), Image.Resampling.BILINEAR)
        array = torch.from_numpy(np.array(image, dtype=np.uint8))
        image = (array.unsqueeze(0) if array.ndim == 2 else array.permute(2, 0, 1)).float() / 255.0
        if self.transform is not None:
            image = self.transform(image)
        return image if self.labels is None else (image, self.labels[index])


class RandomAffine:
    """Augmentation for one image tensor ``(C, H, W)``: a random rotation, shift and zoom, in plain torch.

    Draws from torch's global generator, so ``torch.manual_seed`` makes a run repeatable. Areas shifted
    in are zero (black), as the background of the digits.

    Example:
        >>> image = torch.zeros(1, 28, 28)
        >>> RandomAffine(degrees=10, translate=0.1, scale=0.1)(image).shape
        torch.Size([1, 28, 28])
    """

    def __init__(self, degrees: float = 10.0, translate: float = 0.1, scale: float = 0.1):
        limits = [("degrees", degrees, 180), ("translate", translate, 1), ("scale", scale, 1)]
        for name, value, limit in limits:
            if not 0 <= value < limit:
                raise ValueError(f"{name} must be in [0, {limit}), got {value!r}.")
        self.degrees, self.translate, self.scale = degrees, translate, scale

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        def uniform(limit: float) -> float:
            return (torch.rand(()).item() * 2 - 1) * limit

        angle = math.radians(uniform(self.degrees))
        zoom = 1 + uniform(self.scale)
        # affine_grid maps output to input coordinates in [-1, 1], so a shift of t image widths is 2t.
        shift_x, shift_y = 2 * uniform(self.translate), 2 * uniform(self.translate)
        cos, sin = math.cos(angle) / zoom, math.sin(angle) / zoom
        theta = torch.tensor([[[cos, -sin, shift_x], [sin, cos, shift_y]]], dtype=image.dtype)
        grid = F.affine_grid(theta, [1, *image.shape], align_corners=False)
        return F.grid_sample(image[None], grid, align_corners=False)[0]


@torch.no_grad()
def predict(
    model: nn.Module,
    loader: Iterable,
    *,
    tta: bool = False,
    amp: str | bool = "auto",
    target_key: str | None = None,
    output_key: int | str | None = None,
) -> torch.Tensor:
    """Class probabilities (softmax) of ``model`` for every item of ``loader``, in order, on the CPU.

    Batches are what ``fit`` takes, with or without targets: images, ``(inputs, ...)`` (the first item is
    the input, a tensor, tuple or dict as in ``fit``), or a dict whose entries other than ``target_key``
    are the model's keyword inputs; ``output_key`` picks the prediction from a tuple or dict output. They go
    to the model's device, under autocast on CUDA with ``amp="auto"``. ``tta=True`` averages the
    probabilities of each image and its mirror image (flipped left to right): it helps where a mirrored
    picture shows the same class (photos), not for digits or text. The model's train/eval mode is restored.

    Example:
        >>> model = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
        >>> probabilities = predict(model, [torch.zeros(5, 1, 2, 2)], tta=True)
        >>> tuple(probabilities.shape), torch.allclose(probabilities.sum(1), torch.ones(5))
        ((5, 3), True)
    """
    device = _model_device(model)
    amp_dtype = _resolve_amp(amp, device)
    was_training = model.training
    model.eval()
    outputs = []
    try:
        for batch in loader:
            if isinstance(batch, Mapping):
                inputs = {key: value for key, value in batch.items() if key != target_key}
            else:
                inputs = batch[0] if isinstance(batch, (tuple, list)) else batch
            if tta and not isinstance(inputs, torch.Tensor):
                raise ValueError(
                    f"tta=True mirrors image tensors, but this loader's inputs are a {type(inputs).__name__}:"
                    " predict without tta, or yield images."
                )
            inputs = _batches.to_device(inputs, device)
            with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
                probabilities = _batches.forward(model, inputs, output_key).float().softmax(dim=1)
                if tta:
                    mirrored = _batches.forward(model, inputs.flip(-1), output_key).float().softmax(dim=1)
                    probabilities = (probabilities + mirrored) / 2
            outputs.append(probabilities.cpu())
    finally:
        model.train(was_training)
    if not outputs:
        raise ValueError("The loader yielded no batches: there is nothing to predict.")
    return torch.cat(outputs)


def write_submission(
    frame: pd.DataFrame, sample: str | os.PathLike, path: str | os.PathLike = "submission.csv"
) -> Path:
    """Write ``frame`` as a submission CSV after checking it against the competition's sample submission.

    The columns must be the sample's, in its order, with the same number of rows, the same ids (its first
    column) and no missing values; a wrong submission is an error here rather than a failed scoring on
    Kaggle. The file is written atomically (a temporary file, then a rename). Returns ``path``.

    Example:
        >>> import tempfile
        >>> folder = Path(tempfile.mkdtemp())
        >>> pd.DataFrame({"ImageId": [1, 2], "Label": 0}).to_csv(folder / "sample.csv", index=False)
        >>> path = write_submission(pd.DataFrame({"ImageId": [1, 2], "Label": [3, 8]}), folder / "sample.csv",
        ...                         folder / "submission.csv")
        >>> path.read_text().splitlines()
        ['ImageId,Label', '1,3', '2,8']
    """
    if not isinstance(frame, pd.DataFrame):
        raise TypeError(f"frame must be a pandas DataFrame, got {type(frame).__name__}.")
    expected = pd.read_csv(sample)
    if list(frame.columns) != list(expected.columns):
        raise ValueError(
            f"The submission's columns {list(frame.columns)} differ from the sample submission's "
            f"{list(expected.columns)} ({sample}); name and order them as the sample does."
        )
    if len(frame) != len(expected):
        raise ValueError(
            f"The submission has {len(frame)} rows but the sample submission has {len(expected)}: predict "
            "every row of the test set, once."
        )
    ids = expected.columns[0]
    missing = set(expected[ids].astype(str)) - set(frame[ids].astype(str))
    if missing or frame[ids].duplicated().any():
        raise ValueError(
            f"The submission's {ids} column must hold the sample's ids, each once; "
            f"{len(missing)} are missing (e.g. {sorted(missing)[:3]}) or some appear twice."
        )
    empty = [c for c in frame.columns if frame[c].isna().any()]
    if empty:
        raise ValueError(f"The submission has missing values in column(s) {empty}; fill every cell.")
    return atomic_write_text(frame.to_csv(index=False), path)


def _check_frame(frame) -> None:
    if not isinstance(frame, pd.DataFrame):
        raise TypeError(f"frame must be a pandas DataFrame (pd.read_csv(...)), got {type(frame).__name__}.")
