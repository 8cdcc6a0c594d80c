"""Ultralytics integration: YAML layers, registration, the YOLO class, offline settings, the CLI."""

from .model import YOLO, YOLOv10, resolve_data, resolve_model, shipped_models, transfer_weights
from .register import register, registered_layers

__all__ = [
    "YOLO",
    "YOLOv10",
    "register",
    "registered_layers",
    "resolve_data",
    "resolve_model",
    "shipped_models",
    "transfer_weights",
]
