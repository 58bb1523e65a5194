"""DICOM files and series folders through pydicom (MONAI's DICOM reader transposes; we do not).

Orientation: ``array[row, col]`` is the stored pixel matrix, which is how every DICOM viewer shows
it (row 0 at the top). A multi-frame file gives one slice per frame. A series folder is all
``.dcm`` files directly inside it, sorted along the slice normal by ``ImagePositionPatient`` (else by
``InstanceNumber``, else by file name). Stored values go through the modality LUT / ``RescaleSlope``
and ``RescaleIntercept`` (e.g. CT in HU). ``MONOCHROME1`` images are *not* inverted; colour and
palette images become gray by BT.601 luminance. Files without the DICOM preamble/meta header and
compressed transfer syntaxes without an installed decoder are refused with the reason.

``properties.affine`` is the voxel-to-RAS+ affine of the NIfTI volume that ``write_image`` makes
from the slices (same convention as NIfTI input: volume ``[W, H, N]``, rows reversed), so a NIfTI
output overlays the DICOM series in a viewer. Writing DICOM itself is not supported.
"""

from __future__ import annotations

import contextlib
import logging
import struct
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from synomaly.errors import InputError
from synomaly.io._base import check_stack_size
from synomaly.limits import MAX_PIXELS, MAX_SLICES

logger = logging.getLogger(__name__)

_LUMA = np.array([0.299, 0.587, 0.114])
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def _dcmread(path: Path):
    """Read a dataset, turning pydicom's errors for damaged or foreign files into InputError."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        return pydicom.dcmread(path)
    except (InvalidDicomError, OSError, EOFError, ValueError, struct.error) as error:
        raise InputError(path, f"not a readable DICOM file ({error})") from error


def _shared_item(ds, sequence: str):
    """The first item of a shared functional group sequence (enhanced multi-frame objects), or None."""
    shared = ds.get("SharedFunctionalGroupsSequence")
    if shared and sequence in shared[0] and shared[0][sequence].value:
        return shared[0][sequence][0]
    return None


@contextlib.contextmanager
def _readable_values(path: Path) -> Iterator[None]:
    """Turn a tag value pydicom cannot convert on access (e.g. an IS of 5,000 digits) into an InputError naming ``path``."""
    try:
        yield
    except InputError:
        raise
    except (ValueError, TypeError, ArithmeticError) as error:
        raise InputError(path, f"holds a DICOM value that cannot be read ({error})") from None


def _frame_count(path: Path, ds) -> int:
    """``NumberOfFrames`` (1 when absent), refusing a value that is not a whole number."""
    value = ds.get("NumberOfFrames", 1) or 1
    try:
        return int(value)
    except (TypeError, ValueError, ArithmeticError):
        raise InputError(path, f"NumberOfFrames is not a whole number ({str(value)[:40]!r})") from None


def _declared_pixels(path: Path, ds) -> int:
    """Pixels the header declares (frames x rows x columns), refused beyond the limits before decoding."""
    rows, cols = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
    frames = _frame_count(path, ds)
    check_stack_size(path, frames, rows, cols)
    return frames * rows * cols


def _pixels(path: Path, ds) -> tuple[np.ndarray, np.ndarray]:
    """Decoded pixels as ``[frames, rows, cols]`` after the modality LUT or rescale, and the raw array."""
    from pydicom.pixels import apply_color_lut, apply_modality_lut

    if not any(tag in ds for tag in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        raise InputError(path, "DICOM file has no pixel data")
    _declared_pixels(path, ds)
    try:
        raw = ds.pixel_array
    except (RuntimeError, NotImplementedError, ValueError, AttributeError, KeyError) as error:
        raise InputError(path, f"cannot decode pixel data ({error})") from error
    frames = _frame_count(path, ds)
    if ds.get("PhotometricInterpretation") == "PALETTE COLOR":
        pixels = apply_color_lut(raw, ds)[..., :3] @ _LUMA
    elif int(ds.get("SamplesPerPixel", 1)) > 1:
        pixels = raw[..., :3] @ _LUMA
    else:
        rescale = ds if "RescaleSlope" in ds or "ModalityLUTSequence" in ds else None
        rescale = rescale or _shared_item(ds, "PixelValueTransformationSequence")
        pixels = apply_modality_lut(raw, rescale) if rescale is not None else raw
    return pixels.reshape(frames, *pixels.shape[-2:]), raw


def _spacing(path: Path, ds) -> tuple[float, float] | None:
    """``(row spacing, column spacing)`` in mm from the dataset or its shared functional groups.

    Raises:
        InputError: ``PixelSpacing`` is not two positive finite numbers.
    """
    source = ds if "PixelSpacing" in ds else _shared_item(ds, "PixelMeasuresSequence")
    if source is None or "PixelSpacing" not in source:
        return None
    values = np.asarray(_numbers(source.PixelSpacing), dtype=np.float64)
    if values.shape != (2,) or not (np.isfinite(values).all() and (values > 0).all()):
        raise InputError(path, f"PixelSpacing {_shown(values)} is not two positive numbers; fix the header (or remove "
                               "the tag to read the pixels without geometry)")
    return float(values[0]), float(values[1])


def _numbers(value) -> list[float]:
    """A DICOM multi-value (or single value) as floats."""
    return [float(v) for v in (value if isinstance(value, Sequence) and not isinstance(value, str) else [value])]


def _shown(values: np.ndarray) -> str:
    """Numbers as a DICOM header shows them: ``(1, 0, 0.5)``."""
    return "(" + ", ".join(f"{v:g}" for v in values) + ")"


def _orientation(path: Path, ds) -> np.ndarray:
    """``ImageOrientationPatient`` as 6 floats (row and column direction cosines).

    Raises:
        InputError: The two directions are not finite perpendicular unit vectors (e.g. all zero).
    """
    iop = np.asarray(_numbers(ds.ImageOrientationPatient), dtype=np.float64)
    ok = bool(iop.shape == (6,) and np.isfinite(iop).all())
    if ok:
        norms = np.linalg.norm(iop.reshape(2, 3), axis=1)
        ok = bool(np.allclose(norms, 1.0, atol=0.01) and abs(iop[:3] @ iop[3:]) < 0.01)
    if not ok:
        raise InputError(path, f"ImageOrientationPatient {_shown(iop)} is not two perpendicular unit vectors; fix the "
                               "header (or remove the tag to read the pixels without geometry)")
    return iop


def _position(path: Path, ds) -> np.ndarray:
    """``ImagePositionPatient`` as 3 finite floats (mm)."""
    ipp = np.asarray(_numbers(ds.ImagePositionPatient), dtype=np.float64)
    if ipp.shape != (3,) or not np.isfinite(ipp).all():
        raise InputError(path, f"ImagePositionPatient {_shown(ipp)} is not three finite numbers; fix the header (or "
                               "remove the tag to read the pixels without geometry)")
    return ipp


def _affine(ipp0, iop, spacing: tuple[float, float], rows: int, step: np.ndarray) -> list[list[float]]:
    """Voxel-to-RAS+ affine of the ``[W, H, N]`` volume made from the slices.

    Voxel ``(a, b, n)`` holds pixel ``(row = rows-1-b, col = a)`` of slice ``n``, whose LPS position
    is ``IPP_n + col * dc * X + row * dr * Y`` (DICOM PS3.3 C.7.6.2.1.1).
    """
    x, y = np.asarray(iop[:3], float), np.asarray(iop[3:], float)
    dr, dc = spacing
    lps = np.eye(4)
    lps[:3, 0] = x * dc
    lps[:3, 1] = -y * dr
    lps[:3, 2] = step
    lps[:3, 3] = np.asarray(ipp0, float) + (rows - 1) * dr * y
    return (_LPS_TO_RAS @ lps).tolist()


def _slice_step(ds) -> float:
    """Distance between slices for a lone slice, where the file records one."""
    for tag in ("SpacingBetweenSlices", "SliceThickness"):
        if ds.get(tag):
            return float(ds.get(tag))
    return 1.0


def _extra(ds) -> dict:
    """Tags worth keeping with the array (JSON-safe)."""
    return {
        "modality": str(ds.get("Modality", "")),
        "photometric_interpretation": str(ds.get("PhotometricInterpretation", "")),
    }


def read_dicom_file(path: Path) -> tuple[np.ndarray, dict]:
    """Read one ``.dcm`` file (2-D or multi-frame) as a ``[frames, rows, cols]`` stack."""
    with _readable_values(path):
        return _read_dicom_file(path)


def _read_dicom_file(path: Path) -> tuple[np.ndarray, dict]:
    ds = _dcmread(path)
    stack, raw = _pixels(path, ds)
    spacing = _spacing(path, ds)
    affine = None
    geometry = ("ImagePositionPatient" in ds and "ImageOrientationPatient" in ds and spacing is not None)
    if geometry and spacing is not None and stack.shape[0] == 1:
        iop = _orientation(path, ds)
        step = np.cross(iop[:3], iop[3:]) * _slice_step(ds)
        affine = _affine(_position(path, ds), iop, spacing, stack.shape[1], step)
    props = {
        "format": "dicom",
        "shape": tuple(raw.shape),
        "dtype": raw.dtype.name,
        "spacing": spacing,
        "affine": affine,
        "extra": _extra(ds),
    }
    return stack, props


def _series_order(files: list[Path], datasets: list) -> tuple[np.ndarray, str, np.ndarray | None]:
    """Sort order of a series' slices, the rule used, and the sorted positions along the normal.

    Raises:
        InputError: A slice's geometry is unusable, or two slices lie at the same position (the folder
            holds more than one volume).
    """
    folder = files[0].parent
    geometry = all("ImagePositionPatient" in ds and "ImageOrientationPatient" in ds for ds in datasets)
    if geometry:
        iops = np.array([_orientation(path, ds) for path, ds in zip(files, datasets)])
        kinds = len({tuple(np.round(iop, 2)) for iop in iops})
        geometry = np.allclose(iops, iops[0], atol=1e-4)
        if not geometry:
            logger.warning("%s: the slices of this series have %d different orientations (ImageOrientationPatient); "
                           "they are sorted by InstanceNumber (or file name) and no NIfTI geometry is written: check that the folder "
                           "holds one series", folder, max(kinds, 2))
    if geometry:
        normal = np.cross(iops[0, :3], iops[0, 3:])
        positions = np.array([_position(path, ds) for path, ds in zip(files, datasets)])
        along = positions @ normal
        order = np.argsort(along, kind="stable")
        same = np.flatnonzero(np.diff(along[order]) < 1e-4)
        if len(same):
            first, second = files[order[same[0]]].name, files[order[same[0] + 1]].name
            raise InputError(folder, f"{len(same) + 1} slices lie at the same position ({first} and {second} at "
                                     f"{along[order[same[0]]]:g} mm along the slice normal): the folder holds more than "
                                     "one volume (echoes, repeats, time points); put each volume in its own folder")
        return order, "position", positions[order]
    if all("InstanceNumber" in ds for ds in datasets):
        return np.argsort([int(ds.InstanceNumber) for ds in datasets], kind="stable"), "instance", None
    logger.warning("%s: slices have neither positions nor instance numbers; sorted by file name",
                   files[0].parent)
    return np.arange(len(files)), "name", None


def _series_affine(ds, positions: np.ndarray, spacing: tuple[float, float], rows: int) -> list[list[float]]:
    """Affine of a sorted series from its first and last slice positions."""
    iop = [float(v) for v in ds.ImageOrientationPatient]  # checked by _series_order
    if len(positions) == 1:
        step = np.cross(iop[:3], iop[3:]) * _slice_step(ds)
    else:
        step = (positions[-1] - positions[0]) / (len(positions) - 1)
        gaps = np.linalg.norm(np.diff(positions, axis=0), axis=1)
        if gaps.min() < 1e-6 or not np.allclose(gaps, gaps.mean(), rtol=0.01):
            logger.warning("slice gaps of this series are not uniform (%.3g..%.3g mm); the NIfTI affine "
                           "assumes uniform steps", gaps.min(), gaps.max())
    return _affine(positions[0], iop, spacing, rows, step)


def read_dicom_series(folder: Path) -> tuple[np.ndarray, dict]:
    """Read every ``.dcm`` file directly inside ``folder`` as one sorted series ``[N, rows, cols]``."""
    with _readable_values(folder):
        return _read_dicom_series(folder)


def _read_dicom_series(folder: Path) -> tuple[np.ndarray, dict]:
    files = sorted(p for p in folder.iterdir()
                   if p.is_file() and p.suffix.lower() == ".dcm" and not p.name.startswith("."))
    if not files:
        raise InputError(folder, "folder has no .dcm files (a folder is read as one DICOM series)")
    if len(files) > MAX_SLICES:
        raise InputError(folder, f"{len(files)} .dcm files; at most {MAX_SLICES} slices per input (the limit)")
    datasets = [_dcmread(path) for path in files]
    declared = sum(_declared_pixels(path, ds) for path, ds in zip(files, datasets))
    if declared > MAX_PIXELS:
        raise InputError(folder, f"the series has {declared:,} pixels; at most {MAX_PIXELS:,} per input (the limit)")
    series = {str(ds.get("SeriesInstanceUID", "")) for ds in datasets}
    if len(series) > 1:
        raise InputError(folder, f"holds {len(series)} DICOM series; put each series in its own folder")
    slices: list[np.ndarray] = []
    raw_dtype = None
    for path, ds in zip(files, datasets):
        stack, raw = _pixels(path, ds)
        if stack.shape[0] != 1:
            raise InputError(path, "multi-frame file inside a series folder; read it on its own")
        if slices and stack.shape != slices[0].shape:
            raise InputError(path, f"slice size {stack.shape[1:]} differs from {slices[0].shape[1:]} "
                                   f"in {files[0].name}")
        slices.append(stack.astype(np.float32))  # float32 in the end anyway; halves peak memory
        raw_dtype = raw.dtype.name
    order, rule, positions = _series_order(files, datasets)
    stack = np.concatenate([slices[i] for i in order])
    spacing = _spacing(files[0], datasets[0])
    affine = _series_affine(datasets[order[0]], positions, spacing, stack.shape[1]) if (
        positions is not None and spacing is not None) else None
    extra = {**_extra(datasets[0]), "files": [files[i].name for i in order], "sorted_by": rule}
    props = {"format": "dicom-series", "shape": tuple(stack.shape), "dtype": raw_dtype,
             "spacing": spacing, "affine": affine, "extra": extra}
    return stack, props
