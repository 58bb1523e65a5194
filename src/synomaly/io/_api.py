"""Reading and writing by suffix: ``read_images``, ``read_mask`` and ``write_image``."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from synomaly._atomic import atomic_path
from synomaly.errors import ConfigError, InputError
from synomaly.io import _dicom, _nifti, _numpy, _pillow
from synomaly.io._base import (
    SUPPORTED_SUFFIXES,
    WRITABLE_SUFFIXES,
    ImageProperties,
    as_checked_float32,
    as_stack,
    check_slice_range,
    suffix_of,
    take_slices,
)

logger = logging.getLogger(__name__)


def _read_stack(path: Path, slice_axis: int, key: str | None) -> tuple[np.ndarray, dict]:
    """Dispatch on the suffix (or on being a folder) to the format's reader."""
    if path.is_dir():
        return _dicom.read_dicom_series(path)
    suffix = suffix_of(path)
    if suffix not in SUPPORTED_SUFFIXES:
        raise InputError(path, f"unsupported file type; supported: {', '.join(SUPPORTED_SUFFIXES)}")
    if path.stat().st_size == 0:
        raise InputError(path, "file is empty")
    if suffix in (".nii", ".nii.gz"):
        return _nifti.read_nifti(path, slice_axis)
    if suffix == ".dcm":
        return _dicom.read_dicom_file(path)
    if suffix in (".npy", ".npz"):
        array, props = _numpy.read_npy(path) if suffix == ".npy" else _numpy.read_npz(path, key)
        return as_stack(path, array, "an array"), props
    return _pillow.read_pillow(path)


def read_images(
    path: str | Path,
    *,
    slice_axis: int = 2,
    slice_range: tuple[int, int] | None = None,
    key: str | None = None,
) -> tuple[np.ndarray, ImageProperties]:
    """Read a file or DICOM series folder as float32 slices ``[N, H, W]`` with raw intensities.

    ``H x W`` is rows x columns as a viewer shows the image (see each format's module for the
    exact convention). Nothing is normalised; DICOM rescale slopes/intercepts and NIfTI
    ``scl_slope``/``scl_inter`` are applied.

    Args:
        path: A ``.png/.jpg/.tif/.nii(.gz)/.dcm/.npy/.npz`` file, or a folder of ``.dcm`` files.
        slice_axis: NIfTI array axis to slice along (0, 1 or 2); other formats stack along their
            own frame/first axis.
        slice_range: Half-open ``(start, stop)`` of slices to keep (along ``slice_axis`` for NIfTI,
            frames/pages/first axis otherwise); all slices when ``None``.
        key: The array to read from an ``.npz`` bundle (optional when it holds only one).

    Returns:
        The slices and the :class:`ImageProperties` a writer needs to put outputs back.

    Raises:
        InputError: The file is missing, unsupported, damaged, empty, non-finite or not 2-D/3-D.
        ConfigError: ``slice_axis`` or ``slice_range`` is malformed.
    """
    path = Path(path)
    if slice_axis not in (0, 1, 2):
        raise ConfigError("slice_axis", f"must be 0, 1 or 2, got {slice_axis!r}")
    check_slice_range(slice_range)
    if not path.exists():
        raise InputError(path, "does not exist")
    stack, props = _read_stack(path, slice_axis, key)
    selected, indices = take_slices(path, stack, slice_range)
    images = as_checked_float32(path, selected)
    properties = ImageProperties(
        path=str(path), stack_shape=tuple(images.shape), slice_indices=indices,
        slice_count=int(stack.shape[0]), **props
    )
    return images, properties


def read_mask(
    path: str | Path,
    like: ImageProperties,
    *,
    slice_axis: int | None = None,
    slice_range: tuple[int, int] | None = None,
    key: str | None = None,
) -> np.ndarray:
    """Read a binary mask through the same reader as its image, so the two stay aligned.

    Foreground is 1 (or 255 in 8-bit files, e.g. a PNG mask saved as 0/255); any other value is
    refused. ``slice_axis`` and ``slice_range`` default to those the image was read with.

    Args:
        path: The mask file, in any readable format.
        like: The properties of the image the mask belongs to.
        slice_axis, slice_range, key: As for :func:`read_images` (``key`` names the mask's array).

    Returns:
        A bool array with the image's ``[N, H, W]`` shape.

    Raises:
        InputError: Unreadable mask, values other than 0/1 (0/255), or a shape that differs from
            the image's.
    """
    if slice_axis is None:
        slice_axis = 2 if like.slice_axis is None else like.slice_axis
    if slice_range is None and like.slice_indices:
        slice_range = (like.slice_indices[0], like.slice_indices[-1] + 1)
    values, props = read_images(path, slice_axis=slice_axis, slice_range=slice_range, key=key)
    same_count = like.slice_count is None or props.slice_count == like.slice_count
    if values.shape != tuple(like.stack_shape) or not same_count:
        raise InputError(path, f"mask shape {values.shape} of {props.slice_count} slices does not match image "
                               f"shape {tuple(like.stack_shape)} of {like.slice_count} in {like.path}")
    both_nifti = props.format == "nifti" and like.format == "nifti"
    if both_nifti and props.affine is not None and like.affine is not None and not np.allclose(props.affine, like.affine, atol=1e-3):
        logger.warning("%s: mask affine differs from the affine of %s; both were brought to the canonical voxel order "
                       "(%s and %s stored), then aligned voxel by voxel", path, like.path,
                       props.extra.get("axcodes"), like.extra.get("axcodes"))
    return _binary(path, values, eight_bit=props.dtype == "uint8")


def _binary(path: Path | str, values: np.ndarray, eight_bit: bool) -> np.ndarray:
    """Map 0/1 (or 0/255 for 8-bit data) to bool, refusing anything else."""
    is_zero, is_one = values == 0, values == 1
    if (is_zero | is_one).all():
        return is_one
    if eight_bit and (is_zero | (values == 255)).all():
        return values == 255
    allowed = "0/1 or 0/255" if eight_bit else "0/1"
    found = ", ".join(f"{v:g}" for v in np.unique(values)[:6])
    raise InputError(path, f"mask values must be {allowed}; found {found}")


def _output_stack(path: Path, array: Any) -> np.ndarray:
    """``[H, W]``, ``[N, H, W]`` or ``[N, 1, H, W]`` (numpy or a torch tensor) as ``[N, H, W]`` numpy."""
    if hasattr(array, "detach"):
        array = array.detach().cpu().numpy()
    array = np.asarray(array)
    if array.ndim == 4 and array.shape[1] == 1:
        array = array[:, 0]
    if array.ndim not in (2, 3):
        raise ValueError(f"{path}: expected an [H, W], [N, H, W] or [N, 1, H, W] array, got {array.shape}")
    return array[None] if array.ndim == 2 else array


def write_image(path: str | Path, array: Any, like: ImageProperties | None = None) -> None:
    """Write slices atomically, in the format the suffix names, on the grid of ``like``.

    - ``.nii`` / ``.nii.gz``: next to a NIfTI input, a volume of the input's full shape (slices not
      processed are zero) with its affine and header; otherwise a ``[W, H, N]`` volume with the
      DICOM-derived affine or the pixel spacing. Masks are stored as uint8 0/1, maps as float32.
    - ``.png``: one 2-D image; bool -> 8-bit 0/255, integers -> 8 or 16 bit, float maps -> 16-bit
      scaled from their own min..max (range kept in the ``synomaly.value_range`` text chunk).
    - ``.tif`` / ``.tiff``: one page per slice; as PNG but floats are stored exactly (32-bit).
    - ``.npy``: the values exactly; ``[H, W]`` when the array was 2-D or ``like`` was a 2-D ``.npy``.

    Args:
        path: Output file; its folder is created.
        array: ``[H, W]``, ``[N, H, W]`` or ``[N, 1, H, W]`` numpy array or torch tensor.
        like: Properties of the input the array was computed from; its stack shape must match.

    Raises:
        InputError: The suffix cannot be written (JPEG, DICOM, unknown) or a PNG gets several slices.
        ValueError: The array's shape does not match ``like`` or its values cannot be stored.
    """
    path = Path(path)
    suffix = suffix_of(path)
    if suffix not in WRITABLE_SUFFIXES:
        raise InputError(path, f"cannot write this file type; writable: {', '.join(WRITABLE_SUFFIXES)}")
    two_d = np.ndim(array) == 2 or (like is not None and like.format == "npy" and len(like.shape) == 2)
    stack = _output_stack(path, array)
    if like is not None and stack.shape != tuple(like.stack_shape):
        raise ValueError(f"{path}: array shape {stack.shape} does not match {tuple(like.stack_shape)} "
                         f"of {like.path}")
    with atomic_path(path) as tmp:
        if suffix in (".nii", ".nii.gz"):
            _nifti.write_nifti(tmp, stack, like)
        elif suffix == ".npy":
            _numpy.write_npy(tmp, stack, two_d)
        else:
            _pillow.write_pillow(path, tmp, stack)
