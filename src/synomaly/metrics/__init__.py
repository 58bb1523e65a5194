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
* **Per volume** (slices grouped by volume and stacked by slice number): counts are pooled over the
  volume, so its Dice is the 3-D Dice; ``dice_volume_mean`` averages it over anomalous volumes. A
  *lesion* is a 3-D connected component; a reference lesion is **detected** when a predicted voxel
  lies in it, and **lesion sensitivity** pools detected over all reference lesions (NaN without
  any). A predicted lesion touching no reference voxel is a **false-positive lesion**, counted per
  volume and averaged over all volumes. The **lesion-volume error** is predicted minus reference
  lesion volume per volume (its mean and mean absolute value over all volumes), in mL when every
  volume's voxel size is known and in voxels of the evaluated grid otherwise (``lesion_volume_unit``).
"""

from __future__ import annotations

from synomaly.metrics._distance import Spacing, hd95, ssim
from synomaly.metrics._evaluator import SegmentationEvaluator, nanmean_count
from synomaly.metrics._overlap import Counts, confusion_counts, dice, fpr, iou, precision, recall
from synomaly.metrics._ranking import (
    PixelRankingMetrics,
    image_auroc,
    image_average_precision,
    per_image_average_precision,
    pixel_ranking,
)
from synomaly.metrics._volume import VolumeLesions

__all__ = [
    "Counts",
    "PixelRankingMetrics",
    "SegmentationEvaluator",
    "VolumeLesions",
    "Spacing",
    "confusion_counts",
    "dice",
    "fpr",
    "hd95",
    "image_auroc",
    "image_average_precision",
    "iou",
    "nanmean_count",
    "per_image_average_precision",
    "pixel_ranking",
    "precision",
    "recall",
    "ssim",
]
