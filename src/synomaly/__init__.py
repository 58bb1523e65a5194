"""Synomaly: unsupervised anomaly detection in medical images with Synomaly noise and multi-stage diffusion."""

__version__ = "0.1.0"

from synomaly.config import DetectConfig, ModelConfig, PipelineConfig, ScheduleConfig, model_preset  # noqa: E402
from synomaly.detect import DetectionOutput  # noqa: E402
from synomaly.pipeline import SynomalyPipeline  # noqa: E402

__all__ = [
    "DetectConfig",
    "DetectionOutput",
    "ModelConfig",
    "PipelineConfig",
    "ScheduleConfig",
    "SynomalyPipeline",
    "__version__",
    "model_preset",
]
