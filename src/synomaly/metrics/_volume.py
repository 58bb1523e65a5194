"""Lesion-wise metrics per volume: the 3-D connected components of each volume's prediction and reference.

A *lesion* is a 3-D connected component of a volume's mask (its slices stacked in slice order). A
reference lesion is *detected* when some predicted voxel lies inside it (so a predicted component
overlaps it); a predicted lesion is a *false positive* when it touches no reference voxel. The
lesion volume is the mask's voxel count, in mL where the voxel size is known.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from torch import Tensor

from synomaly.metrics._overlap import _check_masks


class VolumeLesions:
    """Keeps every slice's prediction and reference (one bit per pixel) until the volumes are complete.

    Slices of a volume may arrive in any order and batch (e.g. a patient's healthy and tumour slices
    from two arrays); :meth:`compute` stacks each volume's slices by their position and labels it once.

    Args:
        connectivity: 1 (faces, 6 neighbours) to 3 (faces, edges and corners) in 3-D.
    """

    def __init__(self, connectivity: int = 1) -> None:
        if connectivity not in (1, 2, 3):
            raise ValueError(f"connectivity must be 1, 2 or 3, got {connectivity!r}")
        self.connectivity = connectivity
        self.reset()

    def reset(self) -> None:
        """Forget every update."""
        self._batches: list[tuple[tuple[int, int], np.ndarray, np.ndarray]] = []  # (H, W), packed pred, packed target
        self._positions: list[int | None] = []
        self._voxel_ml: list[float | None] = []

    def update(self, pred_mask: Tensor, target: Tensor, positions: list[int | None] | None = None,
               voxel_ml: list[float | None] | None = None) -> None:
        """Add ``B`` slices: bool ``[B, 1, H, W]`` masks, each slice's position in its volume and voxel size (mL).

        A ``None`` position (or none given) means "after the volume's earlier slices"; a ``None`` voxel size: unknown.
        """
        _check_masks(pred_mask, target)
        batch = pred_mask.shape[0]
        for name, values in (("positions", positions), ("voxel_ml", voxel_ml)):
            if values is not None and len(values) != batch:
                raise ValueError(f"got {len(values)} {name} for a batch of {batch}")
        pred = pred_mask.detach().reshape(batch, -1).cpu().numpy()
        ref = target.detach().reshape(batch, -1).cpu().numpy()
        shape = (int(pred_mask.shape[-2]), int(pred_mask.shape[-1]))
        self._batches.append((shape, np.packbits(pred, axis=1), np.packbits(ref, axis=1)))
        self._positions += [None if p is None else int(p) for p in positions] if positions is not None else [None] * batch
        self._voxel_ml += [None if v is None else float(v) for v in voxel_ml] if voxel_ml is not None else [None] * batch

    def compute(self, group_ids: list[str]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        """Per-volume rows (first-appearance order of ``group_ids``, one id per slice) and their aggregate.

        Returns:
            Rows with ``ref_lesions``, ``pred_lesions``, ``detected_lesions``, ``fp_lesions``,
            ``lesion_sensitivity`` (NaN without reference lesions), ``ref_voxels``, ``pred_voxels``,
            ``voxel_ml``, ``ref_ml``, ``pred_ml`` and ``volume_error_ml`` (predicted minus reference;
            ``None`` where the voxel size is unknown); and the aggregate: ``lesion_sensitivity``
            (pooled over every reference lesion, ``lesion_sensitivity_n`` of them), ``fp_lesions_per_volume``
            (mean over volumes), ``lesion_volume_error_mean`` and ``lesion_volume_abs_error_mean``
            (mean over volumes of predicted minus reference lesion volume, and of its size) in
            ``lesion_volume_unit``: ``ml`` when every volume's voxel size is known, else ``voxels``.
        """
        if len(group_ids) != len(self._positions):
            raise ValueError(f"got {len(group_ids)} group ids for {len(self._positions)} slices")
        slices = _SliceStore(self._batches)
        names = list(dict.fromkeys(group_ids))
        index = {name: i for i, name in enumerate(names)}
        members: list[list[int]] = [[] for _ in names]
        for case, group in enumerate(group_ids):
            members[index[group]].append(case)
        rows = [{"group_id": name, **self._volume(name, cases, slices)} for name, cases in zip(names, members)]
        return rows, _aggregate(rows)

    def _volume(self, name: str, cases: list[int], slices: _SliceStore) -> dict[str, Any]:
        """The lesion counts and volumes of one volume, from its slices ``cases``."""
        from scipy import ndimage

        pred, ref = slices.stack(name, cases, self._positions)
        structure = ndimage.generate_binary_structure(3, self.connectivity)
        ref_labels, n_ref = ndimage.label(ref, structure=structure)
        pred_labels, n_pred = ndimage.label(pred, structure=structure)
        both = pred & ref
        detected = int(np.unique(ref_labels[both]).size)  # every label there is >= 1: both implies ref
        touching = int(np.unique(pred_labels[both]).size)
        sizes = [self._voxel_ml[c] for c in cases]
        voxel_ml = None if any(v is None for v in sizes) else float(np.median(np.asarray(sizes, dtype=np.float64)))
        ref_voxels, pred_voxels = int(ref.sum()), int(pred.sum())

        def ml(voxels: int) -> float | None:
            return None if voxel_ml is None else voxels * voxel_ml

        return {"ref_lesions": int(n_ref), "pred_lesions": int(n_pred), "detected_lesions": detected,
                "fp_lesions": int(n_pred) - touching, "lesion_sensitivity": detected / n_ref if n_ref else math.nan,
                "ref_voxels": ref_voxels, "pred_voxels": pred_voxels, "voxel_ml": voxel_ml, "ref_ml": ml(ref_voxels),
                "pred_ml": ml(pred_voxels), "volume_error_ml": ml(pred_voxels - ref_voxels)}


class _SliceStore:
    """Every kept slice, packed, grouped by slice shape; :meth:`stack` builds one volume from it."""

    def __init__(self, batches: list[tuple[tuple[int, int], np.ndarray, np.ndarray]]) -> None:
        by_shape: dict[tuple[int, int], list[tuple[int, np.ndarray, np.ndarray]]] = {}
        start = 0
        for shape, pred, ref in batches:
            by_shape.setdefault(shape, []).append((start, pred, ref))
            start += len(pred)
        self.shape_of = np.zeros(start, dtype=np.int64)  # which shape group holds each slice
        self.row_of = np.zeros(start, dtype=np.int64)  # and its row there
        self.groups: list[tuple[tuple[int, int], np.ndarray, np.ndarray]] = []
        for g, (shape, parts) in enumerate(by_shape.items()):
            cases = np.concatenate([np.arange(s, s + len(p)) for s, p, _ in parts])
            self.shape_of[cases], self.row_of[cases] = g, np.arange(len(cases))
            self.groups.append((shape, np.concatenate([p for _, p, _ in parts]), np.concatenate([r for _, _, r in parts])))

    def stack(self, name: str, cases: list[int], positions: list[int | None]) -> tuple[np.ndarray, np.ndarray]:
        """The ``[Z, H, W]`` prediction and reference of one volume, slices in position order.

        Missing positions between two slices become one empty slice, so lesions never join across a gap.
        """
        groups = np.unique(self.shape_of[cases])
        if len(groups) != 1:
            raise ValueError(f"volume {name!r} has slices of different sizes")
        (height, width), pred, ref = self.groups[int(groups[0])]
        rows = self.row_of[cases]
        wanted = [positions[c] for c in cases]
        depth_index = np.arange(len(cases))
        if all(p is not None for p in wanted):
            order = np.argsort(np.asarray(wanted, dtype=np.int64), kind="stable")
            ordered = np.asarray(wanted, dtype=np.int64)[order]
            repeated = ordered[1:][np.diff(ordered) == 0]
            if repeated.size:
                raise ValueError(f"volume {name!r} has slice {int(repeated[0])} more than once")
            rows = rows[order]
            depth_index = depth_index + np.concatenate([[0], np.cumsum(np.diff(ordered) > 1)])

        def volume(packed: np.ndarray) -> np.ndarray:
            out = np.zeros((int(depth_index[-1]) + 1, height, width), dtype=bool)
            out[depth_index] = np.unpackbits(packed[rows], axis=1, count=height * width).reshape(-1, height, width)
            return out

        return volume(pred), volume(ref)


def _aggregate(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Pooled lesion sensitivity, false-positive lesions per volume and the lesion-volume error."""
    n_ref = sum(r["ref_lesions"] for r in rows)
    in_ml = all(r["voxel_ml"] is not None for r in rows)
    errors = np.asarray([r["volume_error_ml"] if in_ml else r["pred_voxels"] - r["ref_voxels"] for r in rows], dtype=np.float64)
    return {
        "lesion_sensitivity": sum(r["detected_lesions"] for r in rows) / n_ref if n_ref else math.nan,
        "lesion_sensitivity_n": n_ref,
        "fp_lesions_per_volume": float(np.mean([r["fp_lesions"] for r in rows])),
        "lesion_volume_error_mean": float(errors.mean()),
        "lesion_volume_abs_error_mean": float(np.abs(errors).mean()),
        "lesion_volume_unit": "ml" if in_ml else "voxels",
    }
