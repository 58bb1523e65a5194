"""f-AnoGAN (Schlegl et al. 2019): a Wasserstein GAN of healthy images, then an encoder into its latent space.

Stage 1 trains a generator ``G`` and a critic ``D`` as a WGAN-GP (Gulrajani et al. 2017): ``CRITIC_STEPS``
critic updates, each on its own batch of healthy images, per generator update; the critic minimises
``D(G(z)) - D(x)`` plus ``PENALTY`` times the gradient penalty, the generator ``-D(G(z))``, ``z ~ N(0, I)``.
Stage 2 freezes both and trains the encoder ``E`` (the paper's izi_f training) on
``MSE(x, G(E(x))) + KAPPA * MSE(f(x), f(G(E(x))))``, ``f`` the critic's last features. At inference the
reconstruction is ``G(E(x))``, so the anomaly map is ``|blur(x) - blur(G(E(x)))|`` inside the foreground, like
every other method; the image score is the paper's anomaly score, the same combined residual per image.

``train.steps`` counts optimiser updates, one batch each, as for every other method (the same images seen).
The first ``GAN_SHARE`` of them, in whole cycles of ``CRITIC_STEPS`` critic updates and one generator
update, train the WGAN-GP; the rest train the encoder (:func:`phase`). The three networks follow the model
preset's channels (one stride-2 level per entry), like the VAE; the critic has layer normalisation (no batch
statistics, which the gradient penalty rules out), ``G`` and ``E`` group normalisation. The model folder
exports the trained weights of all three (no EMA; the critic for the image score).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from fractions import Fraction
from typing import Any

import torch
from torch import Tensor, nn

from synomaly.config import DetectConfig, ModelConfig, PipelineConfig, TrainConfig
from synomaly.errors import ConfigError
from synomaly.methods.base import Backward, Method, Network, NoiseFn, check_halvings, timestep_zero
from synomaly.schedule import DiffusionSchedule

LATENT = 128  # the size of z, as in the reference
CRITIC_STEPS = 5  # critic updates per generator update (WGAN-GP)
PENALTY = 10.0  # the weight lambda of the gradient penalty (WGAN-GP)
KAPPA = 1.0  # the weight of the critic-feature residual (izi_f loss and anomaly score)
GAN_SHARE = Fraction(2, 3)  # of train.steps for the WGAN-GP; the rest trains the encoder
GAN_BETAS = (0.0, 0.9)  # Adam's betas for G and D (WGAN-GP)
PHASES = ("critic", "generator", "encoder")
LOGGED = (*(f"{p}_loss" for p in PHASES), "wasserstein", "gradient_penalty")  # logged beside loss and phase


def gan_steps(planned: int) -> int:
    """Updates of stage 1 in a run of ``planned`` updates: whole cycles of ``CRITIC_STEPS + 1`` within ``GAN_SHARE``."""
    cycle = CRITIC_STEPS + 1
    return int(planned * GAN_SHARE) // cycle * cycle


def phase(step: int, planned: int) -> str:
    """What update ``step`` (from 0) of a run of ``planned`` updates trains: ``critic``, ``generator`` or ``encoder``."""
    if step >= gan_steps(planned):
        return "encoder"
    return "generator" if step % (CRITIC_STEPS + 1) == CRITIC_STEPS else "critic"


MIN_STEPS = next(n for n in range(1, 1000) if gan_steps(n) > 0 and n > gan_steps(n))  # one cycle and one encoder update


def gradient_penalty(critic: Callable[[Tensor], Tensor], real: Tensor, fake: Tensor, weight: float = PENALTY,
                     generator: torch.Generator | None = None) -> Tensor:
    """WGAN-GP's ``weight * mean((||grad D(x_hat)||_2 - 1)^2)`` at ``x_hat = a x + (1 - a) x_fake``, ``a ~ U[0, 1]`` per image.

    Gulrajani et al. 2017, Algorithm 1; the graph is kept, so the penalty trains the critic.
    """
    shape = (real.shape[0],) + (1,) * (real.ndim - 1)
    alpha = torch.rand(shape, generator=generator, device=real.device, dtype=real.dtype)
    mixed = (alpha * real + (1 - alpha) * fake).detach().requires_grad_(True)
    (grad,) = torch.autograd.grad(critic(mixed).sum(), mixed, create_graph=True)
    return weight * (grad.float().flatten(1).norm(dim=1) - 1.0).square().mean()


def _level(c_in: int, c_out: int, groups: int, resample: nn.Module, act: Callable[[], nn.Module]) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1), nn.GroupNorm(groups, c_out), act(),
                         resample, nn.GroupNorm(groups, c_out), act())


def _downsampler(channels: tuple[int, ...], groups: int) -> nn.Sequential:
    """Image ``[B, 1, S, S]`` to flat features ``[B, channels[-1] * (S / 2^levels)^2]``: one stride-2 level per channel count."""
    levels, c_in = [], 1
    for c in channels:
        levels.append(_level(c_in, c, groups, nn.Conv2d(c, c, 4, stride=2, padding=1), lambda: nn.LeakyReLU(0.2)))
        c_in = c
    return nn.Sequential(*levels, nn.Flatten())


class Generator(nn.Module):
    """``G``: a latent code ``[B, latent]`` to an image ``[B, 1, S, S]`` in [-1, 1] (tanh)."""

    def __init__(self, channels: tuple[int, ...], groups: int, side: int, latent: int) -> None:
        super().__init__()
        self.side = side
        self.expand = nn.Linear(latent, channels[-1] * side**2)
        up = [_level(c, c_out, groups, nn.ConvTranspose2d(c_out, c_out, 4, stride=2, padding=1), nn.ReLU)
              for c, c_out in zip(channels[::-1], (*channels[-2::-1], channels[0]))]
        self.decoder = nn.Sequential(*up, nn.Conv2d(channels[0], 1, 3, padding=1), nn.Tanh())

    def forward(self, z: Tensor) -> Tensor:
        return self.decoder(self.expand(z).view(z.shape[0], -1, self.side, self.side))


class Critic(nn.Module):
    """``D``: an image to its critic value ``[B]``; ``features`` are the flat features before the last linear layer.

    Layer normalisation (``GroupNorm`` with one group) instead of batch normalisation: the gradient
    penalty is per image, so the critic must not mix the images of a batch.
    """

    def __init__(self, channels: tuple[int, ...], flat: int) -> None:
        super().__init__()
        self.features = _downsampler(channels, 1)
        self.head = nn.Linear(flat, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x)).squeeze(1)


class FAnoGANNet(nn.Module):
    """Generator, critic and encoder; ``forward(x, t)`` is the reconstruction ``G(E(x))`` (``t`` is ignored).

    Args:
        config: The model preset: ``channels`` per level (each halves the resolution), ``norm_num_groups``
            (of ``G`` and ``E``) and ``image_size`` (it fixes the size of the dense layers).
        latent: The size of the latent code.
    """

    def __init__(self, config: ModelConfig, latent: int = LATENT) -> None:
        super().__init__()
        channels, groups = config.channels, config.norm_num_groups
        side = config.image_size // 2 ** len(channels)
        if side < 1:
            raise ValueError(f"image_size {config.image_size} is too small for {len(channels)} stride-2 levels")
        flat = channels[-1] * side**2
        self.latent = latent
        self.generator = Generator(channels, groups, side, latent)
        self.critic = Critic(channels, flat)
        self.encoder = nn.Sequential(_downsampler(channels, groups), nn.Linear(flat, latent))

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """``n`` images ``G(z)``, ``z ~ N(0, I)`` drawn on the network's device from ``generator``."""
        device = self.generator.expand.weight.device
        return self.generator(torch.randn(n, self.latent, generator=generator, device=device))

    def forward(self, x: Tensor, t: Tensor | None = None) -> Tensor:
        return self.generator(self.encoder(x))


def combined_residual(critic: Critic, images: Tensor, reconstructions: Tensor, kappa: float = KAPPA) -> Tensor:
    """The paper's anomaly score per image, ``[B]``: ``MSE(x, x_rec) + kappa * MSE(f(x), f(x_rec))``, ``f`` the critic's features.

    Its batch mean is the izi_f loss that trains the encoder (Schlegl et al. 2019, eqs. 5 and 6).
    """
    image = (images - reconstructions).float().square().flatten(1).mean(1)
    features = (critic.features(images) - critic.features(reconstructions)).float().square().mean(1)
    return image + kappa * features


@contextmanager
def frozen(*modules: nn.Module) -> Iterator[None]:
    """No gradients for the parameters of ``modules`` in the graphs built inside (backward may run later)."""
    params = [p for m in modules for p in m.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


def _net(network: nn.Module) -> FAnoGANNet:
    if not isinstance(network, FAnoGANNet):
        raise TypeError(f"the fanogan method trains a FAnoGANNet, got {type(network).__name__}")
    return network


class FAnoGAN(Method):
    name = "fanogan"
    description = "f-AnoGAN (Schlegl et al.): WGAN-GP, then an encoder; the reconstruction G(E(x)), image score the combined residual"
    default_noise = "gaussian"  # not used: f-AnoGAN trains on clean images
    manual_optimization = True
    ema = False  # the encoder is fitted to the generator as trained; an average of either would not match

    def build(self, config: PipelineConfig) -> nn.Module:
        check_halvings(config, "fanogan")
        return FAnoGANNet(config.model)

    def check_training(self, config: TrainConfig) -> None:
        if config.steps < MIN_STEPS:
            raise ConfigError("train.steps", f"fanogan needs at least {MIN_STEPS} steps (one cycle of {CRITIC_STEPS} critic "
                                             f"updates and a generator update, then the encoder), got {config.steps}")
        if config.devices * config.num_nodes > 1:
            raise ConfigError("train.devices", f"fanogan trains on one device (its gradient penalty differentiates twice, "
                                               f"which is not synchronised across processes), got "
                                               f"{config.devices * config.num_nodes}")

    def optimizers(self, network: nn.Module, config: TrainConfig) -> list[torch.optim.Optimizer]:
        """Critic, generator (AdamW, betas 0 and 0.9 as in WGAN-GP) and encoder (AdamW), all at ``train.lr``."""
        net = _net(network)

        def adamw(module: nn.Module, betas: tuple[float, float] = (0.9, 0.999)) -> torch.optim.Optimizer:
            return torch.optim.AdamW(module.parameters(), lr=config.lr, betas=betas, weight_decay=config.weight_decay)

        return [adamw(net.critic, GAN_BETAS), adamw(net.generator, GAN_BETAS), adamw(net.encoder)]

    def training_step(self, network: nn.Module, optimizers: Sequence[Any], step: int, planned: int, x: Tensor,
                      foreground: Tensor | None, backward: Backward) -> dict[str, Tensor]:
        net, which = _net(network), phase(step, planned)
        logged = {}
        if which == "critic":
            with torch.no_grad():
                fake = net.sample(x.shape[0])
            distance = net.critic(x).float().mean() - net.critic(fake).float().mean()  # the Wasserstein estimate
            penalty = gradient_penalty(net.critic, x, fake)
            loss = penalty - distance
            logged = {"wasserstein": distance.detach(), "gradient_penalty": penalty.detach()}
        elif which == "generator":
            with frozen(net.critic):
                loss = -net.critic(net.sample(x.shape[0])).float().mean()
        else:
            with frozen(net.generator, net.critic):
                loss = combined_residual(net.critic, x, net(x)).mean()
        optimizer = optimizers[PHASES.index(which)]
        optimizer.zero_grad()
        backward(loss)
        optimizer.step()
        # Every value on every step (NaN where it does not apply), so no log row repeats an earlier step's value.
        logged = {**dict.fromkeys(LOGGED, float("nan")), f"{which}_loss": loss.detach(), **logged}
        return {"loss": loss.detach(), "phase": torch.tensor(float(PHASES.index(which))),
                **{key: torch.as_tensor(value, dtype=torch.float32) for key, value in logged.items()}}

    def reconstruct(self, model: Network, schedule: DiffusionSchedule, images: Tensor, config: DetectConfig,
                    noise: NoiseFn, generator: torch.Generator | None = None) -> Tensor:
        return model(images, timestep_zero(images)).to(images.dtype).clamp(-1.0, 1.0)

    def image_score(self, network: nn.Module, images: Tensor, reconstructions: Tensor) -> Tensor:
        return combined_residual(_net(network).critic, images, reconstructions)

    def score_unit(self, size: int) -> str:
        return (f"f-AnoGAN's combined residual MSE(x, G(E(x))) + {KAPPA:g} * MSE(f(x), f(G(E(x)))) at the model's "
                f"{size}x{size} input (f: the critic's features)")

    def preview(self, unet: nn.Module, schedule: DiffusionSchedule, images: Tensor, noise: NoiseFn) -> tuple[Tensor, Tensor]:
        """Generator samples from a fixed latent code, and the reconstructions ``G(E(x))``."""
        net = _net(unet)
        z = torch.randn(images.shape[0], net.latent, generator=torch.Generator().manual_seed(0)).to(images.device)
        return net.generator(z).float(), net(images).float()
