"""Functional ops behind the yoloattn layers, each with named backends (see :mod:`yoloattn.nn.backends`)."""

from .attention import ATTENTION, multi_head_attention
from .mlp import LAYER_NORM_MLP, layer_norm_mlp
from .routed_attention import (ROUTED_ATTENTION, routed_attention, routed_attention_dense, routed_attention_reference,
                               routed_attention_sdpa)

__all__ = [
    "ATTENTION",
    "LAYER_NORM_MLP",
    "ROUTED_ATTENTION",
    "layer_norm_mlp",
    "multi_head_attention",
    "routed_attention",
    "routed_attention_dense",
    "routed_attention_reference",
    "routed_attention_sdpa",
]
