"""A DDP training script for the launch/watch tests, run by torchrun with any number of CPU processes.

    torchrun --nproc-per-node=N tests/ddp_train.py OUT_DIR [--epochs E] [--pause S] [--resume]

The global batch is 64 whatever N is (64 // N rows per process), so runs with 1 and 2 processes train on
the same batches. The model has no BatchNorm: with per-process batches BatchNorm normalises each by its own
statistics (SyncBatchNorm, which would not, runs on GPUs only), so N would change what is computed. Every
process saves its EMA to OUT_DIR/../ema_rank<r>.pth. ``--pause`` sleeps after each batch (the kill test
needs an epoch that lasts). It leaves with ``os._exit(0)``, as docs/distributed.md's script does: DDP keeps
gloo's threads alive past ``destroy_process_group``, and one can abort the process as Python shuts down.
"""

import argparse
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from ema_kit import Callback, LiveLog, ModelEMA, fit
from ema_kit.examples.digits import digits

GLOBAL_BATCH = 64


class Pause(Callback):
    def __init__(self, seconds: float):
        self.seconds = seconds

    def on_batch_end(self, state) -> None:
        time.sleep(self.seconds)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--pause", type=float, default=0.0)
    parser.add_argument("--resume", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    images, labels = digits()
    train = TensorDataset(images[:512], labels[:512])
    val = TensorDataset(images[512:768], labels[512:768])
    sampler = DistributedSampler(train, shuffle=True, seed=0)
    train_loader = DataLoader(train, batch_size=GLOBAL_BATCH // world, sampler=sampler, drop_last=True)
    val_loader = DataLoader(val, batch_size=128)
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.GroupNorm(2, 8), nn.ReLU(),
        nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.GroupNorm(4, 16), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10),
    )  # fmt: skip
    model = DistributedDataParallel(model)
    ema = ModelEMA(model, decay=0.9)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    callbacks = [LiveLog(progress="text", plot=False)] + ([Pause(args.pause)] if args.pause else [])
    fit(model, train_loader, val_loader, epochs=args.epochs, optimizer=optimizer, ema=ema, device="cpu",
        out_dir=args.out_dir, resume=args.resume, callbacks=callbacks)  # fmt: skip
    torch.save(ema.module.state_dict(), args.out_dir.parent / f"ema_rank{rank}.pth")
    dist.destroy_process_group()
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
