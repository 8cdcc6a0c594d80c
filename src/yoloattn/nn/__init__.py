"""Pure-PyTorch attention layers (no Ultralytics import, no global side effects).

Official class names are exported too (``MultiDilatelocalAttention``, ``RepBlock``, ``Sea_Attention``,
``deformable_LKA_Attention``, ``PSA_p``, ...), so code written against the official repositories keeps working.
"""

from .acmix import ACmix
from .backends import BackendUnavailableError, YoloattnWarning, get_backend, ops, set_backend, use_backend
from .biformer import Attention, AttentionLePE, BiFormerBlock, DropPath, DWConv
from .bra import BiLevelRoutingAttention
from .cpca import CPCA, CPCA_ChannelAttention, CPCAChannelAttention, RepBlock
from .dat import DAttention, DAttentionBaseline
from .dlka import DLKA, DeformableConv2d, DeformConv, deformable_LKA, deformable_LKA_Attention
from .ema import EMA, EfficientMultiScaleAttention
from .hat import CAB, HAB, HATChannelAttention, WindowAttention
from .msca import MSCA, AttentionModule, MSCAAttention, MSCASpatialAttention, SegNeXtSpatialAttention
from .msda import MSDA, DilateAttention, MultiDilatelocalAttention
from .polarized import PSA_p, PSA_s, PolarizedSelfAttention
from .sea import Conv2d_BN, Sea_Attention, SeaAttention, SqueezeAxialPositionalEmbedding, h_sigmoid

__all__ = [
    "ACmix",
    "Attention",
    "AttentionLePE",
    "AttentionModule",
    "BackendUnavailableError",
    "BiFormerBlock",
    "BiLevelRoutingAttention",
    "CAB",
    "CPCA",
    "CPCAChannelAttention",
    "CPCA_ChannelAttention",
    "Conv2d_BN",
    "DAttention",
    "DAttentionBaseline",
    "DLKA",
    "DWConv",
    "DeformConv",
    "DeformableConv2d",
    "DilateAttention",
    "DropPath",
    "EMA",
    "EfficientMultiScaleAttention",
    "HAB",
    "HATChannelAttention",
    "MSCA",
    "MSCAAttention",
    "MSCASpatialAttention",
    "MSDA",
    "MultiDilatelocalAttention",
    "PSA_p",
    "PSA_s",
    "PolarizedSelfAttention",
    "RepBlock",
    "SeaAttention",
    "Sea_Attention",
    "SegNeXtSpatialAttention",
    "SqueezeAxialPositionalEmbedding",
    "WindowAttention",
    "YoloattnWarning",
    "deformable_LKA",
    "deformable_LKA_Attention",
    "get_backend",
    "h_sigmoid",
    "ops",
    "set_backend",
    "use_backend",
]
