"""Files (ema_kit/files.py): code refused, damaged files named, safetensors, stale temporary files."""

import ast
import os
import pickle
import shlex
import sys
import time
from pathlib import Path

import pytest
import safetensors.torch
import torch
from helpers import small_cnn, train_steps
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import ema_kit
from ema_kit import ModelEMA
from ema_kit.files import STALE_TEMP_S, atomic_save, atomic_write_text, load_weights, save_weights

FORMATS = [".pth", ".safetensors"]
PACKAGE = Path(ema_kit.__file__).parent
# The fixture's EMA is only read, so one for all examples is fine; too_slow: a busy machine is no bug.
damaged_files = settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


class RunsCode:
    """Unpickling this runs a shell command (here a harmless one that creates a marker file)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(str(self.marker))}",)


@pytest.fixture
def trained_ema() -> ModelEMA:
    torch.manual_seed(0)
    model = small_cnn()
    ema = ModelEMA(model, decay=0.9)
    train_steps(model, 2, lambda: ema.update(model))
    return ema


def assert_same_weights(loaded: dict, expected: dict) -> None:
    assert loaded.keys() == expected.keys()  # safetensors keeps its own order
    for key, value in expected.items():
        assert loaded[key].dtype == value.dtype and torch.equal(loaded[key], value.cpu()), key


# -- code in a file is refused --------------------------------------------------------------------------


@pytest.mark.parametrize("writer", ["torch.save", "pickle.dump"])
def test_a_file_whose_unpickling_would_run_code_is_refused_without_running_it(tmp_path, writer):
    marker, path = tmp_path / "code_ran", tmp_path / "weights.pth"
    payload = {"weight": torch.ones(2), "extra": RunsCode(marker)}
    if writer == "torch.save":
        torch.save(payload, path)
    else:
        path.write_bytes(pickle.dumps(payload, protocol=2))  # torch.load's protocol, no warning
    with pytest.raises(ValueError, match=rf"{path}.*refuses to load it"):
        load_weights(path)
    assert not marker.exists()
    if writer == "torch.save":
        torch.load(path, weights_only=False)
    else:
        pickle.loads(path.read_bytes())
    assert marker.exists()  # the file is live: a loader that trusts it runs the command


def test_loading_a_crafted_file_into_an_ema_runs_nothing_and_keeps_the_ema(trained_ema, tmp_path):
    marker, path = tmp_path / "code_ran", tmp_path / "ema_state.pth"
    state = trained_ema.state_dict()
    before = {key: value.clone() for key, value in state["weights"].items()}
    torch.save(state | {"settings": RunsCode(marker)}, path)
    with pytest.raises(ValueError, match=rf"{path}.*refuses to load it"):
        trained_ema.load_state_dict(load_weights(path))
    assert not marker.exists()
    assert_same_weights(trained_ema.module.state_dict(), before)


def test_every_torch_load_in_ema_kit_passes_weights_only_true():
    loads = []
    for source in sorted(PACKAGE.glob("*.py")):
        for node in ast.walk(ast.parse(source.read_text(), filename=str(source))):
            if not isinstance(node, ast.Call):
                continue
            name = ast.unparse(node.func)
            assert name not in ("pickle.load", "pickle.loads"), f"{source.name}:{node.lineno} unpickles"
            if name == "torch.load":
                keywords = {k.arg: ast.unparse(k.value) for k in node.keywords}
                assert keywords.get("weights_only") == "True", f"{source.name}:{node.lineno}"
                loads.append(source.name)
    assert "files.py" in loads  # the scan finds the loads there are


# -- damaged and missing files ---------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", FORMATS)
def test_missing_file_is_file_not_found_naming_it(tmp_path, suffix):
    with pytest.raises(FileNotFoundError, match=rf"{tmp_path / 'nothing'}{suffix}"):
        load_weights(tmp_path / f"nothing{suffix}")


@pytest.mark.parametrize("suffix", FORMATS)
@damaged_files
@given(fraction=st.floats(0.0, 1.0, exclude_max=True))
def test_truncated_file_is_a_value_error_naming_it(trained_ema, tmp_path, suffix, fraction):
    data = trained_ema.save(tmp_path / f"good{suffix}").read_bytes()
    path = tmp_path / f"truncated{suffix}"
    path.write_bytes(data[: int(fraction * len(data))])
    with pytest.raises(ValueError, match=rf"{path} is not a readable"):
        load_weights(path)


@pytest.mark.parametrize("suffix", FORMATS)
@damaged_files
@given(flips=st.lists(st.tuples(st.floats(0.0, 1.0, exclude_max=True), st.integers(0, 7)), min_size=1))
def test_flipped_bits_are_an_error_naming_the_file_or_change_nothing(trained_ema, tmp_path, suffix, flips):
    data = bytearray(trained_ema.save(tmp_path / f"good{suffix}").read_bytes())
    for where, bit in flips:
        data[int(where * len(data))] ^= 1 << bit
    path = tmp_path / f"flipped{suffix}"
    path.write_bytes(data)
    try:
        loaded = load_weights(path)
    except ValueError as error:
        assert str(path) in str(error)
    else:  # the flips hit bytes that hold nothing (zip padding, JSON spacing): the weights are intact
        assert_same_weights(loaded, trained_ema.module.state_dict())


def test_files_torch_wrote_without_checksums_or_in_the_legacy_format_load(tmp_path):
    weights = {"w": torch.randn(3, 4)}
    torch.save(weights, tmp_path / "legacy.pth", _use_new_zipfile_serialization=False)
    torch.serialization.set_crc32_options(False)
    try:
        torch.save(weights, tmp_path / "no_crc.pth")
    finally:
        torch.serialization.set_crc32_options(True)
    for name in ("legacy.pth", "no_crc.pth"):
        assert_same_weights(load_weights(tmp_path / name), weights)


# -- safetensors -------------------------------------------------------------------------------------------


def test_ema_saves_safetensors_that_load_strict_with_tied_weights_and_any_layout(tmp_path):
    torch.manual_seed(0)
    embed, head = nn.Embedding(20, 8), nn.Linear(8, 20, bias=False)
    head.weight = embed.weight
    model = nn.Sequential(embed, nn.Conv2d(8, 4, 1), nn.BatchNorm2d(4), head)
    model[1].to(memory_format=torch.channels_last)
    ema = ModelEMA(model, decay=0.9)  # shadows are views into one flat buffer, the tied ones shared
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(1.0)
    ema.update(model)
    path = ema.save(tmp_path / "model_ema.safetensors")
    weights = safetensors.torch.load_file(path)  # any safetensors reader, not only ours
    assert_same_weights(weights, ema.module.state_dict())
    assert_same_weights(load_weights(path), ema.module.state_dict())
    fresh = nn.Sequential(nn.Embedding(20, 8), nn.Conv2d(8, 4, 1), nn.BatchNorm2d(4), nn.Linear(8, 20, False))
    fresh.load_state_dict(weights, strict=True)
    assert torch.equal(fresh[3].weight, ema.module[3].weight)


def test_a_safetensors_name_in_capitals_is_written_and_read_as_safetensors(trained_ema, tmp_path):
    path = trained_ema.save(tmp_path / "MODEL_EMA.SafeTensors")
    assert_same_weights(safetensors.torch.load_file(path), trained_ema.module.state_dict())
    assert_same_weights(load_weights(path), trained_ema.module.state_dict())


def test_safetensors_without_the_package_is_an_import_error_naming_pip_install(
    trained_ema, tmp_path, monkeypatch
):
    path = trained_ema.save(tmp_path / "model_ema.safetensors")
    saved = path.read_bytes()
    monkeypatch.setitem(sys.modules, "safetensors", None)  # import safetensors now fails
    monkeypatch.setitem(sys.modules, "safetensors.torch", None)
    with pytest.raises(ImportError, match="model_ema.safetensors.*pip install safetensors"):
        trained_ema.save(path)
    with pytest.raises(ImportError, match="pip install safetensors"):
        load_weights(path)
    assert path.read_bytes() == saved
    assert_same_weights(
        load_weights(trained_ema.save(tmp_path / "model_ema.pth")), trained_ema.module.state_dict()
    )


def test_save_weights_refuses_what_is_not_a_state_dict(tmp_path):
    with pytest.raises(
        TypeError, match=r"save_weights writes a state dict.*\['epoch'\] hold int.*atomic_save"
    ):
        save_weights({"w": torch.ones(1), "epoch": 3}, tmp_path / "w.safetensors")
    assert not (tmp_path / "w.safetensors").exists()


# -- temporary files -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "write", [lambda p: atomic_save({"w": torch.ones(1)}, p), lambda p: atomic_write_text("a\n", p)]
)
def test_a_write_removes_stale_temporary_files_of_its_path_and_keeps_live_ones(tmp_path, write):
    path = tmp_path / "log.csv"
    stale, live, other = (
        tmp_path / name for name in (".log.csv.old.tmp", ".log.csv.new.tmp", ".x.csv.a.tmp")
    )
    for tmp in (stale, live, other):
        tmp.write_bytes(b"half a file")
    long_ago = time.time() - STALE_TEMP_S - 60
    for tmp in (stale, other):
        os.utime(tmp, (long_ago, long_ago))
    write(path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([path.name, live.name, other.name])


def test_atomic_writes_get_the_permissions_of_an_ordinary_file(tmp_path):
    from ema_kit.files import atomic_write_text

    (tmp_path / "plain.txt").write_text("x")
    atomic_write_text("x", tmp_path / "atomic.txt")
    assert (tmp_path / "atomic.txt").stat().st_mode == (tmp_path / "plain.txt").stat().st_mode


def test_a_flip_in_the_checksum_key_and_one_in_the_data_is_still_caught(tmp_path, trained_ema):
    path = trained_ema.save(tmp_path / "weights.safetensors")
    data = bytearray(path.read_bytes())
    key = data.index(b"ema_kit.crc32")
    data[key] ^= 0x01  # "ema_kit" -> "dma_kit": the file no longer names its checksum
    data[int(len(data) * 0.75)] ^= 0x01  # and a weight changes
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="weights.safetensors is corrupted"):
        load_weights(path)
