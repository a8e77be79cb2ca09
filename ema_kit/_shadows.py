"""Shadows: K averaged copies ("sets") of one live model's weights, kept bound to the model as it changes.

``ModelEMA`` (K = 1), ``MultiEMA`` (one set per decay) and ``PostHocEMA`` (one per profile) each hold one
``Shadows`` and keep only their schedule: which weight each set blends in at a step.

The update is the plain multi-tensor idiom: tensor lists built once per ``(device, dtype)``, then one
``torch._foreach_lerp_`` (``_foreach_copy_`` for integer buffers) per list, for all K sets at once (each
live tensor is paired with its K shadows in turn, with a list of K weights). The one step beyond it:
small dense tensors are gathered, one ``cat`` and one ``lerp_`` per set over a flat tensor that their
shadows are views into (integer counters: one ``cat``, then a ``copy_`` per further set; see ``_Gather``).

Before each update, ``follow(model)`` checks that the lists still point at the model's tensors. The check
reads the model alone (``_Watch``: each module's dicts of children, parameters and buffers against copies,
and its tensors' addresses and shapes), so nothing else in the process can make it fail. When the model
changed, it is walked again: the shadows rebind to its current tensors, or an error names what no longer
matches.

A model sharded by FSDP2 (``_sharded``) cannot be copied: its shadows are plain tensors of each rank's
local shards, kept in one dict per set instead of a module, and everything above runs on those shards.
"""

from __future__ import annotations

import copy
import operator
from itertools import accumulate, chain

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from ._checks import check_module
from ._lowp import STOCHASTIC_BF16, lerp_stochastic_, new_generator, reseeded, shadow_dtype
from ._sharded import check_supported, gathered, is_dtensor, local, on_every_rank, reshard, shard_of
from ._tensors import Slot, check_layout, layout_mismatch, model_device, saved_entries, saved_slots

SMALL = 16_384  # elements: smaller contiguous CPU tensors are gathered, one cat for all of them (see _Gather)
_MISMATCH = "The model does not match the model this EMA was built for"
_FIX = (
    "An EMA averages one fixed set of tensors: undo the change to the model, or build a new EMA for the new "
    "architecture."
)


class Shadows:
    """``count`` shadow sets of ``model``'s parameters and persistent buffers, each held in ``modules[k]``.

    Each ``modules[k]`` is a copy of the model in eval mode without gradients whose tensors are set k's
    shadows. Floating-point and complex tensors are averaged (buffers only when ``average_buffers``);
    the rest (integer counters) and modules' extra state (``get_extra_state``) are copied at each update.
    ``state(k)`` is set k's state dict, and ``load_state`` / ``gathered`` load and gather one.

    A model sharded by FSDP2 (``sharded``, allowed with ``allow_sharded``) has no copy: ``modules`` is
    empty, and each set holds this rank's shards, plain tensors of the local shapes (``state(k)`` views them
    as DTensors laid out as the model's parameters).

    Args:
        model: the live model (wrappers looked through).
        count: the number of shadow sets.
        average_buffers: average floating-point buffers like weights, or copy them.
        dtype: the shadows' floating-point dtype; by default float32 for lower-precision weights, else the
            weight's own (complex weights take the matching complex dtype). ``"bfloat16-stochastic"``:
            bfloat16 shadows blended with stochastic rounding (``_lowp``), from a generator of their own.
        device: where the shadows live; None follows the model's device.
        allow_sharded: accept a model sharded by FSDP2 (its owner handles ``modules`` being empty).

    Example:
        >>> model = nn.Linear(2, 1)
        >>> shadows = Shadows(model, 2, average_buffers=True, dtype=None, device=None)
        >>> with torch.no_grad():
        ...     _ = model.weight.fill_(1.0)
        >>> shadows.follow(model)
        >>> shadows.blend([0.5, None])  # set 0 moves halfway to the weights, set 1 stays
        >>> bool((shadows.modules[0].weight - model.weight).abs().max() < 1)
        True
    """

    def __init__(
        self,
        model: nn.Module,
        count: int,
        *,
        average_buffers: bool,
        dtype,
        device,
        allow_sharded: bool = False,
    ):
        self.average_buffers, self.device, self.count = average_buffers, device, count
        self.stochastic, self.dtype = dtype == STOCHASTIC_BF16, shadow_dtype(dtype)
        self.generator: torch.Generator | None = None  # the rounding noise's, on the shadows' device (_bind)
        live = check_module("model", model)
        check_supported(live)
        reshard(live)  # a forward under no_grad may have left FSDP2's root gathered
        slots = _checked_slots(live, "The model")
        self.name = type(live).__name__
        if not any(_averageable(slot.tensor) for slot in slots):
            raise ValueError(f"{self.name} has no floating-point parameters or buffers to average.")
        self.sharded = any(is_dtensor(slot.tensor) for slot in slots)
        self.modules: list[nn.Module] = []
        self._sets: list[dict[str, Tensor]] = []  # a sharded model's shadows, key -> this rank's shard
        if self.sharded:
            _check_shardable(live, allow_sharded, self.stochastic)
            with torch.no_grad():
                self._sets = [
                    {slot.key: self._new_shadow(local(slot.tensor), slot.tensor) for slot in slots}
                    for _ in range(count)
                ]
            self._bind(model)
            return
        for _ in range(count):
            with torch.no_grad():
                memo = {id(slot.tensor): self._new_shadow(slot.tensor, slot.tensor) for slot in slots}
            try:
                module = copy.deepcopy(live, memo)
            except Exception as error:
                raise TypeError(
                    f"The EMA copies the model with copy.deepcopy, which failed for {type(live).__name__}: "
                    f"{error}"
                ) from error
            self.modules.append(module.eval().requires_grad_(False))
        self._bind(model)

    # -- the update -----------------------------------------------------------------------------------

    def follow(self, model: nn.Module) -> None:
        """Bind to ``model``'s current tensors when it is another object or has changed since the last call.

        Raises ValueError, before anything changes, when its layout no longer matches the shadows.
        """
        if model is not self._model or self._watch.changed():
            self._bind(model)

    def blend(self, weights: list[float | None]) -> None:
        """One step per set: ``shadow += weights[k] * (live - shadow)``; 1.0 copies; None leaves the set.

        Tensors that are not averaged are copied into every set that is not left alone.
        """
        if None not in weights and 1.0 not in weights:
            self._stage()
            if weights != self._weights:  # a list per op pairs each live tensor's K shadows with K weights
                self._weights = list(weights)
                self._weight_lists = [
                    list(weights) * (len(lives) // len(weights)) for _, lives in self._lerps
                ]
            # The small copies first, while follow() has just brought their tensors' metadata into cache:
            # after the lerp has streamed the weights through it they cost 3% of a ResNet-50 step, not 0.3%.
            for gather in self._gathers:
                gather.blend(weights)
            for shadows, lives in self._copies:
                torch._foreach_copy_(shadows, lives)
            for (shadows, lives), per_tensor in zip(self._lerps, self._weight_lists):
                torch._foreach_lerp_(shadows, lives, weights[0] if len(weights) == 1 else per_tensor)
            for pairs, weight in zip(self._casts, weights):  # mul_ and add_ convert dtypes inside
                for shadows, lives in pairs:
                    torch._foreach_mul_(shadows, 1.0 - weight)
                    torch._foreach_add_(shadows, lives, alpha=weight)
            for pairs, weight in zip(self._stochastic, weights):
                for shadows, lives in pairs:
                    lerp_stochastic_(shadows, lives, weight, self.generator)
            if self._extra:
                self._copy_extra_state(range(len(weights)))
        elif all(w == 1.0 for w in weights):
            self.copy()
        else:  # the sets' schedules differ at this step
            self._stage()
            for k, weight in enumerate(weights):
                if weight is not None:
                    self._blend_set(k, weight)

    def copy(self) -> None:
        """Make every set an exact copy of the live weights (also mends a shadow holding NaN)."""
        self._stage()
        for gather in self._gathers:
            gather.blend([1.0] * self.count)
        per_set = [pair for pairs in self._casts + self._stochastic for pair in pairs]
        for shadows, lives in self._copies + self._lerps + per_set:
            torch._foreach_copy_(shadows, lives)
        self._copy_extra_state(range(self.count))

    def all_finite(self) -> bool:
        """Whether every averaged live tensor is free of NaN and Inf (one sync per device on a GPU).

        Of a sharded model, on every rank: each sees only its shards, and all must skip the same updates
        (one all-reduce of one number).
        """
        finite = all(
            bool(
                torch.stack([n.float() for n in torch._foreach_norm(tensors, float("inf"))]).isfinite().all()
            )
            for tensors in self._finite_checks
        )
        return on_every_rank(finite, self._device) if self.sharded else finite

    # -- other uses of the live model -----------------------------------------------------------------

    def pair(self, model: nn.Module, k: int) -> tuple[list[Tensor], list[Tensor]]:
        """``model``'s tensors and set k's, matched by key, for copying one into the other.

        A sharded model's are this rank's shards, registered again first: whatever is written into them is
        what its next forward gathers.
        """
        live = check_module("model", model)
        reshard(live)
        lives = {slot.key: local(slot.tensor) for slot in _checked_slots(live, "The model")}
        shadows = {slot.key: slot.tensor for slot in self._slots(k)}
        check_layout(lives, shadows, _MISMATCH, _FIX)
        return [lives[key] for key in shadows], list(shadows.values())

    # -- set k as a state dict --------------------------------------------------------------------------

    def state(self, k: int) -> dict:
        """Set k's state dict: its module's, or for a sharded model its shards viewed as DTensors laid out as
        the model's parameters (no copy, no communication; tied weights under each of their keys)."""
        if not self.sharded:
            return self.modules[k].state_dict()
        from torch.distributed.tensor import DTensor

        views = {
            key: shadow
            if key not in self._like
            else DTensor.from_local(
                shadow,
                (like := self._like[key]).device_mesh,
                like.placements,
                run_check=False,
                shape=like.shape,
                stride=like.stride(),
            )
            for key, shadow in self._sets[k].items()
        }
        return {key: views[first] for key, first in self._keys.items()}

    def check_state(self, weights: dict) -> None:
        """Refuse, before anything changes, a sharded state laid out otherwise than the model's parameters.

        ``weights`` has the keys and shapes of ``state(k)`` already (``check_layout``). A whole tensor (a
        gathered state, or an unsharded EMA's) is fine: each rank takes its part.
        """
        for key, like in self._like.items():
            value, layout = weights[key], (like.placements, like.device_mesh)
            if is_dtensor(value) and (value.placements, value.device_mesh) != layout:
                raise ValueError(
                    f"The state's {key} is sharded as {value.placements} over {value.device_mesh}, the "
                    f"model's as {like.placements} over {like.device_mesh}. Load a state saved with the same "
                    "sharding and number of processes, or one gathered whole (ModelEMA.save, or fit's "
                    "checkpoint)."
                )

    def load_state(self, k: int, weights: dict) -> None:
        """Copy a state dict checked against ``state(k)`` (and ``check_state``) into set k."""
        with torch.no_grad():
            if not self.sharded:
                self.modules[k].load_state_dict(weights)
                return
            for key, shadow in self._sets[k].items():
                value = weights[key]
                shadow.copy_(shard_of(value, self._like[key]) if key in self._like else value)

    def gathered(self, k: int) -> dict | None:
        """Set k's state dict whole, on the CPU, on rank 0 (None on the others): every rank must call it."""
        return gathered(self.state(k))

    def relayout(self, *, average_buffers: bool, dtype) -> None:
        """Apply restored settings: the averaged buffers and the shadow dtype (values kept, then cast)."""
        self.average_buffers = average_buffers
        self.stochastic, self.dtype = dtype == STOCHASTIC_BF16, shadow_dtype(dtype)
        self._bind(self._model)

    # -- the rounding noise of stochastic shadows, kept beside them -------------------------------------

    def noise_state(self) -> dict | None:
        """Where the noise is, for a state dict (plain values and a tensor); None when rounding to nearest."""
        if self.generator is None:
            return None
        return {"device": str(self.generator.device), "state": self.generator.get_state()}

    def load_noise_state(self, state: dict | None) -> None:
        """Put back what ``noise_state`` returned (checked by ``_lowp.check_noise_state``).

        On the device it was saved on the stream goes on bit-exact; elsewhere it is reseeded from that state.
        """
        if not self.stochastic:
            return
        device = self.generator.device
        if state["device"] != str(device):
            self.generator = reseeded(device, state["state"])
        else:
            self.generator.set_state(state["state"])

    # -- binding ----------------------------------------------------------------------------------------

    def _bind(self, model: nn.Module) -> None:
        """Point the update lists at ``model``'s tensors, laying the shadows out for them where needed."""
        live = check_module("model", model)
        reshard(live)
        slots = _checked_slots(live, "The model")
        if any(is_dtensor(slot.tensor) for slot in slots) != self.sharded:
            raise ValueError(
                f"The model was {'un' if self.sharded else ''}sharded after this EMA was built for it: an "
                "EMA holds whole weights or this rank's shards, for good. Build the EMA after sharding the "
                "model (fully_shard), and keep it sharded."
            )
        lives = [local(slot.tensor) if self.sharded else slot.tensor for slot in slots]  # what the ops read
        if not self.sharded:
            _check_keys(live, slots, self.modules[0])
        sets = [{slot.key: slot for slot in self._slots(k)} for k in range(self.count)]
        check_layout(
            {slot.key: tensor for slot, tensor in zip(slots, lives)},
            {key: shadow.tensor for key, shadow in sets[0].items()},
            _MISMATCH,
            _FIX,
        )
        shadow_slots = [[shadows[slot.key] for slot in slots] for shadows in sets]  # [set][tensor]
        placements: dict[tuple, tuple] = {}
        with torch.no_grad():  # keep the EMA's values; only where and how they are laid out may change
            for tensor, *shadows in zip(lives, *shadow_slots):
                kind = (tensor.dtype, tensor.device)
                if kind not in placements:
                    placements[kind] = self._placement(tensor)
                for shadow in shadows:
                    if not _laid_out(shadow.tensor, tensor, *placements[kind]):
                        _replace(shadow, self._new_shadow(tensor, shadow.tensor))
        if self.sharded:
            self._like = {slot.key: slot.tensor for slot in slots if is_dtensor(slot.tensor)}
            self._keys = _state_keys(live, slots)
        else:
            self._follow_noise(model_device(self.modules[0]))
        self._plan(live, slots, lives, shadow_slots)
        self._model = model
        # One shadow per set is watched too: a set moved or cast by hand (ema.module.half()) is laid out anew.
        first = next(i for i, slot in enumerate(slots) if _averageable(slot.tensor))
        firsts = [set_slots[first] for set_slots in shadow_slots]
        self._watch = _Watch(live, firsts, lives + [slot.tensor for slot in firsts])

    def _slots(self, k: int) -> list[Slot]:
        """Where set k's shadows are held: its module's slots, or for a sharded model its dict's."""
        if self.sharded:
            return [Slot(key, self._sets[k], key) for key in self._sets[k]]
        return saved_slots(self.modules[k])

    def _follow_noise(self, device: torch.device) -> None:
        """Stochastic shadows draw their noise on their own device: seeded at first, and when the shadows
        moved, reseeded there from the old generator's state (deterministic, though not the same stream)."""
        if not self.stochastic:
            self.generator = None
        elif self.generator is None:
            self.generator = new_generator(device)
        elif self.generator.device != device:
            self.generator = reseeded(device, self.generator.get_state())

    def _plan(
        self, live: nn.Module, slots: list[Slot], tensors: list[Tensor], shadow_slots: list[list[Slot]]
    ) -> None:
        """Build the op lists: live tensors grouped by kind, device and dtypes, each with its K shadows."""
        # Plain tensors in the op lists: a list holding Parameters costs a subclass check per element.
        lives = [tensor.detach() for tensor in tensors]
        averaged = [self._averaged(slot.tensor) for slot in slots]
        firsts = [slot.tensor for slot in shadow_slots[0]]  # each set's shadows share device and dtype
        sources = list(lives)  # what the ops read: the live tensor, or its copy on the shadows' device
        remote: dict[tuple, list[int]] = {}  # an EMA kept on another device than the model: staged
        for i, (source, shadow) in enumerate(zip(sources, firsts)):
            if source.device != shadow.device:
                remote.setdefault((source.device, source.dtype, shadow.device), []).append(i)
        self._stages = []
        for (_, _, device), members in remote.items():
            stage = _Stage([sources[i] for i in members], device)
            self._stages.append(stage)
            for i, view in zip(members, stage.views):
                sources[i] = view
        groups: dict[tuple, list[int]] = {}
        for i, (source, shadow) in enumerate(zip(sources, firsts)):
            same = source.dtype == shadow.dtype
            kind = "copy" if not averaged[i] else "lerp" if same else "cast"
            if kind != "copy" and self.stochastic and shadow.dtype == torch.bfloat16:
                kind = "stochastic"  # rounded at random (_lowp), one op list per set
                if not shadow.is_contiguous():  # _lowp blends through flat views
                    raise ValueError(
                        f"dtype={STOCHASTIC_BF16!r} blends contiguous shadows only, but {slots[i].key} has "
                        f"strides {shadow.stride()} (channels_last?); build the EMA from a contiguous model "
                        "(model.to(memory_format=torch.contiguous_format)) or use dtype=torch.bfloat16."
                    )
            elif kind != "cast" and same and source.device.type == "cpu" and _small(source):
                kind = "gather" if kind == "lerp" else "gather copy"  # see _Gather
            groups.setdefault((kind, shadow.device, shadow.dtype, source.dtype), []).append(i)
        self._gathers = []
        for (kind, *_), members in groups.items():
            if kind.startswith("gather"):
                regions = [_packed([set_slots[i] for i in members]) for set_slots in shadow_slots]
                self._gathers.append(_Gather([sources[i] for i in members], regions, kind == "gather"))
        # The other kinds' ops read the shadows themselves: shadows[set][i], for the tensors not gathered.
        listed = [i for (kind, *_), group in groups.items() if not kind.startswith("gather") for i in group]
        shadows = [{i: set_slots[i].tensor.detach() for i in listed} for set_slots in shadow_slots]

        def of(kind: str, sets: range) -> list[tuple[list[Tensor], list[Tensor]]]:
            # Each live tensor is read once per op, paired with the shadows of ``sets`` in turn: with several
            # sets, one op reads a live tensor for all of them (with a list of K weights).
            return [
                ([shadows[j][i] for i in members for j in sets], [sources[i] for i in members for _ in sets])
                for (group_kind, *_), members in groups.items()
                if group_kind == kind
            ]

        every = range(len(shadow_slots))
        self._lerps, self._copies = of("lerp", every), of("copy", every)
        # lerp_ needs equal dtypes, and add_'s alpha is one number per op: casts take one op pair per set.
        self._casts = [of("cast", range(j, j + 1)) for j in every]
        self._stochastic = [of("stochastic", range(j, j + 1)) for j in every]
        kinds = ("copy", "lerp", "cast", "stochastic")
        self._per_set = [{kind: of(kind, range(j, j + 1)) for kind in kinds} for j in every]
        self._weights: list = []
        by_device: dict[torch.device, list[Tensor]] = {}
        for tensor, average in zip(lives, averaged):
            if average and tensor.numel():
                by_device.setdefault(tensor.device, []).append(tensor)
        self._finite_checks = list(by_device.values())
        self._device = lives[0].device  # for a sharded model's all-reduce (a rank may hold no element)
        own = nn.Module.get_extra_state
        self._extra = [
            (name, module)
            for name, module in live.named_modules()
            if getattr(type(module), "get_extra_state", own) is not own
        ]

    def _blend_set(self, j: int, weight: float) -> None:
        lists = self._per_set[j]
        for gather in self._gathers:
            gather.blend([weight if k == j else None for k in range(self.count)])
        for shadows, lives in sum(lists.values(), []) if weight == 1.0 else lists["copy"]:
            torch._foreach_copy_(shadows, lives)
        if weight != 1.0:
            for shadows, lives in lists["lerp"]:
                torch._foreach_lerp_(shadows, lives, weight)
            for shadows, lives in lists["cast"]:
                torch._foreach_mul_(shadows, 1.0 - weight)
                torch._foreach_add_(shadows, lives, alpha=weight)
            for shadows, lives in lists["stochastic"]:
                lerp_stochastic_(shadows, lives, weight, self.generator)
        self._copy_extra_state([j])

    def _stage(self) -> None:
        for stage in self._stages:
            stage.fill()

    def _copy_extra_state(self, sets) -> None:
        for name, module in self._extra:
            state = module.get_extra_state()
            for j in sets:
                self.modules[j].get_submodule(name).set_extra_state(copy.deepcopy(state))

    # -- placement ------------------------------------------------------------------------------------

    def _averaged(self, tensor: Tensor) -> bool:
        return _averageable(tensor) and (isinstance(tensor, nn.Parameter) or self.average_buffers)

    def _placement(self, live: Tensor) -> tuple[torch.device, torch.dtype]:
        """Where and in which dtype ``live``'s shadows live."""
        dtype = live.dtype
        if live.is_floating_point():
            dtype = self.dtype or torch.promote_types(dtype, torch.float32)
        elif live.is_complex():
            dtype = (self.dtype or torch.promote_types(dtype.to_real(), torch.float32)).to_complex()
        return self.device or live.device, dtype

    def _new_shadow(self, live: Tensor, value: Tensor) -> Tensor:
        """A shadow for ``live``: its shape and memory layout, the EMA's device and dtype, ``value``."""
        device, dtype = self._placement(live)
        shadow = torch.empty_like(live, dtype=dtype, device=device, requires_grad=False)
        shadow.copy_(local(value))
        return nn.Parameter(shadow, requires_grad=False) if isinstance(live, nn.Parameter) else shadow


def _laid_out(shadow: Tensor, live: Tensor, device: torch.device, dtype: torch.dtype) -> bool:
    """Whether ``shadow`` has the device, dtype, shape and strides of a new shadow of ``live`` there."""
    if shadow.device != device or shadow.dtype != dtype or shadow.shape != live.shape:
        return False
    # empty_like keeps the strides of a dense tensor (channels_last too) and packs one with gaps.
    strides = shadow.stride()
    return strides == live.stride() or strides == torch.empty_like(live, device="meta").stride()


class _Replaced(Exception):
    """Raised inside ``_Watch.changed``'s ``==`` when it reaches torch: an entry holds another tensor."""


class _NoValues(TorchFunctionMode):
    """Any torch call raises ``_Replaced``: ``==`` reaches torch only for a tensor that replaced another, and
    must not compare values then (a broadcast to N x N, a GPU sync, a subclass's own ``==`` or ``bool``)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        raise _Replaced


_NO_VALUES = _NoValues()


class _Watch:
    """What ``Shadows.follow`` compares to tell that the model changed: read from the model alone, no hooks.

    Noted when the shadows bind, and compared whole by C code (no Python loop per module or tensor):
    - a copy of every module's ``_modules``, ``_parameters`` and ``_buffers`` dict, compared with ``==``:
      their names and their values by identity (a child swapped in, ``model._modules["3"] = layer``
      included; a parameter or buffer registered, deleted or replaced: ``load_state_dict(assign=True)``,
      buffers replaced by ``.to()``, a bias set where there was none, tied weights untied). A value that is
      not the same object falls back to its own ``==``: for a tensor that raises (``_NoValues``); every
      child is also compared by identity alone, as a module class may define ``==``;
    - a module with non-persistent buffers: its saved entries by identity, and its number of buffers (a
      model may reassign such a buffer, a cache, in every forward: no change to its EMA);
    - the address and shape of ``tensors``, what the update reads from each slot (``.data`` swaps and
      ``resize_``, parameters moved or cast in place; a DTensor's local shard).
    Not seen: a ``.data`` swap to a view of the same memory with the same shape but other strides
    (``p.data = p.data.t()`` on a square weight).
    """

    def __init__(self, live: nn.Module, also: list[Slot], tensors: list[Tensor]):
        modules = list(live.modules())
        self._dicts, self._sized, entries = [], [], [(slot.holder, slot.name) for slot in also]
        for module in modules:
            self._dicts += [module._modules, module._parameters]
            if module._non_persistent_buffers_set:
                self._sized.append(module._buffers)
                entries += [entry for entry in saved_entries(module) if entry[0] is module._buffers]
            else:
                self._dicts.append(module._buffers)
        self._copies = list(map(dict, self._dicts))
        self._holders, self._keys = [holder for holder, _ in entries], [name for _, name in entries]
        self._objects = list(map(operator.getitem, self._holders, self._keys))
        self._sizes = list(map(len, self._sized))
        self._parents = [module._modules for module in modules if module._modules]
        self._children = list(chain.from_iterable(map(dict.values, self._parents)))
        self._tensors = tensors
        self._addresses = list(map(Tensor.data_ptr, tensors))
        self._shapes = list(map(Tensor.size, tensors))  # resize_ and .data swaps can keep the address

    def changed(self) -> bool:
        try:
            with _NO_VALUES:
                same = self._dicts == self._copies
            held = map(operator.getitem, self._holders, self._keys)
            same = same and all(map(operator.is_, held, self._objects))
        except Exception:  # _Replaced; an entry deleted; a child's own == failed
            return True
        return not (
            same
            and list(map(len, self._sized)) == self._sizes
            and all(map(operator.is_, chain.from_iterable(map(dict.values, self._parents)), self._children))
            and list(map(Tensor.data_ptr, self._tensors)) == self._addresses
            and list(map(Tensor.size, self._tensors)) == self._shapes
        )


def _small(tensor: Tensor) -> bool:
    return tensor.numel() < SMALL and tensor.is_contiguous()


class _Stage:
    """Live tensors on one device, copied each step into one buffer on the shadows' device.

    An EMA kept in CPU memory for a CUDA model stages through pinned memory with non-blocking copies (one
    ``_foreach_copy_``, then one wait for the stream), rather than one synchronous copy per tensor. The
    buffer holds one copy of those weights in their own dtype.
    """

    def __init__(self, lives: list[Tensor], device: torch.device):
        self._lives = lives
        source = lives[0].device
        self._pinned = device.type == "cpu" and source.type == "cuda"
        flat = torch.empty(
            sum(t.numel() for t in lives), dtype=lives[0].dtype, device=device, pin_memory=self._pinned
        )
        starts = [0]
        for t in lives:
            starts.append(starts[-1] + t.numel())
        self.views = [flat[a:b].view(t.shape) for t, a, b in zip(lives, starts, starts[1:])]
        self._source = source

    def fill(self) -> None:
        torch._foreach_copy_(self.views, self._lives, non_blocking=self._pinned)
        if self._pinned:  # the CPU reads the buffer next: wait for the copies queued on the GPU
            torch.cuda.current_stream(self._source).synchronize()


class _Gather:
    """Small dense live tensors of one device and dtype, blended into each set as one flat tensor.

    Their shadows are views into one flat region per set. A step reads the live tensors with one ``cat``
    into a buffer and blends each set with one ``lerp_`` over its region, rather than one op per tensor:
    the one path here beyond the plain idiom, kept because it pays on the CPU where small tensors are many
    (the A/B rows of benchmarks/ema_update.py: ema_kit with and without it). On CUDA it does not pay (the
    A/B row of benchmarks/RESULTS_gpu.md): the ``_foreach_`` kernels already batch small tensors there.
    """

    def __init__(self, lives: list[Tensor], regions: list[Tensor], averaged: bool):
        self._lives = [live.view(-1) for live in lives]
        self._regions = regions
        self._buffer = torch.empty_like(regions[0]) if averaged else None

    def blend(self, weights: list[float | None]) -> None:
        """``Shadows.blend`` for these tensors: set k takes ``weights[k]`` (1.0 copies, None leaves it).

        Tensors that are not averaged are copied into every set that is not left alone.
        """
        if self._buffer is None:  # read once into the first set's region, copied on from there
            regions = [region for region, weight in zip(self._regions, weights) if weight is not None]
            if regions:
                torch.cat(self._lives, out=regions[0])
            for region in regions[1:]:
                region.copy_(regions[0])
            return
        read = False
        for region, weight in zip(self._regions, weights):
            if weight == 1.0:
                torch.cat(self._lives, out=region)
            elif weight is not None:
                if not read:
                    torch.cat(self._lives, out=self._buffer)
                    read = True
                region.lerp_(self._buffer, weight)


def _packed(slots: list[Slot]) -> Tensor:
    """One flat tensor whose consecutive pieces are the (contiguous, same-dtype) tensors of ``slots``.

    When they are not such pieces already, the slots are given views into a new flat tensor, values kept.
    """
    tensors = [slot.tensor for slot in slots]
    sizes = list(map(Tensor.numel, tensors))
    first, size, itemsize = tensors[0], sum(sizes), tensors[0].element_size()
    storage, offset = first.untyped_storage(), first.storage_offset()
    # Pieces of one flat tensor: each starts where the one before ends, all within the first one's storage.
    starts = list(accumulate([first.data_ptr()] + [n * itemsize for n in sizes[:-1]]))
    if (
        list(map(Tensor.data_ptr, tensors)) == starts
        and all(map(Tensor.is_contiguous, tensors))
        and (offset + size) * itemsize <= storage.nbytes()
    ):
        return first.new_empty(0).set_(storage, offset, (size,))
    flat = first.new_empty(size)
    start = 0
    with torch.no_grad():
        for slot, tensor in zip(slots, tensors):
            view = flat[start : start + tensor.numel()].view(tensor.shape)
            _replace(slot, view.copy_(tensor))
            start += tensor.numel()
    return flat


def _averageable(tensor: Tensor) -> bool:
    return tensor.is_floating_point() or tensor.is_complex()


def _replace(slot: Slot, shadow: Tensor) -> None:
    """Put ``shadow`` in a shadow module's slot (a parameter keeps its object: tied weights stay tied)."""
    current = slot.tensor
    if isinstance(current, nn.Parameter):
        current.data = shadow.data if isinstance(shadow, nn.Parameter) else shadow
    else:
        slot.holder[slot.name] = shadow


def _check_shardable(live: nn.Module, allowed: bool, stochastic: bool) -> None:
    """Refuse what an EMA of a sharded model cannot do, before anything is built."""
    if not allowed:
        raise ValueError(
            f"{type(live).__name__} is sharded across processes (FSDP2), and this EMA keeps whole copies "
            "of the model; ModelEMA and MultiEMA keep each rank's shard of a sharded model "
            "(docs/distributed.md)."
        )
    if stochastic:
        raise ValueError(
            f"dtype={STOCHASTIC_BF16!r} is not supported on a sharded model (each rank's rounding noise "
            "would need a state of its own in the saved EMA); use dtype=torch.bfloat16 or the default "
            "float32 shadows, of which each rank keeps only its shard."
        )
    own = nn.Module.get_extra_state
    extra = [name for name, m in live.named_modules() if getattr(type(m), "get_extra_state", own) is not own]
    if extra:
        raise ValueError(
            f"The sharded model's modules {extra[:3]} keep extra state (get_extra_state), which an EMA of a "
            "sharded model does not hold; build the EMA from a model without it."
        )


def _state_keys(live: nn.Module, slots: list[Slot]) -> dict[str, str]:
    """Every key of ``live``'s state dict that holds a tensor, in order, with the slot key it is saved
    under (tied weights: several keys, one slot)."""
    first = {id(slot.tensor): slot.key for slot in slots}
    keys = {}
    for prefix, module in live.named_modules(remove_duplicate=False):
        dot = prefix + "." if prefix else ""
        for holder, name in saved_entries(module):
            if holder[name] is not None:
                keys[dot + name] = first[id(holder[name])]
    return keys


def _check_keys(live: nn.Module, slots: list[Slot], module: nn.Module) -> None:
    """Refuse ``live`` when its state dict's keys, or which of them share a tensor, differ from those of the
    EMA's ``module``: a module shared under a second name, weights tied or untied. (``check_layout`` then
    compares the tensors, each once.)"""
    keys, expected = _state_keys(live, slots), _state_keys(module, saved_slots(module))
    if keys != expected:
        retied = (
            f"tied differently: the model's {key} is {_tensor_of(key, keys[key])}, the EMA's "
            f"{_tensor_of(key, expected[key])}"
            for key in keys
            if keys[key] != expected[key]
        )
        raise ValueError(f"{_MISMATCH} ({layout_mismatch(keys, expected) or next(retied)}). {_FIX}")


def _tensor_of(key: str, first: str) -> str:
    return "its own tensor" if first == key else f"the same tensor as {first}"


def _checked_slots(module: nn.Module, what: str) -> list[Slot]:
    """``saved_slots(module)``, refusing tensors an EMA cannot hold: on ``meta``, or sparse."""
    slots = saved_slots(module)
    for slot in slots:
        tensor = slot.tensor
        if tensor.is_meta:
            raise ValueError(
                f"{what}'s {slot.key} is on the meta device: it has a shape but no values to average. "
                "Load or initialize the weights (e.g. model.to_empty(device='cpu') and load_state_dict) "
                "before building the EMA."
            )
        if tensor.layout != torch.strided:
            raise ValueError(
                f"{what}'s {slot.key} is a {tensor.layout} tensor; the EMA averages dense tensors only. "
                "Keep a dense copy of it in the model (tensor.to_dense()), or leave it out of the EMA."
            )
    return slots
