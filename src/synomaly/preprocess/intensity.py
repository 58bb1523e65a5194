"""Intensity normalisation of ``[..., H, W]`` stacks, batched over images."""

from __future__ import annotations

import numpy as np


def normalize_minmax(images: np.ndarray) -> np.ndarray:
    """Rescale each image by its own min/max to [-1, 1] (the reference's normalisation).

    ``x' = 2 (x - min) / (max - min) - 1`` over the last two axes. A constant image has no range
    and maps to all -1 (the value of its minimum), never NaN.

    Args:
        images: ``[..., H, W]`` finite values.

    Returns:
        float32 array of the same shape in [-1, 1].
    """
    x = np.asarray(images, dtype=np.float32)
    low = x.min(axis=(-2, -1), keepdims=True)
    span = x.max(axis=(-2, -1), keepdims=True) - low
    scale = np.divide(2.0, span, out=np.zeros_like(span), where=span > 0)
    return np.clip((x - low) * scale - 1.0, -1.0, 1.0)


def normalize_fixed(images: np.ndarray, low: float, high: float) -> np.ndarray:
    """Map the fixed intensity range ``low..high`` to [-1, 1] for every image alike, clipping outside it.

    Keeps the relative brightness of slices that a data set normalised per volume (``lgg_flair``:
    each patient's 99.5th percentile is 255), which per-image min/max rescaling discards.
    """
    x = np.asarray(images, dtype=np.float32)
    return np.clip((x - low) * (2.0 / (high - low)) - 1.0, -1.0, 1.0)

def clip_percentiles(images: np.ndarray, low: float = 0.5, high: float = 99.5) -> np.ndarray:
    """Clip each image to its own ``low``..``high`` percentiles (linear interpolation, as numpy).

    Args:
        images: ``[..., H, W]`` finite values.
        low: Lower percentile in [0, 100).
        high: Upper percentile in (low, 100].

    Returns:
        float32 array of the same shape.
    """
    if not 0.0 <= low < high <= 100.0:
        raise ValueError(f"percentiles must satisfy 0 <= low < high <= 100, got {low}, {high}")
    x = np.asarray(images, dtype=np.float32)
    bounds = np.percentile(x, [low, high], axis=(-2, -1), keepdims=True).astype(np.float32)
    return np.clip(x, bounds[0], bounds[1])
