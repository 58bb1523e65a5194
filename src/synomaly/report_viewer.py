"""The report's volume viewer: the kept volumes (``volumes.npz``) as sprite sheets, and their lesion tables.

Each layer of a volume (input, reconstruction, anomaly map, and the overlays: predicted mask,
reference outline, foreground outline, map above the threshold) is one PNG with the slices tiled
in a grid, embedded in the page as a ``data:`` URI; the page's script draws the chosen slice of
each layer on canvases (:file:`templates/report.html.j2`). Gray layers are 8-bit gray PNGs and the
map layers palette PNGs in the colours of :data:`synomaly.figures.MAP_CMAP`, which keeps the page
small. The lesions are the 3-D connected components of the predicted mask over the volume's
stored slices (:func:`synomaly.lesions.volume_lesions`), in model pixels.
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

from synomaly.errors import InputError
from synomaly.figures import FOREGROUND_CSS, PRED_COLOR, TRUTH_COLOR, format_value, map_levels, map_lut, png_data_uri
from synomaly.lesions import volume_lesions

_PER_SLICE = ("case_id", "volume", "slice", "image", "reconstruction", "anomaly_map", "mask", "target", "foreground")
_FILL_ALPHA = 0.45  # as overlay_rgb's prediction fill
_HEAT_ALPHA = 0.6  # the map over the input, where it reaches the threshold
MAX_LESION_ROWS = 40
_PANEL_PX = 200  # the panels' width on the page (CSS pixels)


def check_volumes(path: Path, volumes: Mapping[str, np.ndarray]) -> None:
    """Refuse a ``volumes.npz`` whose arrays do not fit together (one line naming the file)."""
    missing = [key for key in ("volume_id", *_PER_SLICE) if key not in volumes]
    if missing:
        raise InputError(path, f"lacks the arrays {', '.join(missing)}")
    shape = volumes["image"].shape
    if len(shape) != 3 or any(volumes[key].shape != shape for key in _PER_SLICE[3:]):
        raise InputError(path, "image arrays must all be [M, H, W]; got "
                               + ", ".join(f"{key} {list(volumes[key].shape)}" for key in _PER_SLICE[3:]))
    if any(volumes[key].shape != shape[:1] for key in _PER_SLICE[:3]):
        raise InputError(path, f"case_id, volume and slice must be [{shape[0]}] each")
    kinds = {**dict.fromkeys(_PER_SLICE[3:6], "biuf"), **dict.fromkeys(_PER_SLICE[6:], "bui"), "volume": "iu", "slice": "iu",
             "case_id": "U", "volume_id": "U"}
    wrong = [f"{key} ({volumes[key].dtype})" for key, allowed in kinds.items() if volumes[key].dtype.kind not in allowed]
    if wrong or volumes["volume_id"].ndim != 1:
        raise InputError(path, f"arrays of the wrong type: {', '.join(wrong) or 'volume_id is not 1-D'}")
    index = volumes["volume"]
    if (len(index) and (index.min() < 0 or index.max() >= len(volumes["volume_id"]))):
        raise InputError(path, f"volume must index volume_id (0 to {len(volumes['volume_id']) - 1})")


def viewer_entries(volumes: Mapping[str, np.ndarray], top: float, threshold: float | None,
                   connectivity: int = 1) -> list[dict[str, Any]]:
    """One entry per kept volume: its sprites, slice captions, lesion rows and summary, for the template.

    Args:
        volumes: What :func:`synomaly._evaluation_io.read_volumes` returns (checked by :func:`check_volumes`).
        top: Top of the map's colour scale (:func:`synomaly.figures.map_scale`).
        threshold: The detection threshold (the map-over-input layer starts there), if known.
        connectivity: 1 (faces) to 3 of the 3-D lesion components.
    """
    entries = []
    for v, volume_id in enumerate(volumes["volume_id"]):
        rows = np.flatnonzero(volumes["volume"] == v)
        if len(rows):
            stack = {key: volumes[key][rows] for key in _PER_SLICE}
            entries.append(_entry(str(volume_id), v, stack, top, threshold, connectivity))
    return entries


def _entry(volume_id: str, index: int, stack: Mapping[str, np.ndarray], top: float, threshold: float | None,
           connectivity: int) -> dict[str, Any]:
    mask, target = stack["mask"].astype(bool), stack["target"].astype(bool)
    count, height, width = mask.shape
    cols = math.ceil(math.sqrt(count))
    reference, predicted = target.sum(axis=(1, 2)), mask.sum(axis=(1, 2))
    numbers = [int(n) for n in stack["slice"]]
    lesions = volume_lesions(mask, stack["anomaly_map"], np.eye(4), connectivity)
    pooled = 2.0 * float((mask & target).sum()) / max(int(mask.sum() + target.sum()), 1)
    first = int(np.argmax(reference)) if reference.any() else int(np.argmax(predicted)) if predicted.any() else count // 2
    return {
        "id": volume_id,
        "dom_id": f"volume-{index}",
        "slices": count,
        "start": first,
        "canvas": max(height, width) * math.ceil(_PANEL_PX / max(height, width)),  # a whole multiple of the slice
        "layers": _layers(stack, top, threshold, cols),
        "data": {"cols": cols, "height": height, "width": width, "numbers": numbers,
                 "cases": [str(c) for c in stack["case_id"]], "reference": reference.tolist(),
                 "predicted": predicted.tolist()},
        "summary": [f"{count} slices ({numbers[0]} to {numbers[-1]})",
                    f"reference lesion {int(reference.sum())} px in {int((reference > 0).sum())} slices" if reference.any()
                    else "no reference lesion",
                    f"predicted {int(predicted.sum())} px, {len(lesions)} lesion{'s' if len(lesions) != 1 else ''}",
                    *([f"Dice {format_value(pooled)} (pixels of these slices pooled)"] if target.any() else [])],
        "lesions": [_lesion_row(row, numbers) for row in lesions[:MAX_LESION_ROWS]],
        "hidden_lesions": max(len(lesions) - MAX_LESION_ROWS, 0),
        "has_foreground": not stack["foreground"].all(),
    }


def _lesion_row(row: Mapping[str, Any], numbers: list[int]) -> dict[str, Any]:
    """A lesion of :func:`volume_lesions` (identity affine: ``x_mm`` is the centroid's slice position)."""
    first, last = row["i0"], row["i1"] - 1
    central = int(np.clip(round(row["x_mm"]), first, last))
    span = str(numbers[first]) if first == last else f"{numbers[first]}\u2013{numbers[last]}"
    return {"lesion": row["lesion"], "voxels": row["voxels"], "slices": span, "central": central,
            "central_number": numbers[central], "first": first, "last": last,
            "map_max": format_value(float(row["map_max"])), "map_mean": format_value(float(row["map_mean"]))}


def _layers(stack: Mapping[str, np.ndarray], top: float, threshold: float | None, cols: int) -> dict[str, str]:
    """The sprite sheet of each layer as a PNG ``data:`` URI."""
    gray = {key: np.rint((np.clip(stack[key], -1, 1) + 1) * 127.5).astype(np.uint8) for key in ("image", "reconstruction")}
    levels = map_levels(stack["anomaly_map"], top)
    lut = map_lut()
    start = 0 if threshold is None else int(np.clip(math.ceil(threshold / top * 255), 0, 255))
    heat_alpha = np.where(np.arange(256) >= max(start, 1), round(255 * _HEAT_ALPHA), 0)
    green = tuple(int(FOREGROUND_CSS[i : i + 2], 16) for i in (1, 3, 5))
    return {
        "image": _sprite(gray["image"], cols),
        "reconstruction": _sprite(gray["reconstruction"], cols),
        "map": _sprite(levels, cols, lut),
        "heat": _sprite(levels, cols, lut, heat_alpha),
        "mask": _sprite(stack["mask"].astype(np.uint8), cols, [(0, 0, 0), PRED_COLOR], [0, round(255 * _FILL_ALPHA)]),
        "target": _sprite(_outline(stack["target"]), cols, [(0, 0, 0), TRUTH_COLOR], [0, 255]),
        "foreground": _sprite(_outline(stack["foreground"]), cols, [(0, 0, 0), green], [0, 220]),
    }


def _outline(masks: np.ndarray) -> np.ndarray:
    """The in-plane border of each slice's mask (pixels removed by one erosion within the slice), as 0/1."""
    masks = masks.astype(bool)
    plane = np.zeros((3, 3, 3), dtype=bool)
    plane[1] = ndimage.generate_binary_structure(2, 1)
    return (masks & ~ndimage.binary_erosion(masks, structure=plane, border_value=0)).astype(np.uint8)


def _sprite(slices: np.ndarray, cols: int, palette: Any = None, alpha: Any = None) -> str:
    """``[K, H, W]`` uint8 slices tiled ``cols`` to a row as a PNG ``data:`` URI: gray, or palette
    indices (``palette``: RGB rows; ``alpha``: the opacity of each index, 0 to 255)."""
    from PIL import Image

    count, height, width = slices.shape
    rows = math.ceil(count / cols)
    tiles = np.zeros((rows * cols, height, width), dtype=np.uint8)
    tiles[:count] = slices
    sheet = tiles.reshape(rows, cols, height, width).transpose(0, 2, 1, 3).reshape(rows * height, cols * width)
    image = Image.frombytes("L" if palette is None else "P", sheet.shape[::-1], np.ascontiguousarray(sheet).tobytes())
    extra: dict[str, Any] = {}
    if palette is not None:
        image.putpalette(np.asarray(palette, dtype=np.uint8).ravel().tolist())
        if alpha is not None:
            extra["transparency"] = bytes(int(a) for a in alpha)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=True, **extra)
    return png_data_uri(buffer.getvalue())
