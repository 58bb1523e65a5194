"""One-stage and multi-stage detection with masked fusion and a per-image convergence stop.

docs/method.md §3-5. Each stage noises the current input to timestep ``t``, predicts the clean
image in one network evaluation, and compares it with the ORIGINAL image. The next stage's input
is the original with the suspected region replaced by the reconstruction. An image stops when its
mask area changes by less than ``tol`` (relative); stopped images leave the batch, so they cost no
further network evaluations.

The same loop serves every method of ``synomaly.methods``: each supplies one stage's
reconstruction (the one-step prediction, AnoDDPM's reverse chain, AutoDDPM's inpainting, a
denoising autoencoder's forward pass, or ``x - p`` for a method whose output is a score map ``p``),
and optionally a weight map the difference is multiplied by (AutoDDPM's).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

from synomaly.config import DetectConfig
from synomaly.maps import above_threshold, difference_map, remove_small_components
from synomaly.methods import get_method
from synomaly.methods.base import Network, NoiseFn
from synomaly.methods.diffusion import chain_reconstruction, chain_timesteps, one_step_reconstruction
from synomaly.schedule import DiffusionSchedule

__all__ = ["DetectionOutput", "StageReconstruction", "chain_reconstruction", "chain_timesteps", "multistage_detect",
           "one_step_reconstruction", "reconstruct", "stage_cost", "stage_mask"]


@dataclass
class DetectionOutput:
    """Result of ``detect`` for a batch of ``B`` images of size ``H x W``.

    Attributes:
        reconstruction: Counterfactual healthy images of the last stage, ``[B, 1, H, W]``.
        anomaly_map: Raw ``|blur(x_0) - blur(x0_hat)|`` of the last stage, times the method's weight
            map where it has one (AutoDDPM), not thresholded, zero outside the foreground, ``[B, 1, H, W]``.
        mask: Binary anomaly mask of the last stage, ``[B, 1, H, W]`` bool.
        stages: Stages run per image, ``[B]``.
        converged: Whether each image stopped by the convergence rule (False: hit ``max_stages``).
        stage_reconstructions: Reconstruction after each stage, ``[B, S, 1, H, W]`` (S = most stages
            any image ran; an image that stopped earlier repeats its last result).
        stage_masks: Mask after each stage, ``[B, S, 1, H, W]`` bool, padded the same way.
        score: Image-level anomaly score: the mask area in pixels (the paper's image score), ``[B]``;
            ``SynomalyPipeline.detect`` puts a method's own score here (``Method.image_score``, f-AnoGAN's).
        nfe: Network evaluations spent per image, ``[B]`` (``stages`` times the evaluations of one
            reconstruction: 1, ``chain_steps`` for the reverse chain, ``chain_steps + inpaint_t *
            resamplings`` for AutoDDPM).
    """

    reconstruction: Tensor
    anomaly_map: Tensor
    mask: Tensor
    stages: Tensor
    converged: Tensor
    stage_reconstructions: Tensor
    stage_masks: Tensor
    score: Tensor
    nfe: Tensor


class StageReconstruction(NamedTuple):
    """One stage's reconstruction, the weight its difference map is multiplied by (``None``: none), and its cost."""

    image: Tensor
    weight: Tensor | None
    nfe: int


def stage_mask(
    images: Tensor, reconstructions: Tensor, config: DetectConfig, foreground: Tensor | None = None,
    thresholds: Tensor | None = None, weight: Tensor | None = None,
) -> tuple[Tensor, Tensor, np.ndarray]:
    """Anomaly map and mask of one stage (docs/method.md §4).

    ``thresholds`` (``[L]``, optional) replaces ``config.threshold`` by ``L`` thresholds at once: the mask
    is then ``[L * N, 1, H, W]``, threshold-major (the blur runs once, the components in one call).
    ``weight`` (a method's, from :func:`reconstruct`) multiplies the difference map.

    Returns:
        The raw difference map, the mask (difference >= threshold, inside the foreground, small
        components removed) and the mask areas as a host array.
    """
    diff = difference_map(images, reconstructions, config.kernel, weight)
    if foreground is not None:
        diff = diff * foreground
    if thresholds is None:
        above = above_threshold(diff, config.threshold)
    else:
        above = above_threshold(diff, thresholds.to(diff).view(-1, 1, 1, 1, 1)).flatten(0, 1)
    mask, areas = remove_small_components(above, config.min_size, config.connectivity)
    return diff, mask, areas


def stage_cost(config: DetectConfig, method: str = "diffusion") -> int:
    """Network evaluations of one stage's reconstruction by ``method`` (a ``synomaly.methods`` name)."""
    return get_method(method).cost(config)


def reconstruct(
    model: Network, schedule: DiffusionSchedule, images: Tensor, config: DetectConfig, noise: NoiseFn,
    generator: torch.Generator | None = None, method: str = "diffusion",
) -> StageReconstruction:
    """One stage's reconstruction of ``images`` by ``method``, its map weight and the network evaluations it took."""
    chosen = get_method(method)
    image, weight = chosen.reconstruct_weighted(model, schedule, images, config, noise, generator)
    return StageReconstruction(image, weight, chosen.cost(config))


@torch.no_grad()
def multistage_detect(
    model: Network,
    schedule: DiffusionSchedule,
    images: Tensor,
    config: DetectConfig,
    noise: NoiseFn,
    generator: torch.Generator | None = None,
    foreground: Tensor | None = None,
    method: str = "diffusion",
) -> DetectionOutput:
    """Run up to ``config.max_stages`` stages on ``[B, 1, H, W]`` images in [-1, 1].

    Only images still active are passed to the network; the only host transfer per stage is the
    batched connected-components call (or the mask areas when no components are removed).
    """
    n = images.shape[0]
    fg = foreground.bool() if foreground is not None else None
    fused = images.clone()
    recon, amap = torch.empty_like(images), torch.zeros_like(images)
    mask = torch.zeros_like(images, dtype=torch.bool)
    prev_area = np.full(n, float(images[0].numel()))  # stage 0 mask: all ones
    stages = np.zeros(n, dtype=np.int64)
    nfe = np.zeros(n, dtype=np.int64)
    converged = np.zeros(n, dtype=bool)
    active_idx = np.arange(n)
    active = torch.arange(n, device=images.device)
    history: list[tuple[Tensor, Tensor]] = []
    for _ in range(config.max_stages):
        x0 = images[active]
        fg_a = fg[active] if fg is not None else None
        x0_hat, weight, cost = reconstruct(model, schedule, fused[active], config, noise, generator, method)
        diff, m, area = stage_mask(x0, x0_hat, config, fg_a, weight=weight)
        share = m.to(images.dtype) if config.fusion == "binary" else diff * m
        fused[active] = share * x0_hat + (1.0 - share) * x0
        recon[active], amap[active], mask[active] = x0_hat, diff, m
        history.append((recon.clone(), mask.clone()))
        stages[active_idx] += 1
        nfe[active_idx] += cost
        change = np.abs(prev_area[active_idx] - area) / np.maximum(prev_area[active_idx], config.min_area)
        prev_area[active_idx] = area
        done = change < config.tol
        converged[active_idx[done]] = True
        if done.all():
            break
        keep = np.flatnonzero(~done)
        active_idx = active_idx[keep]
        active = active[torch.from_numpy(keep).to(images.device, non_blocking=True)]
    return DetectionOutput(
        reconstruction=recon,
        anomaly_map=amap,
        mask=mask,
        stages=torch.from_numpy(stages).to(images.device),
        converged=torch.from_numpy(converged).to(images.device),
        stage_reconstructions=torch.stack([h[0] for h in history], dim=1),
        stage_masks=torch.stack([h[1] for h in history], dim=1),
        score=mask.flatten(1).sum(1).to(images.dtype),
        nfe=torch.from_numpy(nfe).to(images.device),
    )


def check_inputs(images: Tensor, masks: Tensor | None, foreground: Tensor | None) -> None:
    """Raise ``ValueError`` unless the shapes fit: ``[N, 1, H, W]`` images, masks and foreground alike.

    Values are checked batch by batch by the pipeline.
    """
    if not isinstance(images, Tensor) or images.ndim != 4 or images.shape[1] != 1:
        shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
        raise ValueError(f"images must be a [N, 1, H, W] tensor, got {shape}")
    if images.shape[0] == 0:
        raise ValueError("no images given")
    for name, extra in (("masks", masks), ("foreground", foreground)):
        if extra is not None and (not isinstance(extra, Tensor) or extra.shape != images.shape):
            shape = tuple(extra.shape) if isinstance(extra, Tensor) else type(extra).__name__
            raise ValueError(f"{name} must be shaped like the images {tuple(images.shape)}, got {shape}")
