"""NIfTI-1/2 volumes through nibabel.

Orientation: a volume is brought to one canonical voxel order on reading, ``CANONICAL`` = LAS
(voxel axes run towards the patient's Left, Anterior and Superior, as FSL and DICOM converters
store brains), by flips and axis swaps only (nibabel's ``io_orientation``; no resampling). So
``slice_axis=2`` is always the axial axis, and the same scan stored as RAS, LPS or anything else
gives the same slices. Writers apply the exact inverse, so outputs land in the input's own voxel
order with its own affine and header. 2-D images and single-slice volumes are kept as stored.

Slice convention (one rule for every slice axis, images and masks alike, exactly invertible):
the two remaining array axes ``(a, b)`` of ``vol`` (in array order) become columns and rows with
``b`` reversed, i.e. ``image = np.rot90(vol_slice)``, so ``image[row, col] = vol_slice[col, B-1-row]``.
This is what ``matplotlib.imshow(vol_slice.T, origin="lower")`` shows, and for the usual
RAS/LAS-stored volumes it puts anterior (axial) or superior (coronal, sagittal) at the top.
It is also the inverse of NIfTI's bottom-up row order, so a NIfTI that ``write_image`` made from
DICOM input reads back as exactly the DICOM's images (converters such as dcm2niix store rows the
same way). For a canonical (LAS) volume this is the radiological view of DICOM and of the usual PNG
slices: axial slices show the patient's right on the image's left and anterior at the top.
"""

from __future__ import annotations

import base64
import logging
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from synomaly.errors import ConfigError, InputError
from synomaly.io._base import ImageProperties, check_decompressed_size, check_stack_size

logger = logging.getLogger(__name__)

CANONICAL = ("L", "A", "S")


def stored_orientation(path: Path, affine: Any) -> list[list[float]]:
    """The stored voxel axes' orientation (nibabel ``io_orientation`` rows: RAS axis, direction).

    Raises:
        InputError: The affine is not finite or has no orientation (e.g. a NaN in the sform).
    """
    from nibabel import orientations

    affine = np.asarray(affine, dtype=np.float64)
    if affine.shape != (4, 4) or not np.isfinite(affine).all():
        raise InputError(path, "the affine (sform/qform) holds NaN or infinite values; fix the header (e.g. with nibabel)")
    ornt = orientations.io_orientation(affine)
    if np.isnan(ornt).any():
        raise InputError(path, "the affine has no usable orientation (a degenerate axis)")
    return ornt.tolist()


def reorient(volume: np.ndarray, stored: list[list[float]], inverse: bool = False) -> np.ndarray:
    """A stored-order volume in ``CANONICAL`` order, or (``inverse``) a canonical volume back in the stored order."""
    from nibabel import orientations

    canonical, ornt = orientations.axcodes2ornt(CANONICAL), np.asarray(stored, dtype=np.float64)
    transform = orientations.ornt_transform(canonical, ornt) if inverse else orientations.ornt_transform(ornt, canonical)
    return orientations.apply_orientation(volume, transform)


def canonical_zooms(zooms: list[float], stored: list[list[float]]) -> list[float]:
    """Voxel sizes along the canonical axes (``zooms`` along the stored ones)."""
    out = [1.0, 1.0, 1.0]
    for axis, (target, _) in enumerate(stored):
        out[int(target)] = zooms[axis]
    return out


def volume_to_slices(volume: np.ndarray, axis: int) -> np.ndarray:
    """A ``[K, H, W]`` view of a 3-D volume's slices along ``axis`` in the convention above."""
    return np.rot90(np.moveaxis(volume, axis, 0), k=1, axes=(1, 2))


def slices_to_volume(stack: np.ndarray, axis: int) -> np.ndarray:
    """Inverse of :func:`volume_to_slices`: a view of ``[K, H, W]`` slices as a 3-D volume."""
    return np.moveaxis(np.rot90(stack, k=-1, axes=(1, 2)), 0, axis)


def _as_3d(path: Path, shape: tuple[int, ...]) -> tuple[int, int, int]:
    """The 3-D shape a stored shape is handled as: 2-D gets one slice, trailing 1s are dropped."""
    core = list(shape)
    while len(core) > 3 and core[-1] == 1:
        core.pop()
    if len(core) == 2:
        core.append(1)
    if len(core) != 3:
        raise InputError(path, f"expected a 2-D or 3-D image, got shape {tuple(shape)} (one volume only)")
    return core[0], core[1], core[2]


def _check_volume_size(path: Path, image: Any, shape3: tuple[int, int, int], stored: list[list[float]] | None,
                       axis: int, others: tuple[int, int]) -> None:
    """Refuse a volume beyond the limits, from its header: its slices along ``axis`` and, for ``.nii.gz``, its bytes."""
    canonical = list(shape3)
    for stored_axis, (target, _) in enumerate(stored or []):
        canonical[int(target)] = shape3[stored_axis]
    if str(path).lower().endswith(".gz"):
        check_decompressed_size(path, tuple(int(n) for n in image.shape), image.get_data_dtype().itemsize, "volume")
    check_stack_size(path, canonical[axis], canonical[others[1]], canonical[others[0]])


def read_nifti(path: Path, slice_axis: int) -> tuple[np.ndarray, dict]:
    """Load a NIfTI file as a ``[K, H, W]`` slice view (scaled by ``scl_slope``/``scl_inter``).

    A 2-D image (or a volume with one slice along ``slice_axis = 2``) gives one slice; for 2-D
    images ``slice_axis`` is ignored.
    """
    import nibabel
    from nibabel.filebasedimages import ImageFileError
    from nibabel.spatialimages import HeaderDataError

    if slice_axis not in (0, 1, 2):
        raise ConfigError("slice_axis", f"must be 0, 1 or 2, got {slice_axis!r}")
    errors = (ImageFileError, HeaderDataError, OSError, EOFError, ValueError, zlib.error)
    try:
        image = nibabel.load(path)  # the header only
    except errors as error:
        raise InputError(path, f"cannot read NIfTI ({error})") from error
    if not isinstance(image, (nibabel.Nifti1Image, nibabel.Nifti2Image)):
        raise InputError(path, f"not a NIfTI image ({type(image).__name__})")
    is_2d = image.ndim == 2
    if is_2d and slice_axis != 2:
        logger.debug("%s is 2-D: slice_axis %d does not apply", path, slice_axis)
    axis = 2 if is_2d else slice_axis
    shape3 = _as_3d(path, image.shape)
    stored = None
    if not is_2d and min(shape3) > 1:  # a single slice (any axis) is kept as stored, like a 2-D image
        stored = stored_orientation(path, image.affine)
    a, b = [i for i in range(3) if i != axis]
    _check_volume_size(path, image, shape3, stored, axis, (a, b))
    try:
        data = np.asanyarray(image.dataobj)
    except errors as error:
        raise InputError(path, f"cannot read NIfTI ({error})") from error
    volume = data.reshape(shape3)
    zooms = [float(z) for z in image.header.get_zooms()[:3]]
    zooms += [1.0] * (3 - len(zooms))
    if stored is not None:
        volume = reorient(volume, stored)
        zooms = canonical_zooms(zooms, stored)
    props = {
        "format": "nifti",
        "shape": tuple(int(n) for n in image.shape),
        "dtype": image.get_data_dtype().name,
        "spacing": (zooms[b], zooms[a]),
        "affine": image.affine.tolist(),
        "slice_axis": None if is_2d else axis,
        "extra": {
            "nifti_version": 2 if isinstance(image, nibabel.Nifti2Image) else 1,
            "nifti_header": base64.b64encode(image.header.binaryblock).decode("ascii"),
            "orientation": stored,  # stored voxel axes (nibabel ornt); None: 2-D, kept as stored
            "axcodes": None if stored is None else "".join(nibabel.orientations.ornt2axcodes(stored)),
        },
    }
    return volume_to_slices(volume, axis), props


def _header_from(like: ImageProperties):
    """Rebuild the input's NIfTI header from its properties."""
    import nibabel

    header_class = nibabel.Nifti2Header if like.extra.get("nifti_version") == 2 else nibabel.Nifti1Header
    header = header_class(binaryblock=base64.b64decode(like.extra["nifti_header"]))
    # The input's display window would make a mask or map look wrong in viewers.
    header["cal_min"], header["cal_max"] = 0, 0
    return header


def _storage_dtype(stack: np.ndarray) -> np.dtype:
    """NIfTI storage type: masks as uint8 0/1, floats as float32, integers as they are."""
    if stack.dtype == bool:
        return np.dtype(np.uint8)
    if stack.dtype.kind == "f":
        return np.dtype(np.float32)
    if stack.dtype.itemsize == 8:
        info = np.iinfo(np.int32)
        if stack.size and (stack.min() < info.min or stack.max() > info.max):
            raise ValueError("64-bit integer values do not fit int32; convert them to float first")
        return np.dtype(np.int32)
    return stack.dtype


def write_nifti(tmp: Path, stack: np.ndarray, like: ImageProperties | None) -> None:
    """Write a ``[N, H, W]`` stack as a NIfTI volume at ``tmp``.

    With a NIfTI ``like``, the slices go back to ``like.slice_indices`` of a zero volume of the
    input's full shape, with the input's affine and header. Otherwise the stack becomes a
    ``[W, H, N]`` volume (slice axis 2, same convention) with ``like.affine`` if known, else a
    diagonal affine from ``like.spacing`` (identity without properties).
    """
    import nibabel

    dtype = _storage_dtype(stack)
    if like is not None and like.format == "nifti":
        stored = like.extra.get("orientation")
        shape3 = _as_3d(Path(like.path), like.shape)
        if stored is not None:
            shape3 = reorient(np.empty(shape3, dtype=np.uint8), stored).shape
        volume = np.zeros(shape3, dtype=dtype)
        axis = 2 if like.slice_axis is None else like.slice_axis
        volume_to_slices(volume, axis)[like.slice_indices] = stack
        if stored is not None:
            volume = reorient(volume, stored, inverse=True)
        volume = np.ascontiguousarray(volume).reshape(like.shape)
        header = _header_from(like)
    else:
        volume = np.ascontiguousarray(slices_to_volume(stack.astype(dtype), 2))
        header = None
    affine = np.asarray(like.affine) if like is not None and like.affine is not None else _spacing_affine(like)
    nifti2 = like is not None and like.extra.get("nifti_version") == 2
    image_class = nibabel.Nifti2Image if nifti2 else nibabel.Nifti1Image
    image = image_class(volume, affine, header=header)
    image.set_data_dtype(dtype)
    nibabel.save(image, tmp)


def _spacing_affine(like: ImageProperties | None) -> np.ndarray:
    """Diagonal ``CANONICAL`` (LAS) affine from the pixel spacing (array axis 0 runs along columns, axis 1 along rows).

    The image's columns run towards the patient's left, as in the radiological view of 2-D slices,
    so the volume reads back as exactly these slices.
    """
    affine = np.diag([-1.0, 1.0, 1.0, 1.0])
    if like is not None and like.spacing is not None:
        affine[0, 0], affine[1, 1] = -like.spacing[1], like.spacing[0]
    return affine
