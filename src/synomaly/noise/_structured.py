"""Spatially structured baseline noises: fractal simplex (AnoDDPM), coarse (DAE) and pyramid noise."""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import Tensor

from synomaly.limits import MAX_NOISE_LEVELS, MAX_NOISE_SCALE
from synomaly.noise._registry import _randn, _set_param, _standardise, _work_dtype, register_noise

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
