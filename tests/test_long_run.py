"""A long run with the live plot on (ema_kit/train.py, plot.py): memory stays flat, figures do not pile up."""

import gc
import warnings

import torch
from matplotlib.figure import Figure
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from ema_kit import fit


def resident_mb() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * 4096 / 2**20


def test_300_epochs_with_the_live_plot_keep_memory_flat(tmp_path):
    torch.manual_seed(0)
    data = TensorDataset(torch.randn(64, 8), torch.randint(0, 3, (64,)))
    model = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3))
    memory, figures = [], []

    class Watch:
        def on_epoch_end(self, state):
            if state.epoch % 25 == 0:
                gc.collect()
                memory.append(resident_mb())
                with warnings.catch_warnings():  # touching every object wakes torch's deprecated aliases
                    warnings.simplefilter("ignore", FutureWarning)
                    figures.append(sum(isinstance(o, Figure) for o in gc.get_objects()))

    log = fit(
        model, DataLoader(data, batch_size=32, shuffle=True), DataLoader(data, batch_size=64), epochs=300,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.01), ema=0.9, out_dir=tmp_path, plot=True,
        progress="text", callbacks=[Watch()],
    )  # fmt: skip
    assert len(log) == 300 and (tmp_path / "history.png").exists()
    growth = memory[-1] - memory[1]  # from epoch 50, after the first draws warmed the caches up
    print(f"resident memory at epochs 25..300 (MB): {[round(m, 1) for m in memory]}; growth {growth:.1f} MB")
    assert growth < 15, memory
    assert max(figures) <= 1, figures  # one figure, reused
