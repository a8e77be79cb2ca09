"""Where ema_kit is running: a Jupyter kernel with a live front end, a headless one, or a plain process."""

from __future__ import annotations

import os
import sys
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


def widgets_available() -> bool:
    """True where an ipywidgets progress bar can render: a notebook kernel with a front end watching."""
    if not in_notebook() or headless_notebook():
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
