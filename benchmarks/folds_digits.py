"""K-fold training with an EMA per fold, judged on digits no fold trained on: each fold's live and EMA model,
and the 5-fold ensembles of the live models and of the EMAs.

    python benchmarks/folds_digits.py          # 3 seeds, 5 folds of 10 epochs: benchmarks/RESULTS_folds.md
    python benchmarks/folds_digits.py --quick  # a smoke run: 1 seed, 2 folds of 1 epoch, no file written

Per seed, scikit-learn's 1,797 digits are split once (stratified, with the seed) into 449 held-out rows
and 1,348 rows that ``ema_kit.kaggle.fit_folds`` splits into 5 stratified folds. Each fold trains the
demo's SmallCNN the way ``python -m ema_kit demo`` does (SGD, lr 0.05, momentum 0.9, weight decay 5e-4,
batch 32, EMA decay 0.99 with warmup) on 4 folds, scored on the fifth every epoch. Then, on the held-out
rows: each fold's live model (its last epoch's weights) and EMA (``model_ema.pth``: the epoch with the
best EMA validation accuracy on its fold, what a submission ships), and the mean of the 5 models' class
probabilities, for the live models and for the EMAs. Loss is the mean negative log of the probability
given to the true class; the OOF columns are ``fit_folds``'s own out-of-fold scores on the 1,348 rows.
"""

from __future__ import annotations

import argparse
import datetime
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch
from sklearn.model_selection import train_test_split
from timing import machine
from torch.utils.data import DataLoader, TensorDataset

from ema_kit import LiveLog, ModelEMA, fit
from ema_kit.examples.demo import SmallCNN
from ema_kit.examples.digits import digits
from ema_kit.kaggle import fit_folds, fold_models, predict

HERE = Path(__file__).resolve().parent
DECAY = 0.99
HELD_OUT = 449  # rows no fold trains or validates on (a quarter of the digits)


def scores(probabilities: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
    """Accuracy and the mean negative log-probability of the true class."""
    chosen = probabilities.gather(1, targets[:, None]).squeeze(1)
    return {
        "accuracy": (probabilities.argmax(1) == targets).float().mean().item(),
        "loss": -chosen.clamp_min(torch.finfo(torch.float32).tiny).log().mean().item(),
    }


def one_seed(seed: int, *, k: int, epochs: int, folder: Path) -> list[dict]:
    """Rows of (seed, model, fold, accuracy, loss) on the held-out digits, and the OOF scores."""
    images, labels = digits()
    pool, held = train_test_split(range(len(labels)), test_size=HELD_OUT, stratify=labels, random_state=seed)
    pool, held = torch.tensor(pool), torch.tensor(held)
    live_models, last_emas = {}, {}

    def train_fold(fold):
        rows_train, rows_val = pool[fold.train], pool[fold.val]
        order = torch.Generator().manual_seed(fold.seed)
        train_set = TensorDataset(images[rows_train], labels[rows_train])
        train_loader = DataLoader(train_set, batch_size=32, shuffle=True, generator=order)
        val_loader = DataLoader(TensorDataset(images[rows_val], labels[rows_val]), batch_size=256)
        model = SmallCNN()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
        ema, quiet = ModelEMA(model, decay=DECAY), LiveLog(progress="off", plot=False)
        fit(model, train_loader, val_loader, epochs=epochs, optimizer=optimizer, ema=ema,
            out_dir=fold.out_dir, resume="auto", callbacks=[quiet, fold.callback])  # fmt: skip
        live_models[fold.index], last_emas[fold.index] = model, ema.module  # both after the last epoch
        return model, val_loader

    table = fit_folds(train_fold, labels[pool], out_dir=folder, k=k, seed=seed)
    emas = fold_models(folder, SmallCNN)
    test = [images[held]]
    targets = labels[held]
    live = [predict(live_models[i], test) for i in range(k)]
    ema = [predict(model, test) for model in emas]
    last = [predict(last_emas[i], test) for i in range(k)]
    rows = []
    for i in range(k):
        rows.append({"seed": seed, "model": "live", "fold": i, **scores(live[i], targets)})
        rows.append({"seed": seed, "model": "ema", "fold": i, **scores(ema[i], targets)})
        rows.append({"seed": seed, "model": "last_ema", "fold": i, **scores(last[i], targets)})
    for model, probabilities in (("live", live), ("ema", ema), ("last_ema", last)):
        ensemble = scores(torch.stack(probabilities).mean(0), targets)
        rows.append({"seed": seed, "model": model, "fold": "ensemble", **ensemble})
    for model in ("live", "ema"):
        oof = {"accuracy": table.at["oof", f"{model}_accuracy"], "loss": table.at["oof", f"{model}_loss"]}
        rows.append({"seed": seed, "model": model, "fold": "oof", **oof})
    return rows


def report(results: pd.DataFrame, *, k: int) -> list[str]:
    seeds = sorted(results["seed"].unique())
    single = results[~results["fold"].isin(["ensemble", "oof"])]
    lines = [
        "| model | " + " | ".join(f"seed {s}: accuracy / loss" for s in seeds) + " | accuracy | loss |",
        "| --- |" + " ---: |" * (len(seeds) + 2),
    ]

    def row(label: str, part: pd.DataFrame) -> str:
        per_seed = part.groupby("seed")[["accuracy", "loss"]].mean()
        cells = [f"{per_seed.at[s, 'accuracy']:.4f} / {per_seed.at[s, 'loss']:.4f}" for s in seeds]
        return (f"| {label} | " + " | ".join(cells)
                + f" | {per_seed['accuracy'].mean():.4f} | {per_seed['loss'].mean():.4f} |")  # fmt: skip

    names = {"live": "live model", "ema": "EMA (best epoch)", "last_ema": "EMA at the last epoch"}
    for model, name in names.items():
        part = single[single["model"] == model]
        lines.append(row(f"(a) one fold's {name} (mean of the {k} folds)", part))
    ensembles = {"live": "live models", "ema": "EMAs (best epoch)", "last_ema": "EMAs at the last epoch"}
    for (model, name), label in zip(ensembles.items(), "bcd"):
        part = results[(results["model"] == model) & (results["fold"] == "ensemble")]
        lines.append(row(f"({label}) {k}-fold ensemble of the {name}", part))
    for model, name in (("live", "live"), ("ema", "EMA")):
        part = results[(results["model"] == model) & (results["fold"] == "oof")]
        lines.append(row(f"OOF score of the {name} models (on the {k} folds' own rows, not held out)", part))
    by_model = {model: single[single["model"] == model].set_index(["seed", "fold"]) for model in names}
    live = by_model["live"]
    lines.append("")
    for model in ("ema", "last_ema"):
        ema = by_model[model]
        lines.append(
            f"Each fold's {names[model]} against its live model, over {len(live)} (seed, fold) models: lower "
            f"held-out loss in {int((ema['loss'] < live['loss']).sum())}, higher accuracy in "
            f"{int((ema['accuracy'] > live['accuracy']).sum())}, lower in "
            f"{int((ema['accuracy'] < live['accuracy']).sum())}."
        )
    lines += [
        "",
        "Per fold, on the held-out rows (accuracy / loss):",
        "",
        "| seed | fold | live | EMA (best epoch) | EMA at the last epoch |",
        "| ---: | ---: | ---: | ---: | ---: |",
    ]
    for seed, fold in live.index:
        cells = [by_model[m].loc[(seed, fold)] for m in names]
        pairs = [f"{c['accuracy']:.4f} / {c['loss']:.4f}" for c in cells]
        lines.append(f"| {seed} | {fold} | " + " | ".join(pairs) + " |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--quick", action="store_true", help="smoke run: 1 seed, 2 folds of 1 epoch, no file")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.seeds, args.folds, args.epochs = 1, 2, 1
    started = time.perf_counter()
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        for seed in range(args.seeds):
            rows += one_seed(seed, k=args.folds, epochs=args.epochs, folder=Path(scratch) / f"seed_{seed}")
            print(f"seed {seed} done", file=sys.stderr, flush=True)
    results = pd.DataFrame(rows)
    seconds = time.perf_counter() - started
    text = "\n".join(
        [
            "# K-fold training with an EMA per fold, on held-out digits",
            "",
            f"Measured {datetime.date.today()} on {machine()}, by `python benchmarks/folds_digits.py --seeds "
            f"{args.seeds} --folds {args.folds} --epochs {args.epochs}` ({seconds:.0f} s). Per seed: "
            f"{HELD_OUT} held-out digits no fold trained on, {args.folds} stratified folds over the other "
            f"{1797 - HELD_OUT}; SmallCNN, SGD lr 0.05, batch 32, {args.epochs} epochs per fold, EMA decay "
            f"{DECAY} (with warmup). A fold's live model is its last epoch's weights; its EMA (best epoch) "
            "is `model_ema.pth`, the epoch whose EMA scored best on that fold's rows (what a submission "
            "ships); its EMA at the last epoch is the EMA when training ended. An ensemble averages the "
            f"{args.folds} models' class probabilities. Loss: mean negative log-probability of the true "
            "class (lower is better); the last two columns are means over the seeds.",
            "",
            *report(results, k=args.folds),
        ]
    )
    print(text)
    if not args.quick:
        (HERE / "RESULTS_folds.md").write_text(text + "\n")
        print(f"\nwrote {HERE / 'RESULTS_folds.md'}", file=sys.stderr)


if __name__ == "__main__":
    main()
