"""Lightning glue of :func:`synomaly.train.train`: the module, callbacks and trainer.

Only training imports this module (importing Lightning costs seconds); a model folder loads without it.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import EMAWeightAveraging, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, Logger, TensorBoardLogger
from lightning.pytorch.plugins.io import TorchCheckpointIO
from torch import Tensor, nn
from tqdm.auto import tqdm

from synomaly import _atomic
from synomaly.config import FLIPS, PRECISIONS, TrainConfig
from synomaly.errors import TrainingDiverged
from synomaly.methods import get_method
from synomaly.schedule import DiffusionSchedule
from synomaly.train import random_flips

PLANNED_STEPS = "synomaly_planned_steps"  # the checkpoint key of DiffusionModule.planned_steps


class DiffusionModule(pl.LightningModule):
    """One training step of a registered method: flips, the method's loss, a stop on a non-finite loss.

    A method with ``manual_optimization`` makes the step itself (``Method.training_step``): one update
    of one of its own optimisers, so Lightning's global step counts optimiser updates for every method.

    Args:
        unet: The network (its weights are what the model folder exports, EMA-averaged unless the
            method says otherwise).
        schedule: The noise schedule.
        noise: The training noise (``synomaly.noise``).
        config: The optimisation settings.
        method: The registered method whose ``loss`` (or ``training_step``) is trained.
        fields: Names of the data set's tensors: ``images`` and optionally ``foreground``, ``target``.
    """

    def __init__(self, unet: nn.Module, schedule: DiffusionSchedule, noise: Any, config: TrainConfig, method: str,
                 fields: tuple[str, ...]) -> None:
        super().__init__()
        self.unet, self.schedule, self.noise = unet, schedule, noise
        self.config, self.method, self.fields = config, method, fields
        # A method with its own optimisers steps them itself; the length of the run it planned for
        # (its phases) is kept in the checkpoint, so a resumed run continues the same plan.
        self.automatic_optimization = not get_method(method).manual_optimization
        self.planned_steps = config.steps

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint[PLANNED_STEPS] = self.planned_steps

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.planned_steps = int(checkpoint.get(PLANNED_STEPS, self.planned_steps))

    def on_fit_start(self) -> None:
        # Different noise per rank; the data order is already split by the sampler.
        torch.manual_seed(self.config.seed + 1 + self.global_rank)

    def training_step(self, batch: list[Tensor], batch_idx: int) -> Tensor:
        named = dict(zip(self.fields, batch))
        x, fg, target = named["images"], named.get("foreground"), named.get("target")
        flips = self.config.flips or "both"
        if flips != "none":
            flipped = random_flips(x, fg, target, dims=FLIPS[str(flips)])
            x, fg, target = flipped[0] if flipped[0] is not None else x, flipped[1], flipped[2]
        method = get_method(self.method)
        if self.automatic_optimization:
            logged = {"loss": method.loss(self.unet, self.schedule, self.noise, x, fg, target, self.config.loss)}
        else:
            optimizers = self.optimizers()
            logged = method.training_step(self.unet, optimizers if isinstance(optimizers, list) else [optimizers],
                                          self.global_step, self.planned_steps, x, fg, self.manual_backward)
        loss = logged["loss"]
        if not torch.isfinite(loss):
            raise TrainingDiverged(self.global_step, float(loss.detach()))
        self.log("train/loss", loss, prog_bar=True, on_step=True, batch_size=x.shape[0])
        for name, value in logged.items():
            if name != "loss":
                self.log(f"train/{name}", value, on_step=True, batch_size=x.shape[0])
        return loss

    def configure_optimizers(self) -> Any:
        if not self.automatic_optimization:
            return get_method(self.method).optimizers(self.unet, self.config)
        return torch.optim.AdamW(self.unet.parameters(), lr=self.config.lr, weight_decay=self.config.weight_decay)


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


class Preview(pl.Callback):
    """A preview every ``preview_every`` steps, and one of the final model (so short runs get one too)."""

    def __init__(self, folder: Path, every: int, images: Tensor, noise: Any, method: str) -> None:
        self.folder, self.every, self.images, self.noise, self.method = folder, every, images, noise, method

    def write(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        if self.every and trainer.is_global_zero:
            write_preview(self.folder / f"step_{trainer.global_step:07d}.png", module, self.images.to(module.device),
                          self.noise, self.method)

    def on_train_batch_end(self, trainer: pl.Trainer, module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self.every and trainer.global_step % self.every == 0:
            self.write(trainer, module)

    def on_train_end(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        if self.every and trainer.global_step % self.every:
            self.write(trainer, module)


class StepProgressBar(pl.Callback):
    """One bar over optimiser steps (Lightning's counts epochs, so it never shows the time left)."""

    def on_train_start(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        self.bar = tqdm(total=trainer.max_steps, initial=trainer.global_step, desc="train", unit="step",
                        disable=not trainer.is_global_zero, dynamic_ncols=True)

    def on_train_batch_end(self, trainer: pl.Trainer, module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self.bar.update(trainer.global_step - self.bar.n)
        loss = trainer.callback_metrics.get("train/loss")
        if loss is not None and trainer.global_step % 10 == 0:
            self.bar.set_postfix(loss=f"{float(loss):.4f}", refresh=False)

    def on_train_end(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        self.bar.close()


class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoints go to a temporary file first, so a kill never leaves a truncated one."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        with _atomic.atomic_path(path) as tmp:
            super().save_checkpoint(checkpoint, tmp, storage_options)


def make_trainer(output_dir: Path, config: TrainConfig, preview_batch: Tensor, noise: Any, method: str) -> pl.Trainer:
    """The Lightning trainer: step-based, EMA weights, atomic resume checkpoints, CSV (and TensorBoard) logs.

    A method without EMA (``Method.ema``) exports its weights as trained; one with its own optimisers
    (``Method.manual_optimization``) clips no gradients (Lightning clips only what it steps itself).
    """
    chosen = get_method(method)
    callbacks: list[pl.Callback] = [EMAWeightAveraging(decay=config.ema_decay)] if chosen.ema else []
    callbacks += [
        ModelCheckpoint(dirpath=output_dir / "checkpoints", save_last=True, save_top_k=0,
                        every_n_train_steps=config.checkpoint_every, enable_version_counter=False),
        Preview(output_dir / "previews", config.preview_every, preview_batch, noise, method),
    ]
    if config.progress:
        callbacks.append(StepProgressBar())
    loggers: list[Logger] = [CSVLogger(output_dir, name="logs", version=0)]
    if importlib.util.find_spec("tensorboard") is not None:
        loggers.append(TensorBoardLogger(output_dir, name="logs", version=0))
    return pl.Trainer(
        max_steps=config.steps,
        max_epochs=-1,
        accelerator=config.accelerator,
        devices=config.devices,
        num_nodes=config.num_nodes,
        strategy=config.strategy,
        precision=PRECISIONS[config.precision],  # type: ignore[arg-type]  # the keys of PRECISIONS are Lightning's names
        gradient_clip_val=None if chosen.manual_optimization else config.grad_clip or None,
        callbacks=callbacks,
        logger=loggers,
        log_every_n_steps=config.log_every,
        enable_progress_bar=False,  # StepProgressBar shows steps and the time left instead
        enable_model_summary=False,
        plugins=[AtomicCheckpointIO()],
        default_root_dir=output_dir,
    )
