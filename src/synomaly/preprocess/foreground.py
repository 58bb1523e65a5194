"""Foreground masks: where Synomaly blobs may go and where the anomaly map counts."""

from __future__ import annotations

import numpy as np
from scipy import ndimage

FOREGROUND_METHODS = ("none", "auto", "disk", "given")


def erode(mask: np.ndarray, pixels: int) -> np.ndarray:
    """Erode each ``[N, H, W]`` mask by ``pixels`` (4-neighbourhood steps); a mask that would vanish is kept whole.

    The image border does not erode (``border_value=1``): a head cut by the field of view keeps its cut edge.
    """
    mask = np.asarray(mask, dtype=bool)
    if pixels <= 0:
        return mask.copy()
    structure = np.zeros((3, 3, 3), dtype=bool)
    structure[1] = ndimage.generate_binary_structure(2, 1)
    eroded = ndimage.binary_erosion(mask, structure=structure, iterations=pixels, border_value=1)
    empty = ~eroded.any(axis=(-2, -1))
    eroded[empty] = mask[empty]
    return eroded

def otsu_thresholds(images: np.ndarray, bins: int = 256) -> np.ndarray:
    """Otsu's threshold of each image, from a ``bins``-bin histogram over its own min..max.

    Maximises the between-class variance ``w0 w1 (mu0 - mu1)^2`` (Otsu 1979), as
    ``skimage.filters.threshold_otsu`` does for float images, for the whole batch at once.
    Foreground is ``image > threshold``.

    Returns:
        ``[N]`` thresholds (a constant image gets its own value, so it has no foreground).
    """
    x = np.asarray(images, dtype=np.float64).reshape(len(images), -1)
    low, high = x.min(axis=1, keepdims=True), x.max(axis=1, keepdims=True)
    width = np.where(high > low, (high - low) / bins, 1.0)
    index = np.clip(((x - low) / width).astype(np.int64), 0, bins - 1)
    offsets = np.arange(len(x))[:, None] * bins
    counts = np.bincount((index + offsets).ravel(), minlength=len(x) * bins).reshape(len(x), bins)
    centers = low + (np.arange(bins) + 0.5) * width
    weight0 = np.cumsum(counts, axis=1)[:, :-1]
    weight1 = counts.sum(axis=1, keepdims=True) - weight0
    mass0 = np.cumsum(counts * centers, axis=1)[:, :-1]
    mass1 = (counts * centers).sum(axis=1, keepdims=True) - mass0
    with np.errstate(divide="ignore", invalid="ignore"):
        between = weight0 * weight1 * (mass0 / weight0 - mass1 / weight1) ** 2
    best = np.nan_to_num(between, nan=-1.0).argmax(axis=1)
    return np.where(high[:, 0] > low[:, 0], centers[np.arange(len(x)), best], high[:, 0])


def _largest_components(mask: np.ndarray, structure: np.ndarray) -> np.ndarray:
    """Keep the largest connected component of each image of a ``[N, H, W]`` mask (one label call)."""
    labels, count = ndimage.label(mask, structure=structure)
    if count == 0:
        return mask
    sizes = np.bincount(labels.ravel(), minlength=count + 1)
    owner = np.zeros(count + 1, dtype=np.int64)
    owner[labels.reshape(len(mask), -1)] = np.arange(len(mask))[:, None]
    # Sort labels by (image, size); the last label of each image is its largest component.
    order = np.lexsort((sizes[1:], owner[1:])) + 1
    is_last = np.r_[owner[order][1:] != owner[order][:-1], True]
    keep = np.zeros(count + 1, dtype=bool)
    keep[order[is_last]] = True
    return keep[labels]


def _disk(shape: tuple[int, int], radius_ratio: float) -> np.ndarray:
    """Central disk of radius ``min(H, W) / radius_ratio`` (the paper's ultrasound region: 2.2)."""
    h, w = shape
    rows, cols = np.ogrid[:h, :w]
    radius = min(h, w) / radius_ratio
    return (rows - (h - 1) / 2) ** 2 + (cols - (w - 1) / 2) ** 2 <= radius**2


def foreground_mask(
    images: np.ndarray,
    method: str = "auto",
    *,
    threshold: float | str = 0.1,
    radius_ratio: float = 2.2,
) -> np.ndarray:
    """Where Synomaly blobs may go: the organ / field of view of each image.

    Methods:
        - ``"auto"``: ``image > min + threshold * (max - min)`` per image (or Otsu's threshold when
          ``threshold="otsu"``), holes filled, largest component kept. An image with no
          foreground (e.g. constant) gets a full mask, so it is not silently excluded. The default
          0.1 suits scans with a dark background: on the LGG FLAIR test slices it matches the
          curated head masks with median Dice 0.99, where Otsu (which splits dim from bright
          tissue) reaches 0.79.
        - ``"disk"``: central disk of radius ``min(H, W) / radius_ratio``.
        - ``"none"``: everything.

    Args:
        images: ``[N, H, W]`` finite values.

    Returns:
        bool ``[N, H, W]``.
    """
    x = np.asarray(images, dtype=np.float32)
    if method == "none":
        return np.ones(x.shape, dtype=bool)
    if method == "disk":
        return np.broadcast_to(_disk(x.shape[-2:], radius_ratio), x.shape).copy()
    if method != "auto":
        raise ValueError(f"unknown foreground method {method!r}; valid: auto, disk, none")
    if threshold == "otsu":
        cut = otsu_thresholds(x)[:, None, None]
    elif isinstance(threshold, (int, float)) and 0.0 <= threshold < 1.0:
        low, high = x.min(axis=(1, 2), keepdims=True), x.max(axis=(1, 2), keepdims=True)
        cut = low + threshold * (high - low)
    else:
        raise ValueError(f"threshold must be a fraction in [0, 1) or 'otsu', got {threshold!r}")
    # No connectivity along the batch axis: each image is labelled and filled on its own.
    structure = np.zeros((3, 3, 3), dtype=bool)
    structure[1] = ndimage.generate_binary_structure(2, 1)
    mask = ndimage.binary_fill_holes(x > cut, structure=structure)
    mask = _largest_components(mask, structure)
    empty = ~mask.any(axis=(1, 2))
    mask[empty] = True
    return mask
