"""The words and tables of the report: metric rows with their aggregations, setup tables, warnings."""

from __future__ import annotations

import json
import string
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from synomaly.figures import NOT_AVAILABLE, curves_figure, format_value

CHANCE_AUROC = 0.6  # pixel AUROC at or below this gets the chance-level warning
INVERTED_AUROC = 0.4  # below this the map ranks lesions below healthy tissue: a warning of its own
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
            "threshold ({dice_oracle_threshold}) that is best ON THE TEST DATA, with no small-component filter (so it "
            "can fall below the filtered Dice above): for comparison with papers that report it, never a way to choose "
            "settings", optional=True),
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


def code_spans(text: str) -> list[tuple[str, bool]]:
    """``text`` split at backticks into (text, is_code) pieces, so `code` shows as code, not as backticks."""
    pieces = text.split("`")
    if len(pieces) % 2 == 0:  # an unmatched backtick stays literal
        pieces = [*pieces[:-2], pieces[-2] + "`" + pieces[-1]]
    return [(piece, i % 2 == 1) for i, piece in enumerate(pieces) if piece]


def chance_warning(aggregate: Mapping[str, Any]) -> str | None:
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


# Detection settings that only one sampler reads: the report leaves them out for the others.
_SAMPLER_FIELDS = {"chain": ("chain_steps",), "autoddpm": ("chain_steps", "inpaint_t", "resamplings", "perceptual", "dilation",
                                                           "mask_threshold")}


def _settings_in_use(detect: Any) -> Any:
    """``detect`` without the settings its sampler does not read."""
    if not isinstance(detect, Mapping):
        return detect
    unused = set(_SAMPLER_FIELDS["autoddpm"]) - set(_SAMPLER_FIELDS.get(detect.get("sampler", ""), ()))
    return {key: value for key, value in detect.items() if key not in unused}


def setup_tables(metrics: Mapping[str, Any], model_info: Mapping[str, Any] | None) -> list[dict[str, Any]]:
    recorded = metrics.get("model")
    if model_info is None and isinstance(recorded, Mapping) and isinstance(recorded.get("config"), Mapping):
        model_info = {"folder": recorded.get("folder"), **model_facts(recorded["config"])}
    sources = (("Detection settings", _settings_in_use(metrics.get("detect"))), ("Model", model_info), ("Data", metrics.get("data")),
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
        line += (f"; {format_value(aggregate['n_volumes'])} volume{'' if aggregate['n_volumes'] == 1 else 's'} "
                 f"({format_value(aggregate.get('n_volumes_anomalous'))} anomalous)")
    return line + "."


def _table(rows: Sequence[Mapping[str, Any]], preferred: Sequence[str]) -> dict[str, Any]:
    """Columns of ``preferred`` that some row reports, with every cell formatted for display."""
    columns = [c for c in preferred if any(row.get(c) is not None for row in rows)]
    numeric = [all(_is_number(row.get(c)) for row in rows) for c in columns]  # right-aligned
    cells = [[format_value(row.get(c)) for c in columns] for row in rows]
    return {"columns": columns, "numeric": numeric, "rows": cells}


def metrics_context(metrics: Mapping[str, Any]) -> dict[str, Any]:
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
