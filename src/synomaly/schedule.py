"""Diffusion schedule as module buffers: forward process, one-step x0 and training losses.

Notation follows docs/method.md §0: ``abar_t`` is the cumulative product of ``1 - beta``;
``x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) n``. Timesteps are per sample (a ``[B]`` tensor),
unlike MONAI's schedulers, which take one scalar timestep per batch.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from synomaly.config import LOSSES, SCHEDULES, ScheduleConfig


def cosine_betas(num_timesteps: int, s: float = 0.008, max_beta: float = 0.999) -> Tensor:
    """Cosine schedule (Nichol & Dhariwal 2021, eq. 17).

    ``abar(t) = cos^2(((t/T) + s) / (1 + s) * pi/2)``, ``beta_t = min(1 - abar(t+1)/abar(t), max_beta)``.
    """
    steps = torch.arange(num_timesteps + 1, dtype=torch.float64) / num_timesteps
    abar = torch.cos((steps + s) / (1 + s) * math.pi / 2) ** 2
    return torch.clamp(1 - abar[1:] / abar[:-1], max=max_beta)


def linear_betas(num_timesteps: int) -> Tensor:
    """Linear schedule (Ho et al. 2020) from 1e-4 to 0.02, scaled by ``1000 / T``."""
    scale = 1000.0 / num_timesteps
    return torch.linspace(scale * 1e-4, scale * 0.02, num_timesteps, dtype=torch.float64)


class DiffusionSchedule(nn.Module):
    """Beta schedule and the derived quantities, registered as buffers so ``.to(device)`` moves them.

    Args:
        kind: ``cosine`` or ``linear``.
        num_timesteps: Number of diffusion steps T.
    """

    # The buffers registered in __init__ (float32 tables indexed by t).
    betas: Tensor
    alphas_cumprod: Tensor
    sqrt_alphas_cumprod: Tensor
    sqrt_one_minus_alphas_cumprod: Tensor
    posterior_log_variance: Tensor
    posterior_mean_coef1: Tensor
    posterior_mean_coef2: Tensor

    def __init__(self, kind: str = "cosine", num_timesteps: int = 1000) -> None:
        super().__init__()
        if kind not in SCHEDULES:
            raise ValueError(f"unknown schedule {kind!r}; valid schedules: {', '.join(SCHEDULES)}")
        self.kind = kind
        self.num_timesteps = num_timesteps
        betas = cosine_betas(num_timesteps) if kind == "cosine" else linear_betas(num_timesteps)
        abar = torch.cumprod(1.0 - betas, dim=0)
        abar_prev = torch.cat([torch.ones(1, dtype=torch.float64), abar[:-1]])
        posterior_variance = betas * (1.0 - abar_prev) / (1.0 - abar)
        tables = {
            "betas": betas,
            "alphas_cumprod": abar,
            "sqrt_alphas_cumprod": abar.sqrt(),
            "sqrt_one_minus_alphas_cumprod": (1.0 - abar).sqrt(),
            # The posterior variance is 0 at t = 0; its log is clipped to the t = 1 value.
            "posterior_log_variance": torch.log(torch.cat([posterior_variance[1:2], posterior_variance[1:]])),
            "posterior_mean_coef1": betas * abar_prev.sqrt() / (1.0 - abar),
            "posterior_mean_coef2": (1.0 - abar_prev) * (1.0 - betas).sqrt() / (1.0 - abar),
        }
        for name, table in tables.items():
            self.register_buffer(name, table.float(), persistent=False)

    @classmethod
    def from_config(cls, config: ScheduleConfig) -> DiffusionSchedule:
        """Build from a ``ScheduleConfig``."""
        return cls(config.kind, config.num_timesteps)

    def _at(self, table: Tensor, t: Tensor, like: Tensor) -> Tensor:
        """``table[t]`` shaped to broadcast over ``like`` (``[B] -> [B, 1, ..., 1]``)."""
        return table[t].to(like.dtype).reshape(-1, *([1] * (like.ndim - 1)))

    def sample_timesteps(self, batch: int, device: torch.device, generator: torch.Generator | None = None) -> Tensor:
        """``t ~ Uniform{0, ..., T-1}``, one per sample."""
        return torch.randint(0, self.num_timesteps, (batch,), device=device, generator=generator)

    def q_sample(self, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        """Forward process ``x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) n``."""
        return self._at(self.sqrt_alphas_cumprod, t, x0) * x0 + self._at(self.sqrt_one_minus_alphas_cumprod, t, x0) * noise

    def predict_x0(self, x_t: Tensor, t: Tensor, eps: Tensor, clamp: bool = True) -> Tensor:
        """One-step estimate ``x0_hat = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t)``, clamped to [-1, 1]."""
        x0 = (x_t - self._at(self.sqrt_one_minus_alphas_cumprod, t, x_t) * eps) / self._at(self.sqrt_alphas_cumprod, t, x_t)
        return x0.clamp(-1.0, 1.0) if clamp else x0

    def q_posterior_mean(self, x0: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        """Mean of ``q(x_{t-1} | x_t, x_0)`` (Ho et al. 2020, eq. 7)."""
        return self._at(self.posterior_mean_coef1, t, x_t) * x0 + self._at(self.posterior_mean_coef2, t, x_t) * x_t

    def loss(self, eps_pred: Tensor, noise: Tensor, x0: Tensor, x_t: Tensor, t: Tensor, kind: str = "mse") -> Tensor:
        """Training loss, averaged over the batch.

        ``mse``: ``mean (eps_theta - n)^2``. ``hybrid``: MSE plus the variational bound with the
        variance fixed to the (clipped) posterior variance: ``KL(q(x_{t-1}|x_t,x_0) || p(x_{t-1}|x_t))``
        in bits per pixel for ``t > 0`` and the discretised decoder NLL at ``t = 0``.
        """
        if kind not in LOSSES:
            raise ValueError(f"unknown loss {kind!r}; valid losses: {', '.join(LOSSES)}")
        mse = ((eps_pred - noise) ** 2).mean()
        if kind == "mse":
            return mse
        return mse + self.vlb_terms(eps_pred, x0, x_t, t).mean()

    def vlb_terms(self, eps_pred: Tensor, x0: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        """Per-sample variational-bound term in bits per pixel (fixed posterior variance)."""
        log_var = self._at(self.posterior_log_variance, t, x_t)
        mean_q = self.q_posterior_mean(x0, x_t, t)
        mean_p = self.q_posterior_mean(self.predict_x0(x_t, t, eps_pred, clamp=False), x_t, t)
        # KL of two Gaussians with equal variance: (mu_q - mu_p)^2 / (2 var).
        kl = 0.5 * (mean_q - mean_p) ** 2 * torch.exp(-log_var)
        nll = -discretized_gaussian_log_likelihood(x0, mean_p, log_var)
        per_pixel = torch.where(t.reshape(-1, *([1] * (x0.ndim - 1))) == 0, nll, kl)
        return per_pixel.flatten(1).mean(1) / math.log(2.0)


def discretized_gaussian_log_likelihood(x: Tensor, mean: Tensor, log_var: Tensor, bins: int = 256) -> Tensor:
    """Log-likelihood (nats) of ``x`` in [-1, 1] quantised into ``bins`` levels under ``N(mean, var)``.

    The outermost bins extend to infinity (Ho et al. 2020, eq. 13).
    """
    half_bin = 1.0 / (bins - 1)
    inv_std = torch.exp(-0.5 * log_var)
    cdf_plus = torch.special.ndtr((x - mean + half_bin) * inv_std)
    cdf_min = torch.special.ndtr((x - mean - half_bin) * inv_std)
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    edge = 1.0 - 1e-3
    return torch.where(x < -edge, log_cdf_plus, torch.where(x > edge, log_one_minus_cdf_min, log_delta))
