"""Fitting stacks to the model's square size and back (numpy or torch, batched)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import numpy as np

from synomaly.limits import MAX_PIXELS

FIT_MODES = ("stretch", "letterbox", "center")


@dataclass(frozen=True)
class FitInfo:
    """How :func:`fit_to_size` changed a stack, so :func:`restore_size` can undo it.

    Attributes:
        mode: One of ``FIT_MODES``.
        size: The square side the stack was fitted to.
        original_shape: ``(H, W)`` before fitting.
        pad: Rows/columns ``(top, bottom, left, right)`` added before resizing; negative values
            were cropped.
    """

    mode: str
    size: int
    original_shape: tuple[int, int]
    pad: tuple[int, int, int, int]

    @property
    def padded_shape(self) -> tuple[int, int]:
        """``(H, W)`` after padding/cropping, before resizing to ``size``."""
        top, bottom, left, right = self.pad
        return self.original_shape[0] + top + bottom, self.original_shape[1] + left + right

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FitInfo:
        """Inverse of :meth:`to_dict`."""
        return cls(data["mode"], int(data["size"]), tuple(data["original_shape"]), tuple(data["pad"]))


def _split(total: int) -> tuple[int, int]:
    """Split a pad (>0) or crop (<0) of ``total`` pixels between both sides, the extra one last."""
    first = total // 2 if total >= 0 else -(-total // 2)
    return first, total - first


def _fit_pad(shape: tuple[int, int], size: int, mode: str) -> tuple[int, int, int, int]:
    """The pad/crop of each side that ``mode`` applies before resizing."""
    h, w = shape
    if mode == "stretch":
        return 0, 0, 0, 0
    side_h, side_w = (max(h, w), max(h, w)) if mode == "letterbox" else (size, size)
    return (*_split(side_h - h), *_split(side_w - w))


def fit_pixels(shape: tuple[int, int], size: int, mode: str) -> int:
    """Pixels per slice that :func:`fit_to_size` works on: the padded (or cropped) image or the output, the larger."""
    top, bottom, left, right = _fit_pad(shape, size, mode)
    return max((shape[0] + top + bottom) * (shape[1] + left + right), size * size)


def _pad_or_crop(x, pad: tuple[int, int, int, int], fill):
    """Pad (with ``fill``, one value per image ``[..., 1, 1]``) or crop the last two axes of a tensor."""
    top, bottom, left, right = pad
    h, w = x.shape[-2:]
    x = x[..., max(-top, 0): h - max(-bottom, 0), max(-left, 0): w - max(-right, 0)]
    if max(top, bottom, left, right) <= 0:
        return x
    h, w = x.shape[-2:]
    out_h, out_w = h + max(top, 0) + max(bottom, 0), w + max(left, 0) + max(right, 0)
    out = fill.expand(*x.shape[:-2], out_h, out_w).clone()
    out[..., max(top, 0): max(top, 0) + h, max(left, 0): max(left, 0) + w] = x
    return out


def _resize(x, shape: tuple[int, int], kind: str):
    """Resize the last two axes: area to shrink and bilinear to enlarge images, nearest for masks."""
    import torch.nn.functional as F

    if tuple(x.shape[-2:]) == tuple(shape):
        return x
    lead, (h, w) = x.shape[:-2], x.shape[-2:]
    flat = x.reshape(-1, 1, h, w)
    if kind == "mask":
        out = F.interpolate(flat.float(), size=shape, mode="nearest-exact") > 0.5
    else:
        if shape[0] < h or shape[1] < w:
            flat = F.interpolate(flat, size=(min(h, shape[0]), min(w, shape[1])), mode="area")
        out = flat if tuple(flat.shape[-2:]) == tuple(shape) else F.interpolate(
            flat, size=shape, mode="bilinear", align_corners=False)
    return out.reshape(*lead, *shape)


def _as_tensor(x, kind: str):
    """A torch view of ``x`` (bool for masks, float32 for images) and whether ``x`` was numpy."""
    import torch

    was_numpy = not isinstance(x, torch.Tensor)
    t = torch.from_numpy(np.ascontiguousarray(x)) if was_numpy else x
    return (t.bool() if kind == "mask" else t.float()), was_numpy


def _finish(out, source, was_numpy: bool):
    """Return ``out`` in the caller's type, never aliasing the caller's input."""
    if out.untyped_storage().data_ptr() == source.untyped_storage().data_ptr():
        out = out.clone()
    return out.numpy() if was_numpy else out


def _check_kind(kind: str) -> None:
    if kind not in ("image", "mask"):
        raise ValueError(f"kind must be 'image' or 'mask', got {kind!r}")


def fit_to_size(images, size: int, mode: str = "letterbox", kind: str = "image"):
    """Fit ``[N, H, W]`` images or masks to ``[N, size, size]``.

    Modes:
        - ``"stretch"``: resize straight to the square (changes the aspect ratio).
        - ``"letterbox"``: pad centrally to a square of side ``max(H, W)``, then resize; keeps the
          aspect ratio, and is exactly invertible when ``max(H, W) == size``.
        - ``"center"``: pad or crop centrally to ``size`` without resizing (cropped borders are lost).
    Images pad with each image's minimum and resize with area (shrink) / bilinear (enlarge)
    interpolation; masks pad with False and resize with nearest neighbour.

    Args:
        images: numpy array or torch tensor ``[N, H, W]``; the result has the same type.
        size: Output side in pixels.
        mode: One of ``FIT_MODES``.
        kind: ``"image"`` or ``"mask"``.

    Returns:
        The fitted stack (float32, or bool for masks) and the :class:`FitInfo` to undo it.
    """
    if mode not in FIT_MODES:
        raise ValueError(f"unknown fit mode {mode!r}; valid modes: {', '.join(FIT_MODES)}")
    _check_kind(kind)
    x, was_numpy = _as_tensor(images, kind)
    if x.ndim != 3:
        raise ValueError(f"expected [N, H, W] images, got shape {tuple(x.shape)}")
    shape = (int(x.shape[1]), int(x.shape[2]))
    pixels = x.shape[0] * fit_pixels(shape, size, mode)
    if pixels > MAX_PIXELS:
        raise ValueError(f"fitting {x.shape[0]} slices of {shape[1]}x{shape[0]} to {size}x{size} ({mode}) takes "
                         f"{pixels:,} pixels; at most {MAX_PIXELS:,} (the limit)")
    info = FitInfo(mode, int(size), shape, _fit_pad(shape, size, mode))
    fill = x.new_zeros((x.shape[0], 1, 1)) if kind == "mask" else x.amin(dim=(1, 2), keepdim=True)
    out = _resize(_pad_or_crop(x, info.pad, fill), (size, size), kind)
    return _finish(out, x, was_numpy), info


def restore_size(maps, info: FitInfo, kind: str = "image"):
    """Undo :func:`fit_to_size`: ``[N, size, size]`` or ``[N, 1, size, size]`` maps back to ``[N, H, W]``.

    Resizes back to the padded shape, then removes the padding; regions that ``"center"`` cropped
    away come back as 0 (False for masks). Masks use nearest neighbour and come back as bool.

    Args:
        maps: numpy array or torch tensor; the result has the same type (and device).
        info: The :class:`FitInfo` returned by :func:`fit_to_size`.
        kind: ``"image"`` (float maps) or ``"mask"``.
    """
    _check_kind(kind)
    x, was_numpy = _as_tensor(maps, kind)
    if x.ndim == 4 and x.shape[1] == 1:
        x = x[:, 0]
    if x.ndim != 3 or tuple(x.shape[1:]) != (info.size, info.size):
        raise ValueError(f"expected [N, {info.size}, {info.size}] maps, got {tuple(maps.shape)}")
    resized = _resize(x, info.padded_shape, kind)
    top, bottom, left, right = info.pad
    out = _pad_or_crop(resized, (-top, -bottom, -left, -right), x.new_zeros((x.shape[0], 1, 1)))
    return _finish(out, x, was_numpy)
