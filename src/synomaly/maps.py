"""Anomaly maps and masks from an image and its reconstruction (docs/method.md §4)."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from synomaly._filters import opencv_kernel1d, separable_filter


def blur(images: Tensor, kernel: int) -> Tensor:
    """OpenCV ``GaussianBlur(img, (k, k), 0)`` on ``[B, C, H, W]`` images, reflect-101 borders."""
    return separable_filter(images, opencv_kernel1d(kernel, device=images.device, dtype=images.dtype))


def difference_map(images: Tensor, reconstructions: Tensor, kernel: int, weight: Tensor | None = None) -> Tensor:
    """``d = |blur(x_0) - blur(x0_hat)|``, one blur call for both; times ``weight`` when a method gives one (AutoDDPM)."""
    both = blur(torch.cat([images, reconstructions]), kernel)
    original, recon = both.chunk(2)
    diff = (original - recon).abs()
    return diff if weight is None else diff * weight


def above_threshold(diff: Tensor, threshold: float | Tensor) -> Tensor:
    """docs/method.md §4: ``d = 0`` where ``d < tau``, then ``m = d > 0`` (so ``tau = 0`` still excludes exact zeros).

    ``threshold`` may be a tensor of several thresholds that broadcasts against ``diff``.
    """
    return (diff >= threshold) & (diff > 0)


def remove_small_components(masks: Tensor, min_size: int, connectivity: int = 1) -> tuple[Tensor, np.ndarray]:
    """Drop connected components of fewer than ``min_size`` pixels from ``[B, 1, H, W]`` masks.

    One batched ``scipy.ndimage.label`` call labels every image at once (the structuring element
    does not connect across the batch axis). Components follow scikit-image's
    ``remove_small_objects`` connectivity: 1 is the 4-neighbourhood, 2 the 8-neighbourhood.

    Returns:
        The cleaned masks on the input's device and the remaining pixel count per image
        (a NumPy array on the host, which the multi-stage loop uses without another transfer).
    """
    from scipy import ndimage

    if min_size <= 1:
        masks = masks.bool()
        return masks, masks.flatten(1).sum(1).cpu().numpy()
    host = masks.detach().to("cpu", torch.bool).numpy()
    structure = np.zeros((3, 3, 3, 3), dtype=bool)
    structure[1, 1] = ndimage.generate_binary_structure(2, connectivity)
    labels, _ = ndimage.label(host, structure=structure)
    sizes = np.bincount(labels.ravel())
    keep = sizes >= min_size
    keep[0] = False
    cleaned = keep[labels]
    return torch.from_numpy(cleaned).to(masks.device, non_blocking=True), cleaned.reshape(len(cleaned), -1).sum(1)
