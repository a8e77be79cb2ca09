"""Post-hoc EMA (Karras et al. 2024, "Analyzing and Improving the Training Dynamics of Diffusion Models").

Instead of guessing the EMA length before training, ``PostHocEMA`` tracks two power-function EMAs and
saves snapshots of them every few steps. After training, ``synthesize`` builds the EMA of any length in
between as a least-squares combination of the snapshots, and ``scan`` scores a range of lengths on the
validation set.

A power-function EMA at step t averages the weights of steps 1..t with density proportional to
``tau ** gamma``: ``ema = beta_t * ema + (1 - beta_t) * w`` with ``beta_t = (1 - 1/t) ** (gamma + 1)``.
Its length is relative: ``sigma_rel``, the standard deviation of that density as a fraction of t, stays
the same as training goes on (sigma_rel 0.05 and 0.10 are gamma 16.97 and 6.94). Its half-life at step
t, the lag after which a step's weight has halved, is ``t * (1 - 2 ** (-1 / gamma))``.
"""

from __future__ import annotations

import copy
import math
import os
import shutil
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
import torch
from torch import nn

from . import _checks
from ._shadows import Shadows
from ._tensors import check_layout, cpu_state
from .files import atomic_save, load_weights

if TYPE_CHECKING:
    import pandas as pd

SIGMA_REL_MAX = math.sqrt(1 / 12)  # gamma -> 0: a plain average of every step so far, the longest profile
# A length is synthesized only when the best combination of the snapshots' profiles matches its profile
# within this relative L2 error. It is a test on profiles: how far the weights then are from a directly
# tracked EMA also depends on how fast they move. tests/test_posthoc.py measures it on a real small model:
# within 2% of the distance between the two tracked EMAs. Past ~0.06, a fit can do worse than simply
# taking the nearer tracked EMA.
MAX_RESIDUAL = 0.05
SCAN_CACHE_BYTES = 2**30  # scan keeps the snapshots in memory when they fit, instead of rereading them
_FORMAT = "ema_kit.PostHocEMA/1"
_SNAPSHOT_FORMAT = "ema_kit.PostHocEMA.snapshot/1"
_PATTERN = "snapshot-*.pth"


def gamma_from_sigma_rel(sigma_rel: float) -> float:
    """The exponent gamma of the power-function EMA of relative length ``sigma_rel``.

    The largest root of ``gamma**3 + 7 gamma**2 + (16 - s) gamma + (12 - s) = 0`` with
    ``s = sigma_rel ** -2`` (the relative standard deviation of the profile, solved for gamma).

    Example:
        >>> round(gamma_from_sigma_rel(0.05), 2), round(gamma_from_sigma_rel(0.10), 2)
        (16.97, 6.94)
    """
    _check_sigma_rel("sigma_rel", sigma_rel)
    s = sigma_rel**-2.0
    roots = np.roots([1.0, 7.0, 16.0 - s, 12.0 - s])
    return float(roots[np.abs(roots.imag) < 1e-9].real.max())


def sigma_rel_from_gamma(gamma: float) -> float:
    """The relative length of the power-function EMA with exponent ``gamma`` (> 0)."""
    return math.sqrt((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3)))


def half_life_from_sigma_rel(sigma_rel: float, step: int) -> float:
    """The half-life in steps, at ``step``, of the power-function EMA of relative length ``sigma_rel``.

    The weight the EMA gives a step falls with its age; the half-life is the age at which it has halved,
    as ``ModelEMA.half_life`` is for a fixed decay.

    Example:
        >>> round(half_life_from_sigma_rel(0.10, step=10_000))
        951
        >>> round(sigma_rel_from_half_life(951, step=10_000), 3)
        0.1
    """
    return step * (1.0 - 2.0 ** (-1.0 / gamma_from_sigma_rel(sigma_rel)))


def sigma_rel_from_half_life(half_life: float, step: int) -> float:
    """The relative length of the power-function EMA whose half-life at ``step`` is ``half_life`` steps."""
    if isinstance(half_life, bool) or not isinstance(half_life, (int, float)) or not 0 < half_life < step:
        raise ValueError(
            f"half_life must be a number of steps between 0 and the step it is measured at ({step}), got "
            f"{half_life!r}."
        )
    return sigma_rel_from_gamma(math.log(2.0) / -math.log1p(-half_life / step))


class PostHocEMA:
    """Track two power-function EMAs, snapshot them to disk, and synthesize any EMA length afterwards.

    Call ``update(model)`` after each optimizer step (or pass it to ``fit`` as a callback); every
    ``snapshot_every`` steps both profiles are written to ``folder`` as one file of plain CPU state
    dicts. After training, ``synthesize(sigma_rel)`` (or ``half_life=``) returns a state dict that loads
    into the model, and ``scan`` scores a range of lengths.

    Disk: each snapshot holds one copy of the weights per profile (``disk_bytes`` and ``repr`` report
    the use). At most ``max_snapshots`` are kept: when a new one would exceed that, the snapshots off a
    grid of ``snapshot_every * 2**k`` steps are deleted (the newest stays), and k grows when every kept
    one is on the grid. The snapshots stay spread over the whole run with the recent ones denser, so the
    run's end (where the final EMA puts its weight) is covered best. A file that the latest
    ``state_dict()`` lists is deleted only once a later one no longer does, so that a checkpoint holding
    that state resumes exactly even when the run is killed after further thinning; until then the folder
    may hold a few files more than ``max_snapshots``.

    Args:
        model: the model being trained (DDP, DataParallel and ``torch.compile`` wrappers are looked
            through).
        sigma_rels: the relative lengths of the tracked profiles; the paper's 0.05 and 0.10 let you
            synthesize lengths from about 0.03 to 0.2 (``reconstructable_range`` tells).
        snapshot_every: steps between snapshots. More snapshots reconstruct a wider range of lengths.
        folder: where the snapshots go; a fresh tracker refuses a folder holding another run's
            snapshots. ``None`` under ``fit`` means ``out_dir / "posthoc"``.
        max_snapshots: the most snapshot files kept (at least 2).
        buffers, dtype, device: as for ``ModelEMA`` (BatchNorm statistics averaged by default; float32
            profiles for bf16/fp16 models; where the profiles live).

    Example:
        >>> import tempfile
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 2))
        >>> posthoc = PostHocEMA(model, snapshot_every=10, folder=tempfile.mkdtemp())
        >>> optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> for _ in range(100):
        ...     loss = model(torch.randn(16, 4)).square().mean()
        ...     optimizer.zero_grad(); loss.backward(); optimizer.step()
        ...     posthoc.update(model)
        >>> len(posthoc.snapshots)
        10
        >>> model.load_state_dict(posthoc.synthesize(0.07))  # or synthesize(half_life=6)
        <All keys matched successfully>
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        sigma_rels: Sequence[float] = (0.05, 0.10),
        snapshot_every: int,
        folder: str | os.PathLike | None = None,
        max_snapshots: int = 16,
        buffers: str = "average",
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ):
        self.sigma_rels = _check_sigma_rels(sigma_rels)
        self.gammas = tuple(gamma_from_sigma_rel(s) for s in self.sigma_rels)
        self.snapshot_every = _checks.check_int("snapshot_every", snapshot_every, minimum=1)
        self.max_snapshots = _checks.check_int("max_snapshots", max_snapshots, minimum=2)
        self.folder = None if folder is None else Path(folder)
        self.num_steps = 0  # update() calls so far
        self.snapshots: list[int] = []  # the steps whose snapshot file is in ``folder``, oldest first
        self._grid = self.snapshot_every  # the thinning grid (see the class docstring)
        self._pinned: set[int] = set()  # snapshots the latest state_dict() lists: thinning leaves their files
        self._shadows = Shadows(
            model,
            len(self.sigma_rels),
            average_buffers=_checks.check_choice("buffers", buffers, ("average", "copy")) == "average",
            dtype=_checks.check_dtype("dtype", dtype),
            device=_checks.check_device("device", device),
        )
        self._profiles = dict(zip(self.sigma_rels, self._shadows.modules))

    @property
    def profiles(self) -> Mapping[float, nn.Module]:
        """sigma_rel -> the tracked power-function EMA as a model (in eval mode), at the current step."""
        return MappingProxyType(self._profiles)

    @property
    def disk_bytes(self) -> int:
        """Bytes the snapshot files take on disk."""
        return sum(path.stat().st_size for path in map(self._path, self.snapshots) if path.exists())

    # -- training -------------------------------------------------------------------------------------------

    def update(self, model: nn.Module) -> None:
        """Fold the model's weights into each profile; call it after each optimizer step."""
        if self.num_steps == 0:
            self._check_folder_is_free()
        self._shadows.follow(model)
        t = self.num_steps + 1
        self._shadows.blend([_blend_weight(t, gamma) for gamma in self.gammas])
        self.num_steps = t
        if t % self.snapshot_every == 0:
            self.snapshot()

    def snapshot(self) -> Path:
        """Write the profiles at the current step (``update`` does it every ``snapshot_every`` steps).

        Under DDP only rank 0 writes (every rank keeps the same list of snapshots).
        """
        if self.num_steps == 0:
            raise ValueError("PostHocEMA has nothing to snapshot yet: call update(model) after each step.")
        folder = self._require_folder()
        path = self._path(self.num_steps)
        if self.snapshots and self.snapshots[-1] == self.num_steps:
            return path
        kept, grid = _thin(self.snapshots + [self.num_steps], self._grid, self.max_snapshots)
        if _is_main_process():  # under DDP every rank tracks the same profiles; rank 0 writes them
            self._write(path, grid, kept)
            # Only once the new one is safely written, which lists what is kept: a kill before the deletions
            # leaves files that from_folder ignores and a later snapshot deletes.
            for step in _snapshot_steps(folder):
                if step not in kept and step not in self._pinned:
                    (folder / _name(step)).unlink(missing_ok=True)
        self.snapshots, self._grid = kept, grid
        return path

    def _write(self, path: Path, grid: int, kept: list[int]) -> None:
        atomic_save(
            {
                "format": _SNAPSHOT_FORMAT,
                "step": self.num_steps,
                "sigma_rels": list(self.sigma_rels),
                "gammas": list(self.gammas),
                "snapshot_every": self.snapshot_every,
                "max_snapshots": self.max_snapshots,
                "grid": grid,
                "snapshots": kept,  # the steps whose files the tracker keeps, this one included
                "profiles": [cpu_state(module.state_dict()) for module in self._shadows.modules],
            },
            path,
        )

    # -- as a fit callback ----------------------------------------------------------------------------------

    def on_fit_start(self, state) -> None:
        """Take ``out_dir / "posthoc"`` as the folder when none was given, and check it before training.

        On a resume (fit has loaded this tracker's state from its checkpoint) the snapshots written after
        that checkpoint, by the run that stopped, are deleted: the resumed run writes its own.
        """
        if self.folder is None and getattr(state, "out_dir", None) is not None:
            self.folder = Path(state.out_dir) / "posthoc"
        if self.num_steps == 0:
            self._check_folder_is_free()
        elif _is_main_process():
            latest = self.snapshots[-1] if self.snapshots else 0
            for step in _snapshot_steps(self._require_folder()):
                if step > latest and step not in self.snapshots:
                    self._path(step).unlink()

    def on_step_end(self, state) -> None:
        self.update(state.model)

    def on_fit_end(self, state) -> None:
        """Snapshot the final step, so that synthesis covers the end of training."""
        if self.num_steps:
            self.snapshot()

    # -- after training -------------------------------------------------------------------------------------

    def synthesize(
        self,
        sigma_rel: float | None = None,
        *,
        half_life: float | None = None,
        at_step: int | None = None,
        max_residual: float = MAX_RESIDUAL,
    ) -> dict[str, torch.Tensor]:
        """The EMA of relative length ``sigma_rel`` (or ``half_life`` steps) at ``at_step``, as a state dict.

        It is the least-squares combination (solved in float64) of the snapshot profiles up to
        ``at_step`` (the latest snapshot by default) closest to the requested profile. Integer buffers
        come from the latest of those snapshots, and so do all buffers of a tracker built with
        ``buffers="copy"`` (as EDM2's reconstruction does: a copied buffer is the model's own at that step,
        not something to average). ``model.load_state_dict(...)`` loads it.

        Raises ValueError when the snapshots cannot reconstruct that length: when the best combination
        is off the requested profile by more than ``max_residual`` (relative L2 error of the profile).
        """
        return self._combine(self._solve(sigma_rel, half_life, at_step, max_residual))

    def reconstructable_range(
        self, at_step: int | None = None, max_residual: float = MAX_RESIDUAL
    ) -> tuple[float, float]:
        """The shortest and longest sigma_rel that ``synthesize`` accepts at ``at_step``."""
        at_step = self._at_step(at_step)
        steps, gammas = self._basis(at_step)
        grid = np.geomspace(0.005, SIGMA_REL_MAX * 0.999, 400)
        _, residuals = _least_squares(steps, gammas, at_step, [gamma_from_sigma_rel(s) for s in grid])
        ok = residuals <= max_residual
        if not ok.any():
            raise ValueError(
                f"The {len(steps) // len(self.gammas)} snapshots up to step {at_step} reconstruct no EMA "
                f"length within max_residual={max_residual}; synthesize at a snapshot step "
                f"({self.snapshots[-3:]} ...) or take snapshots more often."
            )
        low = high = int(np.argmin(residuals))  # the run of accepted lengths around the best-fitting one
        while low > 0 and ok[low - 1]:
            low -= 1
        while high < len(grid) - 1 and ok[high + 1]:
            high += 1
        return float(grid[low]), float(grid[high])

    # -- resume ---------------------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        """Everything to resume bit-identically; loads with ``torch.load(..., weights_only=True)``.

        The snapshot files it lists stay on disk until a later ``state_dict()`` no longer lists them.
        """
        self._pinned = set(self.snapshots)
        return {
            "format": _FORMAT,
            "num_steps": self.num_steps,
            "sigma_rels": list(self.sigma_rels),
            "snapshot_every": self.snapshot_every,
            "max_snapshots": self.max_snapshots,
            "grid": self._grid,
            "snapshots": list(self.snapshots),
            "folder": None if self.folder is None else str(self.folder),
            "profiles": [module.state_dict() for module in self._shadows.modules],
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore what ``state_dict`` returned. Checks everything before changing anything.

        The snapshots are looked up in this tracker's folder (or the saved one, if it has none); any
        that are gone, e.g. thinned by the run after this state was saved, are dropped with a warning.
        """
        if not isinstance(state, dict) or state.get("format") != _FORMAT:
            raise ValueError("Not a PostHocEMA state: expected the dict from PostHocEMA.state_dict().")
        try:
            sigma_rels = tuple(state["sigma_rels"])
            step = _checks.check_int("num_steps", state["num_steps"], minimum=0)
            snapshot_every = _checks.check_int("snapshot_every", state["snapshot_every"], minimum=1)
            max_snapshots = _checks.check_int("max_snapshots", state["max_snapshots"], minimum=2)
            grid = _checks.check_int("grid", state["grid"], minimum=1)
            snapshots = [_checks.check_int("snapshots", s, minimum=1) for s in state["snapshots"]]
            profiles, folder = state["profiles"], state["folder"]
        except KeyError as error:
            raise ValueError(
                f"The PostHocEMA state lacks {error}; was it saved by another ema_kit version?"
            ) from None
        if sigma_rels != self.sigma_rels:
            raise ValueError(
                f"The state tracks sigma_rels {sigma_rels}, but this PostHocEMA tracks {self.sigma_rels}: "
                f"build PostHocEMA(model, sigma_rels={sigma_rels}, ...) to resume it."
            )
        if not isinstance(profiles, list) or len(profiles) != len(self.sigma_rels):
            raise ValueError(f"The PostHocEMA state holds no list of {len(self.sigma_rels)} profiles.")
        expected = self._shadows.modules[0].state_dict()
        for profile in profiles:
            _check_same_model(profile, expected, "The PostHocEMA state")
        if self.folder is None and folder is not None:
            self.folder = Path(folder)
        missing = [s for s in snapshots if self.folder is None or not self._path(s).is_file()]
        _warn_missing(missing, snapshots, "this state", self.folder)
        self.num_steps, self.snapshot_every, self.max_snapshots = step, snapshot_every, max_snapshots
        self._grid = grid
        self.snapshots = [s for s in snapshots if s not in missing]
        self._pinned = set(self.snapshots)  # the checkpoint it came from lists them
        with torch.no_grad():
            for module, profile in zip(self._shadows.modules, profiles):
                module.load_state_dict(profile)

    @classmethod
    def from_folder(cls, folder: str | os.PathLike, model: nn.Module, **options) -> PostHocEMA:
        """The tracker that wrote ``folder``, rebuilt from its snapshots (e.g. in a new session).

        Its profiles are those of the latest snapshot, so ``synthesize`` and ``scan`` work, and training
        can go on from that step. The snapshots are those the latest one lists as kept: files a killed
        run had yet to thin, or kept for a checkpoint, are not used (the next snapshot deletes them).
        ``options``: ``buffers``, ``dtype``, ``device`` as for the constructor.
        """
        folder = Path(folder)
        steps = _snapshot_steps(folder)
        if not steps:
            raise ValueError(f"No post-hoc EMA snapshots ({_PATTERN}) in {folder}.")
        latest = _read_snapshot(folder / _name(steps[-1]), steps[-1])
        listed = latest.get("snapshots", steps)  # snapshots written before they listed the kept ones: all
        missing = [s for s in listed if s not in steps]
        _warn_missing(missing, listed, "the latest snapshot's list", folder)
        tracker = cls(
            model,
            sigma_rels=tuple(latest["sigma_rels"]),
            snapshot_every=latest["snapshot_every"],
            folder=folder,
            max_snapshots=latest["max_snapshots"],
            **options,
        )
        expected = tracker._shadows.modules[0].state_dict()
        for profile in latest["profiles"]:
            _check_same_model(profile, expected, f"The snapshot {folder / _name(steps[-1])}")
        with torch.no_grad():
            for module, profile in zip(tracker._shadows.modules, latest["profiles"]):
                module.load_state_dict(profile)
        tracker.num_steps, tracker._grid = steps[-1], latest["grid"]
        tracker.snapshots = [s for s in listed if s in steps]
        return tracker

    def __repr__(self) -> str:
        where = "no folder yet" if self.folder is None else str(self.folder)
        span = f" (steps {self.snapshots[0]}..{self.snapshots[-1]})" if self.snapshots else ""
        return (
            f"PostHocEMA(sigma_rels={self.sigma_rels}, num_steps={self.num_steps}, "
            f"{len(self.snapshots)} snapshots{span}, {_size(self.disk_bytes)} in {where})"
        )

    # -- internals ------------------------------------------------------------------------------------------

    def _path(self, step: int) -> Path:
        return self._require_folder() / _name(step)

    def _require_folder(self) -> Path:
        if self.folder is None:
            raise ValueError(
                "PostHocEMA needs a folder for its snapshots: PostHocEMA(model, folder='runs/posthoc', "
                "...), or fit(..., out_dir=...), which puts them in out_dir/posthoc."
            )
        return self.folder

    def _check_folder_is_free(self) -> None:
        """A fresh tracker must not mix its snapshots with another run's; warn when the disk looks short."""
        folder = self._require_folder()
        others = _snapshot_steps(folder)
        if others:
            raise ValueError(
                f"{folder} already holds {len(others)} post-hoc EMA snapshots of another run (steps "
                f"{others[0]}..{others[-1]}). Give this PostHocEMA a new folder, delete those files, or "
                "resume that run with load_state_dict(...) or PostHocEMA.from_folder(...)."
            )
        per_snapshot = sum(map(_nbytes, self._shadows.modules))
        existing = next(p for p in [folder, *folder.parents] if p.exists())
        needed, free = per_snapshot * (self.max_snapshots + 1), shutil.disk_usage(existing).free
        if needed > free:
            warnings.warn(
                f"PostHocEMA may need {_size(needed)} in {folder} ({self.max_snapshots} snapshots of "
                f"{_size(per_snapshot)}), but only {_size(free)} is free; lower max_snapshots.",
                RuntimeWarning,
                stacklevel=3,
            )

    def _at_step(self, at_step) -> int:
        if not self.snapshots:
            raise ValueError(
                f"PostHocEMA has no snapshots yet (step {self.num_steps}; the first is written at step "
                f"{self.snapshot_every}, or call snapshot())."
            )
        if at_step is None:
            return self.snapshots[-1]
        if (
            isinstance(at_step, bool)
            or not isinstance(at_step, int)
            or not (self.snapshots[0] <= at_step <= self.snapshots[-1])
        ):
            raise ValueError(
                f"at_step must be a step between the first and the latest snapshot ({self.snapshots[0]} "
                f"and {self.snapshots[-1]}), got {at_step!r}."
            )
        return at_step

    def _basis(self, at_step: int) -> tuple[list[int], list[float]]:
        """The snapshot profiles up to ``at_step``: each step once per tracked gamma."""
        used = [s for s in self.snapshots if s <= at_step]
        return [s for s in used for _ in self.gammas], [g for _ in used for g in self.gammas]

    def _solve(self, sigma_rel, half_life_steps, at_step, max_residual) -> _Synthesis:
        at_step = self._at_step(at_step)
        if (sigma_rel is None) == (half_life_steps is None):
            raise ValueError(
                "Give the EMA length either as sigma_rel (e.g. 0.08) or as half_life=... (steps at "
                f"at_step={at_step}), not both or neither."
            )
        if half_life_steps is not None:
            sigma_rel = sigma_rel_from_half_life(half_life_steps, at_step)
        _check_sigma_rel("sigma_rel", sigma_rel)
        steps, gammas = self._basis(at_step)
        coefficients, residuals = _least_squares(steps, gammas, at_step, [gamma_from_sigma_rel(sigma_rel)])
        residual = float(residuals[0])
        if not residual <= max_residual:
            try:
                low, high = self.reconstructable_range(at_step, max_residual)
                fits = (
                    f"At step {at_step} they reconstruct sigma_rel {low:.3g} to {high:.3g} (half-lives "
                    f"{_steps(half_life_from_sigma_rel(low, at_step))} to "
                    f"{_steps(half_life_from_sigma_rel(high, at_step))} steps)"
                )
            except ValueError as error:
                fits = str(error).rstrip(".")
            half = _steps(half_life_from_sigma_rel(sigma_rel, at_step))
            raise ValueError(
                f"sigma_rel={sigma_rel:.3g} (half-life {half} steps at step {at_step}) is outside what the "
                f"snapshots can reconstruct: the best combination of the "
                f"{len(set(steps))} snapshots up to step {at_step} is {residual:.1%} off its profile "
                f"(max_residual={max_residual}). {fits}; snapshots taken more often widen that range."
            )
        return _Synthesis(
            sigma_rel, half_life_from_sigma_rel(sigma_rel, at_step), at_step, steps, coefficients[:, 0]
        )

    def _combine(self, synthesis: _Synthesis, cache: dict | None = None) -> dict[str, torch.Tensor]:
        paths = {step: self._path(step) for step in dict.fromkeys(synthesis.steps)}
        missing = [str(path) for path in paths.values() if not path.is_file()]
        if missing:
            raise ValueError(
                f"{len(missing)} snapshot files are missing: {missing[:3]}"
                f"{' ...' if len(missing) > 3 else ''}. Restore them (was the folder moved or cleaned?), "
                "or rebuild the tracker from the files left: PostHocEMA.from_folder(folder, model)."
            )
        shadow = self._shadows.modules[0]
        expected = shadow.state_dict()
        # Copied buffers are the model's own at each snapshot: the latest one's, not a mix, are the EMA's.
        copied = set() if self._shadows.average_buffers else _buffer_keys(shadow)
        total: dict[str, torch.Tensor] = {}
        index = 0
        for step, path in paths.items():
            snapshot = cache[step] if cache is not None and step in cache else _read_snapshot(path, step)
            if cache is not None:
                cache[step] = snapshot
            gammas = snapshot.get("gammas", [])
            if len(gammas) != len(self.gammas) or not np.allclose(gammas, self.gammas):
                raise ValueError(
                    f"{path} holds profiles of sigma_rels {snapshot['sigma_rels']}, not this tracker's "
                    f"{list(self.sigma_rels)}: it belongs to another run."
                )
            for profile in snapshot["profiles"]:
                _check_same_model(profile, expected, f"The snapshot {path}")
                weight = float(synthesis.coefficients[index])
                index += 1
                for key, value in profile.items():
                    if _averaged(value) and key not in copied:
                        term = value.to(torch.complex128 if value.is_complex() else torch.float64) * weight
                        total[key] = term if key not in total else total[key].add_(term)
            latest = snapshot["profiles"][0]
        return {
            key: total[key].to(value.dtype) if key in total else copy.deepcopy(latest[key])
            for key, value in expected.items()
        }


class _Synthesis(NamedTuple):
    """A solved combination: the snapshot profiles (their steps, in basis order) and their coefficients."""

    sigma_rel: float
    half_life: float
    at_step: int
    steps: list[int]
    coefficients: np.ndarray


def scan(
    posthoc: PostHocEMA | str | os.PathLike,
    model: nn.Module,
    score: Callable[[nn.Module], Mapping[str, float]],
    sigma_rels: Sequence[float] | None = None,
    *,
    at_step: int | None = None,
    max_residual: float = MAX_RESIDUAL,
) -> pd.DataFrame:
    """Score the model with the post-hoc EMA of each length: one row per length, best length easy to pick.

    Args:
        posthoc: the tracker, or the folder it wrote (``PostHocEMA.from_folder`` reads it).
        model: the model to load each synthesized EMA into; its own weights come back bit-exact after.
        score: ``score(model) -> {"metric": value, ...}``, e.g. ``lambda m: evaluate(m, val_loader)``.
        sigma_rels: the lengths to try; by default 9 spread (log-evenly) over ``reconstructable_range``.
            Every length is checked before anything is scored.
        at_step: the step to synthesize at (the latest snapshot by default).

    Returns:
        A DataFrame with columns ``sigma_rel``, ``half_life`` (steps, at ``at_step``), then the metrics.

    Example:
        >>> import tempfile
        >>> model = nn.Linear(4, 1)
        >>> posthoc = PostHocEMA(model, snapshot_every=5, folder=tempfile.mkdtemp())
        >>> optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
        >>> x, y = torch.randn(64, 4), torch.randn(64, 1)
        >>> for _ in range(60):
        ...     loss = (model(x) - y).square().mean()
        ...     optimizer.zero_grad(); loss.backward(); optimizer.step()
        ...     posthoc.update(model)
        >>> table = scan(posthoc, model, lambda m: {"loss": (m(x) - y).square().mean().item()})
        >>> list(table.columns), len(table)
        (['sigma_rel', 'half_life', 'loss'], 9)
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}.")
    if not callable(score):
        raise TypeError(f"score must be a function score(model) -> dict of metrics, got {score!r}.")
    if not isinstance(posthoc, PostHocEMA):
        posthoc = PostHocEMA.from_folder(posthoc, model)
    live = _checks.check_module("model", model)
    _check_same_model(live.state_dict(), posthoc._shadows.modules[0].state_dict(), "The model given to scan")
    at_step = posthoc._at_step(at_step)
    if sigma_rels is None:
        sigma_rels = np.geomspace(*posthoc.reconstructable_range(at_step, max_residual), 9).tolist()
    syntheses = [posthoc._solve(float(s), None, at_step, max_residual) for s in sigma_rels]
    cache = {} if posthoc.disk_bytes <= SCAN_CACHE_BYTES else None
    with torch.no_grad():
        original = copy.deepcopy(live.state_dict())
    training, rows = live.training, []
    try:
        for synthesis in syntheses:
            live.load_state_dict(posthoc._combine(synthesis, cache))
            metrics = score(model)
            if not isinstance(metrics, Mapping) or not all(isinstance(k, str) for k in metrics):
                raise TypeError(f"score must return a dict of metric name -> number, got {metrics!r}.")
            rows.append(
                {"sigma_rel": synthesis.sigma_rel, "half_life": synthesis.half_life}
                | {name: float(value) for name, value in metrics.items()}
            )
    finally:
        live.load_state_dict(original)
        live.train(training)
    import pandas as pd  # here: the EMA core itself loads torch only

    return pd.DataFrame(rows)


# -- helpers -------------------------------------------------------------------------------------------


def _correlation(t_a, gamma_a, t_b, gamma_b):
    """The L2 inner product of two power-function profiles ending at steps t_a and t_b (broadcasting).

    A profile of exponent gamma ending at t has density (gamma + 1) tau**gamma / t**(gamma + 1) on [0, t].
    A discrete power EMA at step t is exactly this profile applied to weights held constant over each
    step, so the continuous inner products are the right ones for the snapshots.
    """
    t_a, gamma_a, t_b, gamma_b = np.broadcast_arrays(
        *(np.asarray(value, dtype=np.float64) for value in (t_a, gamma_a, t_b, gamma_b))
    )
    exponent = np.where(t_a < t_b, gamma_b, -gamma_a)
    numerator = (gamma_a + 1) * (gamma_b + 1) * (t_a / t_b) ** exponent
    return numerator / ((gamma_a + gamma_b + 1) * np.maximum(t_a, t_b))


def _least_squares(steps, gammas, at_step, targets) -> tuple[np.ndarray, np.ndarray]:
    """Coefficients (one column per target gamma) and the relative L2 residual of each fit.

    The coefficients are normalized to sum to 1, so that weights that never changed come out unchanged.
    """
    steps, gammas = np.asarray(steps, dtype=np.float64), np.asarray(gammas, dtype=np.float64)
    targets = np.asarray(targets, dtype=np.float64)
    gram = _correlation(steps[:, None], gammas[:, None], steps[None, :], gammas[None, :])
    cross = _correlation(steps[:, None], gammas[:, None], float(at_step), targets[None, :])
    coefficients = np.linalg.lstsq(gram, cross, rcond=None)[0]
    sums = coefficients.sum(axis=0)
    coefficients = coefficients / np.where(sums == 0, np.nan, sums)
    norms = _correlation(float(at_step), targets, float(at_step), targets)
    squared = (
        np.einsum("ij,ik,kj->j", coefficients, gram, coefficients)
        - 2 * np.einsum("ij,ij->j", coefficients, cross)
        + norms
    )
    residuals = np.sqrt(np.clip(squared, 0, None) / norms)
    return coefficients, np.where(np.isfinite(residuals), residuals, np.inf)


def _is_main_process() -> bool:
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    return not distributed or torch.distributed.get_rank() == 0


def _blend_weight(t: int, gamma: float) -> float:
    """1 - beta_t of the power EMA at its t-th update (1: the first update copies the weights)."""
    # expm1/log1p keep it accurate for large t, where (1 - 1/t) ** (gamma + 1) is close to 1.
    return 1.0 if t == 1 else -math.expm1((gamma + 1.0) * math.log1p(-1.0 / t))


def _name(step: int) -> str:
    return f"snapshot-{step:09d}.pth"


def _snapshot_steps(folder: Path) -> list[int]:
    if not folder.is_dir():
        return []
    steps = []
    for path in folder.glob(_PATTERN):
        number = path.stem.removeprefix("snapshot-")
        if number.isdigit():
            steps.append(int(number))
    return sorted(steps)


def _read_snapshot(path: Path, step: int) -> dict:
    snapshot = load_weights(path)
    if not isinstance(snapshot, dict) or snapshot.get("format") != _SNAPSHOT_FORMAT:
        raise ValueError(f"{path} is not a PostHocEMA snapshot (written by PostHocEMA.snapshot()).")
    if snapshot.get("step") != step:
        raise ValueError(f"{path} holds step {snapshot.get('step')!r}, not {step}: was it renamed?")
    return snapshot


def _averaged(value) -> bool:
    """Whether synthesis combines this state-dict value; the rest (integers, extra state) is copied."""
    return isinstance(value, torch.Tensor) and (value.is_floating_point() or value.is_complex())


def _buffer_keys(module: nn.Module) -> set[str]:
    """The state-dict keys of ``module``'s buffers (a buffer shared by two modules under each name)."""
    return {name for name, _ in module.named_buffers(remove_duplicate=False)}


def _thin(steps: list[int], grid: int, most: int) -> tuple[list[int], int]:
    """The snapshots of ``steps`` (newest last) kept when at most ``most`` may stay, and the grid after.

    Off-grid ones go first (the newest always stays); when every one is on the grid, the grid doubles.

    Example:
        >>> _thin([8, 16, 24, 32, 40, 48, 49], grid=8, most=6)
        ([16, 32, 48, 49], 16)
    """
    kept = steps
    while len(kept) > most:
        on_grid = [s for s in kept if s % grid == 0 or s == steps[-1]]
        if len(on_grid) == len(kept):
            grid *= 2
        kept = on_grid
    return kept, grid


def _warn_missing(missing: list[int], listed: list[int], where: str, folder) -> None:
    if missing:
        warnings.warn(
            f"{len(missing)} of the {len(listed)} snapshots in {where} are not in {folder} "
            f"(steps {missing[:5]}{' ...' if len(missing) > 5 else ''}): going on without them. If the "
            "folder moved, pass its new place as PostHocEMA(..., folder=...) before loading.",
            RuntimeWarning,
            stacklevel=3,
        )


def _nbytes(module: nn.Module) -> int:
    tensors = [value for value in module.state_dict().values() if isinstance(value, torch.Tensor)]
    unique = {tensor.data_ptr(): tensor for tensor in tensors}  # tied weights once
    return sum(tensor.numel() * tensor.element_size() for tensor in unique.values())


def _steps(count: float) -> str:
    return f"{count:,.0f}" if count >= 10 else f"{count:.2g}"


def _size(count: int) -> str:
    for unit in ("bytes", "KB", "MB", "GB"):
        if count < 1000 or unit == "GB":
            return f"{count:,.0f} {unit}" if unit == "bytes" else f"{count:.1f} {unit}"
        count /= 1000
    raise AssertionError  # unreachable


def _check_same_model(given, expected: dict, what: str) -> None:
    check_layout(
        given,
        expected,
        f"{what} is for a different model than this PostHocEMA tracks",
        "Post-hoc EMA weights load only into the architecture they were tracked on.",
    )


def _check_sigma_rel(name: str, value) -> float:
    sigma_rel = _checks.check_real(name, value)
    if not 0 < sigma_rel < SIGMA_REL_MAX:
        raise ValueError(
            f"{name} must be a number between 0 and {SIGMA_REL_MAX:.4f} (a power-function EMA's relative "
            f"length; 0.05 to 0.2 is typical), got {value!r}."
        )
    return sigma_rel


def _check_sigma_rels(values) -> tuple[float, ...]:
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
        raise TypeError(
            f"sigma_rels must be a sequence of relative lengths such as (0.05, 0.10), got {values!r}."
        )
    _checks.check_sequence("sigma_rels", values, "(0.05, 0.10)")
    checked = tuple(_check_sigma_rel(f"sigma_rels[{i}]", value) for i, value in enumerate(values))
    return _checks.check_distinct("sigma_rels", checked)
