"""Where ema_kit is running (a Jupyter kernel with a front end watching, a headless one, a plain process),
and what it takes from there: the notebook's outputs, the end of the cell, the stop button."""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

# Processes that execute notebooks with nobody watching: their saved outputs cannot render widgets.
# nbclient, nbconvert and papermill set no variable in the kernel that says so (papermill's maintainers:
# nteract/papermill#481), so the kernel's parent process, the tool that started it, is what tells.
_HEADLESS_RUNNERS = ("nbconvert", "nbclient", "papermill", "nbmake", "pytest")


def in_notebook() -> bool:
    """True inside a Jupyter kernel (interactive or executed headless), where ``display`` has an output.

    The kernel's shell is an ``ipykernel`` ``ZMQInteractiveShell`` or a subclass of it (Colab's is one);
    a terminal IPython's is not.
    """
    ipython, zmqshell = sys.modules.get("IPython"), sys.modules.get("ipykernel.zmqshell")
    if ipython is None or zmqshell is None:  # a kernel has imported both before running any cell
        return False
    return isinstance(ipython.get_ipython(), zmqshell.ZMQInteractiveShell)


def headless_notebook() -> bool:
    """True in a kernel run by nbconvert/papermill/nbmake or Kaggle's "Save & Run All" (a batch run).

    Kaggle says which in ``KAGGLE_KERNEL_RUN_TYPE`` ("Batch" or "Interactive"); the notebook runners
    say nothing, so their name in the parent process's command line is taken as the sign.
    """
    run_type = os.environ.get("KAGGLE_KERNEL_RUN_TYPE", "").lower()
    if run_type:
        return run_type == "batch"
    command = _parent_command()
    return any(runner in command for runner in _HEADLESS_RUNNERS)


def _parent_command() -> str:
    """The command line of the process that started this one ("" where /proc cannot tell)."""
    try:
        return Path(f"/proc/{os.getppid()}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def watched() -> bool:
    """True in a notebook kernel with a front end watching (not a headless run): someone sees it live."""
    return in_notebook() and not headless_notebook()


def widgets_available() -> bool:
    """True where an ipywidgets progress bar can render: a notebook kernel with a front end watching."""
    if not watched():
        return False
    try:
        import ipywidgets  # noqa: F401
    except ImportError:
        return False
    return True


def display(obj, handle=None):
    """Show ``obj`` in the notebook output, in place of what ``handle`` showed before; returns the handle."""
    from IPython.display import display as ipython_display

    if handle is None:
        return ipython_display(obj, display_id=True)
    handle.update(obj)
    return handle


def after_cell(callback: Callable[[], None]) -> None:
    """Call ``callback`` once when the notebook cell running now ends, however it ends (finished, raised,
    stopped); nothing outside a kernel. IPython runs ``post_run_cell`` events in a ``finally``."""
    from IPython import get_ipython

    shell = get_ipython()
    if shell is None:
        return

    def once(result=None) -> None:
        shell.events.unregister("post_run_cell", once)
        callback()

    shell.events.register("post_run_cell", once)


@contextlib.contextmanager
def finish_before_stopping() -> Iterator[None]:
    """A block that the stop button (SIGINT: Ctrl-C, Jupyter's interrupt) does not cut in two.

    An interrupt during the block is raised when the block ends, so what it writes (a log row, its table,
    plot and files) is all there or not there at all; a second interrupt during the block raises at once,
    so a block that hangs can still be stopped. Signals reach the main thread only: elsewhere, and where
    SIGINT is not handled by Python (ignored, or the default of the OS), the block runs as it is.

    Example:
        >>> with finish_before_stopping():
        ...     rows = [1, 2]  # an interrupt here would be raised after this line, not before it
    """
    handler = signal.getsignal(signal.SIGINT)
    if threading.current_thread() is not threading.main_thread() or not callable(handler):
        yield
        return
    pending = []

    def hold(signum, frame):
        if pending:  # pressed twice: stop now
            handler(signum, frame)
        pending.append((signum, frame))

    signal.signal(signal.SIGINT, hold)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, handler)
    if pending:
        handler(*pending[0])
