"""The demo: a small CNN trained on real handwritten digits with an EMA, live vs EMA plotted per epoch.

python -m ema_kit demo                      # writes runs/demo/: history.csv, history.png, model_ema.pth
python -m ema_kit demo --epochs 30 --decay 0.995 --out runs/longer
python -m ema_kit demo --epochs 30 --resume   # continue runs/demo where it stopped (fresh if it is empty)
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import pandas as pd
import torch
from torch import nn

from ..ema import ModelEMA
from ..kaggle.inputs import smoke
from ..training import LiveLog, fit
from .digits import digits_loaders


class SmallCNN(nn.Sequential):
    """A small CNN for 1-channel digit images of any size (8x8 here, 28x28 in Digit Recognizer).

    Example:
        >>> SmallCNN()(torch.zeros(2, 1, 8, 8)).shape
        torch.Size([2, 10])
    """

    def __init__(self, num_classes: int = 10, width: int = 32, in_channels: int = 1):
        def block(cin: int, cout: int, stride: int) -> list[nn.Module]:
            return [
                nn.Conv2d(cin, cout, 3, stride, 1, bias=False),
                nn.BatchNorm2d(cout),
                nn.ReLU(inplace=True),
            ]

        super().__init__(
            *block(in_channels, width, 1),
            *block(width, width, 1),
            *block(width, 2 * width, 2),
            *block(2 * width, 2 * width, 1),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Dropout(0.2),
            nn.Linear(2 * width, num_classes),
        )


def run(
    *,
    epochs: int = 20,
    decay: float = 0.99,
    out_dir: str | Path = "runs/demo",
    lr: float = 0.05,
    seed: int = 0,
    progress: str = "auto",
    resume: bool | str | os.PathLike = False,
) -> pd.DataFrame:
    """Train the demo and write ``out_dir``; returns the log.

    ``resume`` as for ``fit`` (``"auto"``: continue the run in ``out_dir`` if there is one). Without it,
    the demo starts over in ``out_dir`` (``resume="overwrite"``): the folder is the demo's own.

    Example:
        >>> import tempfile
        >>> log = run(epochs=1, out_dir=tempfile.mkdtemp(), progress="off")
        >>> len(log)
        1
    """
    torch.manual_seed(seed)
    train_loader, val_loader = digits_loaders(batch_size=32, seed=seed)
    model = SmallCNN()
    ema = ModelEMA(model, decay=decay)
    # Plain SGD at a brisk learning rate: the live weights keep jittering between good solutions, which is
    # what an EMA averages out.
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
    return fit(
        model,
        train_loader,
        val_loader,
        epochs=epochs,
        optimizer=optimizer,
        ema=ema,
        out_dir=out_dir,
        resume=resume or "overwrite",  # the folder is the demo's own
        callbacks=[LiveLog(progress=progress)],
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m ema_kit demo", description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--decay", type=float, default=0.99, help="EMA decay per step (default 0.99)")
    parser.add_argument("--out", type=Path, default=Path("runs/demo"), help="output folder")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--resume", action="store_true", help="continue the run in --out (without it, the demo starts over)"
    )
    args = parser.parse_args(argv)
    if smoke() and args.epochs > 2:  # the docs test runs the README's command
        print(f"EMA_KIT_SMOKE is set: 2 epochs instead of {args.epochs}.")
        args.epochs = 2
    started = time.perf_counter()
    try:
        log = run(
            epochs=args.epochs,
            decay=args.decay,
            out_dir=args.out,
            seed=args.seed,
            resume="auto" if args.resume else False,
        )
    except KeyboardInterrupt as stop:  # Ctrl-C: fit's message says what was kept; no traceback
        print(f"\n{stop}")
        raise SystemExit(130) from None  # 128 + SIGINT, as a shell reports an interrupted command
    last = log.iloc[-1]
    print(
        f"\n{len(log)} epochs in {time.perf_counter() - started:.1f} s. Last epoch: live accuracy "
        f"{last['live_accuracy']:.4f}, EMA accuracy {last['ema_accuracy']:.4f}; live loss "
        f"{last['live_loss']:.4f}, EMA loss {last['ema_loss']:.4f}.\nWrote {args.out}/: history.csv, "
        "history.png, model_ema.pth (the best EMA weights), checkpoint.pt."
    )
