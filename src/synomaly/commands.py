"""The command-line jobs as importable functions: files in, files out (``synomaly.cli`` parses arguments).

Each function reads its inputs through ``synomaly.data``, applies the model folder's preprocessing,
and writes every output atomically; existing outputs are kept unless ``overwrite`` is set.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

import synomaly
from synomaly import _atomic
from synomaly._json import json_plain, read_json
from synomaly.config import model_preset
from synomaly.data import Cases, load_cases, load_file, pair_sources
from synomaly.errors import InputError, OutputExistsError, SynomalyError
from synomaly.methods import METHODS, get_method
from synomaly.pipeline import SynomalyPipeline
from synomaly.preprocess import MODALITY_PRESETS, Preprocessing, noise_params_for, preset_flips, restore_size

log = logging.getLogger(__name__)


DEVICES = "auto, cpu, cuda, cuda:N or mps"


def show_progress() -> bool:
    """Progress bars follow the log level: shown at INFO (the default), hidden by ``--quiet``."""
    return logging.getLogger("synomaly").isEnabledFor(logging.INFO)


def resolve_device(device: str) -> str:
    """Check ``device`` against what this machine has, before any work; ``auto`` picks ``cuda`` when visible.

    One vocabulary for every command: ``auto``, ``cpu``, ``cuda``, ``cuda:N``, ``mps`` (``gpu`` is a
    deprecated spelling of ``cuda``).

    Raises:
        ConfigError: An unknown name, or a device this torch build or machine does not have.
    """
    name = str(device).strip().lower()
    if name == "gpu":
        log.warning("--device gpu is deprecated and will be removed in the next release: use cuda")
        name = "cuda"
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cpu":
        return name
    kind, _, index = name.partition(":")
    if kind == "cuda" and (not index or index.isdigit()):
        if not torch.cuda.is_available():
            raise synomaly.errors.ConfigError("--device", f"{device!r}: this torch build ({torch.__version__}) sees no CUDA GPU; "
                                                          "use --device cpu (or auto)")
        if index and int(index) >= torch.cuda.device_count():
            raise synomaly.errors.ConfigError("--device", f"{device!r}: only {torch.cuda.device_count()} CUDA device(s) "
                                                          f"here (cuda:0 .. cuda:{torch.cuda.device_count() - 1})")
        return name
    if name == "mps":
        if not torch.backends.mps.is_available():
            raise synomaly.errors.ConfigError("--device", "'mps': Apple's Metal backend is not available here; use --device cpu")
        return name
    raise synomaly.errors.ConfigError("--device", f"must be {DEVICES}, got {device!r}")


def lightning_accelerator(device: str) -> str:
    """The Lightning accelerator of a checked device name (training uses ``--train.devices`` for the count)."""
    name = resolve_device(device)
    if name.startswith("cuda:"):
        raise synomaly.errors.ConfigError("--device", f"{device!r}: training picks GPUs by --train.devices; to use one "
                                                      f"particular GPU, set CUDA_VISIBLE_DEVICES={name[5:]} and pass --device cuda")
    return {"cuda": "gpu"}.get(name, name)


def preprocessing_of(pipe: SynomalyPipeline) -> Preprocessing:
    """The model folder's preprocessing (defaults at the model's size when none was stored)."""
    return pipe.preprocessing


def scaled_area(size: int, pixels_128: int) -> int:
    """An area in pixels at 128 px (the reference's size) scaled by area to ``size``."""
    return max(1, round(pixels_128 * (size / 128) ** 2))


def run_train(
    data: list[str],
    output: str | Path,
    *,
    preset: str = "brain-flair",
    model: str = "small",
    image_size: int | None = None,
    noise: dict[str, Any] | None = None,
    train_config: Any = None,
    slice_axis: int = 2,
    slice_range: tuple[int, int] | None = None,
    method: str = "diffusion",
    masks: list[str] | None = None,
    preprocess: dict[str, Any] | None = None,
    foreground_masks: list[str] | None = None,
    resume: bool = False,
    overwrite: bool = False,
) -> Path:
    """Train on healthy images; returns the model folder.

    ``method`` names a ``synomaly.methods`` entry: ``diffusion`` (Synomaly, or a DDPM baseline with
    another ``noise``), ``dae`` (coarse noise unless ``noise`` says otherwise), ``supervised`` (with
    ``masks``, one per source, ``none`` for healthy ones) or ``intensity`` (no training: the folder
    only records the preprocessing and the lesion direction). Detection defaults follow the method.

    Args:
        data: Healthy image sources (files, folders, ``bundle.npz:key``).
        output: The model folder to write.
        preset: Modality preset: Synomaly noise settings and foreground rule.
        model: UNet preset (``paper``, ``small``, ``tiny``).
        image_size: Square model input size (default: the UNet preset's).
        noise: Overrides of the training noise (``name`` and its parameters).
        train_config: A ``synomaly.train.TrainConfig``.
        slice_axis: NIfTI axis to slice along.
        slice_range: Half-open range of slices to use.
        method: A ``synomaly.methods`` name.
        masks: Lesion mask sources (``supervised`` only).
        preprocess: Overrides of the preset's preprocessing (``foreground``, ``normalization``, ...).
        foreground_masks: Foreground mask sources, one per data source (e.g. ``bundle.npz:train_headmask``);
            they replace the computed foreground (blobs stay inside them).
        resume: Continue an interrupted run from its last checkpoint.
        overwrite: Replace an existing run in ``output``.
    """
    from synomaly.train import TrainConfig, train

    unet = model_preset(model)
    size = image_size or unet.image_size
    unet = dataclasses.replace(unet, image_size=size)
    pre = Preprocessing.from_preset(preset, size=size, **(preprocess or {}))
    chosen = get_method(method)
    train_config = train_config or TrainConfig()
    if train_config.flips is None:
        train_config = dataclasses.replace(train_config, flips=preset_flips(preset))
    if (masks is not None) != chosen.needs_masks:
        needs = [name for name, m in METHODS.items() if m.needs_masks]
        raise synomaly.errors.ConfigError("masks", f"lesion masks are needed by, and only by, --method {' or '.join(needs)}")
    # Blobs go anywhere in the foreground; the erosion trims only the anomaly map at inference.
    training_pre = dataclasses.replace(pre, foreground_erosion=0)
    cases = load_cases(data, training_pre, masks, slice_axis=slice_axis, slice_range=slice_range,
                       foreground_specs=foreground_masks)
    noise_config = _noise_config(preset, size, noise or {}, chosen.default_noise)
    # The reference's 30-pixel minimum component and 500-pixel convergence floor are for 128 px.
    detect = chosen.detect_defaults(noise_config["name"], {"min_size": scaled_area(size, 30),
                                                           "min_area": scaled_area(size, 500)})
    log.info("training (%s) on %d slices from %d inputs at %dx%d", method, len(cases), len(cases.files), size, size)
    return train(cases.images, output, model=unet, noise=noise_config, train_config=train_config,
                 detect=detect, preprocess=pre.to_dict(), foreground=cases.foreground, method=method,
                 target=cases.masks if chosen.needs_masks else None, resume=resume, overwrite=overwrite)


def _noise_config(preset: str, size: int, overrides: dict[str, Any], default: str = "synomaly") -> dict[str, Any]:
    """The preset's Synomaly noise (``default`` when no name is given), or another registered noise with its defaults."""
    name = overrides.get("name") or default
    base = noise_params_for(preset, size) if name == "synomaly" else {}
    return {"name": name, **base, **{k: v for k, v in overrides.items() if k != "name" and v is not None}}


def _batched_detect(pipe: SynomalyPipeline, images: torch.Tensor, foreground: torch.Tensor, batch_size: int,
                    generator: torch.Generator, overrides: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Run ``detect`` over ``images`` in batches; returns the outputs concatenated on the CPU."""
    parts: dict[str, list[torch.Tensor]] = {}
    for start in range(0, len(images), batch_size):
        out = pipe.detect(images[start : start + batch_size], generator=generator,
                          foreground=foreground[start : start + batch_size], **overrides)
        for key in ("reconstruction", "anomaly_map", "mask", "stages", "score"):
            parts.setdefault(key, []).append(getattr(out, key).cpu())
    return {key: torch.cat(values) for key, values in parts.items()}


def _write_case_outputs(case_dir: Path, record: Any, images: np.ndarray,
                        outputs: dict[str, torch.Tensor]) -> tuple[dict[str, str], np.ndarray]:
    """Write maps back at the input's size and on its grid; returns the file names and each slice's mask area there (px)."""
    from synomaly.figures import gray_rgb, heat_rgb, overlay_rgb, write_png
    from synomaly.io import write_image

    props = record.properties
    spatial = props.format in ("nifti", "dicom", "dicom-series") and props.affine is not None
    suffix = ".nii.gz" if spatial else ".npy"
    restored = {
        "mask": restore_size(outputs["mask"][:, 0].numpy(), record.fit, kind="mask"),
        "anomaly_map": restore_size(outputs["anomaly_map"][:, 0].numpy(), record.fit, kind="image"),
        "reconstruction": restore_size(outputs["reconstruction"][:, 0].numpy(), record.fit, kind="image"),
    }
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
    return files, restored["mask"].reshape(len(restored["mask"]), -1).sum(1)


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
    overwrite: bool = False,
) -> dict[str, Any]:
    """Detect anomalies in every input; writes per-input outputs and ``summary.json``.

    ``foreground_masks`` (one source per input) replaces the model's computed foreground.

    Every case records the settings and model it was made with (``made_with`` in ``case.json``).
    Inputs whose outputs exist are skipped unless ``overwrite`` is set, so a killed run completes
    the missing cases when started again; outputs made with other settings or another model stop
    the run before any work, asking for ``overwrite`` or another output folder. Each input draws its
    own noise (seeded by ``seed`` and its output name), so skipping one never changes another.
    A bad input is reported and skipped (``on_error="skip"``) or stops the run (``on_error="stop"``).
    """
    if on_error not in ("skip", "stop"):
        raise synomaly.errors.ConfigError("on_error", f"must be skip or stop, got {on_error!r}")
    pipe = SynomalyPipeline.from_pretrained(model, device=resolve_device(device))
    overrides = {k: v for k, v in (detect or {}).items() if v is not None}
    settings = pipe.detect_config(**overrides)
    pre = preprocessing_of(pipe)
    output = Path(output)
    assert pipe.folder is not None  # from_pretrained records the folder it read
    # The model is identified by its files' digest, not its path: a moved or renamed folder is the same model.
    made_with = json_plain({"model_sha256": model_fingerprint(pipe.folder),
                            "detect": dataclasses.asdict(settings), "seed": seed, "slice_axis": slice_axis,
                            "slice_range": slice_range, "foreground_masks": foreground_masks})
    if foreground_masks is not None and len(foreground_masks) != len(inputs):
        raise InputError(foreground_masks[0] if foreground_masks else "foreground_masks",
                         f"{len(foreground_masks)} foreground mask sources given for {len(inputs)} inputs")
    with _atomic.folder_lock(output, "synomaly detect"):
        if not overwrite:
            _check_earlier_run(output, made_with)
        summary: dict[str, Any] = {"synomaly": synomaly.__version__, "model": str(model),
                                   "detect": dataclasses.asdict(settings), "made_with": made_with, "cases": [], "failed": [],
                                   "stems": {}}
        jobs = [(spec, source, fg) for i, spec in enumerate(inputs)
                for source, fg in _expand_or_report(spec, None if foreground_masks is None else foreground_masks[i],
                                                    summary, on_error)]
        for spec, source, fg in tqdm(jobs, desc="detect", unit="input", disable=not show_progress()):
            _detect_one(pipe, pre, source, fg, Path(spec), output, summary, overrides, batch_size, made_with,
                        slice_axis, slice_range, on_error, overwrite)
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


def _detect_one(pipe, pre, source, fg_spec, root, output, summary, overrides, batch_size, made_with, slice_axis,
                slice_range, on_error, overwrite) -> None:
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
    outputs = _batched_detect(pipe, torch.from_numpy(images), torch.from_numpy(foreground), batch_size, generator, overrides)
    seconds = time.perf_counter() - start
    files, area = _write_case_outputs(case_dir, record, images, outputs)
    spacing = record.properties.spacing
    entry = {"input": str(source.path), "key": source.key, "output": stem, "files": files, "slices": len(images),
             "case_ids": record.case_ids, "area_px": area.tolist(),
             "area_mm2": (area * spacing[0] * spacing[1]).tolist() if spacing else None,
             "score": outputs["score"].tolist(), "score_unit": f"mask pixels at the model's {pre.size}x{pre.size} input",
             "stages": outputs["stages"].tolist(),
             "seconds": round(seconds, 4), "foreground_mask": fg_spec, "made_with": made_with}
    _atomic.write_json(marker, entry)  # written last: marks the input as done
    summary["cases"].append(entry)


def load_labelled(pipe: SynomalyPipeline, data: list[str], masks: list[str] | None, slice_axis: int,
                  slice_range: tuple[int, int] | None, foreground_masks: list[str] | None = None) -> Cases:
    """Read images (and masks, and foreground masks) with the model folder's preprocessing."""
    return load_cases(data, preprocessing_of(pipe), masks, slice_axis=slice_axis, slice_range=slice_range,
                      foreground_specs=foreground_masks)


def run_calibrate(
    model: str | Path,
    data: list[str],
    *,
    masks: list[str] | None = None,
    grid: Any = None,
    detect: dict[str, Any] | None = None,
    percentile: float = 99.0,
    batch_size: int = 32,
    device: str = "auto",
    seed: int = 0,
    slice_axis: int = 2,
    slice_range: tuple[int, int] | None = None,
    foreground_masks: list[str] | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Choose detection settings on validation data and write ``thresholds.json`` into the model folder.

    ``detect`` sets fixed detection settings (e.g. ``sampler``) under which the grid is searched;
    they are written into ``thresholds.json`` beside the chosen values.
    """
    from synomaly.calibrate import CalibrationGrid, calibrate, write_thresholds

    if (Path(model) / "thresholds.json").exists() and not overwrite:
        raise OutputExistsError(Path(model) / "thresholds.json")
    pipe = SynomalyPipeline.from_pretrained(model, device=resolve_device(device))
    fixed = {k: v for k, v in (detect or {}).items() if v is not None}
    pipe.config = dataclasses.replace(pipe.config, detect=pipe.detect_config(**fixed))
    cases = load_labelled(pipe, data, masks, slice_axis, slice_range, foreground_masks)
    result = calibrate(pipe, cases.images, cases.masks, foreground=cases.foreground, grid=grid or CalibrationGrid(),
                       percentile=percentile, batch_size=batch_size, seed=seed, progress=show_progress())
    result.detect = {**fixed, **result.detect}
    path = write_thresholds(model, result, overwrite=overwrite)
    log.info("chose %s by %s (validation Dice %s); written to %s", result.detect, result.method, result.score, path)
    return result.to_dict()


def run_evaluate(
    model: str | Path,
    data: list[str],
    masks: list[str],
    output: str | Path,
    *,
    detect: dict[str, Any] | None = None,
    batch_size: int = 32,
    device: str = "auto",
    seed: int = 0,
    slice_axis: int = 2,
    slice_range: tuple[int, int] | None = None,
    foreground_masks: list[str] | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Evaluate against masks: per-case and aggregate metrics as JSON and CSV in ``output``."""
    from synomaly.evaluate import evaluate, write_evaluation

    output = Path(output)
    if (output / "metrics.json").exists() and not overwrite:
        raise OutputExistsError(output / "metrics.json")
    pipe = SynomalyPipeline.from_pretrained(model, device=resolve_device(device))
    cases = load_labelled(pipe, data, masks, slice_axis, slice_range, foreground_masks)
    if cases.masks is None:
        raise InputError(data[0], "evaluation needs masks (--masks, one per input; 'none' for healthy inputs)")
    overrides = {k: v for k, v in (detect or {}).items() if v is not None}
    result = evaluate(pipe, cases.images, cases.masks, case_ids=cases.case_ids, group_ids=cases.group_ids,
                      foreground=cases.foreground, batch_size=batch_size, seed=seed, progress=show_progress(), **overrides)
    result.metrics["model"] = {"folder": str(model), "config": pipe.config.to_dict()}
    write_evaluation(result, output, overwrite=overwrite)
    log.info("Dice (mean over anomalous slices) %.3f, AP %.3f; written to %s",
             result.metrics["aggregate"]["dice_mean"], result.metrics["aggregate"]["ap"], output)
    return result.metrics


def run_report(evaluation: str | Path, output: str | Path | None = None, *, title: str = "Synomaly report",
               notes: str | None = None, overwrite: bool = False) -> Path:
    """Render the HTML report of an evaluation folder."""
    from synomaly.report import build_report

    path = build_report(evaluation, output, title=title, notes=notes, overwrite=overwrite)
    log.info("report written to %s", path)
    return path


def preset_names() -> list[str]:
    """Valid ``--preset`` values."""
    return list(MODALITY_PRESETS)
