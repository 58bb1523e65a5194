"""Expanding an input argument into images, and naming outputs safely after their inputs."""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

from synomaly.errors import InputError
from synomaly.io._base import SUPPORTED_SUFFIXES, suffix_of

_MAX_STEM = 200  # leaves room for an added suffix within the usual 255-byte name limit
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def list_inputs(path: str | Path, recursive: bool = False) -> list[Path]:
    """Expand a file or folder into the inputs ``read_images`` accepts, sorted.

    A folder gives the supported files directly inside it (hidden entries skipped); a folder that
    directly holds ``.dcm`` files is one DICOM series. With ``recursive``, every subfolder is searched
    the same way (each folder of ``.dcm`` files one series); without it, subfolders (a ``masks/``
    folder beside the images, say) are left alone.

    Raises:
        InputError: ``path`` is missing, has an unsupported suffix, or holds no supported input.
    """
    path = Path(path)
    if not path.exists():
        raise InputError(path, "does not exist")
    if path.is_file():
        _check_suffix(path)
        return [path]
    found: list[Path] = []
    for folder, dirs, files in os.walk(path):
        dirs[:] = [d for d in dirs if not d.startswith(".")] if recursive else []
        visible = [name for name in files if not name.startswith(".")]
        if any(suffix_of(name) == ".dcm" for name in visible):
            found.append(Path(folder))
        found += [Path(folder, name) for name in visible
                  if suffix_of(name) in SUPPORTED_SUFFIXES and suffix_of(name) != ".dcm"]
    if not found:
        subfolders = not recursive and any(entry.is_dir() and not entry.name.startswith(".") for entry in path.iterdir())
        nested = "; its subfolders are searched only with --recursive" if subfolders else ""
        raise InputError(path, f"no supported images found (suffixes {', '.join(SUPPORTED_SUFFIXES)}){nested}")
    return sorted(found)


def _check_suffix(path: Path) -> None:
    """Refuse a file whose suffix no reader handles."""
    if suffix_of(path) not in SUPPORTED_SUFFIXES:
        raise InputError(path, f"unsupported file type; supported: {', '.join(SUPPORTED_SUFFIXES)}")


def output_stem(input_path: str | Path, root: str | Path) -> str:
    """A flat, filesystem-safe file stem for the outputs of ``input_path``.

    The path relative to ``root`` (the folder the user pointed at, or the file itself) is kept,
    folders joined by ``__``, so ``root/p01/flair.nii.gz`` becomes ``p01__flair``. The result holds
    only letters, digits, ``.``, ``_`` and ``-``, never ``..``, never starts or ends with a dot, and is cut
    to 200 characters with a hash of the full name, so ``out_dir / (stem + suffix)`` stays in
    ``out_dir``. A name whose characters had to be replaced gets a hash of the original (``a b.png``
    and ``a_b.png`` never share outputs), so the name is stable across reruns. Inputs outside
    ``root`` keep only their own name.
    """
    input_path, root = Path(os.path.abspath(input_path)), Path(os.path.abspath(root))
    try:
        parts = list(input_path.relative_to(root).parts) or [input_path.name]
    except ValueError:
        parts = [input_path.name]
    suffix = suffix_of(parts[-1])
    if suffix in SUPPORTED_SUFFIXES:
        parts[-1] = parts[-1][: len(parts[-1]) - len(suffix)]
    cleaned = [_UNSAFE.sub("_", part) for part in parts]
    stem = re.sub(r"\.{2,}", ".", "__".join(p for p in cleaned if p.strip("."))).lstrip(".-").rstrip(".")
    lossy = stem != "__".join(parts)  # characters were replaced: two inputs could meet in one name
    stem = stem or "input"
    if lossy:
        stem = f"{stem[: _MAX_STEM - 9]}-{hashlib.sha256('/'.join(parts).encode()).hexdigest()[:8]}"
    if len(stem) > _MAX_STEM:
        digest = hashlib.sha256(stem.encode()).hexdigest()[:12]
        stem = f"{stem[: _MAX_STEM - 13]}-{digest}"
    return stem
