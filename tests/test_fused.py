"""The fused update path (ema_kit/_fused.py): every layout it chooses gives the per-tensor result."""

import pytest
import torch

from ema_kit import _fused
from ema_kit._fused import CAT_CHUNK, GATHER_BELOW, FusedUpdate, memory_order_view


def test_memory_order_view_covers_dense_layouts_only():
    assert memory_order_view(torch.zeros(2, 3)).shape == (6,)
    channels_last = torch.arange(24.0).view(1, 2, 3, 4).to(memory_format=torch.channels_last)
    flat = memory_order_view(channels_last)
    assert flat.data_ptr() == channels_last.data_ptr()
    assert flat.tolist() == channels_last.permute(0, 2, 3, 1).flatten().tolist()
    assert memory_order_view(torch.zeros(4, 6)[:, ::2]) is None  # strided slice with gaps
    assert memory_order_view(torch.zeros(())).shape == (1,)


def mixed_tensors():
    """Live tensors covering every path: big and small, chunk boundaries, bf16, channels_last, gaps, ints."""
    g = torch.Generator().manual_seed(0)
    sizes = [GATHER_BELOW - 1, GATHER_BELOW, CAT_CHUNK - 5, 7, 1, 0, 3000, 3000, 64, 64, 20_000, 50_000]
    lives = [torch.randn(n, generator=g) for n in sizes]
    lives += [torch.randn(500, generator=g).bfloat16(), torch.randn(40_000, generator=g).half()]
    lives += [torch.randn(8, 4, 3, 3, generator=g).to(memory_format=torch.channels_last)]
    lives += [torch.randn(30, 20, generator=g)[:, ::2]]  # not dense: blended directly
    lives += [torch.tensor(5), torch.arange(6).view(2, 3)]  # integer buffers: copied
    average = [t.is_floating_point() for t in lives]
    average[3] = False  # a float buffer in copy mode
    return lives, average


def placements_for(lives, dtype=None):
    return [
        (
            torch.device("cpu"),
            (dtype or torch.promote_types(t.dtype, torch.float32)) if t.is_floating_point() else t.dtype,
        )
        for t in lives
    ]


@pytest.mark.parametrize("stage_limit", [_fused.STAGE_LIMIT, 4096])
@pytest.mark.parametrize("shadow_dtype", [None, torch.float64])
def test_lerp_matches_per_tensor_float64_on_every_path(monkeypatch, stage_limit, shadow_dtype):
    monkeypatch.setattr(_fused, "STAGE_LIMIT", stage_limit)
    lives, average = mixed_tensors()
    plan = FusedUpdate(lives, average, placements_for(lives, shadow_dtype))
    g = torch.Generator().manual_seed(1)
    start = [
        torch.randn(t.shape, generator=g) if t.is_floating_point() else torch.zeros_like(t) for t in lives
    ]
    for shadow, value in zip(plan.shadows, start):
        shadow.copy_(value)
    expected = [s.double() if s.is_floating_point() else s.clone() for s in start]
    for weight in (0.3, 0.01, 0.5):
        plan.lerp_(weight)
        for i, live in enumerate(lives):
            if average[i]:
                expected[i] = expected[i] + weight * (live.double() - expected[i])
            else:
                expected[i] = live.clone()
    for i, (shadow, want) in enumerate(zip(plan.shadows, expected)):
        dense = memory_order_view(lives[i]) is not None
        assert shadow.stride() == (lives[i].stride() if dense else shadow.contiguous().stride()), i
        assert torch.allclose(shadow.double(), want.double(), atol=1e-6), i


def test_copy_makes_exact_copies_even_over_nan():
    lives, average = mixed_tensors()
    plan = FusedUpdate(lives, average, placements_for(lives))
    for shadow in plan.shadows:
        shadow.fill_(float("nan") if shadow.is_floating_point() else 0)
    plan.copy_()
    for shadow, live in zip(plan.shadows, lives):
        assert torch.equal(shadow, live.to(shadow.dtype))


def test_shadows_of_one_placement_share_one_flat_buffer():
    lives, average = mixed_tensors()
    plan = FusedUpdate(lives, average, placements_for(lives))
    by_dtype = {}
    for shadow in plan.shadows:
        by_dtype.setdefault(shadow.dtype, set()).add(shadow.untyped_storage().data_ptr())
    assert by_dtype.keys() == {torch.float32, torch.int64}
    assert all(len(storages) == 1 for storages in by_dtype.values())


def test_all_finite_sees_nan_and_inf_in_any_tensor():
    lives, average = mixed_tensors()
    plan = FusedUpdate(lives, average, placements_for(lives))
    assert plan.all_finite()
    lives[12][3] = float("inf")  # the bf16 tensor
    assert not plan.all_finite()
    lives[12][3] = 0
    lives[1][0] = float("nan")
    assert not plan.all_finite()


def test_runs_split_at_the_limit():
    lives = [torch.zeros(n) for n in (10, 10, 10, 25, 5)]
    assert _fused._runs([0, 1, 2, 3, 4], lives, 20) == [[0, 1], [2], [3], [4]]
    assert _fused._runs([], lives, 20) == []
