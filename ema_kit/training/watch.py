"""``watch``: follow a run that another process writes (a ``torchrun`` job, another kernel, a resumed run)
and show it as ``fit`` shows its own: the live plot, the table and the progress, redrawn in place.
"""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

import pandas as pd

from .. import _checks
from .history import finished_epochs
from .launch import Job
from .livelog import LiveLog
from .status import read_status


def watch(
    out_dir: str | os.PathLike,
    *,
    job: Job | None = None,  # launch's: the run ends when it does
    every: float = 2.0,  # seconds between two looks at the folder
    stale_after: float = 600.0,  # seconds without a heartbeat after which a run on another machine is dead
    progress: str = "auto",  # LiveLog's: "widget", "text", "off"; "auto": a widget where one shows
    plot: bool = True,  # the live plot
) -> pd.DataFrame:
    """Show the run in ``out_dir`` as it grows, until it ends; returns its log (``history.csv``).

    It reads what ``fit(out_dir=...)`` writes there, every ``every`` seconds: each new row of
    ``history.csv`` goes to a ``LiveLog`` (the same plot, table and bar as ``fit``'s, nothing written), and
    ``status.json`` moves the bar within the epoch. It returns when the run finishes (or was stopped by
    its user), and on a finished run at once, having drawn it. It raises ``RuntimeError`` when the run
    ends without finishing, naming the last epoch saved (to ``resume`` from): the run failed (its error),
    ``job`` (``launch``'s) ended, the writing process is gone (same machine), or, from another machine,
    no heartbeat came for ``stale_after`` seconds. A log without ``status.json`` (a ``LiveLog``'s, in a
    loop of your own) is followed until it has been quiet for ``stale_after`` seconds. Interrupting
    ``watch`` leaves the run running.

    Example:
        >>> import tempfile, torch
        >>> from ema_kit import fit
        >>> from ema_kit.examples.digits import digits_loaders
        >>> from ema_kit.examples.demo import SmallCNN
        >>> train_loader, val_loader = digits_loaders(batch_size=512)
        >>> model, folder = SmallCNN(width=4), tempfile.mkdtemp()
        >>> optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> _ = fit(model, train_loader, val_loader, epochs=2, optimizer=optimizer, ema=0.5, out_dir=folder,
        ...         callbacks=[LiveLog(progress="off", plot=False)])
        >>> watch(folder, progress="off", plot=False)["epoch"].tolist()  # a finished run: drawn at once
        The run in ... finished: 2 of 2 epochs.
        [1, 2]
    """
    folder = Path(out_dir)
    every = _checks.check_finite_positive("every", every)
    stale_after = _checks.check_finite_positive("stale_after", stale_after)
    follower = _Follower(folder, progress=progress, plot=plot)
    waited_since = time.time()
    while True:
        ended = job is not None and not job.running  # before the files: a finished job wrote them all
        status = read_status(folder)
        if status is not None and job is not None and status["started"] < job.started:
            status = None  # an earlier run's, in a folder this job reuses (a resume)
        follower.show(_read_history(folder), status)
        if status is not None and status["state"] != "running":
            return follower.end(status, job)
        if status is not None:
            gone = _gone(status, job, ended, stale_after)
        elif ended:
            gone = f"torchrun ended (exit status {job.returncode}) before fit started in {folder}"
            raise RuntimeError(follower.died(gone, None, job, resumable=False))
        elif job is None and len(follower.log.history):  # a log without status.json: a LiveLog's
            quiet = time.time() - (folder / "history.csv").stat().st_mtime
            if quiet > stale_after:
                print(f"{folder} has no status.json (a LiveLog's log, not fit's?), and its log was last "
                      f"written {quiet:.0f} s ago: drawn as it stands.")  # fmt: skip
                return follower.log.history
            gone = None
        elif job is None and time.time() - waited_since > stale_after:
            gone = f"no run started in {folder} within {stale_after:g} s (no status.json)"
        else:
            gone = None
        if gone and status is not None:  # it may have written its last status and exited since the read
            last = read_status(folder)
            if last is not None and last["started"] == status["started"] and last["state"] != "running":
                follower.show(_read_history(folder), last)
                return follower.end(last, job)
        if gone:
            raise RuntimeError(follower.died(gone, status, job))
        time.sleep(every)


class _Follower:
    """Feeds the run's new rows and batches to a LiveLog."""

    def __init__(self, folder: Path, *, progress: str, plot: bool):
        self.folder = folder
        self.log = LiveLog(progress=progress, plot=plot)  # no out_dir: the run writes its own files
        self.epoch = self.batch = self.rows = 0  # the run's epoch in progress, as last shown

    def show(self, history: pd.DataFrame, status: dict | None) -> None:
        if status is not None and self.log.epochs is None:
            self.log = LiveLog(progress=self.log.progress.mode, plot=self.log.plot, epochs=status["epochs"])
        best = None if status is None else status.get("best_epoch")
        for row in history.to_dict("records")[len(self.log.history) :]:
            self.log.best_epoch = best if best is not None and best <= row["epoch"] else None
            self.log.add(row)
        if status is not None and status["state"] == "running" and status.get("batch") is not None:
            self._count_batches(status)

    def _count_batches(self, status: dict) -> None:
        progress = self.log.progress
        if status["epoch"] != self.epoch:
            self.epoch, self.batch, self.rows = status["epoch"], 0, 0
            progress.start_epoch(self.epoch, batches=status["batches"])
        new = status["batch"] - self.batch
        for index in range(new):  # the rows of the batches since the last look, counted with the last
            progress.batch(images=status["rows"] - self.rows if index == new - 1 else 0)
        self.batch, self.rows = status["batch"], status["rows"]

    def end(self, status: dict, job) -> pd.DataFrame:
        state, saved, epochs = status["state"], status.get("saved_epoch", 0), status["epochs"]
        if state == "failed":
            raise RuntimeError(self.died(f"fit raised {status['error']}", status, job))
        if state == "stopped":
            print(
                f"The run in {self.folder} was stopped by its user after epoch {saved} of {epochs}; "
                "fit(..., resume=True) continues it."
            )
        else:
            print(f"The run in {self.folder} finished: {saved} of {epochs} epochs.")
        self.log.progress.close()
        return self.log.history

    def died(self, why: str, status: dict | None, job, *, resumable: bool = True) -> str:
        """What happened, the last epoch saved, and (with a job) the processes' error and last lines."""
        saved = _saved_epoch(status, self.log.history)
        of = "" if status is None else f" of {status['epochs']}"
        if saved:
            last = f"The last epoch saved is {saved}{of} ({self.folder / 'checkpoint.pt'})"
            last += ": run it again with fit(..., resume=True) to finish it." if resumable else "."
        else:
            last = "No epoch was saved."
        said = f"The run in {self.folder} stopped without finishing: {why}. {last}"
        if job is None:
            return said
        error, tail = job.error(), job.log_tail()
        said += f"\nThe processes' error: {error}" if error else ""
        return said + (f"\nThe end of {job.log}:\n{tail}" if tail else "")


def _gone(status: dict, job, ended: bool, stale_after: float) -> str | None:
    """Why the run of a "running" status.json is not running any more, or None."""
    pid, host = status["pid"], status["host"]
    if ended:
        return f"torchrun ended with exit status {job.returncode} (process {pid} wrote the run)"
    if host == socket.gethostname():
        if not _alive(pid):
            return f"its process ({pid} on {host}) is gone"
        return None
    silent = time.time() - status["time"]
    if silent > stale_after:
        return f"no heartbeat from process {pid} on {host} for {silent:.0f} s (stale_after={stale_after:g})"
    return None


def _alive(pid: int) -> bool:
    """Whether process ``pid`` runs on this machine (a zombie, dead but not yet reaped, does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's: it exists
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:  # no /proc (macOS): os.kill said it exists
        return True
    return stat.rpartition(")")[2].split()[0] != "Z"


def _read_history(folder: Path) -> pd.DataFrame:
    try:
        return pd.read_csv(folder / "history.csv")
    except (FileNotFoundError, pd.errors.EmptyDataError):
        return pd.DataFrame()


def _saved_epoch(status: dict | None, history: pd.DataFrame) -> int:
    """The last epoch whose files are in the folder: status.json's, else the log's last whole epoch."""
    if status is not None:
        return status.get("saved_epoch", 0)
    return finished_epochs(history)
