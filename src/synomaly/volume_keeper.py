"""Whole volumes for the report's viewer: every slice of a few chosen volumes of an evaluation.

The evaluation streams its slices batch by batch and keeps only a few cases (``cases.npz``). The
viewer needs whole volumes, so :class:`VolumeKeeper` chooses them before the first batch, from
what is known up front (the reference masks and each slice's volume), and copies their slices to
the host as the batches go by. The chosen volumes are those with the largest reference lesion
(most lesion pixels over their slices) and, where there is one, a volume with no reference lesion,
so the viewer also shows what the detector flags in a healthy-looking scan.

A volume's slices are ordered by their number within the volume (:func:`synomaly.volumes.slice_numbers`): the
``<key>_slice`` array of an ``.npz`` bundle where it has one (``lgg_flair`` does), else the slice
number along the slice axis of a NIfTI volume or the position in a DICOM series or stack.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor

if TYPE_CHECKING:
    from synomaly.detect import DetectionOutput

__all__ = ["KEEP_VOLUMES", "MAX_VIEWER_SLICES", "VolumeKeeper"]

KEEP_VOLUMES = 4
MAX_VIEWER_SLICES = 256  # per volume: a longer volume is kept as the window of this many slices around its lesion
_IMAGES = ("image", "reconstruction", "anomaly_map")
_MASKS = ("mask", "target", "foreground")


class VolumeKeeper:
    """Chooses a few volumes before the batches stream by and keeps every slice of them.

    Only volumes of at least two slices are considered. The ``keep - 1`` volumes with the most
    reference lesion pixels come first (all ``keep`` when no volume is healthy), then the healthy
    volume (no reference lesion) with the most slices; ties go to the volume met first.

    Args:
        masks: Reference lesion masks ``[N, 1, H, W]``; ``None`` when every slice is healthy.
        group_ids: The volume of each slice; ``None`` keeps nothing.
        numbers: Each slice's number within its volume (:func:`slice_numbers`); the order of the
            slices when ``None``.
        count: ``N``, the number of slices.
        keep: Most volumes to keep.
        max_slices: Most slices kept of one volume.
    """

    def __init__(self, masks: Tensor | None, group_ids: Sequence[str] | None, numbers: Sequence[int] | None,
                 count: int, keep: int = KEEP_VOLUMES, max_slices: int = MAX_VIEWER_SLICES) -> None:
        for name, values in (("group ids", group_ids), ("slice numbers", numbers)):
            if values is not None and len(values) != count:
                raise ValueError(f"got {len(values)} {name} for {count} images")
        self._numbers = np.arange(count) if numbers is None else np.asarray(numbers, dtype=np.int64)
        self.volume_ids: list[str] = []
        self._rows = np.zeros(0, dtype=np.int64)  # slice indices kept, volume by volume, in slice order
        self._volume = np.zeros(0, dtype=np.int64)  # index into volume_ids of each kept slice
        self._arrays: dict[str, np.ndarray] = {}
        if group_ids is None or keep < 1 or count == 0:
            return
        names, group = np.unique(np.asarray(group_ids, dtype=np.str_), return_inverse=True)
        area = (np.zeros(count) if masks is None
                else masks.reshape(count, -1).sum(1).to("cpu", torch.float64).numpy())
        chosen = self._choose(group, area, keep)
        if not chosen:  # every volume has a single slice (e.g. a folder of PNG images): nothing to scroll through
            return
        rows = [self._window(np.flatnonzero(group == g), area, max_slices) for g in chosen]
        self.volume_ids = [str(names[g]) for g in chosen]
        self._rows = np.concatenate(rows)
        self._volume = np.repeat(np.arange(len(rows)), [len(r) for r in rows])

    @staticmethod
    def _choose(group: np.ndarray, area: np.ndarray, keep: int) -> list[int]:
        """Group indices: largest reference lesion first, then the longest healthy group."""
        slices = np.bincount(group)
        lesion = np.bincount(group, weights=area, minlength=len(slices))
        first = np.full(len(slices), len(group))
        np.minimum.at(first, group, np.arange(len(group)))  # the order the volumes are met in
        usable = slices >= 2
        anomalous = np.flatnonzero(usable & (lesion > 0))
        healthy = np.flatnonzero(usable & (lesion == 0))
        anomalous = anomalous[np.lexsort((first[anomalous], -lesion[anomalous]))]
        healthy = healthy[np.lexsort((first[healthy], -slices[healthy]))][:1]
        chosen = anomalous[: keep - len(healthy)] if len(healthy) else anomalous[:keep]
        return [int(g) for g in (*chosen, *healthy)][:keep]

    def _window(self, rows: np.ndarray, area: np.ndarray, max_slices: int) -> np.ndarray:
        """A volume's slice indices in slice order, cut to ``max_slices`` around its lesion's centre."""
        rows = rows[np.argsort(self._numbers[rows], kind="stable")]
        if len(rows) <= max_slices:
            return rows
        weights = area[rows]
        centre = (weights * np.arange(len(rows))).sum() / weights.sum() if weights.sum() else len(rows) / 2
        start = int(np.clip(math.floor(centre - (max_slices - 1) / 2 + 0.5), 0, len(rows) - max_slices))
        return rows[start : start + max_slices]

    def update(self, start: int, x0: Tensor, target: Tensor, out: DetectionOutput, foreground: Tensor | None) -> None:
        """Copy the kept slices of a batch whose first slice has index ``start``."""
        positions = np.flatnonzero((self._rows >= start) & (self._rows < start + len(x0)))
        if not len(positions):
            return
        local = torch.as_tensor(self._rows[positions] - start, device=x0.device)
        fg = torch.ones_like(target, dtype=torch.bool) if foreground is None else foreground
        sources = {"image": x0, "reconstruction": out.reconstruction, "anomaly_map": out.anomaly_map,
                   "mask": out.mask, "target": target, "foreground": fg}
        for key, values in sources.items():
            picked = values[local, 0].detach()
            host = (picked.float() if key in _IMAGES else picked.bool()).cpu().numpy()
            if key not in self._arrays:
                self._arrays[key] = np.zeros((len(self._rows), *host.shape[1:]), dtype=host.dtype)
            self._arrays[key][positions] = host

    def arrays(self, case_ids: Sequence[str]) -> dict[str, np.ndarray]:
        """The kept volumes (empty when none), each slice a row, the volumes' slices contiguous and in order.

        Keys: ``volume_id`` (str ``[V]``), per kept slice ``volume`` (index into ``volume_id``),
        ``slice`` (number within its volume), ``case_id`` (str), ``image``, ``reconstruction``,
        ``anomaly_map`` (float32 ``[M, H, W]``), ``mask``, ``target``, ``foreground`` (bool ``[M, H, W]``).
        """
        if not self.volume_ids or set(self._arrays) != {*_IMAGES, *_MASKS}:
            return {}
        return {
            "volume_id": np.array(self.volume_ids, dtype=np.str_),
            "volume": self._volume.copy(),
            "slice": self._numbers[self._rows].astype(np.int64),
            "case_id": np.array([case_ids[i] for i in self._rows.tolist()], dtype=np.str_),
            **self._arrays,
        }
