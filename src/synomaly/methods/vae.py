"""The variational autoencoder baseline (Kingma & Welling 2014), as compared in the medical UAD benchmarks
(Baur et al. 2021; MedIAnomaly, Cai et al. 2024).

A convolutional encoder maps the image to a Gaussian posterior over a ``LATENT``-dimensional code,
the decoder maps a code back to the image. Training minimises ``MSE(x, dec(z)) + BETA * KL(q(z|x) || N(0, I))``
with ``z`` drawn by the reparameterisation trick; at inference the reconstruction is the decoded posterior
mean, so the anomaly map is ``|blur(x) - blur(dec(mu(x)))|`` inside the foreground, like every other method.
The encoder and decoder follow the model preset's channels (one stride-2 level per entry), so
``--network tiny|small|paper`` sizes the VAE as it sizes the UNet.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from synomaly.config import DetectConfig, ModelConfig, PipelineConfig
from synomaly.methods.base import Method, Network, NoiseFn, check_halvings
from synomaly.schedule import DiffusionSchedule

LATENT = 128  # the latent size of the benchmark VAEs (128-512)
BETA = 1e-3  # the weight of the KL term against the per-pixel MSE


def gaussian_kl(mu: Tensor, logvar: Tensor) -> Tensor:
    """``KL(N(mu, exp(logvar)) || N(0, I))`` of each sample, summed over the latent dimensions: ``[B]``."""
    return 0.5 * (mu.square() + logvar.exp() - 1.0 - logvar).flatten(1).sum(1)


def _block(c_in: int, c_out: int, groups: int, layer: nn.Module) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1), nn.GroupNorm(groups, c_out), nn.SiLU(),
                         layer, nn.GroupNorm(groups, c_out), nn.SiLU())


class VAENet(nn.Module):
    """Encoder, Gaussian posterior and decoder; ``forward(x, t)`` decodes the posterior mean (``t`` is ignored).

    Args:
        config: The model preset: ``channels`` per level (each halves the resolution), ``norm_num_groups``
            and ``image_size`` (the input side; it fixes the size of the dense layers).
        latent: The latent dimension.
    """

    def __init__(self, config: ModelConfig, latent: int = LATENT) -> None:
        super().__init__()
        channels, groups = config.channels, config.norm_num_groups
        self.side = config.image_size // 2 ** len(channels)
        if self.side < 1:
            raise ValueError(f"image_size {config.image_size} is too small for {len(channels)} stride-2 levels")
        down, c_in = [], 1
        for c in channels:
            down.append(_block(c_in, c, groups, nn.Conv2d(c, c, 4, stride=2, padding=1)))
            c_in = c
        self.encoder = nn.Sequential(*down, nn.Flatten())
        flat = channels[-1] * self.side**2
        self.posterior = nn.Linear(flat, 2 * latent)
        self.expand = nn.Linear(latent, flat)
        up = []
        for c, c_out in zip(channels[::-1], (*channels[-2::-1], channels[0])):
            up.append(_block(c, c_out, groups, nn.ConvTranspose2d(c_out, c_out, 4, stride=2, padding=1)))
        self.decoder = nn.Sequential(*up, nn.Conv2d(channels[0], 1, 3, padding=1))

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """The posterior's mean and log-variance, ``[B, latent]`` each."""
        mu, logvar = self.posterior(self.encoder(x)).chunk(2, dim=1)
        return mu, logvar.clamp(-30.0, 20.0)

    def decode(self, z: Tensor) -> Tensor:
        """Codes ``[B, latent]`` to images ``[B, 1, H, W]``."""
        return self.decoder(self.expand(z).view(z.shape[0], -1, self.side, self.side))

    def forward(self, x: Tensor, t: Tensor | None = None) -> Tensor:
        return self.decode(self.encode(x)[0])


class VAE(Method):
    name = "vae"
    description = "variational autoencoder (MSE + 1e-3 KL): the decoded posterior mean of the input"
    default_noise = "gaussian"  # not used: a VAE is trained on clean images

    def build(self, config: PipelineConfig) -> nn.Module:
        check_halvings(config, "the vae")
        return VAENet(config.model)

    def loss(self, unet: nn.Module, schedule: DiffusionSchedule, noise: NoiseFn, x: Tensor, foreground: Tensor | None,
             target: Tensor | None, kind: str) -> Tensor:
        if not isinstance(unet, VAENet):
            raise TypeError(f"the vae method trains a VAENet, got {type(unet).__name__}")
        mu, logvar = unet.encode(x)
        z = mu + torch.randn_like(mu) * (0.5 * logvar).exp()
        return torch.nn.functional.mse_loss(unet.decode(z).float(), x) + BETA * gaussian_kl(mu, logvar).float().mean()

    def reconstruct(self, model: Network, schedule: DiffusionSchedule, images: Tensor, config: DetectConfig,
                    noise: NoiseFn, generator: torch.Generator | None = None) -> Tensor:
        return model(images, images.new_zeros(images.shape[0])).to(images.dtype).clamp(-1.0, 1.0)

    def preview(self, unet: nn.Module, schedule: DiffusionSchedule, images: Tensor, noise: NoiseFn) -> tuple[Tensor, Tensor]:
        return images, unet(images).float()
