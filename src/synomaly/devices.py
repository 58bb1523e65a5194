"""Device names: one vocabulary for every command, checked before any work."""

from __future__ import annotations

import logging

import torch

from synomaly.errors import ConfigError

log = logging.getLogger("synomaly.commands")

DEVICES = "auto, cpu, cuda, cuda:N or mps"


def show_progress() -> bool:
    """Progress bars follow the log level: shown at INFO (the default), hidden by ``--quiet``."""
    return logging.getLogger("synomaly").isEnabledFor(logging.INFO)


def resolve_device(device: str) -> str:
    """Check ``device`` against what this machine has, before any work; ``auto`` picks ``cuda`` when visible.

    One vocabulary for every command: ``auto``, ``cpu``, ``cuda``, ``cuda:N``, ``mps`` (``gpu`` is a
    deprecated spelling of ``cuda``).

    Raises:
        ConfigError: An unknown name, or a device this torch build or machine does not have.
    """
    name = str(device).strip().lower()
    if name == "gpu":
        log.warning("--device gpu is deprecated and will be removed in the next release: use cuda")
        name = "cuda"
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cpu":
        return name
    kind, _, index = name.partition(":")
    if kind == "cuda" and (not index or index.isdigit()):
        if not torch.cuda.is_available():
            raise ConfigError("--device", f"{device!r}: this torch build ({torch.__version__}) sees no CUDA GPU; "
                                                          "use --device cpu (or auto)")
        if index and int(index) >= torch.cuda.device_count():
            raise ConfigError("--device", f"{device!r}: only {torch.cuda.device_count()} CUDA device(s) "
                                                          f"here (cuda:0 .. cuda:{torch.cuda.device_count() - 1})")
        return name
    if name == "mps":
        if not torch.backends.mps.is_available():
            raise ConfigError("--device", "'mps': Apple's Metal backend is not available here; use --device cpu")
        return name
    raise ConfigError("--device", f"must be {DEVICES}, got {device!r}")


def lightning_accelerator(device: str) -> str:
    """The Lightning accelerator of a checked device name (training uses ``--train.devices`` for the count)."""
    name = resolve_device(device)
    if name.startswith("cuda:"):
        raise ConfigError("--device", f"{device!r}: training picks GPUs by --train.devices; to use one "
                                                      f"particular GPU, set CUDA_VISIBLE_DEVICES={name[5:]} and pass --device cuda")
    return {"cuda": "gpu"}.get(name, name)
