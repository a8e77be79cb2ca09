"""Post-hoc EMA (ema_kit/posthoc.py): power profiles, snapshots, synthesis, resume, scan, plot, errors."""

import copy
import shutil
import warnings
from types import SimpleNamespace

import matplotlib.figure
import pandas as pd
import pytest
import torch
from helpers import ReferenceEMA, max_error, small_cnn, train_steps
from torch import nn

from ema_kit import PostHocEMA, fit, plot_scan, scan
from ema_kit.files import load_weights
from ema_kit.posthoc import (
    MAX_RESIDUAL,
    SIGMA_REL_MAX,
    gamma_from_sigma_rel,
    half_life_from_sigma_rel,
    sigma_rel_from_gamma,
    sigma_rel_from_half_life,
)

STEPS, EVERY = 200, 8  # 25 snapshots written, thinned to 13 (the default max_snapshots is 16)
TRACKED = (0.05, 0.10)
UNTRACKED = (0.03, 0.07, 0.15, 0.2)  # lengths synthesized and checked against a directly tracked EMA


class PowerReference:
    """Power-function EMAs tracked directly in float64 (ReferenceEMA with beta_t = (1 - 1/t)**(gamma+1))."""

    def __init__(self, model, sigma_rels):
        self.emas = {s: ReferenceEMA(model) for s in sigma_rels}
        self.t = 0

    def update(self, model):
        self.t += 1
        for sigma_rel, reference in self.emas.items():
            reference.update(model, (1 - 1 / self.t) ** (gamma_from_sigma_rel(sigma_rel) + 1))


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A real training run of the small CNN with a PostHocEMA and the float64 power EMAs beside it."""
    torch.manual_seed(0)
    model = small_cnn()
    posthoc = PostHocEMA(
        model, sigma_rels=TRACKED, snapshot_every=EVERY, folder=tmp_path_factory.mktemp("ph")
    )
    reference = PowerReference(model, TRACKED + UNTRACKED)
    at_160 = {}

    def step():
        posthoc.update(model)
        reference.update(model)
        if reference.t == 160:
            at_160.update(copy.deepcopy(reference.emas[0.07].state))

    train_steps(model, STEPS, step)
    spread = max_error(reference.emas[0.05].state, reference.emas[0.10].state)
    return SimpleNamespace(
        model=model, posthoc=posthoc, reference=reference.emas, spread=spread, at_160=at_160
    )


def trained_tracker(folder, steps=40, **options) -> tuple[nn.Module, PostHocEMA]:
    torch.manual_seed(0)
    model = small_cnn()
    posthoc = PostHocEMA(model, **({"snapshot_every": 5, "folder": folder} | options))
    train_steps(model, steps, lambda: posthoc.update(model))
    return model, posthoc


# -- power-function profiles --------------------------------------------------------------------------


def test_gamma_matches_the_paper_and_inverts():
    assert gamma_from_sigma_rel(0.05) == pytest.approx(16.97, abs=0.005)  # Karras et al. 2024, sec. 3
    assert gamma_from_sigma_rel(0.10) == pytest.approx(6.94, abs=0.005)
    for sigma_rel in (0.01, 0.05, 0.1, 0.2, 0.28):
        assert sigma_rel_from_gamma(gamma_from_sigma_rel(sigma_rel)) == pytest.approx(sigma_rel, rel=1e-9)


def test_half_life_is_the_age_at_which_a_steps_weight_halves():
    for sigma_rel, step in ((0.05, 1000), (0.1, 10_000), (0.2, 500)):
        gamma, half = gamma_from_sigma_rel(sigma_rel), half_life_from_sigma_rel(sigma_rel, step)
        assert ((step - half) / step) ** gamma == pytest.approx(0.5)  # density at age h / density now
        assert sigma_rel_from_half_life(half, step) == pytest.approx(sigma_rel)


def test_tracked_profiles_match_the_float64_power_ema(run):
    for sigma_rel, profile in run.posthoc.profiles.items():
        assert max_error(profile.state_dict(), run.reference[sigma_rel].state) < 1e-6


# -- synthesis ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("sigma_rel", UNTRACKED)
def test_synthesized_length_matches_a_directly_tracked_power_ema(run, sigma_rel):
    # Tolerance: 5% of the distance between the two tracked EMAs, and 20x closer than the nearer tracked
    # EMA (what one would use without post-hoc synthesis). Measured on 2026-11-26: at most 1.7% (sigma_rel
    # 0.2, fit residual 0.035), and 33x to 343x closer.
    error = max_error(run.posthoc.synthesize(sigma_rel), run.reference[sigma_rel].state)
    nearest = min(max_error(run.reference[s].state, run.reference[sigma_rel].state) for s in TRACKED)
    assert error < 0.05 * run.spread
    assert error < nearest / 20


def test_synthesizing_a_tracked_length_gives_that_profile(run):
    synthesized = run.posthoc.synthesize(0.10)
    assert max_error(synthesized, run.posthoc.profiles[0.10].state_dict()) < 1e-6


def test_half_life_gives_the_same_ema_as_its_sigma_rel(run):
    half = half_life_from_sigma_rel(0.07, STEPS)
    assert max_error(run.posthoc.synthesize(half_life=half), run.posthoc.synthesize(0.07)) < 1e-6


def test_at_step_synthesizes_the_ema_of_an_earlier_step(run):
    error = max_error(run.posthoc.synthesize(0.07, at_step=160), run.at_160)
    assert error < 0.05 * run.spread


def test_synthesized_state_loads_into_the_model_with_the_latest_integer_buffers(run):
    state = run.posthoc.synthesize(0.07)
    fresh = small_cnn()
    fresh.load_state_dict(state)  # strict
    assert state["1.num_batches_tracked"].item() == STEPS
    assert {v.dtype for v in state.values() if v.is_floating_point()} == {torch.float32}


def test_snapshot_files_are_plain_cpu_state_dicts_with_their_metadata(run):
    path = run.posthoc.folder / "snapshot-000000160.pth"
    snapshot = load_weights(path)  # weights_only
    assert snapshot["step"] == 160 and snapshot["sigma_rels"] == list(TRACKED)
    assert snapshot["gammas"] == pytest.approx([gamma_from_sigma_rel(s) for s in TRACKED])
    assert [list(profile) for profile in snapshot["profiles"]] == [list(run.model.state_dict())] * 2
    assert {t.device.type for profile in snapshot["profiles"] for t in profile.values()} == {"cpu"}


def test_reconstructable_range_brackets_the_tracked_lengths(run):
    low, high = run.posthoc.reconstructable_range()
    assert low < 0.03 and 0.2 < high < SIGMA_REL_MAX
    run.posthoc.synthesize(low * 1.01)
    with pytest.raises(ValueError, match="outside what the snapshots can reconstruct"):
        run.posthoc.synthesize(high * 1.1)


# -- snapshots on disk --------------------------------------------------------------------------------


def test_snapshots_are_thinned_to_max_snapshots_and_stay_spread_over_the_run(tmp_path):
    model = nn.Linear(3, 2)
    posthoc = PostHocEMA(model, snapshot_every=1, max_snapshots=6, folder=tmp_path)
    for _ in range(50):
        posthoc.update(model)
        assert len(posthoc.snapshots) <= 6
        assert sorted(p.name for p in tmp_path.glob("*.pth")) == [
            f"snapshot-{s:09d}.pth" for s in posthoc.snapshots
        ]
    # At step 49, [8, 16, 24, 32, 40, 48] were all on the grid of 8: it doubled to 16, keeping 16, 32, 48
    # and the newest (49); 50 came after. The early run stays covered, the end densest.
    assert posthoc.snapshots == [16, 32, 48, 49, 50]


def test_under_ddp_only_rank_0_writes_snapshots(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_rank", lambda: 1)
    model = nn.Linear(3, 2)
    posthoc = PostHocEMA(model, snapshot_every=2, folder=tmp_path)
    for _ in range(6):
        posthoc.update(model)
    assert posthoc.snapshots == [2, 4, 6] and list(tmp_path.iterdir()) == []


def test_disk_bytes_and_repr_report_the_snapshots(tmp_path):
    _, posthoc = trained_tracker(tmp_path, steps=20)
    sizes = sum(path.stat().st_size for path in tmp_path.glob("snapshot-*.pth"))
    assert posthoc.disk_bytes == sizes > 0
    assert repr(posthoc).startswith(
        "PostHocEMA(sigma_rels=(0.05, 0.1), num_steps=20, 4 snapshots (steps 5..20), "
    )
    assert str(tmp_path) in repr(posthoc) and " KB in " in repr(posthoc)


# -- resume and reloading ---------------------------------------------------------------------------------


def test_resume_from_state_dict_is_bit_identical(tmp_path):
    model, posthoc = trained_tracker(tmp_path / "a", steps=23)
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    torch.save(posthoc.state_dict(), tmp_path / "state.pth")
    resumed_model = copy.deepcopy(model)
    resumed = PostHocEMA(small_cnn(), snapshot_every=1, folder=tmp_path / "b")  # settings come from the state
    resumed.load_state_dict(torch.load(tmp_path / "state.pth", weights_only=True))
    train_steps(model, 20, lambda: posthoc.update(model), seed=1)
    train_steps(resumed_model, 20, lambda: resumed.update(resumed_model), seed=1)
    assert resumed.snapshots == posthoc.snapshots and resumed.num_steps == 43
    for a, b in zip(posthoc.profiles.values(), resumed.profiles.values()):
        assert max_error(a.state_dict(), b.state_dict()) == 0.0
    assert max_error(resumed.synthesize(0.07), posthoc.synthesize(0.07)) == 0.0


def test_numpy_arguments_are_numbers(tmp_path):
    import numpy as np

    posthoc = PostHocEMA(nn.Linear(2, 2), sigma_rels=(np.float32(0.05), 0.1), snapshot_every=np.int64(4))
    assert posthoc.snapshot_every == 4 and type(posthoc.sigma_rels[0]) is float


def test_profiles_is_a_read_only_mapping_like_multi_ema_emas(tmp_path):
    _, posthoc = trained_tracker(tmp_path, steps=4)
    assert list(posthoc.profiles) == [0.05, 0.10]
    with pytest.raises(TypeError):
        posthoc.profiles[0.2] = nn.Linear(2, 2)


def test_load_state_drops_snapshots_gone_from_the_folder_with_a_warning(tmp_path):
    _, posthoc = trained_tracker(tmp_path, steps=20)
    state = copy.deepcopy(posthoc.state_dict())
    (tmp_path / "snapshot-000000010.pth").unlink()
    resumed = PostHocEMA(small_cnn(), snapshot_every=5, folder=tmp_path)
    with pytest.warns(RuntimeWarning, match=r"1 of the 4 snapshots .*steps \[10\]"):
        resumed.load_state_dict(state)
    assert resumed.snapshots == [5, 15, 20]


def test_from_folder_rebuilds_the_tracker_in_a_new_session(tmp_path):
    _, posthoc = trained_tracker(tmp_path, steps=30)
    rebuilt = PostHocEMA.from_folder(tmp_path, small_cnn())
    assert (rebuilt.num_steps, rebuilt.snapshots, rebuilt.sigma_rels) == (
        30,
        posthoc.snapshots,
        posthoc.sigma_rels,
    )
    assert max_error(rebuilt.synthesize(0.07), posthoc.synthesize(0.07)) == 0.0
    for a, b in zip(posthoc.profiles.values(), rebuilt.profiles.values()):
        assert max_error(a.state_dict(), b.state_dict()) == 0.0


def test_a_kill_between_writing_a_snapshot_and_thinning_leaves_from_folder_its_max_snapshots(
    tmp_path, monkeypatch
):
    model = nn.Linear(3, 2)
    posthoc = PostHocEMA(model, snapshot_every=1, max_snapshots=6, folder=tmp_path)
    for _ in range(6):
        posthoc.update(model)
    straight = copy.deepcopy(posthoc)
    straight.folder = tmp_path / "straight"
    shutil.copytree(tmp_path, straight.folder)
    straight.update(model)  # step 7 thins to [2, 4, 6, 7]

    def killed(*_, **__):
        raise KeyboardInterrupt  # the process dies before thinning deletes a file

    with monkeypatch.context() as patch:
        patch.setattr("pathlib.Path.unlink", killed)
        with pytest.raises(KeyboardInterrupt):
            posthoc.update(model)
    assert len(list(tmp_path.glob("snapshot-*.pth"))) == 7
    rebuilt = PostHocEMA.from_folder(tmp_path, nn.Linear(3, 2))
    assert rebuilt.max_snapshots == 6 and rebuilt.snapshots == straight.snapshots == [2, 4, 6, 7]
    for _ in range(2):
        rebuilt.update(model)  # the next snapshot finishes the thinning
    assert sorted(p.name for p in tmp_path.glob("snapshot-*.pth")) == [
        f"snapshot-{s:09d}.pth" for s in rebuilt.snapshots
    ]


def test_a_checkpointed_state_resumes_exactly_after_later_thinning_and_a_kill(tmp_path):
    model, posthoc = trained_tracker(tmp_path, steps=20, max_snapshots=4)
    checkpoint = copy.deepcopy(posthoc.state_dict())  # as fit's checkpoint holds it
    resumed_model = copy.deepcopy(model)
    train_steps(model, 20, lambda: posthoc.update(model), seed=1)  # thins snapshots the checkpoint lists
    # Killed here; a new session resumes from the checkpoint in the same folder.
    resumed = PostHocEMA(small_cnn(), snapshot_every=5, folder=tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        resumed.load_state_dict(checkpoint)
    resumed.on_fit_start(SimpleNamespace(out_dir=None))
    assert resumed.snapshots == [5, 10, 15, 20]
    train_steps(resumed_model, 20, lambda: resumed.update(resumed_model), seed=1)
    assert resumed.snapshots == posthoc.snapshots
    assert max_error(resumed.synthesize(0.07), posthoc.synthesize(0.07)) == 0.0
    listed = posthoc.state_dict()["snapshots"]  # the next checkpoint: the first one's files are free to go
    train_steps(model, 10, lambda: posthoc.update(model), seed=2)
    assert sorted(p.name for p in tmp_path.glob("snapshot-*.pth")) == [
        f"snapshot-{s:09d}.pth" for s in sorted(set(posthoc.snapshots) | set(listed))
    ]
    assert len(posthoc.snapshots) == 4 and not (tmp_path / "snapshot-000000005.pth").exists()


def test_with_buffers_copy_synthesis_takes_the_latest_snapshots_buffers(tmp_path):
    model, posthoc = trained_tracker(tmp_path, steps=40, buffers="copy")
    synthesized = posthoc.synthesize(0.07)
    for key, value in model.state_dict().items():  # step 40 is the latest snapshot: the model's own buffers
        if "running" in key:
            assert torch.equal(synthesized[key], value), key
    weights = [key for key in synthesized if key.endswith("weight")]
    assert not torch.equal(synthesized[weights[0]], model.state_dict()[weights[0]])  # weights still averaged


# -- as a fit callback ----------------------------------------------------------------------------------


def test_fit_callbacks_put_snapshots_in_out_dir_and_snapshot_the_last_step(tmp_path):
    torch.manual_seed(0)
    model = small_cnn()
    posthoc = PostHocEMA(model, snapshot_every=10)
    state = SimpleNamespace(model=model, step=0, epoch=0, epochs=1, out_dir=tmp_path, history=pd.DataFrame())
    posthoc.on_fit_start(state)
    assert posthoc.folder == tmp_path / "posthoc"

    def step():
        state.step += 1
        posthoc.on_step_end(state)

    train_steps(model, 25, step)
    posthoc.on_fit_end(state)
    assert posthoc.snapshots == [10, 20, 25]
    assert max_error(posthoc.synthesize(0.10), posthoc.profiles[0.10].state_dict()) < 1e-6


def test_works_as_a_callback_of_the_real_fit(tmp_path):
    torch.manual_seed(0)
    x, y = torch.randn(96, 1, 8, 8), torch.randint(0, 10, (96,))
    train = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16)
    val = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x[:32], y[:32]), batch_size=32)
    model = small_cnn()
    posthoc = PostHocEMA(model, snapshot_every=4)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    fit(model, train, val, epochs=2, optimizer=optimizer, out_dir=tmp_path, callbacks=[posthoc], device="cpu")
    assert posthoc.folder == tmp_path / "posthoc" and posthoc.num_steps == 12
    assert posthoc.snapshots == [4, 8, 12]
    model.load_state_dict(posthoc.synthesize(0.07))


def test_fit_without_out_dir_or_folder_is_a_clear_error_before_training():
    posthoc = PostHocEMA(nn.Linear(2, 2), snapshot_every=10)
    with pytest.raises(ValueError, match="needs a folder.*out_dir"):
        posthoc.on_fit_start(SimpleNamespace(out_dir=None))
    with pytest.raises(ValueError, match="needs a folder"):
        posthoc.update(nn.Linear(2, 2))
    assert posthoc.num_steps == 0


# -- bad input -------------------------------------------------------------------------------------------


def test_a_length_outside_what_the_snapshots_reconstruct_is_a_clear_error(run):
    with pytest.raises(
        ValueError, match=r"sigma_rel=0\.01 .*outside.*off its profile.*reconstruct sigma_rel 0\.0"
    ):
        run.posthoc.synthesize(0.01)
    with pytest.raises(ValueError, match="outside"):
        run.posthoc.synthesize(0.1, at_step=STEPS - 1)  # 7 steps past the snapshot at 192: unknown
    run.posthoc.synthesize(0.01, max_residual=0.5)  # a rougher fit, when asked for


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"sigma_rel": 0.0}, "sigma_rel must be a number between 0 and 0.2887"),
        ({"sigma_rel": 0.3}, "sigma_rel must be a number between 0 and 0.2887"),
        ({}, "either as sigma_rel.*or as half_life"),
        ({"sigma_rel": 0.1, "half_life": 10}, "not both"),
        ({"half_life": STEPS}, "half_life must be a number of steps between 0 and"),
        ({"sigma_rel": 0.1, "at_step": STEPS + 1}, r"at_step must be a step between .*\(16 and 200\)"),
        ({"sigma_rel": 0.1, "at_step": 5}, "at_step must be"),
    ],
)
def test_bad_synthesis_arguments_are_clear_errors(run, kwargs, message):
    with pytest.raises(ValueError, match=message):
        run.posthoc.synthesize(**kwargs)


def test_a_synthesis_length_of_another_type_is_a_type_error(run):
    with pytest.raises(TypeError, match="sigma_rel must be a number, got '0.1'"):
        run.posthoc.synthesize("0.1")


def test_synthesis_without_snapshots_is_a_clear_error(tmp_path):
    _, posthoc = trained_tracker(tmp_path, steps=3)
    with pytest.raises(ValueError, match=r"no snapshots yet \(step 3; the first is written at step 5"):
        posthoc.synthesize(0.07)


def test_missing_snapshot_files_are_a_clear_error(tmp_path):
    _, posthoc = trained_tracker(tmp_path, steps=20)
    (tmp_path / "snapshot-000000010.pth").unlink()
    with pytest.raises(
        ValueError, match=r"1 snapshot files are missing: .*snapshot-000000010\.pth.*from_folder"
    ):
        posthoc.synthesize(0.07)


def test_a_snapshot_of_another_model_is_a_clear_error(tmp_path):
    _, posthoc = trained_tracker(tmp_path / "mine", steps=20)
    torch.manual_seed(0)
    other = small_cnn(num_classes=12)
    foreign = PostHocEMA(other, snapshot_every=5, folder=tmp_path / "other")
    train_steps(other, 5, lambda: foreign.update(other))
    shutil.copy(tmp_path / "other" / "snapshot-000000005.pth", tmp_path / "mine" / "snapshot-000000005.pth")
    with pytest.raises(ValueError, match=r"snapshot-000000005\.pth is for a different model .*9\.weight"):
        posthoc.synthesize(0.07)
    with pytest.raises(ValueError, match="different model"):
        PostHocEMA.from_folder(tmp_path / "mine", small_cnn(num_classes=5))


def test_a_fresh_tracker_refuses_a_folder_with_another_runs_snapshots(tmp_path):
    trained_tracker(tmp_path, steps=10)
    model = small_cnn()
    posthoc = PostHocEMA(model, snapshot_every=5, folder=tmp_path)
    with pytest.raises(
        ValueError, match=r"already holds 2 post-hoc EMA snapshots of another run.*new folder"
    ):
        posthoc.update(model)
    assert posthoc.num_steps == 0 and len(list(tmp_path.glob("*.pth"))) == 2


def test_load_state_of_another_model_or_lengths_is_a_clear_error_and_changes_nothing(tmp_path):
    _, posthoc = trained_tracker(tmp_path, steps=10)
    state = posthoc.state_dict()
    other = PostHocEMA(small_cnn(num_classes=5), snapshot_every=5, folder=tmp_path / "other")
    with pytest.raises(ValueError, match="different model"):
        other.load_state_dict(state)
    assert other.num_steps == 0 and other.snapshots == []
    with pytest.raises(ValueError, match=r"sigma_rels=\(0\.05, 0\.1\)"):
        PostHocEMA(small_cnn(), sigma_rels=(0.05, 0.2), snapshot_every=5).load_state_dict(state)
    with pytest.raises(ValueError, match="Not a PostHocEMA state"):
        other.load_state_dict({"weights": {}})


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"sigma_rels": (0.05, 0.05)}, ValueError, "repeats"),
        ({"sigma_rels": 0.05}, TypeError, "sequence of relative lengths"),
        ({"sigma_rels": (0.05, 0.5)}, ValueError, r"sigma_rels\[1\] must be a number between 0 and"),
        ({"snapshot_every": 0}, ValueError, "snapshot_every must be an int >= 1"),
        ({"max_snapshots": 1}, ValueError, "max_snapshots must be an int >= 2"),
        ({"snapshot_every": 2.5}, TypeError, "snapshot_every must be an int"),
        ({"sigma_rels": (0.05, "0.1")}, TypeError, r"sigma_rels\[1\] must be a number"),
        ({"buffers": "mean"}, ValueError, "buffers must be one of"),
    ],
)
def test_bad_tracker_arguments_are_clear_errors(kwargs, error, message):
    with pytest.raises(error, match=message):
        PostHocEMA(nn.Linear(2, 2), **({"snapshot_every": 10} | kwargs))


# -- scan and its plot ---------------------------------------------------------------------------------------


def weight_norm(model: nn.Module) -> dict:
    """A cheap, exact score: depends on nothing but the weights loaded into the model."""
    return {"norm": model[9].weight.double().norm().item(), "bias0": model[9].bias[0].item()}


def test_scan_scores_each_synthesized_length_and_restores_the_model(run):
    before = copy.deepcopy(run.model.state_dict())
    run.model.train()
    table = scan(run.posthoc, run.model, weight_norm, sigma_rels=[0.04, 0.07, 0.12])
    assert list(table.columns) == ["sigma_rel", "half_life", "norm", "bias0"]
    assert table["sigma_rel"].tolist() == [0.04, 0.07, 0.12]
    assert table["half_life"].tolist() == pytest.approx(
        [half_life_from_sigma_rel(s, STEPS) for s in (0.04, 0.07, 0.12)]
    )
    fresh = small_cnn()
    fresh.load_state_dict(run.posthoc.synthesize(0.07))
    assert table["norm"][1] == weight_norm(fresh)["norm"]
    assert max_error(run.model.state_dict(), before) == 0.0 and run.model.training


def test_scan_defaults_to_lengths_across_the_reconstructable_range(run):
    table = scan(run.posthoc, run.model, weight_norm)
    low, high = run.posthoc.reconstructable_range()
    assert len(table) == 9 and table["sigma_rel"].iloc[0] == pytest.approx(low)
    assert table["sigma_rel"].iloc[-1] == pytest.approx(high)


def test_scan_reads_a_folder_too(run):
    table = scan(run.posthoc.folder, small_cnn(), weight_norm, sigma_rels=[0.07])
    assert (
        table["norm"].tolist()
        == scan(run.posthoc, run.model, weight_norm, sigma_rels=[0.07])["norm"].tolist()
    )


def test_scan_checks_every_length_and_the_model_before_scoring(run):
    calls = []
    with pytest.raises(ValueError, match=r"sigma_rel=0\.01 .*outside"):
        scan(run.posthoc, run.model, lambda m: calls.append(1) or {"x": 1.0}, sigma_rels=[0.07, 0.01])
    with pytest.raises(ValueError, match="The model given to scan is for a different model"):
        scan(run.posthoc, small_cnn(num_classes=5), lambda m: calls.append(1) or {"x": 1.0})
    assert calls == []


def test_scan_with_a_bad_score_is_a_clear_error_and_restores_the_model(run):
    before = copy.deepcopy(run.model.state_dict())
    with pytest.raises(TypeError, match="score must return a dict of metric name -> number"):
        scan(run.posthoc, run.model, lambda m: 0.5, sigma_rels=[0.07])
    assert max_error(run.model.state_dict(), before) == 0.0


@pytest.mark.parametrize(("mode", "best"), [("min", 0.07), ("max", 0.2)])
def test_plot_scan_marks_the_chosen_length(mode, best):
    table = pd.DataFrame(
        {"sigma_rel": [0.03, 0.07, 0.2], "half_life": [30.0, 70.0, 200.0], "loss": [0.5, 0.4, 0.6]}
    )
    table["score"] = [0.1, 0.2, 0.3] if mode == "max" else table["loss"]
    figure = plot_scan(table, "score", mode=mode)
    assert isinstance(figure, matplotlib.figure.Figure)
    axes = figure.axes[0]
    chosen = [line for line in axes.lines if line.get_label().startswith("chosen")]
    assert len(chosen) == 1 and chosen[0].get_xdata()[0] == best
    assert f"sigma_rel {best:.3g}" in chosen[0].get_label()
    assert axes.get_xscale() == "log"


def test_plot_scan_rejects_a_bad_metric_or_mode():
    table = pd.DataFrame({"sigma_rel": [0.05], "half_life": [50.0], "loss": [0.5]})
    with pytest.raises(ValueError, match=r"metric must be one of the scanned metrics \['loss'\]"):
        plot_scan(table, "accuracy")
    with pytest.raises(ValueError, match="mode must be 'min'"):
        plot_scan(table, "loss", mode="best")
    with pytest.raises(ValueError, match="the DataFrame that scan"):
        plot_scan(pd.DataFrame({"loss": [1.0]}), "loss")


def test_by_default_synthesis_refuses_a_length_whose_profile_fit_is_off_by_more_than_max_residual(tmp_path):
    _, posthoc = trained_tracker(tmp_path)
    low, high = posthoc.reconstructable_range()
    assert (low, high) == posthoc.reconstructable_range(max_residual=MAX_RESIDUAL)
    posthoc.synthesize(low)  # the shortest length fit within MAX_RESIDUAL
    with pytest.raises(ValueError, match=rf"% off its profile \(max_residual={MAX_RESIDUAL}\)"):
        posthoc.synthesize(low / 1.02)
    posthoc.synthesize(low / 1.02, max_residual=2 * MAX_RESIDUAL)  # a rougher fit, when asked for


def test_the_longest_length_is_the_plain_average_of_every_step():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert sigma_rel_from_gamma(0.0) == pytest.approx(SIGMA_REL_MAX, rel=1e-12)  # gamma 0: equal weights
        assert gamma_from_sigma_rel(SIGMA_REL_MAX * (1 - 1e-9)) == pytest.approx(0.0, abs=1e-6)


class ComplexWithExtra(nn.Module):
    """A complex weight and extra state (a dict), next to a plain linear layer."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(3, 2)
        self.phase = nn.Parameter(torch.randn(4, dtype=torch.complex64))
        self.config = {"calls": 0}

    def get_extra_state(self):
        return dict(self.config)

    def set_extra_state(self, state):
        self.config = dict(state)


def test_complex_weights_are_synthesized_and_extra_state_is_carried(tmp_path):
    torch.manual_seed(0)
    model = ComplexWithExtra()
    posthoc = PostHocEMA(model, snapshot_every=5, folder=tmp_path)
    reference = {0.05: None, 0.10: None}
    for t in range(1, 41):
        with torch.no_grad():
            model.phase.add_(torch.randn(4, dtype=torch.complex64) * 0.1)
        model.config["calls"] = t
        posthoc.update(model)
        for sigma_rel, gamma in zip(posthoc.sigma_rels, posthoc.gammas):
            live = model.phase.detach().to(torch.complex128)
            weight = 1.0 if t == 1 else 1 - (1 - 1 / t) ** (gamma + 1)
            previous = live if reference[sigma_rel] is None else reference[sigma_rel]
            reference[sigma_rel] = previous + weight * (live - previous)
    assert (posthoc.profiles[0.10].phase.to(torch.complex128) - reference[0.10]).abs().max() < 1e-5
    synthesized = posthoc.synthesize(0.10)
    assert synthesized["phase"].dtype == torch.complex64
    assert (synthesized["phase"] - posthoc.profiles[0.10].phase).abs().max() < 1e-5
    assert synthesized["_extra_state"] == {"calls": 40}
