"""Warnings (not failures) about inputs that are probably wrong, one line per problem and input.

The checks look at what the model sees, the preprocessed ``[N, 1, S, S]`` slices in [-1, 1]:

- **blank**: a slice of one value (a constant image has nothing to detect, yet gets a mask);
- **squashed**: a few extreme pixels stretch min-max scaling so that the other 99% of pixels share a
  small part of the intensity scale (a hot pixel, a marker, metal);
- **unlike training**: the slices' intensity distribution (quantiles over each whole slice) lies farther
  from the training images' than :data:`FAR` times the distance 99% of training images stay within
  (another modality or contrast). The training statistics are recorded by ``synomaly train`` in
  ``config.json`` (``training.intensity``); folders written before them skip this check.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from synomaly.preprocess import Preprocessing

log = logging.getLogger(__name__)

QUANTILES = (1, 5, 10, 25, 50, 75, 90, 95, 99)  # percentiles of a slice's intensities compared with training
SQUASH = 0.25  # the 0.5th..99.5th percentiles of a squashed slice span less than this share of its range
FAR = 1.5  # times the 99th percentile of the training images' own distances to their typical slice
MIN_FAR = 0.15  # on the [-1, 1] scale: the distance below which no input is called unlike training
MAX_SAMPLE = 1024  # training slices summarised (evenly spaced), so large data sets cost no more
MAX_SAMPLE_PIXELS = 2**24  # and at most this many pixels of them (64 MiB as float32), whatever the image size


def _quantiles(flat: np.ndarray) -> np.ndarray:
    """``QUANTILES`` of each row of ``[N, P]`` slices, ``[N, len(QUANTILES)]``."""
    return np.percentile(flat, QUANTILES, axis=1).T


def _distance(quantiles: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Mean absolute difference of quantiles (a 1-D Wasserstein distance, on the [-1, 1] scale)."""
    return np.abs(quantiles - reference).mean(axis=1)


def intensity_statistics(images: Any, foreground: Any = None) -> dict[str, Any]:
    """Simple statistics of preprocessed training slices ``[N, 1, S, S]`` in [-1, 1], for ``config.json``.

    ``reference`` holds the median over slices of each of ``QUANTILES``; ``distance_p99`` the 99th
    percentile of the slices' distances to it; ``foreground_mean``/``foreground_std`` describe the
    intensities inside the foreground (the whole slice without one).
    """
    x = np.asarray(images, dtype=np.float32)
    count = min(len(x), MAX_SAMPLE, max(1, MAX_SAMPLE_PIXELS // max(1, x[0].size)))
    pick = np.unique(np.linspace(0, len(x) - 1, count).round().astype(int))
    flat = x[pick].reshape(len(pick), -1)
    quantiles = _quantiles(flat)
    reference = np.median(quantiles, axis=0)
    inside = flat if foreground is None else flat[np.asarray(foreground, dtype=bool)[pick].reshape(len(pick), -1)]
    inside = inside if inside.size else flat
    return {"quantiles": list(QUANTILES), "reference": np.round(reference, 4).tolist(),
            "distance_p99": round(float(np.percentile(_distance(quantiles, reference), 99)), 4),
            "foreground_mean": round(float(inside.mean()), 4), "foreground_std": round(float(inside.std()), 4),
            "slices": int(len(pick))}


def _which(count: int, total: int) -> str:
    """The subject of a warning: the image, or how many of its slices."""
    return "the image is" if total == 1 else f"{count} of {total} slices are"


def _recorded(training: dict[str, Any] | None) -> tuple[np.ndarray, float] | None:
    """The training quantiles and their ``distance_p99`` from ``config.json``'s training section; None when absent or unusable."""
    stats: Any = (training or {}).get("intensity")
    try:
        reference = np.asarray(stats["reference"], dtype=np.float64)
        within = float(stats["distance_p99"])
        ok = stats["quantiles"] == list(QUANTILES) and reference.shape == (len(QUANTILES),)
    except (TypeError, KeyError, ValueError):
        return None
    return (reference, within) if ok and np.isfinite(reference).all() and np.isfinite(within) else None


def input_warnings(images: np.ndarray, preprocessing: Preprocessing, training: dict[str, Any] | None) -> list[str]:
    """The problems of one input's preprocessed slices ``[N, 1, S, S]``, one phrase each (empty when none)."""
    flat = np.asarray(images, dtype=np.float32).reshape(len(images), -1)
    low, high = flat.min(axis=1), flat.max(axis=1)
    blank = high == low
    problems = []
    if blank.any():
        problems.append(f"{_which(int(blank.sum()), len(flat))} blank (one value throughout): there is nothing to "
                        "detect, and a mask found there means nothing")
    squashed = np.zeros(len(flat), dtype=bool)
    if preprocessing.normalization == "minmax" and not preprocessing.clip:
        bulk = np.percentile(flat, (0.5, 99.5), axis=1)
        share = (bulk[1] - bulk[0]) / np.maximum(high - low, 1e-12)
        squashed = ~blank & (share < SQUASH)
        if squashed.any():
            problems.append(f"{_which(int(squashed.sum()), len(flat))} dominated by a few extreme pixels: min-max scaling "
                            f"squashes the other 99% into {float(np.median(share[squashed])):.1%} of the intensity scale "
                            "(a hot pixel, a marker, metal?); results may mean nothing")
    recorded = _recorded(training)
    usable = ~blank & ~squashed
    if recorded is not None and usable.any():
        reference, within = recorded
        distance = float(np.median(_distance(_quantiles(flat[usable]), reference)))
        if distance > max(FAR * within, MIN_FAR):
            problems.append(f"intensities far from the training images' (distance {distance:.2f} on the [-1, 1] scale; "
                            f"99% of training slices are within {within:.2f}): another modality or contrast? results may "
                            "mean nothing")
    return problems


def warn_input(name: str, images: np.ndarray, preprocessing: Preprocessing, training: dict[str, Any] | None) -> None:
    """Log each problem :func:`input_warnings` finds in the input ``name`` as one warning line naming it."""
    for problem in input_warnings(images, preprocessing, training):
        log.warning("%s: %s", name, problem)
