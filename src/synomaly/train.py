"""Training on healthy images with any registered noise (Lightning: CPU/GPU, DDP, bf16, resume).

The product of training is a model folder (``config.json`` + ``model.safetensors`` holding the EMA
weights) that ``SynomalyPipeline.from_pretrained`` loads without importing Lightning. Beside it,
``checkpoints/last.ckpt`` (for ``resume``), ``logs/`` (CSV, TensorBoard when installed) and
``previews/`` (input / noised / one-step reconstruction pictures).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from synomaly import _atomic
from synomaly.config import FLIPS, PRECISIONS, DetectConfig, ModelConfig, PipelineConfig, ScheduleConfig, TrainConfig
from synomaly.errors import Interrupted, OutputExistsError, TrainingDiverged
from synomaly.input_checks import intensity_statistics
from synomaly.io._nifti import CANONICAL
from synomaly.methods import check_network_size, get_method
from synomaly.model import check_image_size
from synomaly.pipeline import CONFIG_NAME, THRESHOLDS_NAME, WEIGHTS_NAME, SynomalyPipeline
from synomaly.preprocess import Preprocessing
from synomaly.schedule import DiffusionSchedule

log = logging.getLogger(__name__)

__all__ = ["FLIPS", "PRECISIONS", "TrainConfig", "TrainingDiverged", "random_flips", "train", "training_loss",
           "write_preview"]

CHECKPOINT = Path("checkpoints") / "last.ckpt"  # where Lightning saves the resume checkpoint
# Lightning warnings that say nothing a user of this package can act on.
LIGHTNING_NOISE = (
    r".*log_every_n_steps.*",  # short runs: fewer batches per epoch than the logging interval
    r".*LeafSpec.*",  # a deprecation inside Lightning itself
    r".*does not have many workers.*",  # the data are tensors in memory
    r".*resuming from a checkpoint that ended before the epoch ended.*",  # expected with step-based checkpoints
    r".*litlogger.*",
    r".*ModelCheckpoint with manual optimization.*",  # a method's own updates: the checkpoint holds the state after them
)


def training_loss(unet: nn.Module, schedule: DiffusionSchedule, noise: Any, method: str, loss: str, x: Tensor,
                  foreground: Tensor | None = None, target: Tensor | None = None) -> Tensor:
    """The loss of one batch for the model folder's ``method`` (a ``synomaly.methods`` name)."""
    return get_method(method).loss(unet, schedule, noise, x, foreground, target, loss)


def write_preview(path: Path, module: Any, images: Tensor, noise: Any, method: str = "diffusion") -> None:
    """Save rows input / network input / network output (``Method.preview``) as a PNG (see ``synomaly._lightning``)."""
    from synomaly._lightning import write_preview as write  # imports Lightning (seconds)

    write(path, module, images, noise, method)


def random_flips(images: Tensor, *others: Tensor | None, dims: tuple[int, ...] = (-1, -2)) -> tuple[Tensor | None, ...]:
    """Flip each image (and the same item of every other tensor) along each of ``dims`` with probability 1/2.

    ``-1`` flips left-right (horizontally), ``-2`` upside down.
    """
    flips = torch.rand(2, images.shape[0], 1, 1, 1, device=images.device) < 0.5
    out: list[Tensor | None] = [images, *others]
    for flag, dim in zip(flips, dims):
        out = [None if x is None else torch.where(flag, x.flip(dim), x) for x in out]
    return tuple(out)


def _check_outputs(output_dir: Path, resume: bool, overwrite: bool) -> Path | None:
    """The checkpoint to resume from, or None; refuses to clobber an existing run."""
    checkpoint = output_dir / CHECKPOINT
    if resume:
        if checkpoint.is_file():
            return checkpoint
        log.warning("%s not found: starting from scratch", checkpoint)
        return None
    for existing in (output_dir / WEIGHTS_NAME, checkpoint):
        if existing.exists() and not overwrite:
            raise OutputExistsError(existing, "pass resume=True (--resume) to continue or overwrite=True (--overwrite)")
    if overwrite:
        checkpoint.unlink(missing_ok=True)
        (output_dir / THRESHOLDS_NAME).unlink(missing_ok=True)  # chosen for the model being replaced
    return None


def _merge_loss_log(path: Path, earlier: str) -> None:
    """Put the rows of the run before ``--resume`` back in front of the CSV log that the resumed run rewrote."""
    import csv
    import io

    old = list(csv.DictReader(io.StringIO(earlier)))
    new = list(csv.DictReader(io.StringIO(path.read_text()))) if path.is_file() else []
    first = min((int(row["step"]) for row in new if row.get("step")), default=None)
    kept = [row for row in old if first is None or (row.get("step") and int(row["step"]) < first)]
    fields = list(dict.fromkeys([*(old[0] if old else {}), *(new[0] if new else {})]))
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    writer.writerows(kept + new)
    _atomic.write_text(path, out.getvalue())


def _checkpoint_hint(output_dir: Path) -> str:
    """Where the run can continue from, in words."""
    checkpoint = output_dir / CHECKPOINT
    if not checkpoint.is_file():
        return "no checkpoint was saved yet, so"
    return f"the last checkpoint ({checkpoint}) is kept:"


def _finished_step(output_dir: Path) -> int | None:
    """The final step of the model folder already written in ``output_dir``, or None."""
    try:
        config = json.loads((output_dir / CONFIG_NAME).read_text())
        return int(config["training"]["final_step"]) if (output_dir / WEIGHTS_NAME).is_file() else None
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _retire_thresholds(output_dir: Path) -> None:
    """New weights make an earlier ``thresholds.json`` wrong: keep it aside as ``thresholds.previous.json``."""
    thresholds = output_dir / THRESHOLDS_NAME
    if thresholds.exists():
        thresholds.replace(output_dir / "thresholds.previous.json")
        log.warning("%s was chosen for the earlier weights: moved to thresholds.previous.json; run synomaly calibrate again",
                    thresholds)


def _dataset(images: Tensor | np.ndarray, foreground: Tensor | np.ndarray | None, target: Tensor | np.ndarray | None,
             model: ModelConfig) -> tuple[Any, tuple[str, ...]]:
    images = torch.as_tensor(images, dtype=torch.float32)
    if images.ndim != 4 or images.shape[1] != 1:
        raise ValueError(f"training images must be [N, 1, H, W], got {tuple(images.shape)}")
    check_image_size(model, images.shape[2], images.shape[3])
    if images.shape[2] != model.image_size or images.shape[3] != model.image_size:
        raise ValueError(f"training images are {images.shape[2]}x{images.shape[3]} but model.image_size is {model.image_size}")
    if not torch.isfinite(images).all() or images.min() < -1.001 or images.max() > 1.001:
        raise ValueError("training images must be finite and scaled to [-1, 1]")
    named = {"images": images}
    for name, extra in (("foreground", foreground), ("target", target)):
        if extra is not None:
            extra = torch.as_tensor(extra).bool()
            if extra.numel() != images.numel():
                raise ValueError(f"training {name} must be shaped like the images {tuple(images.shape)}, got {tuple(extra.shape)}")
            named[name] = extra.reshape(images.shape)
    return torch.utils.data.TensorDataset(*named.values()), tuple(named)


def train(
    images: Tensor | np.ndarray,
    output_dir: str | Path,
    *,
    model: ModelConfig,
    noise: dict[str, Any],
    train_config: TrainConfig = TrainConfig(),
    schedule: ScheduleConfig = ScheduleConfig(),
    detect: DetectConfig = DetectConfig(),
    preprocess: Preprocessing | dict[str, Any] | None = None,
    foreground: Tensor | np.ndarray | None = None,
    method: str = "diffusion",
    target: Tensor | np.ndarray | None = None,
    resume: bool = False,
    overwrite: bool = False,
    geometry: dict[str, Any] | None = None,
) -> Path:
    """Train a diffusion model on healthy ``[N, 1, H, W]`` images in [-1, 1]; returns the model folder.

    ``method`` also trains the baselines that share the model folder format: a denoising
    autoencoder (``dae``) or, with lesion masks as ``target``, the supervised upper bound.

    Args:
        images: Healthy training images.
        output_dir: The model folder to write (with checkpoints, logs and previews inside).
        model: UNet configuration; ``image_size`` must match the images.
        noise: Training noise as ``{"name": ..., **params}`` (see ``synomaly.noise``).
        train_config: Optimisation and hardware settings.
        schedule: Diffusion schedule.
        detect: Detection defaults stored in the model folder.
        preprocess: Preprocessing stored in the model folder (or its plain-data form).
        foreground: Optional ``[N, 1, H, W]`` masks that confine noise blobs.
        method: A ``synomaly.methods`` name.
        target: Lesion masks ``[N, 1, H, W]`` (``supervised`` only).
        resume: Continue from ``checkpoints/last.ckpt`` when it exists.
        overwrite: Replace an existing model folder's run.
        geometry: The training slices' ``orientation`` and ``pixel_spacing_mm`` (``synomaly.io.training_geometry``),
            recorded in ``config.json`` so that ``detect`` can warn about inputs unlike them; both ``None`` when unknown.
    """
    import lightning.pytorch as pl

    from synomaly.noise import noise_from_dict

    output_dir = Path(output_dir)
    inputs = {"orientation": None, "pixel_spacing_mm": None, **(geometry or {})}
    ckpt_path = _check_outputs(output_dir, resume, overwrite)
    finished = _finished_step(output_dir) if resume else None
    if finished is not None and finished >= train_config.steps:
        log.info("%s already finished at step %d (asked for %d): nothing to do", output_dir, finished, train_config.steps)
        return output_dir
    config = PipelineConfig(model=model, schedule=schedule, noise=dict(noise), detect=detect,
                            preprocess=Preprocessing.from_dict(preprocess) if isinstance(preprocess, dict) else preprocess,
                            method=method)
    chosen = get_method(method)
    check_network_size(config)
    chosen.check_training(train_config)
    if (target is not None) != chosen.needs_masks:
        raise ValueError(f"lesion masks (target) are needed by, and only by, the methods that train on them; {method!r} "
                         f"{'does' if chosen.needs_masks else 'does not'}")
    if not chosen.trained:
        _dataset(images, foreground, target, model)  # the same checks of the images
        if (output_dir / CONFIG_NAME).exists() and not (overwrite or resume):
            raise OutputExistsError(output_dir / CONFIG_NAME, "pass overwrite=True (--overwrite) to replace it")
        (output_dir / WEIGHTS_NAME).unlink(missing_ok=True)  # a method without weights leaves none behind
        _retire_thresholds(output_dir)
        summary = {"images": len(images), "final_step": 0, "note": f"{method}: nothing to train",
                   "nifti_orientation": "".join(CANONICAL), "intensity": intensity_statistics(images, foreground), **inputs}
        SynomalyPipeline(chosen.build(config), dataclasses.replace(config, training=summary)).save_pretrained(
            output_dir, overwrite=True)
        log.info("model folder written to %s (%s needs no training)", output_dir, method)
        return output_dir
    noise_fn = noise_from_dict(config.noise)
    dataset, fields = _dataset(images, foreground, target, model)
    pl.seed_everything(train_config.seed, workers=True, verbose=False)
    unet = chosen.build(config)
    from synomaly._lightning import DiffusionModule, make_trainer  # imports Lightning (seconds)

    module = DiffusionModule(unet, DiffusionSchedule.from_config(schedule), noise_fn, train_config, method, fields)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=train_config.batch_size, shuffle=True, drop_last=len(dataset) >= train_config.batch_size,
        num_workers=train_config.num_workers, persistent_workers=train_config.num_workers > 0,
    )
    loss_log = output_dir / "logs" / "version_0" / "metrics.csv"  # read before Lightning's CSV logger replaces it
    earlier_log = loss_log.read_text() if ckpt_path is not None and loss_log.is_file() else None
    trainer = make_trainer(output_dir, train_config, dataset.tensors[0][:4], noise_fn, method)
    start = time.perf_counter()
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    try:
        with warnings.catch_warnings():
            for message in LIGHTNING_NOISE:
                warnings.filterwarnings("ignore", message=message)
            trainer.fit(module, loader, ckpt_path=ckpt_path, weights_only=True)
    except SIGTERMException:  # a SystemExit with status 0: a scheduler would record success without a model
        raise Interrupted(f"train stopped by SIGTERM at step {trainer.global_step} of {train_config.steps}, so no model "
                          f"was written", f"{_checkpoint_hint(output_dir)} run the same command with --resume") from None
    finally:
        if earlier_log is not None and trainer.is_global_zero:
            _merge_loss_log(loss_log, earlier_log)
    seconds = time.perf_counter() - start
    if trainer.is_global_zero:
        summary = {**dataclasses.asdict(train_config), "images": len(dataset), "final_step": trainer.global_step,
                   "nifti_orientation": "".join(CANONICAL), "intensity": intensity_statistics(dataset.tensors[0], foreground),
                   **inputs,
                   "seconds_last_run": round(seconds, 3), "device": str(trainer.strategy.root_device),
                   "world_size": trainer.world_size}
        config = dataclasses.replace(config, training=summary)
        _retire_thresholds(output_dir)
        SynomalyPipeline(module.unet, config).save_pretrained(output_dir, overwrite=True)
        log.info("model folder written to %s (%d steps)", output_dir, trainer.global_step)
    trainer.strategy.barrier("model folder written")
    return output_dir
