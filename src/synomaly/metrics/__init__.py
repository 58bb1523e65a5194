"""Segmentation and detection metrics for anomaly maps: per slice, per volume and pooled.

Every function is batched over the first dimension; masks are ``bool`` tensors ``[B, 1, H, W]`` and
anomaly maps are non-negative float tensors of the same shape (their scale is arbitrary).

Conventions (each one is tested in ``tests/test_metrics.py``):

* **Confusion counts** are per image over all its pixels (``tp, fp, fn, tn``, int64).
* **Dice** ``2 TP / (2 TP + FP + FN)`` and **IoU** ``TP / (TP + FP + FN)`` are 1.0 when prediction
  and target are both empty, and 0.0 when exactly one of them is empty.
* **Precision** ``TP / (TP + FP)`` is NaN when the prediction is empty; **recall**
  ``TP / (TP + FN)`` is NaN when the target is empty; **FPR** ``FP / (FP + TN)`` is NaN when there
  are no negative pixels.
* Means skip NaN (``nanmean``) and are reported together with the number of defined values
  (``<key>_n``).
* **AP and AUROC** are ranking metrics on the *raw continuous* anomaly map, never on a thresholded
  mask. Pooled over a data set they are NaN, with a logged warning, when the pooled target holds a
  single class (no anomalous pixels, or no healthy ones). Per-image AP is NaN when the image's target
  is empty. Image-level AUROC/AP are NaN, with a warning, when all images are healthy or all
  anomalous.
* Pooled AP/AUROC use torchmetrics. Exact mode (``thresholds=None``) keeps every map pixel until
  :meth:`PixelRankingMetrics.compute` (memory grows with the test set). Binned mode
  (``thresholds=T``) keeps only a ``[T, 2, 2]`` confusion table, with ``T`` thresholds evenly spaced
  on ``[0, 1]``; maps are sent to ``[0, 1]`` by the fixed rule ``clip(map / map_max, 0, 1)``, so
  every value above ``map_max`` lands in the top bin (a warning says how many pixels did).
* **HD95** is the 95th percentile (linear interpolation) of the *union* of both directed surface
  distance sets, as MedPy's ``hd95`` computes it; edges are the mask minus its erosion with a cross,
  and pixels on the image border count as edge pixels. It is NaN when the prediction or the target is
  empty. MONAI's ``compute_hausdorff_distance(percentile=95)`` instead takes the *maximum of the two
  directed* 95th percentiles, which is never smaller than ours.
* **SSIM** follows Wang et al. (2004) with an 11x11 Gaussian window (sigma 1.5), ``K1 = 0.01``,
  ``K2 = 0.03``, ``data_range = 2`` for images in ``[-1, 1]``, averaged over the windows that fit
  inside the image (MONAI's valid convolution; scikit-image crops the same border).
* An **anomalous** case is one with a non-empty target; a **healthy** case has an empty target.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from synomaly.errors import ConfigError

logger = logging.getLogger(__name__)

Spacing = float | Sequence[float] | None


@dataclass(frozen=True)
class Counts:
    """Confusion counts, one entry per image (or per group after :meth:`group_sum`).

    Attributes:
        tp: True positives, int64.
        fp: False positives, int64.
        fn: False negatives, int64.
        tn: True negatives, int64.
    """

    tp: Tensor
    fp: Tensor
    fn: Tensor
    tn: Tensor

    def sum(self) -> Counts:
        """Counts pooled over all entries (0-d tensors)."""
        return Counts(self.tp.sum(), self.fp.sum(), self.fn.sum(), self.tn.sum())

    def group_sum(self, group_index: Tensor, num_groups: int) -> Counts:
        """Counts pooled per group, e.g. over the slices of each volume.

        Args:
            group_index: LongTensor ``[B]`` with values in ``[0, num_groups)``.
            num_groups: Number of groups.

        Returns:
            Counts of shape ``[num_groups]``; a group with no entries has all-zero counts.
        """

        def pool(values: Tensor) -> Tensor:
            out = torch.zeros(num_groups, dtype=values.dtype, device=values.device)
            return out.index_add_(0, group_index.to(values.device), values)

        return Counts(pool(self.tp), pool(self.fp), pool(self.fn), pool(self.tn))

    def cpu(self) -> Counts:
        """The same counts on the CPU."""
        return Counts(self.tp.cpu(), self.fp.cpu(), self.fn.cpu(), self.tn.cpu())

    @staticmethod
    def cat(parts: Sequence[Counts]) -> Counts:
        """Concatenate the counts of several batches."""
        return Counts(*(torch.cat([getattr(p, name) for p in parts]) for name in ("tp", "fp", "fn", "tn")))


def _check_masks(pred: Tensor, target: Tensor) -> None:
    if pred.dtype != torch.bool or target.dtype != torch.bool:
        raise ValueError(f"masks must be bool tensors, got {pred.dtype} and {target.dtype}")
    if pred.shape != target.shape or pred.ndim != 4 or pred.shape[1] != 1:
        raise ValueError(
            f"masks must both be [B, 1, H, W], got {tuple(pred.shape)} and {tuple(target.shape)}"
        )


def confusion_counts(pred: Tensor, target: Tensor) -> Counts:
    """Per-image confusion counts of a binary prediction against a binary target.

    Args:
        pred: Predicted mask, bool ``[B, 1, H, W]``.
        target: Ground-truth mask, bool ``[B, 1, H, W]``.

    Returns:
        :class:`Counts` with int64 tensors ``[B]``; ``tn = H W - tp - fp - fn``.
    """
    _check_masks(pred, target)
    pred, target = pred.flatten(1), target.flatten(1)
    tp = (pred & target).sum(1)
    fp = (pred & ~target).sum(1)
    fn = (~pred & target).sum(1)
    return Counts(tp, fp, fn, pred.shape[1] - tp - fp - fn)


def _ratio(numerator: Tensor, denominator: Tensor) -> Tensor:
    """``numerator / denominator`` in float64, NaN where the denominator is 0."""
    num, den = numerator.double(), denominator.double()
    return torch.where(den > 0, num / den, torch.full_like(den, math.nan))


def dice(counts: Counts) -> Tensor:
    """Dice ``2 TP / (2 TP + FP + FN)``; 1.0 when prediction and target are both empty."""
    return _ratio(2 * counts.tp, 2 * counts.tp + counts.fp + counts.fn).nan_to_num(nan=1.0)


def iou(counts: Counts) -> Tensor:
    """Intersection over union ``TP / (TP + FP + FN)``; 1.0 when both masks are empty."""
    return _ratio(counts.tp, counts.tp + counts.fp + counts.fn).nan_to_num(nan=1.0)


def precision(counts: Counts) -> Tensor:
    """Precision ``TP / (TP + FP)``; NaN when the prediction is empty."""
    return _ratio(counts.tp, counts.tp + counts.fp)


def recall(counts: Counts) -> Tensor:
    """Recall (sensitivity) ``TP / (TP + FN)``; NaN when the target is empty."""
    return _ratio(counts.tp, counts.tp + counts.fn)


def fpr(counts: Counts) -> Tensor:
    """False positive rate ``FP / (FP + TN)``; NaN when there are no negative pixels."""
    return _ratio(counts.fp, counts.fp + counts.tn)


def nanmean_count(values: Tensor) -> tuple[float, int]:
    """Mean of the defined (non-NaN) values and how many there were; NaN and 0 when none are."""
    defined = ~values.isnan()
    n = int(defined.sum())
    return (float(values[defined].double().mean()) if n else math.nan), n


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
    """

    def __init__(self, thresholds: int | None = None, map_max: float | None = None) -> None:
        binned = thresholds is not None
        if binned and (isinstance(thresholds, bool) or not isinstance(thresholds, int) or thresholds < 2):
            raise ConfigError("ap_thresholds", f"must be None (exact) or an integer >= 2, got {thresholds!r}")
        if binned and (map_max is None or not map_max > 0):
            raise ConfigError("map_max", f"binned AP/AUROC needs a positive map_max, got {map_max!r}")
        self.thresholds = thresholds
        self.map_max = map_max
        self.reset()

    def reset(self) -> None:
        """Forget every update."""
        self._maps: list[Tensor] = []
        self._targets: list[Tensor] = []
        self._n_positive = 0
        self._n_pixels = 0
        self._n_clipped = 0
        self._binned = None
        if self.thresholds is not None:
            from torchmetrics import MetricCollection
            from torchmetrics.classification import BinaryAUROC, BinaryAveragePrecision

            # Both metrics hold the same confusion table; the collection updates it once per batch.
            self._binned = MetricCollection(
                {
                    "ap": BinaryAveragePrecision(thresholds=self.thresholds, validate_args=False),
                    "auroc": BinaryAUROC(thresholds=self.thresholds, validate_args=False),
                }
            )

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
        self._n_clipped += int((anomaly_map > self.map_max).sum())
        scores = (anomaly_map.detach().float() / self.map_max).clamp(max=1.0).flatten()
        self._binned.to(scores.device)
        self._binned.update(scores, target.flatten().long())

    def compute(self) -> dict[str, float]:
        """Pooled ``{"ap", "auroc"}``; both NaN (with a warning) when one class is missing."""
        if _single_class(self._n_positive, self._n_pixels, "pixel-level AP/AUROC"):
            return {"ap": math.nan, "auroc": math.nan}
        if self._binned is not None:
            if self._n_clipped:
                logger.warning(
                    "%d of %d pixels exceed map_max=%g and share the top bin of binned AP/AUROC",
                    self._n_clipped,
                    self._n_pixels,
                    self.map_max,
                )
            return {name: float(value) for name, value in self._binned.compute().items()}
        from torchmetrics.functional.classification import binary_auroc, binary_average_precision

        preds, labels = _unit_scale(torch.cat(self._maps)), torch.cat(self._targets)
        return {
            "ap": float(binary_average_precision(preds, labels, validate_args=False)),
            "auroc": float(binary_auroc(preds, labels, validate_args=False)),
        }


def pixel_ranking(
    anomaly_map: Tensor, target: Tensor, *, thresholds: int | None = None, map_max: float | None = None
) -> dict[str, float]:
    """Pooled pixel ``{"ap", "auroc"}`` of one batch; see :class:`PixelRankingMetrics`."""
    metrics = PixelRankingMetrics(thresholds, map_max)
    metrics.update(anomaly_map, target)
    return metrics.compute()


def _check_spacing(spacing: Spacing) -> list[float] | None:
    if spacing is None:
        return None
    values = [float(spacing)] * 2 if isinstance(spacing, (int, float)) else [float(s) for s in spacing]
    if len(values) != 2 or not all(v > 0 for v in values):
        raise ConfigError("spacing", f"must be a positive number or a (row, column) pair, got {spacing!r}")
    return values


def hd95(pred: Tensor, target: Tensor, spacing: Spacing = None) -> Tensor:
    """95th percentile Hausdorff distance, MedPy style: ``P95(d(Ep, Et) U d(Et, Ep))``.

    ``d(A, B)`` holds, for every edge pixel of ``A``, the Euclidean distance to the nearest edge
    pixel of ``B``; both directed sets are pooled before taking the percentile (MONAI's
    ``compute_hausdorff_distance(percentile=95)`` takes the larger of the two directed percentiles).

    Args:
        pred: Predicted mask, bool ``[B, 1, H, W]``.
        target: Ground-truth mask, bool ``[B, 1, H, W]``.
        spacing: Pixel size, one number or (row, column); ``None`` means 1 (distances in pixels).

    Returns:
        Float64 ``[B]`` on the CPU; NaN where the prediction or the target is empty.
    """
    from monai.metrics.utils import get_edge_surface_distance

    _check_masks(pred, target)
    sizes = _check_spacing(spacing)
    # MONAI's exact KD-tree path is its CPU path; on CUDA it switches algorithm.
    pred, target = pred[:, 0].cpu(), target[:, 0].cpu()
    out = torch.full((pred.shape[0],), math.nan, dtype=torch.float64)
    both = pred.flatten(1).any(1) & target.flatten(1).any(1)
    for i in both.nonzero().flatten().tolist():  # MONAI's surface distances take one image at a time
        with warnings.catch_warnings():
            # MONAI 1.5-1.6 passes its own deprecated argument internally; nothing for callers to fix.
            warnings.filterwarnings("ignore", message=".*always_return_as_numpy.*", category=FutureWarning)
            _, distances, _ = get_edge_surface_distance(pred[i], target[i], spacing=sizes, symmetric=True)
        out[i] = torch.quantile(torch.cat(distances).double(), 0.95)
    return out


def ssim(
    image: Tensor,
    reconstruction: Tensor,
    *,
    data_range: float = 2.0,
    win_size: int = 11,
    sigma: float = 1.5,
) -> Tensor:
    """Mean structural similarity per image (Wang et al. 2004, Eq. 13), via MONAI.

    ``SSIM = (2 mu_x mu_y + C1)(2 s_xy + C2) / ((mu_x^2 + mu_y^2 + C1)(s_x^2 + s_y^2 + C2))`` with
    ``C1 = (0.01 L)^2``, ``C2 = (0.03 L)^2`` and Gaussian-weighted moments, averaged over the
    windows that fit inside the image. MONAI computes in float32; it agrees with scikit-image's
    ``structural_similarity(gaussian_weights=True, sigma=1.5, use_sample_covariance=False)``, which
    crops the same border, to about 1e-5.

    Args:
        image: Input images ``[B, C, H, W]``.
        reconstruction: Reconstructions, same shape.
        data_range: ``L``, the value range (2.0 for images in ``[-1, 1]``).
        win_size: Gaussian window width; ``H`` and ``W`` must be at least this.
        sigma: Gaussian window standard deviation.

    Returns:
        Float64 ``[B]`` on the CPU.
    """
    from monai.metrics.regression import compute_ssim_and_cs

    if image.shape != reconstruction.shape or image.ndim != 4 or min(image.shape[-2:]) < win_size:
        raise ValueError(
            f"SSIM needs two [B, C, H, W] tensors of the same shape with H, W >= {win_size}, "
            f"got {tuple(image.shape)} and {tuple(reconstruction.shape)}"
        )
    ssim_map, _ = compute_ssim_and_cs(
        reconstruction.detach(),
        image.detach(),
        spatial_dims=2,
        kernel_size=(win_size, win_size),
        kernel_sigma=(sigma, sigma),
        data_range=data_range,
    )
    return ssim_map.flatten(1).mean(1).double().cpu()


class SegmentationEvaluator:
    """Accumulates per-case metrics over a test set; :meth:`compute` returns a JSON-ready summary.

    Memory per case is a few scalars, plus, in exact AP mode only, every anomaly-map pixel
    (4 bytes) and target pixel (1 byte).

    Args:
        ap_thresholds: ``None`` for exact pooled AP/AUROC, or the number of bins (constant memory).
        map_max: Scale for binned mode, see :class:`PixelRankingMetrics`.
        spacing: Pixel size for HD95, one number or (row, column); ``None`` means pixels.
        ssim_data_range: Value range of image and reconstruction for SSIM.
    """

    def __init__(
        self,
        ap_thresholds: int | None = None,
        map_max: float | None = None,
        spacing: Spacing = None,
        ssim_data_range: float = 2.0,
    ) -> None:
        self.spacing = _check_spacing(spacing)
        self.ssim_data_range = ssim_data_range
        self._ranking = PixelRankingMetrics(ap_thresholds, map_max)
        self.reset()

    def reset(self) -> None:
        """Forget every update."""
        self._ranking.reset()
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
            ``{"settings", "per_case", "aggregate"}`` and, with group ids, ``"per_volume"``. Values
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
            aggregate.update(volume_aggregate)
        result["aggregate"] = aggregate
        return result

    def _per_case(self, counts: Counts, columns: dict[str, Tensor]) -> list[dict[str, Any]]:
        table = {**_count_metrics(counts), **{name: values.tolist() for name, values in columns.items()}}
        table["anomalous"] = (counts.tp + counts.fn > 0).tolist()
        for name in ("ssim", "score"):  # not provided -> None, as opposed to undefined -> NaN
            table[name] = [None if math.isnan(v) else v for v in table[name]]
        group_ids: list[str | None] = list(self._group_ids or [None] * len(self._case_ids))
        return [
            {"case_id": case, "group_id": group, **{key: values[i] for key, values in table.items()}}
            for i, (case, group) in enumerate(zip(self._case_ids, group_ids))
        ]


_COUNT_METRICS = {"dice": dice, "iou": iou, "precision": precision, "recall": recall, "fpr": fpr}


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
