"""Transformer-style attentions as YAML layers: DilateFormer's MSDA, ACmix and HAT's hybrid attention block.

MSDA and ACmix replace their input by the attention's output (their official blocks add the residual
outside the module): as drop-in YOLO layers they default to ``x + layer(x)`` (``residual=False`` for the
module alone), as :class:`~yoloattn.yolo.layers.DAttention` does. HAB is a whole block with its residuals.
"""

from __future__ import annotations

from ...nn import acmix as _acmix
from ...nn import hat as _hat
from ...nn import msda as _msda
from ...nn._checks import flag
from .base import ResidualMixin, TakesInputChannels

__all__ = ["ACmix", "HAB", "MSDA"]


class MSDA(ResidualMixin, _msda.MSDA, metaclass=TakesInputChannels):
    """:class:`yoloattn.nn.MSDA` (multi-scale dilated attention) as a YAML layer: ``[-1, 1, MSDA, [{num_heads: 8}]]``.

    Args:
        c1: channels (from the model).
        num_heads, qkv_bias, qk_scale, attn_drop, proj_drop, kernel_size, dilation: as the official module.
        residual: return ``x + MSDA(x)`` (default).
    """

    def __init__(self, c1: int, num_heads: int = 8, qkv_bias: bool = False, qk_scale=None, attn_drop: float = 0.0,
                 proj_drop: float = 0.0, kernel_size: int = 3, dilation=(1, 2, 3), residual: bool = True, *,
                 backend: str | None = None):
        super().__init__(c1, num_heads, qkv_bias, qk_scale, attn_drop, proj_drop, kernel_size, list(dilation),
                         backend=backend)
        self.residual = flag("residual", residual)


class ACmix(ResidualMixin, _acmix.ACmix, metaclass=TakesInputChannels):
    """:class:`yoloattn.nn.ACmix` as a YAML layer: ``[-1, 1, ACmix, [{kernel_att: 7, head: 4}]]``.

    Its output has the input's channels and size (a row cannot change the channel count Ultralytics records).

    Args:
        c1: channels (from the model).
        kernel_att, head, kernel_conv, dilation: as the official module.
        residual: return ``x + ACmix(x)`` (default).
    """

    def __init__(self, c1: int, kernel_att: int = 7, head: int = 4, kernel_conv: int = 3, dilation: int = 1,
                 residual: bool = True, *, backend: str | None = None):
        super().__init__(c1, c1, kernel_att, head, kernel_conv, 1, dilation, backend=backend)
        self.residual = flag("residual", residual)


class HAB(_hat.HAB, metaclass=TakesInputChannels):
    """:class:`yoloattn.nn.HAB` (HAT's hybrid attention block) as a YAML layer: ``[-1, 1, HAB, [{window_size: 8,
    shift_size: 4}]]``; any input size (padded to the window, shifted-window mask for the padded size)."""
