"""Convolution-style attentions as YAML layers: EMA, CPCA, MSCA, Polarized Self-Attention, Sea-Attention.

Each keeps its input's channel count and takes no channel argument in the row (the model gives it);
the remaining arguments are the official module's, positional or as a mapping.
"""

from __future__ import annotations

from ...nn import cpca as _cpca
from ...nn import ema as _ema
from ...nn import msca as _msca
from ...nn import polarized as _polarized
from ...nn import sea as _sea
from .base import TakesInputChannels

__all__ = ["CPCA", "EMA", "MSCA", "PolarizedSelfAttention", "SeaAttention"]


class EMA(_ema.EMA, metaclass=TakesInputChannels):
    """:class:`yoloattn.nn.EMA` (efficient multi-scale attention) as a YAML layer: ``[-1, 1, EMA, [{factor: 32}]]``.

    Args:
        c1: channels (from the model).
        factor: channel groups; must divide ``c1`` (32 divides every YOLOv8/11 width from scale n up).
    """

    def __init__(self, c1: int, factor: int = 32, *, backend: str | None = None):
        super().__init__(c1, None, factor, backend=backend)


class CPCA(_cpca.CPCA, metaclass=TakesInputChannels):
    """:class:`yoloattn.nn.CPCA` (channel prior convolutional attention) as a YAML layer:
    ``[-1, 1, CPCA, [{channelAttention_reduce: 4}]]``."""

    def __init__(self, c1: int, channelAttention_reduce: int = 4, *, backend: str | None = None):  # noqa: N803
        super().__init__(c1, None, channelAttention_reduce, backend=backend)


class MSCA(_msca.MSCA, metaclass=TakesInputChannels):
    """:class:`yoloattn.nn.MSCA` (SegNeXt's multi-scale convolutional attention, the ``MSCAAttention`` of YOLO
    posts) as a YAML layer: ``[-1, 1, MSCA, []]``, optionally ``[{kernel_sizes: [5, [1, 7], [1, 11], [1, 21]]}]``."""


class PolarizedSelfAttention(_polarized.PolarizedSelfAttention, metaclass=TakesInputChannels):
    """:class:`yoloattn.nn.PolarizedSelfAttention` as a YAML layer: ``[-1, 1, PolarizedSelfAttention, [p]]``
    (parallel, the default) or ``[s]`` (sequential)."""


class SeaAttention(_sea.SeaAttention, metaclass=TakesInputChannels):
    """:class:`yoloattn.nn.SeaAttention` (SeaFormer's squeeze-enhanced axial attention) as a YAML layer:
    ``[-1, 1, SeaAttention, [{key_dim: 16, num_heads: 4}]]``.

    Args:
        c1: channels (from the model).
        key_dim: query/key channels per head (SeaFormer: 16).
        num_heads: heads (SeaFormer: 4 to 8).
        attn_ratio: value channels per head relative to ``key_dim`` (SeaFormer: 2).
    """

    def __init__(self, c1: int, key_dim: int = 16, num_heads: int = 4, attn_ratio: float = 2, *,
                 backend: str | None = None):
        super().__init__(c1, key_dim, num_heads, attn_ratio, backend=backend)
