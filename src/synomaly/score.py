"""Score predictions that already exist against reference masks, without running a model.

The predictions are a ``synomaly detect`` output folder: its ``summary.json`` lists the cases, and
each case folder holds ``mask`` and ``anomaly_map`` on the input's own grid (NIfTI for NIfTI/DICOM
inputs; ``.npy`` otherwise, or PNG/TIFF pictures where ``detect --format`` left ``.npy`` out).
References pair with the cases either by file name (one folder: the mask with the input's file
name, searched recursively) or in order (one source per case, ``none``
for a healthy input, ``bundle.npz:key`` for arrays). Metrics are computed at the input's own
resolution, so HD95 is in mm wherever the file records its spacing (NIfTI, DICOM).

    synomaly score runs/lgg/detect --references data.npz:test_masks -o runs/lgg/score
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from synomaly import _atomic
from synomaly._json import json_safe, read_json
from synomaly.errors import InputError, OutputExistsError
from synomaly.io import read_images, read_mask
from synomaly.metrics import SegmentationEvaluator

log = logging.getLogger(__name__)

__all__ = ["score_folder"]

HEALTHY = "none"


def _pair(cases: list[dict[str, Any]], references: list[str], summary: Path) -> list[str]:
    """The reference spec of every case: by file name in one folder, or one per case in order."""
    if len(references) == 1 and Path(references[0]).is_dir():
        folder = Path(references[0])
        by_name: dict[str, Path] = {}
        for path in sorted(folder.rglob("*")):
            if path.is_file() or (path.is_dir() and any(path.glob("*.dcm"))):
                by_name.setdefault(path.name, path)
        pairs = []
        for case in cases:
            name = Path(case["input"]).name
            if name not in by_name:
                raise InputError(folder, f"no reference mask named {name} (for the input {case['input']})")
            pairs.append(str(by_name[name]))
        return pairs
    if len(references) != len(cases):
        raise InputError(summary, f"{len(cases)} cases but {len(references)} reference sources: give one folder "
                                  "(masks named like the inputs) or one source per case, in the order of summary.json")
    return list(references)


def _read_case(folder: Path, case: dict[str, Any], reference: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, Any]:
    """Prediction mask, anomaly map and reference mask of one case, ``[N, H, W]`` each, and the mask's properties."""
    files = case.get("files") or {}
    if "mask" not in files or "anomaly_map" not in files:
        raise InputError(folder / "summary.json", f"case {case.get('output')!r} lists no mask and anomaly_map files")
    pred, props = _read_output(folder / case["output"] / files["mask"])
    amap, _ = _read_output(folder / case["output"] / files["anomaly_map"])
    if not files["anomaly_map"].endswith((".npy", ".nii.gz")) and case.get("anomaly_map_255"):
        amap = amap / 255.0 * float(case["anomaly_map_255"])  # an 8-bit picture back on the map's scale (clipped at the top)
    if reference.lower() == HEALTHY:
        target = np.zeros(pred.shape, dtype=bool)
    else:
        from synomaly.data import Source

        source = Source.parse(reference)
        target = read_mask(source.path, props, key=source.key)
    if target.shape != pred.shape or amap.shape != pred.shape:
        raise InputError(reference, f"reference mask shape {target.shape} does not match the prediction's {pred.shape} "
                                    f"({folder / case['output']})")
    return pred > 0.5, amap, target, props


def _read_output(path: Path) -> tuple[np.ndarray, Any]:
    """One output of ``detect``: a file, or a folder of one PNG per slice (named by slice number)."""
    if path.is_dir() and not any(path.glob("*.dcm")):
        slices = sorted(path.glob("*.png"), key=lambda p: int(p.stem) if p.stem.isdigit() else p.stem)
        if not slices:
            raise InputError(path, "holds no PNG slices")
        stacks = [read_images(p) for p in slices]
        stack = np.concatenate([images for images, _ in stacks])
        props = dataclasses.replace(stacks[0][1], path=str(path), stack_shape=tuple(stack.shape), slice_count=len(stack),
                                    slice_indices=list(range(len(stack))))
        return stack, props
    return read_images(path)


def score_folder(predictions: str | Path, references: list[str], output: str | Path, *, overwrite: bool = False) -> dict[str, Any]:
    """Score a ``detect`` output folder against reference masks; writes ``metrics.json`` and CSV tables.

    Returns:
        The metrics (``per_case``: one row per slice; ``per_volume``: one per input; ``aggregate``).
        ``settings.hd95_unit`` says whether HD95 is in ``mm`` (every input recorded its spacing),
        ``px`` (none did) or ``mixed``.

    Raises:
        InputError: A missing or malformed prediction folder, or a reference that does not pair or fit.
        OutputExistsError: ``output`` holds a score and ``overwrite`` is false.
    """
    from synomaly._evaluation_io import _csv_text

    folder, output = Path(predictions), Path(output)
    if (output / "metrics.json").exists() and not overwrite:
        raise OutputExistsError(output / "metrics.json")
    summary_path = folder / "summary.json"
    summary = read_json(summary_path)
    cases = summary.get("cases") if isinstance(summary, dict) else None
    if not isinstance(cases, list) or not cases:
        raise InputError(summary_path, "lists no cases: is this a synomaly detect output folder?")
    evaluator = SegmentationEvaluator()
    units = set()
    for case, reference in zip(cases, _pair(cases, references, summary_path)):
        pred, amap, target, props = _read_case(folder, case, reference)
        units.add("mm" if props.spacing else "px")
        n = len(pred)
        ids = case.get("case_ids") if len(case.get("case_ids") or []) == n else [f"{case['output']}[{i}]" for i in range(n)]
        evaluator.update(torch.from_numpy(np.abs(amap))[:, None], torch.from_numpy(pred)[:, None],
                         torch.from_numpy(target)[:, None], case_ids=ids, group_ids=[case["output"]] * n,
                         spacing=props.spacing)
    metrics = evaluator.compute()
    metrics["settings"].update(spacing="per input", hd95_unit=units.pop() if len(units) == 1 else "mixed",
                               predictions=str(folder), references=list(references), detect=summary.get("detect"))
    _atomic.write_text(output / "per_case.csv", _csv_text(metrics["per_case"]))
    _atomic.write_text(output / "per_volume.csv", _csv_text(metrics["per_volume"]))
    _atomic.write_json(output / "metrics.json", json_safe(metrics))
    agg = metrics["aggregate"]
    log.info("scored %d inputs (%d slices): Dice %.3f mean over slices with lesions, %.3f pooled; written to %s",
             len(cases), agg["n_cases"], agg["dice_mean"], agg["dice_pooled"], output)
    return metrics
