"""Pure-PyTorch attention layers (no Ultralytics import)."""

from .backend import get_backend, set_backend, use_backend
from .biformer import Attention, AttentionLePE, BiFormerBlock, DropPath, DWConv
from .bra import BiLevelRoutingAttention
from .dat import DAttention, DAttentionBaseline

__all__ = [
    "Attention",
    "AttentionLePE",
    "BiFormerBlock",
    "BiLevelRoutingAttention",
    "DAttention",
    "DAttentionBaseline",
    "DWConv",
    "DropPath",
    "get_backend",
    "set_backend",
    "use_backend",
]
