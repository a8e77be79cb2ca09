"""What ``fit`` costs over a hand-written loop doing the same work, on the demo model and data.

    python benchmarks/fit_overhead.py            # writes benchmarks/RESULTS_fit.md
    python benchmarks/fit_overhead.py --quick    # a smoke run: 1 round, no file written

Both train the demo's SmallCNN on the digits with SGD and a ModelEMA, and score the live and the EMA
model (loss and accuracy) on the validation set every epoch. Rounds are interleaved (each round runs
every variant once, in rotated order) and each figure is a median over rounds. A run is timed in two
parts: its epochs (from the first epoch's start to the end, per epoch: what every epoch costs) and its
start (from the call to the first epoch: ``fit``'s checks and its sanity pass, paid once per run). A
third variant adds what ``fit`` does besides training (the CSV log, the checkpoint, the PNG of the live
plot, the progress text), reported separately as the cost of the log and the plot.
"""

from __future__ import annotations

import argparse
import datetime
import io
import platform
import statistics
import tempfile
import time
from contextlib import redirect_stdout
from pathlib import Path

import torch
from torch import nn

from ema_kit import LiveLog, ModelEMA, evaluate, fit
from ema_kit.examples.demo import SmallCNN
from ema_kit.examples.digits import digits_loaders

HERE = Path(__file__).resolve().parent


def setup(seed: int = 0):
    torch.manual_seed(seed)
    train_loader, val_loader = digits_loaders(batch_size=32, seed=seed)
    model = SmallCNN()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    return model, optimizer, ModelEMA(model, decay=0.99), train_loader, val_loader


class FirstEpoch:
    """A ``fit`` callback noting when the first epoch starts."""

    def __init__(self):
        self.at: float | None = None

    def on_epoch_start(self, state) -> None:
        if self.at is None:
            self.at = time.perf_counter()


def hand_written(epochs: int) -> tuple[float, float]:
    """The loop a Kaggle notebook writes by hand: train, update the EMA, score both models.

    Returns its seconds per epoch and its start (none: the loop starts at once).
    """
    model, optimizer, ema, train_loader, val_loader = setup()
    started = time.perf_counter()
    for _ in range(epochs):
        model.train()
        for inputs, targets in train_loader:
            loss = nn.functional.cross_entropy(model(inputs), targets)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            ema.update(model)
            loss.item()  # the running loss every loop prints
        for scored in (model, ema.module):
            evaluate(scored, val_loader)
    return (time.perf_counter() - started) / epochs, 0.0


def with_fit(epochs: int, *, files: bool) -> tuple[float, float]:
    """``fit`` doing the same work: its seconds per epoch, and its start's seconds."""
    model, optimizer, ema, train_loader, val_loader = setup()
    first = FirstEpoch()
    with tempfile.TemporaryDirectory() as out_dir, redirect_stdout(io.StringIO()):
        started = time.perf_counter()
        fit(
            model,
            train_loader,
            val_loader,
            epochs=epochs,
            optimizer=optimizer,
            ema=ema,
            out_dir=out_dir if files else None,
            callbacks=[LiveLog(plot=files, progress="text" if files else "off"), first],
        )
        ended = time.perf_counter()
    return (ended - first.at) / epochs, first.at - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--epochs", type=int, default=3, help="epochs per timed run")
    parser.add_argument("--quick", action="store_true", help="smoke run: 1 round of 1 epoch, no file written")
    parser.add_argument("--out", type=Path, default=HERE / "RESULTS_fit.md")
    args = parser.parse_args()
    rounds, epochs = (1, 1) if args.quick else (args.rounds, args.epochs)
    variants = {
        "hand-written loop": lambda: hand_written(epochs),
        "fit (no files, no display)": lambda: with_fit(epochs, files=False),
        "fit + CSV, checkpoint, plot PNG, text progress": lambda: with_fit(epochs, files=True),
    }
    times = {name: [] for name in variants}
    starts = {name: [] for name in variants}
    names = list(variants)
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            per_epoch, start = variants[name]()
            times[name].append(per_epoch)
            starts[name].append(start)
    medians = {name: statistics.median(values) for name, values in times.items()}
    start = {name: statistics.median(values) for name, values in starts.items()}
    base = medians["hand-written loop"]
    lines = [
        "# fit overhead",
        "",
        f"Measured {datetime.date.today()} on {platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}, by "
        "`python benchmarks/fit_overhead.py` "
        f"({rounds} interleaved rounds of {epochs} epochs, medians).",
        "",
        "| variant | seconds per epoch | ratio to the hand-written loop | start, once per run (s) |",
        "| --- | ---: | ---: | ---: |",
        *(
            f"| {name} | {value:.3f} | {value / base:.3f}x | {start[name]:.3f} |"
            for name, value in medians.items()
        ),
        "",
        f"Target: fit's epochs at most 1.05x the hand-written loop's. This run: "
        f"{medians[names[1]] / base:.3f}x. The log, checkpoint, plot and progress add "
        f"{medians[names[2]] - medians[names[1]]:.3f} s per epoch. fit's start (its checks and the sanity "
        f"pass: a validation batch through the live model and the EMA) takes {start[names[1]]:.3f} s once "
        "per run.",
        "",
    ]
    print("\n".join(lines))
    if not args.quick:
        args.out.write_text("\n".join(lines))
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
