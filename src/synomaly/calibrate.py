"""Choose detection settings on validation data (docs/method.md §6: tuning on validation only).

Two rules, with explicit fallbacks (anomalib-style threshold finding):

* **dice-grid** (validation slices with lesion masks): every point of a :class:`CalibrationGrid`
  over ``t``, ``kernel``, ``threshold``, ``max_stages`` and ``fusion`` is scored by the mean
  per-slice Dice over the anomalous slices; the best point wins (ties: fewer network evaluations,
  then smaller ``t``, then grid order).
* **healthy-percentile** (no lesions available): the threshold is a high percentile of the
  one-stage anomaly-map values on healthy slices; ``t``, ``kernel`` and the stage settings stay as
  the pipeline's config has them. This unsupervised threshold is also reported beside a Dice-grid
  choice, so users without lesion masks know what to expect.
* **default**: the percentile rule is needed but no healthy foreground pixel exists, so the
  config's values are kept.

Every fallback is logged as a warning and listed in :attr:`CalibrationResult.warnings`.
``min_size``, ``connectivity``, ``tol`` and ``min_area`` always stay as the pipeline's config has them.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

import synomaly
from synomaly import _atomic
from synomaly._json import json_safe
from synomaly.config import DetectConfig, from_dict
from synomaly.detect import check_inputs, stage_cost
from synomaly.errors import ConfigError, InputError, OutputExistsError
from synomaly.maps import above_threshold, difference_map, remove_small_components
from synomaly.metrics import confusion_counts, dice
from synomaly.pipeline import THRESHOLDS_NAME, SynomalyPipeline

log = logging.getLogger(__name__)

__all__ = ["CalibrationGrid", "CalibrationResult", "calibrate", "write_thresholds"]

TUNED_FIELDS = ("t", "kernel", "threshold", "max_stages", "fusion")
LOW_DICE = 0.05  # a best validation Dice below this means the detector is not working
CALIBRATION_KEYS = (
    "method", "score", "grid", "table", "percentile", "healthy_percentile_threshold", "n_anomalous", "n_healthy",
    "warnings",
)


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
        table: Every grid point with its mean Dice (``dice``), mean network evaluations per image
            (``nfe``) and the number of anomalous slices it was scored on (``n``).
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

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON data (no NaN: an undefined number is ``None``)."""
        return json_safe(dataclasses.asdict(self))


@dataclass
class _Runner:
    """What every pass shares: the data, the pipeline, batching, the noise seed and one progress bar."""

    pipeline: SynomalyPipeline
    images: Tensor
    masks: Tensor | None
    foreground: Tensor | None
    batch_size: int
    seed: int
    bar: Any

    def generator(self) -> torch.Generator:
        """A fresh generator, so every grid point sees the same noise."""
        return torch.Generator(device=self.pipeline.device).manual_seed(self.seed)

    def batches(self, index: Tensor) -> Iterator[tuple[Tensor, Tensor | None, Tensor | None]]:
        """``(images, masks, foreground)`` of the cases in ``index``, a batch at a time, on the device."""
        device = self.pipeline.device
        for start in range(0, len(index), self.batch_size):
            batch = index[start : start + self.batch_size]
            images = self.pipeline.check_images(self.images[batch])
            masks = None if self.masks is None else self.masks[batch].to(device, torch.bool)
            foreground = None if self.foreground is None else self.foreground[batch].to(device, torch.bool)
            yield images, masks, foreground
            self.bar.update(1)

    def reconstruct(self, images: Tensor, t: int, generator: torch.Generator) -> Tensor:
        """The first stage's reconstruction, exactly as ``pipeline.detect`` computes it."""
        return self.pipeline.reconstruct(images, generator, t=t)


def calibrate(
    pipeline: SynomalyPipeline,
    images: Tensor,
    masks: Tensor | None = None,
    *,
    foreground: Tensor | None = None,
    grid: CalibrationGrid = CalibrationGrid(),
    percentile: float = 99.0,
    batch_size: int = 32,
    seed: int = 0,
    progress: bool = True,
) -> CalibrationResult:
    """Choose detection settings on preprocessed validation slices.

    Args:
        pipeline: The trained model.
        images: Validation slices ``[N, 1, H, W]`` in [-1, 1].
        masks: Lesion masks ``[N, 1, H, W]`` (bool); an empty mask marks a healthy slice, ``None``
            marks every slice healthy.
        foreground: Optional ``[N, 1, H, W]`` region; nothing is flagged or counted outside it.
        grid: Candidate settings of the Dice grid search.
        percentile: Percentile of healthy anomaly-map values for the unsupervised threshold.
        batch_size: Slices per network call.
        seed: Seed of the inference noise; every grid point sees the same noise.
        progress: Show a progress bar.

    Returns:
        The chosen settings, how they were chosen, and the whole grid table.

    Raises:
        ValueError: On empty or mis-shaped inputs, or ``percentile`` outside [0, 100].
        ConfigError: On a grid ``t`` beyond the model's schedule or a bad ``batch_size``.
    """
    check_inputs(images, masks, foreground)
    if not pipeline.method.uses_timestep and len(grid.t) > 1:  # t changes nothing: one pass, not one per value
        grid = dataclasses.replace(grid, t=(pipeline.config.detect.t,))
    _check_options(pipeline, grid, percentile, batch_size)
    anomalous = masks.flatten(1).any(1).cpu() if masks is not None else torch.zeros(len(images), dtype=torch.bool)
    lesioned, healthy = anomalous.nonzero().flatten(), (~anomalous).nonzero().flatten()
    total = _count_batches(len(lesioned), batch_size) * _passes(grid) + _count_batches(len(healthy), batch_size)
    _announce(pipeline, images, grid, len(lesioned), len(healthy), batch_size, seed)
    with tqdm(total=total, desc="calibrate", unit="batch", disable=not progress) as bar:
        run = _Runner(pipeline, images, masks, foreground, batch_size, seed, bar)
        result = _choose(run, grid, lesioned, percentile)
        if len(healthy):
            result.healthy_percentile_threshold = _healthy_percentile(
                run, healthy, result.detect["t"], result.detect["kernel"], percentile
            )
    result.n_anomalous, result.n_healthy = len(lesioned), len(healthy)
    _apply_fallbacks(result)
    log.info("calibration (%s): %s, validation Dice %s", result.method, result.detect, result.score)
    return result


def _announce(pipeline: SynomalyPipeline, images: Tensor, grid: CalibrationGrid, n_lesioned: int, n_healthy: int,
              batch_size: int, seed: int) -> None:
    """Log the grid's size, its worst-case network evaluations and a time estimate from one timed batch."""
    import time

    points = len(grid.t) * len(grid.kernel) * len(grid.threshold) * len(grid.max_stages) * len(grid.fusion)
    cost = max(stage_cost(pipeline.detect_config(t=t), pipeline.config.method) for t in grid.t)
    single = len(grid.t) if 1 in grid.max_stages else 0
    multi = len(grid.t) * len(grid.kernel) * len(grid.threshold) * len(grid.fusion) if max(grid.max_stages) > 1 else 0
    evaluations = cost * (n_lesioned * (single + multi * max(grid.max_stages)) + n_healthy)
    if evaluations == 0:
        log.info("calibration grid: %d settings, no network evaluations", points)
        return
    batch = pipeline.check_images(images[: min(batch_size, len(images))])
    start = time.perf_counter()
    pipeline.reconstruct(batch, torch.Generator(device=pipeline.device).manual_seed(seed), t=grid.t[0])
    per_image = (time.perf_counter() - start) / len(batch) / max(cost, 1)
    seconds = evaluations * per_image
    log.info("calibration grid: %d settings on %d validation slices with lesions (%d healthy): at most %d network "
             "evaluations, about %s here (multi-stage images that stop early cost less)",
             points, n_lesioned, n_healthy, evaluations, f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.0f} min")


def _check_options(pipeline: SynomalyPipeline, grid: CalibrationGrid, percentile: float, batch_size: int) -> None:
    for t in grid.t:
        if t >= pipeline.schedule.num_timesteps:
            raise ConfigError("grid.t", f"must be < T={pipeline.schedule.num_timesteps}, got {t}")
    if not 0.0 <= percentile <= 100.0:
        raise ConfigError("percentile", f"must be in [0, 100], got {percentile}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError("batch_size", f"must be a positive integer, got {batch_size!r}")


def _count_batches(n: int, batch_size: int) -> int:
    return -(-n // batch_size)


def _passes(grid: CalibrationGrid) -> int:
    """Passes over the anomalous slices: one per ``t`` (single stage), one per multi-stage setting."""
    single = len(grid.t) if 1 in grid.max_stages else 0
    if max(grid.max_stages) == 1:
        return single
    return single + len(grid.t) * len(grid.kernel) * len(grid.threshold) * len(grid.fusion)


def _choose(run: _Runner, grid: CalibrationGrid, lesioned: Tensor, percentile: float) -> CalibrationResult:
    """The Dice grid search when lesions exist, else the config's settings awaiting the percentile rule."""
    base = run.pipeline.config.detect
    result = CalibrationResult(
        detect={name: getattr(base, name) for name in TUNED_FIELDS},
        method="healthy-percentile",
        score=None,
        table=[],
        healthy_percentile_threshold=None,
        n_anomalous=0,
        n_healthy=0,
        grid=grid.to_dict(),
        percentile=percentile,
    )
    if len(lesioned):
        result.table = _single_stage_rows(run, grid, lesioned) + _multistage_rows(run, grid, lesioned)
        best = _best(result.table)
        result.detect = {name: best[name] for name in TUNED_FIELDS}
        result.method, result.score = "dice-grid", best["dice"]
    return result


def _apply_fallbacks(result: CalibrationResult) -> None:
    """Log and record every fallback; apply the percentile rule when no lesions were available."""
    if result.n_healthy == 0:
        _warn(result, "no healthy validation slices: the healthy-percentile threshold is not available")
    elif result.healthy_percentile_threshold is None:
        _warn(result, "the healthy validation slices have no foreground pixels: no healthy-percentile threshold")
    if result.method == "dice-grid" and result.score is not None and result.score < LOW_DICE:
        _warn(result, f"the best validation Dice is {result.score:.3f}: the model finds almost none of the lesions at any "
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


def _row(point: tuple[int, int, float, int, str], dice_sum: float, nfe_sum: float, n: int) -> dict[str, Any]:
    """A table row: the settings (in ``TUNED_FIELDS`` order), mean Dice and network evaluations over ``n`` slices."""
    return {**dict(zip(TUNED_FIELDS, point)), "dice": dice_sum / n, "nfe": nfe_sum / n, "n": n}


def _best(table: list[dict[str, Any]]) -> dict[str, Any]:
    """Highest mean Dice; ties go to fewer network evaluations, then smaller ``t``, then grid order."""
    # Rounding keeps Dice values that differ only by summation order tied, so the cheaper point wins.
    return min(table, key=lambda row: (-round(row["dice"], 12), row["nfe"], row["t"]))


def _single_stage_rows(run: _Runner, grid: CalibrationGrid, index: Tensor) -> list[dict[str, Any]]:
    """Score every single-stage (kernel, threshold) from one reconstruction per ``t``.

    With one stage the reconstruction depends on ``t`` only, so each ``t`` costs one network
    evaluation per slice however many kernels and thresholds are scored from it.
    """
    if 1 not in grid.max_stages:
        return []
    base = run.pipeline.config.detect
    sums = torch.zeros(len(grid.t), len(grid.kernel), len(grid.threshold), dtype=torch.float64)
    for i, t in enumerate(grid.t):
        generator = run.generator()
        for images, target, fg in run.batches(index):
            recon = run.reconstruct(images, t, generator)
            for j, kernel in enumerate(grid.kernel):
                sums[i, j] += _threshold_dice(images, recon, target, fg, kernel, grid.threshold, base).sum(1).cpu()
    pipe = run.pipeline
    return [
        _row((t, kernel, threshold, 1, base.fusion), float(sums[i, j, m]),
             len(index) * stage_cost(pipe.detect_config(t=t), pipe.config.method), len(index))
        for (i, t), (j, kernel), (m, threshold) in itertools.product(
            enumerate(grid.t), enumerate(grid.kernel), enumerate(grid.threshold)
        )
    ]


def _threshold_dice(
    images: Tensor, recon: Tensor, target: Tensor, fg: Tensor | None, kernel: int,
    thresholds: tuple[float, ...], base: DetectConfig,
) -> Tensor:
    """Per-slice Dice ``[len(thresholds), B]`` of the one-stage mask at every threshold.

    The mask rule is ``synomaly.detect.stage_mask``'s (a test pins the equality with ``detect``),
    but the blur runs once per kernel and small components of all thresholds go in one batched call.
    """
    diff = difference_map(images, recon, kernel)
    if fg is not None:
        diff = diff * fg
    levels = torch.tensor(thresholds, dtype=diff.dtype, device=diff.device).view(-1, 1, 1, 1, 1)
    masks, _ = remove_small_components(above_threshold(diff, levels).flatten(0, 1), base.min_size, base.connectivity)
    counts = confusion_counts(masks, target.repeat(len(thresholds), 1, 1, 1))
    return dice(counts).view(len(thresholds), -1)


def _multistage_rows(run: _Runner, grid: CalibrationGrid, index: Tensor) -> list[dict[str, Any]]:
    """Score every multi-stage point with ``pipeline.detect``: the mask drives the fusion, so no shortcut.

    A run with ``S`` stages contains every shorter run: images stop by the same rule and draw the
    same noise, so stage ``s`` of ``detect``'s padded ``stage_masks`` is the final mask of a run with
    ``max_stages = s``. Each (t, kernel, threshold, fusion) therefore runs once, at the largest ``S``.
    """
    rows = []
    stages = [s for s in grid.max_stages if s > 1]
    if not stages:
        return rows
    for t, kernel, threshold, fusion in itertools.product(grid.t, grid.kernel, grid.threshold, grid.fusion):
        generator = run.generator()
        dice_sums, nfe_sums = torch.zeros(len(stages), dtype=torch.float64), torch.zeros(len(stages))
        settings = {"t": t, "kernel": kernel, "threshold": threshold, "max_stages": max(stages), "fusion": fusion}
        cost = stage_cost(run.pipeline.detect_config(**settings), run.pipeline.config.method)
        for images, target, fg in run.batches(index):
            out = run.pipeline.detect(images, generator, fg, **settings)
            for i, limit in enumerate(stages):
                mask = out.stage_masks[:, min(limit, out.stage_masks.shape[1]) - 1]
                dice_sums[i] += dice(confusion_counts(mask, target)).sum().cpu()
                nfe_sums[i] += out.stages.clamp(max=limit).sum().cpu() * cost
        rows += [
            _row((t, kernel, threshold, limit, fusion), float(dice_sums[i]), float(nfe_sums[i]), len(index))
            for i, limit in enumerate(stages)
        ]
    return rows


def _healthy_percentile(run: _Runner, index: Tensor, t: int, kernel: int, percentile: float) -> float | None:
    """The percentile of one-stage anomaly-map values on healthy slices, inside the foreground.

    ``None`` when the healthy slices hold no foreground pixel.
    """
    size = run.images[0].numel()
    n_values = len(index) * size if run.foreground is None else int(run.foreground[index].bool().sum())
    if n_values == 0:
        return None
    quantile = _UpperPercentile(n_values, percentile)
    generator = run.generator()
    for images, _, fg in run.batches(index):
        diff = difference_map(images, run.reconstruct(images, t, generator), kernel)
        quantile.update(diff.flatten() if fg is None else diff[fg])
    return quantile.compute()


class _UpperPercentile:
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
