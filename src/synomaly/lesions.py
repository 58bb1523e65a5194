"""Lesion tables: the connected components of a detection mask, with their size and place in physical units.

A volume written as NIfTI is read back as any other tool would read it (its stored voxel order and
affine), its mask labelled in 3-D, and each lesion reported with its volume in mL and its centroid
in world coordinates (millimetres, RAS+ as NIfTI and nibabel define them). A stack of 2-D images is
labelled slice by slice, with areas in mm^2 where the pixel spacing is known and in pixels always.

A volume's mask can also lose its lesions below a smallest size (:class:`MinVolume`, in mm^3, mL or
voxels) before it is written: one 3-D labelling across slices, on the input's grid.
"""

from __future__ import annotations

import csv
import io
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

from synomaly import _atomic
from synomaly.errors import ConfigError

LESIONS_NAME = "lesions.csv"
WORLD = "RAS+ millimetres (NIfTI world coordinates)"


_SIZE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*(mm3|mm\^3|ml|voxels?)\s*$", re.IGNORECASE)
_UNITS = {"mm3": "mm3", "mm^3": "mm3", "ml": "ml", "voxel": "voxels", "voxels": "voxels"}


@dataclass(frozen=True)
class MinVolume:
    """The smallest 3-D lesion a volume's mask keeps: ``value`` in ``unit`` (``mm3``, ``ml`` or ``voxels``)."""

    value: float
    unit: str

    @classmethod
    def parse(cls, text: str, option: str = "--min-volume") -> MinVolume:
        """``"10mm3"``, ``"0.05 ml"`` or ``"8voxels"``; anything else is a one-line ``ConfigError`` naming ``option``."""
        match = _SIZE.match(str(text))
        if not match:
            raise ConfigError(option, f"expected a size and its unit, e.g. 10mm3, 0.05ml or 8voxels; got {text!r}")
        return cls(float(match[1]), _UNITS[match[2].lower()])

    def __str__(self) -> str:
        return f"{self.value:g}{self.unit}"

    def voxels(self, voxel_mm3: float) -> int:
        """The fewest voxels of ``voxel_mm3`` each that a kept lesion has: ``ceil(size / voxel volume)``."""
        if self.unit == "voxels":
            return math.ceil(self.value)
        wanted = self.value * (1000.0 if self.unit == "ml" else 1.0) / voxel_mm3
        return math.ceil(wanted * (1 - 1e-9))  # 4.86 mm3 / (0.9 x 0.9 x 3 mm) is 2 voxels, not 3 by rounding error


def remove_small_lesions(mask: np.ndarray, min_voxels: int, connectivity: int = 1) -> tuple[np.ndarray, int]:
    """Drop the 3-D connected components of fewer than ``min_voxels`` voxels from a volume mask.

    One ``scipy.ndimage.label`` call over the whole volume, so a lesion that is small on every slice
    but large across slices is kept. ``connectivity`` 1 links faces (6 neighbours), 2 also edges (18).

    Returns:
        The kept mask (bool, the input's shape) and how many lesions were dropped.
    """
    mask = np.asarray(mask).astype(bool)
    if min_voxels <= 1:
        return mask, 0
    labels, count = _label(mask, connectivity)
    keep = np.bincount(labels.ravel(), minlength=count + 1) >= min_voxels
    keep[0] = False
    return keep[labels], int(count - keep.sum())


def _label(mask: np.ndarray, connectivity: int) -> tuple[np.ndarray, int]:
    structure = ndimage.generate_binary_structure(mask.ndim, connectivity)
    labels, count = ndimage.label(mask, structure=structure)
    return labels, int(count)


def _stats(labels: np.ndarray, count: int, values: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, list]:
    """Voxel counts, largest and mean ``values``, and bounding boxes of labels ``1..count``."""
    index = np.arange(1, count + 1)
    sizes = np.bincount(labels.ravel(), minlength=count + 1)[1:]
    largest = np.asarray(ndimage.maximum(values, labels, index), dtype=np.float64).reshape(-1)
    mean = np.asarray(ndimage.mean(values, labels, index), dtype=np.float64).reshape(-1)
    return sizes, largest, mean, ndimage.find_objects(labels)


def volume_lesions(mask: np.ndarray, anomaly_map: np.ndarray, affine: np.ndarray,
                   connectivity: int = 1) -> list[dict[str, Any]]:
    """The 3-D lesions of a volume mask in its stored voxel order.

    Args:
        mask: ``[I, J, K]`` (bool or 0/1) as stored.
        anomaly_map: ``[I, J, K]`` anomaly map on the same grid.
        affine: The 4x4 voxel-to-world affine (mm).
        connectivity: 1 (faces) to 3 (faces, edges and corners) in 3-D.

    Returns:
        One row per lesion, largest first: ``lesion``, ``voxels``, ``volume_ml``, centroid ``x_mm``,
        ``y_mm``, ``z_mm`` (world), ``i0..k1`` (bounding box in voxels, end exclusive), ``map_max``, ``map_mean``.
    """
    mask = np.asarray(mask).astype(bool)
    if mask.ndim != 3 or np.shape(anomaly_map) != mask.shape:
        raise ValueError(f"expected 3-D mask and map of one shape, got {mask.shape} and {np.shape(anomaly_map)}")
    labels, count = _label(mask, connectivity)
    if count == 0:
        return []
    sizes, largest, mean, boxes = _stats(labels, count, np.asarray(anomaly_map, dtype=np.float64))
    voxel_ml = abs(float(np.linalg.det(np.asarray(affine, dtype=np.float64)[:3, :3]))) / 1000.0
    centres = np.asarray(ndimage.center_of_mass(mask, labels, np.arange(1, count + 1)), dtype=np.float64).reshape(count, 3)
    world = centres @ np.asarray(affine, dtype=np.float64)[:3, :3].T + np.asarray(affine, dtype=np.float64)[:3, 3]
    rows = []
    for n in np.argsort(-sizes, kind="stable"):
        box = boxes[n]
        rows.append({"voxels": int(sizes[n]), "volume_ml": round(float(sizes[n]) * voxel_ml, 6),
                     "x_mm": round(float(world[n, 0]), 3), "y_mm": round(float(world[n, 1]), 3),
                     "z_mm": round(float(world[n, 2]), 3),
                     "i0": box[0].start, "i1": box[0].stop, "j0": box[1].start, "j1": box[1].stop,
                     "k0": box[2].start, "k1": box[2].stop,
                     "map_max": round(float(largest[n]), 6), "map_mean": round(float(mean[n]), 6)})
    return [{"lesion": i + 1, **row} for i, row in enumerate(rows)]


def slice_lesions(mask: np.ndarray, anomaly_map: np.ndarray, spacing: tuple[float, float] | None,
                  connectivity: int = 1, slice_numbers: list[int] | None = None) -> list[dict[str, Any]]:
    """The 2-D lesions of each ``[K, H, W]`` slice (labelled per slice), with areas in pixels and mm^2.

    Returns:
        One row per lesion, by slice then size: ``lesion``, ``slice``, ``pixels``, ``area_mm2`` (``None``
        without a spacing), centroid ``row``, ``col`` (pixels), ``row0..col1`` (bounding box, end exclusive),
        ``map_max``, ``map_mean``. ``slice`` is the slice's number in the source (``slice_numbers``, e.g.
        when a slice range was read) or its index in the stack.
    """
    mask = np.asarray(mask).astype(bool)
    if mask.ndim != 3 or np.shape(anomaly_map) != mask.shape:
        raise ValueError(f"expected [K, H, W] mask and map of one shape, got {mask.shape} and {np.shape(anomaly_map)}")
    structure = np.zeros((3, 3, 3), dtype=bool)
    structure[1] = ndimage.generate_binary_structure(2, connectivity)  # no links between slices
    labels, count = ndimage.label(mask, structure=structure)
    if count == 0:
        return []
    sizes, largest, mean, boxes = _stats(labels, int(count), np.asarray(anomaly_map, dtype=np.float64))
    centres = np.asarray(ndimage.center_of_mass(mask, labels, np.arange(1, count + 1)), dtype=np.float64).reshape(count, 3)
    pixel_mm2 = None if spacing is None else float(spacing[0]) * float(spacing[1])
    order = sorted(range(count), key=lambda n: (boxes[n][0].start, -sizes[n]))
    rows = []
    for i, n in enumerate(order):
        box = boxes[n]
        k = box[0].start
        rows.append({"lesion": i + 1, "slice": k if slice_numbers is None else int(slice_numbers[k]), "pixels": int(sizes[n]),
                     "area_mm2": None if pixel_mm2 is None else round(float(sizes[n]) * pixel_mm2, 6),
                     "row": round(float(centres[n, 1]), 3), "col": round(float(centres[n, 2]), 3),
                     "row0": box[1].start, "row1": box[1].stop, "col0": box[2].start, "col1": box[2].stop,
                     "map_max": round(float(largest[n]), 6), "map_mean": round(float(mean[n]), 6)})
    return rows


def lesions_of_nifti(mask_path: Path, map_path: Path, connectivity: int = 1) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The lesion table of a written NIfTI mask (and map), read back as any NIfTI reader would; and its totals."""
    import nibabel

    mask_image = nibabel.load(mask_path)
    mask = np.asanyarray(mask_image.dataobj)  # type: ignore[attr-defined]  # NIfTI images have it
    amap = np.asanyarray(nibabel.load(map_path).dataobj)  # type: ignore[attr-defined]
    mask, amap = mask.reshape(mask.shape[:3]) if mask.ndim > 3 else mask, amap.reshape(amap.shape[:3]) if amap.ndim > 3 else amap
    if mask.ndim == 2:
        mask, amap = mask[..., None], amap[..., None]
    affine = np.asarray(mask_image.affine)  # type: ignore[attr-defined]
    rows = volume_lesions(mask, amap, affine, connectivity)
    axes = "".join(nibabel.aff2axcodes(affine))
    totals = {"count": len(rows), "total_ml": round(sum(r["volume_ml"] for r in rows), 6),
              "coordinates": WORLD, "voxel_order": axes, "file": LESIONS_NAME}
    return rows, totals


def lesions_of_slices(mask: np.ndarray, anomaly_map: np.ndarray, spacing: tuple[float, float] | None,
                      connectivity: int = 1, slice_numbers: list[int] | None = None
                      ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The lesion table of a ``[K, H, W]`` stack of 2-D images, and its totals."""
    rows = slice_lesions(mask, anomaly_map, spacing, connectivity, slice_numbers)
    total_mm2 = None if spacing is None else round(sum(r["area_mm2"] for r in rows), 6)
    return rows, {"count": len(rows), "total_px": sum(r["pixels"] for r in rows), "total_mm2": total_mm2,
                  "coordinates": "pixels (row, column) of each slice", "file": LESIONS_NAME}


def write_lesions(path: Path, rows: list[dict[str, Any]], columns: list[str]) -> None:
    """Write the table as CSV (a header only when there is no lesion), atomically."""
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows({key: ("" if row.get(key) is None else row[key]) for key in columns} for row in rows)
    _atomic.write_text(path, text.getvalue())


VOLUME_COLUMNS = ["lesion", "voxels", "volume_ml", "x_mm", "y_mm", "z_mm", "i0", "i1", "j0", "j1", "k0", "k1",
                  "map_max", "map_mean"]
SLICE_COLUMNS = ["lesion", "slice", "pixels", "area_mm2", "row", "col", "row0", "row1", "col0", "col1", "map_max",
                 "map_mean"]
