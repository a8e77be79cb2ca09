"""A long run with the live plot on (ema_kit/train.py, plot.py): memory stays flat, figures do not pile up."""

import gc
import warnings

import pytest
import torch
from matplotlib.figure import Figure
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from ema_kit import LiveLog, fit

EPOCHS, EVERY = 120, 10
# What a leak may add per epoch: ~60 KB, the bound the first version of this test held over 250 epochs
# (15 MB). One more kept figure (~1 MB) or PNG of the plot (~40 KB) per epoch crosses it within the run.
LEAK_PER_EPOCH_MB = 0.06


def resident_mb() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * 4096 / 2**20


@pytest.mark.slow
def test_a_long_run_with_the_live_plot_keeps_memory_flat_and_one_figure(tmp_path):
    torch.manual_seed(0)
    data = TensorDataset(torch.randn(64, 8), torch.randint(0, 3, (64,)))
    model = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3))
    memory, figures = {}, []

    class Watch:
        def on_epoch_end(self, state):
            if state.epoch % EVERY == 0:
                gc.collect()
                memory[state.epoch] = resident_mb()
                with warnings.catch_warnings():  # touching every object wakes torch's deprecated aliases
                    warnings.simplefilter("ignore", FutureWarning)
                    figures.append(sum(isinstance(o, Figure) for o in gc.get_objects()))

    log = fit(
        model, DataLoader(data, batch_size=32, shuffle=True), DataLoader(data, batch_size=64),
        epochs=EPOCHS, optimizer=torch.optim.SGD(model.parameters(), lr=0.01), ema=0.9, out_dir=tmp_path,
        callbacks=[LiveLog(plot=True, progress="text"), Watch()],
    )  # fmt: skip
    assert len(log) == EPOCHS and (tmp_path / "history.png").exists()
    start = 4 * EVERY  # after the first draws warmed the caches up
    growth = memory[EPOCHS] - memory[start]
    print(f"resident memory at epochs {list(memory)} (MB): {[round(m, 1) for m in memory.values()]}")
    assert growth < LEAK_PER_EPOCH_MB * (EPOCHS - start), memory
    assert max(figures) <= 1, figures  # one figure, reused
