"""How far ``--precision bf16`` moves a trained model's masks from float32's (docs/benchmarks.md, "Speed").

Runs ``detect`` with the model folder's settings over the given slices twice, in float32 and in
bfloat16, with the same noise, and compares the masks: Dice between the two masks per slice (mean
over slices where either is non-empty) and pooled, the fraction of pixels that differ, and each
precision's Dice against the reference masks when they are given. Writes JSON and prints it.

    D=../shared/data/lgg_flair/lgg_flair.npz
    python benchmarks/precision.py benchmarks/runs/cpu/lgg_flair/synomaly/model $D:val_anomalous \\
        --masks $D:val_masks --out benchmarks/results/speed/cpu-bf16-agreement.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch
from speed import cpu_model, save

from synomaly import SynomalyPipeline
from synomaly.commands import load_labelled
from synomaly.metrics import confusion_counts, dice


def agreement(folder: str, data: list[str], masks: list[str] | None, batch: int) -> dict:
    """Masks of float32 and bfloat16 ``detect`` over ``data``, compared with each other and with ``masks``."""
    runs = {}
    cases = load_labelled(SynomalyPipeline.open(folder, "cpu"), data, masks, 2, None)
    foreground = cases.foreground
    for precision in ("32", "bf16"):
        pipe = SynomalyPipeline.open(folder, "cpu", precision)
        outs = []
        for start in range(0, len(cases.images), batch):
            part = slice(start, start + batch)
            g = torch.Generator().manual_seed(start)
            outs.append(pipe.detect(cases.images[part], g, None if foreground is None else foreground[part]).mask)
        runs[precision] = torch.cat(outs)
    a, b = runs["32"], runs["bf16"]
    either = (a | b).flatten(1).any(1)
    per_slice = dice(confusion_counts(a[either], b[either]))
    pooled = dice(confusion_counts(a.reshape(1, 1, 1, -1), b.reshape(1, 1, 1, -1)))
    result = {"model": folder, "data": data, "slices": len(a), "slices_with_a_mask": int(either.sum()),
              "dice_between_mean": float(per_slice.mean()), "dice_between_pooled": float(pooled),
              "pixels_differing": float((a != b).float().mean())}
    if cases.masks is not None:
        lesioned = cases.masks.flatten(1).any(1)
        for precision, mask in runs.items():
            result[f"dice_reference_mean_{precision}"] = float(dice(confusion_counts(mask[lesioned], cases.masks[lesioned])).mean())
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="model folder")
    parser.add_argument("data", nargs="+", help="sources of slices, e.g. bundle.npz:val_anomalous")
    parser.add_argument("--masks", nargs="+", default=None, help="reference masks, one source per data source")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--threads", type=int, default=0, help="CPU threads of torch (0: torch's default)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    result = agreement(args.model, args.data, args.masks, args.batch)
    threads = torch.get_num_threads()
    result.update({"device": f"{cpu_model()}, {threads} thread{'s' if threads > 1 else ''}", "torch": torch.__version__,
                   "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip(),
                   "command": "python benchmarks/precision.py " + " ".join(sys.argv[1:])})
    print(json.dumps(result, indent=1))
    save(result, args.out)


if __name__ == "__main__":
    main()
