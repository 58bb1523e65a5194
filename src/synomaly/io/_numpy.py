"""NumPy ``.npy`` arrays and ``.npz`` bundles (always loaded with ``allow_pickle=False``).

An array is ``[H, W]`` (one image) or ``[N, H, W]`` (a stack, e.g. ``lgg_flair.npz["test_anomalous"]``),
indexed ``array[row, col]`` with no reorientation.
"""

from __future__ import annotations

import logging
import math
import zipfile
import zlib
from pathlib import Path

import numpy as np

from synomaly.errors import InputError
from synomaly.io._base import check_array_size
from synomaly.limits import MAX_DECOMPRESSED_BYTES

logger = logging.getLogger(__name__)

# np.load raises these for truncated, foreign or pickled content.
_LOAD_ERRORS = (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error)


def read_npy(path: Path) -> tuple[np.ndarray, dict]:
    """Load a ``.npy`` array (memory-mapped, so a slice range reads only those slices)."""
    try:
        array = np.load(path, allow_pickle=False, mmap_mode="r")
    except _LOAD_ERRORS as error:
        raise InputError(path, f"cannot read .npy ({error})") from error
    check_array_size(path, array.shape, array.dtype.itemsize)
    return array, {"format": "npy", "shape": tuple(array.shape), "dtype": array.dtype.name}


def _member_header(bundle: zipfile.ZipFile, name: str) -> tuple[tuple[int, ...], np.dtype]:
    """Shape and dtype of the ``.npy`` member ``name``, from its header alone (nothing else is decompressed)."""
    with bundle.open(name) as stream:
        version = np.lib.format.read_magic(stream)
        # Version 3.0 differs from 2.0 only in the header's text encoding.
        read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, _, dtype = read(stream)
    return tuple(shape), dtype


def _member_name(bundle: zipfile.ZipFile, key: str) -> str:
    """The zip member that ``np.load`` reads for ``key``."""
    return f"{key}.npy" if f"{key}.npy" in bundle.namelist() else key


def read_npz(path: Path, key: str | None) -> tuple[np.ndarray, dict]:
    """Load the array stored under ``key``; without a key, the bundle must hold exactly one array.

    The array's size is read from its header and checked against the limits before it is decompressed.
    """
    try:
        with np.load(path, allow_pickle=False) as bundle:
            keys = list(bundle.keys())
            chosen = keys[0] if key is None and len(keys) == 1 else key
            header = _member_header(bundle.zip, _member_name(bundle.zip, chosen)) if chosen and chosen in keys else None
    except _LOAD_ERRORS as error:
        raise InputError(path, f"cannot read .npz ({error})") from error
    if chosen is None:
        raise InputError(path, f"holds {len(keys)} arrays; pass key= one of {keys}")
    if chosen == "":
        raise InputError(path, f"no array named after ':' (write {path.name}:KEY); available keys: {keys}")
    if header is None:
        raise InputError(path, f"has no array {chosen!r}; available keys: {keys}")
    shape, dtype = header
    check_array_size(path, shape, dtype.itemsize, f"array {chosen!r}", compressed=True)
    try:
        with np.load(path, allow_pickle=False) as bundle:
            array = bundle[chosen]
    except _LOAD_ERRORS as error:
        raise InputError(path, f"cannot read .npz ({error})") from error
    props = {"format": "npz", "shape": tuple(array.shape), "dtype": array.dtype.name, "extra": {"key": chosen}}
    return array, props


def _companion(path: Path, name: str, count: int) -> np.ndarray | None:
    """The array ``name`` of the bundle when it holds one entry per slice of a ``count``-slice array, else ``None``."""
    try:
        with np.load(path, allow_pickle=False) as bundle:
            if name not in bundle.files:
                return None
            shape, dtype = _member_header(bundle.zip, _member_name(bundle.zip, name))
            if len(shape) != 1 or shape[0] != count or math.prod(shape) * dtype.itemsize > MAX_DECOMPRESSED_BYTES:
                logger.warning("%s: %s of shape %s is not one %s per slice (%d slices read); it is not used to group "
                               "slices into volumes", path, name, tuple(shape), "id" if name.endswith("_ids") else "number", count)
                return None
            return bundle[name]
    except _LOAD_ERRORS as error:
        raise InputError(path, f"cannot read {name} ({error})") from error


def read_npz_ids(path: Path, key: str, count: int) -> list[str] | None:
    """The group ids stored beside array ``key`` as ``<key>_ids``, or ``None`` unless there are ``count`` of them."""
    ids = _companion(path, f"{key}_ids", count)
    return None if ids is None else [str(g) for g in ids]


def read_npz_slices(path: Path, key: str) -> np.ndarray | None:
    """The integer array ``<key>_slice`` stored beside array ``key`` (slice numbers), or ``None`` when there is none.

    Raises:
        InputError: The array cannot be read, is too large, or is not a 1-D integer array.
    """
    name = f"{key}_slice"
    try:
        with np.load(path, allow_pickle=False) as bundle:
            if name not in bundle.files:
                return None
            shape, dtype = _member_header(bundle.zip, _member_name(bundle.zip, name))
            if len(shape) != 1 or dtype.kind not in "iu":
                raise InputError(path, f"{name} must be a 1-D integer array, got {dtype} of shape {list(shape)}")
            if math.prod(shape) * dtype.itemsize > MAX_DECOMPRESSED_BYTES:
                raise InputError(path, f"{name} holds {math.prod(shape):,} entries, more than the limit allows")
            return bundle[name]
    except _LOAD_ERRORS as error:
        raise InputError(path, f"cannot read {name} ({error})") from None


def write_npy(tmp: Path, stack: np.ndarray, two_d: bool) -> None:
    """Save the array exactly; ``[1, H, W]`` is saved as ``[H, W]`` when ``two_d``."""
    np.save(tmp, stack[0] if two_d and stack.shape[0] == 1 else stack, allow_pickle=False)
