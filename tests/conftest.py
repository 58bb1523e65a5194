"""Session-scoped fixtures: synthetic phantoms and one tiny model trained once per test session."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from synomaly.config import DetectConfig, model_preset
from synomaly.synthetic import healthy_phantoms, insert_lesions

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
TINY_NOISE = {"name": "synomaly", "sigma": 1.0, "threshold": 175.0, "offset": 0.5, "direction": [1]}


@pytest.fixture(scope="session")
def phantom_train() -> torch.Tensor:
    return healthy_phantoms(512, 32, torch.Generator().manual_seed(0))[0]


@pytest.fixture(scope="session")
def phantom_test() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(healthy images, images with lesions, lesion masks): 48 each, 32x32."""
    g = torch.Generator().manual_seed(1)
    healthy, head = healthy_phantoms(48, 32, g)
    lesioned, masks = insert_lesions(healthy, head, g)
    return healthy, lesioned, masks


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, phantom_train) -> Path:
    """A tiny Synomaly model trained on healthy phantoms (about 30 s on 2 CPU cores)."""
    from synomaly.train import TrainConfig, train

    out = tmp_path_factory.mktemp("tiny_model")
    config = TrainConfig(steps=300, batch_size=16, lr=2e-3, ema_decay=0.99, checkpoint_every=100,
                         preview_every=100, progress=False, accelerator="cpu")
    detect = DetectConfig(t=200, kernel=3, threshold=0.2, min_size=4)
    return train(phantom_train, out, model=model_preset("tiny"), noise=TINY_NOISE, train_config=config, detect=detect)


@pytest.fixture(scope="session")
def intensity_model(tmp_path_factory) -> Path:
    """A model folder whose mask is exactly the bright pixels: the intensity method at 32 px on the fixed 0..255
    scale, no foreground (detect with ``kernel=1, threshold=0.5, min_size=0``: 255 is flagged, 0 is not)."""
    import numpy as np

    from synomaly.commands import run_train
    from synomaly.train import TrainConfig

    root = tmp_path_factory.mktemp("intensity")
    np.savez(root / "d.npz", healthy=np.zeros((2, 32, 32), dtype=np.uint8))
    return run_train([f"{root / 'd.npz'}:healthy"], root / "model", model="tiny", image_size=32, method="intensity",
                     preprocess={"foreground": "none", "normalization": "fixed", "intensity_range": (0, 255)},
                     train_config=TrainConfig(steps=1, progress=False, accelerator="cpu"))


@pytest.fixture(scope="module")
def trained(tiny_model_dir):
    """The session's tiny trained model, loaded once per test module."""
    from synomaly import SynomalyPipeline

    return SynomalyPipeline.from_pretrained(tiny_model_dir)


@pytest.fixture
def random_pipeline():
    """An untrained tiny pipeline with seeded weights."""
    from helpers import random_tiny_pipeline

    return random_tiny_pipeline()


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data not found at {SHARED_DATA} (it sits beside the repository in CI)")
    return SHARED_DATA
