"""Per-rank memory of a ModelEMA of an FSDP2-sharded model, against the EMA of the same model unsharded.

    python benchmarks/sharded_memory.py            # writes benchmarks/RESULTS_sharded.md
    python benchmarks/sharded_memory.py --quick    # a smoke run: the tiny CNN, no file written

The model: ResNet-50's layout (benchmarks/models.py, 25.6M parameters), float32 on the CPU, each
bottleneck block and the root sharded with ``fully_shard`` over 2 and 4 processes (gloo, launched with
torchrun), and the same model unsharded in one process as the reference row. On each rank, what the EMA
costs is measured two ways: the process's resident memory (Linux ``VmRSS``) just after ``ModelEMA(model)``
minus just before it (the EMA's own allocations, as the operating system sees them), and the bytes of the
tensors the EMA holds (its shadows). Each rank then trains 3 steps and updates the EMA; the profiler
counts the collectives (gloo/c10d calls) inside ``update``: there should be none.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import torch
from torch import nn

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from models import resnet50, tiny_cnn  # noqa: E402

MIB = 2**20


def _rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status (this benchmark reads Linux's process memory)")


def _shard(model: nn.Module) -> nn.Module:
    """Each convolution and linear layer a unit of its own (gathered while it runs), the rest the root's."""
    from torch.distributed.fsdp import fully_shard

    for module in model.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            fully_shard(module)
    return fully_shard(model)


def rank_main(model_name: str, out: Path) -> None:
    """One rank (or the single unsharded process): build the model and its EMA, measure, write JSON."""
    from torch.profiler import ProfilerActivity, profile

    from ema_kit import ModelEMA

    distributed = "RANK" in os.environ
    if distributed:
        torch.distributed.init_process_group("gloo")
    rank = torch.distributed.get_rank() if distributed else 0
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = resnet50() if model_name == "ResNet-50" else tiny_cnn()
    size = 64 if model_name == "ResNet-50" else 16
    if distributed:
        model = _shard(model)
    model_bytes = sum(
        (p.to_local() if hasattr(p, "to_local") else p).nbytes for p in model.parameters()
    ) + sum(b.nbytes for b in model.buffers())
    before = _rss_mib()
    ema = ModelEMA(model, decay=0.999)
    rss = _rss_mib() - before
    shadows = ema._shadows
    held = (
        [t for s in shadows._sets for t in s.values()]
        if ema.sharded
        else list(ema.module.state_dict().values())
    )
    shadow_bytes = sum(t.nbytes for t in held)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    collectives = set()
    for step in range(3):
        generator = torch.Generator().manual_seed(100 * step + rank)
        x = torch.randn(4, 3, size, size, generator=generator)
        loss = model(x).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        with profile(activities=[ProfilerActivity.CPU]) as updating:
            ema.update(model)
        collectives |= {e.name for e in updating.events() if e.name.startswith(("c10d::", "gloo:"))}
    result = {
        "rank": rank,
        "rss_mib": rss,
        "shadow_mib": shadow_bytes / MIB,
        "model_mib": model_bytes / MIB,
        "collectives": sorted(collectives),
    }
    (out / f"rank{rank}.json").write_text(json.dumps(result))
    if distributed:
        torch.distributed.destroy_process_group()


def run(model_name: str, world: int, out: Path) -> list[dict]:
    """The unsharded reference (world 1, one plain process) or ``world`` ranks under torchrun."""
    out.mkdir(parents=True, exist_ok=True)
    script = [str(Path(__file__).resolve()), "--rank", model_name, str(out)]
    if world == 1:
        command = [sys.executable, *script]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={world}"]
        command += script
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    subprocess.run(command, check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(world)]


def _cpu() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.machine()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="the tiny CNN, and print the report only")
    parser.add_argument("--rank", nargs=2, metavar=("MODEL", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rank:
        rank_main(args.rank[0], Path(args.rank[1]))
        return
    import tempfile

    model_name = "tiny CNN" if args.quick else "ResNet-50"
    worlds = (1, 2) if args.quick else (1, 2, 4)
    with tempfile.TemporaryDirectory() as folder:
        results = {world: run(model_name, world, Path(folder) / str(world)) for world in worlds}
    reference = results[1][0]
    lines = [
        "# Per-rank memory of the EMA of an FSDP2-sharded model",
        "",
        f"Run by `python benchmarks/sharded_memory.py` on {datetime.date.today()}: {_cpu()}, "
        f"{os.cpu_count()} cores, torch {torch.__version__}, gloo on the CPU. Model: {model_name} (float32).",
        "",
        "| processes | rank | EMA: resident memory added | vs unsharded | EMA: tensors held | vs unsharded | "
        "model's own tensors on the rank | collectives in update |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for world, ranks in results.items():
        for r in ranks:
            lines.append(
                f"| {'1 (unsharded, reference)' if world == 1 else world} | {r['rank']} | "
                f"{r['rss_mib']:.1f} MiB | {r['rss_mib'] / reference['rss_mib']:.3f}x | "
                f"{r['shadow_mib']:.1f} MiB | "
                f"{r['shadow_mib'] / reference['shadow_mib']:.3f}x | {r['model_mib']:.1f} MiB | "
                f"{', '.join(r['collectives']) or 'none'} |"
            )
    lines += [
        "",
        "Resident memory added: the process's VmRSS just after `ModelEMA(model)` minus just before it.",
        "Tensors held: the bytes of the EMA's shadow tensors on the rank (the parameters' shards, plus the",
        "buffers, which every rank keeps whole). Collectives in update: the gloo/c10d calls the profiler saw",
        "inside 3 `update` calls.",
    ]
    text = "\n".join(lines)
    print(text)
    if not args.quick:
        (HERE / "RESULTS_sharded.md").write_text(text + "\n")
        print(f"\nwrote {HERE / 'RESULTS_sharded.md'}", file=sys.stderr)


if __name__ == "__main__":
    main()
