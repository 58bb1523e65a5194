"""Tests of the training-noise registry and the five noises (docs/method.md §1 and §7)."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import ndimage

from synomaly.noise import (
    NOISES,
    CoarseNoise,
    GaussianNoise,
    PyramidNoise,
    SimplexNoise,
    SynomalyNoise,
    make_noise,
    noise_from_dict,
    noise_names,
    noise_to_dict,
    register_noise,
    simplex2d,
    synomaly_noise_parts,
)

BUILTIN = ("coarse", "gaussian", "pyramid", "simplex", "synomaly")


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _neighbour_corr(noise: torch.Tensor, dim: int) -> float:
    """Pearson correlation between each pixel and its neighbour along ``dim`` (-1 columns, -2 rows)."""
    size = noise.shape[dim]
    a = noise.narrow(dim, 0, size - 1).flatten().double()
    b = noise.narrow(dim, 1, size - 1).flatten().double()
    return torch.corrcoef(torch.stack([a, b]))[0, 1].item()


def _disk(batch: int, size: int, radius: float) -> torch.Tensor:
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    disk = (yy - size / 2) ** 2 + (xx - size / 2) ** 2 < radius**2
    return disk.expand(batch, 1, size, size).clone()


# ----------------------------------------------------------------------------------------------
# registry


def test_builtin_names_are_registered_and_sorted():
    names = noise_names()
    assert set(BUILTIN) <= set(names)
    assert names == sorted(names)
    assert NOISES["synomaly"] is SynomalyNoise and NOISES["gaussian"] is GaussianNoise


def test_unknown_name_lists_valid_names_sorted():
    with pytest.raises(ValueError, match="perlin") as excinfo:
        make_noise("perlin")
    assert ", ".join(noise_names()) in str(excinfo.value)


@pytest.mark.parametrize(
    ("name", "param"), [("synomaly", "sigmaa"), ("gaussian", "std"), ("pyramid", "ratio")]
)
def test_unknown_parameter_is_named(name, param):
    with pytest.raises(ValueError, match=param):
        make_noise(name, **{param: 1.0})


@pytest.mark.parametrize(
    ("name", "param", "value"),
    [
        ("synomaly", "sigma", 0),
        ("synomaly", "sigma", -1),
        ("synomaly", "sigma", math.nan),
        ("synomaly", "sigma", "3"),
        ("synomaly", "threshold", -1),
        ("synomaly", "threshold", 255.5),
        ("synomaly", "offset", -0.1),
        ("synomaly", "direction", 0),
        ("synomaly", "direction", (2,)),
        ("synomaly", "direction", ()),
        ("synomaly", "direction", "up"),
        ("synomaly", "direction", (True,)),
        ("simplex", "octaves", 0),
        ("simplex", "octaves", 2.5),
        ("simplex", "persistence", 0),
        ("simplex", "frequency", -64),
        ("coarse", "resolution", 0),
        ("coarse", "std", 0),
        ("pyramid", "discount", -0.8),
        ("pyramid", "levels", 0),
        ("pyramid", "levels", True),
    ],
)
def test_invalid_parameter_raises_naming_it(name, param, value):
    with pytest.raises(ValueError, match=f"^{name} noise: {param} must"):
        make_noise(name, **{param: value})


def test_parameters_are_normalised():
    assert make_noise("synomaly", direction=-1).direction == (-1,)
    assert make_noise("synomaly", direction=[1, -1]).direction == (1, -1)
    noise = make_noise("simplex", octaves=3, frequency=32)
    assert isinstance(noise.frequency, float) and isinstance(noise.octaves, int)
    # The closed ends of the ranges are valid.
    assert make_noise("synomaly", threshold=0, offset=0).threshold == 0.0
    assert make_noise("synomaly", threshold=255).threshold == 255.0


@pytest.mark.parametrize(
    "noise",
    [
        GaussianNoise(),
        SynomalyNoise(),
        SynomalyNoise(sigma=7, threshold=150, offset=1.0, direction=(1, -1)),
        SimplexNoise(octaves=4, persistence=0.5, frequency=32),
        CoarseNoise(resolution=8, std=0.5),
        PyramidNoise(discount=0.9, levels=4),
    ],
    ids=repr,
)
def test_dict_round_trip_through_json(noise):
    data = noise_to_dict(noise)
    assert data["name"] == next(name for name, cls in NOISES.items() if cls is type(noise))
    restored = noise_from_dict(json.loads(json.dumps(data)))
    assert restored == noise and type(restored) is type(noise)


def test_dict_lists_parameters_with_tuples_as_lists():
    assert noise_to_dict(SynomalyNoise(direction=-1)) == {
        "name": "synomaly",
        "sigma": 3.0,
        "threshold": 175.0,
        "offset": 0.5,
        "direction": [-1],
    }


def test_dict_without_name_or_unregistered_class_raises():
    with pytest.raises(ValueError, match="name"):
        noise_from_dict({"sigma": 3.0})

    @dataclasses.dataclass(frozen=True)
    class Unregistered:
        pass

    with pytest.raises(ValueError, match="not a registered noise"):
        noise_to_dict(Unregistered())


@pytest.fixture
def custom_noise_name():
    name = "test-constant"
    yield name
    NOISES.pop(name, None)


def test_register_noise_adds_a_usable_noise(custom_noise_name):
    @register_noise(custom_noise_name)
    @dataclasses.dataclass(frozen=True)
    class ConstantNoise:
        value: float = 1.0

        def __call__(self, reference, generator=None, foreground=None):
            return torch.full_like(reference, self.value)

    assert custom_noise_name in noise_names()
    noise = noise_from_dict({"name": custom_noise_name, "value": 2.0})
    assert torch.equal(noise(torch.zeros(1, 1, 2, 2)), torch.full((1, 1, 2, 2), 2.0))
    with pytest.raises(ValueError, match="already registered"):
        register_noise(custom_noise_name)(dataclasses.dataclass(type("Other", (), {})))
    with pytest.raises(TypeError, match="dataclass"):
        register_noise("test-not-a-dataclass")(type("Plain", (), {}))


# ----------------------------------------------------------------------------------------------
# shared contract: shape, dtype, device, seeding


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("name", BUILTIN)
def test_output_matches_reference_shape_dtype_device(name, dtype):
    # Non-square with C > 1 catches swapped axes and per-channel broadcasting mistakes.
    reference = torch.zeros(2, 3, 16, 24, dtype=dtype)
    out = make_noise(name)(reference, _gen(0))
    assert out.shape == reference.shape and out.dtype == dtype and out.device == reference.device
    assert torch.isfinite(out).all() and out.float().std() > 0


@pytest.mark.parametrize("name", BUILTIN)
def test_same_seed_same_noise_other_seed_other_noise(name):
    noise = make_noise(name)
    reference = torch.zeros(2, 1, 32, 32)
    first = noise(reference, _gen(1))
    assert torch.equal(first, noise(reference, _gen(1)))
    assert not torch.allclose(first, noise(reference, _gen(2)))


@pytest.mark.parametrize("name", BUILTIN)
def test_global_rng_is_used_without_generator(name):
    noise = make_noise(name)
    reference = torch.zeros(2, 1, 16, 16)
    torch.manual_seed(7)
    first = noise(reference)
    torch.manual_seed(7)
    assert torch.equal(first, noise(reference))


@pytest.mark.parametrize("name", BUILTIN)
def test_reference_values_do_not_matter(name):
    noise = make_noise(name)
    zeros = torch.zeros(2, 1, 16, 16)
    assert torch.equal(noise(zeros, _gen(3)), noise(torch.randn(2, 1, 16, 16), _gen(3)))


@pytest.mark.parametrize("name", ["coarse", "gaussian", "pyramid", "simplex"])
def test_other_noises_ignore_foreground(name):
    noise = make_noise(name)
    reference = torch.zeros(2, 1, 16, 16)
    empty = torch.zeros(2, 1, 16, 16, dtype=torch.bool)
    assert torch.equal(noise(reference, _gen(4), foreground=empty), noise(reference, _gen(4)))


@pytest.mark.parametrize("name", BUILTIN)
@pytest.mark.parametrize(
    ("reference", "message"),
    [(torch.zeros(1, 16, 16), r"\[B, C, H, W\]"), (torch.zeros(1, 1, 16, 16, dtype=torch.int64), "floating")],
)
def test_bad_reference_raises(name, reference, message):
    with pytest.raises(ValueError, match=message):
        make_noise(name)(reference, _gen(0))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", BUILTIN)
def test_cuda_reference_and_generator(name):
    reference = torch.zeros(2, 1, 32, 32, device="cuda")
    out = make_noise(name)(reference, torch.Generator(device="cuda").manual_seed(0))
    assert out.device == reference.device and torch.isfinite(out).all()
    with pytest.raises(ValueError, match="generator"):
        make_noise(name)(reference, _gen(0))


# ----------------------------------------------------------------------------------------------
# gaussian and synomaly


def test_gaussian_is_standard_normal():
    out = GaussianNoise()(torch.zeros(4, 1, 64, 64), _gen(0))
    assert abs(out.mean().item()) < 0.05 and abs(out.std().item() - 1.0) < 0.03
    assert abs(_neighbour_corr(out, -1)) < 0.05


def test_synomaly_blob_fraction_at_reference_setting():
    parts = SynomalyNoise().parts(torch.zeros(8, 1, 128, 128), _gen(0))
    fraction = parts.blob_mask.float().mean().item()
    assert 0.03 <= fraction <= 0.25, fraction
    # Every image gets blobs: the rescaled maximum is 255 > threshold by construction.
    assert parts.blob_mask.flatten(1).any(dim=1).all()


def test_synomaly_noise_is_gaussian_plus_amplitude_times_blobs():
    reference = torch.zeros(4, 2, 32, 32)
    noise = SynomalyNoise()
    parts = noise.parts(reference, _gen(5))
    # The Gaussian part is the first draw, so the gaussian noise with the same seed reproduces g.
    gaussian = GaussianNoise()(reference, _gen(5))
    expected_shift = parts.amplitude.view(-1, 1, 1, 1) * parts.blob_mask
    torch.testing.assert_close(parts.noise - gaussian, expected_shift, atol=1e-6, rtol=0)
    assert parts.blob_mask.dtype == torch.bool and parts.amplitude.shape == (4,)
    assert torch.equal(noise(reference, _gen(5)), parts.noise)
    assert torch.equal(synomaly_noise_parts(reference, _gen(5)).noise, parts.noise)


def test_synomaly_blob_mask_matches_scipy_blur_oracle():
    reference = torch.zeros(3, 1, 48, 40, dtype=torch.float64)
    noise = SynomalyNoise(sigma=3.0, threshold=175.0)
    parts = noise.parts(reference, _gen(6))
    gaussian = GaussianNoise()(reference, _gen(6)).numpy()
    # scipy's "mirror" border is reflect-101, the blur's border; its radius int(4 * 3 + 0.5) = 12 matches.
    blurred = ndimage.gaussian_filter(gaussian, sigma=(0, 0, 3.0, 3.0), mode="mirror", truncate=4.0)
    low = blurred.min(axis=(2, 3), keepdims=True)
    scaled = (blurred - low) / (blurred.max(axis=(2, 3), keepdims=True) - low) * 255.0
    decided = np.abs(scaled - 175.0) > 1e-6
    assert decided.mean() > 0.99
    np.testing.assert_array_equal(parts.blob_mask.numpy()[decided], (scaled > 175.0)[decided])


@pytest.mark.parametrize("kind", ["bool", "float", "per-channel"])
def test_synomaly_blobs_stay_inside_foreground(kind):
    batch, size = 8, 64
    reference = torch.zeros(batch, 2, size, size)
    disk = _disk(batch, size, radius=size / 3)
    foreground = {
        "bool": disk,
        "float": disk.float(),
        "per-channel": torch.cat([disk, torch.zeros_like(disk)], dim=1),
    }[kind]
    parts = SynomalyNoise().parts(reference, _gen(7), foreground=foreground)
    outside = ~foreground.bool().expand_as(parts.blob_mask)
    assert not (parts.blob_mask & outside).any()
    assert parts.blob_mask.any()
    gaussian = GaussianNoise()(reference, _gen(7))
    assert torch.equal(parts.noise[outside], gaussian[outside])


def test_synomaly_foreground_with_wrong_shape_raises():
    with pytest.raises(ValueError, match="foreground"):
        SynomalyNoise()(torch.zeros(2, 1, 16, 16), _gen(0), foreground=torch.ones(2, 1, 16, 8))


@pytest.mark.parametrize("offset", [0.0, 0.5, 1.0])
def test_synomaly_amplitudes_lie_in_offset_to_one_plus_offset(offset):
    parts = SynomalyNoise(offset=offset).parts(torch.zeros(64, 1, 8, 8), _gen(8))
    assert (parts.amplitude >= offset).all() and (parts.amplitude <= 1.0 + offset).all()
    # Drawn per image, not one shared value.
    assert parts.amplitude.max() - parts.amplitude.min() > 0.5


def test_synomaly_negative_direction_only_darkens():
    reference = torch.zeros(16, 1, 32, 32)
    parts = SynomalyNoise(offset=1.0, direction=-1).parts(reference, _gen(9))
    assert (parts.amplitude <= -1.0).all() and (parts.amplitude >= -2.0).all()
    shift = parts.noise - GaussianNoise()(reference, _gen(9))
    assert (shift <= 0).all() and (shift < 0).any()


def test_synomaly_both_directions_are_drawn():
    amplitude = SynomalyNoise(direction=(1, -1)).parts(torch.zeros(64, 1, 8, 8), _gen(10)).amplitude
    assert (amplitude > 0).any() and (amplitude < 0).any()
    assert (amplitude.abs() >= 0.5).all()


@pytest.mark.parametrize(("threshold", "low", "high"), [(255.0, 0.0, 0.0), (0.0, 0.99, 1.0)])
def test_synomaly_threshold_extremes(threshold, low, high):
    fraction = SynomalyNoise(threshold=threshold).parts(torch.zeros(4, 1, 32, 32), _gen(11)).blob_mask
    assert low <= fraction.float().mean().item() <= high


# ----------------------------------------------------------------------------------------------
# simplex


def test_simplex2d_lies_in_unit_interval_and_is_not_flat():
    g = _gen(12)
    perm = torch.randperm(256, generator=g)
    x, y = (torch.rand(2, 200_000, generator=g, dtype=torch.float64) * 200 - 100).unbind(0)
    values = simplex2d(x, y, perm)
    assert values.abs().max() <= 1.0
    assert values.std() > 0.3 and values.abs().max() > 0.8


def test_simplex2d_is_continuous_across_simplex_boundaries():
    perm = torch.randperm(256, generator=_gen(13))
    # A diagonal line through many cells and both triangle kinds, sampled finely.
    t = torch.linspace(0, 20, 200_001, dtype=torch.float64)
    values = simplex2d(1.3 * t, 0.7 * t + 0.1, perm)
    step = (t[1] - t[0]).item() * math.hypot(1.3, 0.7)
    # The gradient of 2-D simplex noise is bounded (about 6.5 per lattice unit here).
    assert (values.diff().abs() / step).max() < 10.0


def test_simplex2d_is_zero_at_lattice_points_and_depends_on_perm():
    axis = torch.arange(-3.0, 4.0, dtype=torch.float64)
    i, j = torch.meshgrid(axis, axis, indexing="ij")
    unskew = (i + j) * (3.0 - math.sqrt(3.0)) / 6.0
    perm = torch.randperm(256, generator=_gen(14))
    assert simplex2d(i - unskew, j - unskew, perm).abs().max() < 1e-12
    x, y = torch.rand(2, 1000, generator=_gen(15)).unbind(0)
    other = torch.randperm(256, generator=_gen(16))
    assert torch.equal(simplex2d(x * 10, y * 10, perm), simplex2d(x * 10, y * 10, perm))
    assert not torch.allclose(simplex2d(x * 10, y * 10, perm), simplex2d(x * 10, y * 10, other))


def test_simplex2d_rejects_bad_perm():
    with pytest.raises(ValueError, match="perm"):
        simplex2d(torch.zeros(3), torch.zeros(3), torch.arange(100))


def test_simplex_noise_statistics():
    out = SimplexNoise()(torch.zeros(4, 1, 64, 64), _gen(17))
    torch.testing.assert_close(out.mean(dim=(-2, -1)), torch.zeros(4, 1), atol=1e-5, rtol=0)
    torch.testing.assert_close(out.std(dim=(-2, -1), correction=0), torch.ones(4, 1), atol=1e-4, rtol=0)
    assert _neighbour_corr(out, -1) > 0.5 and _neighbour_corr(out, -2) > 0.5
    between_images = torch.corrcoef(out.flatten(1))[0, 1].item()
    assert abs(between_images) < 0.9


def test_simplex_frequency_is_feature_size_in_pixels():
    reference = torch.zeros(4, 1, 32, 32)
    smooth = SimplexNoise(octaves=1, frequency=32)(reference, _gen(18))
    rough = SimplexNoise(octaves=1, frequency=2)(reference, _gen(18))
    assert _neighbour_corr(smooth, -1) > 0.9
    assert _neighbour_corr(rough, -1) < _neighbour_corr(smooth, -1) - 0.2


# ----------------------------------------------------------------------------------------------
# coarse and pyramid


def test_coarse_is_an_upsampled_grid_rolled_per_image():
    batch, size, resolution = 6, 32, 8
    reference = torch.zeros(batch, 1, size, size)
    out = CoarseNoise(resolution=resolution, std=0.2)(reference, _gen(19))
    # The low-resolution grid is the first draw, so the same seed reproduces it.
    grid = 0.2 * torch.randn((batch, 1, resolution, resolution), generator=_gen(19))
    upsampled = F.interpolate(grid, size=(size, size), mode="bilinear", align_corners=False)
    shifts = set()
    for b in range(batch):
        matches = [
            (dy, dx)
            for dy in range(size)
            for dx in range(size)
            if torch.allclose(torch.roll(upsampled[b], (dy, dx), dims=(-2, -1)), out[b], atol=1e-6)
        ]
        assert len(matches) == 1, f"image {b}: {matches}"
        shifts.add(matches[0])
    # Both axes are shifted independently per image.
    assert len({dy for dy, _ in shifts}) > 1 and len({dx for _, dx in shifts}) > 1


def test_coarse_statistics():
    out = CoarseNoise()(torch.zeros(8, 1, 64, 64), _gen(20))
    assert abs(out.mean().item()) < 0.05
    # Bilinear interpolation between independent grid values lowers the std below 0.2.
    assert 0.1 < out.std().item() < 0.2
    assert _neighbour_corr(out, -1) > 0.8 and _neighbour_corr(out, -2) > 0.8


def test_pyramid_statistics():
    reference = torch.zeros(4, 1, 64, 64)
    out = PyramidNoise()(reference, _gen(21))
    torch.testing.assert_close(out.mean(dim=(-2, -1)), torch.zeros(4, 1), atol=1e-5, rtol=0)
    torch.testing.assert_close(out.std(dim=(-2, -1), correction=0), torch.ones(4, 1), atol=1e-4, rtol=0)
    correlated = _neighbour_corr(out, -1)
    assert correlated > 0.2
    # One level is white noise; a small discount weakens the coarse levels.
    assert abs(_neighbour_corr(PyramidNoise(levels=1)(reference, _gen(21)), -1)) < 0.1
    assert _neighbour_corr(PyramidNoise(discount=0.3)(reference, _gen(21)), -1) < correlated - 0.1
