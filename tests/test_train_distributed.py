"""fit under DistributedDataParallel (ema_kit/train.py): two CPU processes with gloo, one log, one writer."""

import contextlib
import multiprocessing

import pandas as pd
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

WORLD_SIZE = 2
multiprocessing.get_context("forkserver").set_forkserver_preload(["helpers", "torch", "pandas", "ema_kit"])


def train_on_rank(rank: int, folder) -> None:
    from ema_kit import LiveLog, ModelEMA, fit
    from ema_kit.examples.demo import SmallCNN
    from ema_kit.examples.digits import digits

    torch.set_num_threads(1)
    # A rendezvous in a file, not on a TCP port picked beforehand that another process could take first.
    dist.init_process_group(
        "gloo", init_method=f"file://{folder / 'rendezvous'}", rank=rank, world_size=WORLD_SIZE
    )
    try:
        images, labels = digits()
        train = TensorDataset(images[:256], labels[:256])
        train_loader = DataLoader(train, batch_size=32, sampler=DistributedSampler(train, seed=0))
        val_loader = DataLoader(TensorDataset(images[256:384], labels[256:384]), batch_size=64)
        torch.manual_seed(0)
        model = DistributedDataParallel(SmallCNN(width=8))
        ema = ModelEMA(model, decay=0.9)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        with open(folder / f"stdout{rank}.txt", "w") as out, contextlib.redirect_stdout(out):
            log = fit(model, train_loader, val_loader, epochs=2, optimizer=optimizer, ema=ema,
                      out_dir=folder / f"run{rank}", callbacks=[LiveLog(progress="text")])  # fmt: skip
        log.to_csv(folder / f"log{rank}.csv", index=False)
        torch.save(ema.module.state_dict(), folder / f"ema{rank}.pth")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_fit_under_ddp_gives_every_rank_the_same_log_and_only_rank_zero_writes(tmp_path):
    torch.multiprocessing.start_processes(
        train_on_rank, args=(tmp_path,), nprocs=WORLD_SIZE, start_method="forkserver"
    )
    logs = [pd.read_csv(tmp_path / f"log{rank}.csv") for rank in range(WORLD_SIZE)]
    pd.testing.assert_frame_equal(logs[0].drop(columns="seconds"), logs[1].drop(columns="seconds"))
    assert logs[0]["epoch"].tolist() == [1, 2]
    # Rank 0 wrote the run and its progress; rank 1 wrote and printed nothing.
    assert {p.name for p in (tmp_path / "run0").iterdir()} >= {
        "history.csv",
        "model_ema.pth",
        "checkpoint.pt",
    }
    assert not (tmp_path / "run1").exists()
    assert "epoch 2/2" in (tmp_path / "stdout0.txt").read_text()
    assert (tmp_path / "stdout1.txt").read_text() == ""
    # The weights are the same on both ranks after every step, and so is their EMA.
    emas = [torch.load(tmp_path / f"ema{rank}.pth", weights_only=True) for rank in range(WORLD_SIZE)]
    parameters = [k for k in emas[0] if "running" not in k and "num_batches" not in k]  # BN stats: per rank
    assert all(torch.equal(emas[0][k], emas[1][k]) for k in parameters)
