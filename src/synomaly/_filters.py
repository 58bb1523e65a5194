"""Separable Gaussian filtering on batched tensors (the only convolution helpers the package needs)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

# OpenCV's getGaussianKernel uses these fixed tables for sigma <= 0 and odd sizes up to 7.
_OPENCV_SMALL_KERNELS = {
    1: (1.0,),
    3: (0.25, 0.5, 0.25),
    5: (0.0625, 0.25, 0.375, 0.25, 0.0625),
    7: (0.03125, 0.109375, 0.21875, 0.28125, 0.21875, 0.109375, 0.03125),
}


def gaussian_kernel1d(sigma: float, radius: int, *, device=None, dtype=torch.float32) -> torch.Tensor:
    """Normalised 1-D Gaussian ``exp(-x^2 / (2 sigma^2))`` on ``x = -radius..radius``."""
    x = torch.arange(-radius, radius + 1, device=device, dtype=torch.float64)
    kernel = torch.exp(-(x**2) / (2.0 * sigma**2))
    return (kernel / kernel.sum()).to(dtype)


def opencv_kernel1d(ksize: int, *, device=None, dtype=torch.float32) -> torch.Tensor:
    """The 1-D kernel of OpenCV's ``GaussianBlur(img, (k, k), 0)``.

    For ``k <= 7`` OpenCV uses fixed binomial-like tables; otherwise
    ``sigma = 0.3 ((k - 1) / 2 - 1) + 0.8`` (OpenCV ``getGaussianKernel``).
    """
    if ksize < 1 or ksize % 2 == 0:
        raise ValueError(f"blur kernel size must be a positive odd integer, got {ksize}")
    if ksize in _OPENCV_SMALL_KERNELS:
        return torch.tensor(_OPENCV_SMALL_KERNELS[ksize], device=device, dtype=dtype)
    sigma = 0.3 * ((ksize - 1) / 2 - 1) + 0.8
    return gaussian_kernel1d(sigma, ksize // 2, device=device, dtype=dtype)


def separable_filter(images: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """Filter ``[B, C, H, W]`` images with ``kernel`` along rows and columns.

    Borders are reflected without repeating the edge pixel (OpenCV ``BORDER_REFLECT_101``,
    torch ``"reflect"``). When the kernel is wider than the image, the reflection is repeated.
    """
    radius = kernel.numel() // 2
    if radius == 0:
        return images * kernel.reshape(())
    b, c, h, w = images.shape
    x = images.reshape(b * c, 1, h, w)
    k = kernel.to(device=images.device, dtype=images.dtype)
    x = F.conv2d(_reflect_pad(x, (0, 0, radius, radius)), k.reshape(1, 1, -1, 1))
    x = F.conv2d(_reflect_pad(x, (radius, radius, 0, 0)), k.reshape(1, 1, 1, -1))
    return x.reshape(b, c, h, w)


def _reflect_pad(x: torch.Tensor, pad: tuple[int, int, int, int]) -> torch.Tensor:
    """Reflect-101 padding that also works when the pad exceeds the image size."""
    left, right, top, bottom = pad
    h, w = x.shape[-2:]
    if left < w and right < w and top < h and bottom < h:
        return F.pad(x, pad, mode="reflect")
    rows = _reflect_index(torch.arange(-top, h + bottom, device=x.device), h)
    cols = _reflect_index(torch.arange(-left, w + right, device=x.device), w)
    return x[..., rows[:, None], cols[None, :]]


def _reflect_index(idx: torch.Tensor, n: int) -> torch.Tensor:
    if n == 1:
        return torch.zeros_like(idx)
    period = 2 * (n - 1)
    idx = torch.remainder(idx, period)
    return torch.where(idx >= n, period - idx, idx)


def gaussian_blur(images: torch.Tensor, sigma: float, truncate: float = 4.0) -> torch.Tensor:
    """Gaussian blur with standard deviation ``sigma`` (pixels), kernel cut at ``truncate`` sigma."""
    radius = max(1, int(math.ceil(truncate * sigma)))
    return separable_filter(images, gaussian_kernel1d(sigma, radius, device=images.device))
