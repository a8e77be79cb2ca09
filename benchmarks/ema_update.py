"""Cost of one EMA update as a training loop pays it: ema_kit against its peers, one update per timed call.

    pip install -r requirements-kaggle.txt     # the peers: timm's needs torchvision, so the Kaggle stack
    python benchmarks/ema_update.py            # writes benchmarks/RESULTS.md (minutes on a quiet 2-core CPU)
    python benchmarks/ema_update.py --quick    # a smoke run: a few rounds, no file written

docs/speed.md says what is measured and why. Every method updates the same model (decay 0.999, no warmup,
parameters and buffers; torch-ema averages parameters only). Each timed call is one update; rounds
interleave the methods (each round calls every method once, starting at a different one), in three
conditions:

1. alone: between two updates of a method run only the other methods' updates;
2. beside a training step's side effects: before every update a loss module is built and applied, and an
   ``AveragedModel`` is updated (each assigns a module buffer, as a training loop does);
3. inside a training step: before every update, a real step on a small batch (forward, a loss module
   built and applied, backward, SGD step); the table gives the update's share of the whole step too.

Each figure is the median over rounds of a method's time over the reference row's time in the same round.
The reference is a bare ``torch._foreach_lerp_`` over the model's floating-point tensors, lists built once:
not a usable EMA (no integer buffers, no check that the model changed), but what one op per tensor costs on
this machine in this run. Rows marked A/B build ema_kit without its small-tensor gather.

Two more tables: several decays at once (``MultiEMA`` against separate ``ModelEMA`` objects, alone), and
the cost of following a changed model (the first update after a layer was swapped, in plain updates).
"""

from __future__ import annotations

import argparse
import copy
import datetime
import importlib.util
import operator
import statistics
import sys
import time
from pathlib import Path
from unittest import mock

import torch
from models import MODELS
from timing import machine, one_call_rounds
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

import ema_kit

DECAY = 0.999
DECAYS = (0.99, 0.999, 0.9999)  # the several-decays table: K = 3
REFERENCE = "reference: bare _foreach_lerp_"  # not a peer, so not in the race for fastest
OURS = "ema_kit ModelEMA"
AB = "ema_kit ModelEMA without the gather (A/B)"
PEERS = (
    "timm ModelEmaV3",
    "AveragedModel (multi_avg_fn)",
    "torch-ema (params only)",
    "ema-pytorch EMA (foreach)",
    "plain loop",
)
SEVERAL = {  # method -> label in the several-decays table, measured alone
    f"ema_kit MultiEMA, {len(DECAYS)} decays": f"MultiEMA, {len(DECAYS)} decays in one pass",
    f"ema_kit MultiEMA, {len(DECAYS)} decays, without the gather (A/B)": "the same without the gather (A/B)",
    f"ema_kit {len(DECAYS)} x ModelEMA": f"{len(DECAYS)} separate ModelEMAs",
}
CONDITIONS = ("alone", "beside a step's side effects", "inside a training step")
# Condition 3's batch per model: small, so that a full run stays within minutes on a 2-core CPU.
BATCHES = {"ResNet-50": (4, 3, 64, 64), "ViT-S/16": (1, 3, 224, 224), "tiny CNN": (32, 3, 32, 32)}
TARGETS = {"ResNet-50": 1.05, "ViT-S/16": 1.05, "tiny CNN": 1.15}  # ema_kit / reference, at most
HERE = Path(__file__).resolve().parent


def timm_model_ema_v3():
    """timm's ModelEmaV3, loaded from its file: importing timm itself needs torchvision."""
    spec = importlib.util.find_spec("timm")
    if spec is None:
        raise SystemExit("timm is not installed: pip install -r benchmarks/requirements.txt")
    path = Path(spec.submodule_search_locations[0]) / "utils" / "model_ema.py"
    module_spec = importlib.util.spec_from_file_location("timm_model_ema", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.ModelEmaV3


def plain_loop(model):
    """The EMA class people copy between kernels: a Python loop over the state dict."""
    shadow = copy.deepcopy(model).eval().requires_grad_(False)
    pairs = list(zip(shadow.state_dict().values(), model.state_dict().values()))

    @torch.no_grad()
    def update():
        for ema_value, value in pairs:
            if ema_value.is_floating_point():
                ema_value.mul_(DECAY).add_(value, alpha=1 - DECAY)
            else:
                ema_value.copy_(value)

    return update


def without_gather(build):
    """``build()`` with no tensor counted small: every tensor in a ``_foreach_`` list, none gathered."""
    with mock.patch("ema_kit._shadows.SMALL", 0):
        return build()


def methods(model: nn.Module, several: bool) -> dict:
    """name -> a function doing one EMA update of ``model`` (each holds its own shadow)."""
    import ema_pytorch
    import torch_ema

    ours = ema_kit.ModelEMA(model, DECAY, warmup=False)
    plain = without_gather(lambda: ema_kit.ModelEMA(model, DECAY, warmup=False))
    timm_v3 = timm_model_ema_v3()(model, decay=DECAY)
    averaged = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(DECAY), use_buffers=True)
    tema = torch_ema.ExponentialMovingAverage(model.parameters(), decay=DECAY, use_num_updates=False)
    lucid = ema_pytorch.EMA(model, beta=DECAY, update_after_step=0, update_every=1, use_foreach=True)
    floats = [t for t in model.state_dict().values() if t.is_floating_point()]
    bare_shadows = [t.clone() for t in floats]
    fns = {
        REFERENCE: lambda: torch._foreach_lerp_(bare_shadows, floats, 1 - DECAY),
        OURS: lambda: ours.update(model),
        PEERS[0]: lambda: timm_v3.update(model),
        PEERS[1]: lambda: averaged.update_parameters(model),
        PEERS[2]: tema.update,
        PEERS[3]: lucid.update,
        PEERS[4]: plain_loop(model),
        AB: lambda: plain.update(model),
    }
    if several:
        multi = ema_kit.MultiEMA(model, DECAYS, warmup=False)
        multi_plain = without_gather(lambda: ema_kit.MultiEMA(model, DECAYS, warmup=False))
        separate = [ema_kit.ModelEMA(model, decay, warmup=False) for decay in DECAYS]
        multi_name, multi_plain_name, separate_name = SEVERAL
        fns[multi_name] = lambda: multi.update(model)
        fns[multi_plain_name] = lambda: multi_plain.update(model)
        fns[separate_name] = lambda: [ema.update(model) for ema in separate]
    return fns


class SideEffects:
    """What a training step does beside the model between two updates: a loss module built and applied,
    and an ``AveragedModel`` (of a small layer) updated. Each assigns a module buffer."""

    def __init__(self, device: torch.device):
        generator = torch.Generator().manual_seed(0)
        self.logits = torch.randn(8, 10, generator=generator).to(device)
        self.targets = torch.randint(0, 10, (8,), generator=generator).to(device)
        self.averaged = AveragedModel(nn.Linear(16, 16).to(device))

    def __call__(self) -> None:
        nn.CrossEntropyLoss()(self.logits, self.targets)
        self.averaged.update_parameters(self.averaged.module)


class TrainingStep:
    """One SGD step of ``model`` on a fixed random batch, its loss module built in the step as loops do.

    Records each step's nanoseconds in ``times``; a small learning rate keeps the weights sane for hundreds
    of steps.
    """

    def __init__(self, model: nn.Module, shape: tuple, device: torch.device, sync):
        generator = torch.Generator().manual_seed(0)
        self.inputs = torch.randn(shape, generator=generator).to(device)
        self.targets = torch.randint(0, 10, (shape[0],), generator=generator).to(device)
        self.model, self.sync = model.train(), sync
        self.optimizer = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
        self.times: list[int] = []

    def __call__(self) -> None:
        self.sync()
        start = time.perf_counter_ns()
        loss = nn.CrossEntropyLoss()(self.model(self.inputs), self.targets)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.sync()
        self.times.append(time.perf_counter_ns() - start)


def ratios(samples: dict[str, list[int]], base: str) -> dict[str, float]:
    """Each function's median, over rounds, of its time over ``base``'s time in the same round."""
    return {
        name: statistics.median(map(operator.truediv, times, samples[base]))
        for name, times in samples.items()
    }


def replan_cost(model: nn.Module, rounds: int, sync) -> tuple[float, float]:
    """The first update after a change to the model (its last layer swapped for a twin through ``_modules``,
    which re-plans the EMA): its median microseconds, and the median over rounds of its time over the
    update right after it (no change)."""
    ema = ema_kit.ModelEMA(model, DECAY, warmup=False)
    name = [name for name, child in model.named_children() if any(True for _ in child.parameters())][-1]
    twins = [model._modules[name], copy.deepcopy(model._modules[name])]
    first, second = [], []
    for r in range(rounds + 1):
        model._modules[name] = twins[r % 2]
        for times in (first, second):
            sync()
            start = time.perf_counter_ns()
            ema.update(model)
            sync()
            times.append(time.perf_counter_ns() - start)
    model._modules[name] = twins[0]
    first, second = first[1:], second[1:]  # round 0 warms up
    return statistics.median(first) / 1e3, statistics.median(map(operator.truediv, first, second))


def measure(model_name: str, args, device: torch.device) -> dict:
    """Every condition's ratios for one model, its sizes, the absolute reference, the step and re-plan."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    torch.manual_seed(0)
    model = MODELS[model_name]().to(device)
    fns = methods(model, several=True)
    main = {name: fns[name] for name in (REFERENCE, OURS, *PEERS, AB)}
    step = TrainingStep(model, BATCHES[model_name], device, sync)
    befores = {CONDITIONS[0]: lambda: None, CONDITIONS[1]: SideEffects(device), CONDITIONS[2]: step}
    result = {"ratios": {}, "reference us": {}}
    for condition, before in befores.items():
        timed = fns if condition == CONDITIONS[0] else main  # several decays: alone only
        rounds = args.step_rounds if condition == CONDITIONS[2] else args.rounds
        one_call_rounds(timed, 1, before, sync)  # warm up every method and what runs before it
        step.times.clear()
        samples = one_call_rounds(timed, rounds, before, sync)
        result["ratios"][condition] = ratios(samples, REFERENCE)
        result["reference us"][condition] = statistics.median(samples[REFERENCE]) / 1e3
        if condition == CONDITIONS[0]:
            result["several"] = ratios(samples, OURS)
        if condition == CONDITIONS[2]:
            ours_ns, step_ns = statistics.median(samples[OURS]), statistics.median(step.times)
            result["step ms"], result["share"] = step_ns / 1e6, ours_ns / (ours_ns + step_ns)
        print(f"measured {model_name}, {condition}", file=sys.stderr)
    result["replan"] = replan_cost(model, args.rounds, sync)
    result["size"] = (
        sum(t.numel() for t in model.state_dict().values() if t.is_floating_point()),
        len(model.state_dict()),
    )
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=101, help="rounds alone and beside side effects")
    parser.add_argument("--step-rounds", type=int, default=21, help="rounds inside a training step")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="smoke run: 3 rounds, no RESULTS.md")
    parser.add_argument("--out", type=Path, default=HERE / "RESULTS.md")
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.step_rounds = 3, 2
    device = torch.device(args.device)
    results = {model_name: measure(model_name, args, device) for model_name in MODELS}
    report = render(results, device, args)
    print(report)
    if not args.quick:
        args.out.write_text(report)
        print(f"wrote {args.out}", file=sys.stderr)


def render(results: dict, device: torch.device, args) -> str:
    lines = [
        "# EMA update cost",
        "",
        f"Measured {datetime.date.today().isoformat()} on {machine()}, device `{device}`, by "
        f"`python benchmarks/ema_update.py`: one update per timed call, {args.rounds} interleaved rounds "
        f"alone and beside a step's side effects, {args.step_rounds} inside a training step. How and why: "
        "[docs/speed.md](../docs/speed.md).",
        "",
        "Each figure is the median over rounds of a method's time over the reference row's time in the same "
        f"round (`{REFERENCE}`: one `torch._foreach_lerp_` over the model's floating-point tensors, lists "
        "built once; not a usable EMA). Lower is better.",
    ]
    for model_name, result in results.items():
        floats, tensors = result["size"]
        lines += [
            "",
            f"## {model_name} ({floats / 1e6:.2f}M floating-point elements, {tensors} tensors)",
            "",
            "| method | " + " | ".join(CONDITIONS) + " |",
            "| --- |" + " ---: |" * len(CONDITIONS),
        ]
        for name in (REFERENCE, OURS, *PEERS, AB):
            cells = [f"{result['ratios'][c][name]:.2f}x" for c in CONDITIONS]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        lines += [
            "| reference, absolute | "
            + " | ".join(f"{result['reference us'][c]:,.0f} us" for c in CONDITIONS)
            + " |",
            f"| training step (batch {BATCHES[model_name][0]}, forward to optimizer step) | | | "
            f"{result['step ms']:,.1f} ms |",
            f"| ema_kit's share of a step with its update | | | {100 * result['share']:.1f}% |",
        ]
    lines += ["", "## Targets", "", targets(results)]
    lines += several_decays(results)
    lines += [
        "",
        "## Following a changed model",
        "",
        "The first `ModelEMA.update` after the model's last layer was swapped for a twin through `_modules` "
        "(the EMA walks the model and plans its op lists anew), as a multiple of the update right after it.",
        "",
        "| | " + " | ".join(results) + " |",
        "| --- |" + " ---: |" * len(results),
        "| first update after a change, in plain updates | "
        + " | ".join(f"{r['replan'][1]:.1f}" for r in results.values())
        + " |",
        "| first update after a change, absolute | "
        + " | ".join(f"{r['replan'][0]:,.0f} us" for r in results.values())
        + " |",
    ]
    return "\n".join(lines) + "\n"


def targets(results: dict) -> str:
    """Each model and condition: ema_kit over the reference against its target, and whether it was fastest."""
    rows = [
        "In every condition, on every model: ema_kit the fastest of all peers, and at most "
        + ", ".join(f"{limit:.2f}x the reference on the {m}" for m, limit in TARGETS.items())
        + ".",
        "",
        "| model | condition | ema_kit / reference | target | best peer | fastest | met |",
        "| --- | --- | ---: | ---: | ---: | --- | --- |",
    ]
    missed = 0
    for model_name, result in results.items():
        for condition in CONDITIONS:
            ratio = result["ratios"][condition]
            ours, best = ratio[OURS], min(ratio[peer] for peer in PEERS)
            met = ours <= TARGETS[model_name] and ours < best
            missed += not met
            rows.append(
                f"| {model_name} | {condition} | {ours:.2f}x | {TARGETS[model_name]:.2f}x | {best:.2f}x | "
                f"{'yes' if ours < best else 'NO'} | {'met' if met else 'MISSED'} |"
            )
    rows += ["", f"This run: {'every target met' if not missed else f'{missed} of {len(rows) - 4} MISSED'}."]
    return "\n".join(rows)


def several_decays(results: dict) -> list[str]:
    """The several-decays table: K EMAs as a ratio to one ModelEMA, and its target (at most K times)."""
    k = len(DECAYS)
    lines = [
        "",
        f"## Several decays ({', '.join(map(str, DECAYS))})",
        "",
        f"Cost of one update of {k} EMAs as a ratio to one `ModelEMA` update (alone, same rounds as above).",
        "",
        "| ema_kit | " + " | ".join(results) + " |",
        "| --- |" + " ---: |" * len(results),
        "| ModelEMA, 1 decay | " + " | ".join("1.00x" for _ in results) + " |",
    ]
    for name, label in SEVERAL.items():
        cells = [f"{result['several'][name]:.2f}x" for result in results.values()]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    multi = [result["several"][next(iter(SEVERAL))] for result in results.values()]
    ok = all(ratio <= k for ratio in multi)
    lines += [
        "",
        f"Target: {k} decays cost at most {k}x one decay. This run: "
        f"{', '.join(f'{ratio:.2f}x' for ratio in multi)} ({'met' if ok else 'MISSED'}).",
    ]
    return lines


if __name__ == "__main__":
    main()
