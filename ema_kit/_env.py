"""Where ema_kit is running: a Jupyter kernel with a live front end, a headless one, or a plain process."""

from __future__ import annotations

import os
import sys
from pathlib import Path

# Processes that execute notebooks with nobody watching: their saved outputs cannot render widgets.
_HEADLESS_RUNNERS = ("nbconvert", "nbclient", "papermill", "nbmake", "pytest")


def in_notebook() -> bool:
    """True inside a Jupyter kernel (interactive or executed headless), where ``display`` has an output."""
    shell = sys.modules.get("IPython") and sys.modules["IPython"].get_ipython()
    return shell is not None and type(shell).__name__ == "ZMQInteractiveShell"


def headless_notebook() -> bool:
    """True in a kernel run by nbconvert/papermill/nbmake or Kaggle's "Save & Run All" (a batch run)."""
    if os.environ.get("KAGGLE_KERNEL_RUN_TYPE", "").lower() == "batch":
        return True
    try:  # the kernel's parent process is the tool that started it
        command = Path(f"/proc/{os.getppid()}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return False
    return any(runner in command for runner in _HEADLESS_RUNNERS)


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
