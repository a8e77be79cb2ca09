"""What several test modules share: a small real CNN, a few real training steps, a float64 reference EMA.

Tests import these by name (``from helpers import small_cnn``): pyproject.toml puts ``tests/`` on the
path. Fixtures live in conftest.py.
"""

import torch
from torch import nn


def small_cnn(num_classes: int = 10) -> nn.Module:
    """A small CNN with BatchNorm (so it has running-stat and integer buffers), for 8x8 inputs."""
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 16, 3, padding=1, stride=2),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(16 * 4 * 4, 64),
        nn.ReLU(),
        nn.Linear(64, num_classes),
    )


def train_steps(model: nn.Module, steps: int, after_step=None, *, seed: int = 0, lr: float = 0.05) -> None:
    """Run real SGD steps on random 8x8 images; call ``after_step()`` after each optimizer step."""
    generator = torch.Generator().manual_seed(seed)
    dtype = next(model.parameters()).dtype
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    model.train()
    for _ in range(steps):
        x = torch.randn(16, 1, 8, 8, generator=generator).to(dtype)
        y = torch.randint(0, 10, (16,), generator=generator)
        loss = nn.functional.cross_entropy(model(x).float(), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if after_step is not None:
            after_step()


class ReferenceEMA:
    """The EMA formula in float64, one tensor at a time, as the definition to test against."""

    def __init__(self, model: nn.Module):
        self.state = {
            k: v.detach().to(torch.float64, copy=True) if v.is_floating_point() else v.clone()
            for k, v in model.state_dict().items()
        }

    def update(self, model: nn.Module, decay: float, buffers: str = "average") -> None:
        params = {name for name, _ in model.named_parameters()}
        for key, value in model.state_dict().items():
            if value.is_floating_point() and (key in params or buffers == "average"):
                self.state[key] = decay * self.state[key] + (1 - decay) * value.detach().double()
            else:
                self.state[key] = value.detach().clone()


def max_error(state: dict, reference: dict) -> float:
    """Largest absolute difference between two state dicts (compared in float64)."""
    assert state.keys() == reference.keys()
    return max((state[k].double() - reference[k].double()).abs().max().item() for k in reference)


def count_plans(monkeypatch) -> list:
    """Record each call of ``Shadows._bind`` (walking the model and planning the op lists anew) from now on.

    Every EMA class binds once when built; a count that grows afterwards means a re-plan.
    """
    from ema_kit._shadows import Shadows

    calls, bind = [], Shadows._bind

    def counted(self, model: nn.Module) -> None:
        calls.append(model)
        bind(self, model)

    monkeypatch.setattr(Shadows, "_bind", counted)
    return calls
