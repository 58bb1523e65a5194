"""The preprocessing a model was trained with, as stored in its ``config.json``."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import numpy as np

from synomaly.errors import ConfigError
from synomaly.limits import MAX_IMAGE_SIZE
from synomaly.preprocess.foreground import FOREGROUND_METHODS, erode, foreground_mask
from synomaly.preprocess.geometry import FIT_MODES, FitInfo, fit_to_size
from synomaly.preprocess.intensity import clip_percentiles, normalize_fixed, normalize_minmax
from synomaly.preprocess.presets import preset_entry

NORMALIZATIONS = ("minmax", "fixed")


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
        if self.size > MAX_IMAGE_SIZE:
            fail("size", f"must be <= {MAX_IMAGE_SIZE} (the limit), got {self.size}")
        if self.fit not in FIT_MODES:
            fail("fit", f"must be one of {', '.join(FIT_MODES)}, got {self.fit!r}")
        if self.foreground not in FOREGROUND_METHODS:
            fail("foreground", f"must be one of {', '.join(FOREGROUND_METHODS)}, got {self.foreground!r}")

    @classmethod
    def from_preset(cls, preset: str, size: int = 128, **overrides: Any) -> Preprocessing:
        """Preprocessing with the preset's foreground rule and erosion (scaled to ``size``); other fields default or overridden."""
        entry = preset_entry(preset)
        erosion = round(entry.get("foreground_erosion", 0) * size / entry["reference_size"])
        return cls(**{"size": size, "foreground": entry["foreground"], "foreground_erosion": erosion, **overrides})

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict of all fields."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Preprocessing:
        """Rebuild from :meth:`to_dict` output (the config parser: unknown keys are refused with the valid ones listed)."""
        from synomaly.config import from_dict  # the config module imports this one

        return from_dict(cls, data, "preprocessing")

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
