"""One stage versus multi-stage on the synthetic phantoms of the end-to-end test (tiny model, 32 px).

Trains the same tiny model as ``tests/conftest.py`` (300 steps on 512 healthy phantoms), then
detects the inserted lesions of 48 test phantoms with one stage and with up to 5 stages and
prints pixel AP (raw map), mean Dice over the lesioned images and network evaluations per image.

    python benchmarks/phantoms.py --out /tmp/phantom_model
"""

from __future__ import annotations

import argparse
import tempfile

import torch
from sklearn.metrics import average_precision_score

from synomaly import SynomalyPipeline
from synomaly.config import DetectConfig, model_preset
from synomaly.synthetic import healthy_phantoms, insert_lesions
from synomaly.train import TrainConfig, train


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="model folder (default: a temporary one)")
    args = parser.parse_args()
    out = args.out or tempfile.mkdtemp()
    healthy = healthy_phantoms(512, 32, torch.Generator().manual_seed(0))[0]
    config = TrainConfig(steps=300, batch_size=16, lr=2e-3, ema_decay=0.99, checkpoint_every=100, preview_every=0,
                         progress=False, accelerator="cpu")
    train(healthy, out, model=model_preset("tiny"), noise={"name": "synomaly", "sigma": 1.0, "threshold": 175.0},
          train_config=config, detect=DetectConfig(t=200, kernel=3, threshold=0.2, min_size=4), overwrite=True)
    g = torch.Generator().manual_seed(1)
    test_healthy, head = healthy_phantoms(48, 32, g)
    lesioned, masks = insert_lesions(test_healthy, head, g)
    pipe = SynomalyPipeline.from_pretrained(out)
    print(f"lesion prevalence {masks.float().mean():.4f}")
    print("| stages | AP (pixel, raw map) | Dice (mean over images) | NFE per image |\n|---|---:|---:|---:|")
    for max_stages in (1, 5):
        o = pipe.detect(lesioned, generator=torch.Generator().manual_seed(0), max_stages=max_stages)
        ap = average_precision_score(masks.flatten().numpy(), o.anomaly_map.flatten().numpy())
        inter = (o.mask & masks).flatten(1).sum(1)
        dice = (2 * inter / (o.mask.flatten(1).sum(1) + masks.flatten(1).sum(1))).mean()
        print(f"| {'one' if max_stages == 1 else 'up to 5'} | {ap:.3f} | {dice:.3f} | {o.stages.float().mean():.2f} |")


if __name__ == "__main__":
    main()
