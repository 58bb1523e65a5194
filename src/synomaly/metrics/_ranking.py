"""Ranking metrics on the raw anomaly map: image-level, per-image and pooled pixel AP and AUROC."""

from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from synomaly.errors import ConfigError

if TYPE_CHECKING:
    from torchmetrics import Metric, MetricCollection

logger = logging.getLogger("synomaly.metrics")  # warnings carry the package's name


def _check_map(anomaly_map: Tensor, target: Tensor) -> None:
    if target.dtype != torch.bool:
        raise ValueError(f"target must be a bool tensor, got {target.dtype}")
    if anomaly_map.shape != target.shape or not anomaly_map.is_floating_point():
        raise ValueError(
            f"anomaly map must be a float tensor shaped like the target {tuple(target.shape)}, "
            f"got {anomaly_map.dtype} {tuple(anomaly_map.shape)}"
        )
    if not bool((anomaly_map >= 0).all()):  # also rejects NaN
        raise ValueError("anomaly map values must be non-negative and not NaN")


def _unit_scale(values: Tensor) -> Tensor:
    """Send non-negative ``values`` into ``[0, 1]`` keeping their order exactly.

    torchmetrics applies a sigmoid to any input outside ``[0, 1]`` (decided per call, so per batch);
    dividing by a power of two instead is exact in floating point and keeps ties as ties.
    """
    peak = float(values.max()) if values.numel() else 0.0
    if peak <= 1.0:
        return values
    return values * math.ldexp(1.0, -math.frexp(peak)[1])


def _single_class(n_positive: int, n_total: int, what: str) -> bool:
    """True, with a logged warning, when a ranking metric would see only one class."""
    if 0 < n_positive < n_total:
        return False
    kind = "anomalous" if n_positive == 0 else "healthy"
    logger.warning("%s: no %s samples among %d, so it is NaN", what, kind, n_total)
    return True


def _image_scores(scores: Tensor, labels: Tensor) -> Tensor:
    """Validated image scores, shifted and scaled into ``[0, 1]`` in float64 (order kept)."""
    if scores.shape != labels.shape or scores.ndim != 1 or labels.dtype != torch.bool:
        raise ValueError(
            f"scores and bool labels must both be [N], got {tuple(scores.shape)} and {tuple(labels.shape)}"
        )
    if bool(scores.isnan().any()):
        raise ValueError("image scores contain NaN")
    shifted = scores.detach().double().cpu()
    return _unit_scale(shifted - shifted.min())


def image_auroc(scores: Tensor, labels: Tensor) -> float:
    """Image-level AUROC: the probability that an anomalous image outscores a healthy one.

    Args:
        scores: Anomaly score per image ``[N]``, any real scale (e.g. mask area, map maximum).
        labels: True for anomalous images, bool ``[N]``.

    Returns:
        AUROC, or NaN with a logged warning when only one class is present.
    """
    from torchmetrics.functional.classification import binary_auroc

    unit = _image_scores(scores, labels)
    if _single_class(int(labels.sum()), labels.numel(), "image-level AUROC"):
        return math.nan
    return float(binary_auroc(unit, labels.cpu().long(), validate_args=False))


def image_average_precision(scores: Tensor, labels: Tensor) -> float:
    """Image-level AP ``sum_n (R_n - R_{n-1}) P_n`` over the distinct score thresholds.

    Args:
        scores: Anomaly score per image ``[N]``, any real scale.
        labels: True for anomalous images, bool ``[N]``.

    Returns:
        AP, or NaN with a logged warning when only one class is present.
    """
    from torchmetrics.functional.classification import binary_average_precision

    unit = _image_scores(scores, labels)
    if _single_class(int(labels.sum()), labels.numel(), "image-level AP"):
        return math.nan
    return float(binary_average_precision(unit, labels.cpu().long(), validate_args=False))


def per_image_average_precision(anomaly_map: Tensor, target: Tensor) -> Tensor:
    """AP of each image's raw anomaly map against its own target, ``sum_n (R_n - R_{n-1}) P_n``.

    Args:
        anomaly_map: Non-negative float ``[B, 1, H, W]``.
        target: Bool ``[B, 1, H, W]``.

    Returns:
        Float64 ``[B]`` on the CPU; NaN where the target is empty (a target covering the whole image
        gives 1.0). Always exact: one image at a time is small.
    """
    from torchmetrics.functional.classification import multilabel_average_precision

    _check_map(anomaly_map, target)
    out = torch.full((target.shape[0],), math.nan, dtype=torch.float64)
    has_target = target.flatten(1).any(1)
    if not bool(has_target.any()):
        return out
    # Each image is one "label" of a multilabel problem, so torchmetrics takes the whole batch.
    preds = _unit_scale(anomaly_map.detach().flatten(1)[has_target].float()).T
    labels = target.flatten(1)[has_target].T.long()
    ap = multilabel_average_precision(
        preds, labels, num_labels=labels.shape[1], average=None, thresholds=None, validate_args=False
    )
    out[has_target.cpu()] = ap.reshape(-1).double().cpu()
    return out


class PixelRankingMetrics:
    """Pixel-level AP and AUROC pooled over every pixel of a data set, on the raw anomaly map.

    Args:
        thresholds: ``None`` for exact curves (keeps all pixels on the CPU until :meth:`compute`),
            or the number ``T >= 2`` of evenly spaced thresholds on ``[0, 1]`` for binned curves in
            constant memory.
        map_max: Binned mode only, and required there: maps become ``clip(map / map_max, 0, 1)``.
            For ``|x - x_hat|`` of images in ``[-1, 1]``, 2.0 covers the full range. Ignored in
            exact mode, whose ranking does not depend on the scale.
        curves: Binned mode only: also keep the pooled PR and ROC curves (:meth:`curves`), read
            from the same confusion table.
    """

    def __init__(self, thresholds: int | None = None, map_max: float | None = None, *, curves: bool = False) -> None:
        binned = thresholds is not None
        if binned and (isinstance(thresholds, bool) or not isinstance(thresholds, int) or thresholds < 2):
            raise ConfigError("ap_thresholds", f"must be None (exact) or an integer >= 2, got {thresholds!r}")
        if binned and (map_max is None or not map_max > 0):
            raise ConfigError("map_max", f"binned AP/AUROC needs a positive map_max, got {map_max!r}")
        if curves and not binned:
            raise ConfigError("curves", "pixel PR and ROC curves need binned mode (thresholds and map_max)")
        self.thresholds = thresholds
        self.map_max = map_max
        self.with_curves = curves
        self.reset()

    def reset(self) -> None:
        """Forget every update."""
        self._maps: list[Tensor] = []
        self._targets: list[Tensor] = []
        self._n_positive = 0
        self._n_pixels = 0
        self._n_clipped = 0
        # Binned mode: the torchmetrics collection and the map_max that scales its scores.
        self._binned: tuple[MetricCollection, float] | None = None
        if self.thresholds is not None and self.map_max is not None:  # __init__ requires map_max with thresholds
            from torchmetrics import MetricCollection
            from torchmetrics.classification import BinaryAUROC, BinaryAveragePrecision, BinaryPrecisionRecallCurve, BinaryROC

            metrics: dict[str, Metric | MetricCollection] = {
                "ap": BinaryAveragePrecision(thresholds=self.thresholds, validate_args=False),
                "auroc": BinaryAUROC(thresholds=self.thresholds, validate_args=False),
            }
            if self.with_curves:
                metrics["pr"] = BinaryPrecisionRecallCurve(thresholds=self.thresholds, validate_args=False)
                metrics["roc"] = BinaryROC(thresholds=self.thresholds, validate_args=False)
            # Every metric holds the same confusion table; the collection updates it once per batch.
            self._binned = (MetricCollection(metrics), self.map_max)

    def update(self, anomaly_map: Tensor, target: Tensor) -> None:
        """Add a batch: non-negative float map and bool target, both ``[B, 1, H, W]``."""
        _check_map(anomaly_map, target)
        self._n_positive += int(target.sum())
        self._n_pixels += target.numel()
        if self._binned is None:
            # Copies: the caller may reuse its buffers for the next batch.
            self._maps.append(anomaly_map.detach().to("cpu", torch.float32, copy=True).flatten())
            self._targets.append(target.to("cpu", copy=True).flatten())
            return
        collection, map_max = self._binned
        self._n_clipped += int((anomaly_map > map_max).sum())
        scores = (anomaly_map.detach().float() / map_max).clamp(max=1.0).flatten()
        collection.to(scores.device)
        collection.update(scores, target.flatten().long())

    def compute(self) -> dict[str, float]:
        """Pooled ``{"ap", "auroc"}``; both NaN (with a warning) when one class is missing."""
        if _single_class(self._n_positive, self._n_pixels, "pixel-level AP/AUROC"):
            return {"ap": math.nan, "auroc": math.nan}
        if self._binned is not None:
            collection, map_max = self._binned
            if self._n_clipped:
                logger.warning(
                    "%d of %d pixels exceed map_max=%g and share the top bin of binned AP/AUROC",
                    self._n_clipped,
                    self._n_pixels,
                    map_max,
                )
            values = collection.compute()
            return {name: float(values[name]) for name in ("ap", "auroc")}
        from torchmetrics.functional.classification import binary_auroc, binary_average_precision

        preds, labels = _unit_scale(torch.cat(self._maps)), torch.cat(self._targets)
        return {
            "ap": float(binary_average_precision(preds, labels, validate_args=False)),
            "auroc": float(binary_auroc(preds, labels, validate_args=False)),
        }

    def curves(self) -> dict[str, dict[str, list[float]]]:
        """Pooled pixel ``{"pr": {"precision", "recall"}, "roc": {"fpr", "tpr"}}`` at the binned thresholds.

        Needs ``curves=True``. The lists are empty, with a warning, when the pooled target holds a single class.
        """
        if self._binned is None or not self.with_curves:
            raise ValueError("PixelRankingMetrics.curves() needs binned mode and curves=True")
        if not 0 < self._n_positive < self._n_pixels:
            logger.warning("pixel curves: the pooled target holds a single class, so they are empty")
            return {"pr": {"precision": [], "recall": []}, "roc": {"fpr": [], "tpr": []}}
        values = self._binned[0].compute()
        precision, recall, _ = values["pr"]
        # Thresholds above every map value predict nothing: their precision is undefined (NaN) and
        # they add no point to the curve.
        defined = ~precision.isnan()
        precision, recall = precision[defined], recall[defined]
        fpr, tpr, _ = values["roc"]
        return {
            "pr": {"precision": precision.tolist(), "recall": recall.tolist()},
            "roc": {"fpr": fpr.tolist(), "tpr": tpr.tolist()},
        }


def pixel_ranking(
    anomaly_map: Tensor, target: Tensor, *, thresholds: int | None = None, map_max: float | None = None
) -> dict[str, float]:
    """Pooled pixel ``{"ap", "auroc"}`` of one batch; see :class:`PixelRankingMetrics`."""
    metrics = PixelRankingMetrics(thresholds, map_max)
    metrics.update(anomaly_map, target)
    return metrics.compute()
