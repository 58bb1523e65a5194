"""Pictures of detection results: mask overlays, PNG files and the HTML report's matplotlib figures.

Report figures are drawn on matplotlib ``Figure`` objects with an explicit Agg canvas rather than
through ``pyplot``: no global backend is switched in the caller's process and no figure is registered
anywhere, so each one is freed as soon as its PNG is written. Each is returned as a ``data:`` URI to
embed in the page.
"""

from __future__ import annotations

import base64
import io
import math
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
from scipy import ndimage

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = ["MAP_CMAP", "MAP_UNIT", "NOT_AVAILABLE", "PRED_COLOR", "TRUTH_COLOR", "case_figure", "colorbar_figure",
           "curves_figure", "detection_png", "format_value", "gray_rgb", "heat_rgb", "map_lut", "map_scale", "overlay_rgb",
           "stage_figure"]

PRED_COLOR: tuple[int, int, int] = (230, 60, 40)
"""Fill colour of the predicted mask in overlays (red)."""
TRUTH_COLOR: tuple[int, int, int] = (0, 220, 255)
"""Outline colour of the ground truth in overlays (cyan: distinct from the red fill and from gray)."""
FOREGROUND_CSS = "#7cfc00"  # the foreground outline: green, apart from the red prediction and cyan truth
MAP_CMAP = "inferno"
"""Colour map of anomaly maps, in the report and in ``detect``'s ``overlay.png``."""
MAP_UNIT = "|blur(input) - blur(reconstruction)| on the model's [-1, 1] intensity scale"
"""What an anomaly map value is (:class:`synomaly.detect.DetectionOutput`): 0 to 2."""
MAP_SCALE_FLOOR = 0.5
"""Top of the anomaly map's colour scale unless the detection threshold asks for more (:func:`map_scale`)."""
NOT_AVAILABLE = "n/a"
"""Shown for a missing or undefined value."""

_DPI = 90
_CASE_PANEL = 2.0  # inches per image panel in a case row (180 px at 90 dpi)
_STRIP_PANEL = 1.75  # smaller in stage strips, so six panels fit the page width


def format_value(value: Any, digits: int = 3) -> str:
    """A metric for display: floats to ``digits`` decimals, missing or undefined (None, NaN) as n/a."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return NOT_AVAILABLE
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


# ---------------------------------------------------------------- RGB arrays and PNG files


def overlay_rgb(
    image: np.ndarray,
    mask: np.ndarray,
    target: np.ndarray,
    *,
    alpha: float = 0.45,
    value_range: tuple[float, float] = (-1.0, 1.0),
    outline_width: int = 1,
) -> np.ndarray:
    """Render a predicted mask (filled, semi-transparent) and the ground-truth outline over a gray image.

    The outline is the set of target pixels removed by ``outline_width`` binary erosions (pixels on
    the image border count as outline), drawn opaque on top of the fill so both stay visible where
    they overlap.

    Args:
        image: Gray image ``[H, W]``.
        mask: Predicted mask ``[H, W]`` (bool or 0/1).
        target: Ground-truth mask ``[H, W]``.
        alpha: Opacity of the prediction fill.
        value_range: Image values shown as black and white; values outside are clipped.
        outline_width: Outline thickness in pixels, inside the target.

    Returns:
        ``uint8 [H, W, 3]`` RGB image.
    """
    image = np.asarray(image, dtype=np.float64)
    mask, target = np.asarray(mask, dtype=bool), np.asarray(target, dtype=bool)
    if image.ndim != 2 or mask.shape != image.shape or target.shape != image.shape:
        raise ValueError(f"image, mask and target must share one 2-D shape, got {image.shape}, {mask.shape}, "
                         f"{target.shape}")
    low, high = value_range
    gray = np.clip((image - low) / (high - low), 0.0, 1.0) * 255.0
    rgb = np.repeat(gray[..., None], 3, axis=-1)
    rgb[mask] = (1.0 - alpha) * rgb[mask] + alpha * np.asarray(PRED_COLOR, dtype=np.float64)
    outline = target & ~ndimage.binary_erosion(target, iterations=outline_width, border_value=0)
    rgb[outline] = TRUTH_COLOR
    return np.rint(rgb).astype(np.uint8)


def gray_rgb(image: np.ndarray) -> np.ndarray:
    """An image on the ``[-1, 1]`` scale as ``uint8 [H, W, 3]`` gray, clipped outside it."""
    gray = ((np.clip(image, -1, 1) + 1) * 127.5).round().astype(np.uint8)
    return np.repeat(gray[..., None], 3, axis=-1)


def map_scale(threshold: float | None) -> float:
    """Top of the anomaly map's colour scale (its bottom is 0): one rule for every picture of a map.

    :data:`MAP_SCALE_FLOOR` (0.5), or twice the detection threshold where that is higher, so the
    threshold always sits in the lower half of the scale and the flagged values keep colours of
    their own; never beyond 2, the largest possible value. Higher values take the top colour.
    """
    return float(min(max(MAP_SCALE_FLOOR, 2.0 * (threshold or 0.0)), 2.0))


def map_lut() -> np.ndarray:
    """The 256 colours of :data:`MAP_CMAP` as ``uint8 [256, 3]``; level ``i`` shows ``i / 255`` of the scale."""
    from matplotlib import colormaps

    return (colormaps[MAP_CMAP](np.arange(256))[:, :3] * 255).round().astype(np.uint8)


def map_levels(amap: np.ndarray, top: float) -> np.ndarray:
    """Anomaly map values as ``uint8`` levels of the colour scale ``0 .. top`` (values beyond it clipped)."""
    return np.rint(np.clip(np.asarray(amap, dtype=np.float64) / top, 0.0, 1.0) * 255).astype(np.uint8)


def heat_rgb(amap: np.ndarray, top: float) -> np.ndarray:
    """An anomaly map as ``uint8 [H, W, 3]`` in :data:`MAP_CMAP` from 0 to ``top`` (:func:`map_scale`)."""
    return map_lut()[map_levels(amap, top)]


# ---------------------------------------------------------------- matplotlib figures


def _new_figure(width: float, height: float) -> Figure:
    """A figure on its own Agg canvas (matplotlib is imported here because importing it is slow)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=_DPI)
    FigureCanvasAgg(figure)
    return figure


def _png_bytes(figure: Figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=_DPI, metadata={"Software": None})
    return buffer.getvalue()


def _to_data_uri(figure: Figure) -> str:
    return png_data_uri(_png_bytes(figure))


def png_data_uri(png: bytes) -> str:
    """PNG bytes as a ``data:`` URI to embed in a page."""
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _map_colorbar(figure: Figure, rect: tuple[float, float, float, float], top: float, threshold: float | None,
                  orientation: str = "vertical") -> None:
    """A colour bar of :data:`MAP_CMAP` from 0 to ``top`` in ``rect``; the threshold is a white line across it.

    The top tick reads ``>= top`` (higher values take its colour); the threshold gets a tick label
    of its own unless it would run into the end labels.
    """
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    cax = figure.add_axes(rect)
    bar = figure.colorbar(ScalarMappable(Normalize(0.0, top), cmap=MAP_CMAP), cax=cax, orientation=orientation)
    ticks, labels = [0.0, top], ["0", f"\u2265{top:g}"]
    if threshold is not None and 0.0 < threshold < top:
        (cax.axhline if orientation == "vertical" else cax.axvline)(threshold, color="white", lw=1.4)
        if min(threshold, top - threshold) > 0.15 * top:
            ticks.insert(1, threshold)
            labels.insert(1, f"{threshold:g}")
    bar.set_ticks(ticks, labels=labels)
    bar.ax.tick_params(labelsize=7, length=2, pad=1)
    bar.outline.set_linewidth(0.5)


def colorbar_figure(top: float, threshold: float | None, width: float = 2.22) -> str:
    """A horizontal colour bar of the anomaly map (0 to ``top``, the threshold marked) as a ``data:`` URI."""
    figure = _new_figure(width, 0.4)
    _map_colorbar(figure, (0.05, 0.55, 0.88, 0.4), top, threshold, orientation="horizontal")
    return _to_data_uri(figure)


def _overlay(image: np.ndarray, mask: np.ndarray, target: np.ndarray, panel_inches: float) -> np.ndarray:
    """:func:`overlay_rgb` with an outline at least one screen pixel wide when the panel shrinks the image."""
    width = math.ceil(max(image.shape) / (panel_inches * _DPI))
    return overlay_rgb(image, mask, target, outline_width=width)


def _show(ax: Axes, picture: np.ndarray, title: str, panel_inches: float, **imshow: Any) -> None:
    # Sharp pixels when enlarging; a smoothing filter when shrinking, where nearest-neighbour aliases.
    shrinks = max(picture.shape[:2]) > panel_inches * _DPI
    ax.imshow(picture, interpolation="antialiased" if shrinks else "nearest", **imshow)
    ax.set_title(title, fontsize=9, pad=3)
    ax.set_axis_off()


def _curve(curves: Any, name: str, x: str, y: str) -> tuple[np.ndarray, np.ndarray] | None:
    curve = curves.get(name) if isinstance(curves, Mapping) else None
    if not isinstance(curve, Mapping) or not curve.get(x) or not curve.get(y):
        return None
    return np.asarray(curve[x], dtype=float), np.asarray(curve[y], dtype=float)


def _plot_pr(ax: Axes, curve: tuple[np.ndarray, np.ndarray], ap: Any) -> None:
    ax.plot(*curve, color="#0b5cad", lw=1.6, label=f"AP = {format_value(ap)}")
    ax.set(xlim=(0, 1), ylim=(0, 1.02), xlabel="recall", ylabel="precision")
    ax.set_title("Precision-recall, pixels pooled", fontsize=10)
    ax.legend(loc="upper right", fontsize=9)


def _plot_roc(ax: Axes, curve: tuple[np.ndarray, np.ndarray], auroc: Any) -> None:
    ax.plot([0, 1], [0, 1], color="#999999", lw=0.8, ls="--")
    ax.plot(*curve, color="#0b5cad", lw=1.6, label=f"AUROC = {format_value(auroc)}")
    ax.set(xlim=(0, 1), ylim=(0, 1.02), xlabel="false-positive rate", ylabel="true-positive rate")
    ax.set_title("ROC, pixels pooled", fontsize=10)
    ax.legend(loc="lower right", fontsize=9)


def _plot_stage_dice(ax: Axes, values: Sequence[Any]) -> None:
    dice = np.asarray(values, dtype=float)  # None (undefined) becomes NaN and leaves a gap
    stages = np.arange(1, len(dice) + 1)
    ax.plot(stages, dice, color="#0b5cad", lw=1.6, marker="o", ms=4)
    for stage, value in zip(stages, dice):
        ax.annotate(format_value(float(value)), (stage, value), textcoords="offset points", xytext=(0, 6),
                    ha="center", fontsize=8)
    ax.set(xticks=stages, ylim=(0, 1.05), xlabel="stage", ylabel="mean Dice, anomalous slices")
    ax.set_title("Dice after each stage", fontsize=10)


def curves_figure(metrics: Mapping[str, Any]) -> str | None:
    """PR and ROC curves and the Dice-per-stage plot of ``metrics.json``, side by side; None when none was recorded."""
    aggregate, curves = metrics["aggregate"], metrics.get("curves")
    pr, roc = _curve(curves, "pr", "recall", "precision"), _curve(curves, "roc", "fpr", "tpr")
    stage_dice = aggregate.get("dice_per_stage")
    plots: list[Callable[[Axes], None]] = []
    if pr is not None:
        plots.append(lambda ax: _plot_pr(ax, pr, aggregate.get("ap")))
    if roc is not None:
        plots.append(lambda ax: _plot_roc(ax, roc, aggregate.get("auroc_pixel")))
    if stage_dice:
        plots.append(lambda ax: _plot_stage_dice(ax, stage_dice))
    if not plots:
        return None
    figure = _new_figure(3.5 * len(plots), 3.2)
    for ax, plot in zip(np.atleast_1d(figure.subplots(1, len(plots))), plots):
        ax.grid(alpha=0.3)
        ax.tick_params(labelsize=8)
        plot(ax)
    figure.tight_layout(w_pad=2.0)
    return _to_data_uri(figure)


_GAP, _BAR, _BAR_ROOM, _TITLE = 0.05, 0.1, 0.42, 0.25  # inches: between panels, colour bar, its labels, titles


def _panel_row(panels: int, size: float, bar_after: int) -> tuple[Figure, list[Axes], tuple[float, float, float, float]]:
    """A figure of ``panels`` square panels of ``size`` inches in a row with room for a colour bar right of
    panel ``bar_after``; returns it, the panels and the bar's rectangle."""
    width = panels * size + (panels - 1) * _GAP + _BAR + _BAR_ROOM + _GAP
    height = size + _TITLE
    figure = _new_figure(width, height)
    axes, x, bar = [], 0.0, (0.0, 0.0, 0.0, 0.0)
    for i in range(panels):
        axes.append(figure.add_axes((x / width, 0.0, size / width, size / height)))
        x += size + _GAP
        if i == bar_after:
            bar = (x / width, 0.05 * size / height, _BAR / width, 0.9 * size / height)
            x += _BAR + _BAR_ROOM
    return figure, axes, bar


def case_figure(image: np.ndarray, reconstruction: np.ndarray, anomaly_map: np.ndarray, mask: np.ndarray,
                target: np.ndarray, top: float, foreground: np.ndarray | None = None, threshold: float | None = None) -> str:
    """Input, reconstruction, anomaly map with its colour bar (0 to ``top``, :func:`map_scale`; the
    threshold a white line) and prediction/truth overlay of one case in one row.

    ``foreground`` (where the map counts) is outlined on the map and the overlay when it leaves anything out.
    """
    size = _CASE_PANEL
    figure, axes, bar = _panel_row(4, size, bar_after=2)
    _show(axes[0], image, "input", size, cmap="gray", vmin=-1, vmax=1)
    _show(axes[1], reconstruction, "reconstruction", size, cmap="gray", vmin=-1, vmax=1)
    _show(axes[2], anomaly_map, "anomaly map", size, cmap=MAP_CMAP, vmin=0, vmax=top)
    overlay = _overlay(image, mask, target, size)
    _show(axes[3], overlay, "prediction / truth", size)
    _map_colorbar(figure, bar, top, threshold)
    if foreground is not None and not np.all(foreground):
        rows, cols = np.arange(foreground.shape[0]), np.arange(foreground.shape[1])
        for ax, shown in ((axes[2], anomaly_map), (axes[3], overlay)):
            factor = shown.shape[0] / foreground.shape[0]  # in case a picture is drawn enlarged
            ax.contour((cols + 0.5) * factor - 0.5, (rows + 0.5) * factor - 0.5, foreground.astype(float),
                       levels=[0.5], colors=[FOREGROUND_CSS], linewidths=0.8, linestyles="dashed")
    return _to_data_uri(figure)


def detection_png(image: np.ndarray, reconstruction: np.ndarray, anomaly_map: np.ndarray, mask: np.ndarray,
                  threshold: float | None) -> bytes:
    """``detect``'s ``overlay.png`` of one slice: input, reconstruction, anomaly map with its colour bar,
    prediction; the map in the report's colours and scale (:func:`map_scale`), with what its values are.

    Drawn with Pillow rather than matplotlib: ``detect`` writes one per input, so it must be quick.
    Panels are enlarged by a whole factor (nearest neighbour) towards 256 rows.
    """
    from PIL import Image, ImageDraw, ImageFont

    top = map_scale(threshold)
    scale = max(1, 256 // image.shape[0])
    panels = [gray_rgb(image), gray_rgb(reconstruction), heat_rgb(anomaly_map, top),
              overlay_rgb(image, mask, np.zeros_like(mask, dtype=bool))]
    panels = [np.repeat(np.repeat(panel, scale, axis=0), scale, axis=1) for panel in panels]
    height, width = panels[0].shape[:2]
    gap, bar, room, title, footer = 6, 14, 46, 20, 40
    xs = [0, width + gap, 2 * (width + gap), 3 * (width + gap) + bar + room]
    canvas = Image.new("RGB", (xs[3] + width, title + height + footer), "white")
    draw, font = ImageDraw.Draw(canvas), ImageFont.load_default(size=12)
    for x, panel, name in zip(xs, panels, ("input", "reconstruction", "anomaly map", "prediction")):
        canvas.paste(Image.fromarray(panel), (x, title))
        draw.text((x + width / 2, title / 2), name, fill="black", font=font, anchor="mm")
    levels = np.linspace(255, 0, height).round().astype(np.intp)  # top colour at the top
    x0 = xs[2] + width + gap
    canvas.paste(Image.fromarray(np.repeat(map_lut()[levels][:, None], bar, axis=1)), (x0, title))
    marks = [(0.0, "0"), (top, f"{top:g}+")]  # Pillow's built-in font has no greater-or-equal sign
    if threshold is not None and 0.0 < threshold < top:
        marks.append((threshold, f"{threshold:g}") if min(threshold, top - threshold) > 0.15 * top else (threshold, ""))
        row = title + round((1 - threshold / top) * (height - 1))
        draw.line([(x0, row), (x0 + bar - 1, row)], fill="white", width=2)
    for value, label in marks:
        row = title + round((1 - value / top) * (height - 1))
        draw.text((x0 + bar + 3, min(max(row, title + 6), title + height - 6)), label, fill="black", font=font, anchor="lm")
    notes = [f"anomaly map: {MAP_UNIT}; colours from 0 to {top:g}, higher values take the top colour",
             "white line on the colour bar: the detection threshold" + (f" ({threshold:g})" if threshold else "")]
    for i, note in enumerate(notes):
        draw.text((4, title + height + 6 + 16 * i), note, fill="#333333", font=font)
    buffer = io.BytesIO()
    canvas.save(buffer, format="PNG")
    return buffer.getvalue()


def stage_figure(image: np.ndarray, target: np.ndarray, reconstructions: np.ndarray, masks: np.ndarray,
                 dice: np.ndarray) -> str:
    """Reconstruction (top) and prediction/truth overlay (bottom) after each stage, with that stage's Dice.

    Args:
        image: Input ``[H, W]``.
        target: Ground-truth mask ``[H, W]``.
        reconstructions: Reconstruction after each stage ``[S, H, W]``.
        masks: Predicted mask after each stage, bool ``[S, H, W]``.
        dice: Dice of each stage's mask ``[S]``.
    """
    stages, size = len(masks), _STRIP_PANEL
    figure = _new_figure(size * (stages + 1), 2 * size + 0.2)
    axes = figure.subplots(2, stages + 1, squeeze=False)
    _show(axes[0, 0], image, "input", size, cmap="gray", vmin=-1, vmax=1)
    _show(axes[1, 0], _overlay(image, np.zeros_like(target), target, size), "truth", size)
    for stage in range(stages):
        _show(axes[0, stage + 1], reconstructions[stage], f"stage {stage + 1}", size, cmap="gray", vmin=-1, vmax=1)
        overlay = _overlay(image, masks[stage], target, size)
        _show(axes[1, stage + 1], overlay, f"Dice {format_value(float(dice[stage]))}", size)
    figure.subplots_adjust(left=0.005, right=0.995, bottom=0.01, top=0.93, wspace=0.04, hspace=0.16)
    return _to_data_uri(figure)
