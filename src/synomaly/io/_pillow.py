"""PNG, JPEG and TIFF through Pillow.

Orientation: ``array[row, col]`` exactly as Pillow decodes it, i.e. as any viewer shows the picture
(row 0 at the top). Colour images become gray by ITU-R BT.601 luminance
``0.299 R + 0.587 G + 0.114 B`` (Pillow's own ``convert("L")`` weights, computed in float so no
rounding is added). Alpha is dropped. Every page of a multi-page TIFF is one slice.
"""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np

from synomaly.errors import InputError
from synomaly.io._base import check_stack_size

_LUMA = np.array([0.299, 0.587, 0.114])
# Modes whose pixels are already single gray values.
_GRAY_MODES = ("1", "L", "I", "F", "I;16", "I;16L", "I;16B", "I;16N")
_FORMAT_NAMES = {"PNG": "png", "JPEG": "jpeg", "TIFF": "tiff", "MPO": "jpeg"}
# Metadata key under which float maps record the range they were scaled from.
VALUE_RANGE_KEY = "synomaly.value_range"


def _frame_to_gray(frame) -> np.ndarray:
    """One decoded frame as a 2-D array of gray values, keeping its bit depth where it is gray."""
    if frame.mode in _GRAY_MODES:
        return np.asarray(frame)
    if frame.mode in ("LA", "La"):
        return np.asarray(frame.getchannel("L"))
    # Palette, RGB(A), CMYK, YCbCr, ...: Pillow knows how to get RGB from each.
    rgb = np.asarray(frame.convert("RGB"), dtype=np.float64)
    return rgb @ _LUMA


def read_pillow(path: Path) -> tuple[np.ndarray, dict]:
    """Decode every frame of an image file into a ``[N, H, W]`` stack.

    Returns:
        The stack (stored dtype for gray images, float64 luminance for colour) and the
        keyword arguments of its :class:`ImageProperties` (without the slice fields).
    """
    from PIL import Image, ImageSequence

    try:
        with Image.open(path) as image:  # reads the header only
            fmt = _FORMAT_NAMES.get(image.format or "", (image.format or "unknown").lower())
            mode, bands = image.mode, len(image.getbands())
            count = int(getattr(image, "n_frames", 1))
            frames = []
            for frame in ImageSequence.Iterator(image):
                width, height = frame.size
                check_stack_size(path, count, height, width)  # before the frame is decoded
                frames.append(_frame_to_gray(frame))
    except InputError:
        raise
    # Damaged files surface from Pillow's many decoders as any of these.
    except (OSError, SyntaxError, ValueError, EOFError, IndexError, KeyError, struct.error,
            Image.DecompressionBombError) as error:
        raise InputError(path, f"cannot read image ({error})") from error
    if len({frame.shape for frame in frames}) > 1:
        raise InputError(path, "pages differ in size; cannot stack them")
    # Pillow's colour and palette modes hold 8 bits per band.
    gray = mode in _GRAY_MODES
    page_shape = frames[0].shape if gray else (*frames[0].shape, bands)
    shape = page_shape if len(frames) == 1 else (len(frames), *page_shape)
    dtype = frames[0].dtype.name if gray else "uint8"
    props = {"format": fmt, "shape": tuple(shape), "dtype": dtype, "extra": {"mode": mode}}
    return np.stack(frames), props


def _to_storable(
    array: np.ndarray, path: Path, allow_float: bool
) -> tuple[np.ndarray, tuple[float, float] | None]:
    """Pick the stored integer type: masks become 0/255 bytes, integers keep 8 or 16 bits.

    Float maps are kept as float32 where the format can (TIFF) and otherwise scaled linearly
    from their own min..max to 0..65535 (16-bit PNG); that range is returned to be recorded.
    """
    if array.dtype == bool:
        return array.astype(np.uint8) * np.uint8(255), None
    if array.dtype.kind in "iu":
        least, most = (int(array.min()), int(array.max())) if array.size else (0, 0)
        if least >= 0 and most <= 255:
            return array.astype(np.uint8), None
        if least >= 0 and most <= 65535:
            return array.astype(np.uint16), None
        if not allow_float:
            raise ValueError(f"{path}: integer values {least}..{most} do not fit a 16-bit PNG; scale them first")
    if allow_float:
        return array.astype(np.float32), None
    if not np.isfinite(array).all():
        raise ValueError(f"{path}: cannot scale NaN or infinite values into a PNG")
    low, high = float(array.min()), float(array.max())
    scaled = (array - low) / (high - low) * 65535.0 if high > low else np.zeros_like(array)
    return np.rint(scaled).astype(np.uint16), (low, high)


def write_pillow(path: Path, tmp: Path, stack: np.ndarray) -> None:
    """Write ``[N, H, W]`` as one PNG (N must be 1) or a multi-page TIFF at ``tmp``.

    PNG: bool -> 8-bit 0/255, integers -> 8-bit if they fit else 16-bit, float -> 16-bit scaled
    from the map's own min..max (recorded in the ``synomaly.value_range`` text chunk).
    TIFF: as PNG, but float is stored exactly as 32-bit float.
    """
    from PIL import Image, PngImagePlugin

    is_tiff = tmp.name.lower().endswith((".tif", ".tiff"))
    if not is_tiff and stack.shape[0] != 1:
        raise InputError(path, f"a PNG holds one 2-D image, got {stack.shape[0]} slices; "
                               "write .tif, .nii.gz or .npy")
    data, value_range = _to_storable(stack, path, allow_float=is_tiff)
    pages = [Image.fromarray(np.ascontiguousarray(page)) for page in data]
    if is_tiff:
        pages[0].save(tmp, format="TIFF", save_all=True, append_images=pages[1:])
        return
    info = PngImagePlugin.PngInfo()
    if value_range is not None:
        info.add_text(VALUE_RANGE_KEY, f"{value_range[0]!r} {value_range[1]!r}")
    pages[0].save(tmp, format="PNG", pnginfo=info)
