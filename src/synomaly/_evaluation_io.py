"""The evaluation folder: :func:`write_evaluation` and :func:`read_evaluation`.

``metrics.json`` holds everything but the case arrays (NaN is written as ``null``); ``per_case.csv``
and ``per_volume.csv`` (with volume ids) hold the tables, ``cases.npz`` the kept cases (loadable with
``allow_pickle=False``). ``metrics.json`` is written last and marks a complete evaluation.
``volumes.npz`` holds every slice of a few whole volumes for the report's viewer
(:mod:`synomaly.volume_keeper`), where the slices have volume ids.
"""

from __future__ import annotations

import csv
import io
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from synomaly import _atomic
from synomaly._json import json_safe, read_json
from synomaly.errors import InputError, OutputExistsError

if TYPE_CHECKING:
    from synomaly.evaluate import EvaluationResult

METRICS_NAME, CASES_NAME = "metrics.json", "cases.npz"
PER_CASE_NAME, PER_VOLUME_NAME = "per_case.csv", "per_volume.csv"
VOLUMES_NAME = "volumes.npz"


def write_evaluation(result: EvaluationResult, out_dir: str | Path, overwrite: bool = False) -> Path:
    """Write ``metrics.json``, ``per_case.csv``, ``per_volume.csv`` and ``cases.npz`` atomically.

    Args:
        result: Output of :func:`synomaly.evaluate.evaluate`.
        out_dir: Folder to write into (created if missing).
        overwrite: Replace an existing evaluation.

    Returns:
        ``out_dir``.

    Raises:
        OutputExistsError: When ``metrics.json`` exists and ``overwrite`` is False.
    """
    out = Path(out_dir)
    metrics_path = out / METRICS_NAME
    if metrics_path.exists() and not overwrite:
        raise OutputExistsError(metrics_path)
    metrics = json_safe(result.metrics)
    # The old evaluation stops being complete before any new file lands: a run that fails midway
    # (disk full) leaves no metrics.json beside a mix of old and new tables.
    metrics_path.unlink(missing_ok=True)
    _atomic.write_text(out / PER_CASE_NAME, _csv_text(metrics["per_case"]))
    if "per_volume" in metrics:
        _atomic.write_text(out / PER_VOLUME_NAME, _csv_text(metrics["per_volume"]))
    else:
        # A table left by an overwritten run with volume ids would contradict metrics.json.
        (out / PER_VOLUME_NAME).unlink(missing_ok=True)
    with _atomic.atomic_path(out / CASES_NAME) as tmp, open(tmp, "wb") as f:
        # The keywords are array names; numpy's stub would also match them to its bool allow_pickle.
        arrays: dict[str, Any] = result.cases
        np.savez_compressed(f, **arrays)
    _write_volumes(out / VOLUMES_NAME, result.volumes)
    # Written last: metrics.json marks a complete evaluation, and it is what the overwrite guard checks.
    _atomic.write_json(metrics_path, metrics)
    return out


def _write_volumes(path: Path, volumes: dict[str, Any]) -> None:
    """Write the kept volumes; without any, remove those of an overwritten run (they are not this run's)."""
    if not volumes:
        path.unlink(missing_ok=True)
        return
    with _atomic.atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez_compressed(f, **volumes)


def _csv_text(rows: list[dict[str, Any]]) -> str:
    """CSV with a header from the first row; ``None`` (undefined or not provided) is an empty cell."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]) if rows else [], lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def read_evaluation(out_dir: str | Path) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Read what :func:`write_evaluation` wrote: the metrics (``null`` stays ``None``) and the cases.

    Raises:
        InputError: When ``metrics.json`` or ``cases.npz`` is missing or unreadable.
    """
    out = Path(out_dir)
    metrics = read_json(out / METRICS_NAME)
    path = out / CASES_NAME
    if not path.is_file():
        raise InputError(path, "missing")
    try:
        with np.load(path, allow_pickle=False) as archive:
            cases = {key: archive[key] for key in archive.files}
    except (OSError, ValueError, zipfile.BadZipFile) as error:
        raise InputError(path, f"not a readable npz archive ({error})") from None
    return metrics, cases


def read_volumes(out_dir: str | Path) -> dict[str, np.ndarray]:
    """The whole volumes :func:`write_evaluation` kept (``volumes.npz``); empty when it kept none.

    Raises:
        InputError: When ``volumes.npz`` exists but is not a readable npz archive.
    """
    path = Path(out_dir) / VOLUMES_NAME
    if not path.is_file():
        return {}
    try:
        with np.load(path, allow_pickle=False) as archive:
            return {key: archive[key] for key in archive.files}
    except (OSError, ValueError, zipfile.BadZipFile) as error:
        raise InputError(path, f"not a readable npz archive ({error})") from None
