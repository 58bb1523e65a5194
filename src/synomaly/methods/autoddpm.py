"""AutoDDPM (Bercea et al. 2023, "Mask, Stitch, and Re-Sample"): the diffusion method's ``autoddpm`` sampler.

Given the reverse-chain reconstruction ``x_rec`` of an image ``x`` (``synomaly.methods.diffusion``):

1. mask: the perceptual map of ``(x, x_rec)`` times the residual ``|x - x_rec|`` divided by each image's
   95th percentile and clipped to [0, 1]; pixels above ``mask_threshold`` (default: each image's 95th
   percentile of that product), dilated by a ``dilation`` square;
2. stitch and re-sample: RePaint (Lugmayr et al. 2022) from ``x_rec`` noised to ``inpaint_t``: at every
   timestep the region outside the mask is the input noised to the next level, the region inside it
   the model's ancestral step, with ``resamplings`` evaluations per timestep;
3. the final map is the residual of the inpainted image times the product of step 1, as in the authors'
   code; the detection loop applies it through ``Method.reconstruct_weighted``.

The perceptual map is the local SSIM dissimilarity ``(1 - SSIM) / 2`` (MONAI's SSIM, 11 px Gaussian
window, sigma 1.5) instead of the original's LPIPS on an ImageNet SqueezeNet (docs/method.md, §7).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from synomaly.config import DetectConfig
from synomaly.methods.base import Network, NoiseFn
from synomaly.schedule import DiffusionSchedule

SSIM_WINDOW, SSIM_SIGMA = 11, 1.5  # Wang et al. 2004, as synomaly.metrics.ssim
MASK_PERCENTILE = 0.95  # the authors' per-image rule (residual normalisation, and the mask without a threshold)


def ssim_dissimilarity(images: Tensor, reconstructions: Tensor, data_range: float = 2.0) -> Tensor:
    """Local ``(1 - SSIM) / 2`` in [0, 1] of ``[B, 1, H, W]`` pairs, the input's size (reflect-padded borders)."""
    from monai.metrics.regression import compute_ssim_and_cs

    pad = (SSIM_WINDOW // 2,) * 4
    ssim, _ = compute_ssim_and_cs(F.pad(reconstructions, pad, mode="reflect"), F.pad(images, pad, mode="reflect"),
                                  spatial_dims=2, kernel_size=(SSIM_WINDOW,) * 2, kernel_sigma=(SSIM_SIGMA,) * 2,
                                  data_range=data_range)
    return ((1.0 - ssim) / 2.0).clamp(0.0, 1.0).to(images.dtype)


def image_quantile(maps: Tensor, q: float) -> Tensor:
    """Each image's ``q``-quantile of ``[B, ...]`` maps as ``[B, 1, 1, 1]`` (linear interpolation, as ``np.percentile``).

    ``kthvalue`` rather than ``torch.quantile``, which refuses inputs of more than 2^24 values.
    """
    flat = maps.flatten(1)
    position = q * (flat.shape[1] - 1)
    low, frac = int(position), position - int(position)
    below = flat.kthvalue(low + 1, dim=1).values
    above = flat.kthvalue(min(low + 2, flat.shape[1]), dim=1).values
    return (below + frac * (above - below)).view(-1, 1, 1, 1)


def perceptual_residual_map(images: Tensor, reconstructions: Tensor, perceptual: str = "ssim") -> Tensor:
    """Step 1's map in [0, 1]: the perceptual map times the residual scaled by each image's 95th percentile."""
    if perceptual != "ssim":
        raise ValueError(f"unknown perceptual map {perceptual!r}; valid: ssim")
    residual = (images - reconstructions).abs()
    scaled = (residual / image_quantile(residual, MASK_PERCENTILE).clamp_min(torch.finfo(residual.dtype).tiny)).clamp(0.0, 1.0)
    return ssim_dissimilarity(images, reconstructions) * scaled


def dilate(masks: Tensor, size: int) -> Tensor:
    """Binary dilation of ``[B, 1, H, W]`` masks by a ``size x size`` square (OpenCV's ``dilate`` with a ones kernel)."""
    if size == 1:
        return masks.bool()
    return F.max_pool2d(masks.float(), size, stride=1, padding=size // 2).bool()


def inpainting_mask(weight: Tensor, config: DetectConfig) -> Tensor:
    """Step 1's mask: ``weight`` above ``config.mask_threshold`` (default each image's 95th percentile), dilated."""
    threshold = image_quantile(weight, MASK_PERCENTILE) if config.mask_threshold is None else config.mask_threshold
    return dilate(weight > threshold, config.dilation)


def repaint(
    model: Network, schedule: DiffusionSchedule, images: Tensor, start: Tensor, mask: Tensor, t: int, resamplings: int,
    noise: NoiseFn, generator: torch.Generator | None = None,
) -> Tensor:
    """Inpaint ``mask`` of ``images`` by RePaint from ``start`` noised to ``t``; outside ``mask`` the result is ``images``.

    Timesteps ``t, ..., 1``, each ``resamplings`` times: the known part is ``images`` noised to
    ``s = step - 1``; the unknown part is an ancestral step ``x_s ~ q(x_s | x_step, x0_hat)`` of the
    stitched image; between the evaluations of one timestep the stitched ``x_s`` is noised back,
    ``x_step = sqrt(1 - beta_step) x_s + sqrt(beta_step) n``. ``t * resamplings`` network evaluations.
    """
    n = images.shape[0]

    def at(step: int) -> Tensor:
        return torch.full((n,), step, device=images.device, dtype=torch.long)

    x = schedule.q_sample(start, at(t), noise(images, generator=generator))
    for step in range(t, 0, -1):
        timesteps, std = at(step), schedule.posterior_log_variance[step].mul(0.5).exp()
        for jump in range(resamplings):
            known = schedule.q_sample(images, at(step - 1), noise(images, generator=generator))
            x0_hat = schedule.predict_x0(x, timesteps, model(x, timesteps).to(images.dtype))
            unknown = schedule.q_posterior_mean(x0_hat, x, timesteps) + std * noise(images, generator=generator)
            x = torch.where(mask, unknown, known)
            if jump < resamplings - 1:
                beta = schedule.betas[step]
                x = (1.0 - beta).sqrt() * x + beta.sqrt() * noise(images, generator=generator)
    return torch.where(mask, x.clamp(-1.0, 1.0), images)


def autoddpm_reconstruction(
    model: Network, schedule: DiffusionSchedule, images: Tensor, first: Tensor, config: DetectConfig, noise: NoiseFn,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """Steps 1-3 from the first reconstruction ``first``: the inpainted image and the map weight (step 1's map)."""
    weight = perceptual_residual_map(images, first, config.perceptual)
    mask = inpainting_mask(weight, config)
    return repaint(model, schedule, images, first, mask, config.inpaint_t, config.resamplings, noise, generator), weight


def inpainting_cost(config: DetectConfig) -> int:
    """Network evaluations of step 2."""
    return config.inpaint_t * config.resamplings
