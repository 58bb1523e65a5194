"""What a slice stack's geometry says about the anatomy: the orientation of its image axes and its pixel size.

A model learns anatomy at one orientation and scale. ``config.json`` records those of the training
inputs (``training_geometry``) and ``detect`` warns when an input differs (``geometry_mismatch``).

Orientation is written as three RAS+ letters: the patient directions towards which image columns
(left to right), image rows (top to bottom) and slices run. Axial slices in the radiological view
(the patient's right on the image's left, anterior at the top), as DICOM stores them and as every
NIfTI volume reads here (``synomaly.io._nifti``), are ``LPS``; sagittal slices of a NIfTI volume
(``--slice-axis 0``) are ``AIL``. Images and arrays carry no orientation (``None``).

The pixel size that matters is the one the model sees: millimetres per pixel of its input, the
file's spacing times the fitted (padded or cropped) side over the model's side.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from typing import Any, Protocol

import numpy as np

from synomaly.io._base import ImageProperties

_OPPOSITE = str.maketrans("LRAPSI", "RLPAIS")
SPACING_RATIO = 1.5  # a pixel size this many times larger or smaller than the training's is warned about


class Fitted(Protocol):
    """What the preprocessing's ``FitInfo`` tells about the fitting: the side fitted to and the padded shape."""

    @property
    def size(self) -> int: ...

    @property
    def padded_shape(self) -> tuple[int, int]: ...


def _axcodes(affine: Any) -> str | None:
    """The RAS+ letters of an affine's voxel axes, or ``None`` when it has no usable orientation."""
    from nibabel import orientations

    matrix = np.asarray(affine, dtype=np.float64)
    if matrix.shape != (4, 4) or not np.isfinite(matrix).all():
        return None
    ornt = orientations.io_orientation(matrix)
    return None if np.isnan(ornt).any() else "".join(orientations.ornt2axcodes(ornt))


def slice_orientation(props: ImageProperties) -> str | None:
    """The patient directions (RAS+ letters) of image columns, image rows and slices, e.g. ``LPS``; ``None`` if unknown.

    NIfTI volumes are read in canonical LAS order (2-D images and single slices as stored); DICOM
    affines describe the ``[W, H, N]`` volume of the slices. Either way slices are cut along one
    volume axis and ``image = rot90(volume_slice)``: columns run along the first remaining axis and
    rows against the second.
    """
    from synomaly.io._nifti import CANONICAL

    if props.affine is None or props.format not in ("nifti", "dicom", "dicom-series"):
        return None
    canonical = props.format == "nifti" and props.extra.get("orientation") is not None
    codes = "".join(CANONICAL) if canonical else _axcodes(props.affine)
    if codes is None:
        return None
    axis = 2 if props.slice_axis is None else props.slice_axis
    a, b = (i for i in range(3) if i != axis)
    return codes[a] + codes[b].translate(_OPPOSITE) + codes[axis]


def model_pixel_spacing(props: ImageProperties, fit: Fitted) -> tuple[float, float] | None:
    """Millimetres per pixel of the model's input (row, column) for slices of ``props`` fitted as ``fit`` says."""
    if props.spacing is None:
        return None
    rows, cols = fit.padded_shape
    return float(props.spacing[0]) * rows / fit.size, float(props.spacing[1]) * cols / fit.size


def training_geometry(inputs: Iterable[tuple[ImageProperties, Fitted, int]]) -> dict[str, Any]:
    """What ``config.json`` records of the training inputs ``(properties, fit, slices)``.

    Returns ``orientation`` (the most common one, by slices) and ``pixel_spacing_mm`` (the median
    millimetres per model pixel, row and column, over the slices that record a spacing), each
    ``None`` when no input records it (images, arrays), and ``orientations`` when inputs disagree.
    """
    orientations: Counter[str] = Counter()
    spacings, weights = [], []
    for props, fit, count in inputs:
        orientation, spacing = slice_orientation(props), model_pixel_spacing(props, fit)
        if orientation is not None:
            orientations[orientation] += count
        if spacing is not None:
            spacings.append(spacing)
            weights.append(count)
    record: dict[str, Any] = {"orientation": orientations.most_common(1)[0][0] if orientations else None,
                              "pixel_spacing_mm": None}
    if spacings:
        per_slice = np.repeat(np.asarray(spacings), weights, axis=0)
        record["pixel_spacing_mm"] = [round(float(v), 6) for v in np.median(per_slice, axis=0)]
    if len(orientations) > 1:
        record["orientations"] = dict(orientations)
    return record


def geometry_mismatch(trained: dict[str, Any], props: ImageProperties, fit: Fitted) -> str | None:
    """Why an input's slices look different to the model than its training slices did, or ``None``.

    Compares the orientation and the millimetres per model pixel (by more than ``SPACING_RATIO``
    either way) with ``trained`` (``config.json``'s training record); what either side does not
    record is not compared.
    """
    problems = []
    orientation, expected = slice_orientation(props), trained.get("orientation")
    if orientation is not None and expected is not None and orientation != expected:
        problems.append(f"its slices run {orientation} (columns, rows, slices as RAS+ letters) where the model's training "
                        f"slices ran {expected}: check --slice-axis, or reorient the input")
    spacing, trained_spacing = model_pixel_spacing(props, fit), trained.get("pixel_spacing_mm")
    if spacing is not None and trained_spacing is not None:
        ratios = [s / t for s, t in zip(spacing, trained_spacing) if t > 0]
        if any(max(r, 1 / r) > SPACING_RATIO for r in ratios if r > 0):
            problems.append(f"the model sees it at {spacing[0]:.3g} x {spacing[1]:.3g} mm per pixel where it was trained at "
                            f"{trained_spacing[0]:.3g} x {trained_spacing[1]:.3g}: anatomy and lesions look "
                            f"{'smaller' if spacing[0] > trained_spacing[0] else 'larger'} to it; resample or crop the input")
    return "; ".join(problems) or None
