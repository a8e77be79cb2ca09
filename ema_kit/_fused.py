"""The per-step EMA update as a few fused tensor ops over tensor lists built once.

An EMA step pays for moving bytes (read live and shadow, write shadow: nothing beats one ``lerp_`` over
one flat tensor) and for launching one op per tensor. Big tensors are blended with one multi-tensor
``lerp`` straight from the live tensors. Small ones (norm-layer vectors, biases, counters), where
launching costs more than the bytes, are gathered by ``torch.cat`` into a staging buffer and blended
with one ``lerp_`` over the contiguous region of the shadow that holds them.

Measured on a 2-core CPU (torch 2.13): a cat whose output has 32768 elements or more takes a parallel
path that costs ~0.8 us per input instead of ~0.1 us, and a cat that converts dtypes ~1.5 us per input;
so cats stay under that size and stage in the live tensors' own dtype.

A step blends the small tensors first: ``ModelEMA``'s address check has just brought their metadata into
cache, and the big tensors' stream through memory would evict it (measured: 3 to 4% of a step on the
two big benchmark models, 15% on the tiny CNN).
"""

from __future__ import annotations

import itertools

import torch
from torch import Tensor

CAT_CHUNK = 32_767  # elements: the largest cat output that stays on the fast serial kernel
GATHER_BELOW = 16_384  # elements: smaller tensors are gathered (must stay below CAT_CHUNK)
STAGE_LIMIT = 1 << 20  # elements: cap on a staging buffer, so gathering never costs a second shadow


def memory_order_view(tensor: Tensor) -> Tensor | None:
    """``tensor`` as a 1-D view in memory order, or None when it does not fill one dense block.

    Covers contiguous and permuted-dense layouts (channels_last), so gathering never copies.
    """
    if tensor.is_contiguous():
        return tensor.view(-1)
    expected = 1
    for stride, size in sorted((s, n) for s, n in zip(tensor.stride(), tensor.shape) if n != 1):
        if stride != expected:
            return None
        expected *= size
    return tensor.as_strided((tensor.numel(),), (1,))


class FusedUpdate:
    """Blends shadow tensors towards live ones: ``shadow = lerp(shadow, live, weight)``, or copies them.

    ``FusedUpdate(lives, average, placements)`` allocates ``self.shadows``: one per live tensor, with
    its shape and memory layout, on the placement's ``(device, dtype)``, as views into one flat buffer
    per placement; their values are left for the caller to fill. Live tensors whose ``average`` flag is
    False (integer counters, buffers the caller copies) are copied on every call instead of blended.
    """

    def __init__(self, lives: list[Tensor], average: list[bool], placements: list[tuple]):
        self.lives = [live.detach() for live in lives]
        cat_inputs = list(map(_cat_input, lives, self.lives))
        self.shadows: list[Tensor] = [None] * len(lives)  # type: ignore[list-item]
        groups: dict[tuple, list[int]] = {}
        for index, placement in enumerate(placements):
            groups.setdefault(placement, []).append(index)
        self._groups = [
            _Group(self.lives, cat_inputs, average, indices, *placement, self.shadows)
            for placement, indices in groups.items()
        ]
        self.first_of_each_buffer = [indices[0] for indices in groups.values()]

    def lerp_(self, weight: float) -> None:
        """One EMA step: ``shadow += weight * (live - shadow)`` for averaged tensors, copy for the rest."""
        for group in self._groups:
            group.lerp_gathered_(weight)
        for group in self._groups:
            group.lerp_direct_(weight)

    def copy_(self) -> None:
        """Make every shadow an exact copy of its live tensor (also mends a shadow holding NaN)."""
        for group in self._groups:
            group.copy_()

    def all_finite(self) -> bool:
        """Whether every floating-point live tensor is free of NaN and Inf (one sync on GPU)."""
        by_device: dict[torch.device, list[Tensor]] = {}
        for live in self.lives:
            if live.is_floating_point() and live.numel():
                by_device.setdefault(live.device, []).append(live)
        return all(
            bool(
                torch.stack([norm.float() for norm in torch._foreach_norm(tensors, float("inf"))])
                .isfinite()
                .all()
            )
            for tensors in by_device.values()
        )


class _Group:
    """The shadows of one ``(device, dtype)``: one flat buffer, and the op lists that update it."""

    def __init__(self, lives, cat_inputs, average, indices, device, dtype, shadows_out):
        device = torch.device(device)

        def kind(i):
            live = lives[i]
            if live.device != device:
                return "remote"
            if memory_order_view(live) is None:
                return "direct"
            if not average[i]:
                return "gathered copy"
            return "gathered blend" if live.numel() < GATHER_BELOW else "direct"

        kinds = {i: kind(i) for i in indices}
        # Lay the flat buffer out so that each gathered run is contiguous: copies, then blends by live dtype.
        rank = {"direct": 0, "gathered copy": 1, "gathered blend": 2, "remote": 3}
        order = sorted(indices, key=lambda i: (rank[kinds[i]], str(lives[i].dtype)))
        flat = torch.empty(_numel(order, lives), device=device, dtype=dtype)
        starts = dict(zip(order, itertools.accumulate((lives[i].numel() for i in order), initial=0)))

        def span(run):  # the part of the flat buffer that holds a contiguous run of members
            return flat[starts[run[0]] : starts[run[0]] + _numel(run, lives)]

        def members(name):
            return [i for i in order if kinds[i] == name]

        for i in order:
            shadows_out[i] = _shaped_like(lives[i], span([i]))

        direct = members("direct")
        blend = [i for i in direct if average[i]]
        self._blend_same = (
            [shadows_out[i] for i in blend if lives[i].dtype == dtype],
            [lives[i] for i in blend if lives[i].dtype == dtype],
        )
        self._blend_cast = (
            [shadows_out[i] for i in blend if lives[i].dtype != dtype],
            [lives[i] for i in blend if lives[i].dtype != dtype],
        )
        self._copy_direct = (
            [shadows_out[i] for i in direct if not average[i]],
            [lives[i] for i in direct if not average[i]],
        )
        self._gathered_copies = [
            ([cat_inputs[i] for i in run], span(run))
            for run in _runs(members("gathered copy"), lives, CAT_CHUNK)
        ]
        # Blended runs: each block cats its members into a staging buffer (in their own dtype), then one lerp.
        self._gathered_blends = []
        for live_dtype, same_dtype in itertools.groupby(
            members("gathered blend"), key=lambda i: lives[i].dtype
        ):
            for block in _runs(list(same_dtype), lives, STAGE_LIMIT):
                stage = torch.empty(span(block).numel(), device=device, dtype=live_dtype)
                cats, start = [], 0
                for run in _runs(block, lives, CAT_CHUNK):
                    cats.append(
                        (
                            [cat_inputs[i] for i in run],
                            stage[start : start + _numel(run, lives)],
                        )
                    )
                    start += _numel(run, lives)
                self._gathered_blends.append((cats, span(block), stage))
        # Live tensors on another device (an EMA kept on the CPU): staged one at a time through a buffer
        # the size of the largest, so nothing is allocated per step.
        remote = members("remote")
        self._remote = []
        if remote:
            stage = torch.empty(max(lives[i].numel() for i in remote), device=device, dtype=dtype)
            self._remote = [
                (lives[i], shadows_out[i], average[i], stage[: lives[i].numel()].view(lives[i].shape))
                for i in remote
            ]

    def lerp_gathered_(self, weight: float) -> None:
        """The gathered small tensors' part of a step, and the copies of tensors that are not averaged."""
        for cats, region, stage in self._gathered_blends:
            for views, out in cats:
                torch.cat(views, out=out)
            if stage.dtype == region.dtype:
                region.lerp_(stage, weight)
            else:
                region.mul_(1.0 - weight).add_(stage, alpha=weight)
        self._copy_unaveraged()

    def lerp_direct_(self, weight: float) -> None:
        """The big averaged tensors' part of a step: few tensors, most of the bytes."""
        if self._blend_same[0]:
            torch._foreach_lerp_(*self._blend_same, weight)
        if self._blend_cast[0]:  # lerp_ needs equal dtypes; mul_ and add_ convert inside the kernel
            torch._foreach_mul_(self._blend_cast[0], 1.0 - weight)
            torch._foreach_add_(*self._blend_cast, alpha=weight)
        for live, shadow, average, stage in self._remote:
            if average:
                shadow.lerp_(stage.copy_(live), weight)

    def copy_(self) -> None:
        shadows = self._blend_same[0] + self._blend_cast[0]
        if shadows:
            torch._foreach_copy_(shadows, self._blend_same[1] + self._blend_cast[1])
        for cats, region, stage in self._gathered_blends:
            for views, out in cats:
                torch.cat(views, out=out)
            region.copy_(stage)
        for live, shadow, average, _ in self._remote:
            if average:
                shadow.copy_(live)
        self._copy_unaveraged()

    def _copy_unaveraged(self) -> None:
        if self._copy_direct[0]:
            torch._foreach_copy_(*self._copy_direct)
        for views, region in self._gathered_copies:
            torch.cat(views, out=region)
        for live, shadow, average, _ in self._remote:
            if not average:
                shadow.copy_(live)



class MultiUpdate:
    """Several ``FusedUpdate`` plans over the same live tensors (one per decay), stepped in one pass.

    Each op reads a live tensor once for all the shadow sets: big tensors go to one multi-tensor ``lerp``
    whose list pairs each live tensor with its K shadows in turn (so it is still in cache for the 2nd to
    K-th), with one weight per set; small ones are gathered once, and the staging buffer is blended into
    the K shadow regions. Only shadows in another dtype than their live tensors (bf16 models) take one
    ``mul_``/``add_`` pair per set, since ``lerp`` needs equal dtypes.
    """

    def __init__(self, plans: list[FusedUpdate]):
        lead = plans[0]
        if not all(
            len(p.lives) == len(lead.lives) and all(map(Tensor.is_set_to, p.lives, lead.lives)) for p in plans
        ):
            raise ValueError("MultiUpdate needs plans built over the same live tensors.")
        self.plans = plans
        self._groups = [_GroupSet([p._groups[g] for p in plans]) for g in range(len(lead._groups))]
        self._weights: tuple = ()

    def lerp_(self, weights: list[float]) -> None:
        """One EMA step per set: ``shadows[k] += weights[k] * (live - shadows[k])``; copy the rest."""
        key = tuple(weights)
        if key != self._weights:  # the per-tensor weight lists change only while a warmup runs
            self._weights = key
            for group in self._groups:
                group.set_weights(key)
        for group in self._groups:
            group.lerp_gathered_()
        for group in self._groups:
            group.lerp_direct_()

    def copy_(self) -> None:
        """Make every shadow of every set an exact copy of its live tensor."""
        for group in self._groups:
            group.copy_()

    def all_finite(self) -> bool:
        """Whether every floating-point live tensor is free of NaN and Inf (one sync on GPU)."""
        return self.plans[0].all_finite()


class _GroupSet:
    """The K sets' ``_Group`` of one ``(device, dtype)``: the lead's live-side lists, every set's shadows."""

    def __init__(self, groups: list[_Group]):
        lead, k = groups[0], len(groups)

        def interleaved(pick):  # [set 0's i-th, set 1's i-th, ..., set 0's (i+1)-th, ...]
            return [item for items in zip(*map(pick, groups)) for item in items]

        def repeated(items):
            return [item for item in items for _ in range(k)]

        self._k = k
        self._blend = (interleaved(lambda g: g._blend_same[0]), repeated(lead._blend_same[1]))
        self._casts = [(g._blend_cast[0], lead._blend_cast[1]) for g in groups]
        self._copies = (interleaved(lambda g: g._copy_direct[0]), repeated(lead._copy_direct[1]))
        # Gathered copies: cat into the lead's region once, then copy that region to the other sets.
        self._gathered_copies = lead._gathered_copies
        self._copy_regions = (
            [g._gathered_copies[i][1] for i in range(len(lead._gathered_copies)) for g in groups[1:]],
            [region for _, region in lead._gathered_copies for _ in groups[1:]],
        )
        # Gathered blends: the lead's cats fill its staging buffers once; every set's region blends from them.
        self._cats = [cats for cats, _, _ in lead._gathered_blends]
        blends = lead._gathered_blends
        same = [b for b, (_, region, stage) in enumerate(blends) if stage.dtype == region.dtype]
        self._staged = (
            interleaved(lambda g: [g._gathered_blends[b][1] for b in same]),
            repeated([lead._gathered_blends[b][2] for b in same]),
        )
        self._staged_cast = [
            (g._gathered_blends[b][1], lead._gathered_blends[b][2])
            for b in range(len(lead._gathered_blends))
            if b not in same
            for g in groups
        ]
        # Live tensors on another device: staged once each, then blended into every set's shadow.
        self._remote = [
            (live, [g._remote[i][1] for g in groups], average, stage)
            for i, (live, _, average, stage) in enumerate(lead._remote)
        ]
        self._weights: list[float] = []

    def set_weights(self, weights: tuple) -> None:
        self._weights = list(weights)
        self._blend_weights = self._weights * (len(self._blend[0]) // self._k)
        self._staged_weights = self._weights * (len(self._staged[0]) // self._k)

    def lerp_gathered_(self) -> None:
        for cats in self._cats:
            for views, out in cats:
                torch.cat(views, out=out)
        if self._staged[0]:
            torch._foreach_lerp_(*self._staged, self._staged_weights)
        for index, (region, stage) in enumerate(self._staged_cast):
            weight = self._weights[index % self._k]
            region.mul_(1.0 - weight).add_(stage, alpha=weight)
        self._copy_unaveraged()

    def lerp_direct_(self) -> None:
        if self._blend[0]:
            torch._foreach_lerp_(*self._blend, self._blend_weights)
        for (shadows, lives), weight in zip(self._casts, self._weights):
            if shadows:  # lerp_ needs equal dtypes; mul_ and add_ convert inside the kernel
                torch._foreach_mul_(shadows, 1.0 - weight)
                torch._foreach_add_(shadows, lives, alpha=weight)
        for live, shadows, average, stage in self._remote:
            if average:
                stage.copy_(live)
                for shadow, weight in zip(shadows, self._weights):
                    shadow.lerp_(stage, weight)

    def copy_(self) -> None:
        if self._blend[0]:
            torch._foreach_copy_(*self._blend)
        for shadows, lives in self._casts:
            if shadows:
                torch._foreach_copy_(shadows, lives)
        for cats in self._cats:
            for views, out in cats:
                torch.cat(views, out=out)
        if self._staged[0]:
            torch._foreach_copy_(*self._staged)
        for region, stage in self._staged_cast:
            region.copy_(stage)
        for live, shadows, average, _ in self._remote:
            if average:
                for shadow in shadows:
                    shadow.copy_(live)
        self._copy_unaveraged()

    def _copy_unaveraged(self) -> None:
        if self._copies[0]:
            torch._foreach_copy_(*self._copies)
        for views, region in self._gathered_copies:
            torch.cat(views, out=region)
        if self._copy_regions[0]:
            torch._foreach_copy_(*self._copy_regions)
        for live, shadows, average, _ in self._remote:
            if not average:
                for shadow in shadows:
                    shadow.copy_(live)


def _cat_input(live: Tensor, detached: Tensor) -> Tensor | None:
    """What a gathering ``torch.cat`` reads ``live`` through, or None when no 1-D view of it exists.

    A 1-D buffer (a norm layer's running statistics) is read as itself, not through a view:
    ``ModelEMA``'s address check has just touched that very object, so its metadata is in cache
    (measured: 3 to 4% of the tiny CNN's step). Parameters go through a view all the same, since a cat
    with ``out=`` refuses inputs that require grad, and turning grad mode off costs about what it saves.
    """
    if live.dim() == 1 and live.is_contiguous() and type(live) is Tensor and not live.requires_grad:
        return live
    return memory_order_view(detached)


def _numel(indices: list[int], lives: list[Tensor]) -> int:
    return sum(lives[i].numel() for i in indices)


def _shaped_like(live: Tensor, region: Tensor) -> Tensor:
    """A 1-D region viewed with ``live``'s shape, and with its memory layout when it is dense."""
    if memory_order_view(live) is None:
        return region.view(live.shape)
    return region.as_strided(live.shape, live.stride())


def _runs(indices: list[int], lives: list[Tensor], limit: int) -> list[list[int]]:
    """Split consecutive members into runs of at most ``limit`` elements (a bigger one stands alone)."""
    runs, size = [], limit + 1
    for i in indices:
        if size + lives[i].numel() > limit:
            runs.append([])
            size = 0
        runs[-1].append(i)
        size += lives[i].numel()
    return runs
