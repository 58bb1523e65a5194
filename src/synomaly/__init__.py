"""Synomaly: unsupervised anomaly detection in medical images with Synomaly noise and multi-stage diffusion."""

__version__ = "0.1.0"
