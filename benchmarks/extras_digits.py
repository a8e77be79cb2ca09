"""Switch EMA and BatchNorm refresh on the digits demo: live vs EMA vs switch-EMA, EMA with and without BN.

    python benchmarks/extras_digits.py            # 3 seeds of 20 epochs, writes benchmarks/RESULTS_extras.md
    python benchmarks/extras_digits.py --quick    # a smoke run: 1 seed of 2 epochs, no file written

Each seed trains the demo's SmallCNN on scikit-learn's digits (1,348 train / 449 validation images) the
way ``python -m ema_kit demo`` does (SGD, lr 0.05, momentum 0.9, weight decay 5e-4, batch 32, EMA
decay 0.99 with warmup), twice from the same initial weights and data order:

- plain: ``fit`` with the EMA, scoring the live model and the EMA each epoch; after each epoch a copy of
  the EMA also gets its BatchNorm statistics recomputed (``ema_kit.bn.recompute_bn``, one pass over the
  training loader) and is scored as well;
- switch: the same with ``SwitchEMA(ema, every="epoch")``, which copies the EMA into the live model after
  each epoch (the optimizer state is kept).

The BN refresh reads the training loader, which draws from its shuffle generator; both runs do it, so
they see the same data order (not the order of a run without the refresh).
"""

from __future__ import annotations

import argparse
import copy
import datetime
import statistics
import sys
import time
from pathlib import Path

import pandas as pd
import torch
from timing import machine

from ema_kit import LiveLog, ModelEMA, evaluate, fit
from ema_kit.bn import recompute_bn
from ema_kit.examples.demo import SmallCNN
from ema_kit.examples.digits import digits_loaders
from ema_kit.training.switch import SwitchEMA

HERE = Path(__file__).resolve().parent
DECAY = 0.99


class ScoreRefreshedBN:
    """After each epoch, scores a copy of the EMA whose BatchNorm statistics were recomputed."""

    def __init__(self, ema: ModelEMA, train_loader, val_loader):
        self.ema, self.train_loader, self.val_loader = ema, train_loader, val_loader
        self.rows = []

    def on_epoch_end(self, state) -> None:
        refreshed = copy.deepcopy(self.ema.module)
        recompute_bn(refreshed, self.train_loader)
        scores = evaluate(refreshed, self.val_loader)
        self.rows.append({"ema_bn_loss": scores["loss"], "ema_bn_accuracy": scores["accuracy"]})


def train(seed: int, epochs: int, *, switch: bool) -> pd.DataFrame:
    """One run's log, with the BN-refreshed EMA's scores as extra columns."""
    torch.manual_seed(seed)
    train_loader, val_loader = digits_loaders(batch_size=32, seed=seed)
    model = SmallCNN()
    ema = ModelEMA(model, decay=DECAY)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    refreshed = ScoreRefreshedBN(ema, train_loader, val_loader)
    callbacks = [SwitchEMA(ema, every="epoch"), refreshed] if switch else [refreshed]
    log = fit(
        model,
        train_loader,
        val_loader,
        epochs=epochs,
        optimizer=optimizer,
        ema=ema,
        callbacks=[*callbacks, LiveLog(progress="off", plot=False)],
    )
    return pd.concat([log, pd.DataFrame(refreshed.rows)], axis=1)


def run(seeds: list[int], epochs: int) -> pd.DataFrame:
    """Per seed and epoch: every model's validation loss and accuracy, from both runs."""
    frames = []
    for seed in seeds:
        plain, switched = train(seed, epochs, switch=False), train(seed, epochs, switch=True)
        print(f"seed {seed} done", file=sys.stderr, flush=True)
        frame = pd.DataFrame({"seed": seed, "epoch": plain["epoch"]})
        for score in ("loss", "accuracy"):
            frame[f"live_{score}"] = plain[f"live_{score}"]
            frame[f"ema_{score}"] = plain[f"ema_{score}"]
            frame[f"ema_bn_{score}"] = plain[f"ema_bn_{score}"]
            frame[f"switch_ema_{score}"] = switched[f"ema_{score}"]
            frame[f"switch_live_{score}"] = switched[f"live_{score}"]
            frame[f"switch_ema_bn_{score}"] = switched[f"ema_bn_{score}"]
        frames.append(frame)
    return pd.concat(frames, ignore_index=True)


COLUMNS = {  # column prefix -> what it is
    "live": "live model (plain run)",
    "ema": "EMA (plain run)",
    "ema_bn": "EMA, BN recomputed (plain run)",
    "switch_live": "live model before the switch (switch run)",
    "switch_ema": "switch-EMA: the EMA of the switch run",
    "switch_ema_bn": "switch-EMA, BN recomputed",
}


def summary(results: pd.DataFrame) -> list[str]:
    last = results[results["epoch"] == results["epoch"].max()]
    seeds = sorted(last["seed"])
    head = "| model | " + " | ".join(f"loss, seed {s}" for s in seeds) + " | mean loss | mean accuracy |"
    lines = [head, "| --- |" + " ---: |" * (len(seeds) + 2)]
    for prefix, label in COLUMNS.items():
        losses = last[f"{prefix}_loss"].tolist()
        accuracies = last[f"{prefix}_accuracy"].tolist()
        lines.append(
            f"| {label} | "
            + " | ".join(f"{v:.4f}" for v in losses)
            + f" | {statistics.mean(losses):.4f} | {statistics.mean(accuracies):.4f} |"
        )
    return lines


def by_epoch(results: pd.DataFrame) -> list[str]:
    """Mean validation loss over seeds at a few epochs, to show the course of training."""
    last = int(results["epoch"].max())
    epochs = sorted({e for e in (1, 2, 5, 10, 15, last) if e <= last})
    means = results.groupby("epoch")[[f"{prefix}_loss" for prefix in COLUMNS]].mean()
    lines = [
        "| model | " + " | ".join(f"epoch {e}" for e in epochs) + " |",
        "| --- |" + " ---: |" * len(epochs),
    ]
    for prefix, label in COLUMNS.items():
        lines.append(
            f"| {label} | " + " | ".join(f"{means.at[e, f'{prefix}_loss']:.4f}" for e in epochs) + " |"
        )
    return lines


def wins(results: pd.DataFrame, ours: str, theirs: str) -> str:
    better = (results[f"{ours}_loss"] < results[f"{theirs}_loss"]).sum()
    return f"{better} of {len(results)} (seed, epoch) pairs"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--quick", action="store_true", help="smoke run: 1 seed of 2 epochs, no file written")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.seeds, args.epochs = 1, 2
    started = time.perf_counter()
    results = run(list(range(args.seeds)), args.epochs)
    text = "\n".join(
        [
            "# Switch EMA and BatchNorm refresh on the digits demo",
            "",
            f"Measured {datetime.date.today()} on {machine()}, by `python benchmarks/extras_digits.py "
            f"--seeds {args.seeds} --epochs {args.epochs}` ({time.perf_counter() - started:.0f} s). "
            f"SmallCNN, SGD lr 0.05, batch 32, EMA decay {DECAY}; validation loss after the last epoch "
            "(lower is better), and the mean accuracy over seeds.",
            "",
            *summary(results),
            "",
            "Mean validation loss over seeds during training:",
            "",
            *by_epoch(results),
            "",
            "Over every epoch of every seed, lower validation loss:",
            "",
            f"- switch-EMA vs EMA: {wins(results, 'switch_ema', 'ema')}",
            f"- EMA vs live: {wins(results, 'ema', 'live')}",
            f"- EMA with BN recomputed vs EMA: {wins(results, 'ema_bn', 'ema')}",
            f"- switch-EMA with BN recomputed vs switch-EMA: {wins(results, 'switch_ema_bn', 'switch_ema')}",
        ]
    )
    print(text)
    if not args.quick:
        (HERE / "RESULTS_extras.md").write_text(text + "\n")
        results.to_csv(HERE / "extras_digits.csv", index=False)
        print(f"\nwrote {HERE / 'RESULTS_extras.md'} and extras_digits.csv", file=sys.stderr)


if __name__ == "__main__":
    main()
