"""The epsilon-prediction UNet: MONAI's ``DiffusionModelUNet`` built from a ``ModelConfig``."""

from __future__ import annotations

from torch import nn

from synomaly.config import ModelConfig


def build_unet(config: ModelConfig) -> nn.Module:
    """Build the UNet ``eps_theta(x_t, t)``; call it as ``unet(x_t, timesteps)`` with ``timesteps`` of shape ``[B]``."""
    from monai.networks.nets import DiffusionModelUNet

    return DiffusionModelUNet(**config.unet_kwargs())


def count_parameters(module: nn.Module) -> int:
    """Number of parameters of ``module``."""
    return sum(p.numel() for p in module.parameters())


def check_image_size(config: ModelConfig, height: int, width: int) -> None:
    """Raise ``ValueError`` when the UNet cannot take ``height x width`` images.

    Each of the UNet's levels halves the resolution, so both sides must be multiples of
    ``2^(levels-1)`` and at least that large.
    """
    m = config.size_multiple
    if height < m or width < m or height % m or width % m:
        def near(n: int) -> int:
            return max(m, round(n / m) * m)

        raise ValueError(
            f"image size {height}x{width} does not fit the UNet: both sides must be multiples of {m} "
            f"({len(config.channels)} levels); pad or resize to e.g. {near(height)}x{near(width)}"
        )
