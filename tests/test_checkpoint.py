"""Resume checkpoints (ema_kit/checkpoint.py): every random-number state, safe loading."""

import random

import numpy as np
import pytest
import torch

from ema_kit.training.checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state


def draws(generator: torch.Generator) -> tuple:
    return random.random(), np.random.rand(), torch.rand(1).item(), torch.rand(1, generator=generator).item()


def test_rng_state_survives_a_file_and_restores_every_generator(tmp_path):
    generator = torch.Generator().manual_seed(3)
    draws(generator)
    path = save_checkpoint(tmp_path / "checkpoint.pt", rng=rng_state(generator))
    expected = draws(generator)
    draws(generator)
    set_rng_state(torch.load(path, weights_only=True)["rng"], generator)
    assert draws(generator) == expected


def test_a_plain_weights_file_is_not_taken_for_a_checkpoint(tmp_path):
    torch.save({"weight": torch.zeros(2)}, tmp_path / "weights.pth")
    with pytest.raises(ValueError, match="is not an ema_kit checkpoint"):
        load_checkpoint(tmp_path / "weights.pth")


def test_numpy_numbers_in_a_state_are_stored_as_python_numbers_that_load_safely(tmp_path):
    optimizer = torch.optim.SGD(
        torch.nn.Linear(2, 1).parameters(), lr=np.float32(0.05), momentum=np.float64(0.9)
    )
    path = save_checkpoint(tmp_path / "checkpoint.pt", optimizer=optimizer.state_dict(), epoch=np.int64(3))
    loaded = load_checkpoint(path)  # weights_only: a NumPy scalar would be refused
    assert loaded["epoch"] == 3 and type(loaded["epoch"]) is int
    assert loaded["optimizer"]["param_groups"][0]["lr"] == np.float32(0.05)


# -- Checkpoint: fit's files and resume ------------------------------------------------------------------


def test_the_folder_is_checked_but_not_created_until_training_starts(tmp_path):
    from ema_kit.training.checkpoint import Checkpoint

    files = Checkpoint(tmp_path / "a" / "b", resume="auto")
    assert not (tmp_path / "a").exists() and files.path is None


@pytest.mark.parametrize(
    "resume, error, message",
    [
        (3, TypeError, "resume must be False, True"),
        (True, ValueError, "give out_dir too"),
        ("overwrite", ValueError, "give out_dir too"),
    ],
)
def test_a_bad_resume_is_refused_by_name(resume, error, message):
    from ema_kit.training.checkpoint import Checkpoint

    with pytest.raises(error, match=message):
        Checkpoint(None, resume=resume)


def test_a_folder_holding_a_run_is_refused_unless_resumed_or_overwritten(tmp_path):
    from ema_kit.training.checkpoint import Checkpoint

    (tmp_path / "history.csv").write_text("epoch\n1\n")
    with pytest.raises(ValueError, match=r"holds a run \(history.csv\).*resume='auto'.*resume='overwrite'"):
        Checkpoint(tmp_path)
    assert Checkpoint(tmp_path, resume="overwrite").overwrite
