"""Typed configuration of a model folder: UNet, schedule, noise, detection, preprocessing, training.

Every dataclass validates itself on construction and round-trips through plain JSON data
(``to_dict`` / ``from_dict``); ``from_dict`` rejects unknown keys, so a typo in a config file
is an error naming the key instead of a silently ignored value.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from typing import Any, TypeVar

from synomaly import limits
from synomaly.errors import ConfigError
from synomaly.preprocess.settings import Preprocessing

T = TypeVar("T")

FUSION_MODES = ("binary", "continuous")
SCHEDULES = ("cosine", "linear")
SAMPLERS = ("one-step", "chain", "autoddpm")
PERCEPTUAL_MAPS = ("ssim",)
# Why AutoDDPM's original perceptual term is refused (docs/method.md, AutoDDPM).
LPIPS_UNAVAILABLE = ("'lpips' is not available: its network is the lpips package's over torchvision with ImageNet weights, which "
                     "this package neither depends on (torchvision wheels pin their own torch) nor downloads; use 'ssim'")
LOSSES = ("mse", "hybrid")
PRECISIONS = {"32": "32-true", "bf16": "bf16-mixed"}  # to Lightning's names
FLIPS = {"both": (-1, -2), "horizontal": (-1,), "vertical": (-2,), "none": ()}  # the tensor axes flipped
# What config.json records about a training run beside its TrainConfig fields.
# ``orientation`` and ``pixel_spacing_mm``: the training slices' geometry (``synomaly.io.training_geometry``);
# ``intensity``: statistics of the preprocessed training slices (``synomaly.input_checks``).
TRAINING_OUTCOME = ("images", "final_step", "note", "nifti_orientation", "orientation", "orientations", "pixel_spacing_mm",
                    "seconds_last_run", "device", "world_size", "intensity")


def _check(condition: bool, option: str, problem: str) -> None:
    if not condition:
        raise ConfigError(option, problem)


def _at_most(value: float, limit: float, option: str) -> None:
    """Refuse ``value`` above ``limit`` (one of ``synomaly.limits``)."""
    _check(value <= limit, option, f"must be <= {limit} (the limit), got {value}")


@dataclass(frozen=True)
class ModelConfig:
    """Keyword arguments of MONAI's ``DiffusionModelUNet`` (2-D, one channel in and out).

    Attributes:
        channels: Feature channels per resolution level.
        attention_levels: Whether each level has self-attention.
        num_res_blocks: Residual blocks per level.
        num_head_channels: Channels per attention head.
        norm_num_groups: Groups of the group normalisation (must divide every channel count).
        resblock_updown: Down/up-sample with residual blocks (guided-diffusion style).
        use_flash_attention: Use PyTorch's fused attention kernel.
        image_size: The square image size the model is trained at.
    """

    channels: tuple[int, ...] = (32, 64, 128)
    attention_levels: tuple[bool, ...] = (False, False, True)
    num_res_blocks: int = 1
    num_head_channels: int = 32
    norm_num_groups: int = 32
    resblock_updown: bool = False
    use_flash_attention: bool = False
    image_size: int = 64

    def __post_init__(self) -> None:
        object.__setattr__(self, "channels", tuple(int(c) for c in self.channels))
        object.__setattr__(self, "attention_levels", tuple(bool(a) for a in self.attention_levels))
        _check(len(self.channels) >= 1, "model.channels", "needs at least one level")
        _check(len(self.channels) <= limits.MAX_LEVELS, "model.channels",
               f"at most {limits.MAX_LEVELS} levels (the limit), got {len(self.channels)}")
        _at_most(max(self.channels), limits.MAX_CHANNELS, "model.channels")
        _check(
            len(self.attention_levels) == len(self.channels),
            "model.attention_levels",
            f"needs one entry per level ({len(self.channels)}), got {len(self.attention_levels)}",
        )
        _check(self.norm_num_groups >= 1, "model.norm_num_groups", f"must be >= 1, got {self.norm_num_groups}")
        _check(
            all(c > 0 and c % self.norm_num_groups == 0 for c in self.channels),
            "model.channels",
            f"every channel count must be a positive multiple of norm_num_groups={self.norm_num_groups}",
        )
        _check(self.num_res_blocks >= 1, "model.num_res_blocks", "must be >= 1")
        _at_most(self.num_res_blocks, limits.MAX_RES_BLOCKS, "model.num_res_blocks")
        _check(self.num_head_channels >= 1, "model.num_head_channels", "must be >= 1")
        _at_most(self.num_head_channels, limits.MAX_CHANNELS, "model.num_head_channels")
        _check(self.image_size >= 8, "model.image_size", f"must be >= 8, got {self.image_size}")
        _at_most(self.image_size, limits.MAX_IMAGE_SIZE, "model.image_size")
        _check(
            self.image_size % self.size_multiple == 0,
            "model.image_size",
            f"{self.image_size} is not divisible by {self.size_multiple} "
            f"(2^(levels-1) for {len(self.channels)} levels)",
        )

    @property
    def size_multiple(self) -> int:
        """Image sides must be multiples of this (each level halves the resolution)."""
        return 2 ** (len(self.channels) - 1)

    def unet_kwargs(self) -> dict[str, Any]:
        """Arguments for ``monai.networks.nets.DiffusionModelUNet``."""
        return {
            "spatial_dims": 2,
            "in_channels": 1,
            "out_channels": 1,
            "channels": self.channels,
            "attention_levels": self.attention_levels,
            "num_res_blocks": self.num_res_blocks,
            "num_head_channels": self.num_head_channels,
            "norm_num_groups": self.norm_num_groups,
            "resblock_updown": self.resblock_updown,
            "use_flash_attention": self.use_flash_attention,
        }


MODEL_PRESETS: dict[str, ModelConfig] = {
    # The reference guided-diffusion UNet: 98,619,009 parameters.
    "paper": ModelConfig(
        channels=(128, 128, 256, 384, 512),
        attention_levels=(False, False, False, True, True),
        num_res_blocks=2,
        num_head_channels=64,
        resblock_updown=True,
        use_flash_attention=True,
        image_size=128,
    ),
    # About 2.7 M parameters: trains on a laptop CPU at 64x64.
    "small": ModelConfig(),
    # About 25 k parameters: for tests.
    "tiny": ModelConfig(
        channels=(8, 8, 8),
        attention_levels=(False, False, True),
        num_head_channels=8,
        norm_num_groups=8,
        image_size=32,
    ),
}


def model_preset(name: str, **overrides: Any) -> ModelConfig:
    """The named UNet preset (``paper``, ``small``, ``tiny``), with optional field overrides."""
    if name not in MODEL_PRESETS:
        raise ValueError(f"unknown model preset {name!r}; valid presets: {', '.join(sorted(MODEL_PRESETS))}")
    return dataclasses.replace(MODEL_PRESETS[name], **overrides)


@dataclass(frozen=True)
class ScheduleConfig:
    """Noise schedule: ``cosine`` (Nichol & Dhariwal) or ``linear`` (Ho et al.), with T steps."""

    kind: str = "cosine"
    num_timesteps: int = 1000

    def __post_init__(self) -> None:
        _check(self.kind in SCHEDULES, "schedule.kind", f"must be one of {', '.join(SCHEDULES)}, got {self.kind!r}")
        _check(self.num_timesteps >= 2, "schedule.num_timesteps", f"must be >= 2, got {self.num_timesteps}")
        _at_most(self.num_timesteps, limits.MAX_TIMESTEPS, "schedule.num_timesteps")


@dataclass(frozen=True)
class DetectConfig:
    """Multi-stage detection settings (docs/method.md §3-5).

    Attributes:
        t: Partial diffusion timestep of each stage (0 <= t < T).
        max_stages: Upper bound on stages (network evaluations) per image; 1 is single-stage.
        kernel: Odd size of the OpenCV-style Gaussian blur applied before differencing.
        threshold: Differences below this (on the [-1, 1] scale) are set to zero.
        min_size: Connected components smaller than this many pixels are removed.
        fusion: Fusion weight: ``binary`` (the mask, the paper's figure) or ``continuous``
            (the thresholded difference, as the reference scripts do).
        tol: A stage's relative mask-area change below this stops the image.
        min_area: Floor of the denominator of the relative change, in pixels.
        connectivity: 1 (4-neighbourhood) or 2 (8-neighbourhood) for connected components.
        noise: Name of the noise added at inference (``gaussian`` for Synomaly).
        sampler: ``one-step`` (predict x_0 from x_t in one evaluation, the paper's rule) or
            ``chain`` (AnoDDPM: the ancestral reverse chain from t to 0, the inference noise drawn
            at every step).
        chain_steps: Network evaluations of the reverse chain: the chain visits this many
            timesteps spaced evenly from t down to 0 (``t + 1`` is the full chain). Also the first
            reconstruction of ``autoddpm``.
        inpaint_t: ``autoddpm``: the timestep its RePaint inpainting starts from; every timestep
            from there down to 1 is visited.
        resamplings: ``autoddpm``: network evaluations per inpainting timestep (RePaint's jumps back
            by one step; 1 is none).
        perceptual: ``autoddpm``: the perceptual map of its mask: ``ssim`` (the local SSIM
            dissimilarity; the original's LPIPS is refused, see ``LPIPS_UNAVAILABLE``).
        dilation: ``autoddpm``: odd side of the square that dilates its mask (1: none).
        mask_threshold: ``autoddpm``: value of the perceptual-residual map (in [0, 1]) above which a
            pixel is inpainted; ``None``: each image's 95th percentile of that map.
    """

    t: int = 200
    max_stages: int = 5
    kernel: int = 5
    threshold: float = 0.1
    min_size: int = 30
    fusion: str = "binary"
    tol: float = 0.01
    min_area: int = 500
    connectivity: int = 1
    noise: str = "gaussian"
    sampler: str = "one-step"
    chain_steps: int = 10
    inpaint_t: int = 50
    resamplings: int = 4
    perceptual: str = "ssim"
    dilation: int = 3
    mask_threshold: float | None = None

    def __post_init__(self) -> None:
        _check(self.t >= 0, "detect.t", f"must be >= 0, got {self.t}")
        _check(self.t < limits.MAX_TIMESTEPS, "detect.t", f"must be < {limits.MAX_TIMESTEPS} (the limit of T), got {self.t}")
        _check(self.max_stages >= 1, "detect.max_stages", f"must be >= 1, got {self.max_stages}")
        _at_most(self.max_stages, limits.MAX_STAGES, "detect.max_stages")
        _check(self.kernel >= 1 and self.kernel % 2 == 1, "detect.kernel", f"must be a positive odd integer, got {self.kernel}")
        _at_most(self.kernel, limits.MAX_KERNEL, "detect.kernel")
        _check(0.0 <= self.threshold < 2.0, "detect.threshold", f"must be in [0, 2), got {self.threshold}")
        _check(self.min_size >= 0, "detect.min_size", f"must be >= 0, got {self.min_size}")
        _at_most(self.min_size, limits.MAX_AREA, "detect.min_size")
        _check(self.fusion in FUSION_MODES, "detect.fusion", f"must be one of {', '.join(FUSION_MODES)}, got {self.fusion!r}")
        _check(self.tol >= 0.0, "detect.tol", f"must be >= 0, got {self.tol}")
        _check(self.min_area >= 1, "detect.min_area", f"must be >= 1, got {self.min_area}")
        _at_most(self.min_area, limits.MAX_AREA, "detect.min_area")
        _check(self.connectivity in (1, 2), "detect.connectivity", f"must be 1 or 2, got {self.connectivity}")
        _check(self.sampler in SAMPLERS, "detect.sampler", f"must be one of {', '.join(SAMPLERS)}, got {self.sampler!r}")
        _check(self.chain_steps >= 1, "detect.chain_steps", f"must be >= 1, got {self.chain_steps}")
        _at_most(self.chain_steps, limits.MAX_CHAIN_STEPS, "detect.chain_steps")
        self._check_autoddpm()

    def _check_autoddpm(self) -> None:
        _check(self.inpaint_t >= 1, "detect.inpaint_t", f"must be >= 1, got {self.inpaint_t}")
        _check(self.inpaint_t < limits.MAX_TIMESTEPS, "detect.inpaint_t",
               f"must be < {limits.MAX_TIMESTEPS} (the limit of T), got {self.inpaint_t}")
        _check(self.resamplings >= 1, "detect.resamplings", f"must be >= 1, got {self.resamplings}")
        _at_most(self.resamplings, limits.MAX_RESAMPLINGS, "detect.resamplings")
        _check(self.perceptual != "lpips", "detect.perceptual", LPIPS_UNAVAILABLE)
        _check(self.perceptual in PERCEPTUAL_MAPS, "detect.perceptual",
               f"must be one of {', '.join(PERCEPTUAL_MAPS)}, got {self.perceptual!r}")
        _check(self.dilation >= 1 and self.dilation % 2 == 1, "detect.dilation", f"must be a positive odd integer, got {self.dilation}")
        _at_most(self.dilation, limits.MAX_KERNEL, "detect.dilation")
        if self.mask_threshold is not None:
            number = isinstance(self.mask_threshold, (int, float)) and not isinstance(self.mask_threshold, bool)
            _check(number and 0.0 <= self.mask_threshold <= 1.0, "detect.mask_threshold",
                   f"must be a number in [0, 1] or null (each image's 95th percentile), got {self.mask_threshold!r}")
            object.__setattr__(self, "mask_threshold", float(self.mask_threshold))

    def check_timestep(self, num_timesteps: int) -> None:
        """Raise ``ConfigError`` unless ``t`` (and ``autoddpm``'s ``inpaint_t``) are timesteps of a ``num_timesteps`` schedule."""
        _check(self.t < num_timesteps, "detect.t", f"must be < T={num_timesteps}, got {self.t}")
        if self.sampler == "autoddpm":
            _check(self.inpaint_t < num_timesteps, "detect.inpaint_t", f"must be < T={num_timesteps}, got {self.inpaint_t}")


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation and hardware settings.

    Attributes:
        steps: Optimiser steps in total (a resumed run stops at the same count).
        batch_size: Images per step and device.
        lr: AdamW learning rate.
        weight_decay: AdamW weight decay.
        grad_clip: Gradient norm clipping (0 disables).
        ema_decay: Decay of the exponential moving average of the weights that is exported.
        loss: ``mse`` or ``hybrid`` (MSE plus the fixed-variance variational bound).
        flips: Random flips, each axis with probability 1/2: ``both``, ``horizontal`` (left-right
            only: keeps brains and ultrasound upright), ``vertical`` or ``none``. ``true``/``false`` mean ``both``/``none``;
            ``None`` (the default) takes the modality preset's (``synomaly train``), else ``both``.
        precision: ``32`` or ``bf16`` (mixed).
        accelerator: Lightning accelerator (``auto``, ``cpu``, ``gpu``).
        devices: Devices per node.
        num_nodes: Nodes (multi-node DDP, e.g. under SLURM).
        strategy: Lightning strategy (``auto``, ``ddp``, ...).
        seed: Seed of the data order, noise and initial weights.
        checkpoint_every: Steps between resume checkpoints.
        preview_every: Steps between preview pictures (0 disables).
        log_every: Steps between log rows.
        num_workers: Data-loader worker processes.
        progress: Show a progress bar.
    """

    steps: int = 1000
    batch_size: int = 8
    lr: float = 1e-4
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    loss: str = "mse"
    flips: bool | str | None = None
    precision: str = "32"
    accelerator: str = "auto"
    devices: int = 1
    num_nodes: int = 1
    strategy: str = "auto"
    seed: int = 0
    checkpoint_every: int = 200
    preview_every: int = 500
    log_every: int = 10
    num_workers: int = 0
    progress: bool = True

    def __post_init__(self) -> None:
        _check(self.steps >= 1, "train.steps", f"must be >= 1, got {self.steps}")
        _at_most(self.steps, limits.MAX_STEPS, "train.steps")
        _check(self.batch_size >= 1, "train.batch_size", f"must be >= 1, got {self.batch_size}")
        _at_most(self.batch_size, limits.MAX_BATCH_SIZE, "train.batch_size")
        _check(self.lr > 0, "train.lr", f"must be > 0, got {self.lr}")
        _check(math.isfinite(self.lr), "train.lr", f"must be finite, got {self.lr}")
        _check(0.0 <= self.weight_decay < math.inf, "train.weight_decay", f"must be a finite number >= 0, got {self.weight_decay}")
        _check(0.0 <= self.grad_clip < math.inf, "train.grad_clip", f"must be a finite number >= 0 (0 disables), got {self.grad_clip}")
        _check(0.0 <= self.ema_decay < 1.0, "train.ema_decay", f"must be in [0, 1), got {self.ema_decay}")
        _check(self.loss in LOSSES, "train.loss", f"must be one of {', '.join(LOSSES)}, got {self.loss!r}")
        flips = self.flips.lower() if isinstance(self.flips, str) else self.flips
        flips = {True: "both", False: "none", "true": "both", "false": "none"}.get(flips, flips)
        _check(flips is None or flips in FLIPS, "train.flips", f"must be one of {', '.join(FLIPS)}, got {self.flips!r}")
        object.__setattr__(self, "flips", flips)
        _check(self.precision in PRECISIONS, "train.precision", f"must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        _check(self.checkpoint_every >= 1, "train.checkpoint_every", "must be >= 1")
        for name in ("checkpoint_every", "preview_every", "log_every"):
            value = getattr(self, name)
            _check(value >= 0, f"train.{name}", f"must be >= 0, got {value}")
            _at_most(value, limits.MAX_STEPS, f"train.{name}")
        _check(self.devices >= 1 and self.num_nodes >= 1, "train.devices", "devices and num_nodes must be >= 1")
        _at_most(self.devices, limits.MAX_DEVICES, "train.devices")
        _at_most(self.num_nodes, limits.MAX_DEVICES, "train.num_nodes")
        _check(self.num_workers >= 0, "train.num_workers", f"must be >= 0 (0 loads data in the main process), got {self.num_workers}")
        _at_most(self.num_workers, limits.MAX_WORKERS, "train.num_workers")
        _check(0 <= self.seed <= limits.MAX_SEED, "train.seed", f"must be in [0, {limits.MAX_SEED}], got {self.seed}")



@dataclass(frozen=True)
class PipelineConfig:
    """Everything ``config.json`` of a model folder holds, checked as a whole on construction.

    Attributes:
        model: The UNet.
        schedule: The noise schedule.
        noise: The training noise as ``{"name": <registered noise>, **its parameters}``; each noise class
            validates its own parameters, so the section is checked by building the noise.
        detect: Detection defaults (``thresholds.json`` beside the config overrides the calibrated ones).
        preprocess: The preprocessing (and foreground rule) of training, repeated at inference; ``None``
            (``{}`` in the file) for folders that predate it: defaults at the model's size.
        training: The :class:`TrainConfig` fields of the run and its outcome (``TRAINING_OUTCOME``).
        method: The registered method (``synomaly.methods``).
        version: The package version that wrote the folder.
    """

    model: ModelConfig = field(default_factory=ModelConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    noise: dict[str, Any] = field(default_factory=lambda: {"name": "synomaly"})
    detect: DetectConfig = field(default_factory=DetectConfig)
    preprocess: Preprocessing | None = None
    training: dict[str, Any] = field(default_factory=dict)
    method: str = "diffusion"
    version: str = ""

    def __post_init__(self) -> None:
        self.detect.check_timestep(self.schedule.num_timesteps)
        from synomaly.methods import get_method  # the registry imports this module
        from synomaly.noise import NOISES, noise_from_dict

        get_method(self.method)
        _check(isinstance(self.noise, dict) and "name" in self.noise, "noise", "needs a 'name'")
        if self.noise["name"] in NOISES:  # a noise registered by the user's own module is checked when it is built
            noise_from_dict(self.noise)
        if isinstance(self.preprocess, dict):  # the plain-data form, as older code passed it
            object.__setattr__(self, "preprocess", Preprocessing.from_dict(self.preprocess) if self.preprocess else None)
        _check(self.preprocess is None or isinstance(self.preprocess, Preprocessing), "preprocess",
               f"expected preprocessing settings, got {type(self.preprocess).__name__}")
        check_training_record(self.training)

    @property
    def preprocessing(self) -> Preprocessing:
        """The stored preprocessing, or the defaults at the model's size for folders that predate it."""
        return self.preprocess or Preprocessing(size=self.model.image_size)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON data (tuples become lists)."""
        data = _to_plain(dataclasses.asdict(self))
        data["preprocess"] = data["preprocess"] or {}
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PipelineConfig:
        """Rebuild from ``to_dict`` output; unknown keys or bad values raise ``ConfigError``."""
        if isinstance(data, dict) and data.get("preprocess") == {}:
            data = {**data, "preprocess": None}
        return from_dict(cls, data)


def check_training_record(record: dict[str, Any]) -> None:
    """Raise ``ConfigError`` unless ``record`` holds valid :class:`TrainConfig` fields and ``TRAINING_OUTCOME`` keys only."""
    _check(isinstance(record, dict), "training", f"expected an object, got {type(record).__name__}")
    settings = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(record) - settings - set(TRAINING_OUTCOME))
    _check(not unknown, "training", f"unknown key(s) {', '.join(unknown)}; valid keys: "
           f"{', '.join(sorted(settings | set(TRAINING_OUTCOME)))}")
    from_dict(TrainConfig, {key: value for key, value in record.items() if key in settings}, "training")


def _to_plain(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _to_plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_to_plain(v) for v in obj]
    return obj


def from_dict(cls: type[T], data: Any, prefix: str = "") -> T:
    """Build dataclass ``cls`` from plain data, recursing into nested dataclass fields.

    Raises:
        ConfigError: on unknown keys, values of the wrong type, or values out of range.
    """
    name = prefix or cls.__name__
    if not isinstance(data, dict):
        raise ConfigError(name, f"expected an object, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - fields)
    if unknown:
        raise ConfigError(name, f"unknown key(s) {', '.join(unknown)}; valid keys: {', '.join(sorted(fields))}")
    kwargs = {key: _coerce(hints[key], value, f"{prefix}.{key}" if prefix else key) for key, value in data.items()}
    return cls(**kwargs)


def _coerce(hint: Any, value: Any, option: str) -> Any:
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        return from_dict(hint, value, option)
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        members = [arg for arg in typing.get_args(hint) if arg is not type(None)]
        section = members[0] if len(members) == 1 else None
        if value is None or not (isinstance(section, type) and dataclasses.is_dataclass(section)):
            return value
        return from_dict(section, value, option)  # an optional section
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(option, f"expected a list, got {value!r}")
        inner = typing.get_args(hint)[0]
        return tuple(_coerce(inner, v, option) for v in value)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(option, f"expected an object, got {value!r}")
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(option, f"expected true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(option, f"expected an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(option, f"expected a number, got {value!r}")
        return float(value)
    if hint is str and not isinstance(value, str):
        raise ConfigError(option, f"expected a string, got {value!r}")
    return value
