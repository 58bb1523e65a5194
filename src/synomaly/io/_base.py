"""What every reader and writer shares: the properties record, suffix rules and array checks."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from synomaly.errors import ConfigError, InputError
from synomaly.limits import MAX_DECOMPRESSED_BYTES, MAX_PIXELS, MAX_SIDE, MAX_SLICES

#: Suffixes ``read_images`` accepts (case-insensitive); a folder of ``.dcm`` files is a DICOM series.
SUPPORTED_SUFFIXES: tuple[str, ...] = (
    ".png", ".jpg", ".jpeg", ".tif", ".tiff", ".nii", ".nii.gz", ".dcm", ".npy", ".npz",
)
#: Suffixes ``write_image`` accepts. JPEG is lossy and DICOM writing is out of scope.
WRITABLE_SUFFIXES: tuple[str, ...] = (".png", ".tif", ".tiff", ".nii", ".nii.gz", ".npy")


@dataclass
class ImageProperties:
    """Everything a writer needs to put an output back on the input's grid.

    Attributes:
        path: The file (or DICOM series folder) that was read.
        format: ``"png"``, ``"jpeg"``, ``"tiff"``, ``"nifti"``, ``"dicom"``, ``"dicom-series"``,
            ``"npy"`` or ``"npz"``.
        shape: The stored array's shape as read (a NIfTI volume's full shape, a PNG's
            ``(H, W)`` or ``(H, W, 3)``, a DICOM series' ``(N, H, W)``).
        stack_shape: Shape ``(N, H, W)`` of the float32 slice stack ``read_images`` returned.
        dtype: The stored dtype, before rescaling and conversion to float32.
        spacing: Pixel size ``(row spacing, column spacing)`` in mm where the file records it.
        affine: A 4x4 voxel-to-RAS+ matrix for NIfTI output: the NIfTI's own, or one derived
            from the DICOM geometry in the same slice convention.
        slice_axis: The NIfTI array axis the slices were taken along; ``None`` for other formats.
        slice_indices: Which slices of the stored stack or volume were taken, in order.
        slice_count: How many slices the stored stack or volume has (before ``slice_range``).
        extra: Format details a writer needs (NIfTI header, npz key, DICOM file names, ...),
            JSON-safe.
    """

    path: str
    format: str
    shape: tuple[int, ...]
    stack_shape: tuple[int, int, int]
    dtype: str
    spacing: tuple[float, float] | None = None
    affine: list[list[float]] | None = None
    slice_axis: int | None = None
    slice_indices: list[int] = field(default_factory=list)
    slice_count: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-safe dict (tuples become lists)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ImageProperties:
        """Rebuild properties from :meth:`to_dict` output (e.g. after a JSON round trip)."""
        data = dict(data)
        data["shape"] = tuple(data["shape"])
        data["stack_shape"] = tuple(data["stack_shape"])
        if data.get("spacing") is not None:
            data["spacing"] = tuple(data["spacing"])
        return cls(**data)


def suffix_of(path: str | Path) -> str:
    """The lower-case suffix that picks a reader or writer (``.nii.gz`` counts as one suffix)."""
    name = Path(path).name.lower()
    if name.endswith(".nii.gz"):
        return ".nii.gz"
    return Path(name).suffix


def check_slice_range(slice_range: tuple[int, int] | None) -> None:
    """Reject a malformed ``slice_range`` option before any file is opened."""
    if slice_range is None:
        return
    ok = (
        len(slice_range) == 2
        and all(isinstance(v, (int, np.integer)) for v in slice_range)
        and 0 <= slice_range[0] < slice_range[1]
    )
    if not ok:
        raise ConfigError("slice_range", f"must be (start, stop) with 0 <= start < stop, got {slice_range!r}")


def take_slices(
    path: str | Path, stack: np.ndarray, slice_range: tuple[int, int] | None, what: str = "slices"
) -> tuple[np.ndarray, list[int]]:
    """Select ``stack[start:stop]`` (half-open, like Python slicing) and the indices taken."""
    count = stack.shape[0]
    if slice_range is None:
        return stack, list(range(count))
    start, stop = int(slice_range[0]), int(slice_range[1])
    if stop > count:
        raise InputError(path, f"slice range {start}:{stop} is outside the {count} {what}")
    return stack[start:stop], list(range(start, stop))


def as_checked_float32(path: str | Path, stack: np.ndarray) -> np.ndarray:
    """Convert a numeric ``[N, H, W]`` stack to contiguous float32, refusing empty or non-finite data."""
    if stack.dtype.kind not in "biuf":
        raise InputError(path, f"array of type {stack.dtype} is not numeric image data")
    if stack.ndim != 3 or 0 in stack.shape:
        raise InputError(path, f"no image data (slice stack of shape {tuple(stack.shape)})")
    with np.errstate(over="ignore"):  # values beyond float32 become inf, refused below with the file's name
        out = np.ascontiguousarray(stack, dtype=np.float32)
    if not np.isfinite(out).all():
        raise InputError(path, "contains NaN or infinite values (or values beyond float32 range)")
    return out


def as_stack(path: str | Path, array: np.ndarray, what: str) -> np.ndarray:
    """Turn a 2-D image into a 1-slice stack; refuse anything that is not 2-D or 3-D."""
    if array.ndim == 2:
        return array[None]
    if array.ndim == 3:
        return array
    raise InputError(path, f"expected a 2-D image or a 3-D stack of slices, got {what} of shape {array.shape}")


def check_stack_size(path: str | Path, slices: int, height: int, width: int) -> None:
    """Refuse an input of ``slices`` images of ``height x width`` beyond the limits on sides, slices and pixels.

    Readers call it with the sizes their file's header declares, before pixels are decoded.
    """
    if max(height, width) > MAX_SIDE:
        raise InputError(path, f"image is {width}x{height} pixels; at most {MAX_SIDE} pixels per side (the limit)")
    if slices > MAX_SLICES:
        raise InputError(path, f"{slices} slices; at most {MAX_SLICES} per input (the limit)")
    pixels = slices * height * width
    if pixels > MAX_PIXELS:
        raise InputError(path, f"{slices} slices of {width}x{height} are {pixels:,} pixels; at most {MAX_PIXELS:,} "
                               "per input (the limit)")


def check_decompressed_size(path: str | Path, shape: tuple[int, ...], itemsize: int, what: str = "array") -> None:
    """Refuse a compressed array of ``shape`` (read from its header) that would exceed ``MAX_DECOMPRESSED_BYTES``."""
    size = math.prod(shape) * itemsize
    if size > MAX_DECOMPRESSED_BYTES:
        raise InputError(path, f"{what} of shape {shape} takes {size / 2**30:.1f} GiB once decompressed; at most "
                               f"{MAX_DECOMPRESSED_BYTES / 2**30:g} GiB (the limit)")


def check_array_size(path: str | Path, shape: tuple[int, ...], itemsize: int, what: str = "array",
                     compressed: bool = False) -> None:
    """Refuse an array whose declared ``shape`` exceeds the limits, before it is read or decompressed.

    A 2-D or 3-D shape is checked as slices (:func:`check_stack_size`); any other shape by its
    pixel count only (it is refused as an image later). ``compressed``: the stored bytes must also
    fit ``MAX_DECOMPRESSED_BYTES`` once decompressed.
    """
    dims = [int(n) for n in shape]
    count = math.prod(dims)
    if compressed:
        check_decompressed_size(path, tuple(dims), itemsize, what)
    if len(dims) in (2, 3):
        dims = [1, *dims] if len(dims) == 2 else dims
        check_stack_size(path, dims[0], dims[1], dims[2])
    elif count > MAX_PIXELS:
        raise InputError(path, f"{what} of shape {tuple(shape)} has {count:,} values; at most {MAX_PIXELS:,} per input "
                               "(the limit)")
