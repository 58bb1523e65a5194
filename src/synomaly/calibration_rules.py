"""Calibration rules and results: the grid, the choice among its points, the healthy-percentile
threshold (an update/compute accumulator), the fallbacks, and ``thresholds.json``.

:func:`synomaly.calibrate.calibrate` runs the model over validation data and feeds these.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

import synomaly
from synomaly import _atomic
from synomaly._json import json_safe
from synomaly.config import DetectConfig, from_dict
from synomaly.errors import ConfigError, InputError, OutputExistsError
from synomaly.limits import MAX_GRID_POINTS
from synomaly.pipeline import THRESHOLDS_NAME

log = logging.getLogger("synomaly.calibrate")

TUNED_FIELDS = ("t", "kernel", "threshold", "max_stages", "fusion")
LOW_DICE = 0.05  # a best validation Dice below this means the detector is not working
CALIBRATION_KEYS = (
    "method", "selection", "score", "best", "grid", "table", "percentile", "healthy_percentile_threshold", "n_anomalous",
    "n_healthy", "warnings",
)
# How the Dice grid's point is chosen. ``fewer-stages``: the one-standard-error rule (Hastie, Tibshirani and Friedman,
# The Elements of Statistical Learning, 7.10) towards fewer stages: among the points whose mean Dice is within one
# standard error of the best point's (the spread of its per-slice Dice over the square root of the slice count),
# the fewest stages win, then the highest Dice. ``best``: the highest mean Dice (the benchmark protocol).
SELECTIONS = ("fewer-stages", "best")


@dataclass(frozen=True)
class CalibrationGrid:
    """Candidate detection settings; the grid is their Cartesian product.

    ``fusion`` only matters with more than one stage, so single-stage points are scored once
    (they keep the pipeline's ``fusion``).

    Attributes:
        t: Partial diffusion timesteps.
        kernel: Odd Gaussian blur sizes.
        threshold: Difference thresholds on the [-1, 1] scale.
        max_stages: Stage limits (1 is single-stage).
        fusion: Fusion modes of the multi-stage loop (``binary``, ``continuous``).
    """

    t: tuple[int, ...] = (100, 200, 300)
    kernel: tuple[int, ...] = (3, 5, 7)
    threshold: tuple[float, ...] = (0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.45)
    max_stages: tuple[int, ...] = (1, 5)
    fusion: tuple[str, ...] = ("binary",)

    def __post_init__(self) -> None:
        for name in TUNED_FIELDS:
            values = getattr(self, name)
            if isinstance(values, (str, bytes)) or not isinstance(values, (list, tuple)) or not values:
                raise ConfigError(f"grid.{name}", f"must be a non-empty list of values, got {values!r}")
        points = math.prod(len(getattr(self, name)) for name in TUNED_FIELDS)
        if points > MAX_GRID_POINTS:
            raise ConfigError("grid", f"{points} points (the product of the value counts); at most {MAX_GRID_POINTS} (the limit)")
        for name in TUNED_FIELDS:
            values = getattr(self, name)
            for value in values:
                _check_value(name, value)
            object.__setattr__(self, name, tuple(values))

    def to_dict(self) -> dict[str, list]:
        """Plain JSON data."""
        return {name: list(getattr(self, name)) for name in TUNED_FIELDS}


def _check_value(name: str, value: Any) -> None:
    """Validate one grid value exactly as ``DetectConfig`` validates that field."""
    try:
        from_dict(DetectConfig, {name: value}, "grid")
    except ConfigError as error:
        raise ConfigError(f"grid.{name}", error.problem) from None


@dataclass
class CalibrationResult:
    """Outcome of :func:`calibrate`.

    Attributes:
        detect: The chosen values of ``t``, ``kernel``, ``threshold``, ``max_stages``, ``fusion``.
        method: ``dice-grid``, ``healthy-percentile`` or ``default``.
        score: Mean per-slice validation Dice of the choice (``dice-grid`` only).
        table: Every grid point with its mean Dice (``dice``), the standard error of that mean
            (``dice_se``), mean network evaluations per image (``nfe``) and the number of anomalous
            slices it was scored on (``n``).
        selection: The rule that chose among the grid points (``SELECTIONS``).
        best: The grid row with the highest mean Dice (``dice-grid`` only); ``detect`` differs from it
            when the ``fewer-stages`` rule took a point with fewer stages within its standard error.
        healthy_percentile_threshold: The ``percentile``-th percentile of one-stage anomaly-map
            values on healthy slices (inside the foreground), at the chosen ``t`` and ``kernel``.
        n_anomalous: Validation slices with a non-empty mask.
        n_healthy: Validation slices with an empty (or no) mask.
        warnings: Every fallback taken, as logged.
        grid: The grid searched, as plain data.
        percentile: The percentile of the unsupervised rule.
    """

    detect: dict[str, Any]
    method: str
    score: float | None
    table: list[dict[str, Any]]
    healthy_percentile_threshold: float | None
    n_anomalous: int
    n_healthy: int
    warnings: list[str] = field(default_factory=list)
    grid: dict[str, list] = field(default_factory=dict)
    percentile: float = 99.0
    selection: str = "fewer-stages"
    best: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON data (no NaN: an undefined number is ``None``)."""
        return json_safe(dataclasses.asdict(self))


def apply_fallbacks(result: CalibrationResult) -> None:
    """Log and record every fallback; apply the percentile rule when no lesions were available."""
    if result.n_healthy == 0:
        _warn(result, "no healthy validation slices: the healthy-percentile threshold is not available")
    elif result.healthy_percentile_threshold is None:
        _warn(result, "the healthy validation slices have no foreground pixels: no healthy-percentile threshold")
    best = result.best["dice"] if result.best is not None else result.score
    if result.method == "dice-grid" and best is not None and best < LOW_DICE:
        _warn(result, f"the best validation Dice is {best:.3f}: the model finds almost none of the lesions at any "
                      "setting of the grid; check the training (steps, loss), the preprocessing and the masks before using it")
    if result.method == "dice-grid":
        return
    _warn(
        result,
        "no lesions in the validation masks (or no masks given): the threshold comes from healthy images only "
        f"(the {result.percentile:g}th percentile of their anomaly maps); t, kernel and stages stay as configured",
    )
    if result.healthy_percentile_threshold is None:
        result.method = "default"
        _warn(result, "neither lesions nor healthy foreground pixels: keeping the configured detection settings")
    else:
        result.detect["threshold"] = result.healthy_percentile_threshold


def _warn(result: CalibrationResult, message: str) -> None:
    log.warning("%s", message)
    result.warnings.append(message)


def grid_row(point: tuple[int, int, float, int, str], dice_sum: float, nfe_sum: float, n: int,
             dice_squares: float) -> dict[str, Any]:
    """A table row: the settings (in ``TUNED_FIELDS`` order), mean Dice, its standard error (from the sum of the
    squared per-slice Dice values) and network evaluations over ``n`` slices."""
    mean = dice_sum / n
    variance = max(dice_squares - n * mean * mean, 0.0) / (n - 1) if n > 1 else 0.0
    return {**dict(zip(TUNED_FIELDS, point)), "dice": mean, "dice_se": math.sqrt(variance / n), "nfe": nfe_sum / n,
            "n": n}


def best_row(table: list[dict[str, Any]]) -> dict[str, Any]:
    """Highest mean Dice; ties go to fewer network evaluations, then smaller ``t``, then grid order."""
    # Rounding keeps Dice values that differ only by summation order tied, so the cheaper point wins.
    return min(table, key=lambda row: (-round(row["dice"], 12), row["nfe"], row["t"]))


def choose_row(table: list[dict[str, Any]], selection: str = "fewer-stages") -> dict[str, Any]:
    """The row ``selection`` (``SELECTIONS``) takes: the best row, or the fewest stages within its standard error."""
    best = best_row(table)
    if selection == "best":
        return best
    floor = best["dice"] - best["dice_se"]
    close = [row for row in table if round(row["dice"], 12) >= round(floor, 12)]
    fewest = min(row["max_stages"] for row in close)
    return best_row([row for row in close if row["max_stages"] == fewest])


class UpperPercentile:
    """NumPy's ``percentile`` (linear rule) of values arriving in batches, keeping only the top ones.

    The number of values is known in advance, so only those at or above the lower interpolation
    rank are needed: memory is about ``1 - q/100`` of the values, not all of them.

    Args:
        n_values: How many values :meth:`update` will receive in total.
        q: The percentile, in [0, 100].
    """

    def __init__(self, n_values: int, q: float) -> None:
        self.position = q / 100 * (n_values - 1)  # NumPy's virtual index
        self.keep = n_values - math.floor(self.position)
        self.top = torch.empty(0)

    def update(self, values: Tensor) -> None:
        """Add a batch of values (any shape)."""
        both = torch.cat([self.top.to(values.device), values.detach().flatten().float()])
        self.top = both.topk(min(self.keep, both.numel())).values

    def compute(self) -> float:
        """Linear interpolation between the two order statistics around the virtual index."""
        ascending = self.top.flip(0).double().cpu()
        low = float(ascending[0])
        high = float(ascending[1]) if len(ascending) > 1 else low
        return low + (high - low) * (self.position - math.floor(self.position))


def write_thresholds(model_dir: str | Path, result: CalibrationResult, overwrite: bool = False) -> Path:
    """Write ``thresholds.json`` into a model folder; ``from_pretrained`` applies its ``detect`` part.

    Args:
        model_dir: The model folder (it must exist).
        result: Output of :func:`calibrate`.
        overwrite: Replace an existing ``thresholds.json``.

    Returns:
        The path written.

    Raises:
        InputError: When ``model_dir`` is not a folder.
        OutputExistsError: When ``thresholds.json`` exists and ``overwrite`` is False.
        ConfigError: When the chosen settings are not valid detection settings.
    """
    folder = Path(model_dir)
    if not folder.is_dir():
        raise InputError(folder, "model folder not found")
    path = folder / THRESHOLDS_NAME
    if path.exists() and not overwrite:
        raise OutputExistsError(path)
    from_dict(DetectConfig, result.detect, "detect")  # refuse to write what from_pretrained would reject
    data = result.to_dict()
    calibration = {key: data[key] for key in CALIBRATION_KEYS}
    calibration["version"] = synomaly.__version__
    _atomic.write_json(path, {"detect": data["detect"], "calibration": calibration})
    return path
