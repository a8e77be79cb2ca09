"""Fixtures for every test: a sandbox for what the environment selects (home, Kaggle root, working folder)."""

import functools
import importlib.util
import os
import shutil
import site
import tempfile
from pathlib import Path

import matplotlib
import pytest
import torch
from helpers import small_cnn
from hypothesis import HealthCheck, settings
from hypothesis.configuration import set_hypothesis_home_dir
from torch import nn

# One thread for torch here and in the processes tests start. The models in tests are tiny: one thread
# runs them about as fast as two, and on a busy machine a second OpenMP thread that waits for a core made
# a small CNN's training step 15-25x slower (measured: 100 steps in 0.2 s vs 3.3-5.7 s at load 7 on 2 cores).
torch.set_num_threads(1)

# The same examples on every run (no example database, no random seed): a test that fails, fails again.
# No deadline: on a loaded machine an example may take seconds.
settings.register_profile(
    "ema_kit", derandomize=True, database=None, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile("ema_kit")

# Caches that are built once per machine and only speed things up (matplotlib's font list, user-installed
# packages), kept while each test gets a fresh home, so that subprocesses find them.
_KEEP = {
    "MPLCONFIGDIR": os.environ.get("MPLCONFIGDIR") or matplotlib.get_cachedir(),
    "XDG_CACHE_HOME": os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache"),
    "PYTHONUSERBASE": site.getuserbase(),
    "OMP_NUM_THREADS": "1",  # see torch.set_num_threads above
}
# Variables that would point a test at the user's own folders or at a real Kaggle kernel.
_CLEARED = ("IPYTHONDIR", "JUPYTER_CONFIG_DIR", "JUPYTER_DATA_DIR", "JUPYTER_RUNTIME_DIR", "XDG_CONFIG_HOME",
            "XDG_DATA_HOME", "EMA_KIT_SMOKE")  # fmt: skip


class Sandbox:
    """The environment of every test, and of every example in ema_kit's docstrings: registered as a plugin
    (below), its fixtures apply to all that pytest collects, not only to what lies under tests/."""

    @pytest.fixture(autouse=True)
    def sandbox(self, tmp_path_factory, monkeypatch) -> Path:
        """Each test gets its own home, working folder and (absent) Kaggle root, so nothing it or a process
        it starts reads or writes lands in the checkout, the user's home or a real /kaggle.

        A folder of its own, beside ``tmp_path``, so that a test's ``tmp_path`` holds only what it wrote.
        """
        folder = tmp_path_factory.mktemp("sandbox")
        (folder / "home").mkdir()
        (folder / "work").mkdir()
        for name in _CLEARED + tuple(name for name in os.environ if name.startswith("KAGGLE_")):
            monkeypatch.delenv(name, raising=False)
        monkeypatch.setenv("HOME", str(folder / "home"))
        for name, value in _KEEP.items():
            monkeypatch.setenv(name, value)
        monkeypatch.setenv("EMA_KIT_KAGGLE_ROOT", str(folder / "kaggle"))  # absent: not on Kaggle
        monkeypatch.chdir(folder / "work")
        return folder


def pytest_configure(config) -> None:
    config.pluginmanager.register(Sandbox(), "ema_kit_sandbox")
    config.pluginmanager.register(KaggleStack(), "ema_kit_kaggle_stack")
    # Hypothesis's own files (what it learns, the constants it finds while collecting) in a temporary
    # folder, not .hypothesis/ in the working folder: set before collection, which already writes there,
    # and for the processes tests start.
    storage = tempfile.mkdtemp(prefix="ema_kit-hypothesis-")
    set_hypothesis_home_dir(storage)
    os.environ["HYPOTHESIS_STORAGE_DIRECTORY"] = storage
    config.add_cleanup(lambda: shutil.rmtree(storage, ignore_errors=True))


# Doctests whose examples build timm models: they need the Kaggle stack, as the tests marked kaggle_stack do.
_KAGGLE_STACK_MODULES = ("ema_kit/kaggle/models.py",)


@functools.cache
def _kaggle_stack() -> tuple[bool, str] | None:
    """None where torchvision and timm import; else (installed, why not)."""
    missing = [name for name in ("torchvision", "timm") if importlib.util.find_spec(name) is None]
    if missing:
        return False, (
            f"needs the Kaggle stack: {' and '.join(missing)} not installed (the light tier; the "
            "Kaggle-stack tier installs them: pip install -r requirements-kaggle.txt)"
        )
    try:
        import timm  # noqa: F401  (imports torchvision)
    except Exception as error:  # e.g. a torchvision built for another torch: "operator torchvision::nms ..."
        return True, f"torchvision and timm are installed but do not import: {type(error).__name__}: {error}"
    return None


class KaggleStack:
    """The kaggle_stack marker, for every test and docstring example pytest collects (a plugin, as Sandbox):
    skipped where torchvision and timm are not installed, failed where they are installed but broken, so a
    broken Kaggle-stack tier cannot pass by skipping its tests."""

    @pytest.hookimpl(tryfirst=True)  # before -m selects by marker
    def pytest_collection_modifyitems(self, items) -> None:
        for item in items:
            if isinstance(item, pytest.DoctestItem) and item.path.as_posix().endswith(_KAGGLE_STACK_MODULES):
                item.add_marker(pytest.mark.kaggle_stack)

    def pytest_runtest_setup(self, item) -> None:
        if item.get_closest_marker("kaggle_stack") and _kaggle_stack() is not None:
            installed, why = _kaggle_stack()
            if installed:
                pytest.fail(why, pytrace=False)
            pytest.skip(why)


@pytest.fixture
def model() -> nn.Module:
    torch.manual_seed(0)
    return small_cnn()
