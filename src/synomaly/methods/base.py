"""The interface every method implements (see ``synomaly.methods``)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from synomaly.config import DetectConfig, PipelineConfig, TrainConfig
from synomaly.schedule import DiffusionSchedule

NoiseFn = Callable[..., Tensor]
Network = Callable[[Tensor, Tensor], Tensor]  # unet(x, t): an nn.Module or a wrapper such as SynomalyPipeline.network
Backward = Callable[[Tensor], None]  # loss.backward, or Lightning's manual_backward (precision, devices)


class Method:
    """What a model folder's network learns, and how it turns an image into a reconstruction.

    The detection loop (``synomaly.detect``) compares each reconstruction with the input, so every
    method fits it: a method whose output is a score map ``p`` instead of an image returns
    ``x - p`` (or ``x + p``), making ``|blur(x) - blur(x_hat)| = blur(p)``.

    Attributes:
        description: One line for ``--help`` and reports.
        trained: Whether ``train`` runs an optimiser (``False``: the folder holds no weights).
        needs_masks: Whether training takes lesion masks (the supervised upper bound).
        uses_timestep: Whether ``detect.t`` means anything (only for the diffusion methods).
        reconstructs_image: Whether the reconstruction is a counterfactual image (``False``: it is
            ``x -/+ p`` for a score map ``p``, so image-quality metrics do not apply).
        default_noise: The training noise when ``--noise`` is not given.
        manual_optimization: Whether training runs the method's own optimisers (``optimizers``) one update
            per step (``training_step``); ``False``: one AdamW over all weights minimises ``loss``.
        ema: Whether the exported weights are an exponential moving average (``train.ema_decay``);
            ``False``: the weights as trained.
    """

    name: ClassVar[str]
    description: ClassVar[str]
    trained: ClassVar[bool] = True
    needs_masks: ClassVar[bool] = False
    uses_timestep: ClassVar[bool] = False
    reconstructs_image: ClassVar[bool] = True
    default_noise: ClassVar[str] = "synomaly"
    manual_optimization: ClassVar[bool] = False
    ema: ClassVar[bool] = True

    def build(self, config: PipelineConfig) -> nn.Module:
        """The network of a model folder with ``config`` (randomly initialised)."""
        from synomaly.model import build_unet

        return build_unet(config.model)

    def loss(self, unet: nn.Module, schedule: DiffusionSchedule, noise: NoiseFn, x: Tensor, foreground: Tensor | None,
             target: Tensor | None, kind: str) -> Tensor:
        """The training loss of one batch (``kind``: ``TrainConfig.loss``)."""
        raise NotImplementedError(f"{self.name} has no training loss")

    def reconstruct(self, model: Network, schedule: DiffusionSchedule, images: Tensor, config: DetectConfig,
                    noise: NoiseFn, generator: torch.Generator | None = None) -> Tensor:
        """One stage's reconstruction of ``[B, 1, H, W]`` images in [-1, 1]."""
        raise NotImplementedError

    def reconstruct_weighted(self, model: Network, schedule: DiffusionSchedule, images: Tensor, config: DetectConfig,
                             noise: NoiseFn, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor | None]:
        """One stage's reconstruction and the weight its difference map is multiplied by (``None``: no weight).

        The detection map is ``|blur(x) - blur(x_hat)|``, times this weight where the method defines one
        (AutoDDPM: its first pass's perceptual-residual map, which the authors' final map multiplies in).
        """
        return self.reconstruct(model, schedule, images, config, noise, generator), None

    def cost(self, config: DetectConfig) -> int:
        """Network evaluations of one stage."""
        return 1

    def detect_defaults(self, noise: str, areas: dict[str, Any]) -> DetectConfig:
        """Detection settings stored in a new model folder (``areas``: ``min_size``, ``min_area`` in pixels)."""
        return DetectConfig(t=0, max_stages=1, threshold=0.1, **areas)

    def preview(self, unet: nn.Module, schedule: DiffusionSchedule, images: Tensor, noise: NoiseFn) -> tuple[Tensor, Tensor]:
        """The network's input and output for the training preview pictures, both in [-1, 1]."""
        zero = torch.zeros(images.shape[0], device=images.device, dtype=torch.long)
        return images, unet(images, zero).float()

    def check_training(self, config: TrainConfig) -> None:
        """Raise ``ConfigError`` for training settings the method cannot run with (checked before any data is read)."""

    def optimizers(self, network: nn.Module, config: TrainConfig) -> list[torch.optim.Optimizer]:
        """The optimisers of a ``manual_optimization`` method, in the order ``training_step`` receives them."""
        raise NotImplementedError(f"{self.name} trains with the default optimiser")

    def training_step(self, network: nn.Module, optimizers: Sequence[Any], step: int, planned: int, x: Tensor,
                      foreground: Tensor | None, backward: Backward) -> dict[str, Tensor]:
        """One optimiser update of a ``manual_optimization`` method at global ``step`` of a run ``planned`` steps long.

        Exactly one of ``optimizers`` steps (Lightning counts each step as one global step). Returns the
        logged values; ``loss`` (the minimised loss of this update) is checked for divergence.
        """
        raise NotImplementedError(f"{self.name} trains with the default optimiser")

    def image_score(self, network: nn.Module, images: Tensor, reconstructions: Tensor) -> Tensor | None:
        """An image-level anomaly score ``[B]`` of the method's own, or ``None``: the mask area.

        ``reconstructions`` are the last stage's, compared with the original ``images``.
        """
        return None

    def score_unit(self, size: int) -> str:
        """What the image score of a ``size`` px model is, in words (``detect``'s ``summary.json``)."""
        return f"mask pixels at the model's {size}x{size} input"


def timestep_zero(images: Tensor) -> Tensor:
    """The timestep input of the networks that do not denoise (fixed at 0)."""
    return torch.zeros(images.shape[0], device=images.device, dtype=torch.long)


def check_halvings(config: PipelineConfig, who: str) -> None:
    """Refuse an image size that ``len(channels)`` stride-2 levels cannot halve exactly (the VAE, f-AnoGAN).

    Raises:
        ConfigError: Naming ``model.image_size``; ``who`` starts the message (``"the vae"``).
    """
    from synomaly.errors import ConfigError

    levels = len(config.model.channels)
    if config.model.image_size % 2**levels:
        raise ConfigError("model.image_size", f"{who} halves the image {levels} times, so it needs a multiple of "
                                              f"{2**levels}, got {config.model.image_size}")
