"""launch (ema_kit/training/launch.py): torchrun in the background, here with CPU processes over gloo.

The DDP runs train tests/ddp_train.py (global batch 64 whatever the number of processes, no BatchNorm).
"""

import importlib.util
import os
import signal
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

from ema_kit import launch, watch
from ema_kit.training import read_status
from ema_kit.training.launch import Job

SCRIPT = Path(__file__).with_name("ddp_train.py")
REPO = Path(__file__).resolve().parents[1]


def _run(folder: Path, processes: int, *args: str) -> pd.DataFrame:
    job = launch(SCRIPT, folder / "run", *args, out_dir=folder / "run", processes=processes)
    try:
        return watch(folder / "run", job=job, every=0.2, progress="off", plot=False)
    finally:
        job.stop()


def _emas(folder: Path, processes: int) -> list[dict]:
    return [torch.load(folder / f"ema_rank{rank}.pth", weights_only=True) for rank in range(processes)]


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory) -> Path:
    """An uninterrupted run of 3 epochs on 2 CPU processes."""
    folder = tmp_path_factory.mktemp("two")
    _run(folder, 2)
    return folder


def test_a_missing_script_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="no script 'train.py'"):
        launch("train.py", out_dir=tmp_path)


@pytest.mark.parametrize("processes", ["two", 0, 1.5])
def test_processes_is_auto_or_a_positive_count(tmp_path, processes):
    (tmp_path / "train.py").write_text("")
    with pytest.raises((ValueError, TypeError), match="processes"):
        launch(tmp_path / "train.py", out_dir=tmp_path, processes=processes)


def test_the_processes_error_is_their_first_exception_not_torchruns_summary(tmp_path):
    log = tmp_path / "launch.log"
    log.write_text("== earlier start\nKeyError: old\n")
    printed = (
        "[rank1]: Traceback (most recent call last):\n[rank1]: ValueError: checkpoint.pt has batch_size 64\n"
        "[rank0]: ValueError: checkpoint.pt has batch_size 64, rank 0\n"
        "torch.distributed.elastic.multiprocessing.errors.ChildFailedError: \n"
    )
    with open(log, "a") as output:
        output.write("\n== 2026-12-04 16:57:36: torchrun ...\n")
        output.flush()
        command = [sys.executable, "-c", f"print({printed!r})"]
        job = Job(subprocess.Popen(command, stdout=output), command, log, processes=2)
    job.wait()
    assert job.error() == "ValueError: checkpoint.pt has batch_size 64"


@pytest.mark.slow
def test_auto_starts_one_process_without_a_gpu_with_the_notebooks_packages(tmp_path, capsys):
    script = tmp_path / "show.py"
    script.write_text(
        "import os, sys, ema_kit\nprint(os.environ['WORLD_SIZE'], sys.argv[1:], ema_kit.__file__)\n"
    )
    job = launch(script, "a b", "c", out_dir=tmp_path / "run")
    assert job.wait(timeout=120) == 0, job.log_tail()
    import ema_kit

    assert f"1 ['a b', 'c'] {ema_kit.__file__}" in job.log.read_text()
    said = capsys.readouterr().out
    assert (
        said
        == f"Started torchrun with 1 process (no GPU here: one process on the CPU); output in {job.log}.\n"
    )


@pytest.mark.slow
def test_two_processes_train_as_one_with_the_same_global_batch(tmp_path, two_processes):
    one = _run(tmp_path, 1)
    two = pd.read_csv(two_processes / "run" / "history.csv")
    # float32 sums in another order (two per-process means, averaged by the all-reduce, against one mean
    # over 64 rows) differ by about one ulp per step; over 24 SGD steps they stay near 1e-7 (measured
    # 2.4e-7 at most, 2026-12-04), while a wrong batch split changes losses in the second decimal.
    pd.testing.assert_frame_equal(
        one.drop(columns="seconds"), two.drop(columns="seconds"), rtol=1e-5, atol=1e-5
    )
    single, pair = _emas(tmp_path, 1)[0], _emas(two_processes, 2)
    for name in single:
        torch.testing.assert_close(pair[0][name], single[name], rtol=1e-4, atol=1e-5)
        assert torch.equal(pair[0][name], pair[1][name])  # the EMA is the same on both processes
    written = torch.load(two_processes / "run" / "model_ema.pth", weights_only=True)  # the best epoch's
    assert written.keys() == single.keys()


def _rank_pid(job, rank: int) -> int:
    """The pid of torchrun's worker process of ``rank`` (Linux: /proc)."""
    children = Path(f"/proc/{job.pid}/task/{job.pid}/children").read_text().split()
    for pid in map(int, children):
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        if f"RANK={rank}".encode() in environ:
            return pid
    raise AssertionError(f"no worker of rank {rank} among torchrun's children {children}")


@pytest.mark.slow
def test_killing_a_process_ends_the_job_and_resume_finishes_it_as_if_uninterrupted(tmp_path, two_processes):
    job = launch(SCRIPT, tmp_path / "run", "--pause", "0.3", out_dir=tmp_path / "run", processes=2)
    try:
        deadline = time.time() + 120
        while (read_status(tmp_path / "run") or {}).get("epoch") != 2:  # epoch 1 saved, epoch 2 under way
            assert time.time() < deadline and job.running, job.log_tail()
            time.sleep(0.05)
        time.sleep(0.8)  # a few batches into epoch 2
        os.kill(_rank_pid(job, 1), signal.SIGKILL)
        assert job.wait(timeout=120) != 0
        with pytest.raises(RuntimeError) as error:
            watch(tmp_path / "run", job=job, every=0.2, progress="off", plot=False)
    finally:
        job.stop()
    said = str(error.value)
    # Rank 0 ends either in gloo's error (fit marks the run failed) or by torchrun's SIGTERM.
    assert said.startswith(f"The run in {tmp_path / 'run'} stopped without finishing: "), said
    assert f"The last epoch saved is 1 of 3 ({tmp_path / 'run' / 'checkpoint.pt'})" in said
    status = read_status(tmp_path / "run")
    assert (status["epoch"], status["saved_epoch"]) == (2, 1)  # killed within epoch 2
    resumed = _run(tmp_path, 2, "--resume")
    uninterrupted = pd.read_csv(two_processes / "run" / "history.csv")
    pd.testing.assert_frame_equal(resumed.drop(columns="seconds"), uninterrupted.drop(columns="seconds"))
    for rank, (after, before) in enumerate(zip(_emas(tmp_path, 2), _emas(two_processes, 2))):
        assert all(torch.equal(after[name], before[name]) for name in before), rank
    assert "Resumed from" in (tmp_path / "run" / "launch.log").read_text()


@pytest.mark.slow
def test_stop_ends_every_process_and_watch_names_the_epoch_to_resume_from(tmp_path):
    job = launch(SCRIPT, tmp_path / "run", "--pause", "0.3", out_dir=tmp_path / "run", processes=2)
    deadline = time.time() + 120
    while (read_status(tmp_path / "run") or {}).get("saved_epoch") != 1:
        assert time.time() < deadline and job.running, job.log_tail()
        time.sleep(0.05)
    workers = [_rank_pid(job, rank) for rank in (0, 1)]
    assert job.stop() != 0 and not job.running
    assert not any(Path(f"/proc/{pid}").exists() for pid in workers)
    with pytest.raises(RuntimeError, match="The last epoch saved is 1 of 3"):
        watch(tmp_path / "run", job=job, progress="off", plot=False)


def _python_without_ema_kit(folder: Path) -> Path:
    """A Python that sees every package installed here but ema_kit (as a Kaggle kernel does)."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", folder / "venv"], check=True)
    python = folder / "venv" / "bin" / "python"
    site = subprocess.check_output([python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"])
    packages = folder / "packages"
    packages.mkdir()
    for entry in Path(sysconfig.get_path("purelib")).iterdir():
        if not entry.name.lower().startswith(("ema_kit", "__editable__")):
            (packages / entry.name).symlink_to(entry)
    Path(site.decode().strip(), "packages.pth").write_text(f"{packages}\n")
    return python


@pytest.mark.slow
def test_processes_import_the_wheel_the_notebook_imported(tmp_path):
    """On Kaggle the first cell puts the dataset's wheel on sys.path and imports ema_kit from it;
    torchrun's processes must find it too, though nothing installed it."""
    spec = importlib.util.spec_from_file_location("kaggle_build", REPO / "kaggle" / "build.py")
    build = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build)
    wheel = build.build_wheel(build.read_package(), tmp_path / "dataset")
    (tmp_path / "show.py").write_text(
        "import os, ema_kit\nprint('rank', os.environ['RANK'], ema_kit.__file__)\n"
    )
    notebook = (
        f"import sys; sys.path.insert(0, {str(wheel)!r})\n"
        "from ema_kit import launch\n"
        f"job = launch({str(tmp_path / 'show.py')!r}, out_dir={str(tmp_path / 'run')!r}, processes=2)\n"
        "sys.exit(job.wait(timeout=120))\n"
    )
    python = _python_without_ema_kit(tmp_path)
    result = subprocess.run([python, "-c", notebook], capture_output=True, text=True, timeout=180)
    log = (tmp_path / "run" / "launch.log").read_text()
    assert result.returncode == 0, result.stderr + log
    bundled = f"{wheel}/ema_kit/__init__.py"
    assert f"rank 0 {bundled}" in log and f"rank 1 {bundled}" in log
