"""Anomaly maps: OpenCV-parity blur and batched small-component removal, against the libraries."""

import numpy as np
import pytest
import torch

from synomaly._filters import gaussian_blur, opencv_kernel1d
from synomaly.maps import blur, difference_map, remove_small_components

cv2 = pytest.importorskip("cv2")
skimage_morphology = pytest.importorskip("skimage.morphology")

# OpenCV 4.x (the reference scripts' version) has fixed tables for k <= 7 only; OpenCV 5 added one
# for k = 9. We follow OpenCV 4 (docs/method.md), so k = 9 is compared only against OpenCV 4.
OPENCV_MAJOR = int(cv2.__version__.split(".")[0])
KERNELS = [1, 3, 5, 7, 11, 13, 15, 17] + ([9] if OPENCV_MAJOR < 5 else [])


@pytest.mark.parametrize("k", KERNELS)
@pytest.mark.parametrize("shape", [(37, 29), (16, 16), (64, 48)])
def test_blur_matches_opencv(k, shape):
    rng = np.random.default_rng(k)
    images = rng.uniform(-1, 1, size=(3, *shape)).astype(np.float32)
    expected = np.stack([cv2.GaussianBlur(img, (k, k), 0) for img in images])
    out = blur(torch.from_numpy(images)[:, None], k)[:, 0].numpy()
    np.testing.assert_allclose(out, expected, atol=2e-6)


def test_kernel_9_uses_the_opencv4_sigma_rule():
    sigma = 0.3 * ((9 - 1) / 2 - 1) + 0.8
    x = np.arange(-4, 5)
    expected = np.exp(-(x**2) / (2 * sigma**2))
    np.testing.assert_allclose(opencv_kernel1d(9).numpy(), expected / expected.sum(), rtol=1e-6)


@pytest.mark.parametrize("k", [0, 4, -3])
def test_even_or_nonpositive_kernels_are_rejected(k):
    with pytest.raises(ValueError, match="odd"):
        opencv_kernel1d(k)


def test_blur_wider_than_image_matches_opencv():
    img = np.random.default_rng(0).uniform(size=(5, 6)).astype(np.float32)
    expected = cv2.GaussianBlur(img, (17, 17), 0)
    np.testing.assert_allclose(blur(torch.from_numpy(img)[None, None], 17)[0, 0].numpy(), expected, atol=2e-6)


def test_gaussian_blur_preserves_constants_and_mean():
    x = torch.full((2, 1, 20, 20), 0.7)
    torch.testing.assert_close(gaussian_blur(x, 3.0), x)
    noise = torch.randn(1, 1, 64, 64, generator=torch.Generator().manual_seed(0))
    assert gaussian_blur(noise, 3.0).std() < 0.2 * noise.std()


def test_difference_map_is_zero_for_identical_images_and_symmetric():
    x = torch.rand(2, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    y = torch.rand(2, 1, 16, 16, generator=torch.Generator().manual_seed(1))
    assert difference_map(x, x, 5).abs().max() == 0
    torch.testing.assert_close(difference_map(x, y, 5), difference_map(y, x, 5))
    torch.testing.assert_close(difference_map(x, y, 3), (blur(x, 3) - blur(y, 3)).abs())


@pytest.mark.parametrize("connectivity", [1, 2])
@pytest.mark.parametrize("min_size", [0, 1, 2, 5, 12])
def test_remove_small_components_matches_scikit_image(connectivity, min_size):
    rng = np.random.default_rng(min_size + 10 * connectivity)
    masks = rng.uniform(size=(4, 1, 24, 20)) > 0.6
    out, areas = remove_small_components(torch.from_numpy(masks), min_size, connectivity)
    # scikit-image 0.26 removes objects of size <= max_size: keep size >= min_size.
    expected = np.stack(
        [skimage_morphology.remove_small_objects(m[0], max_size=max(min_size - 1, 0), connectivity=connectivity) for m in masks]
    )[:, None]
    np.testing.assert_array_equal(out.numpy(), expected)
    np.testing.assert_array_equal(areas, expected.reshape(4, -1).sum(1))


def test_components_do_not_connect_across_the_batch():
    masks = torch.zeros(2, 1, 8, 8, dtype=torch.bool)
    masks[0, 0, 2:5, 2:5] = True  # 9 pixels
    masks[1, 0, 2:5, 2:5] = True  # the same pixels in the next image
    out, areas = remove_small_components(masks, 10)
    assert not out.any() and areas.tolist() == [0, 0]
    out, areas = remove_small_components(masks, 9)
    assert areas.tolist() == [9, 9]
