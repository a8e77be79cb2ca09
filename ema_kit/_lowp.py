"""bfloat16 EMA shadows that still move: the blend is done in float32 and rounded to bfloat16 stochastically.

A bfloat16 shadow keeps 8 significant bits, so near 1.0 it can only step by 2**-7. At decay 0.999 one
update moves the EMA by ``0.001 * (w - ema)``, which rounds away to nothing unless the live weight is
several units away: a naive bfloat16 EMA stalls. Rounding up or down at random, with the probability of
rounding up equal to the fraction dropped, makes every update right *on average*, so the shadow follows
the exact EMA with a small zero-mean jitter instead of freezing (Gupta et al. 2015, "Deep learning with
limited numerical precision").

The rounding works on bit patterns: a bfloat16 is the top 16 bits of a float32. Adding 16 uniform random
bits to the float32 pattern and then dropping the low 16 bits carries into the kept part with exactly that
probability, for either sign (the sign bit sits apart from the magnitude bits).

An EMA asks for such shadows with one option, ``dtype=STOCHASTIC_BF16`` (``"bfloat16-stochastic"``). The
noise comes from a generator of the shadows' own (``Shadows.generator``), on their device, whose state is
saved with the EMA.
"""

from __future__ import annotations

import hashlib
import numbers

import torch

STOCHASTIC_BF16 = "bfloat16-stochastic"  # the dtype= of ModelEMA and MultiEMA that selects these shadows
SEED = 0  # every stochastic shadow's noise starts from this seed; its state_dict() keeps where it is

_DROPPED_BITS = 16  # float32 keeps 23 mantissa bits, bfloat16 keeps 7: the low 16 bits go
_KEEP_MASK = -(1 << _DROPPED_BITS)  # 0xFFFF0000 as an int32
# Work through the tensors in groups of at most this many elements, so the float32 and noise scratch
# (14 bytes per element) stays at ~56 MB whatever the model's size: the point is to save memory.
CHUNK = 1 << 22


def lerp_stochastic_(
    shadows: list[torch.Tensor],
    lives: list[torch.Tensor],
    weight: float,
    generator: torch.Generator | None = None,
) -> None:
    """``shadow += weight * (live - shadow)`` for bfloat16 shadows, in float32, rounded stochastically.

    Args:
        shadows: bfloat16 tensors, changed in place (the EMA's shadow weights), all on one device.
        lives: the live weights, matching ``shadows`` in shape and device, any floating dtype.
        weight: the blend weight, ``1 - decay``, in [0, 1].
        generator: the source of the rounding noise, on the shadows' device; seed it for repeatable
            results. None uses torch's global generator.

    Example:
        >>> shadow = torch.ones(10_000, dtype=torch.bfloat16)
        >>> live = torch.full((10_000,), 1.5)
        >>> lerp_stochastic_([shadow], [live], 0.001, torch.Generator().manual_seed(0))
        >>> torch.equal(shadow, torch.ones(10_000, dtype=torch.bfloat16))   # some elements stepped up
        False
        >>> abs(shadow.double().mean().item() - 1.0005) < 1e-4                # and the mean is right
        True
    """
    _check(shadows, lives, weight, generator)
    if not shadows:
        return
    with torch.no_grad():
        for group in _groups(shadows, lives):
            _lerp_group(*group, weight, generator)


def _lerp_group(
    shadows: list[torch.Tensor], lives: list[torch.Tensor], weight: float, generator: torch.Generator | None
) -> None:
    device, sizes = shadows[0].device, [t.numel() for t in shadows]
    wide = torch.empty(sum(sizes), dtype=torch.float32, device=device)
    wides = list(wide.split(sizes))
    torch._foreach_copy_(wides, shadows)
    if any(live.dtype != torch.float32 for live in lives):  # _foreach_lerp_ wants one dtype
        targets = list(torch.empty_like(wide).split(sizes))
        torch._foreach_copy_(targets, lives)
        lives = targets
    torch._foreach_lerp_(wides, lives, weight)
    noise = torch.randint(
        0, 1 << _DROPPED_BITS, wide.shape, dtype=torch.int32, device=device, generator=generator
    )
    bits = wide.view(torch.int32)
    bits.add_(noise).bitwise_and_(_KEEP_MASK)  # the low bits are now zero: the cast below is exact
    torch._foreach_copy_(shadows, wides)


def _groups(shadows, lives):
    """Flat views of the tensors, big ones split, packed into groups of at most ``CHUNK`` elements."""
    group_s, group_l, size = [], [], 0
    for shadow, live in zip(shadows, lives):
        for piece_s, piece_l in zip(shadow.view(-1).split(CHUNK), live.reshape(-1).split(CHUNK)):
            if size + piece_s.numel() > CHUNK and group_s:
                yield group_s, group_l
                group_s, group_l, size = [], [], 0
            group_s.append(piece_s)
            group_l.append(piece_l)
            size += piece_s.numel()
    if group_s:
        yield group_s, group_l


def _check(shadows, lives, weight, generator) -> None:
    if not isinstance(shadows, (list, tuple)) or not isinstance(lives, (list, tuple)):
        raise TypeError(
            f"shadows and lives must be lists of tensors, got {type(shadows).__name__} and "
            f"{type(lives).__name__}."
        )
    if len(shadows) != len(lives):
        raise ValueError(
            f"shadows and lives must pair up, got {len(shadows)} shadows and {len(lives)} lives."
        )
    if isinstance(weight, bool) or not isinstance(weight, numbers.Real) or not 0.0 <= weight <= 1.0:
        raise ValueError(f"weight must be a number in [0, 1] (1 - decay), got {weight!r}.")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}.")
    devices = set()
    for index, (shadow, live) in enumerate(zip(shadows, lives)):
        if shadow.dtype != torch.bfloat16:
            raise ValueError(
                f"shadows[{index}] is {shadow.dtype}; stochastic rounding here is for bfloat16 shadows "
                "(float16's narrow exponent makes bit truncation wrong for its subnormals). Keep float16 "
                "models' shadows in float32 (the default), or ask for bfloat16 ones."
            )
        if not shadow.is_contiguous():
            raise ValueError(f"shadows[{index}] must be contiguous (it is updated through a flat view).")
        if not live.is_floating_point() or live.shape != shadow.shape or live.device != shadow.device:
            raise ValueError(
                f"lives[{index}] ({live.dtype}, {tuple(live.shape)}, {live.device}) does not match "
                f"shadows[{index}] ({tuple(shadow.shape)}, {shadow.device}): it must be a floating-point "
                "tensor of the same shape on the same device."
            )
        devices.add(shadow.device)
    if len(devices) > 1:
        raise ValueError(
            f"shadows must all be on one device, got {sorted(map(str, devices))}; call once per device."
        )
    if generator is not None and devices and generator.device.type != next(iter(devices)).type:
        raise ValueError(
            f"generator is on {generator.device}, the shadows on {next(iter(devices))}: make the generator "
            "on the shadows' device, e.g. torch.Generator(device='cuda')."
        )


# -- What ``ema_kit._shadows.Shadows`` keeps its stochastic shadows' noise with (it owns the generator). ----


def shadow_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    """The torch dtype the shadows are kept in: bfloat16 for ``STOCHASTIC_BF16``, else ``dtype``."""
    return torch.bfloat16 if dtype == STOCHASTIC_BF16 else dtype


def new_generator(device: torch.device) -> torch.Generator:
    """The noise's generator for new stochastic shadows on ``device``, seeded with ``SEED``."""
    return torch.Generator(device).manual_seed(SEED)


def check_noise_state(state, what: str = "The ModelEMA state") -> None:
    """Refuse, before any change, a stochastic EMA's state without its noise's ``{"device", "state"}``."""
    if (
        not isinstance(state, dict)
        or not isinstance(state.get("device"), str)
        or not isinstance(state.get("state"), torch.Tensor)
        or state["state"].dtype != torch.uint8
    ):
        raise ValueError(
            f"{what} has dtype={STOCHASTIC_BF16!r} but no generator state to resume its rounding noise "
            "from; was it saved with state_dict()?"
        )


def reseeded(device: torch.device, state: torch.Tensor) -> torch.Generator:
    """A generator on ``device`` seeded from another's ``state``, which may be of another device type: a CPU
    generator's state cannot seed a CUDA one (nor the reverse), a digest of it can."""
    seed = int.from_bytes(hashlib.sha256(state.cpu().numpy().tobytes()).digest()[:7], "little")
    return torch.Generator(device).manual_seed(seed)
