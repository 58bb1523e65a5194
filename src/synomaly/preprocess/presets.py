"""Modality presets: Synomaly noise settings, foreground rule and training flips per modality."""

from __future__ import annotations

import copy
from typing import Any

import numpy as np

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
        "description": "B-mode ultrasound with dark (hypoechoic) lesions, e.g. BUSI; images kept upright",
        "noise": {"sigma": 7.0, "threshold": 150.0, "offset": 0.5, "direction": -1},
        "reference_size": 128,
        "foreground": "disk",
        # Chosen on busi validation Dice (docs/benchmarks.md, ablations): left-right flips only; the probe
        # stays at the top, so depth keeps its direction (near-field speckle above, shadows below).
        "flips": "horizontal",
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


def preset_entry(name: str) -> dict[str, Any]:
    """Look a preset up, listing the valid names when it is unknown."""
    if name not in MODALITY_PRESETS:
        raise ValueError(f"unknown preset {name!r}; valid presets: {', '.join(MODALITY_PRESETS)}")
    return MODALITY_PRESETS[name]


def preset_flips(preset: str) -> str:
    """The training flips of ``preset`` (``both`` unless the modality has an upright orientation)."""
    return preset_entry(preset).get("flips", "both")


def noise_params_for(preset: str, image_size: int) -> dict[str, Any]:
    """Synomaly noise parameters of ``preset`` for ``image_size`` px images.

    The blob size scales with the image, ``sigma = sigma_128 * image_size / 128``; threshold
    (on the 0..255 scale of the rescaled blurred field), offset and direction do not.

    Raises:
        ValueError: Unknown preset or a non-positive size.
    """
    entry = preset_entry(preset)
    if not isinstance(image_size, (int, np.integer)) or image_size <= 0:
        raise ValueError(f"image_size must be a positive integer, got {image_size!r}")
    params = copy.deepcopy(entry["noise"])
    params["sigma"] = params["sigma"] * image_size / entry["reference_size"]
    return params
