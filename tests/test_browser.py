"""The live view as a user sees it: notebooks run in JupyterLab 4 and Notebook 7, in headless Chromium.

The test starts a Jupyter server on 127.0.0.1 (a free port, a token, its own config, data, runtime and
settings folders, a temporary root), opens the notebooks in ``tests/browser/`` with Playwright driving
Debian's Chromium, presses what a user presses (Run All, the stop button, save) and reads the page: the
outputs of the cell marked ``# the live view`` are sampled on every change of the page while it runs, so
each epoch's plot is seen however short the epoch. Screenshots go to ``$EMA_KIT_ARTIFACTS`` or a temporary
folder, named at the end of the run. ``bash tests/browser/install.sh`` installs the tools; without them
the tier is skipped, or fails with ``EMA_KIT_REQUIRE_BROWSER=1`` (CI).

The README's picture of the live view, ``docs/live_view.png``, is this tier's JupyterLab run of fit, cropped
to the live-view cell's outputs: ``EMA_KIT_LIVE_VIEW_PNG=docs/live_view.png python -m pytest
tests/test_browser.py -k "fit and lab"`` writes it again.
"""

import contextlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from dataclasses import dataclass
from importlib.util import find_spec
from pathlib import Path

import matplotlib
import pandas as pd
import pytest

NOTEBOOKS = Path(__file__).parent / "browser"
CHROMIUM = shutil.which("chromium")
EPOCHS = 4  # the parameters cell of fit_digits.ipynb and loop_digits.ipynb
LAYOUT = ["widget", "plot", "table"]  # the live view's outputs, top to bottom, while it runs
FINAL_LAYOUT = ["text/plain", "plot", "table"]  # when the cell has ended: the bar's last line, as text
MARKER = "# the live view"  # the first line of the cell the checks read

_missing = [
    name
    for name, present in [
        ("chromium", CHROMIUM),
        ("playwright", find_spec("playwright")),
        ("jupyterlab", find_spec("jupyterlab")),
        ("notebook", find_spec("notebook")),
    ]
    if not present
]
if _missing:
    _reason = f"the browser tier needs {', '.join(_missing)}: bash tests/browser/install.sh"
    if os.environ.get("EMA_KIT_REQUIRE_BROWSER"):
        pytest.fail(_reason, pytrace=False)
    pytest.skip(_reason, allow_module_level=True)

pytestmark = [pytest.mark.browser, pytest.mark.slow]

# Runs in the page: samples the live-view cell's outputs after every change of the page and keeps each
# distinct state (images by a hash of their data), so no epoch's plot is missed between two polls.
_RECORDER = """marker => {
  const hash = text => {
    let h = 2166136261;
    for (let i = 0; i < text.length; i++) h = Math.imul(h ^ text.charCodeAt(i), 16777619);
    return (h >>> 0).toString(16) + "/" + text.length;
  };
  window.liveView = [];
  let last = "";
  const sample = () => {
    const cell = [...document.querySelectorAll(".jp-CodeCell")]
      .find(c => c.querySelector(".jp-InputArea")?.textContent.includes(marker));
    const out = cell?.querySelector(".jp-OutputArea");
    if (!out) return;
    const state = {
      images: [...out.querySelectorAll("img")].map(img => hash(img.src)),
      bars: out.querySelectorAll(".widget-hprogress").length,
      loading: out.textContent.includes("Loading widget"),
      labels: [...out.querySelectorAll(".widget-html-content")].map(e => e.textContent),
      table: [...out.querySelectorAll("table.dataframe tbody tr")].map(
        row => [...row.querySelectorAll("td")].map(td => td.textContent)),
      stderr: [...out.querySelectorAll("[data-mime-type='application/vnd.jupyter.stderr']")]
        .map(e => e.textContent),
      text: [...out.querySelectorAll("[data-mime-type='text/plain'], [data-mime-type$='stdout']")]
        .map(e => e.textContent),
      errors: (out.textContent.match(/Error displaying widget[^\\n]*|Traceback|Error:/g) || []),
      kinds: [...out.querySelectorAll(".jp-OutputArea-output")].map(o =>
        o.querySelector(".jupyter-widgets") ? "widget" : o.querySelector("img") ? "plot"
          : o.querySelector("table.dataframe") ? "table" : o.dataset.mimeType || "other"),
    };
    const key = JSON.stringify(state);
    if (key !== last) {
      last = key;
      window.liveView.push({...state, t: performance.now()});
    }
  };
  new MutationObserver(sample).observe(document.body,
    {subtree: true, childList: true, attributes: true, characterData: true});
  sample();
}"""


@dataclass
class Run:
    """What the page showed while a notebook ran, and what it left."""

    states: list[dict]  # each distinct state of the live-view cell's outputs, in order
    folder: Path  # the notebook's folder on the server (its runs/ output)
    notebook: Path
    prompts: list[str]  # the code cells' prompts at the end: "[3]:", "[ ]:"
    stderr: list[str]  # every cell's error and warning text at the end
    reopened: dict | None = None  # the live-view cell after save, kernel shut down, and a new session

    @property
    def final(self) -> dict:
        return self.states[-1]

    def images(self) -> list[str]:
        """Each distinct plot the cell showed, in order."""
        seen = []
        for state in self.states:
            for image in state["images"]:
                if image not in seen:
                    seen.append(image)
        return seen

    def table(self) -> pd.DataFrame:
        """The table at the end: column "epoch", then the others by position (1 is train_loss)."""
        rows = self.final["table"]
        return pd.DataFrame([[float(v) for v in row] for row in rows]).rename(columns={0: "epoch"})


class Jupyter:
    """A Jupyter server (JupyterLab 4 and Notebook 7) for this module's tests, and a Chromium to view it."""

    def __init__(self, folder: Path, browser):
        self.root = folder / "root"
        self.root.mkdir()
        self.browser = browser
        self.token = uuid.uuid4().hex
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        settings = folder / "lab-settings" / "@jupyterlab" / "apputils-extension"
        settings.mkdir(parents=True)
        # No "Would you like to get notified about official Jupyter news?" toast over the outputs.
        (settings / "notification.jupyterlab-settings").write_text(
            json.dumps({"fetchNews": "false", "checkForUpdates": False})
        )
        env = {
            name: value
            for name, value in os.environ.items()
            if not name.startswith(("JUPYTER", "IPYTHON", "KAGGLE_", "EMA_KIT_", "XDG_CONFIG", "XDG_DATA"))
        }
        for name in ("home", "config", "data", "runtime", "workspaces", "ipython"):
            (folder / name).mkdir()
        env |= {
            "HOME": str(folder / "home"),
            "JUPYTER_CONFIG_DIR": str(folder / "config"),
            "JUPYTER_DATA_DIR": str(folder / "data"),
            "JUPYTER_RUNTIME_DIR": str(folder / "runtime"),
            "JUPYTERLAB_SETTINGS_DIR": str(folder / "lab-settings"),
            "JUPYTERLAB_WORKSPACES_DIR": str(folder / "workspaces"),
            "IPYTHONDIR": str(folder / "ipython"),
            "JUPYTER_TOKEN": self.token,
            "EMA_KIT_KAGGLE_ROOT": str(folder / "kaggle"),  # absent: not on Kaggle
            "OMP_NUM_THREADS": "1",  # the kernel's torch: one thread trains these tiny models as fast as two
            # matplotlib's font list, built once per machine (seconds), as tests/conftest.py keeps it
            "MPLCONFIGDIR": os.environ.get("MPLCONFIGDIR") or matplotlib.get_cachedir(),
        }
        # The root folder is the working directory, not an argument: the kernel tells a headless run from
        # the command line of the process that started it (ema_kit.training._env), and a temporary
        # folder's name holds "pytest".
        self.log = (folder / "server.log").open("w")
        self.server = subprocess.Popen(
            [sys.executable, "-m", "jupyterlab", "--no-browser", "--allow-root", "--ip=127.0.0.1",
             f"--port={self.port}", "--ServerApp.port_retries=0"],  # fmt: skip
            cwd=self.root, env=env, stdout=self.log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        deadline = time.monotonic() + 60
        while not self._answers():
            if self.server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"Jupyter did not start:\n{(folder / 'server.log').read_text()[-3000:]}")
            time.sleep(0.2)

    def close(self) -> None:
        self.server.terminate()
        try:
            self.server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.server.kill()
        self.log.close()

    def api(self, path: str, method: str = "GET"):
        request = urllib.request.Request(f"{self.url}/api/{path}?token={self.token}", method=method)
        with urllib.request.urlopen(request, timeout=10) as response:
            body = response.read()
        return json.loads(body) if body else None

    def _answers(self) -> bool:
        try:
            self.api("status")
            return True
        except OSError:
            return False

    def shut_down_kernels(self) -> None:
        for session in self.api("sessions"):
            self.api(f"sessions/{session['id']}", method="DELETE")

    def place(self, name: str, folder: str) -> Path:
        """A fresh copy of tests/browser/``name`` in its own folder under the server's root."""
        (self.root / folder).mkdir()
        return Path(shutil.copy(NOTEBOOKS / name, self.root / folder / name))

    @contextlib.contextmanager
    def session(self, notebook: Path, frontend: str):
        """A new browser session showing ``notebook`` in ``frontend`` ("lab" or "notebook"), its kernel
        connected and idle; closed, and the kernel shut down, however the test ends."""
        path = notebook.relative_to(self.root).as_posix()
        context = self.browser.new_context(viewport={"width": 1280, "height": 1300})
        try:
            page = context.new_page()
            # JupyterLab reopens what its workspace showed last: a workspace of its own shows this notebook.
            prefix = f"lab/workspaces/{uuid.uuid4().hex}/tree" if frontend == "lab" else "notebooks"
            page.goto(f"{self.url}/{prefix}/{path}?token={self.token}")
            page.wait_for_selector(".jp-Notebook .jp-CodeCell", timeout=90_000)
            deadline = time.monotonic() + 90
            while not self._kernel_ready(path):
                assert time.monotonic() < deadline, f"no kernel for {path}: {self.api('sessions')}"
                time.sleep(0.2)
            yield page
        finally:
            context.close()
            self.shut_down_kernels()

    def _kernel_ready(self, path: str) -> bool:
        for session in self.api("sessions"):
            if session["path"] == path:
                kernel = self.api(f"kernels/{session['kernel']['id']}")
                return kernel["execution_state"] == "idle" and kernel["connections"] >= 1
        return False


@pytest.fixture(scope="module")
def artifacts(request, tmp_path_factory) -> Path:
    """Where screenshots go: $EMA_KIT_ARTIFACTS, or a temporary folder; named at the end of the run."""
    folder = Path(os.environ.get("EMA_KIT_ARTIFACTS") or tmp_path_factory.mktemp("browser-artifacts"))
    folder.mkdir(parents=True, exist_ok=True)
    yield folder
    plugins = request.config.pluginmanager
    reporter, capture = plugins.get_plugin("terminalreporter"), plugins.get_plugin("capturemanager")
    if reporter is not None and capture is not None:
        with capture.global_and_fixture_disabled():
            reporter.write_line(f"\nbrowser tier screenshots: {folder}")


@pytest.fixture(scope="module")
def jupyter(tmp_path_factory):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM)
        server = Jupyter(tmp_path_factory.mktemp("jupyter"), browser)
        try:
            yield server
        finally:
            server.close()
            browser.close()


def _menu(page, menu: str, item: str) -> None:
    page.locator(".lm-MenuBar-itemLabel", has_text=re.compile(f"^{menu}$")).click()
    page.locator(".lm-Menu-itemLabel", has_text=re.compile(f"^{item}$")).click()


def _prompts(page) -> list[str]:
    return page.locator(".jp-CodeCell .jp-InputPrompt").all_inner_texts()


def _live_view(page) -> list[dict]:
    return page.evaluate("window.liveView")


_BUSY = (
    "[...document.querySelectorAll('.jp-CodeCell .jp-InputPrompt')].some(p => p.textContent.includes('*'))"
)
_TIMEOUT_MS = 240_000  # the kernel's first import of torch takes seconds, more on a busy machine


def _run_all(page) -> None:
    page.evaluate(_RECORDER, MARKER)
    _menu(page, "Run", "Run All Cells")
    page.wait_for_function(f"() => {_BUSY}")


def _wait_until_idle(page) -> None:
    page.wait_for_function(f"() => !{_BUSY}", timeout=_TIMEOUT_MS)


def _wait_for_rows(page, rows: int) -> bool:
    """Wait until the table shows ``rows`` rows (True), or the cells stopped running before (False)."""
    shown = f"(window.liveView.at(-1)?.table.length ?? 0) >= {rows}"
    page.wait_for_function(f"() => {shown} || !{_BUSY}", timeout=_TIMEOUT_MS)
    return page.evaluate(f"() => {shown}")


def _save(page, notebook: Path) -> None:
    before = notebook.stat().st_mtime_ns
    page.locator("jp-button[data-command='docmanager:save']:visible").click()
    deadline = time.monotonic() + 30
    while notebook.stat().st_mtime_ns == before:
        assert time.monotonic() < deadline, "the notebook was not saved"
        time.sleep(0.1)


def _live_view_output(page):
    """The outputs of the cell marked ``# the live view``."""
    cell = page.locator(".jp-CodeCell").filter(has=page.locator(".jp-InputArea", has_text=MARKER))
    return cell.locator(".jp-OutputArea")


def _run(
    jupyter: Jupyter,
    artifacts: Path,
    name: str,
    frontend: str,
    *,
    reopen: bool = False,
    long_epoch: bool = False,
) -> Run:
    """Run All on a fresh copy of tests/browser/``name`` in ``frontend``, with screenshots after the first
    epoch and at the end (with ``long_epoch``, also at the first plot within epoch 1); then, with
    ``reopen``, save, shut the kernel down, and open the notebook in a new browser session. With
    $EMA_KIT_LIVE_VIEW_PNG set, the live view's outputs at the end of fit_digits.ipynb in JupyterLab are
    saved there too (the README's docs/live_view.png)."""
    stem = f"{frontend}-{Path(name).stem}"
    notebook = jupyter.place(name, stem)
    with jupyter.session(notebook, frontend) as page:
        _run_all(page)
        if long_epoch:
            drawn = "(window.liveView.at(-1)?.images.length ?? 0) > 0"
            page.wait_for_function(f"() => {drawn} || !{_BUSY}", timeout=_TIMEOUT_MS)
            page.screenshot(path=artifacts / f"{stem}-within-epoch1.png")
        if _wait_for_rows(page, 1):
            page.screenshot(path=artifacts / f"{stem}-epoch1.png")
        _wait_until_idle(page)
        page.screenshot(path=artifacts / f"{stem}-end.png")
        readme_png = os.environ.get("EMA_KIT_LIVE_VIEW_PNG")
        if readme_png and (name, frontend) == ("fit_digits.ipynb", "lab"):
            _live_view_output(page).screenshot(path=readme_png)
        stderr = page.locator("[data-mime-type='application/vnd.jupyter.stderr']").all_inner_texts()
        run = Run(_live_view(page), notebook.parent, notebook, _prompts(page), stderr)
        if reopen:
            _save(page, notebook)
    if reopen:
        with jupyter.session(notebook, frontend) as page:
            page.evaluate(_RECORDER, MARKER)
            # A saved widget shows "Loading widget..." until the front end has found its model, or given up.
            settled = "(state => state?.images.length > 0 && !state.loading)(window.liveView.at(-1))"
            page.wait_for_function(f"() => {settled}")
            page.screenshot(path=artifacts / f"{stem}-reopened.png")
            run.reopened = _live_view(page)[-1]
    return run


@pytest.fixture(scope="module", params=["lab", "notebook"])
def fit_run(request, jupyter, artifacts) -> Run:
    """fit_digits.ipynb run in JupyterLab or Notebook 7, saved, and reopened in a new session."""
    return _run(jupyter, artifacts, "fit_digits.ipynb", request.param, reopen=True)


def _problems(run: Run, epochs: list[str] | None = None) -> list[str]:
    """What a user would call broken in a live view that ran to the end: each problem, in words. ``epochs``:
    the table's epochs at the end (default 1 to EPOCHS); the plot changes with each."""
    epochs = epochs or [str(e) for e in range(1, EPOCHS + 1)]
    problems = []
    states = run.states
    errors = {e for s in states for e in s["errors"]} | set(run.stderr)
    if errors:
        problems.append(f"error text: {[e[-300:] for e in sorted(errors)[:3]]}")
    if not states:
        return [*problems, f"no cell marked {MARKER!r}"]
    if max(len(s["images"]) for s in states) != 1 or len(run.final["images"]) != 1:
        problems.append(f"not exactly one plot: {[len(s['images']) for s in states]}")
    if len(run.images()) < len(epochs):
        problems.append(f"{len(run.images())} distinct plots for {len(epochs)} rows")
    if not any(s["bars"] for s in states):
        problems.append("no progress widget rendered")
    if not any(s["kinds"] == LAYOUT for s in states):
        problems.append(f"while running, never the outputs {LAYOUT}")
    if run.final["kinds"] != FINAL_LAYOUT:
        problems.append(f"outputs {run.final['kinds']} at the end, not {FINAL_LAYOUT}")
    if [row[0] for row in run.final["table"]] != epochs:
        problems.append(f"the table's epochs are {[row[0] for row in run.final['table']]}")
    if not run.final["text"] or not run.final["text"][0].startswith(f"epoch {epochs[-1].split('.')[0]}"):
        problems.append(f"not the bar's last line in its place at the end: {run.final['text'][:1]}")
    return problems


# -- fit, run to the end ------------------------------------------------------------------------------


def test_fit_shows_one_plot_redrawn_after_every_epoch(fit_run):
    assert max(len(state["images"]) for state in fit_run.states) == 1  # never two plots, at any moment
    assert len(fit_run.final["images"]) == 1
    plots = fit_run.images()
    assert len(plots) == EPOCHS, plots  # a new picture each epoch, none repeated
    for rows in range(1, EPOCHS + 1):  # epoch k's row appears in the table with epoch k's plot above it
        first = next(state for state in fit_run.states if len(state["table"]) == rows)
        assert first["images"] == [plots[rows - 1]], rows
    assert fit_run.final["images"] == [plots[-1]]


def test_fit_shows_a_rendered_progress_widget_that_ends_as_its_last_line(fit_run):
    assert any(state["bars"] == 1 for state in fit_run.states)
    assert all(state["bars"] <= 1 for state in fit_run.states)
    last_epoch = [s for s in fit_run.states if s["labels"] and f"epoch {EPOCHS}/{EPOCHS}" in s["labels"][0]]
    assert last_epoch and not fit_run.final["bars"]
    assert fit_run.final["text"][0] == last_epoch[-1]["labels"][0]  # the bar's last state, as plain text


def test_fit_shows_no_error_text(fit_run):
    for state in fit_run.states:
        assert not state["errors"] and not state["stderr"], state
    assert not fit_run.stderr  # nor any other cell: no traceback, no warning


def test_fit_shows_the_bar_the_plot_and_the_table_in_that_order(fit_run):
    assert any(state["kinds"] == LAYOUT for state in fit_run.states)
    assert fit_run.final["kinds"] == FINAL_LAYOUT


def test_fit_shows_the_table_with_one_row_per_finished_epoch_and_four_decimals(fit_run):
    assert fit_run.table()["epoch"].tolist() == list(range(1, EPOCHS + 1))
    scores = [value for row in fit_run.final["table"] for value in row[1:-1]]  # not epoch, nor seconds
    assert all(re.fullmatch(r"\d+\.\d{4}|\d\.\d{3}e-\d\d", value) for value in scores), scores
    saved = pd.read_csv(fit_run.folder / "runs" / "digits" / "history.csv")  # at full precision
    assert [row[1] for row in fit_run.final["table"]] == [f"{loss:.4f}" for loss in saved["train_loss"]]
    assert fit_run.prompts[-1] != "[ ]:"  # Run All went on after fit finished


def test_the_bar_and_the_table_show_one_train_loss(fit_run):
    bar = re.search(r"train_loss (\S+)", fit_run.final["text"][0]).group(1)
    assert bar == fit_run.final["table"][-1][1]


def test_a_reopened_notebook_keeps_the_final_plot_and_table(fit_run):
    reopened = fit_run.reopened
    assert reopened["images"] == fit_run.final["images"]
    assert reopened["table"] == fit_run.final["table"]


def test_a_reopened_notebook_shows_a_plain_final_line_where_the_bar_was(fit_run):
    reopened = fit_run.reopened
    assert not reopened["errors"] and not reopened["loading"], reopened
    assert reopened["kinds"] == FINAL_LAYOUT
    line = reopened["text"][0]
    assert re.match(rf"epoch {EPOCHS}/{EPOCHS}  batch 22/22  train_loss ", line), reopened["text"]


# -- the stop button -------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["fit_digits.ipynb", "loop_digits.ipynb"])
def test_the_stop_button_after_an_epoch_keeps_the_finished_epochs_and_stops_run_all(jupyter, artifacts, name):
    stem = f"lab-stop-{Path(name).stem}"
    notebook = jupyter.place(name, stem)
    with jupyter.session(notebook, "lab") as page:
        _run_all(page)
        assert _wait_for_rows(page, 1), _live_view(page)[-1]
        page.locator("jp-button[data-command='notebook:interrupt-kernel']:visible").click()  # the stop button
        _wait_until_idle(page)
        page.screenshot(path=artifacts / f"{stem}.png")
        states, prompts = _live_view(page), _prompts(page)
        next_cell = page.locator(".jp-CodeCell").last.locator(".jp-OutputArea").inner_text()
    final = states[-1]
    log = "runs/digits" if name == "fit_digits.ipynb" else "runs/loop"
    saved = pd.read_csv(notebook.parent / log / "history.csv")
    rows = len(final["table"])
    assert 1 <= rows < EPOCHS and rows == len(saved)  # the table and the log on disk agree
    assert [row[0] for row in final["table"]] == [str(e) for e in saved["epoch"]]
    plot_with_table = [s["images"] for s in states if len(s["table"]) == rows][0]
    assert final["images"] == plot_with_table  # and the plot shows the same epochs
    assert final["kinds"][:3] == FINAL_LAYOUT and not final["bars"]  # the bar's last line, not a widget
    if name == "fit_digits.ipynb":  # the message agrees too, in words
        said = " ".join(final["text"] + final["stderr"])
        finished = "1 finished epoch" if rows == 1 else f"{rows} finished epochs"
        message = (
            rf"KeyboardInterrupt: Stopped by the user (during|after) epoch \d of {EPOCHS}: kept {finished} "
            rf"\(the last kept: epoch {rows}\); runs/digits holds them, with a checkpoint of epoch {rows} to "
            "resume from"
        )
        assert re.search(message, said), said
    assert "after" not in next_cell and prompts[-1] == "[ ]:", (prompts, next_cell)  # Run All stopped


# -- scoring within epochs, and the training loss within long epochs ------------------------------------


def test_validate_every_scores_live_and_ema_within_epochs_on_the_live_plot(jupyter, artifacts):
    run = _run(jupyter, artifacts, "fit_validate_every.ipynb", "lab")
    problems = _problems(run, epochs=["0.5", "1", "1.5", "2"])
    assert not problems, problems
    during_epoch_1 = [s for s in run.states if s["labels"] and s["labels"][0].startswith("epoch 1/2")]
    assert any(s["table"] for s in during_epoch_1)  # the row at 0.5 came before the first epoch ended
    saved = pd.read_csv(run.folder / "runs" / "digits" / "history.csv")
    assert saved["epoch"].tolist() == [0.5, 1, 1.5, 2]


def test_within_a_long_epoch_the_training_loss_moves_on_the_plot_before_the_epochs_row(jupyter, artifacts):
    run = _run(jupyter, artifacts, "fit_long_epoch.ipynb", "lab", long_epoch=True)
    problems = _problems(run, epochs=["1"])
    assert not problems, problems
    before_the_row = [s for s in run.states if s["images"] and not s["table"]]
    assert before_the_row and before_the_row[0]["bars"] == 1  # drawn while the bar ran, before any row
    assert len(run.images()) >= 2  # the loss so far, then the epoch's row


def test_a_hand_written_loop_with_the_live_log_looks_like_fit(jupyter, artifacts):
    run = _run(jupyter, artifacts, "loop_digits.ipynb", "lab")
    assert not _problems(run), _problems(run)
    saved = pd.read_csv(run.folder / "runs" / "loop" / "history.csv")
    bar = re.search(r"train_loss (\S+)", run.final["text"][0]).group(1)
    assert bar == run.final["table"][-1][1] == f"{saved['train_loss'].iloc[-1]:.4f}"  # one train_loss
