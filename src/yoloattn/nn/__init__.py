"""Pure-PyTorch attention layers (no Ultralytics import, no global side effects)."""

from .backends import BackendUnavailableError, YoloattnWarning, get_backend, ops, set_backend, use_backend
from .biformer import Attention, AttentionLePE, BiFormerBlock, DropPath, DWConv
from .bra import BiLevelRoutingAttention
from .dat import DAttention, DAttentionBaseline

__all__ = [
    "Attention",
    "AttentionLePE",
    "BackendUnavailableError",
    "BiFormerBlock",
    "BiLevelRoutingAttention",
    "DAttention",
    "DAttentionBaseline",
    "DWConv",
    "DropPath",
    "YoloattnWarning",
    "get_backend",
    "ops",
    "set_backend",
    "use_backend",
]
