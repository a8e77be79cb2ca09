"""Peak memory of scoring a segmentation validation set: ``evaluate`` streams; it used to keep every output.

    python benchmarks/evaluate_memory.py            # writes benchmarks/RESULTS_evaluate.md
    python benchmarks/evaluate_memory.py --quick    # a smoke run: 8 small images, no file written

The set: 64 images of 3x512x512 with 4-class masks, in batches of 8, made batch by batch from a seeded
generator (so the data itself is never all in memory), scored by a tiny conv net (two conv layers) on the
CPU with the default loss (cross entropy per pixel) and pixel accuracy. Each way of scoring runs in a
process of its own; its peak is the process's peak resident memory (Linux ``VmHWM``, reset just before
scoring) above its resident memory then (torch loaded, the model built and run once). The reference row
of the same run runs the forward passes alone and keeps nothing: the least any scoring needs.

- all kept: what ``evaluate`` did before it streamed: every output (float32) and target kept on the
  CPU, concatenated, then the metric called once;
- streamed: ``evaluate`` today, the loss and accuracy per batch, averaged weighted by batch size;
- whole_set: ``evaluate`` with the accuracy marked ``whole_set``, so that outputs are kept again
  (what a metric such as AUC costs).
"""

from __future__ import annotations

import argparse
import datetime
import json
import subprocess
import sys
import time
from pathlib import Path

import torch
from timing import machine
from torch import nn

from ema_kit.training.evaluate import accuracy, evaluate, whole_set

HERE = Path(__file__).resolve().parent
CLASSES, BATCH = 4, 8
VARIANTS = {
    "forward passes only (reference)": "forward",
    "all outputs kept, then scored (evaluate before streaming)": "kept",
    "evaluate, streamed": "streamed",
    "evaluate, accuracy marked whole_set": "whole_set",
}


class Masks:
    """``images`` images of ``size`` x ``size`` and their masks, ``BATCH`` at a time, the same every pass."""

    def __init__(self, images: int, size: int):
        self.images, self.size = images, size

    def __iter__(self):
        generator = torch.Generator().manual_seed(0)
        for start in range(0, self.images, BATCH):
            n = min(BATCH, self.images - start)
            yield (
                torch.randn(n, 3, self.size, self.size, generator=generator),
                torch.randint(0, CLASSES, (n, self.size, self.size), generator=generator),
            )


def tiny_segmenter() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, CLASSES, 1)).eval()


def score(variant: str, model: nn.Module, loader: Masks) -> dict[str, float]:
    if variant == "streamed":
        return evaluate(model, loader)
    if variant == "whole_set":
        return evaluate(model, loader, metrics={"accuracy": whole_set(accuracy)})
    loss_sum, count, outputs, targets = 0.0, 0, [], []
    with torch.no_grad():
        for inputs, target in loader:
            output = model(inputs)
            if variant == "forward":
                continue
            loss_sum += nn.functional.cross_entropy(output, target).item() * len(target)
            count += len(target)
            outputs.append(output.detach().float().cpu())
            targets.append(target.detach().cpu())
    if variant == "forward":
        return {}
    return {"loss": loss_sum / count, "accuracy": accuracy(torch.cat(outputs), torch.cat(targets))}


def _memory_kib(field: str) -> int:
    status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
    return int(status[field].split()[0])


def measure(variant: str, images: int, size: int) -> dict:
    """In this process: the peak memory above the start, the seconds and the scores of one way of scoring."""
    model, loader = tiny_segmenter(), Masks(images, size)
    with torch.no_grad():
        model(torch.zeros(1, 3, 32, 32))  # one-time allocations (thread pools, kernels) before the baseline
    Path("/proc/self/clear_refs").write_text("5")  # restart the peak (VmHWM) from the memory in use now
    start_kib = _memory_kib("VmRSS")
    started = time.perf_counter()
    scores = score(variant, model, loader)
    seconds = time.perf_counter() - started
    return {"peak_mib": (_memory_kib("VmHWM") - start_kib) / 1024, "seconds": seconds, "scores": scores}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=64, help="validation images (default 64)")
    parser.add_argument("--size", type=int, default=512, help="image side in pixels (default 512)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 8 images of 64x64, no file written")
    parser.add_argument("--variant", help=argparse.SUPPRESS)  # the child process that measures one way
    args = parser.parse_args()
    if args.quick:
        args.images, args.size = 8, 64
    if args.variant:
        print(json.dumps(measure(args.variant, args.images, args.size)))
        return
    started = time.perf_counter()
    results = {}
    for name, variant in VARIANTS.items():
        command = [sys.executable, __file__, "--variant", variant]
        command += ["--images", str(args.images), "--size", str(args.size)]
        child = subprocess.run(command, capture_output=True, text=True, check=True)
        results[name] = json.loads(child.stdout)
    floor = results["forward passes only (reference)"]["peak_mib"]
    kept = results["all outputs kept, then scored (evaluate before streaming)"]["scores"]
    rows = [
        "| scoring | peak memory above the start | vs forward passes only | seconds | loss | accuracy |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, result in results.items():
        scores = result["scores"]
        loss = f"{scores['loss']:.9f}" if scores else "-"
        correct = f"{scores['accuracy']:.12f}" if scores else "-"
        rows.append(
            f"| {name} | {result['peak_mib']:.0f} MiB | {result['peak_mib'] / floor:.2f}x | "
            f"{result['seconds']:.1f} | {loss} | {correct} |"
        )
    streamed = results["evaluate, streamed"]["scores"]
    text = "\n".join(
        [
            "# Peak memory of evaluate on a segmentation validation set",
            "",
            f"Measured {datetime.date.today()} on {machine()}, by `python benchmarks/evaluate_memory.py "
            f"--images {args.images} --size {args.size}` ({time.perf_counter() - started:.0f} s).",
            "",
            f"{args.images} images of 3x{args.size}x{args.size}, {CLASSES}-class masks, batches of {BATCH}, "
            "a two-layer conv net on the CPU; each row in a process of its own (see the script's docstring). "
            f"Outputs alone are {args.images * CLASSES * args.size**2 * 4 / 2**20:.0f} MiB as float32, the "
            f"masks {args.images * args.size**2 * 8 / 2**20:.0f} MiB as int64.",
            "",
            *rows,
            "",
            f"Streamed minus all kept: loss {streamed['loss'] - kept['loss']:+.2e}, "
            f"accuracy {streamed['accuracy'] - kept['accuracy']:+.2e}.",
        ]
    )
    print(text)
    if not args.quick:
        (HERE / "RESULTS_evaluate.md").write_text(text + "\n")
        print(f"\nwrote {HERE / 'RESULTS_evaluate.md'}", file=sys.stderr)


if __name__ == "__main__":
    main()
