"""The command-line jobs as importable functions: files in, files out (``synomaly.cli`` parses arguments).

Each function reads its inputs through ``synomaly.data``, applies the model folder's preprocessing,
and writes every output atomically; existing outputs are kept unless ``overwrite`` is set.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import synomaly
from synomaly import _atomic
from synomaly.config import PipelineConfig, model_preset
from synomaly.data import Cases, load_cases
from synomaly.detect_files import model_fingerprint, run_detect
from synomaly.devices import DEVICES, lightning_accelerator, resolve_device, show_progress
from synomaly.errors import ConfigError, InputError, OutputError, OutputExistsError
from synomaly.input_checks import warn_input
from synomaly.io import training_geometry
from synomaly.methods import METHODS, check_network_size, get_method
from synomaly.pipeline import SynomalyPipeline, model_folder
from synomaly.preprocess import MODALITY_PRESETS, Preprocessing, noise_params_for, preset_flips

log = logging.getLogger(__name__)

CALIBRATION_PROGRESS = "calibration-progress.json"  # scored grid passes of an unfinished calibrate

__all__ = ["DEVICES", "lightning_accelerator", "model_fingerprint", "preprocessing_of", "resolve_device",
           "run_calibrate", "run_detect", "run_evaluate", "run_report", "run_train", "show_progress"]


def preprocessing_of(pipe: SynomalyPipeline) -> Preprocessing:
    """The model folder's preprocessing (kept for earlier callers: ``pipe.preprocessing`` is the same)."""
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
    recursive: bool = False,
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
        recursive: Search folders' subfolders for images too.
    """
    from synomaly.train import TrainConfig, train

    unet = model_preset(model)
    size = image_size or unet.image_size
    unet = dataclasses.replace(unet, image_size=size)
    pre = Preprocessing.from_preset(preset, size=size, **(preprocess or {}))
    chosen = get_method(method)
    check_network_size(PipelineConfig(model=unet, method=method))  # before any data is read
    _atomic.check_writable(output)
    if resume:
        _check_resume(Path(output), PipelineConfig(model=unet, method=method))
    train_config = train_config or TrainConfig()
    chosen.check_training(train_config)
    if train_config.flips is None:
        train_config = dataclasses.replace(train_config, flips=preset_flips(preset))
    if (masks is not None) != chosen.needs_masks:
        needs = [name for name, m in METHODS.items() if m.needs_masks]
        raise synomaly.errors.ConfigError("masks", f"lesion masks are needed by, and only by, --method {' or '.join(needs)}")
    # Blobs go anywhere in the foreground; the erosion trims only the anomaly map at inference.
    training_pre = dataclasses.replace(pre, foreground_erosion=0)
    cases = load_cases(data, training_pre, masks, slice_axis=slice_axis, slice_range=slice_range,
                       foreground_specs=foreground_masks, recursive=recursive)
    noise_config = _noise_config(preset, size, noise or {}, chosen.default_noise)
    # The reference's 30-pixel minimum component and 500-pixel convergence floor are for 128 px.
    detect = chosen.detect_defaults(noise_config["name"], {"min_size": scaled_area(size, 30),
                                                           "min_area": scaled_area(size, 500)})
    log.info("training (%s) on %d slices from %d inputs at %dx%d", method, len(cases), len(cases.files), size, size)
    geometry = training_geometry((f.properties, f.fit, len(f.raw)) for f in cases.files)
    if "orientations" in geometry:
        log.warning("training slices come in several orientations (%s); the model records %s", geometry["orientations"],
                    geometry["orientation"])
    return train(cases.images, output, model=unet, noise=noise_config, train_config=train_config,
                 detect=detect, preprocess=pre.to_dict(), foreground=cases.foreground, method=method,
                 target=cases.masks if chosen.needs_masks else None, resume=resume, overwrite=overwrite, geometry=geometry)


def _check_resume(output: Path, config: PipelineConfig) -> None:
    """Refuse ``--resume`` with another network than the run in ``output`` has (before any data is read).

    A finished run is compared by its ``config.json``, an interrupted one by the tensor shapes of its checkpoint.
    """
    import torch

    from synomaly._json import json_plain, read_json
    from synomaly.train import CHECKPOINT

    hint = "resume with the options of the first run (--network, --image-size, --method), or pass --overwrite to start again"
    written = output / "config.json"
    if written.is_file():
        earlier = read_json(written)
        earlier_model = earlier.get("model") if isinstance(earlier, dict) else None
        wanted = json_plain(dataclasses.asdict(config.model))
        if isinstance(earlier_model, dict) and earlier_model != wanted:
            changed = sorted(k for k in wanted if earlier_model.get(k) != wanted[k])
            detail = ", ".join(f"model.{k} {earlier_model.get(k)} there, {wanted[k]} now" for k in changed[:3])
            raise ConfigError("--network", f"{written} holds another network ({detail}); {hint}")
    checkpoint = output / CHECKPOINT
    if not checkpoint.is_file():
        return
    try:
        saved = torch.load(checkpoint, map_location="cpu", weights_only=True, mmap=True)["state_dict"]
    except Exception as error:  # torch raises several types for damaged files
        raise InputError(checkpoint, f"not a readable checkpoint ({type(error).__name__}: {error}); pass --overwrite to "
                                     "start again") from None
    with torch.device("meta"):
        network = get_method(config.method).build(config)
    wanted_shapes = {f"unet.{k}": tuple(v.shape) for k, v in network.state_dict().items()}
    saved_shapes = {k: tuple(v.shape) for k, v in saved.items() if k.startswith("unet.")}
    differ = sorted(k for k in wanted_shapes.keys() | saved_shapes.keys() if wanted_shapes.get(k) != saved_shapes.get(k))
    if differ:
        key = differ[0]
        raise ConfigError("--network", f"{checkpoint} was saved by a run with another network ({len(differ)} tensors differ, "
                                     f"e.g. {key.removeprefix('unet.')} {saved_shapes.get(key)} there, "
                                     f"{wanted_shapes.get(key)} now); {hint}")


def _noise_config(preset: str, size: int, overrides: dict[str, Any], default: str = "synomaly") -> dict[str, Any]:
    """The preset's Synomaly noise (``default`` when no name is given), or another registered noise with its defaults."""
    name = overrides.get("name") or default
    base = noise_params_for(preset, size) if name == "synomaly" else {}
    return {"name": name, **base, **{k: v for k, v in overrides.items() if k != "name" and v is not None}}


def load_labelled(pipe: SynomalyPipeline, data: list[str], masks: list[str] | None, slice_axis: int,
                  slice_range: tuple[int, int] | None, foreground_masks: list[str] | None = None,
                  recursive: bool = False) -> Cases:
    """Read images (and masks, and foreground masks) with the model folder's preprocessing; warns of odd inputs."""
    cases = load_cases(data, pipe.preprocessing, masks, slice_axis=slice_axis, slice_range=slice_range,
                       foreground_specs=foreground_masks, recursive=recursive)
    start = 0
    for record in cases.files:
        name = f"{record.source.path}:{record.source.key}" if record.source.key else str(record.source.path)
        warn_input(name, cases.images[start : start + len(record.raw)].numpy(), pipe.preprocessing, pipe.config.training)
        start += len(record.raw)
    return cases


def run_calibrate(
    model: str | Path,
    data: list[str],
    *,
    masks: list[str] | None = None,
    grid: Any = None,
    detect: dict[str, Any] | None = None,
    percentile: float = 99.0,
    selection: str = "fewer-stages",
    batch_size: int = 32,
    device: str = "auto",
    precision: str = "32",
    compile: bool = False,
    seed: int = 0,
    slice_axis: int = 2,
    slice_range: tuple[int, int] | None = None,
    foreground_masks: list[str] | None = None,
    overwrite: bool = False,
    recursive: bool = False,
) -> dict[str, Any]:
    """Choose detection settings on validation data and write ``thresholds.json`` into the model folder.

    Scored grid passes are kept in ``calibration-progress.json`` beside it until the end, so the same command
    after an interruption (Ctrl-C, a killed job) continues where it stopped.

    ``detect`` sets fixed detection settings (e.g. ``sampler``) under which the grid is searched;
    they are written into ``thresholds.json`` beside the chosen values.
    """
    from synomaly.calibrate import CalibrationGrid, calibrate, write_thresholds
    from synomaly.demo import shipped_model

    folder = model_folder(model)
    if folder.resolve() == shipped_model().resolve():
        raise ConfigError("--model", f"{model!r} is the model shipped with the package, which calibrate would change; "
                                     "copy it first (cp -r \"$(python -c 'import synomaly.demo as d; print(d.shipped_model())')\" "
                                     "my-model) and calibrate the copy")
    if (folder / "thresholds.json").exists() and not overwrite:
        raise OutputExistsError(folder / "thresholds.json")
    if folder.is_dir():  # thresholds.json and the progress file go here: a read-only folder is refused before the search
        _atomic.check_writable(folder, "copy the model folder somewhere writable and calibrate the copy")
    pipe = SynomalyPipeline.open(folder, device, precision, compile)
    fixed = {k: v for k, v in (detect or {}).items() if v is not None}
    pipe.config = dataclasses.replace(pipe.config, detect=pipe.detect_config(**fixed))
    cases = load_labelled(pipe, data, masks, slice_axis, slice_range, foreground_masks, recursive)
    result = calibrate(pipe, cases.images, cases.masks, foreground=cases.foreground, grid=grid or CalibrationGrid(),
                       percentile=percentile, batch_size=batch_size, seed=seed, progress=show_progress(),
                       resume_file=folder / CALIBRATION_PROGRESS, selection=selection)
    result.detect = {**fixed, **result.detect}
    path = write_thresholds(folder, result, overwrite=overwrite)
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
    precision: str = "32",
    compile: bool = False,
    seed: int = 0,
    slice_axis: int = 2,
    slice_range: tuple[int, int] | None = None,
    foreground_masks: list[str] | None = None,
    overwrite: bool = False,
    recursive: bool = False,
    also_thresholds: tuple[float, ...] = (),
) -> dict[str, Any]:
    """Evaluate against masks: per-case and aggregate metrics as JSON and CSV in ``output``.

    ``also_thresholds`` (one-stage settings only) scores the masks at further thresholds from the same pass.
    """
    from synomaly.evaluate import evaluate, write_evaluation
    from synomaly.volumes import slice_numbers, volume_layout

    output = Path(output)
    if (output / "metrics.json").exists() and not overwrite:
        raise OutputExistsError(output / "metrics.json")
    _atomic.check_writable(output)
    pipe = SynomalyPipeline.open(model, device, precision, compile)
    cases = load_labelled(pipe, data, masks, slice_axis, slice_range, foreground_masks, recursive)
    if cases.masks is None:
        raise InputError(data[0], "evaluation needs masks (--masks, one per input; 'none' for healthy inputs)")
    overrides = {k: v for k, v in (detect or {}).items() if v is not None}
    result = evaluate(pipe, cases.images, cases.masks, case_ids=cases.case_ids, group_ids=cases.group_ids,
                      slice_numbers=slice_numbers(cases.files), foreground=cases.foreground, volumes=volume_layout(cases),
                      batch_size=batch_size, seed=seed, progress=show_progress(), also_thresholds=also_thresholds,
                      **overrides)
    result.metrics["model"] = {"folder": str(model), "config": pipe.config.to_dict(), "precision": precision}
    result.metrics["data"] = {"images": list(data), "masks": list(masks),
                              "foreground masks": None if foreground_masks is None else list(foreground_masks)}
    write_evaluation(result, output, overwrite=overwrite)
    log.info("Dice (mean over anomalous slices) %.3f, AP %.3f; written to %s",
             result.metrics["aggregate"]["dice_mean"], result.metrics["aggregate"]["ap"], output)
    return result.metrics


def run_report(evaluation: str | Path, output: str | Path | None = None, *, title: str = "Synomaly report",
               notes: str | None = None, overwrite: bool = False) -> Path:
    """Render the HTML report of an evaluation folder."""
    from synomaly.report import build_report

    target = Path(evaluation) / "report.html" if output is None else Path(output)
    if target.is_dir():
        raise OutputError(target, "is a folder; give the report's file name (e.g. report.html)")
    if output is not None or Path(evaluation).is_dir():  # a missing evaluation folder is reported as such
        _atomic.check_writable(target.parent)
    path = build_report(evaluation, output, title=title, notes=notes, overwrite=overwrite)
    log.info("report written to %s", path)
    return path


def preset_names() -> list[str]:
    """Valid ``--preset`` values."""
    return list(MODALITY_PRESETS)
