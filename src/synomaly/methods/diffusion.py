"""Synomaly and the DDPM baselines: an epsilon-predicting diffusion model (docs/method.md).

Training adds the training noise (Synomaly: Gaussian plus intensity-shifted blobs; or Gaussian,
simplex, coarse, pyramid) at a random timestep and learns to predict it. Inference noises the
input to ``t`` and predicts ``x_0`` in one evaluation (the paper's rule), walks AnoDDPM's
reverse chain from ``t`` (``sampler="chain"``), or inpaints that chain's suspected region by
AutoDDPM's mask, stitch and re-sample (``sampler="autoddpm"``, ``synomaly.methods.autoddpm``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from synomaly.config import DetectConfig
from synomaly.methods.autoddpm import autoddpm_reconstruction, inpainting_cost
from synomaly.methods.base import Method, Network, NoiseFn
from synomaly.schedule import DiffusionSchedule


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


class Diffusion(Method):
    name = "diffusion"
    description = "diffusion model predicting the training noise (Synomaly, DDPM baselines)"
    uses_timestep = True

    def loss(self, unet: nn.Module, schedule: DiffusionSchedule, noise: NoiseFn, x: Tensor, foreground: Tensor | None,
             target: Tensor | None, kind: str) -> Tensor:
        t = schedule.sample_timesteps(x.shape[0], x.device)
        n = noise(x, foreground=foreground)
        x_t = schedule.q_sample(x, t, n)
        return schedule.loss(unet(x_t, t).float(), n, x, x_t, t, kind)

    def reconstruct(self, model: Network, schedule: DiffusionSchedule, images: Tensor, config: DetectConfig,
                    noise: NoiseFn, generator: torch.Generator | None = None) -> Tensor:
        return self.reconstruct_weighted(model, schedule, images, config, noise, generator)[0]

    def reconstruct_weighted(self, model: Network, schedule: DiffusionSchedule, images: Tensor, config: DetectConfig,
                             noise: NoiseFn, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor | None]:
        if config.sampler == "one-step":
            return one_step_reconstruction(model, schedule, images, config.t, noise, generator), None
        chain = chain_reconstruction(model, schedule, images, config.t, config.chain_steps, noise, generator)
        if config.sampler == "chain":
            return chain, None
        return autoddpm_reconstruction(model, schedule, images, chain, config, noise, generator)

    def cost(self, config: DetectConfig) -> int:
        if config.sampler == "one-step":
            return 1
        chain = len(chain_timesteps(config.t, config.chain_steps))
        return chain + inpainting_cost(config) if config.sampler == "autoddpm" else chain

    def detect_defaults(self, noise: str, areas: dict[str, Any]) -> DetectConfig:
        # Synomaly noise is for training only: inference adds Gaussian noise. The DDPM baselines add their own.
        return DetectConfig(noise="gaussian" if noise == "synomaly" else noise, **areas)

    def preview(self, unet: nn.Module, schedule: DiffusionSchedule, images: Tensor, noise: NoiseFn) -> tuple[Tensor, Tensor]:
        """Noised at t = T/4 with the training noise, and its one-step reconstruction."""
        t = torch.full((images.shape[0],), schedule.num_timesteps // 4, device=images.device, dtype=torch.long)
        x_t = schedule.q_sample(images, t, noise(images))
        return x_t, schedule.predict_x0(x_t, t, unet(x_t, t).float())
