"""Models sharded across processes by torch's FSDP2 (``fully_shard``): what an EMA of one needs to know.

FSDP2 keeps each parameter as a ``DTensor``: every rank holds a slice of it along dim 0 (its local shard, a
plain tensor), and buffers stay whole on every rank. An EMA is elementwise, so each rank can average its own
shards with no communication at all and keep 1/world of the EMA in memory (``Shadows`` does). Only what
needs the whole weights talks to the other ranks: saving them, gathered to rank 0 (``gathered``), and
scoring them, where the sharded model itself runs with the EMA's shards in place of its own.

Between a forward pass and the next backward, FSDP2 may leave a module's parameters gathered (the root's,
after a forward under ``no_grad``); ``reshard`` puts the sharded ones back, so that the next forward gathers
again from the shards, whichever values they hold.

Other ways to shard a model are refused by name (``check_supported``): FSDP1 (``FullyShardedDataParallel``)
flattens a module's weights into one flat parameter per rank, and DeepSpeed partitions them its own way.
torch's modules are looked up in ``sys.modules`` rather than imported: none of these objects can exist
before its module was imported, and importing ``torch.distributed`` parts costs seconds.
"""

from __future__ import annotations

import sys

import torch
from torch import nn


def is_dtensor(tensor) -> bool:
    """Whether ``tensor`` is a ``DTensor`` (a parameter sharded by FSDP2)."""
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(tensor, module.DTensor)


def local(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor, as a plain tensor sharing its memory; any other tensor, detached."""
    if is_dtensor(tensor):
        with torch.no_grad():
            tensor = tensor.to_local()
    return tensor.detach()


def is_sharded(model: nn.Module) -> bool:
    """Whether ``model`` is sharded by FSDP2: an FSDP module in it, or a DTensor among its parameters.

    Example:
        >>> is_sharded(nn.Linear(2, 1))
        False
    """
    return bool(_fsdp_modules(model)) or any(is_dtensor(p) for p in model.parameters())


def reshard(model: nn.Module) -> None:
    """Register every FSDP2 module's sharded parameters again, freeing gathered ones (a no-op elsewhere)."""
    for module in _fsdp_modules(model):
        module.reshard()


def rank() -> int:
    """This process's rank in the default process group; 0 outside a distributed run."""
    distributed = torch.distributed
    return distributed.get_rank() if distributed.is_available() and distributed.is_initialized() else 0


def on_every_rank(flag: bool, device: torch.device) -> bool:
    """Whether ``flag`` holds on every rank of the default process group (one all-reduce of one number)."""
    value = torch.tensor(float(flag), device=device)
    torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MIN)
    return bool(value)


def gathered(state):
    """``state`` (a state dict, or dicts and lists of them) whole, on the CPU, on rank 0; None elsewhere.

    Every rank must call it: each DTensor is gathered in turn (an all-gather each), so at most one whole
    tensor is in flight besides what rank 0 keeps. Other tensors are rank 0's own.
    """
    keep = rank() == 0

    def whole(value):
        if isinstance(value, dict):
            return {key: whole(item) for key, item in value.items()}
        if isinstance(value, list):
            return [whole(item) for item in value]
        if is_dtensor(value):
            value = value.full_tensor()
        if isinstance(value, torch.Tensor):
            return value.detach().cpu() if keep else None
        return value

    result = whole(state)
    return result if keep else None


def shard_of(value: torch.Tensor, like) -> torch.Tensor:
    """This rank's part of ``value``, for a shard laid out as DTensor ``like``: a DTensor's local tensor, or
    the slice of a whole tensor (from a gathered state) that this rank holds (cut here, nothing sent)."""
    if is_dtensor(value):
        return value.to_local()
    from torch.distributed.tensor import distribute_tensor

    device = like.to_local().device
    whole = value.detach().to(device)
    return distribute_tensor(whole, like.device_mesh, like.placements, src_data_rank=None).to_local()


def check_supported(model: nn.Module) -> None:
    """Refuse, by name and with what to use instead, the ways to shard a model that an EMA cannot follow."""
    fsdp = sys.modules.get("torch.distributed.fsdp")
    if fsdp is not None and any(isinstance(m, fsdp.FullyShardedDataParallel) for m in model.modules()):
        raise TypeError(
            "The model is wrapped in FullyShardedDataParallel (FSDP1), which flattens each wrapped module's "
            "weights into one flat parameter split across ranks: there is no weight an EMA could name. Shard "
            "it with FSDP2 instead, torch.distributed.fsdp.fully_shard(model): ModelEMA then keeps each "
            "rank's shard of the EMA (docs/distributed.md)."
        )
    classes = type(model).mro()
    if any(c.__name__ == "DeepSpeedEngine" and c.__module__.startswith("deepspeed") for c in classes):
        raise TypeError(
            "The model is a DeepSpeed engine, which ModelEMA does not look into. Under ZeRO stage 1 or 2 "
            "every rank holds the whole weights in engine.module: build the EMA from that "
            "(ModelEMA(engine.module)), as under DDP. For sharded weights use torch's FSDP2 "
            "(torch.distributed.fsdp.fully_shard), whose shards ModelEMA averages (docs/distributed.md)."
        )
    partitioned = next((name for name, p in model.named_parameters() if hasattr(p, "ds_id")), None)
    if partitioned is not None:
        raise TypeError(
            f"The model's {partitioned} is partitioned by DeepSpeed ZeRO stage 3, which leaves an empty "
            "placeholder in the module: there is nothing to average. Use ZeRO stage 1 or 2 (whole weights "
            "in engine.module), or torch's FSDP2 (torch.distributed.fsdp.fully_shard), whose shards "
            "ModelEMA averages (docs/distributed.md)."
        )


def _fsdp_modules(model: nn.Module) -> list[nn.Module]:
    fsdp = sys.modules.get("torch.distributed.fsdp")
    if fsdp is None:
        return []
    return [module for module in model.modules() if isinstance(module, fsdp.FSDPModule)]
