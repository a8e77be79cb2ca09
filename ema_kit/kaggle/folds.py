"""K-fold training with an EMA per fold: stratified folds, one ``fit`` per fold, out-of-fold predictions.

How a Kaggle competitor ships: split the training rows into K folds, train one model per fold on the
other K-1, judge the setup by the out-of-fold (OOF) score (every row predicted by the one model that did
not train on it), and submit the average of the K models' predictions. ``fit_folds`` runs the folds, each
into its own folder, and across kernel restarts: a finished fold is skipped, the unfinished one resumes
through ``fit``'s ``resume="auto"``. ``fold_models`` loads the K EMA models back for inference.

Files in ``out_dir``: ``folds.json`` (K, the seed, each row's fold), ``fold_<i>/`` (that fold's ``fit``
files, and its ``oof.csv`` once it is finished), ``oof.csv`` (every row's class probabilities from the live
and the EMA model), ``folds.csv`` (the table ``fit_folds`` returns) and ``folds.png`` (``plot_folds``).
"""

from __future__ import annotations

import copy
import io
import json
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from matplotlib.ticker import MaxNLocator
from torch import nn

from .._checks import check_int
from ..files import atomic_write_bytes, atomic_write_text, load_weights
from ..training.callbacks import Callback, FitState
from ..training.evaluate import accuracy, check_metrics, metric_value
from ..training.plot import EMA_COLORS, LIVE_COLOR, NotebookFigure
from .submission import predict

# A probability saved as 0 would make the OOF loss infinite: its log is floored here (float32's smallest).
_SMALLEST_PROBABILITY = float(torch.finfo(torch.float32).tiny)
_FOLD_FOLDER = re.compile(r"fold_(\d+)")


class FoldEnd(Callback):
    """Tells ``fit_folds`` how the fold's ``fit`` ended: pass it in ``fit``'s callbacks (``fold.callback``).

    It tells that the fold's fit ran and wrote where ``fit_folds`` looks for its files (``fold.out_dir``).
    The stop button needs no help: fit raises its ``KeyboardInterrupt`` again, which ends the folds
    before the stopped fold is marked finished.
    """

    def __init__(self):
        self.state: FitState | None = None

    def on_fit_end(self, state: FitState) -> None:
        self.state = state


@dataclass(frozen=True)
class Fold:
    """One fold, as ``fit_folds`` hands it to ``train_fold``."""

    index: int  # 0 .. k-1
    k: int
    train: np.ndarray  # positions of the rows to train on (the other folds' rows)
    val: np.ndarray  # positions of this fold's rows: validated on, and predicted out of fold
    out_dir: Path  # <out_dir>/fold_<index>: pass it to fit with resume="auto"
    seed: int  # torch's global generator is seeded with it just before train_fold is called
    callback: FoldEnd  # pass it to fit: callbacks=[fold.callback]


def stratified_folds(labels, *, k: int = 5, seed: int = 0) -> np.ndarray:
    """Each row's fold, 0..k-1, with every class spread evenly over the folds (scikit-learn's
    ``StratifiedKFold``, shuffled with ``seed``): the same labels, k and seed give the same folds.

    Example:
        >>> stratified_folds([0, 0, 0, 1, 1, 1], k=3).tolist()
        [2, 1, 0, 2, 0, 1]
    """
    from sklearn.model_selection import StratifiedKFold  # imported here: only the folds need scikit-learn

    labels = np.asarray(labels)
    if isinstance(k, bool) or not isinstance(k, int) or k < 2:
        raise ValueError(f"k must be an int of at least 2 (folds), got {k!r}.")
    smallest = pd.Series(labels).value_counts().min()
    if smallest < k:
        raise ValueError(
            f"k={k} folds need at least {k} rows of every class, but one class has {smallest}: "
            "lower k, or merge the rare classes for the split."
        )
    folds = np.empty(len(labels), dtype=np.int64)
    splitter = StratifiedKFold(n_splits=k, shuffle=True, random_state=seed)
    for fold, (_, val) in enumerate(splitter.split(np.zeros(len(labels)), labels)):
        folds[val] = fold
    return folds


def fit_folds(
    train_fold: Callable[[Fold], tuple[nn.Module, object]],
    labels,
    *,
    out_dir: str | os.PathLike,
    k: int = 5,
    seed: int = 0,  # the folds' shuffle; fold i seeds torch with seed + i
    metrics: Mapping | None = None,  # name -> metric or (metric, "min"|"max"), as fit's; default accuracy
    tta: bool = False,  # predict the held-out rows with flip TTA (see predict)
) -> pd.DataFrame:
    """Train a model per stratified fold of ``labels``, each with ``fit``, and predict every row out of fold.

    ``train_fold(fold)`` builds the fold's model, loaders and optimizer, calls ``fit(...,
    out_dir=fold.out_dir, resume="auto", callbacks=[fold.callback])`` (an EMA included, so that it writes
    ``model_ema.pth``) and returns ``(model, val_loader)``: the trained live model, and the unshuffled
    loader over exactly the rows ``fold.val``, in that order. ``fit_folds`` then predicts those rows with
    the live model (its weights after the last epoch) and with the EMA fit saved (``model_ema.pth``, its
    best epoch's: the weights that ship), and writes them to ``fold_<i>/oof.csv``, which marks the fold
    finished.

    Rerun after a kernel restart or Kaggle's time limit, it skips the finished folds and calls
    ``train_fold`` for the rest: fit resumes the interrupted one from its checkpoint. Torch's generator is
    seeded with ``fold.seed`` before each fold, so fold i trains the same whether the folds before it ran
    in this process or were skipped. A rerun with other labels, ``k`` or ``seed`` is refused: its folds
    would mix two splits. The stop button ends the folds too (a ``KeyboardInterrupt`` after fit has kept
    the fold's last finished epoch), and the stopped fold is not marked finished.

    Returns the table of the folds and of all rows out of fold (``folds.csv``): per row, ``rows``, the
    cross-entropy ``live_loss`` and ``ema_loss`` of the predicted probabilities, and each metric for the
    live and the EMA model, called with the log-probabilities as outputs (argmax and softmax read them as
    they read logits) and the labels as targets, on the whole fold at once (QWK and AUC need that).
    ``oof.csv`` holds every row's probabilities; ``folds.png`` the figure of ``plot_folds``.

    Example:
        >>> import tempfile
        >>> from ema_kit.training import LiveLog, fit
        >>> from ema_kit.examples.digits import digits
        >>> images, labels = digits()
        >>> def train_fold(fold):
        ...     model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
        ...     train = torch.utils.data.TensorDataset(images[fold.train], labels[fold.train])
        ...     val = torch.utils.data.TensorDataset(images[fold.val], labels[fold.val])
        ...     val_loader = torch.utils.data.DataLoader(val, batch_size=256)
        ...     fit(model, torch.utils.data.DataLoader(train, batch_size=64, shuffle=True), val_loader,
        ...         epochs=2, ema=0.9, optimizer=torch.optim.Adam(model.parameters(), lr=1e-2),
        ...         out_dir=fold.out_dir, resume="auto",
        ...         callbacks=[LiveLog(progress="off", plot=False), fold.callback])
        ...     return model, val_loader
        >>> table = fit_folds(train_fold, labels, out_dir=tempfile.mkdtemp(), k=3)  # doctest: +ELLIPSIS
        fold 0 of 3: ...
        >>> table.index.tolist(), list(table.columns)
        (['0', '1', '2', 'oof'], ['rows', 'live_loss', 'ema_loss', 'live_accuracy', 'ema_accuracy'])
    """
    if not callable(train_fold):
        raise TypeError(f"train_fold must be a function(fold) -> (model, val_loader), got {train_fold!r}.")
    metrics, _ = check_metrics({"accuracy": accuracy} if metrics is None else metrics)
    labels = np.asarray(labels)
    whole = labels.dtype.kind == "f" and bool(np.isfinite(labels).all() and (labels == labels.round()).all())
    if labels.ndim != 1 or not (labels.dtype.kind in "biu" or whole):
        raise TypeError(
            f"labels must hold one class index per row (0 to C-1, as the model's outputs number the "
            f"classes), got {labels.dtype} of shape {labels.shape}. Map other labels to the indices your "
            "model is trained on first, e.g. labels, classes = pd.factorize(frame['label'], sort=True)."
        )
    labels = labels.astype(np.int64) if whole else labels
    seed = check_int("seed", seed, minimum=0)  # numpy integers too: it is written to folds.json
    folds = stratified_folds(labels, k=k, seed=seed)
    out_dir = Path(out_dir)
    _record_split(out_dir, k=k, seed=seed, folds=folds)
    for index in range(k):
        fold = Fold(
            index=index,
            k=k,
            train=np.flatnonzero(folds != index),
            val=np.flatnonzero(folds == index),
            out_dir=out_dir / f"fold_{index}",
            seed=seed + index,
            callback=FoldEnd(),
        )
        finished = fold.out_dir / "oof.csv"
        if finished.is_file():
            print(f"fold {index} of {k}: finished earlier, skipped ({finished})")
            continue
        print(f"fold {index} of {k}: training on {len(fold.train)} rows, {len(fold.val)} held out")
        torch.manual_seed(fold.seed)
        _predict_fold(fold, train_fold(fold), labels, tta=tta)
    oof = pd.concat([pd.read_csv(out_dir / f"fold_{i}" / "oof.csv") for i in range(k)]).sort_values("row")
    atomic_write_text(oof.to_csv(index=False), out_dir / "oof.csv")
    table = _score_table(oof, metrics)
    atomic_write_text(table.to_csv(index_label="fold"), out_dir / "folds.csv")
    figure = plot_folds(out_dir)
    png = io.BytesIO()
    figure.savefig(png, format="png", dpi=100)
    atomic_write_bytes(png.getvalue(), out_dir / "folds.png")
    return table


def _order(loader) -> list[int] | None:
    """The dataset indices ``loader`` reads, in order (a random sampler gives another order each time);
    None where it cannot tell (an IterableDataset, or a plain list of batches)."""
    data = torch.utils.data
    if not isinstance(loader, data.DataLoader) or isinstance(loader.dataset, data.IterableDataset):
        return None
    batches = loader.batch_sampler or loader.sampler
    return [int(i) for batch in batches for i in np.asarray(batch).ravel()]  # indices, or batches of them


def fold_models(run: str | os.PathLike, build: Callable[[], nn.Module]) -> list[nn.Module]:
    """The K EMA models of a ``fit_folds`` run in ``run``: ``build()``, then fold i's ``model_ema.pth``.

    Every fold must be there and finished (its ``oof.csv`` written), and its weights must fit the model
    ``build`` makes: otherwise an error names the fold and says what to do. A ``fold_<i>`` folder beyond
    the run's K (another run's) is an error too, never a model quietly added to or left out of the ensemble.

    Example:
        >>> import tempfile
        >>> from ema_kit.files import save_weights
        >>> run = Path(tempfile.mkdtemp())
        >>> _ = (run / "folds.json").write_text('{"k": 2, "seed": 0, "folds": [0, 1]}')
        >>> for i in range(2):
        ...     _ = save_weights(nn.Linear(2, 3).state_dict(), run / f"fold_{i}" / "model_ema.pth")
        ...     _ = (run / f"fold_{i}" / "oof.csv").write_text("")
        >>> len(fold_models(run, lambda: nn.Linear(2, 3)))
        2
        >>> fold_models(run, lambda: nn.Linear(2, 4))  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: fold 0 of 2: .../fold_0/model_ema.pth does not fit the model build() makes ...
    """
    run = Path(run)
    split = run / "folds.json"
    if not split.is_file():
        raise FileNotFoundError(
            f"{split} does not exist: {run} is not the output of fit_folds (attach the training notebook's "
            "output, or run it first)."
        )
    k = json.loads(split.read_text())["k"]
    extra = sorted(
        p.name for p in run.iterdir() if (m := _FOLD_FOLDER.fullmatch(p.name)) and int(m.group(1)) >= k
    )
    if extra:
        raise ValueError(
            f"{run} holds {', '.join(extra)}, but its folds.json says k={k} (fold_0 .. fold_{k - 1}): the "
            "folder mixes two runs. Train into an empty folder, or delete the folders of the other run."
        )
    models = []
    for index in range(k):
        folder = run / f"fold_{index}"
        weights = folder / "model_ema.pth"
        if not (folder / "oof.csv").is_file() or not weights.is_file():
            raise FileNotFoundError(
                f"fold {index} of {k} is missing or unfinished in {run} ({weights} "
                f"{'exists, but the fold has no oof.csv' if weights.is_file() else 'does not exist'}): the "
                "training run stopped before it finished that fold. Run the training notebook again (it "
                "skips the finished folds and resumes this one), then use its new output."
            )
        model = build()
        try:
            model.load_state_dict(load_weights(weights))
        except RuntimeError as error:
            raise ValueError(
                f"fold {index} of {k}: {weights} does not fit the model build() makes (another "
                f"architecture, class count or image size than the run's?): {error}"
            ) from None
        models.append(model)
    return models


def plot_folds(run: str | os.PathLike) -> NotebookFigure:
    """One figure comparing the folds of a ``fit_folds`` run: the live and EMA score of each fold and out
    of fold (left), and each fold's validation curves, live dashed and EMA solid (right).

    The score is the table's first metric (the loss when there is none); the curves show it too when
    ``fit`` logged it, else the loss.
    """
    run = Path(run)
    table = pd.read_csv(run / "folds.csv", index_col="fold", dtype={"fold": str})
    score = [c.removeprefix("live_") for c in table.columns if c.startswith("live_")]
    score = score[1] if len(score) > 1 else score[0]  # the first metric, after the loss
    figure = NotebookFigure(figsize=(10, 3.6), layout="constrained")
    bars, curves = figure.subplots(1, 2)
    where = np.arange(len(table))
    bars.bar(where - 0.2, table[f"live_{score}"], width=0.4, color=LIVE_COLOR, label="live")
    bars.bar(where + 0.2, table[f"ema_{score}"], width=0.4, color=EMA_COLORS[0], label="EMA")
    low = min(table[f"live_{score}"].min(), table[f"ema_{score}"].min())
    high = max(table[f"live_{score}"].max(), table[f"ema_{score}"].max())
    margin = (high - low) * 0.5 or abs(high) * 0.05 or 0.05
    limits = [low - margin, high + margin]  # the differences, not the bars' common height, matter
    if 0 <= low and high <= 1:  # a fraction such as an accuracy: no axis past 1.0 or below 0
        limits = [max(limits[0], 0), min(limits[1], 1)]
    bars.set_ylim(*limits)
    bars.set_xticks(where, [f"fold {i}" if i != "oof" else "OOF" for i in table.index])
    bars.set_ylabel(score)
    bars.set_title(f"{score} per fold and OOF", loc="left")
    bars.legend(frameon=False, ncols=2, loc="lower right", bbox_to_anchor=(1, 1))  # above the bars
    histories = {i: pd.read_csv(run / f"fold_{i}" / "history.csv") for i in table.index if i != "oof"}
    # fit may have scored other metrics than the folds' table: then the curves show the loss.
    logged = score if all(f"live_{score}" in h for h in histories.values()) else "loss"
    for index, history in histories.items():
        color = f"C{(int(index) + 2) % 10}"  # C0 and C1 are live and EMA on the left
        curves.plot(history["epoch"], history[f"live_{logged}"], "--", color=color, alpha=0.7)
        emas = [c for c in history.columns if re.fullmatch(rf"ema[\d.e-]*_{re.escape(logged)}", c)]
        for column in emas:
            curves.plot(history["epoch"], history[column], "-", color=color, label=f"fold {index}")
    curves.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs, not 1.2, 1.4, ...
    curves.set_xlabel("epoch")
    curves.set_ylabel(f"validation {logged}")
    curves.set_title("each fold: live (dashed) and EMA (solid)")
    curves.legend(frameon=False, fontsize="small")
    return figure


def _record_split(out_dir: Path, *, k: int, seed: int, folds: np.ndarray) -> None:
    """Write the split to ``folds.json``, or check that it is the one the folder's earlier run used."""
    split = {"k": k, "seed": seed, "folds": folds.tolist()}
    path = out_dir / "folds.json"
    if path.is_file():
        saved = json.loads(path.read_text())
        if saved != split:
            differs = [name for name in split if saved.get(name) != split[name]]
            raise ValueError(
                f"{out_dir} holds a fit_folds run with another split ({', '.join(differs)} differ: "
                f"k={saved.get('k')}, seed={saved.get('seed')}, {len(saved.get('folds', []))} rows there; "
                f"k={k}, seed={seed}, {len(folds)} rows now). Pass the same labels, k and seed to continue "
                "it, or another out_dir for a new run."
            )
        return
    atomic_write_text(json.dumps(split), path)


def _predict_fold(fold: Fold, trained, labels: np.ndarray, *, tta: bool) -> None:
    """Predict the fold's held-out rows with the live model and the saved EMA; write ``oof.csv``."""
    if not (isinstance(trained, tuple) and len(trained) == 2 and isinstance(trained[0], nn.Module)):
        raise TypeError(
            f"train_fold must return (model, val_loader): the trained model and the loader over fold.val; "
            f"fold {fold.index} returned {type(trained).__name__}."
        )
    model, val_loader = trained
    ended = fold.callback.state
    if ended is None:
        raise ValueError(
            f"fold {fold.index}: train_fold must call fit(..., out_dir=fold.out_dir, resume='auto', "
            "callbacks=[fold.callback]): fold.callback tells fit_folds how the fold's fit ended."
        )
    if ended.out_dir is None or Path(ended.out_dir).resolve() != fold.out_dir.resolve():
        raise ValueError(
            f"fold {fold.index}: fit wrote to out_dir={ended.out_dir}, not to fold.out_dir ({fold.out_dir}), "
            "where fit_folds looks for the fold's files and checkpoint: pass out_dir=fold.out_dir."
        )
    order = _order(val_loader)
    in_order = order in (list(range(len(order or []))), fold.val.tolist())
    if order is not None and not (in_order and order == _order(val_loader)):
        raise ValueError(
            f"fold {fold.index}: the val_loader shuffles, or reads its dataset in another order than "
            "fold.val (a SubsetRandomSampler, say), so its predictions cannot be matched to the rows: build "
            "it over exactly the rows fold.val in order, with shuffle=False (a dataset of those rows, or "
            "sampler=fold.val over the whole dataset)."
        )
    weights = fold.out_dir / "model_ema.pth"
    if not weights.is_file():
        raise FileNotFoundError(
            f"fold {fold.index}: {weights} does not exist: fit writes it when it trains an EMA (fit's ema=, "
            "on by default; not None)."
        )
    ema_model = copy.deepcopy(model)
    ema_model.load_state_dict(load_weights(weights))
    # Batches and outputs read as the fold's fit read them (dict batches, tuple or dict outputs).
    reading = dict(tta=tta, target_key=ended.target_key, output_key=ended.output_key)
    live, ema = predict(model, val_loader, **reading), predict(ema_model, val_loader, **reading)
    if len(live) != len(fold.val):
        raise ValueError(
            f"fold {fold.index}: the val_loader gave {len(live)} rows, but the fold holds {len(fold.val)}: "
            "build it over exactly the rows fold.val, in that order (e.g. frame.iloc[fold.val])."
        )
    columns = {"row": fold.val, "fold": fold.index, "target": labels[fold.val]}
    for name, probabilities in (("live", live), ("ema", ema)):
        columns |= {f"{name}_{c}": probabilities[:, c].numpy() for c in range(probabilities.shape[1])}
    atomic_write_text(pd.DataFrame(columns).to_csv(index=False), fold.out_dir / "oof.csv")


def _score_table(oof: pd.DataFrame, metrics: Mapping) -> pd.DataFrame:
    """Loss and metrics of the live and EMA probabilities, per fold and over every row (``oof``)."""
    rows = {}
    for name, part in [*((str(i), p) for i, p in oof.groupby("fold")), ("oof", oof)]:
        targets = torch.tensor(part["target"].to_numpy())
        row = {"rows": len(part)}
        scores = {}
        for model in ("live", "ema"):
            probabilities = torch.tensor(part.filter(regex=rf"^{model}_\d+$").to_numpy())
            log_p = probabilities.clamp_min(_SMALLEST_PROBABILITY).log()
            scores[model] = {"loss": -log_p.gather(1, targets.long()[:, None]).mean().item()} | {
                m: metric_value(m, metric(log_p, targets)) for m, metric in metrics.items()
            }
        for score in scores["live"]:
            row |= {f"live_{score}": scores["live"][score], f"ema_{score}": scores["ema"][score]}
        rows[name] = row
    return pd.DataFrame.from_dict(rows, orient="index").rename_axis("fold")
