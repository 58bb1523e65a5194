"""The intensity floor (Meissen et al. 2021): the preprocessed image itself is the anomaly map.

"Challenging current semi-supervised anomaly segmentation methods for brain MRI" showed that
thresholding FLAIR inside the brain beats most published unsupervised methods on BraTS, so every
method here is compared with it under the same foreground. No network and no training: the map is
``(x + 1) / 2`` for bright lesions (FLAIR) or ``(1 - x) / 2`` for dark ones (ultrasound), the lesion
direction of the modality preset (stored as the ``direction`` of the model folder's ``noise``
section). Blur, threshold, minimum component and foreground are calibrated and applied exactly as
for every other method, through a "reconstruction" ``x - direction * map``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from synomaly.config import DetectConfig, PipelineConfig
from synomaly.errors import ConfigError
from synomaly.methods.base import Method, Network, NoiseFn, timestep_zero
from synomaly.schedule import DiffusionSchedule


def intensity_map(images: Tensor, direction: int) -> Tensor:
    """``(x + 1) / 2`` (``direction=1``, bright lesions) or ``(1 - x) / 2`` (``-1``, dark) of images in [-1, 1]."""
    return (1.0 + direction * images) / 2.0


class SignedIntensity(nn.Module):
    """The "network" of the intensity method: ``direction * intensity_map(x) = (direction + x) / 2``; no parameters."""

    direction: Tensor  # a buffer: +1 or -1

    def __init__(self, direction: int) -> None:
        super().__init__()
        if direction not in (-1, 1):
            raise ValueError(f"direction must be 1 (bright lesions) or -1 (dark), got {direction!r}")
        self.register_buffer("direction", torch.tensor(float(direction)))

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        return (self.direction + x) / 2.0


class Intensity(Method):
    name = "intensity"
    description = "intensity threshold of the preprocessed image (Meissen et al.): the floor, no training"
    trained = False
    reconstructs_image = False

    def build(self, config: PipelineConfig) -> nn.Module:
        direction = config.noise.get("direction", 1)
        if isinstance(direction, (list, tuple)) and len(direction) == 1:
            direction = direction[0]
        if direction not in (-1, 1):
            raise ConfigError("noise.direction", f"the intensity method needs one lesion direction, 1 (bright) or -1 "
                                                 f"(dark), got {direction!r}")
        return SignedIntensity(int(direction))

    def reconstruct(self, model: Network, schedule: DiffusionSchedule, images: Tensor, config: DetectConfig,
                    noise: NoiseFn, generator: torch.Generator | None = None) -> Tensor:
        return images - model(images, timestep_zero(images)).to(images.dtype)

    def cost(self, config: DetectConfig) -> int:
        return 0

    def detect_defaults(self, noise: str, areas: dict[str, Any]) -> DetectConfig:
        return DetectConfig(t=0, max_stages=1, threshold=0.6, **areas)
