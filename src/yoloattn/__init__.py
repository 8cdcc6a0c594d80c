"""yoloattn: content-aware sparse attention layers for Ultralytics YOLO."""

from .nn import BiFormerBlock, BiLevelRoutingAttention, get_backend, set_backend, use_backend

__version__ = "0.1.0"

__all__ = [
    "BiFormerBlock",
    "BiLevelRoutingAttention",
    "__version__",
    "get_backend",
    "set_backend",
    "use_backend",
]
