"""Helpers shared by the tests: small models and reference computations written independently of the package."""

from __future__ import annotations

import numpy as np
import torch

from synomaly import SynomalyPipeline
from synomaly.config import PipelineConfig, model_preset
from synomaly.model import build_unet


def random_tiny_pipeline(seed: int = 0) -> SynomalyPipeline:
    """An untrained ``tiny`` pipeline (32 px) with seeded weights."""
    torch.manual_seed(seed)
    return SynomalyPipeline(build_unet(model_preset("tiny")), PipelineConfig(model=model_preset("tiny")))


def per_slice_dice(pred: torch.Tensor, target: torch.Tensor) -> np.ndarray:
    """Dice of each ``[N, ...]`` bool mask pair; both empty counts as 1 (the package's convention)."""
    inter = (pred & target).flatten(1).sum(1).double()
    total = (pred.flatten(1).sum(1) + target.flatten(1).sum(1)).double()
    return torch.where(total > 0, 2 * inter / total.clamp(min=1), torch.ones_like(total)).numpy()
