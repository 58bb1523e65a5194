"""Preprocessing: intensity normalisation, fitting to the model size, foreground masks, presets.

Everything is batched over ``[N, H, W]`` stacks (numpy; the size functions also take torch
tensors and return the same type). The order used by :class:`Preprocessing` is
clip percentiles -> fit to ``size x size`` -> per-image min/max to [-1, 1] -> foreground mask.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import ndimage

from synomaly.errors import ConfigError

FIT_MODES = ("stretch", "letterbox", "center")
FOREGROUND_METHODS = ("none", "auto", "disk", "given")
NORMALIZATIONS = ("minmax", "fixed")

# Synomaly noise settings of docs/method.md §1, defined for 128 px images. Direction follows the
# modality's lesions: +1 bright (FLAIR), -1 dark (BUSI ultrasound, hypodense liver lesions).
MODALITY_PRESETS: dict[str, dict[str, Any]] = {
    "brain-flair": {
        "description": "brain MRI FLAIR (BraTS, LGG): bright lesions; the head found automatically, brains kept upright",
        "noise": {"sigma": 3.0, "threshold": 175.0, "offset": 0.5, "direction": 1},
        "reference_size": 128,
        # Chosen on lgg_flair validation Dice (docs/benchmarks.md, ablations): the head as foreground,
        # eroded by 8 px at 128 px (4 at 64) so the scalp rim stays out of the map, and left-right
        # flips only, which keep brains upright.
        "foreground": "auto",
        "foreground_erosion": 8,
        "flips": "horizontal",
    },
    "ultrasound": {
        "description": "B-mode ultrasound with dark (hypoechoic) lesions, e.g. BUSI",
        "noise": {"sigma": 7.0, "threshold": 150.0, "offset": 0.5, "direction": -1},
        "reference_size": 128,
        "foreground": "disk",
    },
    "carotid-ultrasound": {
        "description": "carotid ultrasound as in the paper (plaques brighter than the lumen)",
        "noise": {"sigma": 7.0, "threshold": 150.0, "offset": 0.5, "direction": 1},
        "reference_size": 128,
        "foreground": "disk",
    },
    "liver-ct": {
        "description": "liver CT (LiTS): dark lesions inside a given liver mask",
        "noise": {"sigma": 3.0, "threshold": 175.0, "offset": 1.0, "direction": -1},
        "reference_size": 128,
        "foreground": "given",
    },
}


def _preset(name: str) -> dict[str, Any]:
    """Look a preset up, listing the valid names when it is unknown."""
    if name not in MODALITY_PRESETS:
        raise ValueError(f"unknown preset {name!r}; valid presets: {', '.join(MODALITY_PRESETS)}")
    return MODALITY_PRESETS[name]


def preset_flips(preset: str) -> str:
    """The training flips of ``preset`` (``both`` unless the modality has an upright orientation)."""
    return _preset(preset).get("flips", "both")


def noise_params_for(preset: str, image_size: int) -> dict[str, Any]:
    """Synomaly noise parameters of ``preset`` for ``image_size`` px images.

    The blob size scales with the image, ``sigma = sigma_128 * image_size / 128``; threshold
    (on the 0..255 scale of the rescaled blurred field), offset and direction do not.

    Raises:
        ValueError: Unknown preset or a non-positive size.
    """
    entry = _preset(preset)
    if not isinstance(image_size, (int, np.integer)) or image_size <= 0:
        raise ValueError(f"image_size must be a positive integer, got {image_size!r}")
    params = copy.deepcopy(entry["noise"])
    params["sigma"] = params["sigma"] * image_size / entry["reference_size"]
    return params


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


@dataclass(frozen=True)
class FitInfo:
    """How :func:`fit_to_size` changed a stack, so :func:`restore_size` can undo it.

    Attributes:
        mode: One of ``FIT_MODES``.
        size: The square side the stack was fitted to.
        original_shape: ``(H, W)`` before fitting.
        pad: Rows/columns ``(top, bottom, left, right)`` added before resizing; negative values
            were cropped.
    """

    mode: str
    size: int
    original_shape: tuple[int, int]
    pad: tuple[int, int, int, int]

    @property
    def padded_shape(self) -> tuple[int, int]:
        """``(H, W)`` after padding/cropping, before resizing to ``size``."""
        top, bottom, left, right = self.pad
        return self.original_shape[0] + top + bottom, self.original_shape[1] + left + right

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FitInfo:
        """Inverse of :meth:`to_dict`."""
        return cls(data["mode"], int(data["size"]), tuple(data["original_shape"]), tuple(data["pad"]))


def _split(total: int) -> tuple[int, int]:
    """Split a pad (>0) or crop (<0) of ``total`` pixels between both sides, the extra one last."""
    first = total // 2 if total >= 0 else -(-total // 2)
    return first, total - first


def _fit_pad(shape: tuple[int, int], size: int, mode: str) -> tuple[int, int, int, int]:
    """The pad/crop of each side that ``mode`` applies before resizing."""
    h, w = shape
    if mode == "stretch":
        return 0, 0, 0, 0
    side_h, side_w = (max(h, w), max(h, w)) if mode == "letterbox" else (size, size)
    return (*_split(side_h - h), *_split(side_w - w))


def _pad_or_crop(x, pad: tuple[int, int, int, int], fill):
    """Pad (with ``fill``, one value per image ``[..., 1, 1]``) or crop the last two axes of a tensor."""
    top, bottom, left, right = pad
    h, w = x.shape[-2:]
    x = x[..., max(-top, 0): h - max(-bottom, 0), max(-left, 0): w - max(-right, 0)]
    if max(top, bottom, left, right) <= 0:
        return x
    h, w = x.shape[-2:]
    out_h, out_w = h + max(top, 0) + max(bottom, 0), w + max(left, 0) + max(right, 0)
    out = fill.expand(*x.shape[:-2], out_h, out_w).clone()
    out[..., max(top, 0): max(top, 0) + h, max(left, 0): max(left, 0) + w] = x
    return out


def _resize(x, shape: tuple[int, int], kind: str):
    """Resize the last two axes: area to shrink and bilinear to enlarge images, nearest for masks."""
    import torch.nn.functional as F

    if tuple(x.shape[-2:]) == tuple(shape):
        return x
    lead, (h, w) = x.shape[:-2], x.shape[-2:]
    flat = x.reshape(-1, 1, h, w)
    if kind == "mask":
        out = F.interpolate(flat.float(), size=shape, mode="nearest-exact") > 0.5
    else:
        if shape[0] < h or shape[1] < w:
            flat = F.interpolate(flat, size=(min(h, shape[0]), min(w, shape[1])), mode="area")
        out = flat if tuple(flat.shape[-2:]) == tuple(shape) else F.interpolate(
            flat, size=shape, mode="bilinear", align_corners=False)
    return out.reshape(*lead, *shape)


def _as_tensor(x, kind: str):
    """A torch view of ``x`` (bool for masks, float32 for images) and whether ``x`` was numpy."""
    import torch

    was_numpy = not isinstance(x, torch.Tensor)
    t = torch.from_numpy(np.ascontiguousarray(x)) if was_numpy else x
    return (t.bool() if kind == "mask" else t.float()), was_numpy


def _finish(out, source, was_numpy: bool):
    """Return ``out`` in the caller's type, never aliasing the caller's input."""
    if out.untyped_storage().data_ptr() == source.untyped_storage().data_ptr():
        out = out.clone()
    return out.numpy() if was_numpy else out


def _check_kind(kind: str) -> None:
    if kind not in ("image", "mask"):
        raise ValueError(f"kind must be 'image' or 'mask', got {kind!r}")


def fit_to_size(images, size: int, mode: str = "letterbox", kind: str = "image"):
    """Fit ``[N, H, W]`` images or masks to ``[N, size, size]``.

    Modes:
        - ``"stretch"``: resize straight to the square (changes the aspect ratio).
        - ``"letterbox"``: pad centrally to a square of side ``max(H, W)``, then resize; keeps the
          aspect ratio, and is exactly invertible when ``max(H, W) == size``.
        - ``"center"``: pad or crop centrally to ``size`` without resizing (cropped borders are lost).
    Images pad with each image's minimum and resize with area (shrink) / bilinear (enlarge)
    interpolation; masks pad with False and resize with nearest neighbour.

    Args:
        images: numpy array or torch tensor ``[N, H, W]``; the result has the same type.
        size: Output side in pixels.
        mode: One of ``FIT_MODES``.
        kind: ``"image"`` or ``"mask"``.

    Returns:
        The fitted stack (float32, or bool for masks) and the :class:`FitInfo` to undo it.
    """
    if mode not in FIT_MODES:
        raise ValueError(f"unknown fit mode {mode!r}; valid modes: {', '.join(FIT_MODES)}")
    _check_kind(kind)
    x, was_numpy = _as_tensor(images, kind)
    if x.ndim != 3:
        raise ValueError(f"expected [N, H, W] images, got shape {tuple(x.shape)}")
    shape = (int(x.shape[1]), int(x.shape[2]))
    info = FitInfo(mode, int(size), shape, _fit_pad(shape, size, mode))
    fill = x.new_zeros((x.shape[0], 1, 1)) if kind == "mask" else x.amin(dim=(1, 2), keepdim=True)
    out = _resize(_pad_or_crop(x, info.pad, fill), (size, size), kind)
    return _finish(out, x, was_numpy), info


def restore_size(maps, info: FitInfo, kind: str = "image"):
    """Undo :func:`fit_to_size`: ``[N, size, size]`` or ``[N, 1, size, size]`` maps back to ``[N, H, W]``.

    Resizes back to the padded shape, then removes the padding; regions that ``"center"`` cropped
    away come back as 0 (False for masks). Masks use nearest neighbour and come back as bool.

    Args:
        maps: numpy array or torch tensor; the result has the same type (and device).
        info: The :class:`FitInfo` returned by :func:`fit_to_size`.
        kind: ``"image"`` (float maps) or ``"mask"``.
    """
    _check_kind(kind)
    x, was_numpy = _as_tensor(maps, kind)
    if x.ndim == 4 and x.shape[1] == 1:
        x = x[:, 0]
    if x.ndim != 3 or tuple(x.shape[1:]) != (info.size, info.size):
        raise ValueError(f"expected [N, {info.size}, {info.size}] maps, got {tuple(maps.shape)}")
    resized = _resize(x, info.padded_shape, kind)
    out = _pad_or_crop(resized, tuple(-p for p in info.pad), x.new_zeros((x.shape[0], 1, 1)))
    return _finish(out, x, was_numpy)


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


@dataclass
class Preprocessing:
    """The preprocessing a model was trained with; stored in its ``config.json``.

    Attributes:
        clip: Clip each image to its ``clip_low``..``clip_high`` percentiles first (robust to a few
            extreme pixels in raw MRI/CT; the reference does not clip).
        clip_low: Lower percentile in [0, 100).
        clip_high: Upper percentile in (clip_low, 100].
        normalization: ``"minmax"``: each image by its own min/max to [-1, 1] (the reference's);
            ``"fixed"``: ``intensity_range`` to [-1, 1] for every image alike (keeps a per-volume
            normalisation done upstream).
        intensity_range: ``(low, high)`` raw intensities mapped to -1 and 1 by ``"fixed"``.
        size: Square model input side in pixels.
        fit: How non-matching sizes are fitted, one of ``FIT_MODES`` (see :func:`fit_to_size`).
        foreground: Region rule, one of ``FOREGROUND_METHODS``; ``"given"`` takes a mask passed
            to :meth:`apply` (e.g. a liver mask).
        foreground_erosion: Pixels (at the model size) by which the foreground is eroded at
            inference, e.g. to leave the scalp and skull rim of a head mask out of the anomaly map.
            Training (``synomaly train``) places blobs in the whole, uneroded foreground.
    """

    clip: bool = False
    clip_low: float = 0.5
    clip_high: float = 99.5
    normalization: str = "minmax"
    intensity_range: tuple[float, float] = (0.0, 255.0)
    size: int = 128
    fit: str = "letterbox"
    foreground: str = "none"
    foreground_erosion: int = 0

    def __post_init__(self) -> None:
        def fail(field_name: str, problem: str) -> None:
            raise ConfigError(f"preprocessing.{field_name}", problem)

        if not isinstance(self.clip, bool):
            fail("clip", f"must be true or false, got {self.clip!r}")
        for name in ("clip_low", "clip_high"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float, np.number)):
                fail(name, f"must be a number, got {value!r}")
        if not 0.0 <= self.clip_low < 100.0:
            fail("clip_low", f"must be in [0, 100), got {self.clip_low!r}")
        if not self.clip_low < self.clip_high <= 100.0:
            fail("clip_high", f"must be in (clip_low, 100], got {self.clip_high!r}")
        if self.normalization not in NORMALIZATIONS:
            fail("normalization", f"must be one of {', '.join(NORMALIZATIONS)}, got {self.normalization!r}")
        bounds = self.intensity_range
        if (not isinstance(bounds, (list, tuple)) or len(bounds) != 2
                or not all(isinstance(v, (int, float, np.number)) and not isinstance(v, bool) for v in bounds)
                or not np.isfinite(bounds).all() or not bounds[0] < bounds[1]):
            fail("intensity_range", f"must be two finite numbers [low, high] with low < high, got {bounds!r}")
        self.intensity_range = (float(bounds[0]), float(bounds[1]))
        if (isinstance(self.foreground_erosion, bool) or not isinstance(self.foreground_erosion, (int, np.integer))
                or not 0 <= self.foreground_erosion <= 64):
            fail("foreground_erosion", f"must be an integer number of pixels in [0, 64], got {self.foreground_erosion!r}")
        if isinstance(self.size, bool) or not isinstance(self.size, (int, np.integer)) or self.size < 1:
            fail("size", f"must be a positive integer, got {self.size!r}")
        if self.fit not in FIT_MODES:
            fail("fit", f"must be one of {', '.join(FIT_MODES)}, got {self.fit!r}")
        if self.foreground not in FOREGROUND_METHODS:
            fail("foreground", f"must be one of {', '.join(FOREGROUND_METHODS)}, got {self.foreground!r}")

    @classmethod
    def from_preset(cls, preset: str, size: int = 128, **overrides: Any) -> Preprocessing:
        """Preprocessing with the preset's foreground rule and erosion (scaled to ``size``); other fields default or overridden."""
        entry = _preset(preset)
        erosion = round(entry.get("foreground_erosion", 0) * size / entry["reference_size"])
        return cls(**{"size": size, "foreground": entry["foreground"], "foreground_erosion": erosion, **overrides})

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict of all fields."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Preprocessing:
        """Rebuild from :meth:`to_dict` output; unknown keys are refused with the valid ones listed."""
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(data) - set(names))
        if unknown:
            raise ConfigError(f"preprocessing.{unknown[0]}", f"unknown option; valid: {', '.join(names)}")
        return cls(**data)

    def apply(
        self, images: np.ndarray, region: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray, FitInfo]:
        """Turn raw ``[N, H, W]`` (or ``[H, W]``) slices into model input.

        Args:
            images: Raw intensities, e.g. from :func:`synomaly.io.read_images`.
            region: bool ``[N, H, W]`` foreground masks at the images' size (e.g. a head or liver
                mask); required when ``foreground == "given"``, and used instead of the computed
                rule whenever passed. The erosion applies to it too.

        Returns:
            float32 ``[N, 1, size, size]`` in [-1, 1] (``torch.from_numpy`` ready), bool
            ``[N, 1, size, size]`` foreground, and the :class:`FitInfo` to map outputs back.
        """
        x = np.asarray(images, dtype=np.float32)
        x = x[None] if x.ndim == 2 else x
        if self.clip:
            x = clip_percentiles(x, self.clip_low, self.clip_high)
        x, info = fit_to_size(x, self.size, self.fit)
        x = normalize_minmax(x) if self.normalization == "minmax" else normalize_fixed(x, *self.intensity_range)
        if region is not None:
            region = np.asarray(region, dtype=bool)
            region = region.reshape(-1, *region.shape[-2:])
            if region.shape != (len(x), *info.original_shape):
                raise ValueError(f"region mask shape {region.shape} does not match the images' "
                                 f"{(len(x), *info.original_shape)}")
            fg, _ = fit_to_size(region, self.size, self.fit, kind="mask")
        elif self.foreground == "given":
            raise ValueError("preprocessing.foreground is 'given' but no region mask was passed")
        else:
            fg = foreground_mask(x, self.foreground)
        fg = erode(fg, self.foreground_erosion)
        return np.ascontiguousarray(x[:, None]), np.ascontiguousarray(fg[:, None]), info
