"""Deformable attentions as YAML layers: DAT's deformable attention and D-LKA."""

from __future__ import annotations

from ...nn import dat as _dat
from ...nn import dlka as _dlka
from .base import TakesInputChannels

__all__ = ["DAttention", "DLKA"]


class DAttention(_dat.DAttention, metaclass=TakesInputChannels):
    """:class:`yoloattn.nn.DAttention` (deformable attention) as a YAML layer.

    YAML: ``[-1, 1, DAttention, []]``, keywords ``[{stride: 4}]``, or positional after ``c1``:
    ``[n_heads, n_groups, stride, ksize, offset_range_factor, pe, pe_size, attn_drop, proj_drop, residual]``.
    The input channel count comes from the model.
    """


class DLKA(_dlka.DLKA, metaclass=TakesInputChannels):
    """:class:`yoloattn.nn.DLKA` (deformable large-kernel attention) as a YAML layer: ``[-1, 1, DLKA, []]``.

    Its only argument is the input channel count, which comes from the model. Under ONNX export it runs
    its ``grid_sample`` formulation (deformable convolution has no ONNX operator).
    """
