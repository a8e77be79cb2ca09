"""Kills mid-write (ema_kit/files.py, ModelEMA.save): a process killed at any moment leaves a whole file.

A child process writes version 1 of a file over a whole version 0 and dies at a moment chosen here, so
the kill lands inside the write by construction, whatever the machine's load:
- after a chosen number of bytes: with ``RLIMIT_FSIZE`` at that size, the kernel kills the process with
  SIGXFSZ at its first write past it (0 bytes, 1 byte, half the file, all but its last byte);
- just before the finished file is renamed into place (an audit hook on ``os.rename``/``os.replace``).
The file must then still be version 0, byte for byte; killed while writing the very first version, there
must be no file at all. A later write clears what the killed writers left behind.
"""

import multiprocessing
import os
import resource
import signal
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
from helpers import small_cnn

from ema_kit import ModelEMA
from ema_kit.files import STALE_TEMP_S, atomic_save, atomic_write_text, load_weights

# Children fork from a server that imported these once, so a child costs milliseconds, not the seconds
# a fresh interpreter spends importing torch. helpers first: it picks the ema_kit under test.
FORKSERVER = multiprocessing.get_context("forkserver")
FORKSERVER.set_forkserver_preload(["helpers", "torch", "pandas", "pytest", "ema_kit"])
# The files each writer writes.
FILES = {
    "atomic_save": ["state.pth"],
    "ModelEMA.save": ["model_ema.pth", "model_ema.safetensors"],
    "atomic_write_text": ["log.csv"],
}
BEFORE_RENAME = "before the rename"


def growing_state(version: int) -> dict:
    """A state dict that grows as training goes on; its "step" says which version it is."""
    generator = torch.Generator().manual_seed(version)
    return {
        "step": torch.tensor(version),
        "weights": torch.randn(2000 * (1 + version), generator=generator),
    }


def training_log(rows: int) -> str:
    """A CSV log with one row per epoch."""
    lines = ["epoch,train_loss,ema_accuracy"]
    lines += [f"{epoch},{1 / (epoch + 1):.6f},{epoch / (epoch + 5):.4f}" for epoch in range(rows)]
    return "\n".join(lines) + "\n"


class EMARun:
    """The EMA after each of a fixed sequence of weight changes; its num_batches_tracked is the version."""

    def __init__(self, versions: int = 3):
        torch.manual_seed(0)
        model = small_cnn()
        self.ema = ModelEMA(model, decay=0.9)
        self.states = []
        for version in range(versions):
            generator = torch.Generator().manual_seed(version)
            with torch.no_grad():
                for parameter in model.parameters():
                    parameter.add_(torch.randn(parameter.shape, generator=generator), alpha=0.1)
                model[1].num_batches_tracked.fill_(version)
            self.ema.update(model)
            self.states.append({key: value.clone() for key, value in self.ema.module.state_dict().items()})


def write(kind: str, version: int, path: Path, run: EMARun) -> None:
    if kind == "atomic_save":
        atomic_save(growing_state(version), path)
    elif kind == "ModelEMA.save":
        run.ema.module.load_state_dict(run.states[version])
        run.ema.save(path)
    else:
        atomic_write_text(training_log(version), path)


def write_and_die(kind: str, version: int, path: Path, die_at) -> None:
    """The child: write ``version`` of ``path`` and die after ``die_at`` bytes of a file, or before the
    rename that puts it in place."""
    run = EMARun()  # built before any limit: it writes nothing
    if die_at == BEFORE_RENAME:

        def kill_before_rename(event, args):
            if event == "os.rename" and Path(args[1]) == path:  # os.replace raises "os.rename" too
                os.kill(os.getpid(), signal.SIGKILL)

        sys.addaudithook(kill_before_rename)
    else:
        resource.setrlimit(resource.RLIMIT_CORE, (0, resource.getrlimit(resource.RLIMIT_CORE)[1]))
        signal.signal(signal.SIGXFSZ, signal.SIG_DFL)  # Python ignores it, which would make it an OSError
        resource.setrlimit(resource.RLIMIT_FSIZE, (die_at, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
    write(kind, version, path, run)


def run_child(kind: str, version: int, path: Path, die_at) -> int:
    child = FORKSERVER.Process(target=write_and_die, args=(kind, version, path, die_at), daemon=True)
    child.start()
    child.join(120)
    assert child.exitcode is not None, "the writer hung"
    return child.exitcode


def assert_whole_version(kind: str, path: Path, version: int, run: EMARun) -> None:
    if kind == "atomic_write_text":
        assert path.read_text() == training_log(version)
        assert len(pd.read_csv(path)) == version
        return
    loaded = load_weights(path)
    expected = growing_state(version) if kind == "atomic_save" else run.states[version]
    assert loaded.keys() == expected.keys()
    assert all(torch.equal(loaded[key], value) for key, value in expected.items())


@pytest.mark.parametrize("kind", list(FILES))
def test_a_kill_at_any_moment_of_a_write_leaves_the_previous_version_and_a_later_write_clears_the_debris(
    tmp_path, kind
):
    run, scratch = EMARun(), tmp_path / "scratch"
    for name in FILES[kind]:
        write(kind, 1, scratch / name, run)
    targets = [tmp_path / "files" / name for name in FILES[kind]]
    for path in targets:
        size = (scratch / path.name).stat().st_size  # of version 1, the one that gets killed
        # Killed while writing the very first version: no file at all, not a part of one.
        assert run_child(kind, 1, path, size // 2) == -signal.SIGXFSZ
        assert not path.exists()
        write(kind, 0, path, run)
        whole = path.read_bytes()
        for die_at in (0, 1, size // 2, size - 1, BEFORE_RENAME):
            debris = set(path.parent.iterdir())
            exitcode = run_child(kind, 1, path, die_at)
            if die_at == BEFORE_RENAME:
                assert exitcode == -signal.SIGKILL, "the write finished without renaming a file into place"
            else:
                assert exitcode == -signal.SIGXFSZ, f"the write of {size} bytes ended before byte {die_at}"
            assert path.read_bytes() == whole, f"killed at {die_at}: the file is no longer version 0"
            # Proof that the kill landed inside the write: its unfinished file, as far as it got.
            (left,) = set(path.parent.iterdir()) - debris
            assert left.stat().st_size == (size if die_at == BEFORE_RENAME else die_at)
        assert_whole_version(kind, path, 0, run)

    # Debris of a writer dead long ago goes at the next write to the same file.
    long_ago = time.time() - STALE_TEMP_S - 60
    for left in set(targets[0].parent.iterdir()) - set(targets):
        os.utime(left, (long_ago, long_ago))
    for path in targets:
        write(kind, 2, path, run)
        assert_whole_version(kind, path, 2, run)
    assert sorted(targets[0].parent.iterdir()) == sorted(targets)
