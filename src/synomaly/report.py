"""Self-contained HTML report of an evaluation folder: metrics with their aggregation, curves, overlays,
and a viewer of whole volumes.

The report is one HTML file with inline CSS, inline base64 PNG figures (drawn by
:mod:`synomaly.figures` and :mod:`synomaly.report_viewer`) and an inline script for the volume
viewer, so it opens offline and can be attached to a CI run or mailed. The page is the jinja2
template ``templates/report.html.j2``.
"""

from __future__ import annotations

import datetime
import functools
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jinja2
import numpy as np
import torch

from synomaly import __version__
from synomaly._atomic import write_text
from synomaly.errors import ConfigError, InputError, OutputExistsError
from synomaly.figures import (
    FOREGROUND_CSS,
    MAP_CMAP,
    MAP_UNIT,
    PRED_COLOR,
    TRUTH_COLOR,
    case_figure,
    colorbar_figure,
    format_value,
    map_scale,
    overlay_rgb,
    stage_figure,
)
from synomaly.metrics import confusion_counts, dice
from synomaly.report_text import chance_warning, code_spans, metrics_context, setup_tables
from synomaly.report_viewer import check_volumes, viewer_entries

__all__ = ["PRED_COLOR", "TRUTH_COLOR", "build_report", "overlay_rgb"]

_STRIP_CASES = 3
_FOLDER_HINT = "pass a folder written by 'synomaly evaluate'"
_IMAGE_ARRAYS = ("image", "reconstruction", "anomaly_map", "mask", "target")
_STAGE_ARRAYS = ("stage_reconstructions", "stage_masks")



def build_report(
    eval_dir: str | Path,
    out_path: str | Path | None = None,
    *,
    title: str = "Synomaly report",
    notes: str | None = None,
    model_info: Mapping[str, Any] | None = None,
    overwrite: bool = False,
    max_cases: int = 8,
) -> Path:
    """Write a single self-contained HTML report of an evaluation folder.

    Args:
        eval_dir: Folder written by ``synomaly.evaluate.write_evaluation`` (``metrics.json``,
            ``cases.npz``, and ``volumes.npz`` for the volume viewer where the slices have volume ids).
        out_path: Output file; defaults to ``eval_dir/report.html``.
        title: Page title.
        notes: Free text shown under the title (e.g. what a demo does and does not show); blank lines
            separate paragraphs.
        model_info: Configuration summary of the model, shown as a (flattened) key/value table.
        overwrite: Replace an existing report.
        max_cases: Most cases shown in each of the worst, best and healthy sections.

    Returns:
        The path of the written report.

    Raises:
        OutputExistsError: The report exists and ``overwrite`` is false.
        InputError: The folder lacks a readable ``metrics.json`` or ``cases.npz``, or its ``volumes.npz``
            is unreadable.
        ConfigError: ``max_cases`` is below 1.
    """
    eval_dir = Path(eval_dir)
    out = eval_dir / "report.html" if out_path is None else Path(out_path)
    if out.exists() and not overwrite:
        raise OutputExistsError(out)
    if max_cases < 1:
        raise ConfigError("report.max_cases", f"must be at least 1, got {max_cases}")
    if not eval_dir.is_dir():
        raise InputError(eval_dir, f"not a folder; {_FOLDER_HINT}")
    metrics, cases = _load(eval_dir)
    try:  # metrics.json is checked for its layout; a value of the wrong type inside it surfaces here
        from_metrics = {"chance": chance_warning(metrics["aggregate"]), "setup": setup_tables(metrics, model_info),
                        **metrics_context(metrics)}
    except (TypeError, ValueError, AttributeError, KeyError, IndexError) as error:
        raise InputError(eval_dir / "metrics.json", f"malformed ({type(error).__name__}: {error}); write it again with "
                                                    "synomaly evaluate --overwrite") from None
    volumes = _load_volumes(eval_dir)
    detect = metrics.get("detect")
    threshold = detect.get("threshold") if isinstance(detect, Mapping) else None
    threshold = float(threshold) if isinstance(threshold, (int, float)) and not isinstance(threshold, bool) else None
    top = map_scale(threshold)
    context = {
        "title": title,
        "notes": [code_spans(part.strip()) for part in (notes or "").split("\n\n") if part.strip()],
        "generated": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "version": __version__,
        "source": str(eval_dir),
        **from_metrics,
        **_cases_context(metrics, cases, max_cases, top, threshold),
        "outlines_foreground": "foreground" in cases and not cases["foreground"].all(),
        "viewers": viewer_entries(volumes, top, threshold) if volumes else [],
        "colorbar": colorbar_figure(top, threshold),
        "map_top": format_value(top),
        "threshold": None if threshold is None else format_value(threshold),
        "map_unit": MAP_UNIT,
    }
    write_text(out, _render(context))
    return out


# ---------------------------------------------------------------- loading


def _load(eval_dir: Path) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Read the folder with :func:`synomaly.evaluate.read_evaluation`, then check what the page needs."""
    from synomaly.evaluate import read_evaluation

    metrics, cases = read_evaluation(eval_dir)
    if not isinstance(metrics, dict) or not isinstance(metrics.get("aggregate"), dict):
        raise InputError(eval_dir / "metrics.json", 'has no "aggregate" object')
    for key in ("per_case", "per_volume"):
        rows = metrics.get(key)
        if rows is not None and not (isinstance(rows, list) and all(isinstance(row, dict) for row in rows)):
            raise InputError(eval_dir / "metrics.json", f'"{key}" must be a list of objects, got {json.dumps(rows)[:60]}')
    _check_cases(eval_dir / "cases.npz", cases)
    cases["mask"], cases["target"] = cases["mask"].astype(bool), cases["target"].astype(bool)
    if "foreground" in cases:  # folders of earlier versions have none
        cases["foreground"] = cases["foreground"].astype(bool)
    if "dice" not in cases:
        cases["dice"] = _dice(cases["mask"], cases["target"])
    return metrics, cases


def _load_volumes(eval_dir: Path) -> dict[str, np.ndarray]:
    """The whole volumes of the folder (``volumes.npz``), checked; empty when it has none."""
    from synomaly._evaluation_io import VOLUMES_NAME, read_volumes

    volumes = read_volumes(eval_dir)
    if volumes:
        check_volumes(eval_dir / VOLUMES_NAME, volumes)
    return volumes


def _check_cases(path: Path, cases: dict[str, np.ndarray]) -> None:
    missing = [key for key in ("case_id", *_IMAGE_ARRAYS) if key not in cases]
    if missing:
        raise InputError(path, f"lacks the arrays {', '.join(missing)}")
    shape = cases["image"].shape
    if len(shape) != 3 or any(cases[key].shape != shape for key in _IMAGE_ARRAYS):
        shapes = ", ".join(f"{key} {cases[key].shape}" for key in _IMAGE_ARRAYS)
        raise InputError(path, f"image arrays must all be [K, H, W]; got {shapes}")
    if "foreground" in cases and cases["foreground"].shape != shape:
        raise InputError(path, f"foreground must be [K, H, W] = {list(shape)}, got {list(cases['foreground'].shape)}")
    for key in ("case_id", "dice", "stages"):
        if key in cases and cases[key].shape != shape[:1]:
            raise InputError(path, f"{key} must be [{shape[0]}], got {list(cases[key].shape)}")
    for key in _STAGE_ARRAYS:
        if key in cases and (cases[key].ndim != 4 or cases[key].shape[:1] + cases[key].shape[2:] != shape):
            raise InputError(path, f"{key} must be [K, S, H, W] with [K, H, W] = {list(shape)}, got "
                             f"{list(cases[key].shape)}")


def _dice(pred: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Dice of bool masks ``[..., H, W]`` (broadcast against each other) with :func:`synomaly.metrics.dice`.

    NaN where the target is empty (healthy), as in ``cases.npz``; ``metrics.dice`` would give 1.0 there
    when the prediction is empty too, and 0.0 when it is not.
    """
    pred, target = np.broadcast_arrays(pred, target)
    shape = pred.shape
    flat = [torch.from_numpy(np.array(mask, dtype=bool).reshape(-1, 1, *shape[-2:])) for mask in (pred, target)]
    values = dice(confusion_counts(*flat)).numpy().reshape(shape[:-2])
    return np.where(target.any(axis=(-2, -1)), values, np.nan)


# ---------------------------------------------------------------- cases


def _select(cases: Mapping[str, np.ndarray], max_cases: int) -> dict[str, Any]:
    """Worst and best anomalous cases by Dice (disjoint halves when few), and the healthy cases with
    the largest predicted area (the most false positives) first."""
    anomalous = cases["target"].any(axis=(-2, -1))
    indices = np.flatnonzero(anomalous)
    by_dice = indices[np.argsort(np.nan_to_num(cases["dice"][indices], nan=-1.0), kind="stable")]
    half = min(max_cases, math.ceil(len(by_dice) / 2))
    worst, best = by_dice[:half], by_dice[half:][::-1][:max_cases]
    healthy = np.flatnonzero(~anomalous)
    healthy = healthy[np.argsort(-cases["mask"][healthy].sum(axis=(-2, -1)), kind="stable")]
    return {
        "worst": worst.tolist(),
        "best": best.tolist(),
        "healthy": healthy[:max_cases].tolist(),
        "hidden_anomalous": len(by_dice) - len(worst) - len(best),
        "hidden_healthy": max(len(healthy) - max_cases, 0),
    }


def _has_stages(cases: Mapping[str, np.ndarray]) -> bool:
    return all(key in cases for key in (*_STAGE_ARRAYS, "stages"))


def _stages_run(cases: Mapping[str, np.ndarray], index: int) -> int:
    """Stages case ``index`` ran (``cases`` has ``stages``), at least 1 and at most the stored stages."""
    stages = int(cases["stages"][index])
    if "stage_masks" in cases:
        stages = min(stages, cases["stage_masks"].shape[1])
    return max(stages, 1)


def _caption(cases: Mapping[str, np.ndarray], index: int, row: Mapping[str, Any], max_stages: Any) -> list[str]:
    """The lines under a case id: volume, Dice (or predicted area when healthy), stages run."""
    lines = [f"volume {row['group_id']}"] if row.get("group_id") is not None else []
    if cases["target"][index].any():
        lines.append(f"Dice {format_value(float(cases['dice'][index]))}")
    else:
        lines.append(f"healthy; {int(cases['mask'][index].sum())} px predicted")
    if "stages" in cases:
        stages = _stages_run(cases, index)
        lines.append(f"stages run: {stages}" + (f" of {max_stages}" if max_stages is not None else ""))
    return lines


def _case_entries(cases: Mapping[str, np.ndarray], indices: Iterable[int], per_case: Mapping[str, Any],
                  max_stages: Any, top: float, threshold: float | None) -> list[dict[str, Any]]:
    entries = []
    for index in indices:
        case_id = str(cases["case_id"][index])
        lines = _caption(cases, index, per_case.get(case_id, {}), max_stages)
        figure = case_figure(cases["image"][index], cases["reconstruction"][index], cases["anomaly_map"][index],
                             cases["mask"][index], cases["target"][index], top,
                             cases["foreground"][index] if "foreground" in cases else None, threshold)
        entries.append({"case_id": case_id, "lines": lines, "figure": figure})
    return entries


def _strip_entries(cases: Mapping[str, np.ndarray], candidates: Sequence[int]) -> list[dict[str, Any]]:
    """Stage strips of the candidate cases that ran the most stages (the most to look at)."""
    if not _has_stages(cases) or not candidates:
        return []
    chosen = sorted(candidates, key=lambda index: -int(cases["stages"][index]))[:_STRIP_CASES]
    entries = []
    for index in chosen:
        stages = _stages_run(cases, index)
        image, target = cases["image"][index], cases["target"][index]
        masks = cases["stage_masks"][index, :stages].astype(bool)
        figure = stage_figure(image, target, cases["stage_reconstructions"][index, :stages], masks,
                              _dice(masks, target[None]))
        entries.append({"case_id": str(cases["case_id"][index]), "stages": stages, "figure": figure})
    return entries


def _cases_context(metrics: Mapping[str, Any], cases: Mapping[str, np.ndarray], max_cases: int, top: float,
                   threshold: float | None) -> dict[str, Any]:
    per_case = {str(row.get("case_id")): row for row in metrics.get("per_case") or [] if isinstance(row, Mapping)}
    detect = metrics.get("detect")
    max_stages = detect.get("max_stages") if isinstance(detect, Mapping) else None
    selection = _select(cases, max_cases)
    sections = [(key, heading, _case_entries(cases, selection[key], per_case, max_stages, top, threshold))
                for key, heading in (("worst", "Worst cases"), ("best", "Best cases"),
                                     ("healthy", "Healthy cases"))]
    return {
        "case_sections": sections,
        "hidden_anomalous": selection["hidden_anomalous"],
        "hidden_healthy": selection["hidden_healthy"],
        # Anomalous cases when there are any: their strips show the mask converging on the lesion.
        "strips": _strip_entries(cases, selection["worst"] + selection["best"] or selection["healthy"]),
        "has_stage_arrays": _has_stages(cases),
    }


# ---------------------------------------------------------------- HTML


@functools.cache
def _template() -> jinja2.Template:
    """``templates/report.html.j2``, every value HTML-escaped."""
    environment = jinja2.Environment(loader=jinja2.PackageLoader("synomaly", "templates"), autoescape=True,
                                     undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    return environment.get_template("report.html.j2")


def _render(context: Mapping[str, Any]) -> str:
    colours = {"pred_css": "rgb({}, {}, {})".format(*PRED_COLOR),
               "truth_css": "rgb({}, {}, {})".format(*TRUTH_COLOR), "map_cmap": MAP_CMAP,
               "foreground_css": FOREGROUND_CSS}
    return _template().render(**context, **colours)
