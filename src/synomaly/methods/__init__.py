"""Methods as a registry: what a model folder's network is trained to do and how it detects.

Each method is one module holding one :class:`~synomaly.methods.base.Method`; adding a baseline is a
new module and one line in ``METHODS`` below. Nothing else in the package compares method names.

    from synomaly.methods import get_method
    method = get_method(pipe.config.method)
    recon = method.reconstruct(pipe.network, pipe.schedule, images, config, noise, generator)
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from synomaly.errors import ConfigError
from synomaly.limits import MAX_PARAMETERS
from synomaly.methods.base import Method
from synomaly.methods.dae import DAE
from synomaly.methods.diffusion import Diffusion
from synomaly.methods.fanogan import FAnoGAN
from synomaly.methods.intensity import Intensity
from synomaly.methods.supervised import Supervised
from synomaly.methods.vae import VAE

METHODS: dict[str, Method] = {
    "diffusion": Diffusion(),
    "dae": DAE(),
    "supervised": Supervised(),
    "intensity": Intensity(),
    "vae": VAE(),
    "fanogan": FAnoGAN(),
}

if TYPE_CHECKING:
    from synomaly.config import PipelineConfig

__all__ = ["METHODS", "Method", "check_network_size", "get_method"]


def get_method(name: str, option: str = "method") -> Method:
    """The registered method ``name``; an unknown name is a ``ConfigError`` listing the valid ones."""
    if name not in METHODS:
        raise ConfigError(option, f"must be one of {', '.join(METHODS)}, got {name!r}")
    return METHODS[name]


def check_network_size(config: PipelineConfig) -> int:
    """The parameter count of ``config``'s network, built on the meta device (no memory allocated).

    Raises:
        ConfigError: More than ``MAX_PARAMETERS`` parameters.
    """
    import torch

    with torch.device("meta"):
        network = get_method(config.method).build(config)
    count = sum(p.numel() for p in network.parameters())
    if count > MAX_PARAMETERS:
        raise ConfigError("model", f"the network would have {count:,} parameters; at most {MAX_PARAMETERS:,} (the limit)")
    return count
