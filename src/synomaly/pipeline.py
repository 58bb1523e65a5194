"""``SynomalyPipeline``: a trained model folder, loaded without Lightning, that detects anomalies.

A model folder holds ``config.json`` (everything needed to rebuild the model, the noise and the
preprocessing, plus the package version), ``model.safetensors`` (EMA weights) and, after
calibration, ``thresholds.json`` (detection settings chosen on validation data).
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

import synomaly
from synomaly import _atomic
from synomaly._json import read_json
from synomaly.config import DetectConfig, PipelineConfig, from_dict
from synomaly.detect import DetectionOutput, multistage_detect, reconstruct
from synomaly.errors import ConfigError, InputError, OutputExistsError
from synomaly.methods import check_network_size, get_method
from synomaly.model import check_image_size
from synomaly.preprocess import FitInfo, Preprocessing, restore_size
from synomaly.schedule import DiffusionSchedule

log = logging.getLogger(__name__)

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
THRESHOLDS_NAME = "thresholds.json"
CPU_FORWARD_BATCH = 8  # per-image forward time is lowest near here on CPUs (docs/benchmarks.md, "Speed")


def default_forward_batch(device: torch.device) -> int | None:
    """Most images per network call on ``device``: :data:`CPU_FORWARD_BATCH` on CPUs, no limit on GPUs."""
    return CPU_FORWARD_BATCH if device.type == "cpu" else None


def model_folder(name: str | Path) -> Path:
    """The folder a model name means: ``"demo"`` is the shipped demo model unless a ``demo`` folder is here."""
    if str(name) == "demo" and not Path(name).is_dir():
        from synomaly.demo import shipped_model

        return shipped_model()
    return Path(name)


def load_config(folder: str | Path) -> PipelineConfig:
    """Read and validate ``config.json`` of a model folder."""
    path = Path(folder) / CONFIG_NAME
    try:
        config = PipelineConfig.from_dict(read_json(path))
    except ConfigError as error:
        raise InputError(path, str(error)) from None
    if config.version.split(".")[:1] != synomaly.__version__.split(".")[:1]:
        log.warning("%s was written by synomaly %s; this is %s", path, config.version or "?", synomaly.__version__)
    pre, size = config.preprocess, config.model.image_size
    if pre is not None and pre.size != size:  # the network takes image_size only; a hand-edited size would fail every input
        log.warning("%s: preprocess.size %d differs from model.image_size %d; images are fitted to %dx%d, the network's "
                    "input size", path, pre.size, size, size, size)
        config = dataclasses.replace(config, preprocess=dataclasses.replace(pre, size=size))
    return config


def load_thresholds(folder: str | Path, base: DetectConfig) -> DetectConfig:
    """Apply the ``detect`` settings of ``thresholds.json`` (if present) on top of ``base``."""
    path = Path(folder) / THRESHOLDS_NAME
    if not path.exists():
        return base
    data = read_json(path)
    if not isinstance(data, dict) or not isinstance(data.get("detect"), dict):
        raise InputError(path, "expected an object with a 'detect' object")
    try:
        return from_dict(DetectConfig, {**dataclasses.asdict(base), **data["detect"]}, "detect")
    except ConfigError as error:
        raise InputError(path, str(error)) from None


def load_weights(unet: nn.Module, path: Path) -> None:
    """Load safetensors weights into ``unet``; no pickle is ever read."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not path.is_file():
        raise InputError(path, "missing")
    try:
        state = load_file(path)
    except (SafetensorError, OSError, ValueError) as error:
        raise InputError(path, f"not readable safetensors weights ({error})") from None
    expected = unet.state_dict()
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    wrong = [k for k in sorted(expected.keys() & state.keys()) if expected[k].shape != state[k].shape]
    if missing or unexpected or wrong:
        detail = (missing and f"missing {missing[0]}") or (unexpected and f"unexpected {unexpected[0]}") or f"shape of {wrong[0]}"
        raise InputError(path, f"weights do not match config.json ({len(missing) + len(unexpected) + len(wrong)} tensors differ, e.g. {detail})")
    broken = [k for k in sorted(state) if state[k].is_floating_point() and not torch.isfinite(state[k]).all()]
    if broken:
        raise InputError(path, f"{len(broken)} weight tensors hold NaN or infinite values (e.g. {broken[0]}): the training "
                               "that wrote them diverged; train again with a lower --train.lr")
    unet.load_state_dict(state)


class SynomalyPipeline:
    """A diffusion model trained on healthy images, with its detection settings.

    Args:
        unet: The epsilon-prediction network ``unet(x_t, t)``.
        config: The model folder's configuration.
        bf16: Run the network under bfloat16 autocast.
        forward_batch: Most images per network call; larger batches are split into chunks of this size
            (outputs are identical). ``None``: the device's default (:func:`default_forward_batch`).
        channels_last: Run the network in the channels-last memory format (``None``: on CPUs, where oneDNN's
            convolutions are faster in it; the outputs are the same).
        compile: Run the network through ``torch.compile`` (compiled on first use). The batches that shrink
            from stage to stage compile at most twice (static, then with a dynamic batch size; a batch of
            one runs as two). Do not share the network with another pipeline while it runs compiled.
    """

    def __init__(self, unet: nn.Module, config: PipelineConfig, bf16: bool = False, *, forward_batch: int | None = None,
                 channels_last: bool | None = None, compile: bool = False) -> None:
        self.unet = unet.eval()
        self.config = config
        self.method = get_method(config.method)
        self.bf16 = bf16
        if forward_batch is not None and forward_batch < 1:
            raise ValueError(f"forward_batch must be >= 1, got {forward_batch}")
        self._forward_batch = forward_batch
        self.compile = compile
        self.channels_last = self.device.type == "cpu" if channels_last is None else channels_last
        self._runner: Any = None  # the network as run: converted to channels-last and compiled on first use
        self._compile_backend: Any = "inductor"
        self.folder: Path | None = None  # the model folder it was loaded from
        self.schedule = DiffusionSchedule.from_config(config.schedule).to(self.device)

    @property
    def device(self) -> torch.device:
        """Device of the network (its first parameter or buffer; CPU for none); inputs are moved here."""
        tensor = next(itertools.chain(self.unet.parameters(), self.unet.buffers()), None)
        return tensor.device if tensor is not None else torch.device("cpu")

    @property
    def forward_batch(self) -> int | None:
        """Most images per network call (``None``: no limit)."""
        return self._forward_batch if self._forward_batch is not None else default_forward_batch(self.device)

    def network(self, x: Tensor, t: Tensor) -> Tensor:
        """``unet(x, t)`` in float32; with ``bf16`` only this call runs under bfloat16 autocast.

        Everything around it (noising, ``x_0`` prediction, maps, masks, fusion) stays float32. A batch
        larger than :attr:`forward_batch` runs in chunks (each image's output does not depend on the others).
        """
        chunk = self.forward_batch or x.shape[0]
        if x.shape[0] <= chunk:
            return self._forward(x, t)
        return torch.cat([self._forward(xc, tc) for xc, tc in zip(x.split(chunk), t.split(chunk))])

    def _forward(self, x: Tensor, t: Tensor) -> Tensor:
        if self._runner is None:
            if self.channels_last:
                self.unet.to(memory_format=torch.channels_last)  # type: ignore[call-overload]  # kept by a later .to(device)
            self._runner = torch.compile(self.unet, backend=self._compile_backend) if self.compile else self.unet
        n = x.shape[0]
        if self.compile:
            # Fresh tensors (a chunk's storage offset would be guarded on), and a batch of one run as two
            # (torch.compile specialises size one): one graph less to compile each.
            x, t = x.repeat(2 if n == 1 else 1, 1, 1, 1), t.repeat(2 if n == 1 else 1)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            return self._runner(x, t)[:n].float()

    def to(self, device: str | torch.device) -> SynomalyPipeline:
        """Move the network and schedule to ``device``; returns ``self``."""
        self.unet.to(device)
        self.schedule.to(device)
        return self

    @classmethod
    def open(cls, folder: str | Path, device: str = "auto", precision: str = "32", compile: bool = False) -> SynomalyPipeline:
        """:meth:`from_pretrained` with the command line's vocabulary: a device name checked before any work
        (``auto``, ``cpu``, ``cuda``, ``cuda:N``, ``mps``) and ``precision`` ``32`` or ``bf16``."""
        from synomaly.devices import resolve_device

        if precision not in ("32", "bf16"):
            raise ConfigError("--precision", f"must be 32 or bf16, got {precision!r}")
        return cls.from_pretrained(folder, device=resolve_device(device), bf16=precision == "bf16", compile=compile)

    @classmethod
    def from_pretrained(cls, folder: str | Path, device: str | torch.device = "cpu", bf16: bool = False, *,
                        forward_batch: int | None = None, channels_last: bool | None = None,
                        compile: bool = False) -> SynomalyPipeline:
        """Load a model folder written by ``save_pretrained`` or by training; ``"demo"`` is the shipped demo model.

        A folder named ``demo`` in the working directory wins over the shipped model. The network runs with
        fused attention (``scaled_dot_product_attention``) whatever the folder recorded: the weights are the
        same and the outputs agree to float rounding. The execution options
        (``bf16``, ``forward_batch``, ``channels_last``, ``compile``): see the class.
        """
        folder = model_folder(folder)
        if not folder.is_dir():
            raise InputError(folder, "model folder not found")
        config = load_config(folder)
        config = dataclasses.replace(config, detect=load_thresholds(folder, config.detect))
        method = get_method(config.method)
        try:
            check_network_size(config)
        except ConfigError as error:
            raise InputError(folder / CONFIG_NAME, str(error)) from None
        unet = method.build(dataclasses.replace(config, model=dataclasses.replace(config.model, use_flash_attention=True)))
        if method.trained:
            load_weights(unet, folder / WEIGHTS_NAME)
        pipe = cls(unet.to(device), config, bf16=bf16, forward_batch=forward_batch, channels_last=channels_last,
                   compile=compile)
        pipe.folder = folder.resolve()
        return pipe

    def save_pretrained(self, folder: str | Path, overwrite: bool = False) -> Path:
        """Write ``config.json`` and ``model.safetensors`` atomically into ``folder``.

        A method without weights (``Method.trained`` false) writes ``config.json`` only.
        """
        from safetensors.torch import save_file

        folder = Path(folder)
        weights = folder / WEIGHTS_NAME
        config = dataclasses.replace(self.config, version=synomaly.__version__)
        if not self.method.trained:
            if (folder / CONFIG_NAME).exists() and not overwrite:
                raise OutputExistsError(folder / CONFIG_NAME)
            _atomic.write_json(folder / CONFIG_NAME, config.to_dict())
            return folder
        if weights.exists() and not overwrite:
            raise OutputExistsError(weights)
        state = {k: v.detach().to("cpu").contiguous() for k, v in self.unet.state_dict().items()}
        with _atomic.atomic_path(weights) as tmp:
            save_file(state, tmp)
        _atomic.write_json(folder / CONFIG_NAME, config.to_dict())
        return folder

    def inference_noise(self, name: str):
        """The noise added at inference: the training noise's parameters when the names match."""
        from synomaly.noise import make_noise, noise_from_dict

        return noise_from_dict(self.config.noise) if self.config.noise.get("name") == name else make_noise(name)

    def detect(
        self,
        images: Tensor,
        generator: torch.Generator | None = None,
        foreground: Tensor | None = None,
        config: DetectConfig | None = None,
        **overrides: Any,
    ) -> DetectionOutput:
        """Detect anomalies in ``[B, 1, H, W]`` images scaled to [-1, 1].

        Args:
            images: The batch; moved to the pipeline's device.
            generator: Source of the inference noise, on the pipeline's device.
            foreground: Optional ``[B, 1, H, W]`` mask; nothing is flagged outside it.
            config: The detection settings, validated once by :meth:`detect_config` (e.g. for a
                loop over batches); ``None``: the model folder's, with ``overrides``.
            **overrides: Any ``DetectConfig`` field (``t``, ``max_stages``, ``kernel``,
                ``threshold``, ``min_size``, ``fusion``, ...) for this call.
        """
        if config is None:
            config = self.detect_config(**overrides)
        elif overrides:
            raise TypeError("pass either config or DetectConfig fields, not both")
        else:
            config.check_timestep(self.schedule.num_timesteps)
        images = self.check_images(images)
        if foreground is not None:
            foreground = foreground.to(self.device).bool()
            if foreground.shape != images.shape:
                raise ValueError(f"foreground shape {tuple(foreground.shape)} differs from images {tuple(images.shape)}")
        out = multistage_detect(self.network, self.schedule, images, config, self.inference_noise(config.noise),
                                generator, foreground, self.config.method)
        with torch.no_grad(), torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            score = self.method.image_score(self.unet, images, out.reconstruction)
        if score is not None:  # the method's own image score replaces the mask area
            out.score = score.float()
        return out

    def reconstruct(self, images: Tensor, generator: torch.Generator | None = None, **overrides: Any) -> Tensor:
        """The first stage's reconstruction of a checked batch, exactly as ``detect`` computes it."""
        return self.reconstruct_weighted(images, generator, **overrides)[0]

    @torch.no_grad()
    def reconstruct_weighted(self, images: Tensor, generator: torch.Generator | None = None,
                             **overrides: Any) -> tuple[Tensor, Tensor | None]:
        """:meth:`reconstruct` and the weight its difference map is multiplied by (``None`` unless AutoDDPM)."""
        config = self.detect_config(**overrides)
        recon, weight, _ = reconstruct(self.network, self.schedule, images, config, self.inference_noise(config.noise),
                                       generator, self.config.method)
        return recon, weight

    @property
    def preprocessing(self) -> Preprocessing:
        """The preprocessing the model was trained with (defaults at the model's size for old folders)."""
        return self.config.preprocessing

    def preprocess(self, images: Any, foreground: Any = None) -> tuple[Tensor, Tensor, FitInfo]:
        """Raw ``[N, H, W]`` (or ``[H, W]``) intensities to model input, exactly as the command line does it.

        Returns ``[N, 1, S, S]`` images in [-1, 1] and foreground masks on the pipeline's device, and
        the :class:`~synomaly.preprocess.FitInfo` that :meth:`postprocess` needs. ``foreground``: optional
        ``[N, H, W]`` masks that replace the model's computed foreground.
        """
        x, fg, fit = self.preprocessing.apply(np.asarray(images, dtype=np.float32), foreground)
        return torch.from_numpy(x).to(self.device), torch.from_numpy(fg).to(self.device), fit

    def postprocess(self, output: DetectionOutput, fit: FitInfo) -> dict[str, np.ndarray]:
        """``mask``, ``anomaly_map`` and ``reconstruction`` of ``detect`` back at the input's ``[N, H, W]`` size."""
        def back(x: Tensor, kind: str) -> np.ndarray:
            return restore_size(x[:, 0].detach().float().cpu().numpy(), fit, kind=kind)

        return {"mask": back(output.mask, "mask"), "anomaly_map": back(output.anomaly_map, "image"),
                "reconstruction": back(output.reconstruction, "image")}

    def detect_config(self, **overrides: Any) -> DetectConfig:
        """The folder's detection settings with ``overrides`` applied and validated."""
        config = from_dict(DetectConfig, {**dataclasses.asdict(self.config.detect), **overrides}, "detect")
        config.check_timestep(self.schedule.num_timesteps)
        return config

    def check_images(self, images: Tensor) -> Tensor:
        """Validate a [B, 1, H, W] batch in [-1, 1] and move it to the pipeline's device (float32)."""
        if not isinstance(images, Tensor) or images.ndim != 4 or images.shape[1] != 1:
            shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
            raise ValueError(f"images must be a [B, 1, H, W] tensor, got {shape}")
        if not images.is_floating_point():
            raise ValueError(f"images must be floating point in [-1, 1], got {images.dtype}")
        check_image_size(self.config.model, images.shape[2], images.shape[3])
        size = self.config.model.image_size
        if tuple(images.shape[2:]) != (size, size):
            raise ValueError(f"images are {images.shape[3]}x{images.shape[2]} but this model takes {size}x{size}: "
                             "bring raw images to it with pipe.preprocess(arrays) (and outputs back with pipe.postprocess)")
        images = images.to(self.device, torch.float32)
        if not torch.isfinite(images).all():
            raise ValueError("images contain NaN or Inf values")
        lo, hi = images.aminmax()
        if lo < -1.001 or hi > 1.001:
            raise ValueError(f"images must be scaled to [-1, 1], got values in [{lo.item():.3g}, {hi.item():.3g}]")
        return images
