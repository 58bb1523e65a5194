"""Add the per-volume numbers to benchmark results made before ``evaluate`` measured them, without retraining.

    python benchmarks/volumes.py --profile cpu --dataset lgg_flair           # from the stored evaluation folders
    python benchmarks/volumes.py --profile cpu --dataset lgg_flair --rerun   # re-evaluate the stored models where needed

Each result ``benchmarks/results/<profile>/<dataset>/<method>.json`` is matched with its evaluation folder
``benchmarks/runs/<profile>/<dataset>/<method>/evaluation`` (the same test Dice, else it is left alone). An
evaluation made since ``evaluate`` measures lesions gives every per-volume number; an older one gives the 3-D
Dice and the lesion-volume error (from the voxel counts of ``per_volume.csv``) but no lesion counts, which need
the masks: ``--rerun`` evaluates the stored, calibrated model on the test split again (no training) into
``evaluation-volumes`` (kept: a later call uses it as it is) and takes them from there when its test Dice matches
the result's. The record says where its numbers came from (``per_volume_from``). Then ``python benchmarks/render.py``.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import DATASETS, METHODS, PROFILES, ROOT, VOLUME_KEYS, commit, foreground_of  # noqa: E402

from synomaly import _atomic  # noqa: E402
from synomaly._json import json_safe  # noqa: E402

log = logging.getLogger("benchmark")
SAME_DICE = 1e-6  # a re-evaluation on other hardware may differ in the last bits of a float sum


def from_folder(folder: Path) -> tuple[dict[str, Any], str] | None:
    """The per-volume numbers an evaluation folder holds, and how complete they are; ``None`` without any."""
    metrics = json.loads((folder / "metrics.json").read_text())
    aggregate = metrics["aggregate"]
    if aggregate.get("lesion_sensitivity_n") is not None:
        return {key: aggregate.get(key) for key in ("dice_volume_mean", *VOLUME_KEYS)}, "evaluation"
    table = folder / "per_volume.csv"
    if not table.is_file():
        return None
    with table.open(newline="") as f:
        rows = list(csv.DictReader(f))
    errors = [(int(r["tp"]) + int(r["fp"])) - (int(r["tp"]) + int(r["fn"])) for r in rows]  # predicted - reference voxels
    return {"dice_volume_mean": aggregate.get("dice_volume_mean"), "n_volumes": len(rows),
            "lesion_volume_error_mean": sum(errors) / len(errors),
            "lesion_volume_abs_error_mean": sum(abs(e) for e in errors) / len(errors),
            "lesion_volume_unit": "voxels"}, "per_volume.csv (voxel counts; no lesion counts)"


def reevaluate(name: str, profile: str, dataset: str, runs: Path, data_root: Path, device: str, made_at: str) -> Path:
    """Evaluate the stored model of ``name`` on the test split as ``benchmarks/run.py`` does; returns the folder."""
    from synomaly.commands import run_evaluate

    data = data_root / DATASETS[dataset].file
    base = runs / profile / dataset / name
    test = [f"{data}:test_anomalous", f"{data}:test_healthy"]
    log.info("re-evaluating %s on test (no training)", name)
    out = base / "evaluation-volumes"
    run_evaluate(base / "model", test, [f"{data}:test_masks", "none"], out,
                 foreground_masks=foreground_of(METHODS[name], DATASETS[dataset], test),
                 batch_size=PROFILES[profile].detect_batch, device=device, overwrite=True)
    metrics = json.loads((out / "metrics.json").read_text())
    metrics["made_at"] = {"commit": made_at, "date": time.strftime("%Y-%m-%d")}
    _atomic.write_json(out / "metrics.json", metrics)
    return out


def same_evaluation(record: dict[str, Any], folder: Path) -> bool:
    """Whether ``folder`` holds the evaluation the result was made from (the same test Dice)."""
    if not (folder / "metrics.json").is_file():
        return False
    dice = json.loads((folder / "metrics.json").read_text())["aggregate"].get("dice_mean")
    return dice is not None and abs(dice - record["metrics"]["dice_mean"]) <= SAME_DICE


def fill(path: Path, runs: Path, data_root: Path, rerun: bool, device: str, made_at: str = "") -> str:
    """Add the per-volume numbers to one result file; returns what was done, in words."""
    record = json.loads(path.read_text())
    if record["metrics"].get("lesion_sensitivity_n") is not None:
        return "complete already"
    name, profile, dataset = record["method"], record["profile"], record["dataset"]
    folder = runs / profile / dataset / name / "evaluation"
    found = from_folder(folder) if same_evaluation(record, folder) else None
    again = folder.with_name("evaluation-volumes")
    if (found is None or found[1] != "evaluation") and (rerun or again.is_dir()):
        if not same_evaluation(record, again):  # an earlier --rerun's folder is used as it is
            reevaluate(name, profile, dataset, runs, data_root, device, made_at or commit())
        if same_evaluation(record, again):
            found = from_folder(again)
            assert found is not None  # a new evaluation holds them
            made = json.loads((again / "metrics.json").read_text()).get("made_at", {})
            found = found[0], f"re-evaluated the stored model ({made.get('commit', 'commit unknown')}, {made.get('date', '')})"
        else:
            log.warning("%s: the re-evaluation's test Dice differs from the result's; not used", name)
    if found is None:
        return f"no evaluation folder matching it under {runs}"
    numbers, source = found
    record["metrics"].update(numbers)
    record["per_volume_from"] = source
    _atomic.write_json(path, json_safe(record))
    return f"filled from {source}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--profile", required=True, choices=sorted(PROFILES))
    parser.add_argument("--dataset", default="lgg_flair", choices=list(DATASETS))
    parser.add_argument("--methods", nargs="+", default=None, choices=list(METHODS), help="default: every result present")
    parser.add_argument("--rerun", action="store_true", help="re-evaluate stored models whose folders lack the lesion counts")
    parser.add_argument("--runs", type=Path, default=ROOT / "benchmarks" / "runs")
    parser.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--data-root", type=Path, default=ROOT.parent / "shared" / "data")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    folder = args.results / args.profile / args.dataset
    names = args.methods or [m for m in METHODS if (folder / f"{m}.json").is_file()]
    made_at = commit()  # before this script changes any result file
    for name in names:
        path = folder / f"{name}.json"
        done = fill(path, args.runs, args.data_root, args.rerun, args.device, made_at) if path.is_file() else "no result"
        log.info("%s: %s", name, done)
    return 0


if __name__ == "__main__":
    sys.exit(main())
