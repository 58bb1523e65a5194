"""Per-case metrics accumulated over a test set and their aggregation per slice, per volume and pooled."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from synomaly.metrics._distance import Spacing, _check_spacing, hd95, ssim
from synomaly.metrics._overlap import _COUNT_METRICS, Counts, confusion_counts
from synomaly.metrics._ranking import PixelRankingMetrics, image_auroc, image_average_precision, per_image_average_precision
from synomaly.metrics._volume import VolumeLesions


def nanmean_count(values: Tensor) -> tuple[float, int]:
    """Mean of the defined (non-NaN) values and how many there were; NaN and 0 when none are."""
    defined = ~values.isnan()
    n = int(defined.sum())
    return (float(values[defined].double().mean()) if n else math.nan), n


class SegmentationEvaluator:
    """Accumulates per-case metrics over a test set; :meth:`compute` returns a JSON-ready summary.

    Memory per case is a few scalars, plus, in exact AP mode only, every anomaly-map pixel
    (4 bytes) and target pixel (1 byte), and, with group ids, two bits per pixel for the lesion-wise
    metrics of each volume (:class:`~synomaly.metrics._volume.VolumeLesions`).

    Args:
        ap_thresholds: ``None`` for exact pooled AP/AUROC, or the number of bins (constant memory).
        map_max: Scale for binned mode, see :class:`PixelRankingMetrics`.
        spacing: Pixel size for HD95, one number or (row, column); ``None`` means pixels.
        ssim_data_range: Value range of image and reconstruction for SSIM.
        volume_connectivity: 3-D connectivity of a volume's lesions: 1 (faces) to 3 (and corners).
    """

    def __init__(
        self,
        ap_thresholds: int | None = None,
        map_max: float | None = None,
        spacing: Spacing = None,
        ssim_data_range: float = 2.0,
        volume_connectivity: int = 1,
    ) -> None:
        self.spacing = _check_spacing(spacing)
        self.ssim_data_range = ssim_data_range
        self._ranking = PixelRankingMetrics(ap_thresholds, map_max)
        self._volumes = VolumeLesions(volume_connectivity)
        self.reset()

    def reset(self) -> None:
        """Forget every update."""
        self._ranking.reset()
        self._volumes.reset()
        self._counts: list[Counts] = []
        self._columns: dict[str, list[Tensor]] = {"hd95": [], "ap": [], "ssim": [], "score": []}
        self._case_ids: list[str] = []
        self._group_ids: list[str] | None = None
        self._has_score: bool | None = None

    def update(
        self,
        anomaly_map: Tensor,
        pred_mask: Tensor,
        target: Tensor,
        *,
        case_ids: list[str] | None = None,
        group_ids: list[str] | None = None,
        score: Tensor | None = None,
        image: Tensor | None = None,
        reconstruction: Tensor | None = None,
        spacing: Spacing = None,
        slice_positions: list[int | None] | None = None,
        voxel_ml: list[float | None] | None = None,
    ) -> None:
        """Add a batch of ``B`` cases.

        Args:
            anomaly_map: Raw non-negative anomaly map, float ``[B, 1, H, W]``.
            pred_mask: Thresholded prediction, bool ``[B, 1, H, W]``.
            target: Ground truth, bool ``[B, 1, H, W]``.
            case_ids: Names of the cases; defaults to their running index.
            group_ids: Volume (patient) of each case; give them in every update or in none.
            score: Image-level anomaly score ``[B]``; give it in every update or in none.
            image: Input images ``[B, C, H, W]``, for SSIM (needs ``reconstruction`` too).
            reconstruction: Reconstructed images, same shape as ``image``.
            spacing: Pixel size of this batch for HD95 (e.g. each file's own); ``None``: the evaluator's.
            slice_positions: Each case's slice number in its volume (needs ``group_ids``); ``None``: the
                order the volume's slices arrive in. Missing numbers split a volume's lesions there.
            voxel_ml: Each case's voxel volume in mL for the lesion volumes; ``None``: unknown (voxels).
        """
        batch, first = target.shape[0], not self._counts
        # Validate and compute everything before touching the state, so a bad batch leaves no trace.
        names = self._names(case_ids, batch)
        groups = self._groups(group_ids, batch, first)
        columns = {
            "hd95": hd95(pred_mask, target, self.spacing if spacing is None else spacing),
            "ap": per_image_average_precision(anomaly_map, target),
            "ssim": self._ssim_or_nan(image, reconstruction, batch),
            "score": self._score_or_nan(score, batch, first),
        }
        if groups is not None:  # validates its own arguments before it keeps anything
            self._volumes.update(pred_mask, target, slice_positions, voxel_ml)
        elif slice_positions is not None or voxel_ml is not None:
            raise ValueError("slice_positions and voxel_ml describe volumes: they need group_ids")
        self._counts.append(confusion_counts(pred_mask, target).cpu())
        self._ranking.update(anomaly_map, target)
        for name, values in columns.items():
            self._columns[name].append(values)
        self._case_ids += names
        self._has_score = score is not None
        if groups is not None:
            self._group_ids = (self._group_ids or []) + groups

    def _names(self, case_ids: list[str] | None, batch: int) -> list[str]:
        if case_ids is None:
            start = len(self._case_ids)
            return [str(i) for i in range(start, start + batch)]
        if len(case_ids) != batch:
            raise ValueError(f"got {len(case_ids)} case ids for a batch of {batch}")
        return [str(c) for c in case_ids]

    def _groups(self, group_ids: list[str] | None, batch: int, first: bool) -> list[str] | None:
        if not first and (group_ids is None) != (self._group_ids is None):
            raise ValueError("group_ids must be given in every update or in none")
        if group_ids is not None and len(group_ids) != batch:
            raise ValueError(f"got {len(group_ids)} group ids for a batch of {batch}")
        return None if group_ids is None else [str(g) for g in group_ids]

    def _ssim_or_nan(self, image: Tensor | None, reconstruction: Tensor | None, batch: int) -> Tensor:
        if (image is None) != (reconstruction is None):
            raise ValueError("SSIM needs both image and reconstruction")
        if image is None or reconstruction is None:
            return torch.full((batch,), math.nan, dtype=torch.float64)
        if image.shape[0] != batch:
            raise ValueError(f"image batch {image.shape[0]} does not match the masks' batch {batch}")
        return ssim(image, reconstruction, data_range=self.ssim_data_range)

    def _score_or_nan(self, score: Tensor | None, batch: int, first: bool) -> Tensor:
        if not first and self._has_score != (score is not None):
            raise ValueError("score must be given in every update or in none")
        if score is None:
            return torch.full((batch,), math.nan, dtype=torch.float64)
        if score.shape != (batch,) or bool(score.isnan().any()):
            raise ValueError(f"score must be [{batch}] without NaN, got shape {tuple(score.shape)}")
        return score.detach().double().cpu()

    def compute(self) -> dict[str, Any]:
        """Summarise every update.

        Returns:
            ``{"settings", "per_case", "aggregate"}`` and, with group ids, ``"per_volume"``: each
            volume's counts pooled over its slices (so its ``dice`` is the 3-D Dice) and its lesions
            (:meth:`VolumeLesions.compute`), with their means in the aggregate (``dice_volume_mean``,
            ``lesion_sensitivity``, ``fp_lesions_per_volume``, ``lesion_volume_abs_error_mean``, ...). Values
            are Python scalars, never rounded; undefined values are ``float("nan")``, and values that
            were not provided (SSIM without images, score) are ``None`` in ``per_case``.
        """
        if not self._counts:
            raise ValueError("SegmentationEvaluator.compute() called before any update()")
        counts = Counts.cat(self._counts)
        columns = {name: torch.cat(parts) for name, parts in self._columns.items()}
        result: dict[str, Any] = {
            "settings": {
                "ap_thresholds": self._ranking.thresholds,
                "map_max": self._ranking.map_max,
                "spacing": self.spacing,
                "ssim_data_range": self.ssim_data_range,
                "volume_connectivity": self._volumes.connectivity,
            },
            "per_case": self._per_case(counts, columns),
        }
        aggregate = _slice_aggregate(counts, columns)
        ranking = self._ranking.compute()
        aggregate["ap"], aggregate["auroc_pixel"] = ranking["ap"], ranking["auroc"]
        if self._has_score:
            labels = counts.tp + counts.fn > 0
            aggregate["auroc_image"] = image_auroc(columns["score"], labels)
            aggregate["ap_image"] = image_average_precision(columns["score"], labels)
        if self._group_ids is not None:
            result["per_volume"], volume_aggregate = _per_volume(counts, self._group_ids)
            lesion_rows, lesion_aggregate = self._volumes.compute(self._group_ids)
            for row, lesions in zip(result["per_volume"], lesion_rows):
                row.update({key: value for key, value in lesions.items() if key != "group_id"})
            aggregate.update(volume_aggregate, **lesion_aggregate)
        result["aggregate"] = aggregate
        return result

    def _per_case(self, counts: Counts, columns: dict[str, Tensor]) -> list[dict[str, Any]]:
        table = {**_count_metrics(counts), **{name: values.tolist() for name, values in columns.items()}}
        table["anomalous"] = (counts.tp + counts.fn > 0).tolist()
        for name in ("ssim", "score"):  # not provided -> None, as opposed to undefined -> NaN
            table[name] = [None if math.isnan(v) else v for v in table[name]]
        group_ids: list[str | None] = [None] * len(self._case_ids) if self._group_ids is None else list(self._group_ids)
        return [
            {"case_id": case, "group_id": group, **{key: values[i] for key, values in table.items()}}
            for i, (case, group) in enumerate(zip(self._case_ids, group_ids))
        ]


def _count_metrics(counts: Counts) -> dict[str, list]:
    """Counts and every count-based metric as Python lists (JSON-ready)."""
    table: dict[str, list] = {name: getattr(counts, name).tolist() for name in ("tp", "fp", "fn", "tn")}
    table.update({name: metric(counts).tolist() for name, metric in _COUNT_METRICS.items()})
    return table


def _slice_aggregate(counts: Counts, columns: dict[str, Tensor]) -> dict[str, Any]:
    """Per-slice means over anomalous slices (the paper's aggregation) and pixel-pooled values."""
    anomalous = counts.tp + counts.fn > 0
    predicted = counts.tp + counts.fp > 0
    out: dict[str, Any] = {"n_cases": anomalous.numel(), "n_anomalous": int(anomalous.sum())}
    out["n_healthy"] = out["n_cases"] - out["n_anomalous"]
    per_slice = {name: metric(counts) for name, metric in _COUNT_METRICS.items()}
    per_slice.update(ap=columns["ap"], hd95=columns["hd95"])
    for name, values in per_slice.items():
        out[f"{name}_mean"], out[f"{name}_mean_n"] = nanmean_count(values[anomalous])
    out["hd95_empty_predictions"] = int((anomalous & ~predicted).sum())
    out["fpr_healthy_mean"], out["fpr_healthy_mean_n"] = nanmean_count(per_slice["fpr"][~anomalous])
    pooled = counts.sum()
    out.update({f"{name}_pooled": float(metric(pooled)) for name, metric in _COUNT_METRICS.items()})
    out["ssim_healthy"], out["ssim_healthy_n"] = nanmean_count(columns["ssim"][~anomalous])
    return out


def _per_volume(counts: Counts, group_ids: list[str]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Counts pooled over each volume's slices, and Dice/IoU means over anomalous volumes."""
    names = list(dict.fromkeys(group_ids))  # first-appearance order
    position = {name: i for i, name in enumerate(names)}
    index = torch.tensor([position[g] for g in group_ids], dtype=torch.long)
    volumes = counts.group_sum(index, len(names))
    n_slices = torch.bincount(index, minlength=len(names)).tolist()
    slice_anomalous = (counts.tp + counts.fn > 0).double()
    n_anomalous_slices = torch.bincount(index, weights=slice_anomalous, minlength=len(names))
    anomalous = volumes.tp + volumes.fn > 0
    table = _count_metrics(volumes)
    rows = [
        {
            "group_id": name,
            "n_slices": n_slices[i],
            "n_anomalous_slices": int(n_anomalous_slices[i]),
            "anomalous": bool(anomalous[i]),
            **{key: values[i] for key, values in table.items()},
        }
        for i, name in enumerate(names)
    ]
    aggregate: dict[str, Any] = {"n_volumes": len(names), "n_volumes_anomalous": int(anomalous.sum())}
    for name in ("dice", "iou"):
        aggregate[f"{name}_volume_mean"], _ = nanmean_count(_COUNT_METRICS[name](volumes)[anomalous])
    return rows, aggregate
