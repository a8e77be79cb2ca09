"""Kills mid-write (ema_kit/files.py, ModelEMA.save): a SIGKILL at any moment leaves a whole file.

A child process rewrites one file in a tight loop, each time with a new version (a growing state dict,
the EMA weights after one more update, a training log with one more row), and is killed with SIGKILL
at a random moment, many times over. After each kill the file must load (or parse) and equal one of
the versions, rebuilt here from its number.
"""

import itertools
import multiprocessing
import os
import random
import signal
import time

import pandas as pd
import pytest
import torch
from helpers import small_cnn

from ema_kit import ModelEMA
from ema_kit.files import STALE_TEMP_S, atomic_save, atomic_write_text, load_weights

KILLS = 30
MAX_DELAY_S = 0.1  # after the child's first whole write; a write takes ~10 ms here (fsync included)
# Children fork from a server that imported these once, so a kill costs milliseconds, not the seconds
# a fresh interpreter spends importing torch. conftest first: it picks the ema_kit under test.
FORKSERVER = multiprocessing.get_context("forkserver")
FORKSERVER.set_forkserver_preload(["conftest", "torch", "pandas", "pytest", "ema_kit"])
# The files each writer rewrites, taken in turn from one kill to the next.
FILES = {
    "atomic_save": ["state.pth"],
    "ModelEMA.save": ["model_ema.pth", "model_ema.safetensors"],
    "atomic_write_text": ["log.csv"],
}


def growing_state(version: int) -> dict:
    """A state dict that grows as training goes on; its "step" says which version it is."""
    generator = torch.Generator().manual_seed(version)
    return {
        "step": torch.tensor(version),
        "weights": torch.randn(2000 * (1 + version % 40), generator=generator),
    }


def training_log(rows: int) -> str:
    """A CSV log with one row per epoch."""
    lines = ["epoch,train_loss,ema_accuracy"]
    lines += [f"{epoch},{1 / (epoch + 1):.6f},{epoch / (epoch + 5):.4f}" for epoch in range(rows)]
    return "\n".join(lines) + "\n"


class EMARun:
    """An EMA after each of a fixed sequence of weight changes; its num_batches_tracked is the version."""

    def __init__(self):
        torch.manual_seed(0)
        self.model = small_cnn()
        self.ema = ModelEMA(self.model, decay=0.9)
        self.states = []

    def state(self, version: int) -> dict:
        while len(self.states) <= version:
            generator = torch.Generator().manual_seed(len(self.states))
            with torch.no_grad():
                for parameter in self.model.parameters():
                    parameter.add_(torch.randn(parameter.shape, generator=generator), alpha=0.1)
                self.model[1].num_batches_tracked.fill_(len(self.states))
            self.ema.update(self.model)
            self.states.append({key: value.clone() for key, value in self.ema.module.state_dict().items()})
        return self.states[version]


def write(kind: str, version: int, path, run: EMARun) -> None:
    if kind == "atomic_save":
        atomic_save(growing_state(version), path)
    elif kind == "ModelEMA.save":
        run.state(version)
        run.ema.save(path)
    else:
        atomic_write_text(training_log(version), path)


def write_until_killed(kind: str, path, ready) -> None:
    """The child: rewrite ``path`` with version after version; say when the first one is whole."""
    run = EMARun()
    for version in itertools.count():
        write(kind, version, path, run)
        if version == 0:
            ready.send(os.getpid())


def assert_whole_version(kind: str, path, run: EMARun) -> None:
    if kind == "atomic_write_text":
        rows = len(pd.read_csv(path))
        assert path.read_text() == training_log(rows)
        return
    loaded = load_weights(path)
    if kind == "atomic_save":
        expected = growing_state(int(loaded["step"]))
    else:
        expected = run.state(int(loaded["1.num_batches_tracked"]))
    assert loaded.keys() == expected.keys()
    assert all(torch.equal(loaded[key], value) for key, value in expected.items())


@pytest.mark.parametrize("kind", list(FILES))
def test_kill_at_random_moments_leaves_a_whole_version_and_a_later_write_clears_the_debris(tmp_path, kind):
    paths, run, rng = [tmp_path / name for name in FILES[kind]], EMARun(), random.Random(kind)
    versions, killed_mid_write = set(), 0
    for kill in range(KILLS):
        path = paths[kill % len(paths)]
        receive, send = FORKSERVER.Pipe(duplex=False)
        child = FORKSERVER.Process(target=write_until_killed, args=(kind, path, send), daemon=True)
        child.start()
        send.close()
        assert receive.poll(60), f"the child exited with {child.exitcode} before its first write"
        receive.recv()
        temps_before = set(tmp_path.glob(".*.tmp"))
        time.sleep(rng.uniform(0, MAX_DELAY_S))
        os.kill(child.pid, signal.SIGKILL)
        child.join()
        assert child.exitcode == -signal.SIGKILL
        killed_mid_write += len(set(tmp_path.glob(".*.tmp")) - temps_before)
        assert_whole_version(kind, path, run)
        versions.add(path.read_bytes())
    # The kills landed at many moments, mostly inside a write (which leaves its temporary file behind).
    assert len(versions) >= 3
    assert killed_mid_write > KILLS // 3
    assert sorted(p for p in tmp_path.iterdir() if not p.name.startswith(".")) == sorted(paths)

    long_ago = time.time() - STALE_TEMP_S - 60
    for temp in tmp_path.glob(".*.tmp"):
        os.utime(temp, (long_ago, long_ago))
    for path in paths:
        write(kind, 3, path, run)
        assert_whole_version(kind, path, run)
    assert sorted(tmp_path.iterdir()) == sorted(paths)
