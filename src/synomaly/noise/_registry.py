"""The noise registry, parameter checks and tensor helpers shared by every noise."""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Callable
from typing import Any, Protocol, TypeVar

import torch
from torch import Tensor

from synomaly.errors import ConfigError


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
    if name is None or not dataclasses.is_dataclass(noise):  # registered classes are dataclasses
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
    wanted = "an integer" if integer else "a finite number"
    number: float
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ConfigError(label, f"{param} must be {wanted}, got {value!r}")
    if not integer:
        number = float(value)
    elif isinstance(value, numbers.Integral):
        number = int(value)
    else:
        raise ConfigError(label, f"{param} must be {wanted}, got {value!r}")
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
