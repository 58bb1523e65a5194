"""Preprocessing: normalisation, fitting to size and back, foreground masks, presets."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from synomaly.errors import ConfigError
from synomaly.preprocess import (
    FIT_MODES,
    MODALITY_PRESETS,
    FitInfo,
    Preprocessing,
    clip_percentiles,
    fit_to_size,
    foreground_mask,
    noise_params_for,
    normalize_minmax,
    otsu_thresholds,
    restore_size,
)

RNG = np.random.default_rng(0)


def disk_images(n: int = 2, h: int = 48, w: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """Bright disks (with a dark hole and a small bright speck outside) on a noisy dark background."""
    rows, cols = np.ogrid[:h, :w]
    images = RNG.normal(10.0, 2.0, (n, h, w)).astype(np.float32)
    disks = np.zeros((n, h, w), bool)
    for k in range(n):
        disks[k] = (rows - 20 - 3 * k) ** 2 + (cols - 25 - 8 * k) ** 2 <= (12 - k) ** 2
    images[disks] += 100.0
    holes = (rows - 20) ** 2 + (cols - 25) ** 2 <= 9
    images[0][holes] = 10.0  # an enclosed dark region still belongs to the organ
    images[:, 2:4, 60:62] = 150.0  # a speck: not the largest component
    return images, disks


def test_normalize_minmax_maps_each_image_to_full_range():
    images = RNG.normal(size=(3, 8, 9)).astype(np.float32) * np.array([1, 10, 1000])[:, None, None]
    out = normalize_minmax(images)
    assert out.dtype == np.float32 and out.shape == images.shape
    np.testing.assert_allclose(out.min(axis=(1, 2)), -1.0)
    np.testing.assert_allclose(out.max(axis=(1, 2)), 1.0)
    # affine per image: the argmin/argmax positions are preserved
    assert (out.reshape(3, -1).argmax(1) == images.reshape(3, -1).argmax(1)).all()
    expected = 2 * (images[1] - images[1].min()) / (images[1].max() - images[1].min()) - 1
    np.testing.assert_allclose(out[1], expected, atol=1e-6)


def test_constant_image_maps_to_minus_one_without_nan():
    out = normalize_minmax(np.stack([np.full((4, 5), 7.0), np.arange(20.0).reshape(4, 5)]))
    assert np.isfinite(out).all()
    np.testing.assert_array_equal(out[0], -1.0)
    assert out[1].min() == -1.0 and out[1].max() == 1.0


def test_clip_percentiles_matches_numpy_per_image():
    images = RNG.standard_cauchy((3, 16, 16)).astype(np.float32)
    out = clip_percentiles(images, 1.0, 99.0)
    for k in range(3):
        low, high = np.percentile(images[k], [1.0, 99.0])
        np.testing.assert_allclose(out[k], np.clip(images[k], low, high), rtol=1e-6)
    with pytest.raises(ValueError, match="percentiles"):
        clip_percentiles(images, 50, 10)


def test_letterbox_without_resizing_is_exactly_invertible():
    images, disks = disk_images()
    fitted, info = fit_to_size(images, 64, "letterbox")
    assert fitted.shape == (2, 64, 64) and info.pad == (8, 8, 0, 0)
    np.testing.assert_array_equal(fitted[:, 8:56], images)
    minimum = images.min(axis=(1, 2))[:, None, None]
    np.testing.assert_array_equal(fitted[:, :8], np.broadcast_to(minimum, (2, 8, 64)))
    np.testing.assert_array_equal(restore_size(fitted, info), images)
    masks, mask_info = fit_to_size(disks, 64, "letterbox", kind="mask")
    assert masks.dtype == bool and mask_info == info
    np.testing.assert_array_equal(restore_size(masks[:, None], info, kind="mask"), disks)


def test_center_mode_pads_and_crops_without_resizing():
    images, _ = disk_images()
    fitted, info = fit_to_size(images, 56, "center")  # rows padded by 8, columns cropped by 8
    assert fitted.shape == (2, 56, 56) and info.pad == (4, 4, -4, -4)
    np.testing.assert_array_equal(fitted[:, 4:52], images[:, :, 4:60])
    back = restore_size(fitted, info)
    np.testing.assert_array_equal(back[:, :, 4:60], images[:, :, 4:60])
    assert (back[:, :, :4] == 0).all() and (back[:, :, 60:] == 0).all()  # cropped away


def test_downscaling_uses_area_and_upscaling_bilinear():
    images = RNG.random((2, 32, 32)).astype(np.float32)
    small, info = fit_to_size(images, 16, "stretch")
    np.testing.assert_allclose(small, images.reshape(2, 16, 2, 16, 2).mean(axis=(2, 4)), atol=1e-6)
    big = restore_size(small, info)
    assert big.shape == images.shape
    assert big.min() >= small.min() - 1e-6 and big.max() <= small.max() + 1e-6  # interpolation, no overshoot
    np.testing.assert_allclose(big[:, 1::2, 1::2][:, :-1, :-1].mean(), small.mean(), atol=0.05)


def test_resized_masks_stay_binary_and_roughly_aligned():
    _, disks = disk_images(n=1, h=96, w=128)
    fitted, info = fit_to_size(disks, 32, "letterbox", kind="mask")
    assert fitted.dtype == bool and fitted.shape == (1, 32, 32)
    back = restore_size(fitted, info, kind="mask")
    iou = (back & disks).sum() / (back | disks).sum()
    assert back.shape == disks.shape and iou > 0.8


def test_torch_in_torch_out_and_no_aliasing():
    images = torch.rand(2, 16, 16)
    fitted, info = fit_to_size(images, 16, "letterbox")
    assert isinstance(fitted, torch.Tensor) and torch.equal(fitted, images)
    fitted[0, 0, 0] = 5.0
    assert images[0, 0, 0] != 5.0
    array = images.numpy().copy()
    out, _ = fit_to_size(array, 16, "center")
    out[0, 0, 0] = 7.0
    assert array[0, 0, 0] != 7.0
    assert isinstance(restore_size(torch.zeros(2, 1, 16, 16), info), torch.Tensor)


def test_fit_validates_arguments():
    with pytest.raises(ValueError, match="valid modes"):
        fit_to_size(np.zeros((1, 4, 4)), 4, "resize")
    with pytest.raises(ValueError, match=r"\[N, 8, 8\]"):
        restore_size(np.zeros((1, 4, 4)), FitInfo("stretch", 8, (4, 4), (0, 0, 0, 0)))
    info = FitInfo("letterbox", 64, (48, 64), (8, 8, 0, 0))
    assert FitInfo.from_dict(json.loads(json.dumps(info.to_dict()))) == info


def test_auto_foreground_fills_holes_and_keeps_the_largest_component_per_image():
    images, disks = disk_images()
    for threshold in (0.1, "otsu"):
        mask = foreground_mask(images, "auto", threshold=threshold)
        assert mask.dtype == bool and mask.shape == images.shape
        np.testing.assert_array_equal(mask, disks)  # hole filled, speck dropped, no cross-talk


def test_foreground_of_a_constant_image_is_full():
    mask = foreground_mask(np.stack([np.zeros((8, 8)), np.eye(8)]))
    assert mask[0].all() and not mask[1].all()


def test_disk_and_none_foreground():
    disk = foreground_mask(np.zeros((2, 128, 128)), "disk")
    radius = 128 / 2.2
    assert disk.shape == (2, 128, 128) and (disk[0] == disk[1]).all()
    assert abs(disk[0].sum() - np.pi * radius**2) < 2 * np.pi * radius  # area within one perimeter
    assert disk[0, 64, 64] and not disk[0, 0, 0] and not disk[0, 64, 64 + int(radius) + 2]
    assert foreground_mask(np.zeros((1, 5, 6)), "none").all()
    with pytest.raises(ValueError, match="valid"):
        foreground_mask(np.zeros((1, 5, 6)), "organ")


def test_otsu_matches_scikit_image():
    filters = pytest.importorskip("skimage.filters")
    images = np.concatenate([disk_images()[0], RNG.gamma(2.0, size=(2, 48, 64)).astype(np.float32)])
    expected = [filters.threshold_otsu(image.astype(np.float64)) for image in images]
    np.testing.assert_allclose(otsu_thresholds(images), expected, rtol=1e-6)


def test_presets_follow_the_method_table():
    assert {"brain-flair", "ultrasound", "liver-ct"} <= set(MODALITY_PRESETS)
    flair = {"sigma": 3.0, "threshold": 175.0, "offset": 0.5, "direction": 1}
    assert MODALITY_PRESETS["brain-flair"]["noise"] == flair
    assert MODALITY_PRESETS["ultrasound"]["noise"]["direction"] == -1
    assert MODALITY_PRESETS["ultrasound"]["foreground"] == "disk"
    assert MODALITY_PRESETS["liver-ct"]["noise"]["offset"] == 1.0
    assert MODALITY_PRESETS["liver-ct"]["foreground"] == "given"
    json.dumps(MODALITY_PRESETS)  # plain data


def test_noise_sigma_scales_with_image_size():
    assert noise_params_for("brain-flair", 64)["sigma"] == pytest.approx(1.5)
    assert noise_params_for("ultrasound", 256)["sigma"] == pytest.approx(14.0)
    params = noise_params_for("brain-flair", 128)
    assert params == MODALITY_PRESETS["brain-flair"]["noise"]
    params["sigma"] = 99.0
    assert MODALITY_PRESETS["brain-flair"]["noise"]["sigma"] == 3.0  # callers get a copy
    with pytest.raises(ValueError, match="brain-flair, ultrasound"):
        noise_params_for("retina", 128)
    with pytest.raises(ValueError, match="image_size"):
        noise_params_for("brain-flair", 0)


def test_preprocessing_apply_gives_model_input():
    images, disks = disk_images(n=3)
    prep = Preprocessing(clip=True, size=32, fit="letterbox", foreground="auto")
    x, fg, info = prep.apply(images * 40.0 + 1000.0)
    assert x.shape == (3, 1, 32, 32) and x.dtype == np.float32 and x.flags.c_contiguous
    assert x.min() == -1.0 and x.max() == 1.0
    assert fg.shape == (3, 1, 32, 32) and fg.dtype == bool and fg.any() and not fg.all()
    assert info.original_shape == (48, 64) and torch.from_numpy(x).shape == (3, 1, 32, 32)
    assert restore_size(fg, info, kind="mask").shape == disks.shape


def test_preprocessing_given_region_is_fitted_like_the_images():
    images, disks = disk_images()
    prep = Preprocessing.from_preset("liver-ct", size=64)
    assert prep.foreground == "given"
    _, fg, info = prep.apply(images, region=disks)
    np.testing.assert_array_equal(restore_size(fg, info, kind="mask"), disks)
    with pytest.raises(ValueError, match="region"):
        prep.apply(images)
    with pytest.raises(ValueError, match="does not match"):
        prep.apply(images, region=disks[:, :, :40])


def test_preprocessing_round_trips_through_json():
    prep = Preprocessing(clip=True, clip_low=1.0, clip_high=99.0, size=64, fit="center", foreground="disk")
    again = Preprocessing.from_dict(json.loads(json.dumps(prep.to_dict())))
    assert again == prep
    with pytest.raises(ConfigError, match=r"preprocessing: unknown key\(s\) colour; valid keys: clip, "):
        Preprocessing.from_dict({**prep.to_dict(), "colour": True})


@pytest.mark.parametrize(
    "field, value",
    [
        ("size", 0),
        ("size", 64.5),
        ("fit", "resize"),
        ("foreground", "organ"),
        ("normalization", "zscore"),
        ("clip_low", -1.0),
        ("clip_high", 0.1),
        ("clip", "yes"),
        ("clip_low", "1"),
    ],
)
def test_preprocessing_validation_names_the_field(field, value):
    with pytest.raises(ValueError, match=f"preprocessing.{field}"):
        Preprocessing(**{field: value})


def test_every_fit_mode_gives_the_requested_size():
    images, _ = disk_images(n=1, h=30, w=70)
    for mode in FIT_MODES:
        fitted, info = fit_to_size(images, 40, mode)
        assert fitted.shape == (1, 40, 40)
        assert restore_size(fitted, info).shape == images.shape
