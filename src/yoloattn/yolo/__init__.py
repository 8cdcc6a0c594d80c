"""Ultralytics integration: YAML layers, registration, the YOLO class, checkpoints, offline settings, the CLI.

Importing this package imports nothing of Ultralytics; its submodules do, as they are used.
"""

from __future__ import annotations

import importlib

_LAZY = {
    "YOLO": "model",
    "YOLOv10": "model",
    "resolve_data": "model",
    "resolve_model": "model",
    "shipped_models": "model",
    "transfer_weights": "model",
    "register": "register",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'yoloattn.yolo' has no attribute {name!r}")
