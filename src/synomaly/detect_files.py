"""``synomaly detect`` over files: one case folder per input, on the input's grid, and ``summary.json``.

A rerun skips the cases made with the same model and settings, and refuses to mix others into the folder.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from tqdm.auto import tqdm

import synomaly
from synomaly import _atomic
from synomaly._json import json_plain, read_json
from synomaly.config import DetectConfig
from synomaly.data import load_file, pair_sources
from synomaly.devices import resolve_device, show_progress
from synomaly.errors import ConfigError, InputError, OutputExistsError, SynomalyError
from synomaly.pipeline import SynomalyPipeline
from synomaly.preprocess import Preprocessing, restore_size

if TYPE_CHECKING:
    from synomaly.lesions import MinVolume

log = logging.getLogger("synomaly.commands")


def _batched_detect(pipe: SynomalyPipeline, images: torch.Tensor, foreground: torch.Tensor, batch_size: int,
                    generator: torch.Generator, settings: DetectConfig) -> dict[str, torch.Tensor]:
    """Run ``detect`` over ``images`` in batches; returns the outputs concatenated on the CPU."""
    parts: dict[str, list[torch.Tensor]] = {}
    for start in range(0, len(images), batch_size):
        out = pipe.detect(images[start : start + batch_size], generator=generator,
                          foreground=foreground[start : start + batch_size], config=settings)
        for key in ("reconstruction", "anomaly_map", "mask", "stages", "score"):
            parts.setdefault(key, []).append(getattr(out, key).cpu())
    return {key: torch.cat(values) for key, values in parts.items()}


def _write_case_outputs(case_dir: Path, record: Any, images: np.ndarray, outputs: dict[str, torch.Tensor],
                        connectivity: int = 1, min_volume: MinVolume | None = None
                        ) -> tuple[dict[str, str], np.ndarray, dict[str, Any]]:
    """Write maps back at the input's size and on its grid, and the lesion table.

    A volume's mask first loses its 3-D lesions below ``min_volume`` (which then also leave the
    overlay and the score). Returns the file names, each slice's mask area there (px) and the lesion totals.
    """
    from synomaly.figures import gray_rgb, heat_rgb, overlay_rgb, write_png
    from synomaly.io import write_image
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
    suffix = ".nii.gz" if spatial else ".npy"
    restored = {
        "mask": restore_size(outputs["mask"][:, 0].numpy(), record.fit, kind="mask"),
        "anomaly_map": restore_size(outputs["anomaly_map"][:, 0].numpy(), record.fit, kind="image"),
        "reconstruction": restore_size(outputs["reconstruction"][:, 0].numpy(), record.fit, kind="image"),
    }
    dropped = None
    if spatial and min_volume is not None:
        restored["mask"], dropped = _filter_volume(restored["mask"], record, outputs, min_volume, connectivity)
    files = {}
    for name, array in restored.items():
        path = case_dir / f"{name}{suffix}"
        write_image(path, array.astype(np.uint8) if name == "mask" else array.astype(np.float32),
                    like=props if spatial else None)
        files[name] = path.name
    best = int(outputs["score"].argmax())
    image = images[best, 0]
    mask = outputs["mask"][best, 0].numpy()
    overlay = overlay_rgb(image, mask, np.zeros_like(mask))
    strip = np.concatenate([gray_rgb(image), gray_rgb(outputs["reconstruction"][best, 0].numpy()),
                            heat_rgb(outputs["anomaly_map"][best, 0].numpy()), overlay], axis=1)
    write_png(case_dir / "overlay.png", strip)
    files["overlay"] = "overlay.png"
    if spatial:  # labelled in 3-D on the written volume, as any NIfTI reader sees it
        rows, lesions = lesions_of_nifti(case_dir / files["mask"], case_dir / files["anomaly_map"], connectivity)
        columns = VOLUME_COLUMNS
    else:
        spacing = tuple(props.spacing[:2]) if props.spacing else None
        numbers = props.slice_indices if len(props.slice_indices) == len(restored["mask"]) else None
        rows, lesions = lesions_of_slices(restored["mask"], restored["anomaly_map"], spacing, connectivity, numbers)
        columns = SLICE_COLUMNS
    write_lesions(case_dir / LESIONS_NAME, rows, columns)
    files["lesions"] = LESIONS_NAME
    if dropped is not None:
        lesions["min_volume"] = dropped
    return files, restored["mask"].reshape(len(restored["mask"]), -1).sum(1), lesions


def _filter_volume(mask: np.ndarray, record: Any, outputs: dict[str, torch.Tensor], min_volume: MinVolume,
                   connectivity: int) -> tuple[np.ndarray, dict[str, Any]]:
    """``mask`` (a volume on the input's grid) without its lesions below ``min_volume``; the model-space mask and
    score in ``outputs`` lose them too. Returns the mask and what was done (the limit in voxels, lesions dropped)."""
    from synomaly.lesions import remove_small_lesions
    from synomaly.preprocess import fit_to_size

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


def run_detect(
    model: str | Path,
    inputs: list[str],
    output: str | Path,
    *,
    detect: dict[str, Any] | None = None,
    batch_size: int = 32,
    device: str = "auto",
    seed: int = 0,
    slice_axis: int = 2,
    slice_range: tuple[int, int] | None = None,
    on_error: str = "skip",
    foreground_masks: list[str] | None = None,
    min_volume: str | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Detect anomalies in every input; writes per-input outputs and ``summary.json``.

    ``foreground_masks`` (one source per input) replaces the model's computed foreground.
    ``min_volume`` (``"10mm3"``, ``"0.05ml"`` or ``"8voxels"``) drops the smaller 3-D lesions of every
    volume (NIfTI, DICOM series) on its own grid, after the per-slice ``min_size`` of the model's
    detection (``min_size=0`` leaves the 3-D rule alone); 2-D images keep their masks as detected.

    Every case records the settings and model it was made with (``made_with`` in ``case.json``).
    Inputs whose outputs exist are skipped unless ``overwrite`` is set, so a killed run completes
    the missing cases when started again; outputs made with other settings or another model stop
    the run before any work, asking for ``overwrite`` or another output folder. Each input draws its
    own noise (seeded by ``seed`` and its output name), so skipping one never changes another.
    A bad input is reported and skipped (``on_error="skip"``) or stops the run (``on_error="stop"``).
    """
    if on_error not in ("skip", "stop"):
        raise ConfigError("on_error", f"must be skip or stop, got {on_error!r}")
    from synomaly.lesions import MinVolume

    smallest = None if min_volume is None else MinVolume.parse(min_volume)
    pipe = SynomalyPipeline.from_pretrained(model, device=resolve_device(device))
    overrides = {k: v for k, v in (detect or {}).items() if v is not None}
    settings = pipe.detect_config(**overrides)
    pre = pipe.preprocessing
    output = Path(output)
    assert pipe.folder is not None  # from_pretrained records the folder it read
    # The model is identified by its files' digest, not its path: a moved or renamed folder is the same model.
    made_with = json_plain({"model_sha256": model_fingerprint(pipe.folder),
                            "detect": dataclasses.asdict(settings), "seed": seed, "slice_axis": slice_axis,
                            "slice_range": slice_range, "foreground_masks": foreground_masks,
                            # only when given: folders made before the option existed stay valid
                            **({} if smallest is None else {"min_volume": str(smallest)})})
    if foreground_masks is not None and len(foreground_masks) != len(inputs):
        raise InputError(foreground_masks[0] if foreground_masks else "foreground_masks",
                         f"{len(foreground_masks)} foreground mask sources given for {len(inputs)} inputs")
    with _atomic.folder_lock(output, "synomaly detect"):
        if not overwrite:
            _check_earlier_run(output, made_with)
        summary: dict[str, Any] = {"synomaly": synomaly.__version__, "model": str(model),
                                   "detect": dataclasses.asdict(settings), "min_volume": None if smallest is None else str(smallest),
                                   "made_with": made_with, "cases": [], "failed": [], "stems": {}}
        jobs = [(spec, source, fg) for i, spec in enumerate(inputs)
                for source, fg in _expand_or_report(spec, None if foreground_masks is None else foreground_masks[i],
                                                    summary, on_error)]
        for spec, source, fg in tqdm(jobs, desc="detect", unit="input", disable=not show_progress()):
            _detect_one(pipe, pre, source, fg, Path(spec), output, summary, settings, batch_size, made_with,
                        slice_axis, slice_range, on_error, overwrite, smallest)
        del summary["stems"]
        _atomic.write_json(output / "summary.json", summary)
    log.info("%d inputs done, %d failed; summary in %s", len(summary["cases"]), len(summary["failed"]), output / "summary.json")
    return summary


def model_fingerprint(folder: str | Path) -> str:
    """SHA-256 over a model folder's ``config.json``, ``thresholds.json`` and weights (those present)."""
    digest = hashlib.sha256()
    for name in ("config.json", "thresholds.json", "model.safetensors"):
        path = Path(folder) / name
        if path.is_file():
            digest.update(name.encode())
            with path.open("rb") as f:
                for block in iter(functools.partial(f.read, 1 << 20), b""):
                    digest.update(block)
    return digest.hexdigest()


def _check_earlier_run(output: Path, made_with: dict[str, Any]) -> None:
    """Refuse (before any work) to add to an output folder whose cases were made with other settings."""
    for marker in sorted(output.glob("*/case.json")):
        earlier = read_json(marker).get("made_with")
        if earlier is None:
            raise OutputExistsError(marker.parent, "made by an earlier synomaly version that recorded no settings; pass "
                                                   "--overwrite to redo every case, or choose another --output")
        if earlier != made_with:
            changed = sorted(k for k in made_with if (earlier or {}).get(k) != made_with[k])
            if "detect" in changed and isinstance(earlier, dict):
                changed.remove("detect")
                changed += [f"detect.{k}" for k, v in made_with["detect"].items() if earlier["detect"].get(k) != v]
            raise OutputExistsError(marker.parent, f"made with other settings or another model ({', '.join(changed) or 'unknown'}); "
                                                   "pass --overwrite to redo every case, or choose another --output")


def _warn_orientation(pipe: SynomalyPipeline, record: Any) -> None:
    """Warn once when a NIfTI volume meets a model folder made before volumes were read in canonical order."""
    if record.properties.format == "nifti" and "nifti_orientation" not in pipe.config.training and not getattr(
            pipe, "_warned_orientation", False):
        pipe._warned_orientation = True  # type: ignore[attr-defined]
        log.warning("%s was made by a synomaly version that read NIfTI volumes in their stored voxel order; volumes "
                    "are now read in canonical LAS order, so slices of RAS-stored volumes appear mirrored to it",
                    pipe.folder or "this model")


def _case_generator(device: torch.device, seed: int, stem: str) -> torch.Generator:
    """The noise of one input: seeded by the run's seed and the input's output name."""
    key = int.from_bytes(hashlib.sha256(f"{seed}:{stem}".encode()).digest()[:8], "little")
    return torch.Generator(device).manual_seed(key)


def _expand_or_report(spec: str, fg_spec: str | None, summary: dict[str, Any], on_error: str) -> list[tuple[Any, ...]]:
    """The files of ``spec``, each with its foreground mask spec; a bad spec is reported (or raised)."""
    try:
        return pair_sources([spec], [fg_spec] if fg_spec is not None else None)
    except SynomalyError as error:
        if on_error == "stop":
            raise
        log.error("%s", error)
        summary["failed"].append({"input": spec, "error": str(error)})
        return []


def _detect_one(pipe: SynomalyPipeline, pre: Preprocessing, source: Any, fg_spec: str | None, root: Path, output: Path,
                summary: dict[str, Any], settings: DetectConfig, batch_size: int, made_with: dict[str, Any],
                slice_axis: int, slice_range: tuple[int, int] | None, on_error: str, overwrite: bool,
                min_volume: MinVolume | None = None) -> None:
    from synomaly.io import output_stem

    stem = output_stem(source.path, root if root.is_dir() else source.path) + (f"__{source.key}" if source.key else "")
    owner = f"{source.path.resolve()}:{source.key or ''}"
    marker = output / stem / "case.json"
    earlier = read_json(marker) if marker.is_file() else None
    taken = earlier is not None and f"{Path(earlier.get('input', '')).resolve()}:{earlier.get('key') or ''}" != owner
    if summary["stems"].setdefault(stem, owner) != owner or taken:  # e.g. a.png and a.tif, or p1/x.png and p1__x.png
        stem = f"{stem}-{hashlib.sha256(owner.encode()).hexdigest()[:8]}"
        summary["stems"][stem] = owner
    case_dir = output / stem
    if case_dir.is_symlink():
        raise InputError(case_dir, "is a symbolic link: outputs are never written through links; remove it or choose "
                                   "another output folder")
    marker = case_dir / "case.json"
    if marker.exists() and not overwrite:
        log.info("%s: outputs exist, skipped (use --overwrite to redo)", source.name)
        summary["cases"].append(read_json(marker))
        return
    try:
        record, images, foreground = load_file(source, pre, slice_axis, slice_range, fg_spec)
    except SynomalyError as error:
        if on_error == "stop":
            raise
        log.error("%s", error)
        summary["failed"].append({"input": str(source.path), "error": str(error)})
        return
    _warn_orientation(pipe, record)
    start = time.perf_counter()
    generator = _case_generator(pipe.device, made_with["seed"], stem)
    outputs = _batched_detect(pipe, torch.from_numpy(images), torch.from_numpy(foreground), batch_size, generator, settings)
    seconds = time.perf_counter() - start
    files, area, lesions = _write_case_outputs(case_dir, record, images, outputs, settings.connectivity, min_volume)
    spacing = record.properties.spacing
    entry = {"input": str(source.path), "key": source.key, "output": stem, "files": files, "slices": len(images),
             "case_ids": record.case_ids, "area_px": area.tolist(),
             "area_mm2": (area * spacing[0] * spacing[1]).tolist() if spacing else None,
             "lesions": lesions, "score": outputs["score"].tolist(), "score_unit": f"mask pixels at the model's {pre.size}x{pre.size} input",
             "stages": outputs["stages"].tolist(),
             "seconds": round(seconds, 4), "foreground_mask": fg_spec, "made_with": made_with}
    _atomic.write_json(marker, entry)  # written last: marks the input as done
    summary["cases"].append(entry)
