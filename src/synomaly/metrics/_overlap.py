"""Confusion counts and the overlap metrics computed from them (Dice, IoU, precision, recall, FPR)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor


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


_COUNT_METRICS = {"dice": dice, "iou": iou, "precision": precision, "recall": recall, "fpr": fpr}
