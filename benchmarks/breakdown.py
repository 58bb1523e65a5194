"""Where the test Dice comes from: per lesion-size tercile and per class, from the evaluation folders.

    python benchmarks/breakdown.py --profile cpu --dataset busi

Reads ``<runs>/<profile>/<dataset>/<method>/evaluation/per_case.csv`` (written by ``run.py``) and
prints, per method, the mean Dice over all tumour slices, over each third of them by lesion area
(pixels at the model's resolution, terciles of the test set) and per class where the group ids
carry one (``busi``: benign / malignant), and the share of tumour slices with Dice below 0.1.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent


def breakdown(per_case: Path) -> dict[str, float]:
    rows = [row for row in csv.DictReader(per_case.open()) if row["anomalous"] == "True"]
    dice = np.array([float(row["dice"]) for row in rows])
    area = np.array([int(row["tp"]) + int(row["fn"]) for row in rows])
    low, high = np.percentile(area, [100 / 3, 200 / 3])
    out = {"all": dice.mean(), f"small (<= {low:.0f} px)": dice[area <= low].mean(),
           "middle": dice[(area > low) & (area <= high)].mean(),
           f"large (> {high:.0f} px)": dice[area > high].mean()}
    classes = np.array([row["group_id"].split(" ")[0] for row in rows])
    if len(set(classes)) < 10:  # class names, not one id per patient
        for name in sorted(set(classes)):
            out[f"{name} (n={(classes == name).sum()})"] = dice[classes == name].mean()
    out["Dice < 0.1"] = (dice < 0.1).mean()
    return out


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--profile", default="cpu")
    parser.add_argument("--dataset", default="lgg_flair")
    parser.add_argument("--runs", type=Path, default=ROOT / "benchmarks" / "runs")
    args = parser.parse_args(argv)
    folder = args.runs / args.profile / args.dataset
    files = sorted(folder.glob("*/evaluation/per_case.csv"))
    if not files:
        raise SystemExit(f"breakdown: {folder}: no */evaluation/per_case.csv (run benchmarks/run.py first)")
    table = {path.parent.parent.name: breakdown(path) for path in files}
    columns = list(next(iter(table.values())))
    print("| method | " + " | ".join(columns) + " |\n|---|" + "---:|" * len(columns))
    for method, row in table.items():
        print(f"| `{method}` | " + " | ".join(f"{row.get(c, float('nan')):.3f}" for c in columns) + " |")
    return table


if __name__ == "__main__":
    main()
