"""``status.json``: a run's heartbeat in its folder, so that another process can tell how far it is and
whether it still runs (``watch`` reads it).

``fit`` writes it with ``out_dir=``, on the one process that writes files (rank 0 of a distributed run).
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

import torch

from .. import _batches
from ..files import atomic_write_text
from .callbacks import Callback, FitState

STATUS_FILE = "status.json"
STATES = ("running", "finished", "stopped", "failed")  # stopped: by the user, with epochs left


class RunStatus(Callback):
    """Writes ``out_dir/status.json``: the run's state, its process, and how far it is.

    The fields: ``state`` (``"running"``, ``"finished"``, ``"stopped"`` by the user with epochs left,
    ``"failed"`` with the ``error``), ``pid`` and ``host`` of the writing process, ``started`` and
    ``time`` (the heartbeat, Unix seconds), ``epoch`` (in progress, or the last), ``epochs``, ``batch``
    and ``batches`` (None for a loader without a length) and ``rows`` of the epoch so far (on every
    process of a distributed run), ``saved_epoch`` (the last epoch whose row, weights and checkpoint are
    in the folder; 0 for none) and ``best_epoch``. It is rewritten (atomically) at every epoch's start
    and end, and at most every ``every`` seconds in between. ``fit(out_dir=...)`` runs one, after its
    files; it keeps no state in the checkpoint.

    Example:
        >>> import tempfile
        >>> folder = tempfile.mkdtemp()
        >>> RunStatus(folder).failed(ValueError("bad batch"))
        >>> status = read_status(folder)
        >>> status["state"], status["error"], status["pid"] == os.getpid()
        ('failed', 'ValueError: bad batch', True)
    """

    def __init__(self, out_dir: str | os.PathLike, *, every: float = 5.0):
        self.path = Path(out_dir) / STATUS_FILE
        self.every = every  # seconds between heartbeats within an epoch
        self.fields: dict = {"state": "running", "pid": os.getpid(), "host": socket.gethostname()}
        self.fields["started"] = self._written = time.time()

    def on_fit_start(self, state: FitState) -> None:
        # A resumed run has its checkpoint's epochs saved already.
        self._write(state, epoch=state.epoch, saved_epoch=state.epoch, best_epoch=state.best_epoch)

    def on_epoch_start(self, state: FitState) -> None:
        self._write(
            state, epoch=state.epoch, batch=0, batches=_batches.batches_per_epoch(state.train_loader), rows=0
        )

    def on_batch_end(self, state: FitState) -> None:
        self.fields["batch"] = self.fields.get("batch", 0) + 1
        self.fields["rows"] = self.fields.get("rows", 0) + state.rows * _processes()
        if time.time() - self._written >= self.every:
            self._write(state)

    def on_epoch_end(self, state: FitState) -> None:
        # fit runs this callback after its files: the epoch's row, weights and checkpoint are written.
        self._write(state, saved_epoch=state.epoch, best_epoch=state.best_epoch)

    def on_fit_end(self, state: FitState) -> None:
        done = state.stop or self.fields.get("saved_epoch", 0) >= state.epochs  # early stopping is done
        self._write(state, state="finished" if done else "stopped")

    def failed(self, error: BaseException) -> None:
        """Mark the run failed with ``error`` (fit calls this when an exception ends training)."""
        self._write(None, state="failed", error=f"{type(error).__name__}: {error}")

    def _write(self, fit_state: FitState | None, **fields) -> None:
        self.fields.update(fields)
        if fit_state is not None:
            self.fields["epochs"] = fit_state.epochs
        self._written = self.fields["time"] = time.time()
        atomic_write_text(json.dumps(self.fields, indent=1), self.path)


def read_status(out_dir: str | os.PathLike) -> dict | None:
    """The run's ``status.json`` as a dict, or None where the folder has none (yet).

    Example:
        >>> import tempfile
        >>> read_status(tempfile.mkdtemp()) is None
        True
    """
    try:
        return json.loads((Path(out_dir) / STATUS_FILE).read_text())
    except FileNotFoundError:
        return None


def _processes() -> int:
    """The processes of a distributed run (each trains on its own rows of a batch), else 1."""
    return torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
