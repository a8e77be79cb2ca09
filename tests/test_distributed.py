"""ModelEMA under DistributedDataParallel (ema_kit/ema.py): two CPU processes, gloo, an EMA on every rank."""

import copy
import multiprocessing

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing
from helpers import ReferenceEMA, max_error, small_cnn
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.profiler import ProfilerActivity, profile

from ema_kit import ModelEMA
from ema_kit.files import atomic_save, load_weights

WORLD_SIZE, STEPS, DECAY, LR = 2, 5, 0.8, 0.05
# Ranks fork from a server that imported these once (a fresh interpreter spends seconds importing
# torch). helpers first: it picks the ema_kit under test.
multiprocessing.get_context("forkserver").set_forkserver_preload(
    ["helpers", "torch", "pandas", "pytest", "ema_kit"]
)
COLLECTIVE = ("c10d::", "gloo:")  # how the profiler names collectives: c10d::allreduce_, gloo:broadcast


def batch(rank: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each rank's own data for a step."""
    generator = torch.Generator().manual_seed(1000 * step + rank)
    return torch.randn(8, 1, 8, 8, generator=generator), torch.randint(0, 10, (8,), generator=generator)


def train_on_rank(rank: int, out_dir) -> None:
    """One rank: DDP training with an EMA updated from the DDP model after every step.

    In float64 like the reference, so the comparison is tight (float32 rounding grows to ~1e-5 here).
    """
    torch.set_num_threads(1)  # the ranks share the machine's cores
    # A rendezvous in a file, not on a TCP port picked beforehand that another process could take first.
    dist.init_process_group(
        "gloo", init_method=f"file://{out_dir / 'rendezvous'}", rank=rank, world_size=WORLD_SIZE
    )
    try:
        torch.manual_seed(0)
        model = DistributedDataParallel(small_cnn().double())
        ema = ModelEMA(model, decay=DECAY, warmup=False)
        optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)
        collectives = {"training": set(), "updating": set()}
        for step in range(STEPS):
            x, y = batch(rank, step)
            with profile(activities=[ProfilerActivity.CPU]) as training:
                loss = nn.functional.cross_entropy(model(x.double()), y)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
            with profile(activities=[ProfilerActivity.CPU]) as updating:
                ema.update(model)
            for phase, events in (("training", training.events()), ("updating", updating.events())):
                collectives[phase] |= {event.name for event in events if event.name.startswith(COLLECTIVE)}
        state = {"ema": ema.module.state_dict()} | {
            phase: sorted(names) for phase, names in collectives.items()
        }
        atomic_save(state, out_dir / f"rank{rank}.pth")
    finally:
        dist.destroy_process_group()


def float64_reference() -> list[dict]:
    """The same training in float64 in one process, and each rank's EMA of it.

    The gradient is the mean of the ranks' gradients. BatchNorm's running stats are each rank's own:
    DDP broadcasts rank 0's buffers before every forward, then each rank updates them from its batch.
    """
    torch.manual_seed(0)
    model = small_cnn().double()
    optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)
    # From copies: ReferenceEMA keeps a float64 model's own tensors (.double() does not copy them).
    emas = [ReferenceEMA(copy.deepcopy(model)) for _ in range(WORLD_SIZE)]
    parameters, buffers = list(model.parameters()), list(model.buffers())

    def set_buffers(values):
        with torch.no_grad():
            torch._foreach_copy_(buffers, values)

    for step in range(STEPS):
        broadcast = [buffer.clone() for buffer in buffers]
        gradients, rank_buffers = [], []
        for rank in range(WORLD_SIZE):
            set_buffers(broadcast)
            x, y = batch(rank, step)
            model.zero_grad()
            nn.functional.cross_entropy(model(x.double()), y).backward()
            gradients.append([parameter.grad for parameter in parameters])
            rank_buffers.append([buffer.clone() for buffer in buffers])
        for parameter, *grads in zip(parameters, *gradients):
            parameter.grad = sum(grads) / WORLD_SIZE
        optimizer.step()
        for ema, values in zip(emas, rank_buffers):
            set_buffers(values)
            ema.update(model, DECAY)
        set_buffers(rank_buffers[0])
    return [ema.state for ema in emas]


@pytest.mark.slow
def test_ema_on_every_rank_is_identical_matches_float64_and_communicates_nothing(tmp_path):
    torch.multiprocessing.start_processes(
        train_on_rank, args=(tmp_path,), nprocs=WORLD_SIZE, start_method="forkserver"
    )
    ranks = [load_weights(tmp_path / f"rank{rank}.pth") for rank in range(WORLD_SIZE)]

    # The parameters are the same on every rank after each step, and so is their EMA, to the bit.
    for name, _ in small_cnn().named_parameters():
        assert torch.equal(ranks[0]["ema"][name], ranks[1]["ema"][name]), name
    # Running stats are per rank under DDP (no SyncBatchNorm): each EMA follows its own rank's.
    assert not torch.equal(ranks[0]["ema"]["1.running_mean"], ranks[1]["ema"]["1.running_mean"])
    for rank, reference in zip(ranks, float64_reference()):
        assert max_error(rank["ema"], reference) < 1e-12  # 2e-16 seen

    # The profiler sees DDP's collectives during training, and none at all inside ModelEMA.update.
    for rank in ranks:
        assert {"c10d::allreduce_", "gloo:all_reduce"} <= set(rank["training"])
        assert rank["updating"] == []
