"""yoloattn: attention layers as first-class parts of Ultralytics YOLO.

``import yoloattn`` arranges, without importing Ultralytics, that when Ultralytics is imported its YAML
parser knows yoloattn's layers (rows such as ``[-1, 1, BiLevelRoutingAttention, []]`` build in stock
Ultralytics) and that it runs offline (see :mod:`yoloattn.yolo.offline` for exactly what is set), and that
when timm is imported it knows ``biformer_tiny``/``small``/``base``. If they are imported already, it happens
at once. ``yoloattn.nn`` holds the layers alone (pure PyTorch, no Ultralytics), ``yoloattn.models`` whole
networks (BiFormer).
"""

from __future__ import annotations

import importlib

from . import _hooks
from .nn import (BiFormerBlock, BiLevelRoutingAttention, DAttention, DAttentionBaseline, get_backend, ops, set_backend,
                 use_backend)

__version__ = "0.2.0"
# the Ultralytics releases yoloattn is tested with (see the README's compatibility matrix)
ULTRALYTICS_SUPPORTED = ">=8.3.0,<8.5"

_LAZY = {  # Ultralytics-facing names, imported on first use
    "YOLO": "yoloattn.yolo.model",
    "YOLOv10": "yoloattn.yolo.model",
    "MAIN_JOB": "yoloattn.yolo.cli",
    "register": "yoloattn.yolo.register",
    "insert": "yoloattn.yolo.insert",
    "transfer_weights": "yoloattn.yolo.model",
}

__all__ = [
    "BiFormerBlock",
    "BiLevelRoutingAttention",
    "DAttention",
    "DAttentionBaseline",
    "MAIN_JOB",
    "ULTRALYTICS_SUPPORTED",
    "YOLO",
    "YOLOv10",
    "__version__",
    "insert",
    "get_backend",
    "ops",
    "register",
    "set_backend",
    "transfer_weights",
    "use_backend",
]


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'yoloattn' has no attribute {name!r}")


def _before_ultralytics() -> None:
    from .yolo import compat, offline

    compat.check_installed_version()
    offline.set_environment()


def _after_ultralytics_utils(_module) -> None:
    from .yolo import offline

    offline.ensure_fonts()


def _after_tasks(tasks) -> None:
    from .yolo.register import register

    register(tasks)


def _after_timm(_module) -> None:
    from .models import register_timm

    register_timm()  # biformer_tiny/small/base in timm.create_model


_hooks.before_import("ultralytics", _before_ultralytics)
_hooks.after_import("timm", _after_timm)
_hooks.after_import("ultralytics.utils", _after_ultralytics_utils)
_hooks.after_import("ultralytics.nn.tasks", _after_tasks)
