"""Test Dice per stage of a calibrated model folder under several inference-noise seeds.

    python benchmarks/seed_variance.py benchmarks/runs/cpu/lgg_flair/synomaly/model --seeds 0 1 2

Shows how much of a Dice difference the inference noise alone can make.
"""

from __future__ import annotations

import argparse
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main(argv: list[str] | None = None) -> None:
    from synomaly.commands import load_labelled
    from synomaly.evaluate import evaluate
    from synomaly.pipeline import SynomalyPipeline

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path)
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "lgg_flair" / "lgg_flair.npz"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args(argv)
    pipe = SynomalyPipeline.from_pretrained(args.model)
    cases = load_labelled(pipe, [f"{args.data}:test_anomalous"], [f"{args.data}:test_masks"], 2, None)
    print(f"{args.model}: {pipe.detect_config()}")
    for seed in args.seeds:
        result = evaluate(pipe, cases.images, cases.masks, case_ids=cases.case_ids, foreground=cases.foreground,
                          batch_size=args.batch_size, seed=seed, progress=False)
        per_stage = result.metrics["aggregate"]["dice_per_stage"]
        print(f"seed {seed}: test Dice after at most k stages, k = 1..{len(per_stage)}: "
              + " ".join(f"{v:.3f}" for v in per_stage))


if __name__ == "__main__":
    main()
