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

import dataclasses
import math
import numbers
from collections.abc import Callable
from typing import Any, NamedTuple, Protocol, TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor

from synomaly._filters import gaussian_blur
from synomaly.errors import ConfigError
from synomaly.limits import MAX_NOISE_LEVELS, MAX_NOISE_SCALE

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


class Noise(Protocol):
    """What the training loop calls: ``noise(reference, generator, foreground) -> noise``."""

    def __call__(
        self, reference: Tensor, generator: torch.Generator | None = None, foreground: Tensor | None = None
    ) -> Tensor:
        """Draw noise shaped like ``reference`` ``[B, C, H, W]`` on its device, in its dtype."""


NOISES: dict[str, type] = {}
"""Registry: noise name -> dataclass."""

_T = TypeVar("_T", bound=type)


def register_noise(name: str) -> Callable[[_T], _T]:
    """Class decorator adding a noise dataclass to :data:`NOISES` under ``name``.

    Raises:
        TypeError: If the class is not a dataclass (its fields are its serialised parameters).
        ValueError: If another class is already registered under ``name``.
    """

    def decorator(cls: _T) -> _T:
        if not dataclasses.is_dataclass(cls):
            raise TypeError(f"noise {name!r}: {cls.__name__} must be a dataclass")
        if NOISES.get(name, cls) is not cls:
            raise ValueError(f"noise {name!r} is already registered to {NOISES[name].__name__}")
        NOISES[name] = cls
        return cls

    return decorator


def noise_names() -> list[str]:
    """The registered noise names, sorted."""
    return sorted(NOISES)


def make_noise(name: str, **params: Any) -> Noise:
    """Build the noise registered as ``name`` with ``params`` (the rest keep their defaults).

    Raises:
        ValueError: For an unknown name (the message lists the valid ones), an unknown parameter or an
            invalid parameter value (the message names the parameter).
    """
    if name not in NOISES:
        raise ConfigError("noise", f"unknown noise {name!r}; valid names: {', '.join(noise_names())}")
    cls = NOISES[name]
    allowed = [field.name for field in dataclasses.fields(cls) if field.init]
    unknown = sorted(set(params) - set(allowed))
    if unknown:
        raise ConfigError(
            f"{name} noise",
            f"unknown parameter(s) {', '.join(unknown)}; valid parameters: {', '.join(allowed) or 'none'}",
        )
    return cls(**params)


def noise_to_dict(noise: Noise) -> dict[str, Any]:
    """``{"name": <registry name>, **parameters}``, JSON-serialisable (tuples become lists)."""
    name = _registered_name(type(noise))
    if name is None:
        raise ValueError(f"{type(noise).__name__} is not a registered noise")
    params = {field.name: getattr(noise, field.name) for field in dataclasses.fields(noise)}
    return {"name": name, **{key: list(v) if isinstance(v, tuple) else v for key, v in params.items()}}


def noise_from_dict(data: dict[str, Any]) -> Noise:
    """Inverse of :func:`noise_to_dict`: ``make_noise(data["name"], **other keys)``."""
    params = dict(data)
    if "name" not in params:
        raise ConfigError("noise", f"missing 'name'; valid names: {', '.join(noise_names())}")
    return make_noise(params.pop("name"), **params)


def _registered_name(cls: type) -> str | None:
    return next((name for name, registered in NOISES.items() if registered is cls), None)


# ----------------------------------------------------------------------------------------------
# parameter validation and shared tensor helpers


def _set_param(
    noise: object,
    param: str,
    *,
    integer: bool = False,
    positive: bool = False,
    minimum: float | None = None,
    maximum: float | None = None,
) -> None:
    """Check ``noise.<param>`` and store it as a plain ``int``/``float`` on the frozen dataclass.

    Raises:
        ValueError: ``"<noise> noise: <param> must be ..., got <value>"``.
    """
    value = getattr(noise, param)
    label = f"{_registered_name(type(noise)) or type(noise).__name__} noise"
    kind, wanted = (numbers.Integral, "an integer") if integer else (numbers.Real, "a finite number")
    if isinstance(value, bool) or not isinstance(value, kind) or not math.isfinite(value):
        raise ConfigError(label, f"{param} must be {wanted}, got {value!r}")
    number = int(value) if integer else float(value)
    if positive and number <= 0:
        raise ConfigError(label, f"{param} must be > 0, got {value!r}")
    if minimum is not None and number < minimum:
        raise ConfigError(label, f"{param} must be >= {minimum}, got {value!r}")
    if maximum is not None and number > maximum:
        raise ConfigError(label, f"{param} must be <= {maximum}, got {value!r}")
    object.__setattr__(noise, param, number)


def _work_dtype(reference: Tensor, generator: torch.Generator | None) -> torch.dtype:
    """Check the reference and generator; return the dtype to compute in.

    Half-precision references are computed in float32 (blur and interpolation need it on CPU) and cast
    back at the end.
    """
    if reference.ndim != 4:
        raise ValueError(f"noise reference must be a [B, C, H, W] tensor, got shape {tuple(reference.shape)}")
    if not reference.dtype.is_floating_point:
        raise ValueError(f"noise reference must have a floating dtype, got {reference.dtype}")
    if generator is not None and generator.device.type != reference.device.type:
        raise ValueError(
            f"generator is on {generator.device} but the reference is on {reference.device}; "
            "create the generator on the reference's device"
        )
    return torch.float64 if reference.dtype == torch.float64 else torch.float32


def _randn(
    shape: tuple[int, ...], generator: torch.Generator | None, reference: Tensor, dtype: torch.dtype
) -> Tensor:
    """``N(0, I)`` of ``shape`` on the reference's device."""
    return torch.randn(shape, generator=generator, device=reference.device, dtype=dtype)


def _standardise(noise: Tensor) -> Tensor:
    """Zero mean and unit (population) standard deviation per image and channel."""
    centred = noise - noise.mean(dim=(-2, -1), keepdim=True)
    std = centred.std(dim=(-2, -1), keepdim=True, correction=0)
    # A constant map (e.g. a 1x1 image) has std 0: leave it at zero instead of dividing by zero.
    return centred / std.clamp_min(torch.finfo(noise.dtype).tiny)


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


# ----------------------------------------------------------------------------------------------
# simplex

# Skew and unskew factors of the 2-D simplex grid (Perlin 2001; Gustavson, "Simplex noise demystified").
_SKEW = 0.5 * (math.sqrt(3.0) - 1.0)
_UNSKEW = (3.0 - math.sqrt(3.0)) / 6.0
# Gustavson's gradient table projected on the plane, duplicates removed: 4 diagonals and 4 axes.
_GRADIENTS_2D = (
    (1.0, 1.0), (-1.0, 1.0), (1.0, -1.0), (-1.0, -1.0), (1.0, 0.0), (-1.0, 0.0), (0.0, 1.0), (0.0, -1.0)
)
# Gustavson's output scale; with these gradients the extremes are about +-0.998 (found numerically).
_SIMPLEX_SCALE = 70.0


def simplex2d(x: Tensor, y: Tensor, perm: Tensor) -> Tensor:
    """Classic 2-D simplex noise at points ``(x, y)``, elementwise over tensors of any shape.

    Skews ``(x, y)`` onto the triangular lattice, finds the enclosing simplex and sums the three
    corner contributions ``max(0, 0.5 - |d|^2)^4 * (gradient . d)`` (Gustavson, "Simplex noise
    demystified", 2005), scaled by 70 so values lie within [-1, 1]. It is continuous, zero at lattice
    points, and periodic with period 256 in skewed lattice coordinates.

    Args:
        x: Coordinates, floating tensor; one lattice unit is one feature size.
        y: Coordinates, broadcastable with ``x``.
        perm: A permutation of ``0..255`` (integer tensor of shape ``[256]``) hashing lattice points to
            gradients; a different permutation gives a different noise field.
    """
    if tuple(perm.shape) != (256,) or perm.dtype.is_floating_point:
        raise ValueError(
            f"perm must be an integer tensor of shape [256], got {perm.dtype} {list(perm.shape)}"
        )
    perm = perm.to(device=x.device, dtype=torch.long)
    gradients = torch.tensor(_GRADIENTS_2D, device=x.device, dtype=x.dtype)
    skew = (x + y) * _SKEW
    i, j = torch.floor(x + skew), torch.floor(y + skew)
    unskew = (i + j) * _UNSKEW
    x0, y0 = x - (i - unskew), y - (j - unskew)
    # The middle corner is (1, 0) in the lower triangle (x0 > y0) and (0, 1) in the upper one.
    i1 = (x0 > y0).to(x.dtype)
    j1 = 1.0 - i1
    corners = (
        (x0, y0, 0, 0),
        (x0 - i1 + _UNSKEW, y0 - j1 + _UNSKEW, i1.long(), j1.long()),
        (x0 - 1.0 + 2.0 * _UNSKEW, y0 - 1.0 + 2.0 * _UNSKEW, 1, 1),
    )
    cell_i, cell_j = i.long(), j.long()
    total = torch.zeros_like(x0)
    for dx, dy, di, dj in corners:
        gradient = gradients[perm[(cell_i + di + perm[(cell_j + dj) & 255]) & 255] & 7]
        falloff = (0.5 - dx * dx - dy * dy).clamp_min(0.0)
        total = total + falloff**4 * (gradient[..., 0] * dx + gradient[..., 1] * dy)
    return _SIMPLEX_SCALE * total


@register_noise("simplex")
@dataclasses.dataclass(frozen=True)
class SimplexNoise:
    """AnoDDPM-style fractal 2-D simplex noise, standardised per image (docs/method.md §7).

    Octave ``k = 0 .. octaves-1`` samples :func:`simplex2d` at ``pixel * 2^k / frequency`` with weight
    ``persistence^k``, as AnoDDPM does (coordinates ``x / frequency``, frequency halved per octave).
    So ``frequency`` is the feature size of the coarsest octave in pixels: one simplex lattice unit
    spans ``frequency`` pixels there (64 px at the default), and each octave halves it (2 px for the
    sixth octave at the defaults). Each octave of each image and channel gets its own random lattice
    offset, so images differ; the sum is standardised to zero mean and unit std per image and channel.

    Attributes:
        octaves: Number of octaves, 1 to ``MAX_NOISE_LEVELS``.
        persistence: Amplitude ratio between successive octaves, > 0.
        frequency: Coarsest feature size in pixels (see above), > 0.
    """

    octaves: int = 6
    persistence: float = 0.8
    frequency: float = 64.0

    def __post_init__(self) -> None:
        _set_param(self, "octaves", integer=True, minimum=1, maximum=MAX_NOISE_LEVELS)
        _set_param(self, "persistence", positive=True)
        _set_param(self, "frequency", positive=True)

    def __call__(
        self, reference: Tensor, generator: torch.Generator | None = None, foreground: Tensor | None = None
    ) -> Tensor:
        """Draw fractal simplex noise shaped like ``reference``; ``foreground`` is ignored."""
        dtype = _work_dtype(reference, generator)
        batch, channels, height, width = reference.shape
        device = reference.device
        perm = torch.randperm(256, generator=generator, device=device)
        # Offsets within the 256-unit lattice period act as independent seeds per octave and image.
        offsets = 256.0 * torch.rand(
            (self.octaves, batch, channels, 2), generator=generator, device=device, dtype=dtype
        )
        rows = torch.arange(height, device=device, dtype=dtype).view(height, 1) / self.frequency
        cols = torch.arange(width, device=device, dtype=dtype).view(1, width) / self.frequency
        total = torch.zeros((batch, channels, height, width), device=device, dtype=dtype)
        for octave in range(self.octaves):
            scale = 2.0**octave
            x = cols * scale + offsets[octave, ..., 0, None, None]
            y = rows * scale + offsets[octave, ..., 1, None, None]
            total = total + self.persistence**octave * simplex2d(x, y, perm)
        return _standardise(total).to(reference.dtype)


# ----------------------------------------------------------------------------------------------
# coarse and pyramid


@register_noise("coarse")
@dataclasses.dataclass(frozen=True)
class CoarseNoise:
    """DAE-style coarse noise (Kascenas et al. 2022; docs/method.md §7).

    ``N(0, std^2)`` at ``resolution x resolution``, bilinearly upsampled to the image size
    (``align_corners=False``), then rolled (cyclically shifted) by a random offset per image in both
    axes so the coarse grid does not sit at fixed positions.

    Attributes:
        resolution: Side of the low-resolution noise grid, 1 to ``MAX_NOISE_SCALE``.
        std: Standard deviation of the low-resolution noise, > 0 (the upsampled noise has a smaller one).
    """

    resolution: int = 16
    std: float = 0.2

    def __post_init__(self) -> None:
        _set_param(self, "resolution", integer=True, minimum=1, maximum=MAX_NOISE_SCALE)
        _set_param(self, "std", positive=True)

    def __call__(
        self, reference: Tensor, generator: torch.Generator | None = None, foreground: Tensor | None = None
    ) -> Tensor:
        """Draw coarse noise shaped like ``reference``; ``foreground`` is ignored."""
        dtype = _work_dtype(reference, generator)
        batch, channels, height, width = reference.shape
        grid_shape = (batch, channels, self.resolution, self.resolution)
        grid = self.std * _randn(grid_shape, generator, reference, dtype)
        upsampled = F.interpolate(grid, size=(height, width), mode="bilinear", align_corners=False)
        shift_rows = torch.randint(height, (batch,), generator=generator, device=reference.device)
        shift_cols = torch.randint(width, (batch,), generator=generator, device=reference.device)
        return _roll_per_image(upsampled, shift_rows, shift_cols).to(reference.dtype)


def _roll_per_image(images: Tensor, shift_rows: Tensor, shift_cols: Tensor) -> Tensor:
    """``torch.roll(images[b], (shift_rows[b], shift_cols[b]), dims=(-2, -1))`` for every ``b`` at once."""
    batch, channels, height, width = images.shape
    rows = torch.remainder(torch.arange(height, device=images.device) - shift_rows[:, None], height)
    cols = torch.remainder(torch.arange(width, device=images.device) - shift_cols[:, None], width)
    images = images.gather(2, rows[:, None, :, None].expand(batch, channels, height, width))
    return images.gather(3, cols[:, None, None, :].expand(batch, channels, height, width))


@register_noise("pyramid")
@dataclasses.dataclass(frozen=True)
class PyramidNoise:
    """Pyramid (multi-resolution) noise (docs/method.md §7).

    ``n = sum_i discount^i * upsample(N(0, I) at (H / r^i, W / r^i))`` for ``i = 0 .. levels-1``, with
    one ratio ``r ~ U[2, 4)`` per call, sizes rounded down (at least 1), bilinear upsampling
    (``align_corners=False``). The sum stops after the first level whose height or width is 1 pixel,
    and is renormalised to zero mean and unit std per image and channel.

    Attributes:
        discount: Weight ratio between successive levels, > 0.
        levels: Maximum number of levels including the full-resolution one, 1 to ``MAX_NOISE_LEVELS``.
    """

    discount: float = 0.8
    levels: int = 10

    def __post_init__(self) -> None:
        _set_param(self, "discount", positive=True)
        _set_param(self, "levels", integer=True, minimum=1, maximum=MAX_NOISE_LEVELS)

    def __call__(
        self, reference: Tensor, generator: torch.Generator | None = None, foreground: Tensor | None = None
    ) -> Tensor:
        """Draw pyramid noise shaped like ``reference``; ``foreground`` is ignored."""
        dtype = _work_dtype(reference, generator)
        batch, channels, height, width = reference.shape
        # One host sync per call to read the ratio; it decides the level sizes.
        draw = torch.rand((), generator=generator, device=reference.device, dtype=torch.float64)
        ratio = 2.0 + 2.0 * draw.item()
        total = _randn((batch, channels, height, width), generator, reference, dtype)
        for level in range(1, self.levels):
            size = (max(1, int(height / ratio**level)), max(1, int(width / ratio**level)))
            coarse = _randn((batch, channels, *size), generator, reference, dtype)
            upsampled = F.interpolate(coarse, size=(height, width), mode="bilinear", align_corners=False)
            total = total + self.discount**level * upsampled
            if min(size) == 1:
                break
        return _standardise(total).to(reference.dtype)
