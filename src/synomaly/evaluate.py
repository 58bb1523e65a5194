"""Evaluate a pipeline on preprocessed test slices (docs/method.md §6).

One batched pass runs ``detect`` and feeds a :class:`~synomaly.metrics.SegmentationEvaluator`
(per-case, per-volume and pooled metrics, pixel AP/AUROC on the raw map, image AUROC with the mask
area as score; per volume, the 3-D Dice and the lesion-wise metrics of its slices stacked in
order), pooled PR and ROC curves in constant memory, the per-stage Dice of the multi-stage loop,
its cost, and a running selection of a few cases to look at. No anomaly map is kept beyond its
batch except those of the selected cases (the masks of every slice are kept at two bits per pixel).

Written results (:func:`write_evaluation`) are ``metrics.json`` (everything but the case arrays; NaN
is written as ``null``), ``per_case.csv``, ``per_volume.csv`` (with volume ids) and ``cases.npz``
(loadable with ``allow_pickle=False``).
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from synomaly._evaluation_io import (
    CASES_NAME,
    METRICS_NAME,
    PER_CASE_NAME,
    PER_VOLUME_NAME,
    read_evaluation,
    write_evaluation,
)
from synomaly.detect import DetectionOutput, check_inputs
from synomaly.errors import ConfigError
from synomaly.maps import above_threshold, remove_small_components
from synomaly.metrics import Counts, PixelRankingMetrics, SegmentationEvaluator, confusion_counts, dice, fpr, iou, nanmean_count
from synomaly.pipeline import SynomalyPipeline
from synomaly.volume_keeper import VolumeKeeper
from synomaly.volumes import VolumeLayout

__all__ = ["CASES_NAME", "METRICS_NAME", "PER_CASE_NAME", "PER_VOLUME_NAME", "EvaluationResult", "evaluate",
           "read_evaluation", "write_evaluation"]

MAP_MAX = 2.0  # |blur(x) - blur(x_hat)| of images in [-1, 1] never exceeds 2
CURVE_THRESHOLDS = 200
ORACLE_CHUNK = 8  # threshold levels of the oracle Dice handled at once
SSIM_MIN_SIZE = 11  # the SSIM window; smaller images get no SSIM


@dataclass
class EvaluationResult:
    """Outcome of :func:`evaluate`.

    Attributes:
        metrics: ``SegmentationEvaluator.compute()`` output (``settings``, ``per_case``,
            ``aggregate``, and ``per_volume`` with volume ids), plus ``detect`` (the settings used)
            and ``curves`` (pooled pixel ``pr`` and ``roc`` curves). ``aggregate`` also holds
            ``nfe_mean``, ``nfe_max``, ``ms_per_image`` and ``dice_per_stage``.
        cases: Arrays of up to ``keep_cases`` cases: the worst and best anomalous cases by Dice
            (worst first), then a few healthy ones. Keys ``case_id`` (str ``[K]``), ``image``,
            ``reconstruction``, ``anomaly_map`` (float32 ``[K, H, W]``), ``mask``, ``target`` (bool
            ``[K, H, W]``), ``stage_reconstructions`` (float32 ``[K, S, H, W]``), ``stage_masks``
            (bool ``[K, S, H, W]``), ``dice`` (float64 ``[K]``, NaN for healthy), ``stages``
            (int64 ``[K]``). ``S`` is the most stages any image ran; an image that stopped earlier
            repeats its last stage.
        volumes: Every slice of a few whole volumes, for the report's viewer
            (:meth:`synomaly.volume_keeper.VolumeKeeper.arrays`); empty without volume ids.
    """

    metrics: dict[str, Any]
    cases: dict[str, np.ndarray]
    volumes: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)


def evaluate(
    pipeline: SynomalyPipeline,
    images: Tensor,
    masks: Tensor | None,
    *,
    case_ids: list[str],
    group_ids: list[str] | None = None,
    slice_numbers: list[int] | None = None,
    foreground: Tensor | None = None,
    volumes: VolumeLayout | None = None,
    batch_size: int = 32,
    seed: int = 0,
    ap_thresholds: int | None = None,
    keep_cases: int = 12,
    progress: bool = True,
    also_thresholds: Sequence[float] = (),
    **detect_overrides: Any,
) -> EvaluationResult:
    """Detect anomalies in test slices and measure them against the lesion masks.

    Args:
        pipeline: The trained (and calibrated) model.
        images: Test slices ``[N, 1, H, W]`` in [-1, 1].
        masks: Lesion masks ``[N, 1, H, W]`` (bool); ``None`` means every slice is healthy.
        case_ids: One name per slice.
        group_ids: Volume (patient) of each slice, for per-volume metrics.
        slice_numbers: Each slice's number within its volume (the order of the volumes kept for
            the report's viewer); the order of ``images`` when ``None``.
        foreground: Optional region ``[N, 1, H, W]``; nothing is flagged outside it.
        volumes: Each slice's number in its volume and voxel volume (``synomaly.volumes.volume_layout``),
            for the lesion-wise metrics per volume; ``None``: slices in the order given, sizes in voxels.
        batch_size: Slices per ``detect`` call.
        seed: Seed of the inference noise.
        ap_thresholds: ``None`` for exact pooled AP/AUROC (keeps every map pixel on the host, 5
            bytes each, until the end), or a number of bins on ``clip(map / 2, 0, 1)`` (constant memory).
        keep_cases: How many cases to keep arrays of.
        progress: Show a progress bar.
        also_thresholds: Further map thresholds whose masks are scored from the same pass (``aggregate_at``
            in the metrics: Dice, IoU and healthy-slice FPR). One-stage settings only: a later stage's
            input depends on the threshold, so a multi-stage mask cannot be made from the final map.
        **detect_overrides: ``DetectConfig`` fields overriding the pipeline's settings.

    Returns:
        The metrics and the kept cases.
    """
    check_inputs(images, masks, foreground)
    _check_options(len(images), case_ids, group_ids, batch_size, keep_cases)
    if volumes is not None and not len(volumes.positions) == len(volumes.voxel_ml) == len(images):
        raise ValueError(f"got a volume layout of {len(volumes.positions)} slices for {len(images)} images")
    config = pipeline.detect_config(**detect_overrides)
    if also_thresholds and config.max_stages != 1:
        raise ConfigError("also_thresholds", f"needs one-stage settings (max_stages 1, got {config.max_stages}): later stages "
                                             "depend on the threshold")
    anomalous = masks.flatten(1).any(1) if masks is not None else torch.zeros(len(images), dtype=torch.bool)
    state = _State(
        evaluator=SegmentationEvaluator(ap_thresholds=ap_thresholds, map_max=MAP_MAX, volume_connectivity=config.connectivity),
        curves=PixelRankingMetrics(CURVE_THRESHOLDS, MAP_MAX, curves=True),
        stages=_StageDice(config.max_stages),
        keeper=_CaseKeeper(keep_cases, int(anomalous.sum()), int((~anomalous).sum())),
        at=_AtThresholds(tuple(also_thresholds), config.min_size, config.connectivity),
    )
    kept_volumes = VolumeKeeper(masks, group_ids, slice_numbers, len(images))
    generator = torch.Generator(device=pipeline.device).manual_seed(seed)
    starts = range(0, len(images), batch_size)
    for start in tqdm(starts, desc="evaluate", unit="batch", disable=not progress):
        batch = slice(start, start + batch_size)
        x0 = pipeline.check_images(images[batch])
        target = _batch_mask(masks, batch, x0)
        fg = None if foreground is None else foreground[batch].to(x0.device, torch.bool)
        out = state.detect(pipeline, x0, generator, fg, detect_overrides)
        layout = None if volumes is None or group_ids is None else (volumes.positions[batch], volumes.voxel_ml[batch])
        state.update(start, x0, target, out, case_ids[batch], None if group_ids is None else group_ids[batch], fg, layout)
        kept_volumes.update(start, x0, target, out, fg)
    metrics = state.summary(len(images))
    metrics["detect"] = dataclasses.asdict(config)
    metrics["settings"].update(
        seed=seed, batch_size=batch_size, device=str(pipeline.device), curve_thresholds=CURVE_THRESHOLDS
    )
    return EvaluationResult(metrics, state.keeper.arrays(list(case_ids), images.shape[-2:], state.stages.ran),
                            kept_volumes.arrays(case_ids))


def _check_options(n: int, case_ids: list[str], group_ids: list[str] | None, batch_size: int, keep_cases: int) -> None:
    if len(case_ids) != n:
        raise ValueError(f"got {len(case_ids)} case ids for {n} images")
    if group_ids is not None and len(group_ids) != n:
        raise ValueError(f"got {len(group_ids)} group ids for {n} images")
    for name, value, low in (("batch_size", batch_size, 1), ("keep_cases", keep_cases, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ConfigError(name, f"must be an integer >= {low}, got {value!r}")


def _batch_mask(masks: Tensor | None, batch: slice, like: Tensor) -> Tensor:
    if masks is None:
        return torch.zeros_like(like, dtype=torch.bool)
    return masks[batch].to(like.device, torch.bool)


class _AtThresholds:
    """Dice, IoU and healthy-slice FPR of one-stage masks at further thresholds, from the same maps.

    A one-stage mask is the (foreground-zeroed) map at or above the threshold, less its small components
    (``synomaly.detect.stage_mask``), so another threshold needs no other network evaluation.
    """

    def __init__(self, thresholds: tuple[float, ...], min_size: int, connectivity: int) -> None:
        self.thresholds, self.min_size, self.connectivity = thresholds, min_size, connectivity
        self._counts: list[list[Counts]] = [[] for _ in thresholds]

    def update(self, anomaly_map: Tensor, target: Tensor) -> None:
        if not self.thresholds:
            return
        levels = torch.tensor(self.thresholds, device=anomaly_map.device, dtype=anomaly_map.dtype).view(-1, 1, 1, 1, 1)
        masks, _ = remove_small_components(above_threshold(anomaly_map, levels).flatten(0, 1), self.min_size, self.connectivity)
        for counts, mask in zip(self._counts, masks.unflatten(0, (len(self.thresholds), -1))):
            counts.append(confusion_counts(mask, target).cpu())

    def compute(self) -> list[dict[str, float]]:
        rows = []
        for threshold, parts in zip(self.thresholds, self._counts):
            counts = Counts.cat(parts)
            anomalous = counts.tp + counts.fn > 0
            rows.append({"threshold": threshold, "dice_mean": nanmean_count(dice(counts)[anomalous])[0],
                         "dice_pooled": float(dice(counts.sum())), "iou_mean": nanmean_count(iou(counts)[anomalous])[0],
                         "fpr_healthy_mean": nanmean_count(fpr(counts)[~anomalous])[0]})
        return rows


class _OracleDice:
    """Test Dice at the best single map threshold chosen ON THE TEST SET: an oracle, for comparison with papers.

    At each of ``levels`` thresholds of the final anomaly map (no small-component filter) it adds up
    the per-slice Dice over anomalous slices and the pooled confusion counts; ``compute`` returns the
    best of each. It is never a way to choose settings: the honest number is the validation-tuned one.
    """

    def __init__(self, levels: int = CURVE_THRESHOLDS) -> None:
        self._levels = torch.linspace(0.0, MAP_MAX, levels + 1)[1:]
        self._sums = torch.zeros(levels, dtype=torch.float64)
        self._counts = torch.zeros(levels, 4, dtype=torch.float64)
        self._n = torch.zeros((), dtype=torch.long)  # anomalous slices seen

    def update(self, anomaly_map: Tensor, target: Tensor) -> None:
        """Add a batch of raw maps and bool targets (healthy slices add to the pooled counts only).

        Everything stays on the map's device; nothing is copied to the host until :meth:`compute`.
        """
        device = anomaly_map.device
        self._levels, self._sums, self._counts, self._n = (x.to(device) for x in (self._levels, self._sums, self._counts, self._n))
        flat_map, flat_target = anomaly_map.flatten(1), target.flatten(1)
        anomalous = flat_target.any(1)
        for start in range(0, len(self._levels), ORACLE_CHUNK):  # a few levels at a time: memory of a few masks
            chunk = self._levels[start : start + ORACLE_CHUNK].view(-1, 1, 1)
            pred = flat_map.unsqueeze(0) >= chunk  # [L, B, H*W]
            tp = (pred & flat_target).sum(2)
            fp = pred.sum(2) - tp
            fn = flat_target.sum(1) - tp
            tn = flat_target.shape[1] - tp - fp - fn
            rows = slice(start, start + len(chunk))
            self._counts[rows] += torch.stack([tp.sum(1), fp.sum(1), fn.sum(1), tn.sum(1)], dim=1).double()
            self._sums[rows] += (dice(Counts(tp, fp, fn, tn)) * anomalous).sum(1)
        self._n = self._n + anomalous.sum()

    def compute(self) -> dict[str, float | None]:
        n = int(self._n)
        if not n:
            return {"dice_oracle_mean": None, "dice_oracle_threshold": None, "dice_oracle_pooled": None}
        means = self._sums.cpu() / n
        best = int(means.argmax())
        pooled = dice(Counts(*self._counts.cpu().unbind(1)))
        return {"dice_oracle_mean": float(means[best]), "dice_oracle_threshold": float(self._levels[best]),
                "dice_oracle_pooled": float(pooled.max())}


@dataclass
class _State:
    """Everything accumulated over the batches."""

    evaluator: SegmentationEvaluator
    curves: PixelRankingMetrics  # binned, for the pooled PR and ROC curves
    stages: _StageDice
    keeper: _CaseKeeper
    at: _AtThresholds
    oracle: _OracleDice = dataclasses.field(default_factory=_OracleDice)
    seconds: float = 0.0
    nfe_sum: int = 0
    nfe_max: int = 0

    def detect(
        self, pipeline: SynomalyPipeline, x0: Tensor, generator: torch.Generator, fg: Tensor | None,
        overrides: dict[str, Any],
    ) -> DetectionOutput:
        """``pipeline.detect`` with its wall time added up (the device is synchronised around it)."""
        _synchronize(x0.device)
        begin = time.perf_counter()
        out = pipeline.detect(x0, generator, fg, **overrides)
        _synchronize(x0.device)
        self.seconds += time.perf_counter() - begin
        return out

    def update(
        self, start: int, x0: Tensor, target: Tensor, out: DetectionOutput, case_ids: list[str],
        group_ids: list[str] | None, foreground: Tensor | None = None,
        layout: tuple[list[int | None], list[float | None]] | None = None,
    ) -> None:
        """Add one batch to every accumulator (``layout``: its slice positions and voxel volumes)."""
        with_ssim = min(x0.shape[-2:]) >= SSIM_MIN_SIZE
        positions, voxel_ml = layout if layout is not None else (None, None)
        self.evaluator.update(
            out.anomaly_map, out.mask, target, case_ids=case_ids, group_ids=group_ids, score=out.score,
            image=x0 if with_ssim else None, reconstruction=out.reconstruction if with_ssim else None,
            slice_positions=positions, voxel_ml=voxel_ml,
        )
        self.curves.update(out.anomaly_map, target)
        self.stages.update(out.stage_masks, target)
        self.oracle.update(out.anomaly_map, target)
        self.at.update(out.anomaly_map, target)
        self.keeper.update(start, x0, target, out, dice(confusion_counts(out.mask, target)).cpu(), foreground)
        self.nfe_sum += int(out.nfe.sum())
        self.nfe_max = max(self.nfe_max, int(out.nfe.max()))

    def summary(self, n: int) -> dict[str, Any]:
        """The evaluator's summary with cost, per-stage Dice and curves added."""
        metrics = self.evaluator.compute()
        metrics["aggregate"].update(
            nfe_mean=self.nfe_sum / n,
            nfe_max=self.nfe_max,
            ms_per_image=1000.0 * self.seconds / n,
            dice_per_stage=self.stages.compute(),
            **self.oracle.compute(),
        )
        if self.at.thresholds:
            metrics["aggregate_at"] = self.at.compute()
        metrics["curves"] = self.curves.curves()
        return metrics


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _StageDice:
    """Mean Dice over anomalous slices of the mask after each stage ``k = 1 .. max_stages``.

    An image that stopped at stage ``s`` keeps its stage-``s`` mask for every later ``k``, so the
    last entry equals the Dice of the final masks.

    Args:
        max_stages: The stage limit of the run.
    """

    def __init__(self, max_stages: int) -> None:
        self._sums = torch.zeros(max_stages, dtype=torch.float64)
        self._n = 0
        self.ran = 0

    def update(self, stage_masks: Tensor, target: Tensor) -> None:
        """Add a batch of ``[B, S, 1, H, W]`` stage masks and ``[B, 1, H, W]`` targets."""
        self.ran = max(self.ran, stage_masks.shape[1])
        anomalous = target.flatten(1).any(1)
        if not bool(anomalous.any()):
            return
        masks, target = stage_masks[anomalous], target[anomalous]
        count, stages = masks.shape[:2]
        counts = confusion_counts(masks.flatten(0, 1), target.repeat_interleave(stages, 0))
        per_stage = dice(counts).view(count, stages).cpu()
        # Pad to max_stages by repeating the last stage: this batch stopped before the others.
        padded = per_stage[:, torch.arange(len(self._sums)).clamp(max=stages - 1)]
        self._sums += padded.sum(0)
        self._n += count

    def compute(self) -> list[float]:
        """Mean Dice per stage up to the most stages any image ran (NaN without anomalous slices)."""
        if not self._n:
            return [math.nan] * self.ran
        return (self._sums[: self.ran] / self._n).tolist()


class _CaseKeeper:
    """Chooses the cases to keep while the batches stream by, holding only their arrays.

    Quotas are fixed up front from the known numbers of anomalous and healthy cases: a quarter of
    ``keep`` healthy cases (those with the largest predicted area, largest first; ties: the first
    met) and the rest split between the lowest and highest
    Dice among anomalous cases; a class with too few cases leaves its places to the other.

    Args:
        keep: Total number of cases to keep.
        n_anomalous: Anomalous cases in the data.
        n_healthy: Healthy cases in the data.
    """

    def __init__(self, keep: int, n_anomalous: int, n_healthy: int) -> None:
        healthy = min(n_healthy, keep // 4 if n_anomalous else keep)
        anomalous = min(n_anomalous, keep - healthy)
        self.n_healthy = min(n_healthy, keep - anomalous)
        self.n_worst = (anomalous + 1) // 2
        self.n_best = anomalous - self.n_worst
        self.anomalous: list[tuple[float, int, dict[str, np.ndarray]]] = []
        self.healthy: list[tuple[float, int, dict[str, np.ndarray]]] = []
        self._areas: dict[int, int] = {}  # predicted area of each kept healthy case

    def update(self, start: int, x0: Tensor, target: Tensor, out: DetectionOutput, dice_values: Tensor,
               foreground: Tensor | None = None) -> None:
        """Consider a batch whose first case has index ``start`` (``foreground``: where its maps count)."""
        fg = torch.ones_like(target, dtype=torch.bool) if foreground is None else foreground
        is_anomalous = target.flatten(1).any(1).cpu().tolist()
        new = [(float(dice_values[i]), start + i) for i, flag in enumerate(is_anomalous) if flag]
        pool = sorted([(d, i) for d, i, _ in self.anomalous] + new)
        if len(pool) > self.n_worst + self.n_best:
            pool = pool[: self.n_worst] + pool[len(pool) - self.n_best :]
        kept = {i: arrays for _, i, arrays in self.anomalous}
        self.anomalous = [(d, i, kept[i] if i in kept else _case_arrays(x0, target, fg, out, i - start))
                          for d, i in pool]
        # Healthy cases: those with the largest predicted area (the most false positives) so far.
        areas = out.mask.flatten(1).sum(1).cpu().tolist()
        ranking = [(-self._areas[i], i) for _, i, _ in self.healthy]
        ranking += [(-areas[j], start + j) for j, flag in enumerate(is_anomalous) if not flag]
        ranking = sorted(ranking)[: self.n_healthy]  # largest area first; ties: the first met
        kept_healthy = {i: arrays for _, i, arrays in self.healthy}
        self._areas = {i: -negative for negative, i in ranking}
        self.healthy = [(math.nan, i, kept_healthy[i] if i in kept_healthy
                         else _case_arrays(x0, target, fg, out, i - start))
                        for _, i in ranking]

    def arrays(self, case_ids: list[str], size: torch.Size, stages: int) -> dict[str, np.ndarray]:
        """The kept cases stacked, stage arrays padded to ``stages`` by repeating the last one."""
        chosen = self.anomalous + self.healthy
        height, width = size
        stack: dict[str, np.ndarray] = {
            "case_id": np.array([case_ids[i] for _, i, _ in chosen], dtype=np.str_),
            "dice": np.array([d for d, _, _ in chosen], dtype=np.float64),
        }
        shapes = {
            "image": ((height, width), np.float32), "reconstruction": ((height, width), np.float32),
            "anomaly_map": ((height, width), np.float32), "mask": ((height, width), bool),
            "target": ((height, width), bool), "foreground": ((height, width), bool), "stage_reconstructions": ((stages, height, width), np.float32),
            "stage_masks": ((stages, height, width), bool), "stages": ((), np.int64),
        }
        for key, (shape, dtype) in shapes.items():
            parts = [arrays[key] for _, _, arrays in chosen]
            if key.startswith("stage_"):
                parts = [_pad_stages(part, stages) for part in parts]
            stack[key] = np.stack(parts).astype(dtype) if parts else np.zeros((0, *shape), dtype=dtype)
        return stack


def _case_arrays(x0: Tensor, target: Tensor, foreground: Tensor, out: DetectionOutput, i: int) -> dict[str, np.ndarray]:
    """Host copies of one case's arrays (channel axis dropped)."""

    def host(x: Tensor) -> np.ndarray:
        return x.detach().cpu().numpy()

    return {
        "image": host(x0[i, 0]),
        "reconstruction": host(out.reconstruction[i, 0].float()),
        "anomaly_map": host(out.anomaly_map[i, 0].float()),
        "mask": host(out.mask[i, 0]),
        "target": host(target[i, 0]),
        "foreground": host(foreground[i, 0]),
        "stage_reconstructions": host(out.stage_reconstructions[i, :, 0].float()),
        "stage_masks": host(out.stage_masks[i, :, 0]),
        "stages": np.int64(int(out.stages[i])),
    }


def _pad_stages(values: np.ndarray, stages: int) -> np.ndarray:
    """Repeat the last stage of ``[s, H, W]`` up to ``stages`` entries."""
    index = np.minimum(np.arange(stages), len(values) - 1)
    return values[index]
