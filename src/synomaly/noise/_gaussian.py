"""Gaussian noise and Synomaly noise (Gaussian noise plus smooth intensity blobs)."""

from __future__ import annotations

import dataclasses
import numbers
from typing import NamedTuple

import torch
from torch import Tensor

from synomaly._filters import gaussian_blur
from synomaly.errors import ConfigError
from synomaly.limits import MAX_NOISE_SCALE
from synomaly.noise._registry import _randn, _set_param, _work_dtype, register_noise

# ----------------------------------------------------------------------------------------------
# gaussian


@register_noise("gaussian")
@dataclasses.dataclass(frozen=True)
class GaussianNoise:
    """Standard normal noise ``n ~ N(0, I)``, the DDPM default (docs/method.md §7, "Gaussian")."""

    def __call__(
        self, reference: Tensor, generator: torch.Generator | None = None, foreground: Tensor | None = None
    ) -> Tensor:
        """Draw ``N(0, I)`` shaped like ``reference``; ``foreground`` is ignored."""
        dtype = _work_dtype(reference, generator)
        return _randn(tuple(reference.shape), generator, reference, dtype).to(reference.dtype)


# ----------------------------------------------------------------------------------------------
# synomaly


class SynomalyNoiseParts(NamedTuple):
    """Synomaly noise with its pieces, for tests and training previews.

    Attributes:
        noise: ``n = g + a * B``, ``[B, C, H, W]``.
        blob_mask: The boolean blob mask ``B``, ``[B, C, H, W]``.
        amplitude: The signed per-image amplitude ``a``, ``[B]``.
    """

    noise: Tensor
    blob_mask: Tensor
    amplitude: Tensor


@register_noise("synomaly")
@dataclasses.dataclass(frozen=True)
class SynomalyNoise:
    """Gaussian noise plus random smooth blobs that shift the intensity inside them (docs/method.md §1).

    Attributes:
        sigma: Blob size: standard deviation (pixels) of the blur applied to the Gaussian part.
        threshold: Blob frequency on the 0..255 scale of the rescaled blurred noise, in [0, 255];
            higher means fewer, smaller blobs (about 10 % of pixels at sigma 3 / threshold 175).
        offset: Minimum blob amplitude, >= 0; amplitudes lie in ``[offset, 1 + offset]``.
        direction: Signs to draw from, uniformly per image: ``(1,)`` brighter blobs, ``(-1,)`` darker,
            ``(1, -1)`` either. A bare ``1`` or ``-1`` is stored as a one-element tuple.
    """

    sigma: float = 3.0
    threshold: float = 175.0
    offset: float = 0.5
    direction: tuple[int, ...] = (1,)

    def __post_init__(self) -> None:
        _set_param(self, "sigma", positive=True, maximum=MAX_NOISE_SCALE)
        _set_param(self, "threshold", minimum=0.0, maximum=255.0)
        _set_param(self, "offset", minimum=0.0)
        object.__setattr__(self, "direction", _directions(self.direction))

    def __call__(
        self, reference: Tensor, generator: torch.Generator | None = None, foreground: Tensor | None = None
    ) -> Tensor:
        """Draw ``n = g + a * B`` shaped like ``reference``; see :meth:`parts`."""
        return self.parts(reference, generator, foreground).noise

    def parts(
        self, reference: Tensor, generator: torch.Generator | None = None, foreground: Tensor | None = None
    ) -> SynomalyNoiseParts:
        """Synomaly noise, docs/method.md §1, steps 1-5, batched.

        1. ``g ~ N(0, I)``; 2. ``b = GaussianBlur(g, sigma)`` rescaled per image and channel so its
        min..max maps to 0..255; 3. ``B = b > threshold``, and ``B = B AND foreground`` when given;
        4. ``a = direction * (U(0, 1) + offset)``, one scalar per image; 5. ``n = g + a * B``.

        Args:
            reference: ``[B, C, H, W]`` tensor giving shape, device and dtype (values unused).
            generator: Source of all randomness, on the reference's device; global RNG when ``None``.
            foreground: Optional ``[B, 1, H, W]`` or ``[B, C, H, W]`` mask (bool, or 0/1 values read
                as ``> 0.5``); no blob is placed outside it.
        """
        dtype = _work_dtype(reference, generator)
        batch = reference.shape[0]
        gaussian = _randn(tuple(reference.shape), generator, reference, dtype)
        blobs = self._blob_mask(gaussian)
        if foreground is not None:
            blobs = blobs & _foreground_mask(foreground, reference)
        magnitude = torch.rand(batch, generator=generator, device=reference.device, dtype=dtype) + self.offset
        choice = torch.randint(len(self.direction), (batch,), generator=generator, device=reference.device)
        signs = torch.tensor(self.direction, device=reference.device, dtype=dtype)[choice]
        amplitude = signs * magnitude
        noise = gaussian + amplitude.view(-1, 1, 1, 1) * blobs
        return SynomalyNoiseParts(noise.to(reference.dtype), blobs, amplitude.to(reference.dtype))

    def _blob_mask(self, gaussian: Tensor) -> Tensor:
        """Steps 2-3 without the foreground: blur, rescale to 0..255 per image and channel, threshold."""
        blurred = gaussian_blur(gaussian, self.sigma)
        low = blurred.amin(dim=(-2, -1), keepdim=True)
        span = blurred.amax(dim=(-2, -1), keepdim=True) - low
        # A constant map (only possible for 1-pixel images) rescales to 0 everywhere: no blobs.
        scaled = (blurred - low) / span.clamp_min(torch.finfo(blurred.dtype).tiny) * 255.0
        return scaled > self.threshold


def synomaly_noise_parts(
    reference: Tensor,
    generator: torch.Generator | None = None,
    foreground: Tensor | None = None,
    noise: SynomalyNoise | None = None,
) -> SynomalyNoiseParts:
    """``(noise, blob_mask, amplitude)`` of ``noise`` (default parameters when ``None``).

    Same draws as ``noise(reference, generator, foreground)``; see :meth:`SynomalyNoise.parts`.
    """
    return (noise or SynomalyNoise()).parts(reference, generator, foreground)


def _directions(value: object) -> tuple[int, ...]:
    """Normalise ``direction`` (an int or a sequence of +1/-1) to a non-empty tuple of ints."""
    values = (value,) if isinstance(value, numbers.Real) else value
    if isinstance(values, (tuple, list)) and values and all(
        isinstance(v, numbers.Real) and not isinstance(v, bool) and v in (1, -1) for v in values
    ):
        return tuple(int(v) for v in values)
    raise ConfigError(
        "synomaly noise", f"direction must be 1, -1 or a non-empty sequence of them, got {value!r}"
    )


def _foreground_mask(foreground: Tensor, reference: Tensor) -> Tensor:
    """A boolean mask broadcastable to ``reference``, on its device."""
    batch, channels, height, width = reference.shape
    shape = tuple(foreground.shape)
    if len(shape) != 4 or shape[0] != batch or shape[1] not in (1, channels) or shape[2:] != (height, width):
        raise ValueError(
            f"foreground must have shape [{batch}, 1 or {channels}, {height}, {width}], got {list(shape)}"
        )
    foreground = foreground.to(reference.device)
    return foreground if foreground.dtype == torch.bool else foreground > 0.5
