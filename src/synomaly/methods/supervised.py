"""The supervised upper bound: a UNet trained on lesion masks (not unsupervised).

Its lesion probability ``p`` takes the place of the difference map: the "reconstruction" is
``x - p``, so ``|blur(x) - blur(x - p)| = blur(p)`` and thresholds, components and metrics apply
unchanged. It is not a counterfactual image.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from synomaly.config import DetectConfig
from synomaly.methods.base import Method, Network, NoiseFn, timestep_zero
from synomaly.schedule import DiffusionSchedule


class Supervised(Method):
    name = "supervised"
    description = "supervised UNet trained on lesion masks (the upper bound)"
    needs_masks = True
    reconstructs_image = False

    def loss(self, unet: nn.Module, schedule: DiffusionSchedule, noise: NoiseFn, x: Tensor, foreground: Tensor | None,
             target: Tensor | None, kind: str) -> Tensor:
        from monai.losses import DiceCELoss

        if target is None:
            raise ValueError("the supervised method needs lesion masks as the training target")
        return DiceCELoss(sigmoid=True)(unet(x, timestep_zero(x)).float(), target.float())

    def reconstruct(self, model: Network, schedule: DiffusionSchedule, images: Tensor, config: DetectConfig,
                    noise: NoiseFn, generator: torch.Generator | None = None) -> Tensor:
        return images - torch.sigmoid(model(images, timestep_zero(images)).to(images.dtype))

    def detect_defaults(self, noise: str, areas: dict[str, Any]) -> DetectConfig:
        return DetectConfig(t=0, max_stages=1, threshold=0.5, **areas)

    def preview(self, unet: nn.Module, schedule: DiffusionSchedule, images: Tensor, noise: NoiseFn) -> tuple[Tensor, Tensor]:
        """The input, and the lesion probability on [-1, 1]."""
        return images, torch.sigmoid(unet(images, timestep_zero(images)).float()) * 2 - 1
