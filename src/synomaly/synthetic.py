"""Synthetic head phantoms with inserted bright lesions, for smoke tests and examples.

Not anatomy: an elliptical "head" with a bright rim, textured tissue and two dark "ventricles".
Everything is drawn in one batched pass from an explicit ``torch.Generator``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from synomaly._filters import gaussian_blur


def _grid(n: int, size: int) -> tuple[Tensor, Tensor]:
    coords = (torch.arange(size, dtype=torch.float32) + 0.5) / size * 2 - 1
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")
    return yy.expand(n, 1, size, size), xx.expand(n, 1, size, size)


def _uniform(n: int, low: float, high: float, generator: torch.Generator | None) -> Tensor:
    return (low + (high - low) * torch.rand(n, 1, 1, 1, generator=generator))


def healthy_phantoms(n: int, size: int = 32, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """``n`` healthy phantoms ``[n, 1, size, size]`` in [-1, 1] and their head masks (bool)."""
    yy, xx = _grid(n, size)
    cy, cx = _uniform(n, -0.06, 0.06, generator), _uniform(n, -0.06, 0.06, generator)
    ry, rx = _uniform(n, 0.78, 0.9, generator), _uniform(n, 0.64, 0.76, generator)
    r = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2
    head, brain = r <= 1.0, r <= 0.72
    texture = gaussian_blur(torch.randn(n, 1, size, size, generator=generator), size / 16)
    texture = texture / texture.flatten(1).std(1).reshape(-1, 1, 1, 1)
    vent_w = _uniform(n, 0.08, 0.14, generator)
    ventricles = ((((yy - cy) / 0.25) ** 2 + ((xx - cx).abs() - 0.13) ** 2 / vent_w**2) <= 1.0) & brain
    images = torch.full((n, 1, size, size), -1.0)
    images = torch.where(head, torch.full_like(images, 0.5), images)  # skull rim
    images = torch.where(brain, -0.15 + 0.12 * texture, images)
    images = torch.where(ventricles, torch.full_like(images, -0.6), images)
    return images.clamp(-1, 1), head


def insert_lesions(
    images: Tensor,
    head: Tensor,
    generator: torch.Generator | None = None,
    radius: tuple[float, float] = (0.15, 0.28),
    intensity: tuple[float, float] = (0.55, 0.85),
) -> tuple[Tensor, Tensor]:
    """Add one bright elliptical lesion per image inside the head's tissue.

    Args:
        images: Healthy phantoms from ``healthy_phantoms``.
        head: Their head masks.
        generator: Source of randomness.
        radius: Range of lesion radii as a fraction of the half image size.
        intensity: Range of the lesion's brightness above the tissue.

    Returns:
        Images with lesions (clamped to [-1, 1]) and the lesion masks (bool).
    """
    n, size = images.shape[0], images.shape[-1]
    yy, xx = _grid(n, size)
    angle = _uniform(n, 0, 2 * torch.pi, generator)
    dist = _uniform(n, 0.1, 0.35, generator)
    cy, cx = dist * torch.sin(angle), dist * torch.cos(angle)
    ry, rx = _uniform(n, *radius, generator), _uniform(n, *radius, generator)
    lesion = ((((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2) <= 1.0) & head
    amplitude = _uniform(n, *intensity, generator)
    smooth = gaussian_blur(lesion.float(), 0.6)
    return (images + amplitude * smooth).clamp(-1, 1), lesion
