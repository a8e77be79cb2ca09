"""bfloat16 EMA shadows: memory, error against a float64 EMA, and time per update, beside a float32 shadow.

    python benchmarks/lowp_shadow.py            # writes benchmarks/RESULTS_lowp.md
    python benchmarks/lowp_shadow.py --quick    # a smoke run: a few steps and rounds, no file written

The weight set is the ResNet-50 layout of ``models.py`` (25.6M floating-point elements, 267 tensors),
at its initial values. Three shadows follow it at decay 0.999:

- float32: ``torch._foreach_lerp_`` over float32 shadows (the default for float32 models);
- naive bf16: ``torch._foreach_lerp_`` over bfloat16 shadows and the live weights in bfloat16;
- stochastic bf16: ``ema_kit._lowp.lerp_stochastic_`` (a float32 blend rounded stochastically).

Error: the live weights drift, each element in its own random direction by 0.1% of its tensor's RMS per
step (BatchNorm's zero biases by 1e-3), for ``--steps`` updates; each shadow is compared with the same
EMA in float64. To keep this affordable on a CPU the error is taken on every ``--sample``-th element of
each tensor (all tensors, so conv, BatchNorm and linear scales all count). It is reported as the RMS
error over the RMS distance the float64 EMA moved (0% = exact, 100% = as if the shadow never moved).

Time: the full weight set, interleaved rounds (each round times every shadow once), medians, as a ratio
to the float32 ``_foreach_lerp_``.
"""

from __future__ import annotations

import argparse
import datetime
import sys
import time
from pathlib import Path

import torch
from models import resnet50
from timing import interleaved, machine

from ema_kit import _lowp
from ema_kit._lowp import lerp_stochastic_

DECAY = 0.999
HERE = Path(__file__).resolve().parent
SHADOWS = ("float32", "naive bf16", "stochastic bf16")


def weight_set() -> list[torch.Tensor]:
    torch.manual_seed(0)
    return [t.detach().clone() for t in resnet50().state_dict().values() if t.is_floating_point()]


def drift_error(weights: list[torch.Tensor], steps: int, sample: int) -> dict[str, dict[str, float]]:
    """Each shadow's error against a float64 EMA after ``steps`` updates towards drifting weights."""
    generator = torch.Generator().manual_seed(0)
    start = [w.reshape(-1)[::sample].double() for w in weights]
    rms = [w.double().square().mean().sqrt().item() for w in weights]
    drift = [  # per step, 0.1% of the tensor's RMS (zero tensors, BatchNorm biases and means: 1e-3)
        torch.randn(s.shape, dtype=torch.float64, generator=generator) * 1e-3 * (r if r > 0 else 1.0)
        for s, r in zip(start, rms)
    ]
    live64 = [s.clone() for s in start]
    exact = [s.clone() for s in start]
    shadows = {
        "float32": [s.float() for s in start],
        "naive bf16": [s.bfloat16() for s in start],
        "stochastic bf16": [s.bfloat16() for s in start],
    }
    noise = torch.Generator().manual_seed(0)
    for _ in range(steps):
        torch._foreach_add_(live64, drift)
        live32 = [t.float() for t in live64]
        torch._foreach_lerp_(exact, live64, 1 - DECAY)
        torch._foreach_lerp_(shadows["float32"], live32, 1 - DECAY)
        torch._foreach_lerp_(shadows["naive bf16"], [t.bfloat16() for t in live32], 1 - DECAY)
        lerp_stochastic_(shadows["stochastic bf16"], live32, 1 - DECAY, noise)
    exact_flat = torch.cat(exact)
    moved = (exact_flat - torch.cat(start)).square().mean().sqrt().item()
    result = {}
    for name, tensors in shadows.items():
        error = torch.cat([t.double() for t in tensors]) - exact_flat
        result[name] = {
            "rms": error.square().mean().sqrt().item() / moved,
            "bias": abs(error.mean().item()) / moved,
        }
    return result


def update_times(weights: list[torch.Tensor], rounds: int, inner: int) -> dict[str, float]:
    """Median seconds per update of each shadow over interleaved rounds, on the full weight set."""
    lives32 = [w.clone() for w in weights]
    lives16 = [w.bfloat16() for w in weights]
    f32 = [w.clone() for w in weights]
    naive = [w.bfloat16() for w in weights]
    stochastic = [w.bfloat16() for w in weights]
    noise = torch.Generator().manual_seed(0)
    updates = {
        "float32": lambda: torch._foreach_lerp_(f32, lives32, 1 - DECAY),
        "naive bf16": lambda: torch._foreach_lerp_(naive, lives16, 1 - DECAY),
        "stochastic bf16": lambda: lerp_stochastic_(stochastic, lives32, 1 - DECAY, noise),
    }
    for update in updates.values():  # warm up every path once
        update()
    return interleaved(updates, rounds, inner)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2000, help="EMA updates for the error (default 2000)")
    parser.add_argument("--sample", type=int, default=16, help="error on every n-th element (default 16)")
    parser.add_argument("--rounds", type=int, default=15, help="interleaved timing rounds (default 15)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 20 steps, 2 rounds, no file written")
    args = parser.parse_args()
    if args.quick:
        args.steps, args.rounds, args.sample = 20, 2, 64
    weights = weight_set()
    elements = sum(w.numel() for w in weights)
    started = time.perf_counter()
    errors = drift_error(weights, args.steps, args.sample)
    times = update_times(weights, args.rounds, inner=1 if args.quick else 3)
    floor = times["float32"]
    scratch = 14 * min(elements, _lowp.CHUNK)  # float32 blend and int32 noise, one group at a time
    rows = [
        "| shadow | shadow bytes | vs float32 | RMS error / EMA travel | bias / EMA travel "
        "| time per update | vs float32 |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name in SHADOWS:
        size = elements * (4 if name == "float32" else 2)
        rows.append(
            f"| {name} | {size / 2**20:.1f} MiB | {size / (elements * 4):.2f}x | {errors[name]['rms']:.2%} | "
            f"{errors[name]['bias']:.2%} | {times[name] * 1e3:.1f} ms | {times[name] / floor:.2f}x |"
        )
    text = "\n".join(
        [
            "# bfloat16 EMA shadows",
            "",
            f"Measured {datetime.date.today()} on {machine()}, by `python benchmarks/lowp_shadow.py "
            f"--steps {args.steps} --sample {args.sample} --rounds {args.rounds}` "
            f"({time.perf_counter() - started:.0f} s).",
            "",
            f"ResNet-50 layout, {elements / 1e6:.1f}M floating-point elements; decay {DECAY}; error after "
            f"{args.steps} updates towards weights drifting 0.1% of each tensor's RMS per step, on every "
            f"{args.sample}-th element, against the same EMA in float64. The stochastic shadow also needs "
            f"{scratch / 2**20:.0f} MiB of scratch during an update (one group of at most 2**22 elements).",
            "",
            *rows,
        ]
    )
    print(text)
    if not args.quick:
        (HERE / "RESULTS_lowp.md").write_text(text + "\n")
        print(f"\nwrote {HERE / 'RESULTS_lowp.md'}", file=sys.stderr)


if __name__ == "__main__":
    main()
