"""One-stage and multi-stage detection with masked fusion and a per-image convergence stop.

METHOD.md sections 3-5. Each stage noises the current input to timestep ``t``, predicts the clean
image in one network evaluation, and compares it with the ORIGINAL image. The next stage's input
is the original with the suspected region replaced by the reconstruction. An image stops when its
mask area changes by less than ``tol`` (relative); stopped images leave the batch, so they cost no
further network evaluations.

The same loop serves the baselines (``reconstruct``): AnoDDPM's reverse chain instead of the
one-step prediction (``sampler="chain"``), a denoising autoencoder (one forward pass of the input),
and the supervised upper bound, whose lesion probability ``p`` takes the place of the difference
map (its "reconstruction" is ``x - p``, so ``|blur(x) - blur(x - p)| = blur(p)`` and thresholds,
components and metrics apply unchanged; it is not a counterfactual image).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from synomaly.config import DetectConfig
from synomaly.maps import above_threshold, difference_map, remove_small_components
from synomaly.schedule import DiffusionSchedule

NoiseFn = Callable[..., Tensor]
Network = Callable[[Tensor, Tensor], Tensor]  # unet(x, t): an nn.Module or a wrapper such as SynomalyPipeline.network


@dataclass
class DetectionOutput:
    """Result of ``detect`` for a batch of ``B`` images of size ``H x W``.

    Attributes:
        reconstruction: Counterfactual healthy images of the last stage, ``[B, 1, H, W]``.
        anomaly_map: Raw ``|blur(x_0) - blur(x0_hat)|`` of the last stage (not thresholded; zero
            outside the foreground), ``[B, 1, H, W]``.
        mask: Binary anomaly mask of the last stage, ``[B, 1, H, W]`` bool.
        stages: Stages run per image, ``[B]``.
        converged: Whether each image stopped by the convergence rule (False: hit ``max_stages``).
        stage_reconstructions: Reconstruction after each stage, ``[B, S, 1, H, W]`` (S = most stages
            any image ran; an image that stopped earlier repeats its last result).
        stage_masks: Mask after each stage, ``[B, S, 1, H, W]`` bool, padded the same way.
        score: Image-level anomaly score: the mask area in pixels (the paper's image score), ``[B]``.
        nfe: Network evaluations spent per image, ``[B]`` (``stages`` times the evaluations of one
            reconstruction: 1, or ``chain_steps`` for the reverse chain).
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


def stage_mask(
    images: Tensor, reconstructions: Tensor, config: DetectConfig, foreground: Tensor | None = None
) -> tuple[Tensor, Tensor, np.ndarray]:
    """Anomaly map and mask of one stage (METHOD.md section 4).

    Returns:
        The raw difference map, the mask (difference >= threshold, inside the foreground, small
        components removed) and the mask areas as a host array.
    """
    diff = difference_map(images, reconstructions, config.kernel)
    if foreground is not None:
        diff = diff * foreground
    mask, areas = remove_small_components(above_threshold(diff, config.threshold), config.min_size, config.connectivity)
    return diff, mask, areas


def one_step_reconstruction(
    model: Network, schedule: DiffusionSchedule, images: Tensor, t: int, noise: NoiseFn,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Noise ``images`` to timestep ``t`` and predict ``x_0`` with one network evaluation."""
    timesteps = torch.full((images.shape[0],), t, device=images.device, dtype=torch.long)
    x_t = schedule.q_sample(images, timesteps, noise(images, generator=generator))
    eps = model(x_t, timesteps).to(images.dtype)
    return schedule.predict_x0(x_t, timesteps, eps)


def chain_timesteps(t: int, steps: int) -> list[int]:
    """The timesteps the reverse chain visits: ``steps`` values spaced evenly from ``t`` down to 0."""
    return sorted({round(t * i / max(steps - 1, 1)) for i in range(steps)}, reverse=True) if steps > 1 else [t]


def chain_reconstruction(
    model: Network, schedule: DiffusionSchedule, images: Tensor, t: int, steps: int, noise: NoiseFn,
    generator: torch.Generator | None = None,
) -> Tensor:
    """AnoDDPM's reconstruction: noise to ``t``, then walk the ancestral reverse chain down to 0.

    The chain is respaced (Nichol & Dhariwal 2021) over :func:`chain_timesteps`; each step predicts
    ``x_0``, takes the mean of ``q(x_s | x_t, x0_hat)`` and adds the inference noise (simplex for
    AnoDDPM) scaled by its standard deviation. The last step returns ``x0_hat``.
    """
    visits = chain_timesteps(t, steps)
    abar = schedule.alphas_cumprod
    x = schedule.q_sample(images, torch.full((images.shape[0],), t, device=images.device, dtype=torch.long),
                          noise(images, generator=generator))
    for i, step in enumerate(visits):
        timesteps = torch.full((images.shape[0],), step, device=images.device, dtype=torch.long)
        x0_hat = schedule.predict_x0(x, timesteps, model(x, timesteps).to(images.dtype))
        if i == len(visits) - 1:
            return x0_hat
        a_t, a_s = abar[step], abar[visits[i + 1]]
        beta = 1.0 - a_t / a_s
        mean = (a_s.sqrt() * beta / (1.0 - a_t)) * x0_hat + ((1.0 - beta).sqrt() * (1.0 - a_s) / (1.0 - a_t)) * x
        x = mean + (beta * (1.0 - a_s) / (1.0 - a_t)).sqrt() * noise(images, generator=generator)
    raise AssertionError("unreachable")


def stage_cost(config: DetectConfig, method: str = "diffusion") -> int:
    """Network evaluations of one stage's reconstruction."""
    chain = method == "diffusion" and config.sampler == "chain"
    return len(chain_timesteps(config.t, config.chain_steps)) if chain else 1


def reconstruct(
    model: Network, schedule: DiffusionSchedule, images: Tensor, config: DetectConfig, noise: NoiseFn,
    generator: torch.Generator | None = None, method: str = "diffusion",
) -> tuple[Tensor, int]:
    """One stage's reconstruction of ``images`` and the network evaluations it took.

    ``method`` is the model folder's (``diffusion``, ``dae``, ``supervised``; see the module docstring).
    """
    cost = stage_cost(config, method)
    if method == "diffusion" and config.sampler == "chain":
        return chain_reconstruction(model, schedule, images, config.t, config.chain_steps, noise, generator), cost
    if method == "diffusion":
        return one_step_reconstruction(model, schedule, images, config.t, noise, generator), cost
    zero = torch.zeros(images.shape[0], device=images.device, dtype=torch.long)
    out = model(images, zero).to(images.dtype)
    if method == "dae":
        return out.clamp(-1.0, 1.0), cost
    return images - torch.sigmoid(out), cost


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
        x0_hat, cost = reconstruct(model, schedule, fused[active], config, noise, generator, method)
        diff, m, area = stage_mask(x0, x0_hat, config, fg_a)
        weight = m.to(images.dtype) if config.fusion == "binary" else diff * m
        fused[active] = weight * x0_hat + (1.0 - weight) * x0
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
