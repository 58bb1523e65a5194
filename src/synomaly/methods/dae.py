"""The denoising autoencoder baseline (Kascenas et al. 2022).

The network maps the image plus the training noise (coarse noise by default) back to the clean
image, timestep input fixed at 0; at inference one forward pass of the clean input reconstructs it.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from synomaly.config import DetectConfig
from synomaly.methods.base import Method, Network, NoiseFn, timestep_zero
from synomaly.schedule import DiffusionSchedule


class DAE(Method):
    name = "dae"
    description = "denoising autoencoder (Kascenas et al.): one forward pass of the input"
    default_noise = "coarse"

    def loss(self, unet: nn.Module, schedule: DiffusionSchedule, noise: NoiseFn, x: Tensor, foreground: Tensor | None,
             target: Tensor | None, kind: str) -> Tensor:
        return torch.nn.functional.mse_loss(unet(x + noise(x, foreground=foreground), timestep_zero(x)).float(), x)

    def reconstruct(self, model: Network, schedule: DiffusionSchedule, images: Tensor, config: DetectConfig,
                    noise: NoiseFn, generator: torch.Generator | None = None) -> Tensor:
        return model(images, timestep_zero(images)).to(images.dtype).clamp(-1.0, 1.0)

    def preview(self, unet: nn.Module, schedule: DiffusionSchedule, images: Tensor, noise: NoiseFn) -> tuple[Tensor, Tensor]:
        noised = images + noise(images)
        return noised, unet(noised, timestep_zero(images)).float()
