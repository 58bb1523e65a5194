"""Choose detection settings on validation data (docs/method.md §6: tuning on validation only).

Two rules, with explicit fallbacks (anomalib-style threshold finding):

* **dice-grid** (validation slices with lesion masks): every point of a :class:`CalibrationGrid`
  over ``t``, ``kernel``, ``threshold``, ``max_stages`` and ``fusion`` is scored by the mean
  per-slice Dice over the anomalous slices. By default (``selection="fewer-stages"``) the point
  with the fewest stages among those within one standard error of the best point's Dice wins (the
  one-standard-error rule: a gain smaller than the noise of the validation estimate does not pay
  for more stages); ``selection="best"`` takes the highest Dice. Ties: fewer network evaluations,
  then smaller ``t``, then grid order.
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
import hashlib
import itertools
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from synomaly import _atomic
from synomaly._json import json_safe
from synomaly.calibration_rules import (
    CALIBRATION_KEYS,
    LOW_DICE,
    SELECTIONS,
    TUNED_FIELDS,
    CalibrationGrid,
    CalibrationResult,
    UpperPercentile,
    apply_fallbacks,
    best_row,
    choose_row,
    grid_row,
    write_thresholds,
)
from synomaly.config import DetectConfig
from synomaly.detect import check_inputs, stage_cost, stage_mask
from synomaly.errors import ConfigError
from synomaly.maps import difference_map
from synomaly.metrics import confusion_counts, dice
from synomaly.pipeline import SynomalyPipeline

log = logging.getLogger(__name__)
ROW_FORMAT = 2  # the fields of a kept grid row (2: with ``dice_se``); progress files of another format are not reused

__all__ = ["CALIBRATION_KEYS", "LOW_DICE", "SELECTIONS", "CalibrationGrid", "CalibrationResult", "UpperPercentile", "calibrate",
           "json_safe", "write_thresholds"]

class _FinishedPasses:
    """Scored grid passes kept on disk (atomically, after each pass), so an interrupted calibration resumes.

    The file holds a fingerprint of everything that decides the scores (weights, config, data, seed,
    batch size); a file made with anything else is ignored and replaced.
    """

    def __init__(self, path: Path | None, fingerprint: str) -> None:
        self.path, self.fingerprint = path, fingerprint
        self.passes: dict[str, list[dict[str, Any]]] = {}
        if path is None or not path.is_file():
            return
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError):
            data = None
        if isinstance(data, dict) and data.get("fingerprint") == fingerprint and isinstance(data.get("passes"), dict):
            self.passes = data["passes"]
            log.info("resuming calibration: %d grid passes already scored (%s)", len(self.passes), path)
        else:
            log.info("%s holds passes of other data, settings or weights: starting afresh", path)

    def get(self, key: str) -> list[dict[str, Any]] | None:
        return self.passes.get(key)

    def put(self, key: str, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        self.passes[key] = rows
        if self.path is not None:
            _atomic.write_json(self.path, {"fingerprint": self.fingerprint, "passes": self.passes})
        return rows

    def finish(self) -> None:
        if self.path is not None:
            self.path.unlink(missing_ok=True)


def _fingerprint(pipeline: SynomalyPipeline, tensors: tuple[Tensor | None, ...], seed: int, batch_size: int) -> str:
    """SHA-256 over the weights, the config, the data, the seed, the batch size and what draws the noise and runs the
    network (device type, bf16, torch version): a CPU and a GPU generator give different noise for one seed."""
    setting = [pipeline.config.to_dict(), seed, batch_size, pipeline.device.type, pipeline.bf16, torch.__version__,
               ROW_FORMAT]
    digest = hashlib.sha256(json.dumps(setting, sort_keys=True, default=str).encode())

    def add(tensor: Tensor) -> None:
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())

    for name, value in sorted(pipeline.unet.state_dict().items()):
        digest.update(name.encode())
        add(value)
    for tensor in tensors:
        if tensor is None:
            digest.update(b"-")
        else:
            add(tensor)
    return digest.hexdigest()


@dataclass
class _Runner:
    """What every pass shares: the data, the pipeline, batching, the noise seed, one progress bar and the finished passes."""

    pipeline: SynomalyPipeline
    images: Tensor
    masks: Tensor | None
    foreground: Tensor | None
    batch_size: int
    seed: int
    bar: Any
    finished: _FinishedPasses

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

    def skip(self, index: Tensor) -> None:
        """Move the progress bar past a pass scored in an earlier run."""
        self.bar.update(_count_batches(len(index), self.batch_size))

    def reconstruct(self, images: Tensor, t: int, generator: torch.Generator) -> tuple[Tensor, Tensor | None]:
        """The first stage's reconstruction and map weight, exactly as ``pipeline.detect`` computes them."""
        return self.pipeline.reconstruct_weighted(images, generator, t=t)


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
    resume_file: str | Path | None = None,
    selection: str = "fewer-stages",
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
        resume_file: Where scored grid passes are kept as they finish, so a rerun after an interruption
            skips them (when weights, config, data, seed and batch size are the same); removed at the end.
        selection: How the Dice grid's point is chosen: ``fewer-stages`` (the fewest stages within one
            standard error of the best Dice) or ``best`` (the highest Dice).

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
    if selection not in SELECTIONS:
        raise ConfigError("selection", f"must be one of {', '.join(SELECTIONS)}, got {selection!r}")
    anomalous = masks.flatten(1).any(1).cpu() if masks is not None else torch.zeros(len(images), dtype=torch.bool)
    lesioned, healthy = anomalous.nonzero().flatten(), (~anomalous).nonzero().flatten()
    total = _count_batches(len(lesioned), batch_size) * _passes(grid) + _count_batches(len(healthy), batch_size)
    _announce(pipeline, images, grid, len(lesioned), len(healthy), batch_size)
    with tqdm(total=total, desc="calibrate", unit="batch", disable=not progress) as bar:
        path = None if resume_file is None else Path(resume_file)
        finished = _FinishedPasses(path, _fingerprint(pipeline, (images, masks, foreground), seed, batch_size) if path else "")
        run = _Runner(pipeline, images, masks, foreground, batch_size, seed, bar, finished)
        result = _choose(run, grid, lesioned, percentile, selection)
        if len(healthy):
            result.healthy_percentile_threshold = _healthy_percentile(
                run, healthy, result.detect["t"], result.detect["kernel"], percentile
            )
    result.n_anomalous, result.n_healthy = len(lesioned), len(healthy)
    finished.finish()
    apply_fallbacks(result)
    log.info("calibration (%s): %s, validation Dice %s", result.method, result.detect, result.score)
    return result


def _announce(pipeline: SynomalyPipeline, images: Tensor, grid: CalibrationGrid, n_lesioned: int, n_healthy: int,
              batch_size: int) -> None:
    """Log the grid's size, its worst-case network evaluations and a time estimate from one timed network call.

    One call, not one reconstruction: AutoDDPM's reconstruction alone takes 210 calls.
    """
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
    timesteps = torch.full((len(batch),), grid.t[0], device=batch.device, dtype=torch.long)
    start = time.perf_counter()
    with torch.no_grad():
        pipeline.network(batch, timesteps)
    if batch.device.type == "cuda":
        torch.cuda.synchronize(batch.device)
    per_image = (time.perf_counter() - start) / len(batch)
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


def _choose(run: _Runner, grid: CalibrationGrid, lesioned: Tensor, percentile: float, selection: str) -> CalibrationResult:
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
        selection=selection,
    )
    if len(lesioned):
        result.table = _single_stage_rows(run, grid, lesioned) + _multistage_rows(run, grid, lesioned)
        chosen, result.best = choose_row(result.table, selection), best_row(result.table)
        result.detect = {name: chosen[name] for name in TUNED_FIELDS}
        result.method, result.score = "dice-grid", chosen["dice"]
    return result


def _single_stage_rows(run: _Runner, grid: CalibrationGrid, index: Tensor) -> list[dict[str, Any]]:
    """Score every single-stage (kernel, threshold) from one reconstruction per ``t``.

    With one stage the reconstruction depends on ``t`` only, so each ``t`` costs one network
    evaluation per slice however many kernels and thresholds are scored from it.
    """
    if 1 not in grid.max_stages:
        return []
    base, pipe = run.pipeline.config.detect, run.pipeline
    rows: list[dict[str, Any]] = []
    for t in grid.t:
        key = json.dumps(["one stage", t, grid.kernel, grid.threshold])
        done = run.finished.get(key)
        if done is None:
            sums = torch.zeros(2, len(grid.kernel), len(grid.threshold), dtype=torch.float64)  # Dice, squared Dice
            generator = run.generator()
            for images, target, fg in run.batches(index):
                assert target is not None  # the lesioned slices have masks
                recon, weight = run.reconstruct(images, t, generator)
                for j, kernel in enumerate(grid.kernel):
                    values = _threshold_dice(images, recon, target, fg, kernel, grid.threshold, base, weight).double()
                    sums[:, j] += torch.stack([values.sum(1), values.square().sum(1)]).cpu()
            nfe = len(index) * stage_cost(pipe.detect_config(t=t), pipe.config.method)
            done = run.finished.put(key, [
                grid_row((t, kernel, threshold, 1, base.fusion), float(sums[0, j, m]), nfe, len(index), float(sums[1, j, m]))
                for (j, kernel), (m, threshold) in itertools.product(enumerate(grid.kernel), enumerate(grid.threshold))
            ])
        else:
            run.skip(index)
        rows += done
    return rows


def _threshold_dice(
    images: Tensor, recon: Tensor, target: Tensor, fg: Tensor | None, kernel: int,
    thresholds: tuple[float, ...], base: DetectConfig, weight: Tensor | None = None,
) -> Tensor:
    """Per-slice Dice ``[len(thresholds), B]`` of the one-stage mask (``detect.stage_mask``) at every threshold."""
    config = dataclasses.replace(base, kernel=kernel)
    _, masks, _ = stage_mask(images, recon, config, fg, torch.tensor(thresholds, dtype=torch.float64), weight)
    counts = confusion_counts(masks, target.repeat(len(thresholds), 1, 1, 1))
    return dice(counts).view(len(thresholds), -1)


def _multistage_rows(run: _Runner, grid: CalibrationGrid, index: Tensor) -> list[dict[str, Any]]:
    """Score every multi-stage point with ``pipeline.detect``: the mask drives the fusion, so no shortcut.

    A run with ``S`` stages contains every shorter run: images stop by the same rule and draw the
    same noise, so stage ``s`` of ``detect``'s padded ``stage_masks`` is the final mask of a run with
    ``max_stages = s``. Each (t, kernel, threshold, fusion) therefore runs once, at the largest ``S``.
    """
    rows: list[dict[str, Any]] = []
    stages = [s for s in grid.max_stages if s > 1]
    if not stages:
        return rows
    for t, kernel, threshold, fusion in itertools.product(grid.t, grid.kernel, grid.threshold, grid.fusion):
        key = json.dumps(["stages", t, kernel, threshold, fusion, stages])
        done = run.finished.get(key)
        if done is not None:
            run.skip(index)
            rows += done
            continue
        generator = run.generator()
        dice_sums, nfe_sums = torch.zeros(2, len(stages), dtype=torch.float64), torch.zeros(len(stages))  # Dice, squared
        settings = {"t": t, "kernel": kernel, "threshold": threshold, "max_stages": max(stages), "fusion": fusion}
        config = run.pipeline.detect_config(**settings)
        cost = stage_cost(config, run.pipeline.config.method)
        for images, target, fg in run.batches(index):
            assert target is not None  # the lesioned slices have masks
            out = run.pipeline.detect(images, generator, fg, config=config)
            for i, limit in enumerate(stages):
                mask = out.stage_masks[:, min(limit, out.stage_masks.shape[1]) - 1]
                values = dice(confusion_counts(mask, target)).double()
                dice_sums[:, i] += torch.stack([values.sum(), values.square().sum()]).cpu()
                nfe_sums[i] += out.stages.clamp(max=limit).sum().cpu() * cost
        rows += run.finished.put(key, [
            grid_row((t, kernel, threshold, limit, fusion), float(dice_sums[0, i]), float(nfe_sums[i]), len(index),
                     float(dice_sums[1, i]))
            for i, limit in enumerate(stages)
        ])
    return rows


def _healthy_percentile(run: _Runner, index: Tensor, t: int, kernel: int, percentile: float) -> float | None:
    """The percentile of one-stage anomaly-map values on healthy slices, inside the foreground.

    ``None`` when the healthy slices hold no foreground pixel.
    """
    size = run.images[0].numel()
    n_values = len(index) * size if run.foreground is None else int(run.foreground[index].bool().sum())
    if n_values == 0:
        return None
    quantile = UpperPercentile(n_values, percentile)
    generator = run.generator()
    for images, _, fg in run.batches(index):
        recon, weight = run.reconstruct(images, t, generator)
        diff = difference_map(images, recon, kernel, weight)
        quantile.update(diff.flatten() if fg is None else diff[fg])
    return quantile.compute()


