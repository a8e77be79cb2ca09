"""``launch``: run a training script under ``torchrun`` on every GPU of the machine, in the background, from
a notebook (which stays free to ``watch`` the run).
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import torch

from .. import _checks

LOG_FILE = "launch.log"  # torchrun's and the processes' output, in the run folder
_EXCEPTION = re.compile(
    r"^(?:\[rank\d+\]: )?((?:\w+\.)*\w*(?:Error|Exception)\b.*)$"
)  # "[rank0]: ValueError: ..."


class Job:
    """A ``torchrun`` started by ``launch``: ``running``, ``returncode``, ``wait()``, ``stop()``.

    ``log`` is the file its output goes to; ``started`` the Unix time it was started.
    """

    def __init__(self, process: subprocess.Popen, command: list[str], log: Path, processes: int):
        self.process, self.command, self.log, self.processes = process, command, log, processes
        self.pid = process.pid
        self.started = time.time()

    @property
    def running(self) -> bool:
        return self.process.poll() is None

    @property
    def returncode(self) -> int | None:
        """torchrun's exit status (0: every process finished), or None while it runs."""
        return self.process.poll()

    def wait(self, timeout: float | None = None) -> int:
        """Wait for the run to end; returns torchrun's exit status."""
        return self.process.wait(timeout)

    def stop(self) -> int:
        """Stop the run (torchrun stops its processes; the checkpoint of the last finished epoch stays)."""
        if self.running:
            self.process.terminate()
        return self.process.wait()

    def log_tail(self, lines: int = 20) -> str:
        """The last ``lines`` lines of the run's output."""
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return ""

    def error(self) -> str | None:
        """The first Python exception the processes of this start printed ("ValueError: ..."), if any."""
        try:
            started = self.log.read_text(errors="replace").rpartition("\n== ")[2]  # this start's part
        except FileNotFoundError:
            return None
        for line in started.splitlines():
            found = _EXCEPTION.match(line)
            if found and "ChildFailedError" not in line:  # torchrun's own summary of a failed process
                return found.group(1)
        return None

    def __repr__(self) -> str:
        state = "running" if self.running else f"ended with exit status {self.returncode}"
        return f"<Job pid {self.pid}: {self.processes} process(es), {state}; output in {self.log}>"


def launch(
    script: str | os.PathLike,
    *args: str,  # the script's own arguments
    out_dir: str | os.PathLike,  # the run folder: launch.log goes there (the script's fit writes it too)
    processes: int | str = "auto",  # "auto": one per GPU, or 1; or a number
) -> Job:
    """Start ``torchrun --standalone --nproc-per-node=<processes> script *args`` in the background.

    ``processes="auto"``: one per CUDA GPU (two on Kaggle's "GPU T4 x2"), or one where there is a single
    GPU or none (the CPU); a number starts that many (on the CPU they talk over gloo). It says in one
    line what it started and why. The output of torchrun and of every process goes to
    ``out_dir/launch.log`` (appended to); the processes import the same ema_kit and packages as this one
    (the notebook's ``sys.path``). Returns a ``Job`` at once: ``watch(out_dir, job=job)`` shows the run live.
    Interrupting the notebook does not stop the run (it runs in its own session): ``job.stop()`` does.

    The script is an ordinary DDP script (``torch.distributed.init_process_group``, a
    ``DistributedSampler``, ``fit(..., out_dir=out_dir)``): see docs/distributed.md.
    """
    script = Path(script)
    if not script.is_file():
        raise FileNotFoundError(f"launch: no script {str(script)!r} (write it first, e.g. with %%writefile).")
    processes, why = _processes(processes)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    log = out_dir / LOG_FILE
    torchrun = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={processes}",
    ]
    command = [*torchrun, str(script), *map(str, args)]
    env = os.environ | {  # the notebook's sys.path: on Kaggle, the dataset's wheel its first cell put there
        "PYTHONPATH": os.pathsep.join(entry for entry in sys.path if entry),
        "PYTHONUNBUFFERED": "1",  # the log shows each line as it is printed
    }
    with open(log, "a") as output:  # appended: a resumed run's log follows the one it resumes
        output.write(f"\n== {time.strftime('%Y-%m-%d %H:%M:%S')}: {shlex.join(command)}\n")
        output.flush()
        process = subprocess.Popen(
            command, stdout=output, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
            start_new_session=True,
        )  # fmt: skip
    plural = "es" if processes > 1 else ""
    print(f"Started torchrun with {processes} process{plural} ({why}); output in {log}.")
    return Job(process, command, log, processes)


def _processes(processes: int | str) -> tuple[int, str]:
    """How many processes, and why, in words. Only counts GPUs: asking their names would start CUDA in
    this process (the notebook's), which would hold memory on GPU 0 all through the run."""
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if processes == "auto":
        if gpus > 1:
            return gpus, f"one per GPU: {gpus} GPUs"
        if gpus == 1:
            return 1, "one GPU here: one process"
        return 1, "no GPU here: one process on the CPU"
    if isinstance(processes, str):
        raise ValueError(f"processes must be 'auto' or a number of processes, got {processes!r}.")
    processes = _checks.check_int("processes", processes, minimum=1)
    if gpus and processes > gpus:
        raise ValueError(
            f"processes={processes}, but this machine has {gpus} GPU(s): at most one process each."
        )
    return processes, f"one per GPU, on {processes} of {gpus}" if gpus else "on the CPU, over gloo"
