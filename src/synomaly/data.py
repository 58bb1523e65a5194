"""From files on disk to model-space tensors: sources, masks, preprocessing, case and group ids.

A *source* is a file, a folder (expanded to the supported files or DICOM series inside it), or an
``.npz`` bundle with the array named after a colon: ``lgg_flair.npz:test_anomalous``. The same
spec names a mask (``lgg_flair.npz:test_masks``); ``none`` marks a source as healthy (empty masks).
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from synomaly.errors import InputError
from synomaly.io import ImageProperties, list_inputs, read_images, read_mask, read_npz_ids
from synomaly.limits import MAX_PIXELS
from synomaly.preprocess import FitInfo, Preprocessing, fit_pixels, fit_to_size

log = logging.getLogger(__name__)

_NPZ_KEY = re.compile(r"^(?P<path>.+\.npz):(?P<key>[\w.-]*)$", re.IGNORECASE)  # an empty key is refused by the reader
HEALTHY = "none"
MAX_UPSAMPLING = 4  # smaller images hold too little detail for the model's size: they are refused


@dataclass(frozen=True)
class Source:
    """One input: a path and, for ``.npz`` bundles, the array's key."""

    path: Path
    key: str | None = None

    @classmethod
    def parse(cls, spec: str | Path) -> Source:
        """Parse ``path`` or ``bundle.npz:key``."""
        match = _NPZ_KEY.match(str(spec))
        if match:
            return cls(Path(match["path"]), match["key"])
        return cls(Path(spec))

    @property
    def name(self) -> str:
        return f"{self.path.name}:{self.key}" if self.key else self.path.name


@dataclass
class FileCases:
    """The slices of one file (or series, or npz array), as read and as model input."""

    source: Source
    properties: ImageProperties
    fit: FitInfo
    raw: np.ndarray  # [n, H, W] raw intensities
    case_ids: list[str]
    group_ids: list[str]


@dataclass
class Cases:
    """A data set in model space, with everything needed to map outputs back to the files."""

    images: Tensor  # [N, 1, S, S] float32 in [-1, 1]
    foreground: Tensor  # [N, 1, S, S] bool
    masks: Tensor | None  # [N, 1, S, S] bool, None when no masks were given
    case_ids: list[str]
    group_ids: list[str]
    files: list[FileCases] = field(default_factory=list)

    def __len__(self) -> int:
        return self.images.shape[0]


def expand(spec: str | Path, recursive: bool = False) -> list[Source]:
    """A source spec as the list of files (or DICOM series folders) it stands for (subfolders only when ``recursive``)."""
    source = Source.parse(spec)
    if source.key is not None:
        return [source]
    return [Source(path) for path in list_inputs(source.path, recursive)]


def _ids(source: Source, props: ImageProperties, n: int) -> tuple[list[str], list[str]]:
    """Case ids (file[, slice]) and group ids (patient/volume) for the ``n`` slices read from ``source``.

    An ``.npz`` array's slices are named by their index in the array, so a slice range keeps them and their
    ``<key>_ids`` groups."""
    if source.key is not None:
        taken = props.slice_indices if len(props.slice_indices) == n else list(range(n))
        case_ids = [f"{source.key}[{i}]" for i in taken]
        groups = read_npz_ids(source.path, source.key, props.slice_count or n)
        return case_ids, [groups[i] for i in taken] if groups else case_ids
    stem = source.path.name
    case_ids = [stem] if n == 1 else [f"{stem}[{i}]" for i in range(n)]
    return case_ids, [stem] * n


def load_file(source: Source, preprocessing: Preprocessing, slice_axis: int = 2,
              slice_range: tuple[int, int] | None = None,
              foreground: str | None = None) -> tuple[FileCases, np.ndarray, np.ndarray]:
    """Read and preprocess one source; returns the file record, model-space images and foreground.

    ``foreground`` names a mask source (file, folder entry or ``bundle.npz:key``) read like a lesion
    mask and used instead of the model's computed foreground rule.
    """
    raw, props = read_images(source.path, slice_axis=slice_axis, slice_range=slice_range, key=source.key)
    smallest = max(1, preprocessing.size // MAX_UPSAMPLING)
    if min(raw.shape[-2:]) < smallest:
        raise InputError(source.name, f"image is {raw.shape[-1]}x{raw.shape[-2]} pixels; this model ({preprocessing.size}x"
                                      f"{preprocessing.size}) takes images of at least {smallest} pixels per side")
    height, width = raw.shape[-2:]
    fitted = len(raw) * fit_pixels((height, width), preprocessing.size, preprocessing.fit)
    if fitted > MAX_PIXELS:  # checked before the padded copy is made (letterbox pads to the longer side)
        raise InputError(source.name, f"{len(raw)} slices of {width}x{height} take {fitted:,} pixels once fitted to "
                                      f"{preprocessing.size}x{preprocessing.size} ({preprocessing.fit}); at most "
                                      f"{MAX_PIXELS:,} per input (the limit)")
    region = None
    if foreground is not None:
        spec = Source.parse(foreground)
        region = read_mask(spec.path, props, key=spec.key)
    elif preprocessing.foreground == "given":
        raise InputError(source.name, "this model's foreground is 'given': pass a foreground mask per input "
                                      "(--foreground-masks)")
    images, fg, fit = preprocessing.apply(raw, region)
    case_ids, group_ids = _ids(source, props, len(raw))
    return FileCases(source, props, fit, raw, case_ids, group_ids), images, fg


def _distinct_file_groups(files: list[FileCases]) -> None:
    """Name a file's volume by its path where two files share a name (``p1/flair.nii.gz``, ``p2/flair.nii.gz``).

    An ``.npz`` array's groups are its ``<key>_ids`` and stay shared on purpose (a patient's slices in two arrays).
    """
    owners: dict[str, set[Path]] = {}
    for record in files:
        if record.source.key is None:
            owners.setdefault(record.group_ids[0], set()).add(record.source.path)
    for record in files:
        if record.source.key is None and len(owners[record.group_ids[0]]) > 1:
            record.group_ids = [str(record.source.path)] * len(record.group_ids)


def load_mask(spec: str, record: FileCases, preprocessing: Preprocessing) -> np.ndarray:
    """The mask of ``record`` in model space (``[n, 1, S, S]`` bool); ``none`` gives empty masks."""
    n = len(record.raw)
    if spec.lower() == HEALTHY:
        return np.zeros((n, 1, preprocessing.size, preprocessing.size), dtype=bool)
    source = Source.parse(spec)
    if source.path.resolve() == record.source.path.resolve() and source.key == record.source.key:
        raise InputError(spec, "is the image itself, not its mask: give the masks' files or folder, or --mask-suffix "
                               "for masks that lie beside their images (X_mask.png beside X.png)")
    mask = read_mask(source.path, record.properties, key=source.key)
    fitted, _ = fit_to_size(mask, preprocessing.size, preprocessing.fit, kind="mask")
    return np.asarray(fitted, dtype=bool)[:, None]


def pair_sources(image_specs: list[str], *spec_lists: list[str] | None, recursive: bool = False) -> list[tuple[Any, ...]]:
    """Expand image specs and pair every file with its spec from each list (folders pair by file name).

    Folders are searched for images directly inside them, and in their subfolders too when ``recursive``.

    Returns tuples ``(source, spec_1, spec_2, ...)`` with ``None`` for a list that is ``None``.
    """
    for specs in spec_lists:
        if specs is not None and len(specs) != len(image_specs):
            raise InputError(specs[0] if specs else "masks",
                             f"{len(specs)} mask sources given for {len(image_specs)} image sources")
    pairs: list[tuple[Any, ...]] = []
    for i, spec in enumerate(image_specs):
        sources = expand(spec, recursive)
        for source in sources:
            row: list[Any] = [source]
            for specs in spec_lists:
                mask_spec = None if specs is None else specs[i]
                if mask_spec is None or mask_spec.lower() == HEALTHY or len(sources) == 1:
                    row.append(mask_spec)
                else:
                    row.append(str(Path(mask_spec) / source.path.relative_to(Path(spec))))
            pairs.append(tuple(row))
    return pairs


def load_cases(
    image_specs: list[str],
    preprocessing: Preprocessing,
    mask_specs: list[str] | None = None,
    *,
    slice_axis: int = 2,
    slice_range: tuple[int, int] | None = None,
    foreground_specs: list[str] | None = None,
    recursive: bool = False,
) -> Cases:
    """Read, preprocess and stack every source (and its mask) into one :class:`Cases`.

    ``foreground_specs`` (one per image source, paired like ``mask_specs``) gives foreground masks
    that replace the preprocessing's computed foreground. Folders are searched non-recursively
    unless ``recursive`` (a ``masks/`` subfolder is not taken for images).

    Raises:
        InputError: A file cannot be used; the message names it.
    """
    files, images, foregrounds, masks = [], [], [], []
    for source, mask_spec, fg_spec in pair_sources(list(image_specs), mask_specs, foreground_specs, recursive=recursive):
        if fg_spec is not None and fg_spec.lower() == HEALTHY:
            raise InputError(fg_spec, "a foreground mask source is needed for every image source ('none' is for lesion masks)")
        record, x, fg = load_file(source, preprocessing, slice_axis, slice_range, fg_spec)
        files.append(record)
        images.append(x)
        foregrounds.append(fg)
        if mask_specs is not None:
            masks.append(load_mask(mask_spec, record, preprocessing))
    if not files:
        raise InputError(image_specs[0] if image_specs else ".", "no images found")
    _distinct_file_groups(files)
    return Cases(
        images=torch.from_numpy(np.concatenate(images)),
        foreground=torch.from_numpy(np.concatenate(foregrounds)),
        masks=torch.from_numpy(np.concatenate(masks)) if masks else None,
        case_ids=[c for f in files for c in f.case_ids],
        group_ids=[g for f in files for g in f.group_ids],
        files=files,
    )
