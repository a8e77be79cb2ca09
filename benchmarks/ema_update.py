"""Cost of one EMA update, ema_kit against its peers, side by side in one process.

    pip install -r requirements-kaggle.txt     # the peers: timm's needs torchvision, so the Kaggle stack
    python benchmarks/ema_update.py            # writes benchmarks/RESULTS.md
    python benchmarks/ema_update.py --quick    # a smoke run: a few rounds, no file written

Every method updates the same model with decay 0.999 and no warmup, parameters and buffers (torch-ema
averages parameters only). Rounds are interleaved (each round times every method once, starting at a
different one) and each figure is the median over rounds, as a ratio to the floor: one ``lerp_`` over a
single flat tensor holding as many elements as the model's floating-point state. On CUDA the table also
gives GB/s (three passes over the floating-point state per update: read both, write the shadow).

A reference row, not a peer, gives a bare ``torch._foreach_lerp_`` over the model's floating-point
tensors (lists built once, nothing else): what one op per tensor costs on the machine of the run. ema_kit
updates with that same idiom, so its targets are stated against this row of the same run.

A second table prices several decays at once: ``MultiEMA`` with 3 decays (one pass) and 3 separate
``ModelEMA`` objects, as ratios to one ``ModelEMA``, measured in the same interleaved rounds.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import importlib.util
import sys
import time
from pathlib import Path

import torch
from models import MODELS
from timing import interleaved, machine
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

import ema_kit

DECAY = 0.999
DECAYS = (0.99, 0.999, 0.9999)  # the several-decays table: K = 3
SEVERAL = {  # method name -> label in the several-decays table (kept out of the peers' table)
    f"ema_kit MultiEMA, {len(DECAYS)} decays": f"MultiEMA, {len(DECAYS)} decays in one pass",
    f"ema_kit {len(DECAYS)} x ModelEMA": f"{len(DECAYS)} separate ModelEMAs",
}
# Not a peer, so not in the race for fastest: what a bare multi-tensor lerp costs on this machine today.
REFERENCE = "reference: bare _foreach_lerp_"
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


def methods(model):
    """name -> a function doing one EMA update of ``model`` (each holds its own shadow)."""
    import ema_pytorch
    import torch_ema

    ours = ema_kit.ModelEMA(model, DECAY, warmup=False)
    multi = ema_kit.MultiEMA(model, DECAYS, warmup=False)
    separate = [ema_kit.ModelEMA(model, decay, warmup=False) for decay in DECAYS]
    timm_v3 = timm_model_ema_v3()(model, decay=DECAY)
    averaged = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(DECAY), use_buffers=True)
    tema = torch_ema.ExponentialMovingAverage(model.parameters(), decay=DECAY, use_num_updates=False)
    lucid = ema_pytorch.EMA(model, beta=DECAY, update_after_step=0, update_every=1, use_foreach=True)
    floats = [t for t in model.state_dict().values() if t.is_floating_point()]
    bare_shadows = [t.clone() for t in floats]
    floating = sum(t.numel() for t in floats)
    device = next(model.parameters()).device
    flat_live, flat_shadow = torch.randn(floating, device=device), torch.randn(floating, device=device)
    return {
        "floor (one flat lerp_)": lambda: flat_shadow.lerp_(flat_live, 1 - DECAY),
        "ema_kit ModelEMA": lambda: ours.update(model),
        "timm ModelEmaV3": lambda: timm_v3.update(model),
        "AveragedModel (multi_avg_fn)": lambda: averaged.update_parameters(model),
        "torch-ema (params only)": tema.update,
        "ema-pytorch EMA (foreach)": lucid.update,
        "plain loop": plain_loop(model),
        REFERENCE: lambda: torch._foreach_lerp_(bare_shadows, floats, 1 - DECAY),
        f"ema_kit MultiEMA, {len(DECAYS)} decays": lambda: multi.update(model),
        f"ema_kit {len(DECAYS)} x ModelEMA": lambda: [ema.update(model) for ema in separate],
    }, floating


def measure(update_fns: dict, rounds: int, min_seconds: float, device: torch.device) -> dict:
    """Median seconds per update of each function, over interleaved rounds."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    names = list(update_fns)
    for fn in update_fns.values():  # warm up, and size the inner loop so a timing lasts min_seconds
        fn()
    sync()
    start = time.perf_counter()
    update_fns[names[0]]()
    sync()
    inner = max(1, int(min_seconds / max(time.perf_counter() - start, 1e-7)))
    return interleaved(update_fns, rounds, inner, sync)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=21)
    parser.add_argument("--min-seconds", type=float, default=0.05, help="length of one timing")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="smoke run: 3 short rounds, no RESULTS.md")
    parser.add_argument("--out", type=Path, default=HERE / "RESULTS.md")
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.min_seconds = 3, 0.002
    device = torch.device(args.device)
    torch.manual_seed(0)

    results, sizes = {}, {}
    for model_name, build in MODELS.items():
        model = build().to(device)
        update_fns, floating = methods(model)
        results[model_name] = measure(update_fns, args.rounds, args.min_seconds, device)
        sizes[model_name] = (floating, len(model.state_dict()))
        print(f"measured {model_name}", file=sys.stderr)
        del model, update_fns

    report = render(results, sizes, device, args)
    print(report)
    if not args.quick:
        args.out.write_text(report)
        print(f"wrote {args.out}", file=sys.stderr)


def render(results: dict, sizes: dict, device: torch.device, args) -> str:
    models = list(results)
    floor = "floor (one flat lerp_)"
    lines = [
        "# EMA update cost",
        "",
        f"Measured {datetime.date.today().isoformat()} on {machine()}, device `{device}`, by "
        f"`python benchmarks/ema_update.py` ({args.rounds} interleaved rounds, medians).",
        "",
        "Cost of one update as a ratio to the floor (one `lerp_` over a single flat tensor of the same "
        "element count); lower is better.",
        "",
        "| method | "
        + " | ".join(f"{m} ({sizes[m][0] / 1e6:.2f}M, {sizes[m][1]} tensors)" for m in models)
        + " |",
        "| --- |" + " ---: |" * len(models),
    ]
    for name in (name for name in results[models[0]] if name not in SEVERAL):
        cells = [f"{results[m][name] / results[m][floor]:.2f}x" for m in models]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines.append(
        "| floor, absolute | " + " | ".join(f"{results[m][floor] * 1e6:,.0f} us" for m in models) + " |"
    )
    if device.type == "cuda":
        for name in (floor, "ema_kit ModelEMA"):
            cells = [f"{3 * sizes[m][0] * 4 / results[m][name] / 1e9:.0f} GB/s" for m in models]
            lines.append(f"| {name}, GB/s | " + " | ".join(cells) + " |")
    lines += [
        "",
        f"The `{REFERENCE}` row is one `torch._foreach_lerp_` over lists of the model's floating-point "
        "tensors built once: no integer buffers, no check that the model's tensors moved. It is not a "
        "usable EMA; it shows what one op per tensor costs on this machine in this run.",
        "",
        "Targets: ema_kit fastest of all peers on every model; at most 1.05x the reference row on the two "
        "big models and 1.15x on the tiny CNN (the reference moves with the machine's speed as ema_kit does; "
        "what ema_kit adds is the check that the model did not change, and copying integer buffers).",
    ]
    ours = {m: results[m]["ema_kit ModelEMA"] / results[m][REFERENCE] for m in models}
    fastest = all(
        min((v for k, v in results[m].items() if k not in (floor, REFERENCE, *SEVERAL)), default=0)
        == results[m]["ema_kit ModelEMA"]
        for m in models
    )
    big_ok = all(ours[m] <= 1.05 for m in models[:2])
    tiny_ok = ours[models[2]] <= 1.15
    lines.append(
        f"This run: fastest on every model: {'yes' if fastest else 'NO'}; ema_kit / reference on the big "
        f"models {', '.join(f'{ours[m]:.2f}x' for m in models[:2])} ({'met' if big_ok else 'MISSED'}); "
        f"tiny CNN {ours[models[2]]:.2f}x ({'met' if tiny_ok else 'MISSED'})."
    )
    return "\n".join(lines + several_decays(results, models)) + "\n"


def several_decays(results: dict, models: list) -> list[str]:
    """The several-decays table: K EMAs as a ratio to one ModelEMA, and its target (at most K times)."""
    k, one = len(DECAYS), "ema_kit ModelEMA"
    lines = [
        "",
        f"## Several decays ({', '.join(map(str, DECAYS))})",
        "",
        f"Cost of one update of {k} EMAs as a ratio to one `ModelEMA` update (same rounds as above).",
        "",
        "| ema_kit | " + " | ".join(models) + " |",
        "| --- |" + " ---: |" * len(models),
        "| ModelEMA, 1 decay | " + " | ".join("1.00x" for _ in models) + " |",
    ]
    for name, label in SEVERAL.items():
        lines.append(
            f"| {label} | " + " | ".join(f"{results[m][name] / results[m][one]:.2f}x" for m in models) + " |"
        )
    multi = {m: results[m][next(iter(SEVERAL))] / results[m][one] for m in models}
    ok = all(ratio <= k for ratio in multi.values())
    lines += [
        "",
        f"Target: {k} decays cost at most {k}x one decay. This run: "
        f"{', '.join(f'{multi[m]:.2f}x' for m in models)} ({'met' if ok else 'MISSED'}).",
    ]
    return lines


if __name__ == "__main__":
    main()
