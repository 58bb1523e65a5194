"""Surface distance (HD95) between masks and structural similarity (SSIM) between images."""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import torch
from torch import Tensor

from synomaly.errors import ConfigError
from synomaly.metrics._overlap import _check_masks

Spacing = float | Sequence[float] | None


def _check_spacing(spacing: Spacing) -> list[float] | None:
    if spacing is None:
        return None
    values = [float(spacing)] * 2 if isinstance(spacing, (int, float)) else [float(s) for s in spacing]
    if len(values) != 2 or not all(v > 0 for v in values):
        raise ConfigError("spacing", f"must be a positive number or a (row, column) pair, got {spacing!r}")
    return values


def hd95(pred: Tensor, target: Tensor, spacing: Spacing = None) -> Tensor:
    """95th percentile Hausdorff distance, MedPy style: ``P95(d(Ep, Et) U d(Et, Ep))``.

    ``d(A, B)`` holds, for every edge pixel of ``A``, the Euclidean distance to the nearest edge
    pixel of ``B``; both directed sets are pooled before taking the percentile (MONAI's
    ``compute_hausdorff_distance(percentile=95)`` takes the larger of the two directed percentiles).

    Args:
        pred: Predicted mask, bool ``[B, 1, H, W]``.
        target: Ground-truth mask, bool ``[B, 1, H, W]``.
        spacing: Pixel size, one number or (row, column); ``None`` means 1 (distances in pixels).

    Returns:
        Float64 ``[B]`` on the CPU; NaN where the prediction or the target is empty.
    """
    from monai.metrics.utils import get_edge_surface_distance

    _check_masks(pred, target)
    sizes = _check_spacing(spacing)
    # MONAI's exact KD-tree path is its CPU path; on CUDA it switches algorithm.
    pred, target = pred[:, 0].cpu(), target[:, 0].cpu()
    out = torch.full((pred.shape[0],), math.nan, dtype=torch.float64)
    both = pred.flatten(1).any(1) & target.flatten(1).any(1)
    for i in both.nonzero().flatten().tolist():  # MONAI's surface distances take one image at a time
        with warnings.catch_warnings():
            # MONAI 1.5-1.6 passes its own deprecated argument internally; nothing for callers to fix.
            warnings.filterwarnings("ignore", message=".*always_return_as_numpy.*", category=FutureWarning)
            _, distances, _ = get_edge_surface_distance(pred[i], target[i], spacing=sizes, symmetric=True)
        out[i] = torch.quantile(torch.cat(distances).double(), 0.95)
    return out


def ssim(
    image: Tensor,
    reconstruction: Tensor,
    *,
    data_range: float = 2.0,
    win_size: int = 11,
    sigma: float = 1.5,
) -> Tensor:
    """Mean structural similarity per image (Wang et al. 2004, Eq. 13), via MONAI.

    ``SSIM = (2 mu_x mu_y + C1)(2 s_xy + C2) / ((mu_x^2 + mu_y^2 + C1)(s_x^2 + s_y^2 + C2))`` with
    ``C1 = (0.01 L)^2``, ``C2 = (0.03 L)^2`` and Gaussian-weighted moments, averaged over the
    windows that fit inside the image. MONAI computes in float32; it agrees with scikit-image's
    ``structural_similarity(gaussian_weights=True, sigma=1.5, use_sample_covariance=False)``, which
    crops the same border, to about 1e-5.

    Args:
        image: Input images ``[B, C, H, W]``.
        reconstruction: Reconstructions, same shape.
        data_range: ``L``, the value range (2.0 for images in ``[-1, 1]``).
        win_size: Gaussian window width; ``H`` and ``W`` must be at least this.
        sigma: Gaussian window standard deviation.

    Returns:
        Float64 ``[B]`` on the CPU.
    """
    from monai.metrics.regression import compute_ssim_and_cs

    if image.shape != reconstruction.shape or image.ndim != 4 or min(image.shape[-2:]) < win_size:
        raise ValueError(
            f"SSIM needs two [B, C, H, W] tensors of the same shape with H, W >= {win_size}, "
            f"got {tuple(image.shape)} and {tuple(reconstruction.shape)}"
        )
    ssim_map, _ = compute_ssim_and_cs(
        reconstruction.detach(),
        image.detach(),
        spatial_dims=2,
        kernel_size=(win_size, win_size),
        kernel_sigma=(sigma, sigma),
        data_range=data_range,
    )
    return ssim_map.flatten(1).mean(1).double().cpu()
