"""yoloattn: content-aware sparse attention layers for Ultralytics YOLO.

``import yoloattn`` registers the layers with Ultralytics (YAML rows such as
``[-1, 1, BiLevelRoutingAttention, []]`` then build in stock Ultralytics) and keeps Ultralytics
offline (see :mod:`yoloattn.yolo.offline`).
"""

from .nn import BiFormerBlock, BiLevelRoutingAttention, DAttention, DAttentionBaseline, get_backend, set_backend, use_backend
from .yolo import YOLO, YOLOv10, register, transfer_weights

__version__ = "0.1.0"

register()

__all__ = [
    "BiFormerBlock",
    "BiLevelRoutingAttention",
    "DAttention",
    "DAttentionBaseline",
    "YOLO",
    "YOLOv10",
    "__version__",
    "get_backend",
    "register",
    "set_backend",
    "transfer_weights",
    "use_backend",
]
