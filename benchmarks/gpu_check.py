"""The GPU check: the CUDA test tier, notebook 02 at full size, and the EMA update benchmark, on one GPU.

    python benchmarks/gpu_check.py                # on a CUDA machine: writes benchmarks/RESULTS_gpu.md
    python benchmarks/gpu_check.py --cpu-dry-run  # the same code paths on the CPU at tiny sizes

It runs, within 8 minutes in all (each stage has its own time limit, and the benchmark gets what is
left):

1. the CUDA test tier, ``pytest -m cuda tests`` (tests/test_devices.py holds it), in a subprocess;
2. notebooks/02_kaggle_digit_recognizer.ipynb at full size (``EMA_KIT_SMOKE`` unset), executed by nbmake
   in a temporary folder, so its data and runs/ land there; it trains on the GPU because ``fit`` picks
   CUDA when there is one;
3. the EMA update benchmark on the three models of benchmarks/models.py: ``ModelEMA.update`` as a ratio
   to the floor (one ``lerp_`` over a flat tensor of the same element count), a bare
   ``torch._foreach_lerp_`` reference row, the peers that import here, and the achieved GB/s against
   the device's peak memory bandwidth. Bytes counted per update: read live + read shadow + write shadow
   over the floating-point state. Timed with CUDA events over interleaved rounds; medians.

It writes the device name, the date and each stage's result to benchmarks/RESULTS_gpu.md, with the
notebook's live vs EMA curves beside it (RESULTS_gpu_notebook02_history.png), and exits 1 when a stage
failed or did not finish. On a machine without a CUDA device it prints that nothing ran and exits 0.
``--cpu-dry-run`` runs every stage on the CPU at tiny sizes (one CPU test of the tier, the notebook at
smoke size, two small models), to check the script itself; it writes only ``--out`` and the figure beside it.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ElementTree
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import torch
from models import MODELS, ViT, tiny_cnn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from ema_kit import ModelEMA
from ema_kit.kaggle.inputs import ROOT_VARIABLE, SMOKE_VARIABLE, kaggle_root

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
NOTEBOOK = ROOT / "notebooks" / "02_kaggle_digit_recognizer.ipynb"
BUDGET_S = 480  # the whole check
TESTS_LIMIT_S = 180  # the CUDA tier, torch.compile's first Triton build included
NOTEBOOK_LIMIT_S = 220
BENCHMARK_MIN_S = 60  # what the stages before it leave to the benchmark at least
DECAY = 0.999
FLOOR = "floor (one flat lerp_)"
OURS = "ema_kit ModelEMA"
REFERENCE = "reference: bare _foreach_lerp_"


@dataclass
class Stage:
    """One stage's outcome: a headline for the summary, markdown lines for its section, and its figures."""

    name: str
    ok: bool
    headline: str
    lines: list[str] = field(default_factory=list)
    figures: dict[str, bytes] = field(default_factory=dict)  # name -> PNG, written beside the report


# -- running a subprocess within a time limit ---------------------------------------------------------


def run(command: list[str], *, cwd: Path, env: dict, limit_s: float) -> tuple[int | None, str, float]:
    """Run ``command``; return its exit code (None when it ran past ``limit_s``), output and seconds.

    It runs in a session of its own, so a time-out also ends what it started (a notebook's kernel).
    """
    started = time.monotonic()
    process = subprocess.Popen(
        command,
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        output, _ = process.communicate(timeout=max(limit_s, 1))
        code = process.returncode
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
        code = None
    return code, output, time.monotonic() - started


def checkout_env(**changes: str | None) -> dict:
    """This process's environment with the checkout first on PYTHONPATH (its ema_kit is the one tested)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    for name, value in changes.items():
        if value is None:
            env.pop(name, None)
        else:
            env[name] = value
    return env


def tail(output: str, lines: int = 25) -> list[str]:
    return ["```", *output.rstrip().splitlines()[-lines:], "```"]


# -- 1. the CUDA test tier ------------------------------------------------------------------------------


def cuda_test_tier(dry_run: bool, limit_s: float, scratch: Path) -> Stage:
    junit = scratch / "junit.xml"
    if dry_run:  # one CPU case of the tier's file: the same pytest run and report, in seconds
        selection = [str(ROOT / "tests" / "test_devices.py"), "-k", "cpu and fit_with_amp_trains and bf16"]
    else:
        # A test module that fails to import here (a missing extra) is reported; the CUDA cases still run.
        selection = ["-m", "cuda", "--continue-on-collection-errors", str(ROOT / "tests")]
    command = [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", f"--junitxml={junit}"]
    code, output, seconds = run(command + selection, cwd=ROOT, env=checkout_env(), limit_s=limit_s)
    shown = " ".join(["pytest", *selection]).replace(str(ROOT) + os.sep, "")
    if code is None:
        return Stage(
            "CUDA test tier", False, f"timed out after {seconds:.0f} s", [f"`{shown}`", ""] + tail(output)
        )
    if not junit.is_file():
        return Stage("CUDA test tier", False, f"pytest exited {code} without a report", tail(output))
    counts, skipped_modules = junit_counts(junit)
    passed = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    # A skip on the GPU machine means a CUDA case did not run: the tier has not passed.
    ok = (
        code == 0 and counts["tests"] > 0 and counts["failures"] == counts["errors"] == counts["skipped"] == 0
    )
    headline = (
        f"{'passed' if ok else 'FAILED'}: {passed} passed, {counts['failures']} failed, {counts['errors']} "
        f"errors, {counts['skipped']} skipped, in {seconds:.0f} s"
    )
    if skipped_modules:
        headline += f"; skipped whole at collection: {', '.join(skipped_modules)}"
    lines = [f"`{shown}` (pytest exit code {code})", ""]
    lines += [f"- `{module}` skipped itself at collection: {why}" for module, why in skipped_modules.items()]
    return Stage("CUDA test tier", ok, headline, lines if ok else lines + tail(output))


def junit_counts(path: Path) -> tuple[dict[str, int], dict[str, str]]:
    """A JUnit report's test counts, less the modules that skipped themselves whole at collection.

    Those (tests/test_browser.py without its browser) come back apart, module -> reason, for the report
    to name: such a module is not a test case, and counting it as a skipped CUDA case would fail the tier.
    """
    root = ElementTree.parse(path).getroot()
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    counts = {key: int(suite.get(key, 0)) for key in ("tests", "failures", "errors", "skipped")}
    modules = {}
    for case in suite.iter("testcase"):
        # One entry per collector of the module: the test module, and the doctest one (--doctest-modules).
        skips = [skip for skip in case.findall("skipped") if skip.get("message") == "collection skipped"]
        if skips:
            modules[case.get("name")] = skips[0].text.rsplit("Skipped: ", 1)[-1].rstrip("')")
            counts["tests"] -= len(skips)
            counts["skipped"] -= len(skips)
    return counts, modules


# -- 2. notebook 02 at full size -------------------------------------------------------------------------


def notebook(dry_run: bool, limit_s: float, scratch: Path) -> Stage:
    name = "notebook 02 at full size" if not dry_run else "notebook 02 (dry run: smoke size)"
    if importlib.util.find_spec("nbmake") is None:
        return Stage(name, False, "NOT RUN: nbmake is not installed (pip install nbmake)")
    folder = scratch / "notebook"
    folder.mkdir()
    copy = folder / NOTEBOOK.name
    copy.write_bytes(NOTEBOOK.read_bytes())
    # Full size: EMA_KIT_SMOKE unset. The dry run is a test, so it also keeps away from a real /kaggle.
    env = checkout_env(**{SMOKE_VARIABLE: "1" if dry_run else None})
    if dry_run:
        env[ROOT_VARIABLE] = str(folder / "no-kaggle-here")
    data = kaggle_root() / "input" / "digit-recognizer"
    source = f"Kaggle's files in {data}" if not dry_run and data.is_dir() else "scikit-learn's digits"
    command = [
        sys.executable, "-m", "pytest", "--nbmake", f"--nbmake-timeout={int(limit_s)}", "-q",
        "-p", "no:cacheprovider", "--rootdir", str(folder), str(copy),
    ]  # fmt: skip
    code, output, seconds = run(command, cwd=folder, env=env, limit_s=limit_s)
    if code is None:
        return Stage(name, False, f"timed out after {seconds:.0f} s", tail(output))
    if code != 0:
        return Stage(name, False, f"FAILED (nbmake exit code {code}) after {seconds:.0f} s", tail(output, 60))
    histories = sorted(folder.glob("runs/*/history.csv"))
    if len(histories) != 1:
        found = [str(p.relative_to(folder)) for p in histories]
        return Stage(
            name, False, f"ran in {seconds:.0f} s but left {len(histories)} runs/*/history.csv {found}"
        )
    figure = histories[0].with_name("history.png")
    if not figure.is_file():
        return Stage(name, False, f"ran in {seconds:.0f} s but fit wrote no {figure.relative_to(folder)}")
    log = pd.read_csv(histories[0])
    last = log.iloc[-1]
    scores = [column for column in log.columns if column.endswith(("_accuracy", "_loss"))]
    headline = (
        f"passed in {seconds:.0f} s: {len(log)} epochs on {source}, median {log['seconds'].median():.1f} s "
        f"per epoch"
    )
    lines = [
        f"Executed by nbmake with `{SMOKE_VARIABLE}` {'set' if dry_run else 'unset'}; `fit(device='auto')` "
        f"trains on CUDA when torch sees a GPU (here: {torch.cuda.is_available()}). Last epoch of "
        f"`{histories[0].relative_to(folder)}`:",
        "",
        "| " + " | ".join(scores) + " |",
        "|" + " ---: |" * len(scores),
        "| " + " | ".join(f"{last[column]:.4f}" for column in scores) + " |",
    ]
    return Stage(name, True, headline, lines, {"notebook02_history.png": figure.read_bytes()})


# -- 3. the EMA update benchmark ---------------------------------------------------------------------------


class Timer:
    """Seconds per call of a function: CUDA events around the calls on a GPU, the wall clock on a CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def seconds(self, fn: Callable[[], object], calls: int) -> float:
        if not self.cuda:
            started = time.perf_counter()
            for _ in range(calls):
                fn()
            return (time.perf_counter() - started) / calls
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        for _ in range(calls):
            fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / 1e3 / calls


def peers(model) -> tuple[dict[str, Callable[[], object]], list[str]]:
    """Peer EMA updates of ``model`` that can be built here, and the names of those that cannot."""
    built, missing = {}, []
    averaged = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(DECAY), use_buffers=True)
    built["AveragedModel (multi_avg_fn)"] = lambda: averaged.update_parameters(model)
    timm = importlib.util.find_spec("timm")
    if timm is not None:  # from its file: importing timm itself needs torchvision
        spec = importlib.util.spec_from_file_location(
            "timm_model_ema", Path(timm.submodule_search_locations[0]) / "utils" / "model_ema.py"
        )
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        timm_v3 = module.ModelEmaV3(model, decay=DECAY)
        built["timm ModelEmaV3"] = lambda: timm_v3.update(model)
    else:
        missing.append("timm")
    if importlib.util.find_spec("ema_pytorch") is not None:
        import ema_pytorch

        lucid = ema_pytorch.EMA(model, beta=DECAY, update_after_step=0, update_every=1, use_foreach=True)
        built["ema-pytorch EMA (foreach)"] = lucid.update
    else:
        missing.append("ema-pytorch")
    if importlib.util.find_spec("torch_ema") is not None:
        import torch_ema

        built["torch-ema (params only)"] = torch_ema.ExponentialMovingAverage(
            model.parameters(), decay=DECAY, use_num_updates=False
        ).update
    else:
        missing.append("torch-ema")
    return built, missing


def update_functions(model, device: torch.device) -> tuple[dict[str, Callable[[], object]], int, list[str]]:
    """name -> one EMA update of ``model`` (each with its own shadow); the bytes an update moves at least."""
    floats = [t for t in model.state_dict().values() if t.is_floating_point()]
    count = sum(t.numel() for t in floats)
    moved = sum(3 * t.numel() * t.element_size() for t in floats)  # read live, read shadow, write shadow
    flat_live, flat_shadow = torch.randn(count, device=device), torch.randn(count, device=device)
    ours = ModelEMA(model, DECAY, warmup=False)
    bare = [t.clone() for t in floats]
    functions = {
        FLOOR: lambda: flat_shadow.lerp_(flat_live, 1 - DECAY),
        OURS: lambda: ours.update(model),
        REFERENCE: lambda: torch._foreach_lerp_(bare, floats, 1 - DECAY),
    }
    built, missing = peers(model)
    return functions | built, moved, missing


def measure(functions: dict, timer: Timer, rounds: int, min_seconds: float) -> dict[str, float]:
    """Median seconds per update of each function over interleaved rounds (each round starts elsewhere)."""
    names = list(functions)
    calls = {}
    for name, fn in functions.items():  # warm up, then size each timing to last about min_seconds
        timer.seconds(fn, 3)
        calls[name] = max(1, round(min_seconds / max(timer.seconds(fn, 1), 1e-7)))
    samples = {name: [] for name in names}
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            samples[name].append(timer.seconds(functions[name], calls[name]))
    return {name: statistics.median(values) for name, values in samples.items()}


def peak_bandwidth(device: torch.device) -> float | None:
    """The device's peak memory bandwidth in bytes/s (double data rate x bus width), or None if unknown."""
    if device.type != "cuda":
        return None
    properties = torch.cuda.get_device_properties(device)
    clock_khz, bus_bits = (
        getattr(properties, "memory_clock_rate", 0),
        getattr(properties, "memory_bus_width", 0),
    )
    return 2 * clock_khz * 1e3 * bus_bits / 8 if clock_khz and bus_bits else None


def benchmark(
    device: torch.device, builders: dict, rounds: int, min_seconds: float, deadline: float
) -> Stage:
    timer = Timer(device)
    results, moved, sizes, missing, late = {}, {}, {}, [], []
    for name, build in builders.items():
        if time.monotonic() > deadline:
            late.append(name)
            continue
        torch.manual_seed(0)
        model = build().to(device)
        functions, moved[name], missing = update_functions(model, device)
        sizes[name] = (
            sum(t.numel() for t in model.state_dict().values() if t.is_floating_point()),
            len(model.state_dict()),
        )
        results[name] = measure(functions, timer, rounds, min_seconds)
        del model, functions
        if device.type == "cuda":
            torch.cuda.empty_cache()
    title = "EMA update benchmark"
    if not results:
        return Stage(title, False, "NOT RUN: no time left")
    models = list(results)
    peak = peak_bandwidth(device)
    lines = [
        f"{rounds} interleaved rounds, medians; {'CUDA events' if timer.cuda else 'wall clock'}; decay "
        f"{DECAY}, no warmup. Cost of one update as a ratio to the floor (one `lerp_` over a flat tensor of "
        "the same element count); lower is better.",
        "",
        "| method | "
        + " | ".join(f"{m} ({sizes[m][0] / 1e6:.2f}M, {sizes[m][1]} tensors)" for m in models)
        + " |",
        "| --- |" + " ---: |" * len(models),
    ]
    for method in results[models[0]]:
        lines.append(
            f"| {method} | "
            + " | ".join(f"{results[m][method] / results[m][FLOOR]:.2f}x" for m in models)
            + " |"
        )
    lines.append(
        "| floor, absolute | " + " | ".join(f"{results[m][FLOOR] * 1e6:,.1f} us" for m in models) + " |"
    )
    lines.append(
        f"| {OURS} / bare foreach | "
        + " | ".join(f"{results[m][OURS] / results[m][REFERENCE]:.2f}x" for m in models)
        + " |"
    )
    for method in (FLOOR, OURS, REFERENCE):
        cells = []
        for m in models:
            rate = moved[m] / results[m][method]
            cells.append(f"{rate / 1e9:,.0f} GB/s" + (f" ({rate / peak:.0%} of peak)" if peak else ""))
        lines.append(f"| {method}, achieved | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Achieved GB/s counts, per update, read live + read shadow + write shadow over the floating-point "
        f"state (12 bytes per float32 element); peak: {f'{peak / 1e9:,.0f} GB/s' if peak else 'unknown'}"
        + (" (memory clock x 2 x bus width, from torch.cuda.get_device_properties)." if peak else "."),
    ]
    if missing:
        lines.append(f"Peers not installed here, so not measured: {', '.join(missing)}.")
    if late:
        lines.append(f"Not measured, the time limit came first: {', '.join(late)}.")
    headline = ", ".join(f"{m} {results[m][OURS] / results[m][FLOOR]:.2f}x the floor" for m in models)
    return Stage(
        title, not late, f"{OURS}: {headline}" + (f"; NOT measured: {', '.join(late)}" if late else ""), lines
    )


# -- the report -----------------------------------------------------------------------------------------


def describe(device: torch.device) -> str:
    text = f"torch {torch.__version__}, Python {platform.python_version()}"
    if device.type != "cuda":
        return f"the CPU ({platform.machine()}, {torch.get_num_threads()} threads), {text}"
    properties = torch.cuda.get_device_properties(device)
    return (
        f"{properties.name} ({properties.total_memory / 2**30:.0f} GiB, compute capability "
        f"{properties.major}.{properties.minor}, {torch.cuda.device_count()} visible), "
        f"CUDA {torch.version.cuda}, {text}"
    )


def render(stages: list[Stage], device: torch.device, seconds: float, dry_run: bool, out: Path | None) -> str:
    lines = [
        "# GPU check" + (" (CPU dry run: tiny sizes, says nothing about a GPU)" if dry_run else ""),
        "",
        f"Run {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC on {describe(device)}, by "
        f"`python benchmarks/gpu_check.py{' --cpu-dry-run' if dry_run else ''}` in {seconds:.0f} s.",
        "",
    ]
    lines += [f"- {stage.name}: {stage.headline}" for stage in stages]
    for stage in stages:
        lines += ["", f"## {stage.name}", "", *(stage.lines or [stage.headline])]
        if out is not None and stage.figures:  # main writes each figure beside the report, by this name
            lines += ["", *(f"![{name}]({figure_path(out, name).name})" for name in stage.figures)]
    return "\n".join(lines) + "\n"


def figure_path(report: Path, name: str) -> Path:
    return report.with_name(f"{report.stem}_{name}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--cpu-dry-run",
        action="store_true",
        help="run every stage on the CPU at tiny sizes, to check the script",
    )
    parser.add_argument(
        "--out", type=Path, help="the report's path (default: benchmarks/RESULTS_gpu.md; none in a dry run)"
    )
    args = parser.parse_args()
    if not args.cpu_dry_run and not torch.cuda.is_available():
        print(
            "No CUDA device here: nothing ran and nothing was written. On a GPU machine this script runs the"
        )
        print("CUDA test tier, notebook 02 and the EMA update benchmark; --cpu-dry-run checks it on the CPU.")
        return 0
    started = time.monotonic()
    deadline = started + BUDGET_S
    if args.cpu_dry_run:
        device = torch.device("cpu")
        builders = {
            "ViT (dry run: 2 blocks, 96 wide)": lambda: ViT(image=32, dim=96, depth=2, num_classes=10),
            "tiny CNN": tiny_cnn,
        }
        rounds, min_seconds = 3, 0.001
    else:
        device = torch.device("cuda")
        builders, rounds, min_seconds = MODELS, 15, 0.02
    stages = []
    with tempfile.TemporaryDirectory(prefix="gpu_check-") as scratch:
        for name, stage, limit in (
            ("CUDA test tier", cuda_test_tier, TESTS_LIMIT_S),
            ("notebook 02", notebook, NOTEBOOK_LIMIT_S),
        ):
            left = deadline - time.monotonic() - BENCHMARK_MIN_S
            print(f"{name}: running (at most {max(min(limit, left), 0):.0f} s)", file=sys.stderr)
            if left < 30:
                stages.append(Stage(name, False, f"NOT RUN: {max(left, 0):.0f} s were left for it"))
            else:
                stages.append(stage(args.cpu_dry_run, min(limit, left), Path(scratch)))
            print(f"{stages[-1].name}: {stages[-1].headline}", file=sys.stderr)
    print(
        f"EMA update benchmark: running (no new model after {deadline - 15 - time.monotonic():.0f} s)",
        file=sys.stderr,
    )
    stages.append(benchmark(device, builders, rounds, min_seconds, deadline - 15))
    print(f"{stages[-1].name}: {stages[-1].headline}", file=sys.stderr)
    out = args.out or (None if args.cpu_dry_run else HERE / "RESULTS_gpu.md")
    report = render(stages, device, time.monotonic() - started, args.cpu_dry_run, out)
    print(report)
    if out is not None:
        out.write_text(report)
        print(f"wrote {out}", file=sys.stderr)
        for stage in stages:
            for name, figure in stage.figures.items():
                figure_path(out, name).write_bytes(figure)
                print(f"wrote {figure_path(out, name)}", file=sys.stderr)
    return 0 if all(stage.ok for stage in stages) else 1


if __name__ == "__main__":
    sys.exit(main())
