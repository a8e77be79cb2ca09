"""bfloat16 shadows with stochastic rounding, against a float64 EMA and a naive bfloat16 one."""

import pytest
import torch

from ema_kit import _lowp
from ema_kit._lowp import lerp_stochastic_

DECAY = 0.999


def drifting_run(elements: int = 4096, steps: int = 2000, seed: int = 0) -> dict[str, torch.Tensor]:
    """Every shadow kind following a target that drifts slowly away from its start, and the float64 EMA."""
    generator = torch.Generator().manual_seed(seed)
    start = torch.randn(elements, dtype=torch.float64, generator=generator).bfloat16().double()
    drift = torch.randn(elements, dtype=torch.float64, generator=generator) * 1e-3  # per step
    exact, naive, stochastic = start.clone(), start.bfloat16(), start.bfloat16()
    noise = torch.Generator().manual_seed(seed)
    for step in range(1, steps + 1):
        live = start + drift * step
        exact.lerp_(live, 1 - DECAY)
        naive.lerp_(live.bfloat16(), 1 - DECAY)
        lerp_stochastic_([stochastic], [live.float()], 1 - DECAY, noise)
    return {"start": start, "exact": exact, "naive": naive.double(), "stochastic": stochastic.double()}


def rms(tensor: torch.Tensor) -> float:
    return tensor.square().mean().sqrt().item()


def test_stochastic_bf16_shadow_tracks_the_float64_ema_where_a_naive_bf16_one_stalls():
    run = drifting_run()
    moved = rms(run["exact"] - run["start"])  # ~1.1: the EMA travels about one unit in 2,000 steps
    stochastic_error = rms(run["stochastic"] - run["exact"])
    naive_error = rms(run["naive"] - run["exact"])
    # Stated tolerance: the stochastic shadow's RMS error stays under 5% of the distance the EMA moved
    # (measured 3.8%: a zero-mean jitter of a few bfloat16 steps); the naive one misses most of the way.
    assert stochastic_error < 0.05 * moved
    assert naive_error > 0.5 * moved
    assert rms(run["naive"] - run["start"]) < 0.5 * moved  # most naive elements never left the start


def test_stochastic_bf16_shadow_has_no_bias_against_the_float64_ema():
    run = drifting_run()
    assert abs((run["stochastic"] - run["exact"]).mean().item()) < 0.002


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_rounding_picks_the_two_neighbours_with_the_right_odds_for_either_sign(sign):
    shadow = torch.full((100_000,), sign, dtype=torch.bfloat16)
    live = torch.full((100_000,), sign * 1.5)
    lerp_stochastic_([shadow], [live], 0.25, torch.Generator().manual_seed(0))
    exact = sign * 1.125  # representable in bfloat16, so no rounding happens at all
    assert torch.equal(shadow, torch.full_like(shadow, exact))
    shadow = torch.full((100_000,), sign, dtype=torch.bfloat16)
    lerp_stochastic_([shadow], [live], 0.001, torch.Generator().manual_seed(0))
    below, above = sign * 1.0, sign * (1.0 + 2**-7)  # bfloat16's neighbours of 1.0005
    assert set(shadow.double().unique().tolist()) == {below, above}
    assert shadow.double().mean().item() == pytest.approx(sign * 1.0005, abs=2e-5)


def test_same_seed_gives_the_same_shadow_and_another_seed_another():
    first, again = drifting_run(steps=50, seed=0), drifting_run(steps=50, seed=0)
    other = drifting_run(steps=50, seed=1)
    assert torch.equal(first["stochastic"], again["stochastic"])
    assert not torch.equal(first["stochastic"] - first["exact"], other["stochastic"] - other["exact"])


def test_weight_zero_leaves_the_shadow_bit_exact_and_weight_one_copies_bf16_values(monkeypatch):
    monkeypatch.setattr(_lowp, "CHUNK", 7)  # many groups and a tensor split across them
    generator = torch.Generator().manual_seed(0)
    shadows = [torch.randn(shape, generator=generator).bfloat16() for shape in [(3, 5), (2,), (40,), (1, 1)]]
    lives = [torch.randn(s.shape, generator=generator).bfloat16().float() for s in shadows]
    kept = [s.clone() for s in shadows]
    lerp_stochastic_(shadows, lives, 0.0, generator)
    assert all(torch.equal(s, k) for s, k in zip(shadows, kept))
    lerp_stochastic_(shadows, lives, 1.0, generator)
    assert all(torch.equal(s, live.bfloat16()) for s, live in zip(shadows, lives))


def test_a_float32_or_float16_shadow_is_refused_with_the_fix():
    for dtype in (torch.float32, torch.float16):
        with pytest.raises(ValueError, match=r"shadows\[0\] is torch.float.*bfloat16"):
            lerp_stochastic_([torch.zeros(2, dtype=dtype)], [torch.zeros(2)], 0.1)


def test_a_weight_outside_zero_one_is_refused():
    with pytest.raises(ValueError, match=r"weight must be a number in \[0, 1\].*1.5"):
        lerp_stochastic_([torch.zeros(2, dtype=torch.bfloat16)], [torch.zeros(2)], 1.5)


def test_a_live_tensor_of_another_shape_is_refused_before_any_change():
    shadows = [torch.zeros(2, dtype=torch.bfloat16), torch.zeros(3, dtype=torch.bfloat16)]
    with pytest.raises(ValueError, match=r"lives\[1\].*does not match shadows\[1\]"):
        lerp_stochastic_(shadows, [torch.ones(2), torch.ones(4)], 1.0)
    assert all(not s.any() for s in shadows)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16])
def test_lives_of_another_dtype_blend_as_their_float32_values(dtype):
    generator = torch.Generator().manual_seed(0)
    lives = [torch.randn(5, 3, generator=generator).to(dtype), torch.randn(7, generator=generator).to(dtype)]
    shadows = [torch.zeros(5, 3, dtype=torch.bfloat16), torch.ones(7, dtype=torch.bfloat16)]
    expected = [s.clone() for s in shadows]
    lerp_stochastic_(shadows, lives, 0.3, torch.Generator().manual_seed(1))
    lerp_stochastic_(expected, [live.float() for live in lives], 0.3, torch.Generator().manual_seed(1))
    assert all(torch.equal(s, e) for s, e in zip(shadows, expected))


def test_noise_saved_on_another_device_is_reseeded_there_from_its_state_the_same_way_each_time():
    from torch import nn

    from ema_kit._shadows import Shadows

    shadows = Shadows(nn.Linear(64, 64), 1, average_buffers=True, dtype=_lowp.STOCHASTIC_BF16, device=None)
    saved = shadows.noise_state()
    draws = []
    for _ in range(2):  # as if saved on a GPU and resumed on this CPU
        shadows.load_noise_state({"device": "cuda:0", "state": saved["state"]})
        draws.append(torch.randint(0, 1 << 16, (8,), generator=shadows.generator))
    shadows.load_noise_state(saved)  # on its own device: the saved stream itself
    same_device = torch.randint(0, 1 << 16, (8,), generator=shadows.generator)
    assert torch.equal(draws[0], draws[1]) and not torch.equal(draws[0], same_device)
