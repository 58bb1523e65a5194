"""Preprocessing: intensity normalisation, fitting to the model size, foreground masks, presets.

Everything is batched over ``[N, H, W]`` stacks (numpy; the size functions also take torch
tensors and return the same type). The order used by :class:`Preprocessing` is
clip percentiles -> fit to ``size x size`` -> per-image min/max to [-1, 1] -> foreground mask.
"""

from synomaly.preprocess.foreground import FOREGROUND_METHODS, erode, foreground_mask, otsu_thresholds
from synomaly.preprocess.geometry import FIT_MODES, FitInfo, fit_pixels, fit_to_size, restore_size
from synomaly.preprocess.intensity import clip_percentiles, normalize_fixed, normalize_minmax
from synomaly.preprocess.presets import MODALITY_PRESETS, noise_params_for, preset_entry, preset_flips
from synomaly.preprocess.settings import NORMALIZATIONS, Preprocessing

__all__ = [
    "FIT_MODES", "FOREGROUND_METHODS", "MODALITY_PRESETS", "NORMALIZATIONS", "FitInfo", "Preprocessing",
    "clip_percentiles", "erode", "fit_pixels", "fit_to_size", "foreground_mask", "noise_params_for", "normalize_fixed",
    "normalize_minmax", "otsu_thresholds", "preset_entry", "preset_flips", "restore_size",
]
