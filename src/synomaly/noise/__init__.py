"""Training noises: a registry of batched, seeded noise generators.

Every noise is a frozen dataclass holding its parameters and called as
``noise(reference, generator=None, foreground=None)``: ``reference`` is a ``[B, C, H, W]`` tensor
that only gives the shape, device and dtype; the result has that shape, device and dtype. All
randomness comes from ``generator`` (the global RNG when it is ``None``), so one seed gives one
output. Registered names:

* ``gaussian``: standard normal, the DDPM default.
* ``synomaly``: Gaussian noise plus smooth intensity blobs (docs/method.md §1).
* ``simplex``: AnoDDPM's fractal simplex noise (docs/method.md §7).
* ``coarse``: DAE-style low-resolution noise, upsampled and rolled (Kascenas et al.).
* ``pyramid``: sum of upsampled Gaussians at decreasing resolutions.

``make_noise(name, **params)`` builds one, ``noise_to_dict``/``noise_from_dict`` round-trip it through
JSON-ready dictionaries, and ``register_noise(name)`` adds new ones.
"""

from __future__ import annotations

# Importing the noise modules registers every noise, in the order listed above.
from synomaly.noise._gaussian import GaussianNoise, SynomalyNoise, SynomalyNoiseParts, synomaly_noise_parts
from synomaly.noise._registry import NOISES, Noise, make_noise, noise_from_dict, noise_names, noise_to_dict, register_noise
from synomaly.noise._structured import CoarseNoise, PyramidNoise, SimplexNoise, simplex2d

__all__ = [
    "NOISES",
    "CoarseNoise",
    "GaussianNoise",
    "Noise",
    "PyramidNoise",
    "SimplexNoise",
    "SynomalyNoise",
    "SynomalyNoiseParts",
    "make_noise",
    "noise_from_dict",
    "noise_names",
    "noise_to_dict",
    "register_noise",
    "simplex2d",
    "synomaly_noise_parts",
]

