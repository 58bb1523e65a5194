"""Where each evaluated slice lies in its volume, and how large one of its voxels is.

Slices are grouped into volumes by their group ids (``synomaly.data``): one NIfTI file or DICOM
series is one volume, and an ``.npz`` bundle's slices belong to the volume named in ``<key>_ids``.
A volume's slices are stacked by their slice number: a NIfTI's or series' own slice index, or the
bundle's ``<key>_slice`` array (as ``lgg_flair`` has, whose healthy and tumour slices of one patient
come from two arrays). The voxel volume is known for NIfTI and DICOM series (from the affine) and
is scaled to the model's grid, where the evaluation runs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from synomaly.data import Cases, FileCases
from synomaly.errors import InputError
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


def slice_numbers(files: Sequence[FileCases]) -> list[int]:
    """Each slice's number within its volume (:func:`slice_positions`), for the slices of ``files`` in order;
    a file that records none numbers its slices as read.

    Raises:
        InputError: A ``<key>_slice`` array that cannot be read, or has the wrong length or type.
    """
    numbers: list[int] = []
    for record in files:
        positions = slice_positions(record)
        numbers += positions if positions is not None else list(range(len(record.raw)))
    return numbers


def _positions(record: FileCases, count: int) -> list[int | None]:
    positions = slice_positions(record)
    return list(positions) if positions is not None else [None] * count


def slice_positions(record: FileCases) -> list[int] | None:
    """The number in its volume of each slice read from ``record``, or ``None`` where the source records none.

    An ``.npz`` bundle's ``<key>_slice`` array (one integer per slice of ``<key>``) where it has one;
    otherwise the slice's index in its file as read (NIfTI: along the slice axis; DICOM series: in the
    sorted series; stacks: the page or frame). A slice range keeps the numbers of the slices it took.

    Raises:
        InputError: A ``<key>_slice`` array that cannot be read, or has the wrong length or type.
    """
    props = record.properties
    taken = props.slice_indices if len(props.slice_indices) == len(record.raw) else None
    stored = None if record.source.key is None else read_npz_slices(record.source.path, record.source.key)
    if stored is None:
        return None if taken is None else [int(i) for i in taken]
    taken = taken if taken is not None else list(range(len(record.raw)))
    if props.slice_count != len(stored) or max(taken, default=0) >= len(stored):
        raise InputError(record.source.path, f"{record.source.key}_slice has {len(stored)} entries for "
                                             f"{props.slice_count} slices of {record.source.key}")
    return [int(stored[i]) for i in taken]


def model_voxel_ml(record: FileCases) -> float | None:
    """The volume in mL of one voxel of the model's grid: the file's voxel scaled by the in-plane resize."""
    props = record.properties
    if props.format not in SPATIAL_FORMATS or props.affine is None:
        return None
    voxel_mm3 = abs(float(np.linalg.det(np.asarray(props.affine, dtype=np.float64)[:3, :3])))
    height, width = record.fit.padded_shape
    return voxel_mm3 * height * width / record.fit.size**2 / 1000.0
