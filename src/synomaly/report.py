"""Self-contained HTML report of an evaluation folder: metrics with their aggregation, curves, overlays.

The report is one HTML file with inline CSS and inline base64 PNG figures (drawn by
:mod:`synomaly.figures`), so it opens offline and can be attached to a CI run or mailed. The page is
the jinja2 template ``templates/report.html.j2``.
"""

from __future__ import annotations

import datetime
import functools
import json
import math
import string
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
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
    NOT_AVAILABLE,
    PRED_COLOR,
    TRUTH_COLOR,
    case_figure,
    curves_figure,
    format_value,
    overlay_rgb,
    stage_figure,
)
from synomaly.metrics import confusion_counts, dice

__all__ = ["PRED_COLOR", "TRUTH_COLOR", "build_report", "overlay_rgb"]

_STRIP_CASES = 3
CHANCE_AUROC = 0.6  # pixel AUROC at or below this gets the chance-level warning
INVERTED_AUROC = 0.4  # below this the map ranks lesions below healthy tissue: a warning of its own
_FOLDER_HINT = "pass a folder written by 'synomaly evaluate'"
_IMAGE_ARRAYS = ("image", "reconstruction", "anomaly_map", "mask", "target")
_STAGE_ARRAYS = ("stage_reconstructions", "stage_masks")
_CASE_COLUMNS = ("case_id", "group_id", "anomalous", "dice", "iou", "precision", "recall", "fpr", "hd95", "ap",
                 "ssim", "score", "nfe", "stages")
_VOLUME_COLUMNS = ("group_id", "n_slices", "n_anomalous_slices", "anomalous", "dice", "iou", "precision",
                   "recall", "fpr")


@dataclass(frozen=True)
class _Metric:
    """One row of the metrics table; ``aggregation`` is a ``str.format`` template over the aggregate."""

    key: str
    name: str
    group: str
    aggregation: str
    optional: bool = False  # shown only when the evaluation reports it


_MASK = "Segmentation (thresholded mask)"
_RANKING = "Pixel ranking (raw anomaly map)"
_IMAGE = "Image-level detection"
_RECONSTRUCTION = "Reconstruction"
_COST = "Cost"
_OTHER = "Other reported values"
_POOLED = "pooled over all pixels of all {n_cases} slices"
_PER_VOLUME = "mean over {n_volumes_anomalous} anomalous volumes, pixels pooled per volume"

_METRICS = (
    _Metric("dice_mean", "Dice", _MASK, "mean over {dice_mean_n} anomalous slices"),
    _Metric("dice_pooled", "Dice", _MASK, _POOLED),
    _Metric("dice_volume_mean", "Dice", _MASK, _PER_VOLUME, optional=True),
    _Metric("dice_oracle_mean", "Oracle Dice", _MASK, "mean over {dice_mean_n} anomalous slices at the one map "
            "threshold ({dice_oracle_threshold}) that is best ON THE TEST DATA: for comparison with papers that report "
            "it, never a way to choose settings", optional=True),
    _Metric("dice_oracle_pooled", "Oracle Dice", _MASK, "pooled over all pixels at the map threshold best for it on "
            "the test data", optional=True),
    _Metric("iou_mean", "IoU", _MASK, "mean over {iou_mean_n} anomalous slices"),
    _Metric("iou_pooled", "IoU", _MASK, _POOLED),
    _Metric("iou_volume_mean", "IoU", _MASK, _PER_VOLUME, optional=True),
    _Metric("precision_mean", "Precision", _MASK,
            "mean over {precision_mean_n} anomalous slices with a non-empty prediction"),
    _Metric("precision_pooled", "Precision", _MASK, _POOLED, optional=True),
    _Metric("recall_mean", "Recall", _MASK, "mean over {recall_mean_n} anomalous slices"),
    _Metric("recall_pooled", "Recall", _MASK, _POOLED, optional=True),
    _Metric("fpr_mean", "False-positive rate", _MASK, "mean over {fpr_mean_n} anomalous slices"),
    _Metric("fpr_healthy_mean", "False-positive rate", _MASK, "mean over {fpr_healthy_mean_n} healthy slices",
            optional=True),
    _Metric("hd95_mean", "HD95", _MASK, "95th percentile of symmetric surface distances {hd95_unit}, mean over "
            "{hd95_mean_n} anomalous slices with a non-empty prediction ({hd95_empty_predictions} empty)"),
    _Metric("ap", "AP", _RANKING, "pixel level on the raw anomaly map, " + _POOLED),
    _Metric("auroc_pixel", "AUROC", _RANKING, "pixel level on the raw anomaly map, " + _POOLED),
    _Metric("ap_mean", "AP", _RANKING, "pixel level on the raw anomaly map per slice, mean over {ap_mean_n} "
            "anomalous slices",
            optional=True),
    _Metric("auroc_image", "AUROC", _IMAGE, "image level, {n_anomalous} anomalous vs {n_healthy} healthy "
            "slices, ranked by the image-level score"),
    _Metric("ap_image", "AP", _IMAGE, "image level, {n_anomalous} anomalous vs {n_healthy} healthy slices",
            optional=True),
    _Metric("ssim_healthy", "SSIM", _RECONSTRUCTION, "input vs reconstruction, mean over {ssim_healthy_n} "
            "healthy slices"),
    _Metric("nfe_mean", "Network evaluations", _COST, "per image, mean over all {n_cases} slices"),
    _Metric("nfe_max", "Network evaluations", _COST, "per image, maximum over all {n_cases} slices"),
    _Metric("ms_per_image", "Time", _COST, "milliseconds of detection wall time per image"),
)


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
            ``cases.npz``).
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
        InputError: The folder lacks a readable ``metrics.json`` or ``cases.npz``.
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
    context = {
        "title": title,
        "notes": [_code_spans(part.strip()) for part in (notes or "").split("\n\n") if part.strip()],
        "chance": _chance_warning(metrics["aggregate"]),
        "generated": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "version": __version__,
        "source": str(eval_dir),
        "setup": _setup_tables(metrics, model_info),
        **_metrics_context(metrics),
        **_cases_context(metrics, cases, max_cases),
        "outlines_foreground": "foreground" in cases and not cases["foreground"].all(),
    }
    write_text(out, _render(context))
    return out


def _code_spans(text: str) -> list[tuple[str, bool]]:
    """``text`` split at backticks into (text, is_code) pieces, so `code` shows as code, not as backticks."""
    pieces = text.split("`")
    if len(pieces) % 2 == 0:  # an unmatched backtick stays literal
        pieces = [*pieces[:-2], pieces[-2] + "`" + pieces[-1]]
    return [(piece, i % 2 == 1) for i, piece in enumerate(pieces) if piece]


def _chance_warning(aggregate: Mapping[str, Any]) -> str | None:
    """A warning when the anomaly map ranks lesion pixels no better than chance (pixel AUROC near 0.5 or below)."""
    auroc = aggregate.get("auroc_pixel")
    if not isinstance(auroc, (int, float)) or isinstance(auroc, bool) or not auroc <= CHANCE_AUROC:
        return None  # absent, undefined (NaN) or above chance
    if auroc < INVERTED_AUROC:
        return (f"Pixel AUROC {auroc:.3f}: the anomaly map scores lesion pixels lower than healthy ones, as if inverted. "
                "Check the lesion direction (bright or dark lesions: the preset, or the intensity method's direction) "
                "before reading the numbers below.")
    return (f"Pixel AUROC {auroc:.3f}: the anomaly map ranks lesion pixels no better than chance (0.5). The model "
            "has not learnt what healthy images look like (too few training steps, or a preprocessing mismatch); "
            "read the numbers below with that in mind.")


# ---------------------------------------------------------------- loading


def _load(eval_dir: Path) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Read the folder with :func:`synomaly.evaluate.read_evaluation`, then check what the page needs."""
    from synomaly.evaluate import read_evaluation

    metrics, cases = read_evaluation(eval_dir)
    if not isinstance(metrics, dict) or not isinstance(metrics.get("aggregate"), dict):
        raise InputError(eval_dir / "metrics.json", 'has no "aggregate" object')
    _check_cases(eval_dir / "cases.npz", cases)
    cases["mask"], cases["target"] = cases["mask"].astype(bool), cases["target"].astype(bool)
    if "foreground" in cases:  # folders of earlier versions have none
        cases["foreground"] = cases["foreground"].astype(bool)
    if "dice" not in cases:
        cases["dice"] = _dice(cases["mask"], cases["target"])
    return metrics, cases


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


# ---------------------------------------------------------------- text and tables


def _fmt_setting(value: Any) -> str:
    """A setting for display: numbers unrounded beyond 6 significant digits, sequences comma-joined."""
    if value is None:
        return NOT_AVAILABLE
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (list, tuple)):
        return ", ".join(_fmt_setting(item) for item in value) or "(none)"
    return str(value)


def _flatten(mapping: Mapping[str, Any], prefix: str = "") -> list[tuple[str, str]]:
    """Nested settings as ``(dotted.key, text)`` rows."""
    rows: list[tuple[str, str]] = []
    for key, value in mapping.items():
        if isinstance(value, Mapping):
            rows += _flatten(value, f"{prefix}{key}.")
        else:
            rows.append((f"{prefix}{key}", _fmt_setting(value)))
    return rows


def model_facts(config: Mapping[str, Any]) -> dict[str, Any]:
    """The facts about a model folder's ``config.json`` that a reader of a report needs."""
    model, training, preprocess = config.get("model", {}), config.get("training", {}), config.get("preprocess") or {}
    schedule = config.get("schedule", {})
    return {
        "method": config.get("method", "diffusion"),
        "channels": ", ".join(map(str, model.get("channels", []))),
        "image size": f"{model.get('image_size')} x {model.get('image_size')}",
        "training noise": _noise_text(config.get("noise", {})),
        "training steps": training.get("final_step"),
        "training images": training.get("images"),
        "foreground": f"{preprocess.get('foreground', 'none')}, eroded {preprocess.get('foreground_erosion', 0)} px",
        "schedule": f"{schedule.get('kind')}, T = {schedule.get('num_timesteps')}",
    }


def _noise_text(noise: Mapping[str, Any]) -> str:
    """``synomaly (sigma 1.5, threshold 175, ...)``: the noise's name, then its parameters."""
    params = ", ".join(f"{k} {v}" for k, v in noise.items() if k != "name")
    return f"{noise.get('name', '?')} ({params})" if params else str(noise.get("name", "?"))


def _setup_tables(metrics: Mapping[str, Any], model_info: Mapping[str, Any] | None) -> list[dict[str, Any]]:
    recorded = metrics.get("model")
    if model_info is None and isinstance(recorded, Mapping) and isinstance(recorded.get("config"), Mapping):
        model_info = {"folder": recorded.get("folder"), **model_facts(recorded["config"])}
    sources = (("Detection settings", metrics.get("detect")), ("Model", model_info), ("Data", metrics.get("data")),
               ("Evaluation settings", metrics.get("settings")))
    return [{"caption": caption, "rows": _flatten(values)} for caption, values in sources
            if isinstance(values, Mapping) and values]


def _template_fields(template: str) -> set[str]:
    return {field for _, field, _, _ in string.Formatter().parse(template) if field}


class _Defaults(dict):
    """Template values; a count the evaluation did not report reads n/a rather than raising."""

    def __missing__(self, key: str) -> str:
        return NOT_AVAILABLE


def _metric_rows(aggregate: Mapping[str, Any], spacing: Any) -> list[dict[str, str]]:
    """The metrics table: each value with its aggregation in words, and anything else reported."""
    words = _Defaults({key: format_value(value) for key, value in aggregate.items()
                       if not isinstance(value, (list, dict))})
    words["hd95_unit"] = "in pixels" if spacing is None else "in the units of the pixel spacing"
    rows = [_metric_row(m, m.aggregation.format_map(words), aggregate.get(m.key))
            for m in _METRICS if not m.optional or m.key in aggregate]
    described = {m.key for m in _METRICS}.union(*(_template_fields(m.aggregation) for m in _METRICS))
    rows += [_metric_row(_Metric(key, key, _OTHER, ""), "as reported by the evaluation", value)
             for key, value in aggregate.items()
             if key not in described and not _is_count(key) and _is_number(value)]
    return rows


def _metric_row(metric: _Metric, aggregation: str, value: Any) -> dict[str, str]:
    return {"key": metric.key, "name": metric.name, "group": metric.group, "aggregation": aggregation,
            "value": format_value(value), "exact": json.dumps(value)}


def _is_count(key: str) -> bool:
    """Case and volume counts qualify other numbers (and appear in the summary line), not metrics."""
    return key.startswith("n_") or key.endswith("_n")


def _is_number(value: Any) -> bool:
    return value is None or (isinstance(value, (int, float)) and not isinstance(value, bool))


def _counts_line(aggregate: Mapping[str, Any]) -> str:
    line = (f"{format_value(aggregate.get('n_cases'))} test slices: {format_value(aggregate.get('n_anomalous'))} "
            f"anomalous, {format_value(aggregate.get('n_healthy'))} healthy")
    if "n_volumes" in aggregate:
        line += (f"; {format_value(aggregate['n_volumes'])} volumes "
                 f"({format_value(aggregate.get('n_volumes_anomalous'))} anomalous)")
    return line + "."


def _table(rows: Sequence[Mapping[str, Any]], preferred: Sequence[str]) -> dict[str, Any]:
    """Columns of ``preferred`` that some row reports, with every cell formatted for display."""
    columns = [c for c in preferred if any(row.get(c) is not None for row in rows)]
    numeric = [all(_is_number(row.get(c)) for row in rows) for c in columns]  # right-aligned
    cells = [[format_value(row.get(c)) for c in columns] for row in rows]
    return {"columns": columns, "numeric": numeric, "rows": cells}


def _metrics_context(metrics: Mapping[str, Any]) -> dict[str, Any]:
    aggregate = metrics["aggregate"]
    settings = metrics.get("settings")
    spacing = settings.get("spacing") if isinstance(settings, Mapping) else None
    per_volume = metrics.get("per_volume")
    return {
        "counts_line": _counts_line(aggregate),
        "metric_rows": _metric_rows(aggregate, spacing),
        "curves_figure": curves_figure(metrics),
        "per_case_table": _table(metrics.get("per_case") or [], _CASE_COLUMNS),
        "per_volume_table": _table(per_volume, _VOLUME_COLUMNS) if per_volume else None,
    }


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
                  max_stages: Any, map_max: float) -> list[dict[str, Any]]:
    entries = []
    for index in indices:
        case_id = str(cases["case_id"][index])
        lines = _caption(cases, index, per_case.get(case_id, {}), max_stages)
        figure = case_figure(cases["image"][index], cases["reconstruction"][index], cases["anomaly_map"][index],
                             cases["mask"][index], cases["target"][index], map_max,
                             cases["foreground"][index] if "foreground" in cases else None)
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


def _cases_context(metrics: Mapping[str, Any], cases: Mapping[str, np.ndarray], max_cases: int) -> dict[str, Any]:
    per_case = {str(row.get("case_id")): row for row in metrics.get("per_case") or [] if isinstance(row, Mapping)}
    detect = metrics.get("detect")
    max_stages = detect.get("max_stages") if isinstance(detect, Mapping) else None
    map_max = float(cases["anomaly_map"].max(initial=0.0)) or 1.0  # one scale so cases compare
    selection = _select(cases, max_cases)
    sections = [(key, heading, _case_entries(cases, selection[key], per_case, max_stages, map_max))
                for key, heading in (("worst", "Worst cases"), ("best", "Best cases"),
                                     ("healthy", "Healthy cases"))]
    return {
        "case_sections": sections,
        "hidden_anomalous": selection["hidden_anomalous"],
        "hidden_healthy": selection["hidden_healthy"],
        "map_max": format_value(map_max),
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
