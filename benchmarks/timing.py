"""What the benchmarks share: interleaved timing rounds, and the line that names the machine of a run."""

from __future__ import annotations

import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch


def interleaved(fns: dict[str, Callable], rounds: int, inner: int, sync: Callable = lambda: None) -> dict:
    """Median seconds per call of each function over ``rounds`` rounds of ``inner`` calls each.

    Each round times every function once, starting with a different one, so that a drift in the machine's
    speed reaches every function alike.

    Example:
        >>> medians = interleaved({"a": lambda: None, "b": lambda: None}, rounds=3, inner=2)
        >>> sorted(medians) == ["a", "b"] and all(seconds >= 0 for seconds in medians.values())
        True
    """
    names = list(fns)
    samples = {name: [] for name in names}
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            fn = fns[name]
            sync()
            start = time.perf_counter()
            for _ in range(inner):
                fn()
            sync()
            samples[name].append((time.perf_counter() - start) / inner)
    return {name: statistics.median(values) for name, values in samples.items()}


def one_call_rounds(
    fns: dict[str, Callable], rounds: int, before: Callable = lambda: None, sync: Callable = lambda: None
) -> dict[str, list[int]]:
    """Nanoseconds of each function's calls, one call per function per round, each call timed alone.

    Each round calls every function once, starting with a different one, and runs ``before()`` (untimed)
    ahead of every call: what a training loop does between two updates. Round r's samples are entry r of
    every list, so a ratio can be taken within a round, where the machine's speed drifted least.

    Example:
        >>> samples = one_call_rounds({"a": lambda: None, "b": lambda: None}, rounds=3)
        >>> [len(samples[name]) for name in ("a", "b")]
        [3, 3]
    """
    names = list(fns)
    samples: dict[str, list[int]] = {name: [] for name in names}
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            fn = fns[name]
            before()
            sync()
            start = time.perf_counter_ns()
            fn()
            sync()
            samples[name].append(time.perf_counter_ns() - start)
    return samples


def machine() -> str:
    """The processor, torch threads, torch and Python versions (and the GPU, if any) of this run."""
    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        names = [
            line.split(":", 1)[1].strip()
            for line in cpuinfo.read_text().splitlines()
            if line.startswith("model name")
        ]
        cpu = names[0] if names else cpu
    threads = torch.get_num_threads()
    text = f"{cpu}, {threads} thread{'s' if threads > 1 else ''}, torch {torch.__version__}"
    text += f", Python {platform.python_version()}"
    if torch.cuda.is_available():
        text += f", {torch.cuda.get_device_name()}"
    return text
