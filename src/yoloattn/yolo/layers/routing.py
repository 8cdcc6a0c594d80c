"""Bi-Level Routing Attention (BiFormer) as a YAML layer."""

from __future__ import annotations

import inspect

from ...nn import bra as _bra
from .base import TakesInputChannels, _keywords

__all__ = ["BiLevelRoutingAttention"]


class BiLevelRoutingAttention(_bra.BiLevelRoutingAttention, metaclass=TakesInputChannels):
    """:class:`yoloattn.nn.BiLevelRoutingAttention` as a YAML layer.

    YAML: ``[-1, 1, BiLevelRoutingAttention, []]``, keywords ``[{topk: 8}]``, or BiFormer's positional order
    after ``dim``: ``[n_win, num_heads, qk_dim, qk_scale, kv_per_win, kv_downsample_ratio, kv_downsample_kernel,
    kv_downsample_mode, topk, param_attention, param_routing, diff_routing, soft_routing, side_dwconv, auto_pad]``.
    The input channel count comes from the model. A row that sets an argument its configuration ignores
    (``kv_per_win`` without an ``ada_*`` pooling mode, ``kv_downsample_ratio`` without ``avgpool``/``maxpool``,
    ``kv_downsample_kernel``) is refused: it is almost always a value in the wrong position.
    """

    @classmethod
    def check_row(cls, layer, args, kwargs):
        given = dict(zip(_keywords(cls), args), **kwargs)
        defaults = {p.name: p.default for p in inspect.signature(_bra.BiLevelRoutingAttention.__init__).parameters.values()}
        ignored = []
        if not layer.kv_downsample_mode.startswith("ada_"):
            ignored.append("kv_per_win")
        if layer.kv_downsample_mode not in ("avgpool", "maxpool"):
            ignored.append("kv_downsample_ratio")
        ignored.append("kv_downsample_kernel")
        for name in ignored:
            if name in given and given[name] != defaults[name]:
                raise ValueError(f"{name}={given[name]!r} has no effect with kv_downsample_mode="
                                 f"{layer.kv_downsample_mode!r}; check the argument order (positional: "
                                 f"{', '.join(_keywords(cls))}) or use keywords, e.g. [{{topk: 8}}]")
