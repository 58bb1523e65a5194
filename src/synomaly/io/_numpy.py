"""NumPy ``.npy`` arrays and ``.npz`` bundles (always loaded with ``allow_pickle=False``).

An array is ``[H, W]`` (one image) or ``[N, H, W]`` (a stack, e.g. ``lgg_flair.npz["test_anomalous"]``),
indexed ``array[row, col]`` with no reorientation.
"""

from __future__ import annotations

import zipfile
import zlib
from pathlib import Path

import numpy as np

from synomaly.errors import InputError

# np.load raises these for truncated, foreign or pickled content.
_LOAD_ERRORS = (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error)


def read_npy(path: Path) -> tuple[np.ndarray, dict]:
    """Load a ``.npy`` array (memory-mapped, so a slice range reads only those slices)."""
    try:
        array = np.load(path, allow_pickle=False, mmap_mode="r")
    except _LOAD_ERRORS as error:
        raise InputError(path, f"cannot read .npy ({error})") from error
    return array, {"format": "npy", "shape": tuple(array.shape), "dtype": array.dtype.name}


def read_npz(path: Path, key: str | None) -> tuple[np.ndarray, dict]:
    """Load the array stored under ``key``; without a key, the bundle must hold exactly one array."""
    try:
        with np.load(path, allow_pickle=False) as bundle:
            keys = list(bundle.keys())
            chosen = keys[0] if key is None and len(keys) == 1 else key
            array = bundle[chosen] if chosen in keys else None
    except _LOAD_ERRORS as error:
        raise InputError(path, f"cannot read .npz ({error})") from error
    if chosen is None:
        raise InputError(path, f"holds {len(keys)} arrays; pass key= one of {keys}")
    if array is None:
        raise InputError(path, f"has no array {chosen!r}; available keys: {keys}")
    props = {"format": "npz", "shape": tuple(array.shape), "dtype": array.dtype.name, "extra": {"key": chosen}}
    return array, props


def write_npy(tmp: Path, stack: np.ndarray, two_d: bool) -> None:
    """Save the array exactly; ``[1, H, W]`` is saved as ``[H, W]`` when ``two_d``."""
    np.save(tmp, stack[0] if two_d and stack.shape[0] == 1 else stack, allow_pickle=False)
