"""What ``synomaly detect`` writes for one input: the mask, map and reconstruction on the input's grid, the overlay and
the lesion table.

NIfTI and DICOM inputs get NIfTI volumes with the input's affine; image and array inputs get ``.npy`` (the exact values)
and PNG or TIFF pictures to look at.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from synomaly import _atomic
from synomaly.config import DetectConfig
from synomaly.errors import ConfigError, InputError
from synomaly.preprocess import Preprocessing, clip_percentiles, fit_to_size, restore_size

if TYPE_CHECKING:
    from synomaly.lesions import MinVolume


FORMATS = ("png", "tiff", "npy")  # the files written for each output of an image or array input
DEFAULT_FORMATS = ("png", "npy")  # pictures to look at, and the exact values


def check_formats(formats: Any) -> tuple[str, ...]:
    """``formats`` (``"png,npy"``, a list of names) as a tuple of ``FORMATS``; ``ConfigError`` naming ``--format`` otherwise."""
    items = formats.split(",") if isinstance(formats, str) else list(formats)
    chosen = tuple(dict.fromkeys(str(item).strip().lower() for item in items if str(item).strip()))
    unknown = [item for item in chosen if item not in FORMATS]
    if unknown or not chosen:
        raise ConfigError("--format", f"expected one or more of {', '.join(FORMATS)} (comma-separated), got {formats!r}")
    return chosen


def intensity_bounds(pre: Preprocessing, raw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per slice of ``raw``, the intensities that the model's -1 and 1 stand for (the preprocessing's intensity fit).

    Minmax normalisation maps each fitted (and clipped) slice's own minimum and maximum to -1 and 1;
    fixed normalisation maps ``intensity_range`` for every slice alike.
    """
    if pre.normalization != "minmax":
        low, high = pre.intensity_range
        return np.full(len(raw), low, dtype=np.float64), np.full(len(raw), high, dtype=np.float64)
    x = clip_percentiles(raw, pre.clip_low, pre.clip_high) if pre.clip else raw
    fitted, _ = fit_to_size(np.asarray(x, dtype=np.float32), pre.size, pre.fit)
    return fitted.min(axis=(1, 2)).astype(np.float64), fitted.max(axis=(1, 2)).astype(np.float64)


def _as_input_dtype(values: np.ndarray, dtype: str) -> np.ndarray:
    """Intensities rounded into the input's 8- or 16-bit unsigned type; other inputs keep float32 values."""
    if dtype in ("uint8", "uint16"):
        info = np.iinfo(dtype)
        return np.clip(np.rint(values), info.min, info.max).astype(dtype)
    return values.astype(np.float32)


def _pictures(restored: dict[str, np.ndarray], record: Any, pre: Preprocessing, map_top: float) -> dict[str, np.ndarray]:
    """The outputs as pictures: the mask 0/255, the map 8-bit (255 = ``map_top`` and above), the reconstruction on the input's scale."""
    low, high = intensity_bounds(pre, record.raw)
    recon = (restored["reconstruction"].astype(np.float64) + 1.0) / 2.0 * (high - low)[:, None, None] + low[:, None, None]
    return {
        "mask": restored["mask"].astype(bool),
        "anomaly_map": np.rint(np.clip(restored["anomaly_map"] / map_top, 0.0, 1.0) * 255).astype(np.uint8),
        "reconstruction": _as_input_dtype(recon, record.properties.dtype),
    }


def _write_pictures(case_dir: Path, pictures: dict[str, np.ndarray], record: Any, fmt: str) -> dict[str, str]:
    """Write each picture as one PNG (a folder of one PNG per slice, named by slice number) or one multi-page TIFF."""
    from synomaly.io import write_image

    names = {}
    for name, stack in pictures.items():
        if fmt == "tiff":
            write_image(case_dir / f"{name}.tif", stack)
            names[name] = f"{name}.tif"
        elif len(stack) == 1:
            write_image(case_dir / f"{name}.png", stack[0])
            names[name] = f"{name}.png"
        else:
            numbers = record.properties.slice_indices if len(record.properties.slice_indices) == len(stack) else range(len(stack))
            width = len(str(max(numbers)))
            for number, picture in zip(numbers, stack):
                write_image(case_dir / name / f"{number:0{width}d}.png", picture)
            names[name] = name
    return names


def _scales(spatial: bool, formats: tuple[str, ...], threshold: float, map_top: float, dtype: str) -> dict[str, str]:
    """What the values of each written output mean, for ``case.json``."""
    texts: dict[str, list[str]] = {"mask": [], "anomaly_map": [], "reconstruction": []}
    exact = "NIfTI" if spatial else "npy" if "npy" in formats else None
    if exact:
        texts["mask"].append(f"{exact}: 1 flagged, 0 not")
        texts["anomaly_map"].append(f"{exact}: the map, a difference of blurred images on the model's [-1, 1] intensity "
                                    f"scale, flagged from {threshold:g}")
        texts["reconstruction"].append(f"{exact}: the model's [-1, 1] intensity scale")
    if not spatial and set(formats) - {"npy"}:
        where = "twice the threshold, which is at 128" if threshold > 0 else "the threshold is 0"
        stored = {"uint8": "8-bit, as the input", "uint16": "16-bit, as the input"}.get(
            dtype, "32-bit float in TIFF; in PNG 16-bit, scaled from its own min..max as its synomaly.value_range text says")
        texts["mask"].append("PNG/TIFF: 255 flagged, 0 not")
        texts["anomaly_map"].append(f"PNG/TIFF: 8-bit, value v stands for v / 255 * {map_top:g}, so 255 means {map_top:g} "
                                    f"or more ({where})")
        texts["reconstruction"].append(f"PNG/TIFF: the input's own intensities, the preprocessing's intensity fit inverted ({stored})")
    return {name: "; ".join(parts) for name, parts in texts.items()}


def _remove_stale(case_dir: Path, names: Any, written: set[str]) -> None:
    """Remove outputs an earlier run (``--overwrite``, another ``--format``) left that this one did not write."""
    for name in names:
        for entry in (f"{name}.npy", f"{name}.png", f"{name}.tif", name):
            path = case_dir / entry
            if entry not in written and path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            elif entry not in written and (path.is_file() or path.is_symlink()):
                path.unlink()


def _write_maps(case_dir: Path, record: Any, restored: dict[str, np.ndarray], settings: DetectConfig, pre: Preprocessing,
                formats: tuple[str, ...], spatial: bool) -> dict[str, Any]:
    """Write the mask, anomaly map and reconstruction (NIfTI on the input's grid when ``spatial``); returns ``files``
    (what ``score`` reads), ``pictures`` and ``scales``."""
    from synomaly.io import write_image

    props = record.properties
    files: dict[str, str] = {}
    for suffix in [".nii.gz"] if spatial else [".npy"] if "npy" in formats else []:
        for name, array in restored.items():
            path = case_dir / f"{name}{suffix}"
            write_image(path, array.astype(np.uint8) if name == "mask" else array.astype(np.float32),
                        like=props if spatial else None)
            files[name] = path.name
    map_top = 2 * settings.threshold if settings.threshold > 0 else 1.0
    kinds = [] if spatial else [fmt for fmt in formats if fmt != "npy"]
    stacks = _pictures(restored, record, pre, map_top) if kinds else {}
    pictures = {fmt: _write_pictures(case_dir, stacks, record, fmt) for fmt in kinds}
    for name in restored if kinds else ():  # without .npy, score reads the first pictures
        files.setdefault(name, pictures[kinds[0]][name])
    _remove_stale(case_dir, restored, {*files.values(), *(f for written in pictures.values() for f in written.values())})
    return {"files": files, "pictures": pictures or None, "scales": _scales(spatial, formats, settings.threshold, map_top, props.dtype),
            "anomaly_map_255": map_top if pictures else None}


def write_case_outputs(case_dir: Path, record: Any, images: np.ndarray, outputs: dict[str, torch.Tensor],
                        settings: DetectConfig, pre: Preprocessing, formats: tuple[str, ...] = DEFAULT_FORMATS,
                        min_volume: MinVolume | None = None) -> tuple[dict[str, Any], np.ndarray, dict[str, Any]]:
    """Write maps back at the input's size and on its grid, and the lesion table.

    NIfTI/DICOM inputs get NIfTI volumes on their grid; image and array inputs get ``formats``
    (``.npy`` with the exact values, PNG or TIFF pictures to look at). A volume's mask first loses its
    3-D lesions below ``min_volume`` (which then also leave the overlay and the score). Returns the case
    record's file fields (``files``: what ``synomaly score`` reads; ``pictures``; ``scales``), each
    slice's mask area there (px) and the lesion totals.
    """
    from synomaly.figures import detection_png
    from synomaly.lesions import (
        LESIONS_NAME,
        SLICE_COLUMNS,
        VOLUME_COLUMNS,
        lesions_of_nifti,
        lesions_of_slices,
        write_lesions,
    )

    props = record.properties
    spatial = props.format in ("nifti", "dicom", "dicom-series") and props.affine is not None
    restored = {
        "mask": restore_size(outputs["mask"][:, 0].numpy(), record.fit, kind="mask"),
        "anomaly_map": restore_size(outputs["anomaly_map"][:, 0].numpy(), record.fit, kind="image"),
        "reconstruction": restore_size(outputs["reconstruction"][:, 0].numpy(), record.fit, kind="image"),
    }
    dropped = None
    if spatial and min_volume is not None:
        restored["mask"], dropped = _filter_volume(restored["mask"], record, outputs, min_volume, settings.connectivity)
    fields = _write_maps(case_dir, record, restored, settings, pre, formats, spatial)
    files = fields["files"]
    best = int(outputs["score"].argmax())
    best_outputs = {key: outputs[key][best, 0].numpy() for key in ("reconstruction", "anomaly_map", "mask")}
    _atomic.write_bytes(case_dir / "overlay.png", detection_png(images[best, 0], best_outputs["reconstruction"],
                                                                best_outputs["anomaly_map"], best_outputs["mask"],
                                                                settings.threshold))
    files["overlay"] = "overlay.png"
    if spatial:  # labelled in 3-D on the written volume, as any NIfTI reader sees it
        rows, lesions = lesions_of_nifti(case_dir / files["mask"], case_dir / files["anomaly_map"], settings.connectivity)
        columns = VOLUME_COLUMNS
    else:
        spacing = tuple(props.spacing[:2]) if props.spacing else None
        numbers = props.slice_indices if len(props.slice_indices) == len(restored["mask"]) else None
        rows, lesions = lesions_of_slices(restored["mask"], restored["anomaly_map"], spacing, settings.connectivity, numbers)
        columns = SLICE_COLUMNS
    write_lesions(case_dir / LESIONS_NAME, rows, columns)
    files["lesions"] = LESIONS_NAME
    if dropped is not None:
        lesions["min_volume"] = dropped
    return fields, restored["mask"].reshape(len(restored["mask"]), -1).sum(1), lesions


def _filter_volume(mask: np.ndarray, record: Any, outputs: dict[str, torch.Tensor], min_volume: MinVolume,
                   connectivity: int) -> tuple[np.ndarray, dict[str, Any]]:
    """``mask`` (a volume on the input's grid) without its lesions below ``min_volume``; the model-space mask and
    score in ``outputs`` lose them too. Returns the mask and what was done (the limit in voxels, lesions dropped)."""
    from synomaly.lesions import remove_small_lesions

    voxel_mm3 = abs(float(np.linalg.det(np.asarray(record.properties.affine, dtype=np.float64)[:3, :3])))
    if not voxel_mm3 > 0 and min_volume.unit != "voxels":
        raise InputError(record.properties.path, f"its affine gives no voxel volume, so --min-volume {min_volume} cannot be "
                                                 "counted in voxels; give it in voxels")
    limit = min_volume.voxels(voxel_mm3)
    kept, count = remove_small_lesions(mask, limit, connectivity)
    if count:
        refitted, _ = fit_to_size(kept, record.fit.size, record.fit.mode, kind="mask")
        outputs["mask"] = outputs["mask"] & torch.from_numpy(np.asarray(refitted, dtype=bool))[:, None]
        outputs["score"] = outputs["mask"].flatten(1).sum(1).to(outputs["score"].dtype)
    return kept, {"given": str(min_volume), "voxels": limit, "voxel_mm3": round(voxel_mm3, 6), "dropped": count}
