"""ModelEMA, MultiEMA, PostHocEMA and fit on every device present: CPU here, CUDA and MPS where there are.

The CUDA cases carry the ``cuda`` marker (``pytest -m cuda`` runs that tier; ``benchmarks/gpu_check.py``
does it on a GPU machine) and the MPS cases the ``mps`` marker; where the device is missing they are
skipped with the reason "no CUDA device" / "no MPS device", so a CPU-only run says what it did not test.
Only the public API is used. The float64 references live on the CPU, because MPS has no float64.
"""

import math
import warnings

import pytest
import torch
from helpers import small_cnn
from torch import nn

from ema_kit import LiveLog, ModelEMA, MultiEMA, PostHocEMA, evaluate, fit
from ema_kit.posthoc import gamma_from_sigma_rel

HAS_CUDA = torch.cuda.is_available()
HAS_MPS = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
CUDA = [pytest.mark.cuda, pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device")]
MPS = [pytest.mark.mps, pytest.mark.skipif(not HAS_MPS, reason="no MPS device")]
DEVICES = [
    pytest.param("cpu", id="cpu"),
    pytest.param("cuda", id="cuda", marks=CUDA),
    pytest.param("mps", id="mps", marks=MPS),
]
LOW_PRECISION = [pytest.param(torch.bfloat16, id="bf16"), pytest.param(torch.float16, id="fp16")]
KINDS = ("ModelEMA", "MultiEMA", "PostHocEMA")
SIGMA_RELS = (0.05, 0.10)


def device_model(device: str, dtype: torch.dtype = torch.float32, *, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return small_cnn().to(device, dtype)


def train(model: nn.Module, steps: int, after_step, *, seed: int = 0, lr: float = 0.05) -> None:
    """Real SGD steps on random 1x8x8 images, drawn on the CPU (the same on every device), moved to the
    model's device and dtype; ``after_step()`` after each optimizer step. (One channel: the images are
    channels-last as well as contiguous, so they suit a model in either layout.)"""
    generator = torch.Generator().manual_seed(seed)
    weight = next(model.parameters())
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    model.train()
    for _ in range(steps):
        x = torch.randn(16, 1, 8, 8, generator=generator).to(weight.device, weight.dtype)
        y = torch.randint(0, 10, (16,), generator=generator).to(weight.device)
        loss = nn.functional.cross_entropy(model(x).float(), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        after_step()


class Float64Reference:
    """The EMA formula in float64 on the CPU, one tensor at a time: the definition to test against."""

    def __init__(self, model: nn.Module):
        self.state = {key: _cpu64(value) for key, value in model.state_dict().items()}

    def update(self, model: nn.Module, decay: float) -> None:
        for key, value in model.state_dict().items():
            value = _cpu64(value)
            self.state[key] = (
                decay * self.state[key] + (1 - decay) * value if value.is_floating_point() else value
            )


class PowerReference:
    """Float64References of the power-function EMAs a PostHocEMA tracks: decay (1 - 1/t) ** (gamma + 1)."""

    def __init__(self, model: nn.Module, sigma_rels=SIGMA_RELS):
        self.emas = {sigma_rel: Float64Reference(model) for sigma_rel in sigma_rels}
        self.t = 0

    def update(self, model: nn.Module) -> None:
        self.t += 1
        for sigma_rel, reference in self.emas.items():
            reference.update(model, (1 - 1 / self.t) ** (gamma_from_sigma_rel(sigma_rel) + 1))


def _cpu64(tensor: torch.Tensor) -> torch.Tensor:
    tensor = tensor.detach().cpu()
    return tensor.double() if tensor.is_floating_point() else tensor.clone()


def max_error(state: dict, reference: dict) -> float:
    """Largest absolute difference between a state dict (any device, any dtype) and a float64 one."""
    assert state.keys() == reference.keys()
    return max(
        (_cpu64(state[key]).double() - reference[key].double()).abs().max().item() for key in reference
    )


def build(kind: str, model: nn.Module, tmp_path, **options):
    """One averager of each kind, with a schedule that depends on its counters (warmup, power profiles)."""
    if kind == "ModelEMA":
        return ModelEMA(model, decay=0.9, **options)
    if kind == "MultiEMA":
        return MultiEMA(model, decays=(0.9, 0.99), **options)
    # snapshot_every beyond the run: the tests here are about the profiles, not the snapshot files.
    return PostHocEMA(model, sigma_rels=SIGMA_RELS, snapshot_every=1000, folder=tmp_path, **options)


def averaged_modules(averager) -> list[nn.Module]:
    """The EMA model(s) an averager holds, in a fixed order."""
    if isinstance(averager, ModelEMA):
        return [averager.module]
    if isinstance(averager, MultiEMA):
        return [ema.module for ema in averager.emas.values()]
    return list(averager.profiles.values())


def assert_bit_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key


# -- numerics against float64 ------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
def test_model_ema_tracks_the_float64_formula_on_the_device(device):
    model = device_model(device)
    ema, reference = ModelEMA(model, decay=0.9, warmup=False), Float64Reference(model)
    train(model, 20, lambda: (ema.update(model), reference.update(model, 0.9)))
    assert {t.device.type for t in ema.module.state_dict().values()} == {device}
    assert max_error(ema.module.state_dict(), reference.state) < 1e-6
    assert ema.num_updates == 20


@pytest.mark.parametrize("device", DEVICES)
def test_multi_ema_tracks_the_float64_formula_of_each_decay_on_the_device(device):
    model = device_model(device)
    decays = (0.5, 0.9, 0.99)
    multi, references = (
        MultiEMA(model, decays=decays, warmup=False),
        {d: Float64Reference(model) for d in decays},
    )

    def step():
        multi.update(model)
        for decay, reference in references.items():
            reference.update(model, decay)

    train(model, 20, step)
    for decay, ema in multi.emas.items():
        assert max_error(ema.module.state_dict(), references[decay].state) < 1e-6, decay


@pytest.mark.parametrize("device", DEVICES)
def test_posthoc_profiles_track_the_float64_power_ema_and_synthesize_on_the_device(device, tmp_path):
    model = device_model(device)
    posthoc, reference = PostHocEMA(model, snapshot_every=10, folder=tmp_path), PowerReference(model)
    train(model, 30, lambda: (posthoc.update(model), reference.update(model)))
    for sigma_rel, profile in posthoc.profiles.items():
        assert max_error(profile.state_dict(), reference.emas[sigma_rel].state) < 1e-6, sigma_rel
    synthesized = posthoc.synthesize(0.10)  # a tracked length: the profile itself, read back from disk
    model.load_state_dict(synthesized)
    assert max_error(model.state_dict(), reference.emas[0.10].state) < 1e-6


# -- resume, applied_to, copy_to ---------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("device", DEVICES)
def test_resume_from_a_saved_state_dict_continues_bit_exact_on_the_device(device, kind, tmp_path):
    model = device_model(device)
    straight = build(kind, model, tmp_path / "straight")
    train(model, 7, lambda: straight.update(model), seed=1)
    torch.save(straight.state_dict(), tmp_path / "state.pth")

    resumed = build(kind, model, tmp_path / "resumed")
    # A checkpoint is often read onto the CPU first; loading copies it into the shadows on the device.
    resumed.load_state_dict(torch.load(tmp_path / "state.pth", map_location="cpu", weights_only=True))
    # Both continue from the very same live weights, so a GPU's non-deterministic training cannot differ.
    train(model, 7, lambda: (straight.update(model), resumed.update(model)), seed=2)
    for a, b in zip(averaged_modules(straight), averaged_modules(resumed)):
        assert {t.device.type for t in b.state_dict().values()} == {device}
        assert_bit_equal(a.state_dict(), b.state_dict())


@pytest.mark.parametrize("dtype", [pytest.param(torch.float32, id="fp32"), *LOW_PRECISION])
@pytest.mark.parametrize("device", DEVICES)
def test_applied_to_runs_the_ema_weights_then_restores_the_live_ones_bit_exact(device, dtype):
    model = device_model(device, dtype)
    ema = ModelEMA(model, decay=0.9)
    train(model, 5, lambda: ema.update(model), lr=0.01)
    before = {key: value.clone() for key, value in model.state_dict().items()}
    with ema.applied_to(model) as applied:
        assert applied is model
        for key, value in model.state_dict().items():  # the EMA's weights, in the model's own dtype
            assert torch.equal(value, ema.module.state_dict()[key].to(value.dtype)), key
        assert model.eval()(torch.randn(4, 1, 8, 8).to(device, dtype)).isfinite().all()
        inside = {key: value.clone() for key, value in model.state_dict().items()}
    assert_bit_equal(model.state_dict(), before)
    other = device_model(device, dtype, seed=1)
    ema.copy_to(other)
    assert_bit_equal(other.state_dict(), inside)  # copy_to writes for good what applied_to lends


@pytest.mark.parametrize("device", DEVICES)
def test_the_ema_model_scores_as_the_live_model_running_the_ema_weights(device):
    model = device_model(device)
    ema = ModelEMA(model, decay=0.9)
    train(model, 5, lambda: ema.update(model))
    generator = torch.Generator().manual_seed(3)
    loader = [(torch.randn(32, 1, 8, 8, generator=generator), torch.randint(0, 10, (32,))) for _ in range(2)]
    with ema.applied_to(model):
        applied = evaluate(model, loader, amp=False)
    assert evaluate(ema.module, loader, amp=False) == pytest.approx(applied, rel=1e-6)


# -- precision and layout --------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", LOW_PRECISION)
@pytest.mark.parametrize("device", DEVICES)
def test_low_precision_model_keeps_a_float32_shadow_that_tracks_float64(device, dtype):
    model = device_model(device, dtype)
    ema, reference = ModelEMA(model, decay=0.999, warmup=False), Float64Reference(model)
    train(model, 30, lambda: (ema.update(model), reference.update(model, 0.999)), lr=0.01)
    shadows = [t for t in ema.module.state_dict().values() if t.is_floating_point()]
    assert {(t.device.type, t.dtype) for t in shadows} == {(device, torch.float32)}
    # bf16 keeps 8 bits of mantissa: averaging in it would lose the (1 - decay) * step increments entirely.
    assert max_error(ema.module.state_dict(), reference.state) < 1e-5


@pytest.mark.parametrize("device", DEVICES)
def test_channels_last_model_gets_a_channels_last_shadow_that_tracks_float64(device):
    model = device_model(device).to(memory_format=torch.channels_last)
    ema, reference = ModelEMA(model, decay=0.9, warmup=False), Float64Reference(model)
    train(model, 6, lambda: (ema.update(model), reference.update(model, 0.9)))
    assert ema.module[0].weight.is_contiguous(memory_format=torch.channels_last)  # same kernels as the model
    assert max_error(ema.module.state_dict(), reference.state) < 1e-6


@pytest.mark.parametrize("device", DEVICES)
def test_model_turned_channels_last_after_building_the_ema_is_followed(device):
    model = device_model(device)
    ema, reference = ModelEMA(model, decay=0.9, warmup=False), Float64Reference(model)
    model.to(memory_format=torch.channels_last)  # what a training script often does after building
    train(model, 6, lambda: (ema.update(model), reference.update(model, 0.9)))
    assert max_error(ema.module.state_dict(), reference.state) < 1e-6
    before = {key: value.clone() for key, value in model.state_dict().items()}
    with ema.applied_to(model):
        pass
    assert_bit_equal(model.state_dict(), before)


@pytest.mark.parametrize("device", [pytest.param("cuda", id="cuda", marks=CUDA)])
def test_model_compiled_for_the_gpu_is_averaged_like_float64(device):
    # Inductor on CUDA generates Triton kernels (tests/test_compile.py covers the CPU); fullgraph=True
    # makes a graph break an error instead of a silent fall back to eager.
    model = device_model(device)
    compiled = torch.compile(model, fullgraph=True)
    ema, reference = ModelEMA(compiled, decay=0.9, warmup=False), Float64Reference(model)
    train(compiled, 3, lambda: (ema.update(compiled), reference.update(model, 0.9)))
    assert max_error(ema.module.state_dict(), reference.state) < 1e-6
    assert list(ema.state_dict()["weights"]) == list(model.state_dict())  # no "_orig_mod." prefix


# -- a CUDA model with its shadow in CPU memory ------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("device", [pytest.param("cuda", id="cuda", marks=CUDA)])
def test_cuda_model_with_a_cpu_shadow_tracks_float64_and_resumes_bit_exact(device, kind, tmp_path):
    model = device_model(device)
    offloaded = build(kind, model, tmp_path / "a", device="cpu")
    on_gpu = build(kind, model, tmp_path / "b")  # the same averager kept on the GPU, as the yardstick
    train(model, 10, lambda: (offloaded.update(model), on_gpu.update(model)))
    for ours, theirs in zip(averaged_modules(offloaded), averaged_modules(on_gpu)):
        assert {t.device.type for t in ours.state_dict().values()} == {"cpu"}
        # The two devices round lerp alike to within float32's resolution.
        assert max_error(ours.state_dict(), {k: _cpu64(v) for k, v in theirs.state_dict().items()}) < 1e-6

    torch.save(offloaded.state_dict(), tmp_path / "state.pth")
    resumed = build(kind, model, tmp_path / "c", device="cpu")
    resumed.load_state_dict(torch.load(tmp_path / "state.pth", weights_only=True))
    train(model, 5, lambda: (offloaded.update(model), resumed.update(model)), seed=1)
    for a, b in zip(averaged_modules(offloaded), averaged_modules(resumed)):
        assert_bit_equal(a.state_dict(), b.state_dict())


@pytest.mark.parametrize("device", [pytest.param("cuda", id="cuda", marks=CUDA)])
def test_cpu_shadow_of_a_cuda_model_matches_float64_and_applies_to_the_gpu_model(device):
    model = device_model(device)
    ema, reference = ModelEMA(model, decay=0.9, warmup=False, device="cpu"), Float64Reference(model)
    train(model, 10, lambda: (ema.update(model), reference.update(model, 0.9)))
    assert max_error(ema.module.state_dict(), reference.state) < 1e-6
    before = {key: value.clone() for key, value in model.state_dict().items()}
    with ema.applied_to(model):
        assert {t.device.type for t in model.state_dict().values()} == {"cuda"}
        assert max_error(model.state_dict(), reference.state) < 1e-6
    assert_bit_equal(model.state_dict(), before)


# -- fit with mixed precision ------------------------------------------------------------------------


def batches(count: int, *, seed: int = 0) -> list:
    generator = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(16, 1, 8, 8, generator=generator), torch.randint(0, 10, (16,), generator=generator))
        for _ in range(count)
    ]


class StepCounter:
    """A fit callback: how many optimizer steps fit reported (``on_step_end`` runs after each)."""

    def __init__(self):
        self.steps = 0

    def on_step_end(self, state) -> None:
        self.steps += 1


def fit_with(device: str, amp: str, *, loss_fn=None, ema_options: dict | None = None):
    model = device_model(device)
    ema = ModelEMA(model, decay=0.9, **(ema_options or {}))
    counter = StepCounter()
    log = fit(
        model,
        batches(6),
        batches(2, seed=1),
        epochs=1,
        device=device,
        amp=amp,
        ema=ema,
        loss_fn=loss_fn,
        metrics={},
        optimizer=torch.optim.SGD(model.parameters(), lr=0.05),
        callbacks=[counter, LiveLog(progress="off", plot=False)],
    )
    return model, ema, counter, log


def cross_entropy_with(training_call: int, factor: float):
    """Cross entropy, times ``factor`` on its ``training_call``-th call (0-based; fit's sanity pass makes
    call 0, then its first epoch trains before it scores, so the next calls are training batches)."""
    calls = []

    def loss_fn(outputs, targets):
        calls.append(None)
        loss = nn.functional.cross_entropy(outputs, targets)
        return loss * factor if len(calls) - 1 == training_call else loss

    return loss_fn


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
@pytest.mark.parametrize("device", DEVICES)
def test_fit_with_amp_trains_float32_weights_and_a_float32_ema_on_the_device(device, amp):
    model, ema, counter, log = fit_with(device, amp)
    assert {(p.device.type, p.dtype) for p in model.parameters()} == {(device, torch.float32)}
    shadows = [t for t in ema.module.state_dict().values() if t.is_floating_point()]
    assert {(t.device.type, t.dtype) for t in shadows} == {(device, torch.float32)}
    assert counter.steps == ema.num_updates == 6
    assert all(math.isfinite(value) for value in log.iloc[0][["train_loss", "live_loss", "ema_loss"]])


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
@pytest.mark.parametrize("device", DEVICES)
def test_fit_with_amp_skips_a_step_whose_loss_is_inf_and_leaves_it_uncounted(device, amp):
    with pytest.warns(RuntimeWarning, match="skipped a batch"):
        model, ema, counter, log = fit_with(device, amp, loss_fn=cross_entropy_with(2, math.inf))
    assert counter.steps == ema.num_updates == 5
    assert all(t.isfinite().all() for t in ema.module.state_dict().values() if t.is_floating_point())
    assert math.isfinite(log.at[0, "ema_loss"])


@pytest.mark.parametrize("device", DEVICES)
def test_fit_with_fp16_amp_lets_the_grad_scaler_skip_an_overflowing_step(device):
    # A finite loss so large that its scaled gradients overflow float16: the grad scaler drops that step
    # (and halves its scale); without a scaler the optimizer would write Inf/NaN into the weights.
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # not fit's non-finite-loss skip: the scaler's
        model, ema, counter, log = fit_with(device, "fp16", loss_fn=cross_entropy_with(2, 1e30))
    assert counter.steps == ema.num_updates == 5
    assert all(p.isfinite().all() for p in model.parameters())
    assert all(t.isfinite().all() for t in ema.module.state_dict().values() if t.is_floating_point())


@pytest.mark.parametrize("device", [pytest.param("cuda", id="cuda", marks=CUDA)])
def test_fit_on_the_gpu_with_a_cpu_shadow_updates_it_every_step(device):
    model, ema, counter, log = fit_with(device, "bf16", ema_options={"device": "cpu"})
    assert {t.device.type for t in ema.module.state_dict().values()} == {"cpu"}
    assert {p.device.type for p in model.parameters()} == {"cuda"}
    assert counter.steps == ema.num_updates == 6
    assert math.isfinite(log.at[0, "ema_loss"])
