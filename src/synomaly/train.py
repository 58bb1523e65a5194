"""Training on healthy images with any registered noise (Lightning: CPU/GPU, DDP, bf16, resume).

The product of training is a model folder (``config.json`` + ``model.safetensors`` holding the EMA
weights) that ``SynomalyPipeline.from_pretrained`` loads without importing Lightning. Beside it,
``checkpoints/last.ckpt`` (for ``resume``), ``logs/`` (CSV, TensorBoard when installed) and
``previews/`` (input / noised / one-step reconstruction pictures).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import logging
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from synomaly import _atomic
from synomaly.config import DetectConfig, ModelConfig, PipelineConfig, ScheduleConfig, _check
from synomaly.errors import Interrupted, OutputExistsError, SynomalyError
from synomaly.io._nifti import CANONICAL
from synomaly.methods import get_method
from synomaly.model import check_image_size
from synomaly.pipeline import CONFIG_NAME, THRESHOLDS_NAME, WEIGHTS_NAME, SynomalyPipeline
from synomaly.schedule import LOSSES, DiffusionSchedule

log = logging.getLogger(__name__)

PRECISIONS = {"32": "32-true", "bf16": "bf16-mixed"}
CHECKPOINT = Path("checkpoints") / "last.ckpt"
# Lightning warnings that say nothing a user of this package can act on.
LIGHTNING_NOISE = (
    r".*log_every_n_steps.*",  # short runs: fewer batches per epoch than the logging interval
    r".*LeafSpec.*",  # a deprecation inside Lightning itself
    r".*does not have many workers.*",  # the data are tensors in memory
    r".*resuming from a checkpoint that ended before the epoch ended.*",  # expected with step-based checkpoints
    r".*litlogger.*",
)
FLIPS = {"both": (-1, -2), "horizontal": (-1,), "vertical": (-2,), "none": ()}


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation and hardware settings.

    Attributes:
        steps: Optimiser steps in total (a resumed run stops at the same count).
        batch_size: Images per step and device.
        lr: AdamW learning rate.
        weight_decay: AdamW weight decay.
        grad_clip: Gradient norm clipping (0 disables).
        ema_decay: Decay of the exponential moving average of the weights that is exported.
        loss: ``mse`` or ``hybrid`` (MSE plus the fixed-variance variational bound).
        flips: Random flips, each axis with probability 1/2: ``both``, ``horizontal`` (left-right
            only: keeps brains upright), ``vertical`` or ``none``. ``true``/``false`` mean ``both``/``none``;
            ``None`` (the default) takes the modality preset's (``synomaly train``), else ``both``.
        precision: ``32`` or ``bf16`` (mixed).
        accelerator: Lightning accelerator (``auto``, ``cpu``, ``gpu``).
        devices: Devices per node.
        num_nodes: Nodes (multi-node DDP, e.g. under SLURM).
        strategy: Lightning strategy (``auto``, ``ddp``, ...).
        seed: Seed of the data order, noise and initial weights.
        checkpoint_every: Steps between resume checkpoints.
        preview_every: Steps between preview pictures (0 disables).
        log_every: Steps between log rows.
        num_workers: Data-loader worker processes.
        progress: Show a progress bar.
    """

    steps: int = 1000
    batch_size: int = 8
    lr: float = 1e-4
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    loss: str = "mse"
    flips: bool | str | None = None
    precision: str = "32"
    accelerator: str = "auto"
    devices: int = 1
    num_nodes: int = 1
    strategy: str = "auto"
    seed: int = 0
    checkpoint_every: int = 200
    preview_every: int = 500
    log_every: int = 10
    num_workers: int = 0
    progress: bool = True

    def __post_init__(self) -> None:
        _check(self.steps >= 1, "train.steps", f"must be >= 1, got {self.steps}")
        _check(self.batch_size >= 1, "train.batch_size", f"must be >= 1, got {self.batch_size}")
        _check(self.lr > 0, "train.lr", f"must be > 0, got {self.lr}")
        _check(0.0 <= self.ema_decay < 1.0, "train.ema_decay", f"must be in [0, 1), got {self.ema_decay}")
        _check(self.loss in LOSSES, "train.loss", f"must be one of {', '.join(LOSSES)}, got {self.loss!r}")
        flips = self.flips.lower() if isinstance(self.flips, str) else self.flips
        flips = {True: "both", False: "none", "true": "both", "false": "none"}.get(flips, flips)
        _check(flips is None or flips in FLIPS, "train.flips", f"must be one of {', '.join(FLIPS)}, got {self.flips!r}")
        object.__setattr__(self, "flips", flips)
        _check(self.precision in PRECISIONS, "train.precision", f"must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        _check(self.checkpoint_every >= 1, "train.checkpoint_every", "must be >= 1")
        _check(self.devices >= 1 and self.num_nodes >= 1, "train.devices", "devices and num_nodes must be >= 1")


class TrainingDiverged(SynomalyError):
    """The loss became NaN or infinite: the run stops, and no model folder is written from it."""

    def __init__(self, step: int, loss: float) -> None:
        self.step, self.loss = step, loss
        super().__init__(f"train.lr: the loss became {loss} at step {step} (training diverged), so no model was written; "
                         "lower --train.lr (or check the images) and train again with --overwrite")


def random_flips(images: Tensor, *others: Tensor | None, dims: tuple[int, ...] = (-1, -2)) -> tuple[Tensor | None, ...]:
    """Flip each image (and the same item of every other tensor) along each of ``dims`` with probability 1/2.

    ``-1`` flips left-right (horizontally), ``-2`` upside down.
    """
    flips = torch.rand(2, images.shape[0], 1, 1, 1, device=images.device) < 0.5
    out = [images, *others]
    for flag, dim in zip(flips, dims):
        out = [None if x is None else torch.where(flag, x.flip(dim), x) for x in out]
    return tuple(out)


def training_loss(unet: nn.Module, schedule: DiffusionSchedule, noise: Any, method: str, loss: str, x: Tensor,
                  foreground: Tensor | None = None, target: Tensor | None = None) -> Tensor:
    """The loss of one batch for the model folder's ``method`` (a ``synomaly.methods`` name)."""
    return get_method(method).loss(unet, schedule, noise, x, foreground, target, loss)


def _lightning_module(unet: nn.Module, schedule: DiffusionSchedule, noise: Any, config: TrainConfig, method: str,
                      fields: tuple[str, ...]):
    """The ``LightningModule`` (built lazily: importing Lightning costs seconds)."""
    import lightning.pytorch as pl

    class DiffusionModule(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.unet, self.schedule, self.noise = unet, schedule, noise

        def on_fit_start(self) -> None:
            # Different noise per rank; the data order is already split by the sampler.
            torch.manual_seed(config.seed + 1 + self.global_rank)

        def training_step(self, batch: list[Tensor], batch_idx: int) -> Tensor:
            named = dict(zip(fields, batch))
            x, fg, target = named["images"], named.get("foreground"), named.get("target")
            flips = config.flips or "both"
            if flips != "none":
                x, fg, target = random_flips(x, fg, target, dims=FLIPS[flips])
            loss = training_loss(self.unet, self.schedule, self.noise, method, config.loss, x, fg, target)
            if not torch.isfinite(loss):
                raise TrainingDiverged(self.global_step, float(loss.detach()))
            self.log("train/loss", loss, prog_bar=True, on_step=True, batch_size=x.shape[0])
            return loss

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.AdamW(self.unet.parameters(), lr=config.lr, weight_decay=config.weight_decay)

    return DiffusionModule()


def _callbacks(output_dir: Path, config: TrainConfig, preview_batch: Tensor, noise: Any, method: str) -> list:
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import EMAWeightAveraging, ModelCheckpoint

    class Preview(pl.Callback):
        """A preview every ``preview_every`` steps, and one of the final model (so short runs get one too)."""

        def write(self, trainer, module) -> None:
            if config.preview_every and trainer.is_global_zero:
                write_preview(output_dir / "previews" / f"step_{trainer.global_step:07d}.png", module,
                              preview_batch.to(module.device), noise, method)

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
            if config.preview_every and trainer.global_step % config.preview_every == 0:
                self.write(trainer, module)

        def on_train_end(self, trainer, module) -> None:
            if config.preview_every and trainer.global_step % config.preview_every:
                self.write(trainer, module)

    callbacks = [
        EMAWeightAveraging(decay=config.ema_decay),
        ModelCheckpoint(dirpath=output_dir / CHECKPOINT.parent, save_last=True, save_top_k=0,
                        every_n_train_steps=config.checkpoint_every, enable_version_counter=False),
        Preview(),
    ]
    if config.progress:
        callbacks.append(_step_progress_class()())
    return callbacks


def _step_progress_class() -> type:
    """The step progress bar callback (built lazily: importing Lightning costs seconds)."""
    import lightning.pytorch as pl
    from tqdm.auto import tqdm

    class StepProgressBar(pl.Callback):
        """One bar over optimiser steps (Lightning's counts epochs, so it never shows the time left)."""

        def on_train_start(self, trainer, module) -> None:
            self.bar = tqdm(total=trainer.max_steps, initial=trainer.global_step, desc="train", unit="step",
                            disable=not trainer.is_global_zero, dynamic_ncols=True)

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
            self.bar.update(trainer.global_step - self.bar.n)
            loss = trainer.callback_metrics.get("train/loss")
            if loss is not None and trainer.global_step % 10 == 0:
                self.bar.set_postfix(loss=f"{float(loss):.4f}", refresh=False)

        def on_train_end(self, trainer, module) -> None:
            self.bar.close()

    return StepProgressBar


@torch.no_grad()
def write_preview(path: Path, module: Any, images: Tensor, noise: Any, method: str = "diffusion") -> None:
    """Save rows input / network input / network output (``Method.preview``) as a PNG."""
    from PIL import Image

    was_training = module.training
    module.eval()
    x_t, recon = get_method(method).preview(module.unet, module.schedule, images, noise)
    module.train(was_training)
    rows = [torch.cat(list(r[:, 0]), dim=1) for r in (images, x_t.clamp(-1, 1), recon)]
    grid = ((torch.cat(rows, dim=0) + 1) * 127.5).clamp(0, 255).to(torch.uint8).cpu().numpy()
    with _atomic.atomic_path(path) as tmp:
        Image.fromarray(grid).save(tmp, format="PNG")


def _loggers(output_dir: Path) -> list:
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

    loggers = [CSVLogger(output_dir, name="logs", version=0)]
    if importlib.util.find_spec("tensorboard") is not None:
        loggers.append(TensorBoardLogger(output_dir, name="logs", version=0))
    return loggers


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
    preprocess: dict[str, Any] | None = None,
    foreground: Tensor | np.ndarray | None = None,
    method: str = "diffusion",
    target: Tensor | np.ndarray | None = None,
    resume: bool = False,
    overwrite: bool = False,
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
        preprocess: Preprocessing settings stored in the model folder (plain data).
        foreground: Optional ``[N, 1, H, W]`` masks that confine noise blobs.
        method: A ``synomaly.methods`` name.
        target: Lesion masks ``[N, 1, H, W]`` (``supervised`` only).
        resume: Continue from ``checkpoints/last.ckpt`` when it exists.
        overwrite: Replace an existing model folder's run.
    """
    import lightning.pytorch as pl

    from synomaly.noise import noise_from_dict

    output_dir = Path(output_dir)
    ckpt_path = _check_outputs(output_dir, resume, overwrite)
    finished = _finished_step(output_dir) if resume else None
    if finished is not None and finished >= train_config.steps:
        log.info("%s already finished at step %d (asked for %d): nothing to do", output_dir, finished, train_config.steps)
        return output_dir
    config = PipelineConfig(model=model, schedule=schedule, noise=dict(noise), detect=detect,
                            preprocess=dict(preprocess or {}), method=method)
    chosen = get_method(method)
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
                   "nifti_orientation": "".join(CANONICAL)}
        SynomalyPipeline(chosen.build(config), dataclasses.replace(config, training=summary)).save_pretrained(
            output_dir, overwrite=True)
        log.info("model folder written to %s (%s needs no training)", output_dir, method)
        return output_dir
    noise_fn = noise_from_dict(config.noise)
    dataset, fields = _dataset(images, foreground, target, model)
    pl.seed_everything(train_config.seed, workers=True, verbose=False)
    unet = chosen.build(config)
    module = _lightning_module(unet, DiffusionSchedule.from_config(schedule), noise_fn, train_config, method, fields)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=train_config.batch_size, shuffle=True, drop_last=len(dataset) >= train_config.batch_size,
        num_workers=train_config.num_workers, persistent_workers=train_config.num_workers > 0,
    )
    loss_log = output_dir / "logs" / "version_0" / "metrics.csv"  # read before Lightning's CSV logger replaces it
    earlier_log = loss_log.read_text() if ckpt_path is not None and loss_log.is_file() else None
    trainer = _trainer(output_dir, train_config, dataset.tensors[0][:4], noise_fn, method)
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
                   "nifti_orientation": "".join(CANONICAL),
                   "seconds_last_run": round(seconds, 3), "device": str(trainer.strategy.root_device),
                   "world_size": trainer.world_size}
        config = dataclasses.replace(config, training=summary)
        _retire_thresholds(output_dir)
        SynomalyPipeline(module.unet, config).save_pretrained(output_dir, overwrite=True)
        log.info("model folder written to %s (%d steps)", output_dir, trainer.global_step)
    trainer.strategy.barrier("model folder written")
    return output_dir


def _trainer(output_dir: Path, config: TrainConfig, preview_batch: Tensor, noise: Any, method: str):
    import lightning.pytorch as pl
    from lightning.pytorch.plugins.io import TorchCheckpointIO

    class AtomicCheckpointIO(TorchCheckpointIO):
        """Checkpoints go to a temporary file first, so a kill never leaves a truncated one."""

        def save_checkpoint(self, checkpoint: dict, path: Any, storage_options: Any = None) -> None:
            with _atomic.atomic_path(path) as tmp:
                super().save_checkpoint(checkpoint, tmp, storage_options)

    return pl.Trainer(
        max_steps=config.steps,
        max_epochs=-1,
        accelerator=config.accelerator,
        devices=config.devices,
        num_nodes=config.num_nodes,
        strategy=config.strategy,
        precision=PRECISIONS[config.precision],
        gradient_clip_val=config.grad_clip or None,
        callbacks=_callbacks(output_dir, config, preview_batch, noise, method),
        logger=_loggers(output_dir),
        log_every_n_steps=config.log_every,
        enable_progress_bar=False,  # StepProgress shows steps and the time left instead
        enable_model_summary=False,
        plugins=[AtomicCheckpointIO()],
        default_root_dir=output_dir,
    )
