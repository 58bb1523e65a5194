"""Where each evaluated slice lies in its volume, and how large one of its voxels is.

Slices are grouped into volumes by their group ids (``synomaly.data``): one NIfTI file or DICOM
series is one volume, and an ``.npz`` bundle's slices belong to the volume named in ``<key>_ids``.
A volume's slices are stacked by their slice number: a NIfTI's or series' own slice index, or the
bundle's ``<key>_slice`` array (as ``lgg_flair`` has, whose healthy and tumour slices of one patient
come from two arrays). The voxel volume is known for NIfTI and DICOM series (from the affine) and
is scaled to the model's grid, where the evaluation runs.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from synomaly.data import Cases, FileCases
from synomaly.io import read_npz_slices

SPATIAL_FORMATS = ("nifti", "dicom-series")  # formats whose affine gives a voxel volume


@dataclass(frozen=True)
class VolumeLayout:
    """One entry per slice of a :class:`~synomaly.data.Cases`.

    Attributes:
        positions: The slice's number in its volume; ``None`` where the source records none (the
            volume's slices are then taken in the order they come).
        voxel_ml: The volume of one voxel of the model's grid in mL; ``None`` where the spacing is unknown.
    """

    positions: list[int | None]
    voxel_ml: list[float | None]


def volume_layout(cases: Cases) -> VolumeLayout:
    """The slice numbers and voxel volumes of every slice of ``cases``, file by file."""
    positions: list[int | None] = []
    voxel_ml: list[float | None] = []
    for record in cases.files:
        count = len(record.raw)
        positions += _positions(record, count)
        voxel_ml += [model_voxel_ml(record)] * count
    return VolumeLayout(positions, voxel_ml)


def _positions(record: FileCases, count: int) -> list[int | None]:
    if record.source.key is not None:
        numbers = read_npz_slices(record.source.path, record.source.key, count)
        return list(numbers) if numbers is not None else [None] * count
    indices = record.properties.slice_indices
    return list(indices) if len(indices) == count else [None] * count


def model_voxel_ml(record: FileCases) -> float | None:
    """The volume in mL of one voxel of the model's grid: the file's voxel scaled by the in-plane resize."""
    props = record.properties
    if props.format not in SPATIAL_FORMATS or props.affine is None:
        return None
    voxel_mm3 = abs(float(np.linalg.det(np.asarray(props.affine, dtype=np.float64)[:3, :3])))
    height, width = record.fit.padded_shape
    return voxel_mm3 * height * width / record.fit.size**2 / 1000.0
